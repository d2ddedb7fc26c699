"""`linewatch infer`: verdicts, scores and overlay PNGs for a handful of image files."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from linewatch.errors import DataError
from linewatch.imaging.images import list_images, read_image, resize
from linewatch.imaging.overlays import defect_mask, overlay, write_png
from linewatch.model.detector import Detector

log = structlog.get_logger("linewatch.station.infer")


@dataclass
class InferResult:
    file: str
    verdict: str
    score: float
    threshold: float
    p_value: float
    defect_area_px: int
    overlay: str
    mask: str


def expand_inputs(items: list[str | os.PathLike]) -> list[Path]:
    paths: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            paths.extend(list_images(p))
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{p} does not exist")
    if not paths:
        raise DataError("no input images given")
    return paths


def _unique_name(path: Path, used: set[str]) -> str:
    """MVTec-style trees repeat file names across folders (good/000.png, broken/000.png)."""
    name = f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
    base, i = name, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def infer_files(detector: Detector, items: list[str | os.PathLike], out_dir: str | os.PathLike
                ) -> tuple[list[InferResult], list[Path]]:
    """One image at a time: each is shown at its own resolution, so nothing is gained by batching here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cal = detector.calibration
    results: list[InferResult] = []
    skipped: list[Path] = []
    used: set[str] = set()
    for path in expand_inputs(items):
        img = read_image(path)
        if img is None:
            log.warning("image_unreadable", file=str(path), action="skipped")
            skipped.append(path)
            continue
        x = torch.from_numpy(resize(img, detector.input_size)[None])
        pred = detector.predict(x)
        score = float(pred.scores[0])
        amap = pred.maps[0].numpy()
        verdict = "fail" if cal.is_fail(score) else "pass"
        mask = defect_mask(amap, cal.pixel_threshold, img.shape[:2]) if verdict == "fail" else \
            np.zeros(img.shape[:2], np.uint8)
        name = _unique_name(path, used)
        ov_path = out / f"{name}_overlay.png"
        mask_path = out / f"{name}_mask.png"
        write_png(ov_path, overlay(img, amap, cal.image_threshold, cal.pixel_threshold, verdict, score))
        write_png(mask_path, mask)
        results.append(InferResult(str(path), verdict, score, cal.image_threshold, cal.p_value(score),
                                   int((mask > 0).sum()), str(ov_path), str(mask_path)))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(InferResult.__dataclass_fields__))
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results, skipped
