"""scripts/make_elpv_strips.py on a tiny fake ELPV tree."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="module")
def strips_mod(script):
    return script("make_elpv_strips")


@pytest.fixture
def fake_elpv(tmp_path):
    """24 good mono, 5 defective mono, plus poly and uncertain cells that must be ignored; 20×20 cells whose
    grey value encodes their number (so strips can be traced back to cells)."""
    data = tmp_path / "elpv"
    (data / "images").mkdir(parents=True)
    rows = []
    kinds = [("1.0", "mono")] * 5 + [("0.0", "mono")] * 24 + [("0.0", "poly")] * 4
    kinds += [("0.3333333333333333", "mono")] * 3
    for i, (prob, kind) in enumerate(kinds):
        name = f"images/cell{i:04d}.png"
        cv2.imwrite(str(data / name), np.full((20, 20), i * 7 % 256, np.uint8))
        rows.append(f"{name}  {prob}                 {kind}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return data


def _strip_cells(out: Path) -> dict[str, list[str]]:
    with open(out / "strips.csv") as f:
        return {r["file"]: r["cells"].split() for r in csv.DictReader(f)}


def test_strips_are_four_cells_wide_labelled_and_train_test_disjoint(strips_mod, fake_elpv, tmp_path):
    out = tmp_path / "strips"
    assert strips_mod.main(["--elpv", str(fake_elpv), "--out", str(out), "--test-good", "3",
                            "--test-defect", "4", "--seed", "1"]) == 0
    train = sorted((out / "train/good").iterdir())
    assert len(train) == 4  # 17 training cells (24 − round(24·0.3)) → 4 strips, each cell once
    assert len(list((out / "test/good").iterdir())) == 3 and len(list((out / "test/defect").iterdir())) == 4
    img = cv2.imread(str(train[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (20, 80)  # 4 cells side by side
    cells = _strip_cells(out)
    defective = {f"cell{i:04d}" for i in range(5)}
    good_mono = {f"cell{i:04d}" for i in range(5, 29)}
    train_cells = {c for f, cs in cells.items() if f.startswith("train/") for c in cs}
    test_cells = {c for f, cs in cells.items() if f.startswith("test/") for c in cs}
    assert not train_cells & test_cells
    for f, cs in cells.items():
        assert len(cs) == 4 and len(set(cs)) == 4
        n_bad = len(set(cs) & defective)
        assert n_bad == (1 if f.startswith("test/defect") else 0)
        assert set(cs) - defective <= good_mono  # never a poly or an uncertain cell
        # the pixels are those cells, in that order
        strip = cv2.imread(str(out / f), cv2.IMREAD_UNCHANGED)
        want = [int(c[4:]) * 7 % 256 for c in cs]
        assert [int(strip[0, 20 * k]) for k in range(4)] == want
        # defective strips get a cell mask: white exactly over the defective cell's columns
        mask_path = out / "test/cell_masks" / f"{Path(f).stem}_mask.png"
        if f.startswith("test/defect"):
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            bad_at = next(k for k, c in enumerate(cs) if c in defective)
            want_mask = np.zeros((20, 80), np.uint8)
            want_mask[:, 20 * bad_at:20 * bad_at + 20] = 255
            assert np.array_equal(mask, want_mask)
    assert len(list((out / "test/cell_masks").iterdir())) == 4


def test_the_same_seed_gives_the_same_strips_and_another_seed_others(strips_mod, fake_elpv, tmp_path):
    args = ["--elpv", str(fake_elpv), "--test-good", "2", "--test-defect", "2"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "5")):
        strips_mod.main([*args, "--out", str(tmp_path / name), "--seed", seed])
    assert _strip_cells(tmp_path / "a") == _strip_cells(tmp_path / "b")
    assert _strip_cells(tmp_path / "a") != _strip_cells(tmp_path / "c")


def test_thin_crack_strips_are_good_test_cells_with_one_masked_crack(strips_mod, fake_elpv, tmp_path):
    args = ["--elpv", str(fake_elpv), "--test-good", "3", "--test-defect", "2", "--seed", "2"]
    plain, thin, faint = tmp_path / "plain", tmp_path / "thin", tmp_path / "faint"
    assert strips_mod.main([*args, "--out", str(plain)]) == 0
    assert strips_mod.main([*args, "--out", str(thin), "--thin-cracks", "4"]) == 0
    assert strips_mod.main([*args, "--out", str(faint), "--thin-cracks", "4", "--crack-darken", "0.1"]) == 0
    cells = _strip_cells(thin)
    # the other strips of the seed do not change when thin ones are added
    assert {f: c for f, c in cells.items() if not f.startswith("test/thin/")} == _strip_cells(plain)
    train_cells = {c for f, cs in cells.items() if f.startswith("train/") for c in cs}
    good_mono = {f"cell{i:04d}" for i in range(5, 29)}
    thin_files = sorted(f for f in cells if f.startswith("test/thin/"))
    assert len(thin_files) == 4 and len(list((thin / "test/thin_masks").iterdir())) == 4
    for f in thin_files:
        cs = cells[f]
        assert len(set(cs)) == 4 and set(cs) <= good_mono and not set(cs) & train_cells
        strip = cv2.imread(str(thin / f), cv2.IMREAD_UNCHANGED).astype(np.float32)
        mask = cv2.imread(str(thin / "test/thin_masks" / f"{Path(f).stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        cracked = [k for k in range(4) if mask[:, 20 * k:20 * k + 20].any()]
        assert len(cracked) == 1  # one cell of four carries the crack
        grey = np.hstack([np.full((20, 20), int(c[4:]) * 7 % 256, np.float32) for c in cs])
        assert np.array_equal(strip[~mask], grey[~mask])  # untouched outside the mask
        ratio = strip[mask] / grey[mask]
        assert ratio.min() >= 0.4 - 0.01 and ratio.max() <= 0.6 + 0.01  # 40–60 % darker (rounded to uint8)
        # another contrast: the same crack, fainter
        faint_strip = cv2.imread(str(faint / f), cv2.IMREAD_UNCHANGED).astype(np.float32)
        faint_mask = cv2.imread(str(faint / "test/thin_masks" / f"{Path(f).stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(faint_mask > 0, mask)
        assert (faint_strip[mask] > strip[mask]).all() and (faint_strip[mask] < grey[mask]).all()


def test_crack_contrast_outside_zero_to_one_is_a_usage_error(strips_mod, fake_elpv, tmp_path, capsys):
    assert strips_mod.main(["--elpv", str(fake_elpv), "--out", str(tmp_path / "x"), "--thin-cracks", "1",
                            "--crack-darken", "0"]) == 2
    assert "--crack-darken" in capsys.readouterr().err


def test_the_darkest_crack_is_black_not_wrapped_around(strips_mod):
    cell = np.full((40, 40), 200, np.uint8)
    for seed in range(20):  # darken 1 × 0.8–1.2 reaches past black for about half the draws
        out, mask = strips_mod.draw_crack(cell, np.random.default_rng(seed), darken=1.0)
        assert mask.any() and out[mask > 0].max() <= 40 and np.array_equal(out[mask == 0], cell[mask == 0])
