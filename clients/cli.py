"""The ``mixmalmm`` command.

Client subcommands talk to a running engine over ZeroMQ (``ask``, ``status``, ``watch``, ``streams``,
``questions``, ``snapshot``, ``ping``) or work locally (``keys``). Server subcommands (``serve``,
``replay``, ``demo``, ``train``) live in ``mixmalmm.streamer.cli``, which needs torch: they are
dispatched to it lazily, so this module, and every client subcommand, imports only the standard
library, pyzmq and msgspec (a client-only install runs them).

Output is human-readable by default and JSON with ``--json``: the result as one JSON object (``watch``:
one object per line, events as the protocol encodes them plus ``gap`` and ``restart`` notes). A
failure after the arguments are parsed prints one line on stderr and, with ``--json``, the object
``{"error": {"code": ..., "message": ...}}`` on stdout; ``code`` is the engine's error code
(``protocol.ErrorCode``) or one of the client's own: ``no_reply``, ``usage``, ``protocol``,
``no_events``, ``not_installed``, ``not_finished`` (``streams add --wait``: the stream failed or was
stopped before it finished).

Exit status: 0 success; 1 the engine replied with an error (or the stream waited for did not
finish); 2 bad usage (arguments, address, key
files, a missing install); 3 no reply from the engine within the timeout (``watch``: fewer events than
``--count`` in time); 4 the reply was not this protocol; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgspec

from mixmalmm.clients import protocol as p
from mixmalmm.clients.client import (
    DEFAULT_EVENT_ENDPOINT,
    DEFAULT_REQUEST_ENDPOINT,
    Client,
    ClientCurve,
    ClientError,
    EngineError,
    EngineTimeout,
    Gap,
    ProtocolError,
    Subscriber,
)
from mixmalmm.clients.options import actionshot_from, add_actionshot_options

EXIT_OK = 0
EXIT_ENGINE_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 3
EXIT_PROTOCOL = 4
EXIT_INTERRUPTED = 130

#: Seconds to wait for each attempt's reply when ``--timeout`` is not given; questions and snapshot
#: writes may take a model forward pass or a disk write, so they get longer.
DEFAULT_TIMEOUT_S = 5.0
SLOW_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
#: Seconds between status requests while ``streams add --wait`` waits for the stream to finish.
WAIT_POLL_S = 0.2
#: Stream states a stream never leaves.
END_STATES = ("finished", "failed", "stopped")
#: Seconds ``streams add --wait`` gives an HTTP link to connect: its first connection says whether it is a
#: file (replayed, it finishes) or a live stream.
WAIT_CONNECT_S = 15.0

#: Subcommands served by ``mixmalmm.streamer.cli`` (the full install), with their help lines.
SERVER_COMMANDS = {
    "serve": "run the engine: ingest sources (files, RTSP, HTTP/HLS, webcams) and answer over ZeroMQ "
             "(full install)",
    "replay": "replay a long video offline and answer questions at the end or at given times; writes "
              "the answers (JSON) and a contact sheet of the memory (full install)",
    "demo": "the embedded default end to end: a sample video served, questions asked over ZeroMQ while "
            "it plays, answers printed; no weights, no camera (full install)",
    "eval": "evaluate a model on one of MA-LMM's datasets (MSRVTT-QA, MSVD-QA, ActivityNet-QA, LVU, "
            "Breakfast, COIN) and print its accuracy beside the paper's (full install)",
    "train": "fine-tune on one of MA-LMM's datasets (train DATASET ...; torchrun for several processes) or "
             "train on the synthetic world (full install)",
}

#: Modules the server commands need that a client-only install (the ``client`` extra) lacks.
_SERVER_DEPENDENCIES = frozenset({"torch", "transformers", "av", "cv2", "numpy", "einops", "safetensors",
                                  "triton", "tqdm", "mixmalmm.streamer", "mixmalmm.streamer.cli", "mixmalmm.model",
                                  "mixmalmm.kernels"})


class CommandError(Exception):
    """A failure reported as one line on stderr (never a traceback). ``code`` and ``json_message``
    (default: ``message``) make the ``--json`` error object; ``exit_code`` is the process's exit status."""

    def __init__(self, message: str, *, code: str = "usage", exit_code: int = EXIT_USAGE,
                 json_message: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code
        self.json_message = message if json_message is None else json_message


# ----------------------------------------------------------------------------------------------------
# Argument types: checked here so that a bad value is a usage error naming the option
# ----------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(p.NAME_PATTERN)


def _name(kind: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not _NAME_RE.match(text):
            raise argparse.ArgumentTypeError(
                f"invalid {kind} {text!r}: use 1-64 letters, digits and _ . : - starting with a letter or digit"
            )
        return text

    return parse


def _int_in(low: int, high: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {bound}")
        return value

    return parse


def _seconds(low: float, high: float | None = None, *, zero: bool = False) -> Callable[[str], float]:
    """A number of seconds above ``low`` (from ``low`` on with ``zero``) and at most ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < low or (value == low and not zero) or (high is not None and value > high):
            bound = f"{'at least' if zero else 'more than'} {low:g}" + ("" if high is None else f" and at most {high:g}")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound} seconds")
        return value

    return parse


def _check_endpoint(endpoint: str, option: str) -> str:
    """Catch the common mistakes before ZeroMQ does (it would say only "Invalid argument", or accept a
    port that can never connect and time out)."""
    example = "tcp://127.0.0.1:5555" if option == "--server" else "tcp://127.0.0.1:5556"
    transport, sep, address = endpoint.partition("://")
    if not sep or not transport or not address:
        raise CommandError(f"{option} {endpoint!r} is not a ZeroMQ address (expected e.g. {example})")
    if transport == "tcp":
        _host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise CommandError(f"{option} {endpoint!r} needs a port from 1 to 65535 (expected e.g. {example})")
    return endpoint


# ----------------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------------


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode("utf-8")


def _fmt_seconds(seconds: float | None, decimals: int = 1) -> str:
    """12.5 s, 2:05.3, 1:02:05.3 (stream time or a duration)."""
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.{decimals}f} s"
    minutes, rest = divmod(seconds, 60)
    width = 3 + decimals if decimals else 2
    if minutes < 60:
        return f"{sign}{int(minutes)}:{rest:0{width}.{decimals}f}"
    hours, minutes = divmod(int(minutes), 60)
    return f"{sign}{hours}:{minutes:02d}:{rest:0{width}.{decimals}f}"


def _fmt_span(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "nothing yet"
    return f"{_fmt_seconds(start)} - {_fmt_seconds(end)}"


def _fmt_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _fmt_period(period_s: float | None) -> str:
    return "on request" if period_s is None else f"every {period_s:g} s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Columns padded to their widest cell, two spaces apart; columns in ``right`` are right-aligned."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).rjust(w) if i in right else str(cell).ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Connection
# ----------------------------------------------------------------------------------------------------


def _curve(args: argparse.Namespace) -> ClientCurve | None:
    server_key, client_key = args.curve_server_key, args.curve_client_key
    if server_key is None:
        if client_key is not None:
            raise CommandError("--curve-client-key needs --curve-server-key (the server's public .key file)")
        return None
    for option, path in (("--curve-server-key", server_key), ("--curve-client-key", client_key)):
        if path is not None and not os.path.isfile(path):
            raise CommandError(f"{option}: no such file {path!r} (create a key pair with `mixmalmm keys DIR NAME`)")
    try:
        return ClientCurve.from_files(server_key, client_key)
    except ValueError as exc:
        raise CommandError(f"bad CURVE key file: {exc}") from None


def _request(args: argparse.Namespace, call: Callable[[Client], Any], *, slow: bool = False) -> Any:
    """Open a client with the common options, run ``call(client)``, and turn every client failure into a
    ``CommandError`` with the right exit status."""
    endpoint = _check_endpoint(args.server, "--server")
    timeout_s = args.timeout if args.timeout is not None else (SLOW_TIMEOUT_S if slow else DEFAULT_TIMEOUT_S)
    curve = _curve(args)
    try:
        client = Client(endpoint, timeout_s=timeout_s, retries=args.retries, curve=curve)
    except ClientError as exc:
        raise CommandError(f"{exc} (expected e.g. {DEFAULT_REQUEST_ENDPOINT})") from None
    try:
        with client:
            return call(client)
    except EngineError as exc:
        raise CommandError(f"the server refused: {exc.code.value}: {exc.message}", code=exc.code.value,
                           exit_code=EXIT_ENGINE_ERROR, json_message=exc.message) from None
    except EngineTimeout:
        attempts = args.retries + 1
        hint = "is the server running? Start one with `mixmalmm serve`, or point --server at it"
        if curve is not None:
            hint += "; check the CURVE keys (the server may refuse this client's key)"
        raise CommandError(
            f"no reply from {endpoint} within {timeout_s:g} s ({attempts} attempt{'s' * (attempts > 1)}): {hint}",
            code="no_reply", exit_code=EXIT_NO_REPLY,
        ) from None
    except ProtocolError as exc:
        raise CommandError(f"{endpoint} does not speak the mixmalmm protocol: {exc}", code="protocol",
                           exit_code=EXIT_PROTOCOL) from None


# ----------------------------------------------------------------------------------------------------
# Client subcommands
# ----------------------------------------------------------------------------------------------------


#: What the command line prints for an answer with no text (the reply's ``empty``).
EMPTY_ANSWER = "(empty answer: the model generated no text)"


def _cmd_ask(args: argparse.Namespace) -> int:
    result: p.AskResult = _request(
        args,
        lambda c: c.ask(args.stream, args.question, max_new_tokens=args.max_new_tokens, num_beams=args.beams),
        slow=True,
    )
    if args.json:
        _out(_json(result))
        return EXIT_OK
    if not result.standing:
        how = "ad-hoc question"
    elif result.question_id is None:  # the stream's default question, answered from its own memory
        how = "the stream's default question"
    else:
        how = f"standing question {result.question_id}"
    covers = ("memory holds nothing yet" if result.span_start_s is None
              else f"memory covers {_fmt_span(result.span_start_s, result.span_end_s)} of the stream")
    _out(EMPTY_ANSWER if result.empty else result.answer)
    _out(f"({result.stream}: {covers}; {how}; answered in {result.latency_s:.2f} s)")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    result: p.StatusResult = _request(args, lambda c: c.status(args.stream))
    if args.json:
        _out(_json(result))
        return EXIT_OK
    e = result.engine
    if e.question_latency_p50_s is None:
        latency = ""
    else:
        p99 = "-" if e.question_latency_p99_s is None else f"{e.question_latency_p99_s:.2f}"
        latency = f" (latency p50 {e.question_latency_p50_s:.2f} s, p99 {p99} s)"
    _out(f"engine: model {e.model or '?'} on {e.device or '?'}, up {_fmt_seconds(e.uptime_s, 0)}, "
         f"{e.questions_answered} questions answered{latency}, {e.requests_in_flight} requests in flight, "
         f"{e.queue_depth} Shots queued")
    if e.persist_error is not None:
        _out(f"last snapshot failed: {e.persist_error}")
    if not result.streams:
        _out("no streams (add one with `mixmalmm streams add ID URI`)")
        return EXIT_OK
    if result.workers:  # a cluster (serve --cluster): each worker's load, and each stream's worker
        _out()
        _out(_table(["WORKER", "NODE", "ALIVE", "STREAMS", "SHOTS/S"],
                    [[w.worker, w.node[:12], "yes" if w.alive else "no", f"{w.streams}/{w.max_streams}",
                      f"{w.shots_per_s:.1f}"] for w in result.workers], right=frozenset({3, 4})))
    headers = ["STREAM", "STATE", "FPS IN", "FPS OUT", "FRAMES", "SHOTS", "DROPS", "RECONNECTS", "QUEUE",
               "MEMORY", "SPAN", "URI"]
    rows = [[s.stream, s.state, f"{s.fps_in:.1f}", f"{s.fps_out:.1f}", str(s.frames), str(s.shots), str(s.drops),
             str(s.reconnects), str(s.queue_depth), f"{s.memory_entries}/{s.memory_capacity}",
             _fmt_span(s.span_start_s, s.span_end_s), s.uri] for s in result.streams]
    if result.workers:
        headers.insert(2, "WORKER")
        for row, s in zip(rows, result.streams, strict=True):
            row.insert(2, s.worker or "-")
    _out()
    _out(_table(headers, rows, right=frozenset(range(3 if result.workers else 2, 11 if result.workers else 10))))
    for s in result.streams:
        if s.last_error:
            _out(f"{s.stream}: last error: {s.last_error}")
    return EXIT_OK


def _cmd_streams_list(args: argparse.Namespace) -> int:
    result: p.ListStreamsResult = _request(args, lambda c: c.list_streams())
    if args.json:
        _out(_json(result))
        return EXIT_OK
    if not result.streams:
        _out("no streams (add one with `mixmalmm streams add ID URI`)")
        return EXIT_OK
    rows = [[s.stream, s.state, s.mode, str(len(s.questions)), s.uri] for s in result.streams]
    _out(_table(["STREAM", "STATE", "MODE", "QUESTIONS", "URI"], rows, right=frozenset({3})))
    questions = [q for s in result.streams for q in s.questions]
    if questions:
        _out()
        rows = [[q.stream, q.question_id, _fmt_period(q.period_s),
                 (f"{_fmt_alert_rule(q)} ({q.alerts} sent, {q.suppressed} held off)" if _fmt_alert_rule(q) else "-"),
                 q.text] for q in questions]
        _out(_table(["STREAM", "QUESTION", "ANSWERED", "ALERT", "TEXT"], rows))
    return EXIT_OK


def _cmd_streams_add(args: argparse.Namespace) -> int:
    try:
        actionshot = actionshot_from(args)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    actionshot = actionshot if actionshot.given() else None  # none given: the stream's defaults
    result: p.StreamInfo = _request(
        args, lambda c: c.add_stream(args.stream, args.uri, mode=args.mode, pace=args.pace, actionshot=actionshot,
                               worker=args.worker)
    )
    if args.wait:
        return _wait_finished(args, result)
    if args.json:
        _out(_json(result))
    else:
        _out(f"added stream {result.stream} ({result.mode}, {result.state}): {result.uri}")
    return EXIT_OK


# States of a stream that has not connected yet (a failed attempt turns "connecting" into "reconnecting").
WAITING_STATES = ("connecting", "reconnecting")


def _wait_finished(args: argparse.Namespace, added: p.StreamInfo) -> int:
    """``streams add --wait``: poll the stream's status until it is finished (every Shot of the file in
    memory, not just decoded: it is ``draining`` before) and print that status; a stream that fails or
    is stopped instead is a ``not_finished`` error."""
    if added.mode == "live" and added.state in WAITING_STATES and added.uri.lower().startswith(("http:", "https:")):
        added = _request(args, lambda client: _connected(client, added.stream))
        if added.state in WAITING_STATES:  # never connected: whether it is a file is not known
            status = _request(args, lambda client: client.status(added.stream).streams[0])
            raise CommandError(f"stream {added.stream} was added, but it has not connected within "
                               f"{WAIT_CONNECT_S:g} s ({status.last_error or 'no error given'}): whether it is a "
                               "file is not known yet", code="not_finished", exit_code=EXIT_ENGINE_ERROR)
    if added.mode == "live":
        raise CommandError(f"stream {added.stream} was added, but it is live ({added.uri}): it never finishes, "
                           "so --wait is for files (replay mode) only")
    if not args.json:
        _out(f"added stream {added.stream} ({added.mode}, {added.state}): {added.uri}; waiting for it to finish")

    def poll(client: Client) -> p.StreamStatus:
        while (status := client.status(added.stream).streams[0]).state not in END_STATES:
            time.sleep(WAIT_POLL_S)
        return status

    status: p.StreamStatus = _request(args, poll)
    if status.state != "finished":
        raise CommandError(f"stream {status.stream} is {status.state}, not finished: "
                           f"{status.last_error or 'no error given'}", code="not_finished",
                           exit_code=EXIT_ENGINE_ERROR)
    if args.json:
        _out(_json(status))
    else:
        _out(f"stream {status.stream} finished: {status.shots} Shots in memory, covering "
             f"{_fmt_span(status.span_start_s, status.span_end_s)}")
    return EXIT_OK


def _connected(client: Client, stream: str) -> p.StreamInfo:
    """The stream as ``list_streams`` shows it once it has connected (or `WAIT_CONNECT_S` later)."""
    deadline = time.monotonic() + WAIT_CONNECT_S
    while True:
        info = next((s for s in client.list_streams().streams if s.stream == stream), None)
        if info is None:
            raise CommandError(f"stream {stream} was removed while --wait waited for it to connect",
                               code="not_finished", exit_code=EXIT_ENGINE_ERROR)
        if info.state not in WAITING_STATES or time.monotonic() > deadline:
            return info
        time.sleep(WAIT_POLL_S)


def _cmd_streams_remove(args: argparse.Namespace) -> int:
    result: p.StreamInfo = _request(args, lambda c: c.remove_stream(args.stream))
    if args.json:
        _out(_json(result))
    else:
        _out(f"removed stream {result.stream} (was {result.state}): {result.uri}")
    return EXIT_OK


def _cmd_streams_move(args: argparse.Namespace) -> int:
    result: p.MoveStreamResult = _request(args, lambda c: c.move_stream(args.stream, args.to), slow=True)
    if args.json:
        _out(_json(result))
    else:
        _out(f"moved stream {result.stream} from {result.source} to {result.target} ({result.state}); it ingested "
             f"nothing for {result.pause_s:.2f} s")
    return EXIT_OK


def _cmd_questions_add(args: argparse.Namespace) -> int:
    try:  # checked here first: an alert without --period is the user's mistake, not the server's
        p.AddQuestion(id=0, stream=args.stream, question_id=args.question_id, text=args.text, period_s=args.period,
                      alert_when=args.alert_when, alert_on_change=args.alert_on_change, hold_off_s=args.hold_off)
    except ValueError as exc:
        raise CommandError(str(exc).replace("alert_when", "--alert-when").replace("alert_on_change", "--alert-on-change")
                           .replace("hold_off_s", "--hold-off").replace("period_s", "--period")) from None
    result: p.StandingQuestion = _request(
        args, lambda c: c.add_question(args.stream, args.question_id, args.text, period_s=args.period,
                                       alert_when=args.alert_when, alert_on_change=args.alert_on_change,
                                       hold_off_s=args.hold_off)
    )
    if args.json:
        _out(_json(result))
    else:
        alert = _fmt_alert_rule(result)
        _out(f"added question {result.question_id} on {result.stream} ({_fmt_period(result.period_s)}"
             f"{'; ' + alert if alert else ''}): {result.text}")
    return EXIT_OK


def _fmt_alert_rule(q: p.StandingQuestion) -> str:
    """A standing question's alert condition as text ("" without one)."""
    when = [f"answer is {q.alert_when!r}"] if q.alert_when is not None else []
    when += ["answer changes"] if q.alert_on_change else []
    if not when:
        return ""
    return f"alert when {' or '.join(when)}, hold-off {q.hold_off_s:g} s"


def _cmd_questions_remove(args: argparse.Namespace) -> int:
    result: p.StandingQuestion = _request(args, lambda c: c.remove_question(args.stream, args.question_id))
    if args.json:
        _out(_json(result))
    else:
        _out(f"removed question {result.question_id} from {result.stream}: {result.text}")
    return EXIT_OK


def _cmd_snapshot(args: argparse.Namespace) -> int:
    result: p.SaveSnapshotResult = _request(args, lambda c: c.save_snapshot(args.stream), slow=True)
    if args.json:
        _out(_json(result))
        return EXIT_OK
    if not result.saved:
        _out("nothing saved: the engine runs no streams")
        return EXIT_OK
    rows = [[s.stream, _fmt_bytes(s.size_bytes), datetime.datetime.fromtimestamp(s.time_s).strftime("%H:%M:%S"),
             s.path] for s in result.saved]
    _out(_table(["STREAM", "SIZE", "TIME", "PATH (on the server)"], rows, right=frozenset({1})))
    return EXIT_OK


def _cmd_ping(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    result: p.PingResult = _request(args, lambda c: c.ping())
    round_trip_s = time.perf_counter() - started
    if args.json:
        _out(_json(result))
    else:
        _out(f"{result.server} at {args.server}: protocol {result.protocol}, up {_fmt_seconds(result.uptime_s, 0)}, "
             f"round trip {round_trip_s * 1000:.1f} ms")
    if result.protocol != p.PROTOCOL_VERSION:
        _err(f"warning: the server speaks protocol {result.protocol}; this client speaks {p.PROTOCOL_VERSION}")
    return EXIT_OK


def _cmd_keys(args: argparse.Namespace) -> int:
    if not args.name or "/" in args.name or os.sep in args.name or args.name.startswith("."):
        raise CommandError(f"the key name must be a plain file name (no '/', not starting with '.'), got {args.name!r}")
    targets = [os.path.join(args.dir, args.name + suffix) for suffix in (".key", ".key_secret")]
    existing = [path for path in targets if os.path.exists(path)]
    if existing and not args.force:
        raise CommandError(f"{existing[0]} exists; pass --force to replace the key pair (clients and servers "
                           "holding the old public key will be refused)")
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise CommandError(f"{args.dir!r} is not a directory")
    try:
        public_file, secret_file = p.create_keypair(args.dir, args.name)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot create the key pair in {args.dir!r}: {exc}") from None
    if args.json:
        _out(_json({"public": public_file, "secret": secret_file}))
    else:
        _out(f"public key: {public_file}  (give it to the other side: a server's to its clients, "
             "a client's to the server's allowed-clients directory)")
        _out(f"secret key: {secret_file}  (keep it private; mode 600)")
    return EXIT_OK


def _cmd_watch(args: argparse.Namespace) -> int:
    endpoint = _check_endpoint(args.events, "--events")
    curve = _curve(args)
    gaps: list[Gap] = []
    try:
        subscriber = Subscriber(endpoint, args.streams or None, curve=curve, on_gap=gaps.append)
    except ClientError as exc:
        raise CommandError(f"{exc} (expected e.g. {DEFAULT_EVENT_ENDPOINT})") from None
    which = ", ".join(args.streams) if args.streams else "all streams"
    _err(f"watching events of {which} from {endpoint} (Ctrl-C to stop)")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    received = 0
    with subscriber:
        while args.count is None or received < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            restarts = subscriber.restarts
            event = subscriber.recv(left)
            if event is None:
                break
            for gap in gaps:
                _out(_fmt_gap(gap, args.json))
            gaps.clear()
            if subscriber.restarts != restarts:
                _out(_fmt_restart(event, args.json))
            _out(_json(event) if args.json else _fmt_event(event))
            received += 1
    if args.count is not None and received < args.count:
        raise CommandError(
            f"{received} of {args.count} events within {args.timeout:g} s from {endpoint} (is the server "
            "running, and are the stream ids right?)",
            code="no_events", exit_code=EXIT_NO_REPLY,
        )
    return EXIT_OK


def _clock(time_s: float) -> str:
    return datetime.datetime.fromtimestamp(time_s).strftime("%H:%M:%S")


def _fmt_event(event: p.AnyEvent) -> str:
    head = f"{_clock(event.time_s)}  {event.stream}  #{event.seq}"
    if isinstance(event, p.StreamStateEvent):
        change = event.state if event.previous is None else f"{event.previous} -> {event.state}"
        return f"{head}  state {change}" + (f": {event.message}" if event.message else "")
    if isinstance(event, p.AnswerEvent):
        text = EMPTY_ANSWER if event.empty else event.answer
        return (f"{head}  answer {event.question_id} ({event.question}): {text}  "
                f"[{_fmt_span(event.span_start_s, event.span_end_s)}]")
    if isinstance(event, p.AlertEvent):
        text = EMPTY_ANSWER if event.empty else event.answer
        why = (f"answer matches {event.alert_when!r}" if event.reason == "match"
               else f"answer changed from {event.previous!r}")
        pictures = []
        if event.evidence_jpeg is not None:
            pictures.append(f"last Shot {_fmt_span(event.shot_start_s, event.shot_end_s)}, "
                            f"{len(event.evidence_jpeg) * 3 // 4 // 1024} KiB JPEG")
        if event.strip_jpeg is not None:
            pictures.append("memory strip")
        files = ", ".join(f for f in (event.evidence_path, event.strip_path) if f)
        evidence = ("; ".join(pictures) or "no picture") + (f"; saved {files}" if files else "") + (
            f"; {event.evidence_error}" if event.evidence_error else "")
        return (f"{head}  ALERT {event.question_id} ({event.question}): {text}  ({why})  "
                f"[{_fmt_span(event.span_start_s, event.span_end_s)}]  evidence: {evidence}")
    return f"{head}  {_json(event)}"


def _fmt_gap(gap: Gap, as_json: bool) -> str:
    if as_json:
        return _json({"type": "gap", "stream": gap.stream, "expected": gap.expected, "received": gap.received,
                      "missed": gap.missed})
    first, last = gap.expected, gap.received - 1
    which = f"#{first}" if first == last else f"#{first} to #{last}"
    return (f"{_clock(time.time())}  {gap.stream}  missed {gap.missed} event{'s' * (gap.missed > 1)} ({which}); "
            f"`mixmalmm status {gap.stream}` shows where it stands")


def _fmt_restart(event: p.AnyEvent, as_json: bool) -> str:
    if as_json:
        return _json({"type": "restart", "stream": event.stream, "seq": event.seq})
    return (f"{_clock(time.time())}  {event.stream}  sequence numbers started over at #{event.seq} "
            "(the engine restarted)")


# ----------------------------------------------------------------------------------------------------
# Server subcommands (mixmalmm.streamer.cli, full install)
# ----------------------------------------------------------------------------------------------------


def _run_server_command(argv: list[str]) -> int:
    """Hand ``argv`` (the subcommand name first) to ``mixmalmm.streamer.cli.main``."""
    try:
        server_cli = importlib.import_module("mixmalmm.streamer.cli")
        return _exit_status(server_cli.main(argv))
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing not in _SERVER_DEPENDENCIES and missing.split(".")[0] not in _SERVER_DEPENDENCIES:
            raise  # a module of ours that should be there: a bug, worth its traceback
        _err(f"mixmalmm: `mixmalmm {argv[0]}` needs the full install (the engine, with torch): "
             f"`pip install mixmalmm`; this one has only the client commands (the `client` extra) "
             f"and lacks the module {missing!r}")
        return EXIT_USAGE
    except SystemExit as exc:
        return _exit_status(exc.code)


def _exit_status(code: Any) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    _err(str(code))
    return 1


# ----------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------

_EPILOG = """\
Client commands talk to a running server (`mixmalmm serve`) at --server (requests) and --events
(events); server commands need the full install. `mixmalmm COMMAND --help` describes each one.

exit status: 0 ok; 1 the engine replied with an error; 2 bad usage (arguments, address, key files,
missing install); 3 no reply within the timeout (watch: fewer events than --count in time); 4 the
reply was not the mixmalmm protocol; 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` can return the status."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            _err(message.rstrip("\n"))
        raise _ParserExit(status)


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _add_connection(parser: argparse.ArgumentParser, *, watch: bool = False) -> None:
    """The connection options, the same on every client command so a script can pass one set to all."""
    group = parser.add_argument_group("connection")
    group.add_argument("--server", default=DEFAULT_REQUEST_ENDPOINT, metavar="ADDR",
                       help=f"the server's request address (default {DEFAULT_REQUEST_ENDPOINT})"
                            + ("; not used by watch" if watch else ""))
    group.add_argument("--events", default=DEFAULT_EVENT_ENDPOINT, metavar="ADDR",
                       help=f"the server's event address (default {DEFAULT_EVENT_ENDPOINT})"
                            + ("" if watch else "; used by watch"))
    if watch:
        group.add_argument("--timeout", type=_seconds(0.0), default=None, metavar="S",
                           help="stop after S seconds (default: run until Ctrl-C or --count)")
    else:
        group.add_argument("--timeout", type=_seconds(0.0), default=None, metavar="S",
                           help=f"seconds to wait for each attempt's reply (default {DEFAULT_TIMEOUT_S:g}; "
                                f"{SLOW_TIMEOUT_S:g} for ask and snapshot)")
    group.add_argument("--retries", type=_int_in(0, 100), default=DEFAULT_RETRIES, metavar="N",
                       help=f"attempts after a timeout, each on a new connection (default {DEFAULT_RETRIES})"
                            + ("; not used by watch" if watch else ""))
    group.add_argument("--curve-server-key", metavar="FILE",
                       help="the server's public key file (NAME.key): connect with CURVE encryption")
    group.add_argument("--curve-client-key", metavar="FILE",
                       help="this client's secret key file (NAME.key_secret), for a server that admits "
                            "only known clients")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON" + (" (one object per line)" if watch else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixmalmm", description="mixmalmm: streaming video understanding with a bounded "
                     "memory (MA-LMM), served over ZeroMQ.", epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    for name, text in SERVER_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)  # parsed by mixmalmm.streamer.cli

    stream_id, question_id = _name("stream id"), _name("question id")

    ask = commands.add_parser("ask", help="ask a question about everything a stream has shown so far",
                              description="Ask a question about a stream. If its text is a standing question "
                              "of the stream, it is answered from that question's own memory.")
    ask.add_argument("stream", type=stream_id, metavar="STREAM")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--max-new-tokens", type=_int_in(1, 1024), metavar="N",
                     help="longest answer in tokens (default: the engine's)")
    ask.add_argument("--beams", type=_int_in(1, 16), metavar="N", help="beam search width (default: the engine's)")
    _add_connection(ask)
    ask.set_defaults(run=_cmd_ask)

    status = commands.add_parser("status", help="the engine's and the streams' state, rates, memory and latency")
    status.add_argument("stream", nargs="?", type=stream_id, metavar="STREAM", help="only this stream")
    _add_connection(status)
    status.set_defaults(run=_cmd_status)

    watch = commands.add_parser("watch", help="print events (answers to standing questions, stream state "
                                "changes) as they come, and note missed ones",
                                description="Print events as they come. Events published before watch "
                                "started are not shown; gaps in a stream's sequence numbers are reported.")
    watch.add_argument("streams", nargs="*", type=stream_id, metavar="STREAM", help="only these streams (default: all)")
    watch.add_argument("--count", type=_int_in(1, None), metavar="N", help="stop after N events")
    _add_connection(watch, watch=True)
    watch.set_defaults(run=_cmd_watch)

    streams = commands.add_parser("streams", help="list, add, remove or move streams")
    streams_actions = streams.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    listing = streams_actions.add_parser("list", help="the streams the engine runs, with their standing questions")
    _add_connection(listing)
    listing.set_defaults(run=_cmd_streams_list)
    add = streams_actions.add_parser("add", help="start ingesting a source")
    add.add_argument("stream", type=stream_id, metavar="ID")
    add.add_argument("uri", metavar="URI", help="a video file path, rtsp:// or http(s):// URL, or webcam:N")
    add.add_argument("--mode", choices=["live", "replay", "auto"], default="auto",
                     help="live: drop the oldest frames when behind; replay: never drop; auto (default): "
                          "replay for files, live otherwise")
    add.add_argument("--pace", choices=["realtime", "fast"], default="realtime",
                     help="replay at the file's own pace (default) or as fast as possible")
    add.add_argument("--wait", action="store_true",
                     help="for a file: return once it is finished, every Shot in memory, and print its status "
                          "(--json: the status); exit 1 if it fails or is stopped first")
    add.add_argument("--worker", type=stream_id, metavar="NAME",
                     help="on a cluster (serve --cluster): the worker to run it on (default: the least loaded)")
    add_actionshot_options(add, "how frames become Shots (default: the engine's, from its model)")
    _add_connection(add)
    add.set_defaults(run=_cmd_streams_add)
    move = streams_actions.add_parser("move", help="on a cluster: move a stream with its memory to another worker")
    move.add_argument("stream", type=stream_id, metavar="ID")
    move.add_argument("--to", type=stream_id, default="auto", metavar="WORKER|auto",
                      help="the worker (status lists them) or auto, the least-loaded other one (default)")
    _add_connection(move)
    move.set_defaults(run=_cmd_streams_move)
    remove = streams_actions.add_parser("remove", help="stop a stream and forget it")
    remove.add_argument("stream", type=stream_id, metavar="ID")
    _add_connection(remove)
    remove.set_defaults(run=_cmd_streams_remove)

    questions = commands.add_parser("questions", help="register or remove standing questions")
    questions_actions = questions.add_subparsers(dest="action", metavar="ACTION", required=True,
                                                 parser_class=_Parser)
    qadd = questions_actions.add_parser(
        "add", help="register a standing question with its own memory",
        description="Register a standing question on a stream (exact MA-LMM semantics: it has its own query "
        "memory). With --period, its answers are published as events (see `mixmalmm watch`).")
    qadd.add_argument("stream", type=stream_id, metavar="STREAM")
    qadd.add_argument("question_id", type=question_id, metavar="QID")
    qadd.add_argument("text", metavar="TEXT")
    qadd.add_argument("--period", type=_seconds(0.0, 86_400.0), metavar="S",
                      help="answer it every S seconds and publish the answer (default: only when asked)")
    qadd.add_argument("--alert-when", metavar="ANSWER",
                      help="publish an alert (with the last Shot as evidence) when the answer comes to be ANSWER "
                           "(case and punctuation ignored; 'yes' also matches 'yes, it is'); needs --period")
    qadd.add_argument("--alert-on-change", action="store_true",
                      help="publish an alert when the answer differs from the one before; needs --period")
    qadd.add_argument("--hold-off", type=_seconds(0.0, 86_400.0, zero=True), metavar="S",
                      help=f"no second alert from this question within S seconds (default {p.DEFAULT_HOLD_OFF_S:g})")
    _add_connection(qadd)
    qadd.set_defaults(run=_cmd_questions_add)
    qremove = questions_actions.add_parser("remove", help="unregister a standing question")
    qremove.add_argument("stream", type=stream_id, metavar="STREAM")
    qremove.add_argument("question_id", type=question_id, metavar="QID")
    _add_connection(qremove)
    qremove.set_defaults(run=_cmd_questions_remove)

    snapshot = commands.add_parser("snapshot", help="save a stream's state (or every stream's) on the server now")
    snapshot.add_argument("stream", nargs="?", type=stream_id, metavar="STREAM", help="only this stream")
    _add_connection(snapshot)
    snapshot.set_defaults(run=_cmd_snapshot)

    ping = commands.add_parser("ping", help="check that a server answers, and its protocol version")
    _add_connection(ping)
    ping.set_defaults(run=_cmd_ping)

    keys = commands.add_parser("keys", help="create a CURVE key pair (NAME.key, NAME.key_secret) in DIR",
                               description="Create a CURVE key pair for a server or a client: DIR/NAME.key "
                               "(public) and DIR/NAME.key_secret (private).")
    keys.add_argument("dir", metavar="DIR")
    keys.add_argument("name", metavar="NAME")
    keys.add_argument("--force", action="store_true", help="replace an existing key pair")
    keys.add_argument("--json", action="store_true", help="print the two paths as JSON")
    keys.set_defaults(run=_cmd_keys)
    return parser


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mixmalmm`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVER_COMMANDS:
        return _run_server_command(argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except _ParserExit as exc:
        return exc.status
    as_json = getattr(args, "json", False)
    try:
        return args.run(args)
    except CommandError as exc:
        _err(f"mixmalmm {args.command}: {exc.message}")
        if as_json:
            _out(_json({"error": {"code": exc.code, "message": exc.json_message}}))
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`mixmalmm watch | head -1`); stop quietly, and keep Python's exit-time
        # flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
