"""STFPM (Wang et al., BMVC 2021): a frozen teacher, one or more students, feature-pyramid matching.

Pure torch: nothing here knows about files, cameras or configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from linewatch.model.backbones import PyramidExtractor, build_extractor, check_stages, get_spec
from linewatch.model.scoring import ImageScorer, ScoreSpec, gaussian_kernel1d

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "STFPM", "default_blur_sigma", "gaussian_kernel1d", "level_distances",
           "stage_distances", "stfpm_loss"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stfpm_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over stages of 1/(2wh) Σ ||t̂ − ŝ||², averaged over the batch (eq. 1–2 of the paper)."""
    total = teacher[0].new_zeros(())
    for t, s in zip(teacher, student, strict=True):
        t = F.normalize(t.float(), dim=1)
        s = F.normalize(s.float(), dim=1)
        total = total + 0.5 * (t - s).pow(2).sum(1).mean()
    return total


def level_distances(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                    size: tuple[int, int]) -> list[torch.Tensor]:
    """Per level: one student's per-pixel distance of the normalised features, upsampled → (B,H,W) each."""
    out = []
    for t, s in zip(teacher, student, strict=True):
        t = F.normalize(t.float(), dim=1)
        s = F.normalize(s.float(), dim=1)
        d = 0.5 * (t - s).pow(2).sum(1, keepdim=True)
        out.append(F.interpolate(d, size=size, mode="bilinear", align_corners=False)[:, 0])
    return out


def _product(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    out = maps[0]
    for m in maps[1:]:
        out = out * m
    return out


def stage_distances(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                    size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel anomaly map of one student: product over stages of the upsampled distances → (B,H,W)."""
    return _product(level_distances(teacher, student, size))


class STFPM(nn.Module):
    """Teacher + N students. ``forward`` maps a batch of images to (anomaly maps, image scores).

    ``stages``: the pyramid levels (1–4, strides 4/8/16/32) whose distances are multiplied into the defect map;
    ``score_stages``: the levels multiplied into the map the image score is taken from. Students learn every
    level of either (built up to the deepest). Defaults: with neither given, the backbone's ``default_stages``
    and ``default_score_stages``; with ``stages`` alone, the score uses the same levels."""

    def __init__(
        self,
        backbone: str,
        teacher: PyramidExtractor | None = None,
        n_students: int = 1,
        input_size: tuple[int, int] = (256, 256),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blur_sigma: float = 4.0,
        score: ScoreSpec | None = None,
        stages: Sequence[int] | None = None,
        score_stages: Sequence[int] | None = None,
    ):
        super().__init__()
        if n_students < 1:
            raise ValueError("n_students must be ≥ 1")
        self.backbone = backbone
        spec = get_spec(backbone)
        self.stages = check_stages(backbone, stages if stages is not None else spec.default_stages)
        if score_stages is None:
            score_stages = spec.default_score_stages if stages is None else self.stages
        self.score_stages = check_stages(backbone, score_stages)
        # every level either map uses: matched in training, computed at inference
        self.levels = tuple(sorted(set(self.stages) | set(self.score_stages)))
        levels = max(self.levels)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.blur_sigma = float(blur_sigma)
        teacher = teacher if teacher is not None else build_extractor(backbone, levels=levels)
        if len(teacher.stages) < levels:
            raise ValueError(f"the teacher has {len(teacher.stages)} pyramid levels, stages {list(self.levels)} "
                             f"need {levels}")
        # only the levels used: a deeper level of a shared teacher would be dead compute
        self.teacher = teacher if len(teacher.stages) == levels else PyramidExtractor(list(teacher.stages[:levels]))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.students = nn.ModuleList(build_extractor(backbone, levels=levels) for _ in range(n_students))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # blur, optional per-position normalisation and the reduction to an image score (see .scoring)
        self.scorer = ImageScorer(blur_sigma, score, split=self.split_score)

    @property
    def n_students(self) -> int:
        return len(self.students)

    @property
    def split_score(self) -> bool:
        """True when the image score comes from other levels than the defect map (a second raw map)."""
        return self.score_stages != self.stages

    def train(self, mode: bool = True) -> STFPM:
        super().train(mode)
        self.teacher.eval()  # the teacher is frozen, BatchNorm statistics included
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,H,W,3) or (B,3,H,W), or float in [0,1] → normalised float (B,3,h,w) at input size."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Teacher and per-student features of the used levels only (``self.levels``, finest first)."""
        pick = [i - 1 for i in self.levels]
        with torch.no_grad():
            t = self.teacher(x)
        return [t[i] for i in pick], [[f[i] for i in pick] for f in (s(x) for s in self.students)]

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Training loss on a batch, summed over students (each learns independently)."""
        t, ss = self.features(self.preprocess(images))
        return sum(stfpm_loss(t, s) for s in ss)

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian smoothing of (B,H,W) maps, as anomalib does before taking the max."""
        return self.scorer.blur(maps)

    def raw_pair(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unblurred (B,H,W) maps at input size: the defect map's, and the image score's when its levels differ
        (else None: the score comes from the defect map). With several students each is their mean distance
        plus their variance (Bergmann et al., 2020)."""
        x = self.preprocess(images)
        t, ss = self.features(x)
        per_level = [dict(zip(self.levels, level_distances(t, s, self.input_size), strict=True)) for s in ss]

        def combine(levels: tuple[int, ...]) -> torch.Tensor:
            per_student = torch.stack([_product([d[lv] for lv in levels]) for d in per_level])
            if len(ss) > 1:
                return per_student.mean(0) + per_student.var(0, unbiased=False)
            return per_student[0]

        return combine(self.stages), combine(self.score_stages) if self.split_score else None

    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The unblurred (B,H,W) defect maps (``raw_pair``'s first)."""
        return self.raw_pair(images)[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly maps (B,H,W) at input size, image scores (B,)), scored as ``self.scorer`` says."""
        return self.scorer(*self.raw_pair(images))


def default_blur_sigma(input_size: Sequence[int]) -> float:
    """σ = 4 px at 256 (anomalib's default), scaled with the input so smoothing covers the same area."""
    return 4.0 * math.sqrt(input_size[0] * input_size[1]) / 256.0
