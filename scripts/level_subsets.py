#!/usr/bin/env python3
"""Which pyramid levels should the map multiply? Scores saved checkpoints with the product over every subset of the
levels they were trained on, no retraining (docs/accuracy-study.md, "Which pyramid levels").

Checkpoints: ``accuracy_study.py --save-students FILE`` (safetensors with its metadata) or ``calibrate`` bundles
(``.lwm``). Prints one JSON line per checkpoint: per subset, image AUROC (top 1 % score, default blur) and, where
there are masks, pixel AUROC and PRO.

    python scripts/level_subsets.py --set elpv e256.safetensors
    python scripts/level_subsets.py --set bottle --data ../shared/data/mvtec_ad/bottle b256.safetensors
    python scripts/level_subsets.py --set strips --data /tmp/full/strips --masks /tmp/full/strips/test/cell_masks \\
        strips_256x64.lwm
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_study import load_saved_students, load_set, masks_for  # noqa: E402

from linewatch.imaging.images import load_images  # noqa: E402
from linewatch.model import stfpm  # noqa: E402
from linewatch.model.bundle import load_bundle  # noqa: E402
from linewatch.model.detector import build_model  # noqa: E402
from linewatch.model.scoring import ImageScorer, ScoreSpec  # noqa: E402
from linewatch.model.stfpm import STFPM  # noqa: E402
from linewatch.model.weights import load_teacher  # noqa: E402
from linewatch.station.accuracy import image_auroc, pixel_auroc, pro_auc  # noqa: E402
from linewatch.station.evaluation import load_masks  # noqa: E402


def load_checkpoint(path: Path, teacher) -> STFPM:
    if path.suffix == ".lwm":  # built as the daemon builds it (its own teacher, the bundle's levels and blur)
        b = load_bundle(path)
        model, _ = build_model(b.meta)
        model.students.load_state_dict(b.students_state)
        return model
    return load_saved_students(path, teacher)


def level_distances(model: STFPM, images: np.ndarray, batch: int = 16) -> torch.Tensor:
    """(N, L, H, W): each trained level's distance map, upsampled to the input, one level at a time."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            t, ss = model.features(model.preprocess(torch.from_numpy(images[i:i + batch])))
            out.append(torch.stack(stfpm.level_distances(t, ss[0], model.input_size), 1))
    return torch.cat(out)


def strip_masks(masks_dir: Path, paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Masks for the strips' test set (good first, then test/defect, as load_set lists them), found as evaluate
    finds them: a missing mask is an error, not an all-good one."""
    out = np.zeros((len(paths), *size), bool)
    bad = [i for i, p in enumerate(paths) if p.parent.name != "good"]
    if bad:
        defect_dir = paths[bad[0]].parent
        out[bad] = load_masks(masks_dir, defect_dir, [paths[i].relative_to(defect_dir) for i in bad], size)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=["bottle", "elpv", "strips"], required=True)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--masks", type=Path, help="strips: <stem>_mask.png per defective test image")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, test_paths, labels, mask_root = load_set(args.set, args.data, None, None)
    teacher, _ = load_teacher("mobilenet_v2")
    for path in args.checkpoints:
        model = load_checkpoint(path, teacher)
        size = model.input_size
        d = level_distances(model, load_images(test_paths, size).images)
        masks = masks_for(mask_root, test_paths, size) if mask_root is not None else \
            strip_masks(args.masks, test_paths, size) if args.masks else None
        scorer = ImageScorer(model.blur_sigma, ScoreSpec(reduce="topk", topk=0.01))
        row: dict[str, object] = {"checkpoint": str(path), "input": f"{size[1]}x{size[0]}", "trained": model.levels}
        for k in range(1, len(model.levels) + 1):
            for sub in itertools.combinations(range(len(model.levels)), k):
                maps, scores = scorer(d[:, list(sub)].prod(1))
                r = {"image_auroc": round(image_auroc(labels, scores.numpy()), 4)}
                if masks is not None:
                    r["pixel_auroc"] = round(pixel_auroc(masks, maps.numpy()), 4)
                    r["pro"] = round(pro_auc(masks, maps.numpy()), 4)
                row["levels " + ",".join(str(model.levels[i]) for i in sub)] = r
        # mean distance per level on good and on defective test images: does the level see the defects at all?
        row["mean_distance_good_defect"] = {str(lv): [round(float(d[labels == y, i].mean()), 4) for y in (0, 1)]
                                            for i, lv in enumerate(model.levels)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
