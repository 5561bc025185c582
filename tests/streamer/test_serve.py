"""`mixmalmm serve` as a process: SIGKILL and restart from the state directory, SIGTERM, CURVE, a quiet load,
and what its defaults feed the built-in model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from mixmalmm.clients import Client, ClientCurve, EngineTimeout
from mixmalmm.clients.protocol import create_keypair
from mixmalmm.model import StateSnapshot, load_default_model
from mixmalmm.model.synthetic import DEMO_FPS, DEMO_STEP, MAX_VIDEO_FRAMES, make_video, write_video
from mixmalmm.model.train import normalise_answer
from mixmalmm.streamer.frames import Frame
from mixmalmm.streamer.ingest import make_accumulator, model_settings
from mixmalmm.streamer.preprocess import preprocess
from mixmalmm.streamer.sources import FileSource

from .conftest import FPS, NUM_FRAMES, free_port


class Serve:
    """`mixmalmm serve` in a subprocess on free loopback ports."""

    def __init__(self, tmp: Path, *args: str):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        events = f"tcp://127.0.0.1:{free_port()}"
        self.path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.log = open(self.path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mixmalmm.clients.cli", "serve", "--bind", self.endpoint, "--events", events,
             *args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def client(self, **kw) -> Client:
        return Client(self.endpoint, timeout_s=kw.pop("timeout_s", 10.0), retries=kw.pop("retries", 0), **kw)

    def wait_ready(self, timeout: float = 60.0, **client_kw) -> None:
        deadline = time.monotonic() + timeout
        with self.client(timeout_s=1.0, **client_kw) as c:
            while True:
                assert self.process.poll() is None, f"serve exited: {self.output()}"
                try:
                    c.ping()
                    return
                except EngineTimeout:
                    assert time.monotonic() < deadline, f"serve not ready: {self.output()}"

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if not self.log.closed:
            self.log.close()


def wait_status(client: Client, sid: str, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        streams = {s.stream: s for s in client.status().streams}
        if sid in streams and predicate(streams[sid]):
            return streams[sid]
        assert time.monotonic() < deadline, f"{what} not within {timeout} s: {streams.get(sid)}"
        time.sleep(0.1)


def test_sigkill_then_restart_restores_memory_and_resumes_the_file(media, tmp_path):
    state = tmp_path / "state"
    args = ["--state-dir", str(state), "--snapshot-period", "0.3", "--no-actionshot", "--sample-fps", "all",
            "--pace", "realtime"]
    first = Serve(tmp_path, f"f={media.h264}", *args)
    try:
        first.wait_ready()
        with first.client() as c:
            wait_status(c, "f", lambda s: s.shots >= 20, 60, "20 Shots")
        time.sleep(0.5)  # at least one snapshot period with Shots in memory
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
    finally:
        first.stop()
    saved = StateSnapshot.load(state / "f.state.safetensors").meta
    assert 0 < saved["frames"] < NUM_FRAMES  # the crash came mid-file

    second = Serve(tmp_path, *args)  # no source given: it comes back from the state directory
    try:
        second.wait_ready()
        with second.client() as c:
            s = wait_status(c, "f", lambda s: s.shots >= saved["frames"], 60, "the restored stream")
            assert s.span_start_s == 0.0
            # Resumed after the last remembered frame: the whole file is folded in exactly once.
            s = wait_status(c, "f", lambda s: s.state == "finished", 60, "the file to finish")
            assert s.queue_depth == 0 and s.shots == NUM_FRAMES  # finished: every Shot is in memory
            assert s.span_end_s == pytest.approx((NUM_FRAMES - 1) / FPS)
    finally:
        second.stop()
    assert "restored" in second.output()


def test_sigterm_saves_and_curve_keeps_strangers_out(media, tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = create_keypair(str(keys), "server")
    client_public, client_secret = create_keypair(str(keys), "client")
    Path(client_public).rename(allowed / "client.key")
    _, stranger_secret = create_keypair(str(keys), "stranger")
    state = tmp_path / "state"
    serve = Serve(tmp_path, f"f={media.h264}", "--state-dir", str(state), "--snapshot-period", "3600",
                  "--pace", "fast", "--no-actionshot", "--sample-fps", "all", "--curve-secret", server_secret,
                  "--curve-clients", str(allowed))
    try:
        ours = ClientCurve.from_files(server_public, client_secret)
        serve.wait_ready(curve=ours)
        stranger = ClientCurve.from_files(server_public, stranger_secret)
        with serve.client(curve=stranger, timeout_s=1.0) as c, pytest.raises(EngineTimeout):
            c.status()
        with serve.client(timeout_s=1.0) as c, pytest.raises(EngineTimeout):  # no key at all
            c.ping()
        with serve.client(curve=ours) as c:
            s = wait_status(c, "f", lambda s: s.shots == NUM_FRAMES, 60, "the whole file")
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0, serve.output()
    finally:
        serve.stop()
    meta = StateSnapshot.load(state / "f.state.safetensors").meta
    assert meta["frames"] == NUM_FRAMES and meta["last_time"] == pytest.approx(s.span_end_s)
    assert "saving state" in serve.output() and "Traceback" not in serve.output()


def test_serve_user_errors_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    public_key, _ = create_keypair(str(tmp_path / "keys"), "server")
    cases = [
        (["--curve-secret", public_key], "holds no secret key"),  # the public half of the pair
        (["--max-streams", "0"], "--max-streams"),
        (["--state-dir", str(tmp_path / "a_file")], "--state-dir"),
        (["--model", str(tmp_path / "nowhere")], "nowhere"),
        (["--bind", "tcp://0.0.0.0:5999"], "CURVE"),
        (["--curve-clients", str(tmp_path)], "--curve-secret"),
        (["--threshold", "300"], "ActionShot"),
        (["--max-questions", "0"], "--max-questions"),
        (["--max-batch", "0"], "--max-batch"),  # was no error: a batch without bound
        (["--http", "0.0.0.0:8080"], "--insecure"),  # the console's bind follows the ZeroMQ binds' rule
        (["--http", "8080"], "HOST:PORT"),
    ]
    for args, needle in cases:
        run = subprocess.run([sys.executable, "-m", "mixmalmm.clients.cli", "serve", *args],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert needle in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


def test_serve_http_serves_the_console(tmp_path, media):
    """`serve --http`: the page and the JSON layer on the given port, beside ZeroMQ, on the same engine."""
    import json
    import urllib.request

    port = free_port()
    serve = Serve(tmp_path, f"cam={media.h264}", "--http", f"127.0.0.1:{port}", "--pace", "fast")
    try:
        serve.wait_ready()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"mixmalmm console" in r.read()
        with serve.client() as c:
            wait_status(c, "cam", lambda s: s.state == "finished", 60, "the file finished")
            shots = c.status("cam").streams[0].shots
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/request", method="POST",
                                         data=b'{"id": 1, "type": "status", "stream": "cam"}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            reply = json.loads(r.read())
        assert reply["ok"] and reply["result"]["streams"][0]["shots"] == shots > 0
        assert f"console on http://127.0.0.1:{port}/" in serve.output()
    finally:
        serve.stop()


def test_serve_loads_the_model_without_a_progress_bar(tmp_path):
    """`serve --log-level WARNING` keeps stderr to log records: transformers' "Loading weights" bar, which
    it drew while the built-in model loaded, is not drawn."""
    serve = Serve(tmp_path, "--log-level", "WARNING")
    try:
        serve.wait_ready()  # the server answers only once the model has loaded
        with serve.client() as c:
            assert c.status().streams == []
        serve.process.send_signal(signal.SIGINT)
        assert serve.process.wait(timeout=30) == 0, serve.output()
    finally:
        serve.stop()
    raw = serve.path.read_bytes()  # (bytes: reading text would turn a bar's "\r" into a newline)
    text = raw.decode()
    assert "Loading weights" not in text and "it/s]" not in text, text
    assert b"\r" not in raw and not set(text) & set("\u2588\u2589\u258a\u258b\u258c\u258d\u258e\u258f"), text
    assert "Traceback" not in text and " INFO " not in text, text  # (INFO lines would mean a wrong level)


def test_serve_with_no_ingest_flags_feeds_the_built_in_model_what_it_was_trained_on(tmp_path):
    """Held-out synthetic videos through `mixmalmm serve` as a user starts it (no ingest option), asked over
    ZeroMQ, against the same model fed the demo's input (every DEMO_STEP-th frame) in this process."""
    videos = {f"v{k}": make_video(910_000_000 + k, frames=MAX_VIDEO_FRAMES) for k in range(8)}  # never trained on
    for sid, video in videos.items():
        write_video(tmp_path / f"{sid}.mp4", video.render_all(128), DEMO_FPS)
    model = load_default_model().eval()
    own = model_settings(model)
    mean, std = model.processor.image_processor.image_mean, model.processor.image_processor.image_std

    def demo_answers(video, questions: list[str]) -> list[str]:
        """The demo's input: every DEMO_STEP-th frame of the decoded file, each its own Shot."""
        state = model.create_state("demo")
        with FileSource(tmp_path / f"{video}.mp4") as source:
            frames = [f for f in source if f.index % DEMO_STEP == 0]
        with torch.inference_mode():
            feats = model.encode_frames(preprocess([f.rgb for f in frames], model.image_size, mean, std))
            for t, f in enumerate(frames):
                model.step([state], feats[t : t + 1], [(f.pts, f.pts)])
            return [model.answer(state, q, max_new_tokens=4).text for q in questions]

    serve = Serve(tmp_path, "--pace", "fast", *(f"{sid}={tmp_path / sid}.mp4" for sid in videos))
    try:
        serve.wait_ready()
        right = {"serve": 0, "demo": 0}
        asked = 0
        with serve.client(timeout_s=30.0) as c:
            for sid in videos:  # serve adds its sources once it serves
                wait_status(c, sid, lambda s: True, 60, f"{sid} added")
            listed = {s.stream: s for s in c.list_streams().streams}
            shown = [msgspec.to_builtins(s.actionshot) for s in listed.values()]
            assert shown == [msgspec.to_builtins(own)] * len(videos)  # the model's own settings, shown
            for sid, video in videos.items():
                s = wait_status(c, sid, lambda s: s.state == "finished", 120, f"{sid} to finish")
                expected_shots = len(list(make_accumulator(own).feed(
                    Frame(np.zeros((2, 2, 3), np.uint8), i / DEMO_FPS, i, 0.0) for i in range(video.frames))))
                assert s.shots == expected_shots
                qa = video.questions()
                served = [c.ask(sid, q, max_new_tokens=4).answer for q, _, _ in qa]
                reference = demo_answers(sid, [q for q, _, _ in qa])
                for (_, truth, _), a, b in zip(qa, served, reference, strict=True):
                    right["serve"] += normalise_answer(a) == truth
                    right["demo"] += normalise_answer(b) == truth
                asked += len(qa)
    finally:
        serve.stop()
    assert asked >= 40
    assert right["serve"] >= right["demo"] - 0.03 * asked, right  # as well as the demo's settings
    assert right["serve"] >= 0.85 * asked, right  # and far above always giving the commonest answer (~37%)
