"""The bundle's framing record, the comparison with a camera, the start-up sanity check, recursive replay and the
calibration report (issue 11): units, no daemon."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.stats import binom

from linewatch.messages import Status, Verdict, decode, encode_status
from linewatch.model.bundle import (
    BundleMeta,
    Calibration,
    _meta_problem,
    camera_framing,
    describe_framing,
    framing_problem,
)
from linewatch.service.config import ConfigError, config_from_dict
from linewatch.service.frames import Frame, SourceError
from linewatch.service.observers.sanity import StartupSanityCheck, binomial_tail, image_colour
from linewatch.service.sources.files import DirSource
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.tools.harness import write_images

FULL = {"roi": None, "source_sizes": [[900, 900]], "colour": "rgb"}
CROP = {"roi": [100, 100, 300, 150], "source_sizes": [[900, 900]], "colour": "rgb"}


# ---------------------------------------------------------------- framing comparison
def test_a_camera_framed_like_the_model_agrees():
    assert framing_problem(FULL, camera_framing(None, (900, 900), "rgb")) is None
    assert framing_problem(CROP, camera_framing((100, 100, 300, 150), (900, 900), "rgb")) is None
    # an ROI covering the whole frame is no crop
    assert framing_problem({**FULL, "roi": [0, 0, 900, 900]}, camera_framing(None, (900, 900))) is None


def test_another_aspect_is_an_error_and_another_size_a_warning():
    level, why = framing_problem(FULL, camera_framing((100, 100, 300, 150), None))
    assert level == "error" and "aspect" in why
    level, why = framing_problem(FULL, camera_framing(None, (1280, 720)))
    assert level == "error"
    level, why = framing_problem(FULL, camera_framing(None, (450, 450)))
    assert level == "warning" and "size" in why
    level, _ = framing_problem(FULL, camera_framing((0, 0, 300, 300), None))  # a square crop: same aspect
    assert level == "warning"


def test_crop_without_roi_colour_and_moved_roi():
    assert framing_problem(CROP, camera_framing(None, None))[0] == "error"  # calibrated on a crop, camera has none
    assert framing_problem(FULL, camera_framing(None, (900, 900), "mono"))[0] == "error"
    level, why = framing_problem(CROP, camera_framing((400, 300, 300, 150), None))
    assert level == "warning" and "place" in why
    assert framing_problem(FULL, camera_framing(None, None)) is None  # nothing known yet: no verdict


def test_describe_names_roi_frames_and_aspect():
    text = describe_framing(CROP)
    assert "roi [100, 100, 300, 150]" in text and "900x900" in text and "aspect 2.00" in text


def test_bundle_header_with_and_without_framing():
    cal = Calibration(image_threshold=1.0, pixel_threshold=0.5, alpha=0.01, false_reject_bound=0.01,
                      scores=[0.5, 1.0])
    meta = BundleMeta(backbone="mobilenet_v2", teacher_sha256="a" * 64, input_size=(64, 64), mean=(0.1, 0.2, 0.3),
                      std=(0.2, 0.2, 0.2), n_students=1, blur_sigma=4.0, calibration=cal, framing=dict(FULL))
    again = BundleMeta.from_json(meta.to_json())
    assert again.framing == FULL and _meta_problem(again) is None
    old = json.loads(meta.to_json())
    del old["framing"]  # a bundle written before the field existed
    assert BundleMeta.from_json(json.dumps(old)).framing is None
    bad = json.loads(meta.to_json())
    bad["framing"] = [1, 2]
    assert "framing" in _meta_problem(BundleMeta.from_json(json.dumps(bad)))


# ---------------------------------------------------------------- the sanity check
@pytest.mark.parametrize(("k", "n", "p"), [(0, 20, 0.01), (3, 20, 0.01), (10, 20, 0.1), (20, 20, 0.5), (1, 5, 0.3)])
def test_binomial_tail_is_exact(k, n, p):
    assert binomial_tail(k, n, p) == pytest.approx(float(binom.sf(k - 1, n, p)), rel=1e-9, abs=1e-15)


def test_image_colour():
    grey = np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4, 1), 3, axis=2)
    assert image_colour(grey) == "mono"
    col = grey.copy()
    col[0, 0, 1] = 200
    assert image_colour(col) == "rgb"


def _frame(cam: str, i: int, size=(900, 900), roi=None, image=None) -> Frame:
    img = image if image is not None else np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Frame(cam, i, time.time(), time.monotonic(), img, size, roi or (0, 0, *size))


def _verdict(cam: str, i: int, fail: bool) -> Verdict:
    return Verdict(camera=cam, sequence=i, capture_time=time.time(), verdict_time=time.time(),
                   verdict="fail" if fail else "pass", score=2.0 if fail else 0.5, threshold=1.0, p_value=0.5,
                   model_id="m", frame_width=900, frame_height=900, run_id="r")


def _gauge(metrics: Metrics, cam: str) -> float:
    return metrics.calibration_mismatch.labels(cam)._value.get()


def test_mismatch_reported_once_when_the_first_frames_fail_far_beyond_the_bound():
    metrics = Metrics()
    got: list[Status] = []
    check = StartupSanityCheck(metrics, false_reject_bound=0.02, n_frames=20, p_threshold=1e-3,
                               submit_status=got.append, run_id="r", n_calibration=100)
    for i in range(60):
        check.observe(_frame("bad", i), _verdict("bad", i, fail=i % 2 == 0), np.zeros((4, 4)))  # 50 % fail
        check.observe(_frame("ok", i), _verdict("ok", i, fail=i == 3), np.zeros((4, 4)))  # 1 in 20: plausible
    assert [s.camera for s in got] == ["bad"]  # once, and only for the bad camera
    s = got[0]
    assert s.kind == "calibration_mismatch" and s.fail_rate == pytest.approx(0.5)
    for cause in ("framing", "lighting", "focus"):
        assert cause in s.reason
    assert decode(encode_status(s)).kind == "calibration_mismatch"  # on the wire, as a subscriber gets it
    assert _gauge(metrics, "bad") == 1 and _gauge(metrics, "ok") == 0
    assert set(check.reported) == {"bad"}


def test_a_few_fails_within_the_bound_are_not_reported():
    got: list[Status] = []
    check = StartupSanityCheck(Metrics(), false_reject_bound=0.1, n_frames=20, p_threshold=1e-3,
                               submit_status=got.append)
    for i in range(20):
        check.observe(_frame("c", i), _verdict("c", i, fail=i < 4), np.zeros((4, 4)))  # 4/20 vs 0.1: p ≈ 0.13
    assert got == []


def test_a_reload_starts_the_check_over_and_zero_frames_is_off():
    got: list[Status] = []
    check = StartupSanityCheck(Metrics(), false_reject_bound=0.01, n_frames=5, p_threshold=1e-3,
                               submit_status=got.append)
    for i in range(5):
        check.observe(_frame("c", i), _verdict("c", i, fail=False), np.zeros((4, 4)))
    check.set_calibration(0.01)
    for i in range(5, 10):
        check.observe(_frame("c", i), _verdict("c", i, fail=True), np.zeros((4, 4)))
    assert len(got) == 1
    off = StartupSanityCheck(Metrics(), 0.01, n_frames=0, p_threshold=1e-3, submit_status=got.append)
    for i in range(50):
        off.observe(_frame("d", i), _verdict("d", i, fail=True), np.zeros((4, 4)))
    assert len(got) == 1


def test_first_frame_of_another_aspect_is_a_mismatch_and_another_size_only_a_log_line():
    got: list[Status] = []
    check = StartupSanityCheck(Metrics(), 0.01, n_frames=20, p_threshold=1e-3, submit_status=got.append,
                               framing=dict(FULL))
    check.observe(_frame("wide", 0, size=(1280, 720)), _verdict("wide", 0, fail=False), np.zeros((4, 4)))
    check.observe(_frame("small", 0, size=(450, 450)), _verdict("small", 0, fail=False), np.zeros((4, 4)))
    assert [s.camera for s in got] == ["wide"]
    assert "1280x720" in got[0].reason and "900x900" in got[0].reason


# ---------------------------------------------------------------- recursive replay
def test_recursive_dir_replays_sub_folders_sorted_with_relative_refs(tmp_path):
    write_images(tmp_path / "b", 2, size=(16, 16))
    write_images(tmp_path / "a" / "deep", 1, size=(16, 16))
    write_images(tmp_path / "a", 1, size=(16, 16), start=5)
    write_images(tmp_path, 1, size=(16, 16), start=9)
    src = DirSource(tmp_path, loop=False, recursive=True)
    src.open()
    refs = []
    while (raw := src.read()) is not None:
        refs.append(raw.ref)
    assert refs == ["009.png", "a/005.png", "a/deep/000.png", "b/000.png", "b/001.png"]
    # a reopen resumes after the last relative path read
    src2 = DirSource(tmp_path, loop=False, recursive=True)
    src2.open()
    src2.read(), src2.read()
    src2.close()
    src2.open()
    assert src2.read().ref == "a/deep/000.png"


def test_non_recursive_dir_with_only_sub_folders_says_how(tmp_path):
    write_images(tmp_path / "good", 1, size=(16, 16))
    with pytest.raises(SourceError, match="recursive: true"):
        DirSource(tmp_path, loop=False).open()


def test_recursive_is_for_dir_sources_only(tmp_path):
    base = {"model": {"bundle": str(tmp_path / "m.lwm")}}
    cfg = config_from_dict({**base, "cameras": [{"name": "a", "source": f"dir://{tmp_path}", "recursive": True}]},
                           env=False)
    assert cfg.cameras[0].recursive
    with pytest.raises(ConfigError, match="recursive"):
        config_from_dict({**base, "cameras": [{"name": "a", "source": "rtsp://h/x", "recursive": True}]}, env=False)


# ---------------------------------------------------------------- the report
def test_report_page_names_the_threshold_and_embeds_the_figures(tmp_path):
    from linewatch.station.report import ReportInputs, histogram_figure, write_report

    rng = np.random.default_rng(0)
    scores = np.sort(rng.normal(1.0, 0.1, 30))
    hist = histogram_figure(scores, 1.2)
    # the threshold line is drawn in red somewhere in the figure
    assert ((hist[..., 0] > 200) & (hist[..., 1] < 40)).any()
    r = ReportInputs(model="m.lwm", image_threshold=1.2345, pixel_threshold=0.9, alpha=0.01, false_reject_bound=0.03,
                     scores=scores, names=[f"{i}.png" for i in range(30)],
                     images=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), maps=rng.random((30, 8, 8)),
                     history=[{"epoch": e, "loss": 1 / e, "val_loss": 1.1 / e} for e in range(1, 6)], summary={})
    page = write_report(tmp_path / "m.lwm.report.html", r).read_text()
    assert "image threshold" in page and "1.2345" in page
    assert page.count("data:image/png;base64,") == 1 + 6 + 1  # histogram, 6 worst images, curves
    assert "29.png" in page  # the highest score is among the worst shown
    no_training = write_report(tmp_path / "r2.html", ReportInputs(**{**r.__dict__, "history": []})).read_text()
    assert "No training" in no_training


def test_record_refuses_a_non_empty_folder_and_a_full_disk(tmp_path):
    from linewatch.station.record import RecordError, record

    write_images(tmp_path / "src", 3, size=(20, 30))
    cfg = config_from_dict({"model": {"bundle": str(tmp_path / "m.lwm")},
                            "cameras": [{"name": "c", "source": f"dir://{tmp_path / 'src'}", "roi": [2, 3, 10, 8]}]},
                           env=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(RecordError, match="not an empty folder"):
        record(cfg.cameras[0], out, progress=False)
    with pytest.raises(RecordError, match="margin"):
        record(cfg.cameras[0], tmp_path / "out2", margin_mb=1e12, progress=False)
    r = record(cfg.cameras[0], tmp_path / "out3", every=2, progress=False, margin_mb=0)
    assert r.frames == 2 and r.read == 3 and r.stopped == "ended"
    img = cv2.imread(str(tmp_path / "out3" / "000001.png"))
    assert img.shape == (8, 10, 3)  # the ROI, at its own resolution
    framing = json.loads((tmp_path / "out3" / "framing.json").read_text())
    assert framing["roi"] == [2, 3, 10, 8] and framing["source_sizes"] == [[30, 20]] and framing["camera"] == "c"
    r = record(cfg.cameras[0], tmp_path / "out4", max_mb=1e-6, progress=False, margin_mb=0)
    assert r.frames == 0 and r.stopped == "max_mb" and Path(tmp_path / "out4" / "framing.json").is_file()


# ---------------------------------------------------------------- the daemon's start-up check
def _daemon(tmp_path, cameras):
    from linewatch.service.app import Daemon

    cfg = config_from_dict({"model": {"bundle": str(tmp_path / "m.lwm")}, "cameras": cameras}, env=False)
    return Daemon(cfg)


def test_daemon_refuses_another_aspect_warns_on_size_and_accepts_old_bundles(tmp_path):
    from types import SimpleNamespace

    from linewatch.service.app import FramingError

    src = f"dir://{tmp_path}"
    d = _daemon(tmp_path, [{"name": "full", "source": src}, {"name": "wide", "source": src, "roi": [0, 0, 400, 200]}])
    with pytest.raises(FramingError, match=r"camera 'wide' roi \[0, 0, 400, 200\] vs model m.lwm calibrated on full "
                                           r"900x900 frames \(aspect 1.00, rgb\): the image region has another aspect"):
        d._check_framing(SimpleNamespace(meta=SimpleNamespace(framing=dict(FULL))))
    # same aspect, another size: starts (a warning in the log)
    _daemon(tmp_path, [{"name": "sq", "source": src, "roi": [0, 0, 300, 300]}])._check_framing(
        SimpleNamespace(meta=SimpleNamespace(framing=dict(FULL))))
    # a bundle older than framing records: starts, nothing to compare
    d._check_framing(SimpleNamespace(meta=SimpleNamespace(framing=None)))


def test_calibrate_notes_when_the_input_shrinks_frames_enough_to_lose_thin_defects():
    from types import SimpleNamespace

    from linewatch.cli.station import _scale_line

    def meta(size_wh, input_hw, roi=None, tiling=None, sizes=None):
        framing = {"roi": roi, "source_sizes": sizes if sizes is not None else [list(size_wh)], "colour": "mono"}
        return SimpleNamespace(framing=framing, input_size=input_hw, tiling=tiling)

    # ELPV strips at the default auto input: 2.3× per side → the note, with the tile count of --tile 256
    line = _scale_line(meta((1200, 300), (128, 512)))
    assert line == ("scale: 1200x300 images are shrunk 2.3× to the 512x128 input, and defects only a few pixels "
                    "wide fade at that scale; if this station's defects are that thin, calibrate with --tile 256 "
                    "(12 tiles of 256×256 an image, at native resolution)")
    # ELPV cells (300 → 256) and an upscaled input: no note
    assert _scale_line(meta((300, 300), (256, 256))) is None
    assert _scale_line(meta((200, 100), (128, 256))) is None
    # the ROI is what the model sees, not the whole frame
    assert _scale_line(meta((2000, 2000), (256, 256), roi=[0, 0, 300, 300])) is None
    assert _scale_line(meta((2000, 1000), (256, 256), roi=[0, 0, 600, 600])).startswith(
        "scale: 600x600 images are shrunk 2.3× to the 256x256 input")
    # already tiled, or framing unknown (mixed sizes): nothing to say
    assert _scale_line(meta((1200, 300), (256, 256), tiling={"tile": [256, 256]})) is None
    assert _scale_line(meta((1200, 300), (128, 512), sizes=[[1200, 300], [600, 150]])) is None
    # frames too small for a 256 tile: the note names a larger input instead
    assert _scale_line(meta((200, 200), (64, 64))).endswith("calibrate with --input-size 192x192 (about native "
                                                            "resolution)")
