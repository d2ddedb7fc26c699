"""`make demo` in quick mode: real ELPV cells, real calibrate, real daemon, real subscriber, summary."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_quick_mode_streams_every_cell_and_summarises(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "linewatch.tools.demo", "--out", str(out), "--cache", str(ROOT / ".cache" / "elpv"),
           "--limit", "30", "--epochs", "1", "--input-size", "64", "--fps", "100"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 20 and s["verdicts"] == 20 and s["metrics_frames_total"] == 20
    assert s["daemon_exit_code"] == 0
    assert 0 <= s["auroc"] <= 1 and s["latency_ms_p99"] >= s["latency_ms_p50"] > 0
    for needle in ("CC BY-NC-SA 4.0", "image AUROC (streamed cells)", "latency capture→verdict p50 / p99",
                   "metrics URL", "reject archive"):
        assert needle in p.stdout, p.stdout
    # live verdict lines name the cell and its ground truth
    assert sum(" PASS " in ln or " FAIL " in ln for ln in p.stdout.splitlines()) == 20
    # a rerun reuses the calibrated model
    p2 = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p2.returncode == 0 and "reusing" in p2.stdout
