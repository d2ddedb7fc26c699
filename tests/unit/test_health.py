"""The drift monitor: drift gauges and camera conditions (black, frozen, blurred), through the public observe() path."""

import time

import cv2
import numpy as np
import pytest

from linewatch.imaging.images import sharpness
from linewatch.messages import Status, Verdict, decode, encode
from linewatch.service.config import HealthConfig
from linewatch.service.frames import Frame
from linewatch.service.observers.drift import DriftMonitor
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.tools.harness import wait_until

RNG = np.random.default_rng(0)


def texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (3, 3), 0)


def frame(cam: str, seq: int, img: np.ndarray) -> Frame:
    return Frame(camera=cam, sequence=seq, capture_time=time.time(), capture_mono=time.monotonic(), image=img,
                 frame_size=(64, 64), roi=(0, 0, 64, 64))


def verdict(cam: str, seq: int, score: float, fail: bool) -> Verdict:
    return Verdict(camera=cam, sequence=seq, capture_time=time.time(), verdict_time=time.time(),
                   verdict="fail" if fail else "pass", score=score, threshold=1.0, p_value=0.5, model_id="m",
                   frame_width=64, frame_height=64)


@pytest.fixture
def monitor():
    statuses: list[Status] = []
    metrics = Metrics()
    metrics.init_cameras(["cam"])
    baseline = float(np.median([sharpness(texture(i)) for i in range(5)]))
    cfg = HealthConfig(window=20, queue=10_000, frozen_frames=12, bad_frames=5)
    m = DriftMonitor(cfg, metrics, {"median": 0.5, "sharpness_median": baseline}, statuses.append, "run")
    m.start()
    yield m, metrics, statuses
    m.stop()


def feed(m: DriftMonitor, images, start_seq=0, score=0.5, fail=False):
    target = m.checked + len(images)
    for i, img in enumerate(images):
        m.observe(frame("cam", start_seq + i, img), verdict("cam", start_seq + i, score, fail), np.zeros((8, 8)))
    wait_until(lambda: m.checked >= target, 10, what=f"{len(images)} frames checked")


def gauge(metrics: Metrics, name: str, **labels) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return float("nan") if v is None else v


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.02)
    return pred()


def test_black_frozen_blurred_then_ok(monitor):
    m, metrics, statuses = monitor
    feed(m, [texture(i) for i in range(10)])
    assert m.snapshot()["cam"]["condition"] == "ok"

    feed(m, [np.zeros((64, 64, 3), np.uint8)] * 4, 10)
    assert m.snapshot()["cam"]["condition"] == "ok"  # debounced: 4 < bad_frames
    feed(m, [np.zeros((64, 64, 3), np.uint8)] * 2, 14)
    assert m.snapshot()["cam"]["condition"] == "black"
    assert gauge(metrics, "linewatch_camera_condition", camera="cam", condition="black") == 1
    assert gauge(metrics, "linewatch_camera_condition", camera="cam", condition="ok") == 0

    still = texture(99)
    feed(m, [still] * 12, 20)
    assert m.snapshot()["cam"]["condition"] == "frozen"

    blurred = [cv2.GaussianBlur(texture(200 + i), (0, 0), 4) for i in range(6)]
    feed(m, blurred, 40)
    assert m.snapshot()["cam"]["condition"] == "blurred"
    assert gauge(metrics, "linewatch_frame_sharpness_ratio", camera="cam") < 0.3

    feed(m, [texture(300 + i) for i in range(3)], 50)
    assert m.snapshot()["cam"]["condition"] == "ok"
    changes = [s.condition for s in statuses if s.kind == "health"]
    assert changes == ["black", "ok", "frozen", "ok", "blurred", "ok"]  # each condition debounced
    for s in statuses:  # what goes on the status topic survives the wire format
        assert decode(encode(s)).condition == s.condition


def test_rolling_fail_rate_and_score_median(monitor):
    m, metrics, _ = monitor
    feed(m, [texture(i) for i in range(20)], score=0.5, fail=False)
    assert wait_for(lambda: gauge(metrics, "linewatch_fail_rate", camera="cam") == 0.0)
    assert gauge(metrics, "linewatch_score_median_ratio", camera="cam") == pytest.approx(1.0)
    # the window is 20 verdicts: 10 fails with a doubled score move both gauges
    feed(m, [texture(100 + i) for i in range(10)], 20, score=1.0, fail=True)
    assert wait_for(lambda: gauge(metrics, "linewatch_fail_rate", camera="cam") == pytest.approx(0.5), 3)
    assert gauge(metrics, "linewatch_score_median_ratio", camera="cam") == pytest.approx(1.5)
    feed(m, [texture(200 + i) for i in range(20)], 30, score=1.0, fail=True)
    assert wait_for(lambda: gauge(metrics, "linewatch_fail_rate", camera="cam") == pytest.approx(1.0), 3)
    snap = m.snapshot()["cam"]
    assert snap["fail_rate"] == pytest.approx(1.0) and snap["score_median_ratio"] == pytest.approx(2.0)


def test_a_busy_health_thread_skips_checks_and_counts_them():
    metrics = Metrics()
    m = DriftMonitor(HealthConfig(queue=1), metrics, {"median": 1.0})  # thread not started: never drains
    for i in range(5):
        m.observe(frame("cam", i, texture(i)), verdict("cam", i, 0.5, False), np.zeros((4, 4)))
    assert metrics.registry.get_sample_value("linewatch_health_skipped_total") == 4
    # drift still sees every verdict
    m._publish_drift()
    assert m.snapshot()["cam"]["fail_rate"] == 0.0
