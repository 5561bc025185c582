"""A snapshot restored into a fresh state continues the stream exactly like the original."""

import pytest
import torch

from mixmalmm.model import StateSnapshot

from .conftest import make_model

QUESTION = "what is the man holding?"


def feed(model, state, feats, start):
    for t in range(feats.shape[0]):
        model.step([state], feats[t : t + 1], [(start + t) / 10.0])


def assert_same(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:  # keys/values projected again on restore: equal to the merged ones up to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("memory_bank_length", "visual_kv_cache"), [(0, True), (3, False), (3, True)])
def test_restored_snapshot_continues_identically(tmp_path, memory_bank_length, visual_kv_cache):
    """Exact without the keys/values cache; with it, within rounding (restore projects the entries again)."""
    model = make_model(memory_bank_length, seed=14, visual_kv_cache=visual_kv_cache)
    exact = not (visual_kv_cache and memory_bank_length)
    N, C = model.vision_tokens, model.blip_config.vision_config.hidden_size
    feats = torch.randn(14, N, C, generator=torch.Generator().manual_seed(14))
    state = model.create_state("cam7", default_question="what is happening here?")
    model.register_question(state, QUESTION)
    feed(model, state, feats[:8], 0)  # past M+1: banks have merged
    snapshot = state.snapshot()
    snapshot.save(tmp_path / "cam7.safetensors")
    restored = model.restore(StateSnapshot.load(tmp_path / "cam7.safetensors"))
    in_memory = model.restore(snapshot)
    assert restored.stream_id == "cam7" and list(restored.standing) == [QUESTION]
    assert restored.default.text == state.default.text and restored.frames == 8
    feed(model, state, feats[8:], 8)  # the snapshot is a copy: the original goes on independently
    for other in (restored, in_memory):
        feed(model, other, feats[8:], 8)
        for qa, qb in zip(state.questions(), other.questions(), strict=True):
            assert_same(qa.output, qb.output, exact)
            for ba, bb in zip(qa.banks, qb.banks, strict=True):
                xa, sa = ba.ordered()
                xb, sb = bb.ordered()
                assert torch.equal(sa, sb)
                assert_same(xa, xb, exact)
        assert other.time_span() == state.time_span() == (0.0, 1.3)
        for question, adhoc in ((QUESTION, False), ("is there a dog?", False), (QUESTION, True)):
            a = model.answer(state, question, max_new_tokens=5, adhoc=adhoc)
            b = model.answer(other, question, max_new_tokens=5, adhoc=adhoc)
            assert a == b


def test_snapshots_hold_no_keys_values_and_restore_across_the_cache_setting():
    """The visual bank's keys/values are not saved (the file is as large as without the cache), and a
    snapshot of either setting (those of earlier versions have none) continues in a model of the other."""
    M = 3
    cached, plain = make_model(M, seed=15), make_model(M, seed=15, visual_kv_cache=False)
    assert cached.config.visual_kv_cache  # the default
    N, C = cached.vision_tokens, cached.blip_config.vision_config.hidden_size
    feats = torch.randn(12, N, C, generator=torch.Generator().manual_seed(15))
    states = {}
    for name, model in (("cached", cached), ("plain", plain)):
        states[name] = model.create_state("cam")
        feed(model, states[name], feats[:7], 0)
    assert states["cached"].visual_bank.side_channels == cached.qformer.visual_kv_channels > 0
    assert states["plain"].visual_bank.side is None
    assert states["cached"].nbytes() > states["plain"].nbytes()
    snaps = {name: state.snapshot() for name, state in states.items()}
    assert snaps["cached"].tensors.keys() == snaps["plain"].tensors.keys()
    assert not any("side" in k for k in snaps["cached"].tensors)
    assert len(snaps["cached"].to_bytes()) == len(snaps["plain"].to_bytes())
    # Every snapshot continues in either model as the recompute path's uninterrupted run does.
    feed(plain, states["plain"], feats[7:], 7)
    expected = states["plain"].default.output
    for snap in snaps.values():
        for model in (cached, plain):
            resumed = model.restore(snap)
            assert (resumed.visual_bank.side is None) == (model is plain)
            feed(model, resumed, feats[7:], 7)
            torch.testing.assert_close(resumed.default.output, expected, rtol=1e-5, atol=1e-5)
            assert model.answer(resumed, max_new_tokens=5) == plain.answer(states["plain"], max_new_tokens=5)


def test_snapshot_errors(tmp_path):
    model = make_model(3)
    state = model.create_state()
    model.step([state], torch.zeros(1, model.vision_tokens, 32), [0.0])
    snapshot = state.snapshot()
    with pytest.raises(ValueError, match="memory_bank_length=3"):
        make_model(2).restore(snapshot)
    with pytest.raises(FileNotFoundError, match="no state snapshot"):
        StateSnapshot.load(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a mixmalmm stream snapshot"):
        StateSnapshot.load(tmp_path / "other.safetensors")
