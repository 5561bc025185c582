"""`mixmalmm eval` run as a user runs it (a subprocess), on tiny datasets written here in the exact layouts
of MA-LMM's repository: generated videos (H.264, 10 fps) and their extracted frame folders
(frame%06d.jpg), annotation JSON per dataset family, the built-in model."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import cv2
import pytest
import torch

from mixmalmm.clients.cli import main
from mixmalmm.model.datasets import DATASETS, clip_frames, malmm_resize, read_items
from mixmalmm.model.metrics import caption_scores, is_correct
from mixmalmm.model.train import frames_to_pixels
from mixmalmm.streamer import evaluate
from mixmalmm.streamer.options import builtin_model
from mixmalmm.streamer.synthetic import synthetic_rgb, write_video

CLI = [sys.executable, "-m", "mixmalmm.clients.cli", "eval"]
VIDEOS = {"vidA": 30, "vidB": 45, "vidC": 12}  # name: frames at 10 fps


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """videos/<name>.mp4 and frames/<name>/frame%06d.jpg of the same generated frames."""
    root = tmp_path_factory.mktemp("eval")
    for k, (name, n) in enumerate(VIDEOS.items()):
        frames = [synthetic_rgb(i + 7 * k, 64, 48, scene_length=8 + k) for i in range(n)]
        (root / "videos").mkdir(exist_ok=True)
        write_video(root / "videos" / f"{name}.mp4", frames, 10, "libx264", {"preset": "ultrafast"})
        folder = root / "frames" / name
        folder.mkdir(parents=True)
        for i, rgb in enumerate(frames):
            cv2.imwrite(str(folder / f"frame{i + 1:06d}.jpg"), rgb[..., ::-1])
    return root


def qa_annotations(name: str) -> dict:
    entries = [("who is walking?", "man", "who", "vidA"), ("what is the man doing.", "walking slowly", "what", "vidA"),
               ("what colour is the square", "white", "what", "vidB"), ("is it dark?", "yes", "yes/no", "vidC")]
    out = {}
    for i, (q, a, kind, video) in enumerate(entries):
        qid = f"{name}_{i}"
        out[qid] = {"answer": a, "question": q, "answer_type": kind, "question_id": qid, "video": video,
                    "frame_length": VIDEOS[video]}
    return out


ANNOTATIONS = {  # dataset: (file, content, items it yields)
    "msvd-qa": ("qa_test.json", qa_annotations("msvd"), 4),
    "msrvtt-qa": ("qa_test.json", qa_annotations("msrvtt"), 4),
    "activitynet-qa": ("qa_test.json", qa_annotations("v_anet"), 4),
    "breakfast": ("val.json", {
        "vidA": {"duration": 3, "frame_length": 30, "class_name": "fried egg", "class_label": 4},
        "vidB": {"duration": 4, "frame_length": 45, "class_name": "coffee", "class_label": 1},
    }, 2),
    "coin": ("COIN.json", {
        "vidA": {"subset": "val", "duration": 3, "target": "Make Coffee", "num_frames_actual": 30},
        "vidB": {"subset": "train", "duration": 4, "target": "Arc Weld", "num_frames_actual": 45},
        "vidC": {"subset": "val", "duration": 1, "target": "Arc Weld", "num_frames_actual": 12},
    }, 2),
    "lvu": ("test.json", {  # 2 s windows every 1 s: vidB (4 s) has 3 per task, vidA (3 s) 2
        "vidA": {"subset": "test", "duration": 3, "num_frames": 30, "genre": "comedy", "genre_answer": "(b)"},
        "vidB": {"subset": "test", "duration": 4, "num_frames": 45, "director": "steven", "director_answer": "(a)",
                 "genre": "drama", "genre_answer": "(c)"},
    }, 8),
}


def run(args, cwd, timeout=300, env=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def write_annotations(tmp_path, dataset):
    name, content, _ = ANNOTATIONS[dataset]
    folder = tmp_path / "annotation"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(content, indent=4))
    return folder


@pytest.mark.parametrize("dataset,source", [
    ("msvd-qa", "videos"), ("msrvtt-qa", "frames"), ("activitynet-qa", "frames"),
    ("breakfast", "frames"), ("coin", "videos"), ("lvu", "frames"),
])
def test_eval_runs_every_dataset_end_to_end(media, tmp_path, dataset, source):
    annotations = write_annotations(tmp_path, dataset)
    extra = ["--history", "2", "--stride", "1"] if dataset == "lvu" else []
    proc = run([dataset, "--annotations", str(annotations), f"--{source}", str(media / source), "--num-frames", "6",
                "--batch-size", "3", "--out", str(tmp_path / "r.json"), *extra], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    spec = DATASETS[dataset]
    assert report["items"] == ANNOTATIONS[dataset][2] == len(report["predictions"])
    expected_settings = {"memory_bank_length": spec.memory_bank_length, "num_frames": 6, "num_beams": 5,
                         "max_new_tokens": spec.max_new_tokens, "prompt_template": spec.prompt_template,
                         "resize": "malmm"}
    if spec.family == "classification":  # MA-LMM's classification calls generate: length_penalty 1
        expected_settings["length_penalty"] = 1.0
    assert report["settings"] == expected_settings
    for p in report["predictions"]:
        assert isinstance(p["prediction"], str)
        assert p["correct"] == is_correct(p["prediction"], p["answer"], first_word=spec.first_word)
        if spec.family == "classification":  # top-5 from 5 beams, best first, as MA-LMM
            assert len(p["candidates"]) == 5 and p["candidates"][0] == p["prediction"]
            assert p["correct_top5"] == any(c == p["answer"] for c in p["candidates"])
        else:
            assert "candidates" not in p
    by_group = {}
    for p in report["predictions"]:
        by_group.setdefault(p["group"], []).append(p["correct"])
    accuracies = {g: 100 * sum(v) / len(v) for g, v in by_group.items()}
    assert {g: v["top1"] for g, v in report["groups"].items()} == pytest.approx(accuracies)
    pooled = 100 * sum(p["correct"] for p in report["predictions"]) / report["items"]
    expected = sum(accuracies.values()) / len(accuracies) if dataset == "lvu" else pooled
    assert report["top1"] == pytest.approx(expected)
    lines = proc.stdout.splitlines()
    last = lines[-2].split()
    if spec.family == "classification":
        top5 = {}
        for p in report["predictions"]:
            top5.setdefault(p["group"], []).append(p["correct_top5"])
        top5 = {g: 100 * sum(v) / len(v) for g, v in top5.items()}
        assert {g: v["top5"] for g, v in report["groups"].items()} == pytest.approx(top5)
        assert report["top5"] == pytest.approx(sum(top5.values()) / len(top5) if dataset == "lvu" else
                                               100 * sum(p["correct_top5"] for p in report["predictions"]) / report["items"])
        assert report["top5"] >= report["top1"]
        assert lines[1].split() == ["dataset", "items", "top-1", "%", "top-5", "%", "MA-LMM", "paper", "%"]
        assert last[-1] == f"{spec.paper:.1f}" and last[-2] == f"{report['top5']:.1f}" and last[-3] == f"{report['top1']:.1f}"
    else:
        assert "top5" not in report
        assert lines[1].split() == ["dataset", "items", "top-1", "%", "MA-LMM", "paper", "%"]
        assert last[-1] == f"{spec.paper:.1f}" and last[-2] == f"{report['top1']:.1f}"
    if dataset == "lvu":
        assert {p["group"] for p in report["predictions"]} == {"director", "genre"}
        assert "lvu average (2 tasks)" in lines[-2]


def expected_answers(items, template, memory_bank_length, decoding=None, **source):
    """Each item answered alone in this process (greedy), by the clip algorithm with the given prompt."""
    model = builtin_model().eval()
    model.config = replace(model.config, memory_bank_length=memory_bank_length, prompt_template=template)
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    out = []
    with torch.inference_mode():
        for it in items:
            rgb = malmm_resize(clip_frames(it, **source), model.image_size)
            pixels = frames_to_pixels(rgb, model.image_size, mean, std)[None]
            output = model.clip_query_output(pixels, [it.question])
            out.append(model.generate_answers(output, [it.question], max_new_tokens=10, **(decoding or {}))[0][1])
    return out


@pytest.mark.parametrize("dataset,source", [("msvd-qa", "videos"), ("breakfast", "frames")])
def test_eval_answers_are_the_clip_algorithms_with_the_datasets_prompt(media, tmp_path, dataset, source):
    """Batched with shared clips in the command, one at a time here: the same greedy answers, read with
    the QA prompt for QA and the bare question for classification."""
    annotations = write_annotations(tmp_path, dataset)
    proc = run([dataset, "--annotations", str(annotations), f"--{source}", str(media / source), "--num-frames", "5",
                "--num-beams", "1", "--max-new-tokens", "10", "--memory-bank-length", "3",
                "--out", str(tmp_path / "r.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = [p["prediction"] for p in json.loads((tmp_path / "r.json").read_text())["predictions"]]
    spec = DATASETS[dataset]
    items = read_items(spec, annotations, num_frames=5)
    assert got == expected_answers(items, spec.prompt_template, 3, **{source: media / source})
    if dataset == "msvd-qa":  # a wrong template changes them (the check can fail)
        assert got != expected_answers(items, "{}", 3, **{source: media / source})


@pytest.mark.parametrize("case,expected", [
    ("no-source", "give --videos DIR (the videos) or --frames DIR"),
    ("no-file", "no annotation file"),
    ("bad-entry", "entry 'msvd_0' lacks the field 'frame_length'"),
    ("missing-video", "item 'msvd_0': no video 'vidA'"),
    ("missing-folder", "item 'msvd_2': no frame folder"),
    ("missing-frame", "frame000030.jpg' is missing"),
    ("lvu-option", "--task, --history and --stride are for lvu only"),
    ("bad-limit", "--limit must be at least 1, got 0"),
    ("bad-out", "cannot write the results to"),
])
def test_eval_user_errors_are_one_line(media, tmp_path, monkeypatch, capsys, case, expected):
    annotations = write_annotations(tmp_path, "msvd-qa")
    args = ["msvd-qa", "--annotations", str(annotations), "--videos", str(media / "videos")]
    if case == "no-source":
        args = args[:3]
    elif case == "no-file":
        args[2] = str(tmp_path)
    elif case == "bad-entry":
        content = qa_annotations("msvd")
        del content["msvd_0"]["frame_length"]
        (annotations / "qa_test.json").write_text(json.dumps(content))
    elif case == "missing-video":
        (tmp_path / "empty").mkdir()
        args[-1] = str(tmp_path / "empty")
    elif case == "missing-folder":
        (tmp_path / "frames" / "vidA").mkdir(parents=True)
        args += ["--frames", str(tmp_path / "frames")]
    elif case == "missing-frame":
        shutil.copytree(media / "frames", tmp_path / "frames")
        (tmp_path / "frames" / "vidA" / "frame000030.jpg").unlink()  # vidA's last frame, which the sampling takes
        args += ["--frames", str(tmp_path / "frames")]
    elif case == "lvu-option":
        args += ["--task", "genre"]
    elif case == "bad-limit":
        args += ["--limit", "0"]
    elif case == "bad-out":
        args += ["--out", str(tmp_path / "no" / "such" / "r.json")]
    monkeypatch.chdir(tmp_path)
    if case != "missing-frame":  # found before the model loads (a frame file is opened only when its clip runs)
        def refuse(_):
            raise AssertionError("the model was loaded before the mistake was found")
        monkeypatch.setattr(evaluate, "load_model", refuse)
    status = main(["eval", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("mixmalmm eval: ") and expected in lines[0], lines
    assert not list(tmp_path.glob("eval-*.json"))  # nothing written


# ---------------------------------------------------------------- captioning

def caption_entries(captions, youcook=False):
    """MA-LMM's cap_<split>.json: one entry per reference caption, keyed by a number as a string
    (MSRVTT/MSVD), or by segment (YouCook2: one caption per segment, its span in seconds)."""
    out = {}
    for n, (clip, caption) in enumerate(captions):
        if youcook:
            video, start, end = clip
            segment = f"{video}_{start:04d}_{end:04d}"
            out[segment] = {"video": video, "segment": segment, "id": n, "duration": VIDEOS[video] / 10,
                            "start_time": start, "end_time": end, "frame_length": VIDEOS[video], "recipe": "r",
                            "caption": caption}
        else:
            out[str(n)] = {"image_id": f"{clip}.mp4", "caption": caption, "id": n, "video": clip,
                           "frame_length": VIDEOS[clip]}
    return out


CAPTIONS = [("vidA", "a man is walking"), ("vidA", "A man walks down the road."), ("vidB", "a white square moves"),
            ("vidA", "someone walks"), ("vidC", "it is dark"), ("vidB", "a square slides to the left")]
SEGMENTS = [(("vidB", 0, 2), "add the square"), (("vidB", 2, 4), "move the square to the left"),
            (("vidA", 0, 3), "a man walks")]


def write_captions(tmp_path, dataset, split="test"):
    """annotation/cap_<split>.json and annotation/coco_gt/cap_<split>.json, as MA-LMM publishes them."""
    youcook = dataset == "youcook2"
    entries = caption_entries(SEGMENTS if youcook else CAPTIONS, youcook=youcook)
    folder = tmp_path / "annotation"
    (folder / "coco_gt").mkdir(parents=True, exist_ok=True)
    (folder / f"cap_{split}.json").write_text(json.dumps(entries, indent=4))
    key = "segment" if youcook else "video"
    gt = {"annotations": [{"image_id": e[key], "caption": e["caption"], "id": e["id"]} for e in entries.values()],
          "images": [{"id": i} for i in dict.fromkeys(e[key] for e in entries.values())]}
    (folder / "coco_gt" / f"cap_{split}.json").write_text(json.dumps(gt, indent=4))
    return folder, gt


@pytest.mark.parametrize("dataset,source,split", [("msrvtt-cap", "frames", "test"), ("youcook2", "videos", "val")])
def test_eval_captions_end_to_end(media, tmp_path, dataset, source, split):
    annotations, gt = write_captions(tmp_path, dataset, split)
    proc = run([dataset, "--annotations", str(annotations), f"--{source}", str(media / source), "--split", split,
                "--num-frames", "4", "--max-new-tokens", "6", "--batch-size", "2", "--out", str(tmp_path / "r.json")],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    spec = DATASETS[dataset]
    clips = list(dict.fromkeys(a["image_id"] for a in gt["annotations"]))  # one caption per clip
    if dataset != "youcook2":  # annotation order: keys sorted as strings ("0" "1" "2" "3" "4" "5")
        assert clips == ["vidA", "vidB", "vidC"]
    assert [p["id"] for p in report["predictions"]] == (sorted(clips) if dataset == "youcook2" else clips)
    assert report["items"] == len(clips)
    assert report["settings"] == {"memory_bank_length": 40, "num_frames": 4, "num_beams": 5, "max_new_tokens": 6,
                                  "prompt_template": "{}", "resize": "malmm", "length_penalty": 1.0,
                                  "min_new_tokens": spec.min_new_tokens}
    references = {}
    for a in gt["annotations"]:
        references.setdefault(a["image_id"], []).append(a["caption"])
    for p in report["predictions"]:
        assert isinstance(p["prediction"], str) and p["prediction"].strip()  # min_len: never empty
        assert p["references"] == references[p["id"]] and p["prompt"] == "what does the video describe?"
    if dataset == "youcook2":  # segment 2-4 s of vidB (45 frames): linspace(20, 40, 4) cut toward zero
        assert next(p for p in report["predictions"] if p["id"] == "vidB_0002_0004")["frames"] == [20, 26, 33, 40]
    predicted = {p["id"]: p["prediction"] for p in report["predictions"]}
    assert report["tokenizer"] == "ptb"  # Java is installed by setup --test
    expected, each = caption_scores({k: references[k] for k in predicted}, predicted, per_clip=True)
    assert report["metrics"] == pytest.approx({k: 100 * v for k, v in expected.items()})
    for p in report["predictions"]:
        assert p["scores"] == pytest.approx({k: 100 * v for k, v in each[p["id"]].items()})
    assert set(report["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert report["paper_metrics"] == {"METEOR": None, "CIDEr": None}  # not found: left empty, never guessed
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["dataset", "clips", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "paper", "METEOR",
                                "paper", "CIDEr"]
    m = report["metrics"]
    assert lines[2].split() == [dataset, str(len(clips)), *(f"{m[k]:.1f}" for k in ("Bleu_4", "METEOR", "ROUGE_L",
                                                                                      "CIDEr"))]


def test_eval_captions_are_the_clip_algorithms_and_score_without_java(media, tmp_path):
    """Greedy, each clip captioned alone here: the command's captions, with the caption prompt. The
    command runs where no `java` is found: METEOR is left out and said to be, the rest on the simple
    tokenizer."""
    annotations, _ = write_captions(tmp_path, "msvd-cap")
    env = {**os.environ, "PATH": str(tmp_path)}  # no java on it (the interpreter is named by its path)
    proc = run(["msvd-cap", "--annotations", str(annotations), "--videos", str(media / "videos"), "--num-frames", "5",
                "--num-beams", "1", "--max-new-tokens", "10", "--memory-bank-length", "3", "--limit", "2",
                "--out", str(tmp_path / "r.json")], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no java: METEOR left out" in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokenizer"].startswith("simple") and "METEOR" not in report["metrics"]
    predicted = {p["id"]: p["prediction"] for p in report["predictions"]}
    expected = caption_scores({p["id"]: p["references"] for p in report["predictions"]}, predicted, java=False)
    assert report["metrics"] == pytest.approx({k: 100 * v for k, v in expected.items()})
    assert proc.stdout.splitlines()[2].split()[3] == "-"  # the METEOR column
    got = [p["prediction"] for p in report["predictions"]]
    items = evaluate.clip_items(read_items(DATASETS["msvd-cap"], annotations, num_frames=5))[:2]
    assert [it.image_id for it in items] == ["vidA", "vidB"]
    assert got == expected_answers(items, "{}", 3, {"min_new_tokens": 1}, videos=media / "videos")


def test_eval_caption_user_errors(media, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def refuse(_):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(evaluate, "load_model", refuse)
    annotations, _ = write_captions(tmp_path, "youcook2", "test")
    test = json.loads((annotations / "cap_test.json").read_text())
    for e in test.values():  # YouCook2's published test split: every caption empty
        e["caption"] = ""
    (annotations / "cap_test.json").write_text(json.dumps(test))
    gt = json.loads((annotations / "coco_gt" / "cap_test.json").read_text())
    for a in gt["annotations"]:
        a["caption"] = ""
    (annotations / "coco_gt" / "cap_test.json").write_text(json.dumps(gt))
    base = ["eval", "youcook2", "--annotations", str(annotations), "--frames", str(media / "frames")]
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no reference caption" in err[0] and "--split val" in err[0], err
    (annotations / "coco_gt" / "cap_test.json").write_text(json.dumps({"images": []}))
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be COCO ground truth" in err[0], err
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # as where the eval extra is not installed
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixmalmm eval: the captioning metrics need pycocoevalcap: pip install -e '.[eval]'"], err
    assert not list(tmp_path.glob("eval-*.json"))
