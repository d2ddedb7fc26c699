"""A real `linewatch run` against a model framed otherwise (issue 11): refused at start when the aspect differs,
and the start-up sanity check's calibration_mismatch status when the first frames fail far beyond the calibrated
rate; recursive replay of a nested folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from linewatch.client import Subscriber
from linewatch.messages import Status, Verdict
from linewatch.tools.harness import DaemonProcess, metric, wait_until, write_config


@pytest.fixture(scope="module")
def bottle_64(bottle, tmp_path_factory) -> Path:
    """Bottle full frames (900×900), 4 epochs at 64×64: enough that zoomed-in crops of good bottles fail."""
    from linewatch.tools.fixtures import make_trained_bundle

    return make_trained_bundle(tmp_path_factory.mktemp("b64") / "b.lwm", bottle, (64, 64), epochs=4, max_images=48)


def test_camera_with_another_aspect_is_refused_at_start(untrained_bundle, bottle, tmp_path):
    cams = [{"name": "ok", "source": f"dir://{bottle / 'test' / 'good'}"},
            {"name": "wide", "source": f"dir://{bottle / 'test' / 'good'}", "roi": [100, 100, 400, 200]}]
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams)
    with DaemonProcess(cfg) as d:
        d.proc.wait(120)
        d.join_readers()
        text = d.log_text()
    assert d.returncode == 2, text[-2000:]
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if ln.startswith("linewatch: error:")]
    assert len(errors) == 1, text[-2000:]
    line = errors[0]
    for needle in ("'wide'", "roi [100, 100, 400, 200]", "900x900", "aspect", "linewatch record"):
        assert needle in line, line
    assert "'ok'" not in line


def test_mis_framed_camera_raises_calibration_mismatch(bottle_64, bottle, tmp_path):
    # the model saw whole bottles; this camera's ROI zooms into the middle (same aspect, so it may start).
    # Measured with this (seeded, so reproducible) fixture: all 20 good bottles fail so framed, the lowest at
    # 1.42 against a threshold of 1.29; the same bottles unzoomed all pass.
    cams = [{"name": "zoomed", "source": f"dir://{bottle / 'test' / 'good'}", "roi": [225, 225, 450, 450],
             "on_end": "stop"}]
    cfg = write_config(tmp_path / "lw.yaml", bottle_64, cams, health={"startup_check_frames": 20},
                       publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        statuses: list[Status] = []
        verdicts: list[Verdict] = []
        with Subscriber(d.endpoint, status=True) as sub:
            def got_mismatch() -> bool:
                msg = sub.recv(0.2)
                if isinstance(msg, Status):
                    statuses.append(msg)
                elif isinstance(msg, Verdict):
                    verdicts.append(msg)
                return any(s.kind == "calibration_mismatch" for s in statuses)

            wait_until(got_mismatch, 180, interval=0, what="a calibration_mismatch status")
        mismatch = [s for s in statuses if s.kind == "calibration_mismatch"]
        assert len(mismatch) == 1 and mismatch[0].camera == "zoomed"
        assert mismatch[0].fail_rate is not None and mismatch[0].fail_rate > 0.5
        for cause in ("framing", "lighting", "focus"):
            assert cause in mismatch[0].reason
        assert sum(v.failed for v in verdicts) >= 10
        assert metric(d.scrape(), "linewatch_calibration_mismatch", camera="zoomed") == 1
        logged = d.wait_event("calibration_mismatch", timeout=10)
        assert logged["camera"] == "zoomed"
        # start-up: same aspect, another size → a warning, not a refusal
        assert d.find("framing_differs", camera="zoomed")
        assert d.terminate() == 0


def test_recursive_replay_keeps_relative_paths(untrained_bundle, bottle, tmp_path):
    tree = tmp_path / "tree"
    for sub in ("good", "broken_large"):
        (tree / sub).mkdir(parents=True)
        for p in sorted((bottle / "test" / sub).glob("*.png"))[:2]:
            (tree / sub / p.name).symlink_to(p)
    cams = [{"name": "tree", "source": f"dir://{tree}", "recursive": True, "on_end": "stop"}]
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams, publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        refs = []
        with Subscriber(d.endpoint) as sub:
            def four() -> bool:
                msg = sub.recv(0.2)
                if isinstance(msg, Verdict):
                    refs.append(msg.ref)
                return len(refs) == 4

            wait_until(four, 120, interval=0, what="four verdicts")
        assert d.terminate() == 0
    assert refs == ["broken_large/000.png", "broken_large/001.png", "good/000.png", "good/001.png"]
