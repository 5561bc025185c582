"""`mixmalmm eval` run as a user runs it (a subprocess), on tiny datasets written here in the exact layouts
of MA-LMM's repository: generated videos (H.264, 10 fps) and their extracted frame folders
(frame%06d.jpg), annotation JSON per dataset family, the built-in model."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import cv2
import pytest
import torch

from mixmalmm.clients.cli import main
from mixmalmm.model.datasets import DATASETS, clip_frames, malmm_resize, read_items
from mixmalmm.model.metrics import is_correct
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


def run(args, cwd, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


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
    assert report["settings"] == {"memory_bank_length": spec.memory_bank_length, "num_frames": 6, "num_beams": 5,
                                  "max_new_tokens": spec.max_new_tokens, "prompt_template": spec.prompt_template,
                                  "resize": "malmm"}
    for p in report["predictions"]:
        assert isinstance(p["prediction"], str)
        assert p["correct"] == is_correct(p["prediction"], p["answer"], first_word=spec.first_word)
    by_group = {}
    for p in report["predictions"]:
        by_group.setdefault(p["group"], []).append(p["correct"])
    accuracies = {g: 100 * sum(v) / len(v) for g, v in by_group.items()}
    assert {g: v["top1"] for g, v in report["groups"].items()} == pytest.approx(accuracies)
    pooled = 100 * sum(p["correct"] for p in report["predictions"]) / report["items"]
    expected = sum(accuracies.values()) / len(accuracies) if dataset == "lvu" else pooled
    assert report["top1"] == pytest.approx(expected)
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["dataset", "items", "top-1", "%", "MA-LMM", "paper", "%"]
    last = lines[-2].split()
    assert last[-1] == f"{spec.paper:.1f}" and last[-2] == f"{report['top1']:.1f}"
    if dataset == "lvu":
        assert {p["group"] for p in report["predictions"]} == {"director", "genre"}
        assert "lvu average (2 tasks)" in lines[-2]


def expected_answers(items, template, memory_bank_length, **source):
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
            out.append(model.generate_answers(output, [it.question], max_new_tokens=10)[0][1])
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
