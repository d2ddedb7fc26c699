"""The calibration report of a thresholds-only re-fit (issue 11): no curves, an honest note instead, and the new
threshold and histogram."""

from __future__ import annotations

import base64
import re
import shutil

import cv2
import numpy as np
import pytest
from fakes import run_cli

from linewatch.station.report import ReportInputs, no_training_note, report_path_for, write_report

ORIGINAL = {"normal_dir": "/data/good", "n_train": 70, "n_val": 8, "n_cal": 18, "epochs_run": 12, "best_epoch": 9,
            "best_val_loss": 0.12345, "created": "2026-11-02T10:00:00+0000"}
REFIT = {"normal_dir": "/data/new-light", "n_cal": 40, "at": "2026-11-30T08:15:00+0000"}


def _figures(page: str) -> list[np.ndarray]:
    """The page's inline PNGs, decoded (RGB)."""
    out = []
    for b64 in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return out


def _has_threshold_line(fig: np.ndarray) -> bool:
    return bool(((fig[..., 0] > 200) & (fig[..., 1] < 40) & (fig[..., 2] < 40)).any())


def test_note_names_the_refit_and_the_original_training():
    note = no_training_note({**ORIGINAL, "recalibrated": REFIT})
    assert note.startswith("No training in this run: thresholds refitted on 2026-11-30T08:15:00+0000 from 40 images "
                           "(/data/new-light)")
    for needle in ("original calibration (2026-11-02T10:00:00+0000: 12 epochs, best epoch 9, validation loss 0.1235",
                   "70 images of /data/good", "not the per-epoch losses"):
        assert needle in note, note


def test_note_without_a_training_record_or_refit_says_only_what_is_known():
    bare = no_training_note({"recalibrated": REFIT})  # a bundle that records nothing of its training
    assert "thresholds refitted on 2026-11-30" in bare and "records nothing of how its weights were trained" in bare
    assert "original calibration" not in bare
    assert no_training_note(None) == "No training in this run (thresholds only)."
    assert no_training_note({**ORIGINAL, "best_val_loss": float("nan"), "recalibrated": REFIT}).count(
        "validation loss ?") == 1
    assert "trained no epochs" in no_training_note({**ORIGINAL, "epochs_run": 0, "recalibrated": REFIT})


def test_page_without_curves_carries_the_note_the_threshold_and_the_histogram(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.sort(rng.normal(1.0, 0.1, 10))
    r = ReportInputs(model="m.lwm", image_threshold=1.4321, pixel_threshold=0.9, alpha=0.01, false_reject_bound=0.09,
                     scores=scores, names=[f"{i}.png" for i in range(10)],
                     images=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8), maps=rng.random((10, 4, 4)),
                     history=[], summary={}, training={**ORIGINAL, "recalibrated": REFIT})
    page = write_report(tmp_path / "m.lwm.report.html", r).read_text()
    assert "1.4321" in page and "thresholds refitted on 2026-11-30" in page
    figs = _figures(page)
    assert len(figs) == 1 + 6  # histogram and the worst images; no curves
    assert _has_threshold_line(figs[0])


@pytest.mark.slow
def test_thresholds_only_writes_the_report_with_the_new_threshold(tmp_path, untrained_bundle, bottle):
    from linewatch.model import load_bundle

    model = tmp_path / "m.lwm"
    shutil.copy(untrained_bundle, model)
    old = load_bundle(model).meta.calibration.image_threshold
    refit = tmp_path / "refit.lwm"
    p = run_cli("calibrate", "--model", model, "--thresholds-only", "--normal-dir", bottle / "test" / "good",
                "--max-images", "8", "--out", refit, "--quiet", "--device", "cpu")
    report = report_path_for(refit)
    assert report.is_file(), p.stdout
    assert f"report: {report}" in p.stdout
    meta = load_bundle(refit).meta
    new = meta.calibration.image_threshold
    assert new != old  # other images, another threshold: the page must show the new one
    page = report.read_text()
    assert f"{new:.6g}" in page and f"<td>{old:.6g}</td>" not in page
    assert "calibration images</th><td>8 (" in page
    assert f"thresholds refitted on {meta.training['recalibrated']['at']} from 8 images" in page
    assert "trained no epochs" in page  # the untrained fixture's training record: 0 epochs
    figs = _figures(page)
    assert len(figs) == 1 + 6 and _has_threshold_line(figs[0])
    # --no-report: none
    p = run_cli("calibrate", "--model", model, "--thresholds-only", "--normal-dir", bottle / "test" / "good",
                "--max-images", "8", "--out", tmp_path / "quiet.lwm", "--quiet", "--device", "cpu", "--no-report")
    assert not report_path_for(tmp_path / "quiet.lwm").exists() and "report:" not in p.stdout


def test_a_calibration_image_that_stands_apart_is_named_on_the_command_line_and_the_page(
        tmp_path, untrained_bundle, bottle, monkeypatch, capsys):
    """The plumbing from score_outliers (its rule: tests/unit/test_calibration.py) to what the engineer reads."""
    from linewatch.cli import main as cli_main
    from linewatch.station import calibration

    def one_outlier(scores, names, threshold):
        return [calibration.ScoreOutlier(names[-1], float(scores[-1]), "2.5× the next-highest calibration score (0.1)",
                                         True)]

    monkeypatch.setattr(calibration, "score_outliers", one_outlier)
    model = tmp_path / "m.lwm"
    shutil.copy(untrained_bundle, model)
    assert cli_main(["calibrate", "--model", str(model), "--thresholds-only", "--normal-dir",
                     str(bottle / "test" / "good"), "--max-images", "8", "--out", str(tmp_path / "r.lwm"), "--quiet",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("warning: calibration image "))
    assert "2.5× the next-highest calibration score (0.1), and it sets the image threshold" in line
    assert "remove it from the folder and calibrate again" in line
    page = report_path_for(tmp_path / "r.lwm").read_text()
    assert "check these calibration images" in page and "(sets the threshold)" in page
