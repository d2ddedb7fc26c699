"""Evaluate a calibrated model on labelled images: a category in the MVTec AD layout
(``test/<good|defect>/*.png`` and ``ground_truth/<defect>/<name>_mask.png``), or any folders of good and
defective parts (:func:`evaluate_folders`), with pixel masks when there are some (most real sets have none:
then the image-level metrics only)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy.stats import binom

from linewatch.errors import DataError
from linewatch.imaging.images import list_images, load_images, read_image
from linewatch.model.detector import Detector
from linewatch.station.accuracy import binary_stats, image_auroc, pixel_auroc, pro_auc


@dataclass
class MVTecSplit:
    paths: list[Path]
    labels: np.ndarray  # 1 = defective
    defect_types: list[str]
    masks: np.ndarray  # (N,H,W) bool at the model input size


@dataclass
class EvalReport:
    category: str
    n_good: int
    n_defect: int
    image_auroc: float
    pixel_auroc: float
    pro: float
    image_threshold: float
    f1: float
    precision: float
    recall: float
    false_reject_rate: float
    false_reject_bound: float
    pixel_f1: float
    seconds: float
    false_rejects: int = 0
    # P(at least this many false rejects among n_good | the true rate were the calibration bound):
    # a small value (< 0.05) would mean the calibration's promise is broken, not just an unlucky draw.
    false_reject_tail_p: float = 1.0
    per_defect_recall: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    has_masks: bool = True  # False: pixel AUROC, PRO and pixel F1 are NaN (no ground truth to compare with)


def load_mvtec_test(category_dir: str | os.PathLike, size: tuple[int, int]) -> tuple[MVTecSplit, np.ndarray]:
    root = Path(category_dir)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{root} is not an MVTec AD category (no test/ folder); pass e.g. .../mvtec_ad/bottle")
    paths: list[Path] = []
    types: list[str] = []
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        for p in list_images(sub):
            paths.append(p)
            types.append(sub.name)
    data = load_images(paths, size)
    kept_types = [t for p, t in zip(paths, types, strict=True) if p in set(data.paths)]
    labels = np.array([t != "good" for t in kept_types], dtype=np.uint8)
    masks = np.zeros((len(data.paths), size[0], size[1]), dtype=bool)
    for i, (p, t) in enumerate(zip(data.paths, kept_types, strict=True)):
        if t == "good":
            continue
        mp = root / "ground_truth" / t / f"{p.stem}_mask.png"
        m = read_image(mp)
        if m is None:
            raise DataError(f"ground-truth mask {mp} for {p} is missing or unreadable")
        masks[i] = cv2.resize(m[:, :, 0], (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 127
    split = MVTecSplit(paths=data.paths, labels=labels, defect_types=kept_types, masks=masks)
    return split, data.images


def evaluate_mvtec(detector: Detector, category_dir: str | os.PathLike, batch_size: int = 16) -> EvalReport:
    start = time.monotonic()
    split, images = load_mvtec_test(category_dir, detector.input_size)
    pred = detector.predict_many(images, batch_size)
    scores = pred.scores.numpy()
    maps = pred.maps.numpy()
    cal = detector.calibration
    predicted = scores > cal.image_threshold
    stats = binary_stats(split.labels, predicted)
    pix = binary_stats(split.masks.reshape(-1), (maps > cal.pixel_threshold).reshape(-1))
    per_defect = {}
    for t in sorted(set(split.defect_types) - {"good"}):
        sel = np.array([x == t for x in split.defect_types])
        per_defect[t] = float(predicted[sel].mean())
    return EvalReport(
        category=Path(category_dir).name,
        n_good=int((split.labels == 0).sum()), n_defect=int(split.labels.sum()),
        image_auroc=image_auroc(split.labels, scores),
        pixel_auroc=pixel_auroc(split.masks, maps),
        pro=pro_auc(split.masks, maps) if split.masks.any() else float("nan"),
        image_threshold=cal.image_threshold, f1=stats["f1"], precision=stats["precision"],
        recall=stats["recall"], false_reject_rate=stats["false_reject_rate"],
        false_reject_bound=cal.false_reject_bound, pixel_f1=pix["f1"],
        seconds=time.monotonic() - start, per_defect_recall=per_defect,
        false_rejects=stats["fp"],
        false_reject_tail_p=float(binom.sf(stats["fp"] - 1, int((split.labels == 0).sum()), cal.false_reject_bound)),
    )


def _mask_for(masks_dir: Path, rel: Path) -> Path | None:
    """The mask of a defect image ``rel`` (relative to the defect folder): ``<masks>/<rel dir>/<stem>_mask.png``
    (MVTec's naming) or ``<masks>/<rel dir>/<stem>.png``; None when neither exists."""
    for name in (f"{rel.stem}_mask.png", f"{rel.stem}.png"):
        p = masks_dir / rel.parent / name
        if p.is_file():
            return p
    return None


def load_masks(masks_dir: Path, defect_dir: Path, rels: list[Path], size: tuple[int, int]) -> np.ndarray:
    """(len(rels), H, W) bool masks at ``size`` for the defect images ``rels`` (relative to ``defect_dir``), found
    by :func:`_mask_for`. A defect image without a readable mask is a DataError: a silent all-good mask would
    flatter the model."""
    masks = np.zeros((len(rels), size[0], size[1]), dtype=bool)
    for i, rel in enumerate(rels):
        mp = _mask_for(masks_dir, rel)
        m = read_image(mp) if mp is not None else None
        if m is None:
            raise DataError(f"no readable mask for {defect_dir / rel} in {masks_dir} (looked for "
                            f"{rel.parent / (rel.stem + '_mask.png')} and {rel.parent / (rel.stem + '.png')})")
        masks[i] = cv2.resize(m[:, :, 0], (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 127
    return masks


def evaluate_folders(detector: Detector, good_dir: str | os.PathLike, defect_dir: str | os.PathLike,
                     masks_dir: str | os.PathLike | None = None, batch_size: int = 16) -> EvalReport:
    """Image-level metrics (AUROC, F1, precision/recall, false-reject rate against the calibration bound) on any
    labelled folders, searched recursively; per-defect recall by the defect folder's first-level sub-folders
    (if any). With ``masks_dir`` (same relative layout as ``defect_dir``) also pixel AUROC, PRO and pixel F1;
    a defect image without a mask there is an error (a silent all-good mask would flatter the model)."""
    start = time.monotonic()
    good_dir, defect_dir = Path(good_dir), Path(defect_dir)
    size = detector.input_size
    good = load_images(list_images(good_dir, recursive=True), size)
    bad = load_images(list_images(defect_dir, recursive=True), size)
    if len(good.paths) == 0 or len(bad.paths) == 0:
        which = good_dir if len(good.paths) == 0 else defect_dir
        raise DataError(f"none of the images in {which} could be decoded")
    images = np.concatenate([good.images, bad.images])
    labels = np.r_[np.zeros(len(good.paths), np.uint8), np.ones(len(bad.paths), np.uint8)]
    rels = [p.relative_to(defect_dir) for p in bad.paths]
    types = ["good"] * len(good.paths) + [r.parts[0] if len(r.parts) > 1 else defect_dir.name for r in rels]
    pred = detector.predict_many(images, batch_size)
    scores, maps = pred.scores.numpy(), pred.maps.numpy()
    cal = detector.calibration
    predicted = scores > cal.image_threshold
    stats = binary_stats(labels, predicted)
    per_defect = {t: float(predicted[np.array([x == t for x in types])].mean()) for t in sorted(set(types) - {"good"})}
    pixel_auc = pro = pixel_f1 = float("nan")
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise DataError(f"masks folder {masks_dir} does not exist")
        masks = np.zeros((len(labels), size[0], size[1]), dtype=bool)
        masks[len(good.paths):] = load_masks(masks_dir, defect_dir, rels, size)
        pixel_auc = pixel_auroc(masks, maps)
        pro = pro_auc(masks, maps) if masks.any() else float("nan")
        pixel_f1 = binary_stats(masks.reshape(-1), (maps > cal.pixel_threshold).reshape(-1))["f1"]
    n_good = int((labels == 0).sum())
    return EvalReport(
        category=f"{good_dir.name} / {defect_dir.name}", n_good=n_good, n_defect=int(labels.sum()),
        image_auroc=image_auroc(labels, scores), pixel_auroc=pixel_auc, pro=pro,
        image_threshold=cal.image_threshold, f1=stats["f1"], precision=stats["precision"], recall=stats["recall"],
        false_reject_rate=stats["false_reject_rate"], false_reject_bound=cal.false_reject_bound, pixel_f1=pixel_f1,
        seconds=time.monotonic() - start, false_rejects=stats["fp"],
        false_reject_tail_p=float(binom.sf(stats["fp"] - 1, n_good, cal.false_reject_bound)),
        per_defect_recall=per_defect, skipped=[str(p) for p in good.skipped + bad.skipped],
        has_masks=masks_dir is not None,
    )
