"""The engine end to end: real ZeroMQ sockets, generated video files, a real RTSP server, the tiny model."""

from __future__ import annotations

import json
import shutil
import threading

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixmalmm.clients import Client, EngineError, Subscriber
from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM
from mixmalmm.streamer.engine import SNAPSHOT_SUFFIX, Engine, EngineConfig

from .conftest import FPS, NUM_FRAMES, serving_engine, wait_for

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)  # each frame is a Shot: memory fills at once
FAST_NETWORK = {"open_timeout": 4.0, "read_timeout": 1.5, "backoff": (0.2, 0.5)}


@pytest.fixture(scope="module")
def model():
    return MALMM.tiny().eval()


@pytest.fixture
def running(model, tmp_path):
    """An engine behind a real server on loopback; yields (engine, server, client)."""
    config = EngineConfig(state_dir=str(tmp_path / "state"), snapshot_period_s=3600, network_options=FAST_NETWORK)
    with serving_engine(model, config) as served:
        yield served


def stream_status(client, sid) -> P.StreamStatus:
    return client.status(sid).streams[0]


def test_questions_while_a_file_and_an_rtsp_stream_flow(running, media, rtsp_server):
    engine, server, client = running
    info = client.add_stream("cam", rtsp_server.url, actionshot=EVERY_FRAME)
    assert info.mode == "live"
    client.add_question("cam", "what", "what is happening?", period_s=0.3)
    wait_for(lambda: stream_status(client, "cam").shots > 0, 60, "camera Shots")
    # The 6 s file starts once the camera flows: a slow camera start must not let it play past the asks below.
    info = client.add_stream("file", str(media.h264), pace="realtime", actionshot=EVERY_FRAME)
    assert info.mode == "replay"
    with Subscriber(server.event_address, ["cam"]) as sub:
        ends = []
        for _ in range(3):  # three moments while both streams play
            wait_for(lambda: stream_status(client, "file").shots > len(ends) * 10, 60, "file Shots")
            result = client.ask("file", "what colour is the square?", max_new_tokens=5)
            assert result.stream == "file" and not result.standing and result.span_start_s == 0.0
            assert result.answer == result.answer.strip() and len(result.answer) > 0
            ends.append(result.span_end_s)
            cam = client.ask("cam", "what is happening?", max_new_tokens=5)
            assert cam.standing and cam.question_id == "what"
        assert ends == sorted(ends) and ends[0] < ends[-1]  # memory grows while we ask
        answers = []
        while len(answers) < 3:
            event = sub.recv(timeout_s=10)
            assert event is not None, "no standing answer published"
            if isinstance(event, P.AnswerEvent):
                answers.append(event)
        seqs = [e.seq for e in answers]
        assert seqs == list(range(seqs[0], seqs[0] + 3)) and not sub.gaps
        assert all(e.question_id == "what" and e.span_end_s >= e.span_start_s for e in answers)
    # The replay loses nothing: every frame of the file becomes a Shot, all in memory once it is finished.
    file = wait_for(lambda: (s := stream_status(client, "file")).state == "finished" and s, 60, "the file to finish")
    assert file.shots == NUM_FRAMES and file.queue_depth == 0
    assert file.frames == NUM_FRAMES and file.drops == 0
    assert file.memory_entries == file.memory_capacity + 1  # M stored plus the newest
    assert file.span_end_s == pytest.approx((NUM_FRAMES - 1) / FPS)
    status = client.status()
    assert status.engine.questions_answered >= 6 and status.engine.question_latency_p99_s is not None


def test_http_mp4_link_is_replayed_as_a_file(running, http_server):
    # An MP4 link over HTTP is a file: replayed (nothing dropped), it ends and is finished with every frame
    # in memory once (before: a live stream that looped the file forever).
    engine, _, client = running
    info = client.add_stream("web", f"{http_server}/h264.mp4", pace="fast", actionshot=EVERY_FRAME)
    assert info.uri == f"{http_server}/h264.mp4"
    web = wait_for(lambda: (s := stream_status(client, "web")).state == "finished" and s, 60, "the link to finish")
    assert client.list_streams().streams[0].mode == "replay"
    assert web.frames == NUM_FRAMES and web.shots == NUM_FRAMES and web.drops == 0
    assert web.reconnects == 0 and web.span_end_s == pytest.approx((NUM_FRAMES - 1) / FPS)


def test_rtsp_server_killed_and_restarted_memory_kept(running, rtsp_server):
    engine, _, client = running
    client.add_stream("cam", rtsp_server.url, actionshot=EVERY_FRAME)
    wait_for(lambda: stream_status(client, "cam").shots >= 15, 60, "Shots from the camera")
    before = stream_status(client, "cam")
    rtsp_server.kill()
    wait_for(lambda: stream_status(client, "cam").state == "reconnecting", 20, "the stream to notice")
    rtsp_server.start()
    wait_for(lambda: stream_status(client, "cam").reconnects >= 1, 60, "a reconnect")
    shots = before.shots
    wait_for(lambda: stream_status(client, "cam").shots >= shots + 10, 60, "Shots after the reconnect")
    after = stream_status(client, "cam")
    assert after.state == "live" and after.span_start_s == before.span_start_s  # the memory was kept
    assert after.span_end_s > before.span_end_s
    # The last error is the drop itself, or a refused attempt if one fell between kill and restart.
    url = rtsp_server.url
    assert after.last_error and after.last_error.startswith((f"'{url}' disconnected", f"cannot connect to '{url}'"))


def test_bad_requests_get_errors_and_the_engine_goes_on(running, media, tmp_path):
    engine, server, client = running
    cases = [
        (lambda: client.ask("nope", "what?"), P.ErrorCode.UNKNOWN_STREAM),
        (lambda: client.add_stream("x", str(tmp_path / "missing.mp4")), P.ErrorCode.BAD_REQUEST),
        (lambda: client.add_stream("x", "gopher://127.0.0.1/x"), P.ErrorCode.BAD_REQUEST),
        (lambda: client.add_stream("x", str(media.audio_only)), P.ErrorCode.BAD_REQUEST),
        (lambda: client.remove_question("nope", "q"), P.ErrorCode.UNKNOWN_STREAM),
        (lambda: client.ask("nope", "x" * 5000), P.ErrorCode.TOO_LARGE),
    ]
    for call, code in cases:
        with pytest.raises(EngineError) as err:
            call()
        assert err.value.code == code
    with pytest.raises(EngineError, match="missing.mp4"):
        client.add_stream("x", str(tmp_path / "missing.mp4"))
    client.add_stream("f", str(media.h264), pace="fast")
    with pytest.raises(EngineError) as err:
        client.add_stream("f", str(media.h264))
    assert err.value.code == P.ErrorCode.ALREADY_EXISTS
    with pytest.raises(EngineError) as err:
        client.remove_question("f", "nope")
    assert err.value.code == P.ErrorCode.UNKNOWN_QUESTION
    assert [s.stream for s in client.list_streams().streams] == ["f"]
    assert client.ping().server == "mixmalmm"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.fixed_dictionaries(
    {"type": st.sampled_from(["ask", "status", "add_stream", "remove_stream", "add_question",
                              "remove_question", "save_snapshot", "list_streams", "bogus"])},
    optional={
        "id": st.one_of(st.integers(), st.text(max_size=10)),
        "stream": st.one_of(st.text(max_size=70), st.integers(), st.none()),
        "question": st.text(max_size=50),
        "uri": st.text(max_size=30),
        "question_id": st.text(max_size=10),
        "text": st.text(max_size=20),
        "period_s": st.one_of(st.floats(allow_nan=True), st.none()),
        "max_new_tokens": st.integers(-5, 2000),
    }))
def test_random_requests_never_break_the_engine(running, request):
    _, server, _ = running
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.request_address)
    try:
        sock.send(json.dumps(request).encode())
        assert sock.poll(20_000), f"no reply to {request}"
        reply = P.decode_reply(sock.recv_multipart()[-1])
        if not reply.ok:
            assert reply.error.code in set(P.ErrorCode)
        sock.send(b'{"type": "ping", "id": "after"}')
        assert sock.poll(5_000)
        assert P.decode_reply(sock.recv_multipart()[-1]).ok
    finally:
        sock.close()


def test_twenty_clients_ask_while_two_streams_ingest(running, media):
    engine, server, client = running
    client.add_stream("a", str(media.h264), pace="realtime", actionshot=EVERY_FRAME)
    client.add_stream("b", str(media.mpeg4), pace="realtime", actionshot=EVERY_FRAME)
    wait_for(lambda: all(s.shots > 0 for s in client.status().streams), 60, "both streams stepped")
    answered, failures = [], []

    def asker(i: int) -> None:
        with Client(server.request_address, timeout_s=30.0, retries=0) as c:
            for k in range(3):
                try:
                    answered.append(c.ask("ab"[(i + k) % 2], f"question {i} {k}?", max_new_tokens=4))
                except Exception as exc:  # collected: the assertion below names it
                    failures.append(repr(exc))

    threads = [threading.Thread(target=asker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures and len(answered) == 60
    assert {r.stream for r in answered} == {"a", "b"}


def test_snapshot_failure_is_reported_and_nothing_is_lost(running, media, tmp_path):
    engine, _, client = running
    client.add_stream("f", str(media.h264), pace="fast", actionshot=EVERY_FRAME)
    wait_for(lambda: stream_status(client, "f").shots == NUM_FRAMES, 60, "the whole file stepped")
    state_dir = tmp_path / "state"
    shutil.rmtree(state_dir)
    state_dir.write_text("not a directory")  # every write into it now fails with an OSError
    with pytest.raises(EngineError) as err:
        client.save_snapshot("f")
    assert err.value.code == P.ErrorCode.UNAVAILABLE and "I/O error: could not save stream 'f'" in err.value.message
    status = client.status()
    assert "could not save" in status.engine.persist_error
    assert status.streams[0].shots == NUM_FRAMES  # the memory is untouched
    assert client.ask("f", "still there?", max_new_tokens=3).span_end_s == pytest.approx((NUM_FRAMES - 1) / FPS)
    state_dir.unlink()
    state_dir.mkdir()
    saved = client.save_snapshot("f").saved
    assert saved[0].size_bytes > 0 and client.status().engine.persist_error is None


def test_one_streams_failing_snapshot_stays_reported_while_another_saves(running, media, tmp_path):
    """Before, one engine-wide field: f's good write cleared g's error from status."""
    engine, _, client = running
    for sid in ("f", "g"):
        client.add_stream(sid, str(media.h264), pace="fast", actionshot=EVERY_FRAME)
        wait_for(lambda sid=sid: stream_status(client, sid).shots > 0, 60, f"{sid} stepped")
    (tmp_path / "state" / f"g{SNAPSHOT_SUFFIX}").mkdir()  # g's file cannot be replaced: a directory is there
    with pytest.raises(EngineError) as err:
        client.save_snapshot()
    assert err.value.code == P.ErrorCode.UNAVAILABLE
    assert err.value.message.startswith("I/O error: could not save stream 'g'"), err.value.message
    assert client.save_snapshot("f").saved[0].size_bytes > 0
    assert "could not save stream 'g'" in client.status().engine.persist_error
    (tmp_path / "state" / f"g{SNAPSHOT_SUFFIX}").rmdir()
    assert client.save_snapshot("g").saved and client.status().engine.persist_error is None


def test_restart_restores_memory_and_standing_questions(model, media, tmp_path):
    config = EngineConfig(state_dir=str(tmp_path / "state"))
    first = Engine(model, config).start()
    first.add_stream(msgspec.convert({"id": 1, "stream": "f", "uri": str(media.h264), "pace": "fast",
                                      "actionshot": {"enabled": False, "sample_fps": None}}, P.AddStream))
    first.add_question(P.AddQuestion(id=2, stream="f", question_id="q", text="what moved?"))
    wait_for(lambda: first.stream_status(first._get("f")).state == "finished", 60, "the file to finish")
    assert first._get("f").state.frames == NUM_FRAMES  # finished: every Shot is in memory
    want = first.ask("f", "what moved?", max_new_tokens=6)
    first.shutdown(save=True)

    second = Engine(model, config).start()
    try:
        stream = second._get("f")
        assert stream.state_name == "finished" and stream.pipeline is None  # nothing is read again
        assert list(stream.standing) == ["q"]
        got = second.ask("f", "what moved?", max_new_tokens=6)
        assert (got.answer, got.standing, got.span_start_s, got.span_end_s) == (
            want.answer, want.standing, want.span_start_s, want.span_end_s)
    finally:
        second.shutdown(save=False)


def test_http_file_restored_from_a_snapshot_resumes_after_its_memory(model, http_server, tmp_path):
    config = EngineConfig(state_dir=str(tmp_path / "state"), snapshot_period_s=3600, network_options=FAST_NETWORK)
    request = msgspec.convert({"id": 1, "stream": "w", "uri": f"{http_server}/h264.mp4", "pace": "realtime",
                               "actionshot": {"enabled": False, "sample_fps": None}}, P.AddStream)
    first = Engine(model, config).start()
    first.add_stream(request)
    wait_for(lambda: first._get("w").state.frames >= 20, 60, "20 frames in memory")
    first.shutdown(save=True)  # halfway through the 6 s link
    second = Engine(model, config).start()
    try:
        stream = second._get("w")
        assert 20 <= stream.state.frames < NUM_FRAMES and stream.pipeline is not None
        wait_for(lambda: second.stream_status(stream).state == "finished", 60, "the restored link to finish")
        status = second.stream_status(stream)
        # Read on from where the memory ended (before: from the start again, 20+ frames twice).
        assert stream.state.frames == NUM_FRAMES and status.span_end_s == pytest.approx((NUM_FRAMES - 1) / FPS)
    finally:
        second.shutdown(save=False)


def test_more_streams_than_a_batch_all_progress(model):
    engine = Engine(model, EngineConfig(max_batch=1)).start()
    try:
        for sid in ("a", "b", "c"):
            engine.add_stream(P.AddStream(id=0, stream=sid, uri="synthetic:?num_frames=100000&width=32&height=32",
                                          pace="fast", actionshot=EVERY_FRAME))
        wait_for(lambda: sum(s.state.frames for s in engine.streams()) >= 60, 60, "60 Shots in all")
        folded = [s.state.frames for s in engine.streams()]
        # Round robin over streams whose queues never run dry: each gets a third, give or take a round.
        assert max(folded) - min(folded) <= 3, folded
    finally:
        engine.shutdown(save=False)


def test_an_empty_answer_is_said_to_be_empty_in_replies_and_events(media):
    """A model whose LLM ends at once (mixmalmm's decoding allows it) answers "" with empty: true."""
    from tests.model.conftest import end_at_once

    model = MALMM.tiny().eval()
    end_at_once(model, model.tokenizer.convert_ids_to_tokens(10))
    with serving_engine(model, EngineConfig()) as (_, server, client), Subscriber(server.event_address, ["f"]) as sub:
        client.add_stream("f", str(media.h264), pace="fast", actionshot=EVERY_FRAME)
        client.add_question("f", "q", "what is there?", period_s=0.2)
        wait_for(lambda: stream_status(client, "f").shots > 0, 60, "Shots")
        result = client.ask("f", "what colour is the square?")
        assert result.answer == "" and result.empty
        event = sub.recv(timeout_s=10)
        while event is not None and not isinstance(event, P.AnswerEvent):
            event = sub.recv(timeout_s=10)
        assert event is not None and event.answer == "" and event.empty
