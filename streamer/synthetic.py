"""Deterministic synthetic video: frames for demos and tests, and a small PyAV encoder for them.

The picture is a scene background (alternately dark and bright, switching every `scene_length`
frames, so scene cuts are real cuts for ActionShot) with a diagonal gradient and a white square
that moves a few pixels per frame (slow motion inside a scene).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np


def synthetic_rgb(index: int, width: int, height: int, scene_length: int = 50) -> np.ndarray:
    """Frame `index` of the synthetic video: [height, width, 3] uint8 RGB.

    Within a scene consecutive frames differ by a few grey levels on average; across a scene cut the
    mean absolute difference is about 150 and every part of the picture changes (an ActionShot cut).
    """
    if width < 8 or height < 8:
        raise ValueError(f"synthetic frames need at least 8x8 pixels, got {width}x{height}")
    scene = index // scene_length
    base = 30 if scene % 2 == 0 else 190
    ramp_x = (np.arange(width, dtype=np.uint16) * 40 // width).astype(np.uint8)  # [W], 0..39
    ramp_y = (np.arange(height, dtype=np.uint16) * 24 // height).astype(np.uint8)  # [H], 0..23
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = base + ramp_x[None, :] + (scene * 7) % 11
    img[..., 1] = base + ramp_y[:, None]
    img[..., 2] = base + (scene * 13) % 17
    side = max(2, min(width, height) // 6)
    x0 = (index * max(1, width // 80)) % (width - side)
    y0 = (height - side) // 2
    img[y0 : y0 + side, x0 : x0 + side] = 255
    return img


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int = 10,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
    container_format: str | None = None,
) -> int:
    """Encode [H, W, 3] uint8 RGB frames into a video file with PyAV; returns the frame count.

    `fps` is the frame rate (frames per second); `codec` any encoder PyAV has ("libx264",
    "mpeg4", ...); `options` the encoder's options (e.g. {"preset": "ultrafast"}); the container
    comes from the file name unless `container_format` names it. Pixels are stored as yuv420p, so
    H and W must be even.
    """
    count = 0
    with av.open(str(path), "w", format=container_format) as container:
        stream = None
        for rgb in frames:
            if stream is None:
                height, width = rgb.shape[:2]
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                if options:
                    stream.options = dict(options)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"no frames to write to '{path}'")
        for packet in stream.encode():
            container.mux(packet)
    return count
