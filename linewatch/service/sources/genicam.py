"""Pixel formats of GenICam cameras (GigE Vision / USB3 Vision, through Aravis or pylon) → images for
:func:`linewatch.service.capture.prepare`, and what the two camera sources share.

Formats go by their PFNC names (the GenICam Pixel Format Naming Convention, the ``PixelFormat`` feature's
values). Bayer data is demosaiced here; PFNC names the colour of the *first two pixels of the first row*
(BayerRG: R G / G B), whereas OpenCV names the colours at the 2nd and 3rd pixels of the *second* row, so
PFNC BayerRG is OpenCV's BayerBG and so on (the unit tests check this on a synthetic mosaic).
"""

from __future__ import annotations

import cv2
import numpy as np

from linewatch.service.frames import FrameDecodeError

# PFNC codes (GigE Vision uses them on the wire; Aravis reports them as they are)
PFNC_CODES = {
    0x01080001: "Mono8", 0x01100003: "Mono10", 0x01100005: "Mono12", 0x01100007: "Mono16",
    0x01080008: "BayerGR8", 0x01080009: "BayerRG8", 0x0108000A: "BayerGB8", 0x0108000B: "BayerBG8",
    0x02180014: "RGB8", 0x02180015: "BGR8",
}
# PFNC Bayer → the OpenCV code that turns it into RGB
_BAYER_TO_RGB = {
    "BayerRG8": cv2.COLOR_BayerBG2RGB,
    "BayerGR8": cv2.COLOR_BayerGB2RGB,
    "BayerGB8": cv2.COLOR_BayerGR2RGB,
    "BayerBG8": cv2.COLOR_BayerRG2RGB,
}
# unpacked mono formats wider than 8 bits: little-endian uint16 holding this many significant bits
_MONO_BITS = {"Mono10": 10, "Mono12": 12, "Mono16": 16}
SUPPORTED = ("Mono8", *_MONO_BITS, *_BAYER_TO_RGB, "RGB8", "BGR8")


def _bytes_per_pixel(fmt: str) -> int:
    if fmt in _MONO_BITS:
        return 2
    if fmt in ("RGB8", "BGR8"):
        return 3
    return 1


def convert(data: bytes | bytearray | memoryview | np.ndarray, width: int, height: int, fmt: str
            ) -> tuple[np.ndarray, bool]:
    """A camera buffer → (image, rgb): 8-bit grey (H, W) or 3-channel (H, W, 3), ``rgb`` False for BGR/grey.

    The image never shares memory with ``data`` (the camera reuses its buffers). Mono10/12/16 keep their
    most significant 8 bits, as the model sees 8-bit images. Raises :class:`FrameDecodeError` for an
    unsupported format or a buffer too short for ``width`` × ``height``."""
    if fmt not in SUPPORTED:
        raise FrameDecodeError(f"pixel format {fmt} is not supported (use one of {', '.join(SUPPORTED)}; "
                               "set it with features: {PixelFormat: …})")
    if width < 1 or height < 1:
        raise FrameDecodeError(f"buffer has no image ({width}x{height})")
    bpp = _bytes_per_pixel(fmt)
    need = width * height * bpp
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if buf.size < need:
        raise FrameDecodeError(f"{fmt} buffer of {buf.size} bytes is short of {width}x{height} ({need} bytes)",
                               incomplete="size_mismatch")
    buf = buf[:need]  # trailing padding, if any, is not image
    if fmt == "Mono8":
        return buf.reshape(height, width).copy(), False
    if fmt in _MONO_BITS:
        wide = buf.view("<u2").reshape(height, width)
        # a value above the declared bit depth (a misconfigured camera) saturates instead of wrapping round
        return np.minimum(wide >> (_MONO_BITS[fmt] - 8), 255).astype(np.uint8), False
    if fmt in _BAYER_TO_RGB:
        return cv2.cvtColor(buf.reshape(height, width), _BAYER_TO_RGB[fmt]), True
    return buf.reshape(height, width, 3).copy(), fmt == "RGB8"


def mosaic(rgb: np.ndarray, fmt: str) -> np.ndarray:
    """The Bayer mosaic a sensor with pattern ``fmt`` records of ``rgb`` (H, W, 3): for tests and fakes."""
    pattern = fmt[len("Bayer"):len("Bayer") + 2]  # e.g. "RG": row 0 = R G …, row 1 = G B …
    other = {"RG": "GB", "BG": "GR", "GR": "BG", "GB": "RG"}[pattern]
    channel = {"R": 0, "G": 1, "B": 2}
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for dy, row in enumerate((pattern, other)):
        for dx, colour in enumerate(row):
            out[dy::2, dx::2] = rgb[dy::2, dx::2, channel[colour]]
    return out
