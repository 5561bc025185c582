"""ActionShot: blend similar consecutive frames into one composite image (MixMA-LMM), online.

The rule (shared/DESIGN.md §5): take every `step`-th frame. A composite starts with one frame. For
each later sampled frame, if the composite already holds `max_frames` frames, or the mean absolute
difference between the frame and the composite exceeds `threshold` (grey levels, 0..255, averaged
over all pixels and channels), the composite is emitted as a `Shot` and a new one starts with this
frame; otherwise the frame is blended in.

Blends:
- "exponential": MixMA-LMM's `composite = 0.5·composite + 0.5·frame` with cv2.addWeighted's uint8
  rounding and saturation (recent frames weigh most).
- "mean": a true long exposure, the mean of all frames in the composite (kept as an exact integer
  sum, rounded half up to uint8 when emitted).

Unlike MixMA-LMM's code (which subtracts uint8 arrays, so 10 - 20 wraps to 246), the difference is
exact. The online accumulator keeps O(1) state (one composite, or one sum, per stream) and gives the
same Shots as `offline_action_shots`, which recomputes every composite from the stored frames.

Also here for comparison: `PassThrough` (every sampled frame is a Shot) and MA-LMM's uniform
sampling of a clip (`uniform_indices`, `uniform_shots`). `make_accumulator` picks one of the two for a
stream's protocol ActionShot settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import reduce

import cv2
import numpy as np

from mixmalmm.streamer.frames import Frame, Shot

BLENDS = ("exponential", "mean")
DEFAULT_THRESHOLD = 255 / 2  # MixMA-LMM's default
DEFAULT_MAX_SECONDS = 5.0  # MixMA-LMM: 24 fps x 5 s = 120 frames


def max_frames_for(fps: float, max_seconds: float = DEFAULT_MAX_SECONDS, step: int = 1) -> int:
    """How many sampled frames a composite may hold so that it spans at most `max_seconds`.

    `fps` is the rate of the frames pushed (frames per second) and every `step`-th of them is
    sampled: round(max_seconds * fps / step), at least 1. (24 fps, 5 s, step 1) -> 120.
    """
    if not fps > 0 or not max_seconds > 0:
        raise ValueError(f"fps and max_seconds must be > 0, got fps={fps}, max_seconds={max_seconds}")
    return max(1, round(max_seconds * fps / step))


def mean_abs_diff(frame: np.ndarray, composite: np.ndarray) -> float:
    """Mean of |frame - composite| over all pixels and channels, grey levels; both [H, W, 3] uint8.

    Exact (no uint8 wrap-around): cv2's L1 norm sums |a - b| in wide integers.
    """
    return cv2.norm(frame, composite, cv2.NORM_L1) / frame.size


def _blend_exponential(composite: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """0.5·composite + 0.5·frame as cv2.addWeighted computes it for uint8 ([H, W, 3])."""
    return cv2.addWeighted(composite, 0.5, frame, 0.5, 0.0)


def _mean_exceeds(frame: np.ndarray, total: np.ndarray, count: int, threshold: float) -> bool:
    """Whether mean |frame - total / count| > threshold, decided in exact integers.

    total: [H, W, 3] int32 sum of `count` uint8 frames. mean |f - S/n| = sum |n·f - S| / (n·size).
    """
    scaled_l1 = int(np.abs(frame.astype(np.int32) * count - total).sum(dtype=np.int64))
    return scaled_l1 > threshold * count * frame.size


def _mean_image(total: np.ndarray, count: int) -> np.ndarray:
    """round(total / count) half up, as [H, W, 3] uint8 (exact integer arithmetic)."""
    return ((2 * total + count) // (2 * count)).astype(np.uint8)


class ActionShot:
    """The online ActionShot accumulator for one stream: `push(frame)` per frame, `flush()` at the end.

    Args:
        threshold: cut when the mean absolute difference between a sampled frame and the
            composite exceeds this many grey levels (0..255). Default 127.5.
        max_frames: the most sampled frames one composite holds (MixMA-LMM: 120). Use
            `ActionShot.for_rate` to give it in seconds instead.
        step: sample every `step`-th pushed frame (the others are ignored). Default 1.
        blend: "exponential" (MixMA-LMM's 0.5/0.5 cv2.addWeighted) or "mean" (true mean).

    A frame whose size differs from the composite's (a reconnect at another resolution) always
    starts a new composite.
    """

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        max_frames: int = 120,
        step: int = 1,
        blend: str = "exponential",
    ):
        if not threshold >= 0:  # also rejects NaN
            raise ValueError(f"threshold must be >= 0 grey levels, got {threshold}")
        if int(max_frames) != max_frames or max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
        if int(step) != step or step < 1:
            raise ValueError(f"step must be a positive integer, got {step!r}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.threshold = float(threshold)
        self.max_frames = int(max_frames)
        self.step = int(step)
        self.blend = blend
        self._pushed = 0
        self._first: Frame | None = None
        self._last: Frame | None = None
        self._count = 0
        self._image: np.ndarray | None = None  # exponential: the uint8 composite [H, W, 3]
        self._total: np.ndarray | None = None  # mean: the int32 sum of the frames [H, W, 3]

    @classmethod
    def for_rate(
        cls,
        fps: float,
        *,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        threshold: float = DEFAULT_THRESHOLD,
        step: int = 1,
        blend: str = "exponential",
    ) -> ActionShot:
        """An accumulator whose composites span at most `max_seconds` of a `fps` frames/s input."""
        return cls(
            threshold=threshold, max_frames=max_frames_for(fps, max_seconds, step), step=step, blend=blend
        )

    @property
    def pending(self) -> int:
        """Frames in the composite being built (not yet emitted)."""
        return self._count

    def push(self, frame: Frame) -> Shot | None:
        """Feed the next frame; returns the finished Shot when this frame starts a new composite."""
        sampled = self._pushed % self.step == 0
        self._pushed += 1
        if not sampled:
            return None
        rgb = frame.rgb
        if self._count == 0:
            self._start(frame)
            return None
        if self._count >= self.max_frames or rgb.shape != self._shape() or self._differs(rgb):
            shot = self._emit()
            self._start(frame)
            return shot
        if self.blend == "exponential":
            self._image = _blend_exponential(self._image, rgb)
        else:
            self._total += rgb
        self._count += 1
        self._last = frame
        return None

    def flush(self) -> Shot | None:
        """The composite being built, if any (end of stream); the accumulator starts afresh."""
        if self._count == 0:
            return None
        shot = self._emit()
        self._pushed = 0
        return shot

    def feed(self, frames: Iterable[Frame]) -> Iterator[Shot]:
        """All Shots of `frames`, the last composite flushed at the end."""
        for frame in frames:
            shot = self.push(frame)
            if shot is not None:
                yield shot
        shot = self.flush()
        if shot is not None:
            yield shot

    # ---------------------------------------------------------------------------------------------

    def _shape(self) -> tuple[int, ...]:
        return (self._image if self._image is not None else self._total).shape

    def _differs(self, rgb: np.ndarray) -> bool:
        if self.blend == "exponential":
            return mean_abs_diff(rgb, self._image) > self.threshold
        return _mean_exceeds(rgb, self._total, self._count, self.threshold)

    def _start(self, frame: Frame) -> None:
        if self.blend == "exponential":
            self._image, self._total = frame.rgb.copy(), None
        else:
            self._image, self._total = None, frame.rgb.astype(np.int32)
        self._first = self._last = frame
        self._count = 1

    def _emit(self) -> Shot:
        image = self._image if self.blend == "exponential" else _mean_image(self._total, self._count)
        first, last = self._first, self._last
        shot = Shot(image, first.pts, last.pts, self._count, first.index, last.index, last.wall_time)
        self._image = self._total = None
        self._first = self._last = None
        self._count = 0
        return shot


def offline_action_shots(
    frames: Sequence[Frame],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    max_frames: int = 120,
    step: int = 1,
    blend: str = "exponential",
) -> list[Shot]:
    """ActionShot over a whole clip at once, recomputing each composite from its stored frames.

    The same rule as `ActionShot`, computed the direct way: the frames of the current group are
    kept, and before each decision the composite is rebuilt from them (a fold of cv2.addWeighted,
    or the mean of their stack). O(group length) work per frame; the reference for the online
    accumulator, and usable on short clips.
    """
    ActionShot(threshold=threshold, max_frames=max_frames, step=step, blend=blend)  # validates the options
    groups: list[list[Frame]] = []
    for frame in list(frames)[::step]:
        group = groups[-1] if groups else None
        if group is not None and len(group) < max_frames and frame.rgb.shape == group[0].rgb.shape:
            if blend == "exponential":
                composite = reduce(_blend_exponential, (f.rgb for f in group[1:]), group[0].rgb)
                cut = mean_abs_diff(frame.rgb, composite) > threshold
            else:
                total = np.stack([f.rgb for f in group]).astype(np.int32).sum(axis=0)
                cut = _mean_exceeds(frame.rgb, total, len(group), threshold)
            if not cut:
                group.append(frame)
                continue
        groups.append([frame])

    shots = []
    for group in groups:
        if blend == "exponential":
            image = reduce(_blend_exponential, (f.rgb for f in group[1:]), group[0].rgb.copy())
        else:
            image = _mean_image(np.stack([f.rgb for f in group]).astype(np.int32).sum(axis=0), len(group))
        first, last = group[0], group[-1]
        shots.append(Shot(image, first.pts, last.pts, len(group), first.index, last.index, last.wall_time))
    return shots


class PassThrough:
    """No blending: every `step`-th pushed frame becomes its own Shot (same interface as ActionShot)."""

    def __init__(self, *, step: int = 1):
        if int(step) != step or step < 1:
            raise ValueError(f"step must be a positive integer, got {step!r}")
        self.step = int(step)
        self._pushed = 0

    @property
    def pending(self) -> int:
        return 0

    def push(self, frame: Frame) -> Shot | None:
        sampled = self._pushed % self.step == 0
        self._pushed += 1
        return Shot.of_frame(frame) if sampled else None

    def flush(self) -> Shot | None:
        self._pushed = 0
        return None

    def feed(self, frames: Iterable[Frame]) -> Iterator[Shot]:
        for frame in frames:
            shot = self.push(frame)
            if shot is not None:
                yield shot


def make_accumulator(settings) -> ActionShot | PassThrough:
    """A fresh Shot maker for protocol `ActionShotSettings` (`enabled`, `step`, `threshold`,
    `max_frames`, `blend`): an `ActionShot`, or a `PassThrough` when blending is off."""
    if settings.enabled:
        return ActionShot(threshold=settings.threshold, max_frames=settings.max_frames, step=settings.step,
                          blend=settings.blend)
    return PassThrough(step=settings.step)


def uniform_indices(num_frames: int, count: int, start: int = 0) -> np.ndarray:
    """MA-LMM's uniform sampling: `count` indices spread evenly over frames [start, start+num_frames).

    np.rint(np.linspace(start, start + num_frames - 1, count)) as int64 [count]; with fewer frames
    than `count` some indices repeat (as in MA-LMM).
    """
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames} and {count}")
    return np.rint(np.linspace(start, start + num_frames - 1, count)).astype(np.int64)


def uniform_shots(frames: Sequence[Frame], count: int) -> list[Shot]:
    """`count` single-frame Shots sampled uniformly from a finite clip (see `uniform_indices`)."""
    return [Shot.of_frame(frames[i]) for i in uniform_indices(len(frames), count)]
