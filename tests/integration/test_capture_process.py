"""Capture in processes over shared memory, and the source watchdog (thread and process mode): a source whose
read blocks for ever is reported down within timeout_s, killed (process) and reopened; a crashing capture
process is a camera down and a restart, never a stuck daemon; no shared memory is left behind."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import QueueDrainer, StallingSource, value

from linewatch.service.capture import CameraThread
from linewatch.service.capture_process import CameraProcess
from linewatch.service.config import CameraConfig
from linewatch.service.frames import FrameQueue
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.tools.harness import wait_until, write_images

INPUT = (24, 32)
TIMEOUT_S = 1.5
SLACK_S = 3.0  # the watchdog's tick and a loaded 2-core box (load average 10 seen here)


def shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("psm_")}




class States:
    def __init__(self):
        self.seen: list[tuple[float, str, str | None]] = []

    def __call__(self, camera, state, reason):
        self.seen.append((time.monotonic(), state, reason))

    def when(self, state: str, after: float = 0.0) -> float | None:
        return next((t for t, s, _ in self.seen if s == state and t >= after), None)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "frames"
    write_images(d, 6, size=(40, 60))
    return d


def cam_cfg(folder: Path, **kw) -> CameraConfig:
    base = {"name": "cam", "source": f"dir://{folder}", "timeout_s": TIMEOUT_S,
            "reconnect": {"initial_s": 0.2, "max_s": 1.0, "jitter": 0.0}}
    base.update(kw)
    return CameraConfig(**base)


def start_process(cfg: CameraConfig, *, source_ref: str | None = None, slots: int = 4):
    m = Metrics()
    q = FrameQueue(1000, m)
    states = States()
    cam = CameraProcess(cfg, q, m, INPUT, slots=slots, slot_bytes=INPUT[0] * INPUT[1] * 3, on_state=states,
                        source_ref=source_ref, rng=random.Random(0))
    col = QueueDrainer(q)
    cam.start()
    return cam, m, col, states


def stop(cam, col):
    cam.stop()
    cam.join(10)
    col.close()
    assert not cam.is_alive()


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it is gone if its state is Z or X
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] in "ZX"
    except FileNotFoundError:
        return True


def test_folder_replay_through_a_capture_process(folder):
    cam, m, col, states = start_process(cam_cfg(folder, fps=200))
    try:
        wait_until(lambda: cam.state == "ended", 60, what="the replay to end")
        wait_until(lambda: len(col.frames) == 6, 5, what="all frames")
    finally:
        stop(cam, col)
    assert [f.sequence for f in col.frames] == list(range(6))
    assert [f.ref for f in col.frames] == sorted(p.name for p in folder.iterdir())
    f = col.frames[0]
    assert f.image.shape == (*INPUT, 3) and f.image.dtype == np.uint8
    assert f.frame_size == (60, 40) and f.roi == (0, 0, 60, 40)
    assert [s for _, s, _ in states.seen] == ["up", "ended"]
    assert value(m, "linewatch_frames_captured_total", camera="cam") == 6
    assert cam.child_imported_torch is False  # the capture process never pays for torch
    assert cam.restarts == 0
    assert cam.ring_name not in shm_names()  # the ring was unlinked


def test_a_blocked_read_is_killed_reported_down_within_timeout_and_restarted(folder):
    cam, m, col, states = start_process(cam_cfg(folder, on_end="loop"), source_ref="fakes:stalling_source")
    try:
        wait_until(lambda: cam.state == "up" and len(col.frames) > 3, 60, what="frames")
        first_pid, first_ring = cam.child_pid, cam.ring_name
        (folder / "STALL").touch()  # read() now blocks for ever inside the capture process
        t_stall = time.monotonic()
        wait_until(lambda: cam.state == "down", TIMEOUT_S + SLACK_S + 1, what="camera down")
        t_down = states.when("down", t_stall)
        # the last frame may have been read just before the flag: down within timeout_s (+ tick and load)
        assert t_down is not None and t_down - t_stall <= TIMEOUT_S + SLACK_S
        down_reason = [r for _, s, r in states.seen if s == "down"][0]
        assert "timeout_s 1.5" in down_reason and "killed and restarted" in down_reason
        wait_until(lambda: pid_gone(first_pid), 10, what="the stalled capture process to be killed")
        wait_until(lambda: first_ring not in shm_names(), 10, what="its ring unlinked at the restart")
        n = len(col.frames)
        (folder / "STALL").unlink()  # the stream resumes
        wait_until(lambda: cam.state == "up" and len(col.frames) > n + 3, 60, what="camera back up")
        assert cam.restarts >= 1 and cam.child_pid != first_pid
        assert value(m, "linewatch_reconnects_total", camera="cam") >= 1
        seqs = [f.sequence for f in col.frames]
        assert seqs == sorted(set(seqs))  # numbers carry on across the restart
    finally:
        stop(cam, col)
    assert cam.ring_name not in shm_names() and first_ring not in shm_names()


def test_a_crashing_capture_process_is_a_camera_down_and_a_restart(folder):
    cam, m, col, states = start_process(cam_cfg(folder, on_end="loop"), source_ref="fakes:stalling_source")
    try:
        wait_until(lambda: cam.state == "up" and len(col.frames) > 3, 60, what="frames")
        (folder / "CRASH").touch()
        wait_until(lambda: cam.state == "down", 10, what="camera down after the crash")
        reason = [r for _, s, r in states.seen if s == "down"][0]
        assert "exited (code 3)" in reason
        n = len(col.frames)
        (folder / "CRASH").unlink()
        wait_until(lambda: cam.state == "up" and len(col.frames) > n + 3, 60, what="camera back up")
        seqs = [f.sequence for f in col.frames]
        assert seqs == sorted(set(seqs))
        assert cam.is_alive()  # the supervisor carries on
    finally:
        stop(cam, col)


def test_stop_while_the_read_is_blocked_ends_the_process(folder):
    cam, m, col, states = start_process(cam_cfg(folder, on_end="loop", timeout_s=30.0),
                                        source_ref="fakes:stalling_source")
    try:
        wait_until(lambda: cam.state == "up", 60, what="frames")
        (folder / "STALL").touch()
        wait_until(lambda: cam.last_frame_mono is not None and time.monotonic() - cam.last_frame_mono > 0.3, 10)
        pid = cam.child_pid
        t0 = time.monotonic()
    finally:
        stop(cam, col)
    assert time.monotonic() - t0 < 8  # terminate (then kill) bounds it, whatever the read does
    assert pid_gone(pid)
    assert cam.ring_name not in shm_names()


def test_thread_mode_watchdog_reports_a_blocked_read_and_reopens_when_it_returns(folder):
    m = Metrics()
    q = FrameQueue(1000, m)
    states = States()
    src = StallingSource(str(folder))
    cam = CameraThread(cam_cfg(folder, on_end="loop"), q, m, INPUT, on_state=states, source=src,
                       rng=random.Random(0))
    col = QueueDrainer(q)
    cam.start()
    try:
        wait_until(lambda: cam.state == "up" and len(col.frames) > 3, 30, what="frames")
        (folder / "STALL").touch()
        t_stall = time.monotonic()
        wait_until(lambda: cam.state == "down", TIMEOUT_S + SLACK_S + 1, what="camera down")
        assert states.when("down", t_stall) - t_stall <= TIMEOUT_S + SLACK_S
        assert "read is blocked" in [r for _, s, r in states.seen if s == "down"][0]
        n, reconnects = len(col.frames), value(m, "linewatch_reconnects_total", camera="cam")
        (folder / "STALL").unlink()  # the read returns: the source is closed and reopened
        wait_until(lambda: cam.state == "up" and len(col.frames) > n + 3, 30, what="camera back up")
        assert value(m, "linewatch_reconnects_total", camera="cam") > reconnects
    finally:
        cam.stop()
        cam.join(5)
        col.close()


def test_cameras_started_together_wait_at_the_gate_then_read(folder):
    from linewatch.service.capture_process import open_gate, start_gate

    m = Metrics()
    q = FrameQueue(1000, m)
    gate = start_gate()
    cams = [CameraProcess(cam_cfg(folder, name=f"c{i}", on_end="loop", fps=50), q, m, INPUT, slots=4,
                          slot_bytes=INPUT[0] * INPUT[1] * 3, gate=gate) for i in range(2)]
    col = QueueDrainer(q)
    for c in cams:
        c.start()
    try:
        wait_until(lambda: all(c.hello.is_set() for c in cams), 60, what="both processes started")
        assert not col.frames and all(c.state == "starting" for c in cams)  # nobody reads before the gate
        open_gate(gate, cams, timeout=5)
        wait_until(lambda: {f.camera for f in col.frames} == {"c0", "c1"}, 30, what="frames from both")
    finally:
        for c in cams:
            c.stop()
        for c in cams:
            c.join(10)
        col.close()


def test_stage_timers_reach_the_daemon_while_frames_flow(folder):
    """The child's read/prepare timers travel in its heartbeats: they must go out on time even when frames
    arrive faster than the heartbeat interval (a frame alone proves liveness but carries no timers)."""
    cam, m, col, states = start_process(cam_cfg(folder, fps=200, on_end="loop"))
    try:
        wait_until(lambda: cam.state == "up", 60, what="the camera to come up")
        wait_until(lambda: value(m, "linewatch_stage_seconds_total", stage="read") > 0, 4 * TIMEOUT_S,
                   what="read timers from a camera delivering 200 fps")
        assert cam.state == "up"  # still streaming: the timers did not wait for the end of the replay
        assert value(m, "linewatch_stage_seconds_total", stage="prepare") > 0
    finally:
        stop(cam, col)
