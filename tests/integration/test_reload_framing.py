"""SIGHUP reload against the cameras' framing (issue 11), in a real `linewatch run`: a bundle calibrated on a region of
another aspect is rejected as start-up would refuse it (the old model keeps publishing); one that differs only in
size is swapped in with a ``framing_differs`` warning."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

from linewatch.tools.harness import DaemonProcess, VerdictCounter, metric, wait_until

# the camera: 64x48 random frames (w x h), a square 32x32 roi in the top-left corner
CAMERA_ROI = [0, 0, 32, 32]
FRAMES = [[64, 48]]


def _framed(src: Path, dst: Path, roi: list[int]) -> Path:
    """A copy of ``src`` that says it was calibrated on ``roi`` of the camera's frames (a new file: a new model_id)."""
    from linewatch.model import load_bundle, save_bundle

    b = load_bundle(src)
    b.meta.framing = {"roi": roi, "source_sizes": FRAMES, "colour": "rgb"}
    save_bundle(dst, b.students_state, b.meta)
    return dst


def _replace(src: Path, model: Path) -> None:
    """What `linewatch calibrate --out` or `cp + mv` does: an atomic rename over the configured file."""
    tmp = model.with_suffix(".tmp")
    shutil.copy(src, tmp)
    os.replace(tmp, model)


def _ids_since(col: VerdictCounter, n: int) -> set[str]:
    return {v.model_id for v in col.verdicts[n:]}


def test_reload_rejects_a_bundle_framed_with_another_aspect_and_accepts_another_size(
        tmp_path, untrained_bundle, folder_camera, daemon_config):
    from linewatch.model import load_bundle

    variants = tmp_path / "variants"
    variants.mkdir()
    model = _framed(untrained_bundle, tmp_path / "model.lwm", CAMERA_ROI)  # framed as the camera: starts quietly
    wide = _framed(untrained_bundle, variants / "wide.lwm", [0, 0, 64, 32])  # aspect 2 vs the camera's 1
    small = _framed(untrained_bundle, variants / "small.lwm", [0, 0, 16, 16])  # aspect 1, half the size
    old_id, wide_id, small_id = (load_bundle(p).model_id for p in (model, wide, small))
    assert len({old_id, wide_id, small_id}) == 3

    cam: dict[str, Any] = folder_camera("sq", 4, fps=30, roi=CAMERA_ROI)
    cfg = daemon_config([cam], bundle=model, publisher={"wait_for_subscriber_s": 60})
    with DaemonProcess(cfg) as d:
        col = VerdictCounter(d.endpoint, status=True, keep=100_000)
        col.start()
        try:
            wait_until(lambda: col.count() >= 5, 60, what="verdicts")
            assert {v.model_id for v in col.verdicts} == {old_id}
            assert not d.find("framing_differs") and not d.find("calibration_mismatch")

            # another aspect: rejected, the running model stays
            _replace(wide, model)
            d.proc.send_signal(signal.SIGHUP)
            rejected = d.wait_event("model_reload_rejected", 60)
            n = col.count()
            wait_until(lambda: col.count() >= n + 10, 30, what="verdicts after the rejection")
            assert _ids_since(col, n) == {old_id}
            samples = d.scrape()
            assert metric(samples, "linewatch_model_reload_total", result="rejected") == 1
            assert metric(samples, "linewatch_model_reload_total", result="ok") == 0
            assert metric(samples, "linewatch_model_info", model_id=old_id, backbone="mobilenet_v2",
                          input_size="64x64", device="cpu") == 1
            assert not d.find("model_reloaded")

            # the same aspect at another size: swapped in, with a warning naming the camera
            _replace(small, model)
            d.proc.send_signal(signal.SIGHUP)
            reloaded = d.wait_event("model_reloaded", 60)
            wait_until(lambda: col.verdicts[-1].model_id == small_id, 30, what="verdicts from the new model")
            differs = d.wait_event("framing_differs", 10, model="model.lwm")  # the reload's check
            samples = d.scrape()
            assert metric(samples, "linewatch_model_reload_total", result="ok") == 1
            assert metric(samples, "linewatch_model_reload_total", result="rejected") == 1
            assert d.proc.poll() is None
            assert d.terminate() == 0
        finally:
            col.stop()

    reason = rejected["reason"]
    assert rejected["model_id"] == old_id and rejected["error_type"] == "FramingError", rejected
    assert "\n" not in reason
    for needle in ("camera 'sq' roi [0, 0, 32, 32]", "roi [0, 0, 64, 32] of 64x48 frames (aspect 2.00",
                   "another aspect", "linewatch record", "calibrate --config", "kept the running model"):
        assert needle in reason, reason
    assert reloaded["old_model_id"] == old_id and reloaded["new_model_id"] == small_id
    assert differs["camera"] == "sq" and "another size" in differs["detail"], differs
    assert "roi [0, 0, 16, 16] of 64x48 frames" in differs["detail"]
    # the model changed exactly once, in sequence order: old → small, never the rejected one
    ids = [v.model_id for v in sorted(col.verdicts, key=lambda v: v.sequence)]
    switch = ids.index(small_id)
    assert set(ids[:switch]) == {old_id} and set(ids[switch:]) == {small_id}
