"""``evaluate_folders``: image-level metrics on any labelled folders, pixel metrics only with masks (issue 11)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from linewatch.errors import DataError
from linewatch.model import load_detector
from linewatch.station.evaluation import evaluate_folders, evaluate_mvtec

TYPES = ("broken_large", "contamination")


def _link_defects(bottle: Path, root: Path, n: int = 3) -> tuple[Path, Path]:
    """defect/<type>/<name>.png and masks/<type>/<name>_mask.png, as symlinks into the bottle set."""
    for t in TYPES:
        (root / "defect" / t).mkdir(parents=True)
        (root / "masks" / t).mkdir(parents=True)
        for p in sorted((bottle / "test" / t).glob("*.png"))[:n]:
            (root / "defect" / t / p.name).symlink_to(p)
            (root / "masks" / t / f"{p.stem}_mask.png").symlink_to(bottle / "ground_truth" / t / f"{p.stem}_mask.png")
    return root / "defect", root / "masks"


@pytest.fixture(scope="module")
def detector(untrained_bundle):
    return load_detector(untrained_bundle, "cpu")


def test_without_masks_image_metrics_only(detector, bottle, tmp_path):
    defect, _ = _link_defects(bottle, tmp_path)
    r = evaluate_folders(detector, bottle / "test" / "good", defect)
    assert (r.n_good, r.n_defect) == (20, 6)
    assert not r.has_masks
    assert 0.0 <= r.image_auroc <= 1.0 and 0.0 <= r.false_reject_rate <= 1.0
    assert r.false_reject_bound == detector.calibration.false_reject_bound
    assert math.isnan(r.pixel_auroc) and math.isnan(r.pro) and math.isnan(r.pixel_f1)
    assert set(r.per_defect_recall) == set(TYPES)


def test_with_masks_the_pixel_metrics_match_the_mvtec_path(detector, bottle, tmp_path):
    defect, masks = _link_defects(bottle, tmp_path)
    r = evaluate_folders(detector, bottle / "test" / "good", defect, masks)
    assert r.has_masks and 0.0 <= r.pixel_auroc <= 1.0 and 0.0 <= r.pro <= 1.0
    # the same images through the MVTec layout give the same numbers
    mv = tmp_path / "mv"
    (mv / "test").mkdir(parents=True)
    (mv / "test" / "good").symlink_to(bottle / "test" / "good")
    for t in TYPES:
        (mv / "test" / t).symlink_to(defect / t)
    (mv / "ground_truth").symlink_to(masks)
    ref = evaluate_mvtec(detector, mv)
    assert r.image_auroc == pytest.approx(ref.image_auroc)
    assert r.pixel_auroc == pytest.approx(ref.pixel_auroc)
    assert r.pro == pytest.approx(ref.pro)


def test_a_defect_without_its_mask_is_an_error(detector, bottle, tmp_path):
    defect, masks = _link_defects(bottle, tmp_path)
    next((masks / TYPES[0]).iterdir()).unlink()
    with pytest.raises(DataError, match="no readable mask"):
        evaluate_folders(detector, bottle / "test" / "good", defect, masks)
