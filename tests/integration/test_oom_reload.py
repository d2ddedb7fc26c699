"""Inference worker under injected faults (in process): CUDA out-of-memory during a batch, and a model
swapped in while batches run. The daemon-level SIGHUP reload is in test_faults.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import fakes
import pytest
import structlog
import torch
from fakes import Sink, mk_frame, value

from linewatch.model import Calibration, Prediction
from linewatch.service.detector import Detector
from linewatch.service.frames import Frame, FrameQueue
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.service.worker import OOM_ERRORS, InferenceWorker
from linewatch.tools.harness import wait_until

H = W = 16
OOM = OOM_ERRORS[0]


def test_the_oom_class_is_what_cuda_raises():
    assert issubclass(torch.cuda.OutOfMemoryError, OOM)
    assert issubclass(OOM, RuntimeError)  # so an OOM the worker cannot split is still an ordinary failure


class FakeDetector:
    """Score = brightest pixel / 255 (map = brightness). Raises CUDA OOM for batches above ``fits``
    while ``oom`` is set, and for any batch holding a frame whose first pixel is 77 ("too big")."""

    def __init__(self, fits: int = 2, model_id: str = "fake0000", threshold: float = 0.5, delay: float = 0.0):
        self.input_size = (H, W)
        self.model_id = model_id
        self.meta = SimpleNamespace(backbone="fake")
        self.device = torch.device("cpu")
        self.engine = "fake"
        self.calibration = Calibration(image_threshold=threshold, pixel_threshold=threshold - 0.1, alpha=0.1,
                                       false_reject_bound=0.1, scores=[0.1, 0.2, 0.3, 0.45])
        self.fits = fits
        self.oom = threading.Event()
        self.oom.set()
        self.calls: list[tuple[int, bool]] = []  # (batch size, raised OOM)
        self.delay = delay
        self.inside = threading.Event()

    def predict(self, batch: torch.Tensor) -> Prediction:
        self.inside.set()
        n = batch.shape[0]
        too_big = bool((batch[:, 0, 0, 0] == 77).any())
        if too_big or (self.oom.is_set() and n > self.fits):
            self.calls.append((n, True))
            raise OOM(f"CUDA out of memory. Tried to allocate {n * 512} MiB (simulated)")
        self.calls.append((n, False))
        time.sleep(self.delay)
        maps = batch.float().amax(-1) / 255.0
        return Prediction(maps=maps, scores=maps.flatten(1).amax(1))

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        pass  # nothing to build


def test_the_fake_detector_is_a_service_detector():
    assert isinstance(FakeDetector(), Detector)


def drain_worker(frames, det, *, max_batch=8, **kw):
    with structlog.testing.capture_logs() as logs:
        items, m, w = fakes.drain_worker(frames, det, max_batch=max_batch, run_id="r", **kw)
    return items, m, w, logs


def test_oom_splits_the_batch_lowers_the_limit_and_loses_no_verdict():
    det = FakeDetector(fits=2)
    frames = [mk_frame(cam, s, bright=(s % 4 == 0)) for s in range(10) for cam in ("a", "b")]
    items, m, w, logs = drain_worker(frames, det, max_batch=8)
    # every frame got its own, correct verdict
    assert sorted((v.camera, v.sequence) for v, _ in items) == sorted((f.camera, f.sequence) for f in frames)
    assert all(v.verdict == ("fail" if v.sequence % 4 == 0 else "pass") for v, _ in items)
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="inference_error") == 0
    assert value(m, "linewatch_frames_dropped_total", camera="b", reason="inference_error") == 0
    # first batch: 8 → OOM, 4 → OOM, then chunks of 2; later batches are taken 2 at a time
    assert det.calls[:3] == [(8, True), (4, True), (2, False)]
    assert all(n <= 2 for n, oom in det.calls[2:]) and not any(oom for _, oom in det.calls[2:])
    assert value(m, "linewatch_oom_total") == 2
    assert value(m, "linewatch_effective_max_batch") == 2 and w.effective_max_batch == 2
    assert value(m, "linewatch_batch_size_sum") == 20  # only successful model calls are observed
    ooms = [e for e in logs if e["event"] == "inference_oom"]
    assert [(e["batch"], e["retry_batch"]) for e in ooms] == [(8, 4), (4, 2)]
    assert all("out of memory" in e["error"] and e["log_level"] == "warning" for e in ooms)
    assert not [e for e in logs if e["event"] == "inference_failed"]
    assert w.consecutive_failures == 0


def test_a_single_frame_that_does_not_fit_loses_only_itself():
    det = FakeDetector(fits=8)
    frames = [mk_frame("a", s, False, too_big=(s == 2)) for s in range(6)]
    items, m, w, logs = drain_worker(frames, det, max_batch=4)
    assert sorted(v.sequence for v, _ in items) == [0, 1, 3, 4, 5]
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="inference_error") == 1
    # 4 → OOM, 2 ([0, 1]) fine, 2 ([2, 3]) → OOM, 1 ([2]) → OOM: dropped; [3] fine; then [4, 5]
    assert [n for n, _ in det.calls] == [4, 2, 2, 1, 1, 1, 1]
    assert value(m, "linewatch_oom_total") == 3
    failed = [e for e in logs if e["event"] == "inference_failed"]
    assert len(failed) == 1 and failed[0]["seq"] == [2] and failed[0]["frames"] == 1


def test_effective_batch_is_raised_again_after_an_oom_free_period():
    det = FakeDetector(fits=2)
    m, sink = Metrics(), Sink()
    q = FrameQueue(1000, m)
    w = InferenceWorker(det, q, sink, m, max_batch=8, max_wait_ms=20, poll_s=0.02, oom_recovery_s=0.3)
    seq = iter(range(10**6))

    def feed(n: int) -> None:
        for _ in range(n):
            q.put(mk_frame("a", next(seq), False))

    with structlog.testing.capture_logs() as logs:
        feed(8)  # queued before the start: the first batch has all eight
        w.start()
        try:
            wait_until(lambda: len(sink.items) == 8, 30, what="verdicts under OOM")
            assert w.effective_max_batch == 2
            det.oom.clear()  # the memory pressure is gone
            wait_until(lambda: w.effective_max_batch == 8, 30, what="limit back at max_batch")
            feed(16)
            wait_until(lambda: len(sink.items) == 24, 30, what="verdicts at full batch")
        finally:
            w.stop(time.monotonic() + 5)
            w.join(10)
    raised = [(e["previous_max_batch"], e["effective_max_batch"]) for e in logs if e["event"] == "batch_limit_raised"]
    assert raised == [(2, 4), (4, 8)]  # doubling, one step per OOM-free period, capped at max_batch
    assert value(m, "linewatch_effective_max_batch") == 8
    assert max(n for n, _ in det.calls) <= 8
    assert sorted(v.sequence for v, _ in sink.items) == list(range(24))


class OOMAbove:
    """The real detector, with a GPU that (pretends it) fits only ``fits`` frames per call."""

    def __init__(self, det, fits: int):
        self.det, self.fits, self.calls = det, fits, []
        self.input_size, self.model_id, self.meta, self.device = det.input_size, det.model_id, det.meta, det.device
        self.engine, self.calibration = det.engine, det.calibration

    def predict(self, batch: torch.Tensor) -> Prediction:
        self.calls.append(batch.shape[0])
        if batch.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {self.fits} frames)")
        return self.det.predict(batch)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        self.det.warm_up(batch_sizes)


def test_oom_split_with_the_real_model_gives_the_offline_verdicts(untrained_bundle, bottle):
    from linewatch.imaging.images import list_images, load_images
    from linewatch.model import load_detector

    torch.set_num_threads(1)
    det = load_detector(untrained_bundle, "cpu")
    paths = list_images(bottle / "test" / "broken_large")[:3] + list_images(bottle / "test" / "good")[:4]
    data = load_images(paths, det.input_size)
    offline = det.predict_many(data.images, batch_size=len(paths))
    frames = [Frame("cam", i, time.time(), time.monotonic(), data.images[i].copy(), (900, 900), (0, 0, 900, 900),
                    ref=paths[i].name) for i in range(len(paths))]
    wrapped = OOMAbove(det, fits=3)
    assert isinstance(det, Detector) and isinstance(wrapped, Detector)
    items, m, w, _ = drain_worker(frames, wrapped, max_batch=8)
    got = {v.sequence: v for v, _ in items}
    assert sorted(got) == list(range(len(paths)))
    for i in range(len(paths)):
        assert got[i].score == pytest.approx(float(offline.scores[i]), rel=1e-4, abs=1e-6)
        assert got[i].model_id == det.model_id
    assert wrapped.calls[:2] == [7, 3] and w.effective_max_batch == 3  # 7 → OOM → 3, 3, 1
    assert value(m, "linewatch_oom_total") == 1


# --------------------------------------------------------------------------- model swap


def test_swap_happens_between_batches_and_new_verdicts_carry_the_new_model():
    a = FakeDetector(fits=64, model_id="modelA00000", threshold=0.5, delay=0.3)
    b = FakeDetector(fits=64, model_id="modelB00000", threshold=0.95)
    m, sink = Metrics(), Sink()
    q = FrameQueue(1000, m)
    swapped = []
    w = InferenceWorker(a, q, sink, m, max_batch=4, max_wait_ms=1, poll_s=0.02)
    for s in range(4):
        q.put(mk_frame("a", s, bright=True))  # score 1.0: fails under both thresholds
    w.start()  # its first batch: these four frames
    try:
        assert a.inside.wait(10)  # the first batch is in model A
        w.swap_detector(b, lambda old, det: swapped.append((old, det.model_id)))
        assert w.swap_pending
        for s in range(4, 8):
            q.put(mk_frame("a", s, bright=False))
        wait_until(lambda: len(sink.items) == 8, 30, what="8 verdicts")
    finally:
        w.stop(time.monotonic() + 5)
        w.join(10)
    by_seq = {v.sequence: v for v, _ in sink.items}
    # the batch in flight finished wholly on model A; everything after the swap is model B's
    assert [by_seq[s].model_id for s in range(4)] == ["modelA00000"] * 4
    assert all(by_seq[s].threshold == 0.5 for s in range(4))
    assert [by_seq[s].model_id for s in range(4, 8)] == ["modelB00000"] * 4
    assert all(by_seq[s].threshold == 0.95 and by_seq[s].pixel_threshold == pytest.approx(0.85) for s in range(4, 8))
    assert swapped == [("modelA00000", "modelB00000")]
    assert not w.swap_pending and w.detector is b


def test_swap_refuses_another_input_size():
    det = FakeDetector()
    w = InferenceWorker(det, FrameQueue(4), Sink(), Metrics(), max_batch=2)
    other = FakeDetector()
    other.input_size = (32, 32)
    with pytest.raises(ValueError, match=r"input size \(32, 32\) differs"):
        w.swap_detector(other)
    assert not w.swap_pending
