"""The bench's RoomQueue: FrameQueue's queueing and drop policy unchanged, plus a wait for room per camera."""

from __future__ import annotations

import time

import numpy as np

from linewatch.service.frames import Frame
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.tools.bench.sources import RoomQueue


def frame(cam: str, seq: int) -> Frame:
    return Frame(cam, seq, time.time(), time.monotonic(), np.zeros((8, 8, 3), np.uint8), (8, 8), (0, 0, 8, 8))


def test_room_queue_drops_like_frame_queue_and_has_room_again_once_its_camera_s_frame_is_taken():
    metrics = Metrics()
    q = RoomQueue(2, metrics)
    q.put(frame("b", 0))
    for seq in range(2):
        assert q.put(frame("a", seq)) is None
    assert (q.depth("a"), q.depth("b"), q.depth("c"), len(q)) == (2, 1, 0, 3)
    assert not q.wait_for_room("a", 0.0) and q.wait_for_room("b", 0.0) and q.wait_for_room("c", 0.0)

    dropped = q.put(frame("a", 2))  # full: the oldest of camera a goes, counted; b's frame stays
    assert dropped is not None and (dropped.camera, dropped.sequence) == ("a", 0)
    assert metrics.by_label(metrics.dropped, "reason").get("queue_full") == 1

    [taken] = q.get_batch(1, 0.0, 1.0)  # oldest across cameras: b's, so a is still full
    assert (taken.camera, taken.sequence) == ("b", 0)
    assert not q.wait_for_room("a", 0.0)
    [taken] = q.get_batch(1, 0.0, 1.0)
    assert (taken.camera, taken.sequence) == ("a", 1) and q.wait_for_room("a", 0.0)
    assert [f.sequence for f in q.drain()] == [2] and q.depth("a") == 0
