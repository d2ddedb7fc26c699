"""`linewatch record` → `linewatch calibrate --config` → `linewatch evaluate --good/--defect`, through the real
command line (issue 11): the bundle keeps the recorded framing, calibrate writes its report, and user mistakes
are one-line errors."""

from __future__ import annotations

import json
import re

import cv2
import yaml
from fakes import assert_one_line_error, run_cli

from linewatch.tools.harness import write_config


def test_record_calibrate_evaluate_round_trip(bottle, untrained_bundle, tmp_path):
    roi = [150, 150, 600, 600]
    cams = [{"name": "line", "source": f"dir://{bottle / 'train' / 'good'}", "roi": roi}]
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams)
    rec = tmp_path / "rec"
    p = run_cli("record", "--config", cfg, "--camera", "line", "--out", rec, "--count", 12, "--every", 2,
                "--margin-mb", 0, "--quiet")
    assert "recorded 12 images" in p.stdout and "--count reached" in p.stdout, p.stdout
    pngs = sorted(rec.glob("*.png"))
    assert [x.name for x in pngs] == [f"{i:06d}.png" for i in range(12)]
    assert cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED).shape == (600, 600, 3)  # the ROI, full resolution
    # every second frame, cropped exactly like the daemon crops: compare with the source file
    src = cv2.imread(str(sorted((bottle / "train" / "good").glob("*.png"))[2]))
    assert (cv2.imread(str(pngs[1])) == src[150:750, 150:750]).all()
    framing = json.loads((rec / "framing.json").read_text())
    assert framing["camera"] == "line" and framing["roi"] == roi and framing["source_sizes"] == [[900, 900]]
    assert framing["colour"] == "rgb" and framing["frames"] == 12 and framing["linewatch_version"]

    # the same folder again: refused, nothing overwritten
    assert_one_line_error(
        run_cli("record", "--config", cfg, "--camera", "line", "--out", rec, "--count", 1, check=False),
        "not an empty folder")
    assert_one_line_error(run_cli("record", "--config", cfg, "--camera", "nope", "--out", tmp_path / "x", check=False),
                          "'nope'", "line")

    model = tmp_path / "line.lwm"
    p = run_cli("calibrate", "--config", cfg, "--camera", "line", "--normal-dir", rec, "--out", model,
                "--input-size", "64", "--epochs", "1", "--cal-fraction", "0.5", "--quiet", "--device", "cpu")
    assert "framing: roi [150, 150, 600, 600] of 900x900 frames (aspect 1.00, rgb)" in p.stdout, p.stdout
    threshold = re.search(r"image threshold: (\S+)", p.stdout).group(1)
    report = tmp_path / "line.lwm.report.html"
    assert f"report: {report}" in p.stdout
    page = report.read_text()
    assert "image threshold" in page and threshold in page and "training curves" in page

    from linewatch.model import load_bundle

    meta = load_bundle(model).meta
    assert meta.framing["recorded"] is True and meta.framing["camera"] == "line" and meta.framing["roi"] == roi

    # the camera's ROI changed since recording: calibrating for it from this folder is refused
    moved = yaml.safe_load(cfg.read_text())
    moved["cameras"][0]["roi"] = [100, 100, 600, 300]
    cfg2 = tmp_path / "lw2.yaml"
    cfg2.write_text(yaml.safe_dump(moved))
    assert_one_line_error(run_cli("calibrate", "--config", cfg2, "--camera", "line", "--normal-dir", rec, "--out",
                          tmp_path / "m2.lwm", "--quiet", check=False), "recorded with roi", "re-record")

    # labelled folders without masks: image metrics, and a plain word about the pixel ones
    p = run_cli("evaluate", "--model", model, "--good", bottle / "test" / "good", "--defect",
                bottle / "test" / "broken_large", "--json", tmp_path / "e.json")
    assert "image AUROC" in p.stdout and "needs --masks" in p.stdout and "pixel metrics" in p.stdout
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["n_good"] == 20 and r["n_defect"] == 20 and 0 <= r["image_auroc"] <= 1 and r["has_masks"] is False
    assert_one_line_error(run_cli("evaluate", "--model", model, "--good", bottle / "test" / "good", check=False),
                          "--defect")
