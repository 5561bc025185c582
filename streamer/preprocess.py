"""Shots to the vision encoder's input: resize and normalise, batched in torch.

Matches transformers' InstructBLIP image processor (`BlipImageProcessor`, PIL backend, which follows
LAVIS): bicubic resize of the uint8 image to image_size x image_size with PIL's antialiasing filter,
rounding back to uint8, then x / 255 and (x - mean) / std per channel. torch's antialiased bicubic
(`F.interpolate(..., mode="bicubic", antialias=True)`) uses the same filter as PIL (a = -0.5,
support scaled by the reduction factor); run as PIL runs it (horizontal pass, uint8 rounding and
clipping, vertical pass) the results agree to one uint8 step at a few pixels (PIL computes in fixed
point).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mixmalmm.streamer.frames import Shot

# OpenAI CLIP's statistics, InstructBLIP's defaults (RGB, for pixel values in [0, 1]).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_image(item: Shot | np.ndarray) -> np.ndarray:
    image = item.image if isinstance(item, Shot) else item
    if not (
        isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    ):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got shape {shape} of {dtype}")
    return image


def _bicubic_pass(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One antialiased bicubic pass in float32 ([B, 3, H, W] -> [B, 3, *size]), back to uint8 values."""
    out = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def resize_uint8(images: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of [B, 3, H, W] images holding uint8 values (any dtype) to
    [B, 3, h, w] (PIL's algorithm).

    `image_size` is an int (square) or (height, width) in pixels. Like PIL: the horizontal pass
    first, rounded and clamped to 0..255 (bicubic overshoots), then the vertical pass, rounded and
    clamped. Returns float32 holding integer values 0..255.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    height, width = images.shape[-2:]
    out = images.float()
    if width != size[1]:
        out = _bicubic_pass(out, (height, size[1]))
    if height != size[0]:
        out = _bicubic_pass(out, size)
    return out


def preprocess(
    shots: Sequence[Shot | np.ndarray],
    image_size: int | tuple[int, int] = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Shots (or [H, W, 3] uint8 RGB images) to pixel values [B, 3, h, w] of `dtype` on `device`.

    `image_size` is the encoder's input size in pixels (int: square; or (height, width)); `mean`
    and `std` are per RGB channel for values in [0, 1]. Images of the same size are resized as one
    batch; images may differ in size. The arithmetic runs on `device` (upload as uint8: 4x fewer
    bytes than float).
    """
    if len(shots) == 0:
        raise ValueError("preprocess needs at least one image")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean}, std={std}")
    images = [_as_image(s) for s in shots]
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    # (x / 255 - mean) / std as one multiply-add: x * (1 / (255 std)) + (-mean / std).
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale, bias = 1.0 / (255.0 * std_t), -mean_t / std_t
    results = []
    for indices in groups.values():
        batch = torch.from_numpy(np.stack([images[i] for i in indices])).to(device)  # [b, H, W, 3] uint8
        # Channels first while still uint8 (a 1-byte copy), so every float op after runs on
        # contiguous memory: float ops on the permuted view take slow strided paths on CPU.
        pixels = batch.permute(0, 3, 1, 2).contiguous()  # [b, 3, H, W] uint8
        resized = resize_uint8(pixels, size)
        results.append((indices, torch.addcmul(bias, resized, scale).to(dtype)))
    if len(results) == 1:
        return results[0][1].contiguous()
    out = torch.empty((len(images), 3, *size), dtype=dtype, device=device)
    for indices, values in results:
        out[indices] = values
    return out
