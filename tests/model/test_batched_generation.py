"""Many questions at once: batched Q-Former passes and one left-padded LLM `generate` give each question
the answer it gets alone (tiny random InstructBLIPs, real transformers modules)."""

from __future__ import annotations

import pytest
import torch

from mixmalmm.model import MALMM, StreamConfig
from mixmalmm.model.tiny import tiny_instructblip

from .conftest import make_model, random_pixels

STANDING = "what is the man doing?"
# Prompts of 3 to 10 words: left padding of several widths; two of equal length share a Q-Former pass.
QUESTIONS = [
    STANDING,
    "is there a dog?",
    "what colour is the car on the left?",
    "who is holding the red ball in the scene now?",
    "is there a cat?",
    "why?",
]


def stepped(model: MALMM, frames: int = 14):
    state = model.create_state("s")
    model.register_question(state, STANDING)
    pixels = random_pixels(frames, model.image_size, seed=3)
    for t in range(frames):  # past M: the banks have merged
        model.step([state], model.encode_frames(pixels[t : t + 1]), [t / 10])
    return state


@pytest.fixture(scope="module", params=["llama", "t5"])
def model(request):
    if request.param == "llama":
        return make_model(memory_bank_length=4)
    blip, processor = tiny_instructblip(seed=1, llm="t5")
    return MALMM(blip, processor, StreamConfig(memory_bank_length=4)).eval()


def test_questions_need_padding(model):
    widths = {len(model.tokenizer(model.prompt(q)).input_ids) for q in QUESTIONS}
    assert len(widths) >= 4  # rows of several lengths: the batch is left-padded


def test_batched_query_outputs_equal_one_at_a_time(model):
    state = stepped(model)
    together = model.query_outputs(state, QUESTIONS)
    for q, (output, mode) in zip(QUESTIONS, together, strict=True):
        alone, alone_mode = model.query_output(state, q)
        assert mode == alone_mode == ("standing" if q == STANDING else "adhoc")
        torch.testing.assert_close(output, alone, rtol=1e-5, atol=1e-6)
    memoryless = make_model(memory_bank_length=0)
    state = stepped(memoryless, frames=2)
    for q, (output, _) in zip(QUESTIONS, memoryless.query_outputs(state, QUESTIONS), strict=True):
        torch.testing.assert_close(output, memoryless.query_output(state, q)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_answers_equal_one_at_a_time(model, num_beams):
    state = stepped(model)
    outputs = [o for o, _ in model.query_outputs(state, QUESTIONS)]
    together = model.generate_answers(outputs, QUESTIONS, max_new_tokens=8, num_beams=num_beams)
    alone = [model.generate_answer(o, q, max_new_tokens=8, num_beams=num_beams) for o, q in zip(
        outputs, QUESTIONS, strict=True)]
    assert together == alone  # the same token ids, the same text
    assert len({tuple(t) for t, _ in alone}) > 1  # the questions get different answers
    if not model.is_encoder_decoder:  # rows that end early are cut after their end-of-sequence token
        assert all(t.count(model.tokenizer.eos_token_id) <= 1 for t, _ in together)


def test_beam_scores_differ_by_rounding_only(model):
    """Left padding changes the shapes the LLM computes with, so beam scores may move by rounding."""
    state = stepped(model)
    outputs = torch.cat([o for o, _ in model.query_outputs(state, QUESTIONS)])
    prompts = [model.prompt(q) for q in QUESTIONS]

    def scores(rows: torch.Tensor, texts: list[str]) -> torch.Tensor:
        embeds, mask = model.llm_inputs(rows, texts)
        out = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id, eos_token_id=model.tokenizer.eos_token_id,
            return_dict_in_generate=True, output_scores=True,
        )
        return out.sequences_scores

    together = scores(outputs, prompts)
    alone = torch.cat([scores(outputs[i : i + 1], prompts[i : i + 1]) for i in range(len(prompts))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_generate_tokens_checks_its_rows(model):
    state = stepped(model, frames=2)
    output, _ = model.query_output(state, STANDING)
    with pytest.raises(ValueError, match="one prompt answers one query output row"):
        model.generate_tokens(output.expand(2, -1, -1), model.prompt(STANDING), max_new_tokens=2)
    with pytest.raises(ValueError, match="one prompt per query output row: 1 rows, 2 prompts"):
        model.llm_inputs(output, ["a", "b"])


def test_candidates_are_the_beams_best_first(model):
    """generate_candidates: each question's n best beams, best first, as transformers ranks them for the
    question alone; the first is the default answer (MA-LMM's top-5 reads 5 of 5 beams)."""
    state = stepped(model)
    outputs = [o for o, _ in model.query_outputs(state, QUESTIONS)]
    found = model.generate_candidates(outputs, QUESTIONS, 3, max_new_tokens=8, num_beams=3)
    answers = model.generate_answers(outputs, QUESTIONS, max_new_tokens=8, num_beams=3)
    assert [len(c) for c in found] == [3] * len(QUESTIONS)
    assert [c[0] for c in found] == answers
    tok = model.tokenizer
    for b in (0, 3):
        embeds, mask = model.llm_inputs(outputs[b], [model.prompt(QUESTIONS[b])])
        out = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3,
            do_sample=False, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_scores=True,
            repetition_penalty=model.decoding.repetition_penalty, length_penalty=model.decoding.length_penalty,
        )
        scores = out.sequences_scores.tolist()
        assert scores == sorted(scores, reverse=True)  # best first
        texts = tok.batch_decode(out.sequences, skip_special_tokens=True)
        assert [t for _, t in found[b]] == [t.strip() for t in texts]
    assert len({t for _, t in found[0]}) > 1  # distinct beams, not one answer three times
    with pytest.raises(ValueError, match=r"num_return_sequences must be in 1\.\.num_beams \(2\), got 3"):
        model.generate_candidates(outputs[:1], QUESTIONS[:1], 3, max_new_tokens=4, num_beams=2)
