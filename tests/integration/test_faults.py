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
import socket
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from linewatch.client import Subscriber
from linewatch.messages import Status, Verdict
from linewatch.tools.harness import DaemonProcess, free_tcp_port, metric, wait_until, write_config, write_images

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


class Collector(threading.Thread):
    """A subscriber that reads everything in the background (verdicts and status)."""

    def __init__(self, endpoint: str, **kw):
        super().__init__(daemon=True)
        self.sub = Subscriber(endpoint, status=True, rcvhwm=1_000_000, **kw)
        self.verdicts: list[Verdict] = []
        self.statuses: list[Status] = []
        self._halt = threading.Event()
        self.lock = threading.Lock()
        self.start()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                msg = self.sub.recv(0.1)
                with self.lock:
                    if isinstance(msg, Verdict):
                        self.verdicts.append(msg)
                    elif isinstance(msg, Status):
                        self.statuses.append(msg)
        finally:
            self.sub.close()

    def of(self, camera: str) -> list[Verdict]:
        with self.lock:
            return [v for v in self.verdicts if v.camera == camera]

    def camera_events(self, camera: str) -> list[Status]:
        with self.lock:
            return [s for s in self.statuses if s.kind == "camera" and s.camera == camera]

    def finish(self, expected: int, timeout: float = 30.0) -> None:
        """Stop once ``expected`` verdicts arrived (or after ``timeout``)."""
        wait_until(lambda: len(self.verdicts) >= expected, timeout, what=f"{expected} verdicts received")
        time.sleep(0.3)  # anything beyond expected would be a bug: give it a moment to show up
        self._halt.set()
        self.join(5)


def stop_and_reconcile(d: DaemonProcess, col: Collector, cameras: list[str], allowed_drops: set[str]
                       ) -> dict:
    """SIGTERM → exit 0; then, per camera, frames read = verdicts received + frames dropped."""
    assert d.terminate(60) == 0, d.log_text()[-3000:]
    shutdown = d.wait_event("shutdown", timeout=5)
    col.finish(shutdown["published"])
    assert set(shutdown["dropped_by_reason"]) <= allowed_drops, shutdown["dropped_by_reason"]
    assert len(col.verdicts) == shutdown["published"]
    for cam in cameras:
        seqs = [v.sequence for v in col.of(cam)]
        assert len(seqs) == len(set(seqs)), f"{cam}: a sequence number delivered twice"
        read = shutdown["last_seq"][cam] + 1
        assert read == len(seqs) + shutdown["dropped_by_camera"].get(cam, 0), (cam, read, len(seqs), shutdown)
    return shutdown


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- a camera that can be killed


def jpeg(i: int, size=(120, 160)) -> bytes:
    img = np.full((*size, 3), (i * 29) % 256, np.uint8)
    cv2.putText(img, str(i), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 2)
    return cv2.imencode(".jpg", img)[1].tobytes()


class KillableMJPEGCamera:
    """An HTTP MJPEG camera on a raw socket. ``kill()`` cuts every stream in the middle of a JPEG part
    and resets the connections (RST), as a camera losing power or a cable being pulled would."""

    def __init__(self, port: int = 0):
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.killed = threading.Event()
        self.parts_sent = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.killed.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)  # the request; any path streams
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=fr\r\n\r\n")
            i = 0
            while True:
                data = jpeg(i)
                part = b"--fr\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data) + data + b"\r\n"
                if self.killed.is_set():
                    conn.sendall(part[: len(part) // 2])  # half a frame, then the line goes dead
                    break
                conn.sendall(part)
                self.parts_sent += 1
                i += 1
                time.sleep(0.02)
        except OSError:
            pass
        finally:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            conn.close()

    def kill(self) -> None:
        self.killed.set()
        self.srv.close()
        deadline = time.monotonic() + 5
        while any(c.fileno() != -1 for c in self.conns) and time.monotonic() < deadline:
            time.sleep(0.02)


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
        tmp_path, untrained_bundle):
    files = tmp_path / "files"
    good = [p.name for p in write_images(files, 6)]
    bad = write_bad_files(files)
    cam = KillableMJPEGCamera()
    port = cam.port
    cams = [
        {"name": "net", "source": f"http://127.0.0.1:{port}/video.mjpg", "fps": 20, "timeout_s": 1,
         "reconnect": {"initial_s": 0.1, "max_s": 0.8, "jitter": 0.1}},
        {"name": "files", "source": f"dir://{files}", "fps": 25, "on_end": "loop"},
    ]
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams, publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        col = Collector(d.endpoint)
        try:
            wait_until(lambda: len(col.of("net")) >= 5 and len(col.of("files")) >= 8, 60, what="both cameras")
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
            n_files = len(col.of("files"))
            wait_until(lambda: len(col.of("files")) >= n_files + 10, 30, what="files camera going on")
            assert metric(d.scrape(), "linewatch_reconnects_total", camera="files") == 0

            cam = KillableMJPEGCamera(port)  # the camera comes back on the same address
            wait_until(lambda: any(s.state == "up" for s in col.camera_events("net")[1:]), 30, what="net up")
            wait_until(lambda: len([v for v in col.of("net") if v.sequence > last_before]) >= 5, 30,
                       what="net verdicts after the restart")
            samples = d.scrape()
            assert metric(samples, "linewatch_camera_up", camera="net") == 1
            assert metric(samples, "linewatch_reconnects_total", camera="net") >= 3
            assert [s.state for s in col.camera_events("net")][:3] == ["up", "down", "up"]
            hb = wait_for_heartbeat(col)
            assert hb.cameras == {"net": "up", "files": "up"}
        finally:
            cam.kill()
        shutdown = stop_and_reconcile(d, col, ["net", "files"], allowed_drops={"decode_error", "queue_full"})

    # the folder: only good files got verdicts; every bad one was skipped, counted and logged by name
    assert {v.ref for v in col.of("files")} == set(good)
    logged = d.find("decode_error", camera="files")
    assert {e["file"] for e in logged} == set(bad)
    assert all(e["action"] == "skipped" and e["file"] in e["error"] for e in logged)
    assert shutdown["dropped_by_reason"]["decode_error"] == len(logged)  # one count per skipped file read
    assert not d.find("decode_error", camera="net")
    print(f"net+files: read {({c: n + 1 for c, n in shutdown['last_seq'].items()})}, received "
          f"{ {c: len(col.of(c)) for c in ('net', 'files')} }, dropped {shutdown['dropped_by_camera']} "
          f"{shutdown['dropped_by_reason']}, net reconnects {len(d.find('reconnect', camera='net'))}, "
          f"retry delays {delays}")


def wait_for_heartbeat(col: Collector, timeout: float = 10.0) -> Status:
    n = len(col.statuses)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with col.lock:
            hbs = [s for s in col.statuses[n:] if s.kind == "heartbeat"]
        if hbs:
            return hbs[-1]
        time.sleep(0.05)
    raise AssertionError("no heartbeat")


# --------------------------------------------------------------------------- subscriber churn


def test_subscribers_that_stall_and_vanish_cause_no_stall_and_no_growth(tmp_path, untrained_bundle):
    write_images(tmp_path / "cam", 4, size=(240, 320))
    cams = [{"name": "cam", "source": f"dir://{tmp_path / 'cam'}", "fps": 40, "on_end": "loop"}]
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams,
                       publisher={"sndhwm": 5, "sndbuf": 2048, "masks": "all", "wait_for_subscriber_s": 60})
    ctx = zmq.Context()

    def churn(cycles: int) -> None:
        """Connect, subscribe, read at most one message, stall, disconnect without a word."""
        for i in range(cycles):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 2048)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt_string(zmq.SUBSCRIBE, "verdict." if i % 2 else "")
            s.connect(d.endpoint)
            if i % 3 == 0 and s.poll(500):
                s.recv_multipart()
            time.sleep(0.4)  # 16 verdicts at 40 fps: more than its share of buffers (HWM 5, 2 KiB)
            s.close()

    with DaemonProcess(cfg) as d:
        col = Collector(d.endpoint)
        try:
            d.wait_event("ready", 60)
            pid = d.proc.pid
            churn(6)  # warm-up: allocator pools, ZeroMQ pipes, the first buffers
            time.sleep(1.0)
            rss0, fds0 = rss_kb(pid), open_fds(pid)
            got = [len(col.verdicts)]
            for _ in range(4):
                churn(5)
                got.append(len(col.verdicts))
            time.sleep(1.0)  # let ZeroMQ finish tearing down the last pipes
            rss1, fds1 = rss_kb(pid), open_fds(pid)
            # the well-behaved subscriber kept getting verdicts in every phase of the churn
            assert all(b > a for a, b in zip(got, got[1:], strict=False)), got
            n = len(col.verdicts)
            wait_until(lambda: len(col.verdicts) >= n + 20, 30, what="fresh verdicts after the churn")
            samples = d.scrape()
            assert metric(samples, "linewatch_camera_up", camera="cam") == 1
            assert not [e for e in d.find("health") if e.get("healthy") is False]
        finally:
            ctx.term()
        shutdown = stop_and_reconcile(d, col, ["cam"], allowed_drops={"publish_hwm", "queue_full"})
    # the stalls were real: with hwm_policy count, what a stalled subscriber could not take was counted
    assert shutdown["dropped_by_reason"].get("publish_hwm", 0) > 0
    # 20 subscribers came and went: no socket and no memory stays behind (generous margins: the
    # allocator may keep a few MiB; a leaked pipe per subscriber would hold its queued masks)
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert rss1 - rss0 < 24 * 1024, f"RSS grew {(rss1 - rss0) / 1024:.1f} MiB over 20 stalled subscribers"
    print(f"churn: rss {rss0 / 1024:.1f} → {rss1 / 1024:.1f} MiB, fds {fds0} → {fds1}, "
          f"drops {shutdown['dropped_by_reason']}, verdicts received {len(col.verdicts)}")


# --------------------------------------------------------------------------- kill -9, restart, SIGTERM under load


def test_sigkill_then_restart_on_the_same_ports_then_sigterm_under_full_load(tmp_path, untrained_bundle):
    write_images(tmp_path / "a", 5, size=(120, 160), seed=1)
    write_images(tmp_path / "b", 5, size=(120, 160), seed=2)
    pub_port, metrics_port = free_tcp_port(), free_tcp_port()
    # full rate: no fps cap, small queues, so the worker is the bottleneck and frames pile up
    cams = [{"name": n, "source": f"dir://{tmp_path / n}", "on_end": "loop"} for n in ("a", "b")]
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams,
                       batching={"max_batch": 8, "frame_queue": 8, "max_wait_ms": 5},
                       publisher={"bind": f"tcp://127.0.0.1:{pub_port}", "sndhwm": 1_000_000, "linger_ms": 5000},
                       metrics={"port": metrics_port}, daemon={"drain_timeout_s": 30})

    with DaemonProcess(cfg) as first:
        old = Subscriber(f"tcp://127.0.0.1:{pub_port}")  # stays connected across the kill
        assert old.recv(60) is not None
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(10) == -signal.SIGKILL
        assert not first.find("shutdown")  # no chance to clean up anything
        while old.recv(0.3) is not None:  # what the first run had already sent
            pass

    with DaemonProcess(cfg) as d:  # same ports at once: nothing stale blocks the bind
        assert d.wait_event("publisher_bound", 60)["endpoint"] == f"tcp://127.0.0.1:{pub_port}"
        assert d.wait_event("metrics_listening", 60)["port"] == metrics_port
        col = Collector(d.endpoint)
        try:
            # the subscriber from before the kill reconnects by itself and gets the new run's verdicts
            v = old.recv(60)
            assert isinstance(v, Verdict) and v.run_id == d.wait_event("ready", 60)["run_id"]
        finally:
            old.close()
        wait_until(lambda: metric(d.scrape(), "linewatch_frames_dropped_total", camera="a",
                                  reason="queue_full") > 0 and len(col.verdicts) >= 40, 60,
                   what="full load: the frame queues overflow")
        t0 = time.monotonic()
        shutdown = stop_and_reconcile(d, col, ["a", "b"], allowed_drops={"queue_full"})
        stop_s = time.monotonic() - t0
    # every frame that entered the worker's queue and was not pushed out by a newer one got its verdict
    # published before exit; nothing was dropped for "shutdown"
    assert shutdown["reason"] == "SIGTERM" and shutdown["frames"] == shutdown["published"] == len(col.verdicts)
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


def test_sighup_reloads_a_replaced_model_between_batches_and_rejects_bad_files(tmp_path, untrained_bundle):
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

    cams = [{"name": "cam", "source": f"dir://{tmp_path / 'imgs'}", "fps": 30, "on_end": "loop"}]
    write_images(tmp_path / "imgs", 4)
    cfg = write_config(tmp_path / "lw.yaml", model, cams, publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        col = Collector(d.endpoint)
        wait_until(lambda: len(col.verdicts) >= 5, 60, what="verdicts")
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
        n = len(col.verdicts)
        wait_until(lambda: len(col.verdicts) >= n + 10, 30, what="verdicts after the rejections")
        samples = d.scrape()
        assert metric(samples, "linewatch_model_reload_total", result="rejected") == len(bad)
        assert metric(samples, "linewatch_model_reload_total", result="unchanged") == 1
        assert metric(samples, "linewatch_model_reload_total", result="ok") == 1
        assert d.proc.poll() is None  # SIGHUP never ends the daemon
        failed = d.find("inference_failed")
        assert not failed, failed
        shutdown = stop_and_reconcile(d, col, ["cam"], allowed_drops={"queue_full"})

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
    assert shutdown["dropped"] == 0
    paused = d.find("model_reload_ready")[0]["inference_paused_s"]
    print(f"reload: {switch} verdicts from the old model, {len(ids) - switch} from the new, dropped "
          f"{shutdown['dropped']}, inference paused {paused} s; rejections:", json.dumps(reasons, indent=1))
