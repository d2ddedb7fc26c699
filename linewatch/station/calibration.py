"""Fitting a station: train the student on good parts, then set thresholds on held-out good parts.

The image threshold is a conformal order statistic: with n calibration scores, failing a part when
its score exceeds the k-th smallest, k = ⌈(n+1)(1−α)⌉, rejects a new good part with probability at
most 1 − k/(n+1) ≤ α (the parts being exchangeable). When n is too small for α, k is capped at n
and the guarantee is the weaker 1/(n+1); we say so.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from linewatch.errors import DataError
from linewatch.imaging.images import ImageSet, grey, list_images, load_images, sharpness
from linewatch.model.bundle import BundleMeta, Calibration, load_bundle, save_bundle
from linewatch.model.detector import Detector, load_detector, resolve_device
from linewatch.model.stfpm import IMAGENET_MEAN, IMAGENET_STD, STFPM, default_blur_sigma
from linewatch.model.weights import load_teacher
from linewatch.station.training import TrainConfig, TrainResult, split_indices, train_students

log = structlog.get_logger("linewatch.calibrate")


@dataclass
class ConformalThreshold:
    threshold: float
    k: int  # rank of the order statistic used (1-based)
    n: int
    bound: float  # guaranteed false-reject rate: 1 − k/(n+1)
    warning: str | None = None


def min_calibration_size(alpha: float) -> int:
    """Smallest n for which ⌈(n+1)(1−α)⌉ ≤ n, i.e. the bound α is reachable."""
    return math.ceil(1.0 / alpha - 1.0 - 1e-9)


def conformal_threshold(scores: np.ndarray | list[float], alpha: float) -> ConformalThreshold:
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise DataError("no calibration scores: the calibration split is empty")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    warning = None
    if k > n:
        k = n
        warning = (f"{n} calibration images are too few for a false-reject rate of {alpha:g} "
                   f"(needs ≥ {min_calibration_size(alpha)}); the threshold is the largest calibration score "
                   f"and guarantees only ≤ {1 / (n + 1):.4f}")
    return ConformalThreshold(threshold=float(s[k - 1]), k=k, n=n, bound=1.0 - k / (n + 1), warning=warning)


def fit_calibration(scores: np.ndarray, maps: np.ndarray, alpha: float, pixel_alpha: float,
                    images: np.ndarray | None = None) -> tuple[Calibration, ConformalThreshold]:
    """Image threshold (conformal) and pixel threshold: the (1−pixel_alpha) quantile of good-part pixels,
    never above the image threshold so every failing part gets a non-empty defect mask."""
    ct = conformal_threshold(scores, alpha)
    pix = float(np.quantile(maps.reshape(-1), 1.0 - pixel_alpha)) if maps.size else ct.threshold
    pixel_threshold = min(pix, ct.threshold)
    s = np.sort(np.asarray(scores, dtype=np.float64))
    stats = {
        "n": float(len(s)), "mean": float(s.mean()), "std": float(s.std()), "median": float(np.median(s)),
        "min": float(s[0]), "max": float(s[-1]),
    }
    if images is not None and len(images):
        # the daemon's blurred-camera check compares live frames against this
        stats["sharpness_median"] = float(np.median([sharpness(im) for im in images]))
        stats["brightness_median"] = float(np.median([float(grey(im).mean()) for im in images]))
    cal = Calibration(
        image_threshold=ct.threshold, pixel_threshold=pixel_threshold, alpha=alpha,
        false_reject_bound=ct.bound, scores=[float(x) for x in s], pixel_alpha=pixel_alpha, stats=stats,
    )
    return cal, ct


@dataclass
class CalibrateOptions:
    backbone: str = "mobilenet_v2"
    input_size: tuple[int, int] = (256, 256)
    n_students: int = 1
    val_fraction: float = 0.1
    cal_fraction: float = 0.2
    alpha: float = 0.005
    pixel_alpha: float = 1e-3
    device: str = "auto"
    teacher_weights: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    max_images: int | None = None  # use only the first N (sorted) images: for quick tests
    progress: bool = True


@dataclass
class CalibrateReport:
    n_images: int
    n_train: int
    n_val: int
    n_cal: int
    skipped: list[Path]
    training: TrainResult | None
    calibration: Calibration
    conformal: ConformalThreshold
    seconds: float
    defect_metrics: dict[str, float] | None = None


def _load(dir_: str | os.PathLike, size: tuple[int, int], max_images: int | None, progress: bool) -> ImageSet:
    paths = list_images(dir_)
    if max_images:
        paths = paths[:max_images]
    data = load_images(paths, size, progress=progress)
    for p in data.skipped:
        log.warning("image_unreadable", file=str(p), action="skipped")
    if len(data.paths) == 0:
        raise DataError(f"none of the {len(paths)} images in {dir_} could be decoded")
    return data


def defect_report(detector: Detector, defect_dir: str | os.PathLike, progress: bool) -> dict[str, float]:
    """Recall on known-defective parts at the fitted threshold (precision needs good parts: the calibration
    split's scores stand in for them)."""
    data = _load(defect_dir, detector.input_size, None, progress)
    scores = detector.predict_many(data.images).scores.numpy()
    cal = detector.calibration
    tp = int((scores > cal.image_threshold).sum())
    fp_rate = float(np.mean(np.asarray(cal.scores) > cal.image_threshold)) if cal.scores else 0.0
    n = len(scores)
    recall = tp / n
    expected_fp = fp_rate * len(cal.scores)
    precision = tp / (tp + expected_fp) if tp + expected_fp > 0 else float("nan")
    return {"n_defect": float(n), "recall": recall, "precision_vs_calibration": precision,
            "skipped": float(len(data.skipped))}


def calibrate_station(normal_dir: str | os.PathLike, out: str | os.PathLike, opts: CalibrateOptions,
                      defect_dir: str | os.PathLike | None = None) -> CalibrateReport:
    """Train a new model on ``normal_dir`` and write a calibrated bundle to ``out``."""
    start = time.monotonic()
    device = resolve_device(opts.device)
    teacher, digest = load_teacher(opts.backbone, opts.teacher_weights)
    data = _load(normal_dir, opts.input_size, opts.max_images, opts.progress)
    n = len(data.paths)
    train_idx, val_idx, cal_idx = split_indices(n, opts.val_fraction, opts.cal_fraction, opts.train.seed)
    if len(cal_idx) == 0:
        raise DataError(f"only {n} usable images in {normal_dir}: too few to hold out a calibration split")
    log.info("calibrate_split", n_images=n, n_train=len(train_idx), n_val=len(val_idx), n_cal=len(cal_idx),
             skipped=len(data.skipped))
    blur = default_blur_sigma(opts.input_size)
    model = STFPM(opts.backbone, teacher=teacher, n_students=opts.n_students, input_size=opts.input_size,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_sigma=blur)
    result = train_students(model, data.images[train_idx], data.images[val_idx], opts.train, device,
                            progress=opts.progress)
    meta = BundleMeta(
        backbone=opts.backbone, teacher_sha256=digest, input_size=opts.input_size, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, n_students=opts.n_students, blur_sigma=blur,
        training={
            "normal_dir": str(Path(normal_dir).resolve()), "n_train": int(len(train_idx)),
            "n_val": int(len(val_idx)), "n_cal": int(len(cal_idx)), "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "seconds": round(result.seconds, 1), "stopped_early": result.stopped_early,
            "config": {k: v for k, v in vars(opts.train).items()},
            "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    detector = Detector(model, meta, model_id="unsaved", device=device)
    pred = detector.predict_many(data.images[cal_idx])
    cal, ct = fit_calibration(pred.scores.numpy(), pred.maps.numpy(), opts.alpha, opts.pixel_alpha,
                              data.images[cal_idx])
    meta.calibration = cal
    save_bundle(out, model.students.state_dict(), meta)
    report = CalibrateReport(n, len(train_idx), len(val_idx), len(cal_idx), data.skipped, result, cal, ct,
                             time.monotonic() - start)
    if defect_dir is not None:
        report.defect_metrics = defect_report(load_detector(out, device), defect_dir, opts.progress)
    return report


def recalibrate_thresholds(model_path: str | os.PathLike, normal_dir: str | os.PathLike, opts: CalibrateOptions,
                           out: str | os.PathLike | None = None,
                           defect_dir: str | os.PathLike | None = None) -> CalibrateReport:
    """Re-fit only the thresholds on new good images (e.g. after a lighting change); weights unchanged.
    All images in ``normal_dir`` are calibration images: none of them was trained on."""
    start = time.monotonic()
    detector = load_detector(model_path, opts.device, opts.teacher_weights)
    data = _load(normal_dir, detector.input_size, opts.max_images, opts.progress)
    pred = detector.predict_many(data.images)
    cal, ct = fit_calibration(pred.scores.numpy(), pred.maps.numpy(), opts.alpha, opts.pixel_alpha, data.images)
    bundle = load_bundle(model_path)
    bundle.meta.calibration = cal
    bundle.meta.training["recalibrated"] = {"normal_dir": str(Path(normal_dir).resolve()), "n_cal": len(data.paths),
                                            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    target = out or model_path
    save_bundle(target, bundle.students_state, bundle.meta)
    n = len(data.paths)
    report = CalibrateReport(n, 0, 0, n, data.skipped, None, cal, ct, time.monotonic() - start)
    if defect_dir is not None:
        report.defect_metrics = defect_report(load_detector(target, opts.device, opts.teacher_weights),
                                              defect_dir, opts.progress)
    return report
