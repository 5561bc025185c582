"""The engine on a Ray cluster: engine workers as Ray actors, a front door that speaks the protocol.

* ``EngineWorker`` (a threaded Ray actor) holds one model and one ``Engine`` whose state directory is the
  shared state store. Requests reach it as protocol JSON and come back as protocol replies (the wire
  format between front door and worker is the clients' own). Its events wait in a bounded buffer that
  the front door long-polls through Ray (``events``): no extra port between nodes.
* ``FrontDoor`` implements ``server.Handler``: stream-scoped requests go to the stream's worker,
  ``status`` / ``list_streams`` / ``save_snapshot`` are merged over the workers, ``add_stream`` places the
  stream on the least-loaded worker (fewest streams, then fewest Shots/s) below its stream limit, or on
  the one asked for. Events are re-published on the front door's PUB, so each stream's ``seq`` keeps
  growing across moves and failovers.
* A worker that Ray reports dead, or that has not answered for ``dead_after_s``, is given up: its
  streams are restored on the others from their latest snapshots in the store (a stream never
  snapshotted is added again from its request) and a ``stream_state`` event says where each went.
* ``move_stream``: the final snapshot on the old worker, then a restore on the new one.

Ray is imported lazily (``pip install mixmalmm[cluster]``): nothing else in mixmalmm needs it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from mixmalmm.clients import protocol as P

from .store import open_store

log = logging.getLogger("mixmalmm.cluster")

#: Worker-side decoding: the front door already enforced the server's limits.
_WIDE_LIMITS = P.Limits(max_message_bytes=1 << 30, max_question_chars=1 << 30)


class ClusterError(RuntimeError):
    """The cluster could not be reached or the workers not started."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ClusterError("--cluster needs Ray: pip install 'mixmalmm[cluster]'") from exc
    return ray


class EngineWorker:
    """One engine worker (wrapped by ``ray.remote`` in ``start_workers``)."""

    def __init__(self, name: str, model_options: dict, config, event_buffer: int = 10_000,
                 event_bytes: int = 64 << 20) -> None:
        import dataclasses

        from .engine import Engine
        from .options import load_model

        self.name = name
        # The events not yet read by the front door, at most `event_buffer` of them and `event_bytes` in all
        # (an alert carries pictures: up to some 360 KB).
        self._events: collections.deque[bytes] = collections.deque(maxlen=event_buffer)
        self._event_bytes, self._max_event_bytes = 0, event_bytes
        self._next = 0  # index of the next event put
        self._cond = threading.Condition()
        if config.evidence_dir:  # each worker keeps its own newest alerts, in its own folder of the shared one
            config = dataclasses.replace(config, evidence_dir=str(Path(config.evidence_dir) / name))
        model, model_name = load_model(argparse.Namespace(**model_options))
        self.engine = Engine(model, config, publish=self._put, model_name=model_name).start(restore=False)

    def _put(self, event) -> None:
        body = P.encode(event)
        with self._cond:
            if len(self._events) == self._events.maxlen:
                self._event_bytes -= len(self._events[0])  # the append below drops it
            self._events.append(body)
            self._event_bytes += len(body)
            while self._event_bytes > self._max_event_bytes and len(self._events) > 1:
                self._event_bytes -= len(self._events.popleft())
            self._next += 1
            self._cond.notify_all()

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def events(self, since: int, wait_s: float) -> tuple[int, int, list[bytes]]:
        """Events from index ``since`` on (waiting up to ``wait_s`` for one): (next index, lost, bodies)."""
        with self._cond:
            self._cond.wait_for(lambda: self._next > since, timeout=wait_s)
            first = self._next - len(self._events)
            lost = max(0, first - since)
            return self._next, lost, list(self._events)[max(since, first) - first:]

    def handle(self, body: bytes) -> bytes:
        request = None
        try:
            request = P.decode_request(body, _WIDE_LIMITS)
            return P.ok_reply(request.id, self.engine.handle(request))
        except P.RequestError as exc:
            return P.error_reply(getattr(request, "id", None), exc.code, exc.message)
        except Exception as exc:
            log.exception("worker %s failed on a request", self.name)
            return P.error_reply(getattr(request, "id", None), P.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def load(self) -> tuple[int, float]:
        """(streams, Shots per second folded over all of them)."""
        now = time.time()
        streams = self.engine.streams()
        return len(streams), sum(s.fps_out(now) for s in streams)

    def restore(self, sid: str) -> bytes:
        try:
            stream = self.engine.restore_saved(sid)
            return P.ok_reply(None, self.engine.stream_info(stream))
        except P.RequestError as exc:
            return P.error_reply(None, exc.code, exc.message)
        except Exception as exc:
            return P.error_reply(None, P.ErrorCode.UNAVAILABLE, f"cannot restore {sid!r}: {exc}")

    def release(self, sid: str) -> bytes:
        try:
            return P.ok_reply(None, self.engine.release_stream(sid))
        except P.RequestError as exc:
            return P.error_reply(None, exc.code, exc.message)

    def shutdown(self) -> None:
        self.engine.shutdown(save=True)


@dataclass
class Worker:
    """The front door's view of one worker."""

    name: str
    actor: object
    node: str = ""
    pid: int = 0
    alive: bool = True
    streams: int = 0
    shots_per_s: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)


def _decode(body: bytes, result_type):
    reply = P.decode_reply(body)
    if not reply.ok:
        raise P.RequestError(reply.error.code, reply.error.message)
    return P.decode_result(reply, result_type)


class FrontDoor:
    """Implements ``server.Handler`` over a cluster's engine workers (see the module's doc).

    store: the shared state store (a directory every worker reads and writes). publish: the server's
    ``publish``. max_streams: each worker's stream limit. dead_after_s: a worker that has not answered
    for so long is given up (Ray's own death notice is taken at once).
    """

    def __init__(self, ray, workers: list[Worker], store: str, publish, max_streams: int,
                 call_timeout_s: float = 120.0, dead_after_s: float = 30.0, poll_s: float = 0.5,
                 merge_timeout_s: float = 10.0, rebalance: bool = False) -> None:
        self.ray = ray
        self.store = open_store(store)  # the workers' state store: a shared directory or an fsspec URL
        self._publish = publish
        self.max_streams = max_streams
        self.call_timeout_s = call_timeout_s
        self.merge_timeout_s = merge_timeout_s  # status / list_streams / save_snapshot: each worker's share
        self.rebalance = rebalance
        self._moving: set[str] = set()  # streams a move_stream is under way for
        self._rebalance_lock = threading.Lock()  # one rebalance at a time
        self.dead_after_s = dead_after_s
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self.workers: dict[str, Worker] = {w.name: w for w in workers}
        self.owner: dict[str, str | None] = {}  # stream -> worker name (None: moving)
        self.requests: dict[str, P.AddStream] = {}  # to add a stream again that was never snapshotted
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = time.time()

    # ------------------------------------------------------------------ life cycle

    def start(self, restore: bool = True) -> FrontDoor:
        for w in list(self.workers.values()):
            self._watch_events(w)
        if restore:
            from .engine import SNAPSHOT_SUFFIX

            for name in self.store.names(SNAPSHOT_SUFFIX):
                sid = name[: -len(SNAPSHOT_SUFFIX)]
                try:
                    self._restore(sid, None, "restored from the state store")
                except Exception as exc:
                    log.error("stream %s not restored from the store: %s", sid, exc)
        t = threading.Thread(target=self._monitor, name="mixmalmm-cluster-monitor", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def shutdown(self) -> None:
        self._stop.set()
        refs = [w.actor.shutdown.remote() for w in self.workers.values() if w.alive]
        for ref in refs:
            try:
                self.ray.get(ref, timeout=60)
            except Exception as exc:
                log.warning("a worker did not shut down cleanly: %s", exc)

    def add_worker(self, worker: Worker) -> None:
        with self._lock:
            self.workers[worker.name] = worker
        self._watch_events(worker)
        if self.rebalance:
            threading.Thread(target=self.rebalance_now, name="mixmalmm-cluster-rebalance", daemon=True).start()

    def rebalance_now(self) -> list[P.MoveStreamResult]:
        """Move streams from the most loaded workers (streams, then Shots/s) onto the least loaded with
        ``move`` until their stream counts differ by at most one (``--rebalance``: after a worker joins)."""
        moved: list[P.MoveStreamResult] = []
        with self._rebalance_lock:
            while not self._stop.is_set():
                with self._lock:
                    alive = [w for w in self.workers.values() if w.alive]
                    if len(alive) < 2:
                        break
                    load = {w.name: (self._count(w.name), w.shots_per_s, w.name) for w in alive}
                    most = max(alive, key=lambda w: load[w.name])
                    least = min(alive, key=lambda w: load[w.name])
                    if load[most.name][0] - load[least.name][0] <= 1 or self._count(least.name) >= self.max_streams:
                        break
                    candidates = sorted(sid for sid, name in self.owner.items()
                                        if name == most.name and sid not in self._moving)
                if not candidates:
                    break
                try:
                    moved.append(self.move(candidates[-1], least.name))
                    log.info("rebalance: %s moved from %s to %s", candidates[-1], most.name, least.name)
                except Exception as exc:  # (e.g. a worker died meanwhile): stop; the next join tries again
                    log.warning("rebalance: %s not moved from %s to %s: %s", candidates[-1], most.name,
                                least.name, exc)
                    break
        return moved

    # ------------------------------------------------------------------ events and health

    def _watch_events(self, w: Worker) -> None:
        def run() -> None:
            since = 0
            while not self._stop.is_set() and w.alive:
                try:
                    since, lost, bodies = self.ray.get(w.actor.events.remote(since, 1.0), timeout=30)
                except BaseException:  # (SystemExit from Ray shutting down: the end)
                    if self._stop.is_set():
                        return
                    time.sleep(0.2)  # the monitor decides whether the worker is dead
                    continue
                if lost:
                    log.warning("%d events of worker %s were lost (the front door fell behind)", lost, w.name)
                for body in bodies:
                    try:
                        event = P.decode_event(body)
                    except Exception:
                        continue
                    if self.owner.get(event.stream) == w.name:  # not a stream moving away, or gone
                        self._publish(event)

        t = threading.Thread(target=run, name=f"mixmalmm-events-{w.name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:  # add_worker inserts from other threads
                alive = [w for w in self.workers.values() if w.alive]
            for w in alive:
                try:
                    w.streams, w.shots_per_s = self.ray.get(w.actor.load.remote(), timeout=max(1.0, self.poll_s * 4))
                    w.last_seen = time.monotonic()
                except self.ray.exceptions.GetTimeoutError:
                    if time.monotonic() - w.last_seen > self.dead_after_s:
                        self._give_up(w, f"it has not answered for {self.dead_after_s:g} s")
                except Exception as exc:  # RayActorError: the actor or its node died
                    if not self._stop.is_set():
                        self._give_up(w, f"{type(exc).__name__}")
                except BaseException:  # (SystemExit from Ray shutting down)
                    return

    def _give_up(self, w: Worker, why: str) -> None:
        with self._lock:
            if not w.alive:
                return
            w.alive = False
            lost = [sid for sid, name in self.owner.items() if name == w.name]
        log.error("worker %s is dead (%s): restoring its %d stream(s) elsewhere", w.name, why, len(lost))
        with contextlib.suppress(Exception):  # a stalled one must not write the store any more
            self.ray.kill(w.actor, no_restart=True)
        for sid in lost:
            try:
                self._restore(sid, None, f"restored on {{target}} after worker {w.name} died")
            except Exception as exc:
                log.error("stream %s could not be restored: %s", sid, exc)
                self._publish(P.StreamStateEvent(stream=sid, state="failed", previous=None,
                                                 message=f"worker {w.name} died and no worker could take it: {exc}"))

    # ------------------------------------------------------------------ placement

    def _pick(self, wanted: str | None, exclude: str | None = None) -> Worker:
        with self._lock:
            if wanted not in (None, "auto"):
                w = self.workers.get(wanted)
                if w is None:
                    names = ", ".join(sorted(self.workers))
                    raise P.RequestError(P.ErrorCode.BAD_REQUEST, f"no worker {wanted!r}; the workers are {names}")
                if not w.alive:
                    raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"worker {wanted!r} is dead")
                if self._count(w.name) >= self.max_streams:
                    raise P.RequestError(P.ErrorCode.UNAVAILABLE,
                                         f"worker {wanted!r} runs {self.max_streams} streams, its limit")
                return w
            free = [w for w in self.workers.values()
                    if w.alive and w.name != exclude and self._count(w.name) < self.max_streams]
            if not free:
                raise P.RequestError(P.ErrorCode.UNAVAILABLE,
                                     f"no worker can take a stream (each runs at most {self.max_streams})")
            return min(free, key=lambda w: (self._count(w.name), w.shots_per_s, w.name))

    def _count(self, name: str) -> int:
        return sum(1 for owner in self.owner.values() if owner == name)

    def _restore(self, sid: str, wanted: str | None, message: str, exclude: str | None = None) -> P.StreamInfo:
        """Restore ``sid`` from the store on a worker (or add it again from its request: never
        snapshotted), and say where with a stream_state event."""
        from .engine import snapshot_name

        with self._lock:
            target = self._pick(wanted, exclude=exclude)
            self.owner[sid] = target.name  # before the restore: its first events are the stream's
        try:
            if self.store.exists(snapshot_name(sid)) or sid not in self.requests:
                info = _decode(self.ray.get(target.actor.restore.remote(sid), timeout=self.call_timeout_s),
                               P.StreamInfo)
            else:
                info = self._call(target, self.requests[sid], P.StreamInfo)
        except BaseException:
            with self._lock:
                self.owner.pop(sid, None)
            raise
        self._publish(P.StreamStateEvent(stream=sid, state=info.state, previous=None,
                                         message=message.format(target=target.name)))
        return msgspec.structs.replace(info, worker=target.name)

    # ------------------------------------------------------------------ requests

    def _call(self, w: Worker, request, result_type):
        try:
            body = self.ray.get(w.actor.handle.remote(P.encode(request)), timeout=self.call_timeout_s)
        except self.ray.exceptions.GetTimeoutError as exc:
            raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"worker {w.name} did not answer in time") from exc
        except Exception as exc:  # the actor died: the monitor restores its streams
            threading.Thread(target=self._give_up, args=(w, type(exc).__name__), daemon=True).start()
            raise P.RequestError(P.ErrorCode.UNAVAILABLE,
                                 f"worker {w.name} died; its streams are being restored elsewhere: retry") from exc
        return _decode(body, result_type)

    def _owner_of(self, sid: str, wait_s: float = 30.0) -> Worker:
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                if sid not in self.owner:
                    raise P.RequestError(P.ErrorCode.UNKNOWN_STREAM, f"no stream {sid!r}")
                name = self.owner[sid]
                if name is not None and self.workers[name].alive:
                    return self.workers[name]
            if time.monotonic() > deadline:
                raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"stream {sid!r} is being moved or restored; retry")
            time.sleep(0.05)

    def _alive(self) -> list[Worker]:
        with self._lock:
            return [w for w in self.workers.values() if w.alive]

    def _all(self, request, result_type) -> tuple[list[tuple[Worker, object]], list[Worker]]:
        """A merged request sent to every alive worker at once, each given ``merge_timeout_s`` (one
        stalled worker must not hold the reply for ``call_timeout_s``): (the answers, the silent)."""
        refs = [(w, w.actor.handle.remote(P.encode(request))) for w in self._alive()]
        deadline = time.monotonic() + self.merge_timeout_s
        out, silent = [], []
        for w, ref in refs:
            try:
                out.append((w, _decode(self.ray.get(ref, timeout=max(0.0, deadline - time.monotonic())),
                                       result_type)))
            except P.RequestError:
                raise
            except Exception as exc:
                log.warning("worker %s did not answer %s: %s", w.name, type(request).__name__, exc)
                silent.append(w)
        return out, silent

    def handle(self, request: P.AnyRequest, arrived: float | None = None) -> msgspec.Struct:
        match request:
            case P.AddStream():
                with self._lock:
                    if request.stream in self.owner:
                        raise P.RequestError(P.ErrorCode.ALREADY_EXISTS, f"stream {request.stream!r} already exists")
                    target = self._pick(request.worker)
                    self.owner[request.stream] = target.name
                plain = msgspec.structs.replace(request, worker=None)
                try:
                    info = self._call(target, plain, P.StreamInfo)
                except BaseException:
                    with self._lock:
                        self.owner.pop(request.stream, None)
                    raise
                self.requests[request.stream] = plain
                self._snapshot_soon(target, request.stream)
                return msgspec.structs.replace(info, worker=target.name)
            case P.RemoveStream():
                w = self._owner_of(request.stream)
                info = self._call(w, request, P.StreamInfo)
                with self._lock:
                    self.owner.pop(request.stream, None)
                    self.requests.pop(request.stream, None)
                return msgspec.structs.replace(info, worker=w.name)
            case P.MoveStream():
                return self.move(request.stream, request.to)
            case P.Status(stream=str(sid)):
                w = self._owner_of(sid)
                result = self._call(w, request, P.StatusResult)
                return self._merge_status([(w, result)])
            case P.Status():
                return self._merge_status(*self._all(request, P.StatusResult))
            case P.ListStreams():  # (a silent worker's streams are left out: status says which one)
                return P.ListStreamsResult(streams=[msgspec.structs.replace(s, worker=w.name)
                                                    for w, r in self._all(request, P.ListStreamsResult)[0]
                                                    for s in r.streams])
            case P.SaveSnapshot(stream=None):
                answers, silent = self._all(request, P.SaveSnapshotResult)
                saved = [s for _, r in answers for s in r.saved]
                if silent:
                    with self._lock:
                        unsaved = sorted(sid for sid, name in self.owner.items() if name in {w.name for w in silent})
                    raise P.RequestError(P.ErrorCode.UNAVAILABLE, (
                        f"{', '.join(w.name for w in silent)} did not answer in {self.merge_timeout_s:g} s: "
                        f"not saved {', '.join(unsaved) or '(none)'}; saved {len(saved)} other stream(s)"))
                return P.SaveSnapshotResult(saved=saved)
            case P.Ask() | P.AddQuestion() | P.RemoveQuestion() | P.SaveSnapshot():
                w = self._owner_of(request.stream)
                result = self._call(w, request, P.RESULT_TYPES[type(request)])
                if isinstance(request, (P.AddQuestion, P.RemoveQuestion)):
                    self._snapshot_soon(w, request.stream)
                return result
        raise P.RequestError(P.ErrorCode.UNKNOWN_TYPE, f"the front door does not serve {type(request).__name__}")

    def _snapshot_soon(self, w: Worker, sid: str) -> None:
        """A new stream or standing question goes into the store at once (not one period later)."""
        w.actor.handle.remote(P.encode(P.SaveSnapshot(id="front-door", stream=sid)))

    def _merge_status(self, results: list[tuple[Worker, P.StatusResult]], silent: list[Worker] = ()) -> P.StatusResult:
        """silent: workers that did not answer this status: shown ``alive: false`` (not answering), their
        streams left out."""
        streams = [msgspec.structs.replace(s, worker=w.name) for w, r in results for s in r.streams]
        engines = [r.engine for _, r in results]

        def worst(name: str) -> float | None:
            values = [getattr(e, name) for e in engines if getattr(e, name) is not None]
            return max(values) if values else None

        engine = P.EngineStatus(
            model=engines[0].model if engines else "", device=engines[0].device if engines else "",
            uptime_s=time.time() - self._started,
            questions_answered=sum(e.questions_answered for e in engines),
            question_latency_p50_s=worst("question_latency_p50_s"),
            question_latency_p99_s=worst("question_latency_p99_s"),
            queue_depth=sum(e.queue_depth for e in engines),
            persist_error=next((e.persist_error for e in engines if e.persist_error), None),
        )
        with self._lock:
            quiet = {w.name for w in silent}
            workers = [P.WorkerStatus(worker=w.name, node=w.node, alive=w.alive and w.name not in quiet,
                                      streams=self._count(w.name),
                                      max_streams=self.max_streams, shots_per_s=w.shots_per_s)
                       for w in sorted(self.workers.values(), key=lambda w: w.name)]
        return P.StatusResult(engine=engine, streams=streams, workers=workers)

    def move(self, sid: str, to: str) -> P.MoveStreamResult:
        """Final snapshot on the stream's worker, then restore on ``to`` (a name or "auto"). A second move
        of the same stream while one runs is refused (``unavailable``)."""
        with self._lock:
            if sid in self._moving:
                raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"stream {sid!r} is moving; retry once it has moved")
            self._moving.add(sid)
        try:
            return self._move(sid, to)
        finally:
            with self._lock:
                self._moving.discard(sid)

    def _move(self, sid: str, to: str) -> P.MoveStreamResult:
        source = self._owner_of(sid)
        if to == source.name:
            raise P.RequestError(P.ErrorCode.BAD_REQUEST, f"stream {sid!r} already runs on {to!r}")
        with self._lock:
            target = self._pick(to, exclude=source.name)
            self.owner[sid] = None  # the old worker's stop events are not the stream's
        t0 = time.perf_counter()
        try:
            _decode(self.ray.get(source.actor.release.remote(sid), timeout=self.call_timeout_s), P.SavedSnapshot)
        except BaseException:
            with self._lock:
                self.owner[sid] = source.name
            raise
        with self._lock:
            self.owner.pop(sid, None)
        try:
            info = self._restore(sid, target.name, f"moved from {source.name} to {{target}}")
        except Exception as exc:  # back where it was (or elsewhere), from the snapshot just written
            why = exc.message if isinstance(exc, P.RequestError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, P.RequestError):  # Ray: the target died or stalled; it may hold a half-restore
                threading.Thread(target=self._give_up, args=(target, f"the restore of {sid} failed: {why}"),
                                 daemon=True).start()
            message = f"restored on {{target}} after the move to {target.name} failed ({why})"
            for wanted in (source.name, None):
                try:
                    back = self._restore(sid, wanted, message, exclude=target.name)
                    break
                except Exception as again:
                    log.error("stream %s not restored on %s after the failed move: %s", sid, wanted or "auto", again)
            else:
                self._publish(P.StreamStateEvent(stream=sid, state="failed", previous=None, message=(
                    f"the move to {target.name} failed ({why}) and no worker could take it back; its snapshot "
                    "stays in the state store")))
                raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"{target.name} could not take {sid!r} and no "
                                     "worker could take it back: it is in the state store") from None
            raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"{target.name} could not take {sid!r} ({why}); it "
                                 f"runs on {back.worker} again") from None
        return P.MoveStreamResult(stream=sid, source=source.name, target=target.name,
                                  pause_s=time.perf_counter() - t0, state=info.state)


# ---------------------------------------------------------------------------------------------------
# starting


def parse_resources(text: str | None) -> dict[str, float]:
    """``--worker-resources`` JSON (``{"GPU": 1}``, ``{"CPU": 2, "my_site": 1}``): each worker's Ray resources."""
    if not text:
        return {"CPU": 1.0}
    try:
        value = msgspec.json.decode(text.encode(), type=dict[str, float])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"--worker-resources {text!r}: expected a JSON object of numbers ({exc})") from exc
    if any(v < 0 for v in value.values()):
        raise ValueError(f"--worker-resources {text!r}: amounts must be >= 0")
    return value


def connect(ray, cluster: str) -> None:
    """``auto`` (a running cluster: RAY_ADDRESS or the local one), ``local:N`` (a new local Ray with N
    CPUs), or a Ray address (``HOST:PORT``, ``ray://HOST:PORT``). Raises ``ClusterError``."""
    n = 0
    if cluster.startswith("local:"):
        try:
            n = int(cluster.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ClusterError(f"--cluster {cluster!r}: local:N needs a whole number N >= 1")
    try:
        if n:
            # address="local": always a new local Ray, never one an earlier (killed) front door left running
            ray.init(address="local", num_cpus=n, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
        else:
            _probe(cluster)
            ray.init(address=cluster, logging_level=logging.WARNING, log_to_driver=False)
    except ValueError as exc:  # Ray's own message: what it refused
        raise ClusterError(f"--cluster {cluster!r}: Ray refused: {exc}") from exc
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster {cluster!r}: {exc}") from exc


def _probe(cluster: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` address that nothing answers is said at once (Ray itself waits minutes)."""
    address = cluster.removeprefix("ray://")
    host, sep, port = address.rpartition(":")
    if cluster == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {cluster!r}: {exc}") from exc


def start_workers(ray, names: list[str], resources: dict[str, float], model_options: dict, config,
                  timeout_s: float = 300.0, node: str | None = None) -> list[Worker]:
    """Start one ``EngineWorker`` per name (on ``node`` when given) and wait until each has its model."""
    opts: dict = {"num_cpus": resources.get("CPU", 1.0), "num_gpus": resources.get("GPU", 0.0),
                  "resources": {k: v for k, v in resources.items() if k not in ("CPU", "GPU")},
                  "max_restarts": 0, "max_concurrency": 64}
    if node is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    remote = ray.remote(EngineWorker)
    actors = [(name, remote.options(**opts).remote(name, model_options, config)) for name in names]
    workers = []
    for name, actor in actors:
        try:
            info = ray.get(actor.info.remote(), timeout=timeout_s)
        except Exception as exc:
            raise ClusterError(f"worker {name} did not start: {exc}") from exc
        workers.append(Worker(name=name, actor=actor, node=info["node"], pid=info["pid"]))
    return workers


def fits(node: dict, resources: dict[str, float]) -> bool:
    total = node.get("Resources", {})
    return node.get("Alive", False) and all(total.get(k, 0.0) >= v for k, v in resources.items() if v > 0)


def grow_per_node(front: FrontDoor, ray, resources, model_options, config, stop: threading.Event,
                  period_s: float = 2.0) -> None:
    """One worker per alive node that can hold one (``--workers per-node``): nodes that join get one."""
    while not stop.wait(period_s):
        taken = {w.node for w in front.workers.values() if w.alive}
        for node in ray.nodes():
            if fits(node, resources) and node["NodeID"] not in taken:
                name = f"w{len(front.workers)}"
                try:
                    front.add_worker(start_workers(ray, [name], resources, model_options, config,
                                                   node=node["NodeID"])[0])
                    log.info("node %s joined: worker %s started on it", node["NodeID"][:8], name)
                except ClusterError as exc:
                    log.warning("%s", exc)
