import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linewatch.model.bundle import Calibration
from linewatch.station.calibration import conformal_threshold, fit_calibration, min_calibration_size

scores_st = st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=300)
alpha_st = st.floats(min_value=1e-4, max_value=0.5)


@given(scores_st, alpha_st)
@settings(max_examples=300, deadline=None)
def test_conformal_threshold_is_the_right_order_statistic(scores, alpha):
    ct = conformal_threshold(scores, alpha)
    n = len(scores)
    s = sorted(scores)
    k = min(math.ceil((n + 1) * (1 - alpha) - 1e-9), n)
    assert ct.k == k and ct.n == n
    assert ct.threshold == s[k - 1]
    assert ct.bound == pytest.approx(1 - k / (n + 1))
    # at most n-k calibration scores lie strictly above the threshold
    assert sum(x > ct.threshold for x in scores) <= n - k
    if n >= min_calibration_size(alpha):
        assert ct.warning is None and ct.bound <= alpha + 1e-12
    else:
        assert ct.warning is not None and ct.k == n


def test_conformal_guarantee_holds_on_average():
    """Uniform scores: P(new good part > threshold) = 1 − s_(k); its mean over many draws is 1 − k/(n+1) ≤ α."""
    rng = np.random.default_rng(0)
    n, alpha = 399, 0.02
    rates = []
    for _ in range(4000):
        ct = conformal_threshold(rng.random(n), alpha)
        rates.append(1 - ct.threshold)
    assert ct.bound <= alpha + 1e-12
    assert np.mean(rates) == pytest.approx(ct.bound, abs=0.0015)
    assert np.mean(rates) <= alpha + 0.0015


def test_small_calibration_set_warns_and_uses_the_max():
    ct = conformal_threshold([3.0, 1.0, 2.0], 0.005)
    assert ct.threshold == 3.0 and ct.warning and "199" in ct.warning
    assert ct.bound == pytest.approx(0.25)


@given(scores_st, st.floats(min_value=-2e6, max_value=2e6, allow_nan=False))
@settings(max_examples=200, deadline=None)
def test_p_value_is_a_valid_conformal_p_value(scores, score):
    cal = Calibration(image_threshold=0, pixel_threshold=0, alpha=0.1, false_reject_bound=0.1, scores=sorted(scores))
    p = cal.p_value(score)
    n = len(scores)
    assert 1 / (n + 1) <= p <= 1
    assert p == pytest.approx((1 + sum(x >= score for x in scores)) / (n + 1))


def test_fit_calibration_pixel_threshold_never_exceeds_image_threshold():
    rng = np.random.default_rng(1)
    maps = rng.random((10, 16, 16)).astype(np.float32)
    scores = maps.reshape(10, -1).max(1)
    cal, ct = fit_calibration(scores, maps, alpha=0.1, pixel_alpha=1e-3)
    assert cal.pixel_threshold <= cal.image_threshold
    assert cal.scores == sorted(cal.scores) and len(cal.scores) == 10
    assert cal.stats["median"] == pytest.approx(float(np.median(scores)))


def test_a_score_from_other_levels_leaves_the_pixel_threshold_at_the_good_pixels_quantile():
    """A split score (e.g. levels 2·3·4 against a 2·3 map) is on another scale: capping the pixel threshold at
    the image threshold would light up most good pixels."""
    rng = np.random.default_rng(1)
    maps = rng.random((10, 16, 16)).astype(np.float32)
    scores = maps.reshape(10, -1).max(1) * 0.05  # a smaller scale, as a product with one more level has
    quantile = float(np.quantile(maps, 1 - 1e-3))
    capped, _ = fit_calibration(scores, maps, alpha=0.1, pixel_alpha=1e-3)
    split, _ = fit_calibration(scores, maps, alpha=0.1, pixel_alpha=1e-3, score_from_map=False)
    assert capped.pixel_threshold == capped.image_threshold < quantile
    assert split.pixel_threshold == pytest.approx(quantile) and split.image_threshold == capped.image_threshold


def test_a_calibration_image_far_above_the_others_is_named():
    """One odd 'good' image (50× the median) sets the threshold when n is small: recall collapses (ELPV, seed 1:
    recall 0.105). calibrate names it so the engineer can look; a skewed but clean sample gives no warning."""
    from linewatch.station.calibration import score_outliers

    rng = np.random.default_rng(0)
    clean = np.exp(rng.normal(np.log(0.01), 0.4, 81))
    assert score_outliers(clean, [f"{i}.png" for i in range(81)], float(clean.max())) == []
    scores = np.r_[clean, 0.5]
    names = [f"{i}.png" for i in range(82)]
    cal, _ = fit_calibration(scores, np.zeros((82, 2, 2), np.float32), alpha=0.005, pixel_alpha=1e-3)
    (odd,) = score_outliers(scores, names, cal.image_threshold)
    assert odd.name == "81.png" and odd.score == 0.5 and odd.sets_threshold and odd.why.startswith("far above")
    # not beyond the fence, but the threshold rests on it alone: 2.5× the next-highest score (ELPV levels 2,3,
    # seed 1: 0.382 against 0.180, recall 0.208)
    gap = np.r_[clean, 2.5 * clean.max()]
    (alone,) = score_outliers(gap, names, float(gap.max()))
    assert alone.name == "81.png" and alone.why.startswith("2.5× the next-highest") and alone.sets_threshold
    assert score_outliers(gap, names, float(np.sort(gap)[-2])) == []  # a larger n: it does not set the threshold
    # normalised scores can be negative: the fence is then on the scores themselves
    z = np.r_[rng.normal(0, 1, 40), 40.0]
    assert [o.name for o in score_outliers(z, [str(i) for i in range(41)], 40.0)] == ["40"]
    assert score_outliers(scores[:5], names[:5], 1.0) == []  # too few to tell
