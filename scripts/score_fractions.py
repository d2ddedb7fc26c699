#!/usr/bin/env python3
"""How many of the map's pixels should the image score average? Rescores saved bundles with the mean of the top
fraction of their blurred map, for several fractions, no retraining (docs/accuracy-study.md, "How many pixels make
the image score").

Each bundle is run as the daemon builds it (its levels, blur and any per-position normalisation); only the reduction
to one number changes, so pixel AUROC and PRO are the same for every fraction and are not printed. Prints one JSON
line per bundle: the image AUROC of the max and of each top fraction.

    python scripts/score_fractions.py --set elpv /tmp/full/elpv_default.lwm
    python scripts/score_fractions.py --set bottle --data ../shared/data/mvtec_ad/bottle bottle.lwm
    python scripts/score_fractions.py --set strips --data /tmp/full/strips strips_auto.lwm strips_sq256.lwm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_study import load_set  # noqa: E402

from linewatch.imaging.images import load_images  # noqa: E402
from linewatch.model.detector import load_detector  # noqa: E402
from linewatch.station.accuracy import image_auroc  # noqa: E402

FRACTIONS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=["bottle", "elpv", "strips"], required=True)
    ap.add_argument("--data", type=Path, help="bottle: the MVTec category folder; strips: make_elpv_strips.py's --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("bundles", type=Path, nargs="+", help="calibrate's .lwm bundles")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, test_paths, labels, _ = load_set(args.set, args.data, None, None)
    for path in args.bundles:
        # as the daemon loads it: the bundle's levels, blur and position statistics; not tiled bundles (whole frames)
        det = load_detector(path, device="cpu", engine="eager")
        if det.tiling is not None:
            raise SystemExit(f"{path}: tiled bundles are not supported here")
        model = det.model
        images = load_images(test_paths, model.input_size).images
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(images), 16):
                raw, score_raw = model.raw_pair(torch.from_numpy(images[i:i + 16]))
                split = score_raw is not None
                m = model.scorer.blur(score_raw if split else raw)
                if model.scorer.spec.normalise != "none":
                    m = model.scorer.normalise(m, score_map=split)
                chunks.append(m.flatten(1))
        maps = torch.cat(chunks)
        row: dict[str, object] = {"bundle": str(path), "input": f"{model.input_size[1]}x{model.input_size[0]}",
                                  "max": round(image_auroc(labels, maps.amax(1).numpy()), 4)}
        for f in FRACTIONS:
            k = max(1, round(f * maps.shape[1]))
            row[f"top {f * 100:g} %"] = round(image_auroc(labels, maps.topk(k, dim=1).values.mean(1).numpy()), 4)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
