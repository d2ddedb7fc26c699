"""Synthetic anomalies pasted into good images: a stand-in for real defects when choosing a checkpoint.

Training sees only good parts, so "lowest validation loss" rewards a student that copies the teacher
everywhere, defects included (on ELPV cells: 0.860 image AUROC at 40 epochs against 0.895 at 12). What we
want is the epoch whose scores separate anomalies from good parts best; with no real defects at hand we
make some from the held-out good images:

* ``cutpaste``: a patch of the image copied elsewhere, flipped (Li et al., CutPaste, 2021),
* ``noise``: an elliptic region blended with coloured noise,
* ``scratch``: a thin (1–3 px) bright or dark polyline, like a crack or a scratch.

Every generator is deterministic given its ``numpy.random.Generator`` and returns the changed image and
the mask of the pixels it changed.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Generator = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _patch_size(h: int, w: int, rng: np.random.Generator, lo: float = 0.06, hi: float = 0.15) -> tuple[int, int]:
    s = float(rng.uniform(lo, hi))
    ph = max(2, int(round(h * s * float(rng.uniform(0.6, 1.4)))))
    pw = max(2, int(round(w * s * float(rng.uniform(0.6, 1.4)))))
    return min(ph, h // 2), min(pw, w // 2)


def cutpaste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copy a patch to another place (flipped, so it never lands exactly on an identical texture)."""
    h, w = img.shape[:2]
    ph, pw = _patch_size(h, w, rng)
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    for _ in range(10):  # a destination away from the source: pasting onto itself changes nothing
        dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if abs(dy - sy) >= ph or abs(dx - sx) >= pw:
            break
    patch = img[sy:sy + ph, sx:sx + pw][::-1, ::-1].copy()
    out = img.copy()
    out[dy:dy + ph, dx:dx + pw] = patch
    mask = np.zeros((h, w), bool)
    mask[dy:dy + ph, dx:dx + pw] = True
    return out, mask & np.any(out != img, axis=-1)


def noise_blend(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse of the image blended half-and-half with uniform noise."""
    h, w = img.shape[:2]
    ph, pw = _patch_size(h, w, rng)
    cy, cx = int(rng.integers(ph // 2, h - ph // 2)), int(rng.integers(pw // 2, w - pw // 2))
    region = np.zeros((h, w), np.uint8)
    cv2.ellipse(region, (cx, cy), (max(1, pw // 2), max(1, ph // 2)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    noise = rng.integers(0, 256, img.shape, dtype=np.uint8)
    blended = (0.5 * img.astype(np.float32) + 0.5 * noise.astype(np.float32)).round().astype(np.uint8)
    sel = region.astype(bool)
    out = img.copy()
    out[sel] = blended[sel]
    return out, sel & np.any(out != img, axis=-1)


def scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin polyline (3–5 segments, 1–3 px wide), much brighter or darker than what it crosses."""
    h, w = img.shape[:2]
    n = int(rng.integers(3, 6))
    length = float(rng.uniform(0.15, 0.4)) * min(h, w)
    y, x = float(rng.uniform(0.2, 0.8)) * h, float(rng.uniform(0.2, 0.8)) * w
    angle = float(rng.uniform(0, 2 * np.pi))
    pts = [(x, y)]
    for _ in range(n):
        angle += float(rng.normal(0, 0.4))
        x = float(np.clip(x + np.cos(angle) * length / n, 0, w - 1))
        y = float(np.clip(y + np.sin(angle) * length / n, 0, h - 1))
        pts.append((x, y))
    region = np.zeros((h, w), np.uint8)
    thickness = int(rng.integers(1, 4))
    cv2.polylines(region, [np.round(np.array(pts)).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
    sel = region.astype(bool)
    mean = float(img[sel].mean()) if sel.any() else 128.0
    value = 0.0 if mean > 127 else 255.0  # the opposite end of the range from what it crosses
    out = img.copy()
    out[sel] = np.round(0.25 * img[sel].astype(np.float32) + 0.75 * value).astype(np.uint8)
    return out, sel & np.any(out != img, axis=-1)


GENERATORS: dict[str, Generator] = {"cutpaste": cutpaste, "noise": noise_blend, "scratch": scratch}


def make_anomalies(images: np.ndarray, seed: int = 0, kinds: tuple[str, ...] = tuple(GENERATORS)
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One anomalous copy of each (N,H,W,3) uint8 image, the kinds taken in turn. Returns (images, masks (N,H,W)
    bool, kind of each). Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    masks = np.zeros(images.shape[:3], bool)
    names: list[str] = []
    for i, img in enumerate(images):
        kind = kinds[i % len(kinds)]
        out[i], masks[i] = GENERATORS[kind](img, rng)
        names.append(kind)
    return out, masks, names
