"""Standing and ad-hoc questions, input checks, and the offline clip pass used for training."""

import pytest
import torch

from mixmalmm.model import MALMM, StreamConfig

from .conftest import make_model, random_pixels

QUESTION = "what is the man holding?"


def test_standing_questions_have_their_own_banks_and_adhoc_uses_the_default_ones():
    model = make_model(2, seed=15)
    feats = model.encode_frames(random_pixels(6, seed=15))
    state = model.create_state()
    early = model.register_question(state, QUESTION)
    for t in range(3):
        model.step([state], feats[t : t + 1], [float(t)])
    late = model.register_question(state, "is there a dog?")
    assert model.answer(state, "is there a dog?").mode == "adhoc"  # no frame seen since registration
    for t in range(3, 6):
        model.step([state], feats[t : t + 1], [float(t)])
    assert early.steps == 6 and late.steps == 3 and state.default.steps == 6
    assert early.banks[0].count == 3 and early.banks[0].shape.tokens == model.num_queries + early.tokens
    standing, mode = model.query_output(state, QUESTION)
    adhoc, adhoc_mode = model.query_output(state, QUESTION, adhoc=True)
    assert (mode, adhoc_mode) == ("standing", "adhoc")
    assert not torch.allclose(standing, adhoc)  # different query banks: an approximation, not the same
    # The ad-hoc pass for the default question itself reproduces the default's own output exactly:
    # the default banks minus their newest entry, plus the question's current hidden states.
    default_adhoc, _ = model.query_output(state, None, adhoc=True)
    torch.testing.assert_close(default_adhoc, state.default.output, rtol=1e-5, atol=1e-5)
    model.remove_question(state, QUESTION)
    assert model.answer(state, QUESTION, max_new_tokens=2).mode == "adhoc"
    with pytest.raises(KeyError, match="no standing question"):
        model.remove_question(state, QUESTION)


def test_bad_inputs_get_clear_errors():
    model = make_model(2)
    state = model.create_state("s1")
    with pytest.raises(ValueError, match="seen no frame"):
        model.answer(state, "anything?")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode_frames(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="32x32 pixels"):
        model.encode_frames(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="B times"):
        model.step([state], torch.zeros(2, model.vision_tokens, 32), [0.0])
    with pytest.raises(ValueError, match="features must be"):
        model.step([state], torch.zeros(1, 5, 32), [0.0])
    with pytest.raises(ValueError, match="ends before it starts"):
        model.step([state], torch.zeros(1, model.vision_tokens, 32), [(2.0, 1.0)])
    with pytest.raises(ValueError, match="twice"):
        model.step([state, state], torch.zeros(2, model.vision_tokens, 32), [0.0, 0.0])
    with pytest.raises(ValueError, match="memory_bank_length=2"):
        make_model(3).step([state], torch.zeros(1, model.vision_tokens, 32), [0.0])
    with pytest.raises(ValueError, match="memory_bank_length must be >= 0"):
        StreamConfig(memory_bank_length=-1)
    with pytest.raises(ValueError, match="frame_position_policy"):
        StreamConfig(frame_position_policy="wrap")


def test_shot_time_spans():
    model = make_model(2)
    state = model.create_state()
    model.step([state], torch.zeros(1, model.vision_tokens, 32), [(1.0, 2.5)])
    model.step([state], torch.zeros(1, model.vision_tokens, 32), [(2.5, 4.0)])
    assert model.answer(state, max_new_tokens=1).time_span == (1.0, 4.0)


@pytest.mark.parametrize("memory_bank_length", [0, 2])
def test_clip_loss_trains_qformer_side_only(memory_bank_length):
    torch.manual_seed(0)  # dropout in training mode
    model: MALMM = make_model(memory_bank_length, seed=16)
    pixels = random_pixels(8, seed=16).view(2, 4, 3, 32, 32)
    questions, answers = ["what is it?", "who is there now?"], ["a dog", "the man on the left"]
    with torch.no_grad():
        before = model.clip_loss(pixels, questions, answers)
    model.train()
    assert not model.vision_model.training and not model.language_model.training
    loss = model.clip_loss(pixels, questions, answers)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    assert model.frame_position.weight.grad.abs().sum() > 0
    qgrad = model.qformer.encoder.layer[0].attention.attention.query.weight.grad
    assert qgrad is not None and qgrad.abs().sum() > 0
    assert model.language_projection.weight.grad.abs().sum() > 0
    # MA-LMM's frozen vision is the EVA encoder: ln_vision (post_layernorm) is on the Q-Former side.
    assert all(p.grad is None for n, p in model.vision_model.named_parameters() if not n.startswith("post_layernorm."))
    assert model.vision_model.post_layernorm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.language_model.parameters())
    # One optimiser step lowers the loss on the same batch.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model.clip_loss(pixels, questions, answers)
    assert after < before
