"""The engine: many streams around one model, questions at any moment, state kept across restarts.

Data flow (shared/DESIGN.md §2): one decode thread per stream reads its source and folds frames into
ActionShot composites; a bounded queue per stream hands Shots to the single model thread (live: the
oldest Shot is dropped and counted when the model falls behind; replay: the decode thread waits); the
model thread takes at most one Shot per stream per round (round robin), preprocesses them and runs the
vision encoder on all of them as one batch, then steps every stream's state.

Questions never wait for the ingest backlog: each stream's state has a lock held only while one Shot
is folded in. Questions go before ingest steps: an asking thread queues its question and waits; before
each step the model thread takes every question waiting (at most `max_questions`), takes each one's
Q-Former output under its stream's lock (a consistent view of the memory; a stream's ad-hoc questions
of equal token counts share one Q-Former pass), then answers them with one LLM `generate` per
generation setting (max_new_tokens, num_beams), their inputs left-padded to one batch. A question waits
for the step under way, a batch already generating and then one more ingest step (and, beyond
max_questions, the batches ahead of it): ingestion pauses while questions are answered, with one step
between two batches so that it never stops. Each answer is the one the question gets alone.

A file's stream is "draining" from the end of its decoding until the model thread has stepped its
last Shot (the stream's queue counts Shots put and Shots done, so a Shot taken out of the queue and
being stepped still counts), then "finished": every Shot is in memory. If a model step failed for any
of its Shots it ends "failed" instead (its memory holds the others and can still be asked).

Persistence: with a state directory, each stream's state (banks, counts, time spans, standing
questions, source URI and options, stream state) is written atomically (temporary file, fsync,
rename) every `snapshot_period_s` and on shutdown, and read back on start. A replay saved in any
state but "finished" (draining included) is resumed after the last Shot its memory holds. A failed
write (full disk, unwritable directory) is logged and shown in the status; the engine keeps running
and keeps the state in memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM, StateSnapshot, StreamState

from .alerts import DEFAULT_EVIDENCE_KEEP, AlertRule, EvidenceStore, b64, evidence_pictures
from .contact_sheet import MemoryThumbnails, draw_memory_sheet, memory_cover
from .ingest import PROTOCOL_1_INGEST, model_settings, parse_settings
from .pipeline import StreamPipeline, rate
from .preprocess import preprocess
from .redact import redact_uri
from .shotqueue import ShotQueue
from .sources import Source, SourceError
from .store import open_store

log = logging.getLogger("mixmalmm.engine")

SNAPSHOT_SUFFIX = ".state.safetensors"


def snapshot_name(sid: str) -> str:
    """A stream's snapshot's name in the state store."""
    return f"{sid}{SNAPSHOT_SUFFIX}"


@dataclass
class EngineConfig:
    """Engine settings.

    max_batch: most streams whose Shots share one vision-encoder batch. queue_shots: Shots a stream
    may have waiting for the model (live streams drop the oldest beyond it). state_dir: where stream
    snapshots live (None: no persistence). snapshot_period_s: seconds between periodic snapshots.
    max_new_tokens / num_beams: generation defaults for questions that give none; None: the model's
    (`MALMM.decoding`: MA-LMM's beam search for InstructBLIP / MA-LMM weights). max_questions: most
    waiting questions answered by one batched `generate`. default_actionshot: the server's own
    ActionShot settings (only the fields given), over the model's (`ingest`).
    max_streams: most streams the engine runs at once; max_standing: most standing questions one
    stream holds (each adds a Q-Former pass to every step of its stream: README, Performance).
    Requests beyond either are refused with `unavailable`; streams restored on start are not refused.
    evidence_dir: where alerts' pictures and events are written (None: in the events only);
    evidence_keep: the newest alerts it keeps (`alerts.EvidenceStore`).
    """

    max_batch: int = 8
    queue_shots: int = 16
    state_dir: str | None = None
    snapshot_period_s: float = 30.0
    max_new_tokens: int | None = None
    num_beams: int | None = None
    max_questions: int = 32
    max_streams: int = 32
    max_standing: int = 8
    default_actionshot: P.ActionShotSettings = field(default_factory=P.ActionShotSettings)
    network_options: dict = field(default_factory=dict)
    evidence_dir: str | None = None
    evidence_keep: int = DEFAULT_EVIDENCE_KEEP

    def __post_init__(self) -> None:
        # (field, serve's option, least value): one place checks them all.
        for name, option, least in (("max_batch", "--max-batch", 1), ("queue_shots", None, 1),
                                    ("max_questions", "--max-questions", 1), ("max_streams", "--max-streams", 1),
                                    ("max_standing", "--max-standing", 0), ("max_new_tokens", None, 1),
                                    ("num_beams", None, 1), ("evidence_keep", "--evidence-keep", 1)):
            value = getattr(self, name)
            if value is None and name in ("max_new_tokens", "num_beams"):  # the model's decoding
                continue
            if not value >= least:
                raise ValueError(f"{name}{f' (serve {option})' if option else ''} must be >= {least}, got {value}")
        if not self.snapshot_period_s > 0:
            raise ValueError(f"snapshot_period_s (serve --snapshot-period) must be > 0, got {self.snapshot_period_s}")


@dataclass
class Question:
    """A question waiting for the model thread; it fills in the rest and sets the answer's text."""

    stream: Stream
    text: str
    max_new_tokens: int | None  # None: the model's decoding
    num_beams: int | None
    answer: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    output: object = None  # the Q-Former output [1, Q, C_q], taken under the stream's lock
    standing: bool = False
    question_id: str | None = None
    span: tuple[float, float] | None = None
    shot: object = None  # the last Shot in the memory it was answered from (an alert's evidence)


@dataclass
class Standing:
    question_id: str
    text: str
    period_s: float | None
    next_due: float = 0.0
    alert: AlertRule | None = None

    def info(self, sid: str) -> P.StandingQuestion:
        a = self.alert
        return P.StandingQuestion(stream=sid, question_id=self.question_id, text=self.text, period_s=self.period_s,
                                  alert_when=a.alert_when if a else None, alert_on_change=bool(a and a.alert_on_change),
                                  hold_off_s=a.hold_off_s if a else None, alerts=a.alerts if a else 0,
                                  suppressed=a.suppressed if a else 0)


class Stream:
    """One stream inside the engine: its pipeline, its model state, its lock and its counters."""

    def __init__(self, sid: str, request: P.AddStream, state: StreamState, queue: ShotQueue,
                 actionshot: P.ActionShotSettings):
        self.id = sid
        self.request = request  # its URI as given, credentials included: the source and snapshots need them
        self.uri = redact_uri(request.uri)  # as shown in logs, replies and events
        self.actionshot = actionshot  # the settings it runs with, every field set
        self.state = state
        self.queue = queue
        self.lock = threading.Lock()
        self.pipeline: StreamPipeline | None = None
        self.standing: dict[str, Standing] = {}
        self.out_times: collections.deque[float] = collections.deque(maxlen=256)
        self.last_error: str | None = None
        self.idle_state = "stopped"  # the state shown while the stream has no pipeline
        # Snapshot writes and removal take it in turn: once `removed` is set no snapshot is written.
        self.persist_lock = threading.Lock()
        self.removed = False
        self.refused = False  # add_stream refused it after its pipeline was made: it publishes nothing
        self.save_error: str | None = None  # why its last snapshot write failed (None: it succeeded)
        self.latest_shot = None  # the last Shot folded into memory (the console's thumbnail); None before it
        self.thumbnails = MemoryThumbnails()  # a few Shots of the memory, for alerts and the console
        self.releasing = False  # release_stream under way: it answers and alerts nothing more here

    @property
    def state_name(self) -> str:
        return self.pipeline.state if self.pipeline is not None else self.idle_state

    @property
    def live(self) -> bool:
        return self.pipeline.live if self.pipeline is not None else self.request.mode == "live"

    def fps_out(self, now: float) -> float:
        """Shots per second folded into memory over the last few seconds."""
        return rate(self.out_times, now)


class Engine:
    """Runs streams around one `MALMM` and serves the protocol's requests (implements server.Handler).

    publish: called with protocol events (stream state changes, standing answers); the server's
    `publish` in production. Thread-safe: `handle` is called from several server workers at once.
    """

    def __init__(self, model: MALMM, config: EngineConfig | None = None, publish=None, model_name: str = ""):
        self.model = model
        self.config = config or EngineConfig()
        self._publish = publish or (lambda event: None)
        self.model_name = model_name or type(model).__name__
        self._streams: dict[str, Stream] = {}
        self._streams_lock = threading.Lock()
        self._work = threading.Condition()  # guards _questions; notified on new Shots and questions
        self._questions: collections.deque[Question] = collections.deque()
        self._model_running = False  # questions are accepted (under _work): from start to the model thread's end
        self._stop = threading.Event()
        self._started = time.time()
        self._latencies: collections.deque[float] = collections.deque(maxlen=2048)
        self._answered = 0
        self._stats_lock = threading.Lock()
        #: Set by `mixmalmm.streamer.metrics.EngineMetrics`: told each question's latency and model step's time.
        self.metrics = None
        self.snapshots_written = 0  # snapshot files written (each stream's is one)
        self.snapshot_failures = 0  # snapshot writes that failed
        self.last_snapshot_time: float | None = None  # time.time() of the last good snapshot write
        self._threads: list[threading.Thread] = []
        self.restore_error: str | None = None  # the last snapshot that could not be restored at start
        self._image_processor = model.processor.image_processor
        #: What a stream gets for the ActionShot fields its request leaves out (ValueError: the model's are bad).
        self.default_actionshot = self.config.default_actionshot.over(model_settings(model))
        #: Where snapshots live (`store.open_store`: a directory or an fsspec URL); None without persistence.
        self.store = open_store(self.config.state_dir) if self.config.state_dir else None
        self.evidence = (EvidenceStore(self.config.evidence_dir, self.config.evidence_keep)
                         if self.config.evidence_dir else None)

    # ------------------------------------------------------------------ lifecycle

    def start(self, restore: bool = True) -> Engine:
        if restore and self.config.state_dir:
            self._restore_all()
        with self._work:
            self._model_running = True  # questions are taken from now on; the model thread answers them
        for target, name in ((self._model_loop, "model"), (self._scheduler_loop, "scheduler")):
            t = threading.Thread(target=target, name=f"mixmalmm-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def shutdown(self, save: bool = True) -> None:
        """Stop sources, finish the current step, save every stream, stop the threads.

        A draining file's Shots still queued may not all be folded in before the model thread stops: it is
        saved "stopped", so a restart resumes it after the last Shot in memory.
        """
        with self._streams_lock:
            streams = list(self._streams.values())
        for s in streams:
            if s.pipeline is not None:
                s.pipeline.stop()
        for s in streams:
            if s.pipeline is not None:
                s.pipeline.join(timeout=10.0)
        self._stop.set()
        with self._work:
            self._work.notify_all()
        for t in self._threads:
            t.join(timeout=30.0)
        if save and self.config.state_dir:
            for s in streams:
                self._save(s)

    # ------------------------------------------------------------------ streams

    def add_stream(
        self,
        request: P.AddStream,
        state: StreamState | None = None,
        *,
        keep_on_error: bool = False,
        resume_after: float | None = None,
        ingest: bool = True,
        source: Source | None = None,
        questions: Sequence[tuple[str, str]] = (),
    ) -> Stream:
        """Open the stream's source and start ingesting it.

        A source that cannot be opened (missing file, unknown scheme, no camera) is refused with a
        bad_request error, unless keep_on_error (restoring a saved stream): then the stream is kept,
        answerable from its restored memory, in state "failed". resume_after: a file resumes after this
        time (seconds), where its restored memory ends. ingest=False keeps the memory only (a replay
        that had finished). source: a `Source` already open (in-process, e.g. `FramesSource`: `mixmalmm
        eval`'s stream mode) read instead of opening the request's URI. questions: standing questions
        (question id, text) registered before the first frame is read, so that each one's query banks
        hold every frame (exact MA-LMM); more than `max_standing` are refused with nothing added.
        """
        if len(questions) > self.config.max_standing:
            raise P.RequestError(
                P.ErrorCode.UNAVAILABLE,
                f"{len(questions)} standing questions for stream {request.stream!r}, more than its limit "
                f"{self.config.max_standing} (serve --max-standing)",
            )
        sid = request.stream
        with self._streams_lock:
            self._check_room(sid, restoring=keep_on_error)
        queue = ShotQueue(self.config.queue_shots, drop_oldest=True, on_put=self._notify)
        actionshot = (request.actionshot or P.ActionShotSettings()).over(self.default_actionshot)
        stream = Stream(sid, request, state or self.model.create_state(sid), queue, actionshot)
        if not ingest:
            stream.idle_state = "finished"
        else:
            # The pipeline reaches its stream through a weak reference: a strong one would make a cycle
            # (stream -> pipeline -> callback -> stream) that keeps a removed stream's memory, queued
            # Shots and decoder until the cyclic garbage collector happens to run.
            ref = weakref.ref(stream)
            try:
                stream.pipeline = StreamPipeline(
                    sid, request.uri, mode=request.mode, pace=request.pace,
                    actionshot=actionshot,
                    queue=queue, network_options=self.config.network_options,
                    on_state=lambda old, new, msg: self._on_state(ref(), old, new, msg),
                    resume_after=resume_after, source=source,
                )
            except Exception as exc:
                if not keep_on_error:
                    if isinstance(exc, (SourceError, ValueError)):
                        raise P.RequestError(P.ErrorCode.BAD_REQUEST, str(exc)) from exc
                    raise
                # Restoring: whatever reopening the source raised, the memory is kept and can be asked.
                stream.last_error = f"cannot reopen the source: {exc}"
                stream.idle_state = "failed"
                log.error("stream %s kept without its source: %s", sid, exc,
                          exc_info=not isinstance(exc, (SourceError, ValueError)))
        refusal: P.RequestError | None = None
        with self._streams_lock:
            try:
                self._check_room(sid, restoring=keep_on_error)  # another request may have added one meanwhile
                self._streams[sid] = stream
            except P.RequestError as exc:
                refusal = exc
        if refusal is not None:  # its pipeline never ran: stopped outside the lock, and silently (refused)
            stream.refused = True
            if stream.pipeline is not None:
                stream.pipeline.stop()
            raise refusal
        self._publish(P.StreamStateEvent(stream=sid, state=stream.state_name, previous=None))
        try:
            for qid, text in questions:  # before the first frame (the pipeline has not started)
                self.add_question(P.AddQuestion(id=0, stream=sid, question_id=qid, text=text))
        except Exception:  # (a question id given twice): the stream is not kept half set up
            self.remove_stream(sid)
            raise
        if stream.pipeline is not None:
            stream.pipeline.start()
            log.info("stream %s added: %s (%s)", sid, stream.uri, "live" if stream.pipeline.live else "replay")
        return stream

    def _check_room(self, sid: str, restoring: bool) -> None:
        """Refuse a stream id in use, or a new stream beyond `max_streams`. Call with `_streams_lock`."""
        if sid in self._streams:
            raise P.RequestError(P.ErrorCode.ALREADY_EXISTS, f"stream {sid!r} already exists")
        if not restoring and len(self._streams) >= self.config.max_streams:
            raise P.RequestError(
                P.ErrorCode.UNAVAILABLE,
                f"the engine runs {len(self._streams)} streams, its limit (serve --max-streams); "
                "remove one first",
            )

    def remove_stream(self, sid: str) -> Stream:
        """Stop a stream and forget it, its snapshot file included; always completes once begun."""
        stream = self._get(sid)
        try:
            if stream.pipeline is not None:
                stream.pipeline.stop()
                stream.pipeline.join(timeout=10.0)
        finally:  # whatever stopping raised, the stream is gone and no snapshot brings it back
            with self._streams_lock:
                if self._streams.get(sid) is stream:
                    del self._streams[sid]
            with stream.persist_lock:  # waits for a snapshot being written; none is written after
                stream.removed = True
                if self.store is not None:
                    try:
                        self.store.remove(snapshot_name(sid))
                    except OSError as exc:  # the stream is gone all the same; a restart would bring it back
                        log.error("could not remove the snapshot of stream %s: %s", sid, exc)
        return stream

    def _get(self, sid: str) -> Stream:
        with self._streams_lock:
            stream = self._streams.get(sid)
        if stream is None:
            raise P.RequestError(P.ErrorCode.UNKNOWN_STREAM, f"no stream {sid!r}")
        return stream

    def streams(self) -> list[Stream]:
        with self._streams_lock:
            return list(self._streams.values())

    def _on_state(self, stream: Stream | None, old: str | None, new: str, message: str | None) -> None:
        if stream is None or stream.refused:  # released, or never added: nobody asks for it
            return
        if message and new in ("failed", "reconnecting"):
            stream.last_error = message
        if new != old:  # a repeated report (another failed connection attempt) is logged by the pipeline
            log.info("stream %s: %s -> %s%s", stream.id, old, new, f" ({message})" if message else "")
        self._publish(P.StreamStateEvent(stream=stream.id, state=new, previous=old, message=message))

    def _notify(self) -> None:
        with self._work:
            self._work.notify()

    # ------------------------------------------------------------------ model loop

    def _model_loop(self) -> None:
        try:
            self._model_rounds()
        finally:
            with self._work:  # nobody will answer what is still waiting
                self._model_running = False
                waiting, self._questions = list(self._questions), collections.deque()
            for q in waiting:
                q.answer.set_exception(P.RequestError(P.ErrorCode.UNAVAILABLE, "the engine is shutting down"))

    def _model_rounds(self) -> None:
        start = 0  # round robin: with more streams than max_batch, none waits behind the others
        while not self._stop.is_set():
            self._answer_waiting()  # questions first: one ingest step at most between a question and its batch
            batch = []
            streams = self.streams()
            start = start % len(streams) if streams else 0
            visited = 0
            for stream in streams[start:] + streams[:start]:
                visited += 1
                item = stream.queue.get_nowait()
                if item is not None:
                    batch.append((stream, item))
                if len(batch) == self.config.max_batch:
                    break
            start += visited
            if not batch:
                with self._work:
                    if not self._questions:
                        self._work.wait(timeout=0.1)
                continue
            error = None
            try:
                self._step(batch)
            except Exception as exc:  # a broken Shot must not stop other streams
                log.exception("model step failed")
                error = f"model step failed: {exc}"
                for stream, _ in batch:
                    stream.last_error = error
            for stream, _ in batch:  # after the step: a file's last one turns it finished (or failed)
                try:
                    stream.queue.task_done(error)
                except Exception:  # (a state callback that raised): the one model thread must go on
                    log.exception("stream %s: marking a Shot done failed", stream.id)

    def _answer_waiting(self) -> None:
        """Answer the questions waiting (at most max_questions): their Q-Former outputs stream by stream,
        then one `generate` per generation setting. Whatever fails, every question taken is answered."""
        with self._work:
            taken = [self._questions.popleft() for _ in range(min(len(self._questions), self.config.max_questions))]
        try:
            self._answer(taken)
        except Exception as exc:  # a bug: reported to each asker still waiting; the model thread goes on
            log.exception("answering %d questions failed", len(taken))
            for q in taken:
                if not q.answer.done():
                    q.answer.set_exception(exc)

    def _answer(self, taken: list[Question]) -> None:
        by_stream: dict[Stream, list[Question]] = collections.defaultdict(list)  # the object: an id re-added is another
        for q in taken:
            by_stream[q.stream].append(q)
        ready: list[Question] = []
        for stream, questions in by_stream.items():
            try:
                if stream.removed:
                    raise P.RequestError(P.ErrorCode.UNKNOWN_STREAM, f"stream {stream.id!r} was removed")
                self._query(stream, questions)
            except Exception as exc:  # reported to each asker; the model thread goes on
                if not isinstance(exc, P.RequestError):
                    log.exception("the Q-Former pass for %d questions on stream %s failed", len(questions), stream.id)
                for q in questions:
                    q.answer.set_exception(exc)
                continue
            ready += questions
        groups: dict[tuple[int | None, int | None], list[Question]] = collections.defaultdict(list)
        for q in ready:  # dicts keep order: the group of the oldest question goes first
            groups[(q.max_new_tokens, q.num_beams)].append(q)
        for group in groups.values():
            self._generate(group)

    def _generate(self, group: list[Question]) -> None:
        """One batched `generate` for questions of one setting; when it fails (a batch too large for the
        device's memory, say), each question is generated alone, so one costly request fails alone."""
        try:
            answers = self.model.generate_answers(
                [q.output for q in group], [q.text for q in group],
                max_new_tokens=group[0].max_new_tokens, num_beams=group[0].num_beams,
            )
        except Exception as exc:
            if len(group) > 1:
                log.warning("generating %d answers at once failed (%s): generating each alone", len(group), exc)
                for q in group:
                    self._generate([q])
                return
            log.exception("generating an answer failed")
            group[0].answer.set_exception(exc)
            return
        for q, (_, text) in zip(group, answers, strict=True):
            q.answer.set_result(text)

    def _query(self, stream: Stream, questions: list[Question]) -> None:
        """Fill in the Q-Former output, mode, standing question id and time span of one stream's questions."""
        with stream.lock:  # a consistent view of the memory
            if stream.state.frames == 0:
                raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"stream {stream.id!r} has seen no frame yet")
            outputs = self.model.query_outputs(stream.state, [q.text for q in questions])
            span = stream.state.time_span()
            for q, (output, mode) in zip(questions, outputs, strict=True):
                q.output, q.standing, q.span, q.shot = output, mode == "standing", span, stream.latest_shot
                q.question_id = next((s.question_id for s in stream.standing.values() if s.text == q.text), None)

    def _step(self, batch) -> None:
        began = time.perf_counter()
        proc = self._image_processor
        pixels = preprocess([shot.image for _, shot in batch], self.model.image_size, proc.image_mean,
                            proc.image_std, device=self.model.device)
        features = self.model.encode_frames(pixels)
        streams = [s for s, _ in batch]
        locks = sorted(streams, key=lambda s: s.id)  # one global order: no deadlock between steps
        for s in locks:
            s.lock.acquire()
        try:
            self.model.step([s.state for s in streams], features, [(shot.start, shot.end) for _, shot in batch])
            for s, shot in batch:  # with the memory: a question sees the Shot its memory ends with
                s.latest_shot = shot  # a reference: the Shot is not copied
        finally:
            for s in locks:
                s.lock.release()
        now = time.time()
        for s, shot in batch:
            s.out_times.append(now)
            try:
                s.thumbnails.offer(s.state.frames - 1, shot)
            except Exception:  # a picture for alerts and the console: never the step's failure
                log.exception("stream %s: keeping a thumbnail failed", s.id)
        metrics = self.metrics
        if metrics is not None:
            metrics.observe_step(time.perf_counter() - began)

    # ------------------------------------------------------------------ questions

    def ask(self, sid: str, question: str, max_new_tokens: int | None = None, num_beams: int | None = None,
            arrived: float | None = None) -> P.AskResult:
        """Answer a question about a stream's memory (waits for the model thread, see the module's doc)."""
        arrived = arrived or time.perf_counter()  # time.perf_counter() at arrival (the server's socket)
        return self._result(self._submit(self._get(sid), question, max_new_tokens, num_beams), arrived)

    def _submit(self, stream: Stream, question: str, max_new_tokens: int | None = None,
                num_beams: int | None = None) -> Question:
        """Queue a question for the model thread; `_result` waits for its answer."""
        waiting = Question(stream, question, max_new_tokens or self.config.max_new_tokens,
                           num_beams or self.config.num_beams)
        with self._work:
            if not self._model_running:
                raise P.RequestError(P.ErrorCode.UNAVAILABLE, "the engine is not running (starting or shutting down)")
            self._questions.append(waiting)
            self._work.notify()
        return waiting

    def _result(self, waiting: Question, arrived: float) -> P.AskResult:
        text = waiting.answer.result()
        latency = time.perf_counter() - arrived
        with self._stats_lock:  # several server workers answer at once
            self._latencies.append(latency)
            self._answered += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.observe_question(latency)
        span = waiting.span
        return P.AskResult(
            stream=waiting.stream.id, question=waiting.text, answer=text, empty=not text, standing=waiting.standing,
            question_id=waiting.question_id, span_start_s=span[0] if span else None,
            span_end_s=span[1] if span else None, latency_s=latency,
        )

    def add_question(self, request: P.AddQuestion) -> P.StandingQuestion:
        stream = self._get(request.stream)
        with stream.lock:
            if request.question_id in stream.standing:
                raise P.RequestError(
                    P.ErrorCode.ALREADY_EXISTS,
                    f"stream {request.stream!r} already has a standing question {request.question_id!r}",
                )
            if len(stream.standing) >= self.config.max_standing:
                raise P.RequestError(
                    P.ErrorCode.UNAVAILABLE,
                    f"stream {request.stream!r} has {len(stream.standing)} standing questions, its limit "
                    "(serve --max-standing; each slows every step of the stream); remove one first",
                )
            self.model.register_question(stream.state, request.text)
            q = stream.standing[request.question_id] = Standing(
                request.question_id, request.text, request.period_s,
                next_due=time.monotonic() + (request.period_s or 0.0), alert=AlertRule.from_request(request),
            )
        return q.info(request.stream)

    def remove_question(self, sid: str, qid: str) -> P.StandingQuestion:
        stream = self._get(sid)
        with stream.lock:
            q = stream.standing.pop(qid, None)
            if q is None:
                raise P.RequestError(P.ErrorCode.UNKNOWN_QUESTION, f"stream {sid!r} has no standing question {qid!r}")
            if not any(other.text == q.text for other in stream.standing.values()):
                self.model.remove_question(stream.state, q.text)
        return q.info(sid)

    def _scheduler_loop(self) -> None:
        """Answers standing questions that have a period, and takes periodic snapshots."""
        next_snapshot = time.monotonic() + self.config.snapshot_period_s
        while not self._stop.wait(0.05):
            try:
                now = time.monotonic()
                due: list[tuple[Stream, Standing]] = []
                for stream in self.streams():
                    with stream.lock:  # requests add and remove questions from other threads
                        for q in stream.standing.values():
                            if q.period_s is not None and now >= q.next_due:
                                q.next_due = now + q.period_s
                                due.append((stream, q))
                self._answer_standing(due)
                if self.config.state_dir and now >= next_snapshot:
                    next_snapshot = now + self.config.snapshot_period_s
                    for stream in self.streams():
                        self._save(stream)
            except Exception:  # a bug: logged; periodic answers and snapshots go on
                log.exception("the scheduler's round failed")

    def answer_standing(self, sid: str, qid: str) -> P.AnswerEvent | None:
        """Answer one standing question now and publish the answer; None when nothing was seen yet."""
        try:
            stream = self._get(sid)
            q = stream.standing[qid]
        except (P.RequestError, KeyError):
            return None
        return self._answer_standing([(stream, q)])[0]

    def _answer_standing(self, due: list[tuple[Stream, Standing]]) -> list[P.AnswerEvent | None]:
        """Answer standing questions together (queued at once: one batch) and publish each answer."""
        submitted = []
        for stream, q in due:
            try:
                submitted.append((stream, q, self._submit(stream, q.text), time.perf_counter()))
            except P.RequestError:  # removed meanwhile, or the engine stopping
                submitted.append((stream, q, None, 0.0))
        events: list[P.AnswerEvent | None] = []
        for stream, q, waiting, arrived in submitted:
            event = None
            if waiting is not None and not stream.releasing:  # a stream moving away: its new engine answers
                try:
                    result = self._result(waiting, arrived)
                except P.RequestError:  # nothing seen yet, or removed meanwhile
                    pass
                except Exception:
                    log.exception("answering standing question %s failed", q.question_id)
                else:
                    event = P.AnswerEvent(stream=result.stream, question_id=q.question_id, question=q.text,
                                          answer=result.answer, empty=result.empty,
                                          span_start_s=result.span_start_s,
                                          span_end_s=result.span_end_s)
                    self._publish(event)
                    if q.alert is not None:
                        try:
                            self._check_alert(stream, q, event, waiting.shot)
                        except Exception:  # a bug: logged; the other answers of the round still go out
                            log.exception("the alert check of %s/%s failed", stream.id, q.question_id)
            events.append(event)
        return events

    def _check_alert(self, stream: Stream, q: Standing, answer: P.AnswerEvent, shot) -> P.AlertEvent | None:
        """Publish an alert when the answer meets the question's condition, with its evidence (`alerts`)."""
        fired = q.alert.decide(answer.answer, time.monotonic())
        if fired is None:
            return None
        reason, previous = fired
        try:
            evidence, strip = evidence_pictures(shot, self.memory_sheet(stream, per_row=0))
        except Exception as exc:  # a picture that cannot be made must not cost the alert
            log.exception("the evidence of an alert of %s/%s could not be made", stream.id, q.question_id)
            evidence = strip = None
            error = f"no evidence: {exc}"
        else:
            error = ("no Shot in memory since the stream was restored" if shot is None
                     else None if evidence is not None
                     else f"the Shot's picture does not fit in {P.MAX_EVIDENCE_BYTES} bytes as a JPEG")
        event = P.AlertEvent(
            stream=stream.id, question_id=q.question_id, question=q.text, answer=answer.answer, empty=answer.empty,
            reason=reason, previous=previous, alert_when=q.alert.alert_when,
            span_start_s=answer.span_start_s, span_end_s=answer.span_end_s,
            shot_start_s=float(shot.start) if shot is not None else None,
            shot_end_s=float(shot.end) if shot is not None else None,
            evidence_jpeg=b64(evidence), strip_jpeg=b64(strip), evidence_error=error,
        )
        if self.evidence is not None:
            event = self.evidence.write(event, evidence, strip)
        log.info("alert %s/%s (%s): %s", stream.id, q.question_id, reason, answer.answer)
        self._publish(event)
        return event

    def memory_sheet(self, stream: Stream | str, per_row: int = 4):
        """The stream's memory drawn (`contact_sheet.draw_memory_sheet`): its kept thumbnails with their spans
        and held shares, `per_row` to a row (0: one row, an alert's strip); None before its first Shot here."""
        stream = self._get(stream) if isinstance(stream, str) else stream
        items = stream.thumbnails.items()
        if not items:
            return None
        with stream.lock:
            try:
                cover = memory_cover(stream.state, stream.state.frames)
            except ValueError:  # a model whose state keeps no visual bank count
                cover = None
        return draw_memory_sheet(items, cover, title=f"{stream.id}: memory", per_row=per_row or len(items))

    # ------------------------------------------------------------------ status

    def stream_status(self, stream: Stream) -> P.StreamStatus:
        now = time.time()
        with stream.lock:
            bank = stream.state.visual_bank
            entries = bank.count if bank is not None else min(stream.state.frames, 1)
            span = stream.state.time_span()
            folded = stream.state.frames  # Shots in memory, restored ones included
            # Read with the memory: "finished" is set after the last step releases the lock, so a
            # status that says finished also counts every Shot.
            state_name = stream.state_name
        pipe = stream.pipeline
        return P.StreamStatus(
            stream=stream.id, uri=stream.uri, state=state_name,
            fps_in=pipe.fps_in(now) if pipe else 0.0, fps_out=stream.fps_out(now),
            frames=pipe.frames if pipe else 0, shots=folded,
            drops=stream.queue.dropped + (pipe.source_drops if pipe else 0),
            reconnects=pipe.reconnects if pipe else 0,
            memory_entries=entries, memory_capacity=self.model.config.memory_bank_length,
            span_start_s=span[0] if span else None, span_end_s=span[1] if span else None,
            queue_depth=len(stream.queue), last_error=stream.last_error or (pipe.last_error if pipe else None),
            actionshot=stream.actionshot,
        )

    def status(self, sid: str | None = None) -> P.StatusResult:
        streams = [self._get(sid)] if sid else self.streams()
        with self._stats_lock:
            lat = sorted(self._latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        engine = P.EngineStatus(
            model=self.model_name, device=str(self.model.device), uptime_s=time.time() - self._started,
            questions_answered=self._answered, question_latency_p50_s=pct(0.5), question_latency_p99_s=pct(0.99),
            queue_depth=sum(len(s.queue) for s in streams), persist_error=self.persist_error,
        )
        return P.StatusResult(engine=engine, streams=[self.stream_status(s) for s in streams])

    def stream_info(self, stream: Stream) -> P.StreamInfo:
        standing = list(stream.standing.values())  # one copy in C, atomic: add_question may run meanwhile
        return P.StreamInfo(
            stream=stream.id, uri=stream.uri, state=stream.state_name,
            mode="live" if stream.live else "replay",
            questions=[q.info(stream.id) for q in standing],
            actionshot=stream.actionshot,
        )

    # ------------------------------------------------------------------ persistence

    def snapshot_where(self, sid: str) -> str:
        """Where the stream's snapshot is (a path, or a URL in an fsspec store)."""
        return self.store.where(snapshot_name(sid))

    def _save(self, stream: Stream) -> P.SavedSnapshot | None:
        """Write one stream's state atomically; on failure log it, remember it, return None.

        A removed stream is not written (None): its file must not outlive it.
        """
        with stream.persist_lock:
            if stream.removed:
                return None
            return self._write_snapshot(stream)

    def _write_snapshot(self, stream: Stream) -> P.SavedSnapshot | None:
        with stream.lock:
            snap = stream.state.snapshot()
            snap.meta["engine"] = {
                "request": msgspec.to_builtins(stream.request),
                "actionshot": msgspec.to_builtins(stream.actionshot),  # what it runs with, every field set
                "standing": [[q.question_id, q.text, q.period_s] for q in stream.standing.values()],
                # apart, so that an engine from before alerts still restores the questions
                "alerts": {q.question_id: q.alert.settings() for q in stream.standing.values() if q.alert},
                "state": stream.state_name,
                "live": stream.live,
            }
        name = snapshot_name(stream.id)
        data = snap.to_bytes()
        try:
            self.store.write(name, data)  # whole or not at all (store.LocalStore: temporary file, fsync, rename)
        except OSError as exc:
            stream.save_error = f"could not save stream {stream.id!r} to '{self.store.where(name)}': {exc}"
            with self._stats_lock:
                self.snapshot_failures += 1
            log.error("%s", stream.save_error)
            return None
        stream.save_error = None
        with self._stats_lock:
            self.snapshots_written += 1
            self.last_snapshot_time = time.time()
        return P.SavedSnapshot(stream=stream.id, path=self.store.where(name), size_bytes=len(data), time_s=time.time())

    @property
    def persist_error(self) -> str | None:
        """What `status` shows: why a stream's last snapshot write failed (each stream's own, cleared by
        its next good write; not by another's), else why a snapshot could not be restored at start."""
        return next((s.save_error for s in self.streams() if s.save_error), None) or self.restore_error

    def save(self, sid: str | None = None) -> P.SaveSnapshotResult:
        if not self.config.state_dir:
            raise P.RequestError(P.ErrorCode.BAD_REQUEST, "the engine runs without a state directory")
        streams = [self._get(sid)] if sid else self.streams()
        written = [(stream, self._save(stream)) for stream in streams]
        failed = [stream.save_error or f"could not save stream {stream.id!r}" for stream, snap in written
                  if snap is None and not stream.removed]
        if failed:
            # A full disk or an unwritable directory: an I/O error the client cannot fix by changing
            # the request; the memory is untouched and the previous snapshot file, if any, is intact.
            more = f" (and {len(failed) - 1} more stream(s))" if len(failed) > 1 else ""
            raise P.RequestError(P.ErrorCode.UNAVAILABLE, f"I/O error: {failed[0]}{more}")
        if sid and written[0][1] is None:
            raise P.RequestError(P.ErrorCode.UNKNOWN_STREAM, f"no stream {sid!r} (it was removed)")
        return P.SaveSnapshotResult(saved=[snap for _, snap in written if snap is not None])

    def _restore_all(self) -> None:
        try:
            names = self.store.names(SNAPSHOT_SUFFIX)
        except OSError as exc:
            self.restore_error = f"could not list the snapshots in '{self.config.state_dir}': {exc}"
            log.error("%s", self.restore_error)
            return
        for name in names:
            try:
                self.restore_saved(name[: -len(SNAPSHOT_SUFFIX)])
            except Exception as exc:  # a bad file must not keep the others from loading
                self.restore_error = f"could not restore '{self.store.where(name)}': {exc}"

    def restore_saved(self, sid: str) -> Stream:
        """Restore stream `sid` from its snapshot in the state store (see `restore_stream`)."""
        where = self.snapshot_where(sid)
        try:
            snap = StateSnapshot.from_bytes(self.store.read(snapshot_name(sid)), f"'{where}'")
        except Exception as exc:
            log.error("could not restore '%s': %s", where, exc)
            raise
        return self.restore_stream(snap, where)

    def restore_stream(self, source: str | Path | StateSnapshot, where: str | None = None) -> Stream:
        """Restore one stream from a snapshot file, or from a snapshot already read (`where` names it), with
        its memory, standing questions, source and position.

        A replay saved in any state but "finished" resumes after the last Shot its memory holds; a live
        source reconnects. Raises (logged) when the file cannot be read or the stream not added.
        """
        path = where or str(source)
        try:
            snap = source if isinstance(source, StateSnapshot) else StateSnapshot.load(source)
            info = snap.meta["engine"]
            request = msgspec.convert(info["request"], P.AddStream)
            # A restored stream goes on with the settings it ran with (another model or other options
            # now must not change its input halfway through); one saved by protocol 1 had none saved.
            saved = info.get("actionshot")
            settings = (parse_settings(saved, f"'{path}' actionshot") if saved is not None
                        else (request.actionshot or P.ActionShotSettings()).over(PROTOCOL_1_INGEST))
            request = msgspec.structs.replace(request, actionshot=settings)
            state = self.model.restore(snap)
        except Exception as exc:
            log.error("could not restore '%s': %s", path, exc)
            raise
        replay = not info.get("live", False)
        # Only a replay saved "finished" had every Shot in memory; one saved draining (a crash),
        # stopped (a shutdown while draining) or failed resumes after its last Shot.
        try:
            stream = self.add_stream(
                request, state=state, keep_on_error=True,
                ingest=not (replay and info.get("state") == "finished"),
                resume_after=state.last_time if replay else None,
            )
            with stream.lock:
                alerts = info.get("alerts") or {}
                for qid, text, period in info["standing"]:
                    stream.standing[qid] = Standing(qid, text, period, next_due=time.monotonic() + (period or 0.0),
                                                    alert=AlertRule.from_settings(alerts.get(qid)))
        except Exception:
            log.exception("could not restore '%s'", path)
            raise
        log.info("stream %s restored from '%s' (%d frames)", stream.id, path, state.frames)
        return stream

    def release_stream(self, sid: str) -> P.SavedSnapshot:
        """Stop a stream, write its final snapshot and forget it, leaving the file for another engine to
        `restore_stream` (a cluster's move). Raises ``RequestError(unavailable)`` when the snapshot
        cannot be written: the stream then goes on here, nothing lost."""
        stream = self._get(sid)
        if not self.config.state_dir:
            raise P.RequestError(P.ErrorCode.BAD_REQUEST, "the engine runs without a state directory")
        # From now on no standing answer is published or alert fired here: the front door drops this
        # engine's events for the stream, and an alert's state would move with the snapshot as if sent.
        stream.releasing = True
        snap_first = self._save(stream)
        if snap_first is None:  # the store takes no snapshot: the stream goes on here, untouched
            stream.releasing = False
            raise P.RequestError(P.ErrorCode.UNAVAILABLE,
                                 f"I/O error: {stream.save_error or f'stream {sid!r} was removed'}")
        if stream.pipeline is not None:
            stream.pipeline.stop()
            stream.pipeline.join(timeout=10.0)
        with stream.persist_lock:
            # The final one, after the last step; should it fail, the one above stands (a file resumes
            # after the last Shot that one holds: nothing lost).
            snap = self._write_snapshot(stream) or snap_first
            stream.removed = True  # no later snapshot overwrites the one handed over
        with self._streams_lock:
            if self._streams.get(sid) is stream:
                del self._streams[sid]
        return snap

    # ------------------------------------------------------------------ protocol

    def handle(self, request: P.AnyRequest, arrived: float | None = None) -> msgspec.Struct:
        """Serve one request; arrived: `time.perf_counter()` when it reached the server's socket
        (`latency_s` and the status percentiles count from there), now when not given."""
        arrived = arrived or time.perf_counter()
        match request:
            case P.Ask():
                return self.ask(request.stream, request.question, request.max_new_tokens, request.num_beams,
                                arrived=arrived)
            case P.Status():
                return self.status(request.stream)
            case P.ListStreams():
                return P.ListStreamsResult(streams=[self.stream_info(s) for s in self.streams()])
            case P.AddStream(worker=str(worker)):
                raise P.RequestError(P.ErrorCode.BAD_REQUEST,
                                     f"no worker {worker!r}: this server runs no cluster (serve --cluster)")
            case P.AddStream():
                return self.stream_info(self.add_stream(request))
            case P.MoveStream():
                raise P.RequestError(P.ErrorCode.BAD_REQUEST,
                                     "move_stream needs a cluster (serve --cluster); this server is one engine")
            case P.RemoveStream():
                return self.stream_info(self.remove_stream(request.stream))
            case P.AddQuestion():
                return self.add_question(request)
            case P.RemoveQuestion():
                return self.remove_question(request.stream, request.question_id)
            case P.SaveSnapshot():
                return self.save(request.stream)
        raise P.RequestError(P.ErrorCode.UNKNOWN_TYPE, f"the engine does not serve {type(request).__name__}")

