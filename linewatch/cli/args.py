"""Argument types shared by the commands."""

from __future__ import annotations

import argparse
import math


def parse_size(text: str) -> tuple[int, int]:
    """``256`` or ``WxH`` (width first, as image sizes are written) → (h, w), as the model takes it."""
    try:
        parts = [int(x) for x in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use 256, WxH such as 512x128, or auto") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 32 or max(parts) > 2048 or any(p % 16 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be multiples of 16 between 32 and 2048")
    w, h = parts
    return h, w


def parse_input_size(text: str) -> tuple[int, int] | str:
    """A size as :func:`parse_size`, or ``auto`` (the images' aspect under a pixel budget)."""
    return "auto" if text.strip().lower() == "auto" else parse_size(text)


def parse_fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return v


def parse_topk(text: str) -> float:
    """The image score's fraction of map pixels: in (0, 1] (1 is the map's mean)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1]; e.g. 0.02 averages the map's top 2 %")
    return v


def parse_stages(text: str) -> tuple[int, ...]:
    """``2,3,4`` → (2, 3, 4): pyramid levels (which ones a backbone has is checked against it later)."""
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of pyramid levels; use e.g. 2,3,4") from None
