"""MA-LMM's evaluation metrics, scored as its LAVIS tasks score them.

- Classification (LVU, Breakfast, COIN; LAVIS ``classification`` task): a prediction is right when the
  generated text equals the label after LAVIS's caption processor (`mixmalmm.model.datasets.pre_caption`),
  character for character; top-1 accuracy is the percentage right.
- Video QA (LAVIS ``vqa`` task, ``_report_metrics_vqa``): the generated text (stripped) equals the
  annotation's answer; for MSVD-QA and MSRVTT-QA only the prediction's first word (split on single
  spaces) is compared, their answers being one word. Nothing else is normalised (no lower-casing, no
  article or punctuation removal: that is COCO-VQA's scorer, which MA-LMM uses for no video dataset).
- Top-5 (classification, LAVIS ``_report_metrics_cls``): MA-LMM generates ``num_captions = num_beams``
  (5) sequences per clip, best beam first; top-1 compares the first, top-5 is right when any of the
  first five equals the label.
- Captioning (LAVIS ``captioning`` task, ``_report_metrics_video_caption``): pycocoevalcap's scorers as
  ``COCOEvalCap.evaluate`` runs them, on the clips that have a prediction: captions and references
  through the Stanford PTB tokenizer (lower case, punctuation tokens dropped), then BLEU-1..4 (corpus
  level, "closest" reference length), METEOR 1.5, ROUGE-L (LCS, beta 1.2) and CIDEr (sigma 6, document
  frequencies over the evaluated references). The tokenizer and METEOR run on Java; SPICE is never run
  (it downloads Stanford models on first use). Without Java, `caption_scores(java=False)` runs BLEU,
  ROUGE-L and CIDEr on a Python tokenizer (lower case, split on spaces, the PTB tokenizer's punctuation
  removed) and leaves METEOR out.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


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


def in_top_k(candidates: Sequence[str], truth: str, k: int = 5, *, first_word: bool = False) -> bool:
    """Whether one of the first `k` candidates (best first) is right (`is_correct`)."""
    return any(is_correct(c, truth, first_word=first_word) for c in candidates[:k])


def topk_accuracy(candidates: Sequence[Sequence[str]], truths: Sequence[str], k: int = 5, *,
                  first_word: bool = False) -> float:
    """Percentage of items whose first `k` candidates (best first) hold a right one."""
    if len(candidates) != len(truths):
        raise ValueError(f"need one candidate list per item: {len(candidates)} lists, {len(truths)} items")
    return top1_accuracy(in_top_k(c, t, k, first_word=first_word) for c, t in zip(candidates, truths, strict=True))


def java_available() -> bool:
    """Whether a `java` runs here (pycocoevalcap's PTB tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


_PTB_PUNCTUATION = re.compile(r"[.?!,:;\-`'\"()\[\]{}]")


def simple_tokenize(text: str) -> str:
    """The no-Java stand-in for the PTB tokenizer: lower case, its punctuation removed, single spaces."""
    return " ".join(_PTB_PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], *,
                   java: bool | None = None, per_clip: bool = False):
    """COCO caption metrics of `predictions` ({clip id: caption}) against `references` ({clip id:
    [captions]}), over the clips predicted (every one needs references), as fractions (MA-LMM's
    printout; the paper reports them x 100). java: run the PTB tokenizer and METEOR (default: when Java
    is installed); False: BLEU, ROUGE-L and CIDEr only, on `simple_tokenize`. Returns the metrics
    computed, keys as in `CAPTION_METRICS`; per_clip: (those, {clip id: its own scores}) (BLEU per clip
    is the clip's sentence BLEU; CIDEr's document frequencies stay the corpus's)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} clip(s), e.g. {missing[0]!r}")
    java = java_available() if java is None else java
    gts = {k: list(references[k]) for k in predictions}
    res = {k: [predictions[k]] for k in predictions}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress
        if java:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            tokenizer = PTBTokenizer()
            gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
            res = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
        else:
            gts = {k: [simple_tokenize(c) for c in v] for k, v in gts.items()}
            res = {k: [simple_tokenize(c) for c in v] for k, v in res.items()}
        out, each = {}, {}
        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            out[f"Bleu_{n + 1}"], each[f"Bleu_{n + 1}"] = bleu[n], bleu_each[n]
        scorers = [("ROUGE_L", Rouge()), ("CIDEr", Cider())]
        if java:
            from pycocoevalcap.meteor.meteor import Meteor

            scorers.insert(0, ("METEOR", Meteor()))
        for name, scorer in scorers:
            out[name], each[name] = scorer.compute_score(gts, res)
    names = [k for k in CAPTION_METRICS if k in out]
    corpus = {k: float(out[k]) for k in names}
    if not per_clip:
        return corpus
    return corpus, {clip: {k: float(each[k][i]) for k in names} for i, clip in enumerate(gts)}
