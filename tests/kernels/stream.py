"""MA-LMM's bank over a stream, the way MA-LMM builds it: concatenate each frame, compress when over M."""

from __future__ import annotations

import torch

from mixmalmm.kernels import memory_bank_compress


class ReferenceStream:
    """Keeps MA-LMM's bank and counts; `before_compress` is the bank the Q-Former attends to."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.bank: torch.Tensor | None = None
        self.sizes: torch.Tensor | None = None

    def push(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add x [B, N, C]; returns (bank, sizes) before compression: M+1 entries at most."""
        ones = torch.ones(x.shape[0], 1, x.shape[1], dtype=torch.int32, device=x.device)
        if self.bank is None:
            self.bank, self.sizes = x.unsqueeze(1), ones
        else:
            self.bank = torch.cat([self.bank, x.unsqueeze(1)], dim=1)
            self.sizes = torch.cat([self.sizes, ones], dim=1)
        attended = (self.bank, self.sizes)
        if self.bank.shape[1] > self.capacity:
            self.bank, self.sizes = memory_bank_compress(self.bank, self.sizes, backend="torch")
        return attended


def assert_bank_equal(got, expected, dtype):
    """(bank, sizes) pairs equal: counts exactly, entries to the dtype's tolerance (relative)."""
    bank, sizes = got
    ref_bank, ref_sizes = expected
    assert torch.equal(sizes.cpu(), ref_sizes.cpu())
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(bank.float().cpu(), ref_bank.float().cpu(), rtol=tol, atol=tol)
