"""scripts/strips_by_cell.py: cutting strips into cells, and the strip AUROC expected from cell scores."""

from __future__ import annotations

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="module")
def mod(script):
    return script("strips_by_cell")


def test_cut_strip_gives_the_four_cells_in_order(mod):
    strip = np.concatenate([np.full((10, 10), k * 50, np.uint8) for k in range(4)], axis=1)
    cells = mod.cut_strip(strip)
    assert [c.shape for c in cells] == [(10, 10)] * 4
    assert [int(c.mean()) for c in cells] == [0, 50, 100, 150]
    with pytest.raises(ValueError, match="four|4 square"):
        mod.cut_strip(np.zeros((10, 30), np.uint8))


def test_cut_writes_every_cell_of_every_strip(mod, tmp_path):
    for sub, n in (("train/good", 2), ("test/good", 1), ("test/defect", 1)):
        (tmp_path / "s" / sub).mkdir(parents=True)
        for i in range(n):
            strip = np.concatenate([np.full((8, 8), 10 * i + k, np.uint8) for k in range(4)], axis=1)
            cv2.imwrite(str(tmp_path / "s" / sub / f"{i:04d}.png"), strip)
    counts = mod.cut(tmp_path / "s", tmp_path / "c")
    assert counts == {"train/good": 8, "test/good": 4, "test/defect": 4}
    cell = cv2.imread(str(tmp_path / "c" / "train/good" / "0001_c3.png"), cv2.IMREAD_GRAYSCALE)
    assert cell.shape == (8, 8) and int(cell[0, 0]) == 13


def test_strip_auroc_from_cell_scores(mod):
    rng = np.random.default_rng(0)
    good = rng.random(400)
    # defective cells always above every good cell: every defective strip wins
    assert mod.strip_auroc_draws(good, good + 2.0, 60, 20, rng).min() == pytest.approx(1.0)
    # defective cells like good ones: max of 4 against max of 4, chance
    assert abs(mod.strip_auroc_draws(good, rng.random(400), 60, 200, rng).mean() - 0.5) < 0.02
    # defective cells below every good one: a defective strip is the max of its 3 good cells, and the max of 3 beats
    # the max of 4 other cells with probability 3/7
    assert abs(mod.strip_auroc_draws(good, good - 2.0, 60, 200, rng).mean() - 3 / 7) < 0.02
