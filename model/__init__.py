"""mixmalmm.model: MA-LMM (memory-augmented InstructBLIP) as a streaming model on transformers' modules.

Public API: `MALMM` (from_pretrained / tiny / save_pretrained, create_state, encode_frames, step,
register_question, remove_question, answer, restore, clip_query_output, clip_loss), `StreamConfig`,
`Decoding` (how answers are generated; `MALMM_DECODING`: MA-LMM's),
`StreamState` (snapshot), `StateSnapshot` (save / load), `Answer`, and the LAVIS checkpoint loader.
`load_default_model()` / `default_model_path()`: the small model trained here on the synthetic world
(`mixmalmm.model.synthetic`, trained by `python -m mixmalmm.model.train`), used when no weights are given.
"""

import mixmalmm.kernels  # noqa: F401, I001  (first: it sets the OpenMP wait policy before torch loads)

from .default import default_model_path, load_default_model
from .lavis import CheckpointMismatchError, LavisLoadReport, lavis_state_dict, load_lavis_checkpoint
from .malmm import MALMM, MALMM_DECODING, Answer, Decoding, StreamConfig, default_dtype
from .state import QuestionState, StateSnapshot, StreamState

__all__ = [
    "MALMM",
    "MALMM_DECODING",
    "Answer",
    "CheckpointMismatchError",
    "Decoding",
    "LavisLoadReport",
    "QuestionState",
    "StateSnapshot",
    "StreamConfig",
    "StreamState",
    "default_dtype",
    "default_model_path",
    "lavis_state_dict",
    "load_default_model",
    "load_lavis_checkpoint",
]
