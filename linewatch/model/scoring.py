"""From a raw anomaly map to the map that is thresholded and the image score.

Three choices, recorded in the bundle (``BundleMeta.score``) so that calibration and inference agree:

* the Gaussian blur σ (``blur_sigma``; a larger one averages away isolated noisy pixels of a large map),
* per-position normalisation: each map pixel becomes ``(m − μ) / √(σ² + s₀²)`` with μ, σ the mean and
  standard deviation of that pixel over held-out good images (s₀ = the median σ, so positions that never
  vary do not turn into huge ratios). For aligned parts a fixed hot spot (an edge, a logo) is high on
  every good part: normalised, it stops counting;
* the reduction to one number: ``max`` (anomalib's; what a bundle without a ``score`` field gets) or
  ``topk``, the mean of the top ``topk`` fraction of pixels (one hot pixel of noise moves it less than the
  max). ``calibrate`` defaults to ``topk`` 2 % (``DEFAULT_TOPK``; 1 % before): docs/accuracy-study.md has the
  measurements.

The image score may come from a second raw map, of other pyramid levels than the defect map
(``STFPM.score_stages``): it is blurred, normalised (with its own per-position statistics) and reduced the
same way, while the defect map is only blurred and normalised.

The conformal threshold is fitted on whichever score this produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("max", "topk")
NORMALISATIONS = ("none", "position")
# calibrate's image score: the mean of the blurred map's top 2 % (docs/accuracy-study.md, "How many pixels make the
# image score"). ScoreSpec's own default stays 0.01: it is what a bundle that names ``topk`` without a fraction meant.
DEFAULT_TOPK = 0.02


@dataclass(frozen=True)
class ScoreSpec:
    reduce: str = "max"
    topk: float = 0.01  # fraction of map pixels averaged by ``topk``
    normalise: str = "none"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"score reduction {self.reduce!r} is not one of {', '.join(REDUCTIONS)}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"score normalisation {self.normalise!r} is not one of {', '.join(NORMALISATIONS)}")
        if not 0 < self.topk <= 1:
            raise ValueError(f"topk fraction {self.topk!r} must be in (0, 1]")

    def to_dict(self) -> dict[str, object]:
        return {"reduce": self.reduce, "topk": self.topk, "normalise": self.normalise}

    @classmethod
    def from_dict(cls, d: dict[str, object] | None) -> ScoreSpec:
        if not d:
            return cls()
        return cls(reduce=str(d.get("reduce", "max")), topk=float(d.get("topk", 0.01)),  # type: ignore[arg-type]
                   normalise=str(d.get("normalise", "none")))

    @property
    def label(self) -> str:
        r = "max" if self.reduce == "max" else f"top{self.topk:g}"
        return r if self.normalise == "none" else f"{r}+position-norm"


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def position_stats(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and floored standard deviation of (N,H,W) blurred maps of good parts."""
    if maps.ndim != 3 or len(maps) < 2:
        raise ValueError("per-position statistics need at least 2 maps (N,H,W)")
    maps = maps.double()
    mean = maps.mean(0)
    std = maps.std(0, unbiased=True)
    floor = std.median().clamp_min(1e-12)
    return mean.float(), torch.sqrt(std.pow(2) + floor.pow(2)).float()


class ImageScorer(nn.Module):
    """Raw (B,H,W) maps → (maps as thresholded, image scores (B,)). ``split``: the score comes from a second
    raw map (``forward(raw, score_raw)``), which then has per-position statistics of its own."""

    def __init__(self, blur_sigma: float = 4.0, spec: ScoreSpec | None = None, split: bool = False):
        super().__init__()
        self.blur_sigma = float(blur_sigma)
        self.spec = spec or ScoreSpec()
        self.split = bool(split)
        kernel = gaussian_kernel1d(blur_sigma) if blur_sigma > 0 else torch.ones(1)
        self.register_buffer("blur_kernel", kernel, persistent=False)
        # per-position statistics: set by calibration (set_position_stats) or from the bundle; the score_ pair
        # only for a split scorer
        for prefix in ("", "score_"):
            self.register_buffer(prefix + "pos_mean", torch.zeros(0), persistent=False)
            self.register_buffer(prefix + "pos_std", torch.ones(0), persistent=False)

    def set_position_stats(self, mean: torch.Tensor, std: torch.Tensor, score_mean: torch.Tensor | None = None,
                           score_std: torch.Tensor | None = None) -> None:
        """The defect map's statistics, and for a split scorer the score map's (both required then)."""
        pairs = [("", mean, std)]
        if self.split:
            if score_mean is None or score_std is None:
                raise ValueError("a scorer with its own score map needs position statistics for it too")
            pairs.append(("score_", score_mean, score_std))
        for prefix, m, s in pairs:
            if m.shape != s.shape or m.ndim != 2 or m.shape != mean.shape:
                raise ValueError("position statistics must be (H,W) maps, all of the same shape")
            setattr(self, prefix + "pos_mean", m.float().to(self.blur_kernel.device))
            setattr(self, prefix + "pos_std", s.float().to(self.blur_kernel.device))

    @property
    def has_position_stats(self) -> bool:
        return self.pos_mean.ndim == 2 and (not self.split or self.score_pos_mean.ndim == 2)

    @property
    def position_names(self) -> tuple[str, ...]:
        """The statistics' names, in ``set_position_stats`` order: as the bundle stores them (``scorer.`` tensors)."""
        return ("pos_mean", "pos_std") + (("score_pos_mean", "score_pos_std") if self.split else ())

    def position_state(self) -> dict[str, torch.Tensor]:
        """The statistics as the bundle stores them; empty when none are set."""
        if not self.has_position_stats:
            return {}
        return {n: getattr(self, n) for n in self.position_names}

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian smoothing of (B,H,W) maps, as anomalib does before taking the max."""
        if self.blur_sigma <= 0:
            return maps
        k = self.blur_kernel.to(maps.dtype)
        r = k.numel() // 2
        x = maps.unsqueeze(1)
        # reflect padding needs the pad smaller than the side; replicate is the fallback for tiny maps
        mode = "reflect" if r < min(maps.shape[-2:]) else "replicate"
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
        return x[:, 0]

    def normalise(self, maps: torch.Tensor, score_map: bool = False) -> torch.Tensor:
        """Per-position normalisation (if the spec asks for it) with the defect map's statistics, or with the
        score map's (``score_map``; a split scorer only)."""
        if self.spec.normalise == "none":
            return maps
        if not self.has_position_stats:
            raise RuntimeError("per-position normalisation asked for but no statistics were set")
        mean, std = (self.score_pos_mean, self.score_pos_std) if score_map else (self.pos_mean, self.pos_std)
        if tuple(mean.shape) != tuple(maps.shape[-2:]):
            raise ValueError(f"position statistics are {tuple(mean.shape)}, maps {tuple(maps.shape[-2:])}")
        return (maps - mean.to(maps.dtype)) / std.to(maps.dtype)

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        if self.spec.reduce == "max":
            return flat.amax(1)
        # int() first: under torch.jit.trace a shape is a tensor, and round() of a tensor fails (the engine then
        # fell back to eager). The map size is fixed per traced model, so baking k in as a constant is right.
        k = max(1, round(self.spec.topk * int(flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)

    def forward(self, raw: torch.Tensor, score_raw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_pair(score_raw)
        maps = self.normalise(self.blur(raw))
        if score_raw is None:
            return maps, self.reduce(maps)
        return maps, self.reduce(self.normalise(self.blur(score_raw), score_map=True))

    def plain_scores(self, raw: torch.Tensor, score_raw: torch.Tensor | None = None) -> torch.Tensor:
        """Image scores without per-position normalisation (training, before the statistics exist)."""
        self._check_pair(score_raw)
        return self.reduce(self.blur(raw if score_raw is None else score_raw))

    def _check_pair(self, score_raw: torch.Tensor | None) -> None:
        if (score_raw is not None) != self.split:
            raise ValueError("this scorer takes " + ("a defect map and a score map" if self.split else "one map"))
