"""`linewatch run` as a real process: ZeroMQ verdicts, /metrics, status, reconnects, signals, systemd."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import cv2
import numpy as np
import pytest
import zmq
from fakes import stalled_subscriber

from linewatch.client import Subscriber
from linewatch.messages import Status, Verdict, decode
from linewatch.tools.harness import (
    ROOT,
    DaemonProcess,
    free_tcp_port,
    linewatch_cmd,
    metric,
    metric_total,
    subprocess_env,
    wait_until,
    write_config,
    write_images,
)


def collect(sub: Subscriber, n_verdicts: int, timeout: float) -> tuple[list[Verdict], list[Status]]:
    verdicts, statuses = [], []
    end = time.monotonic() + timeout
    while len(verdicts) < n_verdicts and time.monotonic() < end:
        msg = sub.recv(0.5)
        if isinstance(msg, Verdict):
            verdicts.append(msg)
        elif isinstance(msg, Status):
            statuses.append(msg)
    return verdicts, statuses


def test_end_to_end_two_cameras_bottle(tmp_path, bottle, bottle_bundle):
    """Every frame gets a verdict with the right camera, sequence and file; verdicts equal the offline
    model's; scores separate good from defective; /metrics agrees with what was received; SIGTERM → 0."""
    from sklearn.metrics import roc_auc_score

    from linewatch.imaging.images import list_images, load_images
    from linewatch.model import load_detector

    folders = {"good": bottle / "test" / "good", "defect": bottle / "test" / "broken_large"}
    files = {cam: list_images(d) for cam, d in folders.items()}
    cams = [{"name": cam, "source": f"dir://{d}", "fps": 30, "on_end": "stop"} for cam, d in folders.items()]
    cfg = write_config(tmp_path / "lw.yaml", bottle_bundle, cams,
                       publisher={"wait_for_subscriber_s": 60, "masks": "fail"})
    total = sum(len(f) for f in files.values())
    with DaemonProcess(cfg) as d:
        sub = Subscriber(d.endpoint, status=True)
        try:
            verdicts, statuses = collect(sub, total, timeout=120)
            # every camera has ended: nothing more is coming
            wait_until(lambda: len(d.find("camera_ended")) == 2, 30, what="both cameras ended")
            extra, more_status = collect(sub, 1, timeout=0.5)
            statuses += more_status
        finally:
            sub.close()
        samples = d.scrape()
        rc = d.terminate()
        assert rc == 0, d.log_text()[-3000:]
        shutdown = d.wait_event("shutdown", timeout=5)
    assert extra == []
    assert len(verdicts) == total

    # right camera, sequence and file for every frame
    by_cam = {cam: sorted((v for v in verdicts if v.camera == cam), key=lambda v: v.sequence) for cam in folders}
    for cam, vs in by_cam.items():
        assert [v.sequence for v in vs] == list(range(len(files[cam])))
        assert [v.ref for v in vs] == [p.name for p in files[cam]]
        assert all(v.frame_width == 900 and v.frame_height == 900 for v in vs)
        assert len({v.run_id for v in vs}) == 1

    # exact pipeline fidelity: the streamed verdicts are what the model gives offline on the same images
    det = load_detector(bottle_bundle, "cpu")
    cal = det.calibration
    for cam, vs in by_cam.items():
        offline = det.predict_many(load_images(files[cam], det.input_size).images).scores.numpy()
        for v, s in zip(vs, offline, strict=True):
            assert v.score == pytest.approx(float(s), rel=1e-4, abs=1e-6), (cam, v.sequence)
            if abs(float(s) - cal.image_threshold) > 1e-4:
                assert v.verdict == ("fail" if s > cal.image_threshold else "pass"), (cam, v.sequence)
            assert v.threshold == pytest.approx(cal.image_threshold)
            assert v.model_id == det.model_id

    # fails on defective parts, passes on good ones
    scores = [v.score for v in by_cam["good"]] + [v.score for v in by_cam["defect"]]
    labels = [0] * len(by_cam["good"]) + [1] * len(by_cam["defect"])
    assert roc_auc_score(labels, scores) >= 0.9
    assert np.mean([v.failed for v in by_cam["defect"]]) >= 0.8
    assert np.mean([not v.failed for v in by_cam["good"]]) >= 0.75
    for v in verdicts:
        assert v.has_mask == v.failed  # masks: fail
        if v.failed:
            assert v.boxes and v.defect_area > 0 and v.n_regions >= len(v.boxes)
            assert all(0 <= b.x and b.x + b.w <= 900 and 0 <= b.y and b.y + b.h <= 900 for b in v.boxes)
    mask = cv2.imdecode(np.frombuffer(by_cam["defect"][0].mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (900, 900) and int((mask > 0).sum()) == by_cam["defect"][0].defect_area

    # status topic: both cameras came up and ended
    cam_events = [(s.camera, s.state) for s in statuses if s.kind == "camera"]
    for cam in folders:
        assert (cam, "up") in cam_events and (cam, "ended") in cam_events

    # /metrics counts what we received
    for cam, vs in by_cam.items():
        for verdict in ("pass", "fail"):
            assert metric(samples, "linewatch_verdicts_total", camera=cam, verdict=verdict) == \
                sum(v.verdict == verdict for v in vs)
        assert metric(samples, "linewatch_frames_captured_total", camera=cam) == len(vs)
        assert metric(samples, "linewatch_latency_seconds_count", camera=cam) == len(vs)
        assert metric(samples, "linewatch_camera_up", camera=cam) == 0  # ended
    assert metric(samples, "linewatch_messages_published_total", topic="verdict") == total
    assert metric_total(samples, "linewatch_frames_dropped_total") == 0
    assert metric(samples, "linewatch_batch_size_sum") == total
    info = [labels for (name, labels), v in samples.items() if name == "linewatch_model_info"]
    assert dict(info[0])["model_id"] == det.model_id and dict(info[0])["backbone"] == "mobilenet_v2"
    assert shutdown["frames"] == total and shutdown["reason"] == "SIGTERM"


def test_camera_disappears_and_returns_with_status_metrics_and_sd_notify(tmp_path, folder_camera, daemon_config):
    folder, away = tmp_path / "flaky", tmp_path / "flaky-away"
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    cams = [folder_camera("flaky", 4, fps=20, reconnect={"initial_s": 0.05, "max_s": 0.2, "jitter": 0.1}),
            folder_camera("steady", 3, seed=1, fps=10)]
    cfg = daemon_config(cams, publisher={"wait_for_subscriber_s": 60, "masks": "all"})
    notes: list[str] = []

    def read_notes() -> None:
        try:
            while True:
                notes.extend(notify.recv(4096).decode().splitlines())
        except (TimeoutError, BlockingIOError):
            pass

    def has(prefix: str) -> bool:
        read_notes()
        return any(n.startswith(prefix) for n in notes)

    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    with DaemonProcess(cfg, env=env) as d:
        sub = Subscriber(d.endpoint, status=True)
        try:
            before, _ = collect(sub, 6, timeout=60)
            assert {v.camera for v in before} == {"flaky", "steady"}
            wait_until(lambda: has("READY=1"), 30, what="READY=1")
            wait_until(lambda: has("WATCHDOG=1"), 30, what="WATCHDOG=1 while frames flow")
            assert has("STATUS=")

            folder.rename(away)
            down = None
            end = time.monotonic() + 30
            while down is None and time.monotonic() < end:
                msg = sub.recv(0.5)
                if isinstance(msg, Status) and msg.kind == "camera" and msg.camera == "flaky" \
                        and msg.state == "down":
                    down = msg
            assert down is not None and down.reason
            assert "disappeared" in down.reason or "does not exist" in down.reason
            wait_until(lambda: metric(d.scrape(), "linewatch_camera_up", camera="flaky") == 0, 20)
            assert metric(d.scrape(), "linewatch_camera_up", camera="steady") == 1
            last_seq = max(v.sequence for v in before if v.camera == "flaky")

            away.rename(folder)
            up = None
            after: list[Verdict] = []
            end = time.monotonic() + 30
            while (up is None or len(after) < 3) and time.monotonic() < end:
                msg = sub.recv(0.5)
                if isinstance(msg, Status) and msg.kind == "camera" and msg.camera == "flaky" and msg.state == "up":
                    up = msg
                elif isinstance(msg, Verdict) and msg.camera == "flaky" and up is not None:
                    after.append(msg)
            assert up is not None and len(after) >= 3
            assert min(v.sequence for v in after) > last_seq  # sequence carries on across the reconnect
            samples = d.scrape()
            assert metric(samples, "linewatch_camera_up", camera="flaky") == 1
            assert metric(samples, "linewatch_reconnects_total", camera="flaky") >= 1
            assert metric(samples, "linewatch_reconnects_total", camera="steady") == 0
            hb = None
            while hb is None:
                msg = sub.recv(5)
                assert msg is not None
                if isinstance(msg, Status) and msg.kind == "heartbeat":
                    hb = msg
            assert hb.cameras == {"flaky": "up", "steady": "up"} and hb.frames > 0

            # the CLI subscriber: one camera, JSON lines, masks saved
            masks = tmp_path / "masks"
            proc = run_cli("subscribe", "--endpoint", d.endpoint, "--camera", "steady", "--count", "2", "--json",
                           "--save-masks", str(masks), "--timeout", "30")
            assert proc.returncode == 0, proc.stderr
            lines = [json.loads(line) for line in proc.stdout.splitlines()]
            assert len(lines) == 2 and all(h["camera"] == "steady" and h["has_mask"] for h in lines)
            assert sorted(p.name for p in masks.glob("*.png")) == sorted(
                f"steady_{h['sequence']:08d}_{h['verdict']}.png" for h in lines)
        finally:
            sub.close()
        assert d.terminate() == 0
        assert d.find("camera_down", camera="flaky") and d.find("reconnect", camera="flaky")
        assert d.find("camera_up", camera="flaky")[-1]["seq"] > last_seq
    wait_until(lambda: has("STOPPING=1"), 5, what="STOPPING=1")
    notify.close()


def test_stalled_subscriber_does_not_slow_the_pipeline(folder_camera, daemon_config):
    cfg = daemon_config([folder_camera("cam", 4, size=(240, 320), fps=40)],
                        publisher={"sndhwm": 1, "sndbuf": 2048, "masks": "all", "wait_for_subscriber_s": 60})
    ctx = zmq.Context()
    with DaemonProcess(cfg) as d:
        stalled = stalled_subscriber(ctx, d.endpoint)
        try:
            d.wait_event("ready", timeout=60)
            # the subscriber reads nothing; the daemon must go on and count what it could not deliver
            wait_until(lambda: metric(d.scrape(), "linewatch_frames_dropped_total", camera="cam",
                                      reason="publish_hwm") >= 5, 60, interval=0.2, what="publish_hwm drops")
            frames = metric_total(d.scrape(), "linewatch_verdicts_total", camera="cam")  # pass and fail
            wait_until(lambda: metric_total(d.scrape(), "linewatch_verdicts_total", camera="cam") >= frames + 20,
                       60, interval=0.2, what="verdicts keep coming while the subscriber is stalled")
            samples = d.scrape()
            assert metric(samples, "linewatch_camera_up", camera="cam") == 1
            # when it reads again it first gets what its buffers held, then fresh verdicts: the
            # sequence numbers show the gap it missed while stalled
            fresh = int(metric(samples, "linewatch_frames_captured_total", camera="cam"))
            seqs: list[int] = []
            end = time.monotonic() + 30
            while (not seqs or seqs[-1] < fresh) and time.monotonic() < end:
                if stalled.poll(500):
                    seqs.append(decode(stalled.recv_multipart()).sequence)
            assert seqs and seqs[-1] >= fresh
            assert seqs == sorted(seqs) and len(seqs) < seqs[-1] - seqs[0] + 1  # a gap: dropped and counted
        finally:
            stalled.close()
            ctx.term()
        assert d.terminate() == 0


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(linewatch_cmd(*args), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_invalid_config_is_one_clear_line(tmp_path, untrained_bundle):
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, [{"name": "a", "source": "0", "fsp": 5}])
    proc = run_cli("run", "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("linewatch: error: config ") and "cameras[0].fsp: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml not found" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_or_corrupt_model_is_one_clear_line(tmp_path):
    write_images(tmp_path / "cam", 2)
    cams = [{"name": "cam", "source": f"dir://{tmp_path / 'cam'}"}]
    cfg = write_config(tmp_path / "lw.yaml", tmp_path / "nope.lwm", cams)
    proc = run_cli("run", "--config", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("linewatch: error: model file ") and "nope.lwm not found" in lines[0]
    assert "Traceback" not in proc.stderr

    (tmp_path / "bad.lwm").write_bytes(b"\x00" * 100)
    cfg = write_config(tmp_path / "lw2.yaml", tmp_path / "bad.lwm", cams)
    proc = run_cli("run", "--config", str(cfg))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("linewatch: error: model file ") and "corrupt" in last
    assert "Traceback" not in proc.stderr


def test_replay_job_exits_cleanly_when_sources_end(tmp_path, untrained_bundle):
    write_images(tmp_path / "cam", 3)
    (tmp_path / "cam" / "003.png").write_bytes(b"not a png")
    cams = [{"name": "cam", "source": f"dir://{tmp_path / 'cam'}", "on_end": "stop"}]
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams, daemon={"exit_when_sources_end": True})
    with DaemonProcess(cfg) as d:
        assert d.proc.wait(120) == 0
        d.join_readers()
        shutdown = d.wait_event("shutdown", timeout=1)
        assert shutdown["reason"] == "sources ended" and shutdown["frames"] == 3
        assert shutdown["dropped_by_reason"] == {"decode_error": 1}
        assert d.find("decode_error", camera="cam", file="003.png")


def test_subscribe_cli_times_out_clearly_without_a_daemon():
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    proc = run_cli("subscribe", "--endpoint", endpoint, "--timeout", "0.3")
    assert proc.returncode == 1
    assert f"no verdict within 0.3 s from {endpoint}" in proc.stderr and "Traceback" not in proc.stderr


def test_sd_notify_helper(tmp_path):
    import os

    from linewatch.service.telemetry.sdnotify import SdNotifier

    assert not SdNotifier(env={}).notify("READY=1")  # not under systemd: a silent no-op
    path = tmp_path / "n.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(5)
    try:
        n = SdNotifier(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_s == 4.0
        assert n.ready("2/2 cameras up,\nmultiline")
        assert srv.recv(4096).decode().splitlines() == ["READY=1", "STATUS=2/2 cameras up, multiline"]
        assert n.watchdog() and srv.recv(4096) == b"WATCHDOG=1"
        n.close()
    finally:
        srv.close()
    # the watchdog was meant for another process (e.g. our parent): not ours to feed
    assert SdNotifier(env={"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
    # abstract-namespace sockets ("@name") are addressed with a leading NUL
    assert SdNotifier(env={"NOTIFY_SOCKET": "@lw-test"}).address == "\0lw-test"
    # a socket that is gone never raises into the daemon
    assert not SdNotifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).notify("READY=1")


def test_a_model_scoring_from_its_own_levels_streams_the_scores_it_gives_offline(tmp_path, bottle):
    """A v3 bundle (image score from levels 2·3·4, map from 2·3) through the real daemon, engine and ZeroMQ: each
    verdict's score is the offline model's, and failing frames carry a defect mask."""
    from linewatch.imaging.images import list_images, load_images
    from linewatch.model import load_bundle, load_detector
    from linewatch.tools.fixtures import make_untrained_bundle

    model = make_untrained_bundle(tmp_path / "split.lwm", bottle, stages=(2, 3), score_stages=(2, 3, 4))
    assert load_bundle(model).meta.format_version == 3
    files = list_images(bottle / "test" / "broken_large")
    cams = [{"name": "cam", "source": f"dir://{bottle / 'test' / 'broken_large'}", "fps": 30, "on_end": "stop"}]
    cfg = write_config(tmp_path / "lw.yaml", model, cams, publisher={"wait_for_subscriber_s": 60, "masks": "fail"})
    with DaemonProcess(cfg) as d:
        sub = Subscriber(d.endpoint)
        try:
            verdicts, _ = collect(sub, len(files), timeout=120)
        finally:
            sub.close()
        assert d.terminate() == 0, d.log_text()[-3000:]
    verdicts = sorted(verdicts, key=lambda v: v.sequence)
    assert [v.sequence for v in verdicts] == list(range(len(files)))
    det = load_detector(model, "cpu")
    offline = det.predict_many(load_images(files, det.input_size).images).scores.numpy()
    for v, s in zip(verdicts, offline, strict=True):
        assert v.ref == files[v.sequence].name
        assert v.score == pytest.approx(float(s), rel=1e-4, abs=1e-6)
        if v.verdict == "fail":
            assert v.defect_area > 0
