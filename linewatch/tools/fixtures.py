"""Small model bundles for tests and benchmarks (not for production use)."""

from __future__ import annotations

import os
from pathlib import Path

from linewatch.station.calibration import CalibrateOptions, calibrate_station
from linewatch.station.training import TrainConfig


def make_untrained_bundle(path: str | os.PathLike, bottle: Path, input_size: tuple[int, int] = (64, 64),
                          backbone: str = "mobilenet_v2", stages: tuple[int, ...] | None = None,
                          score_stages: tuple[int, ...] | None = None) -> Path:
    """Random student (0 epochs), thresholds from 8 good bottle images: fast, for plumbing tests."""
    opts = CalibrateOptions(
        backbone=backbone, input_size=input_size, stages=stages, score_stages=score_stages, val_fraction=0.0,
        cal_fraction=0.5, device="cpu",
        train=TrainConfig(max_epochs=0), max_images=16, progress=False,
    )
    calibrate_station(bottle / "train" / "good", path, opts)
    return Path(path)


def make_trained_bundle(path: str | os.PathLike, bottle: Path, input_size: tuple[int, int] = (128, 128),
                        epochs: int = 8, max_images: int = 96, backbone: str = "mobilenet_v2") -> Path:
    """A few epochs on a subset of good bottles: separates bottle defects from good parts well enough
    for end-to-end tests (seconds, not minutes, on two cores)."""
    opts = CalibrateOptions(
        backbone=backbone, input_size=input_size, val_fraction=0.1, cal_fraction=0.25, device="cpu",
        train=TrainConfig(max_epochs=epochs, batch_size=16, patience=epochs), max_images=max_images,
        progress=False,
    )
    calibrate_station(bottle / "train" / "good", path, opts)
    return Path(path)
