"""Faults injected into a real `linewatch run` process, and what it must survive.

* a network camera (HTTP MJPEG) killed mid-frame and restarted, while a second camera replays a
  folder full of corrupt and truncated files;
* subscribers that connect, stall and disconnect over and over;
* SIGKILL and a restart on the same ports, then SIGTERM under full load;
* the model file replaced on disk and SIGHUP, with good and bad replacements.

Every test ends by reconciling each camera's sequence numbers: frames read = verdicts received +
frames dropped (counted per reason by the daemon). In-process worker faults (CUDA OOM, model swap)
are in test_oom_reload.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from fakes import MJPEGCamera, stalled_subscriber

from linewatch.client import Subscriber
from linewatch.messages import Status, Verdict
from linewatch.tools.harness import (
    DaemonProcess,
    VerdictCounter,
    free_tcp_port,
    metric,
    metric_total,
    wait_until,
)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def collector(endpoint: str) -> VerdictCounter:
    """A subscriber that reads and keeps everything in the background (verdicts and status)."""
    col = VerdictCounter(endpoint, status=True, keep=100_000)
    col.start()
    return col


def stop_and_reconcile(d: DaemonProcess, col: VerdictCounter, cameras: list[str], allowed_drops: set[str]
                       ) -> dict:
    """SIGTERM → exit 0; then, per camera, frames read = verdicts received + frames dropped."""
    assert d.terminate(60) == 0, d.log_text()[-3000:]
    shutdown = d.wait_event("shutdown", timeout=5)
    # everything published; then 0.3 s without a message, in which a verdict beyond that (a bug) would show
    assert col.finish(shutdown["published"], quiet_s=30, settle_s=0.3), (col.total, shutdown["published"])
    assert set(shutdown["dropped_by_reason"]) <= allowed_drops, shutdown["dropped_by_reason"]
    assert col.evicted == 0 and len(col.verdicts) == col.total == shutdown["published"]
    for cam in cameras:
        seqs = [v.sequence for v in col.of(cam)]
        assert len(seqs) == len(set(seqs)), f"{cam}: a sequence number delivered twice"
        read = shutdown["last_seq"][cam] + 1
        assert read == len(seqs) + shutdown["dropped_by_camera"].get(cam, 0), (cam, read, len(seqs), shutdown)
    return shutdown


def next_heartbeat(col: VerdictCounter, timeout: float = 10.0) -> Status:
    n = len(col.statuses)
    wait_until(lambda: any(s.kind == "heartbeat" for s in col.statuses[n:]), timeout, what="a heartbeat")
    return [s for s in col.statuses[n:] if s.kind == "heartbeat"][-1]


def write_bad_files(folder: Path) -> dict[str, str]:
    """Corrupt and truncated images between good ones; {file name: what is wrong with it}."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    bad = {
        "001b.png": ("truncated PNG (half)", png[: len(png) // 2]),
        "002b.png": ("PNG without its IEND chunk", png[:-12]),
        "003b.jpg": ("truncated JPEG (no EOI)", jpg[: len(jpg) - 2]),
        "003c.jpg": ("JPEG cut after the header", jpg[:200]),
        "004b.jpg": ("empty file", b""),
        "004c.png": ("random bytes", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
        "005b.bmp": ("text with an image name", b"this is not an image\n"),
    }
    for name, (_, data) in bad.items():
        (folder / name).write_bytes(data)
    return {name: why for name, (why, _) in bad.items()}


# --------------------------------------------------------------------------- network camera + bad files


def test_network_camera_killed_mid_frame_and_restarted_while_files_camera_skips_corrupt_files(
        tmp_path, folder_camera, daemon_config):
    files = folder_camera("files", 6, fps=25)
    good = {f"{i:03d}.png" for i in range(6)}
    bad = write_bad_files(tmp_path / "files")
    cam = MJPEGCamera(size=(120, 160))
    port = cam.port
    net = {"name": "net", "source": cam.url("/video.mjpg"), "fps": 20, "timeout_s": 1,
           "reconnect": {"initial_s": 0.1, "max_s": 0.8, "jitter": 0.1}}
    cfg = daemon_config([net, files], publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        col = collector(d.endpoint)
        try:
            wait_until(lambda: col.count("net") >= 5 and col.count("files") >= 8, 60, what="both cameras")
            last_before = max(v.sequence for v in col.of("net"))

            cam.kill()  # mid-frame, connection reset, nothing listening any more
            wait_until(lambda: any(s.state == "down" for s in col.camera_events("net")), 30, what="net down")
            down = next(s for s in col.camera_events("net") if s.state == "down")
            assert down.reason and "127.0.0.1" in down.reason
            samples = d.scrape()
            assert metric(samples, "linewatch_camera_up", camera="net") == 0
            assert metric(samples, "linewatch_camera_up", camera="files") == 1
            # it keeps retrying, with exponential backoff capped at max_s
            wait_until(lambda: len(d.find("camera_still_down", camera="net")) >= 3, 30, what="retries")
            delays = [d.find("camera_down", camera="net")[0]["retry_in_s"]] + \
                [e["retry_in_s"] for e in d.find("camera_still_down", camera="net")[:3]]
            assert 0.09 <= delays[0] <= 0.11 and delays == sorted(delays) and max(delays) <= 0.8, delays
            # the other camera is unaffected while this one is down
            n_files = col.count("files")
            wait_until(lambda: col.count("files") >= n_files + 10, 30, what="files camera going on")
            assert metric(d.scrape(), "linewatch_reconnects_total", camera="files") == 0

            cam = MJPEGCamera(port, size=(120, 160))  # the camera comes back on the same address
            wait_until(lambda: any(s.state == "up" for s in col.camera_events("net")[1:]), 30, what="net up")
            wait_until(lambda: len([v for v in col.of("net") if v.sequence > last_before]) >= 5, 30,
                       what="net verdicts after the restart")
            samples = d.scrape()
            assert metric(samples, "linewatch_camera_up", camera="net") == 1
            assert metric(samples, "linewatch_reconnects_total", camera="net") >= 3
            assert [s.state for s in col.camera_events("net")][:3] == ["up", "down", "up"]
            hb = next_heartbeat(col)
            assert hb.cameras == {"net": "up", "files": "up"}
        finally:
            cam.kill()
        shutdown = stop_and_reconcile(d, col, ["net", "files"], allowed_drops={"decode_error", "queue_full"})

    # the folder: only good files got verdicts; every bad one was skipped, counted and logged by name
    assert {v.ref for v in col.of("files")} == good
    logged = d.find("decode_error", camera="files")
    assert {e["file"] for e in logged} == set(bad)
    assert all(e["action"] == "skipped" and e["file"] in e["error"] for e in logged)
    assert shutdown["dropped_by_reason"]["decode_error"] == len(logged)  # one count per skipped file read
    assert not d.find("decode_error", camera="net")
    print(f"net+files: read {({c: n + 1 for c, n in shutdown['last_seq'].items()})}, received "
          f"{ {c: col.count(c) for c in ('net', 'files')} }, dropped {shutdown['dropped_by_camera']} "
          f"{shutdown['dropped_by_reason']}, net reconnects {len(d.find('reconnect', camera='net'))}, "
          f"retry delays {delays}")


# --------------------------------------------------------------------------- subscriber churn


def test_subscribers_that_stall_and_vanish_cause_no_stall_and_no_growth(folder_camera, daemon_config):
    cfg = daemon_config([folder_camera("cam", 4, size=(240, 320), fps=40)],
                        publisher={"sndhwm": 5, "sndbuf": 2048, "masks": "all", "wait_for_subscriber_s": 60})
    ctx = zmq.Context()

    def made() -> float:
        return metric_total(d.scrape(), "linewatch_verdicts_total")

    def churn(cycles: int) -> None:
        """Connect, subscribe, read at most one message, stall, disconnect without a word."""
        for i in range(cycles):
            s = stalled_subscriber(ctx, d.endpoint, topic="verdict." if i % 2 else "")
            if i % 3 == 0 and s.poll(500):
                s.recv_multipart()
            # stalled while 16 verdicts are made: more than its share of buffers (HWM 5, 2 KiB)
            n = made()
            wait_until(lambda n=n: made() >= n + 16, 30, interval=0.1, what="verdicts while a subscriber stalls")
            s.close()

    with DaemonProcess(cfg) as d:
        col = collector(d.endpoint)
        try:
            d.wait_event("ready", 60)
            wait_until(lambda: col.count() > 0, 60, what="the first verdict")
            base = d.process_stats()
            churn(6)  # warm-up: allocator pools, ZeroMQ pipes, the first buffers
            # the warm-up's connections are torn down in the daemon before the baseline is taken
            wait_until(lambda: d.process_stats().open_fds <= base.open_fds, 30, interval=0.1,
                       what=f"open fds back to {base.open_fds} after the warm-up churn")
            before = d.process_stats()
            got = [col.count()]
            for _ in range(4):
                churn(5)
                got.append(col.count())
            # 20 subscribers came and went: no socket stays behind once ZeroMQ has torn down their pipes
            wait_until(lambda: d.process_stats().open_fds <= before.open_fds + 2, 30, interval=0.1,
                       what=f"open fds back to ≤ {before.open_fds} + 2 after the churn")
            after = d.process_stats()
            # the well-behaved subscriber kept getting verdicts in every phase of the churn
            assert all(b > a for a, b in zip(got, got[1:], strict=False)), got
            n = col.count()
            wait_until(lambda: col.count() >= n + 20, 30, what="fresh verdicts after the churn")
            samples = d.scrape()
            assert metric(samples, "linewatch_camera_up", camera="cam") == 1
            assert not [e for e in d.find("health") if e.get("healthy") is False]
        finally:
            ctx.term()
        shutdown = stop_and_reconcile(d, col, ["cam"], allowed_drops={"publish_hwm", "queue_full"})
    # the stalls were real: with hwm_policy count, what a stalled subscriber could not take was counted
    assert shutdown["dropped_by_reason"].get("publish_hwm", 0) > 0
    # and no memory stays behind (generous margins: the allocator may keep a few MiB; a leaked pipe per
    # subscriber would hold its queued masks)
    assert after.open_fds <= before.open_fds + 2, (before, after)
    grown_kb = after.rss_kb - before.rss_kb
    assert grown_kb < 24 * 1024, f"RSS grew {grown_kb / 1024:.1f} MiB over 20 stalled subscribers"
    print(f"churn: rss {before.rss_kb / 1024:.1f} → {after.rss_kb / 1024:.1f} MiB, fds {base.open_fds} → "
          f"{before.open_fds} → {after.open_fds}, drops {shutdown['dropped_by_reason']}, "
          f"verdicts received {col.count()}")


# --------------------------------------------------------------------------- kill -9, restart, SIGTERM under load


def test_sigkill_then_restart_on_the_same_ports_then_sigterm_under_full_load(folder_camera, daemon_config):
    pub_port, metrics_port = free_tcp_port(), free_tcp_port()
    # full rate: no fps cap, small queues, so the worker is the bottleneck and frames pile up
    cams = [folder_camera(n, 5, size=(120, 160), seed=seed) for n, seed in (("a", 1), ("b", 2))]
    cfg = daemon_config(cams, batching={"max_batch": 8, "frame_queue": 8, "max_wait_ms": 5},
                        publisher={"bind": f"tcp://127.0.0.1:{pub_port}", "sndhwm": 1_000_000, "linger_ms": 5000},
                        metrics={"port": metrics_port}, daemon={"drain_timeout_s": 30})

    with DaemonProcess(cfg) as first:
        old = Subscriber(f"tcp://127.0.0.1:{pub_port}")  # stays connected across the kill
        assert old.recv(60) is not None
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(10) == -signal.SIGKILL
        first.join_readers()
        assert not first.find("shutdown")  # no chance to clean up anything
        while old.recv(0.3) is not None:  # what the first run had already sent
            pass

    with DaemonProcess(cfg) as d:  # same ports at once: nothing stale blocks the bind
        assert d.wait_event("publisher_bound", 60)["endpoint"] == f"tcp://127.0.0.1:{pub_port}"
        assert d.wait_event("metrics_listening", 60)["port"] == metrics_port
        col = collector(d.endpoint)
        try:
            # the subscriber from before the kill reconnects by itself and gets the new run's verdicts
            v = old.recv(60)
            assert isinstance(v, Verdict) and v.run_id == d.wait_event("ready", 60)["run_id"]
        finally:
            old.close()
        wait_until(lambda: metric(d.scrape(), "linewatch_frames_dropped_total", camera="a",
                                  reason="queue_full") > 0 and col.count() >= 40, 60,
                   what="full load: the frame queues overflow")
        t0 = time.monotonic()
        shutdown = stop_and_reconcile(d, col, ["a", "b"], allowed_drops={"queue_full"})
        stop_s = time.monotonic() - t0
    # every frame that entered the worker's queue and was not pushed out by a newer one got its verdict
    # published before exit; nothing was dropped for "shutdown"
    assert shutdown["reason"] == "SIGTERM" and shutdown["frames"] == shutdown["published"] == col.count()
    assert stop_s < 60
    print(f"sigterm under load: in {sum(s + 1 for s in shutdown['last_seq'].values())}, "
          f"published {shutdown['published']}, dropped {shutdown['dropped_by_reason']}, "
          f"shutdown {shutdown['seconds']} s")


# --------------------------------------------------------------------------- model replaced + SIGHUP


def _variant(src: Path, dst: Path, change) -> Path:
    from linewatch.model import load_bundle, save_bundle

    b = load_bundle(src)
    change(b.meta)
    save_bundle(dst, b.students_state, b.meta)
    return dst


def test_sighup_reloads_a_replaced_model_between_batches_and_rejects_bad_files(
        tmp_path, untrained_bundle, folder_camera, daemon_config):
    from linewatch.model import load_bundle

    model = tmp_path / "model.lwm"
    shutil.copy(untrained_bundle, model)
    old_id = load_bundle(model).model_id
    variants = tmp_path / "variants"
    variants.mkdir()

    def stricter(meta):
        meta.calibration.image_threshold *= 3.0
        meta.calibration.pixel_threshold *= 3.0

    new = _variant(untrained_bundle, variants / "new.lwm", stricter)
    new_bundle = load_bundle(new)
    raw = new.read_bytes()
    (variants / "corrupt.lwm").write_bytes(raw[: len(raw) // 3])
    bad = {
        "corrupt": variants / "corrupt.lwm",
        "teacher": _variant(untrained_bundle, variants / "teacher.lwm",
                            lambda m: setattr(m, "teacher_sha256", "0" * 64)),
        "input_size": _variant(untrained_bundle, variants / "size.lwm", lambda m: setattr(m, "input_size", (96, 96))),
        "backbone": _variant(untrained_bundle, variants / "backbone.lwm", lambda m: setattr(m, "backbone", "resnet18")),
        "uncalibrated": _variant(untrained_bundle, variants / "nocal.lwm", lambda m: setattr(m, "calibration", None)),
    }

    def replace(src: Path) -> None:  # what `linewatch calibrate --out` or `cp + mv` does: an atomic rename
        tmp = model.with_suffix(".tmp")
        shutil.copy(src, tmp)
        os.replace(tmp, model)

    cfg = daemon_config([folder_camera("imgs", 4, fps=30)], bundle=model, publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        col = collector(d.endpoint)
        wait_until(lambda: col.count() >= 5, 60, what="verdicts")
        assert {v.model_id for v in col.verdicts} == {old_id}

        replace(new)
        d.proc.send_signal(signal.SIGHUP)
        ev = d.wait_event("model_reloaded", 60)
        assert ev["old_model_id"] == old_id and ev["new_model_id"] == new_bundle.model_id
        wait_until(lambda: col.verdicts[-1].model_id == new_bundle.model_id, 30, what="verdicts from the new model")
        samples = d.scrape()
        assert metric(samples, "linewatch_model_reload_total", result="ok") == 1
        assert metric(samples, "linewatch_model_info", backbone="mobilenet_v2", model_id=new_bundle.model_id,
                      input_size="64x64", device="cpu") == 1
        assert metric(samples, "linewatch_threshold", kind="image") == pytest.approx(
            new_bundle.meta.calibration.image_threshold)

        d.proc.send_signal(signal.SIGHUP)  # same file again: nothing to do
        d.wait_event("model_reload_unchanged", 60)

        for i, (what, path) in enumerate(bad.items(), start=1):
            replace(path)
            d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda i=i: len(d.find("model_reload_rejected")) == i, 60, what=f"{what} rejected")
            ev = d.find("model_reload_rejected")[-1]
            assert ev["model_id"] == new_bundle.model_id and ev["action"] == "kept the running model", ev
            assert "\n" not in ev["reason"] and ev["reason"], ev
        n = col.count()
        wait_until(lambda: col.count() >= n + 10, 30, what="verdicts after the rejections")
        samples = d.scrape()
        assert metric(samples, "linewatch_model_reload_total", result="rejected") == len(bad)
        assert metric(samples, "linewatch_model_reload_total", result="unchanged") == 1
        assert metric(samples, "linewatch_model_reload_total", result="ok") == 1
        assert d.proc.poll() is None  # SIGHUP never ends the daemon
        failed = d.find("inference_failed")
        assert not failed, failed
        shutdown = stop_and_reconcile(d, col, ["imgs"], allowed_drops={"queue_full"})

    reasons = {what: ev["reason"] for what, ev in zip(bad, d.find("model_reload_rejected"), strict=True)}
    assert "corrupt" in reasons["corrupt"]
    assert "teacher weights" in reasons["teacher"]
    assert "input size [96, 96] differs" in reasons["input_size"]
    assert "resnet18" in reasons["backbone"]
    assert "calibrat" in reasons["uncalibrated"]
    # the swap is atomic: in sequence order the model changes exactly once, old → new, never back
    ids = [v.model_id for v in sorted(col.verdicts, key=lambda v: v.sequence)]
    switch = ids.index(new_bundle.model_id)
    assert set(ids[:switch]) == {old_id} and set(ids[switch:]) == {new_bundle.model_id}
    thresholds = {v.model_id: v.threshold for v in col.verdicts}
    assert thresholds[new_bundle.model_id] == pytest.approx(new_bundle.meta.calibration.image_threshold)
    # no frame lost to the swap (no inference_error, checked above); the capture process keeps reading at 30 fps
    # while a reload pauses inference, so on a loaded box a few frames may go as queue_full (counted, reconciled)
    assert set(shutdown["dropped_by_reason"]) <= {"queue_full"}, shutdown["dropped_by_reason"]
    paused = d.find("model_reload_ready")[0]["inference_paused_s"]
    print(f"reload: {switch} verdicts from the old model, {len(ids) - switch} from the new, dropped "
          f"{shutdown['dropped']}, inference paused {paused} s; rejections:", json.dumps(reasons, indent=1))
