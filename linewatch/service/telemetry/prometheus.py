"""Every Prometheus metric the daemon exports, on its own registry (tests can build several).

Drop reasons (``linewatch_frames_dropped_total{reason}``):
  queue_full          the camera's frame queue was full: its oldest frame made room for the newest
  decode_error        a frame or image file that could not be decoded
  inference_error     the model raised on a batch (logged); its frames got no verdict
  publish_queue_full  verdicts waiting for the publisher overflowed: the oldest went
  publish_hwm         ZeroMQ refused the message (a subscriber at its high-water mark)
  publish_error       the message could not be encoded or sent (logged)
  shutdown            frames still queued when the drain timeout ran out
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from linewatch.errors import ConfigError

DROP_REASONS = ("queue_full", "decode_error", "inference_error", "publish_queue_full", "publish_hwm",
                "publish_error", "shutdown")

# Latency: from a few ms (GPU, small batches) to seconds (CPU, large frames, backlog).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
INFERENCE_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# Raw scores live on a model-specific scale, so the distribution is kept as score / image threshold:
# 1.0 is the decision boundary whatever the model, and the buckets are dense around it.
SCORE_RATIO_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0, 5.0)
# Where a frame's time goes (``linewatch_stage_seconds_total{stage}``, `linewatch bench --profile`):
#   read         source.read(): file/JPEG decode; for live cameras also the wait for the next frame
#   prepare      ROI crop, resize to the model input, RGB (capture thread)
#   queue_wait   frame queue → batch (per frame)
#   preprocess   batch assembly into the reused (pinned on CUDA) uint8 buffer (worker)
#   forward      Detector.predict: upload, normalisation, teacher+student, anomaly map, download (per batch)
#   postprocess  threshold, defect regions, verdict, metrics (worker, per frame)
#   publish      mask PNG, header JSON, ZeroMQ send (publisher thread, per verdict)
STAGES = ("read", "prepare", "queue_wait", "preprocess", "forward", "postprocess", "publish")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        # *_created series double the exposition for no dashboard use (process-wide switch in the client)
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_* series (resident memory, open fds, CPU seconds, start time): what an SRE and the soak read
        # to see a leak, from the same scrape as everything else
        ProcessCollector(registry=r)
        self.latency = Histogram("linewatch_latency_seconds", "Capture to verdict time per frame",
                                 ["camera"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("linewatch_inference_seconds", "Model time per batch",
                                   buckets=INFERENCE_BUCKETS, registry=r)
        self.batch_size = Histogram("linewatch_batch_size", "Frames per inference batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("linewatch_queue_wait_seconds", "Time a frame waited for its batch",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.score_ratio = Histogram("linewatch_score_ratio", "Anomaly score divided by the image threshold "
                                     "(>1 fails)", ["camera"], buckets=SCORE_RATIO_BUCKETS, registry=r)
        self.frames = Counter("linewatch_frames", "Frames with a verdict", ["camera", "verdict"], registry=r)
        self.captured = Counter("linewatch_frames_captured", "Frames read and queued for inference", ["camera"],
                                registry=r)
        self.skipped = Counter("linewatch_frames_skipped", "Live frames skipped by design to honour the fps cap",
                               ["camera"], registry=r)
        self.dropped = Counter("linewatch_frames_dropped", "Frames that got no (delivered) verdict, by reason",
                               ["camera", "reason"], registry=r)
        self.decode_errors = Counter("linewatch_decode_errors", "Frames or files that could not be decoded",
                                     ["camera"], registry=r)
        self.reconnects = Counter("linewatch_reconnects", "Attempts to reopen a lost or unopenable source",
                                  ["camera"], registry=r)
        self.published = Counter("linewatch_messages_published", "Messages handed to ZeroMQ", ["topic"],
                                 registry=r)
        self.status_dropped = Counter("linewatch_status_dropped", "Status messages not sent, by reason",
                                      ["reason"], registry=r)
        self.camera_up = Gauge("linewatch_camera_up", "1 while the camera delivers frames", ["camera"], registry=r)
        self.queue_depth = Gauge("linewatch_queue_depth", "Items waiting in a queue", ["queue"], registry=r)
        self.threshold = Gauge("linewatch_threshold", "Calibrated thresholds of the loaded model", ["kind"],
                               registry=r)
        self.start_time = Gauge("linewatch_start_time_seconds", "Unix time the daemon started", registry=r)
        self.model_info = Info("linewatch_model", "The loaded model bundle", registry=r)
        # a counter per stage (not a histogram): one addition per frame or batch, cheap enough to stay on
        self.stage_seconds = Counter("linewatch_stage_seconds", "Seconds spent per pipeline stage, summed over "
                                     "frames (÷ frames = per-frame cost); stages: " + ", ".join(STAGES),
                                     ["stage"], registry=r)
        self.stage = {name: self.stage_seconds.labels(name) for name in STAGES}
        # reliability: out-of-memory handling, model reloads (SIGHUP), subscriber authentication
        self.oom = Counter("linewatch_oom", "Inference batches that ran out of (GPU) memory and were split "
                           "and retried at a smaller size", registry=r)
        self.effective_max_batch = Gauge("linewatch_effective_max_batch", "Largest batch the worker currently "
                                         "sends to the model (lowered after an out-of-memory error)", registry=r)
        self.model_reloads = Counter("linewatch_model_reload", "Model reload attempts (SIGHUP), by result: ok, "
                                     "unchanged, rejected", ["result"], registry=r)
        self.auth_refused = Counter("linewatch_subscribers_refused", "Subscriber connections refused by CURVE "
                                    "client authentication (key not in publisher.curve.authorized_clients_dir)",
                                    registry=r)
        # drift and camera health (linewatch.service.observers.drift)
        self.fail_rate = Gauge("linewatch_fail_rate", "Rolling fraction of fails over the last health.window "
                               "verdicts", ["camera"], registry=r)
        self.score_median_ratio = Gauge("linewatch_score_median_ratio", "Rolling median score / the calibration "
                                        "images' median score (drift: ~1 when the line looks like calibration)",
                                        ["camera"], registry=r)
        self.condition = Gauge("linewatch_camera_condition", "1 for the camera's current image condition "
                               "(ok, black, frozen, blurred)", ["camera", "condition"], registry=r)
        self.brightness = Gauge("linewatch_frame_brightness", "Mean grey level (0-255) of the last checked frame",
                                ["camera"], registry=r)
        self.sharpness_ratio = Gauge("linewatch_frame_sharpness_ratio", "Sharpness of the last checked frame / "
                                     "calibration median", ["camera"], registry=r)
        self.health_skipped = Counter("linewatch_health_skipped", "Frames not health-checked because the health "
                                      "thread was busy (checks are sampled; verdicts unaffected)", registry=r)
        # reject archive (linewatch.service.observers.archive)
        self.archive_written = Counter("linewatch_archive_written", "Failing frames saved to the reject archive",
                                       registry=r)
        self.archive_deleted = Counter("linewatch_archive_deleted", "Archive entries deleted, by reason",
                                       ["reason"], registry=r)
        self.archive_dropped = Counter("linewatch_archive_dropped", "Failing frames not archived, by reason",
                                       ["reason"], registry=r)
        self.archive_bytes = Gauge("linewatch_archive_bytes", "Bytes held in the reject archive", registry=r)
        self._lock = threading.Lock()

    def init_cameras(self, cameras: Iterable[str]) -> None:
        """Create every label set up front so dashboards see 0, not 'no data', before the first event."""
        for cam in cameras:
            for verdict in ("pass", "fail"):
                self.frames.labels(cam, verdict)
            for reason in DROP_REASONS:
                self.dropped.labels(cam, reason)
            self.captured.labels(cam)
            self.skipped.labels(cam)
            self.decode_errors.labels(cam)
            self.reconnects.labels(cam)
            self.camera_up.labels(cam).set(0)
            self.latency.labels(cam)
            self.score_ratio.labels(cam)
            for cond in ("ok", "black", "frozen", "blurred"):
                self.condition.labels(cam, cond).set(1 if cond == "ok" else 0)
        for q in ("frames", "publish"):
            self.queue_depth.labels(q).set(0)
        for reason in ("age", "size"):
            self.archive_deleted.labels(reason)
        for reason in ("queue_full", "write_error"):
            self.archive_dropped.labels(reason)
        for topic in ("verdict", "status"):
            self.published.labels(topic)
        for reason in ("queue_full", "publish_hwm", "publish_error"):
            self.status_dropped.labels(reason)
        for result in ("ok", "unchanged", "rejected"):
            self.model_reloads.labels(result)

    def drop(self, camera: str, reason: str, n: int = 1) -> None:
        self.dropped.labels(camera, reason).inc(n)

    def set_model(self, *, backbone: str, model_id: str, input_size: tuple[int, int], device: str,
                  image_threshold: float, pixel_threshold: float) -> None:
        self.model_info.info({
            "backbone": backbone, "model_id": model_id, "input_size": f"{input_size[0]}x{input_size[1]}",
            "device": device,
        })
        self.threshold.labels("image").set(image_threshold)
        self.threshold.labels("pixel").set(pixel_threshold)

    def by_label(self, counter: Counter, label: str) -> dict[str, float]:
        """A counter summed per value of one label, e.g. drops per reason."""
        out: dict[str, float] = {}
        for metric in counter.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
        return out

    def stage_totals(self) -> dict[str, float]:
        """Seconds summed per pipeline stage so far (``linewatch_stage_seconds_total``), for `bench --profile`."""
        return {s: self.registry.get_sample_value("linewatch_stage_seconds_total", {"stage": s}) or 0.0
                for s in STAGES}

    def total(self, counter: Counter) -> float:
        """Sum of a counter over all its label sets (for heartbeats and STATUS=)."""
        total = 0.0
        for metric in counter.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    total += s.value
        return total


class MetricsServer:
    """``/metrics`` over HTTP on the configured host (127.0.0.1 unless told otherwise)."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(f"metrics cannot listen on {host}:{port} ({exc.strerror or exc}); "
                              "set metrics.port to a free port (0 picks one) or metrics.enabled: false") from None
        self.host = host
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)
