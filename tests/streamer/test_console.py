"""The console's HTTP/JSON layer over real sockets: the engine (tiny model) behind the ZeroMQ server and
the console, a generated video file, plain HTTP requests (urllib) and a server-sent events reader."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import msgspec
import numpy as np
import pytest

from mixmalmm.clients import Subscriber
from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM
from mixmalmm.streamer.console import Console, parse_http_address
from mixmalmm.streamer.engine import Engine
from mixmalmm.streamer.server import InsecureBindError

from .conftest import console_engine, wait_for

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)


@pytest.fixture(scope="module")
def model():
    return MALMM.tiny().eval()


@pytest.fixture
def served(model):
    with console_engine(model) as s:
        yield s


def post(console, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(console.url + "api/request", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(console, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(console.url + path, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_requests_answer_as_over_zeromq(served, media):
    engine, client, console = served
    client.add_stream("file", str(media.h264), actionshot=EVERY_FRAME)
    wait_for(lambda: client.status("file").streams[0].state == "finished", 60, "the file finished")
    over_zmq = client.ask("file", "what colour is the square?", max_new_tokens=5)
    status, reply = post(console, b'{"id": 7, "type": "ask", "stream": "file", '
                                  b'"question": "what colour is the square?", "max_new_tokens": 5}')
    assert status == 200 and reply["id"] == 7 and reply["ok"] is True
    result = msgspec.convert(reply["result"], P.AskResult)
    assert (result.answer, result.span_start_s, result.span_end_s) == (
        over_zmq.answer, over_zmq.span_start_s, over_zmq.span_end_s)
    status, reply = post(console, b'{"id": "s", "type": "status"}')
    assert status == 200 and [s["stream"] for s in reply["result"]["streams"]] == ["file"]
    assert reply["result"]["streams"][0]["shots"] == client.status("file").streams[0].shots

    status, kind, jpeg = get(console, "api/streams/file/shot.jpg")
    assert status == 200 and kind == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    import cv2

    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    shot = engine._get("file").latest_shot.image
    assert image.shape == shot.shape
    assert np.abs(image[:, :, ::-1].astype(int) - shot).mean() < 8  # the same picture, JPEG-compressed

    # the memory contact sheet: the thumbnails the stream keeps, evenly over every Shot in memory
    status, kind, jpeg = get(console, "api/streams/file/memory.jpg")
    assert status == 200 and kind == "image/jpeg"
    sheet = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    items = engine._get("file").thumbnails.items()
    shots = client.status("file").streams[0].shots
    assert 2 <= len(items) <= 12 and items[0][0].index == 0 and items[-1][0].index <= shots - 1
    assert [r.index for r, _ in items] == sorted({r.index for r, _ in items})  # in order, once each
    rows = -(-len(items) // 4)
    assert sheet.shape[0] > rows * items[0][1].shape[0] and sheet.shape[1] >= 4 * items[0][1].shape[1]
    assert sheet.std() > 10

    status, kind, page = get(console, "")
    assert status == 200 and kind.startswith("text/html") and b"/api/events" in page


def test_bad_requests_get_clear_errors(model):
    with console_engine(model, limits=P.Limits(max_message_bytes=2048)) as (_engine, _client, console):
        status, reply = post(console, b'{"id": 1, "type": "ask", "stream": ')
        assert status == 400 and reply["ok"] is False and reply["error"]["code"] == "bad_request"
        assert "JSON" in reply["error"]["message"]
        status, reply = post(console, b'{"id": 2, "type": "fly"}')
        assert status == 400 and reply["error"]["code"] == "unknown_type" and reply["id"] == 2
        status, reply = post(console, b'{"id": 3, "type": "ask", "stream": "nope", "question": "hi?"}')
        assert status == 404 and reply["error"]["code"] == "unknown_stream" and "nope" in reply["error"]["message"]
        status, reply = post(console, json.dumps({"id": 4, "type": "status", "stream": "x" * 4000}).encode())
        assert status == 413 and reply["error"]["code"] == "too_large" and "2048" in reply["error"]["message"]
        host, port = parse_http_address(console.url[len("http://"):].rstrip("/"))
        with socket.create_connection((host, port), timeout=10) as sock:  # a length that is no byte count
            sock.sendall(b"POST /api/request HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{}")
            assert sock.recv(65536).startswith(b"HTTP/1.1 411 ")
        for picture in ("shot.jpg", "memory.jpg"):
            status, _kind, body = get(console, f"api/streams/nope/{picture}")
            assert status == 404 and b"nope" in body
        status, _kind, body = get(console, "api/nothing")
        assert status == 404 and b"/api/nothing" in body
        # the console still serves after all that
        status, reply = post(console, b'{"id": 5, "type": "ping"}')
        assert status == 200 and reply["ok"] is True


def test_requests_another_site_could_make_are_refused(model):
    with console_engine(model) as (_engine, _client, console):
        ping = b'{"id": 1, "type": "ping"}'
        # a cross-site form or text/plain fetch: browsers send these without a preflight
        status, reply = post(console, ping, {"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in reply["error"]["message"]
        status, reply = post(console, ping, {"Origin": "http://evil.example"})
        assert status == 403 and "evil.example" in reply["error"]["message"]
        # DNS rebinding: a foreign name that resolves to 127.0.0.1
        status, reply = post(console, ping, {"Host": "evil.example:8080"})
        assert status == 403 and "evil.example" in reply["error"]["message"]
        host, port = parse_http_address(console.url[len("http://"):].rstrip("/"))
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /api/streams/x/shot.jpg HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 403 ")
        # the console's own page: its origin, and localhost, are answered
        status, reply = post(console, ping, {"Origin": console.url.rstrip("/")})
        assert status == 200 and reply["ok"] is True
        status, reply = post(console, ping, {"Host": f"localhost:{port}"})
        assert status == 200 and reply["ok"] is True


def read_events(console, count: int, seen: list, connected: threading.Event) -> None:
    host, port = parse_http_address(console.url[len("http://"):].rstrip("/"))
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while len(seen) < count:
            chunk = sock.recv(65536)
            if not chunk:
                return
            data += chunk
            if b": connected" in data:
                connected.set()
            while b"\n\n" in data:
                block, data = data.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        seen.append(json.loads(line[6:]))


def test_server_sent_events_deliver_state_changes_and_answers(served, media):
    engine, client, console = served
    seen: list = []
    connected = threading.Event()
    reader = threading.Thread(target=read_events, args=(console, 6, seen, connected), daemon=True)
    reader.start()
    assert connected.wait(10)
    wait_for(lambda: console.clients == 1, 5, "the SSE client registered")
    server = engine._publish.__self__.sinks[0]  # the EventFanout's first sink: the ZeroMQ server
    with Subscriber(server.event_address, ["cam"]) as sub:
        time.sleep(0.3)  # the SUB socket joins
        client.add_stream("cam", str(media.h264), pace="realtime", actionshot=EVERY_FRAME)
        client.add_question("cam", "what", "what is happening?", period_s=0.3)
        wait_for(lambda: any(e["type"] == "answer" for e in seen), 60, "an answer event")
        wait_for(lambda: len(seen) >= 6, 30, "six events over SSE")
        over_pub = [sub.recv(10) for _ in range(6)]
    # the same events with the same numbers on the PUB socket as over SSE
    assert [e.seq for e in over_pub] == [e["seq"] for e in seen[:6]]
    assert [P.encode(e) for e in over_pub] == [P.encode(P.decode_event(json.dumps(e).encode())) for e in seen[:6]]
    assert (seen[0]["type"], seen[0]["state"], seen[0]["previous"]) == ("stream_state", "connecting", None)
    answer = next(e for e in seen if e["type"] == "answer")
    assert answer["stream"] == "cam" and answer["question_id"] == "what" and answer["question"] == "what is happening?"
    assert answer["span_start_s"] == 0.0 and answer["span_end_s"] > 0
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(seen) + 1))  # per-stream sequence numbers, all of stream cam


def test_non_loopback_needs_insecure(model):
    engine = Engine(model)
    with pytest.raises(InsecureBindError, match="0.0.0.0.*--insecure"):
        Console(engine, address="0.0.0.0:0")
    Console(engine, address="0.0.0.0:0", insecure=True)  # allowed (not started)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_http_address("8080")


class GatedHandler:
    """A Handler (the server's protocol) whose list_streams waits for `gate`: requests stay in flight."""

    def __init__(self):
        self.gate = threading.Event()
        self.entered = threading.Event()

    def handle(self, request, arrived):
        self.entered.set()
        assert self.gate.wait(30)
        return P.ListStreamsResult(streams=[])


def test_the_console_bounds_requests_in_flight_and_event_streams():
    handler = GatedHandler()
    with Console(handler, address="127.0.0.1:0", max_in_flight=1, max_event_clients=1) as console:
        body = b'{"id": 1, "type": "list_streams"}'
        first: list = []
        t = threading.Thread(target=lambda: first.append(post(console, body)), daemon=True)
        t.start()
        assert handler.entered.wait(10)
        status, reply = post(console, body)  # the one slot is taken: refused at once, not queued
        assert status == 503 and reply["error"]["code"] == "busy" and "1 requests at once" in reply["error"]["message"]
        status, _kind, _ = get(console, "api/streams/x/shot.jpg")
        assert status == 503
        handler.gate.set()
        t.join(10)
        assert first[0] == (200, {"id": 1, "ok": True, "result": {"streams": []}})
        assert post(console, body)[0] == 200  # the slot is free again

        seen: list = []
        connected = threading.Event()
        threading.Thread(target=read_events, args=(console, 1, seen, connected), daemon=True).start()
        assert connected.wait(10)
        status, _kind, text = get(console, "api/events")  # a second event stream: over the limit of 1
        assert status == 503 and b"event streams" in text
