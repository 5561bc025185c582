"""Streaming MA-LMM: memory-augmented InstructBLIP on transformers' modules (shared/DESIGN.md §3).

`MALMM` composes transformers' InstructBLIP modules — vision encoder (its `post_layernorm` is LAVIS's
`ln_vision`), query tokens, Q-Former, language projection, causal LLM — with MA-LMM's frame position
embedding and the memory-augmented Q-Former of `qformer.py`. Per-stream memory lives in a `StreamState`
passed to every call; the model holds weights only.

Streaming, one frame at a time (the engine batches the vision encoder across streams):

    model = MALMM.from_pretrained("path/to/instructblip-folder", device="cuda", dtype=torch.float16)
    state = model.create_state("cam1")
    model.register_question(state, "what is the man holding?")      # standing: exact MA-LMM
    feats = model.encode_frames(pixels)                             # [B, 3, H, W] -> [B, N, C]
    model.step([state], feats, [t_seconds])
    model.answer(state, "what is the man holding?").text           # standing question
    model.answer(state, "is there a dog?")                          # ad hoc: one extra Q-Former pass
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

from mixmalmm.kernels import StreamingMemoryBank

from .qformer import BankMemory, ConcatMemory, MemoryQFormer, ReadOnlyMemory, VisualContext
from .state import QuestionState, StateSnapshot, StreamState

MALMM_WEIGHTS = "malmm.safetensors"
MALMM_CONFIG = "malmm_config.json"

FramePositionPolicy = Literal["clamp", "cycle"]
MemorylessClip = Literal["newest", "every_frame"]

#: LAVIS's ln_vision is `nn.LayerNorm(1408)` (eps 1e-5); transformers' post_layernorm takes the vision
#: config's layer_norm_eps (1e-6), which EVA's blocks use.
LAVIS_LN_VISION_EPS = 1e-5


@dataclass(frozen=True)
class Decoding:
    """How answers are generated (LLM `generate` options; beam search when num_beams > 1).

    max_new_tokens / min_new_tokens: bounds on the answer's tokens (min 1: the first token is never the
    end of the sequence). repetition_penalty: transformers' (1.0: none). length_penalty: beam scores
    are divided by length**length_penalty (0: none).
    The defaults are mixmalmm's own (greedy, what the shipped default model is trained and evaluated
    with); `MALMM_DECODING` is MA-LMM's for question answering.
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


#: MA-LMM's QA decoding (its vqa runs: num_beams 5, max_len 10, min_len 1; `predict_answers`'
#: length_penalty 0; `generate`'s repetition_penalty 1.5).
MALMM_DECODING = Decoding(max_new_tokens=10, min_new_tokens=1, num_beams=5, repetition_penalty=1.5, length_penalty=0.0)


@dataclass
class StreamConfig:
    """Streaming options (saved beside the weights as malmm_config.json).

    memory_bank_length: M, entries per bank. 0 disables memory: a stream's step sees its frame only
    (frame position added) and an answer reads the newest frame's queries only, bounded on a stream
    without end. MA-LMM without banks differs on a clip: see memoryless_clip. max_num_frames: rows of the frame position
    table (MA-LMM: 120). frame_position_policy: row used for frame index t >= max_num_frames —
    "clamp" (default) uses the last row, "cycle" uses t mod max_num_frames; never an error.
    prompt_template: the text both the Q-Former and the LLM read for a question (MA-LMM's QA prompt).
    default_question: the question whose query banks serve ad-hoc questions.
    max_instruction_tokens: Q-Former instruction tokens kept (MA-LMM's max_txt_len, truncating left).
    freeze_vision / freeze_llm: keep these modules frozen in training, as MA-LMM does.
    present_frame: the Q-Former's cross-attention also reads the newest frame once more, marked by a
    learned embedding (`present_embedding`, C_vis), after the visual memory bank. MA-LMM's bank carries
    absolute frame positions only, so nothing tells "now" apart from the past; a stream answers questions
    about the present, and this lets a model learn them. Off by default (exact MA-LMM); the shipped
    default model is trained with it on.
    ingest: how a stream's frames should become this model's input, as the wire protocol's
    ActionShotSettings fields (`sample_fps`, `step`, `enabled`, `cut`, `max_seconds`, `blend`, ...): the
    input the model was trained on. The engine (`mixmalmm.streamer.ingest`) uses it unless a request or
    the command line says otherwise; None: MA-LMM's own (10 frames per second, no ActionShot).
    visual_kv_cache: the visual bank also keeps every cross-attention layer's keys and values of its
    entries, projected once per frame and merged with the entries' weights, so a Q-Former step
    projects its new frame only instead of the whole bank (the same result up to rounding: projections
    are affine, merges convex combinations). Costs 2·C_q per cross-attention layer per visual token
    beside the entry's C_vis (InstructBLIP: 6 x 1536 beside 1408, 7.4x the bank's bytes). The cache
    holds the weights' projections when each frame was stepped: after changing the Q-Former's weights,
    restore states from snapshots (which recompute it). False: project the bank at every step.
    memoryless_clip: what the clip pass (`clip_query_output`, evaluation and training) gives the LLM
    when memory_bank_length is 0 — "newest" (default): the last frame's queries, as a stream's answer;
    "every_frame": MA-LMM's own: every frame's queries in order ([T*Q] tokens), each frame without
    its frame position, every frame reading the question. Streams keep "newest" either way.
    decoding: how answers are generated (`Decoding`); None: mixmalmm's defaults (`Decoding()`), except
    that `from_pretrained` gives InstructBLIP and MA-LMM weights MA-LMM's (`MALMM_DECODING`, with the
    folder's generation_config.json fields of the same names over them). A request's options override.
    ln_vision_eps: the epsilon of the vision encoder's post_layernorm (LAVIS's ln_vision); None: the
    vision config's layer_norm_eps. Loading a LAVIS / MA-LMM checkpoint sets LAVIS's 1e-5.
    """

    memory_bank_length: int = 10
    max_num_frames: int = 120
    frame_position_policy: FramePositionPolicy = "clamp"
    prompt_template: str = "Question: {} Short answer:"
    default_question: str = "what is happening in the video?"
    max_instruction_tokens: int = 128
    freeze_vision: bool = True
    freeze_llm: bool = True
    present_frame: bool = False
    ingest: dict | None = None
    visual_kv_cache: bool = True
    memoryless_clip: MemorylessClip = "newest"
    decoding: Decoding | None = None
    ln_vision_eps: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.decoding, dict):  # read back from malmm_config.json
            self.decoding = Decoding(**self.decoding)
        if self.decoding is not None and not isinstance(self.decoding, Decoding):
            raise ValueError(f"decoding must be a Decoding, a mapping of its fields or None, got {self.decoding!r}")
        if self.memoryless_clip not in ("newest", "every_frame"):
            raise ValueError(f"memoryless_clip must be 'newest' or 'every_frame', got {self.memoryless_clip!r}")
        if self.ln_vision_eps is not None and not self.ln_vision_eps > 0:
            raise ValueError(f"ln_vision_eps must be > 0 or None, got {self.ln_vision_eps}")
        if self.memory_bank_length < 0:
            raise ValueError(f"memory_bank_length must be >= 0, got {self.memory_bank_length}")
        if self.max_num_frames < 1:
            raise ValueError(f"max_num_frames must be >= 1, got {self.max_num_frames}")
        if self.frame_position_policy not in ("clamp", "cycle"):
            raise ValueError(f"frame_position_policy must be 'clamp' or 'cycle', got {self.frame_position_policy!r}")
        if "{}" not in self.prompt_template:
            raise ValueError(f"prompt_template needs a '{{}}' for the question, got {self.prompt_template!r}")
        if self.ingest is not None and not isinstance(self.ingest, dict):
            raise ValueError(f"ingest must be a mapping of ActionShot settings or None, got {self.ingest!r}")


@dataclass
class Answer:
    """An answer: text, generated token ids, the seconds the memory covers, and how it was produced.

    mode: "standing" (the question's own query banks, exact MA-LMM) or "adhoc" (one extra Q-Former
    pass over banks built with the default question). empty: the answer decodes to no text (only
    possible with min_new_tokens 0, or tokens that decode to nothing): `text` is "" then.
    """

    question: str
    text: str
    token_ids: list[int]
    time_span: tuple[float, float]
    frames: int
    mode: Literal["standing", "adhoc"]

    @property
    def empty(self) -> bool:
        return not self.text


def _span(time: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(time, (tuple, list)):
        if len(time) != 2:
            raise ValueError(f"a frame's time is seconds or (start, end) seconds, got {time!r}")
        start, end = float(time[0]), float(time[1])
    else:
        start = end = float(time)
    if end < start:
        raise ValueError(f"a frame's time span ends before it starts: ({start}, {end})")
    return start, end


class MALMM(nn.Module):
    """MA-LMM (memory-augmented InstructBLIP) over a transformers `InstructBlipForConditionalGeneration`.

    The modules are taken from `blip` (not copied); parameter names equal transformers' plus
    `frame_position.weight` ([max_num_frames, C_vis], LAVIS's `image_pe.weight`).
    """

    def __init__(
        self,
        blip: InstructBlipForConditionalGeneration,
        processor: InstructBlipProcessor,
        config: StreamConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or StreamConfig()
        self.blip_config: InstructBlipConfig = blip.config
        self.vision_model = blip.vision_model
        self.query_tokens = blip.query_tokens  # [1, Q, C_q]
        self.qformer = MemoryQFormer(blip.qformer)
        self.language_projection = blip.language_projection
        self.language_model = blip.language_model
        vision_hidden = self.blip_config.vision_config.hidden_size
        self.frame_position = nn.Embedding(self.config.max_num_frames, vision_hidden)
        nn.init.zeros_(self.frame_position.weight)  # zero: InstructBLIP weights work zero-shot
        self.frame_position.to(device=self.query_tokens.device, dtype=self.vision_model.dtype)
        self.present_embedding: nn.Parameter | None = None
        if self.config.present_frame:
            self.present_embedding = nn.Parameter(
                torch.zeros(vision_hidden, device=self.query_tokens.device, dtype=self.vision_model.dtype)
            )
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.qformer_tokenizer = processor.qformer_tokenizer
        self.is_encoder_decoder = not self.blip_config.use_decoder_only_language_model
        if self.config.ln_vision_eps is not None:
            self.vision_model.post_layernorm.eps = self.config.ln_vision_eps
        self._freeze()

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        config: StreamConfig | None = None,
        lavis_checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> MALMM:
        """Load a folder written by `InstructBlipForConditionalGeneration.save_pretrained` and its processor.

        Offline (local files only). A folder written by `MALMM.save_pretrained` also restores the frame
        position table and the stream config (unless `config` is given). `lavis_checkpoint`: an MA-LMM /
        LAVIS `.pth` loaded on top, strictly (see `lavis.load_lavis_checkpoint`). dtype defaults to
        float32 on CPU and float16 on CUDA. Decoding: a config without one gets MA-LMM's
        (`MALMM_DECODING`, under the folder's generation_config.json) for a plain InstructBLIP folder or a
        LAVIS checkpoint; a `MALMM.save_pretrained` folder keeps the decoding it was saved with.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no model folder at '{folder}'")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"'{folder}' has no config.json: not a transformers save_pretrained folder")
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        blip_cfg = InstructBlipConfig.from_pretrained(folder, local_files_only=True)
        if blip_cfg.model_type != "instructblip":
            raise ValueError(f"'{folder}' holds a {blip_cfg.model_type!r} model, expected 'instructblip'")
        try:
            processor = InstructBlipProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(
                f"'{folder}' lacks a loadable InstructBLIP processor (tokenizer, qformer_tokenizer/, "
                f"image processor): {err}"
            ) from err
        blip = InstructBlipForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True)
        saved_cfg = folder / MALMM_CONFIG
        if config is None and saved_cfg.is_file():
            config = StreamConfig(**json.loads(saved_cfg.read_text()))
        config = config or StreamConfig()
        if config.decoding is None and (lavis_checkpoint is not None or not saved_cfg.is_file()):
            config = replace(config, decoding=folder_decoding(folder))
        model = cls(blip, processor, config)
        weights = folder / MALMM_WEIGHTS
        if weights.is_file():
            from safetensors.torch import load_file

            extra = load_file(str(weights))
            table = extra.get("frame_position.weight")
            expected = set(model._extra_weights())
            # A folder saved without the present frame may start a model with it (the embedding stays zero).
            if table is None or not set(extra) <= expected:
                raise ValueError(f"'{weights}' must hold 'frame_position.weight' (and, for a model with "
                                 f"present_frame, 'present_embedding'), has {sorted(extra)}")
            if table.shape != model.frame_position.weight.shape:
                raise ValueError(
                    f"'{weights}': frame_position.weight is {tuple(table.shape)}, the model needs "
                    f"{tuple(model.frame_position.weight.shape)} (max_num_frames, vision hidden)"
                )
            with torch.no_grad():
                model.frame_position.weight.copy_(table)
                present = extra.get("present_embedding")
                if present is not None and model.present_embedding is not None:
                    if present.shape != model.present_embedding.shape:
                        raise ValueError(f"'{weights}': present_embedding is {tuple(present.shape)}, the model "
                                         f"needs {tuple(model.present_embedding.shape)}")
                    model.present_embedding.copy_(present)
        if lavis_checkpoint is not None:
            from .lavis import load_lavis_checkpoint

            load_lavis_checkpoint(model, lavis_checkpoint)
        return model.to(device).eval()

    @classmethod
    def tiny(cls, config: StreamConfig | None = None, seed: int = 0, **tiny_kwargs) -> MALMM:
        """A tiny random model with in-code tokenizers (no download), for tests and benchmarks."""
        from .tiny import tiny_instructblip

        blip, processor = tiny_instructblip(seed=seed, **tiny_kwargs)
        return cls(blip, processor, config).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a transformers InstructBLIP folder (weights, config, processor) plus malmm.safetensors
        (the frame position table) and malmm_config.json; `from_pretrained` reads it back."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        extra = self._extra_weights()
        state = {k: v for k, v in self.state_dict().items() if k not in extra}
        with torch.device("meta"):
            skeleton = InstructBlipForConditionalGeneration(self.blip_config)
        skeleton.save_pretrained(folder, state_dict=state)
        self.processor.save_pretrained(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(folder / MALMM_WEIGHTS))
        (folder / MALMM_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    def _extra_weights(self) -> dict[str, torch.Tensor]:
        """MA-LMM's weights beyond transformers' InstructBLIP (kept in malmm.safetensors)."""
        extra = {"frame_position.weight": self.frame_position.weight}
        if self.present_embedding is not None:
            extra["present_embedding"] = self.present_embedding
        return extra

    def _with_present(
        self, source: torch.Tensor, frame: torch.Tensor, mask: torch.Tensor | None = None, projected: bool = False
    ):
        """Cross-attention source [B, S, C] (and mask) with the newest frame [B, N, C_vis] appended, marked,
        when `config.present_frame`; unchanged otherwise. projected: the source holds keys/values
        (`MemoryQFormer.project_visual`), and so does the marked frame appended."""
        if self.present_embedding is None:
            return source, mask
        marked = frame + self.present_embedding.to(frame.dtype)
        if projected:
            marked = self.qformer.project_visual(marked).to(source.dtype)
        source = torch.cat([source, marked], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones(frame.shape[:2], dtype=mask.dtype, device=mask.device)], dim=1)
        return source, mask

    def _bank_source(self, bank: StreamingMemoryBank, newest: torch.Tensor | None):
        """What cross-attention reads from a visual bank: (source [1, K, C], mask [1, K] or None).

        The entries flattened (C = C_vis), or their keys/values when the bank keeps them (C =
        `visual_kv_channels`); then the newest frame [1, N, C_vis], marked, with `config.present_frame`.
        """
        projected = bank.side is not None
        entries, valid = bank.view()
        if projected:
            entries = bank.side_view()
        mask = None if valid is None else valid.reshape(1, -1)
        return self._with_present(entries.reshape(1, -1, entries.shape[-1]), newest, mask, projected)

    def _visual_context(self, source: torch.Tensor, projected: bool, **kw) -> VisualContext:
        """A VisualContext over source [U, K, C]: raw states, or keys/values when `projected`."""
        if projected:
            return VisualContext(projected=self.qformer.split_visual(source), **kw)
        return VisualContext(states=source, **kw)

    def _freeze(self) -> None:
        if self.config.freeze_vision:
            # MA-LMM freezes the EVA encoder only: ln_vision (our post_layernorm) is trained.
            self.vision_model.requires_grad_(False)
            self.vision_model.post_layernorm.requires_grad_(True)
        if self.config.freeze_llm:
            self.language_model.requires_grad_(False)

    def train(self, mode: bool = True) -> MALMM:
        """Frozen modules stay in eval mode (no dropout), as in MA-LMM."""
        super().train(mode)
        if self.config.freeze_vision:
            self.vision_model.eval()
        if self.config.freeze_llm:
            self.language_model.eval()
        return self

    # ------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        """The vision encoder's dtype (frames and the visual bank use it)."""
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def decoding(self) -> Decoding:
        """The model's answer generation settings (a request's options override them)."""
        return self.config.decoding or Decoding()

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def vision_tokens(self) -> int:
        """Tokens per frame N (257 for EVA ViT-g/14 at 224 px)."""
        v = self.blip_config.vision_config
        return (v.image_size // v.patch_size) ** 2 + 1

    @property
    def image_size(self) -> int:
        return self.blip_config.vision_config.image_size

    # ------------------------------------------------------------ text

    def prompt(self, question: str) -> str:
        return self.config.prompt_template.format(question)

    def _qformer_ids(self, text: str) -> torch.Tensor:
        tok = self.qformer_tokenizer
        side = tok.truncation_side
        tok.truncation_side = "left"  # MA-LMM keeps the end of long instructions
        try:
            ids = tok(text, truncation=True, max_length=self.config.max_instruction_tokens, return_tensors="pt")
        finally:
            tok.truncation_side = side
        return ids.input_ids.to(self.device)

    # ------------------------------------------------------------ states

    def create_state(self, stream_id: str = "", default_question: str | None = None) -> StreamState:
        """A fresh state for one stream; its default question's banks serve ad-hoc questions."""
        M = self.config.memory_bank_length
        visual = None
        if M > 0:
            C = self.blip_config.vision_config.hidden_size
            side = self.qformer.visual_kv_channels if self.config.visual_kv_cache else 0
            visual = StreamingMemoryBank(
                M, 1, self.vision_tokens, C, dtype=self.dtype, device=self.device, side_channels=side
            )
        default = self._question_state(default_question or self.config.default_question)
        return StreamState(stream_id=stream_id, memory_bank_length=M, visual_bank=visual, default=default)

    def _question_state(self, question: str) -> QuestionState:
        text = self.prompt(question)
        ids = self._qformer_ids(text)
        banks = []
        if self.config.memory_bank_length > 0:
            banks = self._query_banks(ids.shape[1])
        return QuestionState(text=text, input_ids=ids, banks=banks)

    def _query_banks(self, tokens: int) -> list[StreamingMemoryBank]:
        """One bank per Q-Former layer for an instruction of `tokens` tokens: entries [1, Q+tokens, C_q]."""
        shape = (self.config.memory_bank_length, 1, self.num_queries + tokens, self.qformer.hidden_size)
        return [
            StreamingMemoryBank(*shape, dtype=self.qformer_dtype, device=self.device)
            for _ in range(self.qformer.num_layers)
        ]

    @property
    def qformer_dtype(self) -> torch.dtype:
        return self.qformer.embeddings.layernorm.weight.dtype

    def register_question(self, state: StreamState, question: str) -> QuestionState:
        """Add a standing question with its own query banks (exact MA-LMM from the next frame on).

        Registering an existing question is a no-op. Until its first frame, it is answered ad hoc.
        """
        if not question.strip():
            raise ValueError("a standing question must not be empty")
        if question not in state.standing:
            state.standing[question] = self._question_state(question)
        return state.standing[question]

    def remove_question(self, state: StreamState, question: str) -> None:
        if question not in state.standing:
            raise KeyError(f"stream {state.stream_id!r} has no standing question {question!r}")
        del state.standing[question]

    def frame_index(self, t: int) -> int:
        """Row of the frame position table for the t-th frame of a stream (0-based), per the policy."""
        rows = self.config.max_num_frames
        if self.config.frame_position_policy == "cycle":
            return t % rows
        return min(t, rows - 1)

    # ------------------------------------------------------------ streaming

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vision encoder (with LAVIS's ln_vision = transformers' post_layernorm), batched.

        pixels: [B, 3, H, W] normalised as the InstructBLIP processor does (H = W = image_size).
        Returns [B, N, C_vis] in the model's dtype, N = vision_tokens.
        """
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got shape {tuple(pixels.shape)}")
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(
                f"frames must be {self.image_size}x{self.image_size} pixels, got {pixels.shape[-2]}x{pixels.shape[-1]}"
            )
        return self._vision_features(pixels)

    def _vision_features(self, pixels: torch.Tensor, encoder_grad: bool = False) -> torch.Tensor:
        """Vision encoder, then post_layernorm (ln_vision): pixels [B, 3, H, W] -> [B, N, C_vis].

        encoder_grad: whether the encoder records gradients; post_layernorm follows the caller's mode,
        so a frozen encoder still trains ln_vision, as in MA-LMM.
        """
        vision = self.vision_model
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_grad):
            hidden = vision.encoder(inputs_embeds=vision.embeddings(pixels)).last_hidden_state
        return vision.post_layernorm(hidden)

    @torch.inference_mode()
    def step(
        self,
        states: Sequence[StreamState],
        features: torch.Tensor,
        times: Sequence[float | tuple[float, float]],
    ) -> None:
        """Fold one frame into each state: frame position, visual bank, one Q-Former step per question.

        features: [B, N, C_vis] from `encode_frames` (row b belongs to states[b]); times: per row, the
        frame's time in seconds or a Shot's (start, end) seconds. States stepped together are batched
        where their shapes allow (same bank fill and instruction length).
        """
        if isinstance(states, StreamState):
            raise TypeError("step takes a sequence of states (one per feature row)")
        if features.dim() != 3 or features.shape[0] != len(states) or len(times) != len(states):
            raise ValueError(
                f"need features [B, N, C] and B times for B={len(states)} states, got features "
                f"{tuple(features.shape)} and {len(times)} times"
            )
        if features.shape[1:] != (self.vision_tokens, self.blip_config.vision_config.hidden_size):
            raise ValueError(
                f"features must be [B, {self.vision_tokens}, {self.blip_config.vision_config.hidden_size}], "
                f"got {tuple(features.shape)}"
            )
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a state appears twice in one step")
        features = features.to(device=self.device, dtype=self.dtype)
        spans = [_span(t) for t in times]
        visual: list[torch.Tensor] = []  # per state: [1, K, C_vis], or its keys/values [1, K, D] (projected)
        projected: list[bool] = []
        for b, state in enumerate(states):
            self._check_state(state)
            row = self.frame_index(state.frames)
            x = features[b : b + 1] + self.frame_position.weight[row].to(features.dtype)  # [1, N, C]
            start, end = spans[b]
            bank = state.visual_bank
            if bank is not None:
                kv = self.qformer.project_visual(x) if bank.side is not None else None  # this frame only
                bank.append(x, start, side=kv)
                visual.append(self._bank_source(bank, x)[0])  # <= M past frames + this one, mask-free
                projected.append(kv is not None)
            else:
                state.last_frame = x.clone()
                visual.append(self._with_present(x, x)[0])
                projected.append(False)
            state.frames += 1
            state.first_time = start if state.first_time is None else state.first_time
            state.last_time = end if state.last_time is None else max(state.last_time, end)
        # One Q-Former pass per (state, question); batch rows of equal shapes.
        groups: dict[tuple[int, int, int, bool], list[tuple[int, QuestionState]]] = defaultdict(list)
        for b, state in enumerate(states):
            for q in state.questions():
                held = q.banks[0].count if q.banks else 0
                groups[(visual[b].shape[1], q.tokens, held, projected[b])].append((b, q))
        for (*_, is_projected), rows in groups.items():
            self._qformer_rows(rows, visual, [spans[b][0] for b, _ in rows], is_projected)

    def _qformer_rows(
        self, rows: list[tuple[int, QuestionState]], visual: list[torch.Tensor], times: list[float], projected: bool
    ) -> None:
        members = sorted({b for b, _ in rows})
        slot = {b: i for i, b in enumerate(members)}
        # One stream's source is read in place (the bank's own storage when there is no present frame),
        # and rows that are the streams in order need no index (index_select would copy every key).
        source = visual[members[0]] if len(members) == 1 else torch.cat([visual[b] for b in members], dim=0)
        order = [slot[b] for b, _ in rows]
        index = None if order == list(range(len(members))) else torch.tensor(order, device=self.device)
        context = self._visual_context(source, projected, index=index)
        questions = [q for _, q in rows]
        ids = torch.cat([q.input_ids for q in questions], dim=0)
        queries = self.query_tokens.expand(len(rows), -1, -1)
        memories = None
        if self.config.memory_bank_length > 0:
            memories = [BankMemory([q.banks[i] for q in questions], times) for i in range(self.qformer.num_layers)]
        hidden = self.qformer(queries, ids, None, context, memories)
        for r, q in enumerate(questions):
            q.output = hidden[r : r + 1, : self.num_queries].clone()
            q.steps += 1

    def _check_state(self, state: StreamState) -> None:
        if state.memory_bank_length != self.config.memory_bank_length:
            raise ValueError(
                f"stream {state.stream_id!r} was made with memory_bank_length={state.memory_bank_length}, "
                f"this model uses {self.config.memory_bank_length}"
            )

    def step_frame(self, state: StreamState, pixels: torch.Tensor, time: float | tuple[float, float]) -> None:
        """Encode one preprocessed frame [3, H, W] (or [1, 3, H, W]) and step one state with it."""
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        self.step([state], self.encode_frames(pixels), [time])

    # ------------------------------------------------------------ answering

    @torch.inference_mode()
    def query_output(self, state: StreamState, question: str | None = None, *, adhoc: bool = False):
        """The Q-Former query outputs [1, Q, C_q] the LLM would see for a question, and the mode.

        A standing question (or the default one) that has seen a frame uses its own banks' latest
        output; any other question (or adhoc=True) gets one extra Q-Former pass over the visual bank
        and the default question's query banks.
        """
        return self.query_outputs(state, [question], adhoc=adhoc)[0]

    @torch.inference_mode()
    def query_outputs(
        self, state: StreamState, questions: Sequence[str | None], *, adhoc: bool = False
    ) -> list[tuple[torch.Tensor, Literal["standing", "adhoc"]]]:
        """`query_output` for several questions about one state: ([1, Q, C_q], mode) per question.

        Ad-hoc questions whose instructions have equal token counts share one Q-Former pass (rows of
        one batch, no padding), as the step batches its rows.
        """
        if state.frames == 0:
            raise ValueError(f"stream {state.stream_id!r} has seen no frame yet: nothing to answer about")
        results: list = [None] * len(questions)
        passes: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)  # instruction tokens -> rows
        for i, question in enumerate(questions):
            question = question if question is not None else self._default_question(state)
            own = state.standing.get(question)
            if own is None and self.prompt(question) == state.default.text:
                own = state.default
            if own is not None and own.steps > 0 and not adhoc:
                results[i] = (own.output, "standing")
            else:
                ids = self._qformer_ids(self.prompt(question))
                passes[ids.shape[1]].append((i, ids))
        for rows in passes.values():
            hidden = self._adhoc_outputs(state, torch.cat([ids for _, ids in rows], dim=0))
            for r, (i, _) in enumerate(rows):
                results[i] = (hidden[r : r + 1], "adhoc")
        return results

    def _default_question(self, state: StreamState) -> str:
        # Recover the question from its prompt (the template wraps it).
        head, _, tail = self.config.prompt_template.partition("{}")
        return state.default.text[len(head) : len(state.default.text) - len(tail)]

    def _adhoc_outputs(self, state: StreamState, ids: torch.Tensor) -> torch.Tensor:
        """One Q-Former pass for B instructions ids [B, L] over the state's memory -> [B, Q, C_q]."""
        B = ids.shape[0]
        if state.visual_bank is not None:
            visual = state.visual_bank
            newest = visual.ordered()[0][:, -1] if self.present_embedding is not None else None
            source, mask = self._bank_source(visual, newest)
            # Every row reads the one stream: its keys and values are projected (or read) once.
            index = torch.zeros(B, dtype=torch.long, device=self.device)
            context = self._visual_context(source, visual.side is not None, mask=mask, index=index)
            memories = []
            for bank in state.default.banks:
                past = None
                if bank.count > 1:
                    ordered, _ = bank.ordered()
                    past = ordered[:, :-1].expand(B, -1, -1, -1)  # drop the newest step: this pass stands in for it
                memories.append(ReadOnlyMemory(past))
        else:
            frame = self._with_present(state.last_frame, state.last_frame)[0]
            context = VisualContext(states=frame, index=torch.zeros(B, dtype=torch.long, device=self.device))
            memories = None
        hidden = self.qformer(self.query_tokens.expand(B, -1, -1), ids, None, context, memories)
        return hidden[:, : self.num_queries]

    @torch.inference_mode()
    def llm_inputs(
        self, query_output: torch.Tensor, prompt: str | Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM input: projected query outputs then the prompt's token embeddings, left-padded.

        query_output: [B, Q, C_q]; prompt: one for every row, or B prompts (row b reads prompt b).
        Returns (inputs_embeds [B, L, D], attention_mask [B, L]), L = Q + the longest prompt's tokens.
        A shorter prompt's row starts with padding (mask 0): its last position is the last prompt
        token, where generation continues, and positions counted from the mask equal its own.
        """
        B = query_output.shape[0]
        prompts = [prompt] * B if isinstance(prompt, str) else list(prompt)
        if len(prompts) != B:
            raise ValueError(f"need one prompt per query output row: {B} rows, {len(prompts)} prompts")
        proj = self.language_projection(query_output.to(self.language_projection.weight.dtype))  # [B, Q, D]
        tok = self.tokenizer
        rows = [tok(p).input_ids for p in prompts]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((B, width), pad, dtype=torch.long)
        mask = torch.ones((B, proj.shape[1] + width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :] = torch.tensor(r)
            mask[b, : width - len(r)] = 0
        text = self.language_model.get_input_embeddings()(ids.to(self.device))  # [B, width, D]
        proj = proj.to(text.dtype)
        embeds = torch.stack([
            torch.cat([text[b, : width - len(r)], proj[b], text[b, width - len(r) :]]) for b, r in enumerate(rows)
        ])
        return embeds, mask.to(self.device)

    @torch.inference_mode()
    def answer(
        self,
        state: StreamState,
        question: str | None = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        adhoc: bool = False,
        length_penalty: float | None = None,
    ) -> Answer:
        """Answer a question about everything the stream has shown (greedy, or beam search if num_beams > 1).

        question: None for the default question. max_new_tokens, num_beams, length_penalty: None for
        the model's `decoding`. Returns an `Answer` with the time span covered.
        """
        self._decoding(max_new_tokens, num_beams, length_penalty)  # bad options fail before any work
        question = question if question is not None else self._default_question(state)
        output, mode = self.query_output(state, question, adhoc=adhoc)
        tokens, text = self.generate_answer(
            output, question, max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty
        )
        return Answer(
            question=question, text=text, token_ids=tokens, time_span=state.time_span(),
            frames=state.frames, mode=mode,
        )

    def generate_answer(
        self, query_output: torch.Tensor, question: str, *, max_new_tokens: int | None = None,
        num_beams: int | None = None, length_penalty: float | None = None,
    ) -> tuple[list[int], str]:
        """(token ids, text) answering `question` from query outputs [1, Q, C_q] (see `query_output`)."""
        return self.generate_answers(
            query_output, [question], max_new_tokens=max_new_tokens, num_beams=num_beams,
            length_penalty=length_penalty,
        )[0]

    def generate_answers(
        self, query_outputs: torch.Tensor | Sequence[torch.Tensor], questions: Sequence[str], *,
        max_new_tokens: int | None = None, num_beams: int | None = None, length_penalty: float | None = None,
        min_new_tokens: int | None = None,
    ) -> list[tuple[list[int], str]]:
        """(token ids, text) for each question, all generated together by one LLM `generate`.

        query_outputs: [B, Q, C_q], or B tensors [1, Q, C_q] (question b reads row b). The answers
        are those `generate_answer` gives one at a time (see `generate_tokens`).
        """
        return [c[0] for c in self.generate_candidates(
            query_outputs, questions, 1, max_new_tokens=max_new_tokens, num_beams=num_beams,
            length_penalty=length_penalty, min_new_tokens=min_new_tokens)]

    def generate_candidates(
        self, query_outputs: torch.Tensor | Sequence[torch.Tensor], questions: Sequence[str], candidates: int, *,
        max_new_tokens: int | None = None, num_beams: int | None = None, length_penalty: float | None = None,
        min_new_tokens: int | None = None,
    ) -> list[list[tuple[list[int], str]]]:
        """The `candidates` best beams of each question, best first, as (token ids, text): MA-LMM's
        ``num_captions`` (its classification scores top-5 on 5 of 5 beams). The first candidate is the
        answer `generate_answers` gives. candidates must be at most the beams searched (ValueError)."""
        if not isinstance(query_outputs, torch.Tensor):
            query_outputs = torch.cat(list(query_outputs), dim=0)
        rows = self.generate_tokens(
            query_outputs, [self.prompt(q) for q in questions], max_new_tokens=max_new_tokens,
            num_beams=num_beams, length_penalty=length_penalty, min_new_tokens=min_new_tokens,
            num_return_sequences=candidates,
        )
        texts = [(t, self.tokenizer.decode(t, skip_special_tokens=True).strip()) for t in rows]
        return [texts[b * candidates : (b + 1) * candidates] for b in range(len(questions))]

    def _decoding(
        self, max_new_tokens: int | None, num_beams: int | None, length_penalty: float | None,
        min_new_tokens: int | None = None,
    ) -> Decoding:
        """The model's `decoding` with the options given (not None) over it; bad values raise ValueError."""
        given = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "length_penalty": length_penalty,
                 "min_new_tokens": min_new_tokens}
        decoding = self.decoding
        given = {k: v for k, v in given.items() if v is not None}
        if "max_new_tokens" in given and "min_new_tokens" not in given and decoding.min_new_tokens > given["max_new_tokens"]:
            given["min_new_tokens"] = given["max_new_tokens"]  # a shorter bound asked for wins
        return replace(decoding, **given)

    @torch.inference_mode()
    def generate_tokens(
        self, query_output: torch.Tensor, prompt: str | Sequence[str], *, max_new_tokens: int | None = None,
        num_beams: int | None = None, length_penalty: float | None = None, min_new_tokens: int | None = None,
        num_return_sequences: int = 1,
    ) -> list[int] | list[list[int]]:
        """Generated token ids (new tokens only) for query outputs [B, Q, C_q] and a prompt.

        Decoding: the model's `decoding`, with max_new_tokens, num_beams, length_penalty and
        min_new_tokens given (not None) over it. num_return_sequences > 1 (at most the beams): that many
        sequences per row, best first, row after row (B * n lists; one prompt: n lists).

        One prompt (str): B must be 1 and one list of ids comes back. B prompts: the rows are
        left-padded to one batch (`llm_inputs`) and one list per row comes back, each cut after its
        first end-of-sequence token (a row that ends early is padded while the others go on). Greedy
        search gives each row the tokens it gets alone; beam search ranks each row's beams apart from
        the other rows, by scores that padding can change only by rounding.
        """
        single = isinstance(prompt, str)
        if single and query_output.shape[0] != 1:
            raise ValueError(f"one prompt answers one query output row, got {query_output.shape[0]} rows")
        decoding = self._decoding(max_new_tokens, num_beams, length_penalty, min_new_tokens)
        if not 1 <= num_return_sequences <= decoding.num_beams:
            raise ValueError(f"num_return_sequences must be in 1..num_beams ({decoding.num_beams}), "
                             f"got {num_return_sequences}")
        embeds, mask = self.llm_inputs(query_output, prompt)
        tok = self.tokenizer
        out = self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=decoding.max_new_tokens,
            min_new_tokens=decoding.min_new_tokens,
            num_beams=decoding.num_beams,
            do_sample=False,
            repetition_penalty=decoding.repetition_penalty,
            length_penalty=decoding.length_penalty,
            num_return_sequences=num_return_sequences,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        rows = []
        for tokens in out.tolist():
            if self.is_encoder_decoder and tokens and tokens[0] == self.language_model.config.decoder_start_token_id:
                tokens = tokens[1:]  # the decoder's start token is not part of the answer
            if tok.eos_token_id in tokens:  # what follows is padding
                tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
            rows.append(tokens)
        return rows[0] if single and num_return_sequences == 1 else rows

    # ------------------------------------------------------------ snapshots

    @torch.inference_mode()
    def restore(self, snapshot: StateSnapshot) -> StreamState:
        """A fresh state equal to the snapshotted one (continues the stream identically)."""
        meta, tensors = snapshot.meta, snapshot.tensors
        if meta.get("version") != 1:
            raise ValueError(f"unsupported stream snapshot version {meta.get('version')!r}")
        if meta["memory_bank_length"] != self.config.memory_bank_length:
            raise ValueError(
                f"snapshot has memory_bank_length={meta['memory_bank_length']}, this model "
                f"{self.config.memory_bank_length}"
            )
        questions = meta["questions"]
        if not questions or questions[0]["standing"]:
            raise ValueError("snapshot lacks its default question")
        state = self.create_state(meta["stream_id"])
        for i, info in enumerate(questions):
            ids = tensors[f"q{i}.input_ids"].to(self.device)
            output = tensors.get(f"q{i}.output")
            q = QuestionState(
                text=info["text"],
                input_ids=ids,
                banks=self._query_banks(ids.shape[1]) if self.config.memory_bank_length > 0 else [],
                output=None if output is None else output.to(self.device, self.qformer_dtype),
                steps=int(info["steps"]),
            )
            for layer, bank in enumerate(q.banks):
                bank.load_state_dict(_bank_state(meta, tensors, f"q{i}.layer{layer}"))
            if i == 0:
                state.default = q
            else:
                state.standing[self._question_of(info["text"])] = q
        if state.visual_bank is not None:
            visual = state.visual_bank
            bank_state = _bank_state(meta, tensors, "visual")
            data = bank_state.get("data")
            if visual.side is not None and data is not None:
                # Snapshots hold the raw entries only: keys/values are projected again, with this
                # model's weights (merged entries project to their merged keys/values up to rounding).
                if tuple(data.shape) != tuple(visual.data.shape):
                    raise ValueError(
                        f"snapshot's visual bank entries have shape {tuple(data.shape)}, this model's "
                        f"{tuple(visual.data.shape)}"
                    )
                bank_state["side"] = self.qformer.project_visual(data.to(self.device, self.dtype))
            visual.load_state_dict(bank_state)
        if "last_frame" in tensors:
            state.last_frame = tensors["last_frame"].to(self.device, self.dtype)
        state.frames = int(meta["frames"])
        state.first_time, state.last_time = meta["first_time"], meta["last_time"]
        return state

    def _question_of(self, prompt: str) -> str:
        head, _, tail = self.config.prompt_template.partition("{}")
        if not (prompt.startswith(head) and prompt.endswith(tail)):
            raise ValueError(f"snapshot prompt {prompt!r} does not follow the template {self.config.prompt_template!r}")
        return prompt[len(head) : len(prompt) - len(tail)]

    # ------------------------------------------------------------ offline clip pass (evaluation, training)

    def clip_query_output(
        self,
        pixels: torch.Tensor,
        questions: Sequence[str],
        *,
        adhoc: bool = False,
        memory_gradients: bool | Literal["visual"] = False,
        clips: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """MA-LMM over whole clips: every frame in order, one question per row, memory as in MA-LMM.

        pixels: [V, T, 3, H, W]; questions: B strings (formatted with the prompt template); clips: the
        clip each question is about (B indices into V; default: question b about clip b, V = B) —
        several questions about one clip share its vision encoder pass and its visual bank.
        Returns the last step's query outputs [B, Q, C_q]; with memory_bank_length 0 and
        `config.memoryless_clip == "every_frame"`, every frame's, in order: [B, T*Q, C_q] (MA-LMM
        without banks). Gradients flow into the Q-Former, query tokens, frame position table and
        post_layernorm (ln_vision); the vision encoder runs without gradients when frozen.

        adhoc: the streaming ad-hoc path instead of the standing one: the banks are built with the
        default question, and the last frame's Q-Former pass reads them with the question (as
        `answer(..., adhoc=True)` after stepping the same frames). memory_gradients: keep stored bank
        entries in the autograd graph — True: every bank, "visual": the visual bank only (MA-LMM
        detaches them; a vision encoder and frame position table trained from scratch learn from past
        frames only this way). Values are the same either way.
        """
        if memory_gradients not in (False, True, "visual"):
            raise ValueError(f"memory_gradients must be False, True or 'visual', got {memory_gradients!r}")
        if pixels.dim() != 5 or pixels.shape[2] != 3:
            raise ValueError(f"clips must be [V, T, 3, H, W], got shape {tuple(pixels.shape)}")
        V, T = pixels.shape[:2]
        B = len(questions)
        if clips is None:
            if B != V:
                raise ValueError(f"need one question per clip: {V} clips, {B} questions")
            rows = None
        else:
            if len(clips) != B or any(not 0 <= int(c) < V for c in clips):
                raise ValueError(f"clips must give each of the {B} questions a clip index in 0..{V - 1}, got {list(clips)}")
            rows = torch.as_tensor([int(c) for c in clips], dtype=torch.long, device=self.device)
        ids, text_mask = self._qformer_batch([self.prompt(q) for q in questions])
        if adhoc:
            default_ids, default_mask = self._qformer_batch([self.prompt(self.config.default_question)] * B)
        M = self.config.memory_bank_length
        query_grads = bool(memory_gradients) and memory_gradients != "visual"
        visual_memory = ConcatMemory(M, detach=not memory_gradients) if M > 0 else None
        memories = [ConcatMemory(M, detach=not query_grads) for _ in range(self.qformer.num_layers)] if M > 0 else None
        queries = self.query_tokens.expand(B, -1, -1)
        every_frame = M == 0 and self.config.memoryless_clip == "every_frame"
        hidden, per_frame = None, []
        for t in range(T):
            feats = self._vision_features(pixels[:, t], encoder_grad=not self.config.freeze_vision)  # [V, N, C_vis]
            if not every_frame:  # MA-LMM adds frame positions only with its banks
                feats = feats + self.frame_position.weight[self.frame_index(t)].to(feats.dtype)
            # The visual bank depends on the clip only: it is kept once per clip ([V, ...]) and each
            # question's row picks its clip's keys and values after they are projected once.
            if visual_memory is not None:
                source, _ = visual_memory.exchange(feats, None)  # [V, (<=M+1)*N, C_vis]
            else:
                source = feats
            context = VisualContext(states=self._with_present(source, feats)[0], index=rows)
            if every_frame:  # no banks: every frame reads the question, ad hoc or not
                per_frame.append(self.qformer(queries, ids, text_mask, context, None)[:, : self.num_queries])
            elif adhoc and t == T - 1:  # the question reads the default banks, which it does not write
                past = None if memories is None else [ReadOnlyMemory(m.entries) for m in memories]
                hidden = self.qformer(queries, ids, text_mask, context, past)
            elif adhoc:
                hidden = self.qformer(queries, default_ids, default_mask, context, memories)
            else:
                hidden = self.qformer(queries, ids, text_mask, context, memories)
        if every_frame:
            return torch.cat(per_frame, dim=1)  # [B, T*Q, C_q]
        return hidden[:, : self.num_queries]

    def _qformer_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former tokens of several prompts, right-padded: (input_ids [B, L], attention_mask [B, L])."""
        text = self.qformer_tokenizer(
            prompts, padding="longest", truncation=True,
            max_length=self.config.max_instruction_tokens, return_tensors="pt",
        )
        return text.input_ids.to(self.device), text.attention_mask.to(self.device)

    def clip_loss(
        self,
        pixels: torch.Tensor,
        questions: Sequence[str],
        answers: Sequence[str],
        *,
        adhoc: bool = False,
        memory_gradients: bool | Literal["visual"] = False,
        clips: Sequence[int] | None = None,
        normaliser: float | None = None,
    ) -> torch.Tensor:
        """MA-LMM's training loss: LLM cross-entropy of each answer given the clip and its question.

        pixels: [V, T, 3, H, W]; questions, answers: B strings. Returns a scalar (mean over answer tokens).
        adhoc, memory_gradients, clips: as in `clip_query_output`. normaliser: return the sum of the
        answer tokens' cross-entropies divided by this instead (e.g. the answer tokens of a whole batch
        split over processes, `answer_tokens`: their parts add up to the batch's mean).
        """
        if len(answers) != len(questions):
            raise ValueError(f"need one answer per question: {len(questions)} questions, {len(answers)} answers")
        output = self.clip_query_output(
            pixels, questions, adhoc=adhoc, memory_gradients=memory_gradients, clips=clips
        )
        proj = self.language_projection(output)  # [B, Q, D]
        tok = self.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        embed = self.language_model.get_input_embeddings()
        if self.is_encoder_decoder:
            enc = tok([self.prompt(q) for q in questions], padding="longest", return_tensors="pt").to(self.device)
            lab = tok(list(answers), padding="longest", return_tensors="pt").to(self.device)
            labels = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
            embeds = torch.cat([proj.to(embed.weight.dtype), embed(enc.input_ids)], dim=1)
            mask = torch.cat([torch.ones(proj.shape[:2], dtype=torch.long, device=self.device), enc.attention_mask], 1)
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
            return out.loss if normaliser is None else _summed_loss(out.logits, labels, normaliser)
        rows, targets = [], []
        for q, a in zip(questions, answers, strict=True):
            p_ids = tok(self.prompt(q)).input_ids
            a_ids = tok(a, add_special_tokens=False).input_ids + [eos]
            rows.append(p_ids + a_ids)
            targets.append([-100] * len(p_ids) + a_ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, targets, strict=True)):  # right padding, as MA-LMM
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(t)] = torch.tensor(t)
            att[i, : len(r)] = 1
        ids, labels, att = ids.to(self.device), labels.to(self.device), att.to(self.device)
        Q = proj.shape[1]
        embeds = torch.cat([proj.to(embed.weight.dtype), embed(ids)], dim=1)
        mask = torch.cat([torch.ones(len(rows), Q, dtype=torch.long, device=self.device), att], dim=1)
        labels = torch.cat([torch.full((len(rows), Q), -100, dtype=torch.long, device=self.device), labels], dim=1)
        if normaliser is None:
            return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        return _summed_loss(logits[:, :-1], labels[:, 1:], normaliser)  # token t predicts token t + 1

    def answer_tokens(self, answers: Sequence[str]) -> int:
        """How many target tokens `clip_loss` scores for these answers (each answer's tokens and its end)."""
        if self.is_encoder_decoder:
            return sum(len(ids) for ids in self.tokenizer(list(answers)).input_ids)
        return sum(len(ids) + 1 for ids in self.tokenizer(list(answers), add_special_tokens=False).input_ids)


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor, normaliser: float) -> torch.Tensor:
    """Cross-entropy summed over the labelled positions (labels -100 are not), in float32, / normaliser."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss / normaliser


def folder_decoding(folder: str | Path) -> Decoding:
    """MA-LMM's decoding (`MALMM_DECODING`) with the `Decoding` fields that a folder's
    generation_config.json sets (same names) over it."""
    path = Path(folder) / "generation_config.json"
    given = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"'{path}' is not valid JSON: {err}") from err
        given = {f.name: saved[f.name] for f in fields(Decoding) if saved.get(f.name) is not None}
    try:
        return replace(MALMM_DECODING, **given)
    except (TypeError, ValueError) as err:
        raise ValueError(f"'{path}': its decoding settings {given} are not usable: {err}") from err


def _bank_state(meta: dict, tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    if prefix not in meta["banks"]:
        raise ValueError(f"snapshot lacks bank {prefix!r}")
    state = dict(meta["banks"][prefix])
    for k, v in tensors.items():
        if k.startswith(prefix + "."):
            state[k[len(prefix) + 1 :]] = v
    return state


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere (MPS included: its float16 generate is not reliable)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
