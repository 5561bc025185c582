"""The contact sheet's numbers in process: "held by memory" against a real memory bank (derived here from
the entries' time spans instead of their merge counts), and the thumbnail sampler over a long video.
(The sheet as replay and demo draw it: test_replay_demo.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmalmm.kernels import StreamingMemoryBank
from mixmalmm.model import QuestionState, StreamState
from mixmalmm.streamer.contact_sheet import THUMB_WIDTH, ThumbnailSampler, memory_cover, thumbnail_height


def test_memory_cover_matches_the_banks_time_spans():
    """held / mean_merge from merge counts agree with the entries' time spans (Shot i stored at time i)."""
    gen = torch.Generator().manual_seed(0)
    bank = StreamingMemoryBank(4, 1, 6, 8)
    shots = 23
    for i in range(shots):
        bank.append(torch.randn(1, 6, 8, generator=gen), float(i))
    state = StreamState("s", 4, bank, QuestionState("q", torch.zeros(1, 1, dtype=torch.long), []), frames=shots)
    cover = memory_cover(state, shots)
    first, last = (t[0].numpy() for t in bank.spans())  # [T, N] seconds = Shot indices
    held = np.zeros(shots)
    merge = np.zeros(shots)
    for n in range(first.shape[1]):
        for a, b in zip(first[:, n], last[:, n], strict=True):
            held[int(a)] += a == b
            merge[int(a) : int(b) + 1] += b - a + 1
    assert cover.entries == 5 and cover.columns == 6
    np.testing.assert_allclose(cover.held, held / 6)
    np.testing.assert_allclose(cover.mean_merge, merge / 6)
    assert cover.held.sum() < shots - 5  # merges happened
    with pytest.raises(ValueError, match="not 22"):
        memory_cover(state, 22)


def test_thumbnails_stay_bounded_and_even_over_a_long_video():
    """An hour at 10 Shots/s: at most 2·limit thumbnails kept at any time, `limit` shown, evenly spread."""
    sampler = ThumbnailSampler(limit=48)
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    most = 0
    for i in range(36_000):
        sampler.offer(i, image)
        most = max(most, len(sampler.images))
    chosen = sampler.chosen()
    assert most <= 96 and len(chosen) == 48 and chosen == sorted(chosen)
    assert chosen[0] == 0 and chosen[-1] >= 36_000 - sampler.stride
    gaps = np.diff(chosen)
    assert gaps.max() <= 2 * gaps.min()  # even: every gap one or two strides
    assert sampler.images[0].shape == (thumbnail_height(160, 120), THUMB_WIDTH, 3)
