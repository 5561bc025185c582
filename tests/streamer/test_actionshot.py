"""ActionShot: hand-computed cases, the wrap-around fix, online equals offline, pass-through, uniform."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixmalmm.streamer.actionshot import (
    ActionShot,
    PassThrough,
    max_frames_for,
    mean_abs_diff,
    offline_action_shots,
    uniform_indices,
    uniform_shots,
)
from mixmalmm.streamer.frames import Frame, Shot
from mixmalmm.streamer.sources import open_source


def flat(value: int, shape=(4, 6, 3)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def frames_of(values, fps: float = 10.0) -> list[Frame]:
    """Frames whose pixels all equal values[i] (or are the arrays given), pts i / fps."""
    out = []
    for i, v in enumerate(values):
        rgb = v if isinstance(v, np.ndarray) else flat(v)
        out.append(Frame(rgb, i / fps, i, 1000.0 + i))
    return out


def run(frames, **options) -> list[Shot]:
    return list(ActionShot(**options).feed(frames))


def summary(shots) -> list[tuple]:
    return [(int(s.image[0, 0, 0]), s.count, s.first_index, s.last_index) for s in shots]


def test_scene_cut_emits_the_composite_with_its_span():
    a, b, cut = frames_of([10, 21, 200])
    acc = ActionShot()
    assert acc.push(a) is None and acc.push(b) is None and acc.pending == 2
    shot = acc.push(cut)  # |200 - 16| = 184 > 127.5
    # cv2.addWeighted: 0.5*10 + 0.5*21 = 15.5, rounded to even -> 16
    np.testing.assert_array_equal(shot.image, flat(16))
    assert (shot.start, shot.end, shot.count) == (0.0, 0.1, 2)
    assert (shot.first_index, shot.last_index, shot.wall_time) == (0, 1, 1001.0)
    last = acc.flush()
    np.testing.assert_array_equal(last.image, flat(200))
    assert (last.start, last.end, last.count) == (0.2, 0.2, 1)
    assert acc.flush() is None


def test_slow_motion_blends_and_the_two_blends_differ():
    values = list(range(10))  # brightness rises by one level per frame
    # Exponential: c = rint_even((c + f) / 2): 0, 0, 1, 2, 3, 4, 5, 6, 7, 8; each difference is <= 2.
    assert summary(run(frames_of(values), threshold=3)) == [(8, 10, 0, 9)]
    # Mean: frame k against the mean of 0..k-1 differs by (k + 1) / 2; 3.5 > 3 at k = 6: a cut.
    # Means: 0..5 -> 2.5 -> 3 (half up); 6..9 -> 7.5 -> 8.
    assert summary(run(frames_of(values), threshold=3, blend="mean")) == [(3, 6, 0, 5), (8, 4, 6, 9)]


def test_frame_limit():
    shots = run(frames_of([50] * 7), max_frames=3)
    assert [s.count for s in shots] == [3, 3, 1]
    assert [(s.start, s.end) for s in shots] == [(0.0, 0.2), (0.3, 0.5), (0.6, 0.6)]
    assert max_frames_for(24, 5.0) == 120  # MixMA-LMM's default: 24 fps x 5 s
    assert max_frames_for(30, 2.0, step=3) == 20  # a composite spans at most 2 s of input
    assert ActionShot.for_rate(10, max_seconds=0.3).max_frames == 3


def test_difference_does_not_wrap_around():
    composite, frame = flat(20), flat(10)
    # MixMA-LMM subtracted uint8 arrays: 10 - 20 wraps to 246, a spurious "scene cut".
    assert np.abs(frame - composite).mean() == 246
    assert mean_abs_diff(frame, composite) == 10.0
    for blend in ("exponential", "mean"):
        assert summary(run(frames_of([20, 10]), blend=blend)) == [(15, 2, 0, 1)]


def test_step_samples_every_nth_frame():
    shots = run(frames_of([10, 250, 30, 250, 50, 250]), step=2)  # the 250s are never looked at
    assert summary(shots) == [(35, 3, 0, 4)]  # rint_even((rint_even(20) + 50) / 2) = 35
    assert (shots[0].start, shots[0].end) == (0.0, 0.4)


def test_a_size_change_starts_a_new_composite():
    frames = frames_of([flat(10), flat(10, (8, 6, 3)), flat(10, (8, 6, 3))])
    assert [s.image.shape for s in run(frames)] == [(4, 6, 3), (8, 6, 3)]


def test_online_keeps_no_reference_to_its_input():
    frame = frames_of([40])[0]
    acc = ActionShot(blend="exponential")
    acc.push(frame)
    frame.rgb[...] = 0  # a caller reusing its buffer
    assert acc.flush().image[0, 0, 0] == 40


@pytest.mark.parametrize("blend", ["exponential", "mean"])
@pytest.mark.parametrize(("threshold", "max_frames", "step"), [(127.5, 120, 1), (4.0, 5, 1), (8.0, 120, 3)])
def test_online_equals_offline_on_decoded_video(media, blend, threshold, max_frames, step):
    frames = list(open_source(media.h264))
    options = dict(threshold=threshold, max_frames=max_frames, step=step, blend=blend)
    online, offline = run(frames, **options), offline_action_shots(frames, **options)
    assert len(online) == len(offline) > 1
    for a, b in zip(online, offline, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.start, a.end, a.count, a.first_index, a.last_index) == (
            b.start, b.end, b.count, b.first_index, b.last_index,
        )  # fmt: skip
    assert sum(s.count for s in online) == len(frames[::step])
    if threshold == 127.5 and step == 1:  # the default finds exactly the video's scene cuts
        assert [s.first_index for s in online] == [0, 20, 40]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 255), min_size=1, max_size=40),
    noise_seed=st.integers(0, 2**16),
    threshold=st.floats(0, 200),
    max_frames=st.integers(1, 8),
    step=st.integers(1, 3),
    blend=st.sampled_from(["exponential", "mean"]),
)
def test_online_equals_offline_property(values, noise_seed, threshold, max_frames, step, blend):
    rng = np.random.default_rng(noise_seed)
    images = [np.clip(v + rng.integers(-40, 41, (3, 5, 3)), 0, 255).astype(np.uint8) for v in values]
    frames = frames_of(images)
    options = dict(threshold=threshold, max_frames=max_frames, step=step, blend=blend)
    online, offline = run(frames, **options), offline_action_shots(frames, **options)
    assert [(s.count, s.first_index, s.last_index) for s in online] == [
        (s.count, s.first_index, s.last_index) for s in offline
    ]
    for a, b in zip(online, offline, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    assert all(s.count <= max_frames for s in online)


def test_pass_through_and_uniform_sampling():
    frames = frames_of(list(range(0, 100, 10)))
    shots = list(PassThrough(step=3).feed(frames))
    assert [(s.first_index, s.count, s.start) for s in shots] == [(0, 1, 0.0), (3, 1, 0.3), (6, 1, 0.6), (9, 1, 0.9)]
    assert shots[1].image is frames[3].rgb

    assert uniform_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert uniform_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # fewer frames than asked: repeats
    assert uniform_indices(100, 3, start=50).tolist() == [50, 100, 149]
    assert [s.first_index for s in uniform_shots(frames, 4)] == [0, 3, 6, 9]


def test_bad_options():
    with pytest.raises(ValueError, match="blend must be one of"):
        ActionShot(blend="median")
    with pytest.raises(ValueError, match="step must be a positive integer"):
        ActionShot(step=0)
    with pytest.raises(ValueError, match="max_frames must be a positive integer"):
        ActionShot(max_frames=0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        ActionShot(threshold=float("nan"))
    with pytest.raises(ValueError, match="fps and max_seconds must be > 0"):
        max_frames_for(0)
