"""The drift monitor: drift and camera condition, watched on the verdict stream without slowing it.

Configured by the ``health:`` config section (the name deployed configs use). Whether the daemon's own
threads run is another matter: :mod:`linewatch.service.liveness`.

* Drift, per camera, over the last ``health.window`` verdicts: the fail rate, and the median score
  divided by the calibration images' median (≈1 while the line looks like calibration; creeping up
  means lighting, optics or parts are drifting — time to re-calibrate before false rejects start).
* Camera condition from the frames themselves: **black** (mean grey level under a floor), **frozen**
  (identical frames in a row: a hung decoder or camera), **blurred** (sharpness far below the
  calibration images'). Each is debounced over consecutive frames.

Observing a verdict costs a deque append on the worker thread; the image checks run in this module's
own thread, on the frames it has time for (a busy health thread skips frames, counted — it never
delays a verdict).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import structlog

from linewatch.imaging.images import grey
from linewatch.messages import Status, Verdict
from linewatch.service.telemetry.prometheus import Metrics

if TYPE_CHECKING:
    from linewatch.service.config import HealthConfig
    from linewatch.service.frames import Frame

log = structlog.get_logger("linewatch.health")

PUBLISH_EVERY_S = 1.0  # how often drift gauges are recomputed


@dataclass
class _CameraState:
    scores: deque = field(default_factory=deque)
    fails: deque = field(default_factory=deque)
    n_fail: int = 0
    prev: np.ndarray | None = None
    black_run: int = 0
    frozen_run: int = 0
    blur_run: int = 0
    condition: str = "ok"
    fail_rate: float | None = None
    score_median_ratio: float | None = None


class DriftMonitor(threading.Thread):
    def __init__(self, cfg: HealthConfig, metrics: Metrics, calibration_stats: dict[str, float],
                 submit_status: Callable[[Status], None] | None = None, run_id: str = ""):
        super().__init__(name="health", daemon=True)
        self.cfg = cfg
        self.metrics = metrics
        self.submit_status = submit_status
        self.run_id = run_id
        self.score_median = float(calibration_stats.get("median") or 0.0) or None
        self.sharpness_median = float(calibration_stats.get("sharpness_median") or 0.0) or None
        self._cams: dict[str, _CameraState] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self._stop_event = threading.Event()
        self.checked = 0  # frames whose image checks are done (only this thread writes it)
        if self.sharpness_median is None:
            log.info("blur_check_off", reason="the model bundle has no calibration sharpness; re-calibrate to enable")

    def set_calibration(self, calibration_stats: dict[str, float]) -> None:
        """A reloaded model brings its own calibration medians; drift is measured against those."""
        self.score_median = float(calibration_stats.get("median") or 0.0) or None
        self.sharpness_median = float(calibration_stats.get("sharpness_median") or 0.0) or None

    def _cam(self, camera: str) -> _CameraState:
        st = self._cams.get(camera)
        if st is None:
            st = self._cams[camera] = _CameraState(scores=deque(maxlen=self.cfg.window),
                                                   fails=deque(maxlen=self.cfg.window))
        return st

    # -- worker thread: must be cheap and must not raise
    def observe(self, frame: Frame, verdict: Verdict, amap: np.ndarray) -> None:
        with self._lock:
            st = self._cam(verdict.camera)
            if len(st.fails) == st.fails.maxlen:
                st.n_fail -= st.fails[0]
            failed = int(verdict.failed)
            st.fails.append(failed)
            st.n_fail += failed
            st.scores.append(verdict.score)
        try:
            self._queue.put_nowait((verdict.camera, frame.host_image()))
        except queue.Full:
            self.metrics.health_skipped.inc()

    # -- health thread
    def run(self) -> None:
        next_publish = 0.0
        while not self._stop_event.is_set():
            try:
                camera, image = self._queue.get(timeout=0.2)
            except queue.Empty:
                camera = None
            try:
                if camera is not None:
                    self._check(camera, image)
                    self.checked += 1
                now = time.monotonic()
                if now >= next_publish:
                    self._publish_drift()
                    next_publish = now + PUBLISH_EVERY_S
            except Exception as exc:  # a health-check bug must not take the daemon down
                log.error("health_check_failed", error=f"{type(exc).__name__}: {exc}")
                self._stop_event.wait(1.0)

    def _check(self, camera: str, image: np.ndarray) -> None:
        g = grey(image)
        brightness = float(g.mean())
        sharp = float(cv2.Laplacian(g, cv2.CV_32F).var())
        cfg = self.cfg
        with self._lock:
            st = self._cam(camera)
            prev, st.prev = st.prev, g
        diff = float(cv2.absdiff(g, prev).mean()) if prev is not None and prev.shape == g.shape else None
        st.black_run = st.black_run + 1 if brightness < cfg.black_level else 0
        st.frozen_run = st.frozen_run + 1 if diff is not None and diff <= cfg.frozen_diff else 0
        blurred = self.sharpness_median is not None and sharp < cfg.blur_ratio * self.sharpness_median
        st.blur_run = st.blur_run + 1 if blurred else 0
        if st.black_run >= cfg.bad_frames:
            condition = "black"
        elif st.frozen_run + 1 >= cfg.frozen_frames:  # n identical frames = n−1 zero differences
            condition = "frozen"
        elif st.blur_run >= cfg.bad_frames:
            condition = "blurred"
        else:
            condition = "ok"
        self.metrics.brightness.labels(camera).set(brightness)
        if self.sharpness_median:
            self.metrics.sharpness_ratio.labels(camera).set(sharp / self.sharpness_median)
        if condition != st.condition:
            old, st.condition = st.condition, condition
            for c in ("ok", "black", "frozen", "blurred"):
                self.metrics.condition.labels(camera, c).set(1 if c == condition else 0)
            (log.info if condition == "ok" else log.warning)(
                "camera_condition", camera=camera, condition=condition, previous=old,
                brightness=round(brightness, 2), sharpness=round(sharp, 2),
                frame_diff=None if diff is None else round(diff, 4))
            if self.submit_status is not None:
                self.submit_status(Status(kind="health", time=time.time(), run_id=self.run_id, camera=camera,
                                          condition=condition, fail_rate=st.fail_rate,
                                          score_median_ratio=st.score_median_ratio))

    def _publish_drift(self) -> None:
        with self._lock:
            items = [(cam, st, list(st.scores), st.n_fail, len(st.fails)) for cam, st in self._cams.items()]
        for cam, st, scores, n_fail, n in items:
            if n == 0:
                continue
            st.fail_rate = n_fail / n
            self.metrics.fail_rate.labels(cam).set(st.fail_rate)
            if self.score_median:
                st.score_median_ratio = float(np.median(scores)) / self.score_median
                self.metrics.score_median_ratio.labels(cam).set(st.score_median_ratio)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per camera: condition, fail rate and score-median ratio (for heartbeats)."""
        with self._lock:
            return {cam: {"condition": st.condition, "fail_rate": st.fail_rate,
                          "score_median_ratio": st.score_median_ratio} for cam, st in self._cams.items()}

    def stop(self, timeout: float = 2.0) -> None:
        self._stop_event.set()
        self.join(timeout)
