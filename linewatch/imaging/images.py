"""Image folders and decoding: every image becomes RGB uint8, whatever it was on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from linewatch.errors import DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"image folder {d} does not exist or is not a directory")
    it = d.rglob("*") if recursive else d.iterdir()
    paths = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {d}")
    return paths


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """Grayscale, BGR, BGRA and 16-bit images → RGB uint8 (H,W,3)."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike) -> np.ndarray | None:
    """RGB uint8, or None if the file cannot be decoded (corrupt, truncated, not an image)."""
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if buf.size == 0:
        return None
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None
    return to_rgb8(img)


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (H, W); area interpolation when shrinking avoids aliasing."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_AREA if img.shape[0] > h or img.shape[1] > w else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


@dataclass
class ImageSet:
    images: np.ndarray  # (N,H,W,3) uint8 RGB at the requested size
    paths: list[Path]
    skipped: list[Path] = field(default_factory=list)


def load_images(paths: Iterable[Path], size: tuple[int, int], progress: bool = False) -> ImageSet:
    """Decode and resize once; unreadable files are skipped and listed, not fatal."""
    paths = list(paths)
    if progress:
        from tqdm import tqdm

        paths_iter = tqdm(paths, desc="loading images", unit="img", leave=False)
    else:
        paths_iter = paths
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    kept: list[Path] = []
    skipped: list[Path] = []
    for p in paths_iter:
        img = read_image(p)
        if img is None:
            skipped.append(p)
            continue
        out[len(kept)] = resize(img, size)
        kept.append(p)
    return ImageSet(images=out[: len(kept)], paths=kept, skipped=skipped)


def grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img


def sharpness(img: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: falls when the image is out of focus or smeared.
    Calibration stores the good parts' median so the daemon can tell a blurred camera."""
    return float(cv2.Laplacian(grey(img), cv2.CV_32F).var())
