"""``mixmalmm train DATASET``: fine-tune a model on one of MA-LMM's datasets, as MA-LMM fine-tunes.

The split's annotation files in MA-LMM's layout (`mixmalmm.model.datasets.read_items`, any family),
its training frame sampling and crops (`mixmalmm.model.finetune.TrainClips`), the dataset's prompt and
memory bank length (`evaluate.configure`), the target text as the LLM's label; the vision encoder
(except ln_vision) and the LLM frozen, the Q-Former, query tokens, projection, frame positions and
ln_vision trained; AdamW with LAVIS's linear warm-up and cosine decay at MA-LMM's values
(`finetune.MALMM_TRAINING`). `mixmalmm.model.train.Trainer` runs the loop (checkpoints, ``--resume``).
The run folder gets checkpoint.pt, train_log.txt, summary.json and model/ (a folder that ``mixmalmm
eval --model`` and ``serve --model`` load).

Under ``torchrun --nproc_per_node N -m mixmalmm.clients.cli train DATASET ...`` each batch is split over
the N processes (gloo on CPU, NCCL on GPU) and their gradients are summed before each step; ``--batch-size``
is the global batch, so a run gives the same model whatever N. Only rank 0 writes.
``mixmalmm train`` without a dataset trains on the synthetic world (`mixmalmm.model.train`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from .options import EXIT_OK, UserError, _no_progress_bars, add_model_arguments, load_model

log = logging.getLogger("mixmalmm")


def build_parser() -> argparse.ArgumentParser:
    from mixmalmm.model.datasets import DATASETS, LVU_HISTORY_S, LVU_STRIDE_S, LVU_TASKS

    p = argparse.ArgumentParser(
        prog="mixmalmm train",
        description="Fine-tune on an MA-LMM dataset as MA-LMM does: its training split, random frame per "
                    "segment, random resized crops, prompts, frozen vision encoder and LLM, AdamW with "
                    "linear warm-up and cosine decay (MA-LMM's values by default). Without DATASET: "
                    "`mixmalmm train --help` trains on the synthetic world.",
    )
    p.add_argument("dataset", choices=sorted(DATASETS), metavar="DATASET", help=f"one of {', '.join(sorted(DATASETS))}")
    d = p.add_argument_group("data")
    d.add_argument("--annotations", required=True, metavar="DIR",
                   help="the folder of the dataset's annotation files (MA-LMM's data/<dataset>/annotation), or "
                        "the split's file itself")
    d.add_argument("--videos", metavar="DIR", help="folder of the videos, <video>.mp4 (or .avi, .mkv, ...)")
    d.add_argument("--frames", metavar="DIR", help="folder of extracted frames, <video>/frame000001.jpg... at "
                                                   "10 fps (used instead of --videos when given)")
    d.add_argument("--split", default="train", choices=["train", "val", "test"], help="default: train")
    d.add_argument("--limit", type=int, metavar="N", help="the first N items only")
    d.add_argument("--num-frames", type=int, metavar="N", help="frames per clip (MA-LMM: 20 for QA, 100 for "
                                                               "LVU, Breakfast, COIN)")
    d.add_argument("--task", action="append", choices=LVU_TASKS, metavar="TASK",
                   help="LVU only: a task to train on (repeatable; default all seven)")
    d.add_argument("--history", type=int, default=LVU_HISTORY_S, metavar="S", help="LVU only: seconds per window")
    d.add_argument("--stride", type=int, default=LVU_STRIDE_S, metavar="S", help="LVU only: seconds between windows")
    d.add_argument("--no-crop", action="store_true", help="no random resized crop: the evaluation's resize")
    d.add_argument("--val-limit", type=int, default=0, metavar="N",
                   help="validate on the first N items of the val split after each epoch (greedy exact match; "
                        "default 0: none, run `mixmalmm eval` on the result)")
    add_model_arguments(p)
    p.add_argument("--qformer-dropout", type=float, metavar="P",
                   help="the Q-Former's dropout in training (default: the model's, 0.1 in InstructBLIP); 0 makes a "
                        "run the same whatever the number of processes (each draws its own dropout masks)")
    r = p.add_argument_group("run (defaults: MA-LMM's run_scripts for the dataset)")
    r.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run folder: checkpoint.pt, train_log.txt, summary.json, model/ at the end")
    r.add_argument("--epochs", type=int, metavar="N")
    r.add_argument("--batch-size", type=int, metavar="N",
                   help="clips per optimiser step over all processes (MA-LMM: batch_size_train x 4 GPUs)")
    r.add_argument("--grad-accum", type=int, default=1, metavar="N")
    r.add_argument("--lr", type=float, help="peak learning rate (MA-LMM: init_lr 1e-4)")
    r.add_argument("--min-lr", type=float, help="the cosine's floor (MA-LMM: 0)")
    r.add_argument("--warmup-lr", type=float, help="the first step's learning rate (MA-LMM: 1e-8)")
    r.add_argument("--warmup-steps", type=int, metavar="N", help="MA-LMM: 1000")
    r.add_argument("--weight-decay", type=float, help="MA-LMM: 0.05")
    r.add_argument("--seed", type=int, help="MA-LMM: 42")
    r.add_argument("--max-steps", type=int, default=0, metavar="N", help="stop after N optimiser steps (0: all epochs)")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="also checkpoint every N steps")
    r.add_argument("--resume", metavar="PT", help="a checkpoint.pt of this run to continue from")
    r.add_argument("--log-every", type=int, default=10, metavar="N")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    r.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("limit", "num_frames", "epochs", "batch_size", "warmup_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup_steps' else 1}, "
                            f"got {value}")
    for name in ("grad_accum",):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("max_steps", "checkpoint_every", "val_limit", "log_every", "threads"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.qformer_dropout is not None and not 0.0 <= args.qformer_dropout < 1.0:
        raise UserError(f"--qformer-dropout must be in [0, 1), got {args.qformer_dropout}")
    for name in ("lr", "min_lr", "warmup_lr", "weight_decay"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    from .evaluate import check_data_arguments

    check_data_arguments(args)
    if args.resume and not Path(args.resume).is_file():
        raise UserError(f"--resume '{args.resume}': no such checkpoint file")


def _writable_run_dir(out: Path) -> None:
    """The run folder exists (made if need be) and can be written, before anything is loaded."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write the run to '{out}': {exc.strerror or exc}") from exc
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run to '{out}': not a writable folder")


def run_train(args: argparse.Namespace) -> int:
    import torch

    from mixmalmm.model import distributed
    from mixmalmm.model.datasets import DATASETS, LVU_TASKS, read_items
    from mixmalmm.model.finetune import TrainClips, training_defaults
    from mixmalmm.model.train import TrainConfig, Trainer

    from .evaluate import _check_sources, configure

    _check(args)
    spec = DATASETS[args.dataset]
    defaults = training_defaults(spec.name)
    seed = defaults.seed if args.seed is None else args.seed
    read = dict(num_frames=args.num_frames, tasks=args.task or LVU_TASKS, history_s=args.history, stride_s=args.stride)
    try:
        items = read_items(spec, args.annotations, args.split, **read)
        val_items = read_items(spec, args.annotations, "val", **read)[: args.val_limit] if args.val_limit else []
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise UserError(f"no {args.split} items in the {spec.name} annotations '{args.annotations}'")
    _check_sources(items + val_items, args)
    out = Path(args.out)
    _writable_run_dir(out)  # every process: the same one-line error wherever it is run
    try:
        distributed.init_from_env(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"torch.distributed: {exc}") from exc
    try:
        args.device = distributed.local_device(args.device)
        args.dtype = args.dtype or "float32"  # trained in float32 (autocast on CUDA), as MA-LMM's amp
        if args.threads:
            torch.set_num_threads(args.threads)
        model, name = load_model(args)
        M = configure(model, spec, args.memory_bank_length)
        # MA-LMM's frozen parts: the vision encoder (not ln_vision) and the LLM; the rest trains.
        model.config = replace(model.config, freeze_vision=True, freeze_llm=True)
        model.requires_grad_(True)
        model._freeze()
        if args.qformer_dropout is not None:
            for module in model.qformer.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = args.qformer_dropout
                for attr in ("dropout", "attention_dropout"):  # attention's own rate (a float)
                    if isinstance(getattr(module, attr, None), float):
                        setattr(module, attr, args.qformer_dropout)
        num_frames = args.num_frames or spec.num_frames
        common = dict(frames=args.frames, videos=args.videos, seed=seed)
        train_set = TrainClips(items, spec.family, model.image_size, num_frames, crop=not args.no_crop, **common)
        val_set = TrainClips(val_items, spec.family, model.image_size, num_frames, train=False, **common) if val_items else None
        lr = defaults.lr if args.lr is None else args.lr
        min_lr = defaults.min_lr if args.min_lr is None else args.min_lr
        warmup_lr = defaults.warmup_lr if args.warmup_lr is None else args.warmup_lr
        config = TrainConfig(
            out=str(out), epochs=args.epochs or defaults.epochs, batch_size=args.batch_size or defaults.batch_size,
            grad_accum=args.grad_accum, lr=lr, min_lr_ratio=min_lr / lr if lr else 0.0,
            warmup_steps=defaults.warmup_steps if args.warmup_steps is None else args.warmup_steps,
            warmup_start_ratio=warmup_lr / lr if lr else 0.0,
            weight_decay=defaults.weight_decay if args.weight_decay is None else args.weight_decay,
            seed=seed, memory_gradients=False, augment=False, checkpoint_every=args.checkpoint_every,
            log_every=args.log_every, eval_batch_size=8, max_steps=args.max_steps, loss_mean="tokens",
            extra={"dataset": spec.name, "split": args.split, "model": name, "memory_bank_length": M,
                   "num_frames": num_frames, "items": len(items), "processes": distributed.world_size()},
        )
        main = distributed.is_main()
        log_file = (out / "train_log.txt").open("a") if main else None

        def say(line: str) -> None:
            if log_file is None:
                return
            stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
            print(stamped, flush=True)
            log_file.write(stamped + "\n")
            log_file.flush()

        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"{spec.name} {args.split}: {len(items)} items, {num_frames} frames, memory bank {M}; model {name}: "
            f"{trained} of {sum(p.numel() for p in model.parameters())} parameters trained; batch {config.batch_size} "
            f"over {distributed.world_size()} process(es), {config.epochs} epoch(s), lr {lr:g}")
        try:
            trainer = Trainer(model, train_set, val_set, config, say)
            if args.resume:
                trainer.load_checkpoint(args.resume)
            summary = trainer.run()
        except ValueError as exc:  # an item's frames that cannot be read, a checkpoint of another run
            raise UserError(str(exc)) from exc
        if main:
            final = out / "model"
            with _no_progress_bars():
                model.eval().save_pretrained(final)
            summary = {**summary, "config": json.loads(json.dumps(config.__dict__, default=str))}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            say(f"done in {summary['seconds']:.0f} s: {summary['step']} steps, last loss "
                f"{summary['losses'][-1] if summary['losses'] else float('nan'):.4f}; model saved to '{final}'")
            print(f"model: {final}")
        if log_file is not None:
            log_file.close()
        distributed.barrier()
    finally:
        distributed.finish()
    return EXIT_OK
