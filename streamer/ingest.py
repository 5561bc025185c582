"""How a stream's frames become Shots: the settings a stream runs with, and the accumulator they make.

The settings are the protocol's `ActionShotSettings` (sampling, ActionShot on or off, its cut rule, the
longest action, the blend). A stream's come from, each over the next:

1. the request that added it (`add_stream.actionshot`: only the fields it gives);
2. the server's command line (`serve --step 4 ...`, also only the options given);
3. the model: its folder's ingest settings (`StreamConfig.ingest`, in malmm_config.json), the input the
   model was trained on; the built-in model's are its training's (one frame per second, no ActionShot);
4. `DEFAULT_INGEST`, MA-LMM's own, for folders that say nothing (InstructBLIP, MA-LMM checkpoints):
   frames extracted at 10 per second, each one a Shot.

`list_streams` and `status` show the result, every field set.
"""

from __future__ import annotations

import msgspec

from mixmalmm.clients import protocol as P

from .actionshot import DEFAULT_CUT, DEFAULT_MAX_SECONDS, ActionShot, PassThrough

#: MA-LMM's own input (its frame extraction runs at 10 fps; it has no ActionShot), and ActionShot's
#: defaults for a stream that turns it on.
DEFAULT_INGEST = P.ActionShotSettings(
    enabled=False, step=1, sample_fps=10.0, cut=DEFAULT_CUT, max_seconds=DEFAULT_MAX_SECONDS,
    blend="exponential", threshold=None, max_frames=None,
)


#: What an engine of protocol 1 ran every stream with unless told otherwise (MixMA-LMM's rule, exact): a
#: snapshot saved then (no "actionshot" of its own) resumes with these, so its memory keeps one kind of input.
PROTOCOL_1_INGEST = P.ActionShotSettings(
    enabled=True, step=1, sample_fps=None, cut=None, max_seconds=None, blend="exponential", threshold=127.5,
    max_frames=120,
)


def parse_settings(fields: dict | None, where: str) -> P.ActionShotSettings:
    """Settings from a plain dict (a model folder's, a snapshot's), checked against the protocol's ranges;
    ValueError naming `where` and the bad field otherwise."""
    try:
        return msgspec.convert(fields or {}, P.ActionShotSettings)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def model_settings(model) -> P.ActionShotSettings:
    """The complete settings a model asks for: its folder's ingest settings over `DEFAULT_INGEST`."""
    ingest = getattr(model.config, "ingest", None)
    return parse_settings(ingest, "the model's ingest settings (malmm_config.json 'ingest')").over(DEFAULT_INGEST)


def make_accumulator(settings: P.ActionShotSettings) -> ActionShot | PassThrough:
    """The Shot maker for complete settings (as `list_streams` shows them)."""
    if not settings.complete:
        missing = sorted(set(settings.__struct_fields__) - set(settings.given()))
        raise ValueError(f"incomplete ActionShot settings (no {', '.join(missing)}): resolve them over the defaults")
    if not settings.enabled:
        return PassThrough(step=settings.step, sample_fps=settings.sample_fps)
    return ActionShot(
        cut=settings.cut, max_seconds=settings.max_seconds, step=settings.step, sample_fps=settings.sample_fps,
        blend=settings.blend, threshold=settings.threshold, max_frames=settings.max_frames,
    )
