"""Batched preprocessing against transformers' InstructBLIP image processor (built here, no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BlipImageProcessorPil
from transformers.image_utils import PILImageResampling

from mixmalmm.streamer.frames import Shot
from mixmalmm.streamer.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess, resize_uint8
from mixmalmm.streamer.synthetic import synthetic_rgb

ONE_STEP = 1 / (255 * min(OPENAI_CLIP_STD))  # one uint8 level after normalisation, about 0.0151


@pytest.fixture(scope="module")
def processor():
    # InstructBLIP's processor: BLIP's, at the checkpoints' 224 px (transformers' default is 384).
    p = BlipImageProcessorPil(size={"height": 224, "width": 224})
    assert p.resample == PILImageResampling.BICUBIC
    assert tuple(p.image_mean) == OPENAI_CLIP_MEAN and tuple(p.image_std) == OPENAI_CLIP_STD
    return p


def test_matches_the_instructblip_processor(processor):
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),  # noise, upscaled: bicubic overshoots
        synthetic_rgb(7, 640, 480),
        synthetic_rgb(30, 1280, 720),
        rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),  # noise, downscaled
        synthetic_rgb(3, 224, 224),  # already the right size: only normalised
        rng.integers(0, 256, (100, 90, 3), dtype=np.uint8),  # odd, non-4:3 size
        synthetic_rgb(12, 640, 480),  # a second image of a size already seen: batched with it
    ]
    ours = preprocess([Shot(im, 0.0, 0.0, 1, 0, 0, 0.0) for im in images[:3]] + images[3:])
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    for i, image in enumerate(images):
        reference = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        diff = (ours[i] - reference).abs()
        # At most one uint8 step (PIL computes in fixed point), at a tiny fraction of the values.
        assert diff.max() <= ONE_STEP + 1e-5, (i, image.shape, float(diff.max()))
        assert (diff > 1e-4).float().mean() < 2e-3, (i, image.shape)
    assert (ours[4] - processor(images=[images[4]], return_tensors="pt")["pixel_values"][0]).abs().max() < 1e-5


def test_sizes_dtypes_and_statistics():
    image = synthetic_rgb(0, 320, 240)
    out = preprocess([image, image], image_size=(64, 96), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 64, 96)
    torch.testing.assert_close(out[0], out[1])
    # (x / 255 - 0.5) / 0.5 maps 0..255 onto -1..1; the white square (255) stays exactly 1.
    assert out.min() >= -1 and float(out.max()) == pytest.approx(1.0)
    half = preprocess([image], image_size=64, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (1, 3, 64, 64)
    flat = np.full((10, 10, 3), 255, dtype=np.uint8)
    np.testing.assert_allclose(
        preprocess([flat], 16)[0, :, 0, 0].numpy(), (1 - np.array(OPENAI_CLIP_MEAN)) / OPENAI_CLIP_STD, rtol=1e-5
    )
    resized = resize_uint8(torch.from_numpy(image).permute(2, 0, 1)[None], 112)
    assert resized.shape == (1, 3, 112, 112) and torch.equal(resized, resized.round())


def test_bad_input():
    with pytest.raises(ValueError, match="at least one image"):
        preprocess([])
    with pytest.raises(ValueError, match=r"expected an \[H, W, 3\] uint8 RGB image, got shape \(8, 8, 3\) of float32"):
        preprocess([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match=r"got shape \(8, 8\)"):
        preprocess([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        preprocess([np.zeros((8, 8, 3), np.uint8)], std=(0.0, 1.0, 1.0))
