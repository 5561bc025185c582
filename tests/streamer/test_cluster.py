"""The engine on a real Ray cluster: three nodes on one machine (`ray.cluster_utils.Cluster`), each with
an engine worker (a Ray actor holding the tiny model), the front door behind a real ZeroMQ server.

Ray must run inside a network namespace that holds only loopback (outside one it resolves 127.0.0.1 to
the machine's interface address): run outside one, this module runs itself again under `unshare -n`
(as root) and passes when every test there passes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mixmalmm.clients import Client, EngineError, Subscriber
from mixmalmm.clients import protocol as P

from .conftest import NUM_FRAMES, _server, skip_unless_ci, wait_for

ray = pytest.importorskip("ray")
INSIDE = os.environ.get("MIXMALMM_IN_NETNS") == "1"
EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)
LONG = P.ActionShotSettings(enabled=False, sample_fps=2.0)  # a 30 s file paced: 2 Shots a second
CLI = [sys.executable, "-m", "mixmalmm.clients.cli"]
MODEL_OPTIONS = {"model": None, "malmm_checkpoint": None, "memory_bank_length": None, "visual_kv_cache": None,
                 "device": "cpu", "dtype": None}


@pytest.mark.skipif(INSIDE, reason="this is the run inside the namespace")
def test_cluster_suite_in_a_loopback_namespace():
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        skip_unless_ci("needs root, unshare and ip (iproute2) to make a loopback-only network namespace")
    inner = (f"ip link set lo up && MIXMALMM_IN_NETNS=1 exec {sys.executable} -m pytest -x -q -p no:cacheprovider "
             f"{__file__}")
    run = subprocess.run(["unshare", "-n", "bash", "-c", inner], capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    assert "13 passed" in run.stdout, tail  # every test inside ran (none skipped)


pytestmark_inner = pytest.mark.skipif(not INSIDE, reason="runs inside a loopback-only namespace (see above)")


@pytest.fixture(scope="module")
def live(media):
    """The test RTSP server (GStreamer, on the namespace's loopback) for the whole module: a live camera."""
    yield from _server(media.rtsp)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    from mixmalmm.streamer import cluster as C
    from mixmalmm.streamer.engine import EngineConfig
    from mixmalmm.streamer.server import Server

    store = tmp_path_factory.mktemp("store")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                                          "health_check_initial_delay_ms": 0}})
    nodes = [c.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    config = EngineConfig(state_dir=str(store), snapshot_period_s=1.0)
    node_ids = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU", 0) >= 1]
    workers = [C.start_workers(ray, [f"w{i}"], {"CPU": 1.0}, MODEL_OPTIONS, config, node=nid)[0]
               for i, nid in enumerate(node_ids)]
    box: list = []
    events: list = []
    front = C.FrontDoor(ray, workers, str(store), publish=lambda e: box[0].publish(e), max_streams=4,
                        poll_s=0.5)
    server = Server(front, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*")
    box.append(server)
    server.start()
    front.start(restore=False)
    sub = Subscriber(server.event_address)
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            e = sub.recv(0.2)
            if e is not None:
                events.append(e)

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    client = Client(server.request_address, timeout_s=120, retries=0)
    time.sleep(0.5)  # the subscription reaches the PUB
    grow_stop = threading.Event()
    try:
        yield {"cluster": c, "nodes": nodes, "front": front, "server": server, "client": client,
               "events": events, "store": store, "config": config, "grow_stop": grow_stop}
    finally:
        grow_stop.set()
        stop.set()
        t.join(2)
        client.close()
        sub.close()
        front.shutdown()
        server.stop()
        ray.shutdown()
        c.shutdown()


def _worker_of(client, sid):
    return next(s.worker for s in client.status().streams if s.stream == sid)


@pytestmark_inner
def test_six_streams_spread_asked_and_standing_questions_fire(cluster, media, live):
    client = cluster["client"]
    client.add_stream("s0", live.url, actionshot=LONG)  # a live camera (the test RTSP server)
    for i in range(1, 6):
        client.add_stream(f"s{i}", str(media.rtsp), actionshot=LONG)  # 30 s files at their own pace
    status = client.status()
    per = {w.worker: w.streams for w in status.workers}
    assert per == {"w0": 2, "w1": 2, "w2": 2}, per
    assert {s.worker for s in status.streams} == {"w0", "w1", "w2"}
    client.add_question("s0", "q", "what happens?", period_s=1.0)
    wait_for(lambda: all(s.shots >= 2 for s in client.status().streams), 60, "every stream to fold Shots")
    answer = client.ask("s1", "what is there?", max_new_tokens=3)
    assert answer.stream == "s1" and answer.span_end_s is not None
    cli = subprocess.run([*CLI, "ask", "s2", "what is there?", "--server", cluster["server"].request_address,
                          "--json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert '"stream":"s2"' in cli.stdout.replace(" ", "")
    shown = subprocess.run([*CLI, "status", "--server", cluster["server"].request_address],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.split()[:1] == ["WORKER"] for line in lines)  # the workers' table, with their load
    assert sum(line.split()[:1] in (["w0"], ["w1"], ["w2"]) and "2/4" in line for line in lines) == 3
    rows = {line.split()[0]: line.split()[2] for line in lines if line.startswith("s") and len(line.split()) > 2}
    assert rows == {s.stream: s.worker for s in client.status().streams}  # each stream's WORKER column
    wait_for(lambda: any(isinstance(e, P.AnswerEvent) and e.stream == "s0" for e in cluster["events"]), 30,
             "a standing answer through the front door")
    with pytest.raises(EngineError) as err:
        client.add_stream("x", str(media.h264), worker="w9")
    assert err.value.code == P.ErrorCode.BAD_REQUEST and "no worker 'w9'" in err.value.message


@pytestmark_inner
def test_a_killed_node_s_streams_answer_elsewhere_with_their_memory(cluster):
    client, front, events = cluster["client"], cluster["front"], cluster["events"]
    victim = _worker_of(client, "s0")
    lost = sorted(s.stream for s in client.status().streams if s.worker == victim)
    assert "s0" in lost  # the live RTSP stream is among them
    wait_for(lambda: client.status("s0").streams[0].state == "live", 30, "s0 live")
    saved = {s.stream: s.shots for s in client.status().streams if s.stream in lost}
    client.save_snapshot()  # holds at least those Shots
    seq_before = max(e.seq for e in events if e.stream == "s0")
    w = front.workers[victim]
    node = next(n for n in cluster["nodes"] if n.node_id == w.node)
    t0 = time.monotonic()
    for pid in [w.pid, *(p.process.pid for ps in node.all_processes.values() for p in ps)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for sid in lost:
        answer = wait_for(lambda sid=sid: _try_ask(client, sid), 90, f"{sid} answering again")
        assert answer.span_end_s is not None
    took = time.monotonic() - t0
    status = client.status()
    for s in status.streams:
        if s.stream in lost:
            assert s.worker != victim and s.shots >= saved[s.stream], (s, saved)
    assert not next(x for x in status.workers if x.worker == victim).alive
    # The camera reconnected from its new worker: live again, its memory the restored one growing.
    wait_for(lambda: client.status("s0").streams[0].state == "live", 30, "s0 live again on its new worker")
    assert client.status("s0").streams[0].shots >= saved["s0"]
    moved = [e for e in events if isinstance(e, P.StreamStateEvent) and e.message and f"after worker {victim} died"
             in e.message]
    assert {e.stream for e in moved} == set(lost)
    wait_for(lambda: any(isinstance(e, P.AnswerEvent) and e.stream == "s0" and e.seq > seq_before for e in events),
             30, "the standing question firing again, seq still growing")
    seqs = [e.seq for e in events if e.stream == "s0"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    print(f"kill -> answering: {took:.1f} s")


def _try_ask(client, sid):
    try:
        return client.ask(sid, "what is there?", max_new_tokens=3)
    except EngineError:
        return None


@pytestmark_inner
def test_move_stream_keeps_the_memory(cluster, media):
    client = cluster["client"]
    client.add_stream("m", str(media.h264), pace="fast", actionshot=EVERY_FRAME)
    wait_for(lambda: client.status("m").streams[0].state == "finished", 60, "the file to finish")
    before = client.ask("m", "what is there?", max_new_tokens=4)
    source = _worker_of(client, "m")
    moved = client.move_stream("m", "auto")
    assert moved.source == source and moved.target != source and moved.state == "finished"
    after = client.ask("m", "what is there?", max_new_tokens=4)
    assert (after.answer, after.span_start_s, after.span_end_s) == (before.answer, before.span_start_s,
                                                                    before.span_end_s)
    assert client.status("m").streams[0].shots == NUM_FRAMES and _worker_of(client, "m") == moved.target
    # an alert made on the target worker reaches the front door's PUB (the memory no longer changes: the
    # standing answer is the one asked; the moved stream has no Shot of its own there yet, and says so)
    expected = client.ask("m", "what is there?").answer
    assert expected.strip(), "the tiny model said nothing: no answer to match"
    client.add_question("m", "seen", "what is there?", period_s=0.3, alert_when=expected)
    alert = wait_for(lambda: next((e for e in cluster["events"] if isinstance(e, P.AlertEvent) and e.stream == "m"),
                                  None), 30, "an alert through the front door")
    assert (alert.question_id, alert.reason, alert.answer) == ("seen", "match", expected)
    assert alert.evidence_jpeg is None and "restored" in alert.evidence_error and alert.seq > 1
    client.remove_question("m", "seen")
    with pytest.raises(EngineError) as err:
        client.move_stream("m", "nobody")
    assert err.value.code == P.ErrorCode.BAD_REQUEST
    print(f"move_stream: {moved.pause_s:.2f} s, 0 frames lost (a file resumes after its last Shot)")


@pytestmark_inner
def test_two_moves_of_one_stream_at_once_one_is_refused(cluster):
    client, server = cluster["client"], cluster["server"]
    before = client.ask("m", "what is there?", max_new_tokens=4)
    barrier = threading.Barrier(2)
    results: list = []

    def move() -> None:
        with Client(server.request_address, timeout_s=120, retries=0) as c:
            barrier.wait()
            try:
                results.append(c.move_stream("m", "auto"))
            except EngineError as exc:
                results.append(exc)

    threads = [threading.Thread(target=move) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    moved = [r for r in results if isinstance(r, P.MoveStreamResult)]
    refused = [r for r in results if isinstance(r, EngineError)]
    assert len(moved) == 1 and len(refused) == 1, results
    assert refused[0].code == P.ErrorCode.UNAVAILABLE and "stream 'm' is moving" in refused[0].message
    after = client.ask("m", "what is there?", max_new_tokens=4)
    assert (after.answer, after.span_end_s) == (before.answer, before.span_end_s)
    assert _worker_of(client, "m") == moved[0].target and client.status("m").streams[0].shots == NUM_FRAMES


@pytestmark_inner
def test_a_node_added_gets_the_new_streams(cluster, media):
    from mixmalmm.streamer import cluster as C

    client, front = cluster["client"], cluster["front"]
    cluster["cluster"].add_node(num_cpus=1)
    threading.Thread(target=C.grow_per_node, args=(front, ray, {"CPU": 1.0}, MODEL_OPTIONS, cluster["config"],
                                                   cluster["grow_stop"], 0.5), daemon=True).start()
    wait_for(lambda: len([w for w in front.workers.values() if w.alive]) == 3, 120, "a worker on the new node")
    new = max(front.workers, key=lambda n: int(n[1:]))
    info = client.add_stream("n", str(media.h264), pace="fast", actionshot=EVERY_FRAME)
    assert info.worker == new


@pytestmark_inner
def test_rebalance_moves_streams_onto_a_node_that_joins(cluster):
    client, front, events = cluster["client"], cluster["front"], cluster["events"]
    files = [f"s{i}" for i in range(1, 6)] + ["m", "n"]
    wait_for(lambda: all(s.state == "finished" for s in client.status().streams if s.stream in files), 90,
             "the files to finish")
    before = {sid: client.ask(sid, "what is there?", max_new_tokens=3) for sid in files}
    shots = {s.stream: s.shots for s in client.status().streams}
    seq = {sid: max((e.seq for e in events if e.stream == sid), default=0) for sid in shots}
    alive = {n for n, w in front.workers.items() if w.alive}
    front.rebalance = True
    try:
        cluster["cluster"].add_node(num_cpus=1)  # grow_per_node (started above) gives it a worker
        wait_for(lambda: len({n for n, w in front.workers.items() if w.alive} - alive) == 1, 120,
                 "a worker on the joined node")
        (new,) = {n for n, w in front.workers.items() if w.alive} - alive

        def spread():
            per = [w.streams for w in client.status().workers if w.alive]
            return max(per) - min(per) <= 1 and not front._moving
        wait_for(spread, 120, "the streams spread")
    finally:
        front.rebalance = False
    status = client.status()
    there = [s for s in status.streams if s.worker == new]
    assert there and len(there) == next(w.streams for w in status.workers if w.worker == new)
    for s in there:  # moved with their memory: same Shots, same answer, seq still growing
        assert s.shots == shots[s.stream], (s, shots)
        moved = [e for e in events if isinstance(e, P.StreamStateEvent) and e.stream == s.stream
                 and e.message and f"to {new}" in e.message]
        assert moved and moved[-1].seq > seq[s.stream]
        if s.stream in before:
            again = client.ask(s.stream, "what is there?", max_new_tokens=3)
            assert (again.answer, again.span_end_s) == (before[s.stream].answer, before[s.stream].span_end_s)
    assert any(s.stream in before for s in there)  # a finished file among them: its answer compared


@pytestmark_inner
def test_an_unwritable_store_is_reported_and_serving_goes_on(cluster, media):
    client, store = cluster["client"], cluster["store"]
    wait_for(lambda: client.status("n").streams[0].state == "finished", 60, "n to finish")
    keep = store.with_name("kept")
    shutil.move(store, keep)
    store.write_text("not a directory")
    try:
        with pytest.raises(EngineError) as err:
            client.save_snapshot("n")
        assert err.value.code == P.ErrorCode.UNAVAILABLE and "could not save stream 'n'" in err.value.message
        assert "could not save" in client.status().engine.persist_error
        assert client.ask("n", "still there?", max_new_tokens=3).span_end_s is not None
    finally:
        store.unlink()
        shutil.move(keep, store)


def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    from .conftest import free_port

    run = subprocess.run([*CLI, "serve", "--cluster", f"127.0.0.1:{free_port()}", "--state-store", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at '127.0.0.1:" in lines[0], run.stderr


def test_a_single_serve_refuses_worker_and_move_stream(tmp_path):
    from mixmalmm.model import MALMM
    from mixmalmm.streamer.engine import Engine

    engine = Engine(MALMM.tiny().eval())
    for request, said in ((P.AddStream(id=1, stream="a", uri="x.mp4", worker="w0"), "no worker 'w0'"),
                          (P.MoveStream(id=2, stream="a", to="auto"), "move_stream needs a cluster")):
        with pytest.raises(P.RequestError) as err:
            engine.handle(request)
        assert err.value.code == P.ErrorCode.BAD_REQUEST and said in err.value.message


def test_a_worker_keeps_its_unread_events_within_a_byte_bound_and_its_evidence_in_its_own_folder(tmp_path):
    """The worker class itself (what Ray runs as an actor), in this process: alerts carry pictures, so
    the events the front door has not read yet are bounded in bytes as well as in count."""
    from mixmalmm.streamer import cluster as C
    from mixmalmm.streamer.engine import EngineConfig

    worker = C.EngineWorker("w7", MODEL_OPTIONS, EngineConfig(evidence_dir=str(tmp_path / "ev")), event_buffer=50,
                            event_bytes=8000)
    try:
        assert worker.engine.evidence.root == (tmp_path / "ev" / "w7").resolve()
        big = P.AlertEvent(stream="s", question_id="q", question="?", answer="yes", reason="match",
                           evidence_jpeg="A" * 1500)
        for _ in range(3):
            worker._put(big)
        small = [P.StreamStateEvent(stream="s", state="live") for _ in range(60)]
        for event in small:
            worker._put(event)
        nxt, lost, bodies = worker.events(0, 0.0)
        assert nxt == 63 and len(bodies) == 50 and lost == 13  # the count bound: the oldest 13 dropped
        assert worker._event_bytes == sum(len(b) for b in bodies)
        for _ in range(3):
            worker._put(big)
        nxt, lost, bodies = worker.events(0, 0.0)
        assert sum(len(b) for b in bodies) <= 8000 and len(bodies) < 50 and P.decode_event(bodies[-1]) == big
        assert nxt == 66 and lost == 66 - len(bodies)  # what was dropped is counted as lost, as before
    finally:
        worker.engine.shutdown(save=False)


@pytestmark_inner
def test_a_stalled_worker_holds_no_merged_reply_and_a_move_onto_it_loses_nothing(cluster):
    """A worker stopped (SIGSTOP, as a hung process): status / save_snapshot answer within the front door's
    per-worker share and name it; a move onto it times out in Ray and the stream comes back on its source
    from the snapshot just written, with a stream_state event saying so; the stalled worker is given up."""
    client, front, events = cluster["client"], cluster["front"], cluster["events"]
    source = _worker_of(client, "m")
    stalled = next(w for n, w in sorted(front.workers.items()) if w.alive and n != source)
    kept = sorted(s.stream for s in client.status().streams if s.worker == stalled.name)
    before = client.ask("m", "what is there?", max_new_tokens=4)
    front.merge_timeout_s, front.call_timeout_s = 3.0, 5.0
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status = client.status()
        assert time.monotonic() - t0 < 10
        rows = {w.worker: w.alive for w in status.workers}
        assert rows[stalled.name] is False and rows[source] is True
        assert not any(s.worker == stalled.name for s in status.streams)
        with pytest.raises(EngineError) as err:
            client.save_snapshot()
        assert err.value.code == P.ErrorCode.UNAVAILABLE and f"{stalled.name} did not answer" in err.value.message
        with pytest.raises(EngineError) as err:
            client.move_stream("m", stalled.name)
        assert err.value.code == P.ErrorCode.UNAVAILABLE and f"runs on {source} again" in err.value.message
        after = client.ask("m", "what is there?", max_new_tokens=4)
        assert (after.answer, after.span_end_s) == (before.answer, before.span_end_s)
        assert _worker_of(client, "m") == source and client.status("m").streams[0].shots == NUM_FRAMES
        said = [e for e in events if isinstance(e, P.StreamStateEvent) and e.stream == "m" and e.message
                and f"after the move to {stalled.name} failed" in e.message]
        assert said and f"restored on {source}" in said[-1].message
        wait_for(lambda: not front.workers[stalled.name].alive, 30, "the stalled worker given up")
        for sid in kept:  # its streams answer elsewhere
            wait_for(lambda sid=sid: _try_ask(client, sid), 90, f"{sid} answering again")
        # Its node is alive: grow_per_node (started above) gives it a new worker.
        wait_for(lambda: any(w.alive and w.node == stalled.node for w in front.workers.values()), 120,
                 "a new worker on the stalled worker's node")
    finally:
        front.merge_timeout_s, front.call_timeout_s = 10.0, 120.0
        with contextlib.suppress(ProcessLookupError):
            os.kill(stalled.pid, signal.SIGKILL)


@pytestmark_inner
def test_a_front_door_restarted_on_the_store_restores_every_stream(cluster):
    """The front door dies (its workers with it: they are its actors); a new one on the same store restores
    every stream on new workers, memory included."""
    from mixmalmm.streamer import cluster as C
    from mixmalmm.streamer.server import Server

    client, front, store = cluster["client"], cluster["front"], cluster["store"]
    cluster["grow_stop"].set()  # the old front door's grow_per_node dies with it
    saved = {s.stream: s.shots for s in client.status().streams}
    client.save_snapshot()  # holds at least those Shots
    front._stop.set()  # the old front door stops watching (it is "dead")
    for w in front.workers.values():
        if w.alive:
            ray.kill(w.actor, no_restart=True)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    workers = [C.start_workers(ray, [f"r{i}"], {"CPU": 1.0}, MODEL_OPTIONS, cluster["config"], node=nid)[0]
               for i, nid in enumerate(alive)]
    box: list = []
    again = C.FrontDoor(ray, workers, str(store), publish=lambda e: box[0].publish(e), max_streams=4)
    server = Server(again, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*")
    box.append(server)
    server.start()
    try:
        again.start(restore=True)
        with Client(server.request_address, timeout_s=120, retries=0) as c2:
            status = c2.status()
            shots = {s.stream: s.shots for s in status.streams}
            assert set(shots) == set(saved)
            assert all(shots[sid] >= saved[sid] for sid in saved), (shots, saved)
            assert {s.worker for s in status.streams} <= {w.name for w in workers}
            assert c2.ask("m", "what is there?", max_new_tokens=3).span_end_s is not None
    finally:
        again.shutdown()
        server.stop()


@pytestmark_inner
def test_serve_cluster_sigkilled_then_run_again_restores_its_streams(tmp_path, media):
    """`mixmalmm serve --cluster local:2` as a user runs it, killed with SIGKILL: Ray's local cluster and
    the engine workers go with it, and the same command again restores the stream from the store with
    its memory, and it answers."""
    from .conftest import free_port

    store = tmp_path / "store"

    def serve(*extra: str):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        log = open(tmp_path / f"serve-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([*CLI, "serve", "--cluster", "local:2", "--state-store", str(store),
                                 "--snapshot-period", "1", "--bind", endpoint, "--events",
                                 f"tcp://127.0.0.1:{free_port()}", *extra], stdout=log, stderr=subprocess.STDOUT)
        return proc, endpoint, log

    first, endpoint, log1 = serve(f"f={media.rtsp}", "--sample-fps", "2")  # a 30 s file at its own pace
    try:
        with Client(endpoint, timeout_s=5, retries=0) as c:
            status = wait_for(lambda: _try_status(c, "f", lambda s: s.shots >= 3), 120, "the stream's first Shots")
        time.sleep(1.5)  # a snapshot period
        before = status.shots
        ours = _descendants(first.pid)  # its Ray (GCS, raylet) and workers: not the suite's own cluster's
        assert any("raylet" in _cmdline(pid) for pid in ours), [_cmdline(pid) for pid in ours]
    finally:
        first.kill()
        first.wait(30)
        log1.close()

    def ray_left():
        return [cmd for cmd in map(_cmdline, ours) if any(k in cmd for k in ("gcs_server", "raylet", "EngineWorker"))]
    wait_for(lambda: not ray_left(), 30, "the killed front door's Ray processes to end")
    again, endpoint, log2 = serve()
    try:
        with Client(endpoint, timeout_s=60, retries=0) as c:
            status = wait_for(lambda: _try_status(c, "f", lambda s: True), 120, "the stream restored")
            assert status.shots >= before and status.worker in ("w0", "w1")
            assert c.ask("f", "what is there?", max_new_tokens=3).span_end_s is not None
    finally:
        again.send_signal(signal.SIGINT)
        try:
            again.wait(60)
        finally:
            if again.poll() is None:
                again.kill()
            log2.close()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` now (from /proc: each process's parent)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past "(comm)"
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    """The process's command line; "" once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _try_status(client, sid, predicate):
    try:
        streams = {s.stream: s for s in client.status().streams}
    except Exception:  # not up yet
        return None
    s = streams.get(sid)
    return s if s is not None and predicate(s) else None
