"""One stream's decode thread: source -> ActionShot -> the stream's ShotQueue.

The thread does no torch work: the model thread preprocesses the Shots of all streams as one batch
(torch's thread pool, entered from many decode threads at once, slows every call down).

The thread owns its source. Live sources reconnect by themselves (their state machine: connecting,
live, reconnecting, failed). A file whose decoding ends turns "draining" while its Shots are still
queued or being stepped, and "finished" once the model thread is done with the last of them (the
queue's `when_drained`; "failed" instead when a model step failed for any of its Shots, so that
"finished" means every Shot is folded into memory). Stopped before that, it ends as "stopped". Every
state change is reported through `on_state(previous, new, message)`; a source that cannot be opened
at all ends as "failed" with the error's message, and nothing else in the engine is disturbed.

A live source that cannot connect (wrong password, 404, nothing listening, a server that never answers)
turns "reconnecting" after its first failed attempt, and every later failed attempt is reported too, as
`on_state("reconnecting", "reconnecting", error)`. The log gets the first failure and then at most one
line per `FAILURE_LOG_PERIOD_S` per stream, counting the attempts that failed since.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from mixmalmm.clients import protocol as P

from .ingest import make_accumulator
from .shotqueue import ShotQueue
from .sources import NETWORK_SCHEMES, FileSource, NetworkSource, Source, SourceState, open_source

log = logging.getLogger("mixmalmm.pipeline")

StateCallback = Callable[[str | None, str, str | None], None]

#: Seconds between looks at a live source's state while no frame arrives.
POLL_S = 0.2
#: A resumed file starts this many seconds after the last frame already in memory.
RESUME_GAP_S = 1e-3
#: States a pipeline never leaves.
FINAL_STATES = ("finished", "failed", "stopped")
#: Seconds between two log lines about one stream's failed connection attempts (the first one is logged
#: at once, as a state change).
FAILURE_LOG_PERIOD_S = 30.0


class StreamPipeline:
    """Decodes one source on its own thread and queues its Shots for the model.

    mode: "live" drops the oldest queued Shot when the model falls behind; "replay" waits for room;
    "auto" picks live for network and camera sources, replay for files (an HTTP link to a file becomes
    one at its first connection: `NetworkSource`'s `live`). pace: for replay, "realtime"
    follows the file's timestamps, "fast" decodes as fast as the model takes Shots. actionshot: the
    complete settings the stream runs with (`ingest.make_accumulator`). source: a `Source` already
    open (an in-process one such as `FramesSource`) read instead of opening `uri` (then a label only);
    the pipeline owns it from now on.
    """

    def __init__(
        self,
        stream_id: str,
        uri: str,
        *,
        mode: str,
        pace: str,
        actionshot: P.ActionShotSettings,
        queue: ShotQueue,
        on_state: StateCallback,
        network_options: dict | None = None,
        resume_after: float | None = None,
        source: Source | None = None,
    ):
        self.stream_id = stream_id
        self.uri = uri
        self.queue = queue
        self.settings = actionshot
        make_accumulator(actionshot)  # checks the settings before the stream is accepted
        self._on_state = on_state
        # Opening validates the URI (unknown scheme, missing file) before the stream is accepted.
        options = {"realtime": pace == "realtime", "queue_size": 8}
        if urlsplit(uri).scheme.lower() in NETWORK_SCHEMES:
            options.update(network_options or {})
        self.source = source if source is not None else open_source(uri, **options)
        if source is None and resume_after is not None and isinstance(self.source, (FileSource, NetworkSource)):
            # A replay restored from a snapshot goes on after the last frame its memory holds (a live
            # network stream ignores `start`).
            self.source.close()
            self.source = open_source(uri, **options, start=resume_after + RESUME_GAP_S)
        self._auto = mode == "auto"
        self.live = self.source.live if self._auto else mode == "live"
        self.queue.drop_oldest = self.live
        self.state = "connecting"
        self._state_lock = threading.RLock()  # decode thread, model thread (drained) and stop()
        self.frames = 0
        self.last_error: str | None = None
        self._failures_seen = 0  # the source's connect_failures already reported
        self._failures_unlogged = 0  # failed attempts reported since the last log line about them
        self._failure_logged_at = -float("inf")  # time.monotonic() of that line
        self._in_times: collections.deque[float] = collections.deque(maxlen=512)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mixmalmm-decode-{stream_id}", daemon=True)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start decoding, unless `stop()` came first (a stream removed as it was being added)."""
        with self._state_lock:
            if not self._stop.is_set():
                self._thread.start()

    def stop(self) -> None:
        with self._state_lock:
            self._stop.set()
            # Draining: the decode thread is done; never started: there is none. Either way nobody
            # else will say "stopped".
            if self.state == "draining" or self._thread.ident is None:
                self._set_state("stopped")
        self.source.close()
        self.queue.close()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ counters

    @property
    def reconnects(self) -> int:
        return self.source.stats.reconnects

    @property
    def source_drops(self) -> int:
        """Frames the source's own bounded buffer dropped (live sources only)."""
        return self.source.stats.dropped

    def fps_in(self, now: float) -> float:
        """Frames per second decoded over the last few seconds."""
        return rate(self._in_times, now)

    # ------------------------------------------------------------------ thread

    def _set_state(self, new: str, message: str | None = None, *, only_from: str | None = None) -> None:
        """Change state and report it, unless the state is final already (or is not `only_from`)."""
        with self._state_lock:
            if new == self.state or self.state in FINAL_STATES or only_from not in (None, self.state):
                return
            old, self.state = self.state, new
            if message:
                self.last_error = message
            self._on_state(old, new, message)  # under the lock: events go out in the order states change

    def _drained(self) -> None:
        """The model is done with every Shot of the file: finished, or failed if a step failed."""
        q = self.queue
        if q.failures:
            message = (f"{q.failures} Shot(s) could not be folded into memory (the memory holds the others): "
                       f"{q.last_failure}")
            self._set_state("failed", message, only_from="draining")
        else:
            self._set_state("finished", only_from="draining")

    def _follow_source(self) -> None:
        """Mirror the source's state machine (it changes on the source's own thread)."""
        stats = self.source.stats
        if stats.connect_failures > self._failures_seen:
            self._connect_failed(stats.connect_failures - self._failures_seen, stats.last_error)
            self._failures_seen = stats.connect_failures
        new = _STATES[stats.state]
        # Never back to "connecting": the pipeline starts there, and a copy of the stats taken while the
        # source counted a failure but had not yet turned "reconnecting" must not undo the report above.
        if new != self.state and new not in ("connecting", "finished", "stopped", "failed"):
            self._set_state(new, stats.last_error if new == "reconnecting" else None)

    def _connect_failed(self, attempts: int, message: str | None) -> None:
        """Report `attempts` new failed connection attempts (the last one's error in `message`)."""
        now = time.monotonic()
        with self._state_lock:
            if self.state in FINAL_STATES:
                return
            if self.state != "reconnecting":  # the first failure: a state change, logged by whoever listens
                self._set_state("reconnecting", message)
                self._failure_logged_at, self._failures_unlogged = now, attempts - 1
                return
            self.last_error = message
            self._on_state("reconnecting", "reconnecting", message)
            self._failures_unlogged += attempts
            if now - self._failure_logged_at < FAILURE_LOG_PERIOD_S:
                return
            count, self._failures_unlogged, self._failure_logged_at = self._failures_unlogged, 0, now
        total = self.source.stats.connect_failures
        log.warning("stream %s: %d more connection attempt(s) failed (%d in all); the last: %s",
                    self.stream_id, count, total, message)

    def _run(self) -> None:
        accumulator = make_accumulator(self.settings)
        try:
            while not self._stop.is_set():
                try:
                    frame = self.source.read(timeout=POLL_S)
                except TimeoutError:
                    self._follow_source()
                    continue
                self._follow_source()
                if frame is None:
                    break
                if self._auto and self.live != self.source.live:  # an HTTP link turned out to be a file
                    self.live = self.queue.drop_oldest = self.source.live
                self.frames += 1
                self._in_times.append(time.time())
                shot = accumulator.push(frame)
                if shot is not None and not self.queue.put(shot, stop=self._stop):
                    break
            if not self._stop.is_set():
                shot = accumulator.flush()
                if shot is not None:
                    self.queue.put(shot, stop=self._stop)
        except Exception as exc:  # the source gave up (attempts exhausted) or its data is unusable
            log.warning("stream %s: %s", self.stream_id, exc)
            self._set_state("failed", str(exc))
            return
        finally:
            self.source.close()
        with self._state_lock:  # against stop(): either it sees "draining" or we see its flag
            stopped = self._stop.is_set()
            self._set_state("stopped" if stopped else "draining")
        if not stopped:
            self.queue.when_drained(self._drained)


def rate(times: collections.deque[float], now: float, window_s: float = 5.0) -> float:
    """Events per second over the last `window_s` seconds, from their wall-clock times (seconds)."""
    recent = [t for t in list(times) if now - t <= window_s]
    if len(recent) < 2:
        return 0.0
    return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


# The source's states as the protocol names them. `_follow_source` mirrors only the first three: how a
# stream ends (draining, finished, failed, stopped) is the pipeline's own decision (see `_run`).
_STATES = {
    SourceState.CONNECTING: "connecting",
    SourceState.LIVE: "live",
    SourceState.RECONNECTING: "reconnecting",
    SourceState.ENDED: "finished",
    SourceState.FAILED: "failed",
    SourceState.CLOSED: "stopped",
}
