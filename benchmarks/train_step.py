"""Training and evaluation speed of the offline clip pass (`MALMM.clip_loss` / `clip_query_output`).

    python benchmarks/train_step.py                 # the shipped default model's shapes, CPU
    python benchmarks/train_step.py --threads 2     # as scripts/train_default.sh trains

A fixed batch of synthetic whole-video clips (every `--stride`-th frame, cut at the video's end, one
question of every type each clip answers, as stage 2 of scripts/train_default.sh) goes through the
default model's architecture with its vision encoder and LM frozen (`--train-llm`). Prints a markdown
table: milliseconds per batch and clips per second for the loss with its backward pass (standing and
ad-hoc paths) and for the no-gradient pass that validation runs; median of `--repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mixmalmm.model import load_default_model  # noqa: E402
from mixmalmm.model.synthetic import SyntheticVideoQA  # noqa: E402
from mixmalmm.model.train import frames_to_pixels  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=8, help="clips per batch (stage 2 trains with 8)")
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_default_model()  # vision encoder and LM frozen, as stage 2 trains
    ds = SyntheticVideoQA(400, seed=123, size=64, strides=(args.stride, args.stride), at_end=1.0)
    T = max(ds.num_frames(i) for i in range(len(ds)))  # the longest clips: whole 72-frame videos
    items = [ds[i] for i in range(len(ds)) if ds.num_frames(i) == T][: args.clips]
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    pixels = torch.stack([frames_to_pixels(s.frames, model.image_size, mean, std) for s in items])
    clips = [c for c, s in enumerate(items) for _ in s.questions]
    questions = [q for s in items for q in s.questions]
    answers = [a for s in items for a in s.answers]

    def step(adhoc: bool):
        def run():
            model.zero_grad(set_to_none=True)
            loss = model.clip_loss(pixels, questions, answers, adhoc=adhoc, memory_gradients="visual", clips=clips)
            loss.backward()

        return run

    def validate():
        with torch.no_grad():
            model.clip_query_output(pixels, questions, clips=clips)

    model.train()
    rows = [
        ("loss + backward, standing", timed(step(False), args.repeats)),
        ("loss + backward, ad hoc", timed(step(True), args.repeats)),
    ]
    model.eval()
    rows.append(("query outputs, no gradients", timed(validate, args.repeats)))
    print(f"{len(items)} clips x {T} frames, {len(questions)} questions, M={model.config.memory_bank_length}, "
          f"{torch.get_num_threads()} threads\n")
    print("| pass | ms per batch | clips/s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {1000 * seconds:.0f} | {len(items) / seconds:.1f} |")


if __name__ == "__main__":
    main()
