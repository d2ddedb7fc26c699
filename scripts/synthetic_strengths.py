#!/usr/bin/env python3
"""Can synthetic anomalies tell which input size suits a set? Scores saved checkpoints on the same synthetic
anomalies at several strengths (docs/accuracy-study.md, "Choosing the input size").

The checkpoints come from ``accuracy_study.py --save-students FILE`` (one per input size, same set). The
anomalies are pasted into the set's validation images at ``--synthetic-at`` (the largest input), blended with
the clean image at each strength (1 = as made, 0.2 = a faint trace), then resized to each checkpoint's input,
so every checkpoint sees the same anomalies. Prints one JSON line per checkpoint: the synthetic image AUROC
(top 1 % score, as calibrate) per strength, overall and per kind.

    python scripts/accuracy_study.py --set elpv --size 128 --epochs 40 --batch-size 32 --synthetic-at 256 \\
        --no-epoch-test --json e128.json --save-students e128.safetensors      # and --size 256 → e256.*
    python scripts/synthetic_strengths.py --set elpv --synthetic-at 256 e128.safetensors e256.safetensors
    python scripts/synthetic_strengths.py ... --extra     # + a low-, a mid- and a high-frequency kind of its own
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_study import load_saved_students, load_set, wxh  # noqa: E402

from linewatch.imaging.images import load_images, resize  # noqa: E402
from linewatch.model.scoring import ScoreSpec  # noqa: E402
from linewatch.model.weights import load_teacher  # noqa: E402
from linewatch.station.accuracy import image_auroc  # noqa: E402
from linewatch.station.synthetic import make_anomalies  # noqa: E402
from linewatch.station.training import image_scores, split_indices  # noqa: E402

STRENGTHS = (1.0, 0.5, 0.3, 0.2)


# --extra: three more kinds, each of one spatial scale, to see whether the ranking of sizes follows the part or
# the anomaly. Study-only: calibrate's --select synthetic uses linewatch.station.synthetic's kinds.
def darken(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A soft-edged dark ellipse (30–60 % darker), like an inactive area of a solar cell: low frequency."""
    h, w = img.shape[:2]
    m = np.zeros((h, w), np.float32)
    axes = (int(w * rng.uniform(0.05, 0.2)), int(h * rng.uniform(0.05, 0.2)))
    centre = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
    cv2.ellipse(m, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    m = cv2.GaussianBlur(m, (0, 0), max(1.0, 0.02 * w))
    return np.round(img * (1 - rng.uniform(0.3, 0.6) * m[..., None])).clip(0, 255).astype(np.uint8)


def bandshift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thin band of rows (or columns) shifted along itself by 3–9 px: the part's own structure, displaced."""
    h, w = img.shape[:2]
    out = img.copy()
    horizontal = rng.random() < 0.5
    n = h if horizontal else w
    start, width = int(rng.uniform(0.2, 0.8) * n), max(2, int(n * rng.uniform(0.02, 0.06)))
    shift = int(rng.integers(3, 10)) * (1 if rng.random() < 0.5 else -1)
    if horizontal:
        out[start:start + width] = np.roll(img[start:start + width], shift, axis=1)
    else:
        out[:, start:start + width] = np.roll(img[:, start:start + width], shift, axis=0)
    return out


def thin_crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two 1-px random walks, 40 % darker: a faint crack (high frequency)."""
    h, w = img.shape[:2]
    m = np.zeros((h, w), np.uint8)
    for _ in range(2):
        x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        a, pts = rng.uniform(0, 2 * np.pi), [(x, y)]
        for _ in range(12):
            a += rng.normal(0, 0.5)
            x, y = x + np.cos(a) * w * 0.025, y + np.sin(a) * h * 0.025
            pts.append((x, y))
        cv2.polylines(m, [np.round(np.array(pts)).astype(np.int32)], False, 1, 1)
    return np.round(img * (1 - 0.4 * m[..., None])).clip(0, 255).astype(np.uint8)


EXTRA = {"darken": darken, "bandshift": bandshift, "thin_crack": thin_crack}


def resized(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.stack([resize(im, hw) for im in images])


def auroc(clean: np.ndarray, anomalous: np.ndarray) -> float:
    return round(image_auroc(np.r_[np.zeros(len(clean)), np.ones(len(anomalous))], np.r_[clean, anomalous]), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=["bottle", "elpv", "strips"], required=True)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--synthetic-at", type=wxh, required=True, metavar="WxH")
    ap.add_argument("--extra", action="store_true", help="also score the darken, bandshift and thin_crack kinds")
    ap.add_argument("checkpoints", type=Path, nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, *_ = load_set(args.set, args.data, None, None)
    _, va, _ = split_indices(len(train), 0.1, 0.2, 0)  # calibrate's default split: the same validation images
    ref = load_images([train[i] for i in va], args.synthetic_at).images
    bad, _, kinds = make_anomalies(ref, seed=0)
    extra_rng = np.random.default_rng(0)
    extra = {k: np.stack([g(im, extra_rng) for im in ref]) for k, g in EXTRA.items()} if args.extra else {}
    teacher, _ = load_teacher("mobilenet_v2")
    cpu = torch.device("cpu")
    for path in args.checkpoints:
        model = load_saved_students(path, teacher, ScoreSpec(reduce="topk", topk=0.01))
        h, w = model.input_size
        s0 = image_scores(model, resized(ref, (h, w)), 16, cpu)
        row: dict[str, float | str] = {"checkpoint": str(path), "input": f"{w}x{h}"}
        for strength in STRENGTHS:
            faint = np.round(ref + strength * (bad.astype(np.float32) - ref)).clip(0, 255).astype(np.uint8)
            s1 = image_scores(model, resized(faint, (h, w)), 16, cpu)
            row[f"s{strength:g}"] = auroc(s0, s1)
            for kind in sorted(set(kinds)):
                row[f"s{strength:g}_{kind}"] = auroc(s0, s1[np.array(kinds) == kind])
        for kind, images in extra.items():
            s1 = image_scores(model, resized(images, (h, w)), 16, cpu)
            row[f"extra_{kind}"] = auroc(s0, s1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
