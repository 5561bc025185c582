"""A deterministic synthetic video world: coloured shapes that enter, move, turn, change colour and leave.

Every video comes from a seed. A `Scenario` (the shapes and their events) is drawn from the seed, simulated
frame by frame in unit coordinates, and rendered as RGB uint8 frames [H, W, 3] at any size. The ground truth
behind every question comes from the rendered masks (at `TRUTH_SIZE` pixels, whatever the render size), not
from the script: a shape "is there" when enough of it is visible, with occlusion by shapes drawn above it.

Questions are about the present (they need the newest frame only) or the past (they need memory):

    colour_now     "what colour is the circle now?"                  present
    shape_now      "which shape is red now?"                         present
    count_now      "how many shapes are there now?"                  present
    first_shape    "which shape appeared first?"                     memory
    count_entered  "how many shapes have entered?"                   memory
    colour_before  "what colour was the square before it changed?"   memory
    shape_left     "which shape left?"                               memory

Every answer is one word of `ANSWER_WORDS`. A question is asked about a video seen up to frame `end`
(exclusive), so the same video also serves mid-stream questions; questions whose answer the frames leave
ambiguous (a shape half in view, two shapes entering at once) are not asked.

`world_tokenizers()` builds the word-level tokenizers (LLM and Q-Former) over this world's vocabulary;
`make_demo_video(path)` writes the demo video (H.264, PyAV) and returns its questions and answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 190, 55),
    "blue": (45, 95, 240),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
}
NUMBERS = ("zero", "one", "two", "three")
ANSWER_WORDS = (*COLOURS, *SHAPES, *NUMBERS)

MIN_VIDEO_FRAMES, MAX_VIDEO_FRAMES = 40, 72  # random videos' lengths (frames, 8 fps)
BUSY_FRAMES = 56  # the shortest busy video (`SyntheticVideoQA(busy=)`): shorter ones rarely fit every event
TRUTH_SIZE = 64  # pixels of the masks behind the ground truth
SEEN = 0.3  # a shape has appeared once this fraction of it is visible
PRESENT = 0.5  # a shape is there "now" when this fraction is visible; below it and above 0 is ambiguous
MIN_GAP = 6  # frames between two appearances for "which shape appeared first?"
# Earliest video frame at which a question type is often answerable (random scenarios script their
# events relative to the video's length): clips of a type end no earlier than this.
MIN_END = {"colour_now": 12, "shape_now": 12, "count_now": 12, "first_shape": 12, "count_entered": 12, "colour_before": 24,
           "shape_left": 32}
MIN_SHOWN = 4  # frames a colour must have been visible before "what colour was it before it changed?"


@dataclass(frozen=True)
class QuestionType:
    """A kind of question: its name, template ({shape} or {colour} is filled in) and whether it needs the past."""

    name: str
    template: str
    memory: bool


QUESTION_TYPES: dict[str, QuestionType] = {
    q.name: q
    for q in (
        QuestionType("colour_now", "what colour is the {shape} now?", False),
        QuestionType("shape_now", "which shape is {colour} now?", False),
        QuestionType("count_now", "how many shapes are there now?", False),
        QuestionType("first_shape", "which shape appeared first?", True),
        QuestionType("count_entered", "how many shapes have entered?", True),
        QuestionType("colour_before", "what colour was the {shape} before it changed?", True),
        QuestionType("shape_left", "which shape left?", True),
    )
}

# Prompt words of MA-LMM's QA template and the model's default question ("what is happening in the video?").
_EXTRA_WORDS = ("question", "short", "answer", "is", "happening", "in", "video", "the", "what")


def vocabulary() -> list[str]:
    """Every word of this world's questions, answers and prompts (punctuation is added by the tokenizer)."""
    words: list[str] = []
    texts = [q.template.format(shape=s, colour=c) for q in QUESTION_TYPES.values() for s in SHAPES for c in COLOURS]
    for text in [*texts, *ANSWER_WORDS, *_EXTRA_WORDS]:
        for w in text.replace("?", " ").split():
            if w not in words:
                words.append(w)
    return words


def world_tokenizers():
    """(LLM tokenizer, Q-Former tokenizer): word-level `PreTrainedTokenizerFast`s over `vocabulary()`.

    Built in code (the `tokenizers` WordLevel model), nothing downloaded; the LLM one is Llama-style
    ("<s> words", eos "</s>"), the Q-Former one BERT-style ("[CLS] words [SEP]").
    """
    from .tiny import tiny_llm_tokenizer, tiny_qformer_tokenizer

    words = vocabulary()
    return tiny_llm_tokenizer(words), tiny_qformer_tokenizer(words)


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class ShapeScript:
    """One shape's life in a video (frames are indices of the video's frames).

    enter: frame it starts sliding in from `edge` ("left", "right", "top", "bottom"), or, with edge
    "inside", the frame it is first drawn fully in view at `start` (unit coordinates). along: where
    along the edge it enters (0..1). speed: unit lengths per frame. angle: degrees off the inward
    direction. radius: unit lengths. colour / new_colour at change (None: never changes). turn: frame
    it turns by `turn_angle` degrees (None: never). leave: frame it heads for the nearest edge and
    leaves, never to come back (None: stays).
    """

    shape: str
    colour: str
    enter: int
    edge: str
    along: float
    speed: float
    angle: float
    radius: float
    start: tuple[float, float] = (0.5, 0.5)
    change: int | None = None
    new_colour: str | None = None
    turn: int | None = None
    turn_angle: float = 0.0
    leave: int | None = None

    def colour_at(self, frame: int) -> str:
        if self.change is not None and frame >= self.change:
            assert self.new_colour is not None
            return self.new_colour
        return self.colour


@dataclass(frozen=True)
class Background:
    """A static background: two low-saturation tints and a style ("solid", "gradient", "blobs", "stripes")."""

    style: str
    tint_a: tuple[int, int, int]
    tint_b: tuple[int, int, int]
    angle: float  # degrees (gradient direction, stripe direction)
    seed: int  # blobs' noise


@dataclass(frozen=True)
class Scenario:
    """A whole video: its frames count, background and shapes (drawn in list order, later ones on top)."""

    frames: int
    background: Background
    shapes: tuple[ShapeScript, ...]
    fps: float = 8.0
    noise: float = 3.0  # pixel noise std (0-255 levels), as a camera's


def _tint(rng: np.random.Generator) -> tuple[int, int, int]:
    base = rng.uniform(25, 115)
    return tuple(int(np.clip(base + rng.uniform(-18, 18), 0, 255)) for _ in range(3))


def random_scenario(seed: int, frames: int | None = None) -> Scenario:
    """Draw a scenario from a seed (the same seed always gives the same scenario).

    1-3 shapes of distinct kinds enter at distinct times in the first 60% of the video; each may change
    colour once (no colour is ever worn by two shapes), turn once; one may leave. Nothing happens in the
    last 20%.
    """
    rng = np.random.default_rng([seed, 7])
    F = int(frames if frames is not None else rng.integers(MIN_VIDEO_FRAMES, MAX_VIDEO_FRAMES + 1))
    if F < 24:
        raise ValueError(f"a scenario needs at least 24 frames, got {F}")
    background = Background(
        style=str(rng.choice(["solid", "gradient", "blobs", "stripes"])),
        tint_a=_tint(rng),
        tint_b=_tint(rng),
        angle=float(rng.uniform(0, 180)),
        seed=int(rng.integers(0, 2**31)),
    )
    n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    kinds = [str(s) for s in rng.permutation(SHAPES)[:n]]
    palette = list(COLOURS)
    colours = [str(c) for c in rng.permutation(palette)[:n]]
    # Entry frames: distinct, at least 2*MIN_GAP apart, the first at the start or soon after.
    last_event = int(0.8 * F)
    window = max(1, int(0.6 * F))
    enters: list[int] = []
    for i in range(n):
        lo = 0 if i == 0 else enters[-1] + 2 * MIN_GAP
        if lo >= window:
            break
        hi = max(lo + 1, min(window, lo + F // 3)) if i else max(1, F // 10)
        enters.append(int(rng.integers(lo, hi)))
    n = len(enters)
    leaver = int(rng.integers(0, n)) if rng.random() < 0.5 else None
    shapes, used = [], []
    for i in range(n):
        inside = i == 0 and enters[0] == 0 and rng.random() < 0.5
        edge = "inside" if inside else str(rng.choice(["left", "right", "top", "bottom"]))
        radius = float(rng.uniform(0.12, 0.16))
        change = new_colour = turn = leave = None
        appear_by = enters[i] + 6  # slid in by then (speed >= 0.02 per frame)
        free = [c for c in palette if c not in colours and c not in used]  # every colour names one shape
        if free and rng.random() < 0.5 and appear_by + MIN_SHOWN + 2 < last_event - 4:
            change = int(rng.integers(appear_by + MIN_SHOWN + 2, last_event - 4))
            new_colour = str(rng.choice(free))
            used.append(new_colour)
        if rng.random() < 0.5:
            turn = int(rng.integers(appear_by, last_event))
        if leaver == i and appear_by + 8 < last_event - 8:
            leave = int(rng.integers(appear_by + 8, last_event - 8))
        shapes.append(
            ShapeScript(
                shape=kinds[i],
                colour=colours[i],
                enter=enters[i],
                edge=edge,
                along=float(rng.uniform(0.25, 0.75)),
                speed=float(rng.uniform(0.02, 0.035)),
                angle=float(rng.uniform(-35, 35)),
                radius=radius,
                start=(float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))),
                change=change,
                new_colour=new_colour,
                turn=turn,
                turn_angle=float(rng.choice([-1, 1]) * rng.uniform(60, 150)),
                leave=leave,
            )
        )
    return Scenario(frames=F, background=background, shapes=tuple(shapes))


def demo_scenario() -> Scenario:
    """The demo video's script (8 s at 8 fps): every kind of event, in an order that needs memory.

    A red circle is there from the start and wanders; a blue square slides in from the top; a yellow
    triangle from the right; the square turns green; the circle leaves by the left edge.
    """
    return Scenario(
        frames=64,
        background=Background("gradient", (40, 52, 70), (92, 84, 70), angle=30.0, seed=0),
        shapes=(
            ShapeScript("circle", "red", enter=0, edge="inside", along=0.5, speed=0.02, angle=20.0,
                        radius=0.14, start=(0.22, 0.3), turn=16, turn_angle=110.0, leave=38),
            ShapeScript("square", "blue", enter=10, edge="top", along=0.6, speed=0.022, angle=35.0,
                        radius=0.13, change=30, new_colour="green"),
            ShapeScript("triangle", "yellow", enter=20, edge="right", along=0.78, speed=0.024, angle=-10.0,
                        radius=0.14, turn=44, turn_angle=-70.0),
        ),
    )


# ---------------------------------------------------------------- simulation and rendering


def _heading(edge: str, angle: float) -> np.ndarray:
    inward = {"left": 0.0, "right": 180.0, "top": 90.0, "bottom": -90.0, "inside": 0.0}[edge]
    a = math.radians(inward + angle)
    return np.array([math.cos(a), math.sin(a)])


def simulate(script: ShapeScript, frames: int) -> np.ndarray:
    """Centres [frames, 2] in unit coordinates (x right, y down); NaN where the shape is not drawn.

    The shape bounces off the walls once fully inside (a change of direction), turns at `turn`, and at
    `leave` heads straight for the nearest wall, faster, until it is out of view for good.
    """
    out = np.full((frames, 2), np.nan)
    r = script.radius
    if script.edge == "inside":
        pos = np.array(script.start, dtype=float)
    else:
        pos = {
            "left": np.array([-r, script.along]),
            "right": np.array([1 + r, script.along]),
            "top": np.array([script.along, -r]),
            "bottom": np.array([script.along, 1 + r]),
        }[script.edge]
    vel = _heading(script.edge, script.angle) * script.speed
    inside = script.edge == "inside"
    leaving = False
    for f in range(script.enter, frames):
        if script.leave is not None and f == script.leave:
            leaving = True
            dist = {"left": pos[0], "right": 1 - pos[0], "top": pos[1], "bottom": 1 - pos[1]}
            edge = min(dist, key=dist.get)
            vel = _heading(edge, 0.0) * -1 * max(0.05, 2 * script.speed)
        if script.turn is not None and f == script.turn and not leaving:
            a = math.radians(script.turn_angle)
            vel = np.array([vel[0] * math.cos(a) - vel[1] * math.sin(a), vel[0] * math.sin(a) + vel[1] * math.cos(a)])
        if leaving and bool((pos < -r).any() or (pos > 1 + r).any()):
            break  # gone for good
        out[f] = pos
        if not leaving:
            inside = inside or bool(((pos > r) & (pos < 1 - r)).all())
            if inside:  # bounce off the walls
                for k in range(2):
                    if (pos[k] + vel[k] < r and vel[k] < 0) or (pos[k] + vel[k] > 1 - r and vel[k] > 0):
                        vel[k] = -vel[k]
        pos = pos + vel
    return out


def _polygon(shape: str, centre: np.ndarray, radius: float, size: int) -> np.ndarray | None:
    """Integer polygon (fixed point, 4 fractional bits) for a square or triangle, pixel units."""
    c = centre * size
    r = radius * size
    if shape == "square":
        d = r * 0.9
        pts = [(c[0] - d, c[1] - d), (c[0] + d, c[1] - d), (c[0] + d, c[1] + d), (c[0] - d, c[1] + d)]
    elif shape == "triangle":
        pts = [(c[0] + r * math.cos(math.radians(a)), c[1] + r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    else:
        return None
    return (np.array(pts) * 16).round().astype(np.int32)


def _draw(img: np.ndarray, shape: str, centre: np.ndarray, radius: float, colour, antialias: bool) -> None:
    size = img.shape[0]
    line = cv2.LINE_AA if antialias else cv2.LINE_8
    if shape == "circle":
        c = (centre * size * 16).round().astype(np.int64)
        cv2.circle(img, (int(c[0]), int(c[1])), int(round(radius * size * 16)), colour, -1, line, shift=4)
    else:
        cv2.fillPoly(img, [_polygon(shape, centre, radius, size)], colour, line, shift=4)


def _background(bg: Background, size: int) -> np.ndarray:
    a = np.array(bg.tint_a, dtype=np.float32)
    b = np.array(bg.tint_b, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    th = math.radians(bg.angle)
    u = xx * math.cos(th) + yy * math.sin(th)
    if bg.style == "solid":
        w = np.zeros_like(u)
    elif bg.style == "gradient":
        w = (u - u.min()) / max(1e-6, float(u.max() - u.min()))
    elif bg.style == "stripes":
        w = 0.5 + 0.5 * np.sign(np.sin(u * 2 * math.pi * 3))
    elif bg.style == "blobs":
        coarse = np.random.default_rng(bg.seed).random((5, 5)).astype(np.float32)
        w = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        w = (w - w.min()) / max(1e-6, float(w.max() - w.min()))
    else:
        raise ValueError(f"unknown background style {bg.style!r}")
    img = a[None, None] * (1 - w[..., None]) + b[None, None] * w[..., None]
    return img.clip(0, 255).astype(np.uint8)


@dataclass
class Video:
    """A simulated scenario: shape centres per frame, and visibility behind the ground truth.

    centres: one [F, 2] array per shape (NaN where not drawn). visible: [S, F] fraction of each shape's
    full area in view (after occlusion by shapes drawn above it), measured on TRUTH_SIZE masks.
    """

    scenario: Scenario
    centres: list[np.ndarray]
    visible: np.ndarray
    _backgrounds: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def frames(self) -> int:
        return self.scenario.frames

    # ------------------------------------------------------------ pixels

    def render(self, index: int, size: int = 128, *, noise: bool = True) -> np.ndarray:
        """Frame `index` as RGB uint8 [size, size, 3]; the noise is seeded by the frame, so it repeats."""
        if not 0 <= index < self.frames:
            raise IndexError(f"frame {index} out of range: the video has {self.frames} frames")
        if size not in self._backgrounds:
            self._backgrounds[size] = _background(self.scenario.background, size)
        img = self._backgrounds[size].copy()
        for script, centres in zip(self.scenario.shapes, self.centres, strict=True):
            if not np.isnan(centres[index, 0]):
                _draw(img, script.shape, centres[index], script.radius, COLOURS[script.colour_at(index)], True)
        if noise and self.scenario.noise > 0:
            rng = np.random.default_rng([self.scenario.background.seed, index, size])
            img = (img + rng.normal(0, self.scenario.noise, img.shape)).clip(0, 255).astype(np.uint8)
        return img

    def render_all(self, size: int = 128, indices: Sequence[int] | None = None) -> np.ndarray:
        """Frames [T, size, size, 3] uint8 (all, or the given indices in that order)."""
        idx = range(self.frames) if indices is None else indices
        return np.stack([self.render(int(i), size) for i in idx])

    # ------------------------------------------------------------ ground truth

    def seen_at(self, end: int, indices: Sequence[int] | None = None) -> list[int | None]:
        """Per shape: the first frame < end (of `indices`, if given) with at least SEEN of it visible
        (None: not yet)."""
        shown = self._shown(end, indices)
        out = []
        for s in range(len(self.scenario.shapes)):
            hits = np.nonzero(shown & (self.visible[s] >= SEEN))[0]
            out.append(int(hits[0]) if len(hits) else None)
        return out

    def _shown(self, end: int, indices: Sequence[int] | None) -> np.ndarray:
        """Boolean [frames]: the frames a model saw (all of [0, end), or `indices`, which must lie below end)."""
        shown = np.zeros(self.frames, bool)
        if indices is None:
            shown[:end] = True
        else:
            idx = np.asarray(indices, dtype=int)
            if len(idx) == 0 or idx.min() < 0 or idx.max() >= end:
                raise ValueError(f"indices must be frames in [0, {end}), got {list(indices)}")
            shown[idx] = True
        return shown

    def questions(self, end: int | None = None, indices: Sequence[int] | None = None) -> list[tuple[str, str, str]]:
        """(question, answer, type name) for every question the frames [0, end) answer unambiguously.

        indices: the frames a model saw (e.g. every stride-th): then the truth is what those frames show —
        "now" is the newest of them, a shape has entered when one of them shows it, and a colour before a
        change counts when one of them shows it — so no question asks about what happened unseen between
        them. Without indices every frame below end counts.
        """
        end = self.frames if end is None else end
        if not 1 <= end <= self.frames:
            raise ValueError(f"end must be in 1..{self.frames}, got {end}")
        shown = self._shown(end, indices)
        last = int(np.nonzero(shown)[0][-1])  # "now": the newest frame seen
        shapes = self.scenario.shapes
        now = self.visible[:, last]
        seen = self.seen_at(end, indices)
        peak = self.visible[:, shown].max(axis=1)
        out: list[tuple[str, str, str]] = []

        def ask(kind: str, answer: str, shape: str = "", colour: str = "") -> None:
            out.append((QUESTION_TYPES[kind].template.format(shape=shape, colour=colour), answer, kind))

        # Present. A shape between 0 and PRESENT visible is neither clearly there nor clearly gone.
        ambiguous_now = bool(((now > 0) & (now < PRESENT)).any())
        for s, script in enumerate(shapes):
            if now[s] >= PRESENT:
                ask("colour_now", script.colour_at(last), script.shape)
                ask("shape_now", script.shape, colour=script.colour_at(last))
        if not ambiguous_now:
            ask("count_now", NUMBERS[int((now >= PRESENT).sum())])
        # Past. A shape that peaked between 0 and SEEN may or may not count as having appeared.
        if bool(((peak > 0) & (peak < SEEN)).any()):
            return out
        entered = [(t, s) for s, t in enumerate(seen) if t is not None]
        if entered:
            ask("count_entered", NUMBERS[len(entered)])
            times = sorted(entered)
            if len(times) == 1 or times[1][0] - times[0][0] >= MIN_GAP:
                ask("first_shape", shapes[times[0][1]].shape)
        frame = np.arange(self.frames)
        shown_before_change = MIN_SHOWN if indices is None else 1  # sampled frames are far apart
        for s, script in enumerate(shapes):
            if script.change is None or script.change > last or seen[s] is None:
                continue
            before = self.visible[s, shown & (frame < script.change)] >= SEEN
            after = self.visible[s, shown & (frame >= script.change)] >= SEEN
            if before.sum() >= shown_before_change and after.any():
                ask("colour_before", script.colour, script.shape)
        left = [s for s in range(len(shapes)) if seen[s] is not None and now[s] == 0 and self._gone(s, last + 1)]
        stayed_or_left_ambiguous = any(seen[s] is not None and now[s] == 0 and not self._gone(s, last + 1)
                                       for s in range(len(shapes)))
        if len(left) == 1 and not stayed_or_left_ambiguous:
            ask("shape_left", shapes[left[0]].shape)
        return out

    def shape_colours(self, index: int) -> np.ndarray:
        """What frame `index` shows, per kind of SHAPES: 0 when that kind is not in view, 1 + its colour's
        index in COLOURS when at least PRESENT of it is visible, -1 when it is partly in view (ambiguous).
        The labels a vision encoder pretrains on (`labelled_frames`)."""
        out = np.zeros(len(SHAPES), np.int64)
        palette = list(COLOURS)
        for s, script in enumerate(self.scenario.shapes):
            visible = self.visible[s, index]
            if visible >= PRESENT:
                out[SHAPES.index(script.shape)] = 1 + palette.index(script.colour_at(index))
            elif visible > 0:
                out[SHAPES.index(script.shape)] = -1
        return out

    def shape_map(self, index: int) -> np.ndarray:
        """What each pixel of frame `index` shows, at TRUTH_SIZE: 0 background, else 1 + kind * len(COLOURS) +
        colour (indices in SHAPES and COLOURS) of the shape drawn on top there. int64 [TRUTH_SIZE, TRUTH_SIZE]."""
        out = np.zeros((TRUTH_SIZE, TRUTH_SIZE), np.int64)
        palette = list(COLOURS)
        for script, mask in zip(self.scenario.shapes, truth_masks(self.scenario, self.centres, index), strict=True):
            if mask is not None:  # later ones on top
                out[mask] = 1 + SHAPES.index(script.shape) * len(palette) + palette.index(script.colour_at(index))
        return out

    def overlapping(self) -> np.ndarray:
        """Boolean [frames]: some shape covers part of another there (their TRUTH_SIZE masks intersect)."""
        out = np.zeros(self.frames, bool)
        for f in range(self.frames):
            drawn = [m for m in truth_masks(self.scenario, self.centres, f) if m is not None]
            out[f] = len(drawn) > 1 and bool((np.sum(drawn, axis=0) > 1).any())
        return out

    def _gone(self, s: int, end: int) -> bool:
        """Shape s has left for good by frame end-1 (it was scripted to leave and is no longer drawn)."""
        leave = self.scenario.shapes[s].leave
        return leave is not None and leave < end and bool(np.isnan(self.centres[s][end - 1, 0]))


def simulate_video(scenario: Scenario) -> Video:
    """Simulate a scenario and measure every shape's visibility per frame (TRUTH_SIZE masks)."""
    F, size = scenario.frames, TRUTH_SIZE
    centres = [simulate(s, F) for s in scenario.shapes]
    full = []
    for script in scenario.shapes:
        m = np.zeros((size, size), np.uint8)
        _draw(m, script.shape, np.array([0.5, 0.5]), script.radius, 1, False)
        full.append(max(1, int(m.sum())))
    visible = np.zeros((len(scenario.shapes), F))
    for f in range(F):
        masks = truth_masks(scenario, centres, f)
        above = np.zeros((size, size), bool)
        for s in range(len(masks) - 1, -1, -1):  # later shapes are drawn on top
            if masks[s] is not None:
                visible[s, f] = (masks[s] & ~above).sum() / full[s]
                above |= masks[s]
    return Video(scenario=scenario, centres=centres, visible=visible)


def truth_masks(scenario: Scenario, centres: list[np.ndarray], index: int) -> list[np.ndarray | None]:
    """Each shape's pixels at frame `index` on the TRUTH_SIZE grid (bool), None where it is not drawn: what
    visibility, pixel maps and overlaps are measured on."""
    out: list[np.ndarray | None] = []
    for script, c in zip(scenario.shapes, centres, strict=True):
        if np.isnan(c[index, 0]):
            out.append(None)
            continue
        mask = np.zeros((TRUTH_SIZE, TRUTH_SIZE), np.uint8)
        _draw(mask, script.shape, c[index], script.radius, 1, False)
        out.append(mask.astype(bool))
    return out


def busy_scenario(scenario: Scenario) -> bool:
    """Every kind of event in one video: three shapes, one of them leaves and one changes colour."""
    shapes = scenario.shapes
    return len(shapes) == 3 and any(s.leave is not None for s in shapes) and any(s.change is not None for s in shapes)


def make_video(seed: int, frames: int | None = None) -> Video:
    """`simulate_video(random_scenario(seed, frames))`."""
    return simulate_video(random_scenario(seed, frames))


def labelled_frames(
    videos: int, seed: int, per_video: int = 8, sizes: Sequence[int] = (64, 128), overlap: float = 0.0
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Single frames for pretraining a vision encoder: `per_video` random frames of each of `videos` random
    videos (video seeds `seed * 1_000_003 + v`, as the question datasets'), each rendered at a size drawn
    from `sizes`; their labels [N, len(SHAPES)] (`Video.shape_colours`: which colour each kind of shape
    wears, 0 absent, -1 unknown) and their pixel maps [N, TRUTH_SIZE, TRUTH_SIZE] (`Video.shape_map`).

    overlap: the share of frames drawn, where a video has any, among the frames in which one shape covers
    part of another (`Video.overlapping`; about 8% of all frames). Drawn from its own generator, so
    overlap=0 gives the same frames as before it existed."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be a probability, got {overlap}")
    rng = np.random.default_rng([seed, 11])
    own = np.random.default_rng([seed, 19])
    frames, labels, maps = [], [], []
    for v in range(videos):
        video = make_video(seed * 1_000_003 + v)
        indices = rng.integers(0, video.frames, per_video)
        if overlap > 0:
            swap = own.random(per_video) < overlap
            if swap.any():
                covered = np.nonzero(video.overlapping())[0]
                if len(covered):
                    indices = np.where(swap, own.choice(covered, per_video), indices)
        for index in indices:
            frames.append(video.render(int(index), int(rng.choice(sizes))))
            labels.append(video.shape_colours(int(index)))
            maps.append(video.shape_map(int(index)))
    return frames, np.stack(labels), np.stack(maps)


# ---------------------------------------------------------------- sampling frames for the model


def sample_indices(frames: int, how: str, count: int | None = None, stride: int | None = None) -> list[int]:
    """Which frames of [0, frames) a model sees.

    how: "stride" (every `stride`-th frame from 0, as a stream sampled every step-th frame) or
    "uniform" (`count` frames spread evenly from the first to the last, as MA-LMM samples a clip).
    """
    if frames < 1:
        raise ValueError(f"need at least one frame, got {frames}")
    if how == "stride":
        if stride is None or stride < 1:
            raise ValueError(f"stride sampling needs stride >= 1, got {stride}")
        # End on the newest frame, as a stream does when asked: the last index is frames - 1.
        return list(range((frames - 1) % stride, frames, stride))
    if how == "uniform":
        if count is None or count < 1:
            raise ValueError(f"uniform sampling needs count >= 1, got {count}")
        # From the newest frame back, so one frame means the newest (a question is about "now").
        return sorted({int(round(x)) for x in np.linspace(frames - 1, 0, min(count, frames))})
    raise ValueError(f"how must be 'stride' or 'uniform', got {how!r}")


def blend_windows(frames: np.ndarray, window: int, blend: str = "exponential") -> np.ndarray:
    """ActionShot composites of consecutive windows of `window` frames: [T, H, W, 3] -> [ceil(T / window), H,
    W, 3] uint8, the windows starting at frame 0 (the last one may be shorter, as at the end of a file).

    What the engine's ActionShot makes of this world's frames with `max_seconds = window / fps` (this world
    has no scene cut): "exponential" folds cv2.addWeighted(composite, 0.5, frame, 0.5) (MixMA-LMM's blend),
    "mean" is each window's mean rounded half up. tests/model/test_synthetic.py checks both against
    `mixmalmm.streamer.actionshot.ActionShot` (the model package cannot import the streamer's).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 frames, got {window}")
    out = []
    for start in range(0, len(frames), window):
        group = frames[start : start + window]
        if blend == "exponential":
            image = group[0].copy()
            for frame in group[1:]:
                image = cv2.addWeighted(image, 0.5, frame, 0.5, 0.0)
        elif blend == "mean":
            total = group.astype(np.int32).sum(axis=0)
            image = ((2 * total + len(group)) // (2 * len(group))).astype(np.uint8)
        else:
            raise ValueError(f"blend must be 'exponential' or 'mean', got {blend!r}")
        out.append(image)
    return np.stack(out)


# ---------------------------------------------------------------- question-answer datasets


@dataclass(frozen=True)
class Sample:
    """One (frames, question, answer): frames [T, H, W, 3] RGB uint8, plus where it came from."""

    frames: np.ndarray
    question: str
    answer: str
    kind: str
    seed: int
    end: int
    indices: tuple[int, ...]

    def __iter__(self):  # unpacks as (frames, question, answer): the generic dataset item
        return iter((self.frames, self.question, self.answer))


class _SeededVideos:
    """What both datasets share: `count` items, item i drawn from the video seed `seed * 1_000_003 + i`,
    render sizes, question types, and a per-item random generator (checked index, a salt per dataset)."""

    def __init__(self, count: int, seed: int, size: int | Sequence[int], kinds: Sequence[str] | None) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        unknown = set(kinds or ()) - set(QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question types {sorted(unknown)}; known: {list(QUESTION_TYPES)}")
        self.count, self.seed = count, seed
        self.sizes = (size,) if isinstance(size, int) else tuple(size)
        self.kinds = tuple(kinds) if kinds else tuple(QUESTION_TYPES)

    def __len__(self) -> int:
        return self.count

    def video_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def _rng(self, index: int, salt: int) -> np.random.Generator:
        if not 0 <= index < self.count:
            raise IndexError(f"item {index} out of range for {self.count} items")
        return np.random.default_rng([self.video_seed(index), salt])


class SyntheticQA(_SeededVideos):
    """A map-style dataset of `Sample`s, each from its own seeded video; deterministic for (seed, index).

    Item i draws, from the seed `seed * 1_000_003 + i`: a question type (uniform over `kinds`), how the
    model sees the video (every 2nd-4th frame from the start, as a stream sampled every step-th frame,
    or `frames` spread uniformly, as MA-LMM samples a clip), how many frames it sees (T in
    `frames`; with `full` and stride sampling, every stride-th frame of the whole video), and where the
    video is cut (`end`: mid-stream questions too, unless `full`: all MAX_VIDEO_FRAMES frames). Then
    videos are drawn until one answers a question of that type at `end` (types stay balanced).
    `num_frames(i)` (T) is known without simulating, so a loader can batch equal clip lengths.

    size: render size in pixels, or several sizes to draw from (the model resizes to its own).
    sampling: "mixed" (stride or uniform, half each), "stride" (every `stride`-th frame) or "uniform".
    """

    def __init__(
        self,
        count: int,
        seed: int,
        *,
        size: int | Sequence[int] = 64,
        full: bool = False,
        sampling: str = "mixed",
        stride: int = 4,
        frames: tuple[int, int] = (6, 20),
        kinds: Sequence[str] | None = None,
    ) -> None:
        super().__init__(count, seed, size, kinds)
        if sampling not in ("mixed", "stride", "uniform"):
            raise ValueError(f"sampling must be 'mixed', 'stride' or 'uniform', got {sampling!r}")
        if not 1 <= frames[0] <= frames[1] <= 24:
            raise ValueError(f"frames must be a range (lo, hi) with 1 <= lo <= hi <= 24, got {frames}")
        if not 1 <= stride <= MAX_VIDEO_FRAMES // 2:
            raise ValueError(f"stride must be in 1..{MAX_VIDEO_FRAMES // 2}, got {stride}")
        self.full, self.sampling, self.stride, self.frames = full, sampling, stride, frames

    def _draw(self, index: int):
        """(rng, kind, how, T, stride, size) for item index: cheap, no simulation."""
        rng = self._rng(index, 11)
        kind = self.kinds[int(rng.integers(0, len(self.kinds)))]
        how = self.sampling if self.sampling != "mixed" else ("stride" if rng.random() < 0.5 else "uniform")
        T = int(rng.integers(self.frames[0], self.frames[1] + 1))
        stride = self.stride if self.sampling == "stride" else int(rng.integers(2, 5))
        if how == "stride":  # enough frames for the question type to be answerable at the end
            T = min(max(T, math.ceil((MIN_END[kind] - 1) / stride) + 1), MAX_VIDEO_FRAMES // stride)
            if self.full:  # the whole video: every stride-th frame of MAX_VIDEO_FRAMES
                T = len(sample_indices(MAX_VIDEO_FRAMES, "stride", stride=stride))
        size = self.sizes[int(rng.integers(0, len(self.sizes)))]
        return rng, kind, how, T, stride, size

    def num_frames(self, index: int) -> int:
        return self._draw(index)[3]

    def __getitem__(self, index: int) -> Sample:
        rng, kind, how, T, stride, size = self._draw(index)
        for attempt in range(200):
            if how == "stride":  # T frames every stride-th, the newest at end - 1
                end = stride * (T - 1) + 1 + int(rng.integers(0, stride))
            else:
                end = int(rng.integers(max(T, MIN_END[kind]), MAX_VIDEO_FRAMES + 1))
            F = MAX_VIDEO_FRAMES if self.full else int(rng.integers(max(MIN_VIDEO_FRAMES, end), MAX_VIDEO_FRAMES + 1))
            video = make_video(self.video_seed(index) + 7919 * attempt, frames=F)
            end = F if self.full else end
            if how == "stride":
                indices = sample_indices(end, "stride", stride=stride)
            else:
                indices = sample_indices(end, "uniform", count=T)
            options = [q for q in video.questions(end, indices) if q[2] == kind]
            if not options:
                continue
            question, answer, _ = options[int(rng.integers(0, len(options)))]
            frames = video.render_all(size, indices)
            return Sample(frames, question, answer, kind, self.video_seed(index), end, tuple(indices))
        raise RuntimeError(f"no {kind!r} question for item {index} after 200 videos")


@dataclass(frozen=True)
class VideoSample:
    """Several questions about one clip: frames [T, H, W, 3] RGB uint8, then per question its answer and type."""

    frames: np.ndarray
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    kinds: tuple[str, ...]
    seed: int  # the video is make_video(seed, length), seen up to frame end (exclusive)
    length: int
    end: int
    indices: tuple[int, ...]

    def __iter__(self):  # unpacks as (frames, questions, answers): a multi-question dataset item
        return iter((self.frames, self.questions, self.answers))


class SyntheticVideoQA(_SeededVideos):
    """A map-style dataset of `VideoSample`s: one clip per item and one question of every type it answers.

    Item i draws, from the seed `seed * 1_000_003 + i`: a video length, a stride in `strides` (the clip is
    every stride-th frame, ending on the newest, as a stream sampled every step-th frame is asked), and
    where the video is cut: at its end with probability `at_end` (the video's last 20% is eventless, so
    this is "after a while"), else anywhere from MIN_END's earliest. Then videos are drawn until one
    answers some question at that cut; of every type in `kinds` it answers, one question is asked.
    Questions about one clip share its frames, so a trainer encodes them once (`MALMM.clip_loss(clips=)`).
    `num_frames(i)` (T) is known without simulating, so a loader can batch equal clip lengths.

    busy: the share of items whose video is redrawn until it is `busy_scenario` (three shapes, one
    leaves, one changes colour: every event at once, about 4% of random videos) and at least BUSY_FRAMES
    long. Drawn from its own generator, so busy=0 gives the same items as before it existed.

    composites: the share of items whose clip is ActionShot composites instead of single frames: every frame
    up to the cut is rendered and each window of `stride` frames is blended into one (`blend_windows`, with
    `blend`), so the clip has as many images as a stride clip would; the truth is what all those frames show.
    Drawn from its own generator too (composites=0: the items of before).
    """

    def __init__(
        self,
        count: int,
        seed: int,
        *,
        size: int | Sequence[int] = 64,
        strides: tuple[int, int] = (6, 9),
        at_end: float = 0.7,
        kinds: Sequence[str] | None = None,
        busy: float = 0.0,
        composites: float = 0.0,
        blend: str = "exponential",
    ) -> None:
        super().__init__(count, seed, size, kinds)
        if not 0.0 <= composites <= 1.0:
            raise ValueError(f"composites must be a probability, got {composites}")
        if blend not in ("exponential", "mean"):
            raise ValueError(f"blend must be 'exponential' or 'mean', got {blend!r}")
        self.composites, self.blend = composites, blend
        if not 1 <= strides[0] <= strides[1] <= MAX_VIDEO_FRAMES // 2:
            raise ValueError(f"strides must be a range (lo, hi) within 1..{MAX_VIDEO_FRAMES // 2}, got {strides}")
        if not 0.0 <= at_end <= 1.0:
            raise ValueError(f"at_end must be a probability, got {at_end}")
        if not 0.0 <= busy <= 1.0:
            raise ValueError(f"busy must be a probability, got {busy}")
        self.strides, self.at_end, self.busy = strides, at_end, busy

    def _draw(self, index: int):
        """(rng, frames F, end, stride, T, size, busy, composite) for item index: cheap, no simulation."""
        rng = self._rng(index, 13)
        F = int(rng.integers(MIN_VIDEO_FRAMES, MAX_VIDEO_FRAMES + 1))
        busy = False
        if self.busy > 0:  # its own generator: the draws below stay those of busy=0
            own = self._rng(index, 17)
            busy = bool(own.random() < self.busy)
            if busy:
                F = int(own.integers(BUSY_FRAMES, MAX_VIDEO_FRAMES + 1))
        stride = int(rng.integers(self.strides[0], self.strides[1] + 1))
        end = F if rng.random() < self.at_end else int(rng.integers(min(MIN_END.values()), F + 1))
        T = len(sample_indices(end, "stride", stride=stride))
        size = self.sizes[int(rng.integers(0, len(self.sizes)))]
        composite = self.composites > 0 and bool(self._rng(index, 19).random() < self.composites)
        if composite:
            T = math.ceil(end / stride)
        return rng, F, end, stride, T, size, busy, composite

    def num_frames(self, index: int) -> int:
        return self._draw(index)[4]

    def __getitem__(self, index: int) -> VideoSample:
        rng, F, end, stride, _, size, busy, composite = self._draw(index)
        for attempt in range(5000 if busy else 200):
            video_seed = self.video_seed(index) + 7919 * attempt
            scenario = random_scenario(video_seed, F)
            if busy and not busy_scenario(scenario):
                continue  # drawing a scenario is cheap; simulating it is not
            video = simulate_video(scenario)  # = make_video(video_seed, F)
            indices = list(range(end)) if composite else sample_indices(end, "stride", stride=stride)
            by_kind: dict[str, list[tuple[str, str]]] = {}
            for question, answer, kind in video.questions(end, None if composite else indices):
                if kind in self.kinds:
                    by_kind.setdefault(kind, []).append((question, answer))
            if not by_kind:
                continue
            asked = [(*options[int(rng.integers(0, len(options)))], kind) for kind, options in by_kind.items()]
            frames = video.render_all(size, indices)
            return VideoSample(
                blend_windows(frames, stride, self.blend) if composite else frames,
                tuple(q for q, _, _ in asked),
                tuple(a for _, a, _ in asked),
                tuple(k for _, _, k in asked),
                video_seed,
                F,
                end,
                tuple(indices),
            )
        raise RuntimeError(
            f"no question of types {list(self.kinds)} for {'busy ' * busy}item {index} after {attempt + 1} videos"
        )


# ---------------------------------------------------------------- the demo video


DEMO_FPS = 8.0
DEMO_STEP = 8  # the model sees every 8th frame (8 of 64): the built-in model's ingest settings, one frame
# per second (sample_fps 1.0 in its malmm_config.json), at DEMO_FPS


@dataclass(frozen=True)
class DemoVideo:
    """The demo video on disk and what to ask about it: (question, answer, type) at its end, when the
    model sees every DEMO_STEP-th frame; `video.questions(indices=...)` for other frames."""

    path: Path
    frames: int
    fps: float
    questions: list[tuple[str, str, str]]
    video: Video


def demo_video() -> Video:
    return simulate_video(demo_scenario())


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Encode RGB uint8 frames [T, H, W, 3] as H.264 (yuv420p) in an mp4 with PyAV."""
    from fractions import Fraction

    import av

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_demo_video(path: str | Path, size: int = 128) -> DemoVideo:
    """Write the demo video (64 frames, 8 fps, `size` pixels square, H.264) and return its questions.

    The answers hold at the end of the video; ask them after the whole file has been streamed one frame per
    second (every `DEMO_STEP`-th frame: the built-in model's ingest settings).
    """
    video = demo_video()
    write_video(path, video.render_all(size), DEMO_FPS)
    seen = range(0, video.frames, DEMO_STEP)  # the frames the engine steps with the built-in model's settings
    return DemoVideo(Path(path), video.frames, DEMO_FPS, video.questions(indices=seen), video)
