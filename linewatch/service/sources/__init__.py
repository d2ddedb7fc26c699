"""Where a camera's frames come from, one module per kind of source URL:

- :mod:`.files`: ``dir://PATH``, a folder of images replayed in name order;
- :mod:`.opencv`: V4L2 (``/dev/videoN``, ``v4l2://N``), ``rtsp://`` and video files, through OpenCV;
- :mod:`.mjpeg`: ``http(s)://`` Motion-JPEG streams and snapshot URLs, with a reader of our own;
- :mod:`.aravis`: ``aravis://CAMERA``, GenICam cameras (GigE Vision, USB3 Vision) through Aravis;
- :mod:`.pylon`: ``pylon://SERIAL``, Basler cameras through pypylon (``linewatch[pylon]``).

:mod:`.genicam` converts the GenICam pixel formats for the last two.

Each kind's module is imported by :func:`make_source` when a camera uses it, and each imports only
:mod:`linewatch.service.frames` and :func:`redact_url` from here.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from linewatch.service.config import CameraConfig
    from linewatch.service.frames import RawFrame


class Source(Protocol):
    paced: bool  # True: we set the rate (files, folders, snapshots); False: the camera does (live)
    description: str

    def open(self) -> None: ...

    def read(self) -> RawFrame | None: ...  # None: a finite source ended

    def close(self) -> None: ...


def redact_url(url: str) -> str:
    """``scheme://user:password@host:port/path`` → ``scheme://host:port/path`` (for logs and messages)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if not parts.scheme or "@" not in parts.netloc:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # IPv6
        netloc = host + (f":{parts.port}" if parts.port is not None else "")
    except ValueError:  # e.g. a port that is not a number
        return url.split("://", 1)[0] + "://" + url.rsplit("@", 1)[-1] if "@" in url else url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def make_source(cfg: CameraConfig) -> Source:
    """The source for a camera's ``source`` URL (its kind was checked when the config was loaded)."""
    # imported here: the kind modules import redact_url from this package
    kind = cfg.kind
    if kind == "dir":
        from linewatch.service.sources.files import DirSource

        return DirSource(cfg.source[len("dir://"):], loop=cfg.on_end == "loop", recursive=cfg.recursive)
    if kind == "http":
        from linewatch.service.sources.mjpeg import MJPEGSource

        return MJPEGSource(cfg.source, cfg.timeout_s)
    if kind == "aravis":
        from linewatch.service.sources.aravis import AravisSource

        return AravisSource(cfg)
    if kind == "pylon":
        from linewatch.service.sources.pylon import PylonSource

        return PylonSource(cfg)
    from linewatch.service.sources.opencv import OpenCVSource

    return OpenCVSource(kind, cfg.source, cfg.timeout_s, loop=cfg.on_end == "loop")
