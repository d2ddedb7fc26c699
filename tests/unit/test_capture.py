"""Capture: the frame queue's drop policy, frame preparation, sources, reconnects."""

from __future__ import annotations

import random
import threading
import time

import cv2
import numpy as np
import pytest
import structlog
from fakes import MJPEGCamera, QueueDrainer

from linewatch.backoff import backoff_delay
from linewatch.service.capture import CameraThread, prepare
from linewatch.service.config import CameraConfig, ReconnectConfig
from linewatch.service.frames import Frame, FrameQueue, RawFrame, SourceError
from linewatch.service.sources.files import DirSource
from linewatch.service.sources.mjpeg import MJPEGSource
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.tools.harness import wait_until, write_images

INPUT = (32, 32)


def frame(cam: str, seq: int) -> Frame:
    return Frame(cam, seq, time.time(), time.monotonic(), np.zeros((*INPUT, 3), np.uint8), (64, 48),
                 (0, 0, 64, 48))


def value(m: Metrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


# --------------------------------------------------------------------------- FrameQueue


def test_full_queue_drops_oldest_and_counts_per_camera():
    m = Metrics()
    q = FrameQueue(3, m)
    for s in range(5):
        q.put(frame("a", s))
    q.put(frame("b", 0))
    assert len(q) == 4
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="queue_full") == 2
    assert value(m, "linewatch_frames_dropped_total", camera="b", reason="queue_full") == 0
    assert value(m, "linewatch_queue_depth", queue="frames") == 4
    batch = q.get_batch(10, 0.0, 0.0)
    # the newest three of camera a survive, served oldest-first across cameras
    assert [(f.camera, f.sequence) for f in batch] == [("a", 2), ("a", 3), ("a", 4), ("b", 0)]
    assert value(m, "linewatch_queue_depth", queue="frames") == 0


def test_get_batch_limits_and_timeouts():
    q = FrameQueue(100)
    assert q.get_batch(4, 0.01, 0.01) == []  # nothing came: empty after the timeout
    for s in range(10):
        q.put(frame("a", s))
    assert [f.sequence for f in q.get_batch(4, 0.0, 1.0)] == [0, 1, 2, 3]
    # fewer frames than max_batch: returns what there is once max_wait has passed
    assert [f.sequence for f in q.get_batch(100, 0.02, 1.0)] == list(range(4, 10))


def test_get_batch_collects_frames_arriving_within_max_wait():
    q = FrameQueue(100)
    q.put(frame("a", 0))

    def later():
        time.sleep(0.05)
        q.put(frame("b", 0))

    t = threading.Thread(target=later)
    t.start()
    batch = q.get_batch(2, 10.0, 1.0)  # max_batch reached long before max_wait
    t.join()
    assert [(f.camera, f.sequence) for f in batch] == [("a", 0), ("b", 0)]


# --------------------------------------------------------------------------- preparation, backoff


def test_prepare_crops_resizes_and_converts_to_rgb():
    bgr = np.zeros((100, 200, 3), np.uint8)
    bgr[20:60, 50:150] = (255, 0, 0)  # blue in BGR
    img, size, roi = prepare(RawFrame(bgr, rgb=False), (50, 20, 100, 40), (16, 32))
    assert img.shape == (16, 32, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    assert size == (200, 100) and roi == (50, 20, 100, 40)
    assert (img[..., 2] == 255).all() and (img[..., 0] == 0).all()  # RGB now: blue is channel 2
    # an ROI reaching past the frame is clipped to it; one outside it is an error naming the fix
    _, _, roi = prepare(RawFrame(bgr, rgb=False), (150, 50, 100, 100), (16, 16))
    assert roi == (150, 50, 50, 50)
    with pytest.raises(SourceError, match="outside the 200x100 frame"):
        prepare(RawFrame(bgr, rgb=False), (300, 0, 10, 10), (16, 16))
    gray = np.full((10, 10), 7, np.uint8)
    img, _, _ = prepare(RawFrame(gray, rgb=False), None, (8, 8))
    assert img.shape == (8, 8, 3)


def test_backoff_grows_is_capped_and_jittered():
    pol = ReconnectConfig(initial_s=0.5, max_s=4.0, jitter=0.0)
    rng = random.Random(0)
    assert [backoff_delay(a, pol, rng) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_delay(10_000, pol, rng) == 4.0
    pol = ReconnectConfig(initial_s=1.0, max_s=100.0, jitter=0.2)
    delays = [backoff_delay(2, pol, rng) for _ in range(200)]
    assert min(delays) >= 3.2 and max(delays) <= 4.8 and len(set(delays)) > 1


# --------------------------------------------------------------------------- camera threads




def camera(tmp_path_or_source, name="cam", **kw) -> CameraConfig:
    kw.setdefault("reconnect", {"initial_s": 0.02, "max_s": 0.1, "jitter": 0.0})
    return CameraConfig(name=name, source=str(tmp_path_or_source), **kw)


def run_camera(cfg: CameraConfig, q: FrameQueue, m: Metrics, states: list | None = None, source=None):
    cb = (lambda cam, state, reason: states.append(state)) if states is not None else None
    t = CameraThread(cfg, q, m, INPUT, on_state=cb, source=source, rng=random.Random(0))
    t.start()
    return t


def test_dir_replay_delivers_every_file_in_order_then_ends(tmp_path):
    files = write_images(tmp_path / "imgs", 6)
    m, q, states = Metrics(), FrameQueue(100), []
    cam = run_camera(camera(f"dir://{tmp_path / 'imgs'}", fps=200), q, m, states)
    cam.join(10)
    assert not cam.is_alive() and cam.state == "ended"
    got = q.drain()
    assert [f.sequence for f in got] == list(range(6))
    assert [f.ref for f in got] == [p.name for p in files]
    assert all(f.image.shape == (*INPUT, 3) and f.frame_size == (64, 48) for f in got)
    assert states == ["up", "ended"]
    assert value(m, "linewatch_camera_up", camera="cam") == 0
    assert value(m, "linewatch_frames_captured_total", camera="cam") == 6


def test_unreadable_files_are_skipped_counted_and_logged(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 4)
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "002b.jpg").write_bytes(b"")  # empty file
    m, q = Metrics(), FrameQueue(100)
    with structlog.testing.capture_logs() as logs:
        cam = run_camera(camera(f"dir://{folder}"), q, m)
        cam.join(10)
    got = q.drain()
    assert [f.ref for f in got] == ["000.png", "002.png", "003.png"]
    # the unreadable files used sequence numbers 1 and 3: gaps that the drop counter accounts for
    assert [f.sequence for f in got] == [0, 2, 4]
    assert value(m, "linewatch_decode_errors_total", camera="cam") == 2
    assert value(m, "linewatch_frames_dropped_total", camera="cam", reason="decode_error") == 2
    errors = [e for e in logs if e["event"] == "decode_error"]
    assert sorted(e["file"] for e in errors) == ["001.png", "002b.jpg"]
    assert all(e["camera"] == "cam" for e in errors)


def test_loop_keeps_sequence_monotonic(tmp_path):
    write_images(tmp_path / "imgs", 3)
    m, q = Metrics(), FrameQueue(1000)
    cam = run_camera(camera(f"dir://{tmp_path / 'imgs'}", on_end="loop", fps=500), q, m)
    wait_until(lambda: len(q) >= 8, 10, what="8 frames")
    cam.stop()
    cam.join(5)
    got = q.drain()
    assert [f.sequence for f in got] == list(range(len(got)))
    assert [f.ref for f in got[:7]] == ["000.png", "001.png", "002.png"] * 2 + ["000.png"]


def test_full_queue_at_capture_rate_keeps_the_newest(tmp_path):
    write_images(tmp_path / "imgs", 5)
    m = Metrics()
    q = FrameQueue(2, m)
    cam = run_camera(camera(f"dir://{tmp_path / 'imgs'}", on_end="loop"), q, m)  # no fps cap, no consumer
    wait_until(lambda: value(m, "linewatch_frames_captured_total", camera="cam") >= 20, 10)
    cam.stop()
    cam.join(5)
    captured = value(m, "linewatch_frames_captured_total", camera="cam")
    left = q.drain()
    assert len(left) == 2
    assert value(m, "linewatch_frames_dropped_total", camera="cam", reason="queue_full") == captured - 2
    assert [f.sequence for f in left] == [cam.sequence - 2, cam.sequence - 1]  # newest frames won


def test_folder_that_disappears_and_returns_reconnects(tmp_path):
    folder, away = tmp_path / "imgs", tmp_path / "away"
    write_images(folder, 3)
    m, q, states = Metrics(), FrameQueue(1000), []
    col = QueueDrainer(q)
    cam = run_camera(camera(f"dir://{folder}", on_end="loop", fps=100), q, m, states)
    try:
        wait_until(lambda: len(col.frames) >= 3, 10, what="first frames")
        assert value(m, "linewatch_camera_up", camera="cam") == 1
        folder.rename(away)
        wait_until(lambda: cam.state == "down", 10, what="camera down")
        assert value(m, "linewatch_camera_up", camera="cam") == 0
        wait_until(lambda: value(m, "linewatch_reconnects_total", camera="cam") >= 2, 10, what="retries")
        n_down = len(col.frames)
        away.rename(folder)
        wait_until(lambda: cam.state == "up" and len(col.frames) > n_down + 2, 10, what="camera back up")
        assert value(m, "linewatch_camera_up", camera="cam") == 1
    finally:
        cam.stop()
        cam.join(5)
        col.close()
    assert states[:3] == ["up", "down", "up"]
    seqs = [f.sequence for f in col.frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # monotonic across the reconnect


def test_missing_folder_at_start_is_down_then_up(tmp_path):
    folder = tmp_path / "later"
    m, q, states = Metrics(), FrameQueue(100), []
    cam = run_camera(camera(f"dir://{folder}", fps=100), q, m, states)
    try:
        assert cam.first_attempt.wait(5)
        wait_until(lambda: cam.state == "down", 5)
        write_images(folder, 2)
        cam.join(10)
    finally:
        cam.stop()
    assert states == ["down", "up", "ended"]
    assert len(q) == 2


def test_video_file_source(tmp_path):
    path = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert w.isOpened()
    for i in range(5):
        w.write(np.full((48, 64, 3), i * 40, np.uint8))
    w.release()
    m, q = Metrics(), FrameQueue(100)
    cam = run_camera(camera(path), q, m)
    cam.join(10)
    got = q.drain()
    assert cam.state == "ended"
    assert [f.sequence for f in got] == list(range(5))
    assert got[0].ref == "clip.avi#0" and got[0].frame_size == (64, 48)


# --------------------------------------------------------------------------- MJPEG over HTTP


@pytest.mark.parametrize("path", ["/stream", "/nolength"])
def test_mjpeg_frames(path):
    srv = MJPEGCamera()
    m, q = Metrics(), FrameQueue(1000)
    cam = run_camera(camera(f"http://127.0.0.1:{srv.port}{path}", timeout_s=2), q, m)
    try:
        wait_until(lambda: len(q) >= 5, 10, what="5 MJPEG frames")
    finally:
        cam.stop()
        cam.join(5)
        srv.stop()
    got = q.drain()
    assert [f.sequence for f in got] == list(range(len(got)))
    assert got[0].frame_size == (64, 48)
    assert value(m, "linewatch_decode_errors_total", camera="cam") == 0


def test_mjpeg_corrupt_parts_are_counted_not_fatal():
    srv = MJPEGCamera()
    m, q = Metrics(), FrameQueue(1000)
    cam = run_camera(camera(f"http://127.0.0.1:{srv.port}/corrupt", timeout_s=2), q, m)
    try:
        wait_until(lambda: value(m, "linewatch_decode_errors_total", camera="cam") >= 2 and len(q) >= 4, 10)
    finally:
        cam.stop()
        cam.join(5)
        srv.stop()
    assert cam.state == "up"  # never went down for a bad part
    assert value(m, "linewatch_reconnects_total", camera="cam") == 0


def test_mjpeg_server_stopped_and_restarted_reconnects():
    srv = MJPEGCamera()
    port = srv.port
    m, q, states = Metrics(), FrameQueue(10_000), []
    col = QueueDrainer(q)
    cam = run_camera(camera(f"http://127.0.0.1:{port}/stream", timeout_s=1), q, m, states)
    try:
        wait_until(lambda: len(col.frames) >= 3, 10, what="first frames")
        srv.stop()
        wait_until(lambda: cam.state == "down", 10, what="camera down")
        assert value(m, "linewatch_camera_up", camera="cam") == 0
        n = len(col.frames)
        srv = MJPEGCamera(port)
        wait_until(lambda: cam.state == "up" and len(col.frames) > n + 2, 15, what="camera back up")
    finally:
        cam.stop()
        cam.join(5)
        srv.stop()
        col.close()
    assert states[:3] == ["up", "down", "up"]
    assert value(m, "linewatch_reconnects_total", camera="cam") >= 1
    seqs = [f.sequence for f in col.frames]
    assert seqs == sorted(seqs)


def test_not_an_mjpeg_url_is_a_clear_source_error():
    srv = MJPEGCamera()
    try:
        src = MJPEGSource(f"http://user:secret@127.0.0.1:{srv.port}/page", 2)
        with pytest.raises(SourceError, match=r"is not an MJPEG stream \(Content-Type text/html\)") as exc:
            src.open()
        assert "secret" not in str(exc.value)  # credentials never reach logs
        src.close()
    finally:
        srv.stop()


def test_dir_source_resumes_after_last_file(tmp_path):
    write_images(tmp_path, 4)
    src = DirSource(tmp_path, loop=False)
    src.open()
    assert src.read().ref == "000.png" and src.read().ref == "001.png"
    src.close()
    src.open()  # as after a reconnect: no replay of what was already delivered
    assert [src.read().ref, src.read().ref, src.read()] == ["002.png", "003.png", None]
