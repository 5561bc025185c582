"""The state store: a directory or an fsspec URL (fsspec's in-memory filesystem and file:// here, real fsspec
backends; an object store such as s3:// goes through the same calls). The engine saves into one and a new
engine restores from it, memory and answers included."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM, StateSnapshot
from mixmalmm.streamer.engine import SNAPSHOT_SUFFIX, Engine, EngineConfig
from mixmalmm.streamer.store import FsspecStore, LocalStore, open_store

from .conftest import wait_for

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)


@pytest.fixture(scope="module")
def tiny():
    return MALMM.tiny().eval()


def _memory_url() -> str:
    return f"memory://mixmalmm-tests/{uuid.uuid4().hex}"


@pytest.mark.parametrize("kind", ["local", "memory", "file-url"])
def test_a_store_writes_lists_reads_and_removes(tmp_path, kind):
    where = {"local": str(tmp_path / "s"), "memory": _memory_url(), "file-url": f"file://{tmp_path}/s"}[kind]
    store = open_store(where)
    assert isinstance(store, LocalStore if kind == "local" else FsspecStore)
    store.write(f"a{SNAPSHOT_SUFFIX}", b"one")
    store.write(f"b{SNAPSHOT_SUFFIX}", b"two")
    store.write(f"a{SNAPSHOT_SUFFIX}", b"three")  # replaced whole
    store.write("other.txt", b"x")
    assert store.names(SNAPSHOT_SUFFIX) == [f"a{SNAPSHOT_SUFFIX}", f"b{SNAPSHOT_SUFFIX}"]
    assert store.read(f"a{SNAPSHOT_SUFFIX}") == b"three" and store.size(f"b{SNAPSHOT_SUFFIX}") == 3
    store.remove(f"a{SNAPSHOT_SUFFIX}")
    store.remove(f"a{SNAPSHOT_SUFFIX}")  # already gone: nothing to do
    assert not store.exists(f"a{SNAPSHOT_SUFFIX}") and store.exists(f"b{SNAPSHOT_SUFFIX}")
    with pytest.raises(OSError):
        store.read(f"a{SNAPSHOT_SUFFIX}")
    assert store.where("x").endswith("/x") and where.rstrip("/") in store.where("x")
    if kind == "file-url":  # the same files as a directory store sees
        assert LocalStore(tmp_path / "s").read(f"b{SNAPSHOT_SUFFIX}") == b"two"


def test_an_unknown_scheme_is_a_clear_oserror():
    with pytest.raises(OSError, match="nosuch://x.*nosuch"):
        open_store("nosuch://x")


def test_from_bytes_reads_what_to_bytes_wrote_and_refuses_the_rest():
    import torch

    snap = StateSnapshot(tensors={"t": torch.arange(6.0).reshape(2, 3)}, meta={"a": [1, "b"]})
    back = StateSnapshot.from_bytes(snap.to_bytes())
    assert back.meta == {"a": [1, "b"]} and torch.equal(back.tensors["t"], snap.tensors["t"])
    with pytest.raises(ValueError, match="'x' is not a safetensors file"):
        StateSnapshot.from_bytes(b"not a snapshot at all", "'x'")
    from safetensors.torch import save

    with pytest.raises(ValueError, match="not a mixmalmm stream snapshot"):
        StateSnapshot.from_bytes(save({"t": torch.zeros(1)}))


def test_an_engine_saves_into_an_fsspec_store_and_another_restores_from_it(tiny, media):
    url = _memory_url()
    first = Engine(tiny, EngineConfig(state_dir=url)).start()
    try:
        first.add_stream(P.AddStream(id=0, stream="f", uri=str(media.h264), pace="fast", actionshot=EVERY_FRAME))
        first.add_question(P.AddQuestion(id=0, stream="f", question_id="q", text="what moved?", period_s=60.0,
                                         alert_on_change=True))
        wait_for(lambda: first._get("f").state_name == "finished", 60, "the file to finish")
        shots = first.status("f").streams[0].shots
        before = first.ask("f", "what colour is the square?", max_new_tokens=5)
        saved = first.save("f").saved[0]
        assert saved.path == f"{url}/f{SNAPSHOT_SUFFIX}" and saved.size_bytes == FsspecStore(url).size(
            f"f{SNAPSHOT_SUFFIX}") > 0
    finally:
        first.shutdown(save=True)
    again = Engine(tiny, EngineConfig(state_dir=url)).start(restore=True)
    try:
        status = again.status("f").streams[0]
        assert (status.shots, status.state) == (shots, "finished")
        after = again.ask("f", "what colour is the square?", max_new_tokens=5)
        assert (after.answer, after.span_start_s, after.span_end_s) == (before.answer, before.span_start_s,
                                                                         before.span_end_s)
        [q] = again.stream_info(again._get("f")).questions
        assert (q.question_id, q.alert_on_change, q.period_s) == ("q", True, 60.0)
        again.remove_stream("f")  # its snapshot goes with it
        assert FsspecStore(url).names(SNAPSHOT_SUFFIX) == []
    finally:
        again.shutdown(save=False)


def test_a_bad_snapshot_in_an_fsspec_store_is_reported_and_the_others_load(tiny, media):
    url = _memory_url()
    FsspecStore(url).write(f"broken{SNAPSHOT_SUFFIX}", b"not a snapshot")
    engine = Engine(tiny, EngineConfig(state_dir=url)).start(restore=True)
    try:
        assert engine.streams() == []
        assert f"{url}/broken{SNAPSHOT_SUFFIX}" in engine.status().engine.persist_error
    finally:
        engine.shutdown(save=False)


def test_serve_refuses_a_state_store_it_cannot_open_in_one_line():
    done = subprocess.run([sys.executable, "-m", "mixmalmm.clients.cli", "serve", "--state-dir", "nosuch://bucket/x",
                           "--bind", "tcp://127.0.0.1:*"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--state-dir nosuch://bucket/x:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
