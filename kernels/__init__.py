"""Memory-bank compression for MA-LMM streams: the torch reference, the streaming bank, Triton kernels.

No transformers import here: transformers probes a top-level `kernels` module at import time.
"""

import os

# OpenMP workers that spin while waiting make every torch op crawl (100x, measured) when the cores are
# busy with other work, e.g. decode threads or another process; sleeping workers cost microseconds.
# Set before torch loads its OpenMP runtime, so it applies when mixmalmm is imported before torch; an
# explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .bank import StreamingMemoryBank  # noqa: E402
from .compress import adjacent_similarity, memory_bank_compress  # noqa: E402
from .dispatch import FORCE_TORCH_ENV, use_triton  # noqa: E402

__all__ = [
    "FORCE_TORCH_ENV",
    "StreamingMemoryBank",
    "adjacent_similarity",
    "memory_bank_compress",
    "use_triton",
]
