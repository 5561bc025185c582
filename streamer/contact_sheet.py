"""What the memory holds of each Shot, and the contact sheet that shows it (``mixmalmm replay``, ``demo``).

- `memory_cover`: per Shot folded into a stream state, its "held" share and mean merge count;
- `ShotLog`: every Shot folded in (`ShotRecord`s) and the thumbnails of at most a given number of them,
  evenly sampled over the whole video in bounded memory (`ThumbnailSampler`);
- `draw_contact_sheet`: the thumbnails, each with its time span and its "held" share, in a grid
  (`SheetLayout`), and under them a strip over the whole video with one bar per Shot, as tall as that
  share (`strip_heights`); `write_png` writes it;
- `memory_report`, `shot_table`: the memory, the sheet and the Shots as answers.json lists them; `format_time` / `format_span`: video times as
  text, as the sheet and the commands print them.

"Held by memory" (MA-LMM compresses each token column of the visual bank on its own): after the last
Shot the visual bank holds, in every one of its N token columns, at most M+1 entries, each the average
of a run of consecutive Shots (its merge count). For Shot i, ``held`` is the fraction of the N columns
in which Shot i is still an entry of its own (merge count 1), and ``mean_merge`` is the mean, over the
columns, of the merge count of the entry that contains Shot i (1.0: never merged). With
``memory_bank_length`` 0 (no bank) the memory is the newest Shot alone: it has held 1 and mean_merge 1, every
other Shot held 0 and mean_merge 0 (no entry contains it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Most Shots whose thumbnails a contact sheet shows by default.
DEFAULT_THUMBNAILS = 48
#: The sheet's file name beside answers.json.
SHEET_FILE = "contact_sheet.png"

HELD_DEFINITION = (
    "held: the fraction of the visual memory bank's token columns in which the Shot is still an entry of its "
    "own (merge count 1); mean_merge: the mean over the columns of the merge count of the entry containing "
    "the Shot (0: no entry contains it)"
)


# ---------------------------------------------------------------------------------------------------
# video times as text


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
    """(start, end) in seconds as ``m:ss.s-m:ss.s`` (see `format_time`); ``nothing yet`` for None."""
    return "nothing yet" if span is None else f"{format_time(span[0])}-{format_time(span[1])}"


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
    """Where everything lies on a contact sheet of `count` thumbnails of thumb_width x thumb_height px,
    `per_row` to a row, with the whole-video strip under them when `strip`."""

    count: int
    thumb_width: int
    thumb_height: int
    per_row: int = COLUMNS
    strip: bool = True

    @property
    def columns(self) -> int:
        return max(1, min(self.count, self.per_row))

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
        return MARGIN + HEADER + grid + (STRIP_BLOCK if self.strip else 0) + MARGIN

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
    _draw_thumbnails(img, layout, [(shots[i], thumbnails.images[i]) for i in chosen], cover)
    x0, y0, x1, y1 = layout.strip_box()
    _put(img, "memory over the whole video: one bar per Shot, as tall as its held share", x0, y0 - 5, _DIM,
         width=inner)
    cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (44, 44, 50), thickness=-1)
    heights = strip_heights(shots, cover.held, x1 - x0)
    for x in np.nonzero(heights)[0]:
        img[y1 - heights[x] : y1, x0 + x] = _HELD
    return img


def _draw_thumbnails(img: np.ndarray, layout: SheetLayout, items: Sequence[tuple[ShotRecord, np.ndarray]],
                     cover: MemoryCover | None) -> None:
    """Each (Shot, thumbnail) in its cell, framed by its held share, captioned with its span, frames, held
    share and mean merge count (those two left out without a `cover`)."""
    import cv2

    th = layout.thumb_height
    for k, (s, image) in enumerate(items):
        i = s.index
        x, y = layout.thumb_origin(k)
        held = cover.held[i] if cover is not None and i < len(cover.held) else 0.0
        cv2.rectangle(img, (x - BORDER, y - BORDER), (x + layout.thumb_width + BORDER - 1, y + th + BORDER - 1),
                      _mix(_FORGOTTEN, _HELD, held), thickness=-1)
        img[y : y + th, x : x + layout.thumb_width] = image
        ty = y + th + BORDER + LINE - 2
        _put(img, f"#{i} {format_time(s.start)}-{format_time(s.end)} ({s.frames}f)", x - BORDER, ty,
             width=layout.cell_width)
        if cover is not None:
            merge = cover.mean_merge[i] if i < len(cover.mean_merge) else 0.0
            _put(img, f"held {held:.0%}  merge {merge:.1f}", x - BORDER, ty + LINE, _DIM, width=layout.cell_width)


#: Thumbnails the engine keeps of each stream's memory (alerts' strip, the console's memory sheet).
MEMORY_THUMBNAILS = 12
MEMORY_THUMB_WIDTH = 128


class MemoryThumbnails:
    """What a stream keeps to draw its memory: thumbnails of at most `limit` of the Shots it took in,
    evenly spread over all of them (a `ThumbnailSampler`, O(limit) memory however long the stream), and
    each one's `ShotRecord`. Index = the Shot's place among all Shots in the memory, restored ones
    included. `offer` is called by the model thread, `items` by any other: a lock of its own."""

    def __init__(self, limit: int = MEMORY_THUMBNAILS, thumb_width: int = MEMORY_THUMB_WIDTH):
        import threading

        self.sampler = ThumbnailSampler(limit, thumb_width)
        self.records: dict[int, ShotRecord] = {}
        self._lock = threading.Lock()

    def offer(self, index: int, shot) -> None:
        """Consider a Shot just folded into the memory as its `index`-th."""
        if self.sampler.thumb_height is not None and index % self.sampler.stride:
            return  # the common case, without the lock
        with self._lock:
            self.sampler.offer(index, shot.image)
            if index in self.sampler.images:
                self.records[index] = ShotRecord(index, float(shot.start), float(shot.end), int(shot.count))
                if len(self.records) > len(self.sampler.images):
                    self.records = {i: r for i, r in self.records.items() if i in self.sampler.images}

    def items(self) -> list[tuple[ShotRecord, np.ndarray]]:
        """The Shots to show, in order, with their thumbnails (at most `limit`)."""
        with self._lock:
            return [(self.records[i], self.sampler.images[i]) for i in self.sampler.chosen()]


def draw_memory_sheet(items: Sequence[tuple[ShotRecord, np.ndarray]], cover: MemoryCover | None, *, title: str,
                      per_row: int = COLUMNS) -> np.ndarray | None:
    """A stream's memory as [H, W, 3] uint8 RGB: its kept thumbnails (`MemoryThumbnails.items`) `per_row` to
    a row (all in one: the strip of an alert), each with its span and, given a `cover`, its held share.
    None without a thumbnail."""
    if not items:
        return None
    th, tw = items[0][1].shape[:2]
    layout = SheetLayout(len(items), tw, th, per_row=per_row, strip=False)
    img = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    img[:] = _BACKGROUND
    inner = layout.width - 2 * MARGIN
    _put(img, title, MARGIN, MARGIN + LINE - 3, scale=0.5, width=inner)
    if cover is not None:
        held = cover.held.size
        what = (f"{held} Shots in memory, {cover.entries} entries in each of {cover.columns} token columns; "
                f"showing {len(items)}, evenly sampled")
    else:
        what = f"showing {len(items)} Shots, evenly sampled"
    _put(img, what, MARGIN, MARGIN + 2 * LINE, _DIM, width=inner)
    if cover is not None:
        _put(img, "held = share of token columns where the Shot is still its own memory entry (green border: all)",
             MARGIN, MARGIN + 3 * LINE, _DIM, scale=0.38, width=inner)
    _draw_thumbnails(img, layout, items, cover)
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
# answers.json


def memory_report(log: ShotLog, cover: MemoryCover, sheet: np.ndarray) -> dict:
    """answers.json's fields about the memory and the sheet: memory_entries and memory_columns (of the
    visual bank), contact_sheet (its file, size in pixels, the Shots shown, what "held" means) and
    shots (`shot_table`). sheet: [H, W, 3] uint8, from `draw_contact_sheet`."""
    return {
        "memory_entries": cover.entries,
        "memory_columns": cover.columns,
        "contact_sheet": {"file": SHEET_FILE, "width": int(sheet.shape[1]), "height": int(sheet.shape[0]),
                          "thumbnails": log.sampler.chosen(), "held_definition": HELD_DEFINITION},
        "shots": shot_table(log, cover),
    }


def shot_table(log: ShotLog, cover: MemoryCover) -> list[dict]:
    """Every Shot for answers.json: index, span (seconds), frames blended, held share and mean merge count."""
    return [{"index": s.index, "start_s": s.start, "end_s": s.end, "frames": s.frames,
             "held": round(float(cover.held[s.index]), 6), "mean_merge": round(float(cover.mean_merge[s.index]), 6)}
            for s in log.shots]
