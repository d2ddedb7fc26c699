"""Synthetic anomalies (deterministic, change the image exactly where their mask says) and checkpoint selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linewatch.station.synthetic import GENERATORS, make_anomalies
from linewatch.station.training import TrainConfig, is_better, select_checkpoint


def _images(n: int = 6, h: int = 64, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(3)
    base = np.linspace(60, 200, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    return np.stack([(base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8) for _ in range(n)])


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_each_generator_changes_the_image_exactly_where_its_mask_says(kind):
    img = _images(1)[0]
    out, mask = GENERATORS[kind](img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8 and mask.shape == img.shape[:2]
    changed = np.any(out != img, axis=-1)
    assert mask.any()
    np.testing.assert_array_equal(changed, mask)
    assert mask.mean() < 0.25  # a local anomaly, not a new image
    assert np.array_equal(img, _images(1)[0])  # the input is not modified


def test_make_anomalies_is_deterministic_for_a_seed_and_cycles_the_kinds():
    imgs = _images()
    a, ma, ka = make_anomalies(imgs, seed=5)
    b, mb, _ = make_anomalies(imgs, seed=5)
    c, _, _ = make_anomalies(imgs, seed=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(a, c)
    assert ka == ["cutpaste", "noise", "scratch"] * 2
    assert all(np.any(a[i] != imgs[i]) for i in range(len(imgs)))


def _h(*rows):
    return [{"epoch": i + 1, "val_loss": v, "synthetic_auroc": s} for i, (v, s) in enumerate(rows)]


def test_val_loss_selection_keeps_the_lowest_loss():
    hist = _h((1.0, 0.5), (0.8, 0.9), (0.6, 0.7), (0.61, 0.99))
    assert select_checkpoint(hist, "val_loss") == 3


def test_synthetic_selection_keeps_the_best_separation_even_when_the_loss_keeps_falling():
    hist = _h((1.0, 0.5), (0.8, 0.93), (0.6, 0.90), (0.5, 0.85))  # the student learns to copy anomalies
    assert select_checkpoint(hist, "synthetic") == 2
    assert select_checkpoint(hist, "val_loss") == 4


def test_equal_synthetic_auroc_is_broken_by_the_validation_loss():
    hist = _h((1.0, 1.0), (0.7, 1.0), (0.9, 1.0))
    assert select_checkpoint(hist, "synthetic") == 2
    assert is_better(_h((0.7, 0.95))[0], _h((0.9, 0.95))[0], "synthetic")
    assert not is_better(_h((0.9, 0.95))[0], _h((0.7, 0.95))[0], "synthetic")
    with pytest.raises(ValueError, match="selection"):
        is_better(hist[0], None, "auroc")


def test_training_with_synthetic_selection_records_the_auroc_and_keeps_that_epoch():
    from linewatch.model.stfpm import STFPM
    from linewatch.station.training import train_students

    imgs = _images(12, 32, 32)
    model = STFPM("mobilenet_v2", input_size=(32, 32), blur_sigma=1.0)
    cfg = TrainConfig(max_epochs=3, batch_size=4, lr=0.05, patience=3, select="synthetic")
    r = train_students(model, imgs[:8], imgs[8:], cfg, torch.device("cpu"), progress=False)
    assert len(r.history) == 3 and all(0 <= h["synthetic_auroc"] <= 1 for h in r.history)
    assert r.best_epoch == select_checkpoint(r.history, "synthetic", cfg.min_delta)


def test_anomalies_made_by_the_caller_are_scored_every_epoch_but_do_not_change_a_val_loss_selection():
    from linewatch.model.stfpm import STFPM
    from linewatch.station.synthetic import make_anomalies
    from linewatch.station.training import train_students

    imgs = _images(12, 32, 32)
    bad = make_anomalies(imgs[8:], seed=1)[0]
    model = STFPM("mobilenet_v2", input_size=(32, 32), blur_sigma=1.0)
    cfg = TrainConfig(max_epochs=2, batch_size=4, lr=0.05, patience=2)  # val_loss selection
    r = train_students(model, imgs[:8], imgs[8:], cfg, torch.device("cpu"), progress=False, anomalous=bad)
    assert all(0 <= h["synthetic_auroc"] <= 1 for h in r.history)
    assert r.best_epoch == select_checkpoint(r.history, "val_loss", cfg.min_delta)
    with pytest.raises(ValueError, match="do not match"):
        train_students(model, imgs[:8], imgs[8:], cfg, torch.device("cpu"), progress=False, anomalous=bad[:2])
