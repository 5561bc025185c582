"""Which implementation runs: Triton on CUDA tensors when Triton imports, torch otherwise.

`MIXMALMM_FORCE_TORCH=1` forces the torch path everywhere. `backend="triton"` asks for Triton
explicitly (the tests use it on CPU tensors under `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
FORCE_TORCH_ENV = "MIXMALMM_FORCE_TORCH"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(device: torch.device | str, backend: str = "auto") -> bool:
    """Decide the implementation for tensors on `device`.

    auto: Triton on CUDA when it imports and MIXMALMM_FORCE_TORCH is unset; torch otherwise.
    torch: always torch. triton: always Triton (CUDA, or any device under TRITON_INTERPRET=1).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return False
    device = torch.device(device)
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' was asked for but Triton does not import here")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 "
                "to run the kernels on the CPU interpreter"
            )
        return True
    if os.environ.get(FORCE_TORCH_ENV, "0") not in ("", "0"):
        return False
    return device.type == "cuda" and triton_importable()
