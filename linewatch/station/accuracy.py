"""Image- and pixel-level anomaly-detection metrics, computed the standard (MVTec AD) way."""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")  # AUROC needs both classes
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    return image_auroc(np.asarray(masks).reshape(-1), np.asarray(maps).reshape(-1))


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected defect regions (8-connectivity, as MVTec's reference code) with globally unique ids.
    Returns (labels (N,H,W) int32, 0 = defect-free; sizes[id] = pixel count, sizes[0] unused)."""
    labels = np.zeros(masks.shape, dtype=np.int32)
    sizes = [0]
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        if n > 1:
            offset = len(sizes) - 1
            labels[i] = np.where(lab > 0, lab + offset, 0)
            sizes.extend(np.bincount(lab.ravel(), minlength=n)[1:].tolist())
    return labels, np.asarray(sizes, dtype=np.float64)


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, from high to low.

    PRO(t) is the mean over all ground-truth regions of the fraction of the region scoring above t;
    FPR(t) the fraction of defect-free pixels above t. One sort and two cumulative sums give both
    exactly at every threshold (no binning).
    """
    labels, sizes = label_regions(np.asarray(masks).astype(bool))
    n_regions = len(sizes) - 1
    scores = np.asarray(maps, dtype=np.float64).reshape(-1)
    lab = labels.reshape(-1)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    lab = lab[order]
    normal = lab == 0
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("PRO needs defect regions and defect-free pixels")
    fpr = np.cumsum(normal, dtype=np.float64) / n_normal
    w = np.zeros_like(s)
    w[~normal] = 1.0 / (sizes[lab[~normal]] * n_regions)
    pro = np.cumsum(w)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    return np.r_[0.0, fpr[last_of_tie]], np.r_[0.0, pro[last_of_tie]]


def pro_auc(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (so 1.0 is perfect)."""
    fpr, pro = pro_curve(masks, maps)
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:i], pro[:i]
    if i < len(fpr) and x[-1] < fpr_limit:
        # close the curve exactly at the limit by linear interpolation between its neighbours
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / fpr_limit)


def binary_stats(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 and false-reject rate (good parts predicted defective)."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    tp = int((labels & predicted).sum())
    fp = int((~labels & predicted).sum())
    fn = int((labels & ~predicted).sum())
    n_good = int((~labels).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1,
            "false_reject_rate": fp / n_good if n_good else float("nan"), "tp": tp, "fp": fp, "fn": fn}
