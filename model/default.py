"""The embedded default model: a small MA-LMM trained here on the synthetic video world.

`load_default_model()` is what the engine and the demo use when no weights are given. The folder
(`default_model_path()`) is a `MALMM.save_pretrained` folder shipped as package data, with a README
giving the exact command that trained it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .malmm import MALMM, StreamConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"


def default_model_path() -> Path:
    """The folder of the shipped default model (config, weights, tokenizers, README)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the default model is missing from '{DEFAULT_MODEL_DIR}': reinstall mixmalmm (the folder is "
            "package data), or pass a model folder explicitly"
        )
    return DEFAULT_MODEL_DIR


def load_default_model(
    device: str | torch.device = "cpu", dtype: torch.dtype | None = None, config: StreamConfig | None = None
) -> MALMM:
    """The shipped default model, ready to stream (eval mode). config: streaming options to use instead
    of the saved ones (its memory_bank_length must suit the model: trained with the saved one)."""
    return MALMM.from_pretrained(default_model_path(), config=config, device=device, dtype=dtype)
