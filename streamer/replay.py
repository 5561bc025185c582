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
  plus every Shot with its time span and how much of it the memory holds (see `memory_cover`);
- ``contact_sheet.png``: thumbnails of the ActionShot composites (at most ``--thumbnails``, evenly
  sampled over the whole video for long ones, as the sheet says), each with its time span and its
  "held" share; under them a strip over the whole video with one bar per Shot, as tall as that share.

"Held by memory" (MA-LMM compresses each token column of the visual bank on its own): after the last
Shot the visual bank holds, in every one of its N token columns, at most M+1 entries, each the average
of a run of consecutive Shots (its merge count). For Shot i, ``held`` is the fraction of the N columns
in which Shot i is still an entry of its own (merge count 1), and ``mean_merge`` is the mean, over the
columns, of the merge count of the entry that contains Shot i (1.0: never merged). With
``--memory-bank-length 0`` the memory is the newest Shot alone: it has held 1 and mean_merge 1, every
other Shot held 0 and mean_merge 0 (no entry contains it).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

import numpy as np

from .actionshot import make_accumulator
from .options import (
    EXIT_ERROR,
    EXIT_OK,
    UserError,
    actionshot_settings,
    add_actionshot_arguments,
    add_model_arguments,
    load_model,
    quiet_model_loading,
)

#: Most Shots whose thumbnails a contact sheet shows by default.
DEFAULT_THUMBNAILS = 48
#: Shots encoded by the vision encoder as one batch.
ENCODE_BATCH = 8
#: Seconds between progress-bar redraws.
PROGRESS_PERIOD_S = 0.1

HELD_DEFINITION = (
    "held: the fraction of the visual memory bank's token columns in which the Shot is still an entry of its "
    "own (merge count 1); mean_merge: the mean over the columns of the merge count of the entry containing "
    "the Shot (0: no entry contains it)"
)


# ---------------------------------------------------------------------------------------------------
# small helpers shared with the demo


def format_time(seconds: float | None) -> str:
    """Seconds as ``m:ss.s`` (``h:mm:ss`` from an hour on); ``-`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds >= 3600:
        h, rest = divmod(int(round(seconds)), 3600)
        return f"{sign}{h}:{rest // 60:02d}:{rest % 60:02d}"
    m, s = divmod(seconds, 60.0)
    if round(s, 1) >= 60.0:  # 59.96 s would print as 0:60.0
        m, s = m + 1, 0.0
    return f"{sign}{int(m)}:{s:04.1f}"


def format_span(span: Sequence[float] | None) -> str:
    return "nothing yet" if span is None else f"{format_time(span[0])}-{format_time(span[1])}"


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
# what the memory holds


@dataclass
class MemoryCover:
    """Per Shot folded into a state (index = order folded in): how the memory holds it.

    held: [S] float, fraction of the visual bank's token columns in which the Shot is its own entry.
    mean_merge: [S] float, mean merge count (Shots averaged) of the entry containing the Shot; 0 when
    no entry does (memory_bank_length 0 keeps only the newest Shot).
    columns: token columns N of the visual bank (1 without a bank); entries: entries held per column.
    """

    held: np.ndarray
    mean_merge: np.ndarray
    columns: int
    entries: int


def memory_cover(state, shots: int) -> MemoryCover:
    """How the state's visual memory bank holds each of the `shots` Shots folded into it (see module doc).

    MA-LMM's compression only merges neighbours, never drops, so in every token column the entries in
    temporal order cover Shots 0..S-1 in runs as long as their merge counts: entry j covers the Shots
    from (sum of the earlier counts) to that plus its own count. O(entries x columns + S).
    """
    if shots != state.frames:
        raise ValueError(f"the state has folded in {state.frames} Shots, not {shots}")
    held = np.zeros(shots, dtype=np.float64)
    mean_merge = np.zeros(shots, dtype=np.float64)
    bank = state.visual_bank
    if shots == 0:
        return MemoryCover(held, mean_merge, columns=1 if bank is None else bank.shape.tokens, entries=0)
    if bank is None:  # memory_bank_length 0: the newest Shot only
        held[-1] = mean_merge[-1] = 1.0
        return MemoryCover(held, mean_merge, columns=1, entries=1)
    if bank.frames != shots:
        raise ValueError(f"the visual bank has taken {bank.frames} entries, the state {shots} Shots")
    _, sizes = bank.ordered()  # [1, T, N] merge counts, temporal order
    sizes = sizes[0].cpu().numpy().astype(np.int64)  # [T, N]
    T, N = sizes.shape
    ends = np.cumsum(sizes, axis=0)  # [T, N] one past the last Shot of each entry
    starts = ends - sizes
    if not (ends[-1] == shots).all():
        raise ValueError(f"the visual bank's merge counts add up to {ends[-1].min()}..{ends[-1].max()}, not {shots}")
    held = np.bincount(starts[sizes == 1], minlength=shots).astype(np.float64) / N
    # mean merge: each entry adds its count to every Shot it covers (a difference array over Shots).
    diff = np.zeros(shots + 1, dtype=np.int64)
    np.add.at(diff, starts.ravel(), sizes.ravel())
    np.add.at(diff, ends.ravel(), -sizes.ravel())
    mean_merge = np.cumsum(diff[:shots]).astype(np.float64) / N
    return MemoryCover(held, mean_merge, columns=N, entries=T)


# ---------------------------------------------------------------------------------------------------
# thumbnails and the contact sheet

THUMB_WIDTH = 192  # pixels
COLUMNS = 6  # thumbnails per row
MARGIN = 12  # pixels around everything
GAP = 10  # pixels between cells
BORDER = 4  # pixels of the coloured frame around a thumbnail (its "held" share)
LINE = 15  # pixels per text line
CAPTION = 2 * LINE + 4  # pixels of text under a thumbnail
HEADER = 3 * LINE + 10  # pixels of text above the grid
STRIP = 40  # pixels of the whole-video memory strip
STRIP_BLOCK = LINE + 4 + STRIP + GAP  # its label, the strip, space above it
MIN_WIDTH = 720  # pixels: room for the header text

_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
_TEXT = (235, 235, 235)
_DIM = (160, 160, 160)
_BACKGROUND = (24, 24, 28)
_FORGOTTEN = (90, 90, 96)  # border of a Shot merged in every column
_HELD = (40, 205, 90)  # border of a Shot held in every column


def thumbnail_height(frame_width: int, frame_height: int, thumb_width: int = THUMB_WIDTH) -> int:
    """Thumbnail height in pixels for frames of this size (aspect kept; 16..2*thumb_width)."""
    if frame_width < 1 or frame_height < 1:
        raise ValueError(f"frames need a positive size, got {frame_width}x{frame_height}")
    return int(min(2 * thumb_width, max(16, round(thumb_width * frame_height / frame_width))))


@dataclass(frozen=True)
class SheetLayout:
    """Where everything lies on a contact sheet of `count` thumbnails of thumb_width x thumb_height px."""

    count: int
    thumb_width: int
    thumb_height: int

    @property
    def columns(self) -> int:
        return max(1, min(self.count, COLUMNS))

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.count / self.columns))

    @property
    def cell_width(self) -> int:
        return self.thumb_width + 2 * BORDER

    @property
    def cell_height(self) -> int:
        return self.thumb_height + 2 * BORDER + CAPTION

    @property
    def width(self) -> int:
        grid = self.columns * self.cell_width + (self.columns - 1) * GAP
        return max(MIN_WIDTH, 2 * MARGIN + grid)

    @property
    def height(self) -> int:
        grid = self.rows * self.cell_height + (self.rows - 1) * GAP
        return MARGIN + HEADER + grid + STRIP_BLOCK + MARGIN

    def thumb_origin(self, k: int) -> tuple[int, int]:
        """(x, y) pixels of the top-left corner of the k-th thumbnail's picture (inside its border)."""
        row, col = divmod(k, self.columns)
        x = MARGIN + col * (self.cell_width + GAP) + BORDER
        y = MARGIN + HEADER + row * (self.cell_height + GAP) + BORDER
        return x, y

    def strip_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixels of the whole-video strip (x1, y1 exclusive)."""
        y0 = self.height - MARGIN - STRIP
        return MARGIN, y0, self.width - MARGIN, y0 + STRIP


@dataclass
class ShotRecord:
    """One Shot as the sheet and answers.json list it: 0-based index, span in seconds, frames blended."""

    index: int
    start: float
    end: float
    frames: int


class ThumbnailSampler:
    """Thumbnails of at most `limit` Shots spread evenly over all Shots seen, in O(limit) memory.

    Shots whose index is a multiple of `stride` are kept; when more than 2·limit are kept the stride
    doubles and every other one is dropped. `chosen()` then picks at most `limit` of them evenly.
    """

    def __init__(self, limit: int = DEFAULT_THUMBNAILS, thumb_width: int = THUMB_WIDTH):
        if limit < 1:
            raise ValueError(f"a contact sheet needs at least 1 thumbnail, got {limit}")
        self.limit = limit
        self.thumb_width = thumb_width
        self.thumb_height: int | None = None
        self.stride = 1
        self.images: dict[int, np.ndarray] = {}

    def offer(self, index: int, image: np.ndarray) -> None:
        """Consider Shot `index` (0-based, increasing) with its composite [H, W, 3] uint8 RGB."""
        import cv2

        if self.thumb_height is None:
            self.thumb_height = thumbnail_height(image.shape[1], image.shape[0], self.thumb_width)
        if index % self.stride:
            return
        self.images[index] = cv2.resize(image, (self.thumb_width, self.thumb_height), interpolation=cv2.INTER_AREA)
        if len(self.images) > 2 * self.limit:
            self.stride *= 2
            self.images = {i: t for i, t in self.images.items() if i % self.stride == 0}

    def chosen(self) -> list[int]:
        """Indices of the Shots to show: at most `limit`, evenly over the kept ones, in order."""
        kept = sorted(self.images)
        if len(kept) <= self.limit:
            return kept
        picks = np.unique(np.round(np.linspace(0, len(kept) - 1, self.limit)).astype(int))
        return [kept[i] for i in picks]


class ShotLog:
    """Every Shot folded into a memory, in order (`ShotRecord`s), and the contact sheet's thumbnails."""

    def __init__(self, thumbnails: int = DEFAULT_THUMBNAILS):
        self.shots: list[ShotRecord] = []
        self.sampler = ThumbnailSampler(thumbnails)

    def add(self, shot) -> int:
        """Record a `Shot` (its composite offered as a thumbnail); returns its 0-based index."""
        index = len(self.shots)
        self.shots.append(ShotRecord(index, float(shot.start), float(shot.end), int(shot.count)))
        self.sampler.offer(index, shot.image)
        return index

    def span(self) -> tuple[float, float] | None:
        """(first Shot's start, last Shot's end) in seconds, None before the first Shot."""
        return (self.shots[0].start, self.shots[-1].end) if self.shots else None


def _put(img: np.ndarray, text: str, x: int, y: int, colour=_TEXT, scale: float = 0.42, width: int | None = None):
    """Draw ASCII text with its baseline at y (cut to `width` pixels)."""
    import cv2

    text = text.encode("ascii", "replace").decode("ascii")
    if width is not None:
        while text and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
            text = text[:-1]
    cv2.putText(img, text, (x, y), _FONT, scale, colour, 1, cv2.LINE_AA)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, float(t)))
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))


def draw_contact_sheet(
    log: ShotLog,
    cover: MemoryCover,
    *,
    title: str,
    memory_bank_length: int,
) -> np.ndarray:
    """The contact sheet as [H, W, 3] uint8 RGB (size: `SheetLayout`); see the module doc for "held".

    log: every Shot folded in, with the thumbnails offered; cover: `memory_cover` of the final state.
    """
    import cv2

    shots, thumbnails = log.shots, log.sampler
    chosen = thumbnails.chosen()
    th = thumbnails.thumb_height or thumbnail_height(4, 3, thumbnails.thumb_width)
    layout = SheetLayout(len(chosen), thumbnails.thumb_width, th)
    img = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    img[:] = _BACKGROUND
    inner = layout.width - 2 * MARGIN
    _put(img, title, MARGIN, MARGIN + LINE - 3, scale=0.5, width=inner)
    what = (f"{len(shots)} Shots; memory: M = {memory_bank_length}, {cover.entries} entries in each of "
            f"{cover.columns} token columns")
    shown = (f"showing all {len(chosen)} Shots" if len(chosen) == len(shots)
             else f"showing {len(chosen)} of {len(shots)} Shots, evenly sampled")
    _put(img, f"{what}; {shown}", MARGIN, MARGIN + 2 * LINE, _DIM, width=inner)
    _put(img, "held = share of token columns where the Shot is still its own memory entry (green border: all); "
              "merge = mean Shots per entry holding it", MARGIN, MARGIN + 3 * LINE, _DIM, scale=0.38, width=inner)
    for k, i in enumerate(chosen):
        x, y = layout.thumb_origin(k)
        colour = _mix(_FORGOTTEN, _HELD, cover.held[i]) if i < len(cover.held) else _FORGOTTEN
        cv2.rectangle(img, (x - BORDER, y - BORDER), (x + layout.thumb_width + BORDER - 1, y + th + BORDER - 1),
                      colour, thickness=-1)
        img[y : y + th, x : x + layout.thumb_width] = thumbnails.images[i]
        s = shots[i]
        ty = y + th + BORDER + LINE - 2
        _put(img, f"#{i} {format_time(s.start)}-{format_time(s.end)} ({s.frames}f)", x - BORDER, ty,
             width=layout.cell_width)
        held = cover.held[i] if i < len(cover.held) else 0.0
        merge = cover.mean_merge[i] if i < len(cover.mean_merge) else 0.0
        _put(img, f"held {held:.0%}  merge {merge:.1f}", x - BORDER, ty + LINE, _DIM, width=layout.cell_width)
    x0, y0, x1, y1 = layout.strip_box()
    _put(img, "memory over the whole video: one bar per Shot, as tall as its held share", x0, y0 - 5, _DIM,
         width=inner)
    cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (44, 44, 50), thickness=-1)
    heights = strip_heights(shots, cover.held, x1 - x0)
    for x in np.nonzero(heights)[0]:
        img[y1 - heights[x] : y1, x0 + x] = _HELD
    return img


def strip_heights(shots: Sequence[ShotRecord], held: np.ndarray, width: int) -> np.ndarray:
    """Bar height in pixels (0..STRIP) per pixel column of the whole-video strip, [width] int.

    Shot i stands for the time from its start to the next Shot's start (the last one: to its end, at
    least one mean Shot interval); a pixel column shows the largest held share among the Shots in it.
    """
    out = np.zeros(width, dtype=np.int64)
    if not shots or width < 1:
        return out
    starts = np.array([s.start for s in shots], dtype=np.float64)
    t0 = starts[0]
    mean_step = (starts[-1] - t0) / max(len(shots) - 1, 1)
    t1 = max(shots[-1].end, starts[-1] + mean_step, t0 + 1e-6)
    edges = np.append(starts, t1)
    cols = np.floor((edges - t0) / (t1 - t0) * width).astype(np.int64)
    tall = np.round(np.clip(held[: len(shots)], 0.0, 1.0) * STRIP).astype(np.int64)
    for i in range(len(shots)):
        a = min(cols[i], width - 1)
        b = max(a + 1, min(cols[i + 1], width))
        out[a:b] = np.maximum(out[a:b], tall[i])
    return out


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an [H, W, 3] uint8 RGB image as PNG; OSError when it cannot be written."""
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode '{path}' as PNG")
    Path(path).write_bytes(data.tobytes())


# ---------------------------------------------------------------------------------------------------
# progress


class Progress:
    """A one-line progress bar on `stream` (redrawn in place), or only a final line.

    total: seconds of video to replay (None: unknown, no percentage); origin: the video time it starts at.
    """

    def __init__(self, stream: TextIO, live: bool, total: float | None, origin: float):
        self.stream = stream
        self.live = live
        self.total = total
        self.origin = origin
        self.started = time.perf_counter()
        self._drawn = 0.0
        self._width = 0

    def line(self, pts: float | None, frames: int, shots: int) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        where = format_time(pts)
        head = ""
        if self.total and pts is not None:
            frac = min(1.0, max(0.0, (pts - self.origin) / self.total))
            filled = int(frac * 24)
            head = f"{frac:4.0%} |{'#' * filled}{'.' * (24 - filled)}| "
            where = f"{where}/{format_time(self.origin + self.total)}"
        return f"replay {head}{where}  {shots} Shots  {frames} frames  {frames / elapsed:.1f} fps"

    def update(self, pts: float | None, frames: int, shots: int) -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if now - self._drawn < PROGRESS_PERIOD_S:
            return
        self._drawn = now
        text = self.line(pts, frames, shots)
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self.stream.flush()
        self._width = len(text)

    def finish(self, text: str) -> None:
        if self.live:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


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
    max_new_tokens: int = 30

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


def shot_table(log: ShotLog, cover: MemoryCover) -> list[dict]:
    """Every Shot for answers.json: index, span (seconds), frames blended, held share and mean merge count."""
    return [{"index": s.index, "start_s": s.start, "end_s": s.end, "frames": s.frames,
             "held": round(float(cover.held[s.index]), 6), "mean_merge": round(float(cover.mean_merge[s.index]), 6)}
            for s in log.shots]


def answer_line(record: dict, expected: str | None = None) -> str:
    """One answer as a line of text: when, how, what the memory covered, question -> answer."""
    span = record.get("span_s")
    head = f"[{format_time(record.get('asked_at_s'))} {record['mode']:8s} memory {format_span(span)}]"
    tail = "" if expected is None else f"   (expected: {expected})"
    return f"{head} {record['question']}  ->  {record['answer'] or '(empty)'}{tail}"


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
    q.add_argument("--max-new-tokens", type=int, default=30, metavar="N", help="longest answer in tokens (30)")
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
    if args.max_new_tokens < 1:
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
    from .sources import SourceError

    quiet_model_loading()
    model, name = load_model(args)
    state = model.create_state("replay")
    for text in standing:
        model.register_question(state, text)
    processor = model.processor.image_processor
    replay = Replay(model, state, ShotLog(args.thumbnails), tuple(processor.image_mean),
                    tuple(processor.image_std), max_new_tokens=args.max_new_tokens)
    timed = sorted((q for q in questions if q.at is not None), key=lambda q: q.at)
    accumulator = make_accumulator(settings)
    progress = Progress(sys.stderr, args.progress or sys.stderr.isatty(),
                        None if limit is None else max(limit - origin, 1e-9), origin)
    stop = _StopFlag()
    previous = signal.signal(signal.SIGINT, stop)
    frames, last_pts, batch, problem = 0, None, [], None
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
            progress.update(last_pts, frames, len(replay.log.shots) + len(batch) + (accumulator.pending > 0))
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
    elapsed = time.perf_counter() - progress.started
    summary = (f"replayed {format_span(replay.log.span()) if replay.log.shots else '0 s'}"
               f" of '{args.video}': {frames} frames, {len(replay.log.shots)} Shots in {elapsed:.1f} s "
               f"({frames / max(elapsed, 1e-9):.1f} frames/s)")
    progress.finish(summary + (f"; {problem}" if problem else ""))
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
        "memory_entries": cover.entries,
        "memory_columns": cover.columns,
        "actionshot": {f: getattr(settings, f) for f in settings.__struct_fields__},
        "answers": replay.answers,
        "contact_sheet": {"file": "contact_sheet.png", "width": int(sheet.shape[1]), "height": int(sheet.shape[0]),
                          "thumbnails": replay.log.sampler.chosen(), "held_definition": HELD_DEFINITION},
        "shots": shot_table(replay.log, cover),
    }
    answers_path, sheet_path = out / "answers.json", out / "contact_sheet.png"
    try:
        answers_path.write_text(json.dumps(report, indent=2) + "\n")
        write_png(sheet_path, sheet)
    except OSError as exc:
        raise UserError(f"cannot write the results to '{out}': {exc.strerror or exc}") from exc
    for record in replay.answers:
        print(answer_line(record))
    print(f"wrote {answers_path} and {sheet_path}")
    if problem is None:
        return EXIT_OK
    return 130 if problem.startswith("interrupted") else EXIT_ERROR
