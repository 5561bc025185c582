"""The Python clients over real loopback sockets: every method against the real server, the Lazy Pirate
retry (against a real ROUTER peer that ignores the first attempt), stale and broken replies, the asyncio
client, and the subscriber's gap detection (events from a real PUB socket with a seq number skipped)."""

import asyncio
import json
import threading
import time

import pytest
import zmq

from mixmalmm.clients import (
    AsyncClient,
    Client,
    ClientClosed,
    ClientCurve,
    EngineError,
    EngineTimeout,
    Gap,
    ProtocolError,
    Subscriber,
)
from mixmalmm.clients import protocol as p

from .store_engine import StoreEngine

ANY_PORT = "tcp://127.0.0.1:*"


class Peer:
    """A real ROUTER on a free loopback port, driven by a function (frames -> list of replies to send)."""

    def __init__(self, respond):
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the engine server: a reconnected client keeps its id
        self.sock.bind(ANY_PORT)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.respond = respond
        self.received = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, *frames = self.sock.recv_multipart()
            self.received.append(frames)
            for reply in self.respond(len(self.received), json.loads(frames[-1])):
                self.sock.send_multipart([identity, *reply])

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close(linger=0)
        self.context.term()


def _ok(request_id):
    return [b"", p.ok_reply(request_id, p.PingResult(time_s=1.0, uptime_s=2.0))]


# ---------------------------------------------------------------------------------------------------
# Blocking client
# ---------------------------------------------------------------------------------------------------


def test_every_method_against_the_server(server, engine):
    with Client(server.request_address, timeout_s=3.0, retries=0) as client:
        assert client.ping().protocol == p.PROTOCOL_VERSION
        assert client.add_stream("cam1", "rtsp://127.0.0.1:8554/x", mode="replay", pace="fast").mode == "replay"
        assert client.add_question("cam1", "door", "is the door open?", period_s=5.0) == p.StandingQuestion(
            stream="cam1", question_id="door", text="is the door open?", period_s=5.0)
        standing = client.ask("cam1", "is the door open?")
        assert (standing.standing, standing.question_id, standing.span_end_s) == (True, "door", 75.25)
        adhoc = client.ask("cam1", "what colour?", num_beams=3)
        assert (adhoc.standing, adhoc.answer) == (False, StoreEngine.answer("what colour?"))
        assert [(a.question, a.num_beams) for a in engine.asks()] == [("is the door open?", None), ("what colour?", 3)]
        assert [q.question_id for q in client.list_streams().streams[0].questions] == ["door"]
        assert client.status("cam1").streams[0].uri == "rtsp://127.0.0.1:8554/x"
        assert client.status().engine.model == "store"
        assert [s.path for s in client.save_snapshot().saved] == ["/state/cam1.snap"]
        assert client.remove_question("cam1", "door").question_id == "door"
        with pytest.raises(EngineError) as info:
            client.remove_question("cam1", "door")
        assert info.value.code is p.ErrorCode.UNKNOWN_QUESTION and info.value.message == "no question 'door' on 'cam1'"
        assert client.remove_stream("cam1").stream == "cam1"
        with pytest.raises(EngineError) as info:
            client.ask("cam1", "anyone?")
        assert info.value.code is p.ErrorCode.UNKNOWN_STREAM and str(info.value) == "unknown_stream: no stream 'cam1'"
        # Bad arguments are refused by the server with bad_request, named.
        with pytest.raises(EngineError) as info:
            client.add_stream("has space", "/x.mp4")
        assert info.value.code is p.ErrorCode.BAD_REQUEST and "$.stream" in info.value.message
        assert client.reconnects == 0


def test_lazy_pirate_retries_on_a_fresh_socket_and_keeps_the_request_id():
    peer = Peer(lambda n, body: [] if n == 1 else [_ok(body["id"])])  # ignores the first attempt
    try:
        with Client(peer.address, timeout_s=0.3, retries=2) as client:
            assert client.ping().uptime_s == 2.0
            assert client.reconnects == 1
        first, second = (json.loads(frames[-1]) for frames in peer.received)
        assert first == second and first["type"] == "ping"
    finally:
        peer.close()


def test_timeout_after_all_retries_names_the_endpoint():
    peer = Peer(lambda n, body: [])  # a server that never answers
    try:
        with Client(peer.address, timeout_s=0.2, retries=2) as client:
            started = time.monotonic()
            with pytest.raises(EngineTimeout, match=rf"no reply from {peer.address} to 'ping'.*after 3 attempts"):
                client.ping()
            assert 0.55 < time.monotonic() - started < 2.0
            assert client.reconnects == 2 and len(peer.received) == 3
    finally:
        peer.close()


def test_stale_replies_are_skipped_and_broken_replies_raise_protocol_error():
    peer = Peer(lambda n, body: [_ok("someone else"), _ok(body["id"])] if n == 1 else [[b"", b"<html>"]])
    try:
        with Client(peer.address, timeout_s=1.0, retries=0) as client:
            assert client.ping().time_s == 1.0
            with pytest.raises(ProtocolError, match="undecodable reply"):
                client.ping()
    finally:
        peer.close()


def test_a_reply_of_the_wrong_shape_raises_protocol_error():
    peer = Peer(lambda n, body: [[b"", json.dumps({"id": body["id"], "ok": True, "result": {"answer": 1}}).encode()]])
    try:
        with Client(peer.address, timeout_s=1.0, retries=0) as client, \
                pytest.raises(ProtocolError, match="is not a AskResult"):
            client.ask("s", "q")
    finally:
        peer.close()


def test_closed_client_and_bad_settings_are_refused(server):
    client = Client(server.request_address)
    client.close()
    with pytest.raises(ClientClosed):
        client.ping()
    with pytest.raises(ValueError, match="timeout_s"):
        Client(server.request_address, timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        Client(server.request_address, retries=-1)
    with pytest.raises(ValueError, match="both public_key and secret_key"):
        ClientCurve(b"x" * 40, public_key=b"y" * 40)


def test_one_client_shared_by_threads(server, engine):
    with Client(server.request_address, timeout_s=3.0, retries=0) as client:
        client.add_stream("s", "/v.mp4")
        answers = []

        def worker(k):
            for j in range(10):
                answers.append(client.ask("s", f"q{k}.{j}").answer)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        questions = [f"q{k}.{j}" for k in range(4) for j in range(10)]
        assert sorted(answers) == sorted(StoreEngine.answer(q) for q in questions)
        assert sorted((a.question, a.num_beams) for a in engine.asks()) == sorted((q, None) for q in questions)


# ---------------------------------------------------------------------------------------------------
# asyncio client
# ---------------------------------------------------------------------------------------------------


def test_async_client_has_the_same_methods(server, engine):
    async def main():
        async with AsyncClient(server.request_address, timeout_s=3.0, retries=0) as client:
            assert (await client.ping()).server == "mixmalmm"
            await client.add_stream("a", "/a.mp4", mode="replay")
            await client.add_question("a", "q1", "what happens?")
            answers = await asyncio.gather(*(client.ask("a", f"n{k}") for k in range(5)))
            assert [a.answer for a in answers] == [StoreEngine.answer(f"n{k}") for k in range(5)]
            assert sorted((a.question, a.num_beams) for a in engine.asks()) == [(f"n{k}", None) for k in range(5)]
            assert (await client.ask("a", "what happens?")).question_id == "q1"
            assert (await client.status()).streams[0].stream == "a"
            assert [s.stream for s in (await client.list_streams()).streams] == ["a"]
            assert (await client.save_snapshot("a")).saved[0].stream == "a"
            assert (await client.remove_question("a", "q1")).text == "what happens?"
            assert (await client.remove_stream("a")).uri == "/a.mp4"
            with pytest.raises(EngineError) as info:
                await client.remove_stream("a")
            assert info.value.code is p.ErrorCode.UNKNOWN_STREAM

    asyncio.run(main())


def test_async_client_retries_then_times_out():
    peer = Peer(lambda n, body: [_ok(body["id"])] if n == 2 else [])  # answers only the second attempt

    async def main():
        async with AsyncClient(peer.address, timeout_s=0.3, retries=1) as client:
            assert (await client.ping()).uptime_s == 2.0
            assert client.reconnects == 1
            with pytest.raises(EngineTimeout, match="after 2 attempts"):
                await client.ping()

    try:
        asyncio.run(main())
    finally:
        peer.close()


# ---------------------------------------------------------------------------------------------------
# Subscriber
# ---------------------------------------------------------------------------------------------------


class Publisher:
    """A real PUB socket sending hand-made events, so sequence numbers can be skipped on purpose."""

    def __init__(self):
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ANY_PORT)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, stream, seq, topic=None, body=None):
        event = p.StreamStateEvent(stream=stream, seq=seq, state="live")
        self.sock.send_multipart([(topic or stream).encode(), body or p.encode(event)])

    def join(self, subscriber, stream):
        deadline = time.monotonic() + 5
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            self.send(stream, seq)
            if subscriber.recv(0.05) is not None:
                while subscriber.recv(0.05) is not None:
                    pass
                return
        raise AssertionError("the subscriber never joined")

    def close(self):
        self.sock.close(linger=0)
        self.context.term()


def test_subscriber_reports_gaps_restarts_and_malformed_events():
    pub = Publisher()
    gaps = []
    try:
        with Subscriber(pub.address, on_gap=gaps.append) as subscriber:
            pub.join(subscriber, "warmup")
            for seq in (1, 2, 3, 5, 6, 9):  # 4 and 7-8 lost
                pub.send("cam1", seq)
            pub.send("cam2", 1)
            pub.send("cam2", 2)
            pub.send("cam1", 1)  # the engine restarted
            pub.send("cam1", 2, body=b"not json")
            pub.send("cam1", 3, topic="other")  # topic frame and stream disagree
            pub.send("cam1", 2)
            seen = [(e.stream, e.seq) for e in iter(lambda: subscriber.recv(0.5), None)]
            assert seen == [("cam1", 1), ("cam1", 2), ("cam1", 3), ("cam1", 5), ("cam1", 6), ("cam1", 9),
                            ("cam2", 1), ("cam2", 2), ("cam1", 1), ("cam1", 2)]
            assert gaps == [Gap("cam1", 4, 5), Gap("cam1", 7, 9)] == list(subscriber.gaps)
            assert [g.missed for g in gaps] == [1, 2]
            assert subscriber.restarts == 1 and subscriber.malformed == 2
    finally:
        pub.close()


def test_subscriber_filters_streams_exactly():
    pub = Publisher()
    try:
        with Subscriber(pub.address, streams=["cam1"]) as subscriber:
            pub.join(subscriber, "cam1")
            pub.send("cam10", 1)  # matches the ZeroMQ prefix "cam1" but is another stream
            pub.send("cam2", 1)
            pub.send("cam1", 2)
            event = subscriber.recv(2.0)
            assert (event.stream, event.seq) == ("cam1", 2)
            assert subscriber.recv(0.2) is None
    finally:
        pub.close()


def test_subscriber_iterates_events_from_the_server(server):
    with Subscriber(server.event_address, streams=["live"]) as subscriber:
        deadline = time.monotonic() + 5
        while subscriber.recv(0.05) is None:
            assert time.monotonic() < deadline
            server.publish(p.StreamStateEvent(stream="live", state="connecting"))
        while subscriber.recv(0.1) is not None:
            pass
        for k in range(5):
            server.publish(p.AnswerEvent(stream="live", question_id="q", question="Q", answer=str(k)))
        answers = []
        for event in subscriber:
            answers.append(event.answer)
            if len(answers) == 5:
                break
        assert answers == ["0", "1", "2", "3", "4"]
        assert list(subscriber.gaps) == []
