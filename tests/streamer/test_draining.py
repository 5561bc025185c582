"""A file's stream is "draining" until its last Shot is in memory, and only then "finished".

Real parts: generated video files, the tiny model (each step slowed by a sleep, so that Shots back up
in the queues as they do behind a big model), a real engine behind a real ZeroMQ server. The Shots a
file makes are computed offline here with ActionShot itself, with the stream's settings.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgspec
import pytest

from mixmalmm.clients import Client, Subscriber
from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM, StateSnapshot
from mixmalmm.streamer.engine import Engine, EngineConfig
from mixmalmm.streamer.frames import Shot
from mixmalmm.streamer.ingest import DEFAULT_INGEST, make_accumulator
from mixmalmm.streamer.server import Server
from mixmalmm.streamer.sources import FileSource

from .conftest import SlowSteps, wait_for

#: Composites of at most 3 frames: the 6 s test files make 21 Shots each, more than a queue holds (16).
SETTINGS = P.ActionShotSettings(enabled=True, sample_fps=None, max_frames=3)
#: Seconds each model step sleeps: the model falls far behind a fast replay.
SLOW_S = 0.1
ENDS = ("finished", "failed", "stopped")


@pytest.fixture(scope="module")
def model():
    return MALMM.tiny().eval()


def offline_shots(path: Path, settings: P.ActionShotSettings = SETTINGS) -> list[Shot]:
    """The Shots of the whole file, made offline by ActionShot with the stream's settings."""
    accumulator = make_accumulator(settings.over(DEFAULT_INGEST))
    with FileSource(path) as source:
        return list(accumulator.feed(source))


class Served:
    """An engine around `model` behind a ZeroMQ server on free loopback ports.

    published: per stream, (state, Shots in memory at that moment) for every stream_state event, taken
    in the engine's thread as it publishes, before the event goes out.
    """

    def __init__(self, model, config: EngineConfig | None = None):
        self.published: dict[str, list[tuple[str, int]]] = {}
        self.engine = Engine(model, config or EngineConfig(), publish=self._publish)
        self.server = Server(self.engine, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*")
        self.engine.start()
        self.server.start()
        self.client = Client(self.server.request_address, timeout_s=20.0, retries=0)

    def _publish(self, event) -> None:
        if isinstance(event, P.StreamStateEvent) and event.stream != "warmup":
            stream = self.engine._get(event.stream)
            with stream.lock:
                frames = stream.state.frames
            self.published.setdefault(event.stream, []).append((event.state, frames))
        self.server.publish(event)

    def subscriber(self) -> Subscriber:
        """A Subscriber to every stream, joined (PUB drops what a subscriber not yet connected misses)."""
        sub = Subscriber(self.server.event_address)
        deadline = time.monotonic() + 10
        while sub.recv(0.05) is None:
            assert time.monotonic() < deadline, "the subscriber never joined"
            self.server.publish(P.StreamStateEvent(stream="warmup", state="live"))
        while sub.recv(0.1) is not None:
            pass
        return sub

    def add_file(self, sid: str, path: Path) -> None:
        self.client.add_stream(sid, str(path), mode="replay", pace="fast", actionshot=SETTINGS)

    def close(self, save: bool = False) -> None:
        if self.server.running:
            self.client.close()
            self.engine.shutdown(save=save)
            self.server.stop()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def states_of(events: list[P.StreamStateEvent]) -> list[str]:
    """The states of a stream's events, checked to chain (each event's previous is the state before)."""
    previous = None
    for event in events:
        assert event.previous == previous, events
        previous = event.state
    return [event.state for event in events]


def test_four_replays_turn_finished_only_with_every_shot_in_memory(model, media):
    files = {"a": media.h264, "b": media.mpeg4, "c": media.h264, "d": media.mpeg4}
    want = {sid: offline_shots(path) for sid, path in files.items()}
    assert all(len(shots) == 21 for shots in want.values())
    with Served(SlowSteps(model, SLOW_S)) as served:
        with served.subscriber() as sub:
            for sid, path in files.items():
                served.add_file(sid, path)
            events: dict[str, list[P.StreamStateEvent]] = {sid: [] for sid in files}
            seen: dict[str, list[str]] = {sid: [] for sid in files}  # states read through status, in order
            at_finished: dict[str, P.StreamStatus] = {}  # the first status that read finished
            after_event: dict[str, P.StreamStatus] = {}  # status asked right after the finished event
            deadline = time.monotonic() + 120
            while len(at_finished) < len(files) or len(after_event) < len(files):
                assert time.monotonic() < deadline, (seen, events)
                event = sub.recv(timeout_s=0.02)
                if isinstance(event, P.StreamStateEvent) and event.stream in files:
                    events[event.stream].append(event)
                    if event.state == "finished":
                        after_event[event.stream] = served.client.status(event.stream).streams[0]
                for s in served.client.status().streams:
                    if not seen[s.stream] or seen[s.stream][-1] != s.state:
                        seen[s.stream].append(s.state)
                    if s.state == "finished":
                        at_finished.setdefault(s.stream, s)
                    assert s.state not in ("failed", "stopped"), s
        for sid, shots in want.items():
            assert states_of(events[sid]) == ["connecting", "live", "draining", "finished"], sid
            assert seen[sid][-2:] == ["draining", "finished"], (sid, seen[sid])
            # Decoding ended with Shots backed up; "finished" came with the last of them in memory.
            (_, at_draining), (_, at_end) = served.published[sid][-2:]
            assert at_draining < len(shots) and at_end == len(shots), (sid, served.published[sid])
            for status in (at_finished[sid], after_event[sid]):
                assert status.shots == len(shots) and status.queue_depth == 0 and status.drops == 0, status
                assert (status.span_start_s, status.span_end_s) == (shots[0].start, pytest.approx(shots[-1].end))
            assert served.engine._get(sid).state.frames == len(shots)


def test_a_question_asked_at_finished_spans_the_whole_file(model, media):
    shots = offline_shots(media.h264)
    with Served(SlowSteps(model, SLOW_S)) as served:
        with served.subscriber() as sub:
            served.add_file("f", media.h264)
            answers = {}
            deadline = time.monotonic() + 60
            while "finished" not in answers:
                assert time.monotonic() < deadline, answers
                event = sub.recv(timeout_s=0.5)
                if isinstance(event, P.StreamStateEvent) and event.state in ("draining", "finished"):
                    answers[event.state] = served.client.ask("f", "what colour is the square?", max_new_tokens=3)
        draining, finished = answers["draining"], answers["finished"]
        assert (finished.span_start_s, finished.span_end_s) == (shots[0].start, pytest.approx(shots[-1].end))
        assert draining.span_end_s < shots[-1].end - 1.0  # asked while Shots were still queued: less memory


def test_a_failed_step_for_the_last_shot_ends_failed_not_draining(model, media):
    shots = offline_shots(media.h264)
    with Served(SlowSteps(model, 0.02, fail_end=shots[-1].end)) as served:
        served.add_file("f", media.h264)
        status = wait_for(lambda: next((s for s in served.client.status().streams if s.state in ENDS), None),
                          60, "the stream to end")
        assert status.state == "failed" and status.shots == len(shots) - 1, status
        assert status.last_error == ("1 Shot(s) could not be folded into memory (the memory holds the others): "
                                     "model step failed: out of memory (injected)")
        assert status.span_end_s == pytest.approx(shots[-2].end)
        assert [state for state, _ in served.published["f"]] == ["connecting", "live", "draining", "failed"]
        assert served.client.ask("f", "still there?", max_new_tokens=2).span_end_s == pytest.approx(shots[-2].end)


def test_a_stream_removed_while_draining_is_stopped(model, media):
    shots = offline_shots(media.h264)
    with Served(SlowSteps(model, SLOW_S)) as served:
        served.add_file("f", media.h264)
        wait_for(lambda: served.client.status("f").streams[0].state == "draining", 60, "draining")
        removed = served.client.remove_stream("f")
        assert removed.state == "stopped"
        time.sleep(3 * SLOW_S)  # a Shot in flight when it was removed is stepped: no "finished" follows
        states = [state for state, _ in served.published["f"]]
        assert states == ["connecting", "live", "draining", "stopped"]
        assert served.published["f"][-1][1] < len(shots)


def test_a_replay_saved_while_draining_resumes_after_its_last_shot(model, media, tmp_path):
    shots = offline_shots(media.h264)
    state_dir, crashed = tmp_path / "state", tmp_path / "crashed"
    config = EngineConfig(state_dir=str(state_dir), snapshot_period_s=3600)
    with Served(SlowSteps(model, SLOW_S), config) as served:
        served.add_file("f", media.h264)
        wait_for(lambda: served.client.status("f").streams[0].state == "draining", 60, "draining")
        served.client.save_snapshot("f")  # as a periodic snapshot would, just before a crash
        crashed.mkdir()
        shutil.copy(state_dir / "f.state.safetensors", crashed)
        served.close(save=True)  # a shutdown while draining: the queued Shots are not folded in
    for folder, saved_as in ((crashed, "draining"), (state_dir, "stopped")):
        meta = StateSnapshot.load(folder / "f.state.safetensors").meta
        assert meta["engine"]["state"] == saved_as and 0 < meta["frames"] < len(shots), (folder, meta)
        engine = Engine(model, EngineConfig(state_dir=str(folder))).start()
        try:
            stream = engine._get("f")
            assert stream.pipeline is not None  # read on, from where its memory ends
            wait_for(lambda s=stream: s.state_name in ENDS, 60, "the restored replay to end")
            status = engine.stream_status(stream)
            assert status.state == "finished" and status.shots == len(shots), status
            assert (status.span_start_s, status.span_end_s) == (shots[0].start, pytest.approx(shots[-1].end))
            assert msgspec.convert(meta["engine"]["request"], P.AddStream).actionshot == SETTINGS
        finally:
            engine.shutdown(save=False)
