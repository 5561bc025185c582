"""The synthetic video world: determinism, answers checked against the rendered pixels, tokenizers, demo."""

import av
import cv2
import numpy as np
import pytest

from mixmalmm.model.synthetic import (
    ANSWER_WORDS,
    BUSY_FRAMES,
    COLOURS,
    DEMO_FPS,
    NUMBERS,
    QUESTION_TYPES,
    SHAPES,
    SyntheticQA,
    SyntheticVideoQA,
    blend_windows,
    busy_scenario,
    labelled_frames,
    make_demo_video,
    make_video,
    sample_indices,
    vocabulary,
    world_tokenizers,
)

SIZE = 128


def blobs(frame: np.ndarray, min_area: int = 40) -> list[tuple[str, int, float, bool]]:
    """Shapes found in a noise-free frame by colour alone: (colour, area, fill ratio, touches border).

    Fill ratio = pixels / bounding-box pixels: about 1 for a square, pi/4 for a circle, 1/2 for a triangle.
    """
    out = []
    key = frame.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)  # [H, W] packed RGB
    for name, (r, g, b) in COLOURS.items():
        mask = (key == (r << 16 | g << 8 | b)).astype(np.uint8)  # interior pixels wear the exact colour
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for x, y, w, h, area in stats[1:n]:
            if area >= min_area:
                border = x == 0 or y == 0 or x + w == frame.shape[1] or y + h == frame.shape[0]
                out.append((name, int(area), area / (w * h), bool(border)))
    return out


def classify(fill: float) -> str:
    return "square" if fill > 0.88 else "circle" if fill > 0.62 else "triangle"


def overlapping(video, index: int) -> bool:
    """Any two shapes' discs touch at this frame (from the simulated centres)."""
    shapes = video.scenario.shapes
    for i in range(len(shapes)):
        for j in range(i):
            d = np.linalg.norm(video.centres[i][index] - video.centres[j][index])
            if d < 1.3 * (shapes[i].radius + shapes[j].radius):  # NaN (not drawn) compares False
                return True
    return False


def noise_free(video, index: int) -> np.ndarray:
    return video.render(index, SIZE, noise=False)


def test_videos_and_datasets_are_deterministic_for_a_seed():
    a, b, c = make_video(5), make_video(5), make_video(6)
    assert a.scenario == b.scenario and a.scenario != c.scenario
    np.testing.assert_array_equal(a.render_all(64), b.render_all(64))
    assert a.questions() == b.questions()
    d1, d2 = SyntheticQA(12, seed=3), SyntheticQA(12, seed=3)
    for i in range(12):
        s1, s2 = d1[i], d2[i]
        np.testing.assert_array_equal(s1.frames, s2.frames)
        assert (s1.question, s1.answer, s1.indices) == (s2.question, s2.answer, s2.indices)
        assert len(s1.indices) == d1.num_frames(i) == len(s1.frames)
        assert s1.frames.dtype == np.uint8 and s1.frames.shape[1:] == (64, 64, 3)
        frames, question, answer = s1  # the generic dataset item
        assert question == s1.question and answer in ANSWER_WORDS
    assert not np.array_equal(SyntheticQA(1, seed=4)[0].frames, d1[0].frames)


def test_question_types_are_balanced_and_answers_are_in_the_vocabulary():
    ds = SyntheticQA(120, seed=9)
    kinds = [ds[i].kind for i in range(len(ds))]
    counts = {k: kinds.count(k) for k in QUESTION_TYPES}
    assert min(counts.values()) >= 10, counts
    only = SyntheticQA(10, seed=9, kinds=["shape_left"])
    assert {only[i].answer for i in range(10)} <= set(SHAPES)
    with pytest.raises(ValueError, match="unknown question types"):
        SyntheticQA(3, seed=0, kinds=["colour_later"])


def test_present_answers_match_the_pixels_of_the_newest_frame():
    checked = 0
    for seed in range(60):
        video = make_video(seed)
        if overlapping(video, video.frames - 1):
            continue  # a shape cut in two by another would count twice
        found = blobs(noise_free(video, video.frames - 1))
        for question, answer, kind in video.questions():
            if kind == "count_now":
                assert NUMBERS[len(found)] == answer, (seed, found)
                checked += 1
            elif kind == "colour_now":
                shape = question.split()[4]
                match = [b for b in found if b[0] == answer]
                assert match, (seed, question, answer, found)
                name, area, fill, border = match[0]
                if not border and area > 300:  # whole and unoccluded enough to tell its shape
                    assert classify(fill) == shape, (seed, question, fill)
                checked += 1
            elif kind == "shape_now":
                colour = question.split()[3]
                match = [b for b in found if b[0] == colour]
                assert match, (seed, question, answer, found)
                name, area, fill, border = match[0]
                if not border and area > 300:
                    assert classify(fill) == answer, (seed, question, fill)
                checked += 1
    assert checked >= 60


def test_frame_labels_match_the_pixels():
    checked = 0
    for seed in range(30):
        video = make_video(seed)
        for index in range(0, video.frames, 7):
            if overlapping(video, index):
                continue
            labels = video.shape_colours(index)
            found = blobs(noise_free(video, index))
            if (labels >= 0).all():  # nothing half in view: every shape in view is named, nothing else
                assert (labels > 0).sum() == len(found), (seed, index, labels, found)
            for kind, label in enumerate(labels):
                if label <= 0:
                    continue
                match = [b for b in found if b[0] == list(COLOURS)[label - 1]]
                assert match, (seed, index, labels, found)
                _, area, fill, border = match[0]
                if not border and area > 300:
                    assert classify(fill) == SHAPES[kind], (seed, index, fill)
                checked += 1
    assert checked >= 100
    frames, labels, maps = labelled_frames(4, seed=9, per_video=3, sizes=(32, 48))
    again = labelled_frames(4, seed=9, per_video=3, sizes=(32, 48))
    assert len(frames) == 12 and labels.shape == (12, len(SHAPES)) and labels.min() >= -1
    assert maps.shape == (12, 64, 64) and np.array_equal(maps, again[2])
    named = maps[maps > 0] - 1  # every shape named in the labels covers pixels of its class in the map
    for frame_labels, frame_map in zip(labels, maps, strict=True):
        for kind, label in enumerate(frame_labels):
            if label > 0:
                assert (frame_map == 1 + kind * len(COLOURS) + label - 1).any()
    assert named.max() < len(SHAPES) * len(COLOURS)
    assert {f.shape for f in frames} <= {(32, 32, 3), (48, 48, 3)}
    assert all(np.array_equal(a, b) for a, b in zip(frames, again[0], strict=True))
    assert np.array_equal(labels, again[1])


def test_overlapping_frames_and_pretraining_frames_drawn_among_them():
    counted = {True: 0, False: 0}
    for seed in range(20):
        video = make_video(seed)
        over = video.overlapping()
        for f in range(video.frames):
            drawn = [(s.radius, c[f]) for s, c in zip(video.scenario.shapes, video.centres, strict=True)
                     if not np.isnan(c[f, 0])]
            gaps = [np.linalg.norm(a[1] - b[1]) / (a[0] + b[0]) for i, a in enumerate(drawn) for b in drawn[:i]]
            if all(g > 1.35 for g in gaps):  # beyond both circumradii (a square's is 1.27 r): apart
                assert not over[f], (seed, f)
            if any(g < 0.45 for g in gaps):  # inside both inner radii (a triangle's is r / 2): overlapping
                assert over[f], (seed, f)
            counted[bool(over[f])] += 1
    assert counted[True] >= 30 and counted[False] >= 300
    plain = labelled_frames(12, seed=4, per_video=4, sizes=(32,))
    same = labelled_frames(12, seed=4, per_video=4, sizes=(32,), overlap=0.0)
    assert np.array_equal(plain[1], same[1]) and np.array_equal(plain[2], same[2])
    _, _, maps = labelled_frames(12, seed=4, per_video=4, sizes=(32,), overlap=1.0)
    for v in range(12):  # every frame of a video with overlaps is one of them (their maps tell which)
        video = make_video(4 * 1_000_003 + v)
        covered = np.nonzero(video.overlapping())[0]
        candidates = [video.shape_map(int(f)) for f in (covered if len(covered) else range(video.frames))]
        for m in maps[4 * v : 4 * v + 4]:
            assert any(np.array_equal(m, c) for c in candidates), (v, len(covered))
    assert sum(len(np.nonzero(make_video(4 * 1_000_003 + v).overlapping())[0]) > 0 for v in range(12)) >= 3
    with pytest.raises(ValueError, match="overlap must be a probability"):
        labelled_frames(1, seed=0, overlap=-0.1)


def test_memory_answers_match_the_pixels_of_past_frames():
    checked = 0
    for seed in range(40):
        video = make_video(seed)
        questions = video.questions()
        seen = [blobs(noise_free(video, f)) for f in range(0, video.frames, 2)]  # every other frame
        colours_seen = {b[0] for found in seen for b in found}
        for question, answer, kind in questions:
            if kind == "first_shape":
                # The first colour on screen belongs to the answer: find that colour whole later on.
                first = next(found for found in seen if found)
                colour = max(first, key=lambda b: b[1])[0]
                whole = [b for found in seen for b in found if b[0] == colour and not b[3] and b[1] > 300]
                if whole:
                    assert classify(max(whole, key=lambda b: b[1])[2]) == answer, (seed, colour)
                    checked += 1
            elif kind == "colour_before":
                shape = question.split()[4]
                assert answer in colours_seen  # that colour was on screen
                now = [a for q, a, k in questions if k == "colour_now" and shape in q]
                if now:
                    assert now[0] != answer  # and it did change
                checked += 1
            elif kind == "count_entered":
                whole = [found for f, found in zip(range(0, video.frames, 2), seen, strict=True)
                         if not overlapping(video, f)]  # a shape cut in two by another counts twice
                on_screen = max((len(found) for found in whole), default=0)
                assert on_screen <= NUMBERS.index(answer) <= len(colours_seen), (seed, answer)
                checked += 1
            elif kind == "shape_left":
                last = blobs(noise_free(video, video.frames - 1))
                whole = [b for b in last if not b[3] and b[1] > 300]
                assert all(classify(b[2]) != answer for b in whole), (seed, answer, whole)
                checked += 1
    assert checked >= 30


def test_sample_indices():
    assert sample_indices(10, "stride", stride=3) == [0, 3, 6, 9]
    assert sample_indices(11, "stride", stride=3) == [1, 4, 7, 10]  # the newest frame is always seen
    assert sample_indices(72, "uniform", count=18)[0] == 0 and sample_indices(72, "uniform", count=18)[-1] == 71
    assert len(sample_indices(72, "uniform", count=18)) == 18
    with pytest.raises(ValueError, match="stride"):
        sample_indices(10, "stride")
    with pytest.raises(ValueError, match="'stride' or 'uniform'"):
        sample_indices(10, "random", count=2)


def test_tokenizers_round_trip_every_question_and_answer():
    llm, qformer = world_tokenizers()
    texts = [q.template.format(shape=s, colour=c) for q in QUESTION_TYPES.values() for s in SHAPES for c in COLOURS]
    texts += list(ANSWER_WORDS) + ["what is happening in the video?"]
    for tok in (llm, qformer):
        assert tok.unk_token_id not in tok(" ".join(texts) + " Question: Short answer:").input_ids
        for text in texts:
            ids = tok(text).input_ids
            assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    assert llm("red").input_ids[0] == llm.bos_token_id and llm.eos_token_id is not None
    ids = qformer("which shape left?").input_ids
    assert ids[0] == qformer.cls_token_id and ids[-1] == qformer.sep_token_id
    assert len(vocabulary()) == len(set(vocabulary()))


def test_demo_video_is_h264_and_its_answers_hold(tmp_path):
    demo = make_demo_video(tmp_path / "demo.mp4")
    with av.open(str(demo.path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert decoded.shape == (64, 128, 128, 3)
    from mixmalmm.model.synthetic import demo_video

    rendered = demo_video().render_all(128)
    assert np.abs(decoded.astype(int) - rendered).mean() < 4  # the codec keeps the picture
    answers = {kind: answer for _, answer, kind in demo.questions}
    assert set(answers) == set(QUESTION_TYPES)
    assert answers["first_shape"] == "circle" and answers["shape_left"] == "circle"
    assert answers["colour_before"] == "blue" and answers["count_entered"] == "three"
    assert answers["count_now"] == "two"


def test_video_samples_ask_one_question_of_every_type_the_cut_answers():
    ds = SyntheticVideoQA(24, seed=8, size=48, strides=(5, 8), at_end=0.5)
    again = SyntheticVideoQA(24, seed=8, size=48, strides=(5, 8), at_end=0.5)
    ends_at_video_end = 0
    for i in range(len(ds)):
        s = ds[i]
        np.testing.assert_array_equal(s.frames, again[i].frames)
        assert (s.questions, s.answers, s.kinds) == (again[i].questions, again[i].answers, again[i].kinds)
        assert len(s.frames) == len(s.indices) == ds.num_frames(i) and s.frames.shape[1:] == (48, 48, 3)
        stride = s.indices[1] - s.indices[0] if len(s.indices) > 1 else 5
        assert 5 <= stride <= 8 and s.indices[-1] == s.end - 1  # every stride-th frame, ending on the newest
        truth = make_video(s.seed, s.length).questions(s.end)
        assert set(s.kinds) == {k for _, _, k in truth} and len(s.kinds) == len(set(s.kinds))
        assert set(zip(s.questions, s.answers, s.kinds, strict=True)) <= set(truth)
        np.testing.assert_array_equal(s.frames, make_video(s.seed, s.length).render_all(48, s.indices))
        frames, questions, answers = s  # the multi-question dataset item
        assert questions == s.questions and answers == s.answers
        ends_at_video_end += s.end == s.length
    assert 6 <= ends_at_video_end <= 18  # at_end=0.5 of 24
    only = SyntheticVideoQA(6, seed=8, kinds=["count_now", "first_shape"])
    assert all(set(only[i].kinds) <= {"count_now", "first_shape"} for i in range(6))
    with pytest.raises(ValueError, match="strides"):
        SyntheticVideoQA(3, seed=0, strides=(0, 4))


def test_busy_share_of_video_samples_has_every_event_and_leaves_the_others_as_they_were():
    plain = SyntheticVideoQA(60, seed=4, size=32)
    busy = SyntheticVideoQA(60, seed=4, size=32, busy=0.5)
    scenarios = [make_video(busy[i].seed, busy[i].length).scenario for i in range(60)]
    is_busy = [busy_scenario(sc) for sc in scenarios]
    assert 18 <= sum(is_busy) <= 42  # half of 60, and busy videos are 4% of random ones
    for i in range(60):
        b = busy[i]
        assert len(b.frames) == busy.num_frames(i) == len(b.indices)
        if is_busy[i]:
            assert b.length >= BUSY_FRAMES
            assert {len(scenarios[i].shapes)} == {3}
            assert any(s.leave is not None for s in scenarios[i].shapes)
            assert any(s.change is not None for s in scenarios[i].shapes)
        else:  # drawn as with busy=0: the same clip, questions and answers
            p = plain[i]
            assert (b.seed, b.end, b.questions, b.answers) == (p.seed, p.end, p.questions, p.answers)
            np.testing.assert_array_equal(b.frames, p.frames)
    assert sum(busy_scenario(make_video(plain[i].seed, plain[i].length).scenario) for i in range(60)) <= 10
    with pytest.raises(ValueError, match="busy must be a probability"):
        SyntheticVideoQA(3, seed=0, busy=1.5)


def test_composites_are_what_the_engines_actionshot_makes():
    from mixmalmm.streamer.actionshot import ActionShot
    from mixmalmm.streamer.frames import Frame

    frames = make_video(5, frames=30).render_all(64)
    for blend in ("exponential", "mean"):
        ours = blend_windows(frames, 8, blend)
        # the engine's defaults but the longest action: the cut rule finds no cut in this world
        engine = ActionShot(max_seconds=8 / DEMO_FPS, blend=blend)
        shots = list(engine.feed(Frame(f, i / DEMO_FPS, i, 0.0) for i, f in enumerate(frames)))
        assert [s.count for s in shots] == [8, 8, 8, 6] and len(ours) == 4
        for shot, image in zip(shots, ours, strict=True):
            np.testing.assert_array_equal(shot.image, image)


def test_composite_share_of_video_samples():
    plain = SyntheticVideoQA(40, seed=6, size=32)
    mixed = SyntheticVideoQA(40, seed=6, size=32, composites=0.5, blend="mean")
    made = 0
    for i in range(40):
        m, p = mixed[i], plain[i]
        assert len(m.frames) == mixed.num_frames(i)
        if m.indices == tuple(range(m.end)):  # composites: every frame up to the cut, blended by windows
            made += 1
            stride = mixed._draw(i)[3]  # the stride a single-frame clip of this item would take
            video = make_video(m.seed, m.length)
            np.testing.assert_array_equal(m.frames, blend_windows(video.render_all(32, range(m.end)), stride, "mean"))
        else:  # drawn as with composites=0
            assert (m.seed, m.end, m.questions, m.answers) == (p.seed, p.end, p.questions, p.answers)
            np.testing.assert_array_equal(m.frames, p.frames)
    assert 10 <= made <= 30
