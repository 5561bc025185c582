"""Memory-bank compression for MA-LMM streams: the torch reference, the streaming bank, Triton kernels.

No transformers import here: transformers probes a top-level `kernels` module at import time.
"""

from .bank import StreamingMemoryBank
from .compress import adjacent_similarity, memory_bank_compress
from .dispatch import FORCE_TORCH_ENV, use_triton

__all__ = [
    "FORCE_TORCH_ENV",
    "StreamingMemoryBank",
    "adjacent_similarity",
    "memory_bank_compress",
    "use_triton",
]
