"""The training loop: the clip pass it trains equals streaming, the loss falls, resume continues identically."""

import json

import pytest
import torch

from mixmalmm.model import MALMM, StreamConfig
from mixmalmm.model.synthetic import SyntheticQA, SyntheticVideoQA, vocabulary
from mixmalmm.model.train import (
    ModelSizes,
    TrainConfig,
    Trainer,
    epoch_batches,
    evaluate,
    frames_to_pixels,
    main,
    normalise_answer,
    pretrain_vision,
    scratch_model,
)

TINY = ModelSizes(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, qformer_hidden=32,
                  num_query_tokens=4, llm_hidden=32, llm_layers=1)


def tiny_model(memory_bank_length: int = 3, seed: int = 0, present_frame: bool = False):
    config = StreamConfig(memory_bank_length=memory_bank_length, freeze_vision=False, freeze_llm=False,
                          present_frame=present_frame)
    model = scratch_model(vocabulary(), TINY, config, seed=seed)
    if present_frame:
        with torch.no_grad():  # a trained marker is not zero
            model.present_embedding.copy_(torch.randn(model.present_embedding.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def pixels_of(model, samples):
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    return torch.stack([frames_to_pixels(s.frames, model.image_size, mean, std) for s in samples])


@pytest.mark.parametrize("present_frame", [False, True])
@pytest.mark.parametrize("memory_bank_length", [0, 3])
def test_the_trained_clip_pass_equals_streaming_for_standing_and_adhoc_questions(memory_bank_length, present_frame):
    model = tiny_model(memory_bank_length, seed=1, present_frame=present_frame).eval()
    ds = SyntheticQA(40, seed=2, size=32, sampling="uniform", frames=(7, 7))
    samples = [ds[i] for i in range(3)]  # questions of different lengths: the clip pass pads them
    assert len({len(model.qformer_tokenizer(s.question).input_ids) for s in samples}) > 1
    pixels = pixels_of(model, samples)
    questions = [s.question for s in samples]
    with torch.no_grad():
        standing = model.clip_query_output(pixels, questions)
        adhoc = model.clip_query_output(pixels, questions, adhoc=True)
    for b, s in enumerate(samples):
        state = model.create_state()
        model.register_question(state, s.question)
        for t in range(pixels.shape[1]):
            model.step([state], model.encode_frames(pixels[b, t : t + 1]), [t / 8])
        stream_standing, mode = model.query_output(state, s.question)
        stream_adhoc, adhoc_mode = model.query_output(state, s.question, adhoc=True)
        assert (mode, adhoc_mode) == ("standing", "adhoc")
        torch.testing.assert_close(standing[b : b + 1], stream_standing, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adhoc[b : b + 1], stream_adhoc, rtol=1e-4, atol=1e-5)


def test_memory_gradients_reach_past_frames_only_when_asked():
    model = tiny_model(3, seed=2)
    ds = SyntheticQA(20, seed=3, size=32, sampling="uniform", frames=(6, 6))
    samples = [ds[i] for i in range(2)]
    pixels = pixels_of(model, samples)
    for grads, reaches in ((False, False), ("visual", True), (True, True)):
        model.zero_grad(set_to_none=True)
        loss = model.clip_loss(pixels, [s.question for s in samples], [s.answer for s in samples],
                               memory_gradients=grads)
        loss.backward()
        rows = model.frame_position.weight.grad.abs().sum(dim=1)
        assert rows[5] > 0  # the newest frame's position always learns
        assert bool((rows[:5] > 0).all()) == reaches, grads
    with pytest.raises(ValueError, match="memory_gradients"):
        model.clip_query_output(pixels, ["a?", "b?"], memory_gradients="query")


def run_config(tmp_path, name: str, **kw) -> TrainConfig:
    defaults = dict(out=str(tmp_path / name), epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, log_every=0,
                    adhoc_fraction=0.5, eval_batch_size=8, augment=True)
    return TrainConfig(**{**defaults, **kw})


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(2, seed=3)
    train_set = SyntheticQA(16, seed=4, size=32, frames=(4, 6))
    batch = [train_set[i] for i in range(8)]
    pixels = pixels_of(model, [s for s in batch if len(s.frames) == len(batch[0].frames)])
    same = [s for s in batch if len(s.frames) == len(batch[0].frames)]

    def loss_now():
        with torch.no_grad():
            model.eval()
            return float(model.clip_loss(pixels, [s.question for s in same], [s.answer for s in same]))

    before = loss_now()
    trainer = Trainer(model, train_set, None, run_config(tmp_path, "a", epochs=6, augment=False), log=lambda _: None)
    summary = trainer.run()
    assert summary["step"] == trainer.total_steps == 6 * len(epoch_batches(train_set, 4, 0, 0))
    assert loss_now() < 0.7 * before
    assert (tmp_path / "a" / "checkpoint.pt").is_file()


def test_resume_continues_identically(tmp_path):
    train_set = SyntheticQA(12, seed=5, size=32, frames=(4, 5))
    val_set = SyntheticQA(4, seed=6, size=32, frames=(4, 5))

    def fresh():
        torch.manual_seed(123)
        return tiny_model(2, seed=4)

    straight = fresh()
    Trainer(straight, train_set, val_set, run_config(tmp_path, "straight"), log=lambda _: None).run()

    first = fresh()
    stopped = Trainer(first, train_set, val_set, run_config(tmp_path, "halves", max_steps=4), log=lambda _: None)
    assert stopped.run()["step"] == 4 and stopped.total_steps > 4  # stopped inside the run
    torch.manual_seed(999)  # resuming restores the random state; whatever happened since must not matter
    second = tiny_model(2, seed=77)  # other weights: the checkpoint replaces them
    resumed = Trainer(second, train_set, val_set, run_config(tmp_path, "halves"), log=lambda _: None)
    resumed.load_checkpoint(tmp_path / "halves" / "checkpoint.pt")
    summary = resumed.run()
    assert summary["step"] == resumed.total_steps
    for (name, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["val_accuracy"] for h in summary["history"]] == [
        h["val_accuracy"] for h in Trainer(fresh(), train_set, val_set, run_config(tmp_path, "again"),
                                           log=lambda _: None).run()["history"]
    ]
    with pytest.raises(ValueError, match="batch_size=4"):
        Trainer(fresh(), train_set, val_set, run_config(tmp_path, "x", batch_size=3),
                log=lambda _: None).load_checkpoint(tmp_path / "halves" / "checkpoint.pt")


def test_evaluate_counts_exact_matches():
    model = tiny_model(2, seed=5).eval()
    ds = SyntheticQA(6, seed=7, size=32, frames=(4, 4))
    result = evaluate(model, ds, batch_size=4, kinds=lambda i: ds[i].kind)
    assert result["count"] == 6 and sum(n for _, n in result["groups"].values()) == 6
    # Recount by hand with the streaming API: the same greedy answers.
    correct = 0
    for i in range(6):
        s = ds[i]
        state = model.create_state()
        model.register_question(state, s.question)
        pixels = pixels_of(model, [s])[0]
        for t in range(len(pixels)):
            model.step([state], model.encode_frames(pixels[t : t + 1]), [float(t)])
        correct += normalise_answer(model.answer(state, s.question, max_new_tokens=4).text) == s.answer
    assert result["accuracy"] == correct / 6
    assert normalise_answer(" Red. ") == "red"


def test_command_line_trains_and_saves_a_loadable_model(tmp_path):
    from mixmalmm.model import MALMM

    out = tmp_path / "run"
    args = ["--out", str(out), "--train-all", "--train-size", "8", "--val-size", "4", "--epochs", "1",
            "--batch-size", "4", "--memory-bank-length", "2", "--log-every", "1"]
    for name, value in vars(TINY).items():
        args += ["--" + name.replace("_", "-"), str(value)]
    assert main(args) == 0
    model = MALMM.from_pretrained(out / "model")
    assert model.config.memory_bank_length == 2 and model.image_size == 32
    assert "validation exact match" in (out / "train_log.txt").read_text()
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--memory-gradients", "some"])


def test_command_line_pretrains_vision_then_trains_on_busy_whole_videos(tmp_path):
    from mixmalmm.model import MALMM

    out = tmp_path / "videos"
    args = ["--out", str(out), "--train-llm", "--videos", "--busy", "0.5", "--strides", "8,8",
            "--train-size", "6", "--val-size", "3", "--epochs", "1", "--batch-size", "3",
            "--memory-bank-length", "2", "--log-every", "1", "--vision-steps", "2", "--vision-videos", "2"]
    for name, value in vars(TINY).items():
        args += ["--" + name.replace("_", "-"), str(value)]
    assert main(args) == 0
    log = (out / "train_log.txt").read_text()
    assert "vision validation" in log and "validation exact match" in log
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["vision"]) >= {"all", "named"}
    assert MALMM.from_pretrained(out / "model").config.memory_bank_length == 2
    with pytest.raises(ValueError, match="busy must be a probability"):
        main(args[:2] + ["--videos", "--busy", "2", "--train-size", "2", "--val-size", "1"])


def test_questions_sharing_a_clip_equal_the_clip_repeated_and_train_together(tmp_path):
    model = tiny_model(3, seed=6).eval()
    ds = SyntheticVideoQA(8, seed=9, size=32, strides=(8, 8), at_end=1.0)
    sample = max((ds[i] for i in range(len(ds))), key=lambda s: len(s.questions))
    n = len(sample.questions)
    assert n >= 3
    pixels = torch.stack([frames_to_pixels(sample.frames, model.image_size, (0.5,) * 3, (0.25,) * 3)])
    with torch.no_grad():
        shared = model.clip_query_output(pixels, sample.questions, clips=[0] * n)
        repeated = model.clip_query_output(pixels.expand(n, -1, -1, -1, -1), sample.questions)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clip index in 0..0"):
        model.clip_query_output(pixels, sample.questions, clips=[1] * n)
    with pytest.raises(ValueError, match="one question per clip"):
        model.clip_query_output(pixels, sample.questions)
    # The trainer takes multi-question items; evaluation counts and groups every question by its type.
    trainer = Trainer(tiny_model(3, seed=6), ds, ds, run_config(tmp_path, "videos", epochs=1), log=lambda _: None)
    summary = trainer.run()
    asked = sum(len(ds[i].questions) for i in range(len(ds)))
    groups = summary["history"][-1]["val_groups"]
    assert sum(c for _, c in groups.values()) == asked
    assert set(groups) == {k for i in range(len(ds)) for k in ds[i].kinds}


def test_the_present_frame_is_saved_loaded_and_changes_only_what_it_should(tmp_path):
    from mixmalmm.model import MALMM

    plain = tiny_model(3, seed=8)
    present = tiny_model(3, seed=8, present_frame=True)
    assert "present_embedding" not in dict(plain.named_parameters())  # exact MA-LMM: no extra weight
    present.save_pretrained(tmp_path / "present")
    loaded = MALMM.from_pretrained(tmp_path / "present")
    assert loaded.config.present_frame
    torch.testing.assert_close(loaded.present_embedding, present.present_embedding, rtol=0, atol=0)
    # A folder saved without it starts a present-frame model at zero; the reverse is an error.
    plain.save_pretrained(tmp_path / "plain")
    started = MALMM.from_pretrained(tmp_path / "plain", config=StreamConfig(memory_bank_length=3, present_frame=True))
    assert started.present_embedding.abs().sum() == 0
    with pytest.raises(ValueError, match="present_embedding"):
        MALMM.from_pretrained(tmp_path / "present", config=StreamConfig(memory_bank_length=3))
    # The marked newest frame is read: outputs differ from the same weights without it.
    ds = SyntheticQA(4, seed=2, size=32, sampling="uniform", frames=(4, 4))
    pixels, questions = pixels_of(plain, [ds[0]]), [ds[0].question]
    with torch.no_grad():
        assert not torch.allclose(plain.eval().clip_query_output(pixels, questions),
                                  present.eval().clip_query_output(pixels, questions))


def test_vision_pretraining_learns_its_frames_and_changes_only_the_encoder():
    from mixmalmm.model.synthetic import labelled_frames

    model = scratch_model(vocabulary(), TINY, StreamConfig(memory_bank_length=2), seed=2)  # vision frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frames, labels, maps = labelled_frames(6, seed=5, per_video=6, sizes=(32, 64))
    lines = []
    result = pretrain_vision(model, (frames, labels, maps), (frames, labels, maps), steps=250, batch_size=12,
                             lr=3e-3, warmup_steps=20, log=lines.append, log_every=50)
    assert result["all"] >= 0.95 and result["named"] >= 0.9 and result["patches"] >= 0.8, result  # 36 frames learnt
    assert len(lines) == 6 and lines[-1].startswith("vision validation")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision_model.") for k in changed)
    # The freeze flags are restored: the encoder frozen, ln_vision (post_layernorm) trainable, as in MA-LMM.
    assert all(p.requires_grad == n.startswith("post_layernorm.") for n, p in model.vision_model.named_parameters())
    result = pretrain_vision(model, (frames, labels, maps), (frames, labels), steps=2, log=lines.append)
    assert set(result) == {"all", "named", "steps", "seconds"}  # validation without maps: no patch score
    with pytest.raises(ValueError, match="one label row"):
        pretrain_vision(model, (frames, labels[:3]), None, steps=1)


def test_ln_vision_trains_while_the_vision_encoder_is_frozen():
    """MA-LMM freezes the EVA encoder only: ln_vision (post_layernorm) gets gradients and is trained."""
    model = tiny_model(2)
    model.config = StreamConfig(memory_bank_length=2)  # freeze_vision, freeze_llm: MA-LMM's
    model._freeze()
    model.train()
    sample = SyntheticQA(4, seed=4, size=32, frames=(4, 6))[0]
    loss = model.clip_loss(pixels_of(model, [sample]), [sample.question], [sample.answer])
    loss.backward()
    ln = model.vision_model.post_layernorm
    assert ln.weight.requires_grad and ln.bias.requires_grad
    assert ln.weight.grad is not None and ln.weight.grad.abs().sum() > 0 and ln.bias.grad.abs().sum() > 0
    encoder = [p for n, p in model.vision_model.named_parameters() if not n.startswith("post_layernorm.")]
    assert encoder and all(p.grad is None and not p.requires_grad for p in encoder)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}  # what Trainer optimises
    assert id(ln.weight) in trainable and id(ln.bias) in trainable


def test_token_normalised_parts_of_a_batch_add_up_to_its_loss_and_gradient():
    """What two processes compute: each half's summed token loss over the whole batch's answer tokens."""
    model = MALMM.tiny().eval()  # no dropout: the same forward each time
    torch.manual_seed(1)
    pixels = torch.randn(4, 2, 3, model.image_size, model.image_size)
    questions = ["what is the man doing?", "who is walking?", "is it dark?", "what colour is the ball?"]
    answers = ["walking", "the man in red", "no", "blue"]  # unequal lengths: a mean of halves' means would differ
    whole = model.clip_loss(pixels, questions, answers)
    whole.backward()
    expected = model.query_tokens.grad.clone()
    model.zero_grad()
    tokens = model.answer_tokens(answers)
    assert tokens == 1 + 1 + 4 + 1 + 1 + 1 + 1 + 1  # each answer's words and its end token
    parts = [model.clip_loss(pixels[s], questions[s], answers[s], normaliser=tokens) for s in (slice(0, 2), slice(2, 4))]
    for part in parts:
        part.backward()
    torch.testing.assert_close(sum(float(p.detach()) for p in parts), float(whole.detach()), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.query_tokens.grad, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        halves = [model.clip_loss(pixels[s], questions[s], answers[s]) for s in (slice(0, 2), slice(2, 4))]
    assert abs(float(sum(halves)) / 2 - float(whole.detach())) > 1e-3  # why the token count matters
