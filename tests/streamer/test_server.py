"""The ZeroMQ server over real sockets on 127.0.0.1, with a small in-process handler standing in for the
engine: round trips, malformed and oversized input, load, vanished clients, events, CURVE, bind rules."""

import json
import os
import threading
import time

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixmalmm.clients import Client, ClientCurve, EngineError, EngineTimeout, Subscriber
from mixmalmm.clients import protocol as p
from mixmalmm.streamer.server import (
    CurveKeys,
    InsecureBindError,
    Server,
    ServerError,
    check_bind_security,
    is_local_endpoint,
)

ANY_PORT = "tcp://127.0.0.1:*"


class EchoEngine:
    """A real, tiny handler: answers ``ask`` with the question reversed after ``delay_s`` seconds (or
    once ``gate`` is set), keeps streams in a dict, and records what it was asked."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.streams: dict[str, p.StreamInfo] = {}
        self.seen: list[p.Request] = []
        self.lock = threading.Lock()

    def handle(self, request, arrived):
        with self.lock:
            self.seen.append(request)
        if isinstance(request, p.Ask):
            if self.gate is not None:
                self.gate.wait(10)
            time.sleep(self.delay_s)
            if request.stream == "boom":
                raise RuntimeError("the model fell over")
            if request.stream == "wrong":
                return p.StatusResult(engine=p.EngineStatus())
            return p.AskResult(stream=request.stream, question=request.question, answer=request.question[::-1])
        if isinstance(request, p.Status):
            return p.StatusResult(engine=p.EngineStatus(model="echo", requests_in_flight=0))
        if isinstance(request, p.AddStream):
            with self.lock:
                if request.stream in self.streams:
                    raise p.RequestError(p.ErrorCode.ALREADY_EXISTS, f"stream {request.stream!r} exists")
                info = p.StreamInfo(stream=request.stream, uri=request.uri, state="connecting", mode="live")
                self.streams[request.stream] = info
                return info
        if isinstance(request, p.RemoveStream):
            with self.lock:
                if request.stream not in self.streams:
                    raise p.RequestError(p.ErrorCode.UNKNOWN_STREAM, f"no stream {request.stream!r}")
                return self.streams.pop(request.stream)
        if isinstance(request, p.ListStreams):
            return p.ListStreamsResult(streams=list(self.streams.values()))
        raise p.RequestError(p.ErrorCode.UNAVAILABLE, f"{type(request).__name__} is not served by the echo engine")


@pytest.fixture
def serve():
    """Start servers on free loopback ports; all are stopped at the end of the test."""
    servers = []

    def start(handler=None, **options):
        options.setdefault("request_endpoint", ANY_PORT)
        options.setdefault("event_endpoint", ANY_PORT)
        server = Server(handler or EchoEngine(), **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def zctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _dealer(context, address, routing_id: bytes | None = None):
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(address)
    return sock


def _exchange(sock, frames, timeout_s=3.0):
    """Send raw frames, return the reply's frames (or None after timeout_s seconds)."""
    sock.send_multipart(frames)
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return sock.recv_multipart()


def _wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _reply(sock, body: bytes, timeout_s=3.0):
    frames = _exchange(sock, [b"", body], timeout_s)
    assert frames is not None, f"no reply to {body[:60]!r}"
    assert frames[0] == b"" and len(frames) == 2
    return json.loads(frames[1])


# ---------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------


def test_ping_round_trip_from_req_and_dealer_sockets(serve, zctx):
    server = serve()
    req = zctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(server.request_address)
    req.send(b'{"type": "ping", "id": "req-1"}')
    assert req.poll(3000)
    reply = json.loads(req.recv())
    assert reply["id"] == "req-1" and reply["ok"] is True
    assert reply["result"]["server"] == "mixmalmm" and abs(reply["result"]["time_s"] - time.time()) < 5
    # A DEALER may send the body alone (no delimiter frame): the reply comes back the same way.
    dealer = _dealer(zctx, server.request_address)
    frames = _exchange(dealer, [b'{"type": "ping", "id": 42}'])
    assert len(frames) == 1 and json.loads(frames[0])["id"] == 42


def test_replies_carry_the_request_ids(serve, zctx):
    server = serve(EchoEngine(delay_s=0.05))
    dealer = _dealer(zctx, server.request_address)
    ids = [f"q{i}" for i in range(8)] + [7, 8]
    for request_id in ids:  # all sent before any reply is read
        body = {"type": "ask", "id": request_id, "stream": "s", "question": f"question {request_id}"}
        dealer.send_multipart([b"", json.dumps(body).encode()])
    answers = {}
    for _ in ids:
        assert dealer.poll(5000)
        reply = json.loads(dealer.recv_multipart()[1])
        answers[reply["id"]] = reply["result"]["answer"]
    assert answers == {request_id: f"question {request_id}"[::-1] for request_id in ids}


def test_client_methods_reach_the_handler_and_errors_come_back_typed(serve):
    engine = EchoEngine()
    server = serve(engine)
    with Client(server.request_address, timeout_s=3.0, retries=0) as client:
        info = client.add_stream("cam1", "rtsp://127.0.0.1:8554/cam", mode="live",
                                 actionshot=p.ActionShotSettings(step=3))
        assert info == p.StreamInfo(stream="cam1", uri="rtsp://127.0.0.1:8554/cam", state="connecting", mode="live")
        assert engine.seen[-1].actionshot.step == 3
        with pytest.raises(EngineError) as info:
            client.add_stream("cam1", "/x.mp4")
        assert info.value.code is p.ErrorCode.ALREADY_EXISTS and "'cam1' exists" in info.value.message
        assert [s.stream for s in client.list_streams().streams] == ["cam1"]
        assert client.remove_stream("cam1").stream == "cam1"
        with pytest.raises(EngineError) as info:
            client.remove_stream("cam1")
        assert info.value.code is p.ErrorCode.UNKNOWN_STREAM
        assert client.ask("cam1", "abc", max_new_tokens=5, num_beams=2).answer == "cba"
        assert (engine.seen[-1].max_new_tokens, engine.seen[-1].num_beams) == (5, 2)


def test_handler_failures_become_internal_errors_and_the_server_goes_on(serve):
    server = serve()
    with Client(server.request_address, timeout_s=3.0, retries=0) as client:
        with pytest.raises(EngineError) as info:
            client.ask("boom", "q")
        assert info.value.code is p.ErrorCode.INTERNAL and "RuntimeError: the model fell over" in info.value.message
        with pytest.raises(EngineError) as info:
            client.ask("wrong", "q")
        assert info.value.code is p.ErrorCode.INTERNAL
        assert "returned StatusResult for 'ask', expected AskResult" in info.value.message
        assert client.ask("fine", "q").answer == "q"
    assert server.stats()["error_replies"] == 2


# ---------------------------------------------------------------------------------------------------
# Malformed input
# ---------------------------------------------------------------------------------------------------

MALFORMED = [
    (b"\x8f\x00\xffrandom", "bad_request", None),
    (b'{"type": "ping", "id": "x"', "bad_request", None),
    (b'{"type": "ask", "id": "x", "stream": "s", "question": 12}', "bad_request", "x"),
    (b'{"type": "ask", "id": "x", "stream": ["s"], "question": "q"}', "bad_request", "x"),
    (b'{"type": "teleport", "id": "x"}', "unknown_type", "x"),
    (b'{"type": "ask", "id": "x", "stream": "s", "question": "' + b"why " * 300 + b'"}', "too_large", "x"),
]


@pytest.mark.parametrize(("body", "code", "request_id"), MALFORMED)
def test_malformed_requests_get_error_replies_and_the_server_keeps_answering(serve, zctx, body, code, request_id):
    server = serve()
    dealer = _dealer(zctx, server.request_address)
    reply = _reply(dealer, body)
    assert reply["ok"] is False and reply["error"]["code"] == code and reply["id"] == request_id
    assert reply["error"]["message"]
    assert _reply(dealer, b'{"type": "ping", "id": "after"}')["ok"] is True


def test_unexpected_frame_layouts_get_error_replies(serve, zctx):
    server = serve()
    dealer = _dealer(zctx, server.request_address)
    frames = _exchange(dealer, [b"", b"{}", b"{}"])
    assert frames[0] == b"" and json.loads(frames[1])["error"]["code"] == "bad_request"
    assert "3 frames" in json.loads(frames[1])["error"]["message"]
    frames = _exchange(dealer, [b"a", b"b"])
    assert json.loads(frames[0])["error"]["code"] == "bad_request"
    assert _reply(dealer, b'{"type": "ping", "id": 1}')["ok"] is True


@pytest.fixture(scope="module")
def shared_server():
    server = Server(EchoEngine(), request_endpoint=ANY_PORT, event_endpoint=None,
                    limits=p.Limits(max_message_bytes=4096, max_question_chars=100)).start()
    context = zmq.Context()
    dealer = _dealer(context, server.request_address)
    yield server, dealer
    context.destroy(linger=0)
    server.stop()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda kind, fields: json.dumps({"type": kind, "id": "h", **fields}).encode(),
              st.sampled_from(sorted(p.REQUEST_TYPES) + ["nope", ""]),
              st.dictionaries(st.sampled_from(["stream", "question", "uri", "question_id", "text", "num_beams",
                                               "period_s", "mode", "x"]),
                              st.none() | st.integers() | st.text(max_size=150) | st.lists(st.integers(), max_size=2),
                              max_size=4)),
))
def test_fuzzed_requests_always_get_a_reply_and_never_stop_the_server(shared_server, body):
    server, dealer = shared_server
    reply = _reply(dealer, body)
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["error"]["code"] in {code.value for code in p.ErrorCode}
    assert server.running


def test_oversized_message_drops_the_connection_and_the_client_survives(serve, zctx):
    server = serve(limits=p.Limits(max_message_bytes=4096))
    with Client(server.request_address, timeout_s=0.5, retries=1) as client:
        assert client.ping().server == "mixmalmm"
        started = time.monotonic()
        with pytest.raises(EngineTimeout, match="after 2 attempts"):
            client.ask("s", "x" * 10_000)  # ZeroMQ disconnects a peer whose message exceeds MAXMSGSIZE
        assert time.monotonic() - started < 3
        assert client.reconnects == 1
        assert client.ping().server == "mixmalmm"  # the same client object goes on, on a fresh socket
        assert client.ask("s", "fine").answer == "enif"
    other = _dealer(zctx, server.request_address)
    assert _reply(other, b'{"type": "ping", "id": 1}')["ok"] is True
    # Under the socket limit but over the question limit: a typed error reply, not a dropped connection.
    reply = _reply(other, json.dumps({"type": "ask", "id": 2, "stream": "s", "question": "y" * 2000}).encode())
    assert reply["error"]["code"] == "too_large" and "limit is 1000" in reply["error"]["message"]


# ---------------------------------------------------------------------------------------------------
# Load, slow handlers, vanished clients
# ---------------------------------------------------------------------------------------------------


def test_twenty_concurrent_clients_all_answered(serve):
    server = serve(EchoEngine(delay_s=0.1), ask_workers=8)
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            with Client(server.request_address, timeout_s=10.0, retries=0) as client:
                out = []
                for k in range(3):
                    client.ping()
                    out.append(client.ask(f"s{n % 4}", f"client {n} question {k}").answer)
                    client.status()
                results[n] = out
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(20)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert all(not thread.is_alive() for thread in threads)
    assert results == {n: [f"client {n} question {k}"[::-1] for k in range(3)] for n in range(20)}
    # 60 asks of 0.1 s on 8 workers: about 0.75 s if they run in parallel, 6 s if serialised.
    assert time.monotonic() - started < 5
    assert server.stats()["in_flight"] == 0


def test_slow_asks_do_not_hold_up_ping_or_status(serve, zctx):
    gate = threading.Event()
    server = serve(EchoEngine(gate=gate), ask_workers=2, control_workers=1)
    askers = [_dealer(zctx, server.request_address) for _ in range(4)]
    for n, sock in enumerate(askers):  # more asks than ask workers, all stuck behind the gate
        sock.send_multipart([b"", json.dumps({"type": "ask", "id": n, "stream": "s", "question": "q"}).encode()])
    try:
        _wait_for(lambda: server.stats()["in_flight"] == 4)
        with Client(server.request_address, timeout_s=1.0, retries=0) as client:
            started = time.monotonic()
            client.ping()
            assert client.status().engine.model == "echo"
            assert time.monotonic() - started < 0.9  # the asks hold their workers until the gate opens
            assert server.stats()["in_flight"] == 4  # the asks are all still waiting
    finally:
        gate.set()
    for n, sock in enumerate(askers):
        assert sock.poll(5000)
        assert json.loads(sock.recv_multipart()[1])["id"] == n


def test_too_many_requests_in_flight_get_busy(serve, zctx):
    gate = threading.Event()
    server = serve(EchoEngine(gate=gate), max_in_flight=2)
    socks = [_dealer(zctx, server.request_address) for _ in range(3)]
    for n, sock in enumerate(socks[:2]):
        sock.send_multipart([b"", json.dumps({"type": "ask", "id": n, "stream": "s", "question": "q"}).encode()])
    try:
        _wait_for(lambda: server.stats()["in_flight"] == 2)
        reply = _reply(socks[2], b'{"type": "ask", "id": "third", "stream": "s", "question": "q"}')
        assert reply["id"] == "third" and reply["error"]["code"] == "busy"
        assert _reply(socks[2], b'{"type": "ping", "id": "p"}')["ok"] is True  # ping never queues
    finally:
        gate.set()
    for sock in socks[:2]:
        assert sock.poll(5000) and json.loads(sock.recv_multipart()[1])["ok"] is True


def test_retries_of_a_slow_request_are_handled_once(serve, zctx):
    engine = EchoEngine(delay_s=0.8)
    server = serve(engine)
    with Client(server.request_address, timeout_s=0.25, retries=5) as client:
        assert client.ask("s", "only once").answer == "ecno ylno"
        assert client.reconnects >= 2  # it did retry, on fresh sockets ...
    asks = [r for r in engine.seen if isinstance(r, p.Ask)]
    assert len(asks) == 1  # ... but the engine answered the question once
    stats = server.stats()
    assert stats["retries_joined"] >= 1
    assert stats["retries_joined"] + stats["retries_replayed"] == client.reconnects
    # The same request again from the same client (its routing id) after it was answered: the same
    # reply, without asking the engine again.
    body = p.encode(asks[0])
    reply = _reply(_dealer(zctx, server.request_address, client._routing_id), body)
    assert reply["result"]["answer"] == "ecno ylno" and reply["id"] == asks[0].id
    assert len([r for r in engine.seen if isinstance(r, p.Ask)]) == 1
    assert server.stats()["retries_replayed"] == stats["retries_replayed"] + 1
    # A new id is a new request.
    other = _reply(_dealer(zctx, server.request_address, client._routing_id),
                   body.replace(asks[0].id.encode(), b"fresh-id"))
    assert other["id"] == "fresh-id" and len([r for r in engine.seen if isinstance(r, p.Ask)]) == 2
    # Another client that happens to send the same body (a naive counter id) is not a retry: it gets
    # its own answer, never the first client's stale reply.
    again = _reply(_dealer(zctx, server.request_address, b"another-client"), body)
    assert again["id"] == asks[0].id and len([r for r in engine.seen if isinstance(r, p.Ask)]) == 3


def test_a_vanished_client_never_blocks_the_server(serve, zctx):
    server = serve(EchoEngine(delay_s=0.3))
    for n in range(5):
        gone = _dealer(zctx, server.request_address)
        gone.send_multipart([b"", json.dumps({"type": "ask", "id": n, "stream": "s", "question": "q"}).encode()])
        _wait_for(lambda n=n: server.stats()["requests"] == n + 1)
        gone.close(linger=0)  # gone before its reply is ready
    with Client(server.request_address, timeout_s=2.0, retries=0) as client:
        deadline = time.monotonic() + 5
        while server.stats()["replies_dropped"] < 5 and time.monotonic() < deadline:
            assert client.ping().server == "mixmalmm"
            time.sleep(0.05)
        assert server.stats()["replies_dropped"] == 5  # ROUTER_MANDATORY: EHOSTUNREACH, dropped, counted
        assert client.ask("s", "still here").answer == "ereh llits"


# ---------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------


def _join(server, subscriber):
    """Publish on a warm-up stream until the subscriber hears it (PUB drops messages to a subscriber
    whose connection is not up yet)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        server.publish(p.StreamStateEvent(stream="warmup", state="live"))
        if subscriber.recv(0.05) is not None:
            while subscriber.recv(0.05) is not None:
                pass
            return
    raise AssertionError("the subscriber never joined")


def test_events_carry_the_stream_topic_and_consecutive_sequence_numbers(serve, zctx):
    server = serve()
    with Subscriber(server.event_address) as subscriber:
        raw = zctx.socket(zmq.SUB)
        raw.setsockopt(zmq.SUBSCRIBE, b"cam")
        raw.connect(server.event_address)
        _join(server, subscriber)
        time.sleep(0.1)  # the raw subscriber joined at the same time; give it the same head start
        for k in range(10):
            server.publish(p.StreamStateEvent(stream="cam1", state="live"))
            server.publish(p.AnswerEvent(stream="cam2", question_id="q", question="Q?", answer=f"a{k}"))
        received = [subscriber.recv(2.0) for _ in range(20)]
        assert [e.seq for e in received if e.stream == "cam1"] == list(range(1, 11))
        assert [e.seq for e in received if e.stream == "cam2"] == list(range(1, 11))
        assert [e.answer for e in received if isinstance(e, p.AnswerEvent)] == [f"a{k}" for k in range(10)]
        assert list(subscriber.gaps) == []
        topics = []
        while raw.poll(1000) and len(topics) < 20:
            topic, body = raw.recv_multipart()
            topics.append((topic, json.loads(body)["stream"], json.loads(body)["seq"]))
        assert [t for t in topics if t[0] == b"cam1"] == [(b"cam1", "cam1", k) for k in range(1, 11)]
        raw.close(linger=0)


def test_publish_from_many_threads_keeps_sequence_numbers_unique_and_consecutive(serve):
    server = serve()
    with Subscriber(server.event_address, streams=["s"]) as subscriber:
        deadline = time.monotonic() + 5
        last = None
        while last is None:  # join on stream "s" itself, then count on from the last seq seen
            assert time.monotonic() < deadline
            server.publish(p.StreamStateEvent(stream="s", state="connecting"))
            last = subscriber.recv(0.05)
        while (event := subscriber.recv(0.1)) is not None:
            last = event
        first = last.seq + 1

        def burst():
            for _ in range(50):
                assert server.publish(p.StreamStateEvent(stream="s", state="live"))

        threads = [threading.Thread(target=burst) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seqs = [subscriber.recv(2.0).seq for _ in range(200)]
        assert seqs == list(range(first, first + 200))
        assert list(subscriber.gaps) == []


def test_publish_is_refused_when_not_running():
    server = Server(EchoEngine(), request_endpoint=ANY_PORT, event_endpoint=ANY_PORT)
    assert server.publish(p.StreamStateEvent(stream="s", state="live")) is False
    server.start()
    server.stop()
    assert server.publish(p.StreamStateEvent(stream="s", state="live")) is False


# ---------------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------------


def test_curve_only_admits_allowed_client_keys(serve, tmp_path):
    server_secret = p.create_keypair(str(tmp_path / "server"), "server")[1]
    allowed_dir = tmp_path / "allowed"
    alice_public, alice_secret = p.create_keypair(str(tmp_path / "alice"), "alice")
    allowed_dir.mkdir()
    os.replace(alice_public, allowed_dir / "alice.key")
    mallory_secret = p.create_keypair(str(tmp_path / "mallory"), "mallory")[1]

    server = serve(curve=CurveKeys.from_files(server_secret, str(allowed_dir)))
    server_public_file = str(tmp_path / "server" / "server.key")
    alice = ClientCurve.from_files(server_public_file, alice_secret)
    with Client(server.request_address, timeout_s=2.0, retries=0, curve=alice) as client:
        assert client.ping().server == "mixmalmm"
        assert client.ask("s", "secret").answer == "terces"
    mallory = ClientCurve.from_files(server_public_file, mallory_secret)
    for curve in (mallory, ClientCurve.from_files(server_public_file), None):  # wrong key, throwaway key, none
        with Client(server.request_address, timeout_s=0.3, retries=1, curve=curve) as client, \
                pytest.raises(EngineTimeout):
            client.ping()
    with Subscriber(server.event_address, curve=alice) as subscriber:
        _join(server, subscriber)
        server.publish(p.StreamStateEvent(stream="cam", state="failed", message="gone"))
        event = subscriber.recv(2.0)
        assert (event.stream, event.state, event.message) == ("cam", "failed", "gone")


def test_curve_without_an_allow_list_admits_any_curve_client(serve, tmp_path):
    server_secret = p.create_keypair(str(tmp_path), "server")[1]
    server = serve(curve=CurveKeys.from_files(server_secret, None))
    with Client(server.request_address, timeout_s=2.0, retries=0,
                curve=ClientCurve.from_files(str(tmp_path / "server.key"))) as client:
        assert client.ping().server == "mixmalmm"
    with Client(server.request_address, timeout_s=0.3, retries=0) as plain, pytest.raises(EngineTimeout):
        plain.ping()


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.1:*", True), ("tcp://127.3.2.1:9", True),
        ("tcp://[::1]:5555", True), ("tcp://localhost:5555", True), ("ipc:///tmp/mixmalmm.sock", True),
        ("inproc://engine", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
        ("tcp://eth0:5555", False), ("tcp://10.1.2.3:5555", False), ("tcp://[::]:5555", False),
        ("tcp://engine.example.com:5555", False), ("ws://127.0.0.1:5555", False),
    ],
)
def test_which_endpoints_count_as_local(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_non_loopback_bind_needs_curve_or_insecure_and_is_refused_before_binding(tmp_path):
    with pytest.raises(InsecureBindError, match=r"refusing to bind 'tcp://0.0.0.0:5555'.*CURVE.*insecure=True"):
        Server(EchoEngine(), request_endpoint="tcp://0.0.0.0:5555")
    with pytest.raises(InsecureBindError, match=r"'tcp://\*:5556'"):
        Server(EchoEngine(), request_endpoint=ANY_PORT, event_endpoint="tcp://*:5556")
    # Accepted (but not started: tests bind loopback only) with either form of consent.
    Server(EchoEngine(), request_endpoint="tcp://0.0.0.0:5555", event_endpoint="tcp://0.0.0.0:5556", insecure=True)
    public, secret = zmq.curve_keypair()
    check_bind_security("tcp://10.0.0.1:5555", CurveKeys(public, secret), insecure=False)
    with pytest.raises(ServerError, match="not a ZeroMQ endpoint"):
        Server(EchoEngine(), request_endpoint="127.0.0.1:5555")
    with pytest.raises(ValueError, match="40-byte Z85"):
        CurveKeys(b"short", secret)
    with pytest.raises(ValueError, match="not a directory"):
        CurveKeys(public, secret, str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------
# Life cycle
# ---------------------------------------------------------------------------------------------------


def test_a_taken_port_gives_a_clear_error(serve):
    first = serve()
    with pytest.raises(ServerError, match=r"cannot bind 'tcp://127\.0\.0\.1:\d+'.*[Aa]ddress already in use"):
        Server(EchoEngine(), request_endpoint=first.request_address, event_endpoint=ANY_PORT).start()


def test_stop_is_orderly_and_frees_the_ports():
    server = Server(EchoEngine(delay_s=0.5), request_endpoint=ANY_PORT, event_endpoint=ANY_PORT).start()
    address, events = server.request_address, server.event_address
    context = zmq.Context()
    try:
        pending = _dealer(context, address)
        pending.send_multipart([b"", b'{"type": "ask", "id": 1, "stream": "s", "question": "q"}'])
        time.sleep(0.05)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2  # does not wait for the slow ask
        assert not server.running and not server._thread.is_alive()
        server.stop()  # twice is fine
        with Client(address, timeout_s=0.2, retries=0) as client, pytest.raises(EngineTimeout):
            client.ping()
        again = Server(EchoEngine(), request_endpoint=address, event_endpoint=events).start()
        try:
            with Client(address, timeout_s=2.0, retries=0) as client:
                assert client.ping().server == "mixmalmm"
        finally:
            again.stop()
    finally:
        context.destroy(linger=0)

