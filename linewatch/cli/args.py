"""Argument types shared by the commands."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use 256 or 256x256") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 32 or max(parts) > 2048 or any(p % 16 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be multiples of 16 between 32 and 2048")
    return parts[0], parts[1]


def parse_fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return v
