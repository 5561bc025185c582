"""The bounded queue between a stream's decode thread and the model thread.

Live sources must never back up: when the model falls behind, the oldest waiting Shot is dropped and
counted. File replay loses nothing: the decode thread waits for room instead.
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
    """

    def __init__(self, capacity: int, drop_oldest: bool, on_put: Callable[[], None] | None = None):
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self._items: collections.deque[Shot] = collections.deque()
        self._cond = threading.Condition()
        self._on_put = on_put
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: Shot, stop: threading.Event | None = None) -> bool:
        """Add an item; returns False when the queue was closed (or `stop` set) while waiting for room."""
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                if self.drop_oldest:
                    self._items.popleft()
                    self.dropped += 1
                    break
                self._cond.wait(timeout=0.1)
                if stop is not None and stop.is_set():
                    return False
            if self._closed:
                return False
            self._items.append(item)
        if self._on_put is not None:
            self._on_put()
        return True

    def get_nowait(self) -> Shot | None:
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Wake and refuse writers; what is queued can still be read."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
