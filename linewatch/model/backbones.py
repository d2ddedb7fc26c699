"""Backbone registry: which torchvision network, its pyramid levels (strides 4/8/16/32), which weights file.
Where the weights live and how they are checked and provisioned: ``linewatch.model.weights``.

A model uses some of the levels (its *stages*, numbered 1–4 from the finest); an extractor keeps only the
layers up to the deepest stage used, since the rest would be dead compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models

from linewatch.errors import WeightsError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]
    split: Callable[[nn.Module], list[nn.Module]]
    weights_file: str  # torchvision's ImageNet checkpoint name: <arch>-<sha256 prefix>.pth
    sha256: str | None  # the full digest where it is known; otherwise the name's prefix is checked
    channels: tuple[int, ...]  # per pyramid level, strides 4/8/16/32
    # the levels STFPM matches when a station does not say (docs/accuracy-study.md, "Which pyramid levels"):
    # those multiplied into the defect map, and those multiplied into the map the image score is taken from
    default_stages: tuple[int, ...]
    default_score_stages: tuple[int, ...]


def _split_resnet(m: nn.Module) -> list[nn.Module]:
    return [
        nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1),
        m.layer2,
        m.layer3,
        m.layer4,
    ]


def _split_mobilenet_v2(m: nn.Module) -> list[nn.Module]:
    f = m.features
    # features[3] ends stride 4, [6] stride 8, [13] stride 16 (the last stride-16 block), [16] stride 32 (the
    # last 160-channel block; [17] only widens to 320 channels for the classifier head)
    return [f[0:4], f[4:7], f[7:14], f[14:17]]


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        "resnet18", lambda: models.resnet18(weights=None), _split_resnet,
        "resnet18-f37072fd.pth", None, (64, 128, 256, 512), (1, 2, 3), (1, 2, 3),  # the paper's layers 1–3
    ),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2", lambda: models.wide_resnet50_2(weights=None), _split_resnet,
        "wide_resnet50_2-95faca4d.pth", None, (256, 512, 1024, 2048), (1, 2, 3), (1, 2, 3),
    ),
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", lambda: models.mobilenet_v2(weights=None), _split_mobilenet_v2,
        "mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        # strides 8/16: the stride-4 level (24 channels) told defects from good cells no better than chance on
        # ELPV; without it image AUROC rose on ELPV cells and strips and bottle kept its targets. Adding the
        # stride-32 level to the defect map cost bottle's PRO. Added to the image score's map only
        # (`--score-stages 2,3,4`) it is an option, not the default: docs/accuracy-study.md, "The image score
        # from its own levels"
        (24, 32, 96, 160), (2, 3), (2, 3),
    ),
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise WeightsError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None


def check_stages(name: str, stages: Sequence[int]) -> tuple[int, ...]:
    """``stages`` as a tuple, or ValueError naming what is allowed: increasing levels of ``name``'s pyramid."""
    spec = get_spec(name)
    levels = len(spec.channels)
    out = tuple(stages)
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= levels for v in out) \
            or list(out) != sorted(set(out)):
        raise ValueError(f"stages {list(out)!r} are not increasing levels of {name}'s pyramid: choose from "
                         f"1..{levels} (strides {'/'.join(str(4 << i) for i in range(levels))}), e.g. "
                         f"{','.join(map(str, spec.default_stages))}")
    return out


class PyramidExtractor(nn.Module):
    """The first levels of a backbone's pyramid; forward returns each level's feature map."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def build_extractor(name: str, state_dict: dict[str, torch.Tensor] | None = None,
                    levels: int | None = None) -> PyramidExtractor:
    """A pyramid extractor of the first ``levels`` levels (all by default); with ``state_dict`` (a full
    torchvision checkpoint) it is pretrained."""
    spec = get_spec(name)
    net = spec.build()
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return PyramidExtractor(spec.split(net)[:levels])
