"""ActionShot's cut rule on real footage: recall and precision at known cuts, false cuts on hard negatives.

    bash scripts/fetch_footage.sh                  # once: Debian's opencv-doc sample videos (never committed)
    python benchmarks/actionshot_cuts.py           # 40 cut clips, 8 hard negatives of 60 s, both sample rates
    python benchmarks/actionshot_cuts.py --clips 10 --negative-seconds 20    # quicker

Media. The real recordings are the sample videos of Debian's `opencv-doc` package, made by nobody here:
`vtest.avi` (people walking, 768x576, 10 fps, 79 s), `Megamind.avi` (a film trailer, 24 fps, 11 s, with real
cuts at frames 1, 98, 154 and 200, found by eye on a contact sheet of every frame), `box.mp4` and `cup.mp4`
(a hand moving an object, 30 and 27 fps), `tree.avi` (a tree, a hand passes in front of the lens; 68 frames
over 30 s). All are decoded once at 320x240.

Clips with known cuts (`--clips`): 4-6 segments of 1.5-4 s from different shots (each no-cut video is one
shot; Megamind's four shots are four), each segment at its own frame rate and timestamps, so a clip is a
real variable-rate stream; a cut is the first frame of every segment after the first.

Hard negatives (`--negative-seconds` each, 25 fps, made from real frames, with sensor noise): a static
scene (noise only, sigma 6 levels), a slow pan (a 320x240 window gliding over a frame upscaled 2x at 12-25
pixels/s), a lighting change (gain ramps between 1.0 and 0.5-0.65 over 0.4-1.2 s, with a colour cast), a
person walking through (a dark figure 70-95 % of the frame's height crossing in 1.5-3 s); plus the real
no-cut recordings (vtest, box, cup, tree) as they are.

Rules (each fed one sampled frame at a time, online; the longest-action limit is off, so every cut counted
is the rule's own):
- MixMA-LMM's threshold: mean |frame - composite| > 127.5 grey levels (exact difference, exponential blend);
- mixmalmm's cut rule (`mixmalmm.streamer.actionshot.ActionShot`'s default `cut`: at least 45 % of the
  picture changed since the previous sampled frame, a change of light over the whole picture taken out;
  see `changed_share`);
- PySceneDetect's `ContentDetector` (defaults: threshold 27 on its HSV score, min_scene_len 15 frames), the
  established reference, through its per-frame `process_frame` API (`pip install -e '.[bench]'`, which is
  `scenedetect-headless`: the plain `scenedetect` wheel pulls the GUI OpenCV over the headless one; left
  out, with a note, when it is not installed).

Each rule runs on every decoded frame and on frames sampled at 10 per second of stream time (MA-LMM's
extraction rate). A true cut is found when the rule cuts within 2 sampled frames of it (each cut matches
at most one true cut). Prints one markdown table: recall, precision, false cuts per minute on the hard
negatives (all, and the worst kind), and ms per frame.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mixmalmm.streamer.actionshot import MIXMALMM_THRESHOLD, ActionShot, changed_share, picture_blocks
from mixmalmm.streamer.frames import Frame, FrameSampler
from mixmalmm.streamer.sources import FileSource

SIZE = (320, 240)  # (width, height) every recording is decoded to
MEGAMIND_CUTS = (1, 98, 154, 200)  # first frame of each new shot (frame 0 is black)
NO_CUT_VIDEOS = ("vtest.avi", "box.mp4", "cup.mp4", "tree.avi")
WITHIN = 2  # sampled frames: a cut this close to a true cut finds it
NEGATIVE_FPS = 25.0


def footage_dir(given: str | None) -> Path:
    folder = Path(given or os.environ.get("MIXMALMM_FOOTAGE") or Path(__file__).resolve().parents[1] / ".cache/footage")
    missing = [name for name in (*NO_CUT_VIDEOS, "Megamind.avi") if not (folder / name).is_file()]
    if missing:
        sys.exit(f"no {', '.join(missing)} in '{folder}': run `bash scripts/fetch_footage.sh {folder}` first")
    return folder


@dataclass
class Shot:
    """One uncut stretch of a real recording: RGB frames [T, H, W, 3] uint8 and their pts (seconds) [T]."""

    name: str
    rgb: np.ndarray
    pts: np.ndarray


def load_shots(folder: Path) -> list[Shot]:
    """Every no-cut recording as one shot, Megamind as its four shots (its black first frame left out)."""
    shots = []
    for name in (*NO_CUT_VIDEOS, "Megamind.avi"):
        with FileSource(folder / name, size=SIZE, interpolation="AREA") as source:
            frames = list(source)
        rgb = np.stack([f.rgb for f in frames])
        pts = np.array([f.pts for f in frames])
        if name != "Megamind.avi":
            shots.append(Shot(name, rgb, pts))
            continue
        bounds = (*MEGAMIND_CUTS, len(frames))
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            shots.append(Shot(f"Megamind shot {k + 1}", rgb[a:b], pts[a:b] - pts[a]))
    return shots


@dataclass
class Clip:
    """A stream to run the rules on: frames (with pts) and the indices of its true cuts (first new frames)."""

    name: str
    kind: str
    frames: list[Frame]
    cuts: list[int] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.frames[-1].pts - self.frames[0].pts if len(self.frames) > 1 else 0.0


def cut_clips(shots: list[Shot], count: int, rng: np.random.Generator) -> list[Clip]:
    """Clips of 4-6 segments from different shots, each 1.5-4 s (or the whole shot when shorter)."""
    clips = []
    for c in range(count):
        order: list[int] = []
        segments = int(rng.integers(4, 7))
        while len(order) < segments:
            k = int(rng.integers(0, len(shots)))
            if not order or k != order[-1]:  # another shot: another recording, or another of Megamind's shots
                order.append(k)
        frames: list[Frame] = []
        cuts: list[int] = []
        t0 = 0.0
        for j, k in enumerate(order):
            shot = shots[k]
            length = float(rng.uniform(1.5, 4.0))
            span = shot.pts[-1] - shot.pts[0]
            start = float(rng.uniform(0, max(span - length, 0.0)))
            idx = np.nonzero((shot.pts >= start) & (shot.pts <= start + length))[0]
            if len(idx) < 2:
                idx = np.arange(min(2, len(shot.pts)))
            if j:
                cuts.append(len(frames))
            interval = float(np.median(np.diff(shot.pts))) if len(shot.pts) > 1 else 0.04
            for i in idx:
                frames.append(Frame(shot.rgb[i], t0 + float(shot.pts[i] - shot.pts[idx[0]]), len(frames), 0.0))
            t0 = frames[-1].pts + interval
        clips.append(Clip(f"cuts {c}", "cuts", frames, cuts))
    return clips


def _noisy(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)


def _frames(images: Iterator[np.ndarray], fps: float) -> list[Frame]:
    return [Frame(img, i / fps, i, 0.0) for i, img in enumerate(images)]


def hard_negatives(shots: list[Shot], seconds: float, rng: np.random.Generator) -> list[Clip]:
    """Generated no-cut clips from real frames (see the module doc), two of each kind, then the real ones."""
    n = int(seconds * NEGATIVE_FPS)
    stills = [s.rgb[len(s.rgb) // 2] for s in shots]
    W, H = SIZE
    out = []

    def still() -> np.ndarray:
        return stills[int(rng.integers(0, len(stills)))].astype(np.float32)

    for rep in range(2):
        base = still()
        out.append(Clip(f"static + noise {rep}", "static", _frames((_noisy(base, rng, 6.0) for _ in range(n)), NEGATIVE_FPS)))

        big = cv2.resize(still(), (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC)
        speed = float(rng.uniform(12, 25)) / NEGATIVE_FPS  # pixels per frame

        def pan(big=big, speed=speed):
            x, y, dx, dy = 0.0, float(rng.uniform(0, H)), speed, speed * 0.3
            for _ in range(n):
                if not 0 <= x + dx <= W:
                    dx = -dx
                if not 0 <= y + dy <= H:
                    dy = -dy
                x, y = x + dx, y + dy
                m = np.float32([[1, 0, -x], [0, 1, -y]])
                yield _noisy(cv2.warpAffine(big, m, (W, H), flags=cv2.INTER_LINEAR), rng, 3.0)

        out.append(Clip(f"slow pan {rep}", "pan", _frames(pan(), NEGATIVE_FPS)))

        base = still()
        gain = np.ones(n, np.float32)
        t = int(rng.integers(10, 40))
        while t < n:
            low = float(rng.uniform(0.5, 0.65))
            ramp = int(rng.uniform(0.4, 1.2) * NEGATIVE_FPS)
            hold = int(rng.uniform(1.0, 3.0) * NEGATIVE_FPS)
            down = np.linspace(1.0, low, ramp)
            seg = np.concatenate([down, np.full(hold, low), down[::-1]])
            gain[t : t + len(seg)] = seg[: max(0, n - t)]
            t += len(seg) + int(rng.uniform(1.0, 3.0) * NEGATIVE_FPS)
        cast = np.array([1.0, 0.97, 0.88], np.float32)  # darker light is warmer

        def lit(base=base, gain=gain, cast=cast):
            for g in gain:
                tint = 1.0 + (1.0 - g) / 0.5 * (cast - 1.0)
                yield _noisy(base * g * tint, rng, 3.0)

        out.append(Clip(f"lighting {rep}", "lighting", _frames(lit(), NEGATIVE_FPS)))

        base = still()
        texture = still()

        def walk(base=base, texture=texture):
            t = 0
            while t < n:
                crossing = int(rng.uniform(1.5, 3.0) * NEGATIVE_FPS)
                height = float(rng.uniform(0.7, 0.95)) * H
                width = 0.32 * height
                direction = 1 if rng.random() < 0.5 else -1
                pause = int(rng.uniform(1.0, 4.0) * NEGATIVE_FPS)
                for k in range(crossing):
                    if t >= n:
                        return
                    f = k / max(crossing - 1, 1)
                    cx = (-width + f * (W + 2 * width)) if direction > 0 else (W + width - f * (W + 2 * width))
                    mask = np.zeros((H, W), np.uint8)
                    top = int(H - height)
                    head = int(0.13 * height)
                    cv2.circle(mask, (int(cx), top + head), head, 255, -1)
                    sway = int(0.04 * width * np.sin(2 * np.pi * 2 * k / NEGATIVE_FPS))
                    cv2.rectangle(mask, (int(cx - width / 2) + sway, top + 2 * head), (int(cx + width / 2) + sway, H), 255, -1)
                    m = (mask > 0)[..., None]
                    img = np.where(m, texture * 0.35, base)
                    yield _noisy(img, rng, 3.0)
                    t += 1
                for _ in range(pause):
                    if t >= n:
                        return
                    yield _noisy(base, rng, 3.0)
                    t += 1

        out.append(Clip(f"person walks through {rep}", "person", _frames(walk(), NEGATIVE_FPS)))
    for s in shots:
        if "shot" in s.name:
            continue
        frames = [Frame(img, float(p), i, 0.0) for i, (img, p) in enumerate(zip(s.rgb, s.pts, strict=True))]
        out.append(Clip(s.name, "real, no cut", frames))
    return out


def sample(frames: list[Frame], fps: float | None) -> list[Frame]:
    """Every frame (fps None) or at most `fps` per second of stream time, as the engine samples them
    (`FrameSampler`, ActionShot's `sample_fps`)."""
    sampler = FrameSampler(1, fps)
    return [f for f in frames if sampler.keep(f.pts)]


# ------------------------------------------------------------------------------------------------ rules


def actionshot_cuts(make: Callable[[], ActionShot]) -> Callable[[list[Frame]], list[int]]:
    """Positions (in the given frames) where an ActionShot accumulator starts a new composite."""

    def run(frames: list[Frame]) -> list[int]:
        acc, cuts = make(), []
        index = {f.index: i for i, f in enumerate(frames)}
        for f in frames:
            shot = acc.push(f)
            if shot is not None:
                cuts.append(index[shot.last_index] + 1)
        return cuts

    return run


def scenedetect_cuts(frames: list[Frame]) -> list[int]:
    from scenedetect.common import FrameTimecode
    from scenedetect.detectors import ContentDetector

    detector = ContentDetector()
    fps = (len(frames) - 1) / max(frames[-1].pts - frames[0].pts, 1e-6)
    cuts = []
    for i, f in enumerate(frames):
        for tc in detector.process_frame(FrameTimecode(i, fps), cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR)):
            cuts.append(int(tc.frame_num))
    return sorted(set(c for c in cuts if c > 0))


def match(found: list[int], truth: list[int], within: int = WITHIN) -> int:
    """True cuts found: greedily pair each true cut with the nearest unused cut within `within` positions."""
    used, hits = set(), 0
    for t in truth:
        near = [c for c in found if abs(c - t) <= within and c not in used]
        if near:
            used.add(min(near, key=lambda c: abs(c - t)))
            hits += 1
    return hits


def evaluate(rule: Callable[[list[Frame]], list[int]], clips: list[Clip], negatives: list[Clip], fps: float | None):
    tp = fn = fp_cut = 0
    frames_run, seconds_run = 0, 0.0
    for clip in clips:
        frames = sample(clip.frames, fps)
        # a true cut in the sampled frames: the first sampled frame at or after it
        truth = sorted({next(i for i, f in enumerate(frames) if f.index >= c) for c in clip.cuts if c <= frames[-1].index})
        t0 = time.perf_counter()
        found = rule(frames)
        seconds_run += time.perf_counter() - t0
        frames_run += len(frames)
        hits = match(found, truth)
        tp += hits
        fn += len(truth) - hits
        fp_cut += len(found) - hits
    per_kind: dict[str, tuple[int, float]] = {}
    for clip in negatives:
        frames = sample(clip.frames, fps)
        t0 = time.perf_counter()
        found = rule(frames)
        seconds_run += time.perf_counter() - t0
        frames_run += len(frames)
        n, s = per_kind.get(clip.kind, (0, 0.0))
        per_kind[clip.kind] = (n + len(found), s + clip.seconds)
    false = sum(n for n, _ in per_kind.values())
    minutes = sum(s for _, s in per_kind.values()) / 60.0
    worst = max(per_kind.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-9))
    return {
        "recall": tp / max(tp + fn, 1),
        "precision": tp / max(tp + fp_cut, 1),
        "false_per_min": false / minutes,
        "worst": f"{worst[0]} {60 * worst[1][0] / max(worst[1][1], 1e-9):.1f}",
        "ms_per_frame": 1000 * seconds_run / max(frames_run, 1),
        "per_kind": {k: 60 * n / max(s, 1e-9) for k, (n, s) in per_kind.items()},
    }


def share_margin(clips: list[Clip], negatives: list[Clip], fps: float | None) -> tuple[float, float, str]:
    """(smallest changed share at a true cut, largest between any other two consecutive sampled frames, where)."""
    at_cuts, elsewhere, where = [], 0.0, ""
    for clip in clips + negatives:
        frames = sample(clip.frames, fps)
        truth = {next(i for i, f in enumerate(frames) if f.index >= c) for c in clip.cuts if c <= frames[-1].index}
        blocks = [picture_blocks(f.rgb) for f in frames]
        for i in range(1, len(frames)):
            share = changed_share(blocks[i - 1], blocks[i])
            if i in truth:
                at_cuts.append(share)
            elif share > elsewhere:
                elsewhere, where = share, clip.name
    return min(at_cuts), elsewhere, where


def _have_scenedetect() -> bool:
    import importlib.util

    return importlib.util.find_spec("scenedetect") is not None


RULES: dict[str, Callable[[list[Frame]], list[int]]] = {
    "MixMA-LMM: mean abs. difference to the composite > 127.5": actionshot_cuts(
        lambda: ActionShot(cut=None, threshold=MIXMALMM_THRESHOLD, max_seconds=None)
    ),
    "mixmalmm cut rule (default)": actionshot_cuts(lambda: ActionShot(max_seconds=None)),
    "PySceneDetect ContentDetector (27, 15 frames)": scenedetect_cuts,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--footage", help="folder with the opencv-doc videos (default .cache/footage or $MIXMALMM_FOOTAGE)")
    p.add_argument("--clips", type=int, default=40, help="clips with known cuts")
    p.add_argument("--negative-seconds", type=float, default=60.0, help="length of each generated hard negative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rates", default="all,10", help="sample rates to run the rules at: 'all' (every frame) or "
                                                   "frames per second, comma-separated (default all,10)")
    p.add_argument("--per-kind", action="store_true", help="also print false cuts per minute per kind of negative")
    args = p.parse_args()
    shots = load_shots(footage_dir(args.footage))
    rng = np.random.default_rng(args.seed)
    clips = cut_clips(shots, args.clips, rng)
    negatives = hard_negatives(shots, args.negative_seconds, rng)
    n_cuts = sum(len(c.cuts) for c in clips)
    neg_min = sum(c.seconds for c in negatives) / 60
    print(f"{len(clips)} clips with {n_cuts} true cuts ({sum(c.seconds for c in clips) / 60:.1f} min); "
          f"hard negatives: {len(negatives)} clips, {neg_min:.1f} min. Found = a cut within {WITHIN} sampled frames.\n")
    print("| rule | sampled | recall | precision | false cuts / min (hard negatives) | worst kind, / min | ms / frame |")
    print("|---|---|---|---|---|---|---|")
    kinds = {}
    rates = [None if r.strip() == "all" else float(r) for r in args.rates.split(",")]
    rules = {k: v for k, v in RULES.items() if v is not scenedetect_cuts or _have_scenedetect()}
    for fps in rates:
        for name, rule in rules.items():
            r = evaluate(rule, clips, negatives, fps)
            kinds[(name, fps)] = r["per_kind"]
            print(f"| {name} | {'every frame' if fps is None else f'{fps:g} fps'} | {r['recall']:.3f} | "
                  f"{r['precision']:.3f} | {r['false_per_min']:.2f} | {r['worst']} | {r['ms_per_frame']:.2f} |")
    print("\nShare of the picture changed between consecutive sampled frames (mixmalmm's cut rule: cut at >= 0.45):\n")
    print("| sampled | smallest at a true cut | largest elsewhere | where |")
    print("|---|---|---|---|")
    for fps in rates:
        low, high, where = share_margin(clips, negatives, fps)
        print(f"| {'every frame' if fps is None else f'{fps:g} fps'} | {low:.3f} | {high:.3f} | {where} |")
    if len(rules) < len(RULES):
        print("\n(PySceneDetect is not installed: pip install -e '.[bench]' adds its column.)")
    if args.per_kind:
        names = sorted({k for v in kinds.values() for k in v})
        print("\n| rule | sampled | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for (name, fps), v in kinds.items():
            print(f"| {name} | {'every frame' if fps is None else f'{fps:g} fps'} | "
                  + " | ".join(f"{v.get(k, 0):.2f}" for k in names) + " |")


if __name__ == "__main__":
    main()
