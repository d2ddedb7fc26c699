import cv2
import numpy as np
import pytest

from linewatch.errors import DataError
from linewatch.imaging.images import list_images, load_images, read_image


def test_conversions_to_rgb8(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((20, 30), 77, np.uint8))
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((20, 30), 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((20, 30), 65535, np.uint16))
    a = read_image(tmp_path / "a.png")
    assert a.shape == (20, 30, 3) and a.dtype == np.uint8 and a[0, 0, 0] == 200 and a[0, 0, 2] == 0
    assert (read_image(tmp_path / "gray.png") == 77).all()
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]
    assert (read_image(tmp_path / "deep.png") == 255).all()


def test_corrupt_and_truncated_files_are_skipped_and_named(tmp_path):
    good = np.full((40, 40, 3), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "ok.png"), good)
    cv2.imwrite(str(tmp_path / "big.png"), np.full((80, 60, 3), 50, np.uint8))  # other size: resized
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    s = load_images(list_images(tmp_path), (32, 32))
    assert {p.name for p in s.paths} == {"ok.png", "big.png"}
    assert {p.name for p in s.skipped} == {"junk.png", "trunc.jpg", "empty.png"}
    assert s.images.shape == (2, 32, 32, 3)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")
