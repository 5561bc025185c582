"""The two records that flow through ingestion: a decoded Frame and an ActionShot Shot."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame.

    Attributes:
        rgb: [H, W, 3] uint8 RGB pixels. Treat as read-only: accumulators keep references.
        pts: presentation time in seconds on the source's timeline; strictly increasing per source,
            across reconnects too (a live source continues its clock after a gap).
        index: 0-based position among the frames the source produced (after its stride / target
            rate selection); a gap seen downstream means frames were dropped on the way.
        wall_time: `time.time()` when the frame was decoded, in seconds since the epoch.
    """

    rgb: np.ndarray
    pts: float
    index: int
    wall_time: float


@dataclass(frozen=True, slots=True)
class Shot:
    """One image for the vision encoder: a composite of one or more consecutive sampled frames.

    Attributes:
        image: [H, W, 3] uint8 RGB composite.
        start: pts of the first frame blended in, seconds.
        end: pts of the last frame blended in, seconds (equal to `start` for a single frame).
        count: number of frames blended in (>= 1).
        first_index: `Frame.index` of the first frame.
        last_index: `Frame.index` of the last frame.
        wall_time: `Frame.wall_time` of the last frame (for end-to-end latency).
    """

    image: np.ndarray
    start: float
    end: float
    count: int
    first_index: int
    last_index: int
    wall_time: float

    @classmethod
    def of_frame(cls, frame: Frame) -> Shot:
        """A Shot holding exactly one frame."""
        return cls(frame.rgb, frame.pts, frame.pts, 1, frame.index, frame.index, frame.wall_time)


class FrameSampler:
    """Which frames of a stream are sampled: every `step`-th frame, then at most `fps` per second of pts.

    `keep(pts)` is called once per frame, in order. With `fps`, frames are kept on the grid
    first_pts + k / fps (the first frame at or after each tick); a stream that jumps ahead by more than
    a period starts a new grid at the jump, so a gap never releases a burst of frames. (8 fps input,
    fps 1) keeps frames 0, 8, 16, ...; (30 fps, fps 10) keeps every third frame.
    """

    def __init__(self, step: int = 1, fps: float | None = None):
        if int(step) != step or step < 1:
            raise ValueError(f"the sampling step (stride: every N-th frame) must be a positive integer, got {step!r}")
        if fps is not None and not fps > 0:  # also rejects NaN
            raise ValueError(f"the sample rate must be > 0 frames per second, got {fps!r}")
        self.step = int(step)
        self.fps = None if fps is None else float(fps)
        self._seen = 0
        self._next: float | None = None

    def keep(self, pts: float) -> bool:
        self._seen += 1
        if (self._seen - 1) % self.step:
            return False
        if self.fps is None:
            return True
        period = 1.0 / self.fps
        if self._next is not None and pts < self._next - 1e-3 * period:
            return False
        # Stay on the grid start + k*period unless the stream jumped ahead by more than a period.
        base = self._next if self._next is not None and pts < self._next + period else pts
        self._next = base + period
        return True

    def reset(self) -> None:
        """Start afresh: the next frame is sampled."""
        self._seen = 0
        self._next = None
