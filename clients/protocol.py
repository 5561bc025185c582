"""The mixmalmm wire protocol: typed messages shared by the engine's server and every client.

Transport (shared/DESIGN.md §6):

* Requests go to a ZeroMQ ROUTER socket (default ``tcp://127.0.0.1:5555``). A client sends one JSON
  body, either as a REQ socket does (an empty delimiter frame, then the body) or from a DEALER as a
  single frame; the reply comes back with the same envelope.
* Events come from a PUB socket (default ``tcp://127.0.0.1:5556``) as two frames: the stream id
  (UTF-8) as the topic, then the JSON body. Every event carries a per-stream sequence number ``seq``
  that starts at 1 and grows by one per event of that stream, so a subscriber can notice a gap.

Bodies are UTF-8 JSON objects. Requests and events are tagged unions on the field ``type``. Every
request carries a client-chosen ``id`` (a string of at most ``MAX_ID_CHARS`` characters, or an
integer of magnitude at most ``MAX_INT_ID``); every reply carries that id (``null`` when the request was too broken to read one), ``ok``,
and either ``result`` (ok) or ``error`` = ``{"code", "message"}`` (not ok). Requests reject unknown
fields (a misspelt option is an error, not silently ignored); replies and events are read leniently
so that an older client keeps working against a newer server.

Nothing here unpickles anything: decoding is ``msgspec.json`` into the structs below, and
``decode_request`` turns every malformed input into a ``RequestError`` with a code from ``ErrorCode``.

This module imports only the standard library and msgspec (``zmq`` lazily, for the CURVE key
helpers), so a client in another language can be written from it and the README alone.
"""

from __future__ import annotations

import enum
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

PROTOCOL_VERSION = 2

# ----------------------------------------------------------------------------------------------------
# Limits (the server's are configurable through ``Limits``; these are the defaults)
# ----------------------------------------------------------------------------------------------------

#: Largest request body the server accepts, in bytes (ZMQ_MAXMSGSIZE: a peer that sends a bigger
#: message is disconnected by ZeroMQ before the server sees it; the client reconnects).
MAX_MESSAGE_BYTES = 1 << 20
#: Longest question or standing-question text the server accepts, in characters.
MAX_QUESTION_CHARS = 1000
#: Longest request id, in characters (when the id is a string).
MAX_ID_CHARS = 128
#: Largest magnitude of an integer request id: every integer up to it is exact as a double (JSON
#: numbers in JavaScript, C ``strtod``), so any client can match the echoed id.
MAX_INT_ID = 2**53
#: Longest stream URI, in characters.
MAX_URI_CHARS = 4096
#: Stream ids and standing-question ids: 1-64 characters, letters, digits and ``_ . : -``, starting
#: with a letter or digit. Stream ids are the PUB topic, so they are kept plain.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="stream or question id")]
RequestId = (Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
             | Annotated[int, msgspec.Meta(ge=-MAX_INT_ID, le=MAX_INT_ID)])
Text = Annotated[str, msgspec.Meta(min_length=1)]


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds a server enforces on requests.

    max_message_bytes: largest request body in bytes (also set as the socket's ZMQ_MAXMSGSIZE).
    max_question_chars: longest question text (``ask.question``, ``add_question.text``) in characters.
    """

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_question_chars: int = MAX_QUESTION_CHARS

    def __post_init__(self) -> None:
        if self.max_message_bytes < 256:
            raise ValueError(f"Limits.max_message_bytes must be at least 256 bytes, got {self.max_message_bytes}")
        if self.max_question_chars < 1:
            raise ValueError(f"Limits.max_question_chars must be at least 1, got {self.max_question_chars}")


DEFAULT_LIMITS = Limits()

# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


class ErrorCode(str, enum.Enum):
    """Why a request failed. The set is fixed; a reply's ``error.code`` is one of these strings."""

    BAD_REQUEST = "bad_request"  # not JSON, not an object, a field missing or of the wrong type
    UNKNOWN_TYPE = "unknown_type"  # "type" names no request of this protocol
    TOO_LARGE = "too_large"  # a question longer than the server's limit
    UNKNOWN_STREAM = "unknown_stream"  # no stream with that id
    UNKNOWN_QUESTION = "unknown_question"  # no standing question with that id on that stream
    ALREADY_EXISTS = "already_exists"  # a stream or standing question with that id exists
    BUSY = "busy"  # too many requests in flight; retry later
    UNAVAILABLE = "unavailable"  # cannot do it now: shutting down, no Shot yet, a limit reached, an I/O error
    INTERNAL = "internal"  # a bug in the engine; the message says what


class Error(msgspec.Struct, frozen=True):
    """The ``error`` member of a failed reply."""

    code: ErrorCode
    message: str


class RequestError(Exception):
    """A request that cannot be served; the server turns it into an error reply.

    The engine's handler raises it for errors it detects (``ErrorCode.UNKNOWN_STREAM`` ...);
    ``decode_request`` raises it for malformed input. ``request_id`` is the request's id when known.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: Any = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.request_id = request_id


# ----------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------


class Request(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """Base of every request: ``id`` is chosen by the client and echoed in the reply."""

    id: RequestId


class Ping(Request, tag="ping"):
    """Liveness check, answered by the server's IO thread itself. ``{"type":"ping","id":"1"}``"""


class Ask(Request, tag="ask"):
    """Ask a question about everything the stream has shown so far.

    If ``question`` is the text of a standing question registered on the stream, the engine answers it
    from that question's own memory (exact MA-LMM semantics); otherwise it is answered ad hoc.
    ``max_new_tokens`` / ``num_beams``: generation options; ``null`` means the engine's defaults (by
    default the model's own decoding).
    """

    stream: Name
    question: Text
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    num_beams: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = None


class Status(Request, tag="status"):
    """Engine and stream status; ``stream`` narrows it to one stream (``null``: all streams)."""

    stream: Name | None = None


class ListStreams(Request, tag="list_streams"):
    """The streams the engine runs, with their standing questions."""


class ActionShotSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How a stream's frames become Shots: which frames are sampled, and ActionShot (shared/DESIGN.md §5).

    Every field may be left out: a field given here replaces the stream's default for it, which is the
    server's command line's if it gave one, else the model's (its folder's ingest settings: `serve`'s
    `--model`), else MA-LMM's. `list_streams` and `status` show the settings a stream actually runs with,
    every field set.

    enabled: blend similar consecutive frames into composites (false: every sampled frame is a Shot).
    step: sample every ``step``-th decoded frame.
    sample_fps: then at most this many frames per second of stream time (``null``: every one).
    cut: start a new composite when at least this share (0-1] of the picture changed since the previous
      sampled frame (a scene cut); ``null``: never on content.
    max_seconds: the longest action: a composite spans less than this many seconds of stream time
      (``null``: no limit).
    blend: ``exponential`` (MixMA-LMM's 0.5/0.5 running blend) or ``mean`` (a true long exposure).
    threshold: MixMA-LMM's own rule, off (``null``) by default: also cut when the mean absolute
      difference between the frame and the composite exceeds this many pixel levels (0-255).
    max_frames: MixMA-LMM's own limit, off (``null``) by default: at most this many sampled frames per
      composite.
    """

    enabled: bool | UnsetType = UNSET
    step: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | UnsetType = UNSET
    sample_fps: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] | None | UnsetType = UNSET
    cut: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None | UnsetType = UNSET
    max_seconds: Annotated[float, msgspec.Meta(gt=0.0, le=86_400.0)] | None | UnsetType = UNSET
    blend: Literal["exponential", "mean"] | UnsetType = UNSET
    threshold: Annotated[float, msgspec.Meta(ge=0.0, le=255.0)] | None | UnsetType = UNSET
    max_frames: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None | UnsetType = UNSET

    def over(self, base: ActionShotSettings) -> ActionShotSettings:
        """These settings where given, `base`'s elsewhere."""
        return msgspec.structs.replace(base, **self.given())

    def given(self) -> dict[str, Any]:
        """The fields that are set, by name."""
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not UNSET}

    @property
    def complete(self) -> bool:
        """Whether every field is set (as in the settings a stream runs with)."""
        return len(self.given()) == len(self.__struct_fields__)


class ShownActionShotSettings(ActionShotSettings, forbid_unknown_fields=False):
    """`ActionShotSettings` as replies show them: read leniently, so that a field a later server adds
    does not break an older client."""


class AddStream(Request, tag="add_stream", omit_defaults=True):  # an older server knows no `worker`
    """Start ingesting a source.

    uri: a file path, ``rtsp://``, ``http(s)://`` (HLS) URL, or ``webcam:N``.
    mode: ``live`` drops the oldest frames when the model falls behind (counted); ``replay`` blocks
      instead (nothing dropped); ``auto`` picks replay for files and live otherwise.
    pace: for replay, ``realtime`` follows the file's own timestamps, ``fast`` runs as fast as possible.
    actionshot: how frames become Shots (`ActionShotSettings`): the fields given replace the stream's
      defaults (the server's options, then the model's own); ``null`` or left out: the defaults.
    """

    stream: Name
    uri: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URI_CHARS)]
    mode: Literal["auto", "live", "replay"] = "auto"
    pace: Literal["realtime", "fast"] = "realtime"
    actionshot: ActionShotSettings | None = None
    #: On a cluster (``serve --cluster``): the worker to run it on (``status`` names them); ``null``: the
    #: least-loaded worker. A single ``serve`` refuses any worker (``bad_request``).
    worker: Name | None = None


class RemoveStream(Request, tag="remove_stream"):
    """Stop a stream and forget it (its saved snapshot, if any, is left on disk)."""

    stream: Name


#: Seconds after an alert during which the same standing question sends no other (AddQuestion.hold_off_s).
DEFAULT_HOLD_OFF_S = 30.0
#: Longest ``alert_when`` answer, in characters.
MAX_ALERT_ANSWER_CHARS = 200


def normalize_answer(text: str) -> str:
    """An answer as alerts compare it: lower case, every run of characters other than letters and digits
    one space, no space at either end (``"Yes."`` -> ``"yes"``, ``"a red  car!"`` -> ``"a red car"``)."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


def answer_matches(answer: str, expected: str) -> bool:
    """Whether ``answer`` matches an ``alert_when``: equal after `normalize_answer`, or starting with it as
    whole words (``"yes, it is open"`` matches ``"yes"``; ``"yesterday"`` does not)."""
    a, e = normalize_answer(answer), normalize_answer(expected)
    return bool(e) and (a == e or a.startswith(e + " "))


class AddQuestion(Request, tag="add_question", omit_defaults=True):  # an older server knows no alert_*
    """Register a standing question on a stream, with its own query memory.

    period_s: answer it every ``period_s`` seconds (wall clock) and publish each answer as an
      ``answer`` event; ``null`` means only on request (an ``ask`` with the same text).
    alert_when: publish an ``alert`` event when an answer comes to match this one (`answer_matches`)
      after one that did not (or as the first answer).
    alert_on_change: publish an ``alert`` event when an answer differs (`normalize_answer`) from the
      one before it.
    hold_off_s: after an alert, none from this question for this many seconds (the answers that would
      have fired are counted, not sent); ``null``: `DEFAULT_HOLD_OFF_S`. Alerts need ``period_s``.
    """

    stream: Name
    question_id: Name
    text: Text
    period_s: Annotated[float, msgspec.Meta(gt=0.0, le=86_400.0)] | None = None
    alert_when: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ALERT_ANSWER_CHARS)] | None = None
    alert_on_change: bool = False
    hold_off_s: Annotated[float, msgspec.Meta(ge=0.0, le=86_400.0)] | None = None

    def __post_init__(self) -> None:
        if (self.alert_when is not None or self.alert_on_change) and self.period_s is None:
            raise ValueError("an alert (alert_when, alert_on_change) needs period_s: alerts come from the "
                             "periodic answers")
        if self.alert_when is not None and not normalize_answer(self.alert_when):
            raise ValueError("alert_when has no letter or digit to match")
        if self.hold_off_s is not None and self.alert_when is None and not self.alert_on_change:
            raise ValueError("hold_off_s needs alert_when or alert_on_change")


class RemoveQuestion(Request, tag="remove_question"):
    """Unregister a standing question."""

    stream: Name
    question_id: Name


class SaveSnapshot(Request, tag="save_snapshot"):
    """Write the state of one stream (``stream``) or of all streams (``null``) to the state directory now."""

    stream: Name | None = None


class MoveStream(Request, tag="move_stream"):
    """On a cluster (``serve --cluster``): move a stream with its memory to another worker.

    to: a worker's name (``status`` lists them) or ``"auto"`` (the least-loaded other worker). The stream
    is snapshotted, stopped and restored on the target: its memory, standing questions and event ``seq``
    go on; a file resumes after the last Shot in memory (no frame lost), a live source reconnects (the
    frames of the gap are not seen). A single ``serve`` refuses it (``bad_request``).
    """

    stream: Name
    to: Name


AnyRequest = (Ping | Ask | Status | ListStreams | AddStream | RemoveStream | AddQuestion | RemoveQuestion
              | SaveSnapshot | MoveStream)
REQUEST_TYPES: dict[str, type[Request]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (Ping, Ask, Status, ListStreams, AddStream, RemoveStream, AddQuestion, RemoveQuestion, SaveSnapshot,
                MoveStream)
}

# ----------------------------------------------------------------------------------------------------
# Results (the ``result`` member of an ok reply)
# ----------------------------------------------------------------------------------------------------

#: connecting -> live (-> reconnecting -> live ...); a file then draining (decoded, Shots still going
#: into memory) -> finished (every Shot in memory); failed and stopped can end any of them.
StreamState = Literal["connecting", "live", "reconnecting", "draining", "finished", "failed", "stopped"]


class PingResult(msgspec.Struct, kw_only=True):
    """server: always "mixmalmm"; protocol: PROTOCOL_VERSION; time_s: server clock (Unix seconds);
    uptime_s: seconds since the server started."""

    server: str = "mixmalmm"
    protocol: int = PROTOCOL_VERSION
    time_s: float
    uptime_s: float


class AskResult(msgspec.Struct, kw_only=True):
    """An answer.

    empty: true when the model generated no text (``answer`` is then ``""``), said outright so that an
      empty answer is never mistaken for a missing one.
    standing: true when answered from a standing question's own memory (then ``question_id`` names it).
    span_start_s / span_end_s: the stretch of the stream (stream time, seconds) that the memory covered
      when the answer was made; ``null`` before the first Shot.
    latency_s: seconds from the request's arrival at the server's socket to the answer (waiting for a
      worker included).
    """

    stream: str
    question: str
    answer: str
    empty: bool = False
    standing: bool = False
    question_id: str | None = None
    span_start_s: float | None = None
    span_end_s: float | None = None
    latency_s: float = 0.0


class StandingQuestion(msgspec.Struct, kw_only=True):
    """A registered standing question; period_s in seconds (``null``: on request only); alert_when,
    alert_on_change and hold_off_s as in ``AddQuestion`` (hold_off_s: the one in force, ``null``
    without an alert); alerts: alert events it sent, suppressed: those the hold-off kept back."""

    stream: str
    question_id: str
    text: str
    period_s: float | None = None
    alert_when: str | None = None
    alert_on_change: bool = False
    hold_off_s: float | None = None
    alerts: int = 0
    suppressed: int = 0


class StreamInfo(msgspec.Struct, kw_only=True):
    """One stream as the engine runs it; uri: its source, password and secret query values shown as
    ``***``; actionshot: the settings it runs with (every field set)."""

    stream: str
    uri: str
    state: StreamState
    mode: Literal["live", "replay"]
    questions: list[StandingQuestion] = []
    actionshot: ShownActionShotSettings | None = None
    #: On a cluster: the worker that runs the stream (``null`` on a single ``serve``).
    worker: str | None = None


class StreamStatus(msgspec.Struct, kw_only=True):
    """Counters of one stream.

    fps_in: decoded frames per second; fps_out: Shots per second into the model (both over the last
    few seconds). shots: Shots folded into memory (across restarts); drops: Shots and frames dropped
    because a live stream fell behind; reconnects: times the
    source reconnected. memory_entries / memory_capacity: visual memory bank entries held / bank length
    M. span_start_s / span_end_s: stream time (seconds) that memory covers. last_error: last source
    error text (a failed connection attempt's too). uri and last_error show credentials as ``***``.
    actionshot: the settings the stream runs with (every field set).
    """

    stream: str
    uri: str
    state: StreamState
    fps_in: float = 0.0
    fps_out: float = 0.0
    frames: int = 0
    shots: int = 0
    drops: int = 0
    reconnects: int = 0
    memory_entries: int = 0
    memory_capacity: int = 0
    span_start_s: float | None = None
    span_end_s: float | None = None
    queue_depth: int = 0
    last_error: str | None = None
    actionshot: ShownActionShotSettings | None = None
    #: On a cluster: the worker that runs the stream (``null`` on a single ``serve``).
    worker: str | None = None


class WorkerStatus(msgspec.Struct, kw_only=True):
    """One engine worker of a cluster (``serve --cluster``): its name, the Ray node it runs on, whether it
    answers, its streams (and its limit, ``max_streams``) and the Shots per second it folds into memory
    over all of them (its measured load)."""

    worker: str
    node: str = ""
    alive: bool = True
    streams: int = 0
    max_streams: int = 0
    shots_per_s: float = 0.0


class EngineStatus(msgspec.Struct, kw_only=True):
    """The engine as a whole: model and device names, seconds running, questions answered, and
    question latency percentiles in seconds (``null`` before the first question); ``queue_depth``: Shots
    waiting for the model over all streams; ``persist_error``: why a stream's last snapshot write failed
    (each stream's own, until its next write succeeds), else why a snapshot could not be restored at
    start (``null`` when neither)."""

    model: str = ""
    device: str = ""
    uptime_s: float = 0.0
    questions_answered: int = 0
    question_latency_p50_s: float | None = None
    question_latency_p99_s: float | None = None
    requests_in_flight: int = 0
    queue_depth: int = 0
    persist_error: str | None = None


class StatusResult(msgspec.Struct, kw_only=True):
    """engine: the engine as a whole (on a cluster: merged over the workers; latency percentiles are the
    highest worker's); streams; workers: a cluster's workers (empty on a single ``serve``)."""

    engine: EngineStatus
    streams: list[StreamStatus] = []
    workers: list[WorkerStatus] = []


class ListStreamsResult(msgspec.Struct, kw_only=True):
    streams: list[StreamInfo] = []


class SavedSnapshot(msgspec.Struct, kw_only=True):
    """One snapshot written: its path on the server, its size in bytes, and when (Unix seconds)."""

    stream: str
    path: str
    size_bytes: int
    time_s: float


class SaveSnapshotResult(msgspec.Struct, kw_only=True):
    saved: list[SavedSnapshot] = []


class MoveStreamResult(msgspec.Struct, kw_only=True):
    """A stream moved: from which worker to which, and ``pause_s``, the seconds it ingested nothing (from
    its final snapshot on the old worker to its restore on the new one)."""

    stream: str
    source: str
    target: str
    pause_s: float
    state: StreamState


#: The result type each request's ok reply carries.
RESULT_TYPES: dict[type[Request], type[msgspec.Struct]] = {
    Ping: PingResult,
    Ask: AskResult,
    Status: StatusResult,
    ListStreams: ListStreamsResult,
    AddStream: StreamInfo,
    RemoveStream: StreamInfo,
    AddQuestion: StandingQuestion,
    RemoveQuestion: StandingQuestion,
    SaveSnapshot: SaveSnapshotResult,
    MoveStream: MoveStreamResult,
}

# ----------------------------------------------------------------------------------------------------
# Replies
# ----------------------------------------------------------------------------------------------------


class Reply(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A reply as the server encodes it: exactly one of ``result`` (ok) and ``error`` (not ok)."""

    id: RequestId | None
    ok: bool
    result: Any = None
    error: Error | None = None


class WireReply(msgspec.Struct, kw_only=True):
    """A reply as a client decodes it: ``result`` is left raw so it can be decoded into the result
    type of the request that was sent (``RESULT_TYPES``)."""

    id: Any = None
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: Error | None = None


# ----------------------------------------------------------------------------------------------------
# Events (PUB: topic frame = stream id)
# ----------------------------------------------------------------------------------------------------


class Event(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every event.

    stream: the stream id (also the topic frame). seq: per-stream sequence number, assigned by the
    server when it sends the event (1, 2, 3, ...). time_s: when the event happened (Unix seconds).
    """

    stream: str
    seq: int = 0
    time_s: float = msgspec.field(default_factory=time.time)


class StreamStateEvent(Event, tag="stream_state"):
    """A stream changed state (added -> connecting -> live, reconnecting, draining, finished, failed,
    stopped). ``previous`` is ``null`` for a newly added stream; ``message`` explains failures."""

    state: StreamState
    previous: StreamState | None = None
    message: str | None = None


class AnswerEvent(Event, tag="answer"):
    """A standing question answered on its schedule; empty and span_*_s as in ``AskResult`` (seconds)."""

    question_id: str
    question: str
    answer: str
    empty: bool = False
    span_start_s: float | None = None
    span_end_s: float | None = None


class AlertEvent(Event, tag="alert", kw_only=True):
    """A standing question's answer met its alert condition (``AddQuestion.alert_when`` / ``alert_on_change``).

    reason: ``"match"`` (the answer came to match ``alert_when``) or ``"change"`` (it differs from
      ``previous``, the answer before it; ``null`` for the first). answer, empty, span_*_s: as in
      ``AnswerEvent`` (the answer that fired).
    shot_start_s / shot_end_s: the stream-time span (seconds) of the evidence: the last Shot the memory
      took in before the answer. evidence_jpeg: that Shot's composite as a base64 JPEG, scaled down if
      needed to at most `MAX_EVIDENCE_BYTES`; strip_jpeg: a base64 JPEG strip of thumbnails of Shots in
      memory, evenly sampled over its span (same bound); ``null`` when there is no picture (a restored
      stream before its next Shot). evidence_path / strip_path: where the server wrote them (``serve
      --evidence-dir``), ``null`` without a directory or when the write failed (then evidence_error says why).
    """

    question_id: str
    question: str
    answer: str
    empty: bool = False
    reason: Literal["match", "change"]
    previous: str | None = None
    alert_when: str | None = None
    span_start_s: float | None = None
    span_end_s: float | None = None
    shot_start_s: float | None = None
    shot_end_s: float | None = None
    evidence_jpeg: str | None = None
    strip_jpeg: str | None = None
    evidence_path: str | None = None
    strip_path: str | None = None
    evidence_error: str | None = None


#: Largest evidence picture (each of AlertEvent.evidence_jpeg and strip_jpeg), in bytes before base64: an
#: alert event stays under 360 KB, in every queue that holds events (PUB, console clients, cluster workers).
MAX_EVIDENCE_BYTES = 128 * 1024

AnyEvent = StreamStateEvent | AnswerEvent | AlertEvent
EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls for cls in (StreamStateEvent, AnswerEvent, AlertEvent)  # type: ignore[misc]
}

# ----------------------------------------------------------------------------------------------------
# Encoding and decoding
# ----------------------------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(AnyRequest)
_reply_decoder = msgspec.json.Decoder(WireReply)
_event_decoder = msgspec.json.Decoder(AnyEvent)


class _Envelope(msgspec.Struct):
    """The two members read from a request that failed validation, to classify the failure."""

    id: Any = None
    type: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def encode(message: msgspec.Struct) -> bytes:
    """Encode any protocol struct (request, reply, event) as UTF-8 JSON bytes."""
    return _encoder.encode(message)


def _usable_id(value: Any) -> RequestId | None:
    if isinstance(value, bool):
        return None
    if (isinstance(value, int) and abs(value) <= MAX_INT_ID) or (isinstance(value, str) and len(value) <= MAX_ID_CHARS):
        return value
    return None


def decode_request(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> AnyRequest:
    """Decode and validate one request body.

    Raises only ``RequestError`` (with the request's id when one could be read): ``too_large`` for a
    body over ``limits.max_message_bytes`` bytes or a question over ``limits.max_question_chars``
    characters, ``unknown_type`` for a ``type`` this protocol lacks, ``bad_request`` for anything else
    malformed (invalid UTF-8 or JSON, not an object, missing or wrongly typed fields, unknown fields).
    """
    if len(data) > limits.max_message_bytes:
        raise RequestError(
            ErrorCode.TOO_LARGE, f"message is {len(data)} bytes; the limit is {limits.max_message_bytes} bytes"
        )
    try:
        request = _request_decoder.decode(data)
    except Exception as exc:  # DecodeError, ValidationError, UnicodeDecodeError, RecursionError, ...
        raise _classify_failure(data, exc) from None
    check_limits(request, limits)
    return request


def _classify_failure(data: Any, exc: Exception) -> RequestError:
    if isinstance(exc, msgspec.ValidationError):
        try:
            envelope = _envelope_decoder.decode(data)
        except Exception:
            return RequestError(ErrorCode.BAD_REQUEST, f"a request must be a JSON object: {exc}")
        request_id = _usable_id(envelope.id)
        kind = envelope.type
        if kind is None:
            return RequestError(ErrorCode.BAD_REQUEST, 'missing the "type" field', request_id)
        if not isinstance(kind, str) or kind not in REQUEST_TYPES:
            known = ", ".join(sorted(REQUEST_TYPES))
            shown = repr(kind)[:80]
            return RequestError(ErrorCode.UNKNOWN_TYPE, f"unknown request type {shown}; known: {known}", request_id)
        return RequestError(ErrorCode.BAD_REQUEST, f"invalid {kind!r} request: {exc}", request_id)
    if isinstance(exc, UnicodeDecodeError):
        return RequestError(ErrorCode.BAD_REQUEST, f"the body is not valid UTF-8: {exc.reason} at byte {exc.start}")
    if isinstance(exc, RecursionError):
        return RequestError(ErrorCode.BAD_REQUEST, "the JSON is nested too deeply")
    if isinstance(exc, msgspec.DecodeError):
        return RequestError(ErrorCode.BAD_REQUEST, f"the body is not valid JSON: {exc}")
    return RequestError(ErrorCode.BAD_REQUEST, f"undecodable request ({type(exc).__name__}: {exc})")


def check_limits(request: Request, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise ``RequestError(too_large)`` when a question is longer than ``limits.max_question_chars``
    characters (Unicode code points), ``RequestError(bad_request)`` when it is only white space."""
    text = None
    if isinstance(request, Ask):
        text = request.question
    elif isinstance(request, AddQuestion):
        text = request.text
    if text is not None and not text.strip():
        raise RequestError(ErrorCode.BAD_REQUEST, f"the question {text!r:.40} is blank: ask something", request.id)
    if text is not None and len(text) > limits.max_question_chars:
        raise RequestError(
            ErrorCode.TOO_LARGE,
            f"the question is {len(text)} characters; the limit is {limits.max_question_chars}",
            request.id,
        )


def ok_reply(request_id: RequestId | None, result: msgspec.Struct) -> bytes:
    """Encode an ok reply carrying ``result``."""
    return encode(Reply(id=request_id, ok=True, result=result))


def error_reply(request_id: RequestId | None, code: ErrorCode, message: str) -> bytes:
    """Encode an error reply."""
    return encode(Reply(id=request_id, ok=False, error=Error(ErrorCode(code), message)))


def decode_reply(data: bytes | bytearray | memoryview) -> WireReply:
    """Decode a reply envelope (raises ``msgspec.DecodeError`` / ``ValidationError`` when malformed)."""
    reply = _reply_decoder.decode(data)
    if not reply.ok and reply.error is None:
        raise msgspec.ValidationError('a reply with "ok": false must carry "error"')
    return reply


def decode_result(reply: WireReply, result_type: type[msgspec.Struct]) -> Any:
    """Decode an ok reply's raw ``result`` into ``result_type``."""
    return msgspec.json.decode(reply.result, type=result_type)


def decode_event(data: bytes | bytearray | memoryview) -> AnyEvent:
    """Decode one event body (raises ``msgspec.DecodeError`` / ``ValidationError`` when malformed)."""
    return _event_decoder.decode(data)


# ----------------------------------------------------------------------------------------------------
# CURVE keys (pyzmq's zmq.auth; imported lazily so the schemas need only msgspec)
# ----------------------------------------------------------------------------------------------------


def create_keypair(directory: str, name: str) -> tuple[str, str]:
    """Create a CURVE key pair as ZeroMQ certificate files ``NAME.key`` (public, safe to share) and
    ``NAME.key_secret`` (keep private) in ``directory`` (created if missing). Returns both paths.
    The server's allowed-clients directory holds the clients' ``.key`` files."""
    import os

    import zmq.auth

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"a key name must be a plain file name, got {name!r}")
    os.makedirs(directory, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    os.chmod(secret_file, 0o600)
    return str(public_file), str(secret_file)


def load_keypair(path: str) -> tuple[bytes, bytes | None]:
    """Read a certificate file made by ``create_keypair``: (public key, secret key or None), Z85 bytes."""
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE certificate {path!r}: {exc}") from exc
    return public, secret
