"""Generated media and a real RTSP server for the streamer tests.

Videos are encoded here with PyAV from `synthetic_rgb` frames (160x120, 10 fps): H.264 in MP4 and
MPEG-4 Part 2 in Matroska, a truncated and a corrupted copy, an audio-only file, a text file and an
HLS playlist (served by a real HTTP server on 127.0.0.1).
The RTSP server is Debian's GStreamer RTSP server run by /usr/bin/python3 (tests/streamer/
rtsp_server.py), bound to 127.0.0.1 on a free port; tests can kill, restart, freeze and thaw it.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mixmalmm.streamer.synthetic import synthetic_rgb, write_video

WIDTH, HEIGHT, FPS = 160, 120, 10
NUM_FRAMES = 60  # 6 s
SCENE = 20  # a scene cut every 2 s
X264 = {"preset": "ultrafast", "g": "10"}  # a key frame every second
SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")


def source_frames(n: int = NUM_FRAMES) -> list[np.ndarray]:
    """The frames the test videos were encoded from, [H, W, 3] uint8 each."""
    return [synthetic_rgb(i, WIDTH, HEIGHT, SCENE) for i in range(n)]


@dataclass
class Media:
    h264: Path  # H.264 in MP4, NUM_FRAMES frames
    mpeg4: Path  # MPEG-4 Part 2 in Matroska, NUM_FRAMES frames
    truncated_mp4: Path  # first half of h264 (the index at the end is lost)
    truncated_mkv: Path  # first half of mpeg4 (a streamable container: the first frames decode)
    corrupt: Path  # h264 with random bytes over 20% of the file, in its middle
    audio_only: Path  # an MP4 file with one AAC stream
    text: Path  # JSON text, not a video (FFmpeg would read a .txt file as ANSI art)
    rtsp: Path  # 30 s of H.264 in MP4 for the RTSP server
    rtsp_short: Path  # 1.5 s of H.264 in MP4 (the server's stream ends: end of stream)
    hls: Path  # an HLS playlist (3 MPEG-TS segments of 2 s) of the h264 frames


def _write_audio(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(16000) / 10.0) * 0.2).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.time_base = Fraction(1, 16000)
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Media:
    root = tmp_path_factory.mktemp("media")
    m = Media(*(root / name for name in (
        "h264.mp4", "mpeg4.mkv", "truncated.mp4", "truncated.mkv", "corrupt.mp4", "audio.mp4", "notes.json",
        "rtsp.mp4", "rtsp_short.mp4", "hls/index.m3u8",
    )))  # fmt: skip
    write_video(m.h264, source_frames(), FPS, "libx264", X264)
    write_video(m.mpeg4, source_frames(), FPS, "mpeg4")
    data = m.h264.read_bytes()
    m.truncated_mp4.write_bytes(data[: len(data) // 2])
    mkv = m.mpeg4.read_bytes()
    m.truncated_mkv.write_bytes(mkv[: len(mkv) // 2])
    broken = bytearray(data)
    start, length = len(data) * 2 // 5, len(data) // 5
    broken[start : start + length] = np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8).tobytes()
    m.corrupt.write_bytes(bytes(broken))
    _write_audio(m.audio_only)
    m.text.write_text("{\"not\": \"a video\"}\n" * 50)
    rtsp_frames = (synthetic_rgb(i, WIDTH, HEIGHT, SCENE) for i in range(300))
    write_video(m.rtsp, rtsp_frames, FPS, "libx264", X264)
    write_video(m.rtsp_short, source_frames(15), FPS, "libx264", X264)
    m.hls.parent.mkdir()
    write_video(m.hls, source_frames(), FPS, "libx264", X264, container_format="hls")
    return m


@pytest.fixture(scope="module")
def http_server(media):
    """A real HTTP server (Python's http.server) on 127.0.0.1 serving the media folder; yields its URL."""
    folder = str(media.h264.parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serving_engine(model, config=None, events: list | None = None, timeout_s: float = 20.0, **server_options):
    """The model's engine behind a real server on loopback ports: yields (engine, server, client).
    `events`: a list that gets every event the engine publishes, as well as the PUB socket."""
    from mixmalmm.clients import Client
    from mixmalmm.streamer.engine import Engine
    from mixmalmm.streamer.server import Server

    box: list = []
    seen = events if events is not None else []
    engine = Engine(model, config, publish=lambda event: (seen.append(event), box[0].publish(event))[1])
    server = Server(engine, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*",
                    **server_options)
    box.append(server)
    engine.start()
    server.start()
    client = Client(server.request_address, timeout_s=timeout_s, retries=0)
    try:
        yield engine, server, client
    finally:
        client.close()
        engine.shutdown(save=False)
        server.stop()


@contextlib.contextmanager
def console_engine(model, config=None, limits=None):
    """An engine behind a real ZeroMQ server and a console on free loopback ports: (engine, client, console)."""
    from mixmalmm.clients import Client
    from mixmalmm.clients import protocol as P
    from mixmalmm.streamer.console import Console
    from mixmalmm.streamer.engine import Engine
    from mixmalmm.streamer.server import EventFanout, Server

    box = EventFanout()  # as serve does: the PUB and the console carry the same seq
    engine = Engine(model, config, publish=box.publish)
    server = Server(engine, request_endpoint="tcp://127.0.0.1:*", event_endpoint="tcp://127.0.0.1:*")
    console = Console(engine, address="127.0.0.1:0", limits=limits or P.DEFAULT_LIMITS)
    box.add(server)
    box.add(console)
    engine.start()
    server.start()
    console.start()
    client = Client(server.request_address, timeout_s=20, retries=0)
    try:
        yield engine, client, console
    finally:
        client.close()
        console.stop()
        engine.shutdown(save=False)
        server.stop()


def wait_for(predicate, timeout: float, what: str):
    """predicate()'s first true value, polled every 50 ms; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)


class SlowSteps:
    """A real model whose `step` sleeps `delay_s` seconds first (so Shots back up in the engine's queues,
    as behind a big model), and raises for a Shot ending at `fail_end` seconds; the rest is the model's."""

    def __init__(self, model, delay_s: float, fail_end: float | None = None):
        self.model, self.delay_s, self.fail_end = model, delay_s, fail_end

    def __getattr__(self, name):
        return getattr(self.model, name)

    def step(self, states, features, times):
        time.sleep(self.delay_s)
        if self.fail_end is not None and any(end == pytest.approx(self.fail_end) for _, end in times):
            raise RuntimeError("out of memory (injected)")
        return self.model.step(states, features, times)


def _gst_rtsp_available() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    check = 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer'
    return subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True).returncode == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    """Debian's GStreamer RTSP server serving one file at rtsp://127.0.0.1:PORT/stream; with `auth`
    ("USER:PASSWORD") only to clients that log in with it (`url_with(auth)`); RTP over UDP only with
    `udp_only`, refusing TCP as some cameras do."""

    def __init__(self, path: Path, port: int, auth: str | None = None, udp_only: bool = False):
        self.path, self.port, self.auth, self.udp_only = path, port, auth, udp_only
        self.url = f"rtsp://127.0.0.1:{port}/stream"
        self.process: subprocess.Popen | None = None

    def url_with(self, credentials: str) -> str:
        """The stream's URL logging in as "USER:PASSWORD"."""
        return f"rtsp://{credentials}@127.0.0.1:{self.port}/stream"

    def start(self, timeout: float = 15.0) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.path), str(self.port), *(["udp"] if self.udp_only else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "RTSP_SERVER_AUTH": self.auth or ""},
        )
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"the RTSP server did not start on port {self.port}: {line!r}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-stream, as a crashed camera would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a frozen process must be able to die
            self.process.kill()
            self.process.wait(timeout=10)
            self.process.stdout.close()
            self.process = None

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


def skip_unless_ci(message: str) -> None:
    """Skip a test whose system packages are missing, except under CI (``CI`` set): CI installs them
    (scripts/setup.sh --test), so a skip there would hide a broken set-up."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _server(path: Path, auth: str | None = None, udp_only: bool = False):
    if not _gst_rtsp_available():
        skip_unless_ci("needs Debian's GStreamer RTSP server for /usr/bin/python3 (bash scripts/setup.sh --test)")
    server = RtspServer(path, free_port(), auth, udp_only)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def rtsp_server(media):
    """A running RTSP server serving 30 s of video."""
    yield from _server(media.rtsp)


@pytest.fixture
def rtsp_udp_server(media):
    """A running RTSP server serving 30 s of video over UDP only."""
    yield from _server(media.rtsp, udp_only=True)


@pytest.fixture
def rtsp_short_server(media):
    """A running RTSP server serving 1.5 s of video: each session ends with an end of stream."""
    yield from _server(media.rtsp_short)



#: The login `auth_rtsp_server` accepts.
RTSP_LOGIN = "viewer:Corr3ct-h0rse"


@pytest.fixture
def auth_rtsp_server(media):
    """A running RTSP server serving 30 s of video to clients that log in as `RTSP_LOGIN` only."""
    yield from _server(media.rtsp, RTSP_LOGIN)


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte; yields its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []  # kept open: the client waits for an answer that never comes

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        listener.close()
        for conn in held:
            conn.close()


@pytest.fixture
def not_found_server():
    """A real HTTP server on 127.0.0.1 that answers every GET with 404 Not Found; yields its URL."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


#: Debian's Chromium, headless, as this machine needs it (without the background-networking flags it
#: stalls on refused connections).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


@contextlib.contextmanager
def chromium(user_data_dir: Path, width: int = 1280, height: int = 800):
    """A Selenium WebDriver on Debian's headless Chromium and chromedriver, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()
