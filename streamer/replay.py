"""``mixmalmm replay VIDEO``: offline long-video replay into one memory, questions, a contact sheet.

The file is decoded as fast as the model takes Shots (nothing dropped), folded Shot by Shot into one
stream state (the vision encoder runs on small batches of Shots; the memory is stepped one Shot at a
time, as a stream is), and questions are answered:

- ``--ask Q``: at the end; ``--ask-at SECONDS Q``: as soon as the memory covers SECONDS of video
  time, that is right after the first Shot whose span ends at or after SECONDS is folded in;
- ``--standing Q``: registered before the first Shot, so its own query banks follow MA-LMM exactly
  (mode "standing"), and answered at the end; any other question is ad hoc (one extra Q-Former pass
  over the default instruction's banks, mode "adhoc"). An ``--ask``/``--ask-at`` question whose text
  is a standing one is answered from that question's banks.

Outputs in ``--out`` (default ``./replay-<video name>``):

- ``answers.json``: every answer with the video time it was asked at and the span the memory covered,
  plus every Shot with its time span and how much of it the memory holds;
- ``contact_sheet.png``: thumbnails of the ActionShot composites (at most ``--thumbnails``, evenly
  sampled over the whole video for long ones, as the sheet says), each with its time span and its
  "held" share; under them a strip over the whole video with one bar per Shot, as tall as that share.

What "held" means, and how both are drawn: `mixmalmm.streamer.contact_sheet`.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .contact_sheet import (
    DEFAULT_THUMBNAILS,
    ShotLog,
    draw_contact_sheet,
    format_span,
    format_time,
    memory_cover,
    memory_report,
)
from .ingest import make_accumulator
from .options import (
    EXIT_ERROR,
    EXIT_OK,
    UserError,
    actionshot_settings,
    add_actionshot_arguments,
    add_model_arguments,
    answer_line,
    load_model,
    write_results,
)

#: Shots encoded by the vision encoder as one batch.
ENCODE_BATCH = 8


def parse_seconds(text: str, option: str) -> float:
    """``SECONDS``, ``M:SS(.s)`` or ``H:MM:SS(.s)`` as seconds (>= 0); UserError otherwise."""
    parts = text.strip().split(":")
    try:
        if not 1 <= len(parts) <= 3 or any(p.strip() == "" for p in parts):
            raise ValueError
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"{option}: {text!r} is not a time (use seconds such as 90 or 1:30)") from None
    seconds = 0.0
    for v in values:
        seconds = seconds * 60.0 + v
    if not math.isfinite(seconds) or seconds < 0 or any(v < 0 for v in values):
        raise UserError(f"{option}: {text!r} is not a time of the video (use seconds >= 0)")
    return seconds


# ---------------------------------------------------------------------------------------------------
# progress


def progress_bar(total_s: float | None, draw: bool):
    """A tqdm bar on stderr counting seconds of video replayed, with Shots and frames in its postfix.

    total_s: seconds of video to replay (the range from --start to its end; None when unknown: no
    percentage, no ETA); draw: False for a bar that draws nothing. The rate is seconds of video per
    second of wall time. Advance it with `show_progress`.
    """
    from tqdm import tqdm

    if total_s:
        layout = ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s of video "
                  "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
    else:
        layout = "{desc}: {n:.1f} s of video [{elapsed}, {rate_noinv_fmt}{postfix}]"
    return tqdm(total=total_s, desc="replay", unit="s", bar_format=layout, postfix="Shots=0, frames=0",
                file=sys.stderr, dynamic_ncols=True, disable=not draw)


def show_progress(bar, seconds: float, shots: int, frames: int) -> None:
    """Move `bar` to `seconds` of video replayed (clamped to its total) with these counts."""
    if bar.disable:
        return
    bar.set_postfix_str(f"Shots={shots}, frames={frames}", refresh=False)
    seconds = max(0.0, seconds if bar.total is None else min(seconds, bar.total))
    bar.update(seconds - bar.n)


# ---------------------------------------------------------------------------------------------------
# the replay


@dataclass
class Question:
    """A question to answer: its text, the video time (seconds) to ask at (None: at the end)."""

    text: str
    at: float | None = None


@dataclass
class Replay:
    """One replay's state: the model's stream state, Shots, thumbnails and answers so far."""

    model: object
    state: object
    log: ShotLog
    mean: tuple
    std: tuple
    answers: list[dict] = field(default_factory=list)
    max_new_tokens: int | None = None  # None: the model's decoding

    def fold(self, batch: list, pending: list[Question]) -> None:
        """Encode a batch of Shots and step the state with each in order, answering due questions."""
        from .preprocess import preprocess

        model = self.model
        pixels = preprocess([s.image for s in batch], model.image_size, self.mean, self.std, device=model.device)
        features = model.encode_frames(pixels)  # [B, N, C]
        for b, shot in enumerate(batch):
            model.step([self.state], features[b : b + 1], [(shot.start, shot.end)])
            self.log.add(shot)
            while pending and pending[0].at is not None and shot.end >= pending[0].at - 1e-9:
                self.ask(pending.pop(0))

    def ask(self, question: Question, note: str | None = None) -> dict:
        answer = self.model.answer(self.state, question.text, max_new_tokens=self.max_new_tokens)
        span = answer.time_span
        record = {
            "question": question.text,
            "answer": answer.text,
            "empty": answer.empty,
            "mode": answer.mode,
            "asked_at_s": span[1] if span else None,  # where the replay was: the newest Shot's end
            "requested_at_s": question.at,
            "span_s": list(span) if span else None,
            "shots_in_memory": answer.frames,
        }
        if note:
            record["note"] = note
        self.answers.append(record)
        return record


# ---------------------------------------------------------------------------------------------------
# command line


def add_parser(commands) -> None:
    p = commands.add_parser(
        "replay", help="replay a video file offline into one memory; answer questions; write answers.json and "
                       "a contact sheet",
        description="Replay a video file as fast as the model goes, folding its ActionShot composites into "
                    "one MA-LMM memory. Questions are answered at the end (--ask, --standing) or when the "
                    "replay reaches a time (--ask-at). Writes answers.json and contact_sheet.png to --out.",
    )
    p.add_argument("video", metavar="VIDEO", help="a video file (any container and codec PyAV decodes)")
    q = p.add_argument_group("questions")
    q.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                   help="answered at the end (ad hoc unless also given with --standing); repeatable")
    q.add_argument("--ask-at", action="append", nargs=2, default=[], metavar=("SECONDS", "QUESTION"),
                   help="answered as soon as the memory covers SECONDS of the video (90, 1:30 or 1:02:03); "
                        "repeatable")
    q.add_argument("--standing", action="append", default=[], metavar="QUESTION",
                   help="registered before the first Shot, with its own query memory (exact MA-LMM); "
                        "answered at the end and wherever --ask/--ask-at repeats it; repeatable")
    q.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="longest answer in tokens (default: the model's decoding)")
    v = p.add_argument_group("video")
    v.add_argument("--start", metavar="S", help="start at this time of the video (seconds or m:ss)")
    v.add_argument("--end", metavar="S", help="stop at this time of the video (seconds or m:ss)")
    v.add_argument("--target-fps", type=float, metavar="F",
                   help="decode at most F frames per second of video (MA-LMM extracts at 10)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="where answers.json and contact_sheet.png go "
                                                "(default: ./replay-<video name>)")
    o.add_argument("--thumbnails", type=int, default=DEFAULT_THUMBNAILS, metavar="N",
                   help=f"most Shots shown on the contact sheet, sampled evenly (default {DEFAULT_THUMBNAILS})")
    o.add_argument("--progress", action="store_true",
                   help="draw the progress bar even when stderr is not a terminal")
    o.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_model_arguments(p)
    add_actionshot_arguments(p)
    p.set_defaults(run=run_replay)


def _questions(args: argparse.Namespace) -> tuple[list[Question], list[str]]:
    """(questions to answer, standing questions), checked; end questions: standing first, each once."""
    standing = []
    for text in args.standing:
        if not text.strip():
            raise UserError("--standing: a question must not be empty")
        if text not in standing:
            standing.append(text)
    questions = [Question(text) for text in standing]
    for text in args.ask:
        if not text.strip():
            raise UserError("--ask: a question must not be empty")
        if text not in [q.text for q in questions if q.at is None]:
            questions.append(Question(text))
    for seconds, text in args.ask_at:
        at = parse_seconds(seconds, "--ask-at")
        if not text.strip():
            raise UserError(f"--ask-at {seconds}: the question must not be empty")
        questions.append(Question(text, at))
    return questions, standing


def _open_video(path: str, start: float | None, end: float | None, target_fps: float | None):
    from .sources import FileSource, SourceError

    scheme = urlsplit(path).scheme.lower()
    if path.startswith("/dev/video") or (len(scheme) > 1 and scheme != "file"):  # (1 letter: a drive)
        raise UserError(f"replay reads video files; '{path}' is not one (use `mixmalmm serve` for streams "
                        "and cameras)")
    if scheme == "file":
        path = unquote(urlsplit(path).path)
    try:
        return FileSource(path, start=start, end=end, target_fps=target_fps, queue_size=16)
    except SourceError as exc:
        raise UserError(str(exc)) from exc
    except ValueError as exc:
        raise UserError(f"'{path}': {exc}") from exc


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path(f"replay-{Path(args.video).stem or 'video'}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mixmalmm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out '{out}': {exc.strerror or exc}") from exc
    return out


class _StopFlag:
    """First Ctrl-C: stop after the current Shot and answer with what was seen; second: abort."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True


def run_replay(args: argparse.Namespace) -> int:
    questions, standing = _questions(args)
    start = parse_seconds(args.start, "--start") if args.start is not None else None
    end = parse_seconds(args.end, "--end") if args.end is not None else None
    if start is not None and end is not None and end <= start:
        raise UserError(f"--end ({args.end}) must be after --start ({args.start})")
    if args.target_fps is not None and not (args.target_fps > 0 and math.isfinite(args.target_fps)):
        raise UserError(f"--target-fps must be a positive number of frames per second, got {args.target_fps}")
    if args.thumbnails < 1:
        raise UserError(f"--thumbnails must be at least 1, got {args.thumbnails}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    settings = actionshot_settings(args)
    source = _open_video(args.video, start, end, args.target_fps)
    try:
        duration = source.duration
        origin = start or 0.0
        if duration is not None and origin >= duration:
            raise UserError(f"--start {args.start} is at or after the end of '{args.video}' "
                            f"({format_time(duration)})")
        limit = duration if end is None else (end if duration is None else min(end, duration))
        for q in questions:
            if q.at is None:
                continue
            if q.at < origin:
                raise UserError(f"--ask-at {format_time(q.at)} is before --start {format_time(origin)}")
            if limit is not None and q.at > limit + 1e-6:
                what = "--end" if end is not None and limit == end else f"the end of '{args.video}'"
                raise UserError(f"--ask-at {format_time(q.at)} ({q.at:g} s) is after {what} ({format_time(limit)})")
        out = _out_dir(args)
        return _replay(args, source, questions, standing, settings, origin, limit, out)
    finally:
        source.close()


def _replay(args, source, questions: list[Question], standing: list[str], settings, origin: float,
            limit: float | None, out: Path) -> int:
    """Fold the opened source into a fresh state, answer, write the outputs; returns the exit status."""
    from .ingest import model_settings
    from .sources import SourceError

    model, name = load_model(args)
    settings = settings.over(model_settings(model))  # the options given, the model's own settings elsewhere
    state = model.create_state("replay")
    for text in standing:
        model.register_question(state, text)
    processor = model.processor.image_processor
    replay = Replay(model, state, ShotLog(args.thumbnails), tuple(processor.image_mean),
                    tuple(processor.image_std), max_new_tokens=args.max_new_tokens)
    timed = sorted((q for q in questions if q.at is not None), key=lambda q: q.at)
    accumulator = make_accumulator(settings)
    total = None if limit is None else max(limit - origin, 1e-9)
    stop = _StopFlag()
    previous = signal.signal(signal.SIGINT, stop)
    frames, last_pts, batch, problem = 0, None, [], None
    started = time.perf_counter()
    with progress_bar(total, args.progress or sys.stderr.isatty()) as bar:
        try:
            for frame in source:
                frames += 1
                last_pts = frame.pts
                shot = accumulator.push(frame)
                if shot is not None:
                    batch.append(shot)
                if len(batch) >= ENCODE_BATCH:
                    replay.fold(batch, timed)
                    batch = []
                shots = len(replay.log.shots) + len(batch) + (accumulator.pending > 0)
                show_progress(bar, last_pts - origin, shots, frames)
                if stop.set:
                    problem = f"interrupted at {format_time(last_pts)}"
                    break
        except SourceError as exc:
            problem = f"stopped at {format_time(last_pts)}: {exc}"
        finally:
            source.close()
        try:
            shot = accumulator.flush()
            if shot is not None:
                batch.append(shot)
            if batch:
                replay.fold(batch, timed)
        finally:
            signal.signal(signal.SIGINT, previous)
        seconds = 0.0 if last_pts is None else last_pts - origin
        if problem is None and frames and total is not None:  # the source ended: the whole range is replayed
            seconds = total
        show_progress(bar, seconds, len(replay.log.shots), frames)
    elapsed = time.perf_counter() - started
    summary = (f"replayed {format_span(replay.log.span()) if replay.log.shots else '0 s'}"
               f" of '{args.video}': {frames} frames, {len(replay.log.shots)} Shots in {elapsed:.1f} s "
               f"({frames / max(elapsed, 1e-9):.1f} frames/s)")
    print(summary + (f"; {problem}" if problem else ""), file=sys.stderr, flush=True)
    if not replay.log.shots:
        raise UserError(f"no frames decoded from '{args.video}'" + (f" ({problem})" if problem else ""))
    for q in timed:  # asked for a time the replay did not reach with a Shot's end
        replay.ask(q, note="the replay ended before this time: answered at its end")
    for q in questions:
        if q.at is None:
            replay.ask(q)
    cover = memory_cover(state, len(replay.log.shots))
    title = f"mixmalmm replay of '{Path(args.video).name}' ({format_span(replay.log.span())}), model {name}"
    sheet = draw_contact_sheet(replay.log, cover, title=title,
                               memory_bank_length=model.config.memory_bank_length)
    report = {
        "video": str(args.video),
        "model": name,
        "complete": problem is None,
        "problem": problem,
        "range_s": [origin, limit],
        "frames": frames,
        "memory_bank_length": model.config.memory_bank_length,
        "actionshot": {f: getattr(settings, f) for f in settings.__struct_fields__},
        "answers": replay.answers,
        **memory_report(replay.log, cover, sheet),
    }
    answers_path, sheet_path = write_results(out, report, sheet)
    for record in replay.answers:
        print(answer_line(record))
    print(f"wrote {answers_path} and {sheet_path}")
    if problem is None:
        return EXIT_OK
    return 130 if problem.startswith("interrupted") else EXIT_ERROR
