"""Inference worker: micro-batches frames from all cameras, runs the model once per batch, turns each
anomaly map into a verdict, defect boxes and (optionally) a mask, and hands them to the publisher.

It sees the model only through :class:`linewatch.model.Detector`'s public surface: ``input_size``,
``predict``, ``calibration``, ``model_id``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np
import structlog
import torch

from linewatch.messages import MAX_BOXES, Box, Verdict
from linewatch.metrics import Metrics
from linewatch.pipeline.capture import Frame, FrameQueue

if TYPE_CHECKING:
    from linewatch.model import Detector

log = structlog.get_logger("linewatch.worker")

PublishFn = Callable[[Verdict, "np.ndarray | None"], None]  # (verdict, ROI-size mask or None)
MAX_CONSECUTIVE_FAILURES = 3  # batches in a row: then the worker reports itself unhealthy (watchdog)


@dataclass
class Defects:
    boxes: list[Box] = field(default_factory=list)  # largest first, at most MAX_BOXES, frame coordinates
    n_regions: int = 0
    area: int = 0  # defect pixels at frame resolution
    mask: np.ndarray | None = None  # (roi h, roi w) uint8 0/255, when asked for


def find_defects(amap: np.ndarray, pixel_threshold: float, roi: tuple[int, int, int, int], *,
                 want_mask: bool, failed: bool) -> Defects:
    """Map the anomaly map (model input size) back onto the ROI, threshold it and find regions.

    The map is upsampled before thresholding (bilinear) so region outlines follow the map rather than
    the model's pixel grid. Bilinear sampling can miss a lone peak; a failed part always gets at least
    the peak's pixel, so "fail" never comes with an empty mask.
    """
    x0, y0, rw, rh = roi
    peak = float(amap.max()) if amap.size else float("-inf")
    if peak <= pixel_threshold and not failed:
        return Defects(mask=np.zeros((rh, rw), np.uint8) if want_mask else None)
    up = cv2.resize(amap, (rw, rh), interpolation=cv2.INTER_LINEAR) if amap.shape != (rh, rw) else amap
    mask = np.where(up > pixel_threshold, np.uint8(255), np.uint8(0))
    if failed and not mask.any():
        iy, ix = np.unravel_index(int(np.argmax(amap)), amap.shape)
        py = min(rh - 1, int((iy + 0.5) * rh / amap.shape[0]))
        px = min(rw - 1, int((ix + 0.5) * rw / amap.shape[1]))
        mask[py, px] = 255
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = stats[1:]  # label 0 is the background
    order = np.argsort(-regions[:, cv2.CC_STAT_AREA], kind="stable")[:MAX_BOXES] if len(regions) else []
    boxes = [
        Box(x=int(regions[i, 0]) + x0, y=int(regions[i, 1]) + y0, w=int(regions[i, 2]), h=int(regions[i, 3]),
            area=int(regions[i, 4]))
        for i in order
    ]
    return Defects(boxes=boxes, n_regions=int(n - 1), area=int(regions[:, cv2.CC_STAT_AREA].sum()),
                   mask=mask if want_mask else None)


class InferenceWorker(threading.Thread):
    def __init__(self, detector: Detector, queue: FrameQueue, publish: PublishFn, metrics: Metrics, *,
                 max_batch: int = 8, max_wait_ms: float = 10.0, masks: str = "fail", run_id: str | None = None,
                 poll_s: float = 0.1):
        super().__init__(name="inference", daemon=True)
        self.detector = detector
        self.queue = queue
        self.publish = publish
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.masks = masks
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.poll_s = poll_s
        cal = detector.calibration
        self.image_threshold = float(cal.image_threshold)
        self.pixel_threshold = float(cal.pixel_threshold)
        self.model_id = str(detector.model_id)
        h, w = detector.input_size
        # One buffer for every batch: no per-batch allocation of the largest array we handle. On CUDA it
        # is pinned so the upload is a straight DMA; reusing it is safe because predict() returns CPU
        # results, which waits for the whole batch, upload included.
        pin = torch.device(detector.device).type == "cuda"
        self._tbuf = torch.empty((max_batch, h, w, 3), dtype=torch.uint8, pin_memory=pin)
        self._buf = self._tbuf.numpy()
        self.last_tick = time.monotonic()  # the loop went round (health)
        self.busy_since: float | None = None  # a batch is in the model since then (health)
        self.consecutive_failures = 0
        self.frames_done = 0
        self.batches = 0
        self._stop_event = threading.Event()
        self._deadline: float | None = None

    def stop(self, deadline: float) -> None:
        """Finish the frames already queued (no new ones will come) until ``deadline`` (monotonic)."""
        self._deadline = deadline
        self._stop_event.set()
        self.queue.wake()

    @property
    def healthy(self) -> bool:
        return self.is_alive() and self.consecutive_failures < MAX_CONSECUTIVE_FAILURES

    def run(self) -> None:
        while True:
            self.last_tick = time.monotonic()
            if self._stop_event.is_set():
                if self._deadline is not None and time.monotonic() > self._deadline:
                    break
                batch = self.queue.get_batch(self.max_batch, 0.0, 0.0)
                if not batch:
                    break
            else:
                batch = self.queue.get_batch(self.max_batch, self.max_wait_s, self.poll_s)
            if batch:
                self.process(batch)
        left = self.queue.drain()
        for f in left:
            self.metrics.drop(f.camera, "shutdown")
        if left:
            log.warning("drain_timeout", frames_dropped=len(left))

    def process(self, batch: list[Frame]) -> None:
        start = time.monotonic()
        self.busy_since = start
        n = len(batch)
        try:
            for i, f in enumerate(batch):
                self.metrics.queue_wait.observe(start - f.enqueued)
                self._buf[i] = f.image
            pred = self.detector.predict(self._tbuf[:n])
            maps = pred.maps.numpy()
            scores = pred.scores.numpy()
            elapsed = time.monotonic() - start
            self.metrics.inference.observe(elapsed)
            self.metrics.batch_size.observe(n)
            for i, f in enumerate(batch):
                self._verdict(f, maps[i], float(scores[i]))
            self.consecutive_failures = 0
        except Exception as exc:  # a bad batch (e.g. CUDA OOM) must not end the daemon: count, log, go on
            self.consecutive_failures += 1
            for f in batch:
                self.metrics.drop(f.camera, "inference_error")
            log.error("inference_failed", error=f"{type(exc).__name__}: {exc}", frames=n,
                      cameras=sorted({f.camera for f in batch}), seq=[f.sequence for f in batch][:16],
                      consecutive=self.consecutive_failures)
            # back off a little so a persistent error does not spin the CPU
            self._stop_event.wait(min(5.0, 0.1 * 2 ** self.consecutive_failures))
        finally:
            self.busy_since = None
            self.batches += 1

    def _verdict(self, f: Frame, amap: np.ndarray, score: float) -> None:
        cal = self.detector.calibration
        failed = bool(cal.is_fail(score))
        verdict = "fail" if failed else "pass"
        want_mask = self.masks == "all" or (self.masks == "fail" and failed)
        defects = find_defects(amap, self.pixel_threshold, f.roi, want_mask=want_mask, failed=failed)
        now_mono = time.monotonic()
        v = Verdict(
            camera=f.camera, sequence=f.sequence, capture_time=f.capture_time, verdict_time=time.time(),
            verdict=verdict, score=score, threshold=self.image_threshold, pixel_threshold=self.pixel_threshold,
            p_value=cal.p_value(score), model_id=self.model_id, frame_width=f.frame_size[0],
            frame_height=f.frame_size[1], boxes=defects.boxes, n_regions=defects.n_regions,
            defect_area=defects.area, roi=f.roi, ref=f.ref, run_id=self.run_id,
        )
        self.metrics.frames.labels(f.camera, verdict).inc()
        self.metrics.latency.labels(f.camera).observe(max(0.0, now_mono - f.capture_mono))
        if self.image_threshold > 0:
            self.metrics.score_ratio.labels(f.camera).observe(score / self.image_threshold)
        self.frames_done += 1
        self.publish(v, defects.mask)
