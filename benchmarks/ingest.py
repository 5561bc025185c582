"""Ingest speed: frames per second for decoding, scaling and ActionShot on generated H.264 files.

    .venv/bin/python benchmarks/ingest.py [--frames 300] [--repeat 3] [--sizes 640x480,1920x1080]
                                          [--torch-threads N]

Generates synthetic H.264 videos (libx264, preset veryfast, a key frame every 2 s at 30 fps) in a
temporary folder, then measures for each size, best of `--repeat` runs:

- raw decode: PyAV decoding in threaded mode to YUV frames (no conversion), the upper bound;
- decode + RGB: `FileSource` at full size (swscale conversion to RGB24);
- decode + scale 224: `FileSource` scaling to 224x224 at decode time (swscale, bicubic);
- + ActionShot (exponential / mean): the above feeding the online accumulator;
- + preprocess: the above, every Shot normalised for the vision encoder (torch, batch of one);
- preprocess every frame: no ActionShot, every frame preprocessed, 16 frames per batch.

Prints a markdown table: frames per second and the ratio to raw decode.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import torch

from mixmalmm.streamer.actionshot import ActionShot
from mixmalmm.streamer.preprocess import preprocess
from mixmalmm.streamer.sources import FileSource
from mixmalmm.streamer.synthetic import synthetic_rgb, write_video

FPS = 30
SIZE = 224
BATCH = 16


def make_video(folder: Path, width: int, height: int, frames: int) -> Path:
    path = folder / f"synthetic_{width}x{height}.mp4"
    scene = 3 * FPS  # a scene cut every 3 s
    write_video(
        path,
        (synthetic_rgb(i, width, height, scene) for i in range(frames)),
        FPS,
        "libx264",
        {"preset": "veryfast", "g": str(2 * FPS)},
    )
    return path


def raw_decode(path: Path) -> int:
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            count += 1
    return count


def source_frames(path: Path, size: tuple[int, int] | None) -> int:
    return sum(1 for _ in FileSource(path, size=size))


def with_actionshot(path: Path, blend: str, prepare: bool = False) -> int:
    """Frames through ActionShot (`blend`), each Shot preprocessed (a batch of one) if `prepare`."""
    count = 0
    accumulator = ActionShot(blend=blend)  # the defaults: the cut rule, composites under 5 s
    for frame in FileSource(path, size=(SIZE, SIZE)):
        count += 1
        shot = accumulator.push(frame)
        if prepare and shot is not None:
            preprocess([shot], SIZE)
    shot = accumulator.flush()
    if prepare and shot is not None:
        preprocess([shot], SIZE)
    return count


def preprocess_batched(path: Path) -> int:
    """Every frame preprocessed, BATCH at a time (as the engine batches across streams)."""
    count, batch = 0, []
    for frame in FileSource(path, size=(SIZE, SIZE)):
        count += 1
        batch.append(frame.rgb)
        if len(batch) == BATCH:
            preprocess(batch, SIZE)
            batch = []
    if batch:
        preprocess(batch, SIZE)
    return count


def best_fps(stage: Callable[[Path], int], path: Path, repeat: int, expected: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        count = stage(path)
        elapsed = time.perf_counter() - started
        if count != expected:
            raise RuntimeError(f"decoded {count} frames, expected {expected}")
        best = min(best, elapsed)
    return expected / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300, help="frames per video (default 300, 10 s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--sizes", default="640x480,1920x1080", help="comma-separated WxH list")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads for preprocessing (0: torch's default)"
    )
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    stages: list[tuple[str, Callable[[Path], int]]] = [
        ("raw decode (YUV)", raw_decode),
        ("decode + RGB (full size)", lambda p: source_frames(p, None)),
        (f"decode + scale {SIZE}", lambda p: source_frames(p, (SIZE, SIZE))),
        (f"decode + scale {SIZE} + ActionShot (exponential)", lambda p: with_actionshot(p, "exponential")),
        (f"decode + scale {SIZE} + ActionShot (mean)", lambda p: with_actionshot(p, "mean")),
        (f"decode + scale {SIZE} + ActionShot + preprocess", lambda p: with_actionshot(p, "exponential", True)),
        (f"decode + scale {SIZE} + preprocess every frame, batches of {BATCH}", preprocess_batched),
    ]
    print(
        f"# ingest: {args.frames} frames of synthetic H.264 at {FPS} fps, best of {args.repeat}; "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"PyAV {av.__version__}\n"
    )
    print("| video | stage | frames/s | vs raw decode |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for width, height in sizes:
            path = make_video(Path(folder), width, height, args.frames)
            raw = None
            for name, stage in stages:
                fps = best_fps(stage, path, args.repeat, args.frames)
                raw = raw or fps
                print(f"| {width}x{height} | {name} | {fps:,.0f} | {fps / raw:.2f} |", flush=True)


if __name__ == "__main__":
    main()
