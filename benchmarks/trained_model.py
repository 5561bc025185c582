"""Accuracy of the shipped default model on held-out synthetic videos, per question type.

    python benchmarks/trained_model.py                 # 60 held-out videos, all conditions
    python benchmarks/trained_model.py --videos 30     # quicker

Every video (72 frames, 8 fps, rendered at 128 px, seeds never used in training) is streamed through the
model the way the engine does it — `streamer.preprocess` then `MALMM.step`, one Shot at a time — and every
question the video answers at its end is asked. Conditions (columns):

- stride, M as trained, standing: every `--step`-th frame; each question registered before the first
  frame (its own query banks: exact MA-LMM).
- ... ad hoc: the same stream, the questions answered by one extra Q-Former pass over the default
  question's banks.
- stride, M = 0: no memory banks (the Q-Former sees the newest frame only).
- ActionShot, exponential / mean: the engine's `ActionShot` over every frame, composites spanning less than
  `--actionshot-seconds` (default: the stride's span, 1 s, so as many model steps as the stride), the default
  cut rule, MixMA-LMM's exponential blend or a true mean; standing questions.
- uniform (ActionShot's count): MA-LMM's uniform sampling of the whole video, as many frames as ActionShot's
  Shots (the same number of model steps).
- every frame: stride 1, as many frames decoded as ActionShot blends, each a model step (8x the steps).

Prints a markdown table of exact-match accuracy per question type (present / memory), with the chance
level of always giving a type's most common answer; then the same table on `--busy-videos` held-out
busy videos (`synthetic.busy_scenario`: three shapes, one leaves, one changes colour, as in the demo;
about 4% of random videos). The truth is what every frame of the video shows.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mixmalmm.model import MALMM, load_default_model  # noqa: E402
from mixmalmm.model.synthetic import (  # noqa: E402
    DEMO_FPS,
    MAX_VIDEO_FRAMES,
    QUESTION_TYPES,
    busy_scenario,
    demo_video,
    make_video,
    random_scenario,
    simulate_video,
)
from mixmalmm.model.train import normalise_answer  # noqa: E402
from mixmalmm.streamer.actionshot import ActionShot, PassThrough, uniform_indices  # noqa: E402
from mixmalmm.streamer.frames import Frame, Shot  # noqa: E402
from mixmalmm.streamer.preprocess import preprocess  # noqa: E402

HELD_OUT_SEED = 900_000_000  # training uses seeds below 10^8 (seed * 1_000_003 + index + 7919 * redraws)
BUSY_SEED = 950_000_000  # busy held-out videos: the first busy scenarios from here on


def frames_of(video, size: int) -> list[Frame]:
    return [Frame(video.render(i, size), i / DEMO_FPS, i, 0.0) for i in range(video.frames)]


def shots_for(condition: str, frames: list[Frame], args, count: int | None = None) -> list[Shot]:
    if condition.startswith("actionshot_"):  # actionshot_exponential, actionshot_mean
        acc = ActionShot(max_seconds=args.actionshot_seconds, blend=condition.removeprefix("actionshot_"))
        return list(acc.feed(frames))
    if condition == "stride":
        return list(PassThrough(step=args.step).feed(frames))
    if condition == "every_frame":
        return list(PassThrough().feed(frames))
    if condition == "uniform_matched":
        return [Shot.of_frame(frames[i]) for i in uniform_indices(len(frames), count)]
    raise ValueError(condition)


def run_stream(model: MALMM, shots: list[Shot], questions: list[str], adhoc_too: bool = False):
    """Stream the shots with every question standing; returns {question: (standing text, adhoc text)}."""
    state = model.create_state("bench")
    for q in questions:
        model.register_question(state, q)
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    pixels = preprocess(shots, model.image_size, mean, std)
    feats = model.encode_frames(pixels)
    for t, shot in enumerate(shots):
        model.step([state], feats[t : t + 1], [(shot.start, shot.end)])
    out = {}
    for q in questions:
        standing = model.answer(state, q, max_new_tokens=4)
        assert standing.mode == "standing"
        adhoc = model.answer(state, q, max_new_tokens=4, adhoc=True).text if adhoc_too else None
        out[q] = (standing.text, adhoc)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=60)
    p.add_argument("--busy-videos", type=int, default=30, help="held-out busy videos for the second table (0: none)")
    p.add_argument("--size", type=int, default=128, help="render size in pixels")
    p.add_argument("--step", type=int, default=8, help="stride: every step-th frame (as the demo: DEMO_STEP)")
    p.add_argument("--actionshot-seconds", type=float,
                   help="ActionShot: a composite spans less than this (default: the stride's span, step / 8 fps)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model", help="a MALMM.save_pretrained folder (default: the shipped default model)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def load(config=None) -> MALMM:
        return MALMM.from_pretrained(args.model, config=config) if args.model else load_default_model(config=config)

    model = load()
    M = model.config.memory_bank_length
    no_memory = load(replace(model.config, memory_bank_length=0))
    if args.actionshot_seconds is None:
        args.actionshot_seconds = args.step / DEMO_FPS
    columns = {
        "stride_standing": f"stride {args.step}, M={M}, standing",
        "stride_adhoc": f"stride {args.step}, M={M}, ad hoc",
        "stride_nomem": f"stride {args.step}, M=0",
        "actionshot_exponential": f"ActionShot {args.actionshot_seconds:g} s, exponential",
        "actionshot_mean": f"ActionShot {args.actionshot_seconds:g} s, mean",
        "uniform_matched": "uniform, ActionShot's count",
        "every_frame": "every frame",
    }
    t0 = time.time()
    ordinary = [make_video(HELD_OUT_SEED + v, frames=MAX_VIDEO_FRAMES) for v in range(args.videos)]
    busy, seed = [], BUSY_SEED
    while len(busy) < args.busy_videos:
        seed += 1
        scenario = random_scenario(seed, MAX_VIDEO_FRAMES)
        if busy_scenario(scenario):
            busy.append(simulate_video(scenario))
    tables = [(f"{args.videos} held-out videos", ordinary)]
    if busy:
        tables.append((f"{args.busy_videos} held-out busy videos (three shapes, one leaves, one changes colour; "
                       "the demo's kind)", busy))
    for title, videos in tables:
        correct, asked, answers_by_type, counts = score(model, no_memory, videos, columns, args)
        print(f"Default model (M={M}) on {title}, {MAX_VIDEO_FRAMES} frames at {DEMO_FPS:g} fps, {args.size} px; "
              "exact-match accuracy, %. Model steps per video (mean): "
              + ", ".join(f"{columns[k]} {np.mean(v):.1f}" for k, v in counts.items()) + "\n")
        print_table(columns, correct, asked, answers_by_type)
        print()
    demo = demo_video()
    demo_frames = frames_of(demo, args.size)
    demo_q = demo.questions()
    with torch.inference_mode():
        demo_out = run_stream(model, shots_for("stride", demo_frames, args), [q for q, _, _ in demo_q], True)
    demo_ok = sum(normalise_answer(demo_out[q][0]) == a for q, a, _ in demo_q)
    demo_adhoc = sum(normalise_answer(demo_out[q][1]) == a for q, a, _ in demo_q)
    print(f"Demo video (stride {args.step}): {demo_ok}/{len(demo_q)} standing, {demo_adhoc}/{len(demo_q)} ad hoc. "
          f"{time.time() - t0:.0f} s.")


def score(model: MALMM, no_memory: MALMM, videos, columns: dict[str, str], args):
    """Every question each video answers at its end, under every condition: (correct per column and type,
    asked per type, answers per type, model steps per video per column)."""
    correct: dict[str, Counter] = {c: Counter() for c in columns}
    asked: Counter = Counter()
    answers_by_type: dict[str, Counter] = defaultdict(Counter)
    counts: dict[str, list[int]] = defaultdict(list)
    for video in videos:
        qa = video.questions()
        if not qa:
            continue
        questions = [q for q, _, _ in qa]
        frames = frames_of(video, args.size)
        with torch.inference_mode():
            shots = {c: shots_for(c, frames, args) for c in ("stride", "actionshot_exponential", "actionshot_mean",
                                                             "every_frame")}
            shots["uniform_matched"] = shots_for("uniform_matched", frames, args, len(shots["actionshot_exponential"]))
            stride = run_stream(model, shots["stride"], questions, adhoc_too=True)
            got = {
                "stride_standing": {q: a for q, (a, _) in stride.items()},
                "stride_adhoc": {q: a for q, (_, a) in stride.items()},
                "stride_nomem": {q: a for q, (a, _) in run_stream(no_memory, shots["stride"], questions).items()},
            }
            for c in ("actionshot_exponential", "actionshot_mean", "uniform_matched", "every_frame"):
                got[c] = {q: a for q, (a, _) in run_stream(model, shots[c], questions).items()}
        for c in columns:
            counts[c].append(len(shots["stride" if c.startswith("stride") else c]))
        for q, a, kind in qa:
            asked[kind] += 1
            answers_by_type[kind][a] += 1
            for c in columns:
                correct[c][kind] += normalise_answer(got[c][q]) == a
    return correct, asked, answers_by_type, counts


def print_table(columns: dict[str, str], correct: dict[str, Counter], asked: Counter,
                answers_by_type: dict[str, Counter]) -> None:
    """Markdown rows per question type and per present / memory / all, with the majority answer's rate."""

    def pct(c: Counter, kinds) -> str:
        n = sum(asked[k] for k in kinds)
        return f"{100 * sum(c[k] for k in kinds) / n:.1f}" if n else "-"

    header = ["question type", "memory?", "asked", "majority"] + list(columns.values())
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind, qt in QUESTION_TYPES.items():
        if not asked[kind]:
            continue
        majority = Counter({kind: answers_by_type[kind].most_common(1)[0][1]})
        row = [kind, "yes" if qt.memory else "no", str(asked[kind]), pct(majority, [kind])]
        row += [pct(correct[c], [kind]) for c in columns]
        print("| " + " | ".join(row) + " |")
    for label, kinds in (
        ("present (all)", [k for k, q in QUESTION_TYPES.items() if not q.memory]),
        ("memory (all)", [k for k, q in QUESTION_TYPES.items() if q.memory]),
        ("all", list(QUESTION_TYPES)),
    ):
        majority = Counter({k: answers_by_type[k].most_common(1)[0][1] for k in kinds if answers_by_type[k]})
        row = [f"**{label}**", "", str(sum(asked[k] for k in kinds)), pct(majority, kinds)]
        row += [pct(correct[c], kinds) for c in columns]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
