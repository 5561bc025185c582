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
