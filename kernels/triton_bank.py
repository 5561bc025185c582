"""Triton kernels for the memory bank: the fused per-frame update and the adjacent-similarity pass.

Every value is converted to float32 right after `tl.load` (Triton's CPU interpreter computes bf16
arithmetic wrongly otherwise) and merged entries are rounded once to the bank's dtype before their
similarities are taken, so the results match the torch path in kernels/bank.py. Side channels are
merged with the same weights and rounding, and written on append, in the same program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import COSINE_EPS

# A free slot's sequence number (sorts after every real entry); a constexpr so kernels may read it.
_FREE_SEQ = tl.constexpr(torch.iinfo(torch.int64).max)


@triton.jit
def _cosine_parts(a, b):
    """Partial sums over one chunk of channels: (a·b, |a|², |b|²), each [BLOCK_N]."""
    return tl.sum(a * b, axis=1), tl.sum(a * a, axis=1), tl.sum(b * b, axis=1)


@triton.jit
def _cosine_finish(dot, na, nb, eps):
    return dot / tl.sqrt(tl.maximum(na * nb, eps * eps))


@triton.jit
def _round_bf16(v):
    """Round float32 to the nearest bfloat16 (ties to even), still as float32.

    The cast to bf16 that follows is then exact on every backend; Triton's CPU interpreter truncates
    float32 -> bf16 instead of rounding, which would disagree with torch by one ulp.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _merge_rows(ptr, base, row_stride, k, j, w_k, w_j, mask_n, width, BLOCK: tl.constexpr):
    """ptr's rows at slots k = (w_k·k + w_j·j) / (w_k + w_j), over `width` channels, rounded once."""
    offs = tl.arange(0, BLOCK)
    for c0 in range(0, width, BLOCK):
        cc = c0 + offs
        mc = mask_n[:, None] & (cc[None, :] < width)
        at_k = ptr + base[:, None] + k[:, None] * row_stride + cc[None, :]
        a = tl.load(at_k, mask=mc, other=0.0).to(tl.float32)
        b = tl.load(ptr + base[:, None] + j[:, None] * row_stride + cc[None, :], mask=mc, other=0.0).to(tl.float32)
        merged = (a * w_k[:, None] + b * w_j[:, None]) / (w_k + w_j)[:, None]
        if ptr.dtype.element_ty == tl.bfloat16:
            merged = _round_bf16(merged)
        tl.store(at_k, merged.to(ptr.dtype.element_ty), mask=mc)


@triton.jit
def _bank_update_kernel(
    data_ptr, sizes_ptr, seq_ptr, tfirst_ptr, tlast_ptr, sim_ptr, prev_ptr, next_ptr,
    tail_ptr, free_ptr, x_ptr, side_ptr, xs_ptr,
    time_ptr, S, N, C, D, count, new_seq, eps,
    DO_MERGE: tl.constexpr, DO_APPEND: tl.constexpr, HAS_SIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (batch row, block of BLOCK_N token columns).

    DO_MERGE: merge the most similar adjacent pair of every column (argmax over the cached successor
    similarities, earliest entry on ties), free the later slot, relink, refresh the two similarities
    that changed. DO_APPEND: write x [B, N, C] into each column's free slot (the one just freed when
    merging), link it after the column's newest entry and cache that entry's similarity to it.
    HAS_SIDE: side channels side [B, S, N, D] are merged with the same weights and xs [B, N, D] is
    written beside x. `count` is the number of entries held before this update.
    """
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_c = tl.arange(0, BLOCK_C)
    col = b.to(tl.int64) * N + offs_n  # index into [B, N]
    row_stride = N.to(tl.int64) * C  # elements between slots of one column
    bank_base = b.to(tl.int64) * S * row_stride + offs_n.to(tl.int64) * C  # slot 0 of each column
    if HAS_SIDE:
        side_stride = N.to(tl.int64) * D
        side_base = b.to(tl.int64) * S * side_stride + offs_n.to(tl.int64) * D

    tail = tl.load(tail_ptr + col, mask=mask_n, other=0)
    if DO_MERGE:
        offs_s = tl.arange(0, BLOCK_S)
        meta = (b.to(tl.int64) * S + offs_s[None, :]) * N + offs_n[:, None]  # [BLOCK_N, BLOCK_S]
        mask_ns = mask_n[:, None] & (offs_s[None, :] < S)
        sim = tl.load(sim_ptr + meta, mask=mask_ns, other=float("-inf"))
        seq = tl.load(seq_ptr + meta, mask=mask_ns, other=_FREE_SEQ)
        best = tl.max(sim, axis=1)
        key = tl.where(sim == best[:, None], seq, _FREE_SEQ)
        first = tl.min(key, axis=1)
        k = tl.sum(tl.where(key == first[:, None], offs_s[None, :], 0), axis=1).to(tl.int64)

        meta_col = b.to(tl.int64) * S * N + offs_n  # slot 0 of each column in [B, S, N]
        j = tl.load(next_ptr + meta_col + k * N, mask=mask_n, other=0)
        n2 = tl.load(next_ptr + meta_col + j * N, mask=mask_n, other=-1)
        p = tl.load(prev_ptr + meta_col + k * N, mask=mask_n, other=-1)
        s_k = tl.load(sizes_ptr + meta_col + k * N, mask=mask_n, other=1)
        s_j = tl.load(sizes_ptr + meta_col + j * N, mask=mask_n, other=1)
        has_n2 = (n2 >= 0) & mask_n
        has_p = (p >= 0) & mask_n

        dot_pk = tl.zeros([BLOCK_N], dtype=tl.float32)
        nn_p = tl.zeros([BLOCK_N], dtype=tl.float32)
        nn_k = tl.zeros([BLOCK_N], dtype=tl.float32)
        dot_kn = tl.zeros([BLOCK_N], dtype=tl.float32)
        nn_n = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            mc = mask_n[:, None] & (cc[None, :] < C)
            at_k = data_ptr + bank_base[:, None] + k[:, None] * row_stride + cc[None, :]
            x_k = tl.load(at_k, mask=mc, other=0.0).to(tl.float32)
            x_j = tl.load(data_ptr + bank_base[:, None] + j[:, None] * row_stride + cc[None, :],
                          mask=mc, other=0.0).to(tl.float32)
            merged = (x_k * (s_k.to(tl.float32)[:, None]) + x_j * (s_j.to(tl.float32)[:, None]))
            merged = merged / (s_k + s_j).to(tl.float32)[:, None]
            if data_ptr.dtype.element_ty == tl.bfloat16:
                merged = _round_bf16(merged)
            stored = merged.to(data_ptr.dtype.element_ty)
            tl.store(at_k, stored, mask=mc)
            m = stored.to(tl.float32)
            x_p = tl.load(data_ptr + bank_base[:, None] + tl.maximum(p, 0)[:, None] * row_stride + cc[None, :],
                          mask=mc & has_p[:, None], other=0.0).to(tl.float32)
            x_n = tl.load(data_ptr + bank_base[:, None] + tl.maximum(n2, 0)[:, None] * row_stride + cc[None, :],
                          mask=mc & has_n2[:, None], other=0.0).to(tl.float32)
            d, a, bb = _cosine_parts(x_p, m)
            dot_pk += d
            nn_p += a
            nn_k += bb
            d, a, bb = _cosine_parts(m, x_n)
            dot_kn += d
            nn_n += bb

        if HAS_SIDE:
            _merge_rows(side_ptr, side_base, side_stride, k, j, s_k.to(tl.float32), s_j.to(tl.float32),
                        mask_n, D, BLOCK_D)
        tl.store(sizes_ptr + meta_col + k * N, s_k + s_j, mask=mask_n)
        t_last_j = tl.load(tlast_ptr + meta_col + j * N, mask=mask_n, other=0.0)
        tl.store(tlast_ptr + meta_col + k * N, t_last_j, mask=mask_n)
        tl.store(next_ptr + meta_col + k * N, n2, mask=mask_n)
        tl.store(prev_ptr + meta_col + tl.maximum(n2, 0) * N, k, mask=has_n2)
        tail = tl.where(n2 >= 0, tail, k)
        sim_k = tl.where(n2 >= 0, _cosine_finish(dot_kn, nn_k, nn_n, eps), float("-inf"))
        tl.store(sim_ptr + meta_col + k * N, sim_k, mask=mask_n)
        tl.store(sim_ptr + meta_col + tl.maximum(p, 0) * N, _cosine_finish(dot_pk, nn_p, nn_k, eps),
                 mask=has_p)
        # Free j (the append below, when fused, overwrites all of it again).
        tl.store(sizes_ptr + meta_col + j * N, tl.zeros_like(s_j), mask=mask_n)
        tl.store(seq_ptr + meta_col + j * N, tl.full([BLOCK_N], _FREE_SEQ, tl.int64), mask=mask_n)
        tl.store(sim_ptr + meta_col + j * N, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=mask_n)
        tl.store(prev_ptr + meta_col + j * N, tl.full([BLOCK_N], -1, tl.int64), mask=mask_n)
        tl.store(next_ptr + meta_col + j * N, tl.full([BLOCK_N], -1, tl.int64), mask=mask_n)
        slot = j
        count = count - 1
        # The append below reads entries this program just wrote (when the tail is k).
        tl.debug_barrier()
    else:
        slot = tl.load(free_ptr + col, mask=mask_n, other=0)

    if DO_APPEND:
        meta_col = b.to(tl.int64) * S * N + offs_n
        has_prev = mask_n & ((tl.zeros([BLOCK_N], dtype=tl.int32) + count) > 0)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        nn_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        nn_x = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            mc = mask_n[:, None] & (cc[None, :] < C)
            xv = tl.load(x_ptr + col[:, None] * C + cc[None, :], mask=mc, other=0.0)
            tl.store(data_ptr + bank_base[:, None] + slot[:, None] * row_stride + cc[None, :], xv, mask=mc)
            xf = xv.to(tl.float32)
            x_t = tl.load(data_ptr + bank_base[:, None] + tl.maximum(tail, 0)[:, None] * row_stride + cc[None, :],
                          mask=mc & has_prev[:, None], other=0.0).to(tl.float32)
            d, a, bb = _cosine_parts(x_t, xf)
            dot += d
            nn_t += a
            nn_x += bb
        if HAS_SIDE:
            offs_d = tl.arange(0, BLOCK_D)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                md = mask_n[:, None] & (dd[None, :] < D)
                sv = tl.load(xs_ptr + col[:, None] * D + dd[None, :], mask=md, other=0.0)
                tl.store(side_ptr + side_base[:, None] + slot[:, None] * side_stride + dd[None, :], sv, mask=md)
        tl.store(sizes_ptr + meta_col + slot * N, tl.full([BLOCK_N], 1, tl.int32), mask=mask_n)
        tl.store(seq_ptr + meta_col + slot * N, tl.full([BLOCK_N], 0, tl.int64) + new_seq, mask=mask_n)
        # The time comes through memory: a Python float argument would be passed as float32.
        new_time = tl.load(time_ptr)
        tl.store(tfirst_ptr + meta_col + slot * N, tl.full([BLOCK_N], 0.0, tl.float64) + new_time, mask=mask_n)
        tl.store(tlast_ptr + meta_col + slot * N, tl.full([BLOCK_N], 0.0, tl.float64) + new_time, mask=mask_n)
        tl.store(sim_ptr + meta_col + slot * N, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=mask_n)
        tl.store(next_ptr + meta_col + slot * N, tl.full([BLOCK_N], -1, tl.int64), mask=mask_n)
        tl.store(prev_ptr + meta_col + slot * N, tl.where(has_prev, tail, -1), mask=mask_n)
        tl.store(next_ptr + meta_col + tl.maximum(tail, 0) * N, slot, mask=has_prev)
        tl.store(sim_ptr + meta_col + tl.maximum(tail, 0) * N, _cosine_finish(dot, nn_t, nn_x, eps),
                 mask=has_prev)
        tl.store(tail_ptr + col, slot, mask=mask_n)
        # Without merges the slots fill in order; a full bank has no free slot until the next merge.
        tl.store(free_ptr + col, tl.where(count + 1 < S, slot + 1, -1), mask=mask_n)
    else:
        tl.store(tail_ptr + col, tail, mask=mask_n)
        tl.store(free_ptr + col, slot, mask=mask_n)


@triton.jit
def _adjacent_similarity_kernel(bank_ptr, out_ptr, rows, T, N, C, eps,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, t, n] = cos(bank[b, t, n], bank[b, t+1, n]); rows = B·(T-1)·N, one program per BLOCK_R rows."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < rows
    per_b = (T - 1) * N
    b = r // per_b
    t = (r % per_b) // N
    n = r % N
    base = ((b * T + t) * N + n) * C  # entry t; entry t+1 lies N·C further
    step = N.to(tl.int64) * C
    offs_c = tl.arange(0, BLOCK_C)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    na = tl.zeros([BLOCK_R], dtype=tl.float32)
    nb = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        mc = mask_r[:, None] & (cc[None, :] < C)
        a = tl.load(bank_ptr + base[:, None] + cc[None, :], mask=mc, other=0.0).to(tl.float32)
        bv = tl.load(bank_ptr + base[:, None] + step + cc[None, :], mask=mc, other=0.0).to(tl.float32)
        d, x, y = _cosine_parts(a, bv)
        dot += d
        na += x
        nb += y
    tl.store(out_ptr + r, _cosine_finish(dot, na, nb, eps), mask=mask_r)


def _block_c(channels: int) -> int:
    return min(triton.next_power_of_2(channels), 256)


def bank_update(bank, x: torch.Tensor | None, time: float, merge: bool, side: torch.Tensor | None = None) -> None:
    """Launch the fused update on a StreamingMemoryBank: merge (if `merge`), then append x (if given).

    side: x's side channels [B, N, D] when the bank has them. Updates the bank's tensors in place;
    the caller keeps its counters.
    """
    B, S, N, C = bank.data.shape
    block_s = triton.next_power_of_2(S)
    # Keep the similarity tile [BLOCK_N, BLOCK_S] and the data tile [BLOCK_N, BLOCK_C] to a few
    # thousand elements.
    block_n = max(1, min(triton.next_power_of_2(N), 16, 4096 // block_s))
    grid = (B, triton.cdiv(N, block_n))
    x_arg = x.contiguous() if x is not None else bank.data  # unused when not appending
    has_side = bank.side is not None
    side_arg = bank.side if has_side else bank.data  # unused without side channels
    xs_arg = side.contiguous() if side is not None else side_arg  # unused when not appending
    D = bank.side.shape[-1] if has_side else 0
    time_arg = torch.tensor([time], dtype=torch.float64, device=bank.data.device)
    _bank_update_kernel[grid](
        bank.data, bank.sizes, bank.seq, bank.t_first, bank.t_last, bank.sim, bank.prev, bank.next,
        bank.tail, bank.free, x_arg, side_arg, xs_arg,
        time_arg, S, N, C, D, bank.count, bank.frames, COSINE_EPS,
        DO_MERGE=merge, DO_APPEND=x is not None, HAS_SIDE=has_side,
        BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_C=_block_c(C), BLOCK_D=_block_c(max(D, 1)),
    )


def adjacent_similarity_triton(bank: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of adjacent entries, float32 [B, T-1, N], from bank [B, T, N, C]."""
    B, T, N, C = bank.shape
    bank = bank.contiguous()
    out = torch.empty(B, T - 1, N, dtype=torch.float32, device=bank.device)
    rows = B * (T - 1) * N
    if rows == 0:
        return out
    block_c = _block_c(C)
    block_r = max(1, min(64, 4096 // block_c))
    _adjacent_similarity_kernel[(triton.cdiv(rows, block_r),)](
        bank, out, rows, T, N, C, COSINE_EPS, BLOCK_R=block_r, BLOCK_C=block_c
    )
    return out
