"""A stream's ingest settings: the request's over the server's over the model's over MA-LMM's; kept across a
restart; a model folder whose ingest settings are bad is refused with a clear error."""

from __future__ import annotations

import argparse
import json

import msgspec
import pytest

from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM, StateSnapshot, StreamConfig
from mixmalmm.streamer.engine import SNAPSHOT_SUFFIX, Engine, EngineConfig
from mixmalmm.streamer.ingest import DEFAULT_INGEST, PROTOCOL_1_INGEST
from mixmalmm.streamer.options import UserError, load_model

MODEL_INGEST = {"enabled": True, "sample_fps": 4.0, "cut": 0.3}


def tiny(ingest=None) -> MALMM:
    return MALMM.tiny(config=StreamConfig(memory_bank_length=4, ingest=ingest))


def add(engine: Engine, sid: str, uri: str, actionshot=None):
    return engine.add_stream(P.AddStream(id=0, stream=sid, uri=uri, pace="fast", actionshot=actionshot))


def test_each_field_comes_from_the_request_then_the_server_then_the_model_then_malmm(media):
    server = P.ActionShotSettings(cut=None, blend="mean")  # serve --cut off --blend mean
    engine = Engine(tiny(MODEL_INGEST), EngineConfig(default_actionshot=server))
    try:
        stream = add(engine, "a", str(media.h264), P.ActionShotSettings(max_seconds=2.0, blend="exponential"))
        assert stream.actionshot == P.ActionShotSettings(
            enabled=True, sample_fps=4.0,  # the model's
            cut=None,  # the server's "off" over the model's 0.3
            max_seconds=2.0, blend="exponential",  # the request's, over the server's mean
            step=1, threshold=None, max_frames=None,  # MA-LMM's defaults
        )
        shown = msgspec.json.decode(msgspec.json.encode(engine.stream_info(stream)), type=P.StreamInfo)
        assert msgspec.to_builtins(shown.actionshot) == msgspec.to_builtins(stream.actionshot)
        status = engine.stream_status(stream)
        assert msgspec.to_builtins(status.actionshot) == msgspec.to_builtins(stream.actionshot)
        plain = add(engine, "b", str(media.h264))  # nothing given: the server's over the model's
        assert (plain.actionshot.cut, plain.actionshot.blend, plain.actionshot.sample_fps) == (None, "mean", 4.0)
    finally:
        engine.shutdown(save=False)
    bare = Engine(tiny())  # a folder with no ingest settings: MA-LMM's own
    assert bare.default_actionshot == DEFAULT_INGEST and DEFAULT_INGEST.sample_fps == 10.0


def test_a_restored_stream_keeps_the_settings_it_ran_with(media, tmp_path):
    config = EngineConfig(state_dir=str(tmp_path))
    first = Engine(tiny(MODEL_INGEST), config)
    try:
        ran_with = add(first, "kept", str(media.h264)).actionshot
        add(first, "old", str(media.h264), P.ActionShotSettings(step=2))
    finally:
        first.shutdown(save=True)
    # "old" as protocol 1 saved it: no effective settings beside its request.
    old = tmp_path / f"old{SNAPSHOT_SUFFIX}"
    snap = StateSnapshot.load(old)
    del snap.meta["engine"]["actionshot"]
    old.write_bytes(snap.to_bytes())
    second = Engine(tiny({"enabled": False, "sample_fps": 1.0}), config)  # another model, other settings
    try:
        second.start()
        assert second._get("kept").actionshot == ran_with
        assert second._get("old").actionshot == msgspec.structs.replace(PROTOCOL_1_INGEST, step=2)
    finally:
        second.shutdown(save=False)


def test_a_model_folder_with_bad_ingest_settings_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "model"
    tiny().save_pretrained(folder)
    config = json.loads((folder / "malmm_config.json").read_text())
    config["ingest"] = {"sample_fps": 0}
    (folder / "malmm_config.json").write_text(json.dumps(config))
    args = argparse.Namespace(model=str(folder), malmm_checkpoint=None, memory_bank_length=None,
                              visual_kv_cache=None, device="cpu", dtype=None)
    with pytest.raises(UserError, match=r"ingest settings.*sample_fps"):
        load_model(args)
    with pytest.raises(ValueError, match="ingest settings"):
        Engine(MALMM.from_pretrained(folder))
