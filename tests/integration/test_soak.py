"""`linewatch soak`: CI runs it for one minute (the documented default is 30)."""

from __future__ import annotations

import json
import subprocess

import pytest

from linewatch.tools.harness import ROOT, linewatch_cmd, subprocess_env
from linewatch.tools.soak import Sample, SoakReport, _judge_resources, format_report


@pytest.mark.soak
@pytest.mark.slow
def test_soak_one_minute(tmp_path, folder_camera, daemon_config):
    cfg = daemon_config([folder_camera(n, 8, size=(120, 160), seed=seed, fps=50) for n, seed in (("a", 1), ("b", 2))])
    out = tmp_path / "soak.json"
    proc = subprocess.run(linewatch_cmd("soak", "--config", str(cfg), "--minutes", "1", "--json", str(out)),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["passed"] and r["problems"] == [] and r["exit_code"] == 0
    assert r["verdicts"] > 0 and r["received"] == r["published"]
    assert r["frames_in"] == r["published"] + r["dropped"] == r["published"] + sum(r["dropped_by_reason"].values())
    assert r["rss_kb_start"] > 0 and r["fds_start"] > 0 and len(r["samples"]) >= 10
    assert r["rss_growth"] <= 0.05 and r["fds_end"] <= r["fds_warm"]
    assert "soak PASSED" in proc.stdout


def test_soak_verdict_on_growth():
    """The pass/fail rule itself, on made-up samples: > 5 % RSS after the warm-up, or more fds, fails."""
    def report(rss_end: int, fds_end: int) -> SoakReport:
        samples = [Sample(t=t, rss_kb=100_000 if t <= 15 else rss_end, fds=12 if t <= 15 else fds_end)
                   for t in range(0, 65, 5)]
        r = SoakReport(config="x", minutes=1)
        _judge_resources(r, samples, 15.0, 0.05)
        return r

    assert report(104_000, 12).problems == []
    grown = report(106_000, 12)
    assert len(grown.problems) == 1 and "RSS grew 6.0%" in grown.problems[0]
    leaky = report(100_000, 14)
    assert leaky.problems == ["open file descriptors grew from 12 to 14"]
    assert "open fds  start 12" in format_report(leaky)
