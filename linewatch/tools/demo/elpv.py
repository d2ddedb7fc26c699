"""The ELPV solar-cell electroluminescence dataset (Buerhop-Lutz et al. 2018; Deitsch et al. 2019),
2,624 labelled 300×300 cells, CC BY-NC-SA 4.0, fetched from the PyPI wheel ``elpv-dataset``.

We use only monocrystalline cells: good ones (defect probability 0) to calibrate, and held-out
good ones plus certainly-defective ones (probability 1) to stream.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linewatch.errors import DataError
from linewatch.wheels import download_wheel

WHEEL = "elpv-dataset==1.0.0.post1"
LICENCE = ("ELPV dataset: Buerhop-Lutz et al. 2018, Deitsch et al. 2019 — "
           "CC BY-NC-SA 4.0 (non-commercial, share alike); fetched from the PyPI wheel elpv-dataset")


def fetch(cache: Path) -> Path:
    """Download and unpack the wheel once; returns the folder holding labels.csv and images/."""
    data = cache / "elpv_dataset" / "data"
    if (data / "labels.csv").is_file():
        return data
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="elpv-", dir=cache) as tmp:
        wheel = download_wheel(WHEEL, Path(tmp), timeout_s=900, error=DataError)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith("elpv_dataset/data/") or "LICENSE" in m]
            zf.extractall(cache, members=members)
    if not (data / "labels.csv").is_file():
        raise DataError(f"{WHEEL} did not contain elpv_dataset/data/labels.csv")
    return data


@dataclass
class Split:
    normal: list[Path]  # good mono cells to calibrate on
    stream: list[tuple[Path, int]]  # (cell, 1 if defective) in streaming order


def split(data: Path, train_fraction: float = 0.7, seed: int = 0, limit: int | None = None) -> Split:
    good, bad = [], []
    with open(data / "labels.csv") as f:
        for row in csv.reader(f, delimiter=" ", skipinitialspace=True):
            if len(row) < 3:
                continue
            path, prob, kind = row[0], float(row[1]), row[2]
            if kind != "mono":
                continue
            if prob == 0.0:
                good.append(data / path)
            elif prob == 1.0:
                bad.append(data / path)
    rng = np.random.default_rng(seed)
    good = [good[i] for i in rng.permutation(len(good))]
    n_train = int(round(len(good) * train_fraction))
    normal, held_out = good[:n_train], good[n_train:]
    if limit:  # quick mode for tests
        normal, held_out, bad = normal[:limit], held_out[: limit // 3], bad[: limit // 3]
    stream = [(p, 0) for p in held_out] + [(p, 1) for p in bad]
    stream = [stream[i] for i in rng.permutation(len(stream))]
    return Split(normal=normal, stream=stream)


def materialise(s: Split, out: Path) -> tuple[Path, Path, dict[str, int]]:
    """Folders of symlinks (no copies): normal/ and stream/ (named in streaming order). Returns the two
    folders and {stream file name: label}."""
    normal_dir, stream_dir = out / "normal", out / "stream"
    labels: dict[str, int] = {}
    for d in (normal_dir, stream_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
    for p in s.normal:
        os.symlink(p.resolve(), normal_dir / p.name)
    for i, (p, y) in enumerate(s.stream):
        name = f"{i:04d}_{'defect' if y else 'good'}_{p.name}"
        os.symlink(p.resolve(), stream_dir / name)
        labels[name] = y
    (out / "stream_labels.json").write_text(json.dumps(labels, indent=0))
    return normal_dir, stream_dir, labels
