"""The calibration report: one HTML page (PNG figures inline) that an engineer reads before trusting a station.

* the calibration images' score histogram with the image threshold: a threshold far out in the tail of a
  wide histogram, or a second hump, says the good parts are not alike (mixed framing, lighting, parts);
* the worst-scoring good images with their heatmaps: what the model finds unusual in good parts
  (a fixed hot spot, a background edge, a mis-framed image that slipped into the folder);
* the training curves (train and validation loss per epoch): not converged, or over-fitting. A thresholds-only
  re-fit (``calibrate --thresholds-only``) trains nothing, and the bundle keeps only a summary of its original
  training (epochs, best epoch, validation loss; not the per-epoch losses): the page says so and gives that summary.

Figures are drawn with OpenCV (no plotting library in the dependencies); the page has no external links.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linewatch.imaging.overlays import overlay

WORST_N = 6
_W, _H = 640, 300  # figure size in pixels
_MARGIN = (60, 20, 20, 40)  # left, top, right, bottom


@dataclass
class ReportInputs:
    model: str
    image_threshold: float
    pixel_threshold: float
    alpha: float
    false_reject_bound: float
    scores: np.ndarray  # calibration image scores
    names: Sequence[str]  # the calibration images' file names (same order as scores)
    images: np.ndarray  # (N,H,W,3) uint8 calibration images at model/frame size
    maps: np.ndarray  # (N,h,w) their anomaly maps
    history: list[dict[str, float]]  # per epoch: epoch, loss, val_loss (empty: thresholds-only re-fit)
    summary: dict[str, Any]  # extra rows for the summary table (split sizes, framing, …)
    # the bundle's training record (BundleMeta.training): with "recalibrated" (a thresholds-only re-fit) the
    # page names the re-fit and the original training instead of curves
    training: dict[str, Any] | None = None


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, int | float) and math.isfinite(v) else "?"


def no_training_note(training: dict[str, Any] | None) -> str:
    """The Training section of a page without curves: what was re-fitted, and what the weights come from, as far
    as the bundle's training record tells."""
    t = training or {}
    refit = t.get("recalibrated") if isinstance(t.get("recalibrated"), dict) else None
    if refit is None:
        return "No training in this run (thresholds only)."
    text = (f"No training in this run: thresholds refitted on {refit.get('at', '?')} from {refit.get('n_cal', '?')} "
            f"images ({refit.get('normal_dir', '?')}); the weights are unchanged. ")
    if t.get("epochs_run") == 0:
        text += (f"They come from the original calibration ({t.get('created', 'date unknown')}), which trained no "
                 "epochs (a random student): there are no training curves.")
    elif "epochs_run" in t:
        text += (f"They come from the original calibration ({t.get('created', 'date unknown')}: "
                 f"{t.get('epochs_run')} epochs, best epoch {t.get('best_epoch', '?')}, validation loss "
                 f"{_num(t.get('best_val_loss'), '.4f')}, on {t.get('n_train', '?')} images of "
                 f"{t.get('normal_dir', '?')}). The bundle keeps that summary, not the per-epoch losses: the "
                 "training curves are in the original calibration's report.")
    else:
        text += "The bundle records nothing of how its weights were trained."
    return text


def _png(img_rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError("could not encode a report figure")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _canvas() -> np.ndarray:
    return np.full((_H, _W, 3), 255, np.uint8)


def _text(img: np.ndarray, s: str, x: int, y: int, colour=(60, 60, 60), scale: float = 0.4) -> None:
    cv2.putText(img, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _frame(img: np.ndarray, xlabel: str, ylabel: str, x_range: tuple[float, float],
           y_range: tuple[float, float]) -> tuple[Callable[[float], int], Callable[[float], int]]:
    """Axes box with end labels; returns (x → px, y → px)."""
    left, top, right, bottom = _MARGIN
    x0, x1 = left, _W - right
    y0, y1 = _H - bottom, top
    cv2.rectangle(img, (x0, y1), (x1, y0), (150, 150, 150), 1)
    lo, hi = x_range
    ylo, yhi = y_range
    span, yspan = (hi - lo) or 1.0, (yhi - ylo) or 1.0

    def fx(v: float) -> int:
        return int(round(x0 + (v - lo) / span * (x1 - x0)))

    def fy(v: float) -> int:
        return int(round(y0 - (v - ylo) / yspan * (y0 - y1)))

    _text(img, f"{lo:.4g}", x0, y0 + 14)
    _text(img, f"{hi:.4g}", x1 - 40, y0 + 14)
    _text(img, xlabel, (x0 + x1) // 2 - 30, y0 + 30)
    _text(img, f"{yhi:.4g}", 4, y1 + 10)
    _text(img, f"{ylo:.4g}", 4, y0)
    _text(img, ylabel, 4, (y0 + y1) // 2)
    return fx, fy


def histogram_figure(scores: np.ndarray, threshold: float, bins: int = 30) -> np.ndarray:
    """Score histogram (grey bars) with the image threshold (red line)."""
    img = _canvas()
    s = np.asarray(scores, dtype=np.float64)
    lo = float(min(s.min(), threshold))
    hi = float(max(s.max(), threshold))
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
    fx, fy = _frame(img, "image score", "images", (lo, hi), (0, float(max(counts.max(), 1))))
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if c:
            cv2.rectangle(img, (fx(a) + 1, fy(c)), (fx(b) - 1, fy(0)), (120, 120, 120), -1)
    x = fx(threshold)
    cv2.line(img, (x, _MARGIN[1]), (x, _H - _MARGIN[3]), (220, 0, 0), 2)
    _text(img, f"threshold {threshold:.4g}", min(x + 4, _W - 140), _MARGIN[1] + 12, (220, 0, 0))
    return img


def curves_figure(history: list[dict[str, float]]) -> np.ndarray | None:
    """Train (blue) and validation (orange) loss per epoch; None without epochs."""
    rows = [r for r in history if math.isfinite(r.get("loss", math.nan))]
    if not rows:
        return None
    img = _canvas()
    epochs = [float(r["epoch"]) for r in rows]
    series = {"train loss": ([r["loss"] for r in rows], (40, 90, 200)),
              "validation loss": ([r.get("val_loss", math.nan) for r in rows], (230, 130, 20))}
    values = [v for vals, _ in series.values() for v in vals if math.isfinite(v)]
    fx, fy = _frame(img, "epoch", "loss", (min(epochs), max(epochs) if len(epochs) > 1 else min(epochs) + 1),
                    (min(values), max(values)))
    for i, (label, (vals, colour)) in enumerate(series.items()):
        pts = [(fx(e), fy(v)) for e, v in zip(epochs, vals, strict=True) if math.isfinite(v)]
        if len(pts) > 1:
            cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 3, colour, -1)
        _text(img, label, _W - 170, _MARGIN[1] + 14 + 14 * i, colour)
    return img


def write_report(path: str | os.PathLike, r: ReportInputs, worst_n: int = WORST_N) -> Path:
    """Write the page; returns its path."""
    path = Path(path)
    scores = np.asarray(r.scores, dtype=np.float64)
    order = np.argsort(-scores)[:worst_n]
    n = len(scores)
    above = int((scores > r.image_threshold).sum())
    esc = html.escape
    rows = {
        "model": r.model,
        "image threshold": f"{r.image_threshold:.6g}",
        "pixel threshold": f"{r.pixel_threshold:.6g}",
        "false-reject rate": f"target {r.alpha:g}, guaranteed ≤ {r.false_reject_bound:.4f}",
        "calibration images": f"{n} ({above} above the threshold)",
        **{k: str(v) for k, v in r.summary.items()},
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>linewatch calibration report</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}td,th{padding:2px 10px;text-align:left}"
        "figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:12px;max-width:320px}"
        "img.t{max-width:320px;max-height:320px}</style></head><body>",
        "<h1>Calibration report</h1><table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows.items()),
        "</table>",
        "<h2>Calibration scores</h2><p>Held-out good images; a part fails when its score is above the red line. "
        "A wide or two-humped histogram means the good parts are not alike.</p>",
        f"<img alt='score histogram' src='data:image/png;base64,{_png(histogram_figure(scores, r.image_threshold))}'>",
        f"<h2>The {len(order)} worst-scoring good images</h2><p>What the model finds most unusual in good parts: "
        "a fixed hot spot, a background edge or a mis-framed image is worth fixing before going live.</p>",
    ]
    for i in order:
        verdict = "fail" if scores[i] > r.image_threshold else "pass"
        ov = overlay(r.images[i], r.maps[i], r.image_threshold, r.pixel_threshold, verdict, float(scores[i]))
        name = r.names[i] if i < len(r.names) else f"#{i}"
        parts.append(f"<figure><img class='t' alt='{esc(name)}' src='data:image/png;base64,{_png(ov)}'>"
                     f"<figcaption>{esc(name)}: score {scores[i]:.5g}</figcaption></figure>")
    curves = curves_figure(r.history)
    parts.append("<h2>Training</h2>")
    if curves is None:
        parts.append(f"<p>{esc(no_training_note(r.training))}</p>")
    else:
        parts.append("<p>Loss per epoch; the kept checkpoint is listed above. A validation loss still falling at "
                     "the end means more epochs may help; one rising while the train loss falls, over-fitting.</p>"
                     f"<img alt='training curves' src='data:image/png;base64,{_png(curves)}'>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def report_path_for(model_out: str | os.PathLike) -> Path:
    """``<out>.report.html`` beside the bundle."""
    p = Path(model_out)
    return p.with_name(p.name + ".report.html")
