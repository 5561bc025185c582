"""The Triton kernels against the torch reference.

Without CUDA they run under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
the shapes stay small; odd N and C exercise the masks and the channel loop.
"""

import pytest
import torch

from mixmalmm.kernels import StreamingMemoryBank, adjacent_similarity, memory_bank_compress, use_triton
from mixmalmm.kernels.bank import _STATE_KEYS

from .stream import ReferenceStream, assert_bank_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 1, 5), (2, 7, 5, 300), (3, 4, 33, 17)])
def test_adjacent_similarity(shape, dtype):
    bank = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
    got = adjacent_similarity(bank, backend="triton")
    want = adjacent_similarity(bank, backend="torch")
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_through_triton_similarity(dtype):
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(2, 6, 5, 40, generator=g).to(dtype).to(DEVICE)
    sizes = torch.randint(1, 4, (2, 6, 5), generator=g, dtype=torch.int32).to(DEVICE)
    got = memory_bank_compress(bank, sizes, backend="triton")
    want = memory_bank_compress(bank, sizes, backend="torch")
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("capacity", "B", "N", "C"), [(1, 1, 3, 8), (2, 2, 5, 40), (10, 1, 7, 300)])
def test_fused_update_matches_malmm_and_torch_bank(capacity, B, N, C, dtype):
    fast = StreamingMemoryBank(capacity, B, N, C, dtype=dtype, device=DEVICE, backend="triton")
    slow = StreamingMemoryBank(capacity, B, N, C, dtype=dtype, device=DEVICE, backend="torch")
    ref = ReferenceStream(capacity)
    g = torch.Generator().manual_seed(capacity)
    for i in range(3 * capacity + 6):
        x = torch.randn(B, N, C, generator=g).to(dtype).to(DEVICE)
        attended = ref.push(x)
        fast.append(x, time=1e6 + i / 30)  # large times keep float64 precision through the kernel
        slow.append(x, time=1e6 + i / 30)
        assert_bank_equal(fast.ordered(), attended, dtype)
        if i % 3 == 2:  # standalone compression (the unfused kernel path) now and then
            assert fast.compress() == slow.compress()
        for key in _STATE_KEYS:
            torch.testing.assert_close(getattr(fast, key), getattr(slow, key), rtol=1e-6, atol=1e-6)
    assert fast.time_span() == slow.time_span() == (1e6, 1e6 + (3 * capacity + 5) / 30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("capacity", "B", "N", "C", "D"), [(1, 1, 3, 8, 5), (3, 2, 5, 40, 300)])
def test_fused_update_merges_side_channels_as_the_torch_bank(capacity, B, N, C, D, dtype):
    fast = StreamingMemoryBank(capacity, B, N, C, dtype=dtype, device=DEVICE, backend="triton", side_channels=D)
    slow = StreamingMemoryBank(capacity, B, N, C, dtype=dtype, device=DEVICE, backend="torch", side_channels=D)
    g = torch.Generator().manual_seed(capacity)
    for i in range(3 * capacity + 4):
        x = torch.randn(B, N, C, generator=g).to(dtype).to(DEVICE)
        side = torch.randn(B, N, D, generator=g).to(dtype).to(DEVICE)
        fast.append(x, time=float(i), side=side)
        slow.append(x, time=float(i), side=side)
        if i % 3 == 2:  # the unfused merge too
            assert fast.compress() == slow.compress()
        for key in (*_STATE_KEYS, "side"):
            torch.testing.assert_close(getattr(fast, key), getattr(slow, key), rtol=1e-6, atol=1e-6)
    # The side channels hold merges (the last merge's weights), not only copies of appended rows.
    assert int(fast.sizes.max()) > 1


def test_dispatch(monkeypatch):
    assert use_triton("cpu", "torch") is False
    assert use_triton("cpu", "auto") is False  # no CUDA tensor: torch
    monkeypatch.setenv("MIXMALMM_FORCE_TORCH", "1")
    assert use_triton("cuda", "auto") is False
    monkeypatch.delenv("MIXMALMM_FORCE_TORCH")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        use_triton("cpu", "triton")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_auto_uses_triton_and_matches_malmm(dtype):
    assert use_triton("cuda", "auto")
    B, N, C, M = 2, 257, 1408, 10
    bank = StreamingMemoryBank(M, B, N, C, dtype=dtype, device="cuda")
    ref = ReferenceStream(M)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        x = torch.randn(B, N, C, generator=g).to(dtype).cuda()
        attended = ref.push(x)
        bank.append(x)
        assert_bank_equal(bank.ordered(), attended, dtype)
