"""A snapshot restored into a fresh state continues the stream exactly like the original."""

import pytest
import torch

from mixmalmm.model import StateSnapshot

from .conftest import make_model

QUESTION = "what is the man holding?"


def feed(model, state, feats, start):
    for t in range(feats.shape[0]):
        model.step([state], feats[t : t + 1], [(start + t) / 10.0])


@pytest.mark.parametrize("memory_bank_length", [0, 3])
def test_restored_snapshot_continues_identically(tmp_path, memory_bank_length):
    model = make_model(memory_bank_length, seed=14)
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
            assert torch.equal(qa.output, qb.output)
            for ba, bb in zip(qa.banks, qb.banks, strict=True):
                xa, sa = ba.ordered()
                xb, sb = bb.ordered()
                assert torch.equal(xa, xb) and torch.equal(sa, sb)
        assert other.time_span() == state.time_span() == (0.0, 1.3)
        for question, adhoc in ((QUESTION, False), ("is there a dog?", False), (QUESTION, True)):
            a = model.answer(state, question, max_new_tokens=5, adhoc=adhoc)
            b = model.answer(other, question, max_new_tokens=5, adhoc=adhoc)
            assert a == b


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
