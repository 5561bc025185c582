"""`mixmalmm train DATASET` and `mixmalmm eval DATASET` under torchrun: two real processes on CPU (gloo,
a TCP store on 127.0.0.1), against the same command in one process.

Sharded evaluation gives each process whole batches of a single process's batching, so the predictions
and the report are identical (bit for bit: the same batches go through the same kernels; OMP threads
are fixed to 1 in both so that no reduction order differs). Two-process training splits each global
batch in two, sums the token losses divided by the batch's answer tokens and all-reduces the gradients:
the same step as one process up to float32 summation order (a few ulps per step),
so the losses agree to 1e-5 relative and the weights to 1e-4 absolute after four AdamW steps of 2e-3
(AdamW divides each gradient by its own size: elements whose gradient is near zero turn float noise into
visible steps). Dropout is off (each process draws its own masks)."""

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .test_eval import VIDEOS, media, qa_annotations  # noqa: F401  (media: generated videos and frames)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def one(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "mixmalmm.clients.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env())


def two(args, cwd, timeout=300):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mixmalmm.clients.cli"]
    return subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env())


def annotations(tmp_path):
    folder = tmp_path / "annotation"
    folder.mkdir()
    train = qa_annotations("train")
    train["train_4"] = {"answer": "yes", "question": "is there a dog?", "answer_type": "yes/no",
                        "question_id": "train_4", "video": "vidB", "frame_length": VIDEOS["vidB"]}
    (folder / "qa_train.json").write_text(json.dumps(train))  # 5 items: batches of 4 and 1 (rank 1 idle)
    test = {**qa_annotations("test"), **{f"x{k}": {**e, "question_id": f"x{k}"} for k, e in qa_annotations("t2").items()}}
    (folder / "qa_test.json").write_text(json.dumps(test))  # 8 items
    return folder


def test_two_process_training_equals_one_process_and_only_rank_0_writes(media, tmp_path):  # noqa: F811
    folder = annotations(tmp_path)
    common = ["train", "msvd-qa", "--annotations", str(folder), "--videos", str(media / "videos"),
              "--num-frames", "3", "--batch-size", "4", "--epochs", "2", "--lr", "2e-3", "--warmup-steps", "0",
              "--qformer-dropout", "0", "--device", "cpu", "--log-every", "1"]
    single = one([*common, "--out", str(tmp_path / "one")], tmp_path)
    assert single.returncode == 0, single.stderr
    double = two([*common, "--out", str(tmp_path / "two")], tmp_path)
    assert double.returncode == 0, double.stderr
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("attention.key.bias"):  # its true gradient is 0 (softmax ignores a shift shared by all
            continue  # keys): AdamW turns float noise there into steps of up to lr, in one process or two
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)  # 4 AdamW steps of lr 2e-3
    from mixmalmm.streamer.options import builtin_model

    initial = builtin_model().state_dict()
    moved = max(float((a[k] - initial[k]).abs().max()) for k in a if k.startswith("qformer."))
    assert moved > 1e-3  # 4 steps moved the weights far beyond the tolerance
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one_summary["step"] == two_summary["step"] == 4
    torch.testing.assert_close(torch.tensor(one_summary["losses"]), torch.tensor(two_summary["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert two_summary["config"]["extra"]["processes"] == 2
    log_lines = (tmp_path / "two" / "train_log.txt").read_text().splitlines()
    assert sum("done in" in line for line in log_lines) == 1  # one writer
    assert double.stdout.count("model: ") == 1


def test_sharded_eval_equals_one_process(media, tmp_path):  # noqa: F811
    folder = annotations(tmp_path)
    common = ["eval", "msvd-qa", "--annotations", str(folder), "--frames", str(media / "frames"), "--num-frames", "4",
              "--batch-size", "3", "--device", "cpu"]  # batches of 3, 3, 2: rank 0 takes the 1st and 3rd
    single = one([*common, "--out", str(tmp_path / "one.json")], tmp_path)
    assert single.returncode == 0, single.stderr
    double = two([*common, "--out", str(tmp_path / "two.json")], tmp_path)
    assert double.returncode == 0, double.stderr
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    a.pop("seconds"), b.pop("seconds")
    assert a["items"] == 8 and [p["id"] for p in b["predictions"]] == sorted(p["id"] for p in b["predictions"])
    assert a == b
    assert double.stdout.count("results: ") == 1  # rank 0 alone prints and writes
