"""Shared fixtures. Tests use small images and tiny models; real data comes from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_HOME", str(ROOT / ".cache" / "torch"))
BOTTLE = Path(os.environ.get("LINEWATCH_BOTTLE", ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"))


def _need_bottle() -> Path:
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"MVTec bottle not found at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="session")
def bottle() -> Path:
    return _need_bottle()


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory) -> Path:
    """A bundle with a random (untrained) student at 64×64, thresholds from a few good bottle images."""
    from linewatch.tools.fixtures import make_untrained_bundle

    path = tmp_path_factory.mktemp("bundles") / "untrained.lwm"
    make_untrained_bundle(path, _need_bottle(), input_size=(64, 64))
    return path


@pytest.fixture(scope="session")
def bottle_bundle(tmp_path_factory) -> Path:
    """A student trained for a few epochs on bottle at 128×128, calibrated: tells defects from good parts."""
    from linewatch.tools.fixtures import make_trained_bundle

    path = tmp_path_factory.mktemp("bundles") / "bottle.lwm"
    make_trained_bundle(path, _need_bottle(), input_size=(128, 128))
    return path
