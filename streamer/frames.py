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
