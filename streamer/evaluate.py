"""``mixmalmm eval``: a model on one of MA-LMM's datasets, scored as MA-LMM scores it.

Reads the dataset's annotation file in MA-LMM's layout (`mixmalmm.model.datasets`), takes each
item's frames from extracted frame folders or straight from its video, runs the clip algorithm
(`MALMM.clip_query_output`: every sampled frame in order through the memory banks, then one answer
per question), scores the answers (`mixmalmm.model.metrics`), prints a table beside the paper's
numbers and writes every prediction to a JSON file. Classification also scores top-5 (5 beams
returned, as MA-LMM); captioning generates one caption per clip and scores BLEU-4, METEOR, ROUGE-L
and CIDEr against the COCO ground truth.

`--mode stream` answers the same items by the streaming engine path instead (`predict_stream`): each
clip's sampled frames go through a real `Engine` as a stream, frame by frame, with one standing
question per item; `--mode both` runs both and reports their distance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from .options import (
    EXIT_OK,
    UserError,
    actionshot_settings,
    add_actionshot_arguments,
    add_model_arguments,
    load_model,
)

log = logging.getLogger("mixmalmm")

MODES = ("clip", "stream", "both")
#: How stream mode ingests a clip unless told otherwise: every frame MA-LMM's sampling picks is one Shot
#: (no further sampling, no ActionShot); the fields left out come from the model, as for `serve`.
STREAM_INGEST = {"enabled": False, "step": 1, "sample_fps": None}


def add_parser(commands) -> None:
    from mixmalmm.model.datasets import DATASETS, LVU_HISTORY_S, LVU_STRIDE_S, LVU_TASKS

    p = commands.add_parser(
        "eval", help="evaluate a model on one of MA-LMM's datasets (its annotation files) and print a table "
                     "beside the paper's numbers",
        description="Evaluate on an MA-LMM dataset with MA-LMM's clip algorithm: annotations as published in "
                    "its repository, frames from extracted folders (frame%06d.jpg at 10 fps) or decoded from "
                    "the videos at 10 fps, its frame sampling, prompts, decoding and metric.",
    )
    p.add_argument("dataset", choices=sorted(DATASETS), metavar="DATASET",
                   help=f"one of {', '.join(sorted(DATASETS))}")
    d = p.add_argument_group("data")
    d.add_argument("--annotations", required=True, metavar="DIR",
                   help="the folder of the dataset's annotation files (MA-LMM's data/<dataset>/annotation), or "
                        "the split's file itself")
    d.add_argument("--videos", metavar="DIR", help="folder of the videos, <video>.mp4 (or .avi, .mkv, ...)")
    d.add_argument("--frames", metavar="DIR",
                   help="folder of extracted frames, <video>/frame000001.jpg... at 10 fps (used instead of "
                        "--videos when given)")
    d.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: test")
    d.add_argument("--limit", type=int, metavar="N", help="the first N items only")
    d.add_argument("--num-frames", type=int, metavar="N",
                   help="frames per clip (MA-LMM: 20 for QA, 100 for LVU, Breakfast, COIN)")
    d.add_argument("--task", action="append", choices=LVU_TASKS, metavar="TASK",
                   help=f"LVU only: a task to evaluate (repeatable; default all seven: {', '.join(LVU_TASKS)})")
    d.add_argument("--history", type=int, default=LVU_HISTORY_S, metavar="S",
                   help=f"LVU only: seconds per window (default {LVU_HISTORY_S}, as MA-LMM)")
    d.add_argument("--stride", type=int, default=LVU_STRIDE_S, metavar="S",
                   help=f"LVU only: seconds between window starts (default {LVU_STRIDE_S}, as MA-LMM)")
    add_model_arguments(p)
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=8, metavar="N", help="questions per batch (default 8)")
    r.add_argument("--num-beams", type=int, metavar="N", help="beam search width (MA-LMM: 5)")
    r.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="longest answer in tokens (MA-LMM: 10 for QA, 5 for LVU, 20 for Breakfast and COIN, "
                        "50 for MSRVTT/MSVD captions, 30 for YouCook2)")
    r.add_argument("--resize", choices=["malmm", "antialias"], default="malmm",
                   help="malmm (default): MA-LMM's evaluation resize, bicubic without antialiasing, truncated; "
                        "antialias: the engine's, as InstructBLIP's image processor")
    r.add_argument("--mode", choices=MODES, default="clip",
                   help="clip (default): MA-LMM's clip algorithm; stream: the engine's streaming path, each clip a "
                        "stream fed frame by frame, each question a standing question; both: both, with the "
                        "distance between them (answer agreement, query outputs' relative difference)")
    r.add_argument("--max-standing", type=int, default=8, metavar="N",
                   help="stream mode: standing questions per stream (serve's --max-standing, default 8); a clip "
                        "asked more questions is ingested by several streams")
    r.add_argument("--out", metavar="FILE", help="the results as JSON (default: ./eval-<dataset>-<split>.json)")
    r.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_actionshot_arguments(p)  # stream mode's ingest; the defaults keep MA-LMM's frames (STREAM_INGEST)
    p.set_defaults(run=run_eval)


def _check(args: argparse.Namespace) -> None:
    for name in ("limit", "num_frames", "num_beams", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_standing < 1:
        raise UserError(f"--max-standing must be at least 1, got {args.max_standing}")
    if args.mode == "clip" and actionshot_settings(args).given():
        raise UserError("the ActionShot options (--actionshot, --step, --sample-fps, ...) are for --mode stream or both")
    check_data_arguments(args)


def check_data_arguments(args: argparse.Namespace) -> None:
    """What `eval` and `train` share: the memory bank length, the frame source folders, LVU's options."""
    if args.memory_bank_length is not None and args.memory_bank_length < 0:
        raise UserError(f"--memory-bank-length must be >= 0, got {args.memory_bank_length}")
    if args.frames is None and args.videos is None:
        raise UserError("give --videos DIR (the videos) or --frames DIR (their extracted frames)")
    for option, folder in (("--frames", args.frames), ("--videos", args.videos)):
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"{option} '{folder}' is not a folder")
    from mixmalmm.model.datasets import LVU_HISTORY_S, LVU_STRIDE_S

    if args.dataset != "lvu" and (args.task or args.history != LVU_HISTORY_S or args.stride != LVU_STRIDE_S):
        raise UserError("--task, --history and --stride are for lvu only")


def run_eval(args: argparse.Namespace) -> int:
    from mixmalmm.model.datasets import DATASETS, LVU_TASKS, read_items

    _check(args)
    spec = DATASETS[args.dataset]
    try:
        items = read_items(spec, args.annotations, args.split, num_frames=args.num_frames,
                           tasks=args.task or LVU_TASKS, history_s=args.history, stride_s=args.stride)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    references = None
    if spec.family == "captioning" and args.mode != "clip":
        raise UserError(f"--mode {args.mode} is for the QA and classification datasets: {spec.name} is scored "
                        "with --mode clip")
    if spec.family == "captioning":
        items = clip_items(items)  # one caption per clip, as MA-LMM keeps one result per image_id
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise UserError(f"no {args.split} items in the {spec.name} annotations '{args.annotations}'")
    if spec.family == "captioning":
        references = _caption_references(spec, args, items)
    _check_sources(items, args)
    out = Path(args.out) if args.out else Path(f"eval-{spec.name}-{args.split}.json")
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):  # before hours of work
        raise UserError(f"cannot write the results to '{out}': not a file in a writable folder")
    from mixmalmm.model import distributed

    try:  # under torchrun: this process answers every N-th batch, rank 0 writes the report
        distributed.init_from_env(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"torch.distributed: {exc}") from exc
    if args.mode != "clip" and distributed.is_distributed():
        distributed.finish()
        raise UserError(f"--mode {args.mode} runs in one process: under torchrun only --mode clip is sharded")
    args.device = distributed.local_device(args.device)
    model, name = load_model(args)
    M = configure(model, spec, args.memory_bank_length)
    settings = {"memory_bank_length": M, "num_frames": len(items[0].frames),
                "num_beams": args.num_beams or spec.num_beams, "max_new_tokens": args.max_new_tokens or spec.max_new_tokens,
                "prompt_template": spec.prompt_template, "resize": args.resize}
    decoding = {}
    if spec.min_new_tokens is not None:
        decoding["min_new_tokens"] = min(spec.min_new_tokens, settings["max_new_tokens"])
    if spec.length_penalty is not None:
        decoding["length_penalty"] = spec.length_penalty
    settings.update(decoding)
    # MA-LMM's classification returns every beam (num_captions = num_beams) and scores top-5 on them.
    candidates = settings["num_beams"] if spec.family == "classification" else 1
    if args.mode == "clip":
        started = time.perf_counter()
        try:
            predictions = predict_sharded(model, items, frames=args.frames, videos=args.videos,
                                          batch_size=args.batch_size, max_new_tokens=settings["max_new_tokens"],
                                          num_beams=settings["num_beams"], resize=args.resize,
                                          candidates=candidates, **decoding,
                                          progress=lambda done, total: log.info("%s: %d/%d items", spec.name, done, total))
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        finally:
            distributed.finish()
        if predictions is None:  # not rank 0: its answers went to rank 0
            return EXIT_OK
        seconds = time.perf_counter() - started
        if spec.family == "captioning":
            report = _caption_report(spec, args, name, settings, items, predictions, references, seconds)
        else:
            report = _report(spec, args, name, settings, items, predictions, seconds)
        report["mode"] = "clip"
    else:
        distributed.finish()  # one process (refused under torchrun above)
        try:
            ingest = stream_ingest(model, actionshot_settings(args))
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        settings["ingest"] = msgspec.to_builtins(ingest)
        started = time.perf_counter()
        try:
            runs = run_modes(model, items, args.mode, frames=args.frames, videos=args.videos,
                             batch_size=args.batch_size, max_new_tokens=settings["max_new_tokens"],
                             num_beams=settings["num_beams"], resize=args.resize, actionshot=ingest,
                             max_standing=args.max_standing,
                             progress=lambda done, total: log.info("%s: %d/%d items", spec.name, done, total))
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        report = _modes_report(spec, args, name, settings, items, runs, time.perf_counter() - started)
    try:
        out.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the results to '{out}': {exc.strerror or exc}") from exc
    print(format_table(report))
    if report["mode"] != "clip":
        print(format_modes(report))
    print(f"results: {out}")
    return EXIT_OK


def configure(model, spec, memory_bank_length: int | None = None) -> int:
    """Set the model up as MA-LMM evaluates `spec`: its memory bank length (unless one is given) and its
    prompt template; the model's other settings stay. Returns the memory bank length."""
    M = spec.memory_bank_length if memory_bank_length is None else memory_bank_length
    model.config = replace(model.config, memory_bank_length=M, prompt_template=spec.prompt_template)
    return M


def clip_items(items):
    """Captioning: the first item (in annotation order) of each clip (`Item.image_id`): every reference
    caption of a clip is an item, and MA-LMM keeps one result per image_id (the first)."""
    first: dict[str, object] = {}
    for it in items:
        first.setdefault(it.image_id, it)
    return list(first.values())


def _caption_references(spec, args, items) -> dict[str, list[str]]:
    """The reference captions of the clips to caption (before the model loads): every clip needs some."""
    from mixmalmm.model.datasets import read_references

    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as exc:
        raise UserError("the captioning metrics need pycocoevalcap: pip install -e '.[eval]'") from exc
    try:
        references, _ = read_references(spec, args.annotations, args.split)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    for it in items:
        if not any(c.strip() for c in references.get(it.image_id, ())):
            hint = (" (YouCook2's test captions are not published: MA-LMM reports --split val)"
                    if spec.name == "youcook2" and args.split == "test" else "")
            raise UserError(f"clip {it.image_id!r} has no reference caption in the ground truth{hint}")
    return {it.image_id: references[it.image_id] for it in items}


def _check_sources(items, args) -> None:
    """Every item's frame folder or video is there (before the model loads: cheap mistakes first)."""
    from mixmalmm.model.datasets import find_video

    for video in dict.fromkeys(it.video for it in items):
        try:
            if args.frames is None:
                find_video(args.videos, video)
            elif not (Path(args.frames) / video).is_dir():
                raise ValueError(f"no frame folder '{Path(args.frames) / video}'")
        except ValueError as exc:
            item = next(it for it in items if it.video == video)
            raise UserError(f"item {item.id!r}: {exc}") from exc


def predict(model, items, *, frames=None, videos=None, batch_size: int = 8, max_new_tokens: int = 10,
            num_beams: int = 5, resize: str = "malmm", progress=None, candidates: int = 1,
            min_new_tokens: int | None = None, length_penalty: float | None = None,
            outputs: list | None = None) -> list:
    """The model's answer to every item (`mixmalmm.model.datasets.Item`) by the clip algorithm, batch by
    batch; the items of a batch that share a clip (same video, same frames) share its vision pass and
    visual memory. frames / videos: the folders of extracted frames / videos (`clip_frames`). resize:
    "malmm" (MA-LMM's evaluation resize, `malmm_resize`) or "antialias" (the model's own preprocessing,
    `frames_to_pixels`: antialiased bicubic, rounded, as InstructBLIP's image processor and the engine).
    progress(done, total) is called after each batch. ValueError when an item's frames cannot be read.
    candidates > 1: each item's list of that many beams' texts, best first (its first is the answer
    given with candidates 1), instead of one text. min_new_tokens, length_penalty: over the model's
    decoding (None: the model's). outputs: when a list, each item's query outputs (the LLM's visual
    input, [Q, C_q] float32 on the CPU) are appended to it."""
    import torch

    from mixmalmm.model.datasets import clip_frames, malmm_resize
    from mixmalmm.model.train import frames_to_pixels

    if resize not in ("malmm", "antialias"):
        raise ValueError(f"resize must be 'malmm' or 'antialias', got {resize!r}")

    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        first: dict[tuple, object] = {}  # (video, frames) -> the first item about that clip
        for it in batch:
            first.setdefault((it.video, it.frames), it)
        index = {key: c for c, key in enumerate(first)}
        pixels = []
        for item in first.values():
            try:
                rgb = clip_frames(item, frames=frames, videos=videos)
            except ValueError as exc:
                raise ValueError(f"item {item.id!r}: {exc}") from exc
            if resize == "malmm":  # then frames_to_pixels only normalises: the frames have the model's size
                rgb = malmm_resize(rgb, model.image_size)
            pixels.append(frames_to_pixels(rgb, model.image_size, mean, std))
        questions = [it.question for it in batch]
        with torch.inference_mode():
            output = model.clip_query_output(torch.stack(pixels), questions,
                                             clips=[index[it.video, it.frames] for it in batch])
            found = model.generate_candidates(output, questions, candidates, max_new_tokens=max_new_tokens,
                                              num_beams=num_beams, min_new_tokens=min_new_tokens,
                                              length_penalty=length_penalty)
        answers.extend([text for _, text in c] if candidates > 1 else c[0][1] for c in found)
        if outputs is not None:
            outputs.extend(row.float().cpu() for row in output)
        if progress is not None:
            progress(len(answers), len(items))
    return answers


def predict_sharded(model, items, *, batch_size: int = 8, **kw) -> list[str] | None:
    """`predict` over this process's batches (`mixmalmm.model.distributed.shard`: batch b of the items
    goes to rank b mod N), every answer gathered to rank 0 in the items' order: rank 0 (or a single
    process) gets the list, other ranks None. Each batch holds the items one process would batch
    together, so the answers are a single process's."""
    from mixmalmm.model import distributed

    mine = [i for batch in distributed.shard(len(items), batch_size) for i in batch]
    answers = predict(model, [items[i] for i in mine], batch_size=batch_size, **kw)
    return distributed.gather_shards(mine, answers)


def stream_ingest(model, given=None):
    """The ingest settings stream mode runs with, every field set: `given` (a partial
    `ActionShotSettings`, the command line's) over `STREAM_INGEST` over the model's own (as `serve`
    resolves them). ValueError when the model's are bad."""
    from mixmalmm.clients import protocol as P

    from .ingest import model_settings

    base = P.ActionShotSettings(**STREAM_INGEST).over(model_settings(model))
    return given.over(base) if given is not None else base


class _StreamEnds:
    """The engine's `publish`: remembers how each stream ended (finished, failed, stopped) for `wait`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ends: dict[str, tuple[str, str | None]] = {}

    def __call__(self, event) -> None:
        state = getattr(event, "state", None)
        if state in ("finished", "failed", "stopped") and getattr(event, "question_id", None) is None:
            with self._cond:
                self._ends[event.stream] = (state, event.message)
                self._cond.notify_all()

    def wait(self, sids) -> dict[str, tuple[str, str | None]]:
        with self._cond:
            self._cond.wait_for(lambda: all(s in self._ends for s in sids))
            return {s: self._ends.pop(s) for s in sids}


def predict_stream(model, items, *, frames=None, videos=None, batch_size: int = 8, max_new_tokens: int = 10,
                   num_beams: int = 5, resize: str = "malmm", actionshot=None, max_standing: int = 8,
                   progress=None, outputs: list | None = None) -> list[str]:
    """The model's answer to every item by the streaming engine path, as `serve` answers a standing question.

    A real `Engine` runs around the model. Batch by batch (`batch_size` items), each clip (video, frames)
    becomes a stream: its frames, sampled as `predict` samples them (MA-LMM's evaluation indices, read
    and resized alike; resize "antialias" leaves the resize to the engine's preprocessing), are replayed
    by a `FramesSource` with their times on the 10 fps timeline (index / 10 s) through the engine's
    pipeline (decode thread, `actionshot` ingest settings, queue, model thread: vision encoder batched
    across streams, `MALMM.step`), and each distinct question about the clip is a standing question
    registered before its first frame (at most `max_standing` per stream: a clip asked more is ingested
    by as many streams as needed). Once every stream has finished, every question is asked at once
    (`Engine.ask` from as many threads, as the server's workers ask: one batched generation) and
    answered from its standing question's own output. actionshot: complete `ActionShotSettings`
    (default: `stream_ingest(model)`, every sampled frame one Shot). outputs: as for `predict` (each
    item's standing query outputs [Q, C_q]). ValueError when an item's frames cannot be read or the
    engine could not fold them in.
    """
    import concurrent.futures

    import torch

    from mixmalmm.clients import protocol as P
    from mixmalmm.model.datasets import FPS, clip_frames, malmm_resize

    from .engine import Engine, EngineConfig
    from .sources import FramesSource

    if resize not in ("malmm", "antialias"):
        raise ValueError(f"resize must be 'malmm' or 'antialias', got {resize!r}")
    if max_standing < 1:
        raise ValueError(f"max_standing must be >= 1, got {max_standing}")
    settings = actionshot if actionshot is not None else stream_ingest(model)
    ends = _StreamEnds()
    engine = Engine(model, EngineConfig(max_batch=8, max_streams=batch_size, max_standing=max_standing,
                                        max_questions=max(batch_size, 1)), publish=ends, model_name="eval")
    engine.start(restore=False)
    answers: list[str] = []
    made = 0  # streams made so far: each gets a new id
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            clips: dict[tuple, list] = {}  # (video, frames) -> its items
            for it in batch:
                clips.setdefault((it.video, it.frames), []).append(it)
            where: list[tuple[str, str]] = [("", "")] * len(batch)  # item -> (stream id, question)
            position = {id(it): i for i, it in enumerate(batch)}
            streams = {}
            for (video, indices), about in clips.items():
                try:
                    rgb = clip_frames(about[0], frames=frames, videos=videos)
                except ValueError as exc:
                    raise ValueError(f"item {about[0].id!r}: {exc}") from exc
                if resize == "malmm":  # then the engine's preprocessing only normalises
                    rgb = malmm_resize(rgb, model.image_size)
                texts = list(dict.fromkeys(it.question for it in about))
                for k in range(0, len(texts), max_standing):
                    sid, made = f"clip{made}", made + 1
                    group = texts[k : k + max_standing]
                    request = P.AddStream(id=0, stream=sid, uri=f"frames:{video}", mode="replay", pace="fast",
                                          actionshot=settings)
                    source = FramesSource(rgb, [i / FPS for i in indices], uri=f"frames:{video}")
                    streams[sid] = engine.add_stream(request, source=source,
                                                     questions=[(f"q{j}", q) for j, q in enumerate(group)])
                    for it in about:
                        if it.question in group:
                            where[position[id(it)]] = (sid, it.question)
            for sid, (state, message) in ends.wait(list(streams)).items():
                if state != "finished":
                    item = next(it for it, (s, _) in zip(batch, where, strict=True) if s == sid)
                    raise ValueError(f"item {item.id!r}: the engine did not fold in its frames ({state}: {message})")
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(batch)) as pool:
                results = list(pool.map(lambda w: engine.ask(w[0], w[1], max_new_tokens, num_beams), where))
            for (sid, question), result in zip(where, results, strict=True):
                if not result.standing:  # every question is a standing one that has seen every frame
                    raise RuntimeError(f"stream {sid}: {question!r} was not answered as a standing question")
                answers.append(result.answer)
                if outputs is not None:
                    stream = streams[sid]
                    with stream.lock, torch.inference_mode():
                        output, _ = model.query_outputs(stream.state, [question])[0]
                    outputs.append(output[0].float().cpu())
            for sid in streams:
                engine.remove_stream(sid)
            if progress is not None:
                progress(len(answers), len(items))
    finally:
        engine.shutdown(save=False)
    return answers


@dataclass
class ModeRuns:
    """What `run_modes` gives: each mode's answers (None when not run) and seconds; per item, the
    relative difference between the two modes' query outputs (both modes only; None where their shapes
    differ)."""

    clip: list[str] | None
    stream: list[str] | None
    seconds: dict[str, float]
    differences: list[float | None] | None


def relative_difference(clip, stream) -> float | None:
    """||stream - clip|| / ||clip|| (Frobenius) of two query outputs [Q, C_q]; None when the shapes differ
    (memoryless_clip "every_frame" gives the clip T*Q rows)."""
    if clip.shape != stream.shape:
        return None
    norm = float(clip.norm())
    diff = float((stream - clip).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def run_modes(model, items, mode: str, *, batch_size: int = 8, progress=None, actionshot=None,
              max_standing: int = 8, **run) -> ModeRuns:
    """Stream mode (`predict_stream`), or both modes batch by batch (`predict` then `predict_stream` on
    the same `batch_size` items, so only one batch's query outputs are held) with each item's relative
    difference. run: frames, videos, max_new_tokens, num_beams, resize."""
    import time as clock

    if mode not in ("stream", "both"):
        raise ValueError(f"mode must be 'stream' or 'both', got {mode!r}")
    stream_kw = {"actionshot": actionshot, "max_standing": max_standing, **run}
    if mode == "stream":
        started = clock.perf_counter()
        answers = predict_stream(model, items, batch_size=batch_size, progress=progress, **stream_kw)
        return ModeRuns(None, answers, {"stream": clock.perf_counter() - started}, None)
    clip, stream, differences = [], [], []
    seconds = {"clip": 0.0, "stream": 0.0}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        clip_out, stream_out = [], []
        started = clock.perf_counter()
        clip += predict(model, chunk, batch_size=batch_size, outputs=clip_out, **run)
        seconds["clip"] += clock.perf_counter() - started
        started = clock.perf_counter()
        stream += predict_stream(model, chunk, batch_size=batch_size, outputs=stream_out, **stream_kw)
        seconds["stream"] += clock.perf_counter() - started
        differences += [relative_difference(c, s) for c, s in zip(clip_out, stream_out, strict=True)]
        if progress is not None:
            progress(len(stream), len(items))
    return ModeRuns(clip, stream, seconds, differences)


#: Report fields that say what ran, not how well: shared by the modes (kept once, at the top).
_RUN_FIELDS = ("dataset", "split", "model", "settings", "items", "paper_top1", "predictions")


def _modes_report(spec, args, name, settings, items, runs: ModeRuns, seconds: float) -> dict:
    """The report of stream or both modes: the first mode's report at the top (clip's in both modes),
    each mode's scores under "modes", and for both modes the "distance" and each prediction's stream
    answer beside the clip's."""
    reports = {m: _report(spec, args, name, settings, items, answers, runs.seconds[m])
               for m, answers in (("clip", runs.clip), ("stream", runs.stream)) if answers is not None}
    report = dict(reports.get("clip") or reports["stream"])
    report["seconds"] = round(seconds, 3)
    report["mode"] = args.mode
    report["modes"] = {m: {k: v for k, v in r.items() if k not in _RUN_FIELDS} | {
                           "questions_per_s": round(len(items) / max(runs.seconds[m], 1e-9), 3)}
                       for m, r in reports.items()}
    if runs.clip is not None:
        agree = sum(a == b for a, b in zip(runs.clip, runs.stream, strict=True))
        known = [d for d in runs.differences if d is not None]
        report["distance"] = {
            "answer_agreement": 100.0 * agree / len(items), "answers_equal": agree, "items": len(items),
            "query_output_rel_diff_max": max(known) if known else None,
            "query_output_rel_diff_mean": sum(known) / len(known) if known else None,
            "measure": "per item, ||stream - clip|| / ||clip|| of the Q-Former query outputs the LLM reads "
                       "([Q, C_q], Frobenius norm)",
        }
        stream_predictions = reports["stream"]["predictions"]
        report["predictions"] = [
            p | {"stream_prediction": s["prediction"], "stream_correct": s["correct"], "query_output_rel_diff": d}
            for p, s, d in zip(report["predictions"], stream_predictions, runs.differences, strict=True)
        ]
    return report


def format_modes(report: dict) -> str:
    """Each mode's top-1 accuracy and speed side by side, then (both modes) their distance."""
    head = ("mode", "items", "top-1 %", "seconds", "questions/s")
    rows = [(m, report["items"], f"{r['top1']:.1f}", f"{r['seconds']:.1f}", f"{r['questions_per_s']:.2f}")
            for m, r in report["modes"].items()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [line.format(*head), *(line.format(*map(str, r)) for r in rows)]
    d = report.get("distance")
    if d is not None:
        diff = ("not comparable (the clip's query outputs have another shape)"
                if d["query_output_rel_diff_max"] is None else
                f"max {d['query_output_rel_diff_max']:.2e}, mean {d['query_output_rel_diff_mean']:.2e}")
        out.append(f"stream vs clip: {d['answer_agreement']:.1f} % identical answers ({d['answers_equal']} of "
                   f"{d['items']}); query outputs' relative difference {diff}")
    return "\n".join(out)


def _report(spec, args, name, settings, items, predictions, seconds) -> dict:
    """QA and classification. Classification's predictions are each item's beams (best first): top-1
    scores the first, top-5 the first five (LVU: both averaged over the tasks)."""
    from mixmalmm.model.metrics import grouped_accuracy, in_top_k, is_correct, mean_over_groups, top1_accuracy

    beams = [p if isinstance(p, list) else [p] for p in predictions]
    best = [b[0] for b in beams]
    correct = [is_correct(p, it.answer, first_word=spec.first_word) for p, it in zip(best, items, strict=True)]
    correct5 = [in_top_k(b, it.answer, 5, first_word=spec.first_word) for b, it in zip(beams, items, strict=True)]
    groups = grouped_accuracy([it.group for it in items], correct)
    groups5 = grouped_accuracy([it.group for it in items], correct5)

    def average(by_group, values):  # LVU: each task counts once
        return mean_over_groups(by_group) if spec.name == "lvu" else top1_accuracy(values)

    report = {
        "dataset": spec.name, "family": spec.family, "split": args.split, "model": name, "settings": settings,
        "items": len(items), "seconds": round(seconds, 3),
        "top1": average(groups, correct), "paper_top1": spec.paper,
        "groups": {g: {"top1": acc, "items": n} for g, (acc, n) in groups.items()},
        "predictions": [
            {"id": it.id, "video": it.video, "group": it.group, "question": it.question, "answer": it.answer,
             "prediction": p, "correct": c}
            for it, p, c in zip(items, best, correct, strict=True)
        ],
    }
    if spec.family == "classification":
        report["top5"] = average(groups5, correct5)
        for g, (acc, _) in groups5.items():
            report["groups"][g]["top5"] = acc
        for row, b, c5 in zip(report["predictions"], beams, correct5, strict=True):
            row["candidates"], row["correct_top5"] = b, c5
    return report


def _caption_report(spec, args, name, settings, items, predictions, references, seconds) -> dict:
    """Captioning: pycocoevalcap's metrics x 100 (BLEU-1..4, METEOR where Java runs, ROUGE-L, CIDEr), over
    the clips and per clip (as COCOEvalCap's imgToEval)."""
    from mixmalmm.model.metrics import caption_scores, java_available

    java = java_available()
    if not java:
        log.warning("no java: METEOR left out, BLEU/ROUGE-L/CIDEr on a simple tokenizer instead of the PTB one")
    scores, each = caption_scores(references, {it.image_id: p for it, p in zip(items, predictions, strict=True)},
                                  java=java, per_clip=True)
    return {
        "dataset": spec.name, "family": spec.family, "split": args.split, "model": name, "settings": settings,
        "items": len(items), "seconds": round(seconds, 3),
        "metrics": {k: 100 * v for k, v in scores.items()},
        "paper_metrics": dict(spec.paper_metrics or {}),
        "tokenizer": "ptb" if java else "simple (no java: METEOR left out)",
        "predictions": [
            {"id": it.image_id, "video": it.video, "frames": list(it.frames), "prompt": it.question,
             "prediction": p, "references": references[it.image_id],
             "scores": {k: 100 * v for k, v in each[it.image_id].items()}}
            for it, p in zip(items, predictions, strict=True)
        ],
    }


def _number(value) -> str:
    return "" if value is None else f"{value:.1f}"


def format_table(report: dict) -> str:
    """The report as a table: the dataset's top-1 accuracy beside the paper's (LVU: a row per task,
    then their average beside the paper's average; classification adds top-5). Captioning: BLEU-4,
    METEOR, ROUGE-L, CIDEr (x 100), then the paper's METEOR and CIDEr (empty where not known)."""
    rows = []
    family = report.get("family")
    top5 = family == "classification"
    if family == "captioning":
        m, paper = report["metrics"], report["paper_metrics"]
        head = ("dataset", "clips", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "paper METEOR", "paper CIDEr")
        rows.append((report["dataset"], report["items"], *(_number(m.get(k)) if k in m else "-"
                                                         for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")),
                     _number(paper.get("METEOR")), _number(paper.get("CIDEr"))))
    elif report["dataset"] == "lvu":
        rows += [(f"lvu {g}", v["items"], f"{v['top1']:.1f}", *([f"{v['top5']:.1f}"] if top5 else []), "")
                 for g, v in report["groups"].items()]
        rows.append((f"lvu average ({len(report['groups'])} tasks)", report["items"], f"{report['top1']:.1f}",
                     *([f"{report['top5']:.1f}"] if top5 else []), _number(report["paper_top1"])))
    else:
        rows.append((report["dataset"], report["items"], f"{report['top1']:.1f}",
                     *([f"{report['top5']:.1f}"] if top5 else []), _number(report["paper_top1"])))
    if family != "captioning":
        head = ("dataset", "items", "top-1 %", *(["top-5 %"] if top5 else []), "MA-LMM paper %")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    s = report["settings"]
    title = (f"{report['dataset']} {report['split']}: model {report['model']}, {s['num_frames']} frames, "
             f"memory bank {s['memory_bank_length']}, {s['num_beams']} beam(s), {report['seconds']:.1f} s")
    return "\n".join([title, line.format(*head), *(line.format(*map(str, r)) for r in rows)])

