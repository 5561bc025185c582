"""Training MA-LMM as it fine-tunes: clips of frames through the memory model, the instruction through the
Q-Former, the answer as the LLM's target.

    python -m mixmalmm.model.train --out runs/world --epochs 4 --train-size 6000

Each step runs `MALMM.clip_loss` (the offline clip pass, which equals streaming frame by frame: the
standing-question path, or with `--adhoc-fraction` also the ad-hoc path) over batches of clips with the
same number of frames. The vision encoder and the LLM are frozen by default, as in MA-LMM;
`--train-vision` / `--train-llm` (or `--train-all`) train them too, which a model built from scratch
(`--init scratch`, the default: a small model of MA-LMM's architecture over the synthetic world's
vocabulary) needs. AdamW with linear warm-up and cosine decay, gradient accumulation, autocast on CUDA
(bfloat16 where supported, else float16 with a gradient scaler; CPU stays float32), a checkpoint after
every epoch (and every `--checkpoint-every` steps) that `--resume` continues from identically, and
exact-match accuracy on a validation set after every epoch. A model from scratch can first pretrain its vision
encoder alone (`--vision-steps`, `pretrain_vision`) on single frames labelled with the colour each kind
of shape wears, as MA-LMM starts from a pretrained encoder.

Datasets are generic: any sequence of (frames [T, H, W, 3] RGB uint8, question, answer) items; if it
also has `num_frames(i)`, batches hold clips of equal T without loading them first, and `set_epoch(e)` is
called before each epoch (a new draw of random frames). The command line trains on the synthetic world
(`mixmalmm.model.synthetic`); `train(...)` takes any datasets; ``mixmalmm train DATASET``
(`mixmalmm.streamer.train`) fine-tunes on MA-LMM's (`mixmalmm.model.finetune`).

`TrainConfig.loss_mean` "tokens" is MA-LMM's batch loss (every answer token of the step's batches
alike); "rows" (the synthetic world's default) weights each clip-length group's mean by its questions.
Under torchrun (`mixmalmm.model.distributed`) each process takes every N-th item of each batch and the
gradients are summed before the step; with "tokens" that is the step one process takes on the whole
batch, up to float32 summation order. Only rank 0 logs, validates and writes checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .malmm import MALMM, StreamConfig

CHECKPOINT = "checkpoint.pt"
FINAL = "model"


# ---------------------------------------------------------------- a model from scratch


@dataclass(frozen=True)
class ModelSizes:
    """A small model of MA-LMM's architecture: ViT, Q-Former with memory, Llama-style causal LM.

    image_size / patch_size: pixels ((image_size / patch_size)^2 + 1 vision tokens per frame).
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    qformer_hidden: int = 96
    qformer_layers: int = 2
    cross_attention_frequency: int = 2
    num_query_tokens: int = 8
    llm_hidden: int = 128
    llm_layers: int = 2
    dropout: float = 0.0
    init_scale: float = 1.0  # weights' std = init_scale / sqrt(fan-in) (BERT's fixed 0.02 suits widths ~2500)
    position_scale: float = 1.0  # frame position table: sinusoids of this amplitude (0: MA-LMM's zeros)
    present_scale: float = 1.0  # present-frame marker (StreamConfig.present_frame): std per channel


def scratch_model(
    words: Sequence[str], sizes: ModelSizes = ModelSizes(), config: StreamConfig | None = None, seed: int = 0
) -> MALMM:
    """A randomly initialised MALMM with word-level tokenizers over `words` (nothing downloaded).

    Weights are drawn with std `init_scale / sqrt(fan-in)` (embeddings and query tokens:
    `init_scale / sqrt(width)`), biases zero, norms one. transformers' fixed std 0.02 suits BERT-base
    widths: at these widths it lets almost nothing of the frames through the Q-Former's cross-attention
    at first, and it zeroes the query tokens (equal queries get equal gradients and never tell apart).
    """
    from transformers import InstructBlipForConditionalGeneration

    from .tiny import tiny_config, tiny_processor

    processor = tiny_processor(sizes.image_size, sizes.num_query_tokens, words=words)
    cfg = tiny_config(
        processor,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        vision_hidden=sizes.vision_hidden,
        qformer_hidden=sizes.qformer_hidden,
        llm_hidden=sizes.llm_hidden,
        num_query_tokens=sizes.num_query_tokens,
        qformer_layers=sizes.qformer_layers,
    )
    cfg.vision_config.num_hidden_layers = sizes.vision_layers
    cfg.qformer_config.cross_attention_frequency = sizes.cross_attention_frequency
    cfg.text_config.num_hidden_layers = sizes.llm_layers
    cfg.qformer_config.hidden_dropout_prob = sizes.dropout
    cfg.qformer_config.attention_probs_dropout_prob = sizes.dropout
    cfg.vision_config.attention_dropout = sizes.dropout
    torch.manual_seed(seed)
    blip = InstructBlipForConditionalGeneration(cfg)
    scale = sizes.init_scale
    with torch.no_grad():
        for module in blip.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, scale / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, scale / math.sqrt(module.embedding_dim))
        vision = blip.vision_model.embeddings
        vision.class_embedding.normal_(0.0, scale / math.sqrt(sizes.vision_hidden))
        vision.position_embedding.normal_(0.0, scale / math.sqrt(sizes.vision_hidden))
        blip.query_tokens.normal_(0.0, scale / math.sqrt(sizes.qformer_hidden))
    model = MALMM(blip, processor, config or StreamConfig())
    with torch.no_grad():
        table = model.frame_position.weight
        table.copy_(sinusoidal_positions(*table.shape) * sizes.position_scale)
        if model.present_embedding is not None:  # as strong as a feature channel: the newest frame stands out
            model.present_embedding.normal_(0.0, sizes.present_scale)
    return model


def sinusoidal_positions(rows: int, width: int, period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoids [rows, width]: channel pairs (sin, cos) of t / period^(2i / width).

    The frame position table of a model from scratch starts here instead of at MA-LMM's zeros (which suit
    pretrained InstructBLIP weights): frames are told apart from the first step, and the slow channels
    change almost linearly with t, so attention can prefer the newest or the oldest frame at once.
    """
    t = torch.arange(rows, dtype=torch.float64)[:, None]
    freq = period ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    out = torch.zeros(rows, width, dtype=torch.float64)
    out[:, 0::2] = torch.sin(t * freq)
    out[:, 1::2] = torch.cos(t * freq)[:, : width // 2]
    return out.float()


# ---------------------------------------------------------------- frames to pixels


def frames_to_pixels(
    frames: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB uint8 frames [T, H, W, 3] -> normalised pixels [T, 3, image_size, image_size] (float32).

    Antialiased bicubic resize (as InstructBLIP's image processor), rounded to uint8 levels, then
    (x / 255 - mean) / std per channel.
    """
    return _normalise(resize_frames(frames, image_size).float(), mean, std)


def resize_frames(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """RGB uint8 frames [T, H, W, 3] -> uint8 [T, 3, image_size, image_size]: antialiased bicubic resize
    (as InstructBLIP's image processor), rounded to uint8 levels."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be RGB uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if x.shape[-2:] == (image_size, image_size):
        return x
    x = F.interpolate(x.float(), size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8-level pixels [T, 3, S, S] (float) -> (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def jpeg_augment(frames: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """With probability p, re-encode every frame as JPEG (quality 40-95): blocks and chroma subsampling,
    as a video codec leaves them."""
    if rng.random() >= p:
        return frames
    import cv2

    quality = int(rng.integers(40, 96))
    out = np.empty_like(frames)
    for i, img in enumerate(frames):
        ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG")
        out[i] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return out


# ---------------------------------------------------------------- batches


def _item(dataset, index: int) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """(frames, questions, answers) of item index (see `_unpack`)."""
    return _unpack(dataset[index], index)


def _unpack(item, index: int) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """A dataset item, (frames, question, answer) or (frames, questions, answers) with several questions
    about the same clip, as (frames, questions, answers)."""
    frames, question, answer = item
    if isinstance(question, str) != isinstance(answer, str):
        raise ValueError(f"item {index}: give one question and one answer, or a sequence of each")
    if isinstance(question, str):
        return frames, (question,), (answer,)
    if len(question) != len(answer) or not question:
        raise ValueError(f"item {index}: {len(question)} questions and {len(answer)} answers")
    return frames, tuple(question), tuple(answer)


def epoch_batches(dataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of dataset indices: shuffled by (seed, epoch), each of one clip length T.

    With `dataset.num_frames(i)`, indices are bucketed by T (a bucket yields a batch when full; the
    rest at the end). Without it, batches are consecutive in the shuffled order and split by T later.
    """
    order = np.random.default_rng([seed, epoch, 3]).permutation(len(dataset)).tolist()
    if not hasattr(dataset, "num_frames"):
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    buckets: dict[int, list[int]] = defaultdict(list)
    batches = []
    for i in order:
        T = dataset.num_frames(i)
        buckets[T].append(i)
        if len(buckets[T]) == batch_size:
            batches.append(buckets.pop(T))
    batches.extend(b for _, b in sorted(buckets.items()))
    return batches


def _by_length(items: list[tuple]) -> list[list[tuple]]:
    groups: dict[int, list] = defaultdict(list)
    for it in items:
        groups[len(it[0])].append(it)
    return [groups[k] for k in sorted(groups)]


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: what exact match compares."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: MALMM,
    dataset,
    *,
    batch_size: int = 16,
    adhoc: bool = False,
    max_new_tokens: int = 4,
    kinds: Callable[[int], str] | None = None,
) -> dict:
    """Exact-match accuracy of greedy answers over a dataset, with the offline clip pass.

    kinds: index -> a group name (e.g. the question type) for per-group accuracy; items with several
    questions and a `kinds` attribute (`SyntheticVideoQA`) are grouped by it. Returns
    {"accuracy", "count" (questions), "groups": {name: (correct, count)}}.
    """
    was_training = model.training
    model.eval()
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    correct, asked, groups = 0, 0, defaultdict(lambda: [0, 0])
    for start in range(0, len(dataset), batch_size):
        by_t: dict[int, list] = defaultdict(list)
        for i in range(start, min(len(dataset), start + batch_size)):
            sample = dataset[i]
            frames, questions, answers = _unpack(sample, i)
            names = getattr(sample, "kinds", None)
            if not (isinstance(names, tuple) and len(names) == len(questions)):
                names = (kinds(i) if kinds else "all",) * len(questions)
            by_t[len(frames)].append((frames, questions, answers, names))
        for group in by_t.values():
            pixels = torch.stack([frames_to_pixels(f, model.image_size, mean, std) for f, _, _, _ in group])
            rows = [(c, q, a, k) for c, (_, qs, ans, ks) in enumerate(group) for q, a, k in zip(qs, ans, ks, strict=True)]
            outputs = model.clip_query_output(pixels, [q for _, q, _, _ in rows], adhoc=adhoc, clips=[c for c, *_ in rows])
            answers = model.generate_answers(outputs, [q for _, q, _, _ in rows], max_new_tokens=max_new_tokens)
            for (_, _, a, name), (_, text) in zip(rows, answers, strict=True):  # one generate for the group
                ok = normalise_answer(text) == normalise_answer(a)
                correct += ok
                asked += 1
                groups[name][0] += ok
                groups[name][1] += 1
    model.train(was_training)
    return {"accuracy": correct / max(1, asked), "count": asked, "groups": {k: tuple(v) for k, v in sorted(groups.items())}}


# ---------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in its checkpoints)."""

    out: str
    epochs: int = 4
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    adhoc_fraction: float = 0.0
    memory_gradients: bool | str = "visual"  # False, True (every bank) or "visual" (the visual bank)
    augment: bool = True
    checkpoint_every: int = 0
    log_every: int = 20
    eval_batch_size: int = 32
    eval_every: int = 0  # also validate every this many optimiser steps (0: after each epoch only)
    max_steps: int = 0  # stop (with a checkpoint) after this many optimiser steps; the schedule still spans
    # every epoch, so a run stopped here and resumed is the same run (0: no stop)
    loss_mean: str = "rows"  # "rows": a batch's clip-length groups weighted by their questions; "tokens":
    # the mean over every answer token of the optimiser step's batches (MA-LMM's batch loss), which a batch
    # split over processes (torchrun) adds up to exactly
    warmup_start_ratio: float = 0.0  # the first step's lr / lr (MA-LMM: warmup_lr / init_lr)
    extra: dict = field(default_factory=dict)  # what built the model and data (for the record)


def _lr_lambda(total: int, warmup: int, min_ratio: float, start_ratio: float = 0.0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            if start_ratio:  # LAVIS's warm-up: from warmup_lr to init_lr over the warm-up steps
                return start_ratio + (1 - start_ratio) * step / warmup
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norms: none)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999),
    )


def _autocast(device: torch.device):
    """(autocast context factory, GradScaler or None): bf16/fp16 autocast on CUDA, nothing elsewhere."""
    if device.type != "cuda":
        return (lambda: torch.autocast("cpu", enabled=False)), None
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


class Trainer:
    """Owns the model, optimiser, schedule and data order of one run; `run()` trains, resumable."""

    def __init__(self, model: MALMM, train_set, val_set, config: TrainConfig, log: Callable[[str], None] = print):
        if config.batch_size < 1 or config.grad_accum < 1 or config.epochs < 1:
            raise ValueError("batch_size, grad_accum and epochs must be >= 1")
        if not 0.0 <= config.adhoc_fraction <= 1.0:
            raise ValueError(f"adhoc_fraction must be in [0, 1], got {config.adhoc_fraction}")
        if config.loss_mean not in ("rows", "tokens"):
            raise ValueError(f"loss_mean must be 'rows' or 'tokens', got {config.loss_mean!r}")
        self.model, self.train_set, self.val_set, self.config, self.log = model, train_set, val_set, config, log
        self.out = Path(config.out)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        self.optimizer = _adamw(params, config.lr, config.weight_decay)
        self.steps_per_epoch = math.ceil(len(epoch_batches(train_set, config.batch_size, config.seed, 0)) / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _lr_lambda(self.total_steps, config.warmup_steps, config.min_lr_ratio, config.warmup_start_ratio),
        )
        self.autocast, self.scaler = _autocast(model.device)
        torch.manual_seed(config.seed)  # the run's dropout masks (a resumed run restores the generator's state)
        self.step = 0  # optimiser steps done
        self.epoch = 0  # current epoch
        self.batch_in_epoch = 0  # batches of the current epoch done
        self.history: list[dict] = []
        self.step_losses: list[float] = []  # each optimiser step's training loss, this session (not saved)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Write the run's state (rank 0 only in a distributed run: every process holds the same)."""
        path = path or self.out / CHECKPOINT
        if not distributed.is_main():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "history": json.dumps(self.history),
            "config": json.dumps(asdict(self.config)),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # never a half-written checkpoint
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at '{path}'")
        state = torch.load(path, map_location=self.model.device, weights_only=True)
        saved = json.loads(state["config"])
        for key in ("batch_size", "grad_accum", "seed", "epochs"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"checkpoint '{path}' was made with {key}={saved[key]}, this run has {getattr(self.config, key)}: "
                    "resume with the same data settings"
                )
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = json.loads(state["history"])
        self.log(f"resumed from '{path}': step {self.step}, epoch {self.epoch}, batch {self.batch_in_epoch}")

    # ------------------------------------------------------------ the loop

    def _load(self, indices: list[int]) -> list[tuple]:
        """(index, frames, questions, answers) of each index: the dataset's items."""
        return [(i, *_item(self.train_set, i)) for i in indices]

    def _micro_batch(self, items: list[tuple], epoch: int, batch: int, normaliser: float | None = None):
        """Loss of one batch's items (`_load`) and its path (standing or ad hoc).

        normaliser None: the batch's clip-length groups' mean losses weighted by their share of its
        questions; a number: the sum of every answer token's loss divided by it. Augmentation draws from
        each item's own generator (seed, epoch, index), so an item is the same whichever process takes it.
        """
        cfg, model = self.config, self.model
        adhoc = bool(np.random.default_rng([cfg.seed, epoch, batch, 5]).random() < cfg.adhoc_fraction)
        mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
        asked = sum(len(q) for _, _, q, _ in items)
        total = None
        for group in _by_length([it[1:] + (it[0],) for it in items]):
            frames = [jpeg_augment(f, np.random.default_rng([cfg.seed, epoch, i, 7])) if cfg.augment else f
                      for f, _, _, i in group]
            pixels = torch.stack([frames_to_pixels(f, model.image_size, mean, std) for f in frames])
            clips = [c for c, (_, qs, _, _) in enumerate(group) for _ in qs]
            questions = [q for _, qs, _, _ in group for q in qs]
            answers = [a for _, _, answers, _ in group for a in answers]
            with self.autocast():
                loss = model.clip_loss(
                    pixels, questions, answers, adhoc=adhoc, memory_gradients=cfg.memory_gradients, clips=clips,
                    normaliser=normaliser,
                )
            weighted = loss.float() if normaliser is not None else loss.float() * (len(questions) / asked)
            total = weighted if total is None else total + weighted
        return total, adhoc

    def run(self) -> dict:
        """Train to the end (or `max_steps`). In a distributed run (torchrun: `mixmalmm.model.distributed`)
        each process takes every N-th item of each batch (rank r: items r, r + N, ...), the gradients are
        summed over the processes before the step, and only rank 0 logs, validates and writes checkpoints;
        with ``loss_mean="tokens"`` the step is the one a single process takes on the whole batch."""
        cfg, model = self.config, self.model
        model.train()
        rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
        distributed.broadcast_parameters(model)
        trained = [p for p in model.parameters() if p.requires_grad]
        t0, seen, losses = time.time(), 0, []
        stop = cfg.max_steps or self.total_steps
        while self.epoch < cfg.epochs and self.step < stop:
            if hasattr(self.train_set, "set_epoch"):  # an epoch's random frame sampling (MA-LMM's training)
                self.train_set.set_epoch(self.epoch)
            batches = epoch_batches(self.train_set, cfg.batch_size, cfg.seed, self.epoch)
            while self.batch_in_epoch < len(batches) and self.step < stop:
                self.optimizer.zero_grad(set_to_none=True)
                group = batches[self.batch_in_epoch : self.batch_in_epoch + cfg.grad_accum]
                loaded = [self._load(indices[rank::world]) for indices in group]
                normaliser = None
                if cfg.loss_mean == "tokens":
                    mine = sum(model.answer_tokens([a for it in part for a in it[3]]) for part in loaded if part)
                    normaliser = max(1.0, distributed.all_reduce_sum([mine])[0])
                step_loss = 0.0
                for k, items in enumerate(loaded):
                    if not items:  # fewer items in this batch than processes
                        continue
                    loss, _ = self._micro_batch(items, self.epoch, self.batch_in_epoch + k, normaliser)
                    # tokens: the parts add up to the step's mean; rows: the mean over micro-batches and processes
                    scaled = loss if normaliser is not None else loss / (len(group) * world)
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    step_loss += float(scaled.detach())
                    seen += len(items)
                distributed.all_reduce_gradients(trained)
                losses.append(distributed.all_reduce_sum([step_loss])[0] if world > 1 else step_loss)
                self.step_losses.append(losses[-1])
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.batch_in_epoch += len(group)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    rate = seen * world / max(1e-9, time.time() - t0)
                    if main:
                        self.log(
                            f"step {self.step}/{self.total_steps} epoch {self.epoch} loss {np.mean(losses):.4f} "
                            f"lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.1f} clips/s"
                        )
                    losses = []
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.batch_in_epoch < len(batches):
                    self.history.append({"epoch": self.epoch, "step": self.step, **self.validate()})
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.batch_in_epoch >= len(batches):  # the epoch is complete: validate, checkpoint
                result = self.validate()
                self.history.append({"epoch": self.epoch, "step": self.step, **result})
                self.epoch += 1
                self.batch_in_epoch = 0
                self.save_checkpoint()
        if self.epoch < cfg.epochs:  # stopped by max_steps: keep where we are for --resume
            self.save_checkpoint()
        return {"step": self.step, "epoch": self.epoch, "history": self.history, "losses": self.step_losses,
                "seconds": time.time() - t0}

    def validate(self) -> dict:
        if self.val_set is None or len(self.val_set) == 0 or not distributed.is_main():
            return {}
        kinds = getattr(self.val_set, "kind_of", None)
        result = evaluate(self.model, self.val_set, batch_size=self.config.eval_batch_size, kinds=kinds)
        out = {"val_accuracy": result["accuracy"], "val_groups": result["groups"]}
        if self.config.adhoc_fraction > 0:
            out["val_adhoc_accuracy"] = evaluate(
                self.model, self.val_set, batch_size=self.config.eval_batch_size, adhoc=True
            )["accuracy"]
        groups = " ".join(f"{k} {c}/{n}" for k, (c, n) in result["groups"].items())
        self.log(f"epoch {self.epoch} step {self.step} validation exact match {result['accuracy']:.3f} ({groups})")
        return out


def train(model: MALMM, train_set, val_set, config: TrainConfig, *, resume: str | Path | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Train `model` in place on any datasets of (frames, question, answer); returns the run's summary."""
    trainer = Trainer(model, train_set, val_set, config, log)
    if resume is not None:
        trainer.load_checkpoint(resume)
    return trainer.run()


# ---------------------------------------------------------------- pretraining the vision encoder


def pretrain_vision(
    model: MALMM,
    train_set: tuple,
    val_set: tuple | None,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.05,
    augment: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> dict:
    """Pretrain the vision encoder alone on labelled single frames, before the model learns to answer.

    MA-LMM starts from a pretrained vision encoder (EVA-CLIP); a model from scratch needs one too. Trained
    only through the answers, ours learns colours and counts but never tells shapes apart (a question about
    a shape's name stays at chance); a direct, dense signal teaches it in minutes.

    train_set / val_set: (frames, labels) or (frames, labels, maps): RGB uint8 frames [H, W, 3] of any
    size; integer labels [N, K], K slots each holding a class in 0..C-1 (-1: unknown, no loss); maps
    [N, h, w], a class per pixel of a grid over the frame (0 for background), e.g. the synthetic world's
    `labelled_frames` (per kind of shape: absent or the colour it wears; per pixel: which shape of which
    colour is there). A linear head on the encoder's class token and mean patch token predicts every slot,
    and with maps another one predicts each patch token's commonest class in the map (so each patch knows
    what it is part of, which the Q-Former's cross-attention can look up); the heads are thrown away
    after. augment: JPEG-compress each training frame with probability 1/2 (`jpeg_augment`), once. The
    encoder is trained whatever its freeze flag (the flag is restored). Returns the validation accuracy
    over all known slots ("all"), over slots whose class is not 0 ("named") and, with maps, over patches
    that are not background ("patches").
    """
    frames, labels, maps = (*train_set, None)[:3]
    if len(frames) != len(labels) or len(frames) == 0 or (maps is not None and len(maps) != len(frames)):
        raise ValueError(f"give one label row (and map) per frame: {len(frames)} frames, {len(labels)} label rows")
    device, size = model.device, model.image_size
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std
    classes = int(labels.max()) + 1
    slots = labels.shape[1]
    grid = size // model.vision_model.config.patch_size
    map_classes = 0
    if maps is not None:  # enough classes for the validation maps too
        map_classes = 1 + int(max(maps.max(), val_set[2].max() if val_set is not None and len(val_set) > 2 else 0))

    def patch_labels(m: np.ndarray) -> torch.Tensor:  # [N, h, w] -> [N, grid * grid], commonest class
        onehot = F.one_hot(torch.as_tensor(m), map_classes).permute(0, 3, 1, 2).float()
        return F.adaptive_avg_pool2d(onehot, grid).argmax(1).flatten(1)

    def pixels(batch: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.cat([resize_frames(f[None], size) for f in batch])

    rng = np.random.default_rng([seed, 13])
    if augment:  # half of them JPEG-compressed, as decoded video is
        frames = [jpeg_augment(f[None], rng)[0] for f in frames]
    store = pixels(frames)  # uint8, a quarter of float32's memory
    vision = model.vision_model
    was_trainable = [p.requires_grad for p in vision.parameters()]
    vision.requires_grad_(True)
    width = vision.config.hidden_size
    torch.manual_seed(seed)
    heads = [nn.Linear(2 * width, slots * classes).to(device)]
    if map_classes:
        heads.append(nn.Linear(width, map_classes).to(device))
    for layer in heads:
        nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.in_features))
        nn.init.zeros_(layer.bias)
    optimizer = _adamw([*vision.parameters(), *(p for h in heads for p in h.parameters())], lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, warmup_steps, 0.05))

    def logits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slot logits [B, slots, classes] and, with maps, patch logits [B, patches, map_classes]."""
        hidden = vision(pixel_values=_normalise(x.float(), mean, std).to(device)).last_hidden_state
        slot_logits = heads[0](torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], -1)).view(-1, slots, classes)
        return slot_logits, heads[1](hidden[:, 1:]) if map_classes else None

    def accuracy() -> dict:
        if val_set is None:
            return {}
        vision.eval()
        x, y = pixels(val_set[0]), torch.as_tensor(val_set[1])
        with torch.no_grad():
            out = [logits(x[i : i + 256]) for i in range(0, len(x), 256)]
        vision.train()
        right = torch.cat([o[0].argmax(-1).cpu() for o in out]) == y
        known, named = y >= 0, y > 0
        result = {"all": float(right[known].float().mean()), "named": float(right[named].float().mean())}
        if map_classes and len(val_set) > 2:
            truth = patch_labels(val_set[2])
            guess = torch.cat([o[1].argmax(-1).cpu() for o in out])
            result["patches"] = float((guess == truth)[truth > 0].float().mean())
        return result

    targets = torch.as_tensor(labels)
    patch_targets = patch_labels(maps) if map_classes else None
    vision.train()
    t0, losses = time.time(), []
    try:
        for step in range(1, steps + 1):
            idx = torch.from_numpy(rng.integers(0, len(store), batch_size))
            slot_logits, patch_logits = logits(store[idx])
            loss = F.cross_entropy(slot_logits.reshape(-1, classes), targets[idx].reshape(-1).to(device), ignore_index=-1)
            if patch_targets is not None:
                loss = loss + F.cross_entropy(patch_logits.reshape(-1, map_classes), patch_targets[idx].reshape(-1).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if log_every and step % log_every == 0:
                log(f"vision step {step}/{steps} loss {np.mean(losses):.4f} "
                    f"{step * batch_size / (time.time() - t0):.0f} frames/s")
                losses = []
        result = accuracy()
    finally:
        for p, trainable in zip(vision.parameters(), was_trainable, strict=True):
            p.requires_grad_(trainable)
        vision.eval()
    if result:
        patches = f", {result['patches']:.3f} of patches on a shape" if "patches" in result else ""
        log(f"vision validation: {result['all']:.3f} of all slots, {result['named']:.3f} of named ones{patches}")
    return {**result, "steps": steps, "seconds": time.time() - t0}


# ---------------------------------------------------------------- the synthetic world's datasets


class _KindIndexed:
    """A SyntheticQA whose items' question types are known by index (for per-type validation)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self._kinds: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        self._kinds[i] = sample.kind
        return sample

    def num_frames(self, i: int) -> int:
        return self.dataset.num_frames(i)

    def kind_of(self, i: int) -> str:
        return self._kinds.get(i) or self.dataset[i].kind


def world_datasets(
    train_size: int,
    val_size: int,
    seed: int,
    frames: tuple[int, int] = (6, 20),
    kinds: Sequence[str] | None = None,
    **clips,
) -> tuple:
    """Training and validation sets of the synthetic world (disjoint video seeds: seed and seed + 1).

    frames: clip lengths (T) drawn per clip; kinds: question types (default: all); clips: how clips are
    cut (`SyntheticQA`'s full, sampling, stride).
    """
    from .synthetic import SyntheticQA

    train_set = SyntheticQA(train_size, seed, size=(64, 128), frames=frames, kinds=kinds, **clips)
    val_set = _KindIndexed(SyntheticQA(val_size, seed + 1, size=128, frames=frames, kinds=kinds, **clips))
    return train_set, val_set


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mixmalmm.model.train",
        description="Train MA-LMM (memory Q-Former) on the synthetic video world, as MA-LMM fine-tunes.",
    )
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, train_log.jsonl, model/ at the end")
    p.add_argument("--init", default="scratch",
                   help="'scratch' (a small model over the world's vocabulary) or a MALMM.save_pretrained folder")
    p.add_argument("--memory-bank-length", type=int, default=8, help="M, entries per memory bank (0: no memory)")
    p.add_argument("--ingest", metavar="JSON",
                   help="the model's ingest settings, saved in its malmm_config.json: how the engine should turn a "
                        "stream's frames into its input, e.g. '{\"enabled\": false, \"sample_fps\": 1.0}' "
                        "(the wire protocol's ActionShotSettings fields)")
    p.add_argument("--present-frame", action="store_true",
                   help="cross-attention also reads the newest frame, marked (StreamConfig.present_frame)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=6000, help="training clips per epoch (each its own video)")
    p.add_argument("--val-size", type=int, default=300)
    p.add_argument("--frames", default="6,20", help="LO,HI: frames per training clip, drawn per clip")
    p.add_argument("--sampling", choices=["mixed", "stride", "uniform"], default="mixed",
                   help="how clips sample their video: every --stride-th frame, uniformly, or either per clip")
    p.add_argument("--stride", type=int, default=4, help="frame stride for --sampling stride")
    p.add_argument("--full", action="store_true", help="whole videos, questions asked at their end")
    p.add_argument("--videos", action="store_true",
                   help="each item a clip (every --strides-th frame, cut at the video's end with probability "
                        "--at-end) with one question of every type it answers; --frames/--sampling/--stride/--full "
                        "do not apply")
    p.add_argument("--strides", default="6,9", help="LO,HI: strides drawn per clip with --videos")
    p.add_argument("--at-end", type=float, default=0.7, help="with --videos: share of clips cut at the video's end")
    p.add_argument("--busy", type=float, default=0.0,
                   help="with --videos: share of training clips from videos with every event at once (three shapes, "
                        "one leaves, one changes colour; about 4%% of random videos); validation keeps the natural mix")
    p.add_argument("--composites", type=float, default=0.0,
                   help="with --videos: share of clips made of ActionShot composites (each window of STRIDE frames "
                        "blended into one image, as the engine's ActionShot does with max_seconds = STRIDE / fps)")
    p.add_argument("--blend", choices=["exponential", "mean"], default="exponential",
                   help="the composites' blend (as ActionShot's)")
    p.add_argument("--kinds", help="comma-separated question types to train on (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--adhoc-fraction", type=float, default=0.0,
                   help="share of batches trained on the ad-hoc path (banks built with the default question)")
    p.add_argument("--memory-gradients", choices=["none", "visual", "all"], default="visual",
                   help="which stored bank entries gradients flow into: 'none' (MA-LMM detaches them), 'visual' "
                        "(past frames' features, so a vision encoder and frame positions from scratch learn from "
                        "them; the default), 'all' (also the query banks: backpropagation through every step)")
    p.add_argument("--no-augment", action="store_true", help="no JPEG re-encoding of training frames")
    p.add_argument("--train-vision", action="store_true", help="train the vision encoder (frozen by default)")
    p.add_argument("--train-llm", action="store_true", help="train the LLM (frozen by default)")
    p.add_argument("--train-all", action="store_true", help="train everything (a model from scratch needs it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N optimiser steps")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after N optimiser steps, with a checkpoint to --resume from (0: run all epochs)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=0, help="also validate every N optimiser steps")
    p.add_argument("--resume", help="a checkpoint.pt to continue from (same data settings)")
    p.add_argument("--vision-steps", type=int, default=0,
                   help="first pretrain the vision encoder this many steps on labelled single frames "
                        "(which colour each kind of shape wears; skipped with --resume)")
    p.add_argument("--vision-videos", type=int, default=1500, help="videos of the pretraining frames (8 frames each)")
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--vision-overlap", type=float, default=0.0,
                   help="share of pretraining frames in which one shape covers part of another (6-8%% of all)")
    for name, default in asdict(ModelSizes()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"model size for --init scratch (default {default})")
    return p.parse_args(argv)


def _ingest(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        ingest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--ingest takes a JSON object, got {text!r}: {exc}") from None
    if not isinstance(ingest, dict):
        raise SystemExit(f"--ingest takes a JSON object of ActionShot settings, got {text!r}")
    return ingest


def build_model(args: argparse.Namespace) -> MALMM:
    stream = StreamConfig(
        memory_bank_length=args.memory_bank_length,
        freeze_vision=not (args.train_vision or args.train_all),
        freeze_llm=not (args.train_llm or args.train_all),
        present_frame=args.present_frame,
        ingest=_ingest(args.ingest),
    )
    if args.init == "scratch":
        from .synthetic import vocabulary

        sizes = ModelSizes(**{k: getattr(args, k) for k in asdict(ModelSizes())})
        model = scratch_model(vocabulary(), sizes, stream, seed=args.seed)
    else:
        model = MALMM.from_pretrained(args.init, config=stream, device=args.device, dtype=torch.float32)
    return model.to(args.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args)
    try:
        lo, hi = (int(x) for x in args.frames.split(","))
    except ValueError:
        raise SystemExit(f"--frames takes LO,HI (two integers), got {args.frames!r}") from None
    kinds = args.kinds.split(",") if args.kinds else None
    if args.videos:
        from .synthetic import SyntheticVideoQA

        try:
            strides = tuple(int(x) for x in args.strides.split(","))
            if len(strides) != 2:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--strides takes LO,HI (two integers), got {args.strides!r}") from None
        clips = dict(strides=strides, at_end=args.at_end, kinds=kinds)
        clips.update(composites=args.composites, blend=args.blend)
        train_set = SyntheticVideoQA(args.train_size, args.seed, size=(64, 128), busy=args.busy, **clips)
        val_set = SyntheticVideoQA(args.val_size, args.seed + 1, size=128, **clips)
    else:
        train_set, val_set = world_datasets(
            args.train_size, args.val_size, args.seed, (lo, hi), kinds,
            full=args.full, sampling=args.sampling, stride=args.stride,
        )
    config = TrainConfig(
        out=str(out), epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        seed=args.seed, adhoc_fraction=args.adhoc_fraction, memory_gradients={"none": False, "visual": "visual", "all": True}[args.memory_gradients],
        augment=not args.no_augment, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        eval_every=args.eval_every,
        max_steps=args.max_steps, extra={"argv": list(argv) if argv is not None else None},
    )
    log_file = (out / "train_log.txt").open("a")

    def log(line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        log_file.write(stamped + "\n")
        log_file.flush()

    summary = {}
    if args.vision_steps and not args.resume:
        from .synthetic import labelled_frames

        log(f"pretraining the vision encoder: {args.vision_videos} videos x 8 frames, {args.vision_steps} steps")
        summary["vision"] = pretrain_vision(
            model, labelled_frames(args.vision_videos, args.seed + 2, overlap=args.vision_overlap),
            labelled_frames(150, args.seed + 3),
            steps=args.vision_steps, lr=args.vision_lr, seed=args.seed, log=log, log_every=args.log_every,
        )
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {sum(p.numel() for p in model.parameters())} parameters ({n_train} trained); "
        f"{len(train_set)} training clips x {args.epochs} epochs, batch {args.batch_size} x {args.grad_accum}")
    summary = {**train(model, train_set, val_set, config, resume=args.resume, log=log), **summary}
    final = out / FINAL
    # Saved for streaming: the freeze flags go back to MA-LMM's defaults for whoever fine-tunes it next.
    model.config = replace(model.config, freeze_vision=True, freeze_llm=True)
    model.eval().save_pretrained(final)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done in {summary['seconds']:.0f} s: {summary['step']} steps; model saved to '{final}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
