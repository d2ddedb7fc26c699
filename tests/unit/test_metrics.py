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


# --------------------------------------------------------------------------- the daemon's Prometheus metrics
# (linewatch.service.telemetry.prometheus; the accuracy metrics above are linewatch.station.accuracy)


def _exposition(m) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_verdicts_are_counted_under_the_new_name_and_the_deprecated_alias():
    from linewatch.service.telemetry.prometheus import Metrics

    m = Metrics()
    m.init_cameras(["a", "b"])
    m.verdicts.labels("a", "pass").inc(3)
    m.verdicts.labels("a", "fail").inc()
    m.verdicts.labels("b", "pass").inc(2)
    get = m.registry.get_sample_value
    for name in ("linewatch_verdicts_total", "linewatch_frames_total"):
        assert get(name, {"camera": "a", "verdict": "pass"}) == 3
        assert get(name, {"camera": "a", "verdict": "fail"}) == 1
        assert get(name, {"camera": "b", "verdict": "pass"}) == 2
        assert get(name, {"camera": "b", "verdict": "fail"}) == 0  # pre-created: dashboards see 0, not no data
    text = _exposition(m)
    assert "# HELP linewatch_frames_total DEPRECATED: use linewatch_verdicts_total" in text
    assert "# TYPE linewatch_frames_total counter" in text
    assert "# TYPE linewatch_verdicts_total counter" in text
    # exactly one series per label set under each name; no *_created twin
    assert text.count('linewatch_frames_total{camera="a",verdict="pass"} 3.0') == 1
    assert "linewatch_frames_created" not in text and "linewatch_verdicts_created" not in text
    # what the daemon's status line and heartbeat sum up
    assert m.total(m.verdicts) == 6
    assert m.by_label(m.verdicts, "verdict") == {"pass": 5, "fail": 1}
    assert not hasattr(m, "frames")


def test_the_alias_follows_the_counter_without_being_incremented_itself():
    """The hot path increments one counter; the alias reads it only when /metrics is collected."""
    from linewatch.service.telemetry.prometheus import Metrics

    m = Metrics()
    assert m.registry.get_sample_value("linewatch_frames_total", {"camera": "x", "verdict": "fail"}) is None
    m.verdicts.labels("x", "fail").inc(5)
    assert m.registry.get_sample_value("linewatch_frames_total", {"camera": "x", "verdict": "fail"}) == 5
    m.verdicts.labels("x", "fail").inc(2)
    assert m.registry.get_sample_value("linewatch_frames_total", {"camera": "x", "verdict": "fail"}) == 7


def test_registries_are_independent_and_the_old_name_cannot_be_claimed_twice():
    from prometheus_client import Counter

    from linewatch.service.telemetry.prometheus import DeprecatedCounterAlias, Metrics

    one, two = Metrics(), Metrics()
    one.verdicts.labels("c", "pass").inc()
    assert two.registry.get_sample_value("linewatch_frames_total", {"camera": "c", "verdict": "pass"}) is None
    with pytest.raises(ValueError, match="linewatch_frames"):
        Counter("linewatch_frames", "clash", ["camera", "verdict"], registry=one.registry)
    with pytest.raises(ValueError, match="linewatch_frames"):
        DeprecatedCounterAlias(one.verdicts, "linewatch_frames", one.registry)


def test_process_series_and_model_info_are_exported():
    from linewatch.service.telemetry.prometheus import MODEL_INFO_KEYS, Metrics

    m = Metrics()
    m.set_model(backbone="mobilenet_v2", model_id="abc", input_size=(256, 192), device="cpu", image_threshold=0.5,
                pixel_threshold=0.25)
    info = {"backbone": "mobilenet_v2", "model_id": "abc", "input_size": "256x192", "device": "cpu"}
    assert set(info) == set(MODEL_INFO_KEYS)
    assert m.registry.get_sample_value("linewatch_model_info", info) == 1
    assert m.registry.get_sample_value("linewatch_threshold", {"kind": "pixel"}) == 0.25
    assert m.registry.get_sample_value("process_resident_memory_bytes") > 0
    assert m.registry.get_sample_value("process_open_fds") > 0
