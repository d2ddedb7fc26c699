"""What the bench runs on: the test images, and the model (a calibrated bundle, or an untrained one built
on the fly: speed does not depend on training)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from linewatch.errors import LinewatchError

if TYPE_CHECKING:
    from linewatch.model import Detector

DEFAULT_IMAGES = "../shared/data/mvtec_ad/bottle/test"


def find_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files in ``folder`` and its immediate sub-folders (the MVTec ``test/<defect>/`` layout)."""
    from linewatch.imaging.images import IMAGE_EXTS

    if not folder.is_dir():
        raise LinewatchError(f"--images folder {folder} does not exist (bench reads MVTec AD bottle test images "
                             f"from {DEFAULT_IMAGES} by default; pass --images DIR)")
    paths = sorted(p for p in list(folder.iterdir()) + [q for d in folder.iterdir() if d.is_dir() for q in d.iterdir()]
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise LinewatchError(f"no images in {folder} or its sub-folders")
    return paths[:limit] if limit else paths


def resolve_images_dir(arg: str) -> Path:
    """The default is relative to the repository's parent (like the tests' ../shared); an explicit path
    is taken as given."""
    p = Path(arg)
    if p.is_dir() or p.is_absolute() or arg != DEFAULT_IMAGES:
        return p
    repo_relative = Path(__file__).resolve().parents[3] / arg  # linewatch/tools/bench/inputs.py → the checkout
    return repo_relative if repo_relative.is_dir() else p


@dataclass
class ModelInfo:
    backbone: str
    input_size: tuple[int, int]
    source: str  # the bundle path, or "untrained (built on the fly)"
    teacher: str  # "ImageNet (<sha256 prefix>)" or "RANDOM INIT (benchmark only)"
    engine: str
    device: str
    image_threshold: float
    pixel_threshold: float


def build_detector(args: argparse.Namespace, images: list[Path]) -> tuple[Detector, ModelInfo]:
    import torch

    from linewatch.errors import WeightsError
    from linewatch.imaging.images import load_images
    from linewatch.model import BundleMeta, Detector, load_detector, resolve_device
    from linewatch.model.backbones import build_extractor
    from linewatch.model.stfpm import IMAGENET_MEAN, IMAGENET_STD, STFPM, default_blur_sigma
    from linewatch.model.weights import load_teacher
    from linewatch.station.calibration import fit_calibration

    if args.model:
        det = load_detector(args.model, args.device, engine=args.engine)
        det.calibration  # noqa: B018 -- refuse an uncalibrated bundle here, not in the daemon
        info = ModelInfo(det.meta.backbone, det.input_size, str(args.model),
                         f"ImageNet ({det.meta.teacher_sha256[:12]})", det.engine, str(det.device),
                         det.image_threshold, det.pixel_threshold)
        return det, info
    torch.manual_seed(0)
    try:
        teacher, digest = load_teacher(args.backbone)
        teacher_label = f"ImageNet ({digest[:12]})"
    except WeightsError:
        teacher, digest = build_extractor(args.backbone), "random-init"
        teacher_label = "RANDOM INIT (benchmark only: no ImageNet weights installed; never inspect with this)"
    size = tuple(args.input_size)
    model = STFPM(args.backbone, teacher=teacher, n_students=1, input_size=size, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, blur_sigma=default_blur_sigma(size))
    meta = BundleMeta(backbone=args.backbone, teacher_sha256=digest, input_size=size, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, n_students=1, blur_sigma=default_blur_sigma(size),
                      training={"note": "untrained, built by linewatch bench"})
    det = Detector(model, meta, "bench-untrained", resolve_device(args.device), engine=args.engine)
    # thresholds as `calibrate` would set them, on the good images (the largest score: n is small)
    good = [p for p in images if p.parent.name == "good"] or images[:16]
    data = load_images(good[:20], size)
    pred = det.predict_many(data.images, batch_size=4)
    cal, _ = fit_calibration(pred.scores.numpy(), pred.maps.numpy(), 0.005, 1e-3, images=data.images,
                             score_from_map=not model.split_score)
    meta.calibration = cal
    info = ModelInfo(args.backbone, size, "untrained (built on the fly)", teacher_label, det.engine,
                     str(det.device), cal.image_threshold, cal.pixel_threshold)
    return det, info

