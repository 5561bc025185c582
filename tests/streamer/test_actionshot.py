"""ActionShot: hand-computed cases, the cut rule's units, the wrap-around fix, online equals offline,
sampling by time, pass-through, uniform."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixmalmm.streamer.actionshot import (
    CUT_GRID,
    CUT_LEVEL,
    ActionShot,
    PassThrough,
    changed_share,
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
    shot = acc.push(cut)  # every block moved by 179 levels > CUT_LEVEL: the whole picture changed
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
    assert summary(run(frames_of(values), threshold=3)) == [(8, 10, 0, 9)]  # (MixMA-LMM's rule, made exact)
    # Mean: frame k against the mean of 0..k-1 differs by (k + 1) / 2; 3.5 > 3 at k = 6: a cut.
    # Means: 0..5 -> 2.5 -> 3 (half up); 6..9 -> 7.5 -> 8.
    assert summary(run(frames_of(values), threshold=3, blend="mean")) == [(3, 6, 0, 5), (8, 4, 6, 9)]


def test_frame_and_time_limits():
    shots = run(frames_of([50] * 7), max_frames=3)
    assert [s.count for s in shots] == [3, 3, 1]
    assert [(s.start, s.end) for s in shots] == [(0.0, 0.2), (0.3, 0.5), (0.6, 0.6)]
    # Seconds of stream time, whatever the rate: a composite spans less than max_seconds.
    assert [s.count for s in run(frames_of([50] * 7), max_seconds=0.3)] == [3, 3, 1]
    assert [s.count for s in run(frames_of([50] * 13, fps=20.0), max_seconds=0.3)] == [6, 6, 1]
    assert [s.count for s in run(frames_of([50] * 240, fps=24.0))] == [120, 120]  # MixMA-LMM's 5 s at 24 fps


def test_the_cut_rule_counts_the_share_of_the_picture_that_changed():
    w, h = CUT_GRID
    before = np.full((h, w, 3), 100, np.float32)
    after = before.copy()
    after[: h // 2, :, 0] += 60  # the top half turns redder: half the picture changed
    assert changed_share(before, after) == 0.5
    after = before.copy()
    after[: h // 2] += CUT_LEVEL  # exactly CUT_LEVEL: unchanged
    assert changed_share(before, after) == 0.0
    # Light over the whole scene: 40 % darker and warmer at once changes every block, but taking the
    # change of light out (a gain per channel, at most MAX_GAIN) leaves none: no cut.
    scene = np.random.default_rng(0).uniform(40, 220, (h, w, 3)).astype(np.float32)
    assert changed_share(scene, scene * np.float32([0.65, 0.6, 0.5])) == 0.0
    assert changed_share(scene, scene[::-1]) > 0.45  # the same colours rearranged: a new picture
    # Through the accumulator: 40 % of the picture repainted is no cut at the default 0.45, 50 % is.
    base = np.full((48, 64, 3), 90, np.uint8)
    part = base.copy()
    part[: int(0.4 * 48)] = 200
    half = base.copy()
    half[:24] = 200
    assert [s.count for s in run(frames_of([base, part]))] == [2]
    assert [s.count for s in run(frames_of([base, half]))] == [1, 1]
    assert [s.count for s in run(frames_of([base, part]), cut=0.3)] == [1, 1]
    assert [s.count for s in run(frames_of([base, half]), cut=None)] == [2]


def test_the_cut_rule_compares_consecutive_sampled_frames():
    # A slow drift (4 levels a frame) never cuts, however far it goes from where the composite began;
    # MixMA-LMM's rule compares with the composite: a mean composite lags, and the rule cuts.
    drift = frames_of([4 * k for k in range(40)])
    for blend in ("exponential", "mean"):
        assert [s.count for s in run(drift, max_seconds=None, blend=blend)] == [40]
    assert len(run(drift, max_seconds=None, threshold=30, blend="mean")) > 1


def test_sample_fps_keeps_frames_by_stream_time():
    frames = frames_of(list(range(30)), fps=30.0)
    shots = list(PassThrough(sample_fps=10).feed(frames))
    assert [s.first_index for s in shots] == list(range(0, 30, 3))
    shots = run(frames, sample_fps=10, cut=None)
    assert [(s.count, s.first_index, s.last_index) for s in shots] == [(10, 0, 27)]
    # a gap in the stream starts a new grid instead of releasing a burst of frames
    gappy = [Frame(flat(0), t, i, 0.0) for i, t in enumerate([0.0, 0.1, 0.2, 5.0, 5.05, 5.1, 5.2])]
    assert [s.first_index for s in PassThrough(sample_fps=10).feed(gappy)] == [0, 1, 2, 3, 5, 6]


def test_difference_does_not_wrap_around():
    composite, frame = flat(20), flat(10)
    # MixMA-LMM subtracted uint8 arrays: 10 - 20 wraps to 246, a spurious "scene cut".
    assert np.abs(frame - composite).mean() == 246
    assert mean_abs_diff(frame, composite) == 10.0
    for blend in ("exponential", "mean"):
        assert summary(run(frames_of([20, 10]), blend=blend, threshold=127.5)) == [(15, 2, 0, 1)]


def test_step_samples_every_nth_frame():
    shots = run(frames_of([10, 250, 30, 250, 50, 250]), step=2, cut=None)  # the 250s are never looked at
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


OPTIONS = [
    {},  # the defaults: cut 0.45, 5 s
    dict(cut=0.05, max_seconds=0.5),
    dict(cut=None, threshold=4.0, max_frames=5),
    dict(cut=0.2, threshold=8.0, step=3),
    dict(sample_fps=4.0, max_seconds=1.0),
]


@pytest.mark.parametrize("blend", ["exponential", "mean"])
@pytest.mark.parametrize("options", OPTIONS)
def test_online_equals_offline_on_decoded_video(media, blend, options):
    frames = list(open_source(media.h264))
    options = dict(options, blend=blend)
    online, offline = run(frames, **options), offline_action_shots(frames, **options)
    assert len(online) == len(offline) > 1
    for a, b in zip(online, offline, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.start, a.end, a.count, a.first_index, a.last_index) == (
            b.start, b.end, b.count, b.first_index, b.last_index,
        )  # fmt: skip
    if options == {"blend": blend}:  # the default finds exactly the video's scene cuts
        assert [s.first_index for s in online] == [0, 20, 40]
        assert sum(s.count for s in online) == len(frames)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 255), min_size=1, max_size=40),
    noise_seed=st.integers(0, 2**16),
    cut=st.one_of(st.none(), st.floats(0.01, 1.0)),
    threshold=st.one_of(st.none(), st.floats(0, 200)),
    max_frames=st.one_of(st.none(), st.integers(1, 8)),
    max_seconds=st.one_of(st.none(), st.floats(0.05, 2.0)),
    step=st.integers(1, 3),
    sample_fps=st.one_of(st.none(), st.floats(1.0, 20.0)),
    blend=st.sampled_from(["exponential", "mean"]),
)
def test_online_equals_offline_property(values, noise_seed, cut, threshold, max_frames, max_seconds, step,
                                        sample_fps, blend):
    rng = np.random.default_rng(noise_seed)
    images = [np.clip(v + rng.integers(-40, 41, (3, 5, 3)), 0, 255).astype(np.uint8) for v in values]
    frames = frames_of(images)
    options = dict(cut=cut, threshold=threshold, max_frames=max_frames, max_seconds=max_seconds, step=step,
                   sample_fps=sample_fps, blend=blend)
    online, offline = run(frames, **options), offline_action_shots(frames, **options)
    assert [(s.count, s.first_index, s.last_index) for s in online] == [
        (s.count, s.first_index, s.last_index) for s in offline
    ]
    for a, b in zip(online, offline, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    assert max_frames is None or all(s.count <= max_frames for s in online)
    assert max_seconds is None or all(s.end - s.start < max_seconds for s in online)


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
    with pytest.raises(ValueError, match="step .* must be a positive integer"):
        ActionShot(step=0)
    with pytest.raises(ValueError, match="max_frames must be a positive integer"):
        ActionShot(max_frames=0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        ActionShot(threshold=float("nan"))
    with pytest.raises(ValueError, match="cut must be a share of the picture"):
        ActionShot(cut=1.5)
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        ActionShot(max_seconds=0)
    with pytest.raises(ValueError, match="sample rate must be > 0"):
        PassThrough(sample_fps=0)
