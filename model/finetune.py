"""Fine-tuning on MA-LMM's datasets as MA-LMM does: its training items, frame sampling, crops and defaults.

`TrainClips` turns a split's `Item`s (`mixmalmm.model.datasets.read_items`: any dataset family, one
question and one target text per item) into the (frames, question, answer) items `Trainer` takes:

- frames: each epoch, one random index from each of ``num_frames`` equal segments of the item's span
  (`train_indices`, MA-LMM's training datasets; the span is the clip the evaluation samples:
  ``[0, frame_length)``, an LVU window), drawn from a generator of (seed, epoch, item), so a run is
  reproducible and an item is the same in whichever process reads it;
- pixels: MA-LMM's ``blip2_video_train`` processor: one random resized crop for the whole clip (area
  0.5-1 of the frame, aspect 3/4-4/3, torchvision's draw), bicubic resize to the model's size without
  antialiasing, cut to uint8 (``crop=False``: the evaluation resize, `malmm_resize`);
- text: the question as `read_items` gives it (the model's prompt template wraps it, as MA-LMM's
  ``prompt``), the target through LAVIS's text processor of the family (``blip_question`` for QA,
  ``blip_caption`` otherwise) as the LLM's label.

`MALMM_TRAINING` holds MA-LMM's run_scripts/<dataset>/train.sh and lavis/projects/malmm/*.yaml values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .datasets import DATASETS, Item, clip_frames, malmm_resize, pre_caption, pre_question, train_indices


@dataclass(frozen=True)
class TrainingDefaults:
    """MA-LMM's fine-tuning settings for one dataset.

    lr (``init_lr``), min_lr, warmup_lr, warmup_steps, weight_decay: LAVIS's linear_warmup_cosine_lr and
    AdamW; epochs (``max_epoch``); batch_size_per_gpu (``batch_size_train``) on `gpus` processes
    (``--nproc_per_node``): the global batch is their product.
    """

    epochs: int
    batch_size_per_gpu: int
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_lr: float = 1e-8
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    gpus: int = 4
    seed: int = 42

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu * self.gpus


_QA = TrainingDefaults(epochs=5, batch_size_per_gpu=32)
_LONG = TrainingDefaults(epochs=20, batch_size_per_gpu=16)
MALMM_TRAINING: dict[str, TrainingDefaults] = {
    "msrvtt-qa": _QA, "msvd-qa": _QA, "activitynet-qa": _QA,
    "breakfast": _LONG, "coin": _LONG, "lvu": _LONG,
}


def training_defaults(name: str) -> TrainingDefaults:
    """MA-LMM's settings for dataset `name`; a dataset without its own (a family added later) gets its
    family's (QA: MA-LMM's QA runs; others: its classification runs)."""
    if name in MALMM_TRAINING:
        return MALMM_TRAINING[name]
    return _QA if DATASETS[name].family == "qa" else _LONG


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop as torchvision's RandomResizedCrop draws it: up to ten tries of
    an area share in `scale` and a log-uniform aspect ratio in `ratio`, else the centre crop clamped to
    `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_pixels(frames: np.ndarray, image_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """MA-LMM's training preprocessing of a clip [T, H, W, 3] uint8 -> [T, S, S, 3] uint8: one random
    resized crop for every frame (`random_resized_crop_box`), then `malmm_resize`; rng None: no crop."""
    if rng is not None:
        top, left, h, w = random_resized_crop_box(frames.shape[1], frames.shape[2], rng)
        frames = np.ascontiguousarray(frames[:, top : top + h, left : left + w])
    return malmm_resize(frames, image_size)


def target_text(family: str, answer: str) -> str:
    """The LLM's label: the answer through the family's LAVIS text processor."""
    return pre_question(answer) if family == "qa" else pre_caption(answer)


class TrainClips:
    """A split's items as training clips for `Trainer`: ``(frames [T, S, S, 3] uint8, question, target)``.

    train=False: the evaluation's frames (the items' own indices) and resize, no crop (for validation).
    `set_epoch(e)` (the Trainer calls it) picks the epoch's random frames and crops.
    """

    def __init__(self, items: Sequence[Item], family: str, image_size: int, num_frames: int, *,
                 frames: str | Path | None = None, videos: str | Path | None = None, seed: int = 0,
                 train: bool = True, crop: bool = True) -> None:
        if not items:
            raise ValueError("no items to train on")
        self.items, self.family, self.image_size, self.frames_per_clip = list(items), family, image_size, num_frames
        self.frames_dir, self.videos_dir, self.seed, self.train, self.crop = frames, videos, seed, train, crop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def num_frames(self, i: int) -> int:
        return self.frames_per_clip if self.train else len(self.items[i].frames)

    def indices(self, i: int) -> tuple[int, ...]:
        """Item i's frame indices this epoch: `train_indices` over its span, offset to its start."""
        item = self.items[i]
        if not self.train:
            return item.frames
        start, end = item.frames[0], item.frames[-1] + 1
        rng = np.random.default_rng([self.seed, self.epoch, i, 11])
        return tuple(start + k for k in train_indices(end - start, self.frames_per_clip, rng))

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, str]:
        item = self.items[i]
        try:
            rgb = clip_frames(replace(item, frames=self.indices(i)), frames=self.frames_dir, videos=self.videos_dir)
        except ValueError as exc:
            raise ValueError(f"item {item.id!r}: {exc}") from exc
        rng = np.random.default_rng([self.seed, self.epoch, i, 13]) if self.train and self.crop else None
        return train_pixels(rgb, self.image_size, rng), item.question, target_text(self.family, item.answer)
