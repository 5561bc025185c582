"""The engine on a Ray cluster (tiny model, CPU) against a single `serve`, on one machine.

Prints one table: ask latency p50/p99 through the front door and through a single server on the same
three streams; Shots/s folded over three streams with 1, 2 and 3 workers (and the single engine);
seconds from a SIGKILL of a worker's node to its streams answering again; seconds a `move_stream`
paused ingesting, and the frames a live 25 fps source sent meanwhile (a file loses none: it resumes
after its last Shot).

Ray needs a network namespace holding only loopback (see tests/streamer/test_cluster.py): run as root,
the script runs itself again under `unshare -n`.

    python benchmarks/cluster.py [--asks 40] [--seconds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from mixmalmm.clients import Client
from mixmalmm.clients import protocol as P

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)
FAST = "synthetic:?width=64&height=48&fps=25"
MODEL = {"model": None, "malmm_checkpoint": None, "memory_bank_length": None, "visual_kv_cache": None,
         "device": "cpu", "dtype": None}


def asks(client: Client, n: int) -> tuple[float, float]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        client.ask(f"s{i % 3}", "what is there?", max_new_tokens=3)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def shots_rate(client: Client, seconds: float) -> float:
    def total():
        return sum(s.shots for s in client.status().streams)

    time.sleep(1.0)
    a, t0 = total(), time.perf_counter()
    time.sleep(seconds)
    return (total() - a) / (time.perf_counter() - t0)


def add_three(client: Client, pace: str) -> None:
    for i in range(3):
        client.add_stream(f"s{i}", FAST, pace=pace, actionshot=EVERY_FRAME)


@contextlib.contextmanager
def single():
    from mixmalmm.model import MALMM
    from mixmalmm.streamer.engine import Engine
    from mixmalmm.streamer.server import Server

    box: list = []
    engine = Engine(MALMM.tiny().eval(), publish=lambda e: box[0].publish(e)).start()
    server = Server(engine, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*")
    box.append(server)
    server.start()
    client = Client(server.request_address, timeout_s=120, retries=0)
    try:
        yield client
    finally:
        client.close()
        engine.shutdown(save=False)
        server.stop()


@contextlib.contextmanager
def cluster(workers: int, store: str):
    import ray
    from ray.cluster_utils import Cluster

    from mixmalmm.streamer import cluster as C
    from mixmalmm.streamer.engine import EngineConfig
    from mixmalmm.streamer.server import Server

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    nodes = [c.add_node(num_cpus=1) for _ in range(workers)]
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    config = EngineConfig(state_dir=store, snapshot_period_s=1.0)
    ids = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU", 0) >= 1]
    ws = [C.start_workers(ray, [f"w{i}"], {"CPU": 1.0}, MODEL, config, node=nid)[0] for i, nid in enumerate(ids)]
    box: list = []
    front = C.FrontDoor(ray, ws, store, publish=lambda e: box[0].publish(e), max_streams=8)
    server = Server(front, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*")
    box.append(server)
    server.start()
    front.start(restore=False)
    client = Client(server.request_address, timeout_s=120, retries=0)
    try:
        yield client, front, nodes
    finally:
        client.close()
        front.shutdown()
        server.stop()
        ray.shutdown()
        c.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    if os.environ.get("MIXMALMM_IN_NETNS") != "1":
        inner = f"ip link set lo up && MIXMALMM_IN_NETNS=1 exec {sys.executable} {' '.join(sys.argv)}"
        sys.exit(subprocess.run(["unshare", "-n", "bash", "-c", inner]).returncode)
    rows = []
    with single() as client:
        add_three(client, "realtime")
        time.sleep(2.0)
        p50, p99 = asks(client, args.asks)
        rows.append(("ask p50 / p99, single serve (3 live streams)", f"{p50 * 1e3:.0f} / {p99 * 1e3:.0f} ms"))
    with single() as client:
        add_three(client, "fast")
        rows.append(("Shots/s, 3 streams, single serve", f"{shots_rate(client, args.seconds):.1f}"))
    for n in (1, 2, 3):
        with tempfile.TemporaryDirectory() as store, cluster(n, store) as (client, front, nodes):
            add_three(client, "fast")
            rows.append((f"Shots/s, 3 streams, {n} worker(s)", f"{shots_rate(client, args.seconds):.1f}"))
    with tempfile.TemporaryDirectory() as store, cluster(3, store) as (client, front, nodes):
        add_three(client, "realtime")
        time.sleep(2.0)
        p50, p99 = asks(client, args.asks)
        rows.append(("ask p50 / p99, front door, 3 workers", f"{p50 * 1e3:.0f} / {p99 * 1e3:.0f} ms"))
        moved = client.move_stream("s0", "auto")
        rows.append(("move_stream pause (live 25 fps source)",
                     f"{moved.pause_s:.2f} s, ~{round(moved.pause_s * 25)} frames not seen"))
        client.save_snapshot()
        victim = next(s.worker for s in client.status().streams if s.stream == "s1")
        w = front.workers[victim]
        node = next(x for x in nodes if x.node_id == w.node)
        t0 = time.monotonic()
        for pid in [w.pid, *(p.process.pid for ps in node.all_processes.values() for p in ps)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        done = threading.Event()
        while not done.is_set():
            try:
                client.ask("s1", "what is there?", max_new_tokens=3)
                done.set()
            except Exception:
                time.sleep(0.05)
        rows.append(("node SIGKILL -> its stream answering again", f"{time.monotonic() - t0:.1f} s"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)} | value")
    print(f"{'-' * width}-|------")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    print(f"(os.cpu_count() = {os.cpu_count()}; every Ray worker asks for 1 CPU)")


if __name__ == "__main__":
    main()
