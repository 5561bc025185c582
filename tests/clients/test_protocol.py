"""The wire protocol without sockets: every message round-trips, documented JSON examples decode, and
malformed input of any kind becomes a typed RequestError (never another exception)."""

import json
import os
import stat

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixmalmm.clients import protocol as p

# One JSON example per request, exactly as a client in another language would send it.
REQUEST_EXAMPLES = {
    "ping": '{"type": "ping", "id": "1"}',
    "ask": '{"type": "ask", "id": "2", "stream": "cam1", "question": "What is the person holding?", '
    '"max_new_tokens": 20, "num_beams": 1}',
    "status": '{"type": "status", "id": 3, "stream": null}',
    "list_streams": '{"type": "list_streams", "id": "4"}',
    "add_stream": '{"type": "add_stream", "id": "5", "stream": "cam1", "uri": "rtsp://127.0.0.1:8554/cam", '
    '"mode": "live", "pace": "realtime", "actionshot": {"enabled": true, "step": 2, "threshold": 100.0, '
    '"max_frames": 120, "blend": "mean"}}',
    "remove_stream": '{"type": "remove_stream", "id": "6", "stream": "cam1"}',
    "add_question": '{"type": "add_question", "id": "7", "stream": "cam1", "question_id": "door", '
    '"text": "Is the door open?", "period_s": 10.0}',
    "remove_question": '{"type": "remove_question", "id": "8", "stream": "cam1", "question_id": "door"}',
    "save_snapshot": '{"type": "save_snapshot", "id": "9", "stream": null}',
    "move_stream": '{"type": "move_stream", "id": "10", "stream": "cam1", "to": "auto"}',
}


def test_examples_cover_every_request_type_and_decode():
    assert set(REQUEST_EXAMPLES) == set(p.REQUEST_TYPES)
    for kind, text in REQUEST_EXAMPLES.items():
        request = p.decode_request(text.encode())
        assert isinstance(request, p.REQUEST_TYPES[kind])
        assert request.id == json.loads(text)["id"]
        # Encoding gives back every member that was sent, with the same value (add_stream leaves out the
        # members at their defaults: decoding it again gives the same request).
        encoded = json.loads(p.encode(request))
        assert p.decode_request(p.encode(request)) == request
        for key, value in json.loads(text).items():
            if key in encoded or kind != "add_stream":
                assert encoded[key] == value, (kind, key)
            else:
                assert msgspec.to_builtins(getattr(request, key)) == value, (kind, key)


def test_request_fields_are_decoded_with_their_types():
    ask = p.decode_request(REQUEST_EXAMPLES["ask"].encode())
    assert (ask.stream, ask.question, ask.max_new_tokens, ask.num_beams) == (
        "cam1", "What is the person holding?", 20, 1
    )
    add = p.decode_request(REQUEST_EXAMPLES["add_stream"].encode())
    assert add.actionshot == p.ActionShotSettings(enabled=True, step=2, threshold=100.0, max_frames=120, blend="mean")
    minimal = p.decode_request(b'{"type":"add_stream","id":"x","stream":"f","uri":"/v.mp4"}')
    assert (minimal.mode, minimal.pace, minimal.actionshot) == ("auto", "realtime", None)
    q = p.decode_request(b'{"type":"add_question","id":"x","stream":"f","question_id":"q","text":"t"}')
    assert q.period_s is None


@pytest.mark.parametrize(
    ("body", "code", "request_id", "words"),
    [
        (b"\x00\xff\x10garbage", p.ErrorCode.BAD_REQUEST, None, "not valid JSON"),
        (b'{"type": "ping", "id": ', p.ErrorCode.BAD_REQUEST, None, "not valid JSON"),
        (b'{"type":"ask","id":"a","stream":"s","question":"caf\xe9"}', p.ErrorCode.BAD_REQUEST, None, "UTF-8"),
        (b"[1, 2, 3]", p.ErrorCode.BAD_REQUEST, None, "JSON object"),
        (b'"ping"', p.ErrorCode.BAD_REQUEST, None, "JSON object"),
        (b'{"id": "a"}', p.ErrorCode.BAD_REQUEST, "a", '"type"'),
        (b'{"type": "dance", "id": "a"}', p.ErrorCode.UNKNOWN_TYPE, "a", "'dance'"),
        (b'{"type": 7, "id": 3}', p.ErrorCode.UNKNOWN_TYPE, 3, "unknown request type 7"),
        (b'{"type": "ask", "id": "a", "stream": "s", "question": 5}', p.ErrorCode.BAD_REQUEST, "a", "$.question"),
        (b'{"type": "ask", "id": "a", "stream": "s"}', p.ErrorCode.BAD_REQUEST, "a", "question"),
        (b'{"type": "ask", "id": "a", "stream": "s", "question": ""}', p.ErrorCode.BAD_REQUEST, "a", "length"),
        (b'{"type": "ask", "id": "a", "stream": "no spaces", "question": "q"}', p.ErrorCode.BAD_REQUEST, "a", "$.stream"),
        (b'{"type": "ask", "id": "a", "stream": "s", "question": "q", "num_beams": 0}', p.ErrorCode.BAD_REQUEST, "a",
         "num_beams"),
        (b'{"type": "ping", "id": "a", "extra": 1}', p.ErrorCode.BAD_REQUEST, "a", "unknown field `extra`"),
        (b'{"type": "ping"}', p.ErrorCode.BAD_REQUEST, None, "`id`"),
        (b'{"type": "ping", "id": true}', p.ErrorCode.BAD_REQUEST, None, "$.id"),
        (b'{"type": "ping", "id": "' + b"x" * 200 + b'"}', p.ErrorCode.BAD_REQUEST, None, "$.id"),
        (b'{"type": "add_question", "id": 1, "stream": "s", "question_id": "q", "text": "t", "period_s": -1}',
         p.ErrorCode.BAD_REQUEST, 1, "period_s"),
        (b"[" * 100_000, p.ErrorCode.BAD_REQUEST, None, ""),
        (b'{"a":' * 50_000, p.ErrorCode.BAD_REQUEST, None, ""),
    ],
)
def test_malformed_requests_get_typed_errors(body, code, request_id, words):
    with pytest.raises(p.RequestError) as info:
        p.decode_request(body)
    assert info.value.code is code
    assert info.value.request_id == request_id
    assert words in info.value.message


def test_limits_bound_message_size_and_question_length():
    limits = p.Limits(max_message_bytes=1000, max_question_chars=10)
    assert p.decode_request(b'{"type":"ask","id":"a","stream":"s","question":"0123456789"}', limits).question
    with pytest.raises(p.RequestError) as info:
        p.decode_request(b'{"type":"ask","id":"a","stream":"s","question":"01234567890"}', limits)
    assert (info.value.code, info.value.request_id) == (p.ErrorCode.TOO_LARGE, "a")
    assert "11 characters; the limit is 10" in info.value.message
    with pytest.raises(p.RequestError) as info:
        p.decode_request(b'{"type":"add_question","id":2,"stream":"s","question_id":"q","text":"' + b"x" * 11 + b'"}',
                         limits)
    assert (info.value.code, info.value.request_id) == (p.ErrorCode.TOO_LARGE, 2)
    with pytest.raises(p.RequestError) as info:
        p.decode_request(b'{"type":"ping","id":"' + b"x" * 1000 + b'"}', limits)
    assert info.value.code is p.ErrorCode.TOO_LARGE
    assert "1023 bytes; the limit is 1000 bytes" in info.value.message
    with pytest.raises(ValueError, match="max_question_chars"):
        p.Limits(max_question_chars=0)
    with pytest.raises(ValueError, match="max_message_bytes"):
        p.Limits(max_message_bytes=10)


def test_replies_encode_as_documented_and_decode_into_result_types():
    ok = p.ok_reply("2", p.AskResult(stream="cam1", question="q?", answer="a cup", span_start_s=0.0, span_end_s=12.5))
    assert json.loads(ok) == {
        "id": "2", "ok": True,
        "result": {"stream": "cam1", "question": "q?", "answer": "a cup", "empty": False, "standing": False,
                   "question_id": None,
                   "span_start_s": 0.0, "span_end_s": 12.5, "latency_s": 0.0},
    }
    reply = p.decode_reply(ok)
    assert p.decode_result(reply, p.AskResult).answer == "a cup"
    err = p.error_reply(None, p.ErrorCode.UNKNOWN_STREAM, "no stream 'x'")
    assert json.loads(err) == {"id": None, "ok": False, "error": {"code": "unknown_stream", "message": "no stream 'x'"}}
    decoded = p.decode_reply(err)
    assert decoded.error == p.Error(p.ErrorCode.UNKNOWN_STREAM, "no stream 'x'")
    with pytest.raises(msgspec.ValidationError, match="must carry"):
        p.decode_reply(b'{"id": 1, "ok": false}')
    with pytest.raises(msgspec.ValidationError):
        p.decode_result(p.decode_reply(b'{"id": 1, "ok": true, "result": {"answer": 3}}'), p.AskResult)


def test_every_request_type_has_a_result_type_that_round_trips():
    samples = {
        p.PingResult: p.PingResult(time_s=1.0, uptime_s=2.0),
        p.AskResult: p.AskResult(stream="s", question="q", answer="a"),
        p.StatusResult: p.StatusResult(engine=p.EngineStatus(model="m"), streams=[p.StreamStatus(stream="s", uri="u",
                                                                                                  state="live")]),
        p.ListStreamsResult: p.ListStreamsResult(streams=[p.StreamInfo(stream="s", uri="u", state="live", mode="live")]),
        p.StreamInfo: p.StreamInfo(stream="s", uri="u", state="connecting", mode="replay"),
        p.StandingQuestion: p.StandingQuestion(stream="s", question_id="q", text="t", period_s=1.0),
        p.SaveSnapshotResult: p.SaveSnapshotResult(saved=[p.SavedSnapshot(stream="s", path="/x", size_bytes=3,
                                                                          time_s=4.0)]),
        p.MoveStreamResult: p.MoveStreamResult(stream="s", source="w0", target="w1", pause_s=0.5, state="live"),
    }
    assert set(p.RESULT_TYPES) == set(p.REQUEST_TYPES.values())
    for result_type in set(p.RESULT_TYPES.values()):
        sample = samples[result_type]
        assert p.decode_result(p.decode_reply(p.ok_reply(1, sample)), result_type) == sample


def test_events_round_trip_with_their_tag():
    state = p.StreamStateEvent(stream="cam1", seq=4, time_s=10.0, state="reconnecting", previous="live",
                               message="connection reset")
    assert json.loads(p.encode(state)) == {
        "type": "stream_state", "stream": "cam1", "seq": 4, "time_s": 10.0, "state": "reconnecting",
        "previous": "live", "message": "connection reset",
    }
    answer = p.AnswerEvent(stream="cam1", seq=5, question_id="door", question="Is the door open?", answer="yes",
                           span_start_s=3.0, span_end_s=63.0)
    assert p.decode_event(p.encode(state)) == state
    assert p.decode_event(p.encode(answer)) == answer
    with pytest.raises(msgspec.ValidationError):
        p.decode_event(b'{"type": "nope", "stream": "s"}')


# ---------------------------------------------------------------------------------------------------
# Property-based: nothing but RequestError ever escapes decode_request
# ---------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _decode_or_error(body: bytes, limits=p.DEFAULT_LIMITS):
    try:
        return p.decode_request(body, limits)
    except p.RequestError as exc:
        assert isinstance(exc.code, p.ErrorCode)
        assert exc.message
        return exc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_request_error(body):
    _decode_or_error(body)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json_values_never_raise_anything_but_request_error(value):
    _decode_or_error(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(REQUEST_EXAMPLES)), st.data())
def test_mutated_requests_are_rejected_with_their_id(kind, data):
    """Replace one field of a valid request with a random JSON value: the result is either a valid
    request of that type or an error reply that still carries the request's id."""
    message = json.loads(REQUEST_EXAMPLES[kind])
    field = data.draw(st.sampled_from(sorted(set(message) - {"id", "type"}) or ["id"]), label="field")
    if field == "id":
        return
    message[field] = data.draw(json_values, label="value")
    outcome = _decode_or_error(json.dumps(message).encode())
    if isinstance(outcome, p.RequestError):
        assert outcome.code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.TOO_LARGE)
        assert outcome.request_id == message["id"]
    else:
        assert isinstance(outcome, p.REQUEST_TYPES[kind])


# ---------------------------------------------------------------------------------------------------
# CURVE key files
# ---------------------------------------------------------------------------------------------------


def test_create_and_load_keypair(tmp_path):
    public_file, secret_file = p.create_keypair(str(tmp_path / "keys"), "server")
    assert public_file.endswith("server.key") and secret_file.endswith("server.key_secret")
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    public, secret = p.load_keypair(secret_file)
    assert len(public) == 40 and len(secret) == 40
    public_only, none = p.load_keypair(public_file)
    assert public_only == public and none is None
    with pytest.raises(ValueError, match="plain file name"):
        p.create_keypair(str(tmp_path), "../evil")
    with pytest.raises(ValueError, match="cannot read CURVE certificate"):
        p.load_keypair(str(tmp_path / "missing.key"))
