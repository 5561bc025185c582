"""Per-stream state of the streaming MA-LMM: everything a stream remembers, outside the model.

A `StreamState` holds the visual memory bank and, for the default instruction and for every standing
question, a `QuestionState` with one query memory bank per Q-Former layer. One model serves any number
of states; the model's methods take the state they work on (`MALMM.step`, `MALMM.answer`, ...).

Snapshots (`StreamState.snapshot` / `MALMM.restore`) are plain data: tensors in a flat dict and
JSON-able metadata, so they can be written with safetensors and read back without unpickling. They
hold the visual bank's entries but not the cross-attention keys/values it may keep beside them
(`StreamConfig.visual_kv_cache`): restore projects those again, so a snapshot is as large with the
cache as without, and one saved either way restores into a model either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixmalmm.kernels import StreamingMemoryBank

SNAPSHOT_VERSION = 1


@dataclass
class QuestionState:
    """One instruction's Q-Former memory: the query banks of every layer and the latest output.

    text: the instruction as the Q-Former reads it (the prompt, e.g. "Question: ... Short answer:");
    input_ids: [1, L] Q-Former tokens; banks: one bank per Q-Former layer of entries [1, Q+L, C_q]
    (empty list when memory_bank_length is 0); output: [1, Q, C_q] query outputs of the latest step
    (None before the first step); steps: frames this instruction has seen.
    """

    text: str
    input_ids: torch.Tensor
    banks: list[StreamingMemoryBank]
    output: torch.Tensor | None = None
    steps: int = 0

    @property
    def tokens(self) -> int:
        """Q-Former text tokens L."""
        return int(self.input_ids.shape[1])


@dataclass
class StreamState:
    """Everything one stream remembers.

    visual_bank: entries [1, N_vis, C_vis] (frame features plus frame position embedding), or None
    when memory_bank_length is 0 — then `last_frame` [1, N_vis, C_vis] holds the newest frame only.
    default: the default instruction's memory, used for ad-hoc questions. standing: standing questions
    by their question text. frames: frames stepped so far (the next frame's index). first_time /
    last_time: seconds covered, from the first frame's start to the newest frame's end.
    """

    stream_id: str
    memory_bank_length: int
    visual_bank: StreamingMemoryBank | None
    default: QuestionState
    standing: dict[str, QuestionState] = field(default_factory=dict)
    last_frame: torch.Tensor | None = None
    frames: int = 0
    first_time: float | None = None
    last_time: float | None = None

    def time_span(self) -> tuple[float, float] | None:
        """(first, last) seconds the memory covers, or None before the first frame."""
        if self.first_time is None or self.last_time is None:
            return None
        return (self.first_time, self.last_time)

    def questions(self) -> list[QuestionState]:
        """The default instruction first, then the standing questions in registration order."""
        return [self.default, *self.standing.values()]

    def banks(self) -> list[StreamingMemoryBank]:
        out = [] if self.visual_bank is None else [self.visual_bank]
        for q in self.questions():
            out.extend(q.banks)
        return out

    def nbytes(self) -> int:
        """Bytes held by the banks (constant for a given number of standing questions)."""
        total = sum(b.nbytes() for b in self.banks())
        if self.last_frame is not None:
            total += self.last_frame.numel() * self.last_frame.element_size()
        for q in self.questions():
            if q.output is not None:
                total += q.output.numel() * q.output.element_size()
        return total

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> StateSnapshot:
        """A deep copy of this state as plain data (tensors cloned; safe to keep while streaming goes on)."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {
            "version": SNAPSHOT_VERSION,
            "stream_id": self.stream_id,
            "memory_bank_length": self.memory_bank_length,
            "frames": self.frames,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "questions": [],
            "banks": {},
        }

        def put_bank(prefix: str, bank: StreamingMemoryBank) -> None:
            info = {}
            # Not the visual bank's keys/values (never copied): `MALMM.restore` projects the entries again.
            for k, v in bank.state_dict(side=False).items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{prefix}.{k}"] = v
                else:
                    info[k] = v
            meta["banks"][prefix] = info

        if self.visual_bank is not None:
            put_bank("visual", self.visual_bank)
        if self.last_frame is not None:
            tensors["last_frame"] = self.last_frame.clone()
        for i, q in enumerate(self.questions()):
            meta["questions"].append({"text": q.text, "steps": q.steps, "standing": i > 0})
            tensors[f"q{i}.input_ids"] = q.input_ids.clone()
            if q.output is not None:
                tensors[f"q{i}.output"] = q.output.clone()
            for layer, bank in enumerate(q.banks):
                put_bank(f"q{i}.layer{layer}", bank)
        return StateSnapshot(tensors=tensors, meta=meta)


@dataclass
class StateSnapshot:
    """A stream state as plain data: `tensors` (name -> tensor) and JSON-able `meta`."""

    tensors: dict[str, torch.Tensor]
    meta: dict

    def to_bytes(self) -> bytes:
        """The safetensors serialisation (the metadata rides in its header as JSON)."""
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return save(tensors, metadata={"mixmalmm_state": json.dumps(self.meta)})

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file; I/O failures raise OSError."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> StateSnapshot:
        """Read a file written by `save` (no pickle)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no state snapshot at '{path}'")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "mixmalmm_state" not in header:
                raise ValueError(f"'{path}' is a safetensors file but not a mixmalmm stream snapshot")
            meta = json.loads(header["mixmalmm_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return cls(tensors=tensors, meta=meta)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "the snapshot") -> StateSnapshot:
        """Read what `to_bytes` wrote (no pickle); `where` names it in errors."""
        import struct

        from safetensors.torch import load

        try:  # the header: an 8-byte little-endian length, then that much JSON
            (length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + length])
        except (struct.error, ValueError) as exc:
            raise ValueError(f"{where} is not a safetensors file: {exc}") from exc
        if "mixmalmm_state" not in (header.get("__metadata__") or {}):
            raise ValueError(f"{where} is a safetensors file but not a mixmalmm stream snapshot")
        return cls(tensors=load(data), meta=json.loads(header["__metadata__"]["mixmalmm_state"]))
