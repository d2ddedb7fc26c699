"""Shared fixtures. Tests use small images and tiny models; real data comes from ../shared."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from linewatch.tools.harness import write_config, write_images

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_HOME", str(ROOT / ".cache" / "torch"))
BOTTLE = Path(os.environ.get("LINEWATCH_BOTTLE", ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"))


def _need_bottle() -> Path:
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"MVTec bottle not found at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="session")
def script() -> Callable[[str], ModuleType]:
    """Import one of scripts/*.py by name (they are programs, not a package), once per session."""
    loaded: dict[str, ModuleType] = {}

    def load(name: str) -> ModuleType:
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            loaded[name] = mod
        return loaded[name]

    return load


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


@pytest.fixture
def folder_camera(tmp_path) -> Callable[..., dict[str, Any]]:
    """Writes ``n`` random images to tmp_path/NAME and returns a camera replaying them, in a loop unless
    ``on_end`` says otherwise: ``folder_camera("cam", 4, size=(240, 320), fps=40)``."""

    def make(name: str, n: int, size: tuple[int, int] = (48, 64), seed: int = 0, **fields: Any) -> dict[str, Any]:
        write_images(tmp_path / name, n, size=size, seed=seed)
        return {"name": name, "source": f"dir://{tmp_path / name}", "on_end": "loop", **fields}

    return make


@pytest.fixture
def daemon_config(tmp_path, request) -> Callable[..., Path]:
    """Writes tmp_path/lw.yaml (:func:`write_config`) for these cameras, with the untrained bundle unless
    ``bundle`` is given: ``daemon_config(cams, publisher={"wait_for_subscriber_s": 60})``."""

    def make(cameras: list[dict[str, Any]], bundle: Path | None = None, **sections: Any) -> Path:
        if bundle is None:
            bundle = request.getfixturevalue("untrained_bundle")
        return write_config(tmp_path / "lw.yaml", bundle, cameras, **sections)

    return make


@pytest.fixture(autouse=True)
def _structlog_defaults_after_each_test():
    """``linewatch.cli.main()`` points structlog at the sys.stderr of the moment: under capsys a stream that is
    closed after the test, which would make every later in-process log line (a fixture calibrating a bundle,
    say) raise. Each test starts from structlog's defaults instead."""
    yield
    import structlog

    structlog.reset_defaults()
