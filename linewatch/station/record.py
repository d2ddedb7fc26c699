"""``linewatch record``: frames from a configured camera, through the same capture path as ``linewatch run``
(the camera's source, ROI crop and colour conversion: :func:`linewatch.service.capture.prepare`), saved
losslessly (PNG) at the ROI's resolution, with a ``framing.json`` saying how they were framed.

Those folders are what ``linewatch calibrate --config FILE --camera NAME`` calibrates from (good parts) and
what ``linewatch evaluate --good/--defect`` measures on (labelled parts), so a model sees in production
exactly the framing it was calibrated on; the bundle keeps the framing and ``run`` checks it per camera.

Disk use is bounded: recording refuses to start when the free space is under ``margin_mb``, and stops
(keeping what it has, framing.json included) at ``max_mb`` written or when free space reaches the margin.

The service modules are imported inside the functions: calibration reads framing.json through
:func:`read_framing` without importing the daemon's capture code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import structlog

from linewatch import __version__
from linewatch.errors import DataError, LinewatchError

if TYPE_CHECKING:
    from linewatch.service.config import CameraConfig

log = structlog.get_logger("linewatch.record")

FRAMING_FILE = "framing.json"
FRAMING_FORMAT = "linewatch-framing"
FRAMING_VERSION = 1
DEFAULT_MARGIN_MB = 500.0  # never fill the disk below this: the line's other services need it too
MAX_SIZES = 16  # distinct frame sizes kept in framing.json (a camera changing size every frame is a bug)


class RecordError(LinewatchError):
    pass


@dataclass
class RecordResult:
    out: Path
    frames: int  # images written
    read: int  # frames read from the source (every K-th is written)
    decode_errors: int
    bytes: int
    seconds: float
    stopped: str  # count | seconds | ended | max_mb | disk | interrupted
    framing: dict[str, Any] = field(default_factory=dict)


def read_framing(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The framing.json of a recorded folder, or None when there is none. A malformed one is an error."""
    path = Path(folder) / FRAMING_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); re-record the folder with `linewatch record`") \
            from None
    if not isinstance(d, dict) or d.get("format") != FRAMING_FORMAT:
        raise DataError(f"{path} is not a linewatch framing file (format {FRAMING_FORMAT!r})")
    return d


def _free_mb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e6


def _colour(image: np.ndarray) -> str:
    from linewatch.service.observers.sanity import image_colour

    return image_colour(image)


def _write_framing(out: Path, framing: dict[str, Any]) -> None:
    tmp = out / (FRAMING_FILE + ".tmp")
    tmp.write_text(json.dumps(framing, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, out / FRAMING_FILE)


def record(cam: CameraConfig, out: str | os.PathLike, *, count: int | None = None, seconds: float | None = None,
           every: int = 1, max_mb: float | None = None, margin_mb: float = DEFAULT_MARGIN_MB,
           progress: bool = True) -> RecordResult:
    """Record ``cam`` into ``out`` (created; must be empty) until ``count`` images are written, ``seconds``
    have passed, the source ends, or the disk bounds are reached."""
    from linewatch.service.capture import prepare
    from linewatch.service.frames import FrameDecodeError, SourceError
    from linewatch.service.sources import make_source, redact_url

    if every < 1:
        raise RecordError(f"--every must be ≥ 1 (got {every})")
    if count is not None and count < 1:
        raise RecordError(f"--count must be ≥ 1 (got {count})")
    if seconds is not None and seconds <= 0:
        raise RecordError(f"--seconds must be > 0 (got {seconds})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecordError(f"{out} exists and is not an empty folder; record into a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot create {out} ({exc.strerror or exc})") from None
    free = _free_mb(out)
    if free < margin_mb:
        raise RecordError(f"only {free:.0f} MB free on the disk holding {out}, under the {margin_mb:.0f} MB margin; "
                          "free some space or record elsewhere")
    framing: dict[str, Any] = {
        "format": FRAMING_FORMAT, "version": FRAMING_VERSION, "camera": cam.name, "source": redact_url(cam.source),
        "roi": list(cam.roi) if cam.roi is not None else None, "source_sizes": [], "colour": None,
        "aspect_policy": "native", "every": every, "frames": 0, "linewatch_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    source = make_source(cam)
    try:
        source.open()
    except SourceError as exc:
        raise RecordError(f"camera {cam.name!r} cannot be opened: {exc}") from None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc=f"recording {cam.name}", unit="img")
    start = time.monotonic()
    written = read = decode_errors = n_bytes = 0
    colours: set[str] = set()
    stopped = "ended"
    try:
        while True:
            if count is not None and written >= count:
                stopped = "count"
                break
            if seconds is not None and time.monotonic() - start >= seconds:
                stopped = "seconds"
                break
            try:
                raw = source.read()
            except FrameDecodeError as exc:
                decode_errors += 1
                log.warning("decode_error", camera=cam.name, file=exc.ref, action="skipped")
                continue
            except SourceError as exc:
                log.warning("camera_lost", camera=cam.name, reason=str(exc))
                stopped = "ended"
                break
            if raw is None:
                break
            read += 1
            if (read - 1) % every:
                continue
            # the daemon's own crop and colour conversion; no resize: kept at the ROI's resolution
            image, frame_size, eff_roi = prepare(raw, cam.roi, None)
            size = list(frame_size)
            if size not in framing["source_sizes"] and len(framing["source_sizes"]) < MAX_SIZES:
                framing["source_sizes"].append(size)
            if cam.roi is not None:
                framing["roi"] = list(eff_roi)  # as actually cropped (an ROI past the edge is clipped)
            colours.add(_colour(image))
            ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RecordError(f"could not encode frame {read - 1} of camera {cam.name!r} as PNG")
            if max_mb is not None and (n_bytes + buf.size) / 1e6 > max_mb:
                stopped = "max_mb"
                break
            if _free_mb(out) - buf.size / 1e6 < margin_mb:
                stopped = "disk"
                break
            (out / f"{written:06d}.png").write_bytes(buf.tobytes())
            written += 1
            n_bytes += int(buf.size)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        source.close()
        if bar is not None:
            bar.close()
        framing["frames"] = written
        framing["colour"] = "mono" if colours == {"mono"} else ("rgb" if colours else None)
        _write_framing(out, framing)
    return RecordResult(out=out, frames=written, read=read, decode_errors=decode_errors, bytes=n_bytes,
                        seconds=time.monotonic() - start, stopped=stopped, framing=framing)


def check_recorded_for(framing: dict[str, Any], cam: CameraConfig, folder: str | os.PathLike) -> None:
    """A folder recorded for a camera must match the camera's current config (name and ROI): otherwise the
    model would be calibrated on one framing and run on another."""
    if framing.get("camera") != cam.name:
        raise DataError(f"{folder} was recorded from camera {framing.get('camera')!r}, not {cam.name!r}; "
                        "record this camera with `linewatch record` or pass the right --camera")
    rec_roi = framing.get("roi")
    cfg_roi = list(cam.roi) if cam.roi is not None else None
    if rec_roi != cfg_roi and not (cfg_roi is not None and rec_roi is not None and rec_roi[:2] == cfg_roi[:2]
                                   and rec_roi[2] <= cfg_roi[2] and rec_roi[3] <= cfg_roi[3]):
        # (an ROI past the frame's edge is recorded as clipped: that is the same framing)
        raise DataError(f"{folder} was recorded with roi {rec_roi}, camera {cam.name!r} now has roi {cfg_roi}; "
                        "re-record it with `linewatch record` so the model sees the camera's framing")
