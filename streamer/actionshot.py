"""ActionShot: blend similar consecutive frames into one composite image (MixMA-LMM), online.

Frames are sampled first: every `step`-th pushed frame, then at most `sample_fps` per second of the
stream's own time (`frames.FrameSampler`). A composite starts with one sampled frame; each later sampled
frame is blended in unless it starts a new composite, which it does when

- the picture changed at once (a scene cut): between this sampled frame and the previous one, at least
  `cut` of the picture changed (`changed_share`: both frames are averaged down to CUT_GRID blocks, and a
  block changed when its mean colour moved by more than CUT_LEVEL grey levels in some channel, also once
  a change of light over the whole picture is taken out); or
- the action ran too long: the composite already spans `max_seconds` of stream time (pts); or
- its size differs from the composite's (a reconnect at another resolution).

The cut rule is calibrated on real recordings (`benchmarks/actionshot_cuts.py`): a cut between two real
scenes changes 48-100 % of the blocks, while noise, pans, lighting changes and a person walking close past
the camera change at most 31 % between consecutive frames at 10 fps or more. The default `cut` of 0.45
finds every cut there with no false cut. It is meant for 10 sampled frames per second or more: at 1-2 fps
the motion between samples can pass it.

MixMA-LMM's own rules are kept for comparison and off by default: `threshold` cuts when the mean absolute
difference between the frame and the composite exceeds that many grey levels (exact here; MixMA-LMM's
code subtracts uint8 arrays, which wraps around, so its 127.5 only meant something with the wrap: an
exact difference reaches it only between very different pictures, never at a real trailer's cuts), and
`max_frames` bounds a composite by its count of sampled frames instead of seconds.

Blends:
- "exponential": MixMA-LMM's `composite = 0.5·composite + 0.5·frame` with cv2.addWeighted's uint8
  rounding and saturation (recent frames weigh most).
- "mean": a true long exposure, the mean of all frames in the composite (kept as an exact integer
  sum, rounded half up to uint8 when emitted).

The online accumulator keeps O(1) state (one composite or one sum, and the previous frame's blocks, per
stream) and gives the same Shots as `offline_action_shots`, which recomputes every composite from the
stored frames.

Also here for comparison: `PassThrough` (every sampled frame is a Shot) and MA-LMM's uniform
sampling of a clip (`uniform_indices`, `uniform_shots`). `mixmalmm.streamer.ingest.make_accumulator` picks
one of the two for a stream's protocol ActionShot settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import reduce

import cv2
import numpy as np

from mixmalmm.streamer.frames import Frame, FrameSampler, Shot

BLENDS = ("exponential", "mean")
DEFAULT_CUT = 0.45  # share of the picture that changed at once
DEFAULT_MAX_SECONDS = 5.0  # MixMA-LMM: 24 fps x 5 s = 120 frames
CUT_GRID = (32, 24)  # (columns, rows) of blocks the picture is averaged down to for the cut rule
CUT_LEVEL = 16  # grey levels (0..255) a block's mean colour must move by, in some channel, to count as changed
MAX_GAIN = 2.0  # the most a change of light is allowed to scale a channel by, for `changed_share`
MIXMALMM_THRESHOLD = 255 / 2  # MixMA-LMM's default `threshold`


def picture_blocks(rgb: np.ndarray) -> np.ndarray:
    """The picture averaged down to CUT_GRID blocks: [rows, columns, 3] float32 from [H, W, 3] uint8.

    A large frame is first thinned to every k-th pixel, keeping at least 8 per block each way (64 or more
    averaged per block, plenty against sensor noise): a 1080p frame costs a tenth of a full average.
    """
    columns, rows = CUT_GRID
    k = max(1, min(rgb.shape[0] // (8 * rows), rgb.shape[1] // (8 * columns)))
    if k > 1:
        rgb = rgb[::k, ::k]
    return cv2.resize(rgb, CUT_GRID, interpolation=cv2.INTER_AREA).astype(np.float32)


def _share(before: np.ndarray, after: np.ndarray) -> float:
    return float((np.abs(after - before).max(axis=2) > CUT_LEVEL).mean())


def changed_share(before: np.ndarray, after: np.ndarray) -> float:
    """Share (0..1) of the blocks whose mean colour moved by more than CUT_LEVEL in some channel.

    before, after: `picture_blocks` of two frames, [rows, columns, 3] float32. The smaller of two shares
    counts: as the frames are, and with `before`'s channels scaled to `after`'s mean colour (a gain of at
    most MAX_GAIN either way), so that light dimming or brightening the whole scene at once (a lamp, a
    cloud, a camera's exposure) is not a cut, while a new scene changes blocks either way.
    """
    raw = _share(before, after)
    if raw == 0.0:
        return raw
    gain = np.clip((after.mean(axis=(0, 1)) + 1.0) / (before.mean(axis=(0, 1)) + 1.0), 1 / MAX_GAIN, MAX_GAIN)
    return min(raw, _share(before * gain, after))


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


def _check(cut, max_seconds, step, sample_fps, blend, threshold, max_frames) -> None:
    """ValueError naming the first bad option (FrameSampler checks step and sample_fps)."""
    if cut is not None and not 0.0 < cut <= 1.0:  # also rejects NaN
        raise ValueError(f"cut must be a share of the picture in (0, 1], or None for no cut rule, got {cut}")
    if max_seconds is not None and not max_seconds > 0.0:
        raise ValueError(f"max_seconds must be > 0 seconds, or None for no limit, got {max_seconds}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 grey levels, or None, got {threshold}")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer, or None, got {max_frames!r}")
    FrameSampler(step, sample_fps)


class ActionShot:
    """The online ActionShot accumulator for one stream: `push(frame)` per frame, `flush()` at the end.

    Args:
        cut: start a new composite when at least this share (0..1] of the picture changed since the
            previous sampled frame (`changed_share`); None: never on content. Default 0.45.
        max_seconds: a composite spans less than this many seconds of stream time (pts); None: no
            limit. Default 5 s (MixMA-LMM's 120 frames at 24 fps).
        step: sample every `step`-th pushed frame (the others are ignored). Default 1.
        sample_fps: then sample at most this many frames per second of stream time; None: all.
        blend: "exponential" (MixMA-LMM's 0.5/0.5 cv2.addWeighted) or "mean" (true mean).
        threshold: MixMA-LMM's rule, off by default: also cut when the mean absolute difference
            between the frame and the composite exceeds this many grey levels (0..255).
        max_frames: MixMA-LMM's limit, off by default: at most this many sampled frames per composite.
    """

    def __init__(
        self,
        *,
        cut: float | None = DEFAULT_CUT,
        max_seconds: float | None = DEFAULT_MAX_SECONDS,
        step: int = 1,
        sample_fps: float | None = None,
        blend: str = "exponential",
        threshold: float | None = None,
        max_frames: int | None = None,
    ):
        _check(cut, max_seconds, step, sample_fps, blend, threshold, max_frames)
        self.cut = None if cut is None else float(cut)
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.threshold = None if threshold is None else float(threshold)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.blend = blend
        self._sampler = FrameSampler(step, sample_fps)
        self._blocks: np.ndarray | None = None  # the previous sampled frame's picture_blocks
        self.last_change = 0.0  # changed_share of the newest sampled frame (0 for the first)
        self._first: Frame | None = None
        self._last: Frame | None = None
        self._count = 0
        self._image: np.ndarray | None = None  # exponential: the uint8 composite [H, W, 3]
        self._total: np.ndarray | None = None  # mean: the int32 sum of the frames [H, W, 3]

    @property
    def pending(self) -> int:
        """Frames in the composite being built (not yet emitted)."""
        return self._count

    def push(self, frame: Frame) -> Shot | None:
        """Feed the next frame; returns the finished Shot when this frame starts a new composite."""
        if not self._sampler.keep(frame.pts):
            return None
        rgb = frame.rgb
        if self.cut is not None:
            blocks = picture_blocks(rgb)
            self.last_change = 0.0 if self._blocks is None else changed_share(self._blocks, blocks)
            self._blocks = blocks
        if self._count == 0:
            self._start(frame)
            return None
        if self._ends_before(frame):
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
        shot = self._emit() if self._count else None
        self._sampler.reset()
        self._blocks = None
        self.last_change = 0.0
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

    def _ends_before(self, frame: Frame) -> bool:
        """Whether `frame` starts a new composite instead of joining the current one."""
        rgb = frame.rgb
        if rgb.shape != (self._image if self._image is not None else self._total).shape:
            return True
        if self.cut is not None and self.last_change >= self.cut:
            return True
        if self.max_seconds is not None and frame.pts - self._first.pts >= self.max_seconds - 1e-9:
            return True
        if self.max_frames is not None and self._count >= self.max_frames:
            return True
        if self.threshold is None:
            return False
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
    cut: float | None = DEFAULT_CUT,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    step: int = 1,
    sample_fps: float | None = None,
    blend: str = "exponential",
    threshold: float | None = None,
    max_frames: int | None = None,
) -> list[Shot]:
    """ActionShot over a whole clip at once, recomputing each composite from its stored frames.

    The same rules as `ActionShot`, computed the direct way: the sampled frames are chosen first, the
    frames of the current group are kept, and before each decision the composite is rebuilt from them (a
    fold of cv2.addWeighted, or the mean of their stack) and the changed share is computed from the two
    frames themselves. O(group length) work per frame; the reference for the online accumulator, and
    usable on short clips.
    """
    _check(cut, max_seconds, step, sample_fps, blend, threshold, max_frames)
    sampler = FrameSampler(step, sample_fps)
    sampled = [f for f in frames if sampler.keep(f.pts)]
    groups: list[list[Frame]] = []
    for j, frame in enumerate(sampled):
        group = groups[-1] if groups else None
        if group is not None:
            new = frame.rgb.shape != group[0].rgb.shape
            if cut is not None and not new:
                new = changed_share(picture_blocks(sampled[j - 1].rgb), picture_blocks(frame.rgb)) >= cut
            if max_seconds is not None and not new:
                new = frame.pts - group[0].pts >= max_seconds - 1e-9
            if max_frames is not None and not new:
                new = len(group) >= max_frames
            if threshold is not None and not new:
                if blend == "exponential":
                    composite = reduce(_blend_exponential, (f.rgb for f in group[1:]), group[0].rgb)
                    new = mean_abs_diff(frame.rgb, composite) > threshold
                else:
                    total = np.stack([f.rgb for f in group]).astype(np.int32).sum(axis=0)
                    new = _mean_exceeds(frame.rgb, total, len(group), threshold)
            if not new:
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
    """No blending: every sampled frame becomes its own Shot (same interface as ActionShot).

    step, sample_fps: as for `ActionShot` (every `step`-th frame, then at most `sample_fps` per second).
    """

    def __init__(self, *, step: int = 1, sample_fps: float | None = None):
        self._sampler = FrameSampler(step, sample_fps)

    @property
    def pending(self) -> int:
        return 0

    def push(self, frame: Frame) -> Shot | None:
        return Shot.of_frame(frame) if self._sampler.keep(frame.pts) else None

    def flush(self) -> Shot | None:
        self._sampler.reset()
        return None

    def feed(self, frames: Iterable[Frame]) -> Iterator[Shot]:
        for frame in frames:
            shot = self.push(frame)
            if shot is not None:
                yield shot


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
