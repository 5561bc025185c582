"""The ``mixmalmm`` client commands run as a user runs them: a subprocess (``python -m
mixmalmm.clients.cli``) against a real ``Server`` on free loopback ports, with a small real handler in
this process standing in for the engine. Outputs (human and ``--json``), exit statuses, and the error
paths: no server, bad addresses, error replies, key files."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from mixmalmm.clients import protocol as p
from mixmalmm.clients.cli import (
    EMPTY_ANSWER,
    EXIT_ENGINE_ERROR,
    EXIT_NO_REPLY,
    EXIT_OK,
    EXIT_USAGE,
    _fmt_event,
)
from mixmalmm.streamer.server import CurveKeys, Server

ANY_PORT = "tcp://127.0.0.1:*"
CLI = [sys.executable, "-m", "mixmalmm.clients.cli"]


def free_address() -> str:
    """A loopback address nothing listens on (bound, read, and closed again)."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.ROUTER)
    sock.bind(ANY_PORT)
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(linger=0)
    return address


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def mixmalmm(server: Server, *args: str) -> subprocess.CompletedProcess:
    """Run a client command against ``server``; a short timeout keeps failures quick."""
    return run(*args, "--server", server.request_address, "--events", server.event_address, "--timeout", "5")


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == EXIT_OK, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def one_json(result: subprocess.CompletedProcess) -> dict:
    lines = ok(result).splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def failed(result: subprocess.CompletedProcess, status: int) -> str:
    """The stderr of a command that failed cleanly with ``status``: one message, no traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip()
    return result.stderr


# ----------------------------------------------------------------------------------------------------
# Requests, human and JSON output
# ----------------------------------------------------------------------------------------------------


def test_stream_and_question_management_round_trip(server, engine):
    out = ok(mixmalmm(server, "streams", "add", "cam1", "rtsp://127.0.0.1:8554/cam", "--mode", "live"))
    assert out == "added stream cam1 (live, connecting): rtsp://127.0.0.1:8554/cam\n"
    added = one_json(mixmalmm(server, "streams", "add", "film", "/videos/film.mp4", "--pace", "fast", "--step", "4",
                              "--threshold", "30", "--json"))
    assert added == {"stream": "film", "uri": "/videos/film.mp4", "state": "connecting", "mode": "replay",
                     "questions": [], "actionshot": None, "worker": None}
    request = engine.requests[-1]
    assert (request.mode, request.pace) == ("auto", "fast")
    # Only the options given are sent; the engine's defaults (the model's) fill in the others.
    assert request.actionshot == p.ActionShotSettings(step=4, threshold=30.0)
    assert msgspec.to_builtins(request.actionshot) == {"step": 4, "threshold": 30.0}
    assert engine.requests[0].actionshot is None  # no ActionShot option: the engine's own settings

    out = ok(mixmalmm(server, "questions", "add", "cam1", "q1", "what is happening?", "--period", "10"))
    assert out == "added question q1 on cam1 (every 10 s): what is happening?\n"
    assert one_json(mixmalmm(server, "questions", "add", "film", "who", "who is there?", "--json")) == {
        "stream": "film", "question_id": "who", "text": "who is there?", "period_s": None, "alert_when": None,
        "alert_on_change": False, "hold_off_s": None, "alerts": 0, "suppressed": 0}
    out = ok(mixmalmm(server, "questions", "add", "cam1", "door", "is the door open?", "--period", "5",
                      "--alert-when", "Yes", "--hold-off", "0"))
    assert out == "added question door on cam1 (every 5 s; alert when answer is 'Yes', hold-off 0 s): is the door open?\n"
    request = engine.requests[-1]
    assert (request.alert_when, request.alert_on_change, request.hold_off_s) == ("Yes", False, 0.0)
    # Only what is given goes on the wire (an older server refuses fields it does not know).
    assert "alert" not in msgspec.json.encode(p.AddQuestion(id=1, stream="s", question_id="q", text="t")).decode()
    # An alert without --period is refused before anything is sent.
    sent = len(engine.requests)
    refused = mixmalmm(server, "questions", "add", "cam1", "d2", "is it?", "--alert-on-change")
    assert refused.returncode == 2 and "--period" in refused.stderr and "Traceback" not in refused.stderr
    assert len(engine.requests) == sent
    ok(mixmalmm(server, "questions", "remove", "cam1", "door"))

    lines = ok(mixmalmm(server, "streams", "list")).splitlines()
    assert lines[0].split() == ["STREAM", "STATE", "MODE", "QUESTIONS", "URI"]
    assert lines[1].split() == ["cam1", "connecting", "live", "1", "rtsp://127.0.0.1:8554/cam"]
    assert lines[2].split() == ["film", "connecting", "replay", "1", "/videos/film.mp4"]
    assert lines[0].index("URI") == lines[1].index("rtsp") == lines[2].index("/videos")  # aligned columns
    assert lines[3] == ""
    assert lines[4].split() == ["STREAM", "QUESTION", "ANSWERED", "ALERT", "TEXT"]
    assert lines[5].split() == ["cam1", "q1", "every", "10", "s", "-", "what", "is", "happening?"]
    assert lines[6].split() == ["film", "who", "on", "request", "-", "who", "is", "there?"]
    listed = one_json(mixmalmm(server, "streams", "list", "--json"))
    assert [s["stream"] for s in listed["streams"]] == ["cam1", "film"]
    assert listed["streams"][0]["questions"][0]["period_s"] == 10.0

    ok(mixmalmm(server, "streams", "add", "plain", "/videos/a.mp4", "--no-actionshot"))
    assert engine.requests[-1].actionshot == p.ActionShotSettings(enabled=False)

    assert ok(mixmalmm(server, "questions", "remove", "cam1", "q1")) == (
        "removed question q1 from cam1: what is happening?\n")
    assert ok(mixmalmm(server, "streams", "remove", "cam1")) == (
        "removed stream cam1 (was stopped): rtsp://127.0.0.1:8554/cam\n")
    assert one_json(mixmalmm(server, "streams", "remove", "film", "--json"))["state"] == "stopped"
    assert sorted(engine.streams) == ["plain"]


def test_ask_prints_the_answer_and_the_span_it_covers(server, engine):
    ok(mixmalmm(server, "streams", "add", "cam1", "rtsp://127.0.0.1:8554/cam"))
    ok(mixmalmm(server, "questions", "add", "cam1", "q1", "what is happening?"))
    lines = ok(mixmalmm(server, "ask", "cam1", "is the door open?", "--max-new-tokens", "12", "--beams", "3")).splitlines()
    assert lines == ["seen: ?nepo rood eht si",
                     "(cam1: memory covers 2.5 s - 1:15.2 of the stream; ad-hoc question; answered in 0.12 s)"]
    request = engine.requests[-1]
    assert (request.question, request.max_new_tokens, request.num_beams) == ("is the door open?", 12, 3)

    answer = one_json(mixmalmm(server, "ask", "cam1", "what is happening?", "--json"))
    assert answer == {"stream": "cam1", "question": "what is happening?", "answer": "seen: ?gnineppah si tahw",
                      "empty": False, "standing": True, "question_id": "q1", "span_start_s": 2.5, "span_end_s": 75.25,
                      "latency_s": 0.125}
    assert (engine.requests[-1].max_new_tokens, engine.requests[-1].num_beams) == (None, None)
    assert "standing question q1" in ok(mixmalmm(server, "ask", "cam1", "what is happening?"))


def test_status_table_and_json(server):
    out = ok(mixmalmm(server, "status"))
    assert out.splitlines() == ["engine: model store on cpu, up 1:02:05, 7 questions answered (latency p50 0.25 s, "
                                "p99 1.50 s), 0 requests in flight, 0 Shots queued",
                                "no streams (add one with `mixmalmm streams add ID URI`)"]
    ok(mixmalmm(server, "streams", "add", "cam1", "rtsp://127.0.0.1:8554/cam"))
    ok(mixmalmm(server, "streams", "add", "flaky", "http://127.0.0.1:8080/live.m3u8"))
    lines = ok(mixmalmm(server, "status")).splitlines()
    assert lines[1] == ""
    header, *rows = lines[2:5]
    assert header.split() == ["STREAM", "STATE", "FPS", "IN", "FPS", "OUT", "FRAMES", "SHOTS", "DROPS",
                              "RECONNECTS", "QUEUE", "MEMORY", "SPAN", "URI"]
    assert rows[0].split() == ["cam1", "live", "25.0", "2.5", "1500", "123", "4", "1", "2", "10/10", "2.5", "s", "-",
                               "1:15.2", "rtsp://127.0.0.1:8554/cam"]
    for column in ("FRAMES", "DROPS", "MEMORY"):  # numbers right-aligned under their header's end
        end = header.index(column) + len(column)
        assert rows[0][end - 1] != " " and rows[1][end - 1] != " "
    assert lines[5] == "flaky: last error: connection reset"

    status = one_json(mixmalmm(server, "status", "cam1", "--json"))
    assert status["engine"]["model"] == "store"
    assert [s["stream"] for s in status["streams"]] == ["cam1"]
    assert status["streams"][0]["memory_entries"] == 10


def test_snapshot_and_ping(server):
    ok(mixmalmm(server, "streams", "add", "cam1", "rtsp://127.0.0.1:8554/cam"))
    lines = ok(mixmalmm(server, "snapshot")).splitlines()
    assert lines[0].split() == ["STREAM", "SIZE", "TIME", "PATH", "(on", "the", "server)"]
    assert lines[1].split()[:3] == ["cam1", "2.0", "KiB"]
    assert lines[1].split()[-1] == "/state/cam1.snap"
    saved = one_json(mixmalmm(server, "snapshot", "cam1", "--json"))["saved"]
    assert [(s["stream"], s["path"], s["size_bytes"]) for s in saved] == [("cam1", "/state/cam1.snap", 2048)]

    out = ok(mixmalmm(server, "ping"))
    assert out.startswith(f"mixmalmm at {server.request_address}: protocol {p.PROTOCOL_VERSION}, up ")
    assert "round trip" in out
    pong = one_json(mixmalmm(server, "ping", "--json"))
    assert pong["server"] == "mixmalmm" and pong["protocol"] == p.PROTOCOL_VERSION
    assert abs(pong["time_s"] - time.time()) < 30


# ----------------------------------------------------------------------------------------------------
# Error paths
# ----------------------------------------------------------------------------------------------------


def test_error_replies_print_code_and_message(server):
    err = failed(mixmalmm(server, "ask", "nope", "anything?"), EXIT_ENGINE_ERROR)
    assert err == "mixmalmm ask: the server refused: unknown_stream: no stream 'nope'\n"
    result = mixmalmm(server, "status", "nope", "--json")
    failed(result, EXIT_ENGINE_ERROR)
    assert json.loads(result.stdout) == {"error": {"code": "unknown_stream", "message": "no stream 'nope'"}}

    ok(mixmalmm(server, "streams", "add", "cam1", "rtsp://127.0.0.1:8554/cam"))
    err = failed(mixmalmm(server, "streams", "add", "cam1", "rtsp://127.0.0.1:8554/other"), EXIT_ENGINE_ERROR)
    assert "already_exists: stream 'cam1' exists" in err
    err = failed(mixmalmm(server, "questions", "remove", "cam1", "q9"), EXIT_ENGINE_ERROR)
    assert "unknown_question: no question 'q9' on 'cam1'" in err
    # The server's own validation: a question over its length limit.
    err = failed(mixmalmm(server, "ask", "cam1", "x" * (p.MAX_QUESTION_CHARS + 1)), EXIT_ENGINE_ERROR)
    assert "too_large" in err


def test_no_server_is_one_line_naming_the_endpoint_and_serve():
    address = free_address()
    started = time.monotonic()
    result = run("status", "--server", address, "--timeout", "0.3", "--retries", "0")
    err = failed(result, EXIT_NO_REPLY)
    assert err.count("\n") == 1
    assert address in err and "mixmalmm serve" in err and "0.3 s (1 attempt)" in err
    assert time.monotonic() - started < 10

    result = run("ping", "--server", address, "--timeout", "0.2", "--retries", "1", "--json")
    assert "2 attempts" in failed(result, EXIT_NO_REPLY)
    assert json.loads(result.stdout)["error"]["code"] == "no_reply"


@pytest.mark.parametrize(("address", "expected"), [
    ("localhost:5555", "is not a ZeroMQ address"),
    ("tcp://127.0.0.1", "needs a port"),
    ("tcp://127.0.0.1:99999", "needs a port from 1 to 65535"),
    ("bogus://127.0.0.1:5555", "cannot connect to 'bogus://127.0.0.1:5555'"),
])
def test_bad_address_is_a_usage_error(address, expected):
    err = failed(run("status", "--server", address), EXIT_USAGE)
    assert expected in err and "tcp://127.0.0.1:5555" in err
    err = failed(run("watch", "--events", address.replace("5555", "5556"), "--timeout", "1"), EXIT_USAGE)
    assert expected.replace("5555", "5556") in err


@pytest.mark.parametrize("args", [
    ["ask", "cam one", "what?"],  # not a stream id
    ["ask", "cam1", "what?", "--beams", "0"],
    ["streams", "add", "cam1", "x.mp4", "--threshold", "300"],
    ["streams", "add", "cam1", "x.mp4", "--cut", "2"],
    ["streams", "add", "cam1", "x.mp4", "--max-seconds", "soon"],
    ["streams", "add", "cam1", "x.mp4", "--mode", "sometimes"],
    ["questions", "add", "cam1", "q1", "what?", "--period", "-1"],
    ["status", "--timeout", "0"],
    ["streams"],  # no action
    ["frobnicate"],
])
def test_bad_arguments_are_usage_errors_without_a_request(args):
    # --server points nowhere: a usage error must come before any attempt to reach it.
    started = time.monotonic()
    err = failed(run(*args, "--server", free_address()) if args != ["frobnicate"] else run(*args), EXIT_USAGE)
    assert "usage: mixmalmm" in err
    assert time.monotonic() - started < 5


def test_help_lists_every_command_including_the_server_ones():
    out = ok(run("--help"))
    for command in ("serve", "replay", "demo", "eval", "train", "ask", "status", "watch", "streams", "questions", "snapshot",
                    "ping", "keys"):
        assert f"\n    {command}" in out, command
    assert "exit status" in out
    assert failed(run(), EXIT_USAGE).startswith("usage: mixmalmm")


def test_server_commands_without_the_engine_say_what_to_install():
    # A client-only install: torch cannot be imported (None in sys.modules makes `import torch` fail).
    probe = ("import sys; sys.modules['torch'] = None\n"
             "from mixmalmm.clients.cli import main\n"
             "sys.exit(main(['demo']))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    err = failed(result, EXIT_USAGE)
    assert "needs the full install" in err and "pip install mixmalmm" in err


@pytest.mark.skipif(importlib.util.find_spec("mixmalmm.streamer.cli") is None,
                    reason="mixmalmm.streamer.cli is not written yet")
def test_server_commands_are_dispatched_to_the_streamer_cli():
    out = ok(run("serve", "--help", timeout=120))
    assert "serve" in out


# ----------------------------------------------------------------------------------------------------
# CURVE keys
# ----------------------------------------------------------------------------------------------------


def test_keys_writes_a_usable_pair_and_never_overwrites_one(tmp_path):
    keys = tmp_path / "keys"
    out = ok(run("keys", str(keys), "server"))
    assert f"public key: {keys / 'server.key'}" in out and f"secret key: {keys / 'server.key_secret'}" in out
    public, secret = p.load_keypair(str(keys / "server.key_secret"))
    assert len(public) == len(secret) == 40
    assert p.load_keypair(str(keys / "server.key")) == (public, None)
    assert os.stat(keys / "server.key_secret").st_mode & 0o777 == 0o600

    err = failed(run("keys", str(keys), "server"), EXIT_USAGE)
    assert "exists; pass --force" in err
    assert p.load_keypair(str(keys / "server.key_secret")) == (public, secret)  # untouched
    paths = one_json(run("keys", str(keys), "server", "--force", "--json"))
    assert paths == {"public": str(keys / "server.key"), "secret": str(keys / "server.key_secret")}
    assert p.load_keypair(paths["secret"])[0] != public

    assert "plain file name" in failed(run("keys", str(keys), ".hidden"), EXIT_USAGE)
    (tmp_path / "file").write_text("")
    assert "not a directory" in failed(run("keys", str(tmp_path / "file"), "x"), EXIT_USAGE)


def test_curve_keys_made_by_the_cli_connect_to_a_curve_server(tmp_path, engine):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    ok(run("keys", str(keys), "server"))
    ok(run("keys", str(allowed), "alice"))
    ok(run("keys", str(tmp_path / "other"), "mallory"))
    os.replace(allowed / "alice.key_secret", keys / "alice.key_secret")  # the allowed dir keeps public keys only
    curve = CurveKeys.from_files(str(keys / "server.key_secret"), str(allowed))
    with Server(engine, request_endpoint=ANY_PORT, event_endpoint=ANY_PORT, curve=curve) as server:
        server_key = str(keys / "server.key")
        common = ["--server", server.request_address, "--curve-server-key", server_key]
        pong = one_json(run("ping", *common, "--curve-client-key", str(keys / "alice.key_secret"), "--json"))
        assert pong["server"] == "mixmalmm"

        refused = run("ping", *common, "--curve-client-key", str(tmp_path / "other" / "mallory.key_secret"),
                      "--timeout", "0.3", "--retries", "0")
        assert "CURVE keys" in failed(refused, EXIT_NO_REPLY)
        plain = run("ping", "--server", server.request_address, "--timeout", "0.3", "--retries", "0")
        failed(plain, EXIT_NO_REPLY)

        # Events over CURVE too; watch takes the same connection options as the other commands.
        watcher = subprocess.Popen([*CLI, "watch", "--count", "1", "--timeout", "15", "--json", *common,
                                    "--curve-client-key", str(keys / "alice.key_secret"), "--retries", "0",
                                    "--events", server.event_address], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while watcher.poll() is None and time.monotonic() < deadline:
            server.publish(p.StreamStateEvent(stream="cam1", state="live"))
            time.sleep(0.05)
        out, err = watcher.communicate(timeout=10)
        assert watcher.returncode == EXIT_OK, (out, err)
        assert json.loads(out)["state"] == "live"

        missing = run("ping", *common, "--curve-client-key", str(keys / "bob.key_secret"))
        assert "--curve-client-key: no such file" in failed(missing, EXIT_USAGE)
        public_only = run("ping", *common, "--curve-client-key", str(allowed / "alice.key"))
        assert "holds no secret key" in failed(public_only, EXIT_USAGE)
        (tmp_path / "junk.key").write_text("not a certificate\n")
        junk = run("ping", "--server", server.request_address, "--curve-server-key", str(tmp_path / "junk.key"))
        assert "bad CURVE key file" in failed(junk, EXIT_USAGE)
        lone = run("ping", "--server", server.request_address, "--curve-client-key", str(keys / "alice.key_secret"))
        assert "needs --curve-server-key" in failed(lone, EXIT_USAGE)


# ----------------------------------------------------------------------------------------------------
# watch
# ----------------------------------------------------------------------------------------------------


def test_watch_prints_events_from_the_server(server):
    # A subscriber misses what was published before it joined, so publish until it has seen one.
    watcher = subprocess.Popen([*CLI, "watch", "cam1", "--events", server.event_address, "--count", "1",
                                "--timeout", "15", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while watcher.poll() is None and time.monotonic() < deadline:
        server.publish(p.AnswerEvent(stream="other", question_id="q", question="?", answer="not shown"))
        server.publish(p.AnswerEvent(stream="cam1", question_id="q1", question="what is happening?",
                                     answer="a dog runs", span_start_s=0.0, span_end_s=12.5))
        time.sleep(0.05)
    out, err = watcher.communicate(timeout=10)
    assert watcher.returncode == EXIT_OK, (out, err)
    [line] = out.splitlines()
    event = json.loads(line)
    assert event["type"] == "answer" and event["stream"] == "cam1" and event["seq"] >= 1
    assert (event["question_id"], event["answer"], event["span_end_s"]) == ("q1", "a dog runs", 12.5)
    assert "watching events of cam1 from" in err


def test_an_empty_answer_is_printed_as_one():
    empty = p.AnswerEvent(stream="cam1", question_id="q1", question="what?", answer="", empty=True)
    assert _fmt_event(empty).split(": ", 1)[1].startswith(EMPTY_ANSWER)
    said = p.AnswerEvent(stream="cam1", question_id="q1", question="what?", answer="a cat")
    assert EMPTY_ANSWER not in _fmt_event(said) and "a cat" in _fmt_event(said)


class RawPublisher:
    """A real XPUB socket on a free port: it sees the watcher's subscription arrive, so the test knows
    when to publish, and it sends bodies with chosen sequence numbers (the server never skips one)."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.bind(ANY_PORT)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def wait_for_subscriber(self, timeout_s: float = 15) -> bytes:
        assert self.sock.poll(int(timeout_s * 1000)), "the watcher never subscribed"
        return self.sock.recv()

    def send(self, event: p.Event, seq: int) -> None:
        event.seq = seq
        self.sock.send_multipart([event.stream.encode(), p.encode(event)])

    def close(self) -> None:
        self.sock.close()
        self.context.term()


def test_watch_reports_gaps_and_restarts_and_stops_at_count():
    publisher = RawPublisher()
    try:
        watcher = subprocess.Popen([*CLI, "watch", "--events", publisher.address, "--count", "4", "--timeout", "15"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert publisher.wait_for_subscriber() == b"\x01"  # subscribed to every topic
        publisher.send(p.StreamStateEvent(stream="cam1", state="live", previous="connecting"), 1)
        publisher.send(p.AnswerEvent(stream="cam1", question_id="q1", question="what?", answer="a cat",
                                     span_start_s=1.0, span_end_s=61.5), 2)
        publisher.send(p.StreamStateEvent(stream="cam1", state="failed", previous="live", message="EOF"), 5)
        publisher.send(p.StreamStateEvent(stream="cam1", state="connecting"), 1)
        out, err = watcher.communicate(timeout=15)
    finally:
        publisher.close()
    assert watcher.returncode == EXIT_OK, (out, err)
    lines = [line.split("  ", 1)[1] for line in out.splitlines()]  # without the clock
    assert lines == [
        "cam1  #1  state connecting -> live",
        "cam1  #2  answer q1 (what?): a cat  [1.0 s - 1:01.5]",
        "cam1  missed 2 events (#3 to #4); `mixmalmm status cam1` shows where it stands",
        "cam1  #5  state live -> failed: EOF",
        "cam1  sequence numbers started over at #1 (the engine restarted)",
        "cam1  #1  state connecting",
    ]


def test_watch_json_lines_include_gaps():
    publisher = RawPublisher()
    try:
        watcher = subprocess.Popen([*CLI, "watch", "cam1", "--events", publisher.address, "--count", "2",
                                    "--timeout", "15", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        assert publisher.wait_for_subscriber() == b"\x01cam1"
        publisher.send(p.StreamStateEvent(stream="cam1", state="live"), 7)
        publisher.send(p.StreamStateEvent(stream="cam10", state="live"), 1)  # a prefix match, filtered out
        publisher.send(p.StreamStateEvent(stream="cam1", state="stopped", previous="live"), 9)
        out, err = watcher.communicate(timeout=15)
    finally:
        publisher.close()
    assert watcher.returncode == EXIT_OK, (out, err)
    objects = [json.loads(line) for line in out.splitlines()]
    assert [(o["type"], o.get("seq"), o.get("state")) for o in objects] == [
        ("stream_state", 7, "live"), ("gap", None, None), ("stream_state", 9, "stopped")]
    assert objects[1] == {"type": "gap", "stream": "cam1", "expected": 8, "received": 9, "missed": 1}
    assert p.decode_event(json.dumps(objects[2]).encode()) == p.StreamStateEvent(
        stream="cam1", seq=9, time_s=objects[2]["time_s"], state="stopped", previous="live")


def test_watch_timeout():
    address = free_address()
    started = time.monotonic()
    assert ok(run("watch", "--events", address, "--timeout", "0.3")) == ""  # no --count: a timeout is the plan
    result = run("watch", "--events", address, "--count", "2", "--timeout", "0.3", "--json")
    assert "0 of 2 events within 0.3 s" in failed(result, EXIT_NO_REPLY)
    assert json.loads(result.stdout)["error"]["code"] == "no_events"
    assert time.monotonic() - started < 10


def test_watch_stops_quietly_on_ctrl_c():
    watcher = subprocess.Popen([*CLI, "watch", "--events", free_address()], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert "Ctrl-C to stop" in watcher.stderr.readline()  # printed once it is listening
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=10)
    assert watcher.returncode == 130
    assert out == "" and "Traceback" not in err
