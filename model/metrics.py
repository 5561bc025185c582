"""MA-LMM's evaluation metrics, scored as its LAVIS tasks score them.

- Classification (LVU, Breakfast, COIN; LAVIS ``classification`` task): a prediction is right when the
  generated text equals the label after LAVIS's caption processor (`mixmalmm.model.datasets.pre_caption`),
  character for character; top-1 accuracy is the percentage right.
- Video QA (LAVIS ``vqa`` task, ``_report_metrics_vqa``): the generated text (stripped) equals the
  annotation's answer; for MSVD-QA and MSRVTT-QA only the prediction's first word (split on single
  spaces) is compared, their answers being one word. Nothing else is normalised (no lower-casing, no
  article or punctuation removal: that is COCO-VQA's scorer, which MA-LMM uses for no video dataset).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def is_correct(prediction: str, truth: str, *, first_word: bool = False) -> bool:
    """MA-LMM's match of one prediction with its ground truth (see the module doc)."""
    prediction = prediction.strip()
    if first_word:
        prediction = prediction.split(" ")[0]
    return prediction == truth


def top1_accuracy(correct: Iterable[bool]) -> float:
    """Percentage of True values (0.0 for none)."""
    values = [bool(c) for c in correct]
    return 100.0 * sum(values) / len(values) if values else 0.0


def grouped_accuracy(groups: Sequence[str], correct: Sequence[bool]) -> dict[str, tuple[float, int]]:
    """{group: (top-1 accuracy %, items)} for each group name, sorted by name."""
    if len(groups) != len(correct):
        raise ValueError(f"need one group per item: {len(groups)} groups, {len(correct)} items")
    by: dict[str, list[bool]] = {}
    for g, c in zip(groups, correct, strict=True):
        by.setdefault(g, []).append(bool(c))
    return {g: (top1_accuracy(v), len(v)) for g, v in sorted(by.items())}


def mean_over_groups(groups: dict[str, tuple[float, int]]) -> float:
    """The unweighted mean of the groups' accuracies (LVU's "average": each task counts once)."""
    return sum(acc for acc, _ in groups.values()) / len(groups) if groups else 0.0
