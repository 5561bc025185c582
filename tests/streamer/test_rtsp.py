"""Live RTSP against a real GStreamer RTSP server on 127.0.0.1: frames, kill/restart, freeze, end of stream,
a server that offers UDP only."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mixmalmm.streamer.sources import NetworkSource, SourceError, SourceState, open_source

from .conftest import HEIGHT, WIDTH, source_frames

pytestmark = pytest.mark.rtsp

# Short timeouts so a lost server is noticed in seconds.
OPTIONS = {"open_timeout": 4.0, "read_timeout": 1.5, "backoff": (0.2, 0.5)}


def take(source, n: int, timeout: float = 20.0) -> list:
    """The next n frames, failing (not hanging) if they do not come within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    frames = []
    while len(frames) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(frames)} of {n} frames within {timeout} s; {source.stats}"
        frame = source.read(timeout=left)
        assert frame is not None, f"the source ended: {source.stats}"
        frames.append(frame)
    return frames


def wait_for(predicate, timeout: float, what: str, source) -> float:
    """Seconds until predicate() held; fails after `timeout` seconds."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout} s; {source.stats}"
        time.sleep(0.05)
    return time.monotonic() - started


def assert_strictly_increasing(frames) -> None:
    pts = [f.pts for f in frames]
    assert np.all(np.diff(pts) > 0), pts
    indices = [f.index for f in frames]
    assert np.all(np.diff(indices) > 0), indices


def test_frames_arrive_and_survive_a_killed_server(rtsp_server):
    source = open_source(rtsp_server.url, **OPTIONS)
    assert isinstance(source, NetworkSource)
    try:
        before = take(source, 12)
        assert source.state == SourceState.LIVE
        assert before[0].pts == 0.0  # the first RTSP frames carry no pts: the clock starts at 0
        assert all(f.rgb.shape == (HEIGHT, WIDTH, 3) for f in before)
        assert np.abs(before[5].rgb.astype(int) - source_frames(6)[5]).mean() < 8.0
        assert source.fps == pytest.approx(10.0)

        rtsp_server.kill()
        wait_for(lambda: source.stats.disconnects >= 1, 10, "disconnect noticed", source)
        rtsp_server.start()  # same port
        restarted = time.time()
        after = take(source, 12)
        stats = source.stats
        assert stats.reconnects >= 1 and stats.state == SourceState.LIVE
        # The last error is the disconnect, or a refused attempt while the server was down.
        assert stats.last_error.startswith((f"'{rtsp_server.url}' disconnected", f"cannot connect to '{rtsp_server.url}'"))
        # The new session plays the file from its start (frames decoded before the disconnect was
        # noticed may come first); the source's clock keeps running forward.
        first_new = next(f for f in after if f.wall_time > restarted)
        assert min(np.abs(first_new.rgb.astype(int) - f).mean() for f in source_frames(4)) < 8.0
        assert_strictly_increasing(before + after)
    finally:
        source.close()
    assert source.state == SourceState.CLOSED


def test_frozen_server_times_out_and_reconnects(rtsp_server):
    source = open_source(rtsp_server.url, **OPTIONS)
    try:
        before = take(source, 8)
        rtsp_server.freeze()
        # The read blocks on a silent socket until the read timeout: then the source reconnects.
        waited = wait_for(lambda: source.state == SourceState.RECONNECTING, 10, "reconnecting", source)
        assert waited < 8
        assert source.stats.disconnects == 1
        # Connection attempts to the frozen server time out too, and are retried (not a hang).
        wait_for(lambda: "cannot connect" in (source.stats.last_error or ""), 15, "a timed-out attempt", source)
        assert source.state == SourceState.RECONNECTING
        rtsp_server.thaw()
        thawed = time.time()
        wait_for(lambda: source.stats.reconnects >= 1, 30, "reconnected", source)
        after = take(source, 8 + 8)  # the 8 queued before the freeze, then the new session's
        assert source.state == SourceState.LIVE
        assert_strictly_increasing(before + after)
        new = [f for f in after if f.wall_time > thawed]
        assert new, "no frame from the new session"
        # The clock went on across the freeze (several seconds of wall time passed).
        assert new[0].pts - before[-1].pts > 2.0
    finally:
        source.close()


def test_end_of_stream_is_a_disconnect(rtsp_short_server):
    # The server's stream is 1.5 s long: each session ends, and the source starts a new one.
    source = open_source(rtsp_short_server.url, **OPTIONS, queue_size=64)
    try:
        frames = take(source, 25, timeout=30)
        stats = source.stats
        assert stats.disconnects >= 1 and stats.reconnects >= 1
        assert "end of stream" in stats.last_error
        assert_strictly_increasing(frames)
    finally:
        source.close()


def test_udp_only_server(rtsp_udp_server):
    # A camera that offers RTP over UDP only refuses TCP ("461 Unsupported Transport"): the default
    # transport (auto) asks for TCP, then for UDP, and keeps asking for UDP first after a reconnect.
    source = open_source(rtsp_udp_server.url, **OPTIONS)
    try:
        before = take(source, 10)
        assert source.transport == "udp" and source.state == SourceState.LIVE
        assert np.abs(before[5].rgb.astype(int) - source_frames(6)[5]).mean() < 8.0
        rtsp_udp_server.kill()  # UDP has no end of stream: the silence is a read timeout
        wait_for(lambda: source.stats.disconnects >= 1, 10, "disconnect noticed", source)
        rtsp_udp_server.start()
        after = take(source, 10)
        assert source.stats.reconnects >= 1 and source.transport == "udp"
        assert_strictly_increasing(before + after)
    finally:
        source.close()

    # Asked for in the URI (the fragment is not sent to the server): UDP at once, or TCP only, which fails
    # with an error that says what to do.
    with open_source(rtsp_udp_server.url + "#transport=udp", **OPTIONS) as source:
        take(source, 3)
        assert source.transport == "udp"
    source = open_source(rtsp_udp_server.url + "#transport=tcp", **{**OPTIONS, "max_attempts": 1})
    with pytest.raises(SourceError, match=r"refuses RTSP over TCP .*add #transport=udp or #transport=auto"):
        source.read(timeout=20)
    source.close()
