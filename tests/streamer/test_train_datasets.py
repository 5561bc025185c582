"""`mixmalmm train DATASET` as a user runs it, on tiny datasets written here in MA-LMM's annotation layouts
(generated H.264 videos at 10 fps and their frame folders), the built-in (tiny) model; the trained run
folder's model then evaluated by `mixmalmm eval`. Also MA-LMM's training sampling and crops, and the
loss going down on a tiny overfit case through the same dataset and Trainer."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixmalmm.clients.cli import main
from mixmalmm.model import MALMM
from mixmalmm.model.datasets import DATASETS, read_items
from mixmalmm.model.finetune import TrainClips, random_resized_crop_box, target_text, training_defaults
from mixmalmm.model.train import TrainConfig, Trainer
from mixmalmm.streamer import train as train_cli
from mixmalmm.streamer.options import builtin_model

from .test_eval import media, qa_annotations  # noqa: F401  (media: the module's generated videos and frames)

CLI = [sys.executable, "-m", "mixmalmm.clients.cli"]
TINY_RUN = ["--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--num-frames", "4",
            "--device", "cpu", "--log-every", "1"]


def write(tmp_path, dataset):
    folder = tmp_path / "annotation"
    folder.mkdir(exist_ok=True)
    if DATASETS[dataset].family == "qa":
        for split in ("train", "test"):
            (folder / f"qa_{split}.json").write_text(json.dumps(qa_annotations(split)))
    elif dataset == "breakfast":
        content = {"vidA": {"duration": 3, "frame_length": 30, "class_name": "Fried Egg", "class_label": 4},
                   "vidB": {"duration": 4, "frame_length": 45, "class_name": "coffee", "class_label": 1}}
        for split in ("train", "val"):
            (folder / f"{split}.json").write_text(json.dumps(content))
    return folder


def run(args, cwd, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def trained_weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("dataset,source", [("msvd-qa", "videos"), ("breakfast", "frames")])
def test_train_then_eval_through_the_command_line(media, tmp_path, dataset, source):  # noqa: F811
    annotations = write(tmp_path, dataset)
    out = tmp_path / "run"
    validate = ["--val-limit", "2"] if dataset == "breakfast" else []  # Breakfast has a val split here
    done = run(["train", dataset, "--annotations", str(annotations), f"--{source}", str(media / source),
                "--out", str(out), *TINY_RUN, *validate], tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    items = 4 if dataset == "msvd-qa" else 2
    if validate:
        assert [h["val_groups"]["all"][1] for h in summary["history"]] == [2]  # 2 items validated after the epoch
    assert summary["step"] == items // 2 and len(summary["losses"]) == items // 2
    assert all(np.isfinite(summary["losses"]))
    assert (out / "checkpoint.pt").is_file() and "done in" in (out / "train_log.txt").read_text()
    # what MA-LMM trains changed, what it freezes did not
    before = builtin_model().state_dict()
    after = trained_weights(out)
    changed = {k for k, v in after.items() if k in before and not torch.equal(v, before[k])}
    assert any(k.startswith("qformer.") for k in changed) and "query_tokens" in changed
    assert any(k.startswith("language_projection.") for k in changed)
    assert "vision_model.post_layernorm.weight" in changed  # ln_vision trains
    assert not any(k.startswith(("language_model.", "vision_model.encoder.", "vision_model.embeddings.")) for k in changed)
    config = json.loads((out / "model" / "malmm_config.json").read_text())
    assert config["memory_bank_length"] == DATASETS[dataset].memory_bank_length
    assert config["prompt_template"] == DATASETS[dataset].prompt_template
    # the run's model is what `mixmalmm eval --model` loads
    split = "test" if dataset == "msvd-qa" else "val"
    report_path = tmp_path / "report.json"
    done = run(["eval", dataset, "--annotations", str(annotations), f"--{source}", str(media / source),
                "--model", str(out / "model"), "--split", split, "--num-frames", "4", "--device", "cpu",
                "--out", str(report_path), "--num-beams", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert report["model"] == str(out / "model") and report["items"] == items


def test_training_sampling_is_malmms_random_frame_per_segment_and_per_epoch(media):  # noqa: F811
    spec = DATASETS["msvd-qa"]
    items = read_items(spec, _qa_folder(media), "train", num_frames=5)
    clips = TrainClips(items, "qa", 32, 5, videos=media / "videos", seed=3)
    length = items[0].frames[-1] + 1  # vidA: 30 frames, segments of 6
    seen = set()
    for epoch in range(4):
        clips.set_epoch(epoch)
        idx = clips.indices(0)
        assert [i // 6 for i in idx] == [0, 1, 2, 3, 4] and length == 30
        seen.add(idx)
    assert len(seen) > 1  # a new draw each epoch
    again = TrainClips(items, "qa", 32, 5, videos=media / "videos", seed=3)
    again.set_epoch(3)
    assert again.indices(0) == idx  # the same draw for the same (seed, epoch, item): any process, any rerun
    frames, question, answer = clips[1]
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert question == items[1].question and answer == "walking slowly"
    assert target_text("qa", "Walking slowly.") == "walking slowly" and target_text("classification", "Fried Egg") == "fried egg"


def _qa_folder(media):  # noqa: F811
    folder = media / "qa-annotation"
    folder.mkdir(exist_ok=True)
    (folder / "qa_train.json").write_text(json.dumps(qa_annotations("train")))
    return folder


def test_random_resized_crop_boxes_follow_torchvisions_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(48, 64, rng)
        assert top >= 0 and top + h <= 48 and left >= 0 and left + w <= 64
        assert 0.5 * 48 * 64 * 0.9 <= h * w <= 48 * 64 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert random_resized_crop_box(10, 100, np.random.default_rng(0), scale=(1.0, 1.0)) == (0, 43, 10, 13)  # centre, 4:3


def test_malmm_defaults_are_its_run_scripts():
    qa, cls = training_defaults("msvd-qa"), training_defaults("breakfast")
    assert (qa.lr, qa.min_lr, qa.warmup_lr, qa.warmup_steps, qa.weight_decay) == (1e-4, 0.0, 1e-8, 1000, 0.05)
    assert (qa.epochs, qa.batch_size, cls.epochs, cls.batch_size, qa.seed) == (5, 128, 20, 64, 42)


def test_the_loss_goes_down_on_a_tiny_overfit_case(media, tmp_path):  # noqa: F811
    items = read_items(DATASETS["msvd-qa"], _qa_folder(media), "train", num_frames=3)
    model = MALMM.tiny()
    clips = TrainClips(items, "qa", model.image_size, 3, videos=media / "videos", seed=0, crop=False)
    config = TrainConfig(out=str(tmp_path / "run"), epochs=16, batch_size=4, lr=1e-2, warmup_steps=1,
                         min_lr_ratio=1.0, augment=False, memory_gradients=False, log_every=0, loss_mean="tokens")
    summary = Trainer(model, clips, None, config, log=lambda _: None).run()
    losses = summary["losses"]
    assert len(losses) == 16
    # deterministic on CPU: 4.54 -> 2.92 (first three steps, last three) when written
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]) and losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("case,expected", [
    ("no-split", "no annotation file"),
    ("bad-out", "cannot write the run to"),
    ("no-source", "give --videos DIR"),
    ("bad-batch", "--batch-size must be at least 1, got 0"),
])
def test_train_user_errors_are_one_line_before_the_model_loads(media, tmp_path, monkeypatch, capsys, case, expected):  # noqa: F811
    annotations = write(tmp_path, "msvd-qa")
    args = ["msvd-qa", "--annotations", str(annotations), "--videos", str(media / "videos"), "--out", str(tmp_path / "r")]
    if case == "no-split":
        (annotations / "qa_train.json").unlink()
    elif case == "bad-out":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        args[-1] = str(tmp_path / "ro" / "run")
        if (tmp_path / "ro").stat().st_uid == 0 and __import__("os").geteuid() == 0:  # root writes anywhere
            (tmp_path / "file").write_text("x")
            args[-1] = str(tmp_path / "file")
    elif case == "no-source":
        args = args[:3] + args[5:]
    elif case == "bad-batch":
        args += ["--batch-size", "0"]

    def refuse(_):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(train_cli, "load_model", refuse)
    status = main(["train", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("mixmalmm train: ") and expected in lines[0], lines


def test_a_fine_tuning_run_stopped_and_resumed_is_the_same_run(media, tmp_path):  # noqa: F811
    items = read_items(DATASETS["msvd-qa"], _qa_folder(media), "train", num_frames=3)

    def trainer(out, max_steps=0):
        model = MALMM.tiny()
        clips = TrainClips(items, "qa", model.image_size, 3, videos=media / "videos", seed=5)
        config = TrainConfig(out=str(out), epochs=2, batch_size=2, lr=1e-3, warmup_steps=2, augment=False,
                             memory_gradients=False, log_every=0, loss_mean="tokens", max_steps=max_steps)
        return Trainer(model, clips, None, config, log=lambda _: None)

    whole = trainer(tmp_path / "a")
    whole.run()
    first = trainer(tmp_path / "b", max_steps=3)
    first.run()
    rest = trainer(tmp_path / "b")
    rest.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    summary = rest.run()
    assert summary["step"] == 4 and first.step == 3
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, rest.model.state_dict()[k]), k


def test_lvu_training_clips_sample_inside_their_window(tmp_path):
    folder = tmp_path / "annotation"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps({"movie": {"duration": 4, "num_frames": 40, "genre": "drama",
                                                              "genre_answer": "(c)"}}))
    items = read_items(DATASETS["lvu"], folder, "train", num_frames=4, tasks=["genre"], history_s=2, stride_s=1)
    assert [it.id for it in items] == ["movie_0", "movie_1", "movie_2"]
    clips = TrainClips(items, "classification", 32, 4, frames=tmp_path, seed=0)
    for i, item in enumerate(items):  # window of frames [10 s, 10 s + (2 - 1) s] at 10 fps: 11 frames
        first, last = item.frames[0], item.frames[-1]
        assert (first, last) == (10 * i, 10 * i + 10)
        for epoch in range(3):
            clips.set_epoch(epoch)
            idx = clips.indices(i)  # segments [0, 2), [2, 5), [5, 8), [8, 11) of the window
            assert [lo <= k - first < hi for k, (lo, hi) in zip(idx, [(0, 2), (2, 5), (5, 8), (8, 11)], strict=True)] == [True] * 4


def test_train_a_captioning_dataset_then_eval_it(media, tmp_path):  # noqa: F811
    """Captioning trains on every reference caption (one item each) and its run folder captions clips."""
    from .test_eval import CAPTIONS, write_captions

    annotations, _ = write_captions(tmp_path, "msrvtt-cap", split="train")
    write_captions(tmp_path, "msrvtt-cap", split="test")
    out = tmp_path / "run"
    done = run(["train", "msrvtt-cap", "--annotations", str(annotations), "--frames", str(media / "frames"),
                "--out", str(out), *TINY_RUN], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == len(CAPTIONS) // 2 and all(np.isfinite(summary["losses"]))  # every caption an item
    config = json.loads((out / "model" / "malmm_config.json").read_text())
    assert config["prompt_template"] == DATASETS["msrvtt-cap"].prompt_template
    report_path = tmp_path / "report.json"
    done = run(["eval", "msrvtt-cap", "--annotations", str(annotations), "--frames", str(media / "frames"),
                "--model", str(out / "model"), "--num-frames", "4", "--num-beams", "1", "--max-new-tokens", "5",
                "--device", "cpu", "--out", str(report_path)], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert report["model"] == str(out / "model") and report["items"] == len({c for c, _ in CAPTIONS})
    assert set(report["metrics"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
