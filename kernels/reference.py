"""MA-LMM's memory bank compression, written plainly in torch.

This is the reference the streaming bank and the Triton kernels are checked against
(shared/DESIGN.md §3). Similarities and merges are computed in float32 for every storage dtype and
the merged entry is rounded once to the bank's dtype; MA-LMM computes in the bank's own dtype, which
only differs on near-ties below half precision.
"""

from __future__ import annotations

import torch

# Same epsilon and formula as torch.nn.functional.cosine_similarity: dot / sqrt(max(|a|²|b|², eps²)).
COSINE_EPS = 1e-8


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension, in float32. a, b: [..., C] -> [...]."""
    a = a.float()
    b = b.float()
    dot = (a * b).sum(-1)
    norms = (a * a).sum(-1) * (b * b).sum(-1)
    return dot / norms.clamp_min(COSINE_EPS * COSINE_EPS).sqrt()


def adjacent_similarity_torch(bank: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of temporally adjacent entries. bank [B, T, N, C] -> float32 [B, T-1, N]."""
    return cosine(bank[:, :-1], bank[:, 1:])


def merge_pair(
    x_a: torch.Tensor, s_a: torch.Tensor, x_b: torch.Tensor, s_b: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Count-weighted mean of two entries, in float32, rounded once to `dtype`.

    x_a, x_b: [..., C]; s_a, s_b: merge counts [...]; returns [..., C].
    """
    wa = s_a.float().unsqueeze(-1)
    wb = s_b.float().unsqueeze(-1)
    return ((wa * x_a.float() + wb * x_b.float()) / (wa + wb)).to(dtype)


def memory_bank_compress(
    bank: torch.Tensor, sizes: torch.Tensor, similarity: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the most similar pair of temporally adjacent entries, independently per token column.

    bank: [B, T, N, C] (T >= 2), entries in temporal order; sizes: [B, T, N] merge counts (how many
    frames each entry averages). For every (b, n): k = argmax_t cos(bank[b, t, n], bank[b, t+1, n])
    (first index on ties); entry k becomes the count-weighted mean of entries k and k+1, its count the
    sum; entry k+1 is removed. Returns (bank [B, T-1, N, C], sizes [B, T-1, N]).

    `similarity` ([B, T-1, N] float32) may be passed when already computed (the Triton pass).
    """
    if bank.dim() != 4:
        raise ValueError(f"bank must be [B, T, N, C], got shape {tuple(bank.shape)}")
    B, T, N, C = bank.shape
    if sizes.shape != (B, T, N):
        raise ValueError(f"sizes must be [B, T, N] = {(B, T, N)}, got {tuple(sizes.shape)}")
    if T < 2:
        raise ValueError(f"need at least 2 entries to compress, got T={T}")
    sim = adjacent_similarity_torch(bank) if similarity is None else similarity
    k = sim.argmax(dim=1)  # [B, N]; torch.argmax returns the first maximal index

    t = torch.arange(T, device=bank.device).view(1, T, 1)
    kk = k.unsqueeze(1)  # [B, 1, N]
    # Entry t of the result comes from t for t <= k and from t+1 after (k+1 is dropped).
    src = torch.where(t[:, : T - 1] <= kk, t[:, : T - 1], t[:, : T - 1] + 1)  # [B, T-1, N]
    out = bank.gather(1, src.unsqueeze(-1).expand(B, T - 1, N, C)).clone()
    out_sizes = sizes.gather(1, src).clone()

    idx = kk.unsqueeze(-1).expand(B, 1, N, C)
    x_k = bank.gather(1, idx)
    x_k1 = bank.gather(1, idx + 1)
    s_k = sizes.gather(1, kk)
    s_k1 = sizes.gather(1, kk + 1)
    out.scatter_(1, idx, merge_pair(x_k, s_k, x_k1, s_k1, bank.dtype))
    out_sizes.scatter_(1, kk, s_k + s_k1)
    return out, out_sizes
