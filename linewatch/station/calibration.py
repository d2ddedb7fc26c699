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
import torch

from linewatch.errors import DataError
from linewatch.imaging.images import ImageSet, grey, list_images, load_images, read_image, sharpness
from linewatch.model.bundle import BundleMeta, Calibration, describe_levels, load_bundle, save_bundle
from linewatch.model.detector import Detector, load_detector, resolve_device
from linewatch.model.scoring import DEFAULT_TOPK, ScoreSpec, position_stats
from linewatch.model.stfpm import IMAGENET_MEAN, IMAGENET_STD, STFPM, default_blur_sigma
from linewatch.model.tiling import TiledNet, TileSpec, extract_tiles
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


OUTLIER_IQR = 3.0  # Tukey's "far out" fence: Q3 + 3·IQR
OUTLIER_MIN_N = 8  # below this the quartiles say too little to call anything an outlier
# the score that sets the threshold is at least this many times the next-highest: the threshold rests on one
# image. For 82 clean log-normal scores (ELPV-like spread) a gap this wide has a chance of under 1 %.
OUTLIER_GAP = 2.0


@dataclass
class ScoreOutlier:
    """A calibration image whose score stands far above the others: a defective part among the good ones, or a
    good part unlike the rest. Either way it may set the threshold, so the engineer should look at it."""

    name: str
    score: float
    why: str  # e.g. "far above the others (fence 0.23)" or "2.1× the next-highest calibration score (0.18)"
    sets_threshold: bool  # its score is the image threshold (the conformal order statistic)


def score_outliers(scores: np.ndarray, names: list[str], threshold: float) -> list[ScoreOutlier]:
    """Calibration scores beyond Tukey's far-out fence, and the threshold-setting score when it is
    ``OUTLIER_GAP``× the next-highest. Anomaly scores are skewed to the right (a product of distances), so the
    fence is taken on their logarithm when all are positive (per-position normalised scores can be negative:
    then on the scores themselves, and no gap rule)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) < OUTLIER_MIN_N or len(names) != len(s):
        return []
    positive = bool((s > 0).all())
    t = np.log(s) if positive else s
    q1, q3 = np.quantile(t, [0.25, 0.75])
    fence_t = q3 + OUTLIER_IQR * (q3 - q1)
    fence = float(np.exp(fence_t)) if positive else float(fence_t)
    why = {int(i): f"far above the others (fence {fence:.6g})" for i in np.flatnonzero(t > fence_t)}
    if positive:
        order = np.argsort(s, kind="stable")
        top, second = int(order[-1]), int(order[-2])
        if s[top] == threshold and s[top] >= OUTLIER_GAP * s[second]:
            why.setdefault(top, f"{s[top] / s[second]:.1f}× the next-highest calibration score ({s[second]:.6g})")
    out = [ScoreOutlier(names[i], float(s[i]), w, bool(s[i] == threshold)) for i, w in why.items()]
    return sorted(out, key=lambda o: -o.score)


def fit_calibration(scores: np.ndarray, maps: np.ndarray, alpha: float, pixel_alpha: float,
                    images: np.ndarray | None = None, *,
                    score_from_map: bool = True) -> tuple[Calibration, ConformalThreshold]:
    """Image threshold (conformal) and pixel threshold: the (1−pixel_alpha) quantile of good-part pixels.

    ``score_from_map``: the image score is taken from ``maps`` (max or top-k mean, so never above the map's
    peak); the pixel threshold is then kept at or below the image threshold, so a failing part's defect mask
    holds the region that failed it. A score from other pyramid levels (``STFPM.score_stages``) is on another
    scale, and such a cap would be meaningless: there the quantile stands alone, and the worker still marks at
    least the map's peak of a failing part (``find_defects``)."""
    ct = conformal_threshold(scores, alpha)
    pix = float(np.quantile(maps.reshape(-1), 1.0 - pixel_alpha)) if maps.size else ct.threshold
    pixel_threshold = min(pix, ct.threshold) if score_from_map else pix
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


PIXEL_BUDGET = 256 * 256  # model input pixels for ``input_size="auto"``
SQUARE_TOLERANCE = 1.05  # aspect ratios closer to 1 than this count as square (256×256)


def auto_input_size(frame_hw: tuple[int, int], budget: int = PIXEL_BUDGET, multiple: int = 16
                    ) -> tuple[int, int]:
    """(h, w) with the frame's aspect ratio and about ``budget`` pixels, both multiples of ``multiple``.
    Square(ish) frames get the square size (256×256 for the default budget)."""
    fh, fw = frame_hw
    if fh <= 0 or fw <= 0:
        raise ValueError(f"frame size {fw}x{fh} is not positive")
    aspect = fw / fh
    if max(aspect, 1 / aspect) < SQUARE_TOLERANCE:
        aspect = 1.0
    h = math.sqrt(budget / aspect)
    w = h * aspect

    def snap(v: float) -> int:
        return int(min(4096, max(2 * multiple, multiple * round(v / multiple))))

    return snap(h), snap(w)


def frame_size_of(dir_: str | os.PathLike, sample: int = 8) -> tuple[int, int]:
    """(h, w) most common among the first ``sample`` decodable images of a folder."""
    sizes: dict[tuple[int, int], int] = {}
    for p in list_images(dir_)[:sample]:
        img = read_image(p)
        if img is not None:
            sizes[img.shape[:2]] = sizes.get(img.shape[:2], 0) + 1
    if not sizes:
        raise DataError(f"none of the first {sample} images in {dir_} could be decoded")
    return max(sizes, key=lambda k: sizes[k])


@dataclass
class CalibrateOptions:
    backbone: str = "mobilenet_v2"
    # (h, w), or "auto": the images' aspect under PIXEL_BUDGET (square images: 256×256). With ``tile``, the
    # frame size tiles are cut from ("auto": the images' own size, i.e. native resolution).
    input_size: tuple[int, int] | str = "auto"
    tile: tuple[int, int] | None = None  # (h, w) tiles = model input; None: whole frames resized
    tile_overlap: int = 32
    # the top 2 % mean (scoring.DEFAULT_TOPK): see docs/accuracy-study.md (PRO unchanged: same map)
    score: ScoreSpec = field(default_factory=lambda: ScoreSpec(reduce="topk", topk=DEFAULT_TOPK))
    blur_sigma: float | None = None  # None: default_blur_sigma(model input size)
    n_students: int = 1
    stages: tuple[int, ...] | None = None  # defect-map levels; None: the backbone's default_stages
    # image-score levels; None: the backbone's default_score_stages, or ``stages`` when those are given
    score_stages: tuple[int, ...] | None = None
    val_fraction: float = 0.1
    cal_fraction: float = 0.2
    alpha: float = 0.005
    pixel_alpha: float = 1e-3
    device: str = "auto"
    teacher_weights: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    max_images: int | None = None  # use only the first N (sorted) images: for quick tests
    progress: bool = True
    # how the images were framed, from the folder's framing.json (linewatch record); None: measured from the images
    framing: dict | None = None
    report: bool = True  # write <out>.report.html (linewatch.station.report)


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
    report_path: Path | None = None
    outliers: list[ScoreOutlier] = field(default_factory=list)  # calibration images far above the others


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


def resolve_frame_size(normal_dir: str | os.PathLike, opts: CalibrateOptions) -> tuple[int, int]:
    """(h, w) images are loaded at: the model input without tiling, the frame tiles are cut from with it."""
    if opts.input_size != "auto":
        if isinstance(opts.input_size, str):
            raise DataError(f"input size {opts.input_size!r} is not a size or auto")
        return int(opts.input_size[0]), int(opts.input_size[1])
    native = frame_size_of(normal_dir)
    return native if opts.tile is not None else auto_input_size(native, PIXEL_BUDGET)


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


def calibration_framing(data: ImageSet, opts: CalibrateOptions, input_size: tuple[int, int], tiled: bool,
                        sample: int = 8) -> dict:
    """What the bundle records about how its images were framed (compared with each camera by the daemon):
    from the folder's framing.json when it was recorded with ``linewatch record``, else measured on the images
    (their sizes, on a sample; no ROI known)."""
    from linewatch.model.bundle import framing_region
    from linewatch.service.observers.sanity import image_colour

    rec = opts.framing or {}
    if rec:
        framing = {"roi": rec.get("roi"), "source_sizes": rec.get("source_sizes") or [],
                   "colour": rec.get("colour"), "camera": rec.get("camera"), "recorded": True}
    else:
        sizes: list[list[int]] = []
        for p in data.paths[:sample]:
            img = read_image(p)
            if img is not None and [img.shape[1], img.shape[0]] not in sizes:
                sizes.append([img.shape[1], img.shape[0]])
        colours = {image_colour(im) for im in data.images[:sample]}
        framing = {"roi": None, "source_sizes": sizes, "colour": "mono" if colours == {"mono"} else "rgb",
                   "camera": None, "recorded": False}
    region = framing_region(framing)
    if tiled:
        policy = "tile"
    elif region is None:
        policy = "stretch"
    else:  # the model input keeps the region's aspect (auto / a matching size), or squashes it
        same = abs(input_size[1] / input_size[0] - region[0] / region[1]) <= 0.03 * region[0] / region[1]
        policy = "keep" if same else "stretch"
    framing["aspect_policy"] = policy
    framing["input_size"] = [int(input_size[1]), int(input_size[0])]  # w, h like the other sizes here
    return framing


def _write_report(out: str | os.PathLike, meta: BundleMeta, scores: np.ndarray, maps: np.ndarray,
                  images: np.ndarray, names: list[str], history: list[dict[str, float]],
                  summary: dict[str, str], outliers: list[ScoreOutlier] | None = None) -> Path | None:
    """The one-page calibration report beside the bundle; a failure to write it is logged, not fatal."""
    from linewatch.model.bundle import describe_framing
    from linewatch.station.report import ReportInputs, report_path_for, write_report

    cal = meta.calibration
    assert cal is not None
    if outliers:  # the same warning as the command line prints, where the engineer looks at the images
        summary = {**summary, "check these calibration images": "; ".join(
            f"{Path(o.name).name} scores {o.score:.4g}, {o.why}{' (sets the threshold)' if o.sets_threshold else ''}"
            for o in outliers)}
    summary = {"model input": f"{meta.input_size[1]}x{meta.input_size[0]}, {meta.backbone} pyramid levels "
                              f"{describe_levels(meta)}", **summary}
    if meta.framing:
        summary = {**summary, "framing": describe_framing(meta.framing)
                   + f", aspect policy {meta.framing.get('aspect_policy')}"}
    try:
        return write_report(report_path_for(out), ReportInputs(
            model=str(out), image_threshold=cal.image_threshold, pixel_threshold=cal.pixel_threshold,
            alpha=cal.alpha, false_reject_bound=cal.false_reject_bound, scores=scores, names=names, images=images,
            maps=maps, history=history, summary=summary, training=meta.training))
    except OSError as exc:
        log.warning("report_not_written", error=str(exc))
        return None


def _outliers(scores: np.ndarray, names: list[str], cal: Calibration) -> list[ScoreOutlier]:
    found = score_outliers(scores, names, cal.image_threshold)
    for o in found:
        log.warning("calibration_outlier", image=o.name, score=round(o.score, 6), why=o.why,
                    sets_threshold=o.sets_threshold)
    return found


def blurred_maps(model: STFPM, tiling: TileSpec | None, images: np.ndarray, device: torch.device,
                 batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blurred, not normalised (N,H,W) maps of ``images`` (frames at the frame size when tiled): the defect
    map's, and the score map's for a model that takes its score from other levels (else None). What the
    per-position statistics are computed from."""
    net = model if tiling is None else TiledNet(model, tiling)
    model.eval()
    maps: list[torch.Tensor] = []
    score_maps: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            raw, score_raw = net.raw_pair(torch.from_numpy(images[i:i + batch_size]).to(device))
            maps.append(model.scorer.blur(raw).float().cpu())
            if score_raw is not None:
                score_maps.append(model.scorer.blur(score_raw).float().cpu())
    return torch.cat(maps), torch.cat(score_maps) if score_maps else None


def calibrate_station(normal_dir: str | os.PathLike, out: str | os.PathLike, opts: CalibrateOptions,
                      defect_dir: str | os.PathLike | None = None) -> CalibrateReport:
    """Train a new model on ``normal_dir`` and write a calibrated bundle to ``out``."""
    start = time.monotonic()
    device = resolve_device(opts.device)
    teacher, digest = load_teacher(opts.backbone, opts.teacher_weights)
    frame_size = resolve_frame_size(normal_dir, opts)
    tiling = None
    if opts.tile is not None:
        try:
            tiling = TileSpec(frame=frame_size, tile=tuple(opts.tile), overlap=opts.tile_overlap)
        except ValueError as exc:
            raise DataError(f"cannot tile {normal_dir}: {exc}") from None
    model_size = tiling.tile if tiling is not None else frame_size
    data = _load(normal_dir, frame_size, opts.max_images, opts.progress)
    n = len(data.paths)
    train_idx, val_idx, cal_idx = split_indices(n, opts.val_fraction, opts.cal_fraction, opts.train.seed)
    if len(cal_idx) == 0:
        raise DataError(f"only {n} usable images in {normal_dir}: too few to hold out a calibration split")
    if opts.score.normalise == "position" and len(val_idx) < 2:
        raise DataError(f"per-position score normalisation needs ≥ 2 validation images, {normal_dir} gives "
                        f"{len(val_idx)}; raise --val-fraction or use more images")
    log.info("calibrate_split", n_images=n, n_train=len(train_idx), n_val=len(val_idx), n_cal=len(cal_idx),
             skipped=len(data.skipped), input_size=list(model_size), tiles_per_frame=tiling.n_tiles if tiling else 0)
    blur = opts.blur_sigma if opts.blur_sigma is not None else default_blur_sigma(model_size)
    # the students' random initialisation is part of the recipe: seeded, the same images give the same station
    torch.manual_seed(opts.train.seed)
    model = STFPM(opts.backbone, teacher=teacher, n_students=opts.n_students, input_size=model_size,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_sigma=blur, score=opts.score, stages=opts.stages,
                  score_stages=opts.score_stages)
    train_images, val_images = data.images[train_idx], data.images[val_idx]
    if tiling is not None:  # the student learns tiles; validation and calibration images stay whole frames
        train_images = extract_tiles(torch.from_numpy(train_images), tiling).numpy()
        val_images = extract_tiles(torch.from_numpy(val_images), tiling).numpy()
    result = train_students(model, train_images, val_images, opts.train, device, progress=opts.progress)
    del train_images
    meta = BundleMeta(
        backbone=opts.backbone, teacher_sha256=digest, input_size=model_size, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, n_students=opts.n_students, blur_sigma=blur, stages=model.stages,
        score_stages=model.score_stages,
        score=opts.score.to_dict(), tiling=tiling.to_dict() if tiling is not None else None,
        training={
            "normal_dir": str(Path(normal_dir).resolve()), "n_train": int(len(train_idx)),
            "n_val": int(len(val_idx)), "n_cal": int(len(cal_idx)), "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "seconds": round(result.seconds, 1), "stopped_early": result.stopped_early,
            "config": {k: v for k, v in vars(opts.train).items()},
            "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    if opts.score.normalise == "position":
        # statistics from the validation images: held out from training (their maps look like new good
        # parts') and disjoint from the calibration split, so the conformal guarantee still holds
        maps, score_maps = blurred_maps(model, tiling, data.images[val_idx], device)
        stats = position_stats(maps) + (position_stats(score_maps) if score_maps is not None else ())
        model.scorer.set_position_stats(*stats)
    detector = Detector(model, meta, model_id="unsaved", device=device)
    pred = detector.predict_many(data.images[cal_idx])
    cal, ct = fit_calibration(pred.scores.numpy(), pred.maps.numpy(), opts.alpha, opts.pixel_alpha,
                              data.images[cal_idx], score_from_map=not model.split_score)
    meta.calibration = cal
    meta.framing = calibration_framing(data, opts, meta.input_size, tiling is not None)
    save_bundle(out, model.students.state_dict(), meta, scorer_state=model.scorer.position_state())
    report = CalibrateReport(n, len(train_idx), len(val_idx), len(cal_idx), data.skipped, result, cal, ct,
                             time.monotonic() - start,
                             outliers=_outliers(pred.scores.numpy(), [str(data.paths[i]) for i in cal_idx], cal))
    if opts.report:
        report.report_path = _write_report(out, meta, pred.scores.numpy(), pred.maps.numpy(), data.images[cal_idx],
                                           [data.paths[i].name for i in cal_idx], result.history,
                                           {"images (train / validation / calibration)":
                                            f"{len(train_idx)} / {len(val_idx)} / {len(cal_idx)}",
                                            "best epoch": f"{result.best_epoch} of {result.epochs_run}"},
                                           report.outliers)
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
    cal, ct = fit_calibration(pred.scores.numpy(), pred.maps.numpy(), opts.alpha, opts.pixel_alpha, data.images,
                              score_from_map=not detector.model.split_score)
    bundle = load_bundle(model_path)
    bundle.meta.calibration = cal
    bundle.meta.training["recalibrated"] = {"normal_dir": str(Path(normal_dir).resolve()), "n_cal": len(data.paths),
                                            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    target = out or model_path
    save_bundle(target, bundle.students_state, bundle.meta, scorer_state=bundle.scorer_state)
    n = len(data.paths)
    report = CalibrateReport(n, 0, 0, n, data.skipped, None, cal, ct, time.monotonic() - start,
                             outliers=_outliers(pred.scores.numpy(), [str(p) for p in data.paths], cal))
    if opts.report:  # no curves (nothing trained): the page says what was re-fitted and where the weights come from
        report.report_path = _write_report(target, bundle.meta, pred.scores.numpy(), pred.maps.numpy(), data.images,
                                           [p.name for p in data.paths], [],
                                           {"thresholds": f"refitted from {n} images of {Path(normal_dir).resolve()}"},
                                           report.outliers)
    if defect_dir is not None:
        report.defect_metrics = defect_report(load_detector(target, opts.device, opts.teacher_weights),
                                              defect_dir, opts.progress)
    return report
