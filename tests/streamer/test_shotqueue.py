"""ShotQueue: a Shot taken by the model thread still counts until the model is done with it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mixmalmm.streamer.frames import Frame, Shot
from mixmalmm.streamer.shotqueue import ShotQueue


def shot(i: int) -> Shot:
    return Shot.of_frame(Frame(np.full((2, 2, 3), i, np.uint8), i / 10, i, 0.0))


def test_a_taken_shot_counts_until_it_is_done_and_drained_fires_once():
    fired = []
    q = ShotQueue(2, drop_oldest=True)
    for i in range(3):  # the third put drops the first Shot: it is no longer unfinished
        assert q.put(shot(i))
    assert (len(q), q.unfinished, q.dropped) == (2, 2, 1)
    q.when_drained(lambda: fired.append(threading.current_thread().name))
    assert q.get_nowait().start == pytest.approx(0.1)
    assert (len(q), q.unfinished, fired) == (1, 2, [])  # out of the queue, not yet stepped
    q.task_done()
    assert q.get_nowait().start == pytest.approx(0.2) and q.get_nowait() is None
    assert (q.unfinished, fired) == (1, [])
    q.task_done("model step failed: boom")
    assert (q.unfinished, q.failures, q.last_failure) == (0, 1, "model step failed: boom")
    assert fired == [threading.current_thread().name]
    with pytest.raises(ValueError, match="more Shots than were taken"):
        q.task_done()
    assert fired == [threading.current_thread().name]  # once
    q.when_drained(lambda: fired.append("again"))  # nothing unfinished: at once
    assert fired[-1] == "again"


def test_task_done_for_a_shot_still_queued_is_refused():
    q = ShotQueue(4, drop_oldest=False)
    q.put(shot(0))
    with pytest.raises(ValueError):
        q.task_done()  # nothing was taken
    assert q.unfinished == 1
