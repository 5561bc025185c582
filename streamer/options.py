"""What the engine-side commands (``serve``, ``replay``, ``demo``) share: none takes it from another.

- `UserError` and the exit statuses: a mistake in the command line or its inputs ends in one line on
  stderr and `EXIT_USAGE` (``mixmalmm.streamer.cli.main`` prints it);
- the option groups every command takes the same way: `add_model_arguments` (read back by
  `load_model`) and `add_actionshot_arguments` (read back by `actionshot_settings`);
- `load_model` and `builtin_model`: the model the options name (loaded without transformers' progress
  bars: each command's stderr carries its own output and log records only);
- `answer_line`: an answer record as replay and demo print it; `write_results`: their answers.json and
  contact sheet.

Imports point one way: ``cli`` (with ``serve``) imports ``demo`` and ``replay``; all three import this
module, which imports none of them (only `mixmalmm.streamer.contact_sheet`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from .contact_sheet import SHEET_FILE, format_span, format_time, write_png

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

log = logging.getLogger("mixmalmm")


class UserError(Exception):
    """A mistake in the command line or its inputs; the message says what and what to do."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The "model" option group (``--model``, ``--malmm-checkpoint``, ``--memory-bank-length``,
    ``--[no-]visual-kv-cache``, ``--device``, ``--dtype``), read back by `load_model`."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="FOLDER",
                   help="InstructBLIP folder (transformers' save_pretrained layout, or one written by "
                        "mixmalmm); default: the built-in model shipped with mixmalmm")
    g.add_argument("--malmm-checkpoint", metavar="PTH",
                   help="an MA-LMM (LAVIS) checkpoint loaded on top of --model")
    g.add_argument("--memory-bank-length", type=int, metavar="M",
                   help="entries per memory bank (MA-LMM: 10 for QA, 20 for long videos; 0 = no memory)")
    g.add_argument("--visual-kv-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the visual bank's cross-attention keys/values (a faster Q-Former step, 7.4x the "
                        "visual bank's bytes at InstructBLIP's sizes; default: the model's, on)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 elsewhere")


def add_actionshot_arguments(parser: argparse.ArgumentParser) -> None:
    """The ActionShot option group (`mixmalmm.clients.options`, shared with `streams add`), read back by
    `actionshot_settings`."""
    from mixmalmm.clients.options import add_actionshot_options

    add_actionshot_options(parser, "how frames become Shots (default: the model's own settings; see list_streams)")


def actionshot_settings(args: argparse.Namespace):
    """The ActionShot options given (a partial `ActionShotSettings`: the model's settings fill the rest);
    UserError when one is out of range."""
    from mixmalmm.clients.options import actionshot_from

    try:
        return actionshot_from(args)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def load_model(args: argparse.Namespace):
    """The model the options name: a weights folder (plus an MA-LMM checkpoint), or the built-in one.

    Returns (model in eval mode on the chosen device and dtype, its name for logs and reports).
    """
    import torch

    from mixmalmm.model import MALMM, default_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"bad --device {device!r}: {exc}") from exc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device (use --device cpu)")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    if args.model is None and args.malmm_checkpoint:
        raise UserError("--malmm-checkpoint needs --model, the InstructBLIP folder it applies to")
    with _no_progress_bars():
        if args.model is None:
            try:
                model, name = builtin_model().to(device=device, dtype=dtype), "built-in"
            except (FileNotFoundError, OSError, ValueError) as exc:
                raise UserError(f"the built-in model could not be loaded ({exc}); reinstall mixmalmm or pass "
                                "--model") from exc
        else:
            try:
                model = MALMM.from_pretrained(args.model, lavis_checkpoint=args.malmm_checkpoint, device=device,
                                              dtype=dtype)
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise UserError(str(exc)) from exc
            name = args.model
    if args.memory_bank_length is not None:  # the model's other streaming settings (present_frame...) stay
        model.config = replace(model.config, memory_bank_length=args.memory_bank_length)
    if args.visual_kv_cache is not None:
        model.config = replace(model.config, visual_kv_cache=args.visual_kv_cache)
    from .ingest import model_settings

    try:  # a folder whose ingest settings are bad is refused here, not by the engine with a traceback
        model_settings(model)
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from exc
    return model.eval(), name


@contextlib.contextmanager
def _no_progress_bars():
    """transformers (and huggingface_hub) draw no progress bars inside the block ("Loading weights"...)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def builtin_model():
    """The model shipped with mixmalmm (trained on the synthetic world); while none is shipped, the
    tiny model with random weights (it runs everything end to end, its answers are noise)."""
    from mixmalmm.model import MALMM, default_model_path, load_default_model

    try:
        default_model_path()
    except FileNotFoundError:
        log.warning("no trained default model is shipped with this version: using the tiny model with "
                    "random weights (answers are noise; pass --model for real weights)")
        return MALMM.tiny()
    return load_default_model()


def answer_line(record: dict, expected: str | None = None) -> str:
    """One answer as a line of text: when, how, what the memory covered, question -> answer."""
    span = record.get("span_s")
    head = f"[{format_time(record.get('asked_at_s'))} {record['mode']:8s} memory {format_span(span)}]"
    tail = "" if expected is None else f"   (expected: {expected})"
    return f"{head} {record['question']}  ->  {record['answer'] or '(empty)'}{tail}"


def write_results(out: Path, report: dict, sheet) -> tuple[Path, Path]:
    """Write `report` as ``out/answers.json`` and `sheet` ([H, W, 3] uint8 RGB) as the contact sheet
    beside it; returns both paths. UserError when they cannot be written."""
    answers_path, sheet_path = out / "answers.json", out / SHEET_FILE
    try:
        answers_path.write_text(json.dumps(report, indent=2) + "\n")
        write_png(sheet_path, sheet)
    except OSError as exc:
        raise UserError(f"cannot write the results to '{out}': {exc.strerror or exc}") from exc
    return answers_path, sheet_path
