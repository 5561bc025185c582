"""Shared pytest set-up.

Without CUDA, Triton kernels run under Triton's CPU interpreter: the variable must be set before
any `@triton.jit` function is defined, so it is set here, before the test modules import
`mixmalmm.kernels`.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
