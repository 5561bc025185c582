"""Speed of `mixmalmm eval`'s loop (`mixmalmm.streamer.evaluate.predict`) on the built-in model.

    python benchmarks/eval.py                  # 8 videos, 2 questions each, 20 frames (MA-LMM's QA setting)
    python benchmarks/eval.py --frames 100     # MA-LMM's long-video setting
    python benchmarks/eval.py --captions       # msrvtt-cap: caption generation and the COCO metrics

Writes a tiny MSVD-QA-format dataset to a temporary folder (generated 160x120 H.264 videos at 10 fps,
their extracted frame%06d.jpg folders, qa_test.json), then times the whole loop (frames read and
resized, the clip algorithm, beam or greedy decoding, scoring left out) from frame folders and from
the videos, per batch size. Prints a markdown table: seconds and questions per second (one run each,
after a warm-up batch). --captions: an MSRVTT-caption-format dataset instead (20 captions a video,
MA-LMM's caption settings: 80 frames, M = 40, 5 beams, up to 50 tokens), the clips captioned per second
from frame folders, then the seconds pycocoevalcap's metrics take on those captions, with Java (PTB
tokenizer, METEOR) and without. Also the streaming engine path (`predict_stream`, `eval --mode stream`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mixmalmm.model.datasets import DATASETS, read_items  # noqa: E402
from mixmalmm.streamer.evaluate import configure, predict, predict_stream  # noqa: E402
from mixmalmm.streamer.options import builtin_model  # noqa: E402
from mixmalmm.streamer.synthetic import synthetic_rgb, write_video  # noqa: E402


def write_dataset(root: Path, videos: int, seconds: int) -> None:
    """videos/v<k>.mp4, frames/v<k>/frame%06d.jpg and annotation/qa_test.json (2 questions a video)."""
    (root / "videos").mkdir()
    (root / "annotation").mkdir()
    n = seconds * 10
    entries = {}
    for k in range(videos):
        frames = [synthetic_rgb(i + 13 * k, 160, 120, scene_length=20) for i in range(n)]
        write_video(root / "videos" / f"v{k}.mp4", frames, 10, "libx264", {"preset": "ultrafast"})
        folder = root / "frames" / f"v{k}"
        folder.mkdir(parents=True)
        for i, rgb in enumerate(frames):
            cv2.imwrite(str(folder / f"frame{i + 1:06d}.jpg"), rgb[..., ::-1])
        for j, q in enumerate(("what colour is the square?", "is the scene dark?")):
            qid = f"{k:04d}{j}"
            entries[qid] = {"answer": "white", "question": q, "answer_type": "what", "question_id": qid,
                            "video": f"v{k}", "frame_length": n}
    (root / "annotation" / "qa_test.json").write_text(json.dumps(entries))


def write_caption_dataset(root: Path, videos: int, seconds: int) -> None:
    """frames/v<k>/frame%06d.jpg and annotation/cap_test.json + coco_gt/cap_test.json (20 captions a video)."""
    (root / "annotation" / "coco_gt").mkdir(parents=True)
    n = seconds * 10
    entries, gt = {}, {"annotations": [], "images": []}
    words = ["square", "circle", "moves", "left", "right", "white", "dark", "scene", "slowly", "a", "the"]
    for k in range(videos):
        folder = root / "frames" / f"v{k}"
        folder.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(folder / f"frame{i + 1:06d}.jpg"), synthetic_rgb(i + 13 * k, 160, 120, scene_length=20)[..., ::-1])
        gt["images"].append({"id": f"v{k}"})
        for j in range(20):
            cid = len(entries)
            caption = " ".join(words[(k + j + w) % len(words)] for w in range(6 + j % 5))
            entries[str(cid)] = {"image_id": f"v{k}.mp4", "caption": caption, "id": cid, "video": f"v{k}",
                                 "frame_length": n}
            gt["annotations"].append({"image_id": f"v{k}", "caption": caption, "id": cid})
    (root / "annotation" / "cap_test.json").write_text(json.dumps(entries))
    (root / "annotation" / "coco_gt" / "cap_test.json").write_text(json.dumps(gt))


def captions(args, model) -> None:
    from mixmalmm.model.datasets import read_references
    from mixmalmm.model.metrics import caption_scores, java_available
    from mixmalmm.streamer.evaluate import clip_items

    spec = DATASETS["msrvtt-cap"]
    configure(model, spec)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_caption_dataset(root, args.videos, args.seconds)
        items = clip_items(read_items(spec, root / "annotation"))
        refs, _ = read_references(spec, root / "annotation")
        kw = {"frames": root / "frames", "batch_size": 8, "num_beams": spec.num_beams,
              "max_new_tokens": spec.max_new_tokens, "min_new_tokens": spec.min_new_tokens,
              "length_penalty": spec.length_penalty}
        predict(model, items[:1], **kw)  # warm-up
        t = time.perf_counter()
        texts = predict(model, items, **kw)
        generate_s = time.perf_counter() - t
    predicted = {it.image_id: c for it, c in zip(items, texts, strict=True)}
    rows = []
    for java in ([True, False] if java_available() else [False]):
        t = time.perf_counter()
        scores = caption_scores({k: refs[k] for k in predicted}, predicted, java=java)
        rows.append(("PTB tokenizer + METEOR (Java)" if java else "simple tokenizer, no METEOR", len(scores),
                     time.perf_counter() - t))
    print(f"{len(items)} clips of {args.seconds} s, {spec.num_frames} frames each, M={spec.memory_bank_length}, "
          f"{spec.num_beams} beams, up to {spec.max_new_tokens} tokens, {torch.get_num_threads()} threads\n")
    print("| step | seconds | clips/s |")
    print("|---|---:|---:|")
    print(f"| caption generation (frame folders, batch 8) | {generate_s:.2f} | {len(items) / generate_s:.2f} |")
    for name, metrics, seconds in rows:
        print(f"| metrics, {name}: {metrics} scores | {seconds:.2f} | {len(items) / seconds:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--seconds", type=int, default=12, help="length of each video")
    p.add_argument("--frames", type=int, default=20, help="frames per clip")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--captions", action="store_true", help="the captioning benchmark (msrvtt-cap's settings)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = builtin_model().eval()
    if args.captions:
        captions(args, model)
        return
    configure(model, DATASETS["msvd-qa"])  # M = 10, the QA prompt
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root, args.videos, args.seconds)
        items = read_items(DATASETS["msvd-qa"], root / "annotation", num_frames=args.frames)
        rows = []
        for source in ("frames", "videos"):
            for batch, beams in ((1, 5), (8, 5), (8, 1)):
                kw = {source: root / source, "batch_size": batch, "num_beams": beams}
                predict(model, items[:batch], **kw)  # warm-up
                t = time.perf_counter()
                predict(model, items, **kw)
                rows.append(("clip", source, batch, beams, time.perf_counter() - t))
        for batch, beams in ((8, 5), (8, 1)):  # the engine path (eval --mode stream), frames from folders
            kw = {"frames": root / "frames", "batch_size": batch, "num_beams": beams}
            predict_stream(model, items[:batch], **kw)  # warm-up
            t = time.perf_counter()
            predict_stream(model, items, **kw)
            rows.append(("stream", "frames", batch, beams, time.perf_counter() - t))
    print(f"{len(items)} questions about {args.videos} videos, {args.frames} frames each, "
          f"M={model.config.memory_bank_length}, {torch.get_num_threads()} threads\n")
    print("| mode | frames from | batch | beams | seconds | questions/s |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, source, batch, beams, seconds in rows:
        print(f"| {mode} | {source} | {batch} | {beams} | {seconds:.2f} | {len(items) / seconds:.1f} |")


if __name__ == "__main__":
    main()
