import numpy as np
import pytest

from linewatch.station.accuracy import binary_stats, image_auroc, pixel_auroc, pro_auc, pro_curve


def _brute_pro(masks, maps, limit=0.3, steps=4000):
    """Reference: sweep thresholds, compute FPR and mean per-region overlap, integrate."""
    import cv2

    regions = []
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [(i, lab == r) for r in range(1, n)]
    normal = ~masks.astype(bool)
    ths = np.unique(maps)[::-1]
    fprs, pros = [0.0], [0.0]
    for t in ths:
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[i][r].mean() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    x = np.linspace(0, limit, steps)
    return np.trapezoid(np.interp(x, fprs, pros), x) / limit


def test_pro_matches_a_brute_force_sweep():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:8, 2:8] = True
    masks[0, 15:20, 10:22] = True  # two regions in one image, different sizes
    masks[1, 5:6, 5:9] = True
    maps = rng.random((3, 24, 24))
    maps[masks] += rng.random(masks.sum()) * 0.8
    maps = np.round(maps, 2)  # ties, as real maps have
    assert pro_auc(masks, maps) == pytest.approx(_brute_pro(masks, maps), abs=2e-3)


def test_perfect_and_inverted_maps():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    good = masks.astype(float)
    assert pro_auc(masks, good) == pytest.approx(1.0)
    assert pixel_auroc(masks, good) == pytest.approx(1.0)
    assert pro_auc(masks, 1 - good) == pytest.approx(0.0, abs=1e-9)


def test_pro_weights_regions_equally_not_pixels():
    masks = np.zeros((1, 40, 40), bool)
    masks[0, 0:20, 0:20] = True  # big region: found
    masks[0, 30:32, 30:32] = True  # small region: missed
    maps = np.zeros((1, 40, 40))
    maps[0, 0:20, 0:20] = 1.0
    fpr, pro = pro_curve(masks, maps)
    # at the first threshold the big region is fully covered, the small one not: PRO = 0.5
    assert pro[1] == pytest.approx(0.5)
    assert fpr[1] == 0.0


def test_image_auroc_and_binary_stats():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert np.isnan(image_auroc([1, 1], [0.1, 0.2]))
    s = binary_stats([0, 0, 1, 1, 1], [1, 0, 1, 1, 0])
    assert s["tp"] == 2 and s["fp"] == 1 and s["fn"] == 1
    assert s["false_reject_rate"] == 0.5
    assert s["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
