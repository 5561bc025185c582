"""Sources on real encoded files, OpenCV, the synthetic source, and bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from mixmalmm.streamer.sources import (
    FileSource,
    FrameQueue,
    NetworkSource,
    OpenCVSource,
    SourceError,
    SourceState,
    SyntheticSource,
    open_source,
)
from mixmalmm.streamer.synthetic import synthetic_rgb

from .conftest import FPS, HEIGHT, NUM_FRAMES, SCENE, WIDTH, X264, source_frames


def channel_means(images) -> np.ndarray:
    return np.stack([im.reshape(-1, 3).mean(axis=0) for im in images])  # [T, 3]


@pytest.mark.parametrize("kind", ["h264", "mpeg4"])
def test_file_frames_match_what_was_encoded(media, kind):
    source = open_source(getattr(media, kind))
    assert isinstance(source, FileSource) and not source.live
    assert source.fps == pytest.approx(FPS)
    frames = list(source)
    assert len(frames) == NUM_FRAMES
    assert [f.index for f in frames] == list(range(NUM_FRAMES))
    np.testing.assert_allclose([f.pts for f in frames], np.arange(NUM_FRAMES) / FPS, atol=1e-6)
    assert all(f.rgb.shape == (HEIGHT, WIDTH, 3) and f.rgb.dtype == np.uint8 for f in frames)
    walls = [f.wall_time for f in frames]
    assert walls == sorted(walls) and abs(walls[-1] - time.time()) < 60
    # Lossy codecs, but the picture and its channel order (RGB, not BGR) survive.
    originals = source_frames()
    errors = [np.abs(f.rgb.astype(int) - o).mean() for f, o in zip(frames, originals, strict=True)]
    assert max(errors) < 6.0
    np.testing.assert_allclose(channel_means(f.rgb for f in frames), channel_means(originals), atol=3.0)
    stats = source.stats
    assert (stats.state, stats.frames, stats.decode_errors, stats.dropped) == (SourceState.ENDED, NUM_FRAMES, 0, 0)


@pytest.mark.parametrize("kind", ["h264", "mpeg4"])  # Matroska: the container's duration, not the stream's
def test_file_duration_known_after_reading_it(media, kind):
    source = open_source(getattr(media, kind))
    assert source.duration == pytest.approx(NUM_FRAMES / FPS, abs=0.11)
    assert len(list(source)) == NUM_FRAMES and source.state == SourceState.ENDED
    assert source.duration == pytest.approx(NUM_FRAMES / FPS, abs=0.11)  # before: "Container is not open"


@pytest.mark.parametrize("degrees", [-90, 90, 180])
def test_rotated_phone_video_is_decoded_upright(tmp_path, degrees):
    # A phone stores a portrait video as landscape frames and a display matrix that turns them upright
    # (PyAV writes it with set_display_rotation: counter-clockwise degrees, as frame.rotation reads it).
    path = tmp_path / f"phone{degrees}.mp4"
    stored = source_frames(10)
    for rgb in stored:
        rgb[:20, :30] = (255, 0, 0)  # a red mark in the stored picture's top-left corner
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt, stream.options = WIDTH, HEIGHT, "yuv420p", dict(X264)
        stream.set_display_rotation(degrees)
        for rgb in stored:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = list(open_source(path))
    upright = [np.rot90(rgb, degrees // 90) for rgb in stored]
    assert len(frames) == 10 and frames[0].rgb.shape == upright[0].shape
    assert frames[0].rgb.shape == ((HEIGHT, WIDTH, 3) if degrees == 180 else (WIDTH, HEIGHT, 3))
    assert frames[0].rgb.flags.c_contiguous
    for ours, truth in zip(frames, upright, strict=True):
        assert np.abs(ours.rgb.astype(int) - truth).mean() < 6.0
    # Where the mark is now: a -90 (clockwise) turn takes the top-left corner to the top-right.
    corner = {-90: (slice(0, 30), slice(-20, None)), 90: (slice(-30, None), slice(0, 20)),
              180: (slice(-20, None), slice(-30, None))}[degrees]
    assert frames[0].rgb[corner].mean(axis=(0, 1))[0] > 200 and frames[0].rgb[corner].mean(axis=(0, 1))[1] < 60
    # `size` is the upright picture's (width, height).
    size = (60, 40) if degrees == 180 else (40, 60)
    scaled = list(open_source(path, size=size))
    assert scaled[0].rgb.shape == (size[1], size[0], 3)
    expected = cv2.resize(np.ascontiguousarray(upright[3]), size, interpolation=cv2.INTER_AREA)
    assert np.abs(scaled[3].rgb.astype(int) - expected).mean() < 12.0


def test_file_stride_target_rate_and_time_range(media):
    frames = list(open_source(media.h264, stride=3))
    assert [round(f.pts, 6) for f in frames] == [round(0.3 * k, 6) for k in range(20)]
    assert [f.index for f in frames] == list(range(20))

    # 10 fps -> 4 fps: one frame per 0.25 s grid step: 0.0, 0.3, 0.5, 0.8, 1.0, ...
    source = open_source(media.h264, target_fps=4)
    assert source.fps == 4
    pts = [round(f.pts, 6) for f in source]
    assert pts[:5] == [0.0, 0.3, 0.5, 0.8, 1.0] and len(pts) == 24

    frames = list(open_source(media.mpeg4, start=2.0, end=4.0))
    assert [round(f.pts, 6) for f in frames] == [round(2.0 + 0.1 * k, 6) for k in range(21)]
    # Seeking landed on a key frame at or before 2.0 s and decoded forward: the content is frame 20.
    assert np.abs(frames[0].rgb.astype(int) - source_frames()[20]).mean() < 6.0


def test_file_scaled_at_decode_time(media):
    frames = list(open_source(media.h264, size=(64, 48), interpolation="AREA"))
    assert len(frames) == NUM_FRAMES and frames[0].rgb.shape == (48, 64, 3)
    # The scene's brightness survives scaling (dark scene 0, bright scene 1).
    assert frames[0].rgb.mean() < 100 < frames[SCENE].rgb.mean()


def test_file_at_its_own_pace(media):
    source = open_source(media.h264, realtime=True)
    started = time.monotonic()
    frames = [source.read() for _ in range(8)]
    elapsed = time.monotonic() - started
    source.close()
    assert [f.index for f in frames] == list(range(8))
    assert 0.65 <= elapsed < 3.0  # 7 intervals of 0.1 s
    assert source.state == SourceState.CLOSED


def test_file_read_ahead_in_a_thread_loses_nothing(media):
    with FileSource(media.h264, queue_size=2) as source:
        frames = []
        while (frame := source.read(timeout=10)) is not None:
            time.sleep(0.002)  # a slow consumer: the decode thread waits, nothing is dropped
            frames.append(frame)
        stats = source.stats
    assert [f.index for f in frames] == list(range(NUM_FRAMES))
    assert stats.dropped == 0 and stats.state == SourceState.ENDED


def test_corrupt_file_counts_decode_errors_and_recovers(media):
    source = open_source(media.corrupt)
    frames = list(source)
    stats = source.stats
    assert stats.state == SourceState.ENDED
    assert stats.decode_errors > 0
    assert str(media.corrupt) in stats.last_error
    # Frames are lost in the damaged middle, but decoding resumes at the next key frame.
    assert 0 < len(frames) < NUM_FRAMES
    assert frames[-1].pts == pytest.approx(5.9)
    assert np.abs(frames[-1].rgb.astype(int) - source_frames()[-1]).mean() < 6.0
    pts = [f.pts for f in frames]
    assert pts == sorted(set(pts))


def test_truncated_files(media):
    # MP4 keeps its index at the end: the cut file (or one still being recorded) cannot be read, and the
    # error says which file and why (before: "corrupt or unsupported data").
    with pytest.raises(SourceError, match=r"cannot read '.*truncated\.mp4' as video: the MP4 has no index "
                                          r"\(no 'moov' box\), so the file may still be recording") as info:
        open_source(media.truncated_mp4)
    assert info.value.uri == str(media.truncated_mp4)
    # Matroska streams: what is there decodes, then the source ends normally.
    source = open_source(media.truncated_mkv)
    frames = list(source)
    assert 5 < len(frames) < NUM_FRAMES
    assert source.state == SourceState.ENDED
    assert np.abs(frames[3].rgb.astype(int) - source_frames()[3]).mean() < 6.0


def test_bad_input_gets_a_clear_error(media, tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match=r"no such file: '.*nope\.mp4'"):
        open_source(missing)
    with pytest.raises(SourceError, match=rf"'{tmp_path}' is a directory, not a video file"):
        open_source(tmp_path)
    for uri, message in (("rtsp://127.0.0.1:9/s#transport=quic", "unknown transport 'quic'"),
                         ("http://127.0.0.1:9/a.mp4#transport=udp", "transport=udp applies to rtsp:// sources only"),
                         ("rtsp://127.0.0.1:9/s#speed=2", "unknown option 'speed' in 'rtsp://127.0.0.1:9/s#speed=2'"),
                         ("http://127.0.0.1:9/a.mp4#live=maybe", "bad live='maybe'.*: it must be 1 .*, 0 .* or auto"),
                         # Numbers that are not times: a TypeError, an OverflowError or FFmpeg's timeout off
                         # ("0" microseconds) before.
                         ("rtsp://127.0.0.1:9/s#open_timeout=abc", "bad open_timeout='abc'"),
                         ("rtsp://127.0.0.1:9/s#poll_s=", "bad poll_s=''"),
                         ("rtsp://127.0.0.1:9/s#read_timeout=inf", "bad read_timeout='inf'.*seconds from 0.001"),
                         ("rtsp://127.0.0.1:9/s#read_timeout=1e-7", "bad read_timeout='1e-7'"),
                         ("rtsp://me:hunter2@127.0.0.1:9/s#read_timeout=x", r"'rtsp://me:\*\*\*@127"),
                         ("synthetic:?width=32&colour=red", "unknown option 'colour' in 'synthetic:.*': synthetic: "
                                                            "takes width, height, fps, num_frames, scene_length")):
        with pytest.raises((SourceError, ValueError), match=message):
            open_source(uri)
    with pytest.raises(SourceError, match=r"no video stream in '.*audio\.mp4' \(streams: audio\)"):
        open_source(media.audio_only)
    with pytest.raises(SourceError, match=r"cannot read '.*notes\.json' as video"):
        open_source(media.text)
    for uri in ("ftp://127.0.0.1/x.mp4", "foo:bar"):
        with pytest.raises(SourceError, match=rf"unknown scheme '{uri.split(':')[0]}' in '{uri}'"):
            open_source(uri)
    with pytest.raises(SourceError, match="bad camera in 'webcam:front'"):
        open_source("webcam:front")
    with pytest.raises(ValueError, match="must be a positive integer"):
        open_source(media.h264, stride=0)
    with pytest.raises(ValueError, match="end .* is before start"):
        open_source(media.h264, start=3.0, end=1.0)


@pytest.mark.skipif(Path("/dev/video0").exists(), reason="this machine has a camera")
def test_camera_not_present():
    for uri in ("webcam:0", "/dev/video0"):
        with pytest.raises(SourceError, match=rf"camera '{uri}' is not present"):
            open_source(uri)


def test_uri_forms(media):
    assert isinstance(open_source(f"file://{media.h264}"), FileSource)
    assert isinstance(open_source(str(media.h264)), FileSource)
    network = open_source("rtsp://127.0.0.1:9/stream")
    assert isinstance(network, NetworkSource) and network.live and network.state == SourceState.CONNECTING
    vod = open_source("https://127.0.0.1:9/video.mp4", live=False)
    assert not vod.live
    synthetic = open_source("synthetic:?width=32&height=24&fps=5&num_frames=7&scene_length=3")
    assert isinstance(synthetic, SyntheticSource) and synthetic.fps == 5


def test_synthetic_source_is_deterministic():
    frames = list(open_source("synthetic:?width=48&height=32&fps=4&num_frames=9&scene_length=3", stride=2))
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert [f.pts for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0]
    for k, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.rgb, synthetic_rgb(2 * k, 48, 32, 3))
    # Scene cuts are real cuts (the whole picture changes; even MixMA-LMM's 127.5 sees them), motion within a
    # scene is small.
    a, b, c = (synthetic_rgb(i, 160, 120, 20).astype(int) for i in (18, 19, 20))
    assert np.abs(a - b).mean() < 10 and np.abs(b - c).mean() > 127.5


def test_opencv_source_reads_rgb_and_reopens_at_the_end(media):
    reference = list(open_source(media.h264))
    source = OpenCVSource(str(media.h264), backoff=(0.05, 0.1), queue_size=400)  # no drops here
    assert source.live
    frames = [source.read(timeout=10) for _ in range(NUM_FRAMES + 5)]
    stats = source.stats
    source.close()
    # The same decoded pictures as PyAV's, in RGB order.
    for ours, theirs in zip(frames[:NUM_FRAMES], reference, strict=True):
        assert np.abs(ours.rgb.astype(int) - theirs.rgb).mean() < 2.0
    # The end of the "device" was a disconnect; it was reopened and the picture started over.
    assert stats.disconnects >= 1 and stats.reconnects >= 1
    assert np.abs(frames[NUM_FRAMES].rgb.astype(int) - reference[0].rgb).mean() < 2.0
    pts = [f.pts for f in frames]
    assert pts == sorted(set(pts))
    assert source.state == SourceState.CLOSED


def test_live_source_drops_oldest_when_the_consumer_falls_behind(media):
    source = OpenCVSource(str(media.h264), backoff=(0.05, 0.1), queue_size=3)
    first = source.read(timeout=10)
    time.sleep(0.5)  # the decode thread runs on; the queue keeps only the 3 newest frames
    late = [source.read(timeout=10) for _ in range(3)]
    stats = source.stats
    source.close()
    assert stats.dropped > 0
    indices = [first.index] + [f.index for f in late]
    assert indices == sorted(indices) and indices[1] - indices[0] > 1  # a gap where frames were dropped
    final = source.stats
    assert final.frames >= 1 + 3 + final.dropped


def test_frame_queue_policies():
    q = FrameQueue(2, drop_oldest=True)
    assert [q.put(i) for i in range(5)] == [0, 0, 1, 1, 1]
    assert [q.get(0), q.get(0)] == [3, 4]
    with pytest.raises(TimeoutError):
        q.get(0.01)
    q.close()
    assert q.get() is FrameQueue.END and q.put(9) == 0 and len(q) == 0

    q = FrameQueue(1, drop_oldest=False)
    q.put("a")
    done = threading.Event()
    threading.Thread(target=lambda: (q.put("b"), done.set()), daemon=True).start()
    assert not done.wait(0.1)  # blocked: the queue is full
    assert q.get(1) == "a"
    assert done.wait(2) and q.get(1) == "b"


def test_failed_connection_names_the_source():
    from .conftest import free_port

    url = f"rtsp://127.0.0.1:{free_port()}/stream"
    source = NetworkSource(url, open_timeout=2, read_timeout=2, max_attempts=2, backoff=(0.05, 0.1))
    with pytest.raises(SourceError, match=rf"cannot connect to '{url}' after 2 attempt\(s\)"):
        source.read(timeout=20)
    assert source.state == SourceState.FAILED
    assert source.read(timeout=1) is None
    source.close()
    assert source.state == SourceState.FAILED


def test_close_from_another_thread_stops_a_reader(media):
    # The engine stops a stream from its control thread while the decode thread is reading.
    source = open_source(media.h264, realtime=True)
    got, errors = [], []

    def reader() -> None:
        try:
            got.extend(source)
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.35)
    source.close()  # the reader is inside the source (pacing or decoding): it must stop by itself
    thread.join(timeout=5)
    assert not thread.is_alive() and errors == []
    assert 2 <= len(got) < NUM_FRAMES
    assert source.state == SourceState.CLOSED
    assert source.read() is None


def test_http_and_hls(http_server):
    # Video on demand over HTTP: read once, then the source ends.
    source = open_source(f"{http_server}/h264.mp4", live=False, read_timeout=5)
    frames = [source.read(timeout=20) for _ in range(NUM_FRAMES)]
    assert source.read(timeout=20) is None and source.state == SourceState.ENDED
    np.testing.assert_allclose([f.pts for f in frames], np.arange(NUM_FRAMES) / FPS, atol=1e-6)
    assert np.abs(frames[-1].rgb.astype(int) - source_frames()[-1]).mean() < 6.0

    # An HLS playlist (MPEG-TS segments; their timestamps start at 1.4 s).
    source = open_source(f"{http_server}/hls/index.m3u8", live=False)
    frames = [source.read(timeout=20) for _ in range(NUM_FRAMES)]
    assert source.read(timeout=20) is None and source.stats.frames == NUM_FRAMES
    np.testing.assert_allclose(np.diff([f.pts for f in frames]), 0.1, atol=1e-6)
    assert np.abs(frames[30].rgb.astype(int) - source_frames()[30]).mean() < 6.0

    # Told it is a live stream (`#live=1`, never sent to the server), the end of the file is a disconnect:
    # the source reconnects and goes on.
    with open_source(f"{http_server}/h264.mp4#live=1", backoff=(0.05, 0.1), queue_size=100) as live:
        frames = [live.read(timeout=20) for _ in range(NUM_FRAMES + 10)]
        stats = live.stats
    assert stats.disconnects >= 1 and stats.reconnects >= 1 and "end of stream" in stats.last_error
    assert np.all(np.diff([f.pts for f in frames]) > 0)


def test_a_file_without_read_permission_says_so(media):
    """Was `internal` over the protocol: the MP4-index probe's own open() raised PermissionError."""
    folder = Path(tempfile.mkdtemp(prefix="mixmalmm-perm-"))  # pytest's tmp_path is closed to others
    folder.chmod(0o755)
    locked = folder / "locked.mp4"
    locked.write_bytes(Path(media.h264).read_bytes())
    locked.chmod(0)
    probe = ("from mixmalmm.streamer.sources import open_source, SourceError\n"
             f"try:\n    open_source({str(locked)!r})\nexcept SourceError as exc:\n    print('SourceError:', exc)\n")
    command = [sys.executable, "-c", probe]
    if os.geteuid() == 0:  # root reads anything: probe as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(folder)
    assert run.stdout.strip() == f"SourceError: cannot read '{locked}': permission denied", run
