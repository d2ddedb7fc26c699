"""Backbone registry: which torchvision network, which three stages (strides 4/8/16), which weights file.
Where the weights live and how they are checked and provisioned: ``linewatch.model.weights``.

Only the layers up to the third stage are kept: STFPM never looks deeper, so the rest is dead compute.
"""

from __future__ import annotations

from collections.abc import Callable
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
    channels: tuple[int, int, int]


def _split_resnet(m: nn.Module) -> list[nn.Module]:
    return [
        nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1),
        m.layer2,
        m.layer3,
    ]


def _split_mobilenet_v2(m: nn.Module) -> list[nn.Module]:
    f = m.features
    # features[3] ends stride 4, [6] stride 8, [13] stride 16 (the last stride-16 block).
    return [f[0:4], f[4:7], f[7:14]]


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        "resnet18", lambda: models.resnet18(weights=None), _split_resnet,
        "resnet18-f37072fd.pth", None, (64, 128, 256),
    ),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2", lambda: models.wide_resnet50_2(weights=None), _split_resnet,
        "wide_resnet50_2-95faca4d.pth", None, (256, 512, 1024),
    ),
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", lambda: models.mobilenet_v2(weights=None), _split_mobilenet_v2,
        "mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        (24, 32, 96),
    ),
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise WeightsError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None


class PyramidExtractor(nn.Module):
    """The first three stages of a backbone; forward returns their three feature maps."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def build_extractor(name: str, state_dict: dict[str, torch.Tensor] | None = None) -> PyramidExtractor:
    """A pyramid extractor; with ``state_dict`` (a full torchvision checkpoint) it is pretrained."""
    spec = get_spec(name)
    net = spec.build()
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return PyramidExtractor(spec.split(net))
