"""One frame with the zero frame position embedding is plain InstructBLIP: compare with transformers."""

import numpy as np
import pytest
import torch
from transformers import InstructBlipForConditionalGeneration

from mixmalmm.model import MALMM, StreamConfig
from mixmalmm.model.tiny import tiny_instructblip

QUESTION = "what is the man holding?"


def hf_llm_inputs(blip, inputs, llm) -> torch.Tensor:
    """The inputs_embeds transformers' InstructBLIP hands its language model, captured by a hook."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()

    handle = blip.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    extra = {}
    if llm == "t5":
        extra["decoder_input_ids"] = torch.tensor([[blip.language_model.config.decoder_start_token_id]])
    try:
        with torch.no_grad():
            blip(**inputs, **extra)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize(
    ("memory_bank_length", "num_beams", "llm"),
    [(0, 1, "llama"), (3, 1, "llama"), (0, 3, "llama"), (3, 3, "llama"), (3, 1, "t5"), (3, 3, "t5")],
)
def test_one_frame_equals_transformers_generate(memory_bank_length, num_beams, llm):
    blip, processor = tiny_instructblip(seed=1, llm=llm)
    model = MALMM(blip, processor, StreamConfig(memory_bank_length=memory_bank_length)).eval()
    assert torch.count_nonzero(model.frame_position.weight) == 0  # MA-LMM's zero initialisation
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    prompt = model.prompt(QUESTION)
    inputs = processor(images=image, text=prompt, return_tensors="pt")

    with torch.no_grad():
        ref = blip.generate(**inputs, max_new_tokens=8, num_beams=num_beams, do_sample=False)
    if llm == "t5":  # encoder-decoder: the output is the decoder's, after its start token
        assert ref[0, 0] == blip.language_model.config.decoder_start_token_id
        ref_new = ref[0, 1:].tolist()
    else:
        ref_new = ref[0, inputs["input_ids"].shape[1] :].tolist()
    # A real answer: words, not one special token (a random tiny T5 tends to repeat its first word).
    assert ref_new[0] not in processor.tokenizer.all_special_ids
    assert llm == "t5" or len(set(ref_new)) > 1
    ref_embeds = hf_llm_inputs(blip, inputs, llm)

    state = model.create_state("cam")
    model.register_question(state, QUESTION)
    model.step_frame(state, inputs["pixel_values"][0], 12.5)
    answer = model.answer(state, QUESTION, max_new_tokens=8, num_beams=num_beams)
    assert answer.mode == "standing"
    ours_embeds, _ = model.llm_inputs(state.standing[QUESTION].output, prompt)

    assert ours_embeds.shape == ref_embeds.shape
    torch.testing.assert_close(ours_embeds, ref_embeds, rtol=1e-5, atol=1e-5)
    assert answer.token_ids == ref_new
    assert answer.text == processor.tokenizer.decode(ref_new, skip_special_tokens=True).strip()
    assert answer.time_span == (12.5, 12.5)
    # With one frame there is nothing to remember: ad hoc and standing see the same thing.
    adhoc = model.answer(state, QUESTION, max_new_tokens=8, num_beams=num_beams, adhoc=True)
    assert adhoc.mode == "adhoc" and adhoc.token_ids == ref_new


def test_without_memory_each_step_is_instructblip_on_its_frame():
    """memory_bank_length 0: every step is InstructBLIP on the newest frame (plus its position row)."""
    blip, processor = tiny_instructblip(seed=2)
    model = MALMM(blip, processor, StreamConfig(memory_bank_length=0)).eval()
    state = model.create_state()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for t in range(4):
        model.step_frame(state, pixels[t], float(t))
    text = processor.qformer_tokenizer(state.default.text, return_tensors="pt")
    with torch.no_grad():
        ref = blip.get_image_features(
            pixels[3:], qformer_input_ids=text.input_ids, qformer_attention_mask=text.attention_mask
        ).qformer_outputs.last_hidden_state[:, : model.num_queries]
    torch.testing.assert_close(state.default.output, ref, rtol=1e-5, atol=1e-5)
    assert state.visual_bank is None and state.default.banks == []
    assert state.time_span() == (0.0, 3.0)


def test_a_clip_without_memory_gives_every_frames_queries_as_malmm():
    """memory_bank_length 0 with memoryless_clip="every_frame": MA-LMM's clip pass without banks — each
    frame is InstructBLIP's Q-Former on that frame alone, no frame position, and the LLM reads all T*Q."""
    from .conftest import make_model

    model = make_model(0, seed=4, memoryless_clip="every_frame")  # a non-zero position table: must not be added
    T, Q = 3, model.num_queries
    pixels = torch.randn(T, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompt = model.prompt(QUESTION)
    text = model.qformer_tokenizer([prompt] * T, return_tensors="pt")
    blip = InstructBlipForConditionalGeneration(model.blip_config).eval()
    blip.load_state_dict({k: v for k, v in model.state_dict().items() if k != "frame_position.weight"})
    with torch.no_grad():
        ref = blip.get_image_features(
            pixels, qformer_input_ids=text.input_ids, qformer_attention_mask=text.attention_mask
        ).qformer_outputs.last_hidden_state[:, :Q]  # [T, Q, C_q], every frame alone
        ours = model.clip_query_output(pixels[None], [QUESTION])
        adhoc = model.clip_query_output(pixels[None], [QUESTION], adhoc=True)
    assert ours.shape == (1, T * Q, model.qformer.hidden_size)
    torch.testing.assert_close(ours, ref.reshape(1, T * Q, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adhoc, ours)  # no banks: every frame reads the question either way
    embeds, _ = model.llm_inputs(ours, prompt)  # the LLM reads them all, then the prompt
    assert embeds.shape[1] == T * Q + len(model.tokenizer(prompt).input_ids)
    assert len(model.generate_answers(ours, [QUESTION], max_new_tokens=3)[0][0]) >= 1
    loss = model.clip_loss(pixels[None], [QUESTION], ["a"])
    assert torch.isfinite(loss)

    # The default ("newest") keeps the stream's behaviour: the last frame's queries, position added.
    newest = make_model(0, seed=4)
    state = newest.create_state()
    for t in range(T):
        newest.step_frame(state, pixels[t], float(t))
    with torch.no_grad():
        torch.testing.assert_close(newest.clip_query_output(pixels[None], [newest.config.default_question]),
                                   state.default.output, rtol=1e-5, atol=1e-5)
