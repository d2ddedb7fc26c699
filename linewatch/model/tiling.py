"""Tiling: score a large frame at native resolution as overlapping tiles, and stitch the tiles' maps.

Squashing a 1200×300 part into 256×256 shrinks a crack 3 px wide to under one pixel of the model's input;
tiles keep every pixel. The frame is covered by tiles of the model's input size, ``overlap`` pixels shared
between neighbours (the last tile of a row or column is moved back to end at the frame's edge, so tiles
never leave the frame). The raw (unblurred) tile maps are stitched with the **max** where tiles overlap
(a defect seen well by one tile is not diluted by a neighbour that sees it at its border; ``mean`` is
available too), and the blur, normalisation and image score are applied once to the stitched frame map,
so the score is "the image score over the stitched map", exactly as without tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STITCH_MODES = ("max", "mean")


@dataclass(frozen=True)
class TileSpec:
    frame: tuple[int, int]  # (H, W) frames are resized to before tiling (native resolution at calibration)
    tile: tuple[int, int]  # (h, w) of a tile: the model's input size
    overlap: int = 32
    stitch: str = "max"

    def __post_init__(self) -> None:
        th, tw = self.tile
        fh, fw = self.frame
        if fh < th or fw < tw:
            raise ValueError(f"frame {fw}x{fh} is smaller than the tile {tw}x{th}")
        if not 0 <= self.overlap < min(th, tw):
            raise ValueError(f"tile overlap {self.overlap} must be in 0..{min(th, tw) - 1}")
        if self.stitch not in STITCH_MODES:
            raise ValueError(f"stitch mode {self.stitch!r} is not one of {', '.join(STITCH_MODES)}")

    def to_dict(self) -> dict[str, object]:
        return {"frame": list(self.frame), "tile": list(self.tile), "overlap": self.overlap, "stitch": self.stitch}

    @classmethod
    def from_dict(cls, d: dict) -> TileSpec:
        return cls(frame=(int(d["frame"][0]), int(d["frame"][1])), tile=(int(d["tile"][0]), int(d["tile"][1])),
                   overlap=int(d.get("overlap", 0)), stitch=str(d.get("stitch", "max")))

    def origins(self) -> list[tuple[int, int]]:
        """Top-left (y, x) of every tile, row by row."""
        ys = axis_origins(self.frame[0], self.tile[0], self.overlap)
        xs = axis_origins(self.frame[1], self.tile[1], self.overlap)
        return [(y, x) for y in ys for x in xs]

    @property
    def n_tiles(self) -> int:
        return len(self.origins())


def axis_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` px overlapping by at least ``overlap``."""
    if length < tile:
        raise ValueError(f"length {length} is shorter than the tile {tile}")
    step = tile - overlap
    out = list(range(0, length - tile + 1, step))
    if out[-1] + tile < length:
        out.append(length - tile)  # the last tile ends at the edge (it overlaps its neighbour more)
    return out


def extract_tiles(images: torch.Tensor, spec: TileSpec) -> torch.Tensor:
    """(B,H,W,C) frames at ``spec.frame`` → (B·T,h,w,C) tiles, frame-major (frame 0's tiles first)."""
    th, tw = spec.tile
    tiles = [images[:, y:y + th, x:x + tw] for y, x in spec.origins()]
    return torch.stack(tiles, 1).flatten(0, 1)


def stitch(tile_maps: torch.Tensor, spec: TileSpec) -> torch.Tensor:
    """(B·T,h,w) tile maps → (B,H,W) frame maps; overlaps combined by ``spec.stitch`` (max or mean)."""
    origins = spec.origins()
    t = len(origins)
    if tile_maps.shape[0] % t:
        raise ValueError(f"{tile_maps.shape[0]} tile maps is not a multiple of {t} tiles per frame")
    b = tile_maps.shape[0] // t
    th, tw = spec.tile
    fh, fw = spec.frame
    per_frame = tile_maps.view(b, t, th, tw)
    if spec.stitch == "max":
        out = tile_maps.new_full((b, fh, fw), float("-inf"))
        for i, (y, x) in enumerate(origins):
            out[:, y:y + th, x:x + tw] = torch.maximum(out[:, y:y + th, x:x + tw], per_frame[:, i])
        return out
    out = tile_maps.new_zeros((b, fh, fw))
    count = tile_maps.new_zeros((fh, fw))
    for i, (y, x) in enumerate(origins):
        out[:, y:y + th, x:x + tw] += per_frame[:, i]
        count[y:y + th, x:x + tw] += 1
    return out / count


class TiledNet(nn.Module):
    """Wraps a model with ``raw_pair`` (tiles → unblurred defect maps, and score maps or None) and ``scorer``
    (stitched maps → map, score): frames in, (maps (B,H,W) at frame size, scores (B,)) out. One model call per
    batch: a batch of B frames is B·T tiles."""

    def __init__(self, net: nn.Module, spec: TileSpec):
        super().__init__()
        self.net = net
        self.spec = spec

    @property
    def scorer(self) -> nn.Module:
        return self.net.scorer

    def raw_pair(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frames → the stitched raw (B,H,W) frame maps: defect map, and score map (None when the model scores
        its defect map)."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(images.shape)}")
        if images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.permute(0, 2, 3, 1)  # NCHW → NHWC
        if tuple(images.shape[1:3]) != self.spec.frame:
            x = images.permute(0, 3, 1, 2).float()
            if images.dtype == torch.uint8:
                x = x / 255.0
            x = F.interpolate(x, size=self.spec.frame, mode="bilinear", align_corners=False, antialias=True)
            images = x.permute(0, 2, 3, 1)
        raw, score_raw = self.net.raw_pair(extract_tiles(images, self.spec))
        return stitch(raw, self.spec), stitch(score_raw, self.spec) if score_raw is not None else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.scorer(*self.raw_pair(images))
