"""The streaming memory bank: MA-LMM's bounded bank, updated in O(N·C) per frame.

MA-LMM recomputes every adjacent similarity and copies the whole bank at each frame (O(M·N·C)). Here
the bank lives in S = capacity + 1 slots per token column (shared/DESIGN.md §4):

- temporal order is kept as per-column doubly linked lists (`prev`, `next` slot indices, -1 = none);
- each entry caches its cosine similarity to its temporal successor (`sim`, -inf for the newest entry
  and for free slots);
- each entry may carry side channels (`side`, D per token, e.g. attention keys and values projected
  from it): merged with the same count weights as the entry, never compared. An affine function of
  the entries (a Linear layer) commutes with the merge, which is a convex combination, so side
  channels computed once per frame equal that function of the merged entries up to rounding;
- each entry carries its merge count (`sizes`, 0 = free slot), the sequence number of the first frame
  it averages (`seq`, which orders entries in time and breaks similarity ties towards the earlier one,
  as MA-LMM's argmax does), and the first/last frame time it covers (`t_first`, `t_last`, seconds).

One merge touches four entries per column (the pair, its predecessor and its successor), so a frame
costs O(N·C) plus an O(S·N) argmax over the cached similarities, whatever the stream's length.

Order of operations. MA-LMM, at frame t: the Q-Former attends to [bank (<= M entries), frame t], then
frame t is stored and the bank is compressed back to M. Here `append` stores frame t first, the
caller attends over `view()` (the same M+1 entries, in slot order: attention does not care about
order), and the merge that brings the bank back to M happens either in `compress()` or at the start of
the next `append` (the Triton path fuses it with the store). Both give MA-LMM's banks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import use_triton
from .reference import cosine, merge_pair

# Sequence number of a free slot: sorts after every real entry.
FREE_SEQ = torch.iinfo(torch.int64).max

_STATE_KEYS = ("data", "sizes", "seq", "t_first", "t_last", "sim", "prev", "next", "tail", "free")
SIDE_KEY = "side"


@dataclass(frozen=True)
class BankShape:
    batch: int
    capacity: int
    tokens: int
    channels: int

    @property
    def slots(self) -> int:
        return self.capacity + 1


def _const(like: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(like.shape, value, dtype=dtype, device=like.device)


class _Columns:
    """Per-column slot addressing for [B, S, N, ...] tensors viewed as rows [B·S·N, ...].

    Gathering and scattering whole rows with index_select / index_copy_ costs O(B·N) indices, where
    an expanded gather index would cost O(B·N·C).
    """

    def __init__(self, B: int, S: int, N: int, device: torch.device):
        self.N = N
        b = torch.arange(B, device=device).view(B, 1)
        n = torch.arange(N, device=device).view(1, N)
        self.base = (b * S * N + n).view(-1)  # slot 0 of every column, [B·N]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base + idx.reshape(-1) * self.N

    def take(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """t [B, S, N, ...] at per-column slots idx [B, N] -> [B, N, ...]."""
        flat = t.view(-1, *t.shape[3:])
        return flat.index_select(0, self.rows(idx)).view(*idx.shape, *t.shape[3:])

    def put(self, t: torch.Tensor, idx: torch.Tensor, value: torch.Tensor, where: torch.Tensor | None = None):
        """t[b, idx[b, n], n] = value[b, n] in place, only where `where` [B, N] holds (when given)."""
        if where is not None:
            # Columns that must not change write back what their slot 0 holds right now.
            idx = torch.where(where, idx, torch.zeros_like(idx))
            value = torch.where(where.view(*where.shape, *(1,) * (value.dim() - 2)), value, self.take(t, idx))
        flat = t.view(-1, *t.shape[3:])
        flat.index_copy_(0, self.rows(idx), value.reshape(-1, *t.shape[3:]).to(t.dtype))


class StreamingMemoryBank:
    """A bounded MA-LMM memory bank of `capacity` (M) entries per token column, for one stream.

    batch B, tokens N, channels C: entries are [B, N, C] (one frame's tokens, or one step's Q-Former
    hidden states). After `append` the bank holds at most M+1 entries; `compress` brings it to M.

    side_channels: D > 0 gives every entry side channels [B, N, D] (`append(x, side=...)`, `side_view`),
    stored in the bank's dtype and merged with the entries' weights; 0: none.
    backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton" (see kernels.dispatch).
    """

    def __init__(
        self,
        capacity: int,
        batch: int,
        tokens: int,
        channels: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        side_channels: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (a bank of 0 entries is no memory), got {capacity}")
        if min(batch, tokens, channels) < 1:
            raise ValueError(f"batch, tokens and channels must be >= 1, got {batch}, {tokens}, {channels}")
        if side_channels < 0:
            raise ValueError(f"side_channels must be >= 0 (0: none), got {side_channels}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.shape = BankShape(batch, capacity, tokens, channels)
        self.dtype = dtype
        self.device = torch.device(device)
        self.backend = backend
        self._triton = use_triton(self.device, backend)
        B, S, N, C = batch, capacity + 1, tokens, channels
        kw = {"device": self.device}
        self.data = torch.empty(B, S, N, C, dtype=dtype, **kw)
        self.sizes = torch.empty(B, S, N, dtype=torch.int32, **kw)  # 0: a free slot
        self.seq = torch.empty(B, S, N, dtype=torch.int64, **kw)
        self.t_first = torch.empty(B, S, N, dtype=torch.float64, **kw)
        self.t_last = torch.empty(B, S, N, dtype=torch.float64, **kw)
        self.sim = torch.empty(B, S, N, dtype=torch.float32, **kw)
        self.prev = torch.empty(B, S, N, dtype=torch.int64, **kw)
        self.next = torch.empty(B, S, N, dtype=torch.int64, **kw)
        self.tail = torch.empty(B, N, dtype=torch.int64, **kw)
        self.free = torch.empty(B, N, dtype=torch.int64, **kw)
        self.side = torch.empty(B, S, N, side_channels, dtype=dtype, **kw) if side_channels else None
        self._keys = (*_STATE_KEYS, SIDE_KEY) if side_channels else _STATE_KEYS
        self._cols = _Columns(B, S, N, self.device)
        self.reset()  # the empty bank's values, in one place

    # ---------------------------------------------------------------- properties

    @property
    def capacity(self) -> int:
        return self.shape.capacity

    @property
    def slots(self) -> int:
        return self.shape.slots

    @property
    def side_channels(self) -> int:
        return 0 if self.side is None else self.side.shape[-1]

    def __len__(self) -> int:
        return self.count

    def nbytes(self) -> int:
        """Bytes held by the bank's tensors, side channels included (fixed at construction)."""
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self._keys)

    # ---------------------------------------------------------------- updates

    def append(self, x: torch.Tensor, time: float | None = None, side: torch.Tensor | None = None) -> None:
        """Store one entry x [B, N, C] covering the frame at `time` (seconds; default: its sequence number).

        side: the entry's side channels [B, N, D], required when the bank has them (D > 0).
        When the bank already holds M+1 entries it first merges once (as `compress`), so a caller that
        attends between `append` and the next `append` sees exactly MA-LMM's bank plus the new entry.
        """
        expected = (self.shape.batch, self.shape.tokens, self.shape.channels)
        if tuple(x.shape) != expected:
            raise ValueError(f"entry must be [B, N, C] = {expected}, got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"entry is on {x.device}, the bank on {self.device}")
        if (side is None) != (self.side is None):
            raise ValueError(
                f"this bank has {self.side_channels} side channels per token: "
                + ("pass side=[B, N, D]" if side is None else "pass no side")
            )
        if side is not None:
            expected = (*expected[:2], self.side_channels)
            if tuple(side.shape) != expected:
                raise ValueError(f"side must be [B, N, D] = {expected}, got {tuple(side.shape)}")
            if side.device != self.device:
                raise ValueError(f"side is on {side.device}, the bank on {self.device}")
            side = side.to(self.dtype)
        x = x.to(self.dtype)
        t = float(self.frames if time is None else time)
        merge = self.count == self.slots
        if self._triton:
            from .triton_bank import bank_update

            bank_update(self, x, t, merge=merge, side=side)
        else:
            if merge:
                self._merge_torch()
            self._append_torch(x, t, side)
        if merge:
            self.count -= 1
            self.merged = True
        self.count += 1
        self.frames += 1

    def compress(self) -> bool:
        """Merge the most similar adjacent pair once per token column if more than M entries are held.

        Returns whether a merge happened.
        """
        if self.count <= self.capacity:
            return False
        if self._triton:
            from .triton_bank import bank_update

            bank_update(self, None, 0.0, merge=True)
        else:
            self._merge_torch()
        self.count -= 1
        self.merged = True
        return True

    def _append_torch(self, x: torch.Tensor, t: float, side: torch.Tensor | None) -> None:
        cols = self._cols
        slot = self.free.clone()
        tail = self.tail
        has_prev = self.count > 0  # (a merge just before leaves M >= 1 entries)
        cols.put(self.data, slot, x)
        if side is not None:
            cols.put(self.side, slot, side)
        ones = torch.ones_like(slot)
        cols.put(self.sizes, slot, ones)
        cols.put(self.seq, slot, ones * self.frames)
        cols.put(self.t_first, slot, _const(slot, t, torch.float64))
        cols.put(self.t_last, slot, _const(slot, t, torch.float64))
        cols.put(self.sim, slot, _const(slot, float("-inf"), torch.float32))
        cols.put(self.next, slot, -ones)
        if has_prev:
            cols.put(self.prev, slot, tail)
            cols.put(self.next, tail, slot)
            cols.put(self.sim, tail, cosine(cols.take(self.data, tail), x))
        else:
            cols.put(self.prev, slot, -ones)
        self.tail = slot
        # Without merges the entries fill the slots in order; once all are full no slot is free
        # until the next merge frees one.
        self.free = slot + 1 if self.count + 1 < self.slots else torch.full_like(slot, -1)

    def _merge_torch(self) -> None:
        cols = self._cols
        sim = self.sim
        best = sim.amax(dim=1, keepdim=True)  # [B, 1, N]
        # Among equally similar pairs, the earliest in time (smallest sequence number), as argmax does.
        key = torch.where(sim == best, self.seq, torch.full_like(self.seq, FREE_SEQ))
        k = key.argmin(dim=1)  # [B, N]
        j = cols.take(self.next, k)
        n2 = cols.take(self.next, j)
        p = cols.take(self.prev, k)
        s_k, s_j = cols.take(self.sizes, k), cols.take(self.sizes, j)
        merged = merge_pair(cols.take(self.data, k), s_k, cols.take(self.data, j), s_j, self.dtype)
        cols.put(self.data, k, merged)
        if self.side is not None:
            cols.put(self.side, k, merge_pair(cols.take(self.side, k), s_k, cols.take(self.side, j), s_j, self.dtype))
        cols.put(self.sizes, k, s_k + s_j)
        cols.put(self.t_last, k, cols.take(self.t_last, j))
        # Unlink j: k's successor becomes j's successor.
        has_n2 = n2 >= 0
        cols.put(self.next, k, n2)
        cols.put(self.prev, n2, k, where=has_n2)
        self.tail = torch.where(has_n2, self.tail, k)
        n2_data = cols.take(self.data, n2.clamp_min(0))
        inf = _const(k, float("-inf"), torch.float32)
        cols.put(self.sim, k, torch.where(has_n2, cosine(merged, n2_data), inf))
        has_p = p >= 0
        cols.put(self.sim, p, cosine(cols.take(self.data, p.clamp_min(0)), merged), where=has_p)
        # Free j.
        cols.put(self.sizes, j, torch.zeros_like(s_j))
        cols.put(self.seq, j, torch.full_like(j, FREE_SEQ))
        cols.put(self.sim, j, inf)
        cols.put(self.prev, j, -torch.ones_like(j))
        cols.put(self.next, j, -torch.ones_like(j))
        self.free = j

    # ---------------------------------------------------------------- reading

    def view(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored entries in slot order (not temporal), for attention.

        Returns (entries [B, S', N, C], valid [B, S', N] bool or None). The mask is None when all S'
        slots hold entries, which is always the case right after `append`.
        """
        if not self.merged:
            return self.data[:, : self.count], None
        if self.count == self.slots:
            return self.data, None
        return self.data, self.sizes > 0

    def side_view(self) -> torch.Tensor:
        """The side channels [B, S', N, D] of the slots `view()` returns, in the same order (no copy)."""
        if self.side is None:
            raise ValueError("this bank has no side channels")
        return self.side[:, : self.count] if not self.merged else self.side

    def _order(self) -> torch.Tensor:
        """Slot indices of the held entries in temporal order, [B, T, N]."""
        return self.seq.argsort(dim=1)[:, : self.count]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bank [B, T, N, C], sizes [B, T, N] int32) in temporal order, T = count."""
        order = self._order()
        index = order.unsqueeze(-1).expand(-1, -1, -1, self.shape.channels)
        return self.data.gather(1, index), self.sizes.gather(1, order)

    def ordered_side(self) -> torch.Tensor:
        """The side channels [B, T, N, D] in temporal order, T = count."""
        if self.side is None:
            raise ValueError("this bank has no side channels")
        order = self._order()
        return self.side.gather(1, order.unsqueeze(-1).expand(-1, -1, -1, self.side_channels))

    def spans(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_first, t_last) [B, T, N] float64 seconds: the frames each entry averages, temporal order."""
        order = self._order()
        return self.t_first.gather(1, order), self.t_last.gather(1, order)

    def time_span(self) -> tuple[float, float] | None:
        """(first, last) frame time in seconds of everything the bank holds, or None when empty."""
        if self.count == 0:
            return None
        valid = self.sizes > 0
        first = torch.where(valid, self.t_first, torch.full_like(self.t_first, float("inf"))).min()
        last = torch.where(valid, self.t_last, torch.full_like(self.t_last, float("-inf"))).max()
        return float(first), float(last)

    # ---------------------------------------------------------------- snapshots

    def reset(self) -> None:
        """Forget everything (the tensors keep their storage).

        count: entries held, the same in every column; frames: entries ever appended (the next
        entry's sequence number); merged: False while entries fill slots 0..count-1 in order.
        """
        self.data.zero_()
        self.sizes.zero_()
        self.seq.fill_(FREE_SEQ)
        self.t_first.zero_()
        self.t_last.zero_()
        self.sim.fill_(float("-inf"))
        self.prev.fill_(-1)
        self.next.fill_(-1)
        self.tail.fill_(-1)
        self.free.zero_()
        if self.side is not None:
            self.side.zero_()
        self.count = 0
        self.frames = 0
        self.merged = False

    def state_dict(self, side: bool = True) -> dict:
        """Everything needed to continue the stream: tensors (copies) and counters.

        The side channels are under "side" when the bank has them and `side` (False: not copied, for a
        caller that computes them again from the entries).
        """
        keys = self._keys if side else tuple(k for k in self._keys if k != SIDE_KEY)
        state = {k: getattr(self, k).clone() for k in keys}
        state.update(
            capacity=self.capacity,
            batch=self.shape.batch,
            tokens=self.shape.tokens,
            channels=self.shape.channels,
            dtype=str(self.dtype).removeprefix("torch."),
            count=self.count,
            frames=self.frames,
            merged=self.merged,
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the shapes must match this bank's (dtype and device may differ).

        A bank with side channels needs "side" [B, S, N, D] (a caller may compute it from "data"); one
        without ignores it.
        """
        ours = (self.capacity, self.shape.batch, self.shape.tokens, self.shape.channels)
        theirs = tuple(state.get(k) for k in ("capacity", "batch", "tokens", "channels"))
        if ours != theirs:
            raise ValueError(
                f"bank snapshot has (capacity, batch, tokens, channels) = {theirs}, this bank {ours}"
            )
        missing = [k for k in (*self._keys, "count", "frames", "merged") if k not in state]
        if missing:
            raise ValueError(f"bank snapshot lacks {missing}")
        for k in self._keys:  # every check before the first copy: a bad snapshot leaves the bank as it was
            src, dst = state[k], getattr(self, k)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"bank snapshot's {k!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        count = int(state["count"])
        if not 0 <= count <= self.slots:
            raise ValueError(f"bank snapshot holds {count} entries, more than {self.slots} slots")
        for k in self._keys:
            getattr(self, k).copy_(state[k].to(device=self.device, dtype=getattr(self, k).dtype))
        self.count = count
        self.frames = int(state["frames"])
        self.merged = bool(state["merged"])
