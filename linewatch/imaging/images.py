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


def decode_image(data: bytes | np.ndarray) -> np.ndarray | None:
    """Encoded image bytes (PNG, JPEG, …) → RGB uint8, or None if they do not decode."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    if buf.size == 0:
        return None
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None
    return to_rgb8(img)


def read_image(path: str | os.PathLike) -> np.ndarray | None:
    """RGB uint8, or None if the file cannot be decoded (corrupt, truncated, not an image)."""
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    return decode_image(buf)


class JPEGHeaderError(DataError):
    """A blob with no JPEG frame header (SOF) before its image data: not a JPEG, or cut short."""


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic). Not C4 (DHT),
# C8 (reserved) or CC (DAC), which share the range.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn: markers without a length field


def jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, without decoding it: walks the marker segments from SOI
    to the first SOF (EXIF and other APPn segments are skipped by their length). Raises
    :class:`JPEGHeaderError` (one line) for a blob that is not a JPEG, is cut short before its SOF or
    declares an empty frame; a blob that passes can still fail to decode further on."""
    b = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        raise JPEGHeaderError(f"not a JPEG: a {n}-byte blob without the JPEG start marker")
    i = 2
    while i < n:
        if b[i] != 0xFF:
            raise JPEGHeaderError(f"not a valid JPEG: no marker at byte {i} of {n}")
        while i < n and b[i] == 0xFF:  # fill bytes may pad before a marker
            i += 1
        if i >= n:
            break
        marker = b[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan: the image data begins without a frame header
            raise JPEGHeaderError("not a valid JPEG: no frame header (SOF) before the image data")
        if i + 2 > n:
            break
        length = (b[i] << 8) | b[i + 1]
        if length < 2:
            raise JPEGHeaderError(f"not a valid JPEG: a segment of length {length} at byte {i}")
        if marker in _SOF_MARKERS:
            if i + 7 > n:
                break
            height = (b[i + 3] << 8) | b[i + 4]
            width = (b[i + 5] << 8) | b[i + 6]
            if width == 0 or height == 0:
                raise JPEGHeaderError(f"JPEG frame header declares a {width}x{height} image")
            return width, height
        i += length
    raise JPEGHeaderError(f"truncated JPEG: {n} bytes end before its frame header (SOF)")


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
