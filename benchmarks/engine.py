"""End-to-end engine throughput, question latency and memory over a long replay (tiny model, CPU).

1. The model alone: vision encoder + one step per Shot on pre-made Shots (the engine's ceiling).
2. The engine: a synthetic stream replayed as fast as possible, every frame a Shot; the ratio to (1)
   is the engine's overhead (decode, preprocessing, queues, locks).
3. Question latency p50/p99 on an idle engine and while two streams ingest at full speed (the ratio of
   the two p99s shows the priority questions get over ingest steps).
4. Many clients at once: 1, 5 and 20 clients over real ZeroMQ sockets (a `Server` on loopback), each
   asking one question after another of an idle stream: latency p50/p99 as the clients see it, and
   questions answered per second (waiting questions share one batched `generate`).
5. Resident memory at the start and during a long replay (default 100,000 frames, ActionShot on):
   it must stay flat.
6. With --console: end-to-end Shots/s with the web console off and on (an SSE client reading the events
   and a poller doing what an open page does: status, list_streams, the latest Shot's JPEG and the memory
   sheet every second), a standing question publishing answers in both; runs interleaved, the median of each.

    python benchmarks/engine.py                  # full run (the long replay takes a few minutes)
    python benchmarks/engine.py --quick          # 10,000 frames, fewer questions
    python benchmarks/engine.py --questions-only # sections 3 and 4
    python benchmarks/engine.py --console        # adds section 6 (--console-only: section 6 alone)
    python benchmarks/engine.py --metrics-cost   # only (2) with `serve --metrics` on vs off (scraped every 1 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import torch

from mixmalmm.clients import Client
from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM
from mixmalmm.streamer.console import Console
from mixmalmm.streamer.engine import Engine, EngineConfig
from mixmalmm.streamer.preprocess import preprocess
from mixmalmm.streamer.server import EventFanout, Server
from mixmalmm.streamer.sources import open_source

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)  # every decoded frame is a Shot
LONG = P.ActionShotSettings(enabled=True, sample_fps=None)  # every frame through ActionShot


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(frames: int, size: tuple[int, int] = (160, 120)) -> str:
    return f"synthetic:?num_frames={frames}&width={size[0]}&height={size[1]}&fps=25&scene_length=50"


def model_rate(model: MALMM, shots: int) -> float:
    """Shots per second through encode + step alone, on pre-made preprocessed frames."""
    with open_source(synthetic(shots)) as source:
        images = [f.rgb for f in source]
    proc = model.processor.image_processor
    pixels = preprocess(images, model.image_size, proc.image_mean, proc.image_std)
    state = model.create_state("bench")
    t0 = time.perf_counter()
    for i in range(shots):
        model.step([state], model.encode_frames(pixels[i : i + 1]), [i / 25])
    return shots / (time.perf_counter() - t0)


def wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not get there in time")
        time.sleep(0.02)


def add(engine: Engine, sid: str, uri: str, actionshot=None) -> None:
    engine.add_stream(P.AddStream(id=0, stream=sid, uri=uri, pace="fast", actionshot=actionshot))


def engine_rate(model: MALMM, shots: int, metrics: bool = False) -> float:
    """Section 2's Shots/s; metrics: with the Prometheus endpoint on and scraped every second meanwhile."""
    engine = Engine(model, EngineConfig())
    endpoint, scraping = None, threading.Event()
    if metrics:
        import urllib.request

        from mixmalmm.streamer.metrics import EngineMetrics

        endpoint = EngineMetrics(engine)
        host, port = endpoint.serve("127.0.0.1", 0)

        def scrape() -> None:
            while not scraping.wait(1.0):
                with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
                    reply.read()

        threading.Thread(target=scrape, daemon=True).start()
    engine.start()
    try:
        t0 = time.perf_counter()
        add(engine, "e2e", synthetic(shots), EVERY_FRAME)
        stream = engine._get("e2e")
        wait(lambda: stream.state.frames == shots, 600)
        return shots / (time.perf_counter() - t0)
    finally:
        scraping.set()
        engine.shutdown(save=False)
        if endpoint is not None:
            endpoint.stop()


def metrics_cost(model: MALMM, shots: int, runs: int) -> list[tuple[str, str]]:
    """Engine Shots/s with metrics off and on, runs alternated (off, on, off, on...): medians."""
    import statistics

    engine_rate(model, min(shots, 100))  # warm-up
    off, on = [], []
    for _ in range(runs):
        off.append(engine_rate(model, shots))
        on.append(engine_rate(model, shots, metrics=True))
    a, b = statistics.median(off), statistics.median(on)
    return [(f"engine Shots/s, metrics off (median of {runs} runs of {shots} Shots)", f"{a:.0f}"),
            ("engine Shots/s, metrics on, scraped every 1 s (median)", f"{b:.0f}"),
            ("throughput cost of metrics, %", f"{100 * (a - b) / a:+.1f}"),
            ("spread of the off runs (max - min) / median, %", f"{100 * (max(off) - min(off)) / a:.1f}")]


def console_rate(model: MALMM, shots: int, on: bool) -> tuple[float, int, int]:
    """engine_rate with a standing question answering every 1 s, and with `on` the console serving an
    SSE client and a page-like poller. Returns (Shots/s, events the SSE client read, page polls)."""
    box = EventFanout()  # as serve does
    engine = Engine(model, EngineConfig(), publish=box.publish).start()
    stop = threading.Event()
    counts = {"events": 0, "polls": 0}
    threads = []
    console = None
    try:
        if on:
            console = Console(engine, address="127.0.0.1:0").start()
            box.add(console)
            host, port = console.url[len("http://"):].rstrip("/").rsplit(":", 1)

            def sse() -> None:
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            counts["events"] += sock.recv(65536).count(b"data: ")

            def page() -> None:
                while not stop.wait(1.0):
                    for body in (b'{"id": 1, "type": "status"}', b'{"id": 2, "type": "list_streams"}'):
                        with urllib.request.urlopen(urllib.request.Request(
                                console.url + "api/request", data=body, headers={"Content-Type": "application/json"})) as r:
                            json.loads(r.read())
                    for picture in ("shot.jpg", "memory.jpg"):  # the page's thumbnail and memory sheet
                        try:
                            with urllib.request.urlopen(console.url + f"api/streams/e2e/{picture}") as r:
                                r.read()
                        except urllib.error.HTTPError:  # before the first Shot
                            pass
                    counts["polls"] += 1

            threads = [threading.Thread(target=f, daemon=True) for f in (sse, page)]
            for t in threads:
                t.start()
            wait(lambda: console.clients == 1, 10)
        t0 = time.perf_counter()
        add(engine, "e2e", synthetic(shots), EVERY_FRAME)
        engine.add_question(P.AddQuestion(id=0, stream="e2e", question_id="q", text="what is happening?",
                                          period_s=1.0))
        stream = engine._get("e2e")
        wait(lambda: stream.state.frames == shots, 600)
        rate = shots / (time.perf_counter() - t0)
    finally:
        stop.set()
        engine.shutdown(save=False)
        if console is not None:
            console.stop()
        for t in threads:
            t.join(5)
    return rate, counts["events"], counts["polls"]


def latencies(engine: Engine, sid: str, count: int) -> list[float]:
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        engine.ask(sid, f"what happened {i}?", max_new_tokens=10)
        out.append(time.perf_counter() - t0)
    return out


def many_clients(engine: Engine, sid: str, clients: int, per_client: int) -> tuple[list[float], float]:
    """Client-side latencies of `clients` clients asking `per_client` questions each over ZeroMQ at once,
    and the questions answered per second."""
    server = Server(engine, request_endpoint="tcp://127.0.0.1:*", event_endpoint=None).start()
    out: list[float] = []
    ready = threading.Barrier(clients + 1)

    def asker(i: int) -> None:
        with Client(server.request_address, timeout_s=120.0, retries=0) as client:
            ready.wait()
            for k in range(per_client):
                t0 = time.perf_counter()
                client.ask(sid, f"what happened {i} {k}?", max_new_tokens=10)
                out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=asker, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        ready.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.stop()
    if len(out) != clients * per_client:
        raise RuntimeError(f"{clients * per_client - len(out)} questions were not answered")
    return out, len(out) / wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--long-frames", type=int, default=None, help="frames in the long replay (default 100000)")
    ap.add_argument("--questions-only", action="store_true", help="only the question latency sections")
    ap.add_argument("--questions", type=int, default=None, help="questions per latency row (default 50)")
    ap.add_argument("--console", action="store_true", help="also section 6: the web console's cost")
    ap.add_argument("--console-only", action="store_true", help="only section 6")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each arm in section 6 (default 3)")
    ap.add_argument("--metrics-cost", action="store_true", help="only section 2, metrics on vs off")
    ap.add_argument("--runs", type=int, default=5, help="runs of each side for --metrics-cost (default 5)")
    args = ap.parse_args()
    shots = 300 if args.quick else 1000
    questions = args.questions or (20 if args.quick else 50)
    long_frames = args.long_frames or (10_000 if args.quick else 100_000)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = MALMM.tiny().eval()
    rows: list[tuple[str, str]] = []
    if args.metrics_cost:
        print_table(metrics_cost(model, shots, args.runs))
        return

    if args.console or args.console_only:
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for on in (False, True):
                runs[on].append(console_rate(model, shots, on))
        off = statistics.median(r[0] for r in runs[False])
        on = statistics.median(r[0] for r in runs[True])
        rows += [(f"console off, Shots/s (median of {args.repeats}; a standing question every 1 s)",
                  " / ".join(f"{r[0]:.0f}" for r in runs[False]) + f" -> {off:.0f}"),
                 ("console on, SSE client + page polls every 1 s, Shots/s",
                  " / ".join(f"{r[0]:.0f}" for r in runs[True]) + f" -> {on:.0f}"),
                 ("console cost (1 - on / off)", f"{100 * (1 - on / off):+.1f} %"),
                 ("events read by the SSE client / page polls, per run",
                  ", ".join(f"{r[1]} / {r[2]}" for r in runs[True]))]
        if args.console_only:
            print_table(rows)
            return

    if not args.questions_only:
        base = model_rate(model, shots)
        e2e = engine_rate(model, shots)
        rows += [("model alone, Shots/s (encode + step)", f"{base:.0f}"),
                 ("engine end to end, Shots/s (decode + preprocess + queue + step)", f"{e2e:.0f}"),
                 ("engine / model", f"{e2e / base:.2f}")]

    engine = Engine(model, EngineConfig()).start()
    try:
        add(engine, "idle", synthetic(50), EVERY_FRAME)
        wait(lambda: engine._get("idle").state.frames == 50, 60)
        idle = latencies(engine, "idle", questions)
        crowd = {n: many_clients(engine, "idle", n, max(questions // n, 5)) for n in (1, 5, 20)}
        add(engine, "load1", synthetic(10**9), EVERY_FRAME)
        add(engine, "load2", synthetic(10**9), EVERY_FRAME)
        wait(lambda: engine._get("load2").state.frames > 10, 60)
        busy = latencies(engine, "load1", questions)
        stepped = engine._get("load1").state.frames
    finally:
        engine.shutdown(save=False)
    rows += [(f"question latency idle, p50 / p99 ms ({questions} questions, 10 tokens)",
              f"{1e3 * pct(idle, 0.5):.1f} / {1e3 * pct(idle, 0.99):.1f}"),
             ("question latency, two streams ingesting at full speed, p50 / p99 ms",
              f"{1e3 * pct(busy, 0.5):.1f} / {1e3 * pct(busy, 0.99):.1f}"),
             ("busy p99 / idle p99", f"{pct(busy, 0.99) / pct(idle, 0.99):.2f}"),
             ("Shots stepped on one loaded stream meanwhile", str(stepped))]
    for n, (lat, per_s) in crowd.items():
        rows.append((f"{n} client{'s' if n > 1 else ''} over ZeroMQ asking at once, idle, p50 / p99 ms; questions/s",
                     f"{1e3 * pct(lat, 0.5):.1f} / {1e3 * pct(lat, 0.99):.1f}; {per_s:.0f}"))
    one = pct(crowd[1][0], 0.5)
    rows.append(("20-client p50 / 1-client p50", f"{pct(crowd[20][0], 0.5) / one:.2f}"))

    if args.questions_only:
        print_table(rows)
        return
    engine = Engine(model, EngineConfig()).start()
    try:
        add(engine, "long", synthetic(long_frames), LONG)  # ActionShot on: a composite per scene
        stream = engine._get("long")
        wait(lambda: stream.pipeline.frames > 100, 60)
        marks, samples = [0.25, 0.5, 0.75, 1.0], [("start", rss_mib())]
        t0 = time.perf_counter()
        for m in marks:
            wait(lambda m=m: stream.pipeline.frames >= m * long_frames
                 or stream.state_name in ("draining", "finished"), 3600)
            samples.append((f"{int(m * 100)}%", rss_mib()))
        wait(lambda: stream.state_name == "finished", 600)  # every Shot in memory, the last one's step done
        elapsed = time.perf_counter() - t0
        folded = stream.state.frames
    finally:
        engine.shutdown(save=False)
    rows.append((f"long replay: {long_frames} frames -> {folded} Shots in {elapsed:.0f} s "
                 f"({long_frames / elapsed:.0f} frames/s)", ""))
    rows += [(f"resident memory at {name}, MiB", f"{mib:.0f}") for name, mib in samples]
    growth = samples[-1][1] - samples[1][1]
    rows.append(("growth from 25% to the end, MiB", f"{growth:+.0f}"))
    print_table(rows)


def print_table(rows: list[tuple[str, str]]) -> None:
    print(f"engine benchmark, tiny model, {torch.get_num_threads()} CPU threads")
    print("| measure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
