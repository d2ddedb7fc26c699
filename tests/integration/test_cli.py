"""End to end through the real `linewatch` command: calibrate → evaluate → infer, and user mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from fakes import assert_one_line_error, run_cli

LINEWATCH = [sys.executable, "-m", "linewatch.cli"]




def test_calibrate_evaluate_infer_end_to_end(bottle, tmp_path):
    model = tmp_path / "bottle.lwm"
    # a small subset, two epochs: the plumbing end to end, not the accuracy
    p = run_cli("calibrate", "--normal-dir", bottle / "train" / "good", "--out", model, "--input-size", "64",
                "--epochs", "2", "--max-images", "40", "--cal-fraction", "0.3", "--quiet", "--device", "cpu",
            "--defect-dir", bottle / "test" / "broken_large")
    assert model.is_file()
    out = p.stdout
    for needle in ("train 24 / validation 4 / calibration 12", "training: 2 epochs", "image threshold:",
                   "pixel threshold:", "guaranteed ≤ 0.0769", "warning: 12 calibration images are too few",
                   "defect images: 20, recall", "image score: mean of the map's top 2 %",
                   "scale: 900x900 images are shrunk 14.1× to the 64x64 input", "--tile 256 (16 tiles"):
        assert needle in out, out

    js = tmp_path / "eval.json"
    p = run_cli("evaluate", "--model", model, "--mvtec", bottle, "--json", js)
    assert "image AUROC" in p.stdout and "PRO" in p.stdout
    r = json.loads(js.read_text())
    assert r["n_good"] == 20 and r["n_defect"] == 63
    for k in ("image_auroc", "pixel_auroc", "pro", "f1", "false_reject_rate"):
        assert 0.0 <= r[k] <= 1.0, (k, r[k])

    # thresholds-only re-fit writes a new file, same weights
    refit = tmp_path / "refit.lwm"
    p = run_cli("calibrate", "--model", model, "--thresholds-only", "--normal-dir", bottle / "test" / "good",
                "--out", refit, "--quiet", "--device", "cpu")
    assert "calibration 20" in p.stdout and refit.is_file()

    corrupt = tmp_path / "inputs"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    gray = cv2.cvtColor(cv2.imread(str(bottle / "test" / "good" / "001.png")), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(corrupt / "gray.png"), gray)
    out_dir = tmp_path / "infer"
    p = run_cli("infer", "--model", model, "--out", out_dir, bottle / "test" / "good" / "000.png",
                bottle / "test" / "broken_large" / "000.png", corrupt)
    assert "SKIP  unreadable image:" in p.stdout and "broken.png" in p.stdout
    rows = json.loads((out_dir / "results.json").read_text())
    assert len(rows) == 3
    for row in rows:
        ov = cv2.imread(row["overlay"])
        assert ov is not None and ov.shape[:2] == (900, 900)  # at the image's own resolution
        assert row["verdict"] in ("pass", "fail") and 0 < row["p_value"] <= 1
    names = {Path(r["overlay"]).name for r in rows}
    assert len(names) == 3  # good/000.png and broken_large/000.png do not overwrite each other


def test_user_mistakes_are_one_line_errors(tmp_path, bottle):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("calibrate", "--normal-dir", empty, "--out", tmp_path / "m.lwm", check=False),
                          "no images", str(empty))
    assert_one_line_error(run_cli("evaluate", "--model", tmp_path / "missing.lwm", "--mvtec", bottle, check=False),
                          "missing.lwm", "not found")
    junk = tmp_path / "junk.lwm"
    junk.write_bytes(np.zeros(100, np.uint8).tobytes())
    assert_one_line_error(run_cli("infer", "--model", junk, "--out", tmp_path / "o", tmp_path, check=False),
                          "corrupt")
    allbad = tmp_path / "allbad"
    allbad.mkdir()
    (allbad / "a.png").write_bytes(b"nope")
    assert_one_line_error(run_cli("calibrate", "--normal-dir", allbad, "--out", tmp_path / "m.lwm", check=False),
                          "could be decoded")
    assert_one_line_error(run_cli("calibrate", "--normal-dir", bottle / "train" / "good", "--out", tmp_path / "m.lwm",
                          "--backbone", "vgg99", check=False), "unknown backbone")


def test_missing_teacher_weights_says_how_to_get_them(tmp_path, bottle):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty-torch-home"))
    p = subprocess.run([*LINEWATCH, "calibrate", "--normal-dir", str(bottle / "train" / "good"), "--out",
                        str(tmp_path / "m.lwm")], capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(p, "linewatch weights fetch")


@pytest.mark.parametrize("size", ["17", "abc", "4096"])
def test_bad_input_size_is_rejected_by_the_parser(size, tmp_path):
    p = run_cli("calibrate", "--normal-dir", tmp_path, "--out", tmp_path / "m", "--input-size", size, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
