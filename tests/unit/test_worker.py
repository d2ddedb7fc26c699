"""Inference worker: batching, verdicts, defect regions mapped back to the frame, failure handling."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch
from fakes import BrightnessDetector, Sink, drain_worker, mk_frame, value

from linewatch.model import Prediction
from linewatch.service.detector import Detector
from linewatch.service.frames import Frame, FrameQueue
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.service.worker import InferenceWorker, find_defects

H = W = 16


FakeDetector = BrightnessDetector  # score = brightest pixel / 255: a frame's verdict is set by its pixels


def test_the_fake_detector_is_a_service_detector():
    assert isinstance(FakeDetector(), Detector)


def run_worker(frames, det=None, *, max_batch=4, masks="fail", deadline_s=10.0, queue_size=100):
    det = det or FakeDetector()
    items, m, _ = drain_worker(frames, det, max_batch=max_batch, masks=masks, queue_size=queue_size,
                               drain_s=deadline_s, join_s=30)
    return items, m, det


# --------------------------------------------------------------------------- defect regions


def test_find_defects_maps_regions_to_frame_coordinates():
    amap = np.zeros((16, 16), np.float32)
    amap[2:6, 3:9] = 1.0  # 6×4 at (3, 2) on the map
    amap[10:12, 12:14] = 0.8  # 2×2 at (12, 10)
    d = find_defects(amap, 0.5, (100, 50, 32, 32), want_mask=True, failed=True)  # map → ROI: ×2
    assert d.n_regions == 2 and len(d.boxes) == 2
    big, small = d.boxes
    assert big.area > small.area
    assert abs(big.x - (100 + 6)) <= 1 and abs(big.y - (50 + 4)) <= 1
    assert abs(big.w - 12) <= 2 and abs(big.h - 8) <= 2
    assert abs(small.x - (100 + 24)) <= 1 and abs(small.y - (50 + 20)) <= 1
    assert d.mask.shape == (32, 32) and set(np.unique(d.mask)) == {0, 255}
    assert d.area == int((d.mask > 0).sum()) == big.area + small.area


def test_find_defects_pass_and_lone_peak():
    amap = np.full((16, 16), 0.1, np.float32)
    d = find_defects(amap, 0.5, (0, 0, 40, 30), want_mask=True, failed=False)
    assert d.boxes == [] and d.area == 0 and d.mask.shape == (30, 40) and not d.mask.any()
    assert find_defects(amap, 0.5, (0, 0, 40, 30), want_mask=False, failed=False).mask is None
    # a failed part whose only hot pixel vanishes in interpolation still gets a (one-pixel) region
    amap[7, 7] = 0.51
    d = find_defects(amap, 0.51, (0, 0, 160, 160), want_mask=True, failed=True)
    assert d.n_regions == 1 and d.area >= 1
    b = d.boxes[0]
    assert 70 <= b.x <= 80 and 70 <= b.y <= 80


# --------------------------------------------------------------------------- the worker


def test_every_frame_gets_its_verdict_in_batches():
    frames = [mk_frame(cam, s, bright=(s % 3 == 0)) for s in range(10) for cam in ("a", "b")]
    items, m, det = run_worker(frames, max_batch=4)
    assert sorted((v.camera, v.sequence) for v, _ in items) == sorted((f.camera, f.sequence) for f in frames)
    for v, mask in items:
        assert v.verdict == ("fail" if v.sequence % 3 == 0 else "pass")
        assert v.threshold == 0.5 and v.model_id == "fake0000" and v.run_id == "run1"
        assert v.frame_width == 64 and v.frame_height == 48 and v.ref == f"{v.sequence:03d}.png"
        assert 0 < v.p_value <= 1
        assert (mask is not None) == (v.verdict == "fail")  # masks: fail
        if v.verdict == "fail":
            assert mask.shape == (48, 64) and v.boxes and v.defect_area > 0
    assert max(det.batches) <= 4 and sum(det.batches) == 20
    assert value(m, "linewatch_batch_size_count") == len(det.batches)
    assert value(m, "linewatch_batch_size_sum") == 20
    assert value(m, "linewatch_inference_seconds_count") == len(det.batches)
    fails = sum(1 for f in frames if f.sequence % 3 == 0) // 2
    for cam in ("a", "b"):
        assert value(m, "linewatch_verdicts_total", camera=cam, verdict="fail") == fails
        assert value(m, "linewatch_verdicts_total", camera=cam, verdict="pass") == 10 - fails
        assert value(m, "linewatch_latency_seconds_count", camera=cam) == 10
        assert value(m, "linewatch_score_ratio_count", camera=cam) == 10
    assert value(m, "linewatch_queue_wait_seconds_count") == 20


@pytest.mark.parametrize("policy, expect", [("all", {"pass": True, "fail": True}),
                                            ("none", {"pass": False, "fail": False})])
def test_mask_policy(policy, expect):
    items, _, _ = run_worker([mk_frame("a", 0, True), mk_frame("a", 1, False)], masks=policy)
    for v, mask in items:
        assert (mask is not None) == expect[v.verdict]


def test_roi_mask_and_boxes_in_frame_coordinates():
    items, _, _ = run_worker([mk_frame("a", 0, True, roi=(10, 8, 32, 32))])
    v, mask = items[0]
    assert v.roi == (10, 8, 32, 32) and mask.shape == (32, 32)  # ROI-size: the publisher places it
    b = v.boxes[0]
    # bright block at map (6..12, 4..8) → ×2 → ROI (12..24, 8..16) → frame + (10, 8)
    assert abs(b.x - 22) <= 1 and abs(b.y - 16) <= 1


def test_inference_error_is_counted_and_the_worker_goes_on():
    det = FakeDetector(fail_first=1)
    frames = [mk_frame("a", s, False) for s in range(6)]
    items, m, _ = run_worker(frames, det, max_batch=3)
    assert [v.sequence for v, _ in items] == [3, 4, 5]  # the first batch failed, the rest went through
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="inference_error") == 3


def test_a_batch_of_failing_parts_is_not_an_inference_failure():
    """A batch whose frames all get a FAIL verdict is a good batch: no back-off, health unaffected.

    Regression: a batch of one frame with a FAIL verdict was taken for "every frame lost", so the worker
    slept 0.2 s, 0.4 s, … after each one (latency p50 199 ms in `make demo` instead of ~50 ms) and
    ``healthy`` went false after a run of failing parts at a low rate."""
    det = FakeDetector()
    m, sink = Metrics(), Sink()
    w = InferenceWorker(det, FrameQueue(10, m), sink, m, max_batch=4)
    waits: list[float] = []
    w._stop_event.wait = lambda t=None: waits.append(t) or False  # the back-off would land here
    for s in range(8):
        w.process([mk_frame("a", s, True)])
    assert [v.verdict for v, _ in sink.items] == ["fail"] * 8
    assert waits == [] and w.consecutive_failures == 0
    w.process([mk_frame("a", s, True) for s in range(8, 11)])  # a whole batch of fails, too
    assert waits == [] and w.consecutive_failures == 0 and len(sink.items) == 11


def test_frames_left_after_the_drain_deadline_are_counted():
    items, m, _ = run_worker([mk_frame("a", s, False) for s in range(5)], deadline_s=-1.0)
    assert items == []
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="shutdown") == 5


def test_worker_health_and_live_batching():
    det = FakeDetector(delay=0.01)
    m, sink = Metrics(), Sink()
    q = FrameQueue(10, m)
    w = InferenceWorker(det, q, sink, m, max_batch=8, max_wait_ms=20, poll_s=0.02)
    w.start()
    try:
        assert w.healthy
        for s in range(12):
            q.put(mk_frame("a", s, False))
            time.sleep(0.002)
        end = time.monotonic() + 10
        while len(sink.items) < 12 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        w.stop(time.monotonic() + 5)
        w.join(10)
    assert [v.sequence for v, _ in sink.items] == list(range(12))
    assert max(det.batches) <= 8


def test_streamed_verdicts_equal_offline_predictions(untrained_bundle, bottle):
    """With the real model: batching in the worker changes nothing about scores or verdicts."""
    from linewatch.imaging.images import list_images, load_images
    from linewatch.model import load_detector

    torch.set_num_threads(1)
    det = load_detector(untrained_bundle, "cpu")
    paths = list_images(bottle / "test" / "broken_small")[:5] + list_images(bottle / "test" / "good")[:5]
    data = load_images(paths, det.input_size)
    offline = det.predict_many(data.images, batch_size=len(paths))
    frames = [Frame("cam", i, time.time(), time.monotonic(), data.images[i].copy(), (900, 900), (0, 0, 900, 900),
                    ref=paths[i].name) for i in range(len(paths))]
    items, _, _ = run_worker(frames, det, max_batch=3, masks="all")
    got = {v.sequence: (v, mask) for v, mask in items}
    assert sorted(got) == list(range(len(paths)))
    cal = det.calibration
    for i in range(len(paths)):
        v, mask = got[i]
        s = float(offline.scores[i])
        assert v.score == pytest.approx(s, rel=1e-4, abs=1e-6)
        if abs(s - cal.image_threshold) > 1e-4 * max(1.0, abs(s)):
            assert v.verdict == ("fail" if s > cal.image_threshold else "pass")
        assert v.p_value == pytest.approx(cal.p_value(v.score))
        assert mask.shape == (900, 900)


# --------------------------------------------------------------------------- batch-level results


class DeviceMapsDetector(FakeDetector):
    """Offers ``predict(..., host_maps=False)``: maps "stay on the device" (here: the CPU), so the worker must
    pick which ones to copy."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.host_maps_args: list[bool] = []

    def predict(self, batch: torch.Tensor, *, host_maps: bool = True) -> Prediction:
        self.host_maps_args.append(host_maps)
        return super().predict(batch)


def mixed_frames() -> list[Frame]:
    """Per camera: fail (bright block), pass with a dim spot over the pixel threshold (boxes on a pass), plain
    pass, in turn."""
    out = []
    for cam in ("a", "b"):
        for s in range(9):
            img = np.zeros((H, W, 3), np.uint8)
            if s % 3 == 0:
                img[4:8, 6:12] = 255  # score 1.0 > 0.5: fail
            elif s % 3 == 1:
                img[2:4, 2:4] = 115  # 0.45: a pass, but over the pixel threshold 0.4
            out.append(Frame(cam, s, time.time(), time.monotonic(), img, (64, 48), (0, 0, 64, 48),
                             ref=f"{s:03d}.png"))
    return out


def strip(v):
    d = v.to_dict() if hasattr(v, "to_dict") else dict(vars(v))
    for k in ("verdict_time", "capture_time"):  # differ between the two runs by construction
        d.pop(k, None)
    return d


@pytest.mark.parametrize("masks", ["fail", "all", "none"])
def test_maps_are_copied_only_for_frames_that_can_show_a_defect_and_verdicts_stay_identical(masks, monkeypatch):
    legacy, _, _ = run_worker(mixed_frames(), masks=masks)
    fetched: list[int] = []
    original = InferenceWorker._fetch_maps

    def spy(self, maps, idx):
        fetched.extend(int(i) for i in idx)
        return original(self, maps, idx)

    monkeypatch.setattr(InferenceWorker, "_fetch_maps", spy)
    det = DeviceMapsDetector()
    items, _, _ = run_worker(mixed_frames(), det, max_batch=6, masks=masks)
    assert det.host_maps_args and not any(det.host_maps_args)  # asked to leave the maps on the device
    # batches of 6 = two cycles of (fail, over-threshold pass, plain pass): indices 0,1,3,4 of each
    assert sorted(fetched) == sorted([0, 1, 3, 4] * 3)
    assert len(items) == len(legacy) == 18
    by_key = {(v.camera, v.sequence): (v, m) for v, m in legacy}
    for v, mask in items:
        lv, lmask = by_key[(v.camera, v.sequence)]
        assert strip(v) == strip(lv)
        assert (mask is None) == (lmask is None)
        if mask is not None:
            assert np.array_equal(mask, lmask)
    plain = [v for v, _ in items if v.sequence % 3 == 2]
    assert all(v.verdict == "pass" and not v.boxes for v in plain)
    assert any(v.boxes for v, _ in items if v.sequence % 3 == 1)  # the pass with a spot kept its boxes


def test_a_preview_of_a_frame_whose_map_stayed_on_the_device_fetches_it():
    det = DeviceMapsDetector()
    m, q = Metrics(), FrameQueue(100)
    previews = []

    def publish(v, mask, preview=None):
        if preview is not None:
            previews.append((v.sequence, preview[1]))

    for f in mixed_frames()[:3]:
        q.put(f)
    w = InferenceWorker(det, q, publish, m, max_batch=3, max_wait_ms=1, preview=lambda v: True)
    w.stop(time.monotonic() + 10)
    w.start()
    w.join(30)
    assert [s for s, _ in previews] == [0, 1, 2]
    assert all(p.shape == (H, W) for _, p in previews)
    assert previews[2][1].max() == 0  # the plain pass: its (dark) map, fetched on demand


def test_sampled_observers_see_one_verdict_in_n_per_camera_others_every_one():
    every, sampled = [], []
    m, sink = Metrics(), Sink()
    q = FrameQueue(100, m)
    for f in mixed_frames():
        q.put(f)
    w = InferenceWorker(FakeDetector(), q, sink, m, max_batch=4, max_wait_ms=1,
                        observers=[lambda f, v, a: every.append((f.camera, f.sequence))],
                        sampled_observers=[lambda f, v, a: sampled.append((f.camera, f.sequence))], sample_every_n=4)
    w.stop(time.monotonic() + 10)
    w.start()
    w.join(30)
    assert len(every) == 18
    assert sorted(sampled) == [(c, s) for c in ("a", "b") for s in (0, 4, 8)]


class DevicePreprocessDetector(FakeDetector):
    """Reports ``device_preprocess``: takes frames at ROI resolution through ``predict_frames`` (as on CUDA)."""

    device_preprocess = True

    def __init__(self):
        super().__init__()
        self.frame_shapes: list[tuple[int, ...]] = []

    def predict(self, batch):  # pragma: no cover - must not be called
        raise AssertionError("predict() called although the device preprocesses")

    def predict_frames(self, frames):
        self.frame_shapes.extend(tuple(f.shape) for f in frames)
        resized = torch.stack([torch.from_numpy(cv2.resize(f, (W, H), interpolation=cv2.INTER_AREA))
                               for f in frames])
        return FakeDetector.predict(self, resized)


def test_a_device_that_preprocesses_gets_roi_resolution_frames():
    frames = []
    for s, shape in enumerate([(48, 64), (30, 40), (48, 64)]):
        img = np.zeros((*shape, 3), np.uint8)
        if s == 1:
            img[10:20, 10:20] = 255
        frames.append(Frame("a", s, time.time(), time.monotonic(), img, (shape[1], shape[0]),
                            (0, 0, shape[1], shape[0])))
    det = DevicePreprocessDetector()
    items, _, _ = run_worker(frames, det, max_batch=3)
    assert det.frame_shapes == [(48, 64, 3), (30, 40, 3), (48, 64, 3)]  # sizes differ per frame: no resize here
    assert [(v.sequence, v.verdict) for v, _ in items] == [(0, "pass"), (1, "fail"), (2, "pass")]
    assert items[1][1].shape == (30, 40)  # the mask at the frame's ROI size
