"""Video sources: one way to open files, network streams, webcams and a synthetic generator.

`open_source(uri, **options)` returns a `Source`, an iterable of `Frame` (RGB uint8 [H, W, 3], pts in
seconds, index, wall-clock arrival time) with a state machine and counters:

    with open_source("rtsp://127.0.0.1:8554/cam") as source:
        for frame in source:
            ...
        source.stats  # a copy: state, frames, reconnects, decode errors, dropped frames, last error

URIs: a file path or `file:` URI (any container/codec PyAV decodes); `rtsp://`, `rtsps://`,
`rtmp://`, `rtmps://`, `http://`, `https://` (HLS, MJPEG and snapshot URLs too) through PyAV, with
per-source options after `#` (`rtsp://cam/stream#transport=udp`, `http://host/clip.mp4#live=0`: the
fragment never reaches the server); `webcam:N` or `/dev/videoN` through OpenCV; `synthetic:` (options
in the query, e.g. `synthetic:?width=320&height=240&fps=10`).

Live sources (network, webcam) read in a decode thread into a bounded queue that drops the oldest
frame when the consumer falls behind (counted in `dropped`); a lost connection, an end of stream or a
read timeout moves them to `reconnecting`, and they reconnect with exponential backoff. Files and the
synthetic source are read on demand (nothing is dropped), as fast as possible or at their own pace.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from mixmalmm.streamer.frames import Frame, FrameSampler
from mixmalmm.streamer.redact import redact_text, redact_uri
from mixmalmm.streamer.synthetic import synthetic_rgb

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https")
#: RTSP transports (`transport=`): "auto" asks for TCP, then for UDP when the server refuses TCP.
RTSP_TRANSPORTS = ("auto", "tcp", "udp")


def _seconds(value: str) -> float:
    seconds = float(value)
    if not (math.isfinite(seconds) and 0.001 <= seconds <= 86400):
        raise ValueError(value)
    return seconds


_LIVE_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "auto": None}


def _live(value: str) -> bool | None:
    return _LIVE_WORDS[value.lower()]  # KeyError: not one of the words


#: Options a network URI may carry after '#': name -> (conversion, what a value must be).
URI_OPTIONS = {
    "transport": (str, "auto, tcp or udp"),
    "live": (_live, "1 (a stream), 0 (a file) or auto"),
    "poll_s": (_seconds, "a number of seconds from 0.001 to 86400"),
    "open_timeout": (_seconds, "a number of seconds from 0.001 to 86400"),
    "read_timeout": (_seconds, "a number of seconds from 0.001 to 86400"),
}
#: Options of `synthetic:?...`, SyntheticSource's: name -> (conversion, what a value must be).
SYNTHETIC_OPTIONS = {
    "width": (int, "an integer"), "height": (int, "an integer"), "fps": (float, "a number"),
    "num_frames": (int, "an integer"), "scene_length": (int, "an integer"),
}
# Demuxers without a clock of their own (FFmpeg counts frames at a fixed 25/s): live frames are
# stamped with their arrival time instead.
_NO_CLOCK_FORMATS = frozenset({"mpjpeg", "mjpeg", "image2", "image2pipe", "jpeg_pipe", "png_pipe", "webp_pipe",
                               "bmp_pipe"})
# Demuxers that read one picture per request (a camera's snapshot URL): polled at `poll_s`.
_SNAPSHOT_FORMATS = frozenset({"image2", "jpeg_pipe", "png_pipe", "webp_pipe", "bmp_pipe"})
# A reconnected live HLS session starts a few segments back (a live playlist holds some 3-10 segments of
# 2-10 s): frames of a new session at most this many seconds older than the newest frame seen (source
# time) are repeats and skipped. Short, so that a publisher whose clock restarted near 0 loses little.
_HLS_REPEAT_WINDOW_S = 60.0
# Frame arrivals a live source without a clock measures its rate over.
_RATE_WINDOW = 32
# Frame interval assumed when a source reports no frame rate, seconds.
_DEFAULT_FPS = 25.0
# A file whose demuxer fails this many times in a row without yielding a packet is given up.
_MAX_CONSECUTIVE_DEMUX_ERRORS = 32
_INTERPOLATIONS_CV2 = {
    "POINT": cv2.INTER_NEAREST,
    "BILINEAR": cv2.INTER_LINEAR,
    "FAST_BILINEAR": cv2.INTER_LINEAR,
    "BICUBIC": cv2.INTER_CUBIC,
    "AREA": cv2.INTER_AREA,
    "LANCZOS": cv2.INTER_LANCZOS4,
}


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message names the source. `uri` is the source, as shown
    (credentials redacted)."""

    def __init__(self, message: str, uri: str):
        super().__init__(message)
        self.uri = uri


class SourceState(str, Enum):
    """Where a source is in its life.

    connecting -> live -> (reconnecting -> live)* -> ended | failed | closed.
    `ended`: a file or finite source ran out; `failed`: gave up (error in `last_error`);
    `closed`: `close()` was called.
    """

    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass
class SourceStats:
    """A snapshot of a source's counters (see `Source.stats`).

    Attributes:
        state: the current `SourceState`.
        frames: frames produced (after stride / target-rate selection), dropped ones included.
        dropped: frames dropped by the bounded queue because the consumer fell behind.
        decode_errors: packets the decoder or demuxer rejected (skipped, not fatal).
        disconnects: live sessions lost (error, read timeout, or end of stream).
        reconnects: successful reconnections after a disconnect.
        connect_failures: connection attempts that failed (each is retried after a backoff, until
            `max_attempts` in a row have failed).
        last_error: the most recent error or disconnect reason, or None (credentials redacted).
    """

    state: SourceState = SourceState.CONNECTING
    frames: int = 0
    dropped: int = 0
    decode_errors: int = 0
    disconnects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    last_error: str | None = None


class FrameQueue:
    """A bounded FIFO between a decode thread and its consumer.

    With `drop_oldest` a full queue discards its oldest item to make room (live sources never back
    up); otherwise `put` blocks until there is room (file replay loses nothing); a source that turns out
    to be a file may change it. `close()` wakes everyone: later puts are ignored, `get` drains what is
    left and then returns `FrameQueue.END`.
    """

    END = object()

    def __init__(self, maxsize: int, drop_oldest: bool):
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        self._items: collections.deque = collections.deque()
        self._maxsize = maxsize
        self.drop_oldest = drop_oldest
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item: Any) -> int:
        """Append `item`; returns how many items were dropped to make room (0 or 1)."""
        with self._cond:
            dropped = 0
            while len(self._items) >= self._maxsize and not self._closed:
                if self.drop_oldest:
                    self._items.popleft()
                    dropped += 1
                else:
                    self._cond.wait()
            if self._closed:
                return dropped
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; `END` once closed and empty. Raises TimeoutError after `timeout` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                raise TimeoutError(f"no frame within {timeout} s")
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return FrameQueue.END

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class _Clock:
    """Turns raw per-session timestamps (seconds, possibly None) into strictly increasing pts.

    The first session keeps the source's own time (`keep_source_time`, files) or starts at 0 (live).
    A frame without a timestamp gets the previous pts plus one frame interval. A new session (a
    reconnect) continues the clock after the wall-clock time that passed since the last frame.
    """

    def __init__(self, keep_source_time: bool):
        self.keep_source_time = keep_source_time
        self._offset: float | None = None
        self._last: float | None = None
        self._last_wall = 0.0

    def new_session(self) -> None:
        self._offset = None

    def stamp(self, raw: float | None, interval: float, now: float) -> float:
        """pts in seconds for a frame with raw timestamp `raw` (seconds or None) decoded at `now`."""
        if self._last is None:
            expected = 0.0
        elif self._offset is None:  # first frames of a reconnected session: real time went on
            expected = self._last + max(interval, now - self._last_wall)
        else:
            expected = self._last + interval
        if raw is None:
            out = expected
        else:
            if self._offset is None:
                target = raw if self._last is None and self.keep_source_time else expected
                self._offset = target - raw
            out = raw + self._offset
        if self._last is not None and out <= self._last:
            out = self._last + 1e-6  # duplicate or backwards timestamps: keep pts strictly increasing
        self._last, self._last_wall = out, now
        return out


class Source:
    """Base of all sources: an iterable of `Frame` with a state machine and counters.

    Subclasses implement `_produce()` (yields `(raw_pts_seconds_or_None, payload)`, calling
    `self._clock.new_session()` at each new connection) and `_to_rgb(payload)` ([H, W, 3] uint8),
    which runs only for frames kept by the stride / target-rate selection.

    `uri` is the source as shown in messages and stats, its credentials redacted (`redact.redact_uri`);
    subclasses connect with `self._uri`, the URI as given.

    A source is read once, by iterating it or by `read(timeout)`; `close()` it (or use it as a
    context manager) to stop. With `queue_size > 0` the frames are produced by a daemon thread into a
    `FrameQueue` (drop-oldest for live sources, blocking otherwise); with 0 they are produced in the
    caller's thread.
    """

    live = False

    def __init__(
        self,
        uri: str,
        *,
        stride: int = 1,
        target_fps: float | None = None,
        realtime: bool = False,
        queue_size: int = 0,
        drop_oldest: bool | None = None,
    ):
        self.uri = redact_uri(uri)
        self._uri = uri
        self._selector = FrameSampler(stride, target_fps)
        self._realtime = realtime
        self._queue_size = int(queue_size)
        if self._queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self._drop_oldest = self.live if drop_oldest is None else drop_oldest
        self._clock = _Clock(keep_source_time=not self.live)
        self._nominal_fps: float | None = None
        self._stats = SourceStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._iterated = False
        self._thread: threading.Thread | None = None
        self._generator: Iterator[Frame] | None = None
        self._queue: FrameQueue | None = None
        self._failure: list[BaseException] = []
        self._running = False  # a thread is inside _run (producing frames)

    # -- public ---------------------------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        return self._stats.state

    @property
    def fps(self) -> float | None:
        """Rate of the frames this source yields, frames per second (None until known)."""
        if self._nominal_fps is None:
            return None
        rate = self._nominal_fps / self._selector.step
        if self._selector.fps is not None:
            rate = min(rate, self._selector.fps)
        return rate

    @property
    def stats(self) -> SourceStats:
        """A consistent copy of the counters and state."""
        with self._lock:
            return replace(self._stats)

    def __iter__(self) -> Iterator[Frame]:
        if self._iterated:
            raise RuntimeError(f"source '{self.uri}' is already being read; open it again to restart")
        self._iterated = True
        if self._queue_size == 0:
            self._generator = self._run()
            return self._generator
        return self._iterate_queue()

    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None once the source has ended (an error the source ended on is
        raised once, first). For a threaded source (`queue_size > 0`) waits at most `timeout`
        seconds and raises TimeoutError, so a caller can poll; otherwise `timeout` is ignored.
        Do not mix with iterating the same source.
        """
        if self._queue_size == 0:
            if self._generator is None:
                self._iterated = True
                self._generator = self._run()
            return next(self._generator, None)
        self._start_thread()
        item = self._queue.get(timeout)
        if item is FrameQueue.END:
            if self._failure:
                raise self._failure.pop()
            return None
        return item

    def close(self) -> None:
        """Stop reading and release the decoder or connection (waits up to a read timeout)."""
        with self._lock:  # against _start_thread: it starts no thread once this is set
            self._stop.set()
        if self._queue is not None:
            self._queue.close()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30.0)
        if self._generator is not None and self._queue_size == 0:
            # ValueError: it is running in another thread, which sees the stop flag and cleans up.
            with contextlib.suppress(ValueError):
                self._generator.close()
        if not self._running:  # never free the decoder under a thread still using it
            self._release()
        with self._lock:
            if self._stats.state not in (SourceState.ENDED, SourceState.FAILED):
                self._stats.state = SourceState.CLOSED

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, state={self.state.value})"

    # -- for subclasses -------------------------------------------------------------------------

    def _produce(self) -> Iterator[tuple[float | None, Any]]:
        raise NotImplementedError

    def _to_rgb(self, payload: Any) -> np.ndarray:
        raise NotImplementedError

    def _release(self) -> None:
        """Free what `__init__` opened (called by `close()`)."""

    def _set_state(self, state: SourceState) -> None:
        with self._lock:
            self._stats.state = state

    def _count(self, field: str, n: int = 1, error: str | None = None) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + n)
            if error is not None:
                self._stats.last_error = error

    def _describe(self, exc: BaseException) -> str:
        """`exc`'s message as it may be shown: FFmpeg's messages echo the URL, credentials included."""
        return redact_text(str(exc), self._uri)

    def _frame_interval(self) -> float:
        return 1.0 / (self._nominal_fps or _DEFAULT_FPS)

    # -- the frame loop -------------------------------------------------------------------------

    def _run(self) -> Iterator[Frame]:
        """Frames in the caller's thread: clock, selection, conversion, pacing, counters."""
        index = 0
        pace_origin: tuple[float, float] | None = None  # (pts, wall) of the first paced frame
        self._running = True
        try:
            for raw_pts, payload in self._produce():
                if self._stop.is_set():
                    break
                now = time.time()
                pts = self._clock.stamp(raw_pts, self._frame_interval(), now)
                if not self._selector.keep(pts):
                    continue
                if self._realtime and not self.live:
                    if pace_origin is None:
                        pace_origin = (pts, time.monotonic())
                    delay = pace_origin[1] + (pts - pace_origin[0]) - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                    now = time.time()
                frame = Frame(self._to_rgb(payload), pts, index, now)
                index += 1
                self._count("frames")
                yield frame
        except Exception as exc:
            with self._lock:
                self._stats.state = SourceState.FAILED
                self._stats.last_error = str(exc)
            raise
        finally:
            self._running = False
        with self._lock:
            if self._stop.is_set():
                self._stats.state = SourceState.CLOSED
            elif self._stats.state != SourceState.FAILED:
                self._stats.state = SourceState.ENDED

    def _start_thread(self) -> None:
        """Start the decode thread feeding the bounded queue (once)."""
        if self._thread is not None:
            return
        queue = self._queue = FrameQueue(self._queue_size, self._drop_oldest)

        def work() -> None:
            try:
                for frame in self._run():
                    dropped = queue.put(frame)
                    if dropped:
                        self._count("dropped", dropped)
            except BaseException as exc:  # handed to the consumer by read()
                self._failure.append(exc)
            finally:
                queue.close()

        thread = threading.Thread(target=work, name=f"source {self.uri}", daemon=True)
        with self._lock:  # close() from another thread sees no thread, or a started one (never joins early)
            if self._stop.is_set():  # closed before the first read: nothing to decode (read() sees the end)
                queue.close()
                return
            self._thread = thread
            thread.start()

    def _iterate_queue(self) -> Iterator[Frame]:
        while (frame := self.read()) is not None:
            yield frame


# ------------------------------------------------------------------------------------------------
# PyAV


def _av_open(uri: str, options: dict[str, str] | None, timeout: tuple[float, float] | None):
    return av.open(uri, mode="r", options=options or {}, timeout=timeout)


def _video_stream(container: Any, uri: str, threads: int) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise SourceError(f"no video stream in '{uri}' (streams: {', '.join(kinds)})", uri)
    stream = container.streams.video[0]
    # Frame-and-slice threading in the decoder; decoded frames still come out in order.
    stream.thread_type = "AUTO"
    if threads:
        stream.thread_count = threads
    return stream


def _stream_fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and 0 < float(rate) < 1000:
            return float(rate)
    return None


def _check_size(size: tuple[int, int] | None, interpolation: str) -> tuple[int, int] | None:
    if interpolation.upper() not in _INTERPOLATIONS_CV2:
        raise ValueError(f"unknown interpolation {interpolation!r}; one of {sorted(_INTERPOLATIONS_CV2)}")
    if size is None:
        return None
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
    return width, height


class _PyAVDecoding:
    """What file and network sources share: the demux/decode loop (decode errors counted and
    skipped) and the conversion to RGB, scaled at decode time by one reused swscale context."""

    def _init_conversion(self, size: tuple[int, int] | None, interpolation: str) -> None:
        self._size = _check_size(size, interpolation)
        self._interpolation = interpolation.upper()
        # One reformatter per source keeps its swscale context (frame.to_ndarray(width=...) would
        # build a new one per frame: half the speed at 640x480).
        self._reformatter = VideoReformatter()

    def _to_rgb(self, payload: Any) -> np.ndarray:
        """An av.VideoFrame as [H, W, 3] uint8 RGB, scaled to `size` = (width, height) if set, turned
        upright by its display matrix (a phone's portrait video is stored sideways with a rotation)."""
        width, height = self._size if self._size is not None else (None, None)
        quarter_turns = round(payload.rotation / 90) % 4  # counter-clockwise, as np.rot90 turns
        if quarter_turns % 2:  # `size` is the upright picture's: scale the stored one to its transpose
            width, height = height, width
        rgb = self._reformatter.reformat(payload, width, height, "rgb24", interpolation=self._interpolation)
        if quarter_turns:
            return np.ascontiguousarray(np.rot90(rgb.to_ndarray(), quarter_turns))
        return rgb.to_ndarray()

    def _decode(self, container: Any, stream: Any, *, demux_errors_fatal: bool):
        """Yields av.VideoFrame in presentation order.

        A packet the decoder rejects is counted in `decode_errors` and skipped. A demuxer error is
        raised when `demux_errors_fatal` (network: it means the connection is gone); otherwise
        (files: corrupt data) it is counted and demuxing resumes, up to a limit.
        """
        packets = container.demux(stream)
        consecutive = 0
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                if demux_errors_fatal:
                    raise
                consecutive += 1
                self._count("decode_errors", error=f"corrupt data in '{self.uri}': {self._describe(exc)}")
                if consecutive >= _MAX_CONSECUTIVE_DEMUX_ERRORS:
                    raise SourceError(
                        f"corrupt data in '{self.uri}': {consecutive} demuxer errors in a row ({self._describe(exc)})",
                        self.uri,
                    ) from exc
                packets = container.demux(stream)
                continue
            consecutive = 0
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                self._count("decode_errors", error=f"decode error in '{self.uri}': {self._describe(exc)}")
                continue
            yield from frames


def _mp4_without_index(path: str) -> bool:
    """True for an ISO media file (MP4, MOV: an 'ftyp' box first) whose top-level boxes hold no 'moov',
    the index a recorder writes when it closes the file (False when it cannot be read)."""
    try:
        return _mp4_boxes_lack_index(path)
    except OSError:
        return False


def _mp4_boxes_lack_index(path: str) -> bool:
    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        offset, kinds = 0, []
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if length == 1 and len(header) == 16:  # a 64-bit size follows
                length = int.from_bytes(header[8:16], "big")
            kinds.append(kind)
            if length < 8:  # 0: the box runs to the end of the file (still being written); else broken
                break
            offset += length
    return bool(kinds) and kinds[0] == b"ftyp" and b"moov" not in kinds


class FileSource(_PyAVDecoding, Source):
    """A video file (any container/codec PyAV decodes), read frame by frame; nothing is dropped.

    Args:
        path: the file.
        realtime: False reads as fast as possible; True paces frames at the file's own rate.
        start, end: the time range to read, seconds of the file's timeline (None: from the start /
            to the end). Reading starts from the key frame before `start`; frames before it are
            decoded but not yielded.
        stride: keep every `stride`-th decoded frame.
        target_fps: then keep at most this many frames per second (MA-LMM extracts at 10 fps).
        size: (width, height) in pixels to scale to at decode time (swscale), None for the
            original size.
        interpolation: swscale's filter for `size`: "BICUBIC", "BILINEAR", "AREA", "POINT",...
        threads: decoder threads (0: FFmpeg's choice).
        queue_size: > 0 decodes in a thread ahead of the consumer, into a blocking queue.

    Raises SourceError at once for a missing file, data that is not a video, or no video stream.
    """

    live = False

    def __init__(
        self,
        path: str | Path,
        *,
        realtime: bool = False,
        start: float | None = None,
        end: float | None = None,
        stride: int = 1,
        target_fps: float | None = None,
        size: tuple[int, int] | None = None,
        interpolation: str = "BICUBIC",
        threads: int = 0,
        queue_size: int = 0,
    ):
        path = str(path)
        super().__init__(path, stride=stride, target_fps=target_fps, realtime=realtime, queue_size=queue_size)
        if start is not None and end is not None and end < start:
            raise ValueError(f"end ({end} s) is before start ({start} s) for '{path}'")
        self._start, self._end = start, end
        self._init_conversion(size, interpolation)
        try:
            is_dir, is_file = Path(path).is_dir(), Path(path).is_file()
        except OSError as exc:  # a name too long for the file system, ...
            raise SourceError(f"cannot open '{path:.200}': {exc.strerror}", path) from exc
        if is_dir:
            raise SourceError(f"'{path}' is a directory, not a video file", path)
        if not is_file:
            raise SourceError(f"no such file: '{path}'", path)
        try:
            self._container = _av_open(path, None, None)
        except av.FFmpegError as exc:
            if getattr(exc, "errno", None) == errno.EACCES:
                raise SourceError(f"cannot read '{path}': permission denied", path) from exc
            if _mp4_without_index(path):
                raise SourceError(
                    f"cannot read '{path}' as video: the MP4 has no index (no 'moov' box), so the file may still "
                    "be recording (an MP4 is readable once its recorder closes it) or was cut short", path
                ) from exc
            raise SourceError(
                f"cannot read '{path}' as video (corrupt or unsupported data): {exc}", path
            ) from exc
        try:
            self._stream = _video_stream(self._container, path, threads)
        except SourceError:
            self._container.close()
            raise
        self._nominal_fps = _stream_fps(self._stream)
        self._duration = self._read_duration()
        self._set_state(SourceState.LIVE)

    @property
    def duration(self) -> float | None:
        """Length of the video stream (or container), seconds, when the file says (also once read)."""
        return self._duration

    def _read_duration(self) -> float | None:
        if self._stream.duration is not None and self._stream.time_base is not None:
            return float(self._stream.duration * self._stream.time_base)
        if self._container.duration is not None:
            return self._container.duration / av.time_base
        return None

    def _produce(self):
        try:
            if self._start:
                offset = int(self._start / self._stream.time_base)
                self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
            for frame in self._decode(self._container, self._stream, demux_errors_fatal=False):
                t = frame.time
                if t is not None and self._start is not None and t < self._start - 1e-6:
                    continue  # decoded from the key frame before `start`
                if t is not None and self._end is not None and t > self._end:
                    return
                yield t, frame
        finally:
            self._container.close()

    def _release(self) -> None:
        self._container.close()


class _LiveSource(Source):
    """Connect, read, and on any loss reconnect with exponential backoff, until closed or failed.

    Subclasses implement `_connect()` (returns a session or raises SourceError for a permanent
    problem, any other exception for a retryable one), `_session_frames(session)` and
    `_disconnect(session)`.
    """

    live = True

    def __init__(
        self,
        uri: str,
        *,
        max_attempts: int | None = None,
        backoff: tuple[float, float] = (0.5, 10.0),
        stride: int = 1,
        target_fps: float | None = None,
        queue_size: int = 8,
        drop_oldest: bool | None = None,
        realtime: bool = False,
    ):
        super().__init__(
            uri,
            stride=stride,
            target_fps=target_fps,
            realtime=realtime,
            queue_size=queue_size,
            drop_oldest=drop_oldest,
        )
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None (unlimited), got {max_attempts}")
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError(
                f"backoff must be (initial, maximum) seconds with 0 < initial <= maximum, got {backoff}"
            )
        self._max_attempts = max_attempts
        self._backoff = (float(backoff[0]), float(backoff[1]))

    def _connect(self) -> Any:
        raise NotImplementedError

    def _session_frames(self, session: Any) -> Iterator[tuple[float | None, Any]]:
        raise NotImplementedError

    def _disconnect(self, session: Any) -> None:
        raise NotImplementedError

    def _ends_at_end_of_stream(self) -> bool:
        """True: an end of stream ends the source (VOD); False: it is a disconnect (live)."""
        return False

    def _poll_interval(self, session: Any) -> float | None:
        """Seconds between requests when `session` delivers one picture per request (a snapshot URL,
        whose end of stream is no disconnect); None for a stream."""
        return None

    def _produce(self):
        failures = 0  # consecutive connection attempts that failed
        connected_before = False
        polled = False  # the last session was one picture of a polled snapshot URL
        while not self._stop.is_set():
            if not polled:
                self._set_state(SourceState.RECONNECTING if connected_before or failures else SourceState.CONNECTING)
            started = time.monotonic()
            try:
                session = self._connect()
            except SourceError:
                raise
            except Exception as exc:
                failures += 1
                reason = self._describe(exc)
                self._count("connect_failures", error=f"cannot connect to '{self.uri}': {reason}")
                if polled:  # a snapshot URL that stopped answering is lost like a stream
                    polled = False
                    self._count("disconnects")
                self._set_state(SourceState.RECONNECTING)  # a failed first attempt too: it is retried
                if self._max_attempts is not None and failures >= self._max_attempts:
                    raise SourceError(
                        f"cannot connect to '{self.uri}' after {failures} attempt(s): {reason}", self.uri
                    ) from exc
                self._stop.wait(min(self._backoff[1], self._backoff[0] * 2 ** (failures - 1)))
                continue
            if connected_before and not polled:
                self._count("reconnects")
            connected_before = True
            failures = 0
            if self.live:  # a file read again after an error goes on in its own time
                self._clock.new_session()
            self._set_state(SourceState.LIVE)
            try:
                yield from self._session_frames(session)
                reason = "end of stream"
            except SourceError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {self._describe(exc)}"
            finally:
                self._disconnect(session)
            if self._stop.is_set():
                return
            if reason == "end of stream" and self._ends_at_end_of_stream():
                return
            interval = self._poll_interval(session) if reason == "end of stream" else None
            polled = interval is not None
            if polled:  # the next picture, one interval after this one was asked for
                self._stop.wait(max(0.0, started + interval - time.monotonic()))
                continue
            self._count("disconnects", error=f"'{self.uri}' disconnected ({reason})")
            self._set_state(SourceState.RECONNECTING)
            self._stop.wait(self._backoff[0])


class NetworkSource(_PyAVDecoding, _LiveSource):
    """A network stream through PyAV: RTSP(S), RTMP(S), HTTP(S) (HLS, MJPEG, snapshot URLs too).

    Args:
        url: the stream; an options fragment (`#transport=udp`) is left out of what is opened.
        open_timeout: seconds to wait for the connection and the stream's headers.
        read_timeout: seconds without data before the connection counts as lost (a frozen server
            must not hang the reader).
        max_attempts: consecutive failed connection attempts before the source fails (None:
            unlimited, the default).
        backoff: (initial, maximum) seconds between attempts; doubles after each failure.
        live: True treats an end of stream as a disconnect and reconnects; False (a video on demand)
            ends there, paced like a file with `realtime`. None (the default): RTSP and RTMP are live;
            an HTTP resource is a file when its container reports a duration (an MP4, a finished HLS
            playlist), decided at the first connection; a live HLS playlist, MJPEG or a snapshot URL is
            live.
        transport: for rtsp://, "tcp" or "udp" (RTP over it), or "auto" (default): TCP, then UDP when
            the server refuses TCP (many cameras offer UDP only); the one that worked is asked first
            on every reconnection.
        poll_s: a URL that answers one picture per request (a camera's snapshot.jpg) is fetched
            again every `poll_s` seconds, without counting a disconnect each time.
        start: for a file, the time of its timeline to begin at, seconds (a resumed replay). A file
            whose connection is lost goes on after its last frame yielded, never repeating one.
        stride, target_fps, size, interpolation, threads: as for `FileSource`.
        queue_size: frames buffered between the decode thread and the consumer; when full the
            oldest is dropped (counted in `dropped`).
        av_options: extra FFmpeg options for `av.open` (override the defaults).
        realtime: with a file (`live` False or detected), pace frames at its own rate as for files;
            a live stream has its own pace and ignores it.

    Frames of a live stream whose container has no clock (MJPEG over HTTP, snapshots: FFmpeg counts
    them at 25/s) carry their arrival time, and `fps` is the rate they arrive at. A reconnected live
    HLS playlist starts a few segments back: frames already yielded are not yielded again.
    """

    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 10.0,
        read_timeout: float = 5.0,
        max_attempts: int | None = None,
        backoff: tuple[float, float] = (0.5, 10.0),
        live: bool | None = None,
        transport: str = "auto",
        poll_s: float = 1.0,
        start: float | None = None,
        realtime: bool = False,
        stride: int = 1,
        target_fps: float | None = None,
        size: tuple[int, int] | None = None,
        interpolation: str = "BICUBIC",
        threads: int = 0,
        queue_size: int = 8,
        av_options: dict[str, str] | None = None,
    ):
        scheme = urlsplit(url).scheme.lower()
        self._detect_live = live is None and scheme in ("http", "https")
        self.live = True if live is None else bool(live)
        super().__init__(
            url,
            max_attempts=max_attempts,
            backoff=backoff,
            stride=stride,
            target_fps=target_fps,
            queue_size=queue_size,
            drop_oldest=self.live,
            realtime=realtime,
        )
        if not (open_timeout > 0 and read_timeout > 0):
            raise ValueError(f"timeouts must be > 0 seconds, got open={open_timeout} read={read_timeout}")
        if transport not in RTSP_TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r} for '{self.uri}': one of {', '.join(RTSP_TRANSPORTS)}")
        if transport != "auto" and not scheme.startswith("rtsp"):
            raise ValueError(f"transport={transport} applies to rtsp:// sources only, not '{self.uri}'")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s}")
        self._url = url.partition("#")[0]
        self._timeout = (float(open_timeout), float(read_timeout))
        self._poll_s = float(poll_s)
        self._init_conversion(size, interpolation)
        self._threads = threads
        micros = str(int(read_timeout * 1e6))
        self._av_options = {"timeout": micros} if scheme.startswith("rtsp") else {"rw_timeout": micros}
        self._av_options.update(av_options or {})
        # RTSP transports to ask for, in order (rtsps:// runs over TLS, so over TCP only).
        self._transports = ["tcp", "udp"] if transport == "auto" and scheme == "rtsp" else [
            "tcp" if transport == "auto" else transport]
        if not scheme.startswith("rtsp") or "rtsp_transport" in self._av_options:
            self._transports = [None]
        self._arrivals: collections.deque[float] = collections.deque(maxlen=_RATE_WINDOW)
        self._newest_hls: float | None = None  # source time of the newest HLS frame yielded
        # A file's frames before this time (seconds of its timeline) are skipped: `start`, then just after
        # the last frame yielded.
        self._file_from = None if start is None else start - 1e-6

    @property
    def transport(self) -> str | None:
        """The RTSP transport asked for first ("tcp" or "udp": after a fallback, the one that worked);
        None for other schemes."""
        return self._transports[0]

    def _ends_at_end_of_stream(self) -> bool:
        return not self.live

    def _poll_interval(self, session) -> float | None:
        return self._poll_s if session[0].format.name in _SNAPSHOT_FORMATS else None

    def _open(self):
        """The container, asking for each RTSP transport in turn while the server refuses it."""
        for k, transport in enumerate(self._transports):
            options = dict(self._av_options)
            if transport is not None:
                options["rtsp_transport"] = transport
            try:
                container = _av_open(self._url, options, self._timeout)
            except av.FFmpegError as exc:
                if exc.errno != errno.EPROTONOSUPPORT or transport is None:
                    raise
                if k == len(self._transports) - 1:
                    other = "udp" if transport == "tcp" else "tcp"
                    raise ConnectionError(f"the server refuses RTSP over {transport.upper()} ({exc}); "
                                          f"add #transport={other} or #transport=auto to the URI") from exc
                continue  # "461 Unsupported Transport": ask for the next one
            if k:  # remembered: reconnections ask for what worked first
                self._transports.insert(0, self._transports.pop(k))
            return container
        raise AssertionError("no transport to try")  # _transports is never empty

    def _connect(self):
        started = time.monotonic()
        try:
            container = self._open()
        except (av.error.InvalidDataError, av.error.TimeoutError, av.error.ExitError) as exc:
            waited = time.monotonic() - started
            if waited >= 0.9 * self._timeout[1]:  # what FFmpeg says of a silent server does not say that
                raise TimeoutError(f"no answer within {waited:.1f} s ({exc})") from exc
            raise
        try:
            stream = _video_stream(container, self.uri, self._threads)
        except SourceError:
            container.close()
            raise
        fmt = container.format.name
        if self._detect_live:  # decided once, at the first connection
            self._detect_live = False
            if fmt not in _SNAPSHOT_FORMATS and container.duration is not None:
                self._become_file()
        self._nominal_fps = None if self.live and fmt in _NO_CLOCK_FORMATS else _stream_fps(stream)
        return container, stream

    def _become_file(self) -> None:
        """An HTTP resource with a duration: a file (blocking queue, its own timestamps, ends)."""
        self.live = False
        self._drop_oldest = False
        self._clock.keep_source_time = True
        if self._queue is not None:
            self._queue.drop_oldest = False

    def _session_frames(self, session):
        container, stream = session
        fmt = container.format.name
        if self.live and fmt in _NO_CLOCK_FORMATS:
            for frame in self._decode(container, stream, demux_errors_fatal=True):
                now = time.monotonic()
                self._arrivals.append(now)
                if len(self._arrivals) > 1 and self._arrivals[-1] > self._arrivals[0]:
                    self._nominal_fps = (len(self._arrivals) - 1) / (self._arrivals[-1] - self._arrivals[0])
                yield now, frame
            return
        if not self.live and self._file_from:
            with contextlib.suppress(av.FFmpegError):  # a link that cannot seek is read from its start
                container.seek(int(self._file_from / stream.time_base), stream=stream, backward=True)
        repeats = self.live and fmt == "hls" and self._newest_hls is not None
        for frame in self._decode(container, stream, demux_errors_fatal=True):
            t = frame.time
            if not self.live and t is not None:  # a file: where it resumes after a lost connection
                if self._file_from is not None and t < self._file_from:
                    continue
                self._file_from = t + 1e-6
            if repeats:  # the first frames of a reconnected live playlist: skip what was yielded already
                if t is not None and self._newest_hls - _HLS_REPEAT_WINDOW_S < t <= self._newest_hls:
                    continue
                repeats = False
            if fmt == "hls" and t is not None:
                self._newest_hls = t
            yield t, frame

    def _disconnect(self, session) -> None:
        session[0].close()


class OpenCVSource(_LiveSource):
    """A camera through OpenCV (`webcam:0`, `/dev/video0`), live with reconnects.

    Any target `cv2.VideoCapture` accepts works (an int device index or a path); frames carry
    the wall-clock time since the first frame as pts, since cameras rarely report one.
    Raises SourceError at once when the device cannot be opened the first time (camera not
    present); a camera lost later is reopened with backoff like any live source.

    Args as for `NetworkSource`; `open_timeout`/`read_timeout` reach OpenCV's backends that honour
    them (FFmpeg, V4L2 partly); `realtime` is accepted and ignored (a camera has its own pace).
    """

    def __init__(
        self,
        target: int | str,
        *,
        uri: str | None = None,
        open_timeout: float = 10.0,
        read_timeout: float = 5.0,
        max_attempts: int | None = None,
        backoff: tuple[float, float] = (0.5, 10.0),
        stride: int = 1,
        target_fps: float | None = None,
        size: tuple[int, int] | None = None,
        interpolation: str = "AREA",
        queue_size: int = 8,
        realtime: bool = False,
    ):
        uri = uri if uri is not None else str(target)
        super().__init__(
            uri,
            max_attempts=max_attempts,
            backoff=backoff,
            stride=stride,
            target_fps=target_fps,
            queue_size=queue_size,
        )
        self._target = target
        self._size = _check_size(size, interpolation)
        self._cv_interpolation = _INTERPOLATIONS_CV2[interpolation.upper()]
        self._params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(open_timeout * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(read_timeout * 1000),
        ]
        self._origin: float | None = None
        self._pending = self._open()
        if self._pending is None:
            raise SourceError(
                f"camera '{uri}' is not present or cannot be opened (cv2.VideoCapture({target!r}) failed)",
                uri,
            )

    def _open(self) -> cv2.VideoCapture | None:
        capture = cv2.VideoCapture(self._target, cv2.CAP_ANY, self._params)
        if not capture.isOpened():
            capture.release()
            return None
        fps = capture.get(cv2.CAP_PROP_FPS)
        if 0 < fps < 1000:
            self._nominal_fps = float(fps)
        return capture

    def _connect(self) -> cv2.VideoCapture:
        capture, self._pending = self._pending, None
        if capture is None:
            capture = self._open()
        if capture is None:
            raise ConnectionError(f"cv2.VideoCapture({self._target!r}) could not open the device")
        return capture

    def _session_frames(self, session: cv2.VideoCapture):
        while not self._stop.is_set():
            ok, bgr = session.read()
            if not ok:
                return  # the device stopped delivering: a disconnect
            now = time.monotonic()
            if self._origin is None:
                self._origin = now
            yield now - self._origin, bgr

    def _disconnect(self, session: cv2.VideoCapture) -> None:
        session.release()

    def _release(self) -> None:
        if self._pending is not None:
            self._pending.release()
            self._pending = None

    def _to_rgb(self, payload: np.ndarray) -> np.ndarray:
        if self._size is not None:
            payload = cv2.resize(payload, self._size, interpolation=self._cv_interpolation)
        return cv2.cvtColor(payload, cv2.COLOR_BGR2RGB)


class SyntheticSource(Source):
    """A deterministic generated video (see `synthetic.synthetic_rgb`) for demos and tests.

    Args:
        width, height: frame size, pixels.
        fps: frame rate, frames per second; frame i has pts i / fps.
        num_frames: how many frames before the source ends (None: endless).
        scene_length: frames per scene (scene cuts every `scene_length` frames).
        realtime: pace frames at `fps` instead of producing them as fast as possible.
        stride, target_fps, queue_size: as for `FileSource`.
    """

    def __init__(
        self,
        width: int = 320,
        height: int = 240,
        fps: float = 10.0,
        num_frames: int | None = None,
        scene_length: int = 50,
        *,
        realtime: bool = False,
        stride: int = 1,
        target_fps: float | None = None,
        queue_size: int = 0,
        uri: str = "synthetic:",
    ):
        super().__init__(uri, stride=stride, target_fps=target_fps, realtime=realtime, queue_size=queue_size)
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if scene_length < 1:
            raise ValueError(f"scene_length must be >= 1, got {scene_length}")
        if width < 8 or height < 8:
            raise ValueError(f"synthetic frames need at least 8x8 pixels, got {width}x{height}")
        self._width, self._height = int(width), int(height)
        self._num_frames = num_frames
        self._scene_length = int(scene_length)
        self._nominal_fps = float(fps)
        self._set_state(SourceState.LIVE)

    def _produce(self):
        i = 0
        while self._num_frames is None or i < self._num_frames:
            yield i / self._nominal_fps, i
            i += 1

    def _to_rgb(self, payload: int) -> np.ndarray:
        return synthetic_rgb(payload, self._width, self._height, self._scene_length)


class FramesSource(Source):
    """Frames already decoded and chosen, replayed as a file is (nothing dropped; it ends).

    For evaluation on MA-LMM's datasets: MA-LMM's frame sampling decides which frames a stream sees,
    and the engine ingests them as it ingests any file (`Engine.add_stream(..., source=...)`). No URI
    opens it.

    Args:
        frames: RGB uint8 [T, H, W, 3] (or T arrays [H, W, 3]).
        times: T timestamps in seconds, non-decreasing (equal ones, a frame sampled twice, are moved
            1 µs apart by the clock as any source's are).
        uri: how messages name it.
        stride, target_fps, realtime, queue_size: as for `FileSource`.
    """

    live = False

    def __init__(
        self,
        frames,
        times,
        *,
        uri: str = "frames:",
        realtime: bool = False,
        stride: int = 1,
        target_fps: float | None = None,
        queue_size: int = 0,
    ):
        super().__init__(uri, stride=stride, target_fps=target_fps, realtime=realtime, queue_size=queue_size)
        frames, times = list(frames), [float(t) for t in times]
        if not frames or len(frames) != len(times):
            raise ValueError(f"'{uri}': need one time per frame and at least one frame, got {len(frames)} "
                             f"frames and {len(times)} times")
        for i, rgb in enumerate(frames):
            if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
                raise ValueError(f"'{uri}': frame {i} is not an [H, W, 3] uint8 RGB image "
                                 f"(got {getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')})")
        if any(not math.isfinite(t) for t in times) or any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"'{uri}': frame times must be finite seconds, never going back, got {times}")
        self._frames, self._times = frames, times
        if len(times) > 1 and times[-1] > times[0]:
            self._nominal_fps = (len(times) - 1) / (times[-1] - times[0])
        self._set_state(SourceState.LIVE)

    def _produce(self):
        yield from ((t, i) for i, t in enumerate(self._times))

    def _to_rgb(self, payload: int) -> np.ndarray:
        return self._frames[payload]


# ------------------------------------------------------------------------------------------------


def _parse_options(query: str, kinds: dict[str, tuple[Any, str]], uri: str, where: str) -> dict[str, Any]:
    """`a=1&b=x` -> {"a": 1, "b": "x"}, each value converted by its option's kind; SourceError naming an
    unknown option or a bad value. `uri` is the URI as errors show it (redacted); `where` names the place."""
    out: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in kinds:
            raise SourceError(f"unknown option {key!r:.40} in '{uri:.200}': {where} takes " + ", ".join(kinds), uri)
        convert, wanted = kinds[key]
        try:
            out[key] = convert(value)
        except (ValueError, KeyError, OverflowError):
            raise SourceError(f"bad {key}={value!r:.40} in '{uri:.200}': it must be {wanted}", uri) from None
    return out


def open_source(uri: str | Path, **options: Any) -> Source:
    """Open any source by URI; `options` go to the source class (see each class for its options).

    - a path or `file:///path`             -> FileSource
    - `rtsp(s)://`, `rtmp(s)://`, `http(s)://` -> NetworkSource; options after '#' override
      `options`: `transport=auto|tcp|udp`, `live=auto|1|0`, `poll_s=S`, `open_timeout=S`,
      `read_timeout=S` (e.g. `rtsp://cam/stream#transport=udp`)
    - `webcam:N`, `/dev/videoN`           -> OpenCVSource (camera N)
    - `synthetic:?width=W&height=H&fps=F&num_frames=N&scene_length=S` -> SyntheticSource

    Raises SourceError naming the source for an unknown scheme or URI option, a missing file, data that
    is not a video, no video stream, or a camera that is not present.
    """
    if isinstance(uri, Path):
        return FileSource(uri, **options)
    text = str(uri)
    if text.startswith("/dev/video"):
        return OpenCVSource(text, uri=text, **options)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and text[1:3] in (":\\", ":/")):  # a path (a drive letter)
        return FileSource(text, **options)
    if scheme == "file":
        return FileSource(unquote(parts.path), **options)
    if scheme in NETWORK_SCHEMES:
        uri_options = _parse_options(parts.fragment, URI_OPTIONS, redact_uri(text), "a network URI (after '#')")
        return NetworkSource(text, **{**options, **uri_options})
    if scheme == "webcam":
        device = parts.path or "0"
        if not device.isdigit():
            raise SourceError(f"bad camera in '{text}': use webcam:N with N a device number", text)
        return OpenCVSource(int(device), uri=text, **options)
    if scheme == "synthetic":
        return SyntheticSource(uri=text, **{**_parse_options(parts.query, SYNTHETIC_OPTIONS, text, "synthetic:"), **options})
    shown = redact_uri(text)
    raise SourceError(
        f"unknown scheme '{scheme}' in '{shown}': use a file path, file://, "
        + ", ".join(f"{s}://" for s in NETWORK_SCHEMES)
        + ", webcam:N, /dev/videoN or synthetic:",
        shown,
    )
