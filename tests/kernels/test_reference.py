"""memory_bank_compress: MA-LMM's compression, checked on hand-computed cases and invariants."""

import pytest
import torch

from mixmalmm.kernels import memory_bank_compress


def test_hand_computed_merge_per_column():
    # One batch row, T=3 entries, N=2 token columns, C=2 channels.
    bank = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],  # t=0
            [[1.0, 0.1], [1.0, 0.0]],  # t=1
            [[0.0, 1.0], [1.0, 0.1]],  # t=2
        ]
    ).unsqueeze(0)
    sizes = torch.tensor([[[1, 1], [3, 1], [1, 2]]], dtype=torch.int32)
    out, out_sizes = memory_bank_compress(bank, sizes)
    # Column 0: (t0, t1) are the most similar pair -> (1*[1,0] + 3*[1,0.1]) / 4.
    # Column 1: (t1, t2) are the most similar pair -> (1*[1,0] + 2*[1,0.1]) / 3.
    expected = torch.tensor(
        [
            [[1.0, 0.075], [0.0, 1.0]],
            [[0.0, 1.0], [1.0, 0.2 / 3]],
        ]
    ).unsqueeze(0)
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out, expected)
    assert out_sizes.tolist() == [[[4, 1], [1, 3]]]


def test_ties_merge_the_earliest_pair():
    # Four identical entries: every adjacent similarity is 1; the first pair must merge.
    bank = torch.ones(1, 4, 1, 3)
    sizes = torch.tensor([[[1], [2], [3], [4]]], dtype=torch.int32)
    _, out_sizes = memory_bank_compress(bank, sizes)
    assert out_sizes.flatten().tolist() == [3, 3, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weighted_sum_and_counts_are_conserved(dtype):
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(3, 9, 7, 16, generator=g).to(dtype)
    sizes = torch.randint(1, 5, (3, 9, 7), generator=g, dtype=torch.int32)
    out, out_sizes = memory_bank_compress(bank, sizes)
    assert out.shape == (3, 8, 7, 16) and out.dtype == dtype
    assert torch.equal(out_sizes.sum(1), sizes.sum(1))
    # A count-weighted merge keeps sum_t S[t] X[t] per column.
    before = (sizes.unsqueeze(-1) * bank.float()).sum(1)
    after = (out_sizes.unsqueeze(-1) * out.float()).sum(1)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(after, before, rtol=tol, atol=tol)
    # Exactly one entry per column changed value, the rest moved down unchanged.
    k = (out_sizes != sizes[:, :8]).float().argmax(1)  # first index whose count differs
    for b in range(3):
        for n in range(7):
            kk = int(k[b, n])
            kept = torch.cat([bank[b, :kk, n], bank[b, kk + 2 :, n]])
            assert torch.equal(torch.cat([out[b, :kk, n], out[b, kk + 1 :, n]]), kept)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[B, T, N, C\]"):
        memory_bank_compress(torch.zeros(4, 2, 3), torch.ones(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="sizes must be"):
        memory_bank_compress(torch.zeros(1, 3, 2, 4), torch.ones(1, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 entries"):
        memory_bank_compress(torch.zeros(1, 1, 2, 4), torch.ones(1, 1, 2, dtype=torch.int32))
