"""Command-line options for a stream's ActionShot settings, shared by the client (`mixmalmm streams add`) and
the engine's commands (`mixmalmm serve`, `replay`).

Every option is optional: the settings built hold only the options given (`ActionShotSettings` fields left
unset), so that the rest come from the stream's defaults (the model's own ingest settings). Values that
turn a rule off are written ``off`` (``--cut off``), and ``--sample-fps all`` samples every frame.
Imports only the standard library and the protocol (no torch).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import msgspec

from . import protocol as p

OFF_WORDS = ("off", "none")


class _Off:
    """An option given as ``off`` (or ``all`` for --sample-fps): the field is set, to null."""

    def __repr__(self) -> str:
        return "off"


OFF = _Off()


def _number(kind: type, low: float, high: float, what: str, off_word: str | None = None,
            low_open: bool = False) -> Callable[[str], float | int | _Off]:
    """An option's parser: a number of `kind` in [low, high] ((low, high] with low_open), or `off_word`."""

    def parse(text: str) -> float | int | _Off:
        if off_word is not None and text.strip().lower() in (off_word, *OFF_WORDS):
            return OFF
        also = f", or '{off_word}'" if off_word else ""
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}{also}") from None
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            bound = f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"
            raise argparse.ArgumentTypeError(f"ActionShot {what}: {text} is out of range ({bound}{also})")
        return value

    return parse


def add_actionshot_options(parser: argparse.ArgumentParser, title: str) -> None:
    """The ActionShot option group (all default to None: "not given")."""
    g = parser.add_argument_group(title)
    g.add_argument("--actionshot", action=argparse.BooleanOptionalAction, default=None,
                   help="blend similar consecutive frames into composites (--no-actionshot: every sampled frame "
                        "is a Shot)")
    g.add_argument("--step", type=_number(int, 1, 10_000, "step"), metavar="N", help="sample every N-th decoded frame")
    g.add_argument("--sample-fps", type=_number(float, 0, 1000, "sample rate", "all", low_open=True), metavar="F",
                   help="then at most F frames per second of stream time ('all': every one; MA-LMM extracts 10)")
    g.add_argument("--cut", type=_number(float, 0, 1, "cut", "off", low_open=True), metavar="SHARE",
                   help="start a new composite when at least this share (0-1] of the picture changed since the "
                        "previous sampled frame, a scene cut ('off': never; ActionShot's default 0.45)")
    g.add_argument("--max-seconds", type=_number(float, 0, 86_400, "max-seconds", "off", low_open=True), metavar="S",
                   help="the longest action: a composite spans less than S seconds of stream time ('off': no limit)")
    g.add_argument("--blend", choices=["exponential", "mean"],
                   help="exponential: MixMA-LMM's 0.5/0.5 running blend; mean: a true long exposure")
    g.add_argument("--threshold", type=_number(float, 0, 255, "threshold", "off"), metavar="T",
                   help="MixMA-LMM's own rule (off by default): also cut when the mean absolute difference between "
                        "the frame and the composite exceeds T pixel levels (0-255)")
    g.add_argument("--max-frames", type=_number(int, 1, 100_000, "max-frames", "off"), metavar="N",
                   help="MixMA-LMM's own limit (off by default): at most N sampled frames per composite")


#: option destination -> ActionShotSettings field
_FIELDS = {"actionshot": "enabled", "step": "step", "sample_fps": "sample_fps", "cut": "cut",
           "max_seconds": "max_seconds", "blend": "blend", "threshold": "threshold", "max_frames": "max_frames"}


def actionshot_from(args: argparse.Namespace) -> p.ActionShotSettings:
    """The settings the options give, the others unset; ValueError with the protocol's reason when a value is
    out of range (``--cut 2``)."""
    fields = {}
    for dest, name in _FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            fields[name] = None if value is OFF else value
    try:
        return msgspec.convert(fields, p.ActionShotSettings)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad ActionShot settings: {exc}") from exc
