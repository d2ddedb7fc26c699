"""``linewatch run``: wires capture → worker → publisher, metrics, logging, signals and systemd.

Order at start: metrics and publisher first (so a port clash fails in a second, and subscribers can
connect while the model loads), then the model (capture needs its input size), then the worker and
the cameras. READY=1 once the model is loaded and every camera has had its first open attempt.

Shutdown (SIGTERM/SIGINT, or every source ended with ``daemon.exit_when_sources_end``): stop the
cameras, let the worker finish the queued frames, publish them, close — all within
``daemon.drain_timeout_s`` (frames left after that are counted as dropped, reason ``shutdown``).
A second signal (more than 2 s after the first) exits at once.

SIGHUP (`systemctl reload linewatch`): reload the model bundle and the CURVE client keys, see
:mod:`linewatch.service.reload`. Thread liveness (the watchdog) is :mod:`linewatch.service.liveness`,
process settings (thread pools, the garbage collector) :mod:`linewatch.service.runtime`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from linewatch import __version__
from linewatch.errors import BundleError
from linewatch.logsetup import configure_logging
from linewatch.messages import Status
from linewatch.service.capture import CameraThread
from linewatch.service.capture_process import CameraProcess, open_gate, start_gate
from linewatch.service.config import CameraConfig, LinewatchConfig
from linewatch.service.frames import FrameQueue
from linewatch.service.liveness import check_liveness
from linewatch.service.observers.archive import RejectArchive
from linewatch.service.observers.drift import DriftMonitor
from linewatch.service.observers.sanity import FramingError, StartupSanityCheck, check_cameras_framing
from linewatch.service.publisher import Publisher
from linewatch.service.reload import ModelReloader, publish_model_info
from linewatch.service.runtime import configure_threads, freeze_startup_objects
from linewatch.service.shm import slot_bytes_for
from linewatch.service.sources import Source
from linewatch.service.telemetry.prometheus import Metrics, MetricsServer
from linewatch.service.telemetry.sdnotify import SdNotifier

if TYPE_CHECKING:
    from linewatch.service.detector import Detector
    from linewatch.service.worker import InferenceWorker, Observer

log = structlog.get_logger("linewatch.daemon")

__all__ = ["Daemon", "FramingError", "run_daemon"]  # FramingError: raised at start, see _check_framing

CAMERA_READY_WAIT_S = 30.0  # at most this long for the first open attempts before READY=1
STATUS_EVERY_S = 5.0
FORCE_EXIT_AFTER_S = 2.0  # a second SIGTERM/SIGINT later than this after the first skips the drain


class Daemon:
    def __init__(self, cfg: LinewatchConfig, config_path: str | None = None, notifier: SdNotifier | None = None,
                 *, detector: Detector | None = None,
                 source_factory: Callable[[CameraConfig, FrameQueue], Source] | None = None,
                 queue_factory: Callable[[int, Metrics], FrameQueue] | None = None):
        self.cfg = cfg
        # For `linewatch bench` and tests: a detector already in memory instead of model.bundle, and sources
        # made by the caller (e.g. in-memory raw frames) instead of from each camera's source URL.
        self._preloaded = detector
        self._source_factory = source_factory
        self._queue_factory = queue_factory or FrameQueue  # the bench's queue also lets a camera wait for room
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
        self.cameras: list[CameraThread | CameraProcess] = []
        self.drift_monitor: DriftMonitor | None = None
        self.sanity: StartupSanityCheck | None = None
        self.archive: RejectArchive | None = None
        self.worker: InferenceWorker | None = None
        self.publisher: Publisher | None = None
        self.metrics_server: MetricsServer | None = None
        self.queue: FrameQueue | None = None
        self.model_id: str | None = None
        self.reloader = ModelReloader(cfg, self.metrics, self.run_id, on_swapped=self._model_swapped)
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
        """Reload the model bundle (and CURVE client keys) in the background; see :class:`ModelReloader`."""
        self.reloader.request()

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            # SIGHUP (`systemctl reload linewatch`): reload, never exit (Python's default would end us)
            signal.signal(signal.SIGHUP, self._on_hup)

    # -- status

    def _verdicts(self) -> float:
        return self.metrics.total(self.metrics.verdicts)

    def _update_fps(self) -> None:
        now, verdicts = time.monotonic(), self._verdicts()
        t0, v0 = self._fps_mark
        if now - t0 >= 1.0:
            self._fps = (verdicts - v0) / (now - t0)
            self._fps_mark = (now, verdicts)

    def camera_states(self) -> dict[str, str]:
        return {c.camera: c.state for c in self.cameras} or {c.name: "starting" for c in self.cfg.cameras}

    def heartbeat(self) -> Status:
        return Status(
            kind="heartbeat", time=time.time(), run_id=self.run_id, uptime_s=time.monotonic() - self.started,
            frames=int(self._verdicts()), fps=round(self._fps, 3),
            dropped=int(self.metrics.total(self.metrics.dropped)), cameras=self.camera_states(),
            model_id=self.model_id,
            health=self.drift_monitor.snapshot() if self.drift_monitor is not None else None,
        )

    def summary(self) -> str:
        states = self.camera_states()
        up = sum(s == "up" for s in states.values())
        fails = 0.0
        for metric in self.metrics.verdicts.collect():
            fails += sum(s.value for s in metric.samples if s.name.endswith("_total") and s.labels["verdict"] == "fail")
        return (f"{up}/{len(states)} cameras up, {self._fps:.1f} fps, {int(self._verdicts())} verdicts "
                f"({int(fails)} fail), {int(self.metrics.total(self.metrics.dropped))} dropped")

    def liveness(self) -> tuple[bool, str]:
        """(ok, reason) for the watchdog: see :func:`linewatch.service.liveness.check_liveness`."""
        return check_liveness(self.worker, self.publisher, self.cameras, self.cfg.daemon.stall_timeout_s)

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
        self._start_metrics_server()
        self._start_publisher()
        self._lifecycle("starting")
        threads = configure_threads(self.cfg.batching.torch_threads, len(self.cfg.cameras))
        det = self._load_model(threads)
        self._wait_for_subscriber()
        if self._stop.is_set():
            return
        freeze_startup_objects()
        self.queue = self._queue_factory(self.cfg.batching.frame_queue, self.metrics)
        self._start_worker(det, self._start_observers(det))
        self.reloader.attach(self.worker, self.publisher)
        # on a device that resizes (and decodes JPEG) itself, frames travel at ROI resolution
        self._start_cameras(None if getattr(det, "device_preprocess", False) else det.input_size)
        self._announce_ready()

    def _start_metrics_server(self) -> None:
        cfg = self.cfg.metrics
        if cfg.enabled:
            self.metrics_server = MetricsServer(self.metrics, cfg.host, cfg.port)
            self.log.info("metrics_listening", host=self.metrics_server.host, port=self.metrics_server.port,
                          url=f"http://{self.metrics_server.host}:{self.metrics_server.port}/metrics")

    def _start_publisher(self) -> None:
        cfg = self.cfg
        self.publisher = Publisher(cfg.publisher, self.metrics, queue_size=cfg.batching.publish_queue,
                                   run_id=self.run_id, status_provider=self.heartbeat)
        endpoint = self.publisher.bind()
        self.publisher.start()
        self.log.info("publisher_bound", endpoint=endpoint, masks=cfg.publisher.masks,
                      hwm_policy=cfg.publisher.hwm_policy)

    def _load_model(self, torch_threads: int) -> Detector:
        """The preloaded detector or ``model.bundle``, calibrated and warmed up (engine built before READY,
        not on frame 1)."""
        from linewatch.model import load_detector  # here, not at import: `check-config` should not pay for torch

        cfg = self.cfg
        t0 = time.monotonic()
        det = self._preloaded if self._preloaded is not None else load_detector(
            cfg.model.bundle, cfg.device, cfg.model.teacher_weights, engine=cfg.model.engine)
        cal = det.calibration  # no calibration → a LinewatchError telling to run calibrate
        # on CUDA the graph engine captures one graph per batch bucket up to the largest batch warm_up sees
        det.warm_up((1, cfg.batching.max_batch) if str(det.device).startswith("cuda") else (1,))
        self.model_id = det.model_id
        publish_model_info(self.metrics, det)
        self._check_framing(det)
        self.log.info("model_loaded", model_id=det.model_id, backbone=det.meta.backbone, bundle=str(cfg.model.bundle),
                      input_size=list(det.input_size), device=str(det.device), torch_threads=torch_threads,
                      engine=det.engine, image_threshold=cal.image_threshold, pixel_threshold=cal.pixel_threshold,
                      seconds=round(time.monotonic() - t0, 2))
        return det

    def _check_framing(self, det: Detector) -> None:
        """Each camera against the framing the model was calibrated on (the reload makes the same check)."""
        check_cameras_framing(self.cfg.cameras, getattr(det.meta, "framing", None), self.cfg.model.bundle.name,
                              self.log)

    def _wait_for_subscriber(self) -> None:
        wait_s = self.cfg.publisher.wait_for_subscriber_s
        publisher = self.publisher
        if wait_s > 0 and publisher is not None and not self._stop.is_set():
            self.log.info("waiting_for_subscriber", endpoint=publisher.endpoint, timeout_s=wait_s)
            got = self._wait(publisher.subscribed.is_set, wait_s)
            self.log.info("subscriber_wait_over", subscribed=got)

    def _start_observers(self, det: Detector) -> list[Observer]:
        """The drift monitor and the reject archive, as enabled: they see every verdict after publishing."""
        cfg = self.cfg
        cal = det.calibration
        observers: list[Observer] = []
        assert self.publisher is not None
        if cfg.health.startup_check_frames > 0:
            self.sanity = StartupSanityCheck(
                self.metrics, cal.false_reject_bound, cfg.health.startup_check_frames, cfg.health.startup_check_p,
                self.publisher.submit_status, self.run_id, framing=getattr(det.meta, "framing", None),
                n_calibration=len(cal.scores))
            observers.append(self.sanity.observe)
        if cfg.health.enabled:
            self.drift_monitor = DriftMonitor(cfg.health, self.metrics, cal.stats, self.publisher.submit_status,
                                              self.run_id)
            self.drift_monitor.start()
            observers.append(self.drift_monitor.observe)
        if cfg.archive.enabled:
            self.archive = RejectArchive(cfg.archive, self.metrics, cal.pixel_threshold)
            self.archive.start()
            observers.append(self.archive.observe)
            self.log.info("archive_enabled", dir=str(cfg.archive.dir), max_mb=cfg.archive.max_mb,
                          max_age_days=cfg.archive.max_age_days)
        return observers

    def _start_worker(self, det: Detector, observers: list[Observer]) -> None:
        from linewatch.service.deadlines import DeadlineTracker
        from linewatch.service.worker import InferenceWorker  # imports torch

        cfg = self.cfg
        assert self.queue is not None and self.publisher is not None
        # the drift monitor sees one verdict in health.sample_every_n per camera; the archive every fail
        sampled = [self.drift_monitor.observe] if self.drift_monitor is not None else []
        self.worker = InferenceWorker(det, self.queue, self.publisher.submit_verdict, self.metrics,
                                      max_batch=cfg.batching.max_batch, max_wait_ms=cfg.batching.max_wait_ms,
                                      masks=cfg.publisher.masks, run_id=self.run_id,
                                      observers=[o for o in observers if o not in sampled],
                                      sampled_observers=sampled, sample_every_n=cfg.health.sample_every_n,
                                      preview=self.publisher.wants_preview,
                                      deadlines=DeadlineTracker.for_cameras(cfg.cameras))
        self.worker.start()

    def _start_cameras(self, input_size: tuple[int, int] | None) -> None:
        """A capture process per camera (``capture.mode: process``), or a capture thread. Sources made by the
        caller (``source_factory``: the bench, tests) live in this process, so they get threads."""
        assert self.queue is not None
        cap = self.cfg.capture
        mode = "thread" if self._source_factory is not None else cap.mode
        jpeg = cap.jpeg_on_device(input_size is None)  # JPEG bytes to the worker, decoded on the model's device
        self.log.info("capture_mode", mode=mode, resize="device" if input_size is None else "capture",
                      jpeg_decode="device" if jpeg else "capture")
        gate = start_gate() if mode == "process" else None
        for cam_cfg in self.cfg.cameras:
            cam: CameraThread | CameraProcess
            if mode == "process":
                cam = CameraProcess(cam_cfg, self.queue, self.metrics, input_size, slots=cap.slots,
                                    slot_bytes=slot_bytes_for(input_size, cap.slot_mb, jpeg),
                                    on_state=self._on_camera_state, gate=gate, jpeg=jpeg,
                                    logging=(self.cfg.logging.format, self.cfg.logging.level))
            else:
                src = self._source_factory(cam_cfg, self.queue) if self._source_factory is not None else None
                cam = CameraThread(cam_cfg, self.queue, self.metrics, input_size, on_state=self._on_camera_state,
                                   source=src, jpeg=jpeg)
            self.cameras.append(cam)
            cam.start()
        if gate is not None:  # the processes start up in parallel; they begin reading together
            open_gate(gate, [c for c in self.cameras if isinstance(c, CameraProcess)])

    def _announce_ready(self) -> None:
        """READY=1 once every camera has had its first open attempt (or after a bounded wait)."""
        limit = min(CAMERA_READY_WAIT_S, max(c.timeout_s for c in self.cfg.cameras) + 1.0)
        self._wait(lambda: all(c.first_attempt.is_set() for c in self.cameras), limit)
        summary = self.summary()
        self.notifier.ready(summary)
        self._lifecycle("ready")
        self.log.info("ready", cameras=self.camera_states(), status=summary)

    def _wait(self, cond: Callable[[], bool], timeout: float) -> bool:
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
        last_ok = True
        while not self._stop.wait(tick):
            self._update_fps()
            ok, why = self.liveness()
            if ok:
                self.notifier.watchdog()
            if ok != last_ok:
                (self.log.info if ok else self.log.error)("health", healthy=ok, reason=why)
                last_ok = ok
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
            if not self._stop.is_set():
                self.reloader.poll()
            if self.cfg.daemon.exit_when_sources_end and self._all_done():
                self.log.info("sources_ended")
                self.request_stop("sources ended")

    def _model_swapped(self, det: Detector) -> None:
        """A reloaded model took over (on the worker thread): heartbeats and drift follow it."""
        self.model_id = det.model_id
        if self.drift_monitor is not None:
            self.drift_monitor.set_calibration(det.calibration.stats)
        if self.sanity is not None:
            cal = det.calibration
            self.sanity.set_calibration(cal.false_reject_bound, getattr(det.meta, "framing", None), len(cal.scores))

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
                self.log.warning("capture_thread_stuck", camera=c.camera)
        if self.worker is not None:
            self.worker.stop(deadline)
            self.worker.join(max(0.1, deadline - time.monotonic()) + 1.0)
            if self.worker.is_alive():
                self.log.warning("worker_stuck_at_shutdown")
        if self.archive is not None:
            self.archive.stop(max(0.5, deadline - time.monotonic()))
            if self.archive.pending:
                self.log.warning("archive_not_flushed", frames=self.archive.pending)
        if self.drift_monitor is not None:
            self.drift_monitor.stop()
        if self.publisher is not None:
            self._lifecycle("stopped", self._stop_reason)
            self.publisher.close(max(0.5, deadline - time.monotonic()))
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.notifier.close()
        dropped = {k: int(v) for k, v in self.metrics.by_label(self.metrics.dropped, "reason").items() if v}
        by_camera = {k: int(v) for k, v in self.metrics.by_label(self.metrics.dropped, "camera").items() if v}
        self.log.info("shutdown", reason=self._stop_reason, frames=int(self._verdicts()),
                      dropped=int(self.metrics.total(self.metrics.dropped)), dropped_by_reason=dropped,
                      dropped_by_camera=by_camera, published=self.publisher.sent if self.publisher else 0,
                      seconds=round(time.monotonic() - t0, 3),
                      last_seq={c.camera: c.sequence - 1 for c in self.cameras})


def run_daemon(cfg: LinewatchConfig, config_path: str | None = None) -> int:
    configure_logging(cfg.logging.format, cfg.logging.level)
    daemon = Daemon(cfg, config_path)
    daemon.install_signal_handlers()
    return daemon.run()
