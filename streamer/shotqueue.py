"""The bounded queue between a stream's decode thread and the model thread.

Live sources must never back up: when the model falls behind, the oldest waiting Shot is dropped and
counted. File replay loses nothing: the decode thread waits for room instead.

The queue also knows when the model is done with the stream: a Shot stays *unfinished* from `put`
until the model thread, which took it with `get_nowait`, calls `task_done` after stepping it (or
after the step failed), or until a full live queue drops it. "Nothing queued" alone would not do: the
model thread takes a Shot out of the queue before it steps it. `when_drained` fires once nothing is
unfinished.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from .frames import Shot


class ShotQueue:
    """A bounded FIFO of Shots (still uint8 images: the model thread preprocesses them in batches).

    drop_oldest: when full, `put` drops the oldest item (counted in `dropped`) instead of waiting.
    on_put: called after every put (the engine uses it to wake the model thread).
    failures / last_failure: Shots whose `task_done` reported an error, and the last such error.
    """

    def __init__(self, capacity: int, drop_oldest: bool, on_put: Callable[[], None] | None = None):
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self.failures = 0
        self.last_failure: str | None = None
        self._items: collections.deque[Shot] = collections.deque()
        self._cond = threading.Condition()
        self._on_put = on_put
        self._closed = False
        self._unfinished = 0  # put, not dropped, not yet task_done: queued or being stepped
        self._on_drained: Callable[[], None] | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def unfinished(self) -> int:
        """Shots put and neither dropped nor done: queued, or taken and being stepped."""
        with self._cond:
            return self._unfinished

    def put(self, item: Shot, stop: threading.Event | None = None) -> bool:
        """Add an item; returns False when the queue was closed (or `stop` set) while waiting for room."""
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                if self.drop_oldest:
                    self._items.popleft()
                    self.dropped += 1
                    self._unfinished -= 1
                    break
                self._cond.wait(timeout=0.1)
                if stop is not None and stop.is_set():
                    return False
            if self._closed:
                return False
            self._items.append(item)
            self._unfinished += 1
        if self._on_put is not None:
            self._on_put()
        return True

    def get_nowait(self) -> Shot | None:
        """The oldest item, or None; the caller must call `task_done` once it is done with it."""
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def task_done(self, error: str | None = None) -> None:
        """A Shot taken with `get_nowait` was stepped (error None) or could not be (error: why)."""
        with self._cond:
            if self._unfinished <= len(self._items):
                raise ValueError("task_done() called for more Shots than were taken")
            self._unfinished -= 1
            if error is not None:
                self.failures += 1
                self.last_failure = error
            callback = self._drained_callback()
        if callback is not None:
            callback()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once, as soon as no Shot is queued or being stepped: now if none is
        (in this thread), else in the thread whose `task_done` finishes the last one."""
        with self._cond:
            self._on_drained = callback
            callback = self._drained_callback()
        if callback is not None:
            callback()

    def _drained_callback(self) -> Callable[[], None] | None:
        """The drained callback to call now (taken: it fires once), or None; under `_cond`."""
        if self._unfinished or self._on_drained is None:
            return None
        callback, self._on_drained = self._on_drained, None
        return callback

    def close(self) -> None:
        """Wake and refuse writers; what is queued can still be read."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
