"""The start-up sanity check: does this camera see what the model was calibrated on?

A model calibrated on full frames and run on a cropped camera (or under other lighting, or out of focus)
fails every frame, and nothing else says why. This observer watches each camera's first
``health.startup_check_frames`` verdicts: the calibration promises a false-reject rate of at most its
bound, so k fails among n frames has probability P(X ≥ k), X ~ Binomial(n, bound), if the parts are good.
Below ``health.startup_check_p`` the frames are very unlikely to be good parts judged by a model that fits
them: a ``calibration_mismatch`` status, gauge and log line say so, once per camera, with the likely causes.
(A run of genuinely defective parts at start-up raises it too; it is a prompt to look, not a verdict.)

It also compares each camera's first frame (its size, ROI and colour) with the framing the model was
calibrated on, when the bundle records one: the daemon checks what it can before a model runs (the ROI, with
:func:`check_cameras_framing`, at start and on each SIGHUP reload), this the rest.

Observing costs a few integer operations per verdict on the worker thread; state is one small record per
camera (cameras come from the config: bounded).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from linewatch.errors import LinewatchError
from linewatch.messages import Status, Verdict
from linewatch.service.telemetry.prometheus import Metrics

if TYPE_CHECKING:
    from linewatch.service.config import CameraConfig
    from linewatch.service.frames import Frame

log = structlog.get_logger("linewatch.sanity")

LIKELY_CAUSES = ("framing (the camera's roi or resolution differs from the calibration images)", "lighting",
                 "focus", "a different part or background")


STARTUP_FIX = ("record the camera and re-calibrate (linewatch record, then linewatch calibrate --config) "
               "or fix the camera's roi")


class FramingError(LinewatchError):
    """A camera frames the scene differently from the model's calibration images (one line: both named)."""


def check_cameras_framing(cameras: list[CameraConfig], framing: object, model_name: str, logger: Any,
                          fix: str = STARTUP_FIX) -> None:
    """Each configured camera's ROI against the framing a model was calibrated on (what is known before a frame:
    the ROI; the frame size and colour wait for the first frame, :class:`StartupSanityCheck`). Raises
    :class:`FramingError` (``... : why; <fix>``) for the first camera whose region has another aspect; logs
    ``framing_differs`` on ``logger`` for a size-only difference. One check for start-up and reload."""
    from linewatch.model.bundle import camera_framing, describe_framing, framing_problem

    if not isinstance(framing, dict):
        logger.info("model_framing_unknown", model=model_name, reason="the bundle predates framing records; "
                    "re-calibrate (linewatch record, then calibrate --config) to have cameras checked against it")
        return
    for cam in cameras:
        problem = framing_problem(framing, camera_framing(cam.roi, None))
        if problem is None:
            continue
        level, why = problem
        what = (f"camera {cam.name!r} roi {list(cam.roi) if cam.roi else 'none (full frame)'} vs model "
                f"{model_name} calibrated on {describe_framing(framing)}: {why}")
        if level == "error":
            raise FramingError(f"{what}; {fix}")
        logger.warning("framing_differs", camera=cam.name, model=model_name, detail=what)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), exactly (n is small: tens of frames)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p ** i * (1.0 - p) ** (n - i) for i in range(k, n + 1)))


def image_colour(image: np.ndarray) -> str:
    """``mono`` when the three channels are equal (a grey camera, delivered as RGB), else ``rgb``."""
    if image.ndim == 2 or image.shape[2] == 1:
        return "mono"
    return "mono" if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]) \
        else "rgb"


@dataclass
class _Camera:
    seen: int = 0
    fails: int = 0
    done: bool = False  # the test was made (or reported): nothing more to do for this camera
    framing_checked: bool = False


class StartupSanityCheck:
    """``observe(frame, verdict, amap)`` for the worker (see :class:`linewatch.service.worker.Observer`)."""

    def __init__(self, metrics: Metrics, false_reject_bound: float, n_frames: int, p_threshold: float,
                 submit_status: Callable[[Status], None] | None = None, run_id: str = "",
                 framing: dict[str, Any] | None = None, n_calibration: int = 0):
        self.metrics = metrics
        self.n_frames = n_frames
        self.p_threshold = p_threshold
        self.submit_status = submit_status
        self.run_id = run_id
        self._lock = threading.Lock()
        self._cams: dict[str, _Camera] = {}
        self.reported: dict[str, str] = {}  # camera → reason, for tests and heartbeats
        self.set_calibration(false_reject_bound, framing, n_calibration)

    def set_calibration(self, false_reject_bound: float, framing: dict[str, Any] | None = None,
                        n_calibration: int = 0) -> None:
        """A reloaded model: the check starts over against its calibration."""
        # the bound is never below 1/(n+1) in exact arithmetic; a bundle saying 0 must not make one fail "impossible"
        floor = 1.0 / (n_calibration + 1) if n_calibration > 0 else 1e-3
        with self._lock:
            self.bound = max(float(false_reject_bound), floor) if math.isfinite(false_reject_bound) else floor
            self.framing = framing
            self._cams = {}

    def observe(self, frame: Frame, verdict: Verdict, amap: np.ndarray) -> None:
        with self._lock:
            st = self._cams.get(verdict.camera)
            if st is None:
                st = self._cams[verdict.camera] = _Camera()
            check_framing = not st.framing_checked and self.framing is not None
            st.framing_checked = True
            if not st.done and self.n_frames > 0:
                st.seen += 1
                st.fails += int(verdict.failed)
                decide = st.seen >= self.n_frames
                if decide:
                    st.done = True
            else:
                decide = False
            seen, fails = st.seen, st.fails
        if check_framing:
            self._check_framing(frame)
        if decide:
            p = binomial_tail(fails, seen, self.bound)
            if p < self.p_threshold:
                self._report(verdict.camera, f"{fails} of the first {seen} verdicts failed; the calibration "
                             f"bound is {self.bound:.4g} (p = {p:.2g})", fails / seen, p)
            else:
                log.info("startup_check_ok", camera=verdict.camera, fails=fails, frames=seen,
                         bound=round(self.bound, 6), p=round(p, 6))

    def _check_framing(self, frame: Frame) -> None:
        from linewatch.model.bundle import camera_framing, describe_framing, framing_problem

        assert self.framing is not None
        roi = tuple(frame.roi) if tuple(frame.roi) != (0, 0, *frame.frame_size) else None
        cam = camera_framing(roi, tuple(frame.frame_size), image_colour(frame.host_image()))  # type: ignore[arg-type]
        problem = framing_problem(self.framing, cam)
        if problem is None:
            return
        level, why = problem
        text = f"camera framing {describe_framing(cam)} vs the model's {describe_framing(self.framing)}: {why}"
        if level == "warning":
            log.warning("framing_differs", camera=frame.camera, detail=text)
        else:
            self._report(frame.camera, text, None, None)

    def _report(self, camera: str, finding: str, fail_rate: float | None, p: float | None) -> None:
        with self._lock:
            if camera in self.reported:
                return  # once per camera
            st = self._cams.setdefault(camera, _Camera())
            st.done = True
            reason = f"{finding}: the camera does not see what the model was calibrated on; likely causes: " \
                     + "; ".join(LIKELY_CAUSES) + ". Re-record and re-calibrate if the change is intended"
            self.reported[camera] = reason
        self.metrics.calibration_mismatch.labels(camera).set(1)
        log.warning("calibration_mismatch", camera=camera, reason=reason, fail_rate=fail_rate,
                    p=None if p is None else float(f"{p:.3g}"))
        if self.submit_status is not None:
            try:
                self.submit_status(Status(kind="calibration_mismatch", time=time.time(), run_id=self.run_id,
                                          camera=camera, reason=reason, fail_rate=fail_rate))
            except Exception as exc:  # observers must never raise into the worker
                log.error("calibration_mismatch_status_failed", error=f"{type(exc).__name__}: {exc}")
