"""Part deadlines (linewatch.service.deadlines) on a fake clock, and their hooks in the worker and FrameQueue."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from linewatch.messages import decode, encode_verdict
from linewatch.service.config import CameraConfig
from linewatch.service.deadlines import DeadlineTracker, Part, part_id
from linewatch.service.frames import Frame, FrameQueue


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def frame(seq: int, cam: str = "a", at: float = 100.0, frame_id: int | None = None) -> Frame:
    return Frame(cam, seq, 1_700_000_000.0 + seq, at, np.zeros((4, 4, 3), np.uint8), (64, 48), (0, 0, 64, 48),
                 ref=f"{seq}", frame_id=frame_id, device_time=None if frame_id is None else 10 * frame_id)


def tracker(clock: Clock, deadlines: dict[str, float | None] | None = None, **kw) -> tuple[DeadlineTracker, list[Part]]:
    fired: list[Part] = []
    t = DeadlineTracker(deadlines if deadlines is not None else {"a": 0.5}, on_timeout=fired.append, clock=clock,
                        **kw)
    return t, fired


def test_in_time_verdict_settles_and_nothing_fires():
    clock = Clock()
    t, fired = tracker(clock)
    t.register(frame(0))
    clock.t += 0.4
    assert t.settle(frame(0)) is True
    clock.t += 10
    assert t.expire() == 0
    assert fired == [] and t.pending == 0


def test_part_past_its_deadline_times_out_once_and_its_late_verdict_is_refused():
    clock = Clock()
    t, fired = tracker(clock)
    t.register(frame(0, frame_id=77))
    t.register(frame(1, at=100.3))
    clock.t = 100.51
    assert t.expire() == 1  # only frame 0 is due (frame 1's deadline is 100.8)
    assert [(p.sequence, p.part_id, p.reason, p.device_time) for p in fired] == [(0, 77, "deadline", 770)]
    assert t.settle(frame(0, frame_id=77)) is False  # late: the timeout verdict stands
    assert t.settle(frame(1, at=100.3)) is True
    assert len(fired) == 1 and t.timed_out == 1


def test_due_part_settled_before_the_timer_ran_still_times_out():
    """The deadline decides, not which thread runs first: a verdict after the deadline is late even when the
    timer thread has not expired the part yet; the timeout verdict goes out then."""
    clock = Clock()
    t, fired = tracker(clock)
    t.register(frame(0))
    clock.t = 100.6
    assert t.settle(frame(0)) is False
    assert [p.sequence for p in fired] == [0]
    assert t.expire() == 0 and t.pending == 0


def test_deadline_counts_from_capture_not_from_registration():
    clock = Clock(t=105.0)
    t, fired = tracker(clock)
    t.register(frame(0, at=104.0))  # captured 1 s ago, deadline 0.5 s: due already
    assert t.expire() == 1 and fired[0].sequence == 0


def test_bounded_oldest_part_times_out_when_full():
    clock = Clock()
    t, fired = tracker(clock, max_pending=3)
    for seq in range(5):
        t.register(frame(seq))
    assert t.pending == 3
    assert [(p.sequence, p.reason) for p in fired] == [(0, "overflow"), (1, "overflow")]
    assert t.settle(frame(0)) is False and t.settle(frame(4)) is True


def test_close_times_out_every_pending_part_and_later_ones():
    clock = Clock()
    t, fired = tracker(clock)
    t.register(frame(0))
    t.register(frame(1))
    assert t.close() == 2
    assert [(p.sequence, p.reason) for p in fired] == [(0, "shutdown"), (1, "shutdown")]
    t.register(frame(2))  # a frame queued during shutdown is not forgotten either
    assert [p.sequence for p in fired][-1] == 2


def test_cameras_without_deadline_or_trigger_are_not_tracked():
    clock = Clock()
    t, fired = tracker(clock, {"a": 0.5, "b": None})
    assert t.triggered("a") and t.triggered("b") and not t.triggered("c")
    t.register(frame(0, cam="b"))
    t.register(frame(0, cam="c"))
    clock.t += 100
    assert t.expire() == 0 and t.pending == 0
    assert t.settle(frame(0, cam="b")) is True and t.settle(frame(0, cam="c")) is True


def test_for_cameras_builds_from_config():
    cams = [CameraConfig(name="a", source="dir:///x", trigger="hardware", verdict_deadline_ms=250),
            CameraConfig(name="b", source="dir:///x", trigger="hardware"),
            CameraConfig(name="c", source="dir:///x")]
    t = DeadlineTracker.for_cameras(cams)
    assert t is not None and t.deadlines_s == {"a": 0.25, "b": None} and t.has_deadlines
    assert DeadlineTracker.for_cameras(cams[2:]) is None


def test_part_id_is_the_camera_frame_id_else_the_sequence():
    assert part_id(frame(5, frame_id=900)) == 900
    assert part_id(frame(5)) == 5


def test_a_failing_callback_does_not_stop_the_others():
    clock = Clock()
    seen = []

    def cb(p: Part) -> None:
        seen.append(p.sequence)
        if p.sequence == 0:
            raise RuntimeError("boom")

    t = DeadlineTracker({"a": 0.1}, on_timeout=cb, clock=clock)
    t.register(frame(0))
    t.register(frame(1))
    clock.t += 1
    assert t.expire() == 2 and seen == [0, 1]


def test_timer_thread_fires_on_the_real_clock():
    done = threading.Event()
    fired: list[Part] = []

    def cb(p: Part) -> None:
        fired.append(p)
        done.set()

    import time

    t = DeadlineTracker({"a": 0.05}, on_timeout=cb)
    t.start()
    try:
        t.register(frame(0, at=time.monotonic()))
        assert done.wait(5.0), "the timer thread never expired the part"
        assert fired[0].sequence == 0 and fired[0].reason == "deadline"
    finally:
        t.close()


def test_frame_queue_registers_before_queueing():
    clock = Clock()
    t, _ = tracker(clock)
    q = FrameQueue(2)
    seen_pending = []
    q.on_put = lambda f: (t.register(f), seen_pending.append(t.pending))
    q.put(frame(0))
    assert seen_pending == [1] and len(q) == 1


# ------------------------------------------------------------------ the worker's side


class _Cal:
    image_threshold = 1.0
    pixel_threshold = 1.0

    def is_fail(self, s: float) -> bool:
        return s > 1.0

    def p_value(self, s: float) -> float:
        return 0.5


class _Det:
    input_size = (4, 4)
    device = "cpu"
    model_id = "m1"
    calibration = _Cal()

    def predict(self, batch):  # the worker inspects it; these tests call _verdict directly
        raise AssertionError("not called")


def _worker(t: DeadlineTracker, published: list):
    from linewatch.service.telemetry.prometheus import Metrics
    from linewatch.service.worker import InferenceWorker

    metrics = Metrics()
    metrics.init_cameras(["a"])
    q = FrameQueue(8, metrics)
    w = InferenceWorker(_Det(), q, lambda v, mask, **kw: published.append(v), metrics, max_batch=2, deadlines=t)
    return w, q, metrics


def test_worker_publishes_timeout_verdict_and_withholds_the_late_one():
    clock = Clock()
    t = DeadlineTracker({"a": 0.5}, clock=clock)
    published: list = []
    w, q, metrics = _worker(t, published)
    assert q.on_put is not None  # the worker hooked registration into the queue
    q.put(frame(0, frame_id=41))
    q.put(frame(1, frame_id=42))
    amap = np.zeros((4, 4), np.float32)
    w._verdict(q.get_batch(1, 0, 0)[0], amap, 0.2)  # in time
    clock.t = 101.0
    w._verdict(q.get_batch(1, 0, 0)[0], amap, 0.2)  # late
    assert [(v.sequence, v.verdict, v.timed_out, v.part_id) for v in published] == [
        (0, "pass", False, 41), (1, "fail", True, 42)]
    timeout = published[1]
    assert math.isnan(timeout.score) and timeout.p_value is None and timeout.model_id == "m1"
    assert metrics.parts_timed_out.labels("a")._value.get() == 1
    assert metrics.parts_late.labels("a")._value.get() == 1
    # on the wire: a v1 verdict (fail) with the new optional keys
    back = decode(encode_verdict(timeout))
    assert back.verdict == "fail" and back.timed_out and back.part_id == 42 and back.frame_id == 42
    assert back.device_time == 420


def test_plain_verdict_headers_have_no_part_keys():
    clock = Clock()
    t = DeadlineTracker({"other": 0.5}, clock=clock)
    published: list = []
    w, q, _ = _worker(t, published)
    q.put(frame(0))
    w._verdict(q.get_batch(1, 0, 0)[0], np.zeros((4, 4), np.float32), 0.2)
    import json

    header = json.loads(encode_verdict(published[0])[1])
    assert not {"part_id", "timed_out", "frame_id", "device_time"} & header.keys()


@pytest.mark.parametrize("bad", [
    {"trigger": "software", "fps": 5},  # software trigger on a folder
    {"verdict_deadline_ms": 100},  # a deadline without a trigger
    {"features": {"Gain": 1}},  # features on a non-GenICam source
])
def test_config_refuses_what_the_source_cannot_do(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CameraConfig(name="a", source="dir:///x", **bad)


def test_config_software_trigger_needs_fps_and_feature_names_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fps"):
        CameraConfig(name="a", source="aravis://LW01", trigger="software")
    with pytest.raises(ValidationError, match="GenICam name"):
        CameraConfig(name="a", source="aravis://LW01", features={"Exposure Time": 1})
    ok = CameraConfig(name="a", source="pylon://0815-0000", trigger="software", fps=5, verdict_deadline_ms=200,
                      features={"ExposureTime": 5000, "PixelFormat": "BayerRG8", "ReverseX": True})
    assert ok.kind == "pylon" and ok.features["ReverseX"] is True
