"""STFPM model: backbones, the teacher–student network, the bundle file, the loaded detector and its
inference engines (:mod:`linewatch.model.engines`)."""

from linewatch.model.bundle import BundleMeta, Calibration, load_bundle, save_bundle
from linewatch.model.detector import Detector, Prediction, load_detector, resolve_device
from linewatch.model.stfpm import STFPM

__all__ = [
    "STFPM", "BundleMeta", "Calibration", "Detector", "Prediction",
    "load_bundle", "load_detector", "resolve_device", "save_bundle",
]
