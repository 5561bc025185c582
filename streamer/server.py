"""The engine's ZeroMQ server: a ROUTER for requests and a PUB for events, both in one IO thread.

Shape (shared/DESIGN.md §6, the ZeroMQ guide, vllm's engine core):

* One IO thread owns every socket. It reads requests from the ROUTER, validates them with
  ``mixmalmm.clients.protocol.decode_request`` (malformed input gets an error reply at once), answers
  ``ping`` itself, and hands every other request to a worker pool that calls the engine's
  ``Handler.handle``. ``ask`` and ``save_snapshot`` run on their own pool so that slow questions never
  hold up ``status`` or stream management.
* Workers never touch a socket: they put encoded replies on a queue and wake the IO thread through a
  socket pair, which the IO thread polls beside the ROUTER (no busy polling). ``publish`` does the same
  for events; the IO thread gives each event its per-stream sequence number and sends it on the PUB
  with the stream id as the topic frame.
* ``ROUTER_MANDATORY`` with non-blocking sends: a reply to a client that vanished (EHOSTUNREACH) or
  that does not read (EAGAIN at the high-water mark) is dropped and counted; the server never blocks.
  ``MAXMSGSIZE`` makes ZeroMQ disconnect a peer that sends more than ``Limits.max_message_bytes``.
* Security: loopback (and ``ipc://`` / ``inproc://``) binds are allowed as they are; any other bind needs
  CURVE (``CurveKeys``: the server's key pair and a directory of allowed client public keys, enforced
  by ``zmq.auth``'s ThreadAuthenticator) or ``insecure=True``. This is checked before anything binds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mixmalmm.clients.protocol import (
    DEFAULT_LIMITS,
    RESULT_TYPES,
    AnyEvent,
    AnyRequest,
    Ask,
    ErrorCode,
    Limits,
    Ping,
    PingResult,
    RequestError,
    SaveSnapshot,
    decode_request,
    encode,
    error_reply,
    load_keypair,
    ok_reply,
)

log = logging.getLogger("mixmalmm.server")

DEFAULT_REQUEST_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_EVENT_ENDPOINT = "tcp://127.0.0.1:5556"

#: Requests that may take long (a model forward pass, a disk write) run on their own worker pool.
SLOW_REQUESTS = (Ask, SaveSnapshot)


class EventFanout:
    """The engine's ``publish`` callback when several sinks take its events (the ZeroMQ server, the console,
    an alert webhook): each event gets its stream's next ``seq`` (1, 2, ...) once, here, and every sink
    gets it so numbered, so the console's server-sent events and the PUB socket carry the same numbers.
    Sinks are called in order under one lock (each sink's ``publish`` only queues, never blocks), so the
    numbers reach every sink in order."""

    def __init__(self, sinks: list | None = None, held: bool = False) -> None:
        self.sinks: list = list(sinks or [])
        self._seq: dict[str, int] = collections.defaultdict(int)
        self._lock = threading.Lock()
        #: With ``held``, events wait (in order, at most 10,000) until `release`: those of streams restored
        #: while the engine starts, before the server that would send them is up.
        self._held: collections.deque | None = collections.deque(maxlen=10_000) if held else None

    def add(self, sink) -> None:
        with self._lock:
            self.sinks.append(sink)

    def release(self) -> None:
        """Send the events held so far, then every event as it comes."""
        with self._lock:
            held, self._held = self._held, None
            for event in held or ():
                self._send(event)

    def publish(self, event) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(event)
                return
            self._send(event)

    def _send(self, event) -> None:
        """Number the event and hand it to every sink; call with ``self._lock``."""
        seq = self._seq[event.stream] + 1
        self._seq[event.stream] = seq
        event = msgspec.structs.replace(event, seq=seq)
        for sink in self.sinks:
            try:
                sink.publish(event)
            except Exception:  # one sink's bug must not keep the event from the others
                log.exception("a sink (%s) failed on an event", type(sink).__name__)


class Handler(Protocol):
    """What the engine implements for the server.

    ``handle`` is called from worker threads (several at once: it must be thread-safe) with a validated
    request of any type but ``Ping`` and ``arrived``, ``time.perf_counter()`` when the request came off
    the socket (before it waited for a worker: latencies count from there). It returns the result struct that ``protocol.RESULT_TYPES`` names
    for the request's type (``AskResult`` for ``Ask`` ...), or raises ``protocol.RequestError`` with an
    ``ErrorCode`` for a request it cannot serve (unknown stream ...). Any other exception becomes an
    ``internal`` error reply and is logged with its traceback; the server goes on.
    """

    def handle(self, request: AnyRequest, arrived: float) -> msgspec.Struct: ...


class ServerError(RuntimeError):
    """The server could not start (bad endpoint, address in use, unreadable keys)."""


class InsecureBindError(ServerError, ValueError):
    """A non-loopback bind was asked for without CURVE keys or ``insecure=True``."""


@dataclass(frozen=True)
class CurveKeys:
    """CURVE security for the server.

    public_key / secret_key: the server's key pair (Z85, 40 bytes each).
    allowed_clients_dir: a directory of client public-key certificates (``*.key`` files made by
      ``protocol.create_keypair``); only those clients may connect. ``None`` admits any client that
      speaks CURVE with the server's public key (encrypted, but not authenticated).
    """

    public_key: bytes
    secret_key: bytes
    allowed_clients_dir: str | None = None

    @classmethod
    def from_files(cls, secret_file: str, allowed_clients_dir: str | None) -> CurveKeys:
        """Load the server's key pair from its ``.key_secret`` certificate file."""
        public, secret = load_keypair(secret_file)
        if secret is None:
            raise ServerError(f"{secret_file!r} holds no secret key: pass the server's .key_secret file")
        return cls(public, secret, allowed_clients_dir)

    def __post_init__(self) -> None:
        for name in ("public_key", "secret_key"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 40:
                raise ValueError(f"CurveKeys.{name} must be a 40-byte Z85 key, got {value!r:.60}")
        if self.allowed_clients_dir is not None and not os.path.isdir(self.allowed_clients_dir):
            raise ValueError(f"CurveKeys.allowed_clients_dir {self.allowed_clients_dir!r} is not a directory")


def is_local_endpoint(endpoint: str) -> bool:
    """True for ``inproc://``, ``ipc://`` and ``tcp://`` on a loopback address (127.0.0.0/8, ::1,
    localhost). Raises ``ServerError`` for a string that is not a ZeroMQ endpoint."""
    transport, sep, address = endpoint.partition("://")
    if not sep or not address:
        raise ServerError(f"{endpoint!r} is not a ZeroMQ endpoint (expected e.g. tcp://127.0.0.1:5555)")
    if transport in ("inproc", "ipc"):
        return True
    if transport != "tcp":
        return False
    host, sep, _port = address.rpartition(":")
    if not sep:
        raise ServerError(f"{endpoint!r} has no port (expected e.g. tcp://127.0.0.1:5555)")
    host = host.split(";")[-1]  # tcp://source;destination form
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: not provably loopback
        return False


def check_bind_security(endpoint: str, curve: CurveKeys | None, insecure: bool) -> None:
    """Raise ``InsecureBindError`` unless ``endpoint`` is local, CURVE is configured, or ``insecure``."""
    if is_local_endpoint(endpoint) or curve is not None or insecure:
        return
    raise InsecureBindError(
        f"refusing to bind {endpoint!r} without security: it is not a loopback address. Give CURVE keys "
        "(CurveKeys: the server's key pair and a directory of allowed client keys) or pass insecure=True "
        "to accept unauthenticated, unencrypted traffic from the network."
    )


class Server:
    """ROUTER + PUB server in front of a ``Handler``.

    request_endpoint / event_endpoint: where to bind (``tcp://127.0.0.1:*`` picks a free port; read the
      result from ``request_address`` / ``event_address``). ``event_endpoint=None``: no PUB socket.
    limits: request bounds (message size in bytes, question length in characters).
    curve / insecure: see ``check_bind_security``; with ``curve`` both sockets require CURVE.
    ask_workers: threads for ``ask`` and ``save_snapshot``; control_workers: threads for the others. An
      ``ask`` thread mostly waits while the engine answers the questions waiting together (one batched
      generation), so there are as many as questions one batch takes (the engine's ``max_questions``).
    max_in_flight: requests accepted but not yet answered; beyond it a request gets ``busy`` at once.
    reply_hwm / event_hwm: send high-water marks (messages) of the ROUTER (per client) and PUB
      (per subscriber); beyond them replies are dropped (counted) and events are dropped by ZeroMQ.
    linger_s: seconds ``stop`` lets queued outgoing messages flush before the sockets close.
    replay_s: a request identical to an earlier one from the same client (same ROUTER identity, same
      body: a client's retry) is not handled twice. While the first is being handled the retry waits
      for its reply; for ``replay_s`` seconds after (at most 1024 replies kept) it gets the same reply
      again. A client that reconnects keeps its identity only if it sets ``ZMQ_ROUTING_ID`` (the Python
      clients do; ``ROUTER_HANDOVER`` lets the new connection take the identity over at once); one
      that does not is another client, whose retries are handled anew.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        request_endpoint: str = DEFAULT_REQUEST_ENDPOINT,
        event_endpoint: str | None = DEFAULT_EVENT_ENDPOINT,
        limits: Limits = DEFAULT_LIMITS,
        curve: CurveKeys | None = None,
        insecure: bool = False,
        ask_workers: int = 32,
        control_workers: int = 2,
        max_in_flight: int = 256,
        reply_hwm: int = 1000,
        event_hwm: int = 10_000,
        linger_s: float = 0.2,
        replay_s: float = 60.0,
    ) -> None:
        if ask_workers < 1 or control_workers < 1 or max_in_flight < 1:
            raise ValueError("ask_workers, control_workers and max_in_flight must be at least 1")
        endpoints = [request_endpoint] + ([event_endpoint] if event_endpoint is not None else [])
        for endpoint in endpoints:
            check_bind_security(endpoint, curve, insecure)
            if curve is None and not is_local_endpoint(endpoint):
                log.warning("binding %s with insecure=True: no authentication, no encryption", endpoint)
        self._handler = handler
        self._request_endpoint = request_endpoint
        self._event_endpoint = event_endpoint
        self._limits = limits
        self._curve = curve
        self._ask_workers = ask_workers
        self._control_workers = control_workers
        self._max_in_flight = max_in_flight
        self._reply_hwm = reply_hwm
        self._event_hwm = event_hwm
        self._linger_ms = max(0, int(linger_s * 1000))

        self._outbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._context: zmq.Context | None = None
        self._auth: ThreadAuthenticator | None = None
        self._slow_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._control_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._seq: dict[str, int] = collections.defaultdict(int)
        self._in_flight = 0
        # Retries (same id, same body) are answered once: joined while running, replayed after.
        self._pending: dict[bytes, list[list[bytes]]] = {}
        self._recent: collections.OrderedDict[bytes, tuple[float, bytes]] = collections.OrderedDict()
        self._replay_s = replay_s
        self._replay_entries = 1024
        self._started_at = time.time()
        self._stats = collections.Counter()
        self.request_address: str | None = None
        self.event_address: str | None = None

    # ------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> Server:
        """Bind both sockets and start the IO thread; returns once bound. Raises ``ServerError``."""
        if self._thread is not None:
            raise ServerError("the server was already started (a Server object starts once)")
        self._started_at = time.time()
        self._context = zmq.Context()
        self._slow_pool = concurrent.futures.ThreadPoolExecutor(self._ask_workers, thread_name_prefix="mixmalmm-ask")
        self._control_pool = concurrent.futures.ThreadPoolExecutor(
            self._control_workers, thread_name_prefix="mixmalmm-control"
        )
        try:
            if self._curve is not None:
                self._auth = ThreadAuthenticator(self._context, log=logging.getLogger("mixmalmm.server.auth"))
                self._auth.start()
                location = self._curve.allowed_clients_dir or zmq.auth.CURVE_ALLOW_ANY
                self._auth.configure_curve(domain="*", location=location)
            self._thread = threading.Thread(target=self._run, name="mixmalmm-server-io", daemon=True)
            self._thread.start()
            if not self._ready.wait(timeout_s):
                raise ServerError(f"the server's IO thread did not come up within {timeout_s} s")
            if self._start_error is not None:
                raise ServerError(str(self._start_error)) from self._start_error
        except BaseException:
            self.stop()
            raise
        log.info("serving requests on %s, events on %s", self.request_address, self.event_address)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop: the IO thread closes its sockets (flushing for at most ``linger_s``), requests not yet
        started are cancelled, running handler calls finish in the background with their replies
        discarded, and the ZeroMQ context is terminated. Safe to call more than once."""
        self._stopping.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the server's IO thread did not stop within %s s", timeout_s)
        for pool in (self._slow_pool, self._control_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None and (self._thread is None or not self._thread.is_alive()):
            self._context.term()
            self._context = None
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> Server:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def stats(self) -> dict[str, int]:
        """Counters: requests, error_replies, replies_dropped (client gone or not reading), busy,
        events_published, retries_joined / retries_replayed (duplicates answered without handling them
        again), in_flight."""
        keys = ("requests", "error_replies", "replies_dropped", "busy", "events_published", "retries_joined",
                "retries_replayed")
        out = {key: 0 for key in keys}
        out.update(self._stats)
        out["in_flight"] = self._in_flight
        return out

    # ------------------------------------------------------------------------------------------------
    # Events
    # ------------------------------------------------------------------------------------------------

    def publish(self, event: AnyEvent) -> bool:
        """Queue ``event`` for the PUB socket, topic ``event.stream``; thread-safe, never blocks.

        The IO thread sets ``event.seq`` to the stream's next sequence number (1, 2, ...) as it sends.
        Returns False (and drops the event) when the server is not running or has no PUB socket.
        """
        if self._event_endpoint is None or not self.running:
            return False
        self._outbox.put(("event", None, event))
        self._wake()
        return True

    # ------------------------------------------------------------------------------------------------
    # IO thread
    # ------------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full: a wake-up is already pending
        except OSError:
            pass  # closed by stop()

    def _run(self) -> None:
        assert self._context is not None
        router = pub = None
        endpoint = self._request_endpoint
        try:
            try:
                router = self._socket(zmq.ROUTER)
                router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnected client keeps its routing id
                router.setsockopt(zmq.MAXMSGSIZE, self._limits.max_message_bytes)
                router.setsockopt(zmq.SNDHWM, self._reply_hwm)
                router.setsockopt(zmq.RCVHWM, self._reply_hwm)
                router.bind(self._request_endpoint)
                self.request_address = router.getsockopt_string(zmq.LAST_ENDPOINT)
                if self._event_endpoint is not None:
                    endpoint = self._event_endpoint
                    pub = self._socket(zmq.PUB)
                    pub.setsockopt(zmq.SNDHWM, self._event_hwm)
                    pub.bind(self._event_endpoint)
                    self.event_address = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            except zmq.ZMQError as exc:
                self._start_error = ServerError(f"cannot bind {endpoint!r}: {exc}")
                return
            finally:
                self._ready.set()
            self._loop(router, pub)
        except Exception:
            log.exception("the server's IO thread failed; the server is stopping")
        finally:
            self._stopping.set()
            for sock in (router, pub):
                if sock is not None:
                    sock.close(linger=self._linger_ms)

    def _socket(self, kind: int) -> zmq.Socket:
        assert self._context is not None
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        if self._curve is not None:
            sock.curve_secretkey = self._curve.secret_key
            sock.curve_publickey = self._curve.public_key
            sock.curve_server = True
        return sock

    def _loop(self, router: zmq.Socket, pub: zmq.Socket | None) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        while not self._stopping.is_set():
            ready = dict(poller.poll())
            if self._wake_r.fileno() in ready:
                self._drain_wake()
            self._send_outbox(router, pub)
            if router in ready:
                for _ in range(256):  # bounded, so replies and events get their turn
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_request(router, frames)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _send_outbox(self, router: zmq.Socket, pub: zmq.Socket | None) -> None:
        while True:
            try:
                kind, key, payload = self._outbox.get_nowait()
            except queue.Empty:
                return
            if kind == "reply":
                self._in_flight -= 1
                body, failed = payload
                self._stats["error_replies"] += failed
                self._remember(key, body)
                for envelope in self._pending.pop(key, []):
                    self._send_reply(router, envelope, body)
            elif pub is not None:
                self._send_event(pub, payload)

    def _send_reply(self, router: zmq.Socket, envelope: list[bytes], body: bytes) -> None:
        try:
            router.send_multipart([*envelope, body], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client disconnected; EAGAIN: it does not read (its queue is full).
            self._stats["replies_dropped"] += 1
            log.debug("reply dropped (%s)", exc)

    def _send_event(self, pub: zmq.Socket, event: AnyEvent) -> None:
        try:
            # An `EventFanout` numbers events for every sink at once; one not numbered is numbered here.
            seq = event.seq if event.seq > 0 else self._seq[event.stream] + 1
            body = encode(msgspec.structs.replace(event, seq=seq))
            topic = event.stream.encode("utf-8")
        except Exception:
            log.exception("cannot encode event %r; dropped", event)
            return
        self._seq[event.stream] = seq
        with contextlib.suppress(zmq.Again):  # PUB drops for slow subscribers; they see the gap in seq
            pub.send_multipart([topic, body], zmq.NOBLOCK)
        self._stats["events_published"] += 1

    def _on_request(self, router: zmq.Socket, frames: list[bytes]) -> None:
        arrived = time.perf_counter()
        self._stats["requests"] += 1
        identity, rest = frames[0], frames[1:]
        if len(rest) == 1:
            envelope, body = [identity], rest[0]
        elif len(rest) == 2 and rest[0] == b"":
            envelope, body = [identity, b""], rest[1]
        else:
            envelope = [identity, b""] if rest and rest[0] == b"" else [identity]
            self._reply_error(
                router, envelope, None, ErrorCode.BAD_REQUEST,
                f"expected one JSON frame (after an empty delimiter frame for REQ sockets), got {len(rest)} frames",
            )
            return
        try:
            request = decode_request(body, self._limits)
        except RequestError as exc:
            self._reply_error(router, envelope, exc.request_id, exc.code, exc.message)
            return
        if isinstance(request, Ping):
            now = time.time()
            self._send_reply(router, envelope, ok_reply(request.id, PingResult(time_s=now, uptime_s=now - self._started_at)))
            return
        # Per client: another client's request with the same id and body is not its retry.
        # (A routing id is 1-255 bytes, blake2b's key at most 64: the id's length-prefixed bytes go first.)
        key = hashlib.blake2b(len(identity).to_bytes(1, "big") + identity + body, digest_size=16).digest()
        if key in self._pending:  # a retry of a request still being handled: answer it when done
            self._stats["retries_joined"] += 1
            self._pending[key].append(envelope)
            return
        if key in self._recent:  # a retry of a request already handled: the same reply again
            self._stats["retries_replayed"] += 1
            self._send_reply(router, envelope, self._recent[key][1])
            return
        if self._in_flight >= self._max_in_flight:
            self._stats["busy"] += 1
            self._reply_error(
                router, envelope, request.id, ErrorCode.BUSY,
                f"{self._in_flight} requests are in flight (the limit is {self._max_in_flight}); retry later",
            )
            return
        pool = self._slow_pool if isinstance(request, SLOW_REQUESTS) else self._control_pool
        assert pool is not None
        try:
            pool.submit(self._work, key, request, arrived)
        except RuntimeError:  # the pool was shut down: we are stopping
            self._reply_error(router, envelope, request.id, ErrorCode.UNAVAILABLE, "the server is shutting down")
            return
        self._in_flight += 1
        self._pending[key] = [envelope]

    def _remember(self, key: bytes, body: bytes) -> None:
        now = time.monotonic()
        self._recent[key] = (now, body)
        while self._recent and (
            len(self._recent) > self._replay_entries or next(iter(self._recent.values()))[0] < now - self._replay_s
        ):
            self._recent.popitem(last=False)

    def _reply_error(self, router: zmq.Socket, envelope: list[bytes], request_id: Any, code: ErrorCode, message: str) -> None:
        self._stats["error_replies"] += 1
        self._send_reply(router, envelope, error_reply(request_id, code, message))

    # ------------------------------------------------------------------------------------------------
    # Worker threads
    # ------------------------------------------------------------------------------------------------

    def _work(self, key: bytes, request: AnyRequest, arrived: float) -> None:
        kind = type(request).__struct_config__.tag
        failed = True
        try:
            result = self._handler.handle(request, arrived)
            expected = RESULT_TYPES[type(request)]
            if not isinstance(result, expected):
                log.error("the handler returned %s for %r, expected %s", type(result).__name__, kind, expected.__name__)
                body = error_reply(
                    request.id, ErrorCode.INTERNAL,
                    f"the engine returned {type(result).__name__} for {kind!r}, expected {expected.__name__}",
                )
            else:
                body = ok_reply(request.id, result)
                failed = False
        except RequestError as exc:
            body = error_reply(request.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("the handler failed on %r request %r", kind, request.id)
            body = error_reply(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        self._outbox.put(("reply", key, (body, failed)))
        self._wake()
