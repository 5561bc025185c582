"""ActionShot's cut rule on real recordings nobody here made: the sample videos of Debian's opencv-doc package
(fetched by `scripts/setup.sh --test` through `scripts/fetch_footage.sh`, never committed).

Megamind.avi is a film trailer with four real cuts (frame 0 is black; new shots start at frames 1, 98, 154
and 200, found by eye on a contact sheet of its frames); vtest.avi (people walking), box.mp4 and cup.mp4 (a
hand moving an object) have none. `benchmarks/actionshot_cuts.py` measures the rule on many more cuts and
hard negatives.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mixmalmm.streamer.actionshot import ActionShot
from mixmalmm.streamer.sources import FileSource

FOOTAGE = Path(os.environ.get("MIXMALMM_FOOTAGE") or Path(__file__).resolve().parents[2] / ".cache/footage")
MEGAMIND_CUTS = [1, 98, 154, 200]

pytestmark = pytest.mark.skipif(
    not (FOOTAGE / "Megamind.avi").is_file(),
    reason=f"no real footage in {FOOTAGE}: run `bash scripts/fetch_footage.sh` (scripts/setup.sh --test does)",
)


def cuts(name: str, **options) -> list[int]:
    """Frame indices where a new composite starts after the first (the longest-action limit off)."""
    with FileSource(FOOTAGE / name) as source:
        shots = list(ActionShot(max_seconds=None, **options).feed(source))
    return [s.first_index for s in shots[1:]]


def test_the_default_rule_finds_every_cut_of_a_real_trailer_and_nothing_else():
    assert cuts("Megamind.avi") == MEGAMIND_CUTS
    # Sampled at MA-LMM's 10 fps (every 2-3 frames of 24), each cut is found at the first sample after it.
    found = cuts("Megamind.avi", sample_fps=10.0)
    assert len(found) == len(MEGAMIND_CUTS)
    assert all(0 <= f - c < 3 for f, c in zip(found, MEGAMIND_CUTS, strict=True))


@pytest.mark.parametrize("name", ["vtest.avi", "box.mp4", "cup.mp4"])
def test_no_cut_in_real_footage_without_one(name):
    assert cuts(name) == []


def test_mixmalmm_threshold_without_its_wrap_around_misses_every_real_cut():
    # 127.5 grey levels of exact mean difference: the largest jump at a cut here is about 43.
    assert cuts("Megamind.avi", cut=None, threshold=127.5) == []
