"""Shared pieces of the model tests: tiny random InstructBLIPs, built in code (no download)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mixmalmm.model import MALMM, StreamConfig  # noqa: E402
from mixmalmm.model.tiny import tiny_instructblip  # noqa: E402


def make_model(memory_bank_length: int, seed: int = 0, **config) -> MALMM:
    """A tiny MA-LMM with a random, non-zero frame position table (so positions matter)."""
    blip, processor = tiny_instructblip(seed=seed)
    model = MALMM(blip, processor, StreamConfig(memory_bank_length=memory_bank_length, **config)).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.frame_position.weight.copy_(torch.randn(model.frame_position.weight.shape, generator=gen) * 0.5)
    return model


def random_pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n normalised frames [n, 3, size, size]."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _few_threads():
    # Other agents share this machine's two cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def end_at_once(model: MALMM, word: str) -> int:
    """Give the tiny LLM weights under which the end-of-sequence token has the highest logit at every
    position and `word` the next highest, whatever the input; returns `word`'s token id.

    Attention and MLP outputs are zeroed, so each position's residual stream is its input embedding;
    every token embedding has 1 in channel 0 and the final norm keeps channel 0 only, so the LM head
    sees a positive number there and nothing else (the text after the query tokens always ends in a
    token, so the last position is one).
    """
    lm = model.language_model
    tok = model.tokenizer
    word_id = tok.convert_tokens_to_ids(word)
    assert word_id not in (tok.unk_token_id, tok.eos_token_id) and not lm.config.tie_word_embeddings
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.model.embed_tokens.weight[:, 0] = 1.0
        lm.model.norm.weight.zero_()
        lm.model.norm.weight[0] = 1.0
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[tok.eos_token_id, 0] = 2.0
        lm.lm_head.weight[word_id, 0] = 1.0
    return word_id
