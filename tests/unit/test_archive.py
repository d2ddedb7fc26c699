"""Reject archive: what is written, the size and age caps, restart, and a full queue."""

import json
import time

import numpy as np
from test_health import frame, texture, verdict

from linewatch.service.config import ArchiveConfig
from linewatch.service.observers.archive import RejectArchive
from linewatch.service.telemetry.prometheus import Metrics


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.02)
    return pred()


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def make(tmp_path, **kw):
    metrics = Metrics()
    metrics.init_cameras(["cam"])
    cfg = ArchiveConfig(enabled=True, dir=tmp_path / "rejects", **kw)
    arch = RejectArchive(cfg, metrics, pixel_threshold=0.8)
    return arch, metrics


def amap():
    m = np.zeros((64, 64), np.float32)
    m[10:20, 30:40] = 2.0
    return m


def test_failing_frames_are_written_with_overlay_mask_and_header(tmp_path):
    arch, metrics = make(tmp_path)
    arch.start()
    arch.observe(frame("cam", 1, texture(1)), verdict("cam", 1, 0.3, False), amap())  # a pass: not archived
    arch.observe(frame("cam", 2, texture(2)), verdict("cam", 2, 2.0, True), amap())
    assert _wait(lambda: sample(metrics, "linewatch_archive_written_total") == 1)
    arch.stop()
    entries = list((tmp_path / "rejects" / "cam").glob("*/*"))
    assert len(entries) == 1
    e = entries[0]
    assert e.name.endswith("_2")
    assert {p.name for p in e.iterdir()} == {"image.png", "overlay.png", "mask.png", "verdict.json"}
    header = json.loads((e / "verdict.json").read_text())
    assert header["sequence"] == 2 and header["verdict"] == "fail"
    import cv2

    mask = cv2.imread(str(e / "mask.png"), cv2.IMREAD_GRAYSCALE)
    assert mask[15, 35] == 255 and mask[50, 5] == 0
    assert sample(metrics, "linewatch_archive_bytes") > 0


def test_size_cap_deletes_oldest_first_and_counts(tmp_path):
    arch, metrics = make(tmp_path, max_mb=0.05)  # ~50 kB: a handful of entries
    arch.start()
    for i in range(30):
        arch.observe(frame("cam", i, texture(i)), verdict("cam", i, 2.0, True), amap())
        time.sleep(0.005)
    assert _wait(lambda: sample(metrics, "linewatch_archive_written_total") == 30)
    arch.stop()
    deleted = sample(metrics, "linewatch_archive_deleted_total", reason="size")
    left = sorted(int(p.name.rsplit("_", 1)[1]) for p in (tmp_path / "rejects" / "cam").glob("*/*"))
    assert deleted > 0 and len(left) + deleted == 30
    assert left == list(range(30 - len(left), 30))  # the newest survive
    total = sum(f.stat().st_size for f in (tmp_path / "rejects").rglob("*") if f.is_file())
    assert total <= 0.05 * 1024 * 1024
    assert sample(metrics, "linewatch_archive_bytes") == total


def test_age_cap_and_restart_pick_up_existing_entries(tmp_path):
    arch, metrics = make(tmp_path)
    arch.start()
    for i in range(3):
        arch.observe(frame("cam", i, texture(i)), verdict("cam", i, 2.0, True), amap())
    assert _wait(lambda: sample(metrics, "linewatch_archive_written_total") == 3)
    arch.stop()
    # a restart with a 0.3 s age cap: the existing entries are counted, then expire
    time.sleep(0.4)
    arch2, metrics2 = make(tmp_path, max_age_days=0.3 / 86400)
    assert sample(metrics2, "linewatch_archive_deleted_total", reason="age") == 3
    assert not list((tmp_path / "rejects").glob("cam/*/*"))
    arch3, metrics3 = make(tmp_path)
    assert sample(metrics3, "linewatch_archive_bytes") == 0


def test_full_queue_drops_oldest_and_counts(tmp_path):
    arch, metrics = make(tmp_path, queue=2)  # not started: nothing drains
    for i in range(5):
        arch.observe(frame("cam", i, texture(i)), verdict("cam", i, 2.0, True), amap())
    assert sample(metrics, "linewatch_archive_dropped_total", reason="queue_full") == 3
    assert [item[2].sequence for item in arch._pending] == [3, 4]
