"""Python clients for the mixmalmm engine: ``Client`` (blocking), ``AsyncClient`` (asyncio) and
``Subscriber`` (events).

Requests use the ZeroMQ guide's "Lazy Pirate" pattern: send, wait up to ``timeout_s`` for the reply,
and on a timeout throw the socket away, open a new one, and send again, at most ``retries`` more times;
then raise ``EngineTimeout``. A retried request keeps its id and body, so the reply to any attempt is
accepted, replies to older requests are skipped, and the mixmalmm server handles the request only once
(a retry joins the running request, or gets the same reply again once it is done). Request ids are
unique per process run (a random prefix and a counter).

Only the standard library, pyzmq and msgspec are imported here.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import zmq
import zmq.asyncio

from mixmalmm.clients.protocol import (
    RESULT_TYPES,
    ActionShotSettings,
    AddQuestion,
    AddStream,
    AnyEvent,
    AnyRequest,
    Ask,
    AskResult,
    ErrorCode,
    ListStreams,
    ListStreamsResult,
    MoveStream,
    MoveStreamResult,
    Ping,
    PingResult,
    RemoveQuestion,
    RemoveStream,
    SaveSnapshot,
    SaveSnapshotResult,
    StandingQuestion,
    Status,
    StatusResult,
    StreamInfo,
    WireReply,
    decode_event,
    decode_reply,
    decode_result,
    encode,
)

DEFAULT_REQUEST_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_EVENT_ENDPOINT = "tcp://127.0.0.1:5556"

# ----------------------------------------------------------------------------------------------------
# Exceptions
# ----------------------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of every error raised by the clients."""


class EngineError(ClientError):
    """The engine answered with an error reply. ``code`` is a ``protocol.ErrorCode``; ``message``
    explains it; ``request_id`` is the id of the request."""

    def __init__(self, code: ErrorCode, message: str, request_id: Any = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class EngineTimeout(ClientError):
    """No reply came within the timeout, after every retry (the engine is down, unreachable, or
    refuses this client's CURVE key)."""


class ProtocolError(ClientError):
    """The engine's reply could not be decoded (not this protocol, or a mismatched version)."""


class ClientClosed(ClientError):
    """The client was used after ``close()``."""


# ----------------------------------------------------------------------------------------------------
# CURVE
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCurve:
    """CURVE security for a client: the server's public key, and this client's key pair (Z85 bytes,
    40 each). Without a key pair a throwaway one is made (enough for a server that admits any client
    key; a server with an allowed-clients directory needs the client's own pair)."""

    server_public_key: bytes
    public_key: bytes | None = None
    secret_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.public_key is None) != (self.secret_key is None):
            raise ValueError("ClientCurve needs both public_key and secret_key, or neither")
        for name in ("server_public_key", "public_key", "secret_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, bytes) or len(value) != 40):
                raise ValueError(f"ClientCurve.{name} must be a 40-byte Z85 key, got {value!r:.60}")

    @classmethod
    def from_files(cls, server_public_file: str, client_secret_file: str | None = None) -> ClientCurve:
        """Read the server's ``.key`` certificate and, optionally, this client's ``.key_secret``."""
        from mixmalmm.clients.protocol import load_keypair

        server_public, _ = load_keypair(server_public_file)
        if client_secret_file is None:
            return cls(server_public)
        public, secret = load_keypair(client_secret_file)
        if secret is None:
            raise ValueError(f"{client_secret_file!r} holds no secret key: pass the client's .key_secret file")
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Set the CURVE options on a socket before it connects."""
        public, secret = self.public_key, self.secret_key
        if public is None:
            public, secret = zmq.curve_keypair()
        sock.curve_serverkey = self.server_public_key
        sock.curve_publickey = public
        sock.curve_secretkey = secret


# ----------------------------------------------------------------------------------------------------
# Request building shared by both clients
# ----------------------------------------------------------------------------------------------------

_ids = itertools.count(1)
_id_prefix = os.urandom(4).hex()


def _new_id() -> str:
    return f"{_id_prefix}-{next(_ids)}"


def _new_routing_id() -> bytes:
    """16 random bytes, never starting with a zero byte (ZeroMQ reserves those identities)."""
    return b"m" + os.urandom(15)


class _Requests:
    """The protocol's requests as methods. ``_call`` sends a request and returns its typed result
    (``Client``) or an awaitable of it (``AsyncClient``). ``timeout_s`` overrides the client's
    per-attempt timeout for one call, in seconds."""

    def _call(self, request: AnyRequest, timeout_s: float | None) -> Any:
        raise NotImplementedError

    def ping(self, *, timeout_s: float | None = None) -> PingResult:
        """Liveness check answered by the server's IO thread."""
        return self._call(Ping(id=_new_id()), timeout_s)

    def ask(
        self,
        stream: str,
        question: str,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        timeout_s: float | None = None,
    ) -> AskResult:
        """Ask about a stream. A question whose text is registered as a standing question on the stream
        is answered from that question's memory; any other question ad hoc."""
        request = Ask(
            id=_new_id(), stream=stream, question=question, max_new_tokens=max_new_tokens, num_beams=num_beams
        )
        return self._call(request, timeout_s)

    def status(self, stream: str | None = None, *, timeout_s: float | None = None) -> StatusResult:
        """Engine status, and that of one stream (``stream``) or all streams."""
        return self._call(Status(id=_new_id(), stream=stream), timeout_s)

    def list_streams(self, *, timeout_s: float | None = None) -> ListStreamsResult:
        return self._call(ListStreams(id=_new_id()), timeout_s)

    def add_stream(
        self,
        stream: str,
        uri: str,
        *,
        mode: Literal["auto", "live", "replay"] = "auto",
        pace: Literal["realtime", "fast"] = "realtime",
        actionshot: ActionShotSettings | None = None,
        worker: str | None = None,
        timeout_s: float | None = None,
    ) -> StreamInfo:
        """Start ingesting ``uri`` as stream ``stream`` (see ``protocol.AddStream`` for the options;
        ``worker``: on a cluster, the worker to run it on)."""
        request = AddStream(id=_new_id(), stream=stream, uri=uri, mode=mode, pace=pace, actionshot=actionshot,
                            worker=worker)
        return self._call(request, timeout_s)

    def move_stream(self, stream: str, to: str = "auto", *, timeout_s: float | None = None) -> MoveStreamResult:
        """On a cluster: move ``stream`` with its memory to worker ``to`` (or ``"auto"``)."""
        return self._call(MoveStream(id=_new_id(), stream=stream, to=to), timeout_s)

    def remove_stream(self, stream: str, *, timeout_s: float | None = None) -> StreamInfo:
        return self._call(RemoveStream(id=_new_id(), stream=stream), timeout_s)

    def add_question(
        self,
        stream: str,
        question_id: str,
        text: str,
        *,
        period_s: float | None = None,
        alert_when: str | None = None,
        alert_on_change: bool = False,
        hold_off_s: float | None = None,
        timeout_s: float | None = None,
    ) -> StandingQuestion:
        """Register a standing question; ``period_s``: answer (and publish) it every so many seconds,
        ``None``: only when asked. ``alert_when`` / ``alert_on_change`` / ``hold_off_s``: publish an
        ``alert`` event (with its evidence) when an answer matches / changes (``AddQuestion``); ValueError
        for an alert without ``period_s``."""
        request = AddQuestion(id=_new_id(), stream=stream, question_id=question_id, text=text, period_s=period_s,
                              alert_when=alert_when, alert_on_change=alert_on_change, hold_off_s=hold_off_s)
        return self._call(request, timeout_s)

    def remove_question(self, stream: str, question_id: str, *, timeout_s: float | None = None) -> StandingQuestion:
        return self._call(RemoveQuestion(id=_new_id(), stream=stream, question_id=question_id), timeout_s)

    def save_snapshot(self, stream: str | None = None, *, timeout_s: float | None = None) -> SaveSnapshotResult:
        """Write one stream's state (or every stream's) to the engine's state directory now."""
        return self._call(SaveSnapshot(id=_new_id(), stream=stream), timeout_s)


def _check_settings(timeout_s: float, retries: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries!r}")


def _open_dealer(context: zmq.Context, endpoint: str, curve: ClientCurve | None, routing_id: bytes) -> zmq.Socket:
    """A DEALER connected to ``endpoint``. ``routing_id`` is kept across reconnects: the server
    recognises a retry (same body) only from the same identity."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if curve is not None:
        curve.apply(sock)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ClientError(f"cannot connect to {endpoint!r}: {exc}") from exc
    return sock


_POLL_SLICE_MS = 200  # longest a blocking receive waits before Python looks at signals again


def _wait_readable(sock: zmq.Socket, deadline: float | None) -> bool:
    """Whether a message arrives on sock before deadline (``time.monotonic()``; None: no end).

    Polls in slices: a Ctrl-C that lands just before zmq_poll blocks (or in another thread) does not
    interrupt it, and Python raises KeyboardInterrupt only once the poll returns.
    """
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        if sock.poll(_POLL_SLICE_MS if left is None else max(1, min(_POLL_SLICE_MS, int(left * 1000))), zmq.POLLIN):
            return True


def _parse_reply(frames: list[bytes], request: AnyRequest) -> tuple[bool, Any]:
    """(matched, result) for one received message; matched is False for a stale reply."""
    if len(frames) != 2 or frames[0] != b"":
        raise ProtocolError(f"expected an empty delimiter and one JSON frame, got {len(frames)} frames")
    try:
        reply: WireReply = decode_reply(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable reply: {exc}") from exc
    if reply.id is None and not reply.ok and reply.error is not None:
        # The server could not read this request's id (it rejected the body as a whole).
        raise EngineError(reply.error.code, reply.error.message, request.id)
    if reply.id != request.id:
        return False, None
    if not reply.ok:
        assert reply.error is not None
        raise EngineError(reply.error.code, reply.error.message, request.id)
    result_type = RESULT_TYPES[type(request)]
    try:
        return True, decode_result(reply, result_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"the result of {request.id!r} is not a {result_type.__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------
# Blocking client
# ----------------------------------------------------------------------------------------------------


class Client(_Requests):
    """A blocking client. One request at a time (a lock serialises threads sharing the client).

    endpoint: the engine's request address. timeout_s: seconds to wait for each attempt's reply.
    retries: extra attempts after a timeout, each on a fresh socket. curve: CURVE settings when the
    server requires them. context: a ZeroMQ context to use (default: the process's shared one).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_REQUEST_ENDPOINT,
        *,
        timeout_s: float = 5.0,
        retries: int = 2,
        curve: ClientCurve | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        _check_settings(timeout_s, retries)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self._curve = curve
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._routing_id = _new_routing_id()
        self._sock: zmq.Socket | None = _open_dealer(self._context, endpoint, curve, self._routing_id)
        self._closed = False
        self.reconnects = 0

    def request(self, request: AnyRequest, *, timeout_s: float | None = None) -> Any:
        """Send any protocol request and return its typed result (``protocol.RESULT_TYPES``).
        Raises ``EngineError``, ``EngineTimeout``, ``ProtocolError`` or ``ClientClosed``."""
        return self._call(request, timeout_s)

    def _call(self, request: AnyRequest, timeout_s: float | None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        body = encode(request)
        with self._lock:
            for attempt in range(self.retries + 1):
                if self._closed:
                    raise ClientClosed("the client is closed")
                if attempt:
                    self._reconnect()
                assert self._sock is not None
                self._sock.send_multipart([b"", body])
                deadline = time.monotonic() + timeout_s
                while _wait_readable(self._sock, deadline):
                    matched, result = _parse_reply(self._sock.recv_multipart(), request)
                    if matched:
                        return result
            raise EngineTimeout(
                f"no reply from {self.endpoint} to {type(request).__struct_config__.tag!r} request {request.id!r} "
                f"after {self.retries + 1} attempts of {timeout_s} s"
            )

    def _reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = _open_dealer(self._context, self.endpoint, self._curve, self._routing_id)
        self.reconnects += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# asyncio client
# ----------------------------------------------------------------------------------------------------


class AsyncClient(_Requests):
    """The asyncio twin of ``Client``: the same methods, awaited. Requests from several tasks are
    sent one at a time; open several clients for parallel requests. Settings as for ``Client``."""

    def __init__(
        self,
        endpoint: str = DEFAULT_REQUEST_ENDPOINT,
        *,
        timeout_s: float = 5.0,
        retries: int = 2,
        curve: ClientCurve | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        _check_settings(timeout_s, retries)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self._curve = curve
        self._context = context or zmq.asyncio.Context.instance()
        self._lock = asyncio.Lock()
        self._routing_id = _new_routing_id()
        self._sock: zmq.asyncio.Socket | None = _open_dealer(self._context, endpoint, curve, self._routing_id)
        self._closed = False
        self.reconnects = 0

    async def request(self, request: AnyRequest, *, timeout_s: float | None = None) -> Any:
        """Send any protocol request and return its typed result (see ``Client.request``)."""
        return await self._call(request, timeout_s)

    async def _call(self, request: AnyRequest, timeout_s: float | None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        body = encode(request)
        async with self._lock:
            for attempt in range(self.retries + 1):
                if self._closed:
                    raise ClientClosed("the client is closed")
                if attempt:
                    self._reconnect()
                assert self._sock is not None
                await self._sock.send_multipart([b"", body])
                deadline = time.monotonic() + timeout_s
                while (left := deadline - time.monotonic()) > 0:
                    if not await self._sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                        break
                    matched, result = _parse_reply(await self._sock.recv_multipart(), request)
                    if matched:
                        return result
            raise EngineTimeout(
                f"no reply from {self.endpoint} to {type(request).__struct_config__.tag!r} request {request.id!r} "
                f"after {self.retries + 1} attempts of {timeout_s} s"
            )

    def _reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = _open_dealer(self._context, self.endpoint, self._curve, self._routing_id)
        self.reconnects += 1

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# Events
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    """Events of ``stream`` that this subscriber missed: sequence numbers ``expected`` up to
    ``received - 1`` (``missed`` of them). ZeroMQ's PUB drops events for a subscriber that falls
    behind, and a subscriber misses whatever was published before it joined; ask ``status`` to catch up."""

    stream: str
    expected: int
    received: int

    @property
    def missed(self) -> int:
        return self.received - self.expected


class Subscriber:
    """Receives engine events (``protocol.StreamStateEvent``, ``protocol.AnswerEvent``).

    endpoint: the engine's event address. streams: stream ids to receive (``None``: all).
    on_gap: called with a ``Gap`` when a stream's sequence numbers skip; gaps are also kept in
    ``gaps`` (the most recent 1000). A sequence number lower than or equal to the last one seen means
    the engine restarted: tracking of that stream starts over (counted in ``restarts``).
    Events that cannot be decoded are skipped and counted in ``malformed``.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_EVENT_ENDPOINT,
        streams: Iterable[str] | None = None,
        *,
        curve: ClientCurve | None = None,
        on_gap: Any = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._streams = None if streams is None else frozenset(streams)
        self._on_gap = on_gap
        self._context = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = self._context.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._sock)
        topics = [b""] if self._streams is None else [s.encode("utf-8") for s in self._streams]
        for topic in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise ClientError(f"cannot connect to {endpoint!r}: {exc}") from exc
        self._last_seq: dict[str, int] = {}
        self.gaps: collections.deque[Gap] = collections.deque(maxlen=1000)
        self.malformed = 0
        self.restarts = 0

    def recv(self, timeout_s: float | None = None) -> AnyEvent | None:
        """The next event, or ``None`` when none came within ``timeout_s`` seconds (``None``: wait)."""
        if self._sock is None:
            raise ClientClosed("the subscriber is closed")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while _wait_readable(self._sock, deadline):
            event = self._accept(self._sock.recv_multipart())
            if event is not None:
                return event
        return None

    def _accept(self, frames: list[bytes]) -> AnyEvent | None:
        if len(frames) != 2:
            self.malformed += 1
            return None
        topic, body = frames
        try:
            event = decode_event(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            self.malformed += 1
            return None
        if event.stream.encode("utf-8") != topic:
            self.malformed += 1
            return None
        if self._streams is not None and event.stream not in self._streams:
            return None  # a prefix match ("cam1" subscribed, "cam10" received)
        last = self._last_seq.get(event.stream)
        if last is not None:
            if event.seq <= last:
                self.restarts += 1
            elif event.seq != last + 1:
                gap = Gap(event.stream, last + 1, event.seq)
                self.gaps.append(gap)
                if self._on_gap is not None:
                    self._on_gap(gap)
        self._last_seq[event.stream] = event.seq
        return event

    def __iter__(self) -> Iterator[AnyEvent]:
        """Yield events as they come, forever (until ``close``)."""
        while self._sock is not None:
            event = self.recv()
            if event is not None:
                yield event

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
