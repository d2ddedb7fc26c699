#!/usr/bin/env python3
"""Accuracy study for docs/accuracy-study.md: one training run, then every image-score variant and both
checkpoint-selection rules measured on the same model (training dominates the cost, scoring is cheap).

    python scripts/accuracy_study.py --set bottle --data ../shared/data/mvtec_ad/bottle --size 128 --epochs 10
    python scripts/accuracy_study.py --set elpv --size 128 --epochs 12
    python scripts/accuracy_study.py --set strips --data data/elpv_strips --size 64x256 --epochs 8
    python scripts/accuracy_study.py --set strips --data data/elpv_strips --tile 128 --overlap 16 --epochs 4

Sizes are WxH. Per epoch it records the validation loss, the synthetic-anomaly AUROC (validation images) and,
for the study only, the test image AUROC, so the epoch each selection rule would keep can be compared with
the test AUROC there. Prints a JSON summary; ``--json FILE`` writes it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from linewatch.cli.args import parse_stages
from linewatch.imaging.images import list_images, load_images
from linewatch.model.backbones import get_spec
from linewatch.model.scoring import ImageScorer, ScoreSpec, position_stats
from linewatch.model.stfpm import IMAGENET_MEAN, IMAGENET_STD, STFPM, default_blur_sigma
from linewatch.model.tiling import TileSpec, extract_tiles, stitch
from linewatch.model.weights import load_teacher
from linewatch.station.accuracy import image_auroc, pixel_auroc, pro_auc
from linewatch.station.calibration import conformal_threshold, frame_size_of
from linewatch.station.training import TrainConfig, select_checkpoint, split_indices, train_students


def wxh(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.lower().split("x")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[1], parts[0])


def load_set(name: str, data: Path | None, size: tuple[int, int] | None, limit: int | None):
    """(train paths, test paths, test labels, masks loader or None)."""
    if name == "bottle":
        train = list_images(data / "train" / "good")
        test, labels = [], []
        for sub in sorted(p for p in (data / "test").iterdir() if p.is_dir()):
            for p in list_images(sub):
                test.append(p)
                labels.append(int(sub.name != "good"))
        return train, test, np.array(labels), data
    if name == "elpv":
        from linewatch.tools.demo.elpv import fetch, split

        s = split(fetch(Path(".cache/elpv")), 0.7, 0)
        return s.normal, [p for p, _ in s.stream], np.array([y for _, y in s.stream]), None
    train = list_images(data / "train" / "good")
    good, bad = list_images(data / "test" / "good"), list_images(data / "test" / "defect")
    return train, good + bad, np.r_[np.zeros(len(good)), np.ones(len(bad))].astype(int), None


def load_saved_students(path: Path, teacher, score: ScoreSpec | None = None) -> STFPM:
    """The model a ``--save-students`` checkpoint was cut from (input size, blur and levels from its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        md = fh.metadata()
    h, w = (int(v) for v in md["input_hw"].split("x"))
    stages = tuple(int(v) for v in md.get("stages", "1,2,3").split(","))  # saved before the field: levels 1-3
    model = STFPM("mobilenet_v2", teacher=teacher, input_size=(h, w), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  blur_sigma=float(md["blur"]), score=score, stages=stages)
    model.students.load_state_dict(load_file(str(path)))
    return model


def masks_for(root: Path, paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    import cv2

    from linewatch.imaging.images import read_image

    out = np.zeros((len(paths), *size), bool)
    for i, p in enumerate(paths):
        if p.parent.name == "good":
            continue
        m = read_image(root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
        out[i] = cv2.resize(m[:, :, 0], (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 127
    return out


def raw_maps(model: STFPM, images: np.ndarray, tiling: TileSpec | None, batch: int = 16) -> torch.Tensor:
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch])
            if tiling is None:
                out.append(model.raw_maps(x))
            else:
                out.append(stitch(model.raw_maps(extract_tiles(x, tiling)), tiling))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=["bottle", "elpv", "strips"], required=True)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--size", type=wxh, help="model input WxH (whole frames resized to it)")
    ap.add_argument("--tile", type=wxh, help="tiles of this size at native resolution instead")
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--students", type=int, default=1)
    ap.add_argument("--stages", type=parse_stages, metavar="LIST",
                    help="pyramid levels matched, e.g. 1,2,3 (default: the backbone's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.4)
    ap.add_argument("--limit", type=int, help="use only the first N training images")
    ap.add_argument("--alpha", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--synthetic-at", type=wxh, metavar="WxH",
                    help="paste the synthetic anomalies into the validation images at this size, then resize "
                         "them to the input (so runs at several input sizes see the same anomalies); "
                         "synthetic AUROC is then recorded every epoch")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--save-students", type=Path, metavar="FILE",
                    help="write the val-loss checkpoint's student weights (safetensors) for later scoring")
    ap.add_argument("--no-epoch-test", action="store_true", help="skip the per-epoch test AUROC (saves time)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    train_paths, test_paths, labels, mask_root = load_set(args.set, args.data, args.size, args.limit)
    if args.limit:
        train_paths = train_paths[:args.limit]
    tiling = None
    if args.tile:
        frame = frame_size_of(train_paths[0].parent)
        tiling = TileSpec(frame=frame, tile=args.tile, overlap=args.overlap)
        size, model_size = frame, args.tile
    else:
        size = model_size = args.size
    train = load_images(train_paths, size).images
    test = load_images(test_paths, size).images
    tr, va, ca = split_indices(len(train), 0.1, 0.2, 0)
    teacher, _ = load_teacher("mobilenet_v2")
    blur = default_blur_sigma(model_size)
    # the study scores the defect map in its variants, so the students learn exactly its levels (score_stages =
    # stages); the image score from its own levels is measured with calibrate + evaluate and level_subsets.py
    stages = args.stages or get_spec("mobilenet_v2").default_stages
    model = STFPM("mobilenet_v2", teacher=teacher, n_students=args.students, input_size=model_size,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_sigma=blur, stages=stages, score_stages=stages)
    tr_img, va_img = train[tr], train[va]
    if tiling is not None:
        tr_img = extract_tiles(torch.from_numpy(tr_img), tiling).numpy()
        va_img = extract_tiles(torch.from_numpy(va_img), tiling).numpy()
    anomalous = None
    if args.synthetic_at:
        if tiling is not None:
            ap.error("--synthetic-at is for whole-frame inputs, not --tile")
        from linewatch.imaging.images import resize
        from linewatch.station.synthetic import make_anomalies

        ref = load_images([train_paths[i] for i in va], args.synthetic_at).images
        bad, _, kinds = make_anomalies(ref, seed=0)
        va_img = np.stack([resize(im, model_size) for im in ref])
        anomalous = np.stack([resize(im, model_size) for im in bad])
    states: dict[int, dict] = {}

    def on_epoch(epoch: int, m: STFPM) -> dict[str, float]:
        states[epoch] = copy.deepcopy(m.students.state_dict())
        if args.no_epoch_test:
            return {"test_image_auroc": float("nan")}
        raw = raw_maps(m, test, tiling)
        maps = ImageScorer(blur)(raw)[0]
        _, top1 = ImageScorer(blur, ScoreSpec(reduce="topk", topk=0.01))(raw)  # the default score
        return {"test_image_auroc": image_auroc(labels, maps.flatten(1).amax(1).numpy()),
                "test_image_auroc_top1": image_auroc(labels, top1.numpy())}

    cfg = TrainConfig(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.epochs,
                      select="synthetic")
    t0 = time.monotonic()
    res = train_students(model, tr_img, va_img, cfg, torch.device("cpu"), progress=False, on_epoch=on_epoch,
                         anomalous=anomalous)
    train_s = time.monotonic() - t0
    by_epoch = {int(h["epoch"]): h for h in res.history}
    e_loss = select_checkpoint(res.history, "val_loss", cfg.min_delta)
    e_syn = select_checkpoint(res.history, "synthetic", cfg.min_delta)
    if args.no_epoch_test:  # the test AUROC only at the epochs the rules keep, and the last
        for e in {e_loss, e_syn, res.epochs_run}:
            model.students.load_state_dict(states[e])
            maps = ImageScorer(blur)(raw_maps(model, test, tiling))[0]
            by_epoch[e]["test_image_auroc"] = image_auroc(labels, maps.flatten(1).amax(1).numpy())
    summary: dict = {
        "set": args.set, "input": list(model_size), "frame": list(size), "tiling": tiling.to_dict() if tiling else None,
        "epochs": args.epochs, "students": args.students, "stages": list(model.stages),
        "n_train": len(tr), "n_val": len(va), "n_cal": len(ca),
        "n_test_good": int((labels == 0).sum()), "n_test_defect": int(labels.sum()), "train_seconds": round(train_s),
        "synthetic_at": list(args.synthetic_at) if args.synthetic_at else None,
        "history": res.history,
        "selection": {"val_loss": {"epoch": e_loss, "test_image_auroc": by_epoch[e_loss]["test_image_auroc"]},
                      "synthetic": {"epoch": e_syn, "test_image_auroc": by_epoch[e_syn]["test_image_auroc"]},
                      "last": {"epoch": res.epochs_run, "test_image_auroc": res.history[-1]["test_image_auroc"]}},
    }
    # scoring variants on the val-loss checkpoint (today's default rule)
    model.students.load_state_dict(states[e_loss])
    if args.save_students:
        from safetensors.torch import save_file

        args.save_students.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in states[e_loss].items()}, str(args.save_students),
                  metadata={"set": args.set, "input_hw": f"{model_size[0]}x{model_size[1]}", "epoch": str(e_loss),
                            "blur": str(blur), "stages": ",".join(map(str, model.stages))})
    if anomalous is not None:  # which kinds of synthetic anomaly this checkpoint separates, each alone
        from linewatch.station.training import synthetic_auroc

        summary["synthetic_auroc_by_kind"] = {
            k: synthetic_auroc(model, va_img, anomalous[np.array(kinds) == k], 16, torch.device("cpu"))
            for k in sorted(set(kinds))}
    t0 = time.monotonic()
    raw_val, raw_cal, raw_test = (raw_maps(model, x, tiling) for x in (train[va], train[ca], test))
    summary["test_maps_seconds_per_image"] = (time.monotonic() - t0) / (len(va) + len(ca) + len(test))
    masks = masks_for(mask_root, test_paths, size) if mask_root is not None else None
    variants = {
        "max": ScoreSpec(), "top1%": ScoreSpec(reduce="topk", topk=0.01),
        "top5%": ScoreSpec(reduce="topk", topk=0.05),
        "max+pos": ScoreSpec(normalise="position"), "top1%+pos": ScoreSpec(reduce="topk", topk=0.01,
                                                                           normalise="position"),
    }
    rows = {}
    for blur_mult in (1.0, 2.0):
        for name, spec in variants.items():
            sc = ImageScorer(blur * blur_mult, spec)
            if spec.normalise == "position":
                sc.set_position_stats(*position_stats(ImageScorer(blur * blur_mult)(raw_val)[0]))
            _, s_cal = sc(raw_cal)
            maps, s_test = sc(raw_test)
            thr = conformal_threshold(s_cal.numpy(), args.alpha).threshold
            s = s_test.numpy()
            row = {"image_auroc": image_auroc(labels, s),
                   "recall@thr": float((s[labels == 1] > thr).mean()),
                   "false_rejects": int((s[labels == 0] > thr).sum())}
            if masks is not None:
                row["pixel_auroc"] = pixel_auroc(masks, maps.numpy())
                row["pro"] = pro_auc(masks, maps.numpy())
            rows[f"{name} σ×{blur_mult:g}"] = row
            if name == "top1%" and blur_mult == 1.0:  # the default score, kept to study combinations offline
                summary["test_scores_top1"] = [round(float(v), 6) for v in s]
                summary["cal_scores_top1"] = [round(float(v), 6) for v in s_cal.numpy()]
                summary["test_labels"] = labels.tolist()
    summary["scores"] = rows
    summary["total_seconds"] = round(time.monotonic() - t_start)
    text = json.dumps(summary, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
