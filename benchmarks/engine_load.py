"""What load costs the engine (tiny model, CPU): standing questions and stream churn.

1. Shots per second folded into one stream's memory (a synthetic file replayed as fast as possible,
   every frame a Shot) against the number of standing questions on it: each question has its own
   query banks, so every step runs one more Q-Former pass. The engine's default limit
   (`--max-standing`) comes from this table.
2. Resident memory over add/remove cycles while another stream ingests: a removed stream must leave
   nothing behind (no growth beyond the allocator's noise).

    python benchmarks/engine_load.py            # questions 0-32, 200 cycles
    python benchmarks/engine_load.py --quick    # questions 0-8, 60 cycles
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from engine import EVERY_FRAME, rss_mib  # benchmarks/engine.py, beside this script

from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM
from mixmalmm.streamer.engine import Engine, EngineConfig
from mixmalmm.streamer.synthetic import synthetic_rgb, write_video

BACKGROUND = "synthetic:?width=64&height=48&fps=25"  # paced, endless: a stream ingesting meanwhile


def shots_per_second(model: MALMM, questions: int, seconds: float) -> float:
    """Steady-state Shots/s on one stream that holds `questions` standing questions."""
    engine = Engine(model, EngineConfig(max_standing=max(questions, 1))).start()
    try:
        engine.add_stream(P.AddStream(id=0, stream="s", uri="synthetic:?width=64&height=48&fps=25",
                                      pace="fast", actionshot=EVERY_FRAME))
        for i in range(questions):
            engine.add_question(P.AddQuestion(id=0, stream="s", question_id=f"q{i}", text=f"what is shape {i} doing?"))
        state = engine._get("s").state
        time.sleep(1.0)  # warm up
        start_frames, t0 = state.frames, time.perf_counter()
        time.sleep(seconds)
        return (state.frames - start_frames) / (time.perf_counter() - t0)
    finally:
        engine.shutdown(save=False)


def churn(model: MALMM, video: str, cycles: int) -> list[tuple[int, float]]:
    """Resident memory (MiB) after each quarter of `cycles` add/remove cycles of a file stream."""
    engine = Engine(model, EngineConfig()).start()
    samples = []
    try:
        engine.add_stream(P.AddStream(id=0, stream="bg", uri=BACKGROUND, actionshot=EVERY_FRAME))
        for i in range(cycles + 20):
            engine.add_stream(P.AddStream(id=0, stream=f"c{i}", uri=video, pace="fast", actionshot=EVERY_FRAME))
            time.sleep(0.02)  # a few Shots into its memory
            engine.remove_stream(f"c{i}")
            done = i - 19  # the first 20 cycles warm up (allocator pools, thread stacks)
            if done >= 0 and done % (cycles // 4) == 0:
                samples.append((done, rss_mib()))
    finally:
        engine.shutdown(save=False)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=None, help="seconds measured per question count")
    ap.add_argument("--part", choices=["all", "questions", "churn"], default="all")
    args = ap.parse_args()
    counts = [0, 1, 2, 4, 8] if args.quick else [0, 1, 2, 4, 8, 16, 32]
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    cycles = 60 if args.quick else 200
    model = MALMM.tiny().eval()

    print(f"engine under load, tiny model, {torch.get_num_threads()} CPU threads")
    if args.part in ("all", "questions"):
        questions_table(model, counts, seconds)
    if args.part in ("all", "churn"):
        churn_table(model, cycles)


def questions_table(model: MALMM, counts: list[int], seconds: float) -> None:
    print("| standing questions on the stream | Shots/s | ms per Shot | ms per Shot per question |")
    print("|---|---|---|---|")
    base_ms = None
    for n in counts:
        rate = shots_per_second(model, n, seconds)
        ms = 1e3 / rate if rate else float("inf")
        base_ms = ms if base_ms is None else base_ms
        per_q = f"{(ms - base_ms) / n:.1f}" if n else ""
        print(f"| {n} | {rate:.1f} | {ms:.1f} | {per_q} |", flush=True)


def churn_table(model: MALMM, cycles: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        video = str(Path(tmp) / "clip.mp4")
        write_video(video, [synthetic_rgb(i, 160, 120, 20) for i in range(60)], 10, "libx264", {"preset": "ultrafast"})
        samples = churn(model, video, cycles)
    print()
    print("| add/remove cycles (a 160x120 file, another stream ingesting) | resident memory, MiB |")
    print("|---|---|")
    for done, mib in samples:
        print(f"| {done} | {mib:.0f} |")
    print(f"| growth over {samples[-1][0]} cycles | {samples[-1][1] - samples[0][1]:+.0f} |")


if __name__ == "__main__":
    main()
