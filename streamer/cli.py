"""The server side of the ``mixmalmm`` command: ``serve``, ``replay``, ``demo``, ``eval``, ``train``.

``mixmalmm.clients.cli`` hands these here with the subcommand name first (``main(["serve", ...])``).
User errors (a missing weights folder, a bad source, a taken port) end in one line on stderr and a
non-zero exit status, never a traceback. ``serve`` is here; ``replay``, ``demo`` and ``eval`` are in their own
modules; what the commands share (`UserError`, exit statuses, option groups, `load_model`) is in
`mixmalmm.streamer.options`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from . import demo, evaluate, replay
from .alerts import DEFAULT_EVIDENCE_KEEP
from .options import (
    EXIT_OK,
    EXIT_USAGE,
    UserError,
    actionshot_settings,
    add_actionshot_arguments,
    add_model_arguments,
    load_model,
)
from .redact import redact_uri

log = logging.getLogger("mixmalmm")


# ---------------------------------------------------------------------------------------------------
# serve


def parse_source(text: str, index: int) -> tuple[str, str]:
    """``ID=URI`` or a bare URI (its id is then ``s<index>``)."""
    head, sep, tail = text.partition("=")
    if sep and head and "/" not in head and ":" not in head:
        return head, tail
    return f"s{index}", text


def add_sources(args: argparse.Namespace, add) -> None:
    """The command line's sources, each through ``add(AddStream)`` (the engine's, or a cluster's front
    door); one that is refused is logged and the others go on."""
    from mixmalmm.clients import protocol as P

    for i, text in enumerate(args.sources):
        sid, uri = parse_source(text, i)
        try:
            add(P.AddStream(id=0, stream=sid, uri=uri, mode=args.mode, pace=args.pace))
        except P.RequestError as exc:
            log.error("source %s (%s) not added: %s", sid, redact_uri(uri), exc.message)


def add_serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="run the engine: ingest sources, answer questions over ZeroMQ",
                            description="Run the engine on one or more sources and serve the ZeroMQ protocol.")
    p.add_argument("sources", nargs="*", metavar="[ID=]URI",
                   help="video files, rtsp://, http(s):// (HLS), webcam:N, synthetic:; more can be added "
                        "later with `mixmalmm streams add`")
    p.add_argument("--mode", choices=["auto", "live", "replay"], default="auto",
                   help="live: drop the oldest frames when behind; replay: lose nothing (default: by source)")
    p.add_argument("--pace", choices=["realtime", "fast"], default="realtime",
                   help="for files: the file's own pace or as fast as possible")
    add_model_arguments(p)
    add_actionshot_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--bind", default="tcp://127.0.0.1:5555", help="request (ROUTER) endpoint")
    g.add_argument("--events", default="tcp://127.0.0.1:5556", help="event (PUB) endpoint")
    g.add_argument("--curve-secret", metavar="FILE", help="the server's CURVE key pair (from `mixmalmm keys`)")
    g.add_argument("--curve-clients", metavar="DIR", help="directory of allowed client public keys")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without CURVE (and a non-loopback --http address)")
    g.add_argument("--http", metavar="HOST:PORT",
                   help="serve the web console (a page and an HTTP/JSON layer) here, e.g. 127.0.0.1:8080; "
                        "a non-loopback address needs --insecure (HTTP has no authentication)")
    g.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP here (e.g. 127.0.0.1:9108); a non-loopback address "
                        "needs --insecure (CURVE does not cover HTTP)")
    g.add_argument("--state-dir", metavar="DIR|URL",
                   help="snapshot streams here and restore them on start: a directory, or an fsspec URL "
                        "(s3://bucket/prefix ..., with the scheme's fsspec package installed)")
    g.add_argument("--snapshot-period", type=float, default=30.0, metavar="S", help="seconds between snapshots")
    g.add_argument("--max-batch", type=int, default=8, help="streams per vision-encoder batch")
    g.add_argument("--max-questions", type=int, default=32, metavar="N",
                   help="waiting questions answered by one batched generation")
    g.add_argument("--max-message-bytes", type=int, default=1 << 20, help="largest request accepted, bytes")
    g.add_argument("--max-question-chars", type=int, default=1000, help="longest question accepted, characters")
    g.add_argument("--max-streams", type=int, default=32, metavar="N", help="most streams at once (default 32)")
    g.add_argument("--max-standing", type=int, default=8, metavar="N",
                   help="most standing questions per stream; each slows its stream's steps (default 8)")
    a = p.add_argument_group("alerts (README: Alerts; `mixmalmm questions add ... --alert-when ANSWER`)")
    a.add_argument("--evidence-dir", metavar="DIR",
                   help="write each alert's pictures (the last Shot, the memory strip) and event here")
    a.add_argument("--evidence-keep", type=int, default=DEFAULT_EVIDENCE_KEEP, metavar="N",
                   help=f"the newest N alerts kept in --evidence-dir, older ones deleted (default {DEFAULT_EVIDENCE_KEEP})")
    a.add_argument("--alert-webhook", metavar="URL",
                   help="POST every alert event (JSON) to this http(s) URL, retried with backoff")
    c = p.add_argument_group("cluster (README: Scaling out; needs pip install 'mixmalmm[cluster]')")
    c.add_argument("--cluster", metavar="auto|local:N|ADDRESS",
                   help="run the engine on a Ray cluster: auto (the running one), local:N (a local Ray with N "
                        "workers), or a Ray address")
    c.add_argument("--workers", default=None, metavar="N|per-node",
                   help="engine workers: N, or one per node that can hold one (default: N for local:N, else per-node)")
    c.add_argument("--worker-resources", metavar="JSON", help='Ray resources of each worker (default {"CPU": 1})')
    c.add_argument("--state-store", metavar="DIR|URL",
                   help="the shared state store: a directory every node sees, or an fsspec URL (s3://bucket/prefix ...)")
    c.add_argument("--rebalance", action="store_true",
                   help="when a worker joins, move streams onto it (move_stream: each move is a short gap) until "
                        "the workers' stream counts differ by at most one (default: off, new streams go there)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from mixmalmm.clients import protocol as P

    from .console import Console, check_console_security
    from .engine import Engine, EngineConfig
    from .server import CurveKeys, EventFanout, Server, ServerError, check_bind_security, is_local_endpoint

    settings = actionshot_settings(args)
    try:  # checked before the model loads: cheap mistakes first
        config = EngineConfig(max_batch=args.max_batch, max_questions=args.max_questions, state_dir=args.state_dir,
                              snapshot_period_s=args.snapshot_period, default_actionshot=settings,
                              max_streams=args.max_streams, max_standing=args.max_standing,
                              evidence_dir=args.evidence_dir, evidence_keep=args.evidence_keep)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    webhook = alert_webhook(args)
    if args.evidence_dir:  # checked before the model loads: cheap mistakes first
        try:
            Path(args.evidence_dir).mkdir(parents=True, exist_ok=True)
            probe = Path(args.evidence_dir) / ".mixmalmm-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"--evidence-dir {args.evidence_dir}: {exc}") from exc
    if args.max_message_bytes < 1024 or args.max_question_chars < 1:
        raise UserError("--max-message-bytes must be >= 1024 and --max-question-chars >= 1")
    curve = None
    if args.curve_secret:
        try:
            curve = CurveKeys.from_files(args.curve_secret, args.curve_clients)
        except (OSError, ValueError, ServerError) as exc:  # ServerError: a public .key file, no secret
            raise UserError(f"CURVE keys: {exc}") from exc
    elif args.curve_clients:
        raise UserError("--curve-clients needs --curve-secret, the server's key pair")
    if args.state_dir:  # checked before the model loads: cheap mistakes first
        from .store import open_store

        try:
            open_store(args.state_dir)  # a directory, or an fsspec URL (README: Persistence)
        except OSError as exc:
            raise UserError(f"--state-dir {args.state_dir}: {exc}") from exc
    try:
        for endpoint in (args.bind, args.events):
            check_bind_security(endpoint, curve, args.insecure)
        if args.http:
            check_console_security(args.http, args.insecure)
    except (ServerError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    if args.cluster and (args.metrics or args.http):
        raise UserError("--metrics and --http are not yet available with --cluster (they read one engine; "
                        "the cluster's engines are in its workers)")
    if args.cluster:
        return run_cluster_serve(args, config, curve, webhook)
    if args.workers or args.worker_resources or args.state_store or args.rebalance:
        raise UserError("--workers, --worker-resources, --state-store and --rebalance need --cluster")
    metrics_address = None
    if args.metrics:
        from .metrics import parse_address

        try:
            metrics_address = parse_address(args.metrics)
            # Plain HTTP: CURVE keys protect the ZeroMQ sockets only, so off loopback it takes --insecure.
            if not (args.insecure or is_local_endpoint(f"tcp://[{metrics_address[0]}]:{metrics_address[1]}")):
                raise ValueError(f"--metrics {args.metrics}: refusing to serve metrics (plain HTTP) on a "
                                 "non-loopback address without --insecure")
        except (ValueError, ServerError) as exc:
            raise UserError(str(exc)) from exc
    model, name = load_model(args)
    stopping = threading.Event()
    # the ZeroMQ server, then the console and the webhook: each gets every event, numbered; held until they run
    sinks = EventFanout(held=True)
    engine = Engine(model, config, publish=sinks.publish, model_name=name)
    try:
        limits = P.Limits(max_message_bytes=args.max_message_bytes, max_question_chars=args.max_question_chars)
        server = Server(engine, request_endpoint=args.bind, event_endpoint=args.events, curve=curve,
                        insecure=args.insecure, limits=limits, ask_workers=args.max_questions)
        console = Console(engine, address=args.http, limits=limits, insecure=args.insecure) if args.http else None
    except (ServerError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    sinks.add(server)
    if webhook is not None:
        sinks.add(webhook.start())
    metrics = None
    if metrics_address is not None:
        from .metrics import EngineMetrics

        metrics = EngineMetrics(engine, server, webhook)
        try:
            host, port = metrics.serve(*metrics_address)
        except OSError as exc:
            raise UserError(f"--metrics {args.metrics}: {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", host, port)
    engine.start()
    try:
        server.start()
        if console is not None:
            console.start()
            sinks.add(console)
            log.info("console on %s", console.url)
        sinks.release()
    except ServerError as exc:
        engine.shutdown(save=False)
        server.stop()
        if metrics is not None:
            metrics.stop()
        raise UserError(str(exc)) from exc
    try:
        add_sources(args, engine.add_stream)
        log.info("serving %d stream(s) on %s (events on %s), model %s on %s", len(engine.streams()), server.request_address,
                 server.event_address, name, model.device)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        while not stopping.wait(0.5):
            pass
        log.info("shutting down: stopping sources, saving state")
    finally:
        engine.shutdown(save=True)
        server.stop()
        if console is not None:
            console.stop()
        if metrics is not None:
            metrics.stop()
        if webhook is not None:
            webhook.stop()
    log.info("stopped")
    return EXIT_OK


def alert_webhook(args: argparse.Namespace):
    """``--alert-webhook``'s `alerts.Webhook` (not started), None without one; UserError for a bad URL."""
    if not args.alert_webhook:
        return None
    from .alerts import Webhook

    try:
        return Webhook(args.alert_webhook, insecure=args.insecure)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def run_cluster_serve(args: argparse.Namespace, config, curve, webhook=None) -> int:
    """``serve --cluster``: engine workers as Ray actors behind a front door (``mixmalmm.streamer.cluster``)."""
    import dataclasses

    from mixmalmm.clients import protocol as P

    from . import cluster as C
    from .options import add_model_arguments
    from .server import EventFanout, Server, ServerError

    if not args.state_store:
        raise UserError("--cluster needs --state-store DIR|URL, the shared store every worker snapshots into")
    if args.state_dir:
        raise UserError("--cluster takes --state-store (shared by the workers), not --state-dir")
    from .store import is_url, open_store

    try:
        open_store(args.state_store)  # a shared directory, or an fsspec URL every node reaches
        resources = C.parse_resources(args.worker_resources)
        per_node = args.workers == "per-node" or (args.workers is None and not args.cluster.startswith("local:"))
        if per_node:
            count = 0
        elif args.workers is None:
            count = int(args.cluster.split(":", 1)[1])
        else:
            count = int(args.workers)
            if count < 1:
                raise ValueError(f"--workers must be >= 1 or per-node, got {args.workers}")
    except OSError as exc:
        raise UserError(f"--state-store {args.state_store}: {exc}") from exc
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    # Workers run elsewhere (another working directory, another node): they get absolute paths.
    config = dataclasses.replace(
        config, state_dir=args.state_store if is_url(args.state_store) else str(Path(args.state_store).resolve()),
        evidence_dir=str(Path(args.evidence_dir).resolve()) if args.evidence_dir else None)
    probe = argparse.ArgumentParser()
    add_model_arguments(probe)
    model_options = {a.dest: getattr(args, a.dest) for a in probe._actions if a.dest != "help"}
    try:
        ray = C.import_ray()
        C.connect(ray, args.cluster)
    except C.ClusterError as exc:
        raise UserError(str(exc)) from exc
    stopping = threading.Event()
    try:
        if per_node:
            nodes = [n["NodeID"] for n in ray.nodes() if C.fits(n, resources)]
            if not nodes:
                raise UserError(f"no node of the cluster has the resources of one worker ({resources})")
            workers = [w for i, node in enumerate(nodes)
                       for w in C.start_workers(ray, [f"w{i}"], resources, model_options, config, node=node)]
        else:
            workers = C.start_workers(ray, [f"w{i}" for i in range(count)], resources, model_options, config)
    except C.ClusterError as exc:
        ray.shutdown()
        raise UserError(str(exc)) from exc
    box = EventFanout()  # the ZeroMQ server, then the webhook: each gets every event, numbered
    front = C.FrontDoor(ray, workers, config.state_dir, publish=box.publish, max_streams=config.max_streams,
                        rebalance=args.rebalance)
    try:
        limits = P.Limits(max_message_bytes=args.max_message_bytes, max_question_chars=args.max_question_chars)
        server = Server(front, request_endpoint=args.bind, event_endpoint=args.events, curve=curve,
                        insecure=args.insecure, limits=limits, ask_workers=args.max_questions)
        box.add(server)
        server.start()
        if webhook is not None:
            box.add(webhook.start())
    except (ServerError, ValueError) as exc:
        front.shutdown()
        ray.shutdown()
        raise UserError(str(exc)) from exc
    try:
        front.start(restore=True)
        if per_node:
            threading.Thread(target=C.grow_per_node, args=(front, ray, resources, model_options, config, stopping),
                             daemon=True).start()
        add_sources(args, front.handle)
        log.info("serving %d worker(s) on %s (events on %s)", len(workers), server.request_address, server.event_address)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        while not stopping.wait(0.5):
            pass
        log.info("shutting down: the workers save their streams")
    finally:
        stopping.set()
        front.shutdown()
        server.stop()
        if webhook is not None:
            webhook.stop()
        ray.shutdown()
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixmalmm", description="mixmalmm's engine-side commands")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    replay.add_parser(commands)
    demo.add_parser(commands)
    evaluate.add_parser(commands)
    train = commands.add_parser("train", help="train a model (see python -m mixmalmm.model.train --help)",
                                add_help=False)
    train.set_defaults(run=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train" and (len(argv) < 2 or argv[1].startswith("-")):  # the synthetic world
        from mixmalmm.model import train

        return int(train.main(argv[1:]) or 0)
    if argv and argv[0] == "train":  # mixmalmm train DATASET ...
        from . import train as finetune

        args = finetune.build_parser().parse_args(argv[1:])
        args.command, args.run = "train", finetune.run_train
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "INFO")),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.run(args)
    except UserError as exc:
        print(f"mixmalmm {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
