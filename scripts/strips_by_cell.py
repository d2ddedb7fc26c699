#!/usr/bin/env python3
"""How far can framing go on the ELPV strips? Scores strips cell by cell, and estimates the strip AUROC a cell model
allows (docs/accuracy-study.md, "How far framing can go on the strips").

A strip is four cells; whatever the input size, the image score must find one bad cell among four while three good
cells (four on a good strip) offer their own highest scores. So the strip AUROC is bounded by how well the model
tells a single cell, seen as well as it can be, from a good one.

    # cut make_elpv_strips.py's strips back into their cells (train/good, test/good, test/defect)
    python scripts/strips_by_cell.py cut --strips /tmp/full/strips --out /tmp/cells_s0
    linewatch calibrate --normal-dir /tmp/cells_s0/train/good --out cells_s0.lwm       # a cell model, default calibrate
    # each test strip scored as the max of its four cells; its map the four cell maps side by side
    python scripts/strips_by_cell.py score --model cells_s0.lwm --strips /tmp/full/strips --cells /tmp/cells_s0
    # the strip AUROC to expect from a cell model's held-out cell scores (random strips of 4 cells, many draws)
    python scripts/strips_by_cell.py ceiling --model elpv.lwm --good GOOD_CELLS --defect DEFECT_CELLS

Each prints one JSON line. ``score``'s pixel AUROC and PRO are against the whole-cell masks (``test/cell_masks``),
at the strips' native 300×1200, as ``linewatch evaluate`` computes them at the model's input size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_elpv_strips import CELLS_PER_STRIP as CELLS  # noqa: E402

from linewatch.imaging.images import list_images, load_images  # noqa: E402
from linewatch.model.detector import load_detector  # noqa: E402
from linewatch.station.accuracy import binary_stats, image_auroc, pixel_auroc, pro_auc  # noqa: E402


def cut_strip(strip: np.ndarray) -> list[np.ndarray]:
    """A strip's four cells, left to right (a strip is four square cells side by side)."""
    h, w = strip.shape[:2]
    if w != CELLS * h:
        raise ValueError(f"a strip is {CELLS} square cells side by side; got {w}×{h}")
    return [strip[:, k * h:(k + 1) * h] for k in range(CELLS)]


def cut(strips: Path, out: Path) -> dict:
    counts = {}
    for sub in ("train/good", "test/good", "test/defect"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        paths = list_images(strips / sub)
        for p in paths:
            im = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            for k, cell in enumerate(cut_strip(im)):
                cv2.imwrite(str(out / sub / f"{p.stem}_c{k}.png"), cell)
        counts[sub] = len(paths) * CELLS
    return counts


def score(model: Path, strips: Path, cells: Path) -> dict:
    det = load_detector(model, device="cpu")
    scores, maps, labels, masks = [], [], [], []
    for label, sub in ((0, "good"), (1, "defect")):
        strip_paths = list_images(strips / "test" / sub)
        imgs = load_images([cells / "test" / sub / f"{p.stem}_c{k}.png" for p in strip_paths for k in range(CELLS)],
                           det.input_size)
        if imgs.skipped:
            raise SystemExit(f"unreadable cells: {imgs.skipped[:3]}; run `cut` first")
        pred = det.predict_many(imgs.images, 16)
        cell_scores, cell_maps = pred.scores.numpy().reshape(-1, CELLS), pred.maps.numpy()
        h = cv2.imread(str(strip_paths[0]), cv2.IMREAD_GRAYSCALE).shape[0]  # make_elpv_strips: all one size
        for i, p in enumerate(strip_paths):
            maps.append(np.concatenate([cv2.resize(cell_maps[CELLS * i + k], (h, h), interpolation=cv2.INTER_LINEAR)
                                        for k in range(CELLS)], axis=1))
            scores.append(cell_scores[i].max())
            labels.append(label)
            if label:
                m = cv2.imread(str(strips / "test" / "cell_masks" / f"{p.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
                masks.append(m > 127)
            else:
                masks.append(np.zeros((h, CELLS * h), bool))
    labels, scores = np.array(labels), np.array(scores)
    maps, masks = np.stack(maps), np.stack(masks)
    stats = binary_stats(labels, scores > det.calibration.image_threshold)
    return dict(model=str(model), image_auroc=image_auroc(labels, scores), pixel_auroc=pixel_auroc(masks, maps),
                pro=pro_auc(masks, maps), recall_at_cell_threshold=stats["recall"],
                false_rejects_at_cell_threshold=int(stats["fp"]), n_good=int((labels == 0).sum()),
                n_defect=int(labels.sum()))


def strip_auroc_draws(good: np.ndarray, defect: np.ndarray, n_strips: int, draws: int,
                      rng: np.random.Generator) -> np.ndarray:
    """AUROC of random strip sets built from cell scores: a good strip is the max of 4 good cells, a defective one
    the max of 1 defective and 3 good cells (cells drawn without replacement within a strip)."""
    labels = np.r_[np.zeros(n_strips), np.ones(n_strips)]
    out = np.empty(draws)
    for j in range(draws):
        gs = [rng.choice(good, CELLS, replace=False).max() for _ in range(n_strips)]
        ds = [max(rng.choice(defect), rng.choice(good, CELLS - 1, replace=False).max()) for _ in range(n_strips)]
        out[j] = image_auroc(labels, np.r_[gs, ds])
    return out


def ceiling(model: Path, good_dir: Path, defect_dir: Path, n_strips: int, draws: int, seed: int) -> dict:
    det = load_detector(model, device="cpu")
    sc = {}
    for name, folder in (("good", good_dir), ("defect", defect_dir)):
        imgs = load_images(list_images(folder, recursive=True), det.input_size)
        sc[name] = det.predict_many(imgs.images, 16).scores.numpy()
    g, d = sc["good"], sc["defect"]
    cell_labels = np.r_[np.zeros(len(g)), np.ones(len(d))]
    rng = np.random.default_rng(seed)
    a = strip_auroc_draws(g, d, n_strips, draws, rng)
    # What cell AUROC would a given strip AUROC need? The defective cells' scores times a few fixed factors.
    needed = {}
    for factor in (1.1, 1.25, 1.5, 2.0):
        dd = d * factor
        needed[f"x{factor}"] = dict(cell_auroc=image_auroc(cell_labels, np.r_[g, dd]),
                                    strip_auroc=float(strip_auroc_draws(g, dd, n_strips, draws // 4, rng).mean()))
    return dict(model=str(model), n_good_cells=len(g), n_defect_cells=len(d),
                cell_auroc=image_auroc(cell_labels, np.r_[g, d]),
                strip_auroc_mean=float(a.mean()), strip_auroc_p05=float(np.quantile(a, 0.05)),
                strip_auroc_p95=float(np.quantile(a, 0.95)), n_strips=n_strips, draws=draws,
                defect_scores_raised=needed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cut", help="strips back into their four cells")
    c.add_argument("--strips", type=Path, required=True, help="make_elpv_strips.py's --out")
    c.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score", help="test strips scored as the max of their cells")
    s.add_argument("--model", type=Path, required=True, help="a cell model (calibrate on `cut`'s train/good)")
    s.add_argument("--strips", type=Path, required=True)
    s.add_argument("--cells", type=Path, required=True, help="`cut`'s --out")
    s.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("ceiling", help="the strip AUROC a cell model's held-out cell scores allow")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--good", type=Path, required=True, help="held-out good cells")
    e.add_argument("--defect", type=Path, required=True, help="defective cells")
    e.add_argument("--strips", type=int, default=60, help="good and defective strips per draw (the strips' test: 60)")
    e.add_argument("--draws", type=int, default=2000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd != "cut":
        import torch

        torch.set_num_threads(args.threads)
    if args.cmd == "cut":
        res = cut(args.strips, args.out)
    elif args.cmd == "score":
        res = score(args.model, args.strips, args.cells)
    else:
        res = ceiling(args.model, args.good, args.defect, args.strips, args.draws, args.seed)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
