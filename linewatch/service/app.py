"""``linewatch run``: wires capture → worker → publisher, metrics, logging, signals and systemd.

Order at start: metrics and publisher first (so a port clash fails in a second, and subscribers can
connect while the model loads), then the model (capture needs its input size), then the worker and
the cameras. READY=1 once the model is loaded and every camera has had its first open attempt.

Shutdown (SIGTERM/SIGINT, or every source ended with ``daemon.exit_when_sources_end``): stop the
cameras, let the worker finish the queued frames, publish them, close — all within
``daemon.drain_timeout_s`` (frames left after that are counted as dropped, reason ``shutdown``).
A second signal (more than 2 s after the first) exits at once.

SIGHUP (`systemctl reload linewatch`): reload the model bundle at ``model.bundle`` in a background
thread and swap it in between two batches; a bad file is rejected and the running model stays. The
CURVE authorized client keys are re-read too. Nothing else in the config is re-read.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import structlog

from linewatch import __version__
from linewatch.errors import BundleError
from linewatch.logsetup import configure_logging
from linewatch.messages import Status
from linewatch.service.capture import CameraThread, FrameQueue, Source
from linewatch.service.config import CameraConfig, LinewatchConfig
from linewatch.service.observers.archive import RejectArchive
from linewatch.service.observers.drift import HealthMonitor
from linewatch.service.publisher import Publisher
from linewatch.service.telemetry.prometheus import Metrics, MetricsServer
from linewatch.service.telemetry.sdnotify import SdNotifier

if TYPE_CHECKING:
    from linewatch.model import Detector
    from linewatch.service.worker import InferenceWorker

log = structlog.get_logger("linewatch.daemon")

CAMERA_READY_WAIT_S = 30.0  # at most this long for the first open attempts before READY=1
STATUS_EVERY_S = 5.0
FORCE_EXIT_AFTER_S = 2.0  # a second SIGTERM/SIGINT later than this after the first skips the drain


def auto_torch_threads(n_cameras: int) -> int:
    """Leave cores for the capture threads (decode + resize), give the rest to inference."""
    cpus = os.cpu_count() or 1
    return max(1, cpus - min(n_cameras, cpus // 2))


class Daemon:
    def __init__(self, cfg: LinewatchConfig, config_path: str | None = None, notifier: SdNotifier | None = None,
                 *, detector: Detector | None = None,
                 source_factory: Callable[[CameraConfig, FrameQueue], Source] | None = None):
        self.cfg = cfg
        # For `linewatch bench` and tests: a detector already in memory instead of model.bundle, and sources
        # made by the caller (e.g. in-memory raw frames) instead of from each camera's source URL.
        self._preloaded = detector
        self._source_factory = source_factory
        self.config_path = config_path
        self.notifier = notifier or SdNotifier()
        self.run_id = uuid.uuid4().hex[:12]
        self.metrics = Metrics()
        self.metrics.init_cameras([c.name for c in cfg.cameras])
        self._stop = threading.Event()
        self._stop_reason = "signal"
        self._first_signal: float | None = None
        self._exit_code = 0
        self.started = time.monotonic()
        self.cameras: list[CameraThread] = []
        self.health_monitor: HealthMonitor | None = None
        self.archive: RejectArchive | None = None
        self.worker: InferenceWorker | None = None
        self.publisher: Publisher | None = None
        self.metrics_server: MetricsServer | None = None
        self.queue: FrameQueue | None = None
        self.model_id: str | None = None
        self._reload_requested = threading.Event()  # SIGHUP: reload the model bundle (and client keys)
        self._reload_thread: threading.Thread | None = None
        self._fps = 0.0
        self._fps_mark = (time.monotonic(), 0.0)
        self.log = log.bind(run_id=self.run_id)

    # -- control

    def request_stop(self, reason: str = "requested") -> None:
        self._stop_reason = reason
        self._stop.set()

    def _on_signal(self, signum: int, _frame: object) -> None:
        now = time.monotonic()
        if self._first_signal is not None and now - self._first_signal > FORCE_EXIT_AFTER_S:
            # the operator insists: no drain (status 128+signal, as a shell would report)
            os._exit(128 + signum)
        if self._first_signal is None:
            self._first_signal = now
            self.request_stop(signal.Signals(signum).name)
        # a repeat within FORCE_EXIT_AFTER_S is the same stop request delivered twice (e.g. to the
        # process and its group by `timeout`): ignore it

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self.request_reload()

    def request_reload(self) -> None:
        """Reload the model bundle (and CURVE client keys) in the background; see :meth:`_reload`."""
        self._reload_requested.set()

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            # SIGHUP (`systemctl reload linewatch`): reload, never exit (Python's default would end us)
            signal.signal(signal.SIGHUP, self._on_hup)

    # -- status

    def _frames(self) -> float:
        return self.metrics.total(self.metrics.frames)

    def _update_fps(self) -> None:
        now, frames = time.monotonic(), self._frames()
        t0, f0 = self._fps_mark
        if now - t0 >= 1.0:
            self._fps = (frames - f0) / (now - t0)
            self._fps_mark = (now, frames)

    def camera_states(self) -> dict[str, str]:
        return {c.name_: c.state for c in self.cameras} or {c.name: "starting" for c in self.cfg.cameras}

    def heartbeat(self) -> Status:
        return Status(
            kind="heartbeat", time=time.time(), run_id=self.run_id, uptime_s=time.monotonic() - self.started,
            frames=int(self._frames()), fps=round(self._fps, 3), dropped=int(self.metrics.total(self.metrics.dropped)),
            cameras=self.camera_states(), model_id=self.model_id,
            health=self.health_monitor.snapshot() if self.health_monitor is not None else None,
        )

    def summary(self) -> str:
        states = self.camera_states()
        up = sum(s == "up" for s in states.values())
        fails = 0.0
        for metric in self.metrics.frames.collect():
            fails += sum(s.value for s in metric.samples if s.name.endswith("_total") and s.labels["verdict"] == "fail")
        return (f"{up}/{len(states)} cameras up, {self._fps:.1f} fps, {int(self._frames())} verdicts "
                f"({int(fails)} fail), {int(self.metrics.total(self.metrics.dropped))} dropped")

    def health(self) -> tuple[bool, str]:
        """Healthy = every stage alive and, where frames wait, making progress (idle with no frames is fine)."""
        now = time.monotonic()
        stall = self.cfg.daemon.stall_timeout_s
        w = self.worker
        if w is None or not w.healthy:
            return False, "inference worker dead or failing"
        if w.busy_since is not None and now - w.busy_since > stall:
            return False, f"a batch has been in the model for {now - w.busy_since:.0f} s"
        if now - w.last_tick > stall:
            return False, "inference worker stalled"
        p = self.publisher
        if p is None or not p.healthy or now - p.last_tick > stall:
            return False, "publisher stalled"
        for c in self.cameras:
            if c.state != "ended" and not c.is_alive():
                return False, f"capture thread of {c.name_} died"
        return True, "ok"

    def _on_camera_state(self, camera: str, state: str, reason: str | None) -> None:
        if self.publisher is not None:
            self.publisher.submit_status(Status(kind="camera", time=time.time(), run_id=self.run_id,
                                                camera=camera, state=state, reason=reason))

    def _lifecycle(self, state: str, reason: str | None = None) -> None:
        if self.publisher is not None:
            self.publisher.submit_status(Status(kind="lifecycle", time=time.time(), run_id=self.run_id,
                                                state=state, reason=reason, model_id=self.model_id))

    # -- run

    def run(self) -> int:
        cfg = self.cfg
        if self._preloaded is None and not cfg.model.bundle.is_file():
            # before anything is started or logged: the commonest deployment mistake gets one clean line
            raise BundleError(f"model file {cfg.model.bundle} not found; re-create it with `linewatch calibrate` "
                              "or fix model.bundle in the config")
        self.log.info("start", version=__version__, pid=os.getpid(), config=self.config_path,
                      cameras=[c.name for c in cfg.cameras], device=cfg.device)
        self.metrics.start_time.set(time.time())
        try:
            self._start()
            if not self._stop.is_set():
                self._loop()
        except BaseException as exc:
            self._stop_reason = f"startup failed: {type(exc).__name__}"
            raise
        finally:
            self._shutdown()
        return self._exit_code

    def _start(self) -> None:
        cfg = self.cfg
        if cfg.metrics.enabled:
            self.metrics_server = MetricsServer(self.metrics, cfg.metrics.host, cfg.metrics.port)
            self.log.info("metrics_listening", host=self.metrics_server.host, port=self.metrics_server.port,
                          url=f"http://{self.metrics_server.host}:{self.metrics_server.port}/metrics")
        self.publisher = Publisher(cfg.publisher, self.metrics, queue_size=cfg.batching.publish_queue,
                                   run_id=self.run_id, status_provider=self.heartbeat)
        endpoint = self.publisher.bind()
        self.publisher.start()
        self.log.info("publisher_bound", endpoint=endpoint, masks=cfg.publisher.masks,
                      hwm_policy=cfg.publisher.hwm_policy)
        self._lifecycle("starting")

        import torch  # here, not at import: `check-config` and `subscribe` should not pay for torch

        from linewatch.model import load_detector
        from linewatch.service.worker import InferenceWorker

        threads = cfg.batching.torch_threads or auto_torch_threads(len(cfg.cameras))
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)  # one batch at a time: inter-op parallelism only adds threads
        except RuntimeError:
            pass  # already fixed for this process (e.g. in tests): keep it
        cv2.setNumThreads(1)  # capture threads already run in parallel; per-call OpenCV threads oversubscribe
        t0 = time.monotonic()
        det = self._preloaded if self._preloaded is not None else load_detector(
            cfg.model.bundle, cfg.device, cfg.model.teacher_weights, engine=cfg.model.engine)
        cal = det.calibration  # no calibration → a LinewatchError telling to run calibrate
        if hasattr(det, "warm_up"):
            det.warm_up()  # build the inference engine (BatchNorm folding, tracing) before READY, not on frame 1
        self.model_id = det.model_id
        self.metrics.set_model(backbone=det.meta.backbone, model_id=det.model_id, input_size=det.input_size,
                               device=str(det.device), image_threshold=cal.image_threshold,
                               pixel_threshold=cal.pixel_threshold)
        self.log.info("model_loaded", model_id=det.model_id, backbone=det.meta.backbone, bundle=str(cfg.model.bundle),
                      input_size=list(det.input_size), device=str(det.device), torch_threads=threads,
                      engine=getattr(det, "engine", None),
                      image_threshold=cal.image_threshold, pixel_threshold=cal.pixel_threshold,
                      seconds=round(time.monotonic() - t0, 2))
        if cfg.publisher.wait_for_subscriber_s > 0 and not self._stop.is_set():
            self.log.info("waiting_for_subscriber", endpoint=self.publisher.endpoint,
                          timeout_s=cfg.publisher.wait_for_subscriber_s)
            got = self._wait(lambda: self.publisher.subscribed.is_set(), cfg.publisher.wait_for_subscriber_s)
            self.log.info("subscriber_wait_over", subscribed=got)
        if self._stop.is_set():
            return
        # What is loaded by now (torch, the model, the libraries) lives as long as the daemon: take it out of
        # the cyclic garbage collector's sight, so that its full collections scan only what streaming
        # allocates. Otherwise each one (rare: every few minutes at most) walks ~1e6 objects and stops every
        # thread for ~200 ms on a small CPU, a latency spike for the frames in flight. Reference counting
        # still frees everything as before; only cycles among these startup objects are never collected.
        gc.collect()
        gc.freeze()
        self.queue = FrameQueue(cfg.batching.frame_queue, self.metrics)
        observers = []
        if cfg.health.enabled:
            self.health_monitor = HealthMonitor(cfg.health, self.metrics, cal.stats, self.publisher.submit_status,
                                                self.run_id)
            self.health_monitor.start()
            observers.append(self.health_monitor.observe)
        if cfg.archive.enabled:
            self.archive = RejectArchive(cfg.archive, self.metrics, cal.pixel_threshold)
            self.archive.start()
            observers.append(self.archive.observe)
            self.log.info("archive_enabled", dir=str(cfg.archive.dir), max_mb=cfg.archive.max_mb,
                          max_age_days=cfg.archive.max_age_days)
        self.worker = InferenceWorker(det, self.queue, self.publisher.submit_verdict, self.metrics,
                                      max_batch=cfg.batching.max_batch, max_wait_ms=cfg.batching.max_wait_ms,
                                      masks=cfg.publisher.masks, run_id=self.run_id, observers=observers)
        self.worker.start()
        for cam_cfg in cfg.cameras:
            src = self._source_factory(cam_cfg, self.queue) if self._source_factory is not None else None
            cam = CameraThread(cam_cfg, self.queue, self.metrics, det.input_size, on_state=self._on_camera_state,
                               source=src)
            self.cameras.append(cam)
            cam.start()
        limit = min(CAMERA_READY_WAIT_S, max(c.timeout_s for c in cfg.cameras) + 1.0)
        self._wait(lambda: all(c.first_attempt.is_set() for c in self.cameras), limit)
        summary = self.summary()
        self.notifier.ready(summary)
        self._lifecycle("ready")
        self.log.info("ready", cameras=self.camera_states(), status=summary)

    def _wait(self, cond, timeout: float) -> bool:
        """Wait for ``cond()`` up to ``timeout`` s, or until a stop is requested."""
        end = time.monotonic() + timeout
        while not cond():
            if self._stop.is_set() or time.monotonic() >= end:
                return cond()
            self._stop.wait(0.02)
        return True

    def _loop(self) -> None:
        wd = self.notifier.watchdog_s
        tick = min(1.0, wd / 2.0) if wd else 1.0
        next_status = 0.0
        last_health = True
        while not self._stop.wait(tick):
            self._update_fps()
            ok, why = self.health()
            if ok:
                self.notifier.watchdog()
            if ok != last_health:
                (self.log.info if ok else self.log.error)("health", healthy=ok, reason=why)
                last_health = ok
            now = time.monotonic()
            if now >= next_status:
                self.notifier.status(self.summary() if ok else f"unhealthy: {why}")
                next_status = now + STATUS_EVERY_S
            dead = []
            if self.worker is None or not self.worker.is_alive():
                dead.append("inference worker")
            if self.publisher is None or not self.publisher.healthy:
                dead.append("publisher")
            if dead:
                # a core thread crashed (a bug, logged where it happened): exit non-zero so the
                # supervisor restarts us instead of leaving a daemon that inspects nothing
                self.log.error("fatal", reason=f"{', '.join(dead)} stopped")
                self._exit_code = 1
                self.request_stop(f"{dead[0]} stopped")
                break
            if self._reload_requested.is_set() and not self._stop.is_set() and (
                    self._reload_thread is None or not self._reload_thread.is_alive()):
                self._reload_requested.clear()  # signals during a reload start one more afterwards
                self._reload_thread = threading.Thread(target=self._reload, name="model-reload", daemon=True)
                self._reload_thread.start()
            if self.cfg.daemon.exit_when_sources_end and self._all_done():
                self.log.info("sources_ended")
                self.request_stop("sources ended")

    # -- model reload (SIGHUP)

    def _reload(self) -> None:
        """Load ``model.bundle`` again off the inference path; hand it to the worker, which swaps it in
        between two batches. A file that does not load, has no calibration, another input size, or fails a
        one-frame trial inference is rejected (log ``model_reload_rejected``, metric
        ``linewatch_model_reload_total{result="rejected"}``) and the running model stays."""
        if self.publisher is not None:
            try:
                n = self.publisher.reload_authorized_clients()
                if n is not None:
                    self.log.info("authorized_clients_reloaded", keys=n)
            except Exception as exc:
                self.log.error("authorized_clients_reload_rejected", error=str(exc).splitlines()[0] if str(exc)
                               else type(exc).__name__, action="kept the previous keys")
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
            running = tuple(worker.detector.input_size)
            if tuple(det.input_size) != running:
                raise BundleError(f"input size {list(det.input_size)} differs from the running model's "
                                  f"{list(running)} (the cameras resize to it); restart the daemon to change it")
            h, w = det.input_size
            # the trial also prepares the inference copy (BatchNorm folding, tracing): torch.fx tracing is not
            # safe while another thread runs a model, so inference pauses for it (frames wait in the queue)
            t_pause = time.monotonic()
            with worker.model_lock:
                trial = det.predict(torch.zeros((1, h, w, 3), dtype=torch.uint8))
            paused = round(time.monotonic() - t_pause, 3)
            if tuple(trial.maps.shape) != (1, h, w) or not bool(torch.isfinite(trial.scores).all()):
                raise BundleError(f"a trial inference gave maps {tuple(trial.maps.shape)} and scores "
                                  f"{trial.scores.tolist()}; expected (1, {h}, {w}) and finite scores")
            worker.swap_detector(det, self._on_model_swapped)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.metrics.model_reloads.labels("rejected").inc()
            self.log.error("model_reload_rejected", bundle=str(cfg.model.bundle), reason=reason,
                           error_type=type(exc).__name__, model_id=old, action="kept the running model")
            return
        self.log.info("model_reload_ready", new_model_id=det.model_id, backbone=det.meta.backbone,
                      inference_paused_s=paused,
                      image_threshold=cal.image_threshold, pixel_threshold=cal.pixel_threshold,
                      seconds=round(time.monotonic() - t0, 2))

    def _on_model_swapped(self, old_id: str, det: Detector) -> None:
        """Runs on the worker thread right after the swap: the next verdict carries the new model_id."""
        cal = det.calibration
        self.model_id = det.model_id
        self.metrics.set_model(backbone=det.meta.backbone, model_id=det.model_id, input_size=det.input_size,
                               device=str(det.device), image_threshold=cal.image_threshold,
                               pixel_threshold=cal.pixel_threshold)
        self.metrics.model_reloads.labels("ok").inc()
        if self.health_monitor is not None:
            self.health_monitor.set_calibration(cal.stats)
        self.log.info("model_reloaded", old_model_id=old_id, new_model_id=self.model_id,
                      bundle=str(self.cfg.model.bundle), image_threshold=cal.image_threshold,
                      pixel_threshold=cal.pixel_threshold)

    def _all_done(self) -> bool:
        return (all(c.state == "ended" for c in self.cameras) and self.queue is not None and len(self.queue) == 0
                and self.worker is not None and self.worker.busy_since is None
                and (self.publisher is None or self.publisher.pending == 0))

    def _shutdown(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.cfg.daemon.drain_timeout_s
        self.log.info("shutdown_begin", reason=self._stop_reason)
        self.notifier.stopping(f"stopping ({self._stop_reason})")
        self._lifecycle("stopping", self._stop_reason)
        for c in self.cameras:
            c.stop()
        for c in self.cameras:
            c.join(max(0.0, min(5.0, deadline - time.monotonic())))
            if c.is_alive():
                self.log.warning("capture_thread_stuck", camera=c.name_)
        if self.worker is not None:
            self.worker.stop(deadline)
            self.worker.join(max(0.1, deadline - time.monotonic()) + 1.0)
            if self.worker.is_alive():
                self.log.warning("worker_stuck_at_shutdown")
        if self.archive is not None:
            self.archive.stop(max(0.5, deadline - time.monotonic()))
            if self.archive.pending:
                self.log.warning("archive_not_flushed", frames=self.archive.pending)
        if self.health_monitor is not None:
            self.health_monitor.stop()
        if self.publisher is not None:
            self._lifecycle("stopped", self._stop_reason)
            self.publisher.close(max(0.5, deadline - time.monotonic()))
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.notifier.close()
        dropped = {k: int(v) for k, v in self.metrics.by_label(self.metrics.dropped, "reason").items() if v}
        by_camera = {k: int(v) for k, v in self.metrics.by_label(self.metrics.dropped, "camera").items() if v}
        self.log.info("shutdown", reason=self._stop_reason, frames=int(self._frames()),
                      dropped=int(self.metrics.total(self.metrics.dropped)), dropped_by_reason=dropped,
                      dropped_by_camera=by_camera, published=self.publisher.sent if self.publisher else 0,
                      seconds=round(time.monotonic() - t0, 3),
                      last_seq={c.name_: c.sequence - 1 for c in self.cameras})


def run_daemon(cfg: LinewatchConfig, config_path: str | None = None) -> int:
    configure_logging(cfg.logging.format, cfg.logging.level)
    daemon = Daemon(cfg, config_path)
    daemon.install_signal_handlers()
    return daemon.run()
