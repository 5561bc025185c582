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
    read_references,
    segment_indices,
    train_indices,
    video_frames,
)
from mixmalmm.model.metrics import (
    caption_scores,
    grouped_accuracy,
    is_correct,
    java_available,
    mean_over_groups,
    simple_tokenize,
    top1_accuracy,
    topk_accuracy,
)
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


def test_topk_accuracy_reads_the_first_k_beams():
    beams = [["egg", "fried egg", "tea"], ["tea", "coffee"], ["milk"]]
    truths = ["fried egg", "coffee", "juice"]
    assert topk_accuracy(beams, truths, k=1) == 0.0
    assert topk_accuracy(beams, truths, k=2) == pytest.approx(200 / 3)  # the 2nd beam of the first two
    assert topk_accuracy([["a man"], ["x", "y"]], ["a", "y"], k=5, first_word=True) == 100.0
    with pytest.raises(ValueError, match="one candidate list per item"):
        topk_accuracy(beams, truths[:2])


MSRVTT_CAPTIONS = {  # MA-LMM's data/msrvtt/annotation/cap_test.json layout: one entry per reference caption
    "0": {"image_id": "video7010.mp4", "caption": "a man is walking", "id": 0, "video": "video7010", "frame_length": 102},
    "1": {"image_id": "video7010.mp4", "caption": "A man walks.", "id": 1, "video": "video7010", "frame_length": 102},
    "10": {"image_id": "video7011.mp4", "caption": "a cat sleeps", "id": 10, "video": "video7011", "frame_length": 7},
    "2": {"image_id": "video7010.mp4", "caption": "someone walks down a street", "id": 2, "video": "video7010",
          "frame_length": 102},
}


def coco_gt(entries, key="video"):
    """MA-LMM's coco_gt/cap_<split>.json: annotations (image_id, caption, id) and images."""
    return {"annotations": [{"image_id": e[key], "caption": e["caption"], "id": e["id"]} for e in entries.values()],
            "images": [{"id": i} for i in dict.fromkeys(e[key] for e in entries.values())]}


def test_caption_reader_and_references(tmp_path):
    write_json(tmp_path / "cap_test.json", MSRVTT_CAPTIONS)
    items = read_items(DATASETS["msrvtt-cap"], tmp_path, "test", num_frames=5)
    # keys sorted as strings, as MA-LMM sorts them: "0" "1" "10" "2"
    assert [(it.id, it.image_id, it.answer) for it in items] == [
        ("0", "video7010", "a man is walking"), ("1", "video7010", "a man walks"),
        ("10", "video7011", "a cat sleeps"), ("2", "video7010", "someone walks down a street")]
    assert items[0].frames == (0, 25, 50, 76, 101) and items[2].frames == (0, 2, 3, 4, 6)
    assert {it.question for it in items} == {"what does the video describe?"}
    assert len(read_items(DATASETS["msrvtt-cap"], tmp_path, "test")[0].frames) == 80  # MA-LMM's caption runs
    # no coco_gt folder: the split's own captions, as written (the scorer's tokenizer normalises them)
    refs, source = read_references(DATASETS["msrvtt-cap"], tmp_path, "test")
    assert source == tmp_path / "cap_test.json"
    assert refs == {"video7010": ["a man is walking", "A man walks.", "someone walks down a street"],
                    "video7011": ["a cat sleeps"]}
    (tmp_path / "coco_gt").mkdir()
    gt = coco_gt(MSRVTT_CAPTIONS)
    gt["annotations"][0]["caption"] = "a man walking"  # the file MA-LMM scores against wins
    write_json(tmp_path / "coco_gt" / "cap_test.json", gt)
    refs, source = read_references(DATASETS["msrvtt-cap"], tmp_path / "cap_test.json", "test")
    assert source == tmp_path / "coco_gt" / "cap_test.json" and refs["video7010"][0] == "a man walking"
    write_json(tmp_path / "coco_gt" / "cap_test.json", {"images": []})
    with pytest.raises(ValueError, match="must be COCO ground truth"):
        read_references(DATASETS["msrvtt-cap"], tmp_path, "test")
    write_json(tmp_path / "cap_val.json", {"0": {"caption": "x", "video": "v"}})
    with pytest.raises(ValueError, match=r"'cap_val.json' entry '0' lacks the field 'frame_length'"):
        read_items(DATASETS["msvd-cap"], tmp_path, "val")


def test_youcook2_segments_are_sampled_in_their_time_span(tmp_path):
    # linspace(470, 600, 5) = 470 502.5 535 567.5 600, cut toward zero
    assert segment_indices(47, 60, 206.86, 2070, 5) == (470, 502, 535, 567, 600)
    # the end is cut to the duration (10.5 s): linspace(10, 105, 3) = 10 57.5 105; 105 > the last frame 103
    assert segment_indices(1, 12, 10.5, 104, 3) == (10, 57, 103)
    assert segment_indices(-2, 1, 9, 90, 2) == (0, 10)  # a start before 0 s is 0
    with pytest.raises(ValueError, match="ends"):
        segment_indices(5, 4, 9, 90, 2)
    entries = {  # MA-LMM's data/youcook2/annotation/cap_val.json layout
        "xHr8X2Wpmno_0067_0089": {"video": "xHr8X2Wpmno", "segment": "xHr8X2Wpmno_0067_0089", "id": 1,
                                  "duration": 206.86, "start_time": 67, "end_time": 89, "frame_length": 2070,
                                  "recipe": "fattoush", "caption": "combine lemon juice sumac garlic salt and oil in a bowl"},
        "xHr8X2Wpmno_0047_0060": {"video": "xHr8X2Wpmno", "segment": "xHr8X2Wpmno_0047_0060", "id": 0,
                                  "duration": 206.86, "start_time": 47, "end_time": 60, "frame_length": 2070,
                                  "recipe": "fattoush", "caption": "pick the ends off the verdalago"},
    }
    write_json(tmp_path / "cap_val.json", entries)
    (tmp_path / "coco_gt").mkdir()
    write_json(tmp_path / "coco_gt" / "cap_val.json", coco_gt(entries, key="segment"))
    items = read_items(DATASETS["youcook2"], tmp_path, "val", num_frames=5)
    assert [(it.image_id, it.video, it.frames) for it in items] == [
        ("xHr8X2Wpmno_0047_0060", "xHr8X2Wpmno", (470, 502, 535, 567, 600)),
        ("xHr8X2Wpmno_0067_0089", "xHr8X2Wpmno", (670, 725, 780, 835, 890))]  # linspace(670, 890, 5)
    refs, _ = read_references(DATASETS["youcook2"], tmp_path, "val")
    assert refs == {"xHr8X2Wpmno_0047_0060": ["pick the ends off the verdalago"],
                    "xHr8X2Wpmno_0067_0089": ["combine lemon juice sumac garlic salt and oil in a bowl"]}
    spec = DATASETS["youcook2"]
    assert (spec.memory_bank_length, spec.num_frames, spec.max_new_tokens, spec.min_new_tokens) == (40, 80, 30, 2)


# Hand-computed scores. Hypothesis "the cat sat on the mat", reference "the cat sat on a mat":
# clipped n-gram matches 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty), so
# BLEU-1 = 5/6, BLEU-2 = (5/6 * 3/5) ** (1/2), BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4).
def check_hand_computed(java: bool) -> None:
    s = caption_scores({"a": ["The cat sat on a mat."]}, {"a": "the cat sat on the mat"}, java=java)
    assert s["Bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
    assert s["Bleu_2"] == pytest.approx(0.5 ** 0.5, rel=1e-6)
    assert s["Bleu_4"] == pytest.approx((1 / 12) ** 0.25, rel=1e-6)
    # brevity: "the cat" against 6 words: BLEU-1 = 2/2 * exp(1 - 6/2)
    assert caption_scores({"a": ["the cat sat on the mat"]}, {"a": "the cat"}, java=java)["Bleu_1"] == \
        pytest.approx(np.exp(-2), rel=1e-6)
    # ROUGE-L: candidate "a cat sat", reference "a black cat sat down": LCS 3, P = 1, R = 3/5,
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.6 / 2.04
    assert caption_scores({"a": ["a black cat sat down"]}, {"a": "a cat sat"}, java=java)["ROUGE_L"] == \
        pytest.approx(2.44 * 0.6 / 2.04, rel=1e-9)
    # CIDEr over two clips (document frequencies from their references, idf log 2 for every n-gram):
    # clip a ("dog runs" for "dog runs"): cosine 1 for n = 1, 2, nothing for n = 3, 4 -> 10 * (1 + 1) / 4 = 5;
    # clip b ("cat" for "cat sleeps"): n = 1 cosine 1/sqrt(2), length gap 1 -> exp(-1 / (2 * 6^2)),
    # 10 * that / 4; CIDEr = the mean of the two.
    b = 10 * (2 ** -0.5) * np.exp(-1 / 72) / 4
    cider = caption_scores({"a": ["dog runs"], "b": ["cat sleeps"]}, {"a": "dog runs", "b": "cat"}, java=java)["CIDEr"]
    assert cider == pytest.approx((5 + b) / 2, rel=1e-9)
    # one clip alone: every n-gram is in every document, idf 0, CIDEr 0 whatever the caption
    assert caption_scores({"a": ["dog runs"]}, {"a": "dog runs"}, java=java)["CIDEr"] == 0.0


def test_caption_metrics_without_java_match_hand_computed_cases():
    check_hand_computed(java=False)
    _, each = caption_scores({"a": ["the cat sat on a mat"], "b": ["dog runs"]},
                             {"a": "the cat sat on the mat", "b": "dog runs"}, java=False, per_clip=True)
    assert each["a"]["Bleu_4"] == pytest.approx((1 / 12) ** 0.25, rel=1e-6) and each["b"]["ROUGE_L"] == 1.0
    assert simple_tokenize("A man, walking -- in the park.") == "a man walking in the park"
    assert "METEOR" not in caption_scores({"a": ["a dog"]}, {"a": "a dog"}, java=False)
    with pytest.raises(ValueError, match="no reference captions for 1 clip"):
        caption_scores({"a": ["x"]}, {"a": "x", "b": "y"}, java=False)


@pytest.mark.skipif(not java_available(), reason="needs java (scripts/setup.sh --test installs it)")
def test_caption_metrics_with_java():
    """The PTB tokenizer turns the hand-computed cases into the tokens `simple_tokenize` gives (so the
    numbers above hold with Java too), and METEOR behaves as it must (one JVM each: they start slowly)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = ["The cat sat on a mat.", "the cat, sat -- on the mat!", "A black cat sat down?"]
    tokens = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(sentences)})
    assert [tokens[str(i)][0] for i in range(3)] == [simple_tokenize(c) for c in sentences]
    hypotheses = ("the cat sat on the mat", "the cat sat on a rug", "the cat", "dogs run fast")
    corpus, each = caption_scores({h: ["The cat sat on the mat."] for h in hypotheses}, {h: h for h in hypotheses},
                                  java=True, per_clip=True)
    assert list(corpus) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    meteor = [each[h]["METEOR"] for h in hypotheses]
    assert meteor[0] == 1.0 and meteor[-1] == 0.0  # identical; nothing in common
    assert 1.0 > meteor[1] > meteor[2] > 0.0  # more of the reference matched, in order, scores higher
    assert 0.0 < corpus["METEOR"] < 1.0  # the corpus score pools the clips' statistics (not their mean)
    assert each["the cat"]["Bleu_1"] == pytest.approx(np.exp(-2), rel=1e-6)  # the brevity case above, per clip
