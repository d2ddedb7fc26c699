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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_study import load_set, wxh  # noqa: E402

from linewatch.imaging.images import load_images, resize  # noqa: E402
from linewatch.model.scoring import ScoreSpec  # noqa: E402
from linewatch.model.stfpm import IMAGENET_MEAN, IMAGENET_STD, STFPM  # noqa: E402
from linewatch.model.weights import load_teacher  # noqa: E402
from linewatch.station.accuracy import image_auroc  # noqa: E402
from linewatch.station.synthetic import make_anomalies  # noqa: E402
from linewatch.station.training import image_scores, split_indices  # noqa: E402

STRENGTHS = (1.0, 0.5, 0.3, 0.2)


def auroc(clean: np.ndarray, anomalous: np.ndarray) -> float:
    return round(image_auroc(np.r_[np.zeros(len(clean)), np.ones(len(anomalous))], np.r_[clean, anomalous]), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=["bottle", "elpv", "strips"], required=True)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--synthetic-at", type=wxh, required=True, metavar="WxH")
    ap.add_argument("checkpoints", type=Path, nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, *_ = load_set(args.set, args.data, None, None)
    _, va, _ = split_indices(len(train), 0.1, 0.2, 0)  # calibrate's default split: the same validation images
    ref = load_images([train[i] for i in va], args.synthetic_at).images
    bad, _, kinds = make_anomalies(ref, seed=0)
    teacher, _ = load_teacher("mobilenet_v2")
    cpu = torch.device("cpu")
    for path in args.checkpoints:
        with safe_open(str(path), "pt") as fh:
            md = fh.metadata()
        h, w = (int(v) for v in md["input_hw"].split("x"))
        model = STFPM("mobilenet_v2", teacher=teacher, input_size=(h, w), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      blur_sigma=float(md["blur"]), score=ScoreSpec(reduce="topk", topk=0.01))
        model.students.load_state_dict(load_file(str(path)))
        s0 = image_scores(model, np.stack([resize(im, (h, w)) for im in ref]), 16, cpu)
        row: dict[str, float | str] = {"checkpoint": str(path), "input": f"{w}x{h}"}
        for strength in STRENGTHS:
            faint = np.round(ref + strength * (bad.astype(np.float32) - ref)).clip(0, 255).astype(np.uint8)
            s1 = image_scores(model, np.stack([resize(im, (h, w)) for im in faint]), 16, cpu)
            row[f"s{strength:g}"] = auroc(s0, s1)
            for kind in sorted(set(kinds)):
                row[f"s{strength:g}_{kind}"] = auroc(s0, s1[np.array(kinds) == kind])
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
