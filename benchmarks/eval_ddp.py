"""Clips per second of `mixmalmm eval` on the built-in model: one process against two under torchrun.

    python benchmarks/eval_ddp.py                    # 8 videos x 2 questions, 20 frames, batch 4
    python benchmarks/eval_ddp.py --videos 16 --batch-size 8

Writes the same tiny MSVD-QA-format dataset as benchmarks/eval.py (generated H.264 videos at 10 fps and
their frame folders), then runs the real command: ``mixmalmm eval msvd-qa`` in one process (with 1 and
with all CPU threads) and ``torchrun --nproc_per_node 2 -m mixmalmm.clients.cli eval msvd-qa`` (gloo,
1 thread a process). "loop s" is the report's own time (items read, the clip algorithm, beam search, the
answers gathered to rank 0), "wall s" the whole command (interpreter start, model load, process group).
Also checks that the sharded report's predictions equal the single process's. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_dataset():
    spec = importlib.util.spec_from_file_location("eval_bench", Path(__file__).with_name("eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_dataset


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--frames", type=int, default=20, help="frames per clip")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    cli = ["-m", "mixmalmm.clients.cli", "eval", "msvd-qa"]
    rows, reports = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_dataset()(root, args.videos, args.seconds)
        data = ["--annotations", str(root / "annotation"), "--frames", str(root / "frames"), "--num-frames",
                str(args.frames), "--batch-size", str(args.batch_size), "--device", "cpu"]
        runs = [("1 process", 1, str(os.cpu_count() or 1), [sys.executable, *cli]),
                ("1 process", 1, "1", [sys.executable, *cli]),
                ("torchrun 2 processes", 2, "1",
                 [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                  "--master_addr", "127.0.0.1", "--master_port", str(_port()), *cli])]
        for k, (name, procs, threads, command) in enumerate(runs):
            out = root / f"r{k}.json"
            env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
            t = time.perf_counter()
            done = subprocess.run([*command, *data, "--out", str(out)], capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t
            if done.returncode != 0:
                raise SystemExit(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}")
            report = json.loads(out.read_text())
            reports[k] = [x["prediction"] for x in report["predictions"]]
            rows.append((name, procs, threads, report["items"], report["seconds"], wall))
    same = reports[1] == reports[2]
    print(f"{rows[0][3]} questions about {args.videos} videos, {args.frames} frames each, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores; sharded predictions equal one process's: {same}\n")
    print("| run | processes | threads each | loop s | clips/s | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, procs, threads, items, seconds, wall in rows:
        print(f"| {name} | {procs} | {threads} | {seconds:.2f} | {items / seconds:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
