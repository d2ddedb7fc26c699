"""``http(s)://`` Motion-JPEG: a multipart/x-mixed-replace stream, or a snapshot URL polled once per frame."""

from __future__ import annotations

import base64
import http.client
import re
import urllib.parse

import cv2
import numpy as np

from linewatch.imaging.images import JPEGHeaderError, jpeg_size
from linewatch.service.frames import FrameDecodeError, RawFrame, SourceError, SourceLost
from linewatch.service.sources import redact_url

MAX_MJPEG_PART = 32 << 20  # bytes: a larger "JPEG" means we lost sync with the stream


class MJPEGSource:
    """``http(s)://`` Motion-JPEG (multipart/x-mixed-replace), or a snapshot URL polled per frame.

    A small reader of our own rather than OpenCV's: explicit socket timeouts, a clear error for a URL
    that is not MJPEG, and a bad JPEG part counts as a decode error instead of ending the stream.
    """

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s
        self.paced = False
        parts = urllib.parse.urlsplit(url)
        self._parts = parts
        self.description = redact_url(url)  # no password
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._boundary: bytes | None = None
        self._at_part = False  # the boundary line of the next part has already been consumed
        # capture.jpeg_decode: parts are delivered as JPEG bytes for the model's device to decode (set by the
        # capture loop); a part without a JPEG frame header is still decoded here (a PNG snapshot, or counted)
        self.jpeg_passthrough = False

    def _request(self) -> http.client.HTTPResponse:
        p = self._parts
        cls = http.client.HTTPSConnection if p.scheme.lower() == "https" else http.client.HTTPConnection
        self.close()
        self._conn = cls(p.hostname or "", p.port, timeout=self.timeout_s)
        headers = {"Accept": "multipart/x-mixed-replace, image/jpeg, */*"}
        if p.username:
            cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        path = (p.path or "/") + (f"?{p.query}" if p.query else "")
        try:
            self._conn.request("GET", path, headers=headers)
            resp = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(f"cannot connect to {self.description} ({exc or type(exc).__name__})") from None
        if resp.status != 200:
            raise SourceError(f"{self.description} answered HTTP {resp.status} {resp.reason}")
        return resp

    def open(self) -> None:
        resp = self._request()
        ctype = resp.getheader("Content-Type", "") or ""
        if ctype.lower().startswith("multipart/"):
            m = re.search(r'boundary="?([^";]+)"?', ctype, re.IGNORECASE)
            if not m:
                raise SourceError(f"{self.description} sends multipart without a boundary")
            b = m.group(1).strip().encode("latin-1")
            self._boundary = b if b.startswith(b"--") else b"--" + b
            self._resp = resp
            self._at_part = False
        elif ctype.lower().startswith("image/"):
            self._boundary = None  # snapshot mode: one image per request, we set the pace
            self.paced = True
            self._resp = resp
        else:
            raise SourceError(f"{self.description} is not an MJPEG stream (Content-Type {ctype or 'missing'})")

    def _readline(self) -> bytes:
        assert self._resp is not None
        line = self._resp.readline(65537)
        if not line:
            raise SourceLost(f"{self.description} closed the stream")
        return line

    def _read_part(self) -> bytes:
        assert self._boundary is not None
        if not self._at_part:
            for _ in range(1000):  # skip preamble / CRLF between parts, boundedly
                if self._readline().strip() == self._boundary:
                    break
            else:
                raise SourceLost(f"{self.description}: lost sync with the multipart stream")
        self._at_part = False
        length = None
        for _ in range(100):
            line = self._readline().strip()
            if not line:
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    length = None
        if length is not None:
            if not 0 < length <= MAX_MJPEG_PART:
                raise SourceLost(f"{self.description}: part of {length} bytes")
            assert self._resp is not None
            data = self._resp.read(length)
            if len(data) < length:
                raise SourceLost(f"{self.description} closed the stream mid-frame")
            return data
        chunks: list[bytes] = []  # no Content-Length: read up to the next boundary
        size = 0
        while True:
            line = self._readline()
            if line.rstrip(b"\r\n") in (self._boundary, self._boundary + b"--"):
                self._at_part = True
                break
            chunks.append(line)
            size += len(line)
            if size > MAX_MJPEG_PART:
                raise SourceLost(f"{self.description}: no boundary within {MAX_MJPEG_PART} bytes")
        data = b"".join(chunks)
        return data[:-2] if data.endswith(b"\r\n") else data.rstrip(b"\n")

    def read(self) -> RawFrame | None:
        try:
            if self._boundary is None:
                if self._resp is None:
                    self._resp = self._request()
                data = self._resp.read(MAX_MJPEG_PART + 1)
                self._resp = None
            else:
                data = self._read_part()
        except (OSError, http.client.HTTPException) as exc:
            raise SourceLost(f"{self.description}: {exc or type(exc).__name__}") from None
        if self.jpeg_passthrough and data:
            try:
                jpeg_size(data)
                return RawFrame(None, rgb=True, jpeg=data)
            except JPEGHeaderError:
                pass
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            raise FrameDecodeError(f"{self.description}: a {len(data)}-byte part is not a decodable image")
        return RawFrame(img, rgb=False)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        self._conn = None
        self._resp = None
