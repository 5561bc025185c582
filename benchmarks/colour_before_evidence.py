"""How well models answer "what colour was the X before it changed?", by how much evidence they saw.

    python benchmarks/colour_before_evidence.py                          # the shipped default model
    python benchmarks/colour_before_evidence.py --model runs/default/stage2/model --model runs/default/stage3/model

The question needs memory, and the earlier colour may be in full view in few of the frames a model
samples (the demo's blue square: one of eight). Held-out clips (`SyntheticVideoQA`, every `--stride`-th
frame up to each video's end, video seeds never used in training) that ask it are grouped by how many
of their frames before the change show that shape at least FULL visible; each model answers them
through the offline clip pass (`train.evaluate`, standing questions). Prints a markdown table of
exact-match accuracy per group and model.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mixmalmm.model import MALMM, load_default_model  # noqa: E402
from mixmalmm.model.synthetic import SyntheticVideoQA, make_video  # noqa: E402
from mixmalmm.model.train import evaluate  # noqa: E402

HELD_OUT_SEED = 931  # video seeds 931 * 1_000_003 + i: training uses seeds below 10^8
FULL = 0.9  # "in full view": this fraction of the shape visible
GROUPS = ("0", "1", "2", "3+")


def evidence(sample) -> str:
    """The group of a colour_before sample: how many of its frames before the change show the shape in full."""
    video = make_video(sample.seed, frames=sample.length)
    (question,) = sample.questions
    (s,) = [s for s, script in enumerate(video.scenario.shapes) if f" {script.shape} " in f" {question} "]
    change = video.scenario.shapes[s].change
    indices = np.asarray(sample.indices)
    full = int((video.visible[s, indices[indices < change]] >= FULL).sum())
    return GROUPS[min(full, len(GROUPS) - 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="a MALMM.save_pretrained folder, repeatable "
                   "(default: the shipped default model)")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--stride", type=int, default=8, help="every stride-th frame (as the demo: DEMO_STEP)")
    p.add_argument("--busy", type=float, default=0.0, help="share of busy videos (three shapes, every event)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    dataset = SyntheticVideoQA(args.clips, HELD_OUT_SEED, size=128, strides=(args.stride, args.stride),
                               at_end=1.0, kinds=["colour_before"], busy=args.busy)
    samples = [dataset[i] for i in range(len(dataset))]
    groups = [evidence(sample) for sample in samples]
    clips = [(s.frames, s.questions, s.answers) for s in samples]  # plain tuples: grouped by `kinds=` below

    folders = args.model or [None]
    names = [folder or "shipped default" for folder in folders]
    results = []
    for folder in folders:
        model = MALMM.from_pretrained(folder) if folder else load_default_model()
        results.append(evaluate(model, clips, batch_size=32, kinds=groups.__getitem__)["groups"])

    print(f"colour_before on {len(clips)} held-out clips (every {args.stride}th frame to the video's end; busy "
          f"{args.busy:.0%}), by frames before the change that show the shape >= {FULL:.0%} visible; "
          "exact match, %.\n")
    print("| frames in full view | questions | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for group in GROUPS:
        asked = groups.count(group)
        if asked:
            cells = [f"{100 * r[group][0] / asked:.1f}" for r in results]
            print(f"| {group} | {asked} | " + " | ".join(cells) + " |")
    totals = [f"{100 * sum(c for c, _ in r.values()) / len(clips):.1f}" for r in results]
    print(f"| **all** | {len(clips)} | " + " | ".join(totals) + " |")


if __name__ == "__main__":
    main()
