"""``mixmalmm demo``: the built-in model end to end, with no weights, no camera and no network.

1. Writes a short sample video (`make_sample_video`: the synthetic shapes world's demo video, whose
   questions have known answers, or, without that world, a synthetic scene video).
2. Starts the engine and the ZeroMQ server in this process, on the default loopback ports when they are
   free and on free loopback ports otherwise (or on ``--bind`` / ``--events``).
3. As a client would, over ZeroMQ: subscribes to the stream's events (``Subscriber``), adds the video
   as a stream played at its own pace (``Client.add_stream``, replay mode: nothing dropped), registers
   a standing question answered every `STANDING_PERIOD_S` seconds (its answers arrive as events),
   asks questions while the video plays and all of the video's questions at the end: once the stream
   is ``finished``, that is once every Shot of the video is in memory.
4. Prints every answer with the span of video the memory covered (and the answer the synthetic world
   expects, when it knows one), writes ``answers.json`` and ``contact_sheet.png`` (as ``mixmalmm
   replay`` draws it: see `mixmalmm.streamer.contact_sheet`) to ``--out``, and says where.

With ``--keep-serving`` the engine goes on serving the finished stream (``mixmalmm ask``, ``status``,
``watch`` work against it) until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from .contact_sheet import ShotLog, draw_contact_sheet, format_span, format_time, memory_cover, memory_report
from .ingest import make_accumulator
from .options import (
    EXIT_ERROR,
    EXIT_OK,
    UserError,
    add_model_arguments,
    answer_line,
    load_model,
    write_results,
)

STREAM = "demo"
STANDING_ID = "watch"
#: Seconds between the standing question's published answers.
STANDING_PERIOD_S = 2.0
#: Fractions of the video's length at which the questions asked while it plays are asked.
DURING_AT = (0.4, 0.75)
DEFAULT_REQUESTS = "tcp://127.0.0.1:5555"
DEFAULT_EVENTS = "tcp://127.0.0.1:5556"
FREE_PORT = "tcp://127.0.0.1:*"
DEFAULT_CONSOLE = "127.0.0.1:8080"  # demo --console, when free
#: Alerts whose evidence the demo keeps in OUT/evidence (older runs' included).
DEMO_EVIDENCE_KEEP = 50


@dataclass
class SampleVideo:
    """The demo's video and what to ask about it.

    path: the video file; frames, fps: its length in frames and rate (frames per second);
    actionshot: the stream's ActionShot settings (protocol `ActionShotSettings`, only the fields it sets:
    the model's own settings fill the rest); standing: the standing question; during: questions asked while
    it plays; final: (question, expected answer or None) asked at the end; final_for: the same for the
    frames a model saw (indices), when the video's truth knows; expected_at: the expected answer to a
    question once the memory reaches a time (seconds), None when unknown; world: what the video shows.
    """

    path: Path
    frames: int
    fps: float
    actionshot: object
    standing: str
    during: list[str]
    final: list[tuple[str, str | None]]
    expected_at: Callable[[str, float], str | None] = field(default=lambda question, seconds: None)  # unknown
    final_for: Callable[[list[int]], list[tuple[str, str | None]]] | None = None
    world: str = ""

    @property
    def duration(self) -> float:
        """Seconds of video."""
        return self.frames / self.fps


def make_sample_video(folder: Path) -> SampleVideo:
    """The demo's video, written into `folder`. The one place that picks it.

    The synthetic shapes world (`mixmalmm.model.synthetic.make_demo_video`, the world the built-in model
    is trained on) when this install has it; otherwise `scene_sample_video`.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec("mixmalmm.model.synthetic") is None:
        return scene_sample_video(folder / "sample.mp4")
    world = importlib.import_module("mixmalmm.model.synthetic")
    if not hasattr(world, "make_demo_video"):
        return scene_sample_video(folder / "sample.mp4")
    return world_sample_video(folder / "sample.mp4", world)


def world_sample_video(path: Path, world) -> SampleVideo:
    """The synthetic shapes world's demo video; expected answers from its ground truth."""
    from mixmalmm.clients import protocol as P

    demo = world.make_demo_video(path)
    kinds = {q: kind for q, _, kind in demo.questions}
    final = [(q, a) for q, a, _ in demo.questions]

    def final_for(seen: list[int]) -> list[tuple[str, str | None]]:
        """The video's questions with what the frames `seen` show at its end (asked once each)."""
        truth_seen = {q: a for q, a, _ in demo.video.questions(indices=seen)}
        return [(q, truth_seen.get(q)) for q, _ in final]

    standing = next((q for q in kinds if kinds[q] == "count_now"), final[0][0])
    during = [q for q in kinds if kinds[q] in ("count_entered", "first_shape")][: len(DURING_AT)]
    truth = world.demo_video() if hasattr(world, "demo_video") else None

    def expected_at(question: str, seconds: float) -> str | None:
        if truth is None:
            return None
        end = min(demo.frames, max(1, int(round(seconds * demo.fps)) + 1))  # frames up to the memory's end
        return {q: a for q, a, _ in truth.questions(end)}.get(question)

    return SampleVideo(
        path=Path(demo.path), frames=demo.frames, fps=demo.fps,
        actionshot=P.ActionShotSettings(), standing=standing, during=during or [final[0][0]],
        final=final, expected_at=expected_at, final_for=final_for, world="the synthetic shapes world",
    )


def scene_sample_video(path: Path) -> SampleVideo:
    """8 s of synthetic scenes (160x120 pixels, 10 fps, a cut every 2 s), ActionShot composites of < 1 s."""
    from mixmalmm.clients import protocol as P

    from .synthetic import synthetic_rgb, write_video

    fps, frames = 10, 80
    write_video(path, (synthetic_rgb(i, 160, 120, scene_length=20) for i in range(frames)), fps, "libx264",
                {"preset": "ultrafast", "g": "10"})
    return SampleVideo(
        path=path, frames=frames, fps=float(fps),
        actionshot=P.ActionShotSettings(enabled=True, sample_fps=None, max_seconds=1.0),
        standing="what is happening in the video?", during=["what colour is the square?"],
        final=[("what is happening in the video?", None), ("what colour is the square?", None)],
        world="synthetic scenes (no ground truth)",
    )


# ---------------------------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def add_parser(commands) -> None:
    p = commands.add_parser(
        "demo", help="the built-in model end to end: a sample video served over ZeroMQ, questions asked while it "
                     "plays, answers printed, a contact sheet written",
        description="Make a sample video, serve it with the built-in model on loopback, ask questions over "
                    "ZeroMQ while it plays, print the answers and write answers.json and contact_sheet.png. "
                    "Needs no weights, no camera and no network.",
    )
    p.add_argument("--out", default="mixmalmm-demo", metavar="DIR",
                   help="where the video, answers.json and contact_sheet.png go (default ./mixmalmm-demo)")
    p.add_argument("--keep-serving", action="store_true",
                   help="afterwards keep serving the stream until Ctrl-C (try mixmalmm ask / status / watch)")
    p.add_argument("--console", nargs="?", const=DEFAULT_CONSOLE, metavar="HOST:PORT",
                   help=f"serve the web console too (default {DEFAULT_CONSOLE} if free, else a free loopback port; "
                        "loopback only); its URL is printed first, and after the demo it keeps serving until Ctrl-C")
    p.add_argument("--bind", metavar="ADDR",
                   help=f"request endpoint (default {DEFAULT_REQUESTS} if free, else a free loopback port)")
    p.add_argument("--events", metavar="ADDR",
                   help=f"event endpoint (default {DEFAULT_EVENTS} if free, else a free loopback port)")
    p.add_argument("--max-new-tokens", type=int, default=10, metavar="N", help="longest answer in tokens (10)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_model_arguments(p)
    p.set_defaults(run=run_demo)


def _start(engine, bind: str | None, events: str | None):
    """A started Server in front of `engine`: the given endpoints, else the defaults, else free ports."""
    from .server import Server, ServerError

    tries = [(bind or DEFAULT_REQUESTS, events or DEFAULT_EVENTS)]
    if bind is None or events is None:
        tries.append((bind or FREE_PORT, events or FREE_PORT))
    for i, (requests, published) in enumerate(tries):
        try:
            server = Server(engine, request_endpoint=requests, event_endpoint=published)
            server.start()
            return server
        except (ServerError, ValueError) as exc:
            if i == len(tries) - 1:
                raise UserError(f"cannot serve on {requests} / {published}: {exc}") from exc
    raise AssertionError("unreachable")


def _start_console(engine, address: str):
    """A started Console in front of `engine` on `address` (loopback), else, for the default, a free port."""
    from .console import Console
    from .server import ServerError

    tries = [address] + ([address.rpartition(":")[0] + ":0"] if address == DEFAULT_CONSOLE else [])
    for i, where in enumerate(tries):
        try:
            return Console(engine, address=where).start()
        except (ServerError, ValueError) as exc:
            if i == len(tries) - 1:
                raise UserError(f"--console {address}: {exc}") from exc
    raise AssertionError("unreachable")


def _offline_shots(sample: SampleVideo, settings) -> tuple[ShotLog, list[int]]:
    """The Shots the engine will make of the sample video with complete ActionShot `settings` (ActionShot
    online == offline), for the sheet, and the indices of the video's frames they span."""
    from .sources import FileSource

    log, seen = ShotLog(), []
    accumulator = make_accumulator(settings)

    def add(shot) -> None:
        log.add(shot)
        seen.extend(range(shot.first_index, shot.last_index + 1))

    with FileSource(sample.path) as source:
        for frame in source:
            shot = accumulator.push(frame)
            if shot is not None:
                add(shot)
    shot = accumulator.flush()
    if shot is not None:
        add(shot)
    return log, seen


def _record(result, expected: str | None, kind: str) -> dict:
    span = None if result.span_start_s is None else [result.span_start_s, result.span_end_s]
    return {
        "question": result.question, "answer": result.answer,
        "mode": "standing" if result.standing else "adhoc",
        "asked_at_s": result.span_end_s, "span_s": span, "expected": expected, "when": kind,
        "latency_s": round(result.latency_s, 4),
    }


def _event_record(event, expected: str | None) -> dict:
    span = None if event.span_start_s is None else [event.span_start_s, event.span_end_s]
    return {"question": event.question, "answer": event.answer, "mode": "standing", "asked_at_s": event.span_end_s,
            "span_s": span, "expected": expected, "when": "event", "seq": event.seq}


def _matches(answer: str, expected: str | None) -> bool | None:
    if expected is None:
        return None
    return answer.strip().lower().rstrip(".!?") == expected.strip().lower()


def run_demo(args: argparse.Namespace) -> int:
    from mixmalmm.clients import ClientError

    from .server import is_local_endpoint

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.console is not None:
        from .console import parse_http_address

        try:
            host, port = parse_http_address(args.console)
        except ValueError as exc:
            raise UserError(str(exc).replace("--http", "--console")) from exc
        if not is_local_endpoint(f"tcp://{host}:{port}"):
            raise UserError(f"--console {args.console!r}: the demo serves on loopback only (e.g. 127.0.0.1:8080)")
    for option, endpoint in (("--bind", args.bind), ("--events", args.events)):
        if endpoint is not None and not is_local_endpoint(endpoint):
            raise UserError(f"{option} {endpoint!r}: the demo serves on loopback only (e.g. tcp://127.0.0.1:5555, "
                            "or tcp://127.0.0.1:* for a free port)")
    from .engine import Engine, EngineConfig  # (torch: after the cheap checks)
    from .server import EventFanout

    started = time.perf_counter()
    model, name = load_model(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to --out '{out}': {exc.strerror or exc}") from exc
    from .ingest import model_settings

    sample = make_sample_video(out)
    settings = sample.actionshot.over(model_settings(model))  # as the engine will resolve them
    log, seen = _offline_shots(sample, settings)
    if sample.final_for is not None:  # what the frames the model will see show
        sample.final = sample.final_for(seen)
    say(f"mixmalmm demo: model {name} on {model.device}; memory {model.config.memory_bank_length} entries per bank")
    say(f"sample video: {sample.path} ({sample.frames} frames, {format_time(sample.duration)} at {sample.fps:g} fps; "
        f"{sample.world}); {len(log.shots)} Shots")
    box = EventFanout()  # the ZeroMQ server, then the console: each gets every event, numbered
    engine = Engine(model, EngineConfig(max_new_tokens=args.max_new_tokens, evidence_dir=str(out / "evidence"),
                                        evidence_keep=DEMO_EVIDENCE_KEEP),
                    publish=box.publish, model_name=name)
    engine.start()
    console = None
    try:
        server = _start(engine, args.bind, args.events)
        box.add(server)
        if args.console is not None:
            console = _start_console(engine, args.console)
            box.add(console)
            say(f"console: {console.url}")
    except UserError:
        engine.shutdown(save=False)
        if box.sinks:
            box.sinks[0].stop()
        raise
    try:
        try:
            status = _play(args, sample, log, engine, server, started)
        except ClientError as exc:  # the engine refused or did not answer: say so in one line
            print(f"mixmalmm demo: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if status == EXIT_OK and (args.keep_serving or console is not None):
            _serve_until_stopped(server, sample.final[-1][0], console)
        return status
    finally:
        engine.shutdown(save=False)
        server.stop()
        if console is not None:
            console.stop()


def _play(args, sample: SampleVideo, log: ShotLog, engine, server, started: float) -> int:
    """The client side of the demo, over ZeroMQ; then the outputs. Returns the exit status."""
    from mixmalmm.clients import Client, Subscriber
    from mixmalmm.clients import protocol as P

    requests, events = server.request_address, server.event_address
    say(f"engine serving on {requests} (events on {events})")
    records: list[dict] = []
    alerts: list = []  # the alert events, without their pictures (written into the evidence folder)
    with Client(requests, timeout_s=60.0, retries=0) as client, Subscriber(events, [STREAM]) as sub:
        time.sleep(0.2)  # a SUB socket misses what is published before it has joined
        info = client.add_stream(STREAM, str(sample.path), mode="replay", pace="realtime",
                                 actionshot=sample.actionshot if sample.actionshot.given() else None)
        client.add_question(STREAM, STANDING_ID, sample.standing, period_s=STANDING_PERIOD_S, alert_on_change=True,
                            hold_off_s=0.0)
        say(f"stream '{STREAM}' added (played at its own pace); standing question '{STANDING_ID}': "
            f"{sample.standing!r}, answered every {STANDING_PERIOD_S:g} s as events, with an alert (and its "
            "evidence) when the answer changes")
        say("while it plays:")
        during = [(sample.duration * f, q) for f, q in zip(DURING_AT, sample.during, strict=False)]
        limit_s = 4 * sample.duration + 60.0
        deadline = time.monotonic() + limit_s
        while True:
            event = sub.recv(timeout_s=0.1)
            if isinstance(event, P.AnswerEvent):
                record = _event_record(event, sample.expected_at(event.question, event.span_end_s or 0.0))
                records.append(record)
                say("  event " + answer_line(record, record["expected"]))
            elif isinstance(event, P.AlertEvent):
                alerts.append(msgspec.structs.replace(event, evidence_jpeg=None, strip_jpeg=None))
                files = f"; evidence in {Path(event.evidence_path).parent}" if event.evidence_path else ""
                say(f"  alert [{format_time(event.span_end_s)}] {event.question_id}: {event.previous!r} -> "
                    f"{event.answer!r} (the last Shot, {format_span((event.shot_start_s, event.shot_end_s))}, and "
                    f"a strip of the memory{files})")
            status = client.status(STREAM).streams[0]
            if during and status.span_end_s is not None and status.span_end_s >= during[0][0]:
                _, question = during.pop(0)
                result = client.ask(STREAM, question)
                record = _record(result, sample.expected_at(question, result.span_end_s or 0.0), "during")
                records.append(record)
                say("  ask   " + answer_line(record, record["expected"]))
            if status.state == "finished":  # every Shot of the video is in memory (not just decoded)
                break
            if status.state in ("failed", "stopped"):
                say(f"the stream {status.state}: {status.last_error}")
                return EXIT_ERROR
            if time.monotonic() > deadline:
                say(f"the engine did not finish the video within {limit_s:.0f} s; stopping")
                return EXIT_ERROR
        say(f"at the end (memory {format_span((status.span_start_s, status.span_end_s))}, {status.shots} Shots):")
        for question, expected in sample.final:
            result = client.ask(STREAM, question)
            record = _record(result, expected, "end")
            records.append(record)
            say("  " + answer_line(record, expected))
    stream = next(s for s in engine.streams() if s.id == STREAM)
    with stream.lock:
        if stream.state.frames != len(log.shots):
            say(f"the engine folded {stream.state.frames} Shots, the sample has {len(log.shots)}")
            return EXIT_ERROR
        cover = memory_cover(stream.state, stream.state.frames)
        own = stream.state.standing.get(sample.standing)
        standing_steps = own.steps if own is not None else 0
    if standing_steps < len(log.shots):
        say(f"(the standing question was registered after {len(log.shots) - standing_steps} Shot(s) had been "
            "folded in: its own memory starts there)")
    judged = [m for m in (_matches(r["answer"], r["expected"]) for r in records) if m is not None]
    if judged:
        say(f"answers matching the synthetic world's: {sum(judged)} of {len(judged)}")
    sheet = draw_contact_sheet(log, cover, title=f"mixmalmm demo: '{sample.path.name}', model {engine.model_name}",
                               memory_bank_length=engine.model.config.memory_bank_length)
    report = {
        "video": str(sample.path), "world": sample.world, "model": engine.model_name,
        "endpoints": {"requests": requests, "events": events}, "stream": STREAM,
        "standing": {"question_id": STANDING_ID, "text": sample.standing, "period_s": STANDING_PERIOD_S,
                     "shots_seen": standing_steps},
        "actionshot": msgspec.to_builtins(info.actionshot),
        "memory_bank_length": engine.model.config.memory_bank_length,
        "answers": records,
        "alerts": [msgspec.to_builtins(a) for a in alerts],
        **memory_report(log, cover, sheet),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    answers_path, sheet_path = write_results(Path(args.out), report, sheet)
    say(f"wrote {answers_path} and {sheet_path} (the video: {sample.path}) in {report['wall_s']:.0f} s")
    return EXIT_OK


def _serve_until_stopped(server, question: str, console=None) -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        say(f"still serving (Ctrl-C to stop); try: mixmalmm ask --server {server.request_address} {STREAM} "
            f"\"{question}\"   or   mixmalmm status --server {server.request_address}"
            + (f"   or   the console: {console.url}" if console is not None else ""))
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("stopped")
