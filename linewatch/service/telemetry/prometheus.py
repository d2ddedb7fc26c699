"""Every Prometheus metric the daemon exports, on its own registry (tests can build several).

This module is the one source of the metrics reference: ``docs/metrics.md`` holds the table that
:func:`metrics_table` builds from a fresh registry, rewritten with
``python -m linewatch.service.telemetry.prometheus --update docs/metrics.md`` (a unit test compares them).

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

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

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
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from linewatch.errors import ConfigError

DROP_REASONS = ("queue_full", "decode_error", "inference_error", "publish_queue_full", "publish_hwm",
                "publish_error", "shutdown")
# previews skipped: over publisher.preview_max_per_s, nobody subscribed to preview.<camera>, ZeroMQ refused
# the message (a subscriber at its high-water mark), encoding or sending failed (logged)
PREVIEW_SKIP_REASONS = ("rate_limit", "no_subscriber", "publish_hwm", "error")
# GenICam buffers skipped (aravis://, pylon://), created up front; a camera library's other statuses (Aravis:
# timeout, aborted, …) appear when they happen
INCOMPLETE_REASONS = ("missing_packets", "underrun", "failed_buffer", "size_mismatch")

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

# the keys of linewatch_model_info (an Info declares none up front: set_model fills them)
MODEL_INFO_KEYS = ("backbone", "model_id", "input_size", "device")

# linewatch_frames_total counted verdicts, next to linewatch_frames_captured_total counting frames: renamed in
# 0.2.0. The old name stays exported for one release (until 0.3.0) so that deployed dashboards keep working.
DEPRECATED_VERDICTS_NAME = "linewatch_frames"


class DeprecatedCounterAlias:
    """Re-exports a counter's samples under its old name, computed at scrape time only.

    The hot path increments the one real counter; this collector reads it when /metrics is scraped.
    """

    def __init__(self, source: Counter, old_name: str, registry: CollectorRegistry):
        self.source = source
        self.old_name = old_name
        # prometheus_client has no public accessor for these; both are stable since its first releases
        self.labelnames: tuple[str, ...] = tuple(source._labelnames)
        self.documentation = f"DEPRECATED: use {source._name}_total (this alias goes in linewatch 0.3.0)"
        registry.register(self)

    def describe(self) -> list[Metric]:
        # lets the registry refuse a second collector exporting the old name
        return [Metric(self.old_name, self.documentation, "counter")]

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.old_name, self.documentation, "counter")
        for metric in self.source.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    family.add_sample(self.old_name + "_total", dict(s.labels), s.value)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        # *_created series double the exposition for no dashboard use (process-wide switch in the client)
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.latency = Histogram("linewatch_latency_seconds", "Capture to verdict time per frame (measured when the "
                                 "verdict is made, before publishing)",
                                 ["camera"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("linewatch_inference_seconds", "Model time per batch",
                                   buckets=INFERENCE_BUCKETS, registry=r)
        self.batch_size = Histogram("linewatch_batch_size", "Frames per inference batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("linewatch_queue_wait_seconds", "Time a frame waited for its batch",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.score_ratio = Histogram("linewatch_score_ratio", "Anomaly score divided by the image threshold "
                                     "(>1 fails)", ["camera"], buckets=SCORE_RATIO_BUCKETS, registry=r)
        self.verdicts = Counter("linewatch_verdicts", "Verdicts made, one per inspected frame: verdict = pass, fail",
                                ["camera", "verdict"], registry=r)
        self.captured = Counter("linewatch_frames_captured", "Frames read and queued for inference", ["camera"],
                                registry=r)
        self.skipped = Counter("linewatch_frames_skipped", "Live frames skipped by design to honour the fps cap",
                               ["camera"], registry=r)
        self.dropped = Counter("linewatch_frames_dropped", "Frames that got no (delivered) verdict, by reason: "
                               + ", ".join(DROP_REASONS), ["camera", "reason"], registry=r)
        self.decode_errors = Counter("linewatch_decode_errors", "Frames or files that could not be decoded",
                                     ["camera"], registry=r)
        self.reconnects = Counter("linewatch_reconnects", "Attempts to reopen a lost or unopenable source",
                                  ["camera"], registry=r)
        self.published = Counter("linewatch_messages_published", "Messages handed to ZeroMQ, by topic: verdict, "
                                 "status", ["topic"], registry=r)
        self.status_dropped = Counter("linewatch_status_dropped", "Status messages not sent, by reason: "
                                      "queue_full, publish_hwm, publish_error", ["reason"], registry=r)
        self.camera_up = Gauge("linewatch_camera_up", "1 while the camera delivers frames", ["camera"], registry=r)
        self.queue_depth = Gauge("linewatch_queue_depth", "Items waiting in a queue: frames (all cameras), publish",
                                 ["queue"], registry=r)
        self.threshold = Gauge("linewatch_threshold", "Calibrated thresholds of the loaded model, kind = image, "
                               "pixel", ["kind"], registry=r)
        self.start_time = Gauge("linewatch_start_time_seconds", "Unix time the daemon started", registry=r)
        self.model_info = Info("linewatch_model", "The loaded model bundle and the device it runs on", registry=r)
        # a counter per stage (not a histogram): one addition per frame or batch, cheap enough to stay on
        self.stage_seconds = Counter("linewatch_stage_seconds", "Seconds spent per pipeline stage, summed over "
                                     "frames (÷ frames = per-frame cost); stages: " + ", ".join(STAGES),
                                     ["stage"], registry=r)
        self.stage = {name: self.stage_seconds.labels(name) for name in STAGES}
        # reliability: out-of-memory handling, model reloads (SIGHUP), subscriber authentication
        self.oom = Counter("linewatch_oom", "Inference batches that ran out of (GPU) memory and were split "
                           "and retried at a smaller size", registry=r)
        self.effective_max_batch = Gauge("linewatch_effective_max_batch", "Largest batch the worker currently "
                                         "sends to the model (lowered after an out-of-memory error, doubled back "
                                         "after 10 min without one, up to batching.max_batch)", registry=r)
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
        self.calibration_mismatch = Gauge("linewatch_calibration_mismatch", "1 once the camera's first "
                                          "health.startup_check_frames verdicts failed far beyond the calibrated "
                                          "rate, or its framing differs from the model's (framing, lighting, "
                                          "focus?)", ["camera"], registry=r)
        self.health_skipped = Counter("linewatch_health_skipped", "Frames not health-checked because the health "
                                      "thread was busy (checks are sampled; verdicts unaffected)", registry=r)
        # reject archive (linewatch.service.observers.archive)
        self.archive_written = Counter("linewatch_archive_written", "Failing frames saved to the reject archive",
                                       registry=r)
        self.archive_deleted = Counter("linewatch_archive_deleted", "Archive entries deleted, by reason: age, size",
                                       ["reason"], registry=r)
        self.archive_dropped = Counter("linewatch_archive_dropped", "Failing frames not archived, by reason: "
                                       "queue_full, write_error", ["reason"], registry=r)
        self.archive_bytes = Gauge("linewatch_archive_bytes", "Bytes held in the reject archive", registry=r)
        # previews for `linewatch view` (publisher.preview): frame JPEG + heatmap PNG, encoded on the publisher thread
        self.previews = Counter("linewatch_previews", "Previews (frame JPEG + anomaly heatmap PNG) sent on "
                                "preview.<camera>", ["camera"], registry=r)
        self.previews_skipped = Counter("linewatch_previews_skipped", "Previews the policy asked for but not sent, "
                                        "by reason: " + ", ".join(PREVIEW_SKIP_REASONS), ["reason"], registry=r)
        # GenICam cameras (aravis://, pylon://) and part-triggered mode (linewatch.service.deadlines)
        self.incomplete_frames = Counter("linewatch_camera_incomplete_frames", "Camera buffers that arrived "
                                         "incomplete or failed (missing packets, underrun, timeout); skipped, "
                                         "by reason", ["camera", "reason"], registry=r)
        self.parts_timed_out = Counter("linewatch_parts_timed_out", "Parts (triggered cameras) whose verdict was "
                                       "not ready within verdict_deadline_ms: a timeout verdict (fail) was "
                                       "published instead", ["camera"], registry=r)
        self.parts_late = Counter("linewatch_parts_late", "Verdicts made after their part had timed out: not "
                                  "published (the timeout verdict stands)", ["camera"], registry=r)
        self.verdicts_deprecated = DeprecatedCounterAlias(self.verdicts, DEPRECATED_VERDICTS_NAME, r)
        # process_* series (resident memory, open fds, CPU seconds, start time): what an SRE and the soak read
        # to see a leak, from the same scrape as everything else
        ProcessCollector(registry=r)

    def init_cameras(self, cameras: Iterable[str]) -> None:
        """Create every label set up front so dashboards see 0, not 'no data', before the first event."""
        for cam in cameras:
            for verdict in ("pass", "fail"):
                self.verdicts.labels(cam, verdict)
            for reason in DROP_REASONS:
                self.dropped.labels(cam, reason)
            self.captured.labels(cam)
            self.skipped.labels(cam)
            self.decode_errors.labels(cam)
            self.reconnects.labels(cam)
            self.camera_up.labels(cam).set(0)
            self.latency.labels(cam)
            self.score_ratio.labels(cam)
            self.previews.labels(cam)
            self.parts_timed_out.labels(cam)
            self.parts_late.labels(cam)
            for reason in INCOMPLETE_REASONS:
                self.incomplete_frames.labels(cam, reason)
            for cond in ("ok", "black", "frozen", "blurred"):
                self.condition.labels(cam, cond).set(1 if cond == "ok" else 0)
            self.calibration_mismatch.labels(cam).set(0)
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
        for reason in PREVIEW_SKIP_REASONS:
            self.previews_skipped.labels(reason)

    def drop(self, camera: str, reason: str, n: int = 1) -> None:
        self.dropped.labels(camera, reason).inc(n)

    def set_model(self, *, backbone: str, model_id: str, input_size: tuple[int, int], device: str,
                  image_threshold: float, pixel_threshold: float) -> None:
        values = (backbone, model_id, f"{input_size[0]}x{input_size[1]}", device)
        self.model_info.info(dict(zip(MODEL_INFO_KEYS, values, strict=True)))
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


# ----------------------------------------------------------------------------- the reference table

TABLE_BEGIN = "<!-- metrics-table:begin (generated: python -m linewatch.service.telemetry.prometheus --update) -->"
TABLE_END = "<!-- metrics-table:end -->"
# what a family of each type is called in /metrics and in PromQL
_EXPOSED_SUFFIX = {"counter": "_total", "info": "_info"}


def _declared_labels(metrics: Metrics) -> dict[str, tuple[str, ...]]:
    """Label names per family, as declared (a fresh registry has no samples to read them from)."""
    out: dict[str, tuple[str, ...]] = {}
    # every collector on the registry, not only Metrics' attributes (the registry has no public list of them)
    for obj in list(metrics.registry._collector_to_names):
        if obj is metrics.model_info:
            out[obj._name] = MODEL_INFO_KEYS
        elif isinstance(obj, MetricWrapperBase):
            out[obj._name] = tuple(obj._labelnames)
        elif isinstance(obj, DeprecatedCounterAlias):
            out[obj.old_name] = obj.labelnames
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def metrics_table(metrics: Metrics | None = None) -> str:
    """Markdown table of every metric family on a (fresh) registry: name, type, labels, help.

    Row order is registration order; histograms are listed by their base name (they expose ``_bucket``
    with ``le``, ``_sum`` and ``_count``).
    """
    metrics = metrics if metrics is not None else Metrics()
    labels = _declared_labels(metrics)
    rows = ["| metric | type | labels | help |", "| --- | --- | --- | --- |"]
    for family in metrics.registry.collect():
        # the process collector's families carry no labels; anything else undeclared shows what its samples have
        names = labels.get(family.name)
        if names is None:
            names = tuple(dict.fromkeys(k for s in family.samples for k in s.labels if k != "le"))
        exposed = family.name + _EXPOSED_SUFFIX.get(family.type, "")
        rows.append(f"| `{exposed}` | {family.type} | {', '.join(names) or '—'} | {_cell(family.documentation)} |")
    return "\n".join(rows) + "\n"


def replace_table(document: str, table: str) -> str:
    """``document`` with the text between the table markers replaced by ``table``."""
    start, end = document.find(TABLE_BEGIN), document.find(TABLE_END)
    if start < 0 or end < start:
        raise ConfigError(f"the metrics document has no table markers: put {TABLE_BEGIN!r} and {TABLE_END!r} "
                          "on their own lines where the table goes")
    head = document[:start + len(TABLE_BEGIN)]
    return f"{head}\n{table}{document[end:]}"


def table_in(document: str) -> str:
    """The table currently between the markers of ``document`` (what :func:`replace_table` wrote)."""
    start, end = document.find(TABLE_BEGIN), document.find(TABLE_END)
    if start < 0 or end < start:
        raise ConfigError(f"the metrics document has no table markers ({TABLE_BEGIN!r} … {TABLE_END!r})")
    return document[start + len(TABLE_BEGIN):end].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linewatch.service.telemetry.prometheus",
                                     description="The metrics reference, generated from the daemon's registry.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--markdown", action="store_true", help="print the metrics table (markdown)")
    mode.add_argument("--update", metavar="FILE", type=Path,
                      help="rewrite the table between the markers in FILE (docs/metrics.md)")
    args = parser.parse_args(argv)
    table = metrics_table()
    if args.markdown:
        sys.stdout.write(table)
        return 0
    try:
        text = args.update.read_text(encoding="utf-8")
        new = replace_table(text, table)
    except OSError as exc:
        print(f"error: cannot read {args.update}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"error: {args.update}: {exc}", file=sys.stderr)
        return 2
    if new != text:
        args.update.write_text(new, encoding="utf-8")
        print(f"{args.update}: metrics table updated")
    else:
        print(f"{args.update}: metrics table already up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
