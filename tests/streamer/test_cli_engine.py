"""The client commands as a user runs them (``python -m mixmalmm.clients.cli``, a subprocess) against the
real engine: the tiny model behind a real ``Server`` on loopback, fed the generated H.264 file."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixmalmm.clients.cli import EXIT_ENGINE_ERROR, EXIT_OK
from mixmalmm.model import MALMM
from mixmalmm.streamer.engine import SNAPSHOT_SUFFIX, Engine, EngineConfig
from mixmalmm.streamer.server import Server

from .conftest import FPS, NUM_FRAMES, SlowSteps

CLI = [sys.executable, "-m", "mixmalmm.clients.cli"]
LAST_S = (NUM_FRAMES - 1) / FPS  # the last frame's time: 5.9 s


@pytest.fixture(scope="module")
def model():
    return MALMM.tiny().eval()


@contextlib.contextmanager
def serving(model, state_dir: Path | None):
    """An engine behind a real server on loopback ports; yields the server."""
    box: list[Server] = []
    engine = Engine(model, EngineConfig(state_dir=state_dir and str(state_dir), snapshot_period_s=3600),
                    publish=lambda event: box[0].publish(event))
    server = Server(engine, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*")
    box.append(server)
    engine.start()
    server.start()
    try:
        yield server
    finally:
        engine.shutdown(save=False)
        server.stop()


def mixmalmm(server: Server, *args: str) -> subprocess.CompletedProcess:
    """Run a client command against ``server`` as a user would."""
    return subprocess.run([*CLI, *args, "--server", server.request_address, "--timeout", "20", "--retries", "0"],
                          capture_output=True, text=True, timeout=60)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == EXIT_OK, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def one_json(result: subprocess.CompletedProcess) -> dict:
    [line] = ok(result).splitlines()
    return json.loads(line)


def refused(result: subprocess.CompletedProcess) -> str:
    """The stderr line of a command the engine refused (exit status 1, no traceback, nothing on stdout)."""
    assert result.returncode == EXIT_ENGINE_ERROR == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    return result.stderr


def refused_json(result: subprocess.CompletedProcess) -> dict:
    """The error object a ``--json`` command the engine refused prints (exit status 1)."""
    assert result.returncode == EXIT_ENGINE_ERROR == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    [line] = result.stdout.splitlines()
    return json.loads(line)["error"]


def wait_for_status(server: Server, stream: str, predicate, timeout: float, what: str) -> dict:
    """Poll ``status STREAM --json`` until ``predicate(stream status)``; returns that status."""
    deadline = time.monotonic() + timeout
    while True:
        status = one_json(mixmalmm(server, "status", stream, "--json"))["streams"][0]
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"{what} not within {timeout} s: {status}"
        time.sleep(0.2)


def test_a_file_added_asked_saved_and_removed(model, media, tmp_path):
    state_dir = tmp_path / "state"
    uri = str(media.h264)
    with serving(model, state_dir) as server:
        added = one_json(mixmalmm(server, "streams", "add", "f", uri, "--pace", "fast", "--no-actionshot", "--json"))
        assert (added["stream"], added["uri"], added["mode"], added["questions"]) == ("f", uri, "replay", [])
        assert added["state"] in ("connecting", "live", "draining", "finished")

        # Without ActionShot every frame is a Shot; a replay drops none, and "finished" means every Shot is
        # in memory. The memory holds M = 10 entries plus the newest Shot's (11/10).
        status = wait_for_status(server, "f", lambda s: s["state"] == "finished", 30, "the file to finish")
        assert {k: status[k] for k in ("stream", "uri", "frames", "shots", "drops", "reconnects", "memory_entries",
                                       "memory_capacity", "span_start_s", "queue_depth", "last_error")} == {
            "stream": "f", "uri": uri, "frames": NUM_FRAMES, "shots": NUM_FRAMES, "drops": 0, "reconnects": 0,
            "memory_entries": 11, "memory_capacity": 10, "span_start_s": 0.0, "queue_depth": 0, "last_error": None}
        assert status["span_end_s"] == pytest.approx(LAST_S)
        engine = one_json(mixmalmm(server, "status", "--json"))["engine"]
        assert (engine["model"], engine["device"], engine["questions_answered"]) == ("MALMM", "cpu", 0)
        assert engine["question_latency_p50_s"] is None and engine["persist_error"] is None

        lines = ok(mixmalmm(server, "status")).splitlines()
        assert re.fullmatch(r"engine: model MALMM on cpu, up \d+ s, 0 questions answered, "
                            r"0 requests in flight, 0 Shots queued", lines[0]), lines[0]
        assert lines[1] == ""
        assert lines[2].split() == ["STREAM", "STATE", "FPS", "IN", "FPS", "OUT", "FRAMES", "SHOTS", "DROPS",
                                    "RECONNECTS", "QUEUE", "MEMORY", "SPAN", "URI"]
        row = lines[3].split()
        assert row[:2] == ["f", "finished"] and float(row[2]) >= 0 and float(row[3]) >= 0
        assert row[4:] == ["60", "60", "0", "0", "0", "11/10", "0.0", "s", "-", "5.9", "s", uri]
        assert len(lines) == 4

        # An ad-hoc question: the whole file is in memory.
        answer = one_json(mixmalmm(server, "ask", "f", "what moved?", "--max-new-tokens", "5", "--json"))
        assert isinstance(answer["answer"], str) and answer["answer"] == answer["answer"].strip() != ""
        assert (answer["stream"], answer["question"], answer["standing"], answer["question_id"]) == (
            "f", "what moved?", False, None)
        assert answer["span_start_s"] == 0.0 and answer["span_end_s"] == pytest.approx(LAST_S)
        assert 0 < answer["latency_s"] < 20
        lines = ok(mixmalmm(server, "ask", "f", "what moved?", "--max-new-tokens", "5")).splitlines()
        assert lines[0] == answer["answer"]  # the memory no longer changes: the same answer
        assert re.fullmatch(r"\(f: memory covers 0\.0 s - 5\.9 s of the stream; ad-hoc question; "
                            r"answered in \d+\.\d\d s\)", lines[1]), lines[1]
        assert len(lines) == 2
        assert one_json(mixmalmm(server, "status", "--json"))["engine"]["questions_answered"] == 2

        # A standing question registered after the file ended has seen no frame: it is answered ad hoc,
        # and the answer names it.
        assert ok(mixmalmm(server, "questions", "add", "f", "q1", "what moved?")) == (
            "added question q1 on f (on request): what moved?\n")
        listed = one_json(mixmalmm(server, "streams", "list", "--json"))["streams"]
        assert [(s["stream"], s["state"], s["questions"]) for s in listed] == [
            ("f", "finished", [{"stream": "f", "question_id": "q1", "text": "what moved?", "period_s": None,
                                "alert_when": None, "alert_on_change": False, "hold_off_s": None, "alerts": 0,
                                "suppressed": 0}])]
        late = one_json(mixmalmm(server, "ask", "f", "what moved?", "--max-new-tokens", "5", "--json"))
        assert (late["standing"], late["question_id"], late["answer"]) == (False, "q1", answer["answer"])
        assert ok(mixmalmm(server, "questions", "remove", "f", "q1")) == (
            "removed question q1 from f: what moved?\n")
        assert refused(mixmalmm(server, "questions", "remove", "f", "q1")) == (
            "mixmalmm questions: the server refused: unknown_question: stream 'f' has no standing question 'q1'\n")
        assert one_json(mixmalmm(server, "ask", "f", "what moved?", "--max-new-tokens", "5", "--json"))[
            "question_id"] is None

        # A snapshot of the memory, written where the engine keeps its state.
        path = state_dir / f"f{SNAPSHOT_SUFFIX}"
        [saved] = one_json(mixmalmm(server, "snapshot", "f", "--json"))["saved"]
        assert (saved["stream"], saved["path"]) == ("f", str(path))
        assert saved["size_bytes"] == path.stat().st_size > 0
        lines = ok(mixmalmm(server, "snapshot")).splitlines()
        assert lines[0].split() == ["STREAM", "SIZE", "TIME", "PATH", "(on", "the", "server)"]
        assert lines[1].split()[0] == "f" and lines[1].split()[-1] == str(path) and len(lines) == 2

        # Removed: the stream, its saved state, and any question about it.
        assert ok(mixmalmm(server, "streams", "remove", "f")) == f"removed stream f (was finished): {uri}\n"
        assert not path.exists()
        assert refused(mixmalmm(server, "ask", "f", "what moved?")) == (
            "mixmalmm ask: the server refused: unknown_stream: no stream 'f'\n")
        assert refused_json(mixmalmm(server, "ask", "f", "what moved?", "--json")) == {
            "code": "unknown_stream", "message": "no stream 'f'"}
        assert ok(mixmalmm(server, "status")).splitlines()[1] == "no streams (add one with `mixmalmm streams add ID URI`)"


def test_streams_add_wait_returns_once_every_shot_is_in_memory(model, media):
    uri = str(media.h264)
    # A slowed model: the file is decoded long before its Shots are in memory (the stream drains).
    with serving(SlowSteps(model, 0.05), None) as server:
        status = one_json(mixmalmm(server, "streams", "add", "f", uri, "--pace", "fast", "--actionshot", "--max-frames", "3",
                                   "--wait", "--json"))
        assert (status["state"], status["frames"], status["shots"], status["queue_depth"]) == (
            "finished", NUM_FRAMES, 21, 0)  # 60 frames in composites of 3 (none cut earlier: see test_draining)
        assert (status["span_start_s"], status["span_end_s"]) == (0.0, pytest.approx(LAST_S))
        assert ok(mixmalmm(server, "streams", "add", "g", uri, "--pace", "fast", "--actionshot", "--max-frames", "3",
                           "--wait")).splitlines() == [
            f"added stream g (replay, connecting): {uri}; waiting for it to finish",
            "stream g finished: 21 Shots in memory, covering 0.0 s - 5.9 s"]
    with serving(SlowSteps(model, 0.02, fail_end=LAST_S), None) as server:  # the last Shot's step fails
        result = mixmalmm(server, "streams", "add", "h", uri, "--pace", "fast", "--no-actionshot", "--wait",
                          "--json")
        assert result.returncode == EXIT_ENGINE_ERROR, (result.stdout, result.stderr)
        message = ("stream h is failed, not finished: 1 Shot(s) could not be folded into memory (the memory "
                   "holds the others): model step failed: out of memory (injected)")
        assert result.stderr == f"mixmalmm streams: {message}\n"
        assert json.loads(result.stdout) == {"error": {"code": "not_finished", "message": message}}


def test_streams_add_wait_on_an_http_link_to_a_file(model, http_server):
    # Added, an HTTP link is "live" until its first connection says it is a file; --wait waits for that
    # (before: refused as a live stream that never finishes).
    uri = f"{http_server}/h264.mp4"
    with serving(model, None) as server:
        status = one_json(mixmalmm(server, "streams", "add", "w", uri, "--pace", "fast", "--wait", "--json"))
        assert (status["state"], status["frames"], status["drops"]) == ("finished", NUM_FRAMES, 0)
        [info] = one_json(mixmalmm(server, "streams", "list", "--json"))["streams"]
        assert info["mode"] == "replay"


def test_streams_add_wait_on_an_http_link_that_never_connects_says_why(model, not_found_server):
    # A failed first attempt turns the stream "reconnecting" while it still shows as live: --wait keeps
    # waiting through it and then reports the connection error (before: "it is live ... for files only").
    with serving(model, None) as server:
        stderr = refused(mixmalmm(server, "streams", "add", "n", f"{not_found_server}/clip.mp4", "--wait"))
        assert stderr.startswith("mixmalmm streams: stream n was added, but it has not connected within 15 s ("), stderr
        assert "404" in stderr and "whether it is a file is not known yet" in stderr, stderr


def test_watch_standing_answers_while_a_file_plays(model, media):
    with serving(model, None) as server:
        watcher = subprocess.Popen([*CLI, "watch", "g", "--events", server.event_address, "--count", "4",
                                    "--timeout", "20", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            assert watcher.stderr.readline().startswith(f"watching events of g from {server.event_address}")
            # Real time: the file plays for 6 s, long after the question is registered.
            ok(mixmalmm(server, "streams", "add", "g", str(media.h264), "--no-actionshot"))
            assert ok(mixmalmm(server, "questions", "add", "g", "q1", "what moved?", "--period", "0.5")) == (
                "added question q1 on g (every 0.5 s): what moved?\n")
            out, err = watcher.communicate(timeout=30)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.communicate()
        assert watcher.returncode == EXIT_OK, (out, err)
        events = [json.loads(line) for line in out.splitlines()]
        assert len(events) == 4 and {e["stream"] for e in events} == {"g"}
        # Nothing is missed once subscribed (no gap lines): one sequence, step 1.
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + 4))
        assert {e["type"] for e in events} <= {"stream_state", "answer"}
        answers = [e for e in events if e["type"] == "answer"]
        assert answers, events
        ends = [e["span_end_s"] for e in answers]
        assert ends == sorted(ends)  # the memory grows while the file plays
        for e in answers:
            assert (e["question_id"], e["question"], e["span_start_s"]) == ("q1", "what moved?", 0.0)
            assert 0.0 <= e["span_end_s"] <= LAST_S and e["answer"] == e["answer"].strip()
        for e in events:
            if e["type"] == "stream_state":
                assert e["state"] in ("connecting", "live")  # the file plays on for seconds

        # The question has seen frames since: asked by its text, it is answered from its own memory.
        asked = one_json(mixmalmm(server, "ask", "g", "what moved?", "--json"))
        assert (asked["standing"], asked["question_id"], asked["span_start_s"]) == (True, "q1", 0.0)
        lines = ok(mixmalmm(server, "ask", "g", "what moved?")).splitlines()
        assert re.fullmatch(r"\(g: memory covers 0\.0 s - \d\.\d s of the stream; standing question q1; "
                            r"answered in \d+\.\d\d s\)", lines[1]), lines[1]
        # The default question is standing too, with no id of its own (was "standing question None").
        default = ok(mixmalmm(server, "ask", "g", model.config.default_question)).splitlines()[1]
        assert "; the stream's default question; answered in" in default, default

        # This engine keeps no state directory: a snapshot is refused, named.
        assert refused(mixmalmm(server, "snapshot")) == (
            "mixmalmm snapshot: the server refused: bad_request: the engine runs without a state directory\n")
        assert refused_json(mixmalmm(server, "snapshot", "g", "--json")) == {
            "code": "bad_request", "message": "the engine runs without a state directory"}


def test_memory_bank_length_from_the_command_line_keeps_the_folders_other_settings(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from mixmalmm.model import MALMM, StreamConfig
    from mixmalmm.streamer.cli import build_parser
    from mixmalmm.streamer.options import load_model

    MALMM.tiny(StreamConfig(memory_bank_length=4, present_frame=True)).save_pretrained(tmp_path / "m")
    folder = str(tmp_path / "m")
    capfd.readouterr()
    bars_before = hf_logging.is_progress_bar_enabled()
    for extra, expected, cache in (([], 4, True), (["--memory-bank-length", "3"], 3, True),
                                   (["--no-visual-kv-cache"], 4, False)):
        args = build_parser().parse_args(["replay", "x.mp4", "--device", "cpu", "--model", folder, *extra])
        model, _ = load_model(args)
        assert (model.config.memory_bank_length, model.config.present_frame) == (expected, True)
        assert model.present_embedding is not None
        assert model.config.visual_kv_cache is cache
        assert (model.create_state().visual_bank.side is not None) is cache
    # The weights load without transformers' "Loading weights" bar, which is left as it was for others.
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == bars_before
