"""V4L2 devices, ``rtsp://`` streams and video files, read through OpenCV (FFmpeg for the network).

RTSP (H.264/H.265) goes through OpenCV's FFmpeg backend with explicit timeouts: ``CAP_PROP_OPEN_TIMEOUT_MSEC``
bounds connecting and the DESCRIBE/SETUP/PLAY exchange, ``CAP_PROP_READ_TIMEOUT_MSEC`` each read (both the
camera's ``timeout_s``; FFmpeg's own defaults wait for ever). A stream that ends (server gone, connection
closed) or delivers nothing within the read timeout is :class:`SourceLost`, and the capture loop reopens
with the backoff. A read that blocks inside FFmpeg despite the timeout is the capture watchdog's to catch.
FFmpeg picks the transport (UDP, falling back to TCP); to force TCP interleaving, e.g. through a firewall,
start linewatch with ``OPENCV_FFMPEG_CAPTURE_OPTIONS="rtsp_transport;tcp"`` (see docs/cameras.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2

from linewatch.service.frames import RawFrame, SourceError, SourceLost
from linewatch.service.sources import redact_url


def _v4l2_index(source: str) -> int:
    m = re.search(r"(\d+)$", source)
    assert m is not None
    return int(m.group(1))


class OpenCVSource:
    """V4L2 devices, RTSP and video files through OpenCV (FFmpeg), with bounded open/read timeouts."""

    def __init__(self, kind: str, source: str, timeout_s: float, loop: bool):
        self.kind = kind
        self.source = source
        self.timeout_ms = int(timeout_s * 1000)
        self.loop = loop
        self.paced = kind == "file"
        self.description = redact_url(source)  # rtsp://user:password@… : the password never reaches the logs
        self._cap: cv2.VideoCapture | None = None
        self._index = 0

    def _path(self) -> Path:
        return Path(self.source[len("file://"):] if self.source.lower().startswith("file://") else self.source)

    def open(self) -> None:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms]
        if self.kind == "v4l2":
            cap = cv2.VideoCapture(_v4l2_index(self.source), cv2.CAP_V4L2)
        elif self.kind == "file":
            path = self._path()
            if not path.is_file():
                raise SourceError(f"video file {path} does not exist")
            cap = cv2.VideoCapture(str(path), cv2.CAP_ANY)
        else:
            cap = cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            why = (f" within {self.timeout_ms / 1000:g} s (refused, unreachable, wrong path or credentials, or not "
                   "a stream FFmpeg can read)" if self.kind == "rtsp" else "")
            raise SourceError(f"cannot open {self.description}{why}")
        if self.kind != "file":
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # hold as little as possible: we want the newest frame
        self._cap = cap
        self._index = 0

    def read(self) -> RawFrame | None:
        assert self._cap is not None
        ok, img = self._cap.read()
        if ok and img is not None:
            self._index += 1
            ref = f"{self._path().name}#{self._index - 1}" if self.kind == "file" else None
            return RawFrame(img, rgb=False, ref=ref)
        if self.kind != "file":
            raise SourceLost(f"{self.description} stopped delivering frames (stream ended, or no frame within "
                             f"{self.timeout_ms} ms)")
        if self._index == 0:
            raise SourceLost(f"video file {self.source} has no readable frames")
        if not self.loop:
            return None
        self.close()
        self.open()
        return self.read()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
