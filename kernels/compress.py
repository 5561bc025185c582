"""Public entry points for MA-LMM's memory bank compression, dispatching to Triton or torch."""

from __future__ import annotations

import torch

from . import reference
from .dispatch import use_triton


def adjacent_similarity(bank: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Cosine similarity of temporally adjacent entries: bank [B, T, N, C] -> float32 [B, T-1, N]."""
    if bank.dim() != 4:
        raise ValueError(f"bank must be [B, T, N, C], got shape {tuple(bank.shape)}")
    if use_triton(bank.device, backend):
        from .triton_bank import adjacent_similarity_triton

        return adjacent_similarity_triton(bank)
    return reference.adjacent_similarity_torch(bank)


def memory_bank_compress(
    bank: torch.Tensor, sizes: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """MA-LMM's memory bank compression: bank [B, T, N, C], sizes [B, T, N] -> [B, T-1, N, C], [B, T-1, N].

    See `reference.memory_bank_compress`; the similarity pass runs in Triton on CUDA.
    """
    similarity = adjacent_similarity(bank, backend) if use_triton(bank.device, backend) else None
    return reference.memory_bank_compress(bank, sizes, similarity=similarity)
