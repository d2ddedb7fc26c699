"""What an engineer looks at: the part, a heatmap of the anomaly map, the defect outline, the verdict."""

from __future__ import annotations

import cv2
import numpy as np


def upsample_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anomaly map (h,w) → frame size (H,W), bilinear."""
    h, w = size
    if amap.shape == (h, w):
        return amap.astype(np.float32, copy=False)
    return cv2.resize(amap.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR)


def overlay(image_rgb: np.ndarray, amap: np.ndarray, image_threshold: float, pixel_threshold: float,
            verdict: str, score: float) -> np.ndarray:
    """RGB overlay at the image's own resolution. Colours: the map scaled so the image threshold sits
    mid-scale (blue = normal, red = twice the threshold or more); defect outline in red."""
    h, w = image_rgb.shape[:2]
    m = upsample_map(amap, (h, w))
    norm = np.clip(m / (2.0 * image_threshold), 0.0, 1.0) if image_threshold > 0 else np.zeros_like(m)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(bgr, 0.6, heat, 0.4, 0)
    mask = (m > pixel_threshold).astype(np.uint8)
    if verdict == "fail" and mask.any():
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 0, 255), max(1, round(min(h, w) / 200)))
    scale = max(0.5, min(h, w) / 600)
    label = f"{verdict.upper()}  score {score:.4g}  thr {image_threshold:.4g}"
    colour = (0, 0, 255) if verdict == "fail" else (0, 160, 0)
    (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    cv2.rectangle(out, (0, 0), (tw + 12, th + base + 12), (255, 255, 255), -1)
    cv2.putText(out, label, (6, th + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 2, cv2.LINE_AA)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def defect_mask(amap: np.ndarray, pixel_threshold: float, size: tuple[int, int]) -> np.ndarray:
    """Binary uint8 mask (0/255) at frame size (H,W)."""
    return ((upsample_map(amap, size) > pixel_threshold) * 255).astype(np.uint8)


def write_png(path, rgb_or_gray: np.ndarray) -> None:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
