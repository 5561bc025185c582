"""The README's protocol section cannot rot: every JSON example on it is decoded by the protocol's own decoders (and a
reply's result or an event must show exactly the fields the code sends), every request, event, error
code and stream state is documented, the limits it states are the code's, its key file loads, and its
raw-pyzmq client runs against a real server."""

import inspect
import json
import pathlib
import re
import subprocess
import sys
import threading
import time
import typing

import msgspec
import zmq

from mixmalmm.clients import protocol as p
from mixmalmm.streamer.server import Server

DOC = pathlib.Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
EVENT_TYPES = p.EVENT_TYPES


def blocks(language: str) -> list[tuple[list[str], str]]:
    """(words after the language, body) of every fenced block in the doc whose info string starts with
    ``language``."""
    found = []
    for info, body in FENCE.findall(DOC.read_text(encoding="utf-8")):
        words = info.split()
        if words and words[0] == language:
            found.append((words[1:], body))
    return found


def test_the_doc_has_examples_of_every_kind():
    kinds = [tuple(words[:1]) for words, _ in blocks("json")]
    assert set(kinds) == {("request",), ("reply",), ("event",)}, kinds  # every JSON block is tagged


def test_request_examples_decode_and_every_request_type_has_one():
    seen = set()
    for words, body in blocks("json"):
        if words[0] != "request":
            continue
        request = p.decode_request(body.encode())  # strict: unknown fields are refused
        shown = json.loads(body)
        # every field, defaults too (add_stream's encoding leaves its defaults out)
        encoded = {f: msgspec.to_builtins(getattr(request, f)) for f in request.__struct_fields__}
        encoded["type"] = request.__struct_config__.tag
        assert {key: encoded[key] for key in shown} == shown
        seen.add(shown["type"])
    assert seen == set(p.REQUEST_TYPES)


def test_reply_examples_decode_with_exactly_the_fields_the_server_sends():
    seen, errors = set(), set()
    for words, body in blocks("json"):
        if words[0] != "reply":
            continue
        [kind] = words[1:]
        reply = p.decode_reply(body.encode())
        shown = json.loads(body)
        if kind == "error":
            assert not reply.ok and reply.error is not None and "result" not in shown
            errors.add(reply.error.code)
            continue
        assert reply.ok and "error" not in shown
        result = p.decode_result(reply, p.RESULT_TYPES[p.REQUEST_TYPES[kind]])
        # Results are decoded leniently (unknown fields ignored), so compare with what the struct holds:
        # a misspelt or missing field in the example fails here.
        assert msgspec.to_builtins(result) == shown["result"], kind
        seen.add(kind)
    assert seen == set(p.REQUEST_TYPES)
    assert errors


def test_event_examples_decode_with_exactly_the_fields_the_server_sends():
    seen = set()
    for words, body in blocks("json"):
        if words[0] != "event":
            continue
        event = p.decode_event(body.encode())
        assert json.loads(p.encode(event)) == json.loads(body)
        assert event.seq >= 1
        seen.add(type(event))
    assert seen == set(EVENT_TYPES.values())


def test_every_error_code_and_limit_in_the_doc_is_the_codes():
    text = DOC.read_text(encoding="utf-8")
    table = {match for match in re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE)
             if not match.startswith("mixmalmm_")}  # the metrics table's rows are metric names
    assert table == {code.value for code in p.ErrorCode}
    defaults = {name: param.default for name, param in inspect.signature(Server).parameters.items()}
    for value in (p.MAX_MESSAGE_BYTES, p.MAX_QUESTION_CHARS, p.MAX_ID_CHARS, p.MAX_URI_CHARS, p.NAME_PATTERN,
                  p.PROTOCOL_VERSION, defaults["max_in_flight"], defaults["reply_hwm"], defaults["event_hwm"]):
        assert str(value) in text, value
    assert f"up to {defaults['replay_s']:g} s after" in text
    assert "1024 replies" in text  # Server keeps this many for replaying retries
    assert "1 MiB" in text and p.MAX_MESSAGE_BYTES == 1 << 20


def test_the_stream_states_in_the_doc_are_the_protocols():
    text = DOC.read_text(encoding="utf-8")
    paragraph = text.split("\nStream states: ", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"`([a-z]+)` \(", paragraph) == list(typing.get_args(p.StreamState))


def test_the_certificate_example_loads(tmp_path):
    [(_, body)] = blocks("text")
    path = tmp_path / "example.key_secret"
    path.write_text(body)
    public, secret = p.load_keypair(str(path))
    assert secret is not None and zmq.curve_public(secret) == public  # a real, matching pair


class OneStream:
    """A real handler with one stream, enough for the doc's client."""

    def handle(self, request, arrived):
        assert isinstance(request, p.Status)
        return p.StatusResult(engine=p.EngineStatus(), streams=[
            p.StreamStatus(stream="cam1", uri="rtsp://127.0.0.1:8554/cam", state="live", memory_entries=7)])


def test_the_raw_pyzmq_client_runs_against_a_real_server():
    [(_, code)] = blocks("python")
    with Server(OneStream(), request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*") as server:
        code = code.replace("tcp://127.0.0.1:5555", server.request_address)
        code = code.replace("tcp://127.0.0.1:5556", server.event_address)
        script = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        lines, got_event = [], threading.Event()

        def read():
            for line in script.stdout:
                lines.append(line.rstrip("\n"))
                if " stream_state" in line:
                    got_event.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 20
            # The script's SUB joins after it starts: publish until it has printed an event, then stop so
            # that its one-second wait for more ends.
            while not got_event.is_set() and script.poll() is None and time.monotonic() < deadline:
                server.publish(p.StreamStateEvent(stream="cam1", state="live", previous="connecting"))
                time.sleep(0.05)
            script.wait(timeout=20)
        finally:
            if script.poll() is None:
                script.kill()
                script.wait()
        reader.join(5)
    assert script.returncode == 0, script.stderr.read()
    assert lines[0] == "cam1 live 7 memory entries"
    assert got_event.is_set()
    topic, seq, kind = lines[1].split()
    assert (topic, kind) == ("cam1", "stream_state") and int(seq) >= 1

