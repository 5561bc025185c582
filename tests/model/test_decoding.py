"""Answer decoding: the model's defaults (mixmalmm's, or MA-LMM's for InstructBLIP / MA-LMM weights),
overrides, and answers that are empty said to be so."""

import json

import pytest
import torch

from mixmalmm.model import MALMM, MALMM_DECODING, Decoding, StreamConfig, load_default_model

from .conftest import end_at_once, make_model, random_pixels


def stepped(model: MALMM, frames: int = 3):
    state = model.create_state("cam")
    pixels = random_pixels(frames)
    for t in range(frames):
        model.step_frame(state, pixels[t], float(t))
    return state


def test_malmm_decoding_is_its_qa_runs():
    # MA-LMM: blip2_vicuna_instruct.generate (min_length 1, repetition_penalty 1.5), predict_answers'
    # length_penalty 0, and its QA run settings (num_beams 5, max_len 10).
    assert Decoding(max_new_tokens=10, min_new_tokens=1, num_beams=5,
                                      repetition_penalty=1.5, length_penalty=0.0) == MALMM_DECODING
    assert Decoding() == Decoding(max_new_tokens=30, min_new_tokens=0, num_beams=1)


def test_an_llm_that_ends_at_once_gives_an_empty_answer_said_to_be_empty_and_malmm_decoding_never_does():
    model = make_model(2)
    word = model.tokenizer.convert_ids_to_tokens(10)
    word_id = end_at_once(model, word)
    state = stepped(model)
    eos = model.tokenizer.eos_token_id

    ours = model.answer(state, "what is it?")  # mixmalmm's decoding: greedy, min_new_tokens 0
    assert ours.token_ids == [eos] and ours.text == "" and ours.empty

    model.config.decoding = MALMM_DECODING
    malmm = model.answer(state, "what is it?")  # beam search, min_new_tokens 1: the end is not allowed first
    assert malmm.token_ids == [word_id, eos] and malmm.text == word and not malmm.empty
    greedy = model.answer(state, "what is it?", num_beams=1)  # a request's option over the model's
    assert greedy.token_ids == [word_id, eos]
    # A request's max_new_tokens below the model's min_new_tokens lowers the minimum with it.
    model.config.decoding = Decoding(max_new_tokens=8, min_new_tokens=4)
    assert len(model.answer(state, "what is it?", max_new_tokens=2).token_ids) == 2


def test_the_models_decoding_drives_generate_and_requests_override_it():
    model = make_model(2)
    state = stepped(model)
    model.config.decoding = Decoding(max_new_tokens=3, min_new_tokens=3, num_beams=2, repetition_penalty=1.3)
    answer = model.answer(state, "what is it?")
    assert len(answer.token_ids) == 3  # min = max = 3: exactly three tokens, none of them the end
    assert model.tokenizer.eos_token_id not in answer.token_ids
    assert len(model.answer(state, "what is it?", max_new_tokens=2).token_ids) == 2
    for bad, message in [(dict(num_beams=0), "num_beams"), (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=message):
            model.answer(state, "what is it?", **bad)
    with pytest.raises(ValueError, match="min_new_tokens"):
        Decoding(max_new_tokens=2, min_new_tokens=3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        Decoding(repetition_penalty=0)


def test_instructblip_folders_get_malmm_decoding_saved_folders_keep_theirs(tmp_path):
    model = MALMM.tiny(StreamConfig(memory_bank_length=2))
    assert model.decoding == Decoding()  # built in code: mixmalmm's own
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    for extra in ("malmm_config.json", "malmm.safetensors"):
        (plain / extra).unlink()  # now a plain InstructBLIP folder
    assert MALMM.from_pretrained(plain).decoding == MALMM_DECODING
    # The folder's generation config, where it sets a field of the same name, wins over MA-LMM's.
    gen = json.loads((plain / "generation_config.json").read_text())
    (plain / "generation_config.json").write_text(json.dumps({**gen, "num_beams": 3, "max_new_tokens": 7}))
    loaded = MALMM.from_pretrained(plain)
    assert loaded.decoding == Decoding(max_new_tokens=7, min_new_tokens=1, num_beams=3, repetition_penalty=1.5,
                                       length_penalty=0.0)
    # Saved with it, read back with it; a config given with its own decoding keeps that.
    loaded.save_pretrained(tmp_path / "again")
    assert MALMM.from_pretrained(tmp_path / "again").decoding == loaded.decoding
    mine = Decoding(max_new_tokens=5)
    assert MALMM.from_pretrained(plain, config=StreamConfig(decoding=mine)).decoding == mine
    (plain / "generation_config.json").write_text(json.dumps({**gen, "num_beams": 0}))
    with pytest.raises(ValueError, match="num_beams"):
        MALMM.from_pretrained(plain)


def test_the_default_model_keeps_the_decoding_it_was_trained_with():
    model = load_default_model()
    assert model.decoding == Decoding()


def test_a_lavis_checkpoint_on_a_saved_folder_gets_malmm_decoding(tmp_path):
    from mixmalmm.model import lavis_state_dict

    model = MALMM.tiny(StreamConfig(memory_bank_length=2))
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "malmm.pth"
    torch.save({"model": lavis_state_dict(model, vision=False, llm=False)}, path)
    assert MALMM.from_pretrained(tmp_path / "m").decoding == Decoding()
    assert MALMM.from_pretrained(tmp_path / "m", lavis_checkpoint=path).decoding == MALMM_DECODING
