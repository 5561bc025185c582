"""The shipped default model: loads offline from package data, answers held-out videos above a floor,
gets the demo video right, and generates deterministically.

The model tests are skipped where the package holds no default model folder (model/assets/default/);
the loader's error for that case is tested always.
"""

from collections import Counter
from dataclasses import replace

import av
import numpy as np
import pytest
import torch

from mixmalmm.model import default as default_module
from mixmalmm.model import default_model_path, load_default_model
from mixmalmm.model.synthetic import (
    DEMO_STEP,
    QUESTION_TYPES,
    SyntheticQA,
    make_demo_video,
    vocabulary,
)
from mixmalmm.model.train import evaluate, frames_to_pixels, normalise_answer

# Held-out clips: video seeds far from any training seed (training uses seed * 1_000_003 + index, seed <= 11,
# plus 7919 per redraw of a video: below 10^8).
HELD_OUT_SEED = 777
HELD_OUT = 96
# Floors of the shipped model, exact match on HELD_OUT whole videos (every DEMO_STEP-th of 72 frames):
# measured 0.938 overall (90/96), 1.0 present (45/45), 0.882 memory (45/51; 0.451 without memory). Issue 7's
# targets were 0.8 overall, 0.85 present, 0.7 memory; the floors sit a few questions below what the model gets.
FLOOR_ALL = 0.88
FLOOR_PRESENT = 0.95
FLOOR_MEMORY = 0.8
MEMORY_GAIN = 0.35  # memory questions: with memory minus without (memory_bank_length 0); measured 0.43

shipped = pytest.mark.skipif(
    not (default_module.DEFAULT_MODEL_DIR / "config.json").is_file(),
    reason="no default model in model/assets/default/ (train one: see mixmalmm.model.train)",
)


def test_a_missing_default_model_gets_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(default_module, "DEFAULT_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="default model is missing from .*pass a model folder"):
        load_default_model()


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture(scope="module")
def held_out():
    return SyntheticQA(HELD_OUT, seed=HELD_OUT_SEED, size=128, full=True, sampling="stride", stride=DEMO_STEP)


@shipped
def test_default_model_is_package_data_within_the_size_budget(model):
    folder = default_model_path()
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert 0 < weights <= 25 * 2**20
    readme = (folder / "README.md").read_text()
    assert "python -m mixmalmm.model.train" in readme
    assert model.config.memory_bank_length > 0 and not model.training
    assert model.tokenizer.unk_token_id not in model.tokenizer(" ".join(vocabulary())).input_ids


def accuracy_by_memory(result) -> dict[str, float]:
    out = {}
    for label, memory in (("present", False), ("memory", True)):
        kinds = [k for k, q in QUESTION_TYPES.items() if q.memory == memory]
        correct = sum(result["groups"].get(k, (0, 0))[0] for k in kinds)
        asked = sum(result["groups"].get(k, (0, 0))[1] for k in kinds)
        out[label] = correct / asked
    return out


@shipped
def test_held_out_accuracy_stays_above_the_floor(model, held_out):
    kinds = {i: held_out[i].kind for i in range(len(held_out))}
    assert min(Counter(kinds.values()).values()) >= 10  # every question type is asked
    result = evaluate(model, held_out, batch_size=48, kinds=kinds.get)
    by_memory = accuracy_by_memory(result)
    assert result["accuracy"] >= FLOOR_ALL, result
    assert by_memory["present"] >= FLOOR_PRESENT, result
    assert by_memory["memory"] >= FLOOR_MEMORY, result
    # Without its memory banks the same weights fall back on the newest frame: memory questions suffer.
    blind = load_default_model(config=replace(model.config, memory_bank_length=0))
    blind_result = accuracy_by_memory(evaluate(blind, held_out, batch_size=48, kinds=kinds.get))
    assert by_memory["memory"] - blind_result["memory"] >= MEMORY_GAIN, (by_memory, blind_result)


def stream_demo(model, path, questions):
    """Decode the demo mp4, step every DEMO_STEP-th frame (as the engine's ActionShot settings say), and
    answer each question standing and ad hoc."""
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    state = model.create_state("demo")
    for q in questions:
        model.register_question(state, q)
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % DEMO_STEP == 0:
                rgb = frame.to_ndarray(format="rgb24")
                pixels = frames_to_pixels(rgb[None], model.image_size, mean, std)
                model.step([state], model.encode_frames(pixels), [float(frame.time)])
    return state


@shipped
def test_answers_on_the_demo_video_are_right(model, tmp_path):
    demo = make_demo_video(tmp_path / "demo.mp4")
    questions = [q for q, _, _ in demo.questions]
    state = stream_demo(model, demo.path, questions)
    assert state.frames == 64 // DEMO_STEP
    for question, answer, kind in demo.questions:
        got = model.answer(state, question)
        assert got.mode == "standing"
        assert normalise_answer(got.text) == answer, (kind, question, got.text)
        adhoc = model.answer(state, question, adhoc=True)
        assert normalise_answer(adhoc.text) == answer, ("ad hoc", kind, question, adhoc.text)


@shipped
def test_generation_is_deterministic(model, held_out):
    sample = held_out[0]
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    pixels = frames_to_pixels(sample.frames, model.image_size, mean, std)
    answers = []
    for _ in range(2):
        torch.manual_seed(int(np.random.default_rng().integers(0, 2**31)))  # no randomness is used
        state = model.create_state()
        model.register_question(state, sample.question)
        for t in range(len(pixels)):
            model.step([state], model.encode_frames(pixels[t : t + 1]), [t / 8])
        answers.append(model.answer(state, sample.question).token_ids)
        answers.append(model.answer(state, sample.question, num_beams=3).token_ids)
    assert answers[0] == answers[2] and answers[1] == answers[3]
