"""`make demo` in quick mode: real ELPV cells, real calibrate, real daemon, real subscriber, the live web view,
summary."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_quick_mode_streams_every_cell_and_summarises(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "linewatch.tools.demo", "--out", str(out), "--cache", str(ROOT / ".cache" / "elpv"),
           "--limit", "30", "--epochs", "1", "--input-size", "64", "--fps", "100"]
    # stdin not a terminal (as in CI): the demo must not wait for Enter before stopping the view
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 20 and s["verdicts"] == 20 and s["metrics_frames_total"] == 20
    assert s["daemon_exit_code"] == 0
    # the live view: its URL printed before the verdicts, it saw the whole stream (it subscribed before the
    # daemon let the camera go), and it stopped cleanly on SIGTERM
    url = re.search(r">>> open (http://127\.0\.0\.1:\d+/) to watch the line <<<", p.stdout)
    assert url and url.group(1) == s["view_url"], p.stdout
    assert p.stdout.index(url.group(0)) < p.stdout.index(" PASS " if " PASS " in p.stdout else " FAIL ")
    assert s["view_verdicts"] == 20 and s["view_exit_code"] == 0, s
    assert f"{s['view_url']} received 20 of 20 verdicts" in p.stdout, p.stdout
    assert "WARNING" not in p.stdout, p.stdout
    assert 0 <= s["auroc"] <= 1 and s["latency_ms_p99"] >= s["latency_ms_p50"] > 0
    for needle in ("CC BY-NC-SA 4.0", "image AUROC (streamed cells)", "latency capture→verdict p50 / p99",
                   "metrics URL", "reject archive"):
        assert needle in p.stdout, p.stdout
    # live verdict lines name the cell and its ground truth
    assert sum(" PASS " in ln or " FAIL " in ln for ln in p.stdout.splitlines()) == 20
    # a rerun reuses the calibrated model; --no-view: no view, said so
    p2 = subprocess.run(cmd + ["--quiet", "--no-view"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                        stdin=subprocess.DEVNULL)
    assert p2.returncode == 0 and "reusing" in p2.stdout
    assert "to watch the line" not in p2.stdout and "not started (--no-view)" in p2.stdout, p2.stdout
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["view_url"] is None and s2["view_verdicts"] is None and s2["verdicts"] == 20
    # a view that cannot start (its port taken) is a warning, not a failed demo
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p3 = subprocess.run(cmd + ["--quiet", "--view-port", str(port)], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, stdin=subprocess.DEVNULL)
    assert p3.returncode == 0, p3.stdout + p3.stderr
    assert "WARNING: the live view exited" in p3.stdout and "Address already in use" in p3.stdout, p3.stdout
    assert json.loads((out / "summary.json").read_text())["verdicts"] == 20
