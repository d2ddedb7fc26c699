"""rtsp:// for real: H.264 over RTSP from GStreamer's RTSP server (tests/rtsp_server.py, a child process), read by a
real ``linewatch run`` through OpenCV's FFmpeg backend; the server killed and restarted mid-stream → camera down,
then up, and the sequence continues. Plus the open timeout against a server that never answers.

The server runs under any Python with PyGObject and GStreamer's RTSP server introspection data (Debian's
/usr/bin/python3 + python3-gi does; linewatch's venv need not). Skipped, with the reason, where neither can.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from linewatch.tools.harness import DaemonProcess, VerdictCounter, free_tcp_port, metric_total, wait_until

pytestmark = pytest.mark.slow

SERVER = Path(__file__).resolve().parents[1] / "rtsp_server.py"
PROBE = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
         "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
         "assert Gst.ElementFactory.find('x264enc'), 'x264enc missing (gstreamer1.0-plugins-ugly)'")


def _server_python() -> tuple[str | None, str]:
    """A Python that can run the RTSP server, or None and why not."""
    reasons = []
    for py in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        if not py or not Path(py).exists():
            continue
        r = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return py, ""
        reasons.append(f"{py}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    return None, ("no Python with PyGObject + GStreamer's RTSP server + x264enc (Debian gir1.2-gst-rtsp-server-1.0, "
                  "python3-gi, gstreamer1.0-plugins-ugly; make sysdeps): " + "; ".join(reasons))


SERVER_PY, WHY = _server_python()


def _cv2_rtsp() -> str | None:
    import cv2

    info = cv2.getBuildInformation()
    ffmpeg = [line for line in info.splitlines() if line.strip().startswith("FFMPEG:")]
    return None if ffmpeg and "YES" in ffmpeg[0] else "this OpenCV has no FFmpeg backend (needed for rtsp://)"


class RTSPServer:
    def __init__(self, port: int):
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> None:
        assert SERVER_PY is not None
        self.proc = subprocess.Popen([SERVER_PY, str(SERVER), str(self.port), "--fps", "10"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        assert ready and ready[0].strip() == "READY", f"RTSP server did not start: {ready}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def rtsp_server():
    if SERVER_PY is None:
        pytest.skip(WHY)
    if why := _cv2_rtsp():
        pytest.skip(why)
    srv = RTSPServer(free_tcp_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def test_rtsp_frames_verdicts_and_server_restart(rtsp_server, daemon_config):
    cam = {"name": "ipcam", "source": rtsp_server.url, "timeout_s": 3.0,
           "reconnect": {"initial_s": 0.2, "max_s": 1.0}}
    cfg = daemon_config([cam], publisher={"wait_for_subscriber_s": 30})
    with DaemonProcess(cfg) as d:
        col = VerdictCounter(d.endpoint, status=True, keep=10_000)
        col.start()
        try:
            wait_until(lambda: col.count("ipcam") >= 10, 90, what="10 verdicts from the RTSP stream")
            assert all(v.frame_width == 160 and v.frame_height == 120 for v in col.of("ipcam"))
            t_kill = time.monotonic()
            rtsp_server.kill()
            wait_until(lambda: any(s.state == "down" for s in col.camera_events("ipcam")), 30,
                       what="camera down after the RTSP server was killed")
            t_down = time.monotonic()
            n_before = col.count("ipcam")
            rtsp_server.start()  # same port
            t_restart = time.monotonic()
            wait_until(lambda: [s.state for s in col.camera_events("ipcam")][-1:] == ["up"], 90,
                       what="camera up again after the server restarted")
            t_up = time.monotonic()
            wait_until(lambda: col.count("ipcam") >= n_before + 10, 90, what="10 verdicts after the restart")
            samples = d.scrape()
        finally:
            col.stop()
        assert d.terminate(60) == 0, d.log_text()[-3000:]
        lost = d.find("camera_down")
    seqs = [v.sequence for v in col.of("ipcam")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # continues across the reconnect
    states = [s.state for s in col.camera_events("ipcam")]
    assert "down" in states and states[-1] == "up"
    assert metric_total(samples, "linewatch_reconnects_total", camera="ipcam") >= 1
    print(f"\nrtsp: {len(seqs)} verdicts; down {t_down - t_kill:.2f} s after kill ({lost[0].get('reason')!r}), "
          f"up {t_up - t_restart:.2f} s after restart; seq {seqs[0]}..{seqs[-1]}")


def test_rtsp_open_times_out_against_a_silent_server():
    """A server that accepts the connection and never answers: open() gives up after timeout_s (FFmpeg alone
    would wait for ever)."""
    if why := _cv2_rtsp():
        pytest.skip(why)
    from linewatch.service.frames import SourceError
    from linewatch.service.sources.opencv import OpenCVSource

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        src = OpenCVSource("rtsp", f"rtsp://user:secret@127.0.0.1:{srv.getsockname()[1]}/cam", 1.0, loop=False)
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                src.open()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(20)  # bounded by the test, not by FFmpeg
        assert not t.is_alive(), "open() did not return: no open timeout"
    assert isinstance(outcome[0], SourceError) and "within 1 s" in str(outcome[0])
    assert "secret" not in str(outcome[0])  # the password never reaches the message
