"""SIGHUP (`systemctl reload linewatch`): load the model bundle again and swap it in between two batches.

The bundle at ``model.bundle`` is loaded in a background thread, off the inference path. A file that
does not load, has no calibration, has another input size, was calibrated on a framing that conflicts with a
configured camera (the start-up check, :func:`~linewatch.service.observers.sanity.check_cameras_framing`), or
fails a one-frame trial inference is rejected (log ``model_reload_rejected``, metric
``linewatch_model_reload_total{result="rejected"}``) and the running model stays. The CURVE authorized
client keys are re-read too. Nothing else in the config is re-read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from linewatch.errors import BundleError
from linewatch.service.observers.sanity import check_cameras_framing

if TYPE_CHECKING:
    from linewatch.service.config import LinewatchConfig
    from linewatch.service.detector import Detector
    from linewatch.service.publisher import Publisher
    from linewatch.service.telemetry.prometheus import Metrics
    from linewatch.service.worker import InferenceWorker

log = structlog.get_logger("linewatch.daemon")

RELOAD_FIX = ("kept the running model; calibrate the new bundle on this camera's framing (linewatch record, then "
              "linewatch calibrate --config) or change the camera's roi and restart the daemon")


def publish_model_info(metrics: Metrics, det: Detector) -> None:
    """``linewatch_model_info`` and the threshold gauges for the model now in use."""
    cal = det.calibration
    metrics.set_model(backbone=det.meta.backbone, model_id=det.model_id, input_size=det.input_size,
                      device=str(det.device), image_threshold=cal.image_threshold,
                      pixel_threshold=cal.pixel_threshold)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class ModelReloader:
    """Owned by the daemon: :meth:`request` from the signal handler, :meth:`poll` from the daemon's loop,
    which starts at most one reload thread at a time. ``on_swapped(detector)`` runs on the worker thread
    right after the worker swapped the new model in (before the next verdict)."""

    def __init__(self, cfg: LinewatchConfig, metrics: Metrics, run_id: str,
                 on_swapped: Callable[[Detector], None] | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.log = log.bind(run_id=run_id)
        self.on_swapped = on_swapped
        self.worker: InferenceWorker | None = None
        self.publisher: Publisher | None = None
        self._requested = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, worker: InferenceWorker | None, publisher: Publisher | None) -> None:
        """The running worker and publisher (the daemon creates them after the reloader)."""
        self.worker = worker
        self.publisher = publisher

    def request(self) -> None:
        """Ask for a reload (safe from a signal handler); requests during a reload start one more afterwards."""
        self._requested.set()

    def poll(self) -> None:
        """Start the reload thread if a reload was asked for and none is running."""
        if self._requested.is_set() and (self._thread is None or not self._thread.is_alive()):
            self._requested.clear()
            self._thread = threading.Thread(target=self.reload, name="model-reload", daemon=True)
            self._thread.start()

    def reload(self) -> None:
        """Re-read the client keys, then load ``model.bundle`` and hand it to the worker, which swaps it in
        between two batches. Runs on the reload thread; never raises."""
        self._reload_client_keys()
        worker = self.worker
        if worker is None:
            return
        import torch

        from linewatch.model import load_detector

        cfg = self.cfg
        old = worker.model_id
        t0 = time.monotonic()
        self.log.info("model_reload_begin", bundle=str(cfg.model.bundle), model_id=old)
        try:
            det = load_detector(cfg.model.bundle, cfg.device, cfg.model.teacher_weights, engine=cfg.model.engine)
            cal = det.calibration  # LinewatchError without calibration
            if det.model_id == old:
                self.metrics.model_reloads.labels("unchanged").inc()
                self.log.info("model_reload_unchanged", model_id=old, bundle=str(cfg.model.bundle))
                return
            # a bundle framed otherwise would fail every frame of that camera: refuse it as start-up would
            check_cameras_framing(cfg.cameras, getattr(det.meta, "framing", None), cfg.model.bundle.name, self.log,
                                  fix=RELOAD_FIX)
            running = tuple(worker.detector.input_size)
            if tuple(det.input_size) != running:
                raise BundleError(f"input size {list(det.input_size)} differs from the running model's "
                                  f"{list(running)} (the cameras resize to it); restart the daemon to change it")
            h, w = det.input_size
            # the trial also prepares the inference copy (BatchNorm folding, tracing): torch.fx tracing is not
            # safe while another thread runs a model, so inference pauses for it (frames wait in the queue)
            t_pause = time.monotonic()
            with worker.model_lock:
                if torch.device(det.device).type == "cuda":  # graph engine: capture buckets up to the max batch
                    det.warm_up((1, worker.max_batch))
                trial = det.predict(torch.zeros((1, h, w, 3), dtype=torch.uint8))
            paused = round(time.monotonic() - t_pause, 3)
            if tuple(trial.maps.shape) != (1, h, w) or not bool(torch.isfinite(trial.scores).all()):
                raise BundleError(f"a trial inference gave maps {tuple(trial.maps.shape)} and scores "
                                  f"{trial.scores.tolist()}; expected (1, {h}, {w}) and finite scores")
            worker.swap_detector(det, self._swapped)
        except Exception as exc:
            self.metrics.model_reloads.labels("rejected").inc()
            self.log.error("model_reload_rejected", bundle=str(cfg.model.bundle), reason=_first_line(exc),
                           error_type=type(exc).__name__, model_id=old, action="kept the running model")
            return
        self.log.info("model_reload_ready", new_model_id=det.model_id, backbone=det.meta.backbone,
                      inference_paused_s=paused,
                      image_threshold=cal.image_threshold, pixel_threshold=cal.pixel_threshold,
                      seconds=round(time.monotonic() - t0, 2))

    def _reload_client_keys(self) -> None:
        if self.publisher is None:
            return
        try:
            n = self.publisher.reload_authorized_clients()
            if n is not None:
                self.log.info("authorized_clients_reloaded", keys=n)
        except Exception as exc:
            self.log.error("authorized_clients_reload_rejected", error=_first_line(exc),
                           action="kept the previous keys")

    def _swapped(self, old_id: str, det: Detector) -> None:
        """Runs on the worker thread right after the swap: the next verdict carries the new model_id."""
        cal = det.calibration
        if self.on_swapped is not None:
            self.on_swapped(det)
        publish_model_info(self.metrics, det)
        self.metrics.model_reloads.labels("ok").inc()
        self.log.info("model_reloaded", old_model_id=old_id, new_model_id=det.model_id,
                      bundle=str(self.cfg.model.bundle), image_threshold=cal.image_threshold,
                      pixel_threshold=cal.pixel_threshold)
