"""StreamingMemoryBank (torch path) against MA-LMM's concatenate-and-compress, frame by frame."""

import pytest
import torch

from mixmalmm.kernels import StreamingMemoryBank

from .stream import ReferenceStream, assert_bank_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _frames(count, B, N, C, dtype, seed=0, repeat_every=0):
    g = torch.Generator().manual_seed(seed)
    last = None
    for i in range(count):
        if repeat_every and last is not None and i % repeat_every:
            yield last.clone()  # a static camera: exact duplicates tie at similarity 1
            continue
        last = torch.randn(B, N, C, generator=g).to(dtype)
        yield last


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [1, 2, 10, 100])
def test_matches_malmm_after_every_frame(capacity, dtype):
    B, N, C = 2, 5, 12
    bank = StreamingMemoryBank(capacity, B, N, C, dtype=dtype, backend="torch")
    ref = ReferenceStream(capacity)
    for i, x in enumerate(_frames(300, B, N, C, dtype, seed=capacity)):
        attended = ref.push(x)
        bank.append(x, time=i / 10)
        assert bank.count == attended[1].shape[1] <= capacity + 1
        assert_bank_equal(bank.ordered(), attended, dtype)
        # Explicit compression after attending gives MA-LMM's stored bank (on odd frames; even
        # frames leave it to the next append).
        if i % 2 and bank.compress():
            assert_bank_equal(bank.ordered(), (ref.bank, ref.sizes), dtype)


@pytest.mark.parametrize("capacity", [1, 3, 10])
def test_duplicate_frames_tie_like_argmax(capacity):
    B, N, C = 1, 4, 8
    bank = StreamingMemoryBank(capacity, B, N, C, backend="torch")
    ref = ReferenceStream(capacity)
    for x in _frames(120, B, N, C, torch.float32, seed=7, repeat_every=4):
        attended = ref.push(x)
        bank.append(x)
        assert_bank_equal(bank.ordered(), attended, torch.float32)


def test_view_holds_the_same_entries_without_mask_after_append():
    B, N, C, M = 2, 3, 6, 4
    bank = StreamingMemoryBank(M, B, N, C, backend="torch")
    for i, x in enumerate(_frames(30, B, N, C, torch.float32, seed=1)):
        bank.append(x)
        entries, valid = bank.view()
        assert valid is None and entries.shape == (B, min(i + 1, M + 1), N, C)
        ordered, _ = bank.ordered()
        # Same entries per column, in some order.
        key = lambda t: t.sort(dim=1).values  # noqa: E731
        torch.testing.assert_close(key(entries), key(ordered))
    bank.compress()
    entries, valid = bank.view()
    assert valid is not None and valid.sum(1).eq(M).all()
    ordered, _ = bank.ordered()
    kept = entries.transpose(1, 2)[valid.transpose(1, 2)].view(B, N, M, C).sort(dim=2).values
    torch.testing.assert_close(kept, ordered.transpose(1, 2).sort(dim=2).values)


def test_time_spans_cover_each_entrys_frames():
    B, N, C, M = 1, 6, 8, 5
    bank = StreamingMemoryBank(M, B, N, C, backend="torch")
    for i, x in enumerate(_frames(200, B, N, C, torch.float32, seed=2)):
        bank.append(x, time=100.0 + 0.5 * i)
    first, last = bank.spans()
    _, sizes = bank.ordered()
    # Entries are runs of consecutive frames (0.5 s apart) that tile the whole stream.
    torch.testing.assert_close((last - first) / 0.5 + 1, sizes.double())
    torch.testing.assert_close(first[:, 1:], last[:, :-1] + 0.5)
    assert first[:, 0].eq(100.0).all() and last[:, -1].eq(100.0 + 0.5 * 199).all()
    assert bank.time_span() == (100.0, 100.0 + 0.5 * 199)
    assert StreamingMemoryBank(M, B, N, C).time_span() is None


def test_snapshot_continues_identically():
    B, N, C, M = 2, 4, 10, 6
    frames = list(_frames(80, B, N, C, torch.float32, seed=4))
    whole = StreamingMemoryBank(M, B, N, C, backend="torch")
    first = StreamingMemoryBank(M, B, N, C, backend="torch")
    for x in frames[:37]:
        whole.append(x)
        first.append(x)
    state = first.state_dict()
    resumed = StreamingMemoryBank(M, B, N, C, backend="torch")
    resumed.load_state_dict(state)
    for x in frames[37:]:
        whole.append(x)
        resumed.append(x)
    for a, b in zip(whole.ordered(), resumed.ordered(), strict=True):
        assert torch.equal(a, b)
    assert whole.time_span() == resumed.time_span()
    with pytest.raises(ValueError, match="capacity, batch, tokens, channels"):
        StreamingMemoryBank(M + 1, B, N, C).load_state_dict(state)


def test_storage_is_fixed_over_thousands_of_frames():
    B, N, C, M = 1, 3, 4, 8
    bank = StreamingMemoryBank(M, B, N, C, backend="torch")
    pointers = [bank.data.data_ptr(), bank.sim.data_ptr(), bank.sizes.data_ptr()]
    nbytes = bank.nbytes()
    for x in _frames(3000, B, N, C, torch.float32, seed=5):
        bank.append(x)
        assert bank.count <= M + 1
    assert [bank.data.data_ptr(), bank.sim.data_ptr(), bank.sizes.data_ptr()] == pointers
    assert bank.nbytes() == nbytes and bank.frames == 3000
    assert bank.ordered()[1].sum(1).eq(3000).all()  # every frame is still counted, in every column


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        StreamingMemoryBank(0, 1, 2, 3)
    with pytest.raises(ValueError, match="dtype"):
        StreamingMemoryBank(2, 1, 2, 3, dtype=torch.int32)
    bank = StreamingMemoryBank(2, 1, 2, 3)
    with pytest.raises(ValueError, match=r"\[B, N, C\] = \(1, 2, 3\)"):
        bank.append(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        StreamingMemoryBank(2, 1, 2, 3, backend="cuda")


def _affine(C, D, seed):
    """A random Linear map C -> D (weight [C, D], bias [D]): what the Q-Former's keys/values are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, D, generator=g) / C**0.5, torch.randn(D, generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [1, 3, 10])
def test_side_channels_merge_with_their_entries_weights(capacity, dtype):
    """Side channels f(x) of an affine f, merged along with the entries, stay f(merged entries)."""
    B, N, C, D = 2, 5, 12, 7
    weight, bias = _affine(C, D, capacity)
    bank = StreamingMemoryBank(capacity, B, N, C, dtype=dtype, backend="torch", side_channels=D)
    plain = StreamingMemoryBank(capacity, B, N, C, dtype=dtype, backend="torch")
    assert bank.side_channels == D and plain.side_channels == 0
    assert bank.nbytes() == plain.nbytes() + B * (capacity + 1) * N * D * bank.data.element_size()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for i, x in enumerate(_frames(6 * capacity + 5, B, N, C, dtype, seed=capacity)):
        bank.append(x, time=i, side=(x.float() @ weight + bias).to(dtype))
        plain.append(x, time=i)
        # The side channels change nothing about the entries and their merges.
        for a, b in zip(bank.ordered(), plain.ordered(), strict=True):
            assert torch.equal(a, b)
        data, _ = bank.ordered()
        torch.testing.assert_close(bank.ordered_side().float(), data.float() @ weight + bias, rtol=tol, atol=tol)
        # side_view lines up with view slot by slot.
        entries, _ = bank.view()
        torch.testing.assert_close(bank.side_view().float(), entries.float() @ weight + bias, rtol=tol, atol=tol)
        if i % 3 == 2:
            assert bank.compress() == plain.compress()
    assert bank.frames == 6 * capacity + 5


def test_side_channels_are_checked_and_kept_in_snapshots():
    B, N, C, D, M = 1, 4, 6, 3, 3
    bank = StreamingMemoryBank(M, B, N, C, backend="torch", side_channels=D)
    x = torch.randn(B, N, C)
    with pytest.raises(ValueError, match="3 side channels per token: pass side"):
        bank.append(x)
    with pytest.raises(ValueError, match=r"side must be \[B, N, D\] = \(1, 4, 3\)"):
        bank.append(x, side=torch.zeros(B, N, D + 1))
    with pytest.raises(ValueError, match="0 side channels per token: pass no side"):
        StreamingMemoryBank(M, B, N, C).append(x, side=torch.zeros(B, N, D))
    with pytest.raises(ValueError, match="side_channels must be >= 0"):
        StreamingMemoryBank(M, B, N, C, side_channels=-1)
    with pytest.raises(ValueError, match="no side channels"):
        StreamingMemoryBank(M, B, N, C).side_view()
    frames = list(_frames(20, B, N, C, torch.float32, seed=8))
    sides = [torch.randn(B, N, D, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    for x, s in zip(frames[:9], sides[:9], strict=True):
        bank.append(x, side=s)
    state = bank.state_dict()
    assert tuple(state["side"].shape) == (B, M + 1, N, D)
    resumed = StreamingMemoryBank(M, B, N, C, backend="torch", side_channels=D)
    resumed.load_state_dict(state)
    for x, s in zip(frames[9:], sides[9:], strict=True):
        bank.append(x, side=s)
        resumed.append(x, side=s)
    assert torch.equal(bank.ordered_side(), resumed.ordered_side())
    # A snapshot without side channels does not load into a bank that keeps them, and the bank keeps
    # what it held.
    held = resumed.ordered_side().clone(), resumed.ordered()[0].clone()
    with pytest.raises(ValueError, match=r"lacks \['side'\]"):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "side"})
    with pytest.raises(ValueError, match="'side' has shape"):
        resumed.load_state_dict({**state, "side": torch.zeros(B, M + 1, N, D + 1)})
    with pytest.raises(ValueError, match="more than 4 slots"):
        resumed.load_state_dict({**state, "count": M + 2})
    assert torch.equal(resumed.ordered_side(), held[0]) and torch.equal(resumed.ordered()[0], held[1])
    # A bank without side channels ignores them.
    StreamingMemoryBank(M, B, N, C).load_state_dict(state)
