"""The web console: one page and a small HTTP/JSON layer in front of the engine's ``Handler``.

``serve --http 127.0.0.1:8080`` (and ``demo --console``) start it beside the ZeroMQ server. It speaks the
same protocol: a request is the same JSON object a ZeroMQ client sends, decoded with
``protocol.decode_request`` and handed to the same ``Handler.handle``; the reply is the same envelope.

Endpoints (all GET but ``/api/request``):

* ``/`` : the page (``assets/console.html``, plain HTML/JS, no build step).
* ``POST /api/request`` : body = one protocol request (``{"id": 1, "type": "ask", "stream": "cam",
  "question": "..."}``); reply = the protocol reply (``{"id": 1, "ok": true, "result": {...}}``). 400 for
  bad JSON or a bad request, 404 for an unknown stream, 413 for a body over ``Limits.max_message_bytes``,
  503 when the engine is busy or stopping; the body is then the protocol's error reply.
* ``/api/events`` : server-sent events, one ``data:`` line per protocol event (its JSON, ``type`` among
  ``stream_state``, ``answer`` and whatever types the engine publishes later, e.g. ``alert``).
* ``/api/streams/<id>/shot.jpg`` : the last Shot folded into that stream's memory, JPEG; 404 for an
  unknown stream or before its first Shot.
* ``/api/streams/<id>/memory.jpg`` : that stream's memory contact sheet (`Engine.memory_sheet`: thumbnails
  of Shots it holds, evenly spread over its span, each with its span and held share), JPEG; 404 likewise.

Security: requests another web site could make are refused (a non-loopback ``Host`` while bound to
loopback, against DNS rebinding; a foreign ``Origin``; a POST not declared ``application/json``). And
the rule of the ZeroMQ binds: a non-loopback address needs ``insecure=True`` (``serve
--insecure``); CURVE keys do not count, HTTP has no authentication (``check_console_security``).
"""

from __future__ import annotations

import http.server
import logging
import queue
import threading
import time
from importlib import resources
from urllib.parse import unquote, urlsplit

import msgspec

from mixmalmm.clients.protocol import (
    DEFAULT_LIMITS,
    RESULT_TYPES,
    ErrorCode,
    Limits,
    Ping,
    PingResult,
    RequestError,
    decode_request,
    encode,
    error_reply,
    ok_reply,
)

from .server import Handler, InsecureBindError, ServerError, is_local_endpoint

log = logging.getLogger("mixmalmm.console")

#: HTTP status for each protocol error code (anything else: 500).
HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_STREAM: 404,
    ErrorCode.UNKNOWN_QUESTION: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.BUSY: 503,
    ErrorCode.UNAVAILABLE: 503,
}

#: Events kept per SSE client that does not read; beyond it the oldest are dropped.
CLIENT_QUEUE = 256
#: Requests (POST /api/request and the pictures) the console serves at once; beyond, 503 busy.
MAX_IN_FLIGHT = 32
#: Event streams (GET /api/events) open at once; beyond, 503 busy.
MAX_EVENT_CLIENTS = 16


def parse_http_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ("127.0.0.1", 8080); ``[::1]:8080`` for IPv6. ValueError names the problem."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def check_console_security(address: str, insecure: bool) -> None:
    """The ZeroMQ binds' rule for the console: a non-loopback address needs ``insecure`` (HTTP has no
    CURVE, so keys do not count). Raises ``InsecureBindError``, or ValueError for a bad address."""
    host, port = parse_http_address(address)
    if insecure or is_local_endpoint(f"tcp://{host}:{port}"):
        return
    raise InsecureBindError(
        f"refusing to serve the console on {address!r} without --insecure: it is not a loopback address and "
        "the console has no authentication or encryption (bind 127.0.0.1 and tunnel, or pass --insecure)"
    )


class Console:
    """The HTTP server of the console. ``publish(event)`` fans an event out to the SSE clients; call it
    from the engine's publish callback beside ``Server.publish``."""

    def __init__(self, handler: Handler, engine=None, *, address: str = "127.0.0.1:8080",
                 limits: Limits = DEFAULT_LIMITS, insecure: bool = False, max_in_flight: int = MAX_IN_FLIGHT,
                 max_event_clients: int = MAX_EVENT_CLIENTS) -> None:
        check_console_security(address, insecure)
        host, port = parse_http_address(address)
        self._handler = handler
        self._engine = engine if engine is not None else handler
        self._limits = limits
        self._host, self._port = host, port
        self._loopback = is_local_endpoint(f"tcp://{host}:{port}")  # then only loopback Host names are answered
        self._clients: set[queue.Queue] = set()
        self._clients_lock = threading.Lock()
        self._max_event_clients = max_event_clients
        # Each HTTP connection is a thread: the bound keeps a flood of requests from piling up threads
        # that all wait on the engine (the ZeroMQ server's bound is its worker pools).
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        self._seq: dict[str, int] = {}
        self._stopping = threading.Event()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._page = resources.files("mixmalmm.streamer").joinpath("assets/console.html").read_bytes()
        self._started = time.time()
        self.url: str | None = None

    def start(self) -> Console:
        console = self

        class _Handler(_RequestHandler):
            pass

        _Handler.console = console
        family_host = self._host
        try:
            server_class = http.server.ThreadingHTTPServer
            if ":" in family_host:
                import socket

                class _V6(http.server.ThreadingHTTPServer):
                    address_family = socket.AF_INET6

                server_class = _V6
            self._httpd = server_class((family_host, self._port), _Handler)
        except OSError as exc:
            raise ServerError(f"cannot bind the console on {self._host}:{self._port}: {exc}") from exc
        self._httpd.daemon_threads = True
        port = self._httpd.server_address[1]
        shown = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{shown}:{port}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mixmalmm-console", daemon=True)
        self._thread.start()
        log.info("console on %s", self.url)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._clients_lock:
            for q in self._clients:
                q.put_nowait(None)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Console:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ events

    def publish(self, event: msgspec.Struct) -> None:
        """Send ``event`` to every SSE client (never blocks; a client that does not read loses the oldest)."""
        with self._clients_lock:
            if not self._clients:
                return
            # numbered by the `server.EventFanout` for the PUB socket too; else counted here
            seq = event.seq if event.seq > 0 else self._seq.get(event.stream, 0) + 1
            self._seq[event.stream] = seq
            try:
                body = encode(msgspec.structs.replace(event, seq=seq))
            except Exception:
                log.exception("cannot encode event %r; dropped", event)
                return
            for q in self._clients:
                try:
                    q.put_nowait(body)
                except queue.Full:
                    try:
                        q.get_nowait()
                        q.put_nowait(body)
                    except (queue.Empty, queue.Full):
                        pass

    def _subscribe(self) -> queue.Queue | None:
        """A new SSE client's queue; None when `max_event_clients` are open."""
        q: queue.Queue = queue.Queue(CLIENT_QUEUE)
        with self._clients_lock:
            if len(self._clients) >= self._max_event_clients:
                return None
            self._clients.add(q)
        return q

    def _unsubscribe(self, q: queue.Queue) -> None:
        with self._clients_lock:
            self._clients.discard(q)

    @property
    def clients(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    # ------------------------------------------------------------------ requests

    def request(self, body: bytes) -> tuple[int, bytes]:
        """One protocol request's JSON -> (HTTP status, protocol reply JSON)."""
        try:
            request = decode_request(body, self._limits)
        except RequestError as exc:
            return HTTP_STATUS.get(exc.code, 400), error_reply(exc.request_id, exc.code, exc.message)
        if isinstance(request, Ping):
            now = time.time()
            return 200, ok_reply(request.id, PingResult(time_s=now, uptime_s=now - self._started))
        try:
            result = self._handler.handle(request, time.perf_counter())
        except RequestError as exc:
            return HTTP_STATUS.get(exc.code, 500), error_reply(request.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("the handler failed on an HTTP request")
            return 500, error_reply(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        expected = RESULT_TYPES[type(request)]
        if not isinstance(result, expected):
            return 500, error_reply(request.id, ErrorCode.INTERNAL,
                                    f"the engine returned {type(result).__name__}, expected {expected.__name__}")
        return 200, ok_reply(request.id, result)

    def shot_jpeg(self, sid: str) -> bytes | None:
        """The stream's last Shot as JPEG; None before its first Shot. RequestError: unknown stream."""
        from .alerts import encode_jpeg

        shot = self._engine._get(sid).latest_shot
        return None if shot is None else encode_jpeg(shot.image, max_bytes=1 << 22, quality=80)

    def memory_jpeg(self, sid: str) -> bytes | None:
        """The stream's memory contact sheet as JPEG; None before its first Shot. RequestError: unknown stream."""
        from .alerts import encode_jpeg

        sheet = self._engine.memory_sheet(sid)
        return None if sheet is None else encode_jpeg(sheet, max_bytes=1 << 22)


def _loopback_name(name: str) -> bool:
    """A ``Host`` header's name (no port, no brackets) is localhost or a loopback address."""
    if name == "localhost":
        return True
    try:
        return bool(name) and ";" not in name and is_local_endpoint(f"tcp://{name}:1")
    except ServerError:
        return False


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    console: Console
    protocol_version = "HTTP/1.1"
    server_version = "mixmalmm-console"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: ErrorCode, message: str) -> None:
        self._send(status, error_reply(None, code, message))

    def _refused(self, post: bool = False) -> bool:
        """Answers 403 (or 415) and returns True for a request another web site could have made: a ``Host``
        that is not a loopback name while the console is bound to loopback (DNS rebinding), an ``Origin``
        that is not the console's own, or a POST whose body is not declared JSON (a cross-site form or
        ``text/plain`` fetch, which browsers send without asking first)."""
        host = self.headers.get("Host", "")
        name = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
        name = name.strip("[]").lower()
        if self.console._loopback and not _loopback_name(name):
            self._error(403, ErrorCode.BAD_REQUEST, f"refused: Host {host!r} is not a loopback name (the console "
                                                    "answers only pages it serves itself)")
            return True
        origin = self.headers.get("Origin")
        if origin is not None and origin.rstrip("/").lower() != f"http://{host}".lower():
            self._error(403, ErrorCode.BAD_REQUEST, f"refused: a request from another site ({origin!r})")
            return True
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if post and ctype != "application/json":
            self.close_connection = True
            self._error(415, ErrorCode.BAD_REQUEST, "a request's body must be sent as Content-Type: application/json")
            return True
        return False

    def _busy(self) -> None:
        self._error(503, ErrorCode.BUSY, f"the console serves {self.console.max_in_flight} requests at once; "
                                         "retry later")

    def do_GET(self) -> None:
        if self._refused():
            return
        path = unquote(urlsplit(self.path).path)
        if path == "/api/events":
            self._events()
            return
        if not self.console._in_flight.acquire(blocking=False):
            self._busy()
            return
        try:
            self._get(path)
        finally:
            self.console._in_flight.release()

    def _get(self, path: str) -> None:
        if path in ("/", "/index.html"):
            self._send(200, self.console._page, "text/html; charset=utf-8")
        elif path.startswith("/api/streams/") and path.endswith(("/shot.jpg", "/memory.jpg")):
            sid, _, picture = path[len("/api/streams/"):].rpartition("/")
            try:
                data = self.console.shot_jpeg(sid) if picture == "shot.jpg" else self.console.memory_jpeg(sid)
            except RequestError as exc:
                self._error(HTTP_STATUS.get(exc.code, 404), exc.code, exc.message)
                return
            if data is None:
                self._error(404, ErrorCode.UNKNOWN_STREAM, f"stream {sid!r} has no Shot yet")
            else:
                self._send(200, data, "image/jpeg")
        else:
            self._error(404, ErrorCode.BAD_REQUEST, f"no such page {path!r} (see README: the console's endpoints)")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path != "/api/request":
            self._error(404, ErrorCode.BAD_REQUEST, f"no such endpoint {path!r}: POST requests go to /api/request")
            return
        if self._refused(post=True):
            return
        limit = self.console._limits.max_message_bytes
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(411, ErrorCode.BAD_REQUEST, "a request needs a Content-Length header (a byte count)")
            return
        if length > limit:
            self.close_connection = True  # the body is not read
            self._error(413, ErrorCode.TOO_LARGE, f"the request is {length} bytes, more than the limit of {limit}")
            return
        body = self.rfile.read(length)
        if not self.console._in_flight.acquire(blocking=False):
            self._busy()
            return
        try:
            status, reply = self.console.request(body)
        finally:
            self.console._in_flight.release()
        self._send(status, reply)

    def _events(self) -> None:
        q = self.console._subscribe()
        if q is None:
            self._error(503, ErrorCode.BUSY, f"the console has {self.console._max_event_clients} event streams "
                                             "open, its limit; close one")
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(b": connected\n\n")
            self.wfile.flush()
            while not self.console._stopping.is_set():
                try:
                    body = q.get(timeout=15.0)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")  # finds clients that left
                    self.wfile.flush()
                    continue
                if body is None:
                    break
                self.wfile.write(b"data: " + body + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.console._unsubscribe(q)
            self.close_connection = True


