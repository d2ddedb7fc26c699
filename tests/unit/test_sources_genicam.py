"""GenICam pixel formats → images (linewatch.service.sources.genicam) on synthetic buffers: no camera needed."""

from __future__ import annotations

import numpy as np
import pytest

from linewatch.service.capture import prepare
from linewatch.service.frames import FrameDecodeError, RawFrame
from linewatch.service.sources.genicam import PFNC_CODES, SUPPORTED, convert, mosaic

RED, GREEN, BLUE = 200, 100, 30


def test_mono8_is_copied_grey():
    data = bytearray(np.arange(12, dtype=np.uint8).tobytes())
    img, rgb = convert(data, 4, 3, "Mono8")
    assert img.shape == (3, 4) and img.dtype == np.uint8 and not rgb
    assert img[2, 3] == 11
    data[11] = 0  # the camera reuses its buffer: our image must not change with it
    assert img[2, 3] == 11


@pytest.mark.parametrize("fmt,bits", [("Mono10", 10), ("Mono12", 12), ("Mono16", 16)])
def test_wide_mono_keeps_the_top_eight_bits(fmt, bits):
    top = (1 << bits) - 1
    values = np.array([[0, top, top // 2, 1 << (bits - 8)]], "<u2")
    img, rgb = convert(values.tobytes(), 4, 1, fmt)
    assert img.dtype == np.uint8 and not rgb
    assert img.tolist() == [[0, 255, 127, 1]]


def test_wide_mono_saturates_instead_of_wrapping():
    img, _ = convert(np.array([[4095]], "<u2").tobytes(), 1, 1, "Mono10")  # a 12-bit value in a Mono10 frame
    assert img[0, 0] == 255


def test_bayer_rg_literal_mosaic():
    """BayerRG8: R at (0, 0), G at (0, 1) and (1, 0), B at (1, 1) (PFNC). Built by hand, not with mosaic()."""
    m = np.empty((8, 8), np.uint8)
    m[0::2, 0::2] = RED
    m[0::2, 1::2] = GREEN
    m[1::2, 0::2] = GREEN
    m[1::2, 1::2] = BLUE
    img, rgb = convert(m.tobytes(), 8, 8, "BayerRG8")
    assert rgb and img.shape == (8, 8, 3)
    assert img[3:5, 3:5].reshape(-1, 3).tolist() == [[RED, GREEN, BLUE]] * 4


@pytest.mark.parametrize("fmt", ["BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8"])
def test_every_bayer_pattern_gives_back_the_colour(fmt):
    scene = np.zeros((16, 16, 3), np.uint8)
    scene[:] = (RED, GREEN, BLUE)
    img, rgb = convert(mosaic(scene, fmt).tobytes(), 16, 16, fmt)
    assert rgb
    # away from the border, a flat colour demosaics exactly; a wrong pattern swaps red and blue or mixes green in
    assert np.array_equal(img[4:12, 4:12], scene[4:12, 4:12]), img[8, 8].tolist()


def test_mosaic_patterns_differ():
    scene = np.zeros((4, 4, 3), np.uint8)
    scene[:] = (RED, GREEN, BLUE)
    assert mosaic(scene, "BayerRG8")[0, :2].tolist() == [RED, GREEN]
    assert mosaic(scene, "BayerGR8")[0, :2].tolist() == [GREEN, RED]
    assert mosaic(scene, "BayerGB8")[0, :2].tolist() == [GREEN, BLUE]
    assert mosaic(scene, "BayerBG8")[0, :2].tolist() == [BLUE, GREEN]


def test_rgb8_and_bgr8_end_as_the_same_rgb_frame():
    scene = np.zeros((6, 10, 3), np.uint8)
    scene[:] = (RED, GREEN, BLUE)
    rgb_img, rgb_flag = convert(scene.tobytes(), 10, 6, "RGB8")
    bgr_img, bgr_flag = convert(scene[:, :, ::-1].copy().tobytes(), 10, 6, "BGR8")
    assert rgb_flag and not bgr_flag
    a, *_ = prepare(RawFrame(rgb_img, rgb=rgb_flag), None, (6, 10))
    b, *_ = prepare(RawFrame(bgr_img, rgb=bgr_flag), None, (6, 10))
    assert np.array_equal(a, b) and a[0, 0].tolist() == [RED, GREEN, BLUE]


def test_grey_and_bayer_frames_go_through_prepare():
    img, rgb = convert(np.full(64, 90, np.uint8).tobytes(), 8, 8, "Mono8")
    out, size, roi = prepare(RawFrame(img, rgb=rgb), None, (4, 4))
    assert out.shape == (4, 4, 3) and size == (8, 8) and (out == 90).all()


def test_padding_after_the_image_is_ignored():
    data = np.arange(6, dtype=np.uint8).tobytes() + b"\xff" * 10
    img, _ = convert(data, 3, 2, "Mono8")
    assert img.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_short_buffer_is_an_incomplete_frame():
    with pytest.raises(FrameDecodeError, match="short") as err:
        convert(b"\x00" * 10, 4, 4, "Mono8")
    assert err.value.incomplete == "size_mismatch"


def test_unsupported_format_says_what_to_set():
    with pytest.raises(FrameDecodeError, match="PixelFormat"):
        convert(b"\x00" * 64, 4, 4, "YUV422_8")


def test_pfnc_codes_name_supported_formats():
    assert PFNC_CODES[0x01080001] == "Mono8" and PFNC_CODES[0x01080009] == "BayerRG8"
    assert set(PFNC_CODES.values()) <= set(SUPPORTED)
