#!/usr/bin/env python3
"""ELPV module strips: a dev set of long parts with thin defects, built from real solar-cell images.

Four monocrystalline ELPV cells (300×300) side by side make one 300×1200 strip (aspect 4 : 1). A strip is
*good* when all four cells have defect probability 0, *defective* when one of them has probability 1 (the
other three good). Good cells are split once, seeded, into a training pool and a test pool, so no cell is in
both a training strip and a test strip; certainly-defective cells appear only in test strips.

    python scripts/make_elpv_strips.py --out data/elpv_strips            # fetches the elpv-dataset wheel
    python scripts/make_elpv_strips.py --elpv DIR/with/labels.csv --out OUT --seed 0

Writes ``OUT/train/good``, ``OUT/test/good``, ``OUT/test/defect``, ``OUT/strips.csv`` (which cells each strip is
made of) and ``OUT/test/cell_masks`` (``NNNN_mask.png``, white over the *whole* defective cell). ELPV has no
pixel masks, so those cell masks are a coarse stand-in: pixel AUROC against them measures whether the map
points at the right cell of four, not whether it outlines the crack (PRO against them means little).

``--thin-cracks N`` adds ``OUT/test/thin`` and ``OUT/test/thin_masks``: N more strips of four *good* test cells,
one of which gets a drawn crack 2–3 px wide (see :func:`draw_crack`), with a pixel-exact mask. ELPV's real
defects are mostly coarse (dark areas, cracks across the cell); these are the thin, few-pixel defects of long
parts that a square squash thins further. They are synthetic and say so: they test what the input size does
to thin defects, not how real ones look. They come from their own random stream, so the other strips of a seed
are the same with or without them.
The ELPV licence (CC BY-NC-SA 4.0) applies.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np

CELLS_PER_STRIP = 4


def read_labels(data: Path) -> tuple[list[Path], list[Path]]:
    """(good mono cells, defective mono cells) from ELPV's labels.csv, in file order."""
    good, bad = [], []
    with open(data / "labels.csv") as f:
        for row in csv.reader(f, delimiter=" ", skipinitialspace=True):
            if len(row) < 3 or row[2] != "mono":
                continue
            prob = float(row[1])
            if prob == 0.0:
                good.append(data / row[0])
            elif prob == 1.0:
                bad.append(data / row[0])
    return good, bad


def _cell(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SystemExit(f"error: cannot read ELPV cell {path}")
    return img


def _strip_cells(cells: list[Path]) -> list[np.ndarray]:
    """The cells of one strip, scaled to the first one's height (ELPV cells are 300×300; this is a safeguard)."""
    imgs = [_cell(p) for p in cells]
    h = imgs[0].shape[0]
    return [im if im.shape[0] == h else cv2.resize(im, (im.shape[1] * h // im.shape[0], h)) for im in imgs]


def draw_crack(cell: np.ndarray, rng: np.random.Generator, darken: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A dark crack drawn into a grey cell: a random walk of 6 steps, 30–80 % of the cell's side long, 2 or 3 px
    wide, any direction, darker than what it crosses by ``darken`` × 0.8–1.2 (0.5: 40–60 % darker). The random
    draws do not depend on ``darken``, so a seed gives the same cracks at every contrast. Returns (cell with
    crack, mask 0/255)."""
    h, w = cell.shape[:2]
    side = min(h, w)
    length = float(rng.uniform(0.3, 0.8)) * side
    x, y = float(rng.uniform(0.25, 0.75)) * w, float(rng.uniform(0.25, 0.75)) * h
    angle = float(rng.uniform(0, 2 * np.pi))
    pts = [(x, y)]
    for _ in range(6):
        angle += float(rng.normal(0, 0.3))
        x = float(np.clip(x + np.cos(angle) * length / 6, 0, w - 1))
        y = float(np.clip(y + np.sin(angle) * length / 6, 0, h - 1))
        pts.append((x, y))
    mask = np.zeros((h, w), np.uint8)
    cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 255, int(rng.integers(2, 4)), cv2.LINE_8)
    dark = max(0.0, 1.0 - darken * float(rng.uniform(0.8, 1.2)))  # darken near 1 would go below black
    out = cell.copy()
    sel = mask > 0
    out[sel] = np.round(cell[sel].astype(np.float32) * dark).astype(np.uint8)
    return out, mask


def build(data: Path, out: Path, seed: int = 0, test_fraction: float = 0.3, n_test_good: int = 60,
          n_test_defect: int = 60, train_rounds: int = 1, n_thin: int = 0, crack_darken: float = 0.5) -> dict[str, int]:
    """Write the strips; returns how many of each. Deterministic for a given ``seed``."""
    good, bad = read_labels(data)
    rng = np.random.default_rng(seed)
    good = [good[i] for i in rng.permutation(len(good))]
    bad = [bad[i] for i in rng.permutation(len(bad))]
    n_test_cells = int(round(len(good) * test_fraction))
    test_pool, train_pool = good[:n_test_cells], good[n_test_cells:]
    if len(train_pool) < CELLS_PER_STRIP or len(test_pool) < CELLS_PER_STRIP - 1:
        raise SystemExit(f"error: {len(good)} good mono cells are too few to build strips")
    strips: list[tuple[str, list[Path], int | None]] = []  # (split/label, cells, defective cell's index)
    for _ in range(train_rounds):  # each round uses every training cell once, in a new order
        order = [train_pool[i] for i in rng.permutation(len(train_pool))]
        for i in range(0, len(order) - CELLS_PER_STRIP + 1, CELLS_PER_STRIP):
            strips.append(("train/good", order[i:i + CELLS_PER_STRIP], None))
    for _ in range(n_test_good):
        idx = rng.choice(len(test_pool), CELLS_PER_STRIP, replace=False)
        strips.append(("test/good", [test_pool[i] for i in idx], None))
    for k in range(min(n_test_defect, len(bad))):
        idx = rng.choice(len(test_pool), CELLS_PER_STRIP - 1, replace=False)
        cells = [test_pool[i] for i in idx]
        pos = int(rng.integers(0, CELLS_PER_STRIP))
        cells.insert(pos, bad[k])  # the defective cell at a random position
        strips.append(("test/defect", cells, pos))
    counts: dict[str, int] = {}
    rows = []
    for split in ("train/good", "test/good", "test/defect", "test/cell_masks"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for split, cells, bad_at in strips:
        n = counts.get(split, 0)
        counts[split] = n + 1
        name = f"{n:04d}.png"
        imgs = _strip_cells(cells)
        h = imgs[0].shape[0]
        cv2.imwrite(str(out / split / name), np.hstack(imgs))
        if bad_at is not None:
            mask = np.zeros((h, sum(im.shape[1] for im in imgs)), np.uint8)
            x0 = sum(im.shape[1] for im in imgs[:bad_at])
            mask[:, x0:x0 + imgs[bad_at].shape[1]] = 255
            cv2.imwrite(str(out / "test/cell_masks" / f"{n:04d}_mask.png"), mask)
        rows.append({"file": f"{split}/{name}", "cells": " ".join(p.stem for p in cells)})
    if n_thin:
        (out / "test/thin").mkdir(parents=True, exist_ok=True)
        (out / "test/thin_masks").mkdir(parents=True, exist_ok=True)
        thin_rng = np.random.default_rng([seed, 1])  # its own stream: the strips above do not depend on n_thin
    for n in range(n_thin):
        idx = thin_rng.choice(len(test_pool), CELLS_PER_STRIP, replace=False)
        cells = [test_pool[i] for i in idx]
        pos = int(thin_rng.integers(0, CELLS_PER_STRIP))
        imgs = _strip_cells(cells)
        masks = [np.zeros(im.shape[:2], np.uint8) for im in imgs]
        imgs[pos], masks[pos] = draw_crack(imgs[pos], thin_rng, crack_darken)
        name = f"{n:04d}.png"
        cv2.imwrite(str(out / "test/thin" / name), np.hstack(imgs))
        cv2.imwrite(str(out / "test/thin_masks" / f"{n:04d}_mask.png"), np.hstack(masks))
        rows.append({"file": f"test/thin/{name}", "cells": " ".join(p.stem for p in cells)})
        counts["test/thin"] = n + 1
    with open(out / "strips.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "cells"])
        w.writeheader()
        w.writerows(rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder to write train/ and test/ into")
    ap.add_argument("--elpv", type=Path, help="ELPV data folder (labels.csv, images/); default: fetch the wheel")
    ap.add_argument("--cache", type=Path, default=Path(".cache/elpv"), help="where the fetched wheel is unpacked")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3, help="good cells kept for test strips")
    ap.add_argument("--test-good", type=int, default=60, help="good test strips")
    ap.add_argument("--test-defect", type=int, default=60, help="defective test strips (≤ defective cells)")
    ap.add_argument("--train-rounds", type=int, default=1, help="training strips: each training cell used this often")
    ap.add_argument("--thin-cracks", type=int, default=0, metavar="N",
                    help="also write N test strips of good cells with a drawn thin crack (test/thin, test/thin_masks)")
    ap.add_argument("--crack-darken", type=float, default=0.5, metavar="F",
                    help="how much darker the cracks are than what they cross, 0–1 (default 0.5: 40–60 %%)")
    args = ap.parse_args(argv)
    if not 0.0 < args.crack_darken <= 1.0:
        print(f"error: --crack-darken {args.crack_darken} is not in (0, 1]", file=sys.stderr)
        return 2
    data = args.elpv
    if data is None:
        from linewatch.tools.demo.elpv import fetch

        data = fetch(args.cache)
    if not (data / "labels.csv").is_file():
        print(f"error: {data} has no labels.csv (pass the ELPV data folder)", file=sys.stderr)
        return 2
    counts = build(data, args.out, args.seed, args.test_fraction, args.test_good, args.test_defect,
                   args.train_rounds, args.thin_cracks, args.crack_darken)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
