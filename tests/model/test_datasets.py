"""MA-LMM's annotation readers, frame sampling, frame loading and metrics, on files written here in the
layouts of MA-LMM's repository (data/<dataset>/annotation/*.json), against hand-computed values."""

import json

import cv2
import numpy as np
import pytest

from mixmalmm.model.datasets import (
    DATASETS,
    eval_indices,
    find_video,
    folder_frames,
    malmm_resize,
    pre_caption,
    pre_question,
    read_items,
    train_indices,
    video_frames,
)
from mixmalmm.model.metrics import grouped_accuracy, is_correct, mean_over_groups, top1_accuracy
from mixmalmm.streamer.synthetic import write_video


def write_json(path, data):
    path.write_text(json.dumps(data, indent=4))
    return path


def test_eval_sampling_is_rounded_linspace_over_the_clip():
    # linspace(0, 101, 5) = 0, 25.25, 50.5, 75.75, 101 -> rint (half to even) 0, 25, 50, 76, 101
    assert eval_indices(102, 5) == (0, 25, 50, 76, 101)
    assert eval_indices(3, 5) == (0, 0, 1, 2, 2)  # shorter than num_frames: repeats
    assert eval_indices(1, 2) == (0, 0)
    with pytest.raises(ValueError, match="frame_length >= 1"):
        eval_indices(0, 4)


def test_train_sampling_takes_one_index_per_segment():
    rng = np.random.default_rng(0)
    for _ in range(20):
        picked = train_indices(20, 4, rng)  # segments [0,5) [5,10) [10,15) [15,20)
        assert [p // 5 for p in picked] == [0, 1, 2, 3]
    assert train_indices(2, 4, rng) == (0, 0, 1, 1)  # linspace(0, 2, 5, int) = 0 0 1 1 2: empty segments keep their start
    seen = {train_indices(20, 4, np.random.default_rng(s))[0] for s in range(50)}
    assert seen == {0, 1, 2, 3, 4}  # uniform inside the segment, not its start


def test_text_processors_are_lavis():
    assert pre_question('Who opened the "box"?.  ') == "who opened the box?"
    assert pre_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert pre_caption("Fried Egg.") == "fried egg"
    assert pre_caption("a (b):  c;d") == "a b c d"


QA_ENTRIES = {  # MSVD-QA's layout (qa_test.json), keys deliberately out of order
    "0000001": {"answer": "rifle", "question": "What contains someone opens the lid?", "answer_type": "what",
                "question_id": "0000001", "dataset": "msvd", "video": "vidA", "frame_length": 102},
    "0000000": {"answer": "someone", "question": "who opened the box.", "answer_type": "who",
                "question_id": "0000000", "dataset": "msvd", "video": "vidA", "frame_length": 102},
    "0000002": {"answer": "man", "question": "who opens a box", "answer_type": "who",
                "question_id": "0000002", "dataset": "msvd", "video": "vidB", "frame_length": 7},
}


def test_qa_reader(tmp_path):
    write_json(tmp_path / "qa_test.json", QA_ENTRIES)
    items = read_items(DATASETS["msvd-qa"], tmp_path, "test", num_frames=5)
    assert [it.id for it in items] == ["0000000", "0000001", "0000002"]
    first = items[0]
    assert (first.video, first.question, first.answer, first.group) == ("vidA", "who opened the box", "someone", "who")
    assert first.frames == (0, 25, 50, 76, 101)
    assert items[2].frames == (0, 2, 3, 4, 6)  # linspace(0, 6, 5) = 0 1.5 3 4.5 6 -> 0 2 3 4 6
    assert len(read_items(DATASETS["msvd-qa"], tmp_path / "qa_test.json")[0].frames) == 20  # MA-LMM's 20 by default
    with pytest.raises(ValueError, match=r"no annotation file .*qa_val\.json"):
        read_items(DATASETS["msvd-qa"], tmp_path, "val")
    broken = dict(QA_ENTRIES, x={"question": "q", "answer": "a", "video": "v", "question_id": "x"})
    write_json(tmp_path / "qa_val.json", broken)
    with pytest.raises(ValueError, match=r"'qa_val.json' entry 'x' lacks the field 'frame_length'"):
        read_items(DATASETS["msvd-qa"], tmp_path, "val")
    write_json(tmp_path / "qa_train.json", [1, 2])
    with pytest.raises(ValueError, match="JSON object keyed by id"):
        read_items(DATASETS["msvd-qa"], tmp_path, "train")


def test_breakfast_and_coin_readers(tmp_path):
    write_json(tmp_path / "val.json", {
        "P47-cam01-P47_friedegg": {"duration": 160, "frame_length": 1591, "class_name": "fried egg", "class_label": 4},
        "P28-cam01-P28_cereals": {"duration": 46, "frame_length": 452, "class_name": "cereal", "class_label": 0},
        "P47-cam01-P47_coffee": {"duration": 44, "frame_length": 432, "class_name": "coffee", "class_label": 1},
    })
    items = read_items(DATASETS["breakfast"], tmp_path, "test", num_frames=3)  # test reads val.json, as MA-LMM
    assert [(it.id, it.answer, it.frames) for it in items] == [
        ("P47-cam01-P47_coffee", "coffee", (0, 216, 431)),  # linspace(0, 431, 3) = 0 215.5 431 -> rint 216
        ("P47-cam01-P47_friedegg", "fried egg", (0, 795, 1590)),
    ]  # P28-cam01-P28_cereals: one MA-LMM leaves out
    assert items[0].question == "what type of breakfast is shown in the video?"
    write_json(tmp_path / "COIN.json", {
        "b": {"subset": "val", "duration": 30, "target": "Make Coffee", "num_frames_actual": 300},
        "a": {"subset": "train", "duration": 30, "target": "Arc Weld", "num_frames_actual": 300},
        "c": {"subset": "val", "duration": 30, "target": "Arc Weld"},  # no frame count: skipped, as MA-LMM
        "AfiVmAjfTNs": {"subset": "val", "duration": 30, "target": "x", "num_frames_actual": 30},
    })
    coin = read_items(DATASETS["coin"], tmp_path, "test", num_frames=2)
    assert [(it.id, it.answer, it.question, it.frames) for it in coin] == [
        ("b", "make coffee", "what is the activity in the video?", (0, 299))]
    assert [it.id for it in read_items(DATASETS["coin"], tmp_path, "train", num_frames=2)] == ["a"]


def test_lvu_reader_cuts_windows_per_task(tmp_path):
    write_json(tmp_path / "test.json", {
        "m1": {"subset": "test", "duration": 45, "num_frames": 450, "director": "steven", "director_answer": "(a)",
               "year": "5", "year_answer": "(f)"},
        "m0": {"subset": "test", "duration": 15, "num_frames": 150, "director": "ridley", "director_answer": "(b)"},
    })
    items = read_items(DATASETS["lvu"], tmp_path, "test", num_frames=5, history_s=20, stride_s=10)
    # m1 (45 s): windows at 0, 10, 20 s (range(10, 45 - 20 + 1, 10)); m0 (15 s): the window at 0 only
    assert [(it.group, it.id) for it in items] == [
        ("director", "m0_0"), ("director", "m1_0"), ("director", "m1_10"), ("director", "m1_20"),
        ("year", "m1_0"), ("year", "m1_10"), ("year", "m1_20")]
    by_id = {(it.group, it.id): it for it in items}
    # window 20 s: frames 200 .. min(39 s * 10, 449) = 390; linspace = 200 247.5 295 342.5 390, rint half to even
    assert by_id["director", "m1_20"].frames == (200, 248, 295, 342, 390)
    # m0: 0 .. min(min(19, 15) s * 10, 149) = 149
    assert by_id["director", "m0_0"].frames == (0, 37, 74, 112, 149)
    assert by_id["year", "m1_0"].question == "what is the year of the movie?" and by_id["year", "m1_0"].answer == "5"
    only = read_items(DATASETS["lvu"], tmp_path, "test", num_frames=5, tasks=["year"], history_s=20, stride_s=10)
    assert {it.group for it in only} == {"year"}
    with pytest.raises(ValueError, match="unknown LVU task"):
        read_items(DATASETS["lvu"], tmp_path, "test", tasks=["plot"])


def _grey(level: int) -> np.ndarray:
    return np.full((48, 64, 3), level, dtype=np.uint8)


def test_video_frames_picks_the_frame_nearest_each_tenth_of_a_second(tmp_path):
    # 24 fps: 10-fps index i is at 2.4 i source frames, never half way, so the nearest is round(2.4 i).
    path = tmp_path / "v.mp4"
    write_video(path, [_grey(10 + 4 * i) for i in range(48)], fps=24, options={"preset": "ultrafast", "crf": "0"})
    indices = [0, 1, 3, 7, 10, 19, 25, 3]
    got = video_frames(path, indices)
    assert got.shape == (8, 48, 64, 3) and got.dtype == np.uint8
    source = [int(round((float(f.mean()) - 10) / 4)) for f in got]
    assert source == [0, 2, 7, 17, 24, 46, 47, 7]  # index 25 (2.5 s) is past the end (2 s): the last frame
    assert find_video(tmp_path, "v") == path
    path.rename(tmp_path / "v_1QIUV7WYKXg.mp4")  # ActivityNet's file name for the annotation's "1QIUV7WYKXg"
    assert find_video(tmp_path, "1QIUV7WYKXg") == tmp_path / "v_1QIUV7WYKXg.mp4"
    with pytest.raises(ValueError, match="no video 'w'"):
        find_video(tmp_path, "w")
    (tmp_path / "t.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="t.mp4"):
        video_frames(tmp_path / "t.mp4", [0])


def test_folder_frames_reads_one_based_jpegs(tmp_path):
    for i in range(1, 5):
        cv2.imwrite(str(tmp_path / f"frame{i:06d}.jpg"), _grey(40 * i)[..., ::-1])
    got = folder_frames(tmp_path, [0, 3, 3])
    assert [round(float(f.mean())) for f in got] == [40, 160, 160]
    with pytest.raises(ValueError, match=r"frame000005\.jpg' is missing"):
        folder_frames(tmp_path, [4])


def _rows(values) -> np.ndarray:
    """[1, 4, 4, 3] uint8 frames whose every row (and channel) is `values`."""
    return np.broadcast_to(np.array(values, dtype=np.uint8)[None, None, :, None], (1, 4, 4, 3)).copy()


def test_malmm_resize_is_bicubic_without_antialiasing_truncated():
    # 4 -> 2 pixels: output 0 samples source x = 0.5, output 1 x = 2.5; bicubic (a = -0.75) at t = 0.5 weighs
    # neighbours -1, 0, 1, 2 by -0.09375, 0.59375, 0.59375, -0.09375 (borders repeat).
    got = malmm_resize(_rows([0, 100, 200, 255]), 2)
    # 0.59375 * 100 - 0.09375 * 200 = 40.625 -> 40; -0.09375 * 100 + 0.59375 * (200 + 255) - 0.09375 * 255 = 236.875 -> 236
    assert got.shape == (1, 2, 2, 3) and got.dtype == np.uint8
    assert (got[0, :, :, 0] == [[40, 236], [40, 236]]).all() and (got[..., 0] == got[..., 2]).all()
    # overshoot: -0.09375 * 255 = -23.9 and 1.0938 * 255 = 278.9 are clamped
    assert (malmm_resize(_rows([0, 0, 255, 255]), 2)[0, 0, :, 0] == [0, 255]).all()
    with pytest.raises(ValueError, match="RGB uint8"):
        malmm_resize(np.zeros((4, 4, 3), np.uint8), 2)


def test_metrics_match_hand_computed_cases():
    assert is_correct(" yes ", "yes")
    assert not is_correct("Yes", "yes")  # MA-LMM compares as generated: no lower-casing
    assert is_correct("man walking", "man", first_word=True) and not is_correct("man walking", "man")
    assert not is_correct("the man", "man", first_word=True)  # no article removal either
    assert top1_accuracy([True, False, True, True]) == 75.0 and top1_accuracy([]) == 0.0
    groups = grouped_accuracy(["b", "a", "a"], [True, False, True])
    assert groups == {"a": (50.0, 2), "b": (100.0, 1)}
    assert mean_over_groups(groups) == 75.0  # each task once (the pooled accuracy would be 66.7)
    with pytest.raises(ValueError, match="one group per item"):
        grouped_accuracy(["a"], [True, False])
