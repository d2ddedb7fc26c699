"""``capture.jpeg_decode: device`` in a real daemon (``linewatch run``, capture processes): JPEG cameras hand their
bytes to the worker, which decodes them in batches (here the CPU fallback of the device decoder), and every
frame's score equals the one it gets when the capture process decodes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakes import MJPEGCamera, write_jpegs

from linewatch.imaging.images import list_images
from linewatch.tools.harness import DaemonProcess, VerdictCounter, metric, wait_until, write_config


def replay(tmp_path: Path, bundle: Path, folder: Path, jpeg_decode: str, n_frames: int,
           **capture: Any) -> tuple[dict[str, Any], DaemonProcess, dict]:
    """One daemon replaying ``folder`` once in a capture process: (verdicts by file, the daemon, /metrics)."""
    cams = [{"name": "cam", "source": f"dir://{folder}", "on_end": "stop"}]
    cfg = write_config(tmp_path / f"{jpeg_decode}.yaml", bundle, cams,
                       capture={"mode": "process", "jpeg_decode": jpeg_decode, **capture},
                       publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        sub = VerdictCounter(d.endpoint, keep=1000)
        sub.start()
        try:
            wait_until(lambda: d.find("camera_ended"), 120, what="the folder replayed")
            assert sub.finish(target=n_frames, settle_s=0.3, timeout=60), d.log_text()[-3000:]
        finally:
            sub.stop()
        samples = d.scrape()
        assert d.terminate() == 0, d.log_text()[-3000:]
    return {v.ref: v for v in sub.verdicts}, d, samples


def test_jpeg_files_decoded_on_the_device_score_as_decoded_in_capture(tmp_path, bottle, untrained_bundle):
    paths = list_images(bottle / "test" / "broken_large")[:3] + list_images(bottle / "test" / "good")[:3]
    folder = tmp_path / "jpegs"
    files = write_jpegs(paths, folder, progressive_every=3)
    # a JPEG whose header is fine but whose image data is not: neither decoder can read it
    blob = files[0].read_bytes()
    (folder / "999_corrupt.jpg").write_bytes(blob[:blob.index(b"\xff\xda")] + b"\xff\xda\x00\x02" + bytes(4000))
    refs = sorted(p.name for p in files)

    on_device, d_dev, m_dev = replay(tmp_path, untrained_bundle, folder, "device", len(files))
    in_capture, d_cap, m_cap = replay(tmp_path, untrained_bundle, folder, "capture", len(files))

    # the path each run took
    assert d_dev.find("capture_mode", mode="process", jpeg_decode="device")
    assert d_cap.find("capture_mode", mode="process", jpeg_decode="capture")
    assert d_dev.find("decode_error", camera="cam", ref="999_corrupt.jpg", where="worker")
    assert d_cap.find("decode_error", camera="cam", file="999_corrupt.jpg")
    assert not d_dev.find("jpeg_decoded_in_capture")  # every JPEG fitted its slot
    for samples in (m_dev, m_cap):
        assert metric(samples, "linewatch_frames_dropped_total", camera="cam", reason="decode_error") == 1
        assert metric(samples, "linewatch_decode_errors_total", camera="cam") == 1

    # every file got its verdict, and the same score either way
    assert sorted(on_device) == sorted(in_capture) == refs
    for ref in refs:
        a, b = on_device[ref], in_capture[ref]
        assert a.score == pytest.approx(b.score, abs=1e-6), ref
        assert a.verdict == b.verdict and (a.frame_width, a.frame_height) == (900, 900)
        assert a.boxes == b.boxes


def test_jpegs_larger_than_a_slot_are_decoded_in_capture_and_still_scored(tmp_path, bottle, untrained_bundle):
    paths = list_images(bottle / "test" / "good")[:3]
    folder = tmp_path / "jpegs"
    files = write_jpegs(paths, folder)
    small_slot_mb = 16 / 1024  # 16 KiB: more than a 64×64 frame, less than any of these JPEGs
    assert all(p.stat().st_size > 16 * 1024 for p in files)
    got, d, samples = replay(tmp_path, untrained_bundle, folder, "device", len(files), slot_mb=small_slot_mb)
    assert sorted(got) == sorted(p.name for p in files)
    assert len(d.find("jpeg_decoded_in_capture")) == 1  # logged once for the camera, not per frame
    assert metric(samples, "linewatch_frames_dropped_total", camera="cam", reason="decode_error") == 0


def test_an_mjpeg_camera_in_device_mode_delivers_verdicts(tmp_path, untrained_bundle):
    cam = MJPEGCamera(size=(48, 64), interval_s=0.02)
    try:
        cfg = write_config(tmp_path / "lw.yaml", untrained_bundle,
                           [{"name": "http", "source": cam.url("/stream"), "timeout_s": 5}],
                           capture={"mode": "process", "jpeg_decode": "device"},
                           publisher={"wait_for_subscriber_s": 60})
        with DaemonProcess(cfg) as d:
            sub = VerdictCounter(d.endpoint, keep=100)
            sub.start()
            try:
                wait_until(lambda: sub.count("http") >= 10, 120, what="ten verdicts from the MJPEG camera")
            finally:
                sub.stop()
            samples = d.scrape()
            assert d.terminate() == 0, d.log_text()[-3000:]
        assert d.find("capture_mode", mode="process", jpeg_decode="device")
        vs = sub.of("http")
        assert all((v.frame_width, v.frame_height) == (64, 48) for v in vs)
        assert [v.sequence for v in vs] == sorted(v.sequence for v in vs)
        assert metric(samples, "linewatch_decode_errors_total", camera="http") == 0
    finally:
        cam.stop()
