"""HTTP sources cameras and web servers offer, each against a real HTTP server on 127.0.0.1 started here:
an MP4 link (a file: paced, ends), MJPEG (multipart/x-mixed-replace, no clock of its own), a snapshot URL
(one JPEG per request) and a live HLS playlist whose publisher stops."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mixmalmm.streamer.sources import NetworkSource, SourceState, open_source
from mixmalmm.streamer.synthetic import synthetic_rgb

from .conftest import FPS, HEIGHT, NUM_FRAMES, SCENE, WIDTH, X264, source_frames

FAST = {"open_timeout": 4.0, "read_timeout": 1.5, "backoff": (0.1, 0.2)}


def jpeg(rgb: np.ndarray) -> bytes:
    """One JPEG picture of an [H, W, 3] uint8 RGB frame (PyAV's MJPEG encoder)."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj420p"
    codec.time_base = Fraction(1, FPS)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])


class HTTPServer:
    """Python's threading HTTP server on 127.0.0.1: `routes` maps a path to a function of the handler that
    writes the whole response. Counts requests per path."""

    def __init__(self, routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]):
        self.requests: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client went away
                    route(self)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def serve():
    servers: list[HTTPServer] = []

    def start(routes) -> HTTPServer:
        servers.append(HTTPServer(routes))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def send_bytes(data: bytes, content_type: str):
    def route(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return route


def read_all(source, limit: int, timeout: float = 20.0) -> list:
    """Frames until the source ends (or `limit` of them), failing after `timeout` seconds."""
    frames, deadline = [], time.monotonic() + timeout
    while len(frames) < limit:
        frame = source.read(timeout=max(0.01, deadline - time.monotonic()))
        if frame is None:
            break
        frames.append(frame)
    return frames


def test_http_mp4_link_is_a_file(serve, media):
    # An MP4 over HTTP has a duration: a file, read once at its own pace, then the source ends (before,
    # it was taken for a live stream and looped without pacing).
    server = serve({"/clip.mp4": send_bytes(media.rtsp_short.read_bytes(), "video/mp4")})
    source = open_source(f"{server.url}/clip.mp4", realtime=True, queue_size=8, **FAST)
    assert isinstance(source, NetworkSource)
    started = time.monotonic()
    frames = read_all(source, 100)
    elapsed = time.monotonic() - started
    assert len(frames) == 15 and source.state == SourceState.ENDED and not source.live
    assert elapsed > 1.3  # 15 frames at 10 fps: 1.4 s of video
    np.testing.assert_allclose([f.pts for f in frames], np.arange(15) / FPS, atol=1e-6)
    assert source.stats.dropped == 0 and server.requests["/clip.mp4"] == 1
    # From a time on (a replay resumed from a snapshot).
    with open_source(f"{server.url}/clip.mp4", start=0.75, **FAST) as resumed:
        np.testing.assert_allclose([f.pts for f in read_all(resumed, 100)], np.arange(8, 15) / FPS, atol=1e-6)
    # Told it is live (a looping feed), it goes on past the end.
    with open_source(f"{server.url}/clip.mp4#live=1", queue_size=64, **FAST) as looping:
        assert len(read_all(looping, 20)) == 20 and looping.live


def mjpeg_stream(frames: list[np.ndarray], fps: float):
    """multipart/x-mixed-replace of JPEG parts at `fps` per second, as ESP32-CAM or mjpg-streamer send."""
    parts = [jpeg(rgb) for rgb in frames]

    def route(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        handler.end_headers()
        started = time.monotonic()
        for i, part in enumerate(parts):
            time.sleep(max(0.0, started + i / fps - time.monotonic()))
            handler.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(part))
            handler.wfile.write(part + b"\r\n")
            handler.wfile.flush()

    return route


def test_mjpeg_over_http_gets_arrival_times(serve):
    # FFmpeg numbers MJPEG parts at a fixed 25 per second; a 10 fps camera's frames must be 0.1 s apart.
    server = serve({"/video.mjpg": mjpeg_stream(source_frames(40), fps=10)})
    with open_source(f"{server.url}/video.mjpg", queue_size=64, **FAST) as source:
        frames = read_all(source, 30)
        assert len(frames) == 30 and source.live
        assert source.fps == pytest.approx(10.0, rel=0.25)
    span = frames[-1].pts - frames[0].pts
    assert span == pytest.approx(2.9, rel=0.2)  # 29 intervals of 0.1 s (25/s would say 1.16 s)
    assert np.median(np.diff([f.pts for f in frames])) == pytest.approx(0.1, rel=0.25)
    np.testing.assert_allclose(span, frames[-1].wall_time - frames[0].wall_time, atol=0.05)
    assert np.abs(frames[7].rgb.astype(int) - source_frames(8)[7]).mean() < 8.0


def test_snapshot_url_is_polled(serve):
    # A camera's snapshot.jpg answers one picture per request: polled every poll_s seconds, no disconnect
    # (before: "reconnecting" and a disconnect for every picture).
    pictures = [synthetic_rgb(i * 25, WIDTH, HEIGHT, SCENE) for i in range(3)]
    served = []

    def snapshot(handler) -> None:
        served.append(time.monotonic())
        send_bytes(jpeg(pictures[(len(served) - 1) % 3]), "image/jpeg")(handler)

    server = serve({"/snapshot.jpg": snapshot})
    states = []
    with open_source(f"{server.url}/snapshot.jpg#poll_s=0.25", queue_size=8, **FAST) as source:
        frames = []
        while len(frames) < 6:
            frames.append(source.read(timeout=10))
            states.append(source.state)
        stats = source.stats
        assert source.fps == pytest.approx(4.0, rel=0.3)
    assert stats.disconnects == 0 and stats.reconnects == 0 and stats.last_error is None
    assert set(states) == {SourceState.LIVE}
    assert np.median(np.diff([f.pts for f in frames])) == pytest.approx(0.25, rel=0.3)
    for k, frame in enumerate(frames):  # each request's picture
        assert np.abs(frame.rgb.astype(int) - pictures[k % 3]).mean() < 8.0


def hls_segments(folder: Path, frames: list[np.ndarray]) -> list[tuple[float, str]]:
    """MPEG-TS segments of 1 s (one key frame each) of `frames` at FPS; [(duration s, file name)]."""
    folder.mkdir()
    playlist = folder / "all.m3u8"
    with av.open(str(playlist), "w", format="hls", options={"hls_time": "1", "hls_list_size": "0"}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt, stream.options = WIDTH, HEIGHT, "yuv420p", dict(X264)
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    lines = playlist.read_text().splitlines()
    return [(float(line.split(":")[1].rstrip(",")), lines[i + 1]) for i, line in enumerate(lines)
            if line.startswith("#EXTINF:")]


def test_stalled_live_hls_repeats_no_frames(serve, tmp_path):
    # A live playlist (no #EXT-X-ENDLIST) that gains a 1 s segment every second, in a window of 4, until
    # its publisher stops. FFmpeg starts a live playlist 3 segments from its end, so each reconnection
    # to the stalled playlist began with segments already read (before: they came out again as new frames).
    frames = source_frames(80)
    segments = hls_segments(tmp_path / "hls", frames)
    assert len(segments) == 8
    first_request: list[float] = []

    def playlist(handler) -> None:
        now = time.monotonic()
        first_request.append(now)
        published = min(len(segments), 3 + int(now - first_request[0]))  # then the publisher stops
        sequence = max(0, published - 4)
        text = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n" + f"#EXT-X-MEDIA-SEQUENCE:{sequence}\n"
        text += "".join(f"#EXTINF:{d:.3f},\n{name}\n" for d, name in segments[sequence:published])
        send_bytes(text.encode(), "application/vnd.apple.mpegurl")(handler)

    routes = {"/live.m3u8": playlist}
    for _, name in segments:
        routes[f"/{name}"] = send_bytes((tmp_path / "hls" / name).read_bytes(), "video/mp2t")
    server = serve(routes)
    with open_source(f"{server.url}/live.m3u8", queue_size=200, **FAST) as source:
        got = read_all(source, 80, timeout=30)
        assert source.live and len(got) == 80
        # Stalled: the read times out, the source reconnects (more than once), and nothing new comes.
        deadline = time.monotonic() + 20
        while source.stats.reconnects < 2:
            assert time.monotonic() < deadline, source.stats
            with pytest.raises(TimeoutError):
                source.read(timeout=0.2)
        with pytest.raises(TimeoutError):
            source.read(timeout=1.0)
        assert source.stats.frames == 80
    assert np.all(np.diff([f.pts for f in got]) > 0)
    for k in (0, 35, 79):  # every frame once, in order
        assert np.abs(got[k].rgb.astype(int) - frames[k]).mean() < 8.0


def test_http_file_resumes_after_a_lost_connection(serve, media):
    # The first response breaks off halfway: the file goes on after its last frame, none twice, none lost.
    data = media.mpeg4.read_bytes()  # Matroska: what arrived decodes

    def flaky(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/x-matroska")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data if server.requests["/clip.mkv"] > 1 else data[: len(data) // 2])

    server = serve({"/clip.mkv": flaky})
    with open_source(f"{server.url}/clip.mkv", queue_size=8, **FAST) as source:
        frames = read_all(source, 200)
        stats = source.stats
    assert server.requests["/clip.mkv"] >= 2 and stats.disconnects >= 1 and stats.reconnects >= 1
    assert len(frames) == NUM_FRAMES and stats.state == SourceState.ENDED
    np.testing.assert_allclose([f.pts for f in frames], np.arange(NUM_FRAMES) / FPS, atol=1e-6)
    for k in (0, 40, NUM_FRAMES - 1):
        assert np.abs(frames[k].rgb.astype(int) - source_frames()[k]).mean() < 8.0
