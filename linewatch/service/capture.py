"""Capture: one thread per camera reads, decodes, crops to the ROI, resizes to the model's input size
and converts to RGB, then hands the frame to the shared :class:`FrameQueue`.

Doing the pixel work here keeps the inference worker free to batch, and lets several cameras decode in
parallel (OpenCV releases the GIL). Every frame read gets the camera's next sequence number; each
number then ends either as a verdict or as one count in ``linewatch_frames_dropped_total``.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import random
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import structlog

from linewatch.imaging.images import IMAGE_EXTS, read_image, resize, to_rgb8
from linewatch.service.config import CameraConfig, ReconnectConfig
from linewatch.service.telemetry.prometheus import Metrics

log = structlog.get_logger("linewatch.capture")

MAX_MJPEG_PART = 32 << 20  # bytes: a larger "JPEG" means we lost sync with the stream


# --------------------------------------------------------------------------- frames and the queue


@dataclass
class Frame:
    camera: str
    sequence: int
    capture_time: float  # wall clock (epoch seconds): what subscribers see
    capture_mono: float  # monotonic: for latency metrics, immune to clock steps
    image: np.ndarray  # (H, W, 3) uint8 RGB at the model's input size
    frame_size: tuple[int, int]  # (width, height) of the original frame
    roi: tuple[int, int, int, int]  # (x, y, w, h) actually cropped (the whole frame without an ROI)
    ref: str | None = None  # e.g. the file name for dir:// replay
    enqueued: float = 0.0  # monotonic, set by FrameQueue.put
    order: int = field(default=0, repr=False)


class FrameQueue:
    """Frames waiting for inference: a bounded deque per camera, served oldest-first across cameras.

    When a camera's deque is full the oldest frame is dropped (newest frame wins: a late verdict on
    a stale frame is worth less than a fresh one) and counted as ``queue_full`` for that camera. One
    camera flooding cannot evict another camera's frames.
    """

    def __init__(self, maxsize: int, metrics: Metrics | None = None):
        if maxsize < 1:
            raise ValueError("maxsize must be ≥ 1")
        self.maxsize = maxsize
        self._metrics = metrics
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # the worker waits here for frames
        # sources that hold frames back instead of having them dropped (wait_for_room) wait on their own
        # condition over the same lock, so a put()'s notify() always reaches the worker
        self._room = threading.Condition(lock)
        self._queues: dict[str, deque[Frame]] = {}
        self._n = 0
        self._order = itertools.count()

    def __len__(self) -> int:
        with self._cond:
            return self._n

    def _depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels("frames").set(self._n)

    def put(self, frame: Frame) -> Frame | None:
        """Queue a frame; returns the frame dropped to make room, if any."""
        dropped = None
        with self._cond:
            dq = self._queues.setdefault(frame.camera, deque())
            if len(dq) >= self.maxsize:
                dropped = dq.popleft()
                self._n -= 1
            frame.enqueued = time.monotonic()
            frame.order = next(self._order)
            dq.append(frame)
            self._n += 1
            self._depth()
            self._cond.notify()
        if dropped is not None and self._metrics is not None:
            self._metrics.drop(dropped.camera, "queue_full")
        return dropped

    def _pop_oldest(self) -> Frame:
        best: deque[Frame] | None = None
        for dq in self._queues.values():
            if dq and (best is None or dq[0].order < best[0].order):
                best = dq
        assert best is not None
        self._n -= 1
        self._room.notify_all()  # a source waiting in wait_for_room may go on (no waiters: nearly free)
        return best.popleft()

    def get_batch(self, max_batch: int, max_wait_s: float, timeout_s: float) -> list[Frame]:
        """Up to ``max_batch`` frames: waits ≤ ``timeout_s`` for the first one, then ≤ ``max_wait_s`` more
        for the batch to fill. Returns [] on timeout."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while self._n == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            batch = [self._pop_oldest()]
            end = time.monotonic() + max_wait_s
            while len(batch) < max_batch:
                if self._n:
                    batch.append(self._pop_oldest())
                    continue
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._depth()
            return batch

    def drain(self) -> list[Frame]:
        """Everything still queued, oldest first (at shutdown)."""
        with self._cond:
            out = []
            while self._n:
                out.append(self._pop_oldest())
            self._depth()
            return out

    def wait_for_room(self, camera: str, timeout: float) -> bool:
        """Wait ≤ ``timeout`` s until ``camera``'s deque has room; True if it has. For sources that can hold
        a frame back rather than have the oldest dropped: a camera triggered when the inspection is ready
        (how `linewatch bench` measures capacity)."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self._queues.get(camera, ())) >= self.maxsize:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._room.wait(remaining)
            return True

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


# --------------------------------------------------------------------------- sources


class SourceError(Exception):
    """The source cannot be opened (or its frames cannot be used): the camera is down, retry later."""


class SourceLost(SourceError):
    """An open source stopped delivering."""


class FrameDecodeError(Exception):
    """One frame could not be decoded; the source is still fine."""

    def __init__(self, message: str, ref: str | None = None):
        super().__init__(message)
        self.ref = ref


@dataclass
class RawFrame:
    image: np.ndarray
    rgb: bool  # False: OpenCV's BGR (or gray/BGRA)
    ref: str | None = None


class Source(Protocol):
    paced: bool  # True: we set the rate (files, folders, snapshots); False: the camera does (live)
    description: str

    def open(self) -> None: ...

    def read(self) -> RawFrame | None: ...  # None: a finite source ended

    def close(self) -> None: ...


class DirSource:
    """``dir://PATH``: replay the images in a folder in name order (re-listed at each pass)."""

    paced = True

    def __init__(self, path: str | Path, loop: bool):
        self.path = Path(path)
        self.loop = loop
        self.description = f"dir://{self.path}"
        self._files: list[Path] = []
        self._i = 0
        self._last: str | None = None  # last file handled (read or undecodable): a reopen resumes after it
        self._decoded_this_pass = 0
        self._tried_this_pass = 0

    def _list(self) -> list[Path]:
        try:
            return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        except OSError as exc:
            raise SourceLost(f"folder {self.path} is not readable ({exc.strerror or exc})") from None

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"folder {self.path} does not exist")
        files = self._list()
        if not files:
            raise SourceError(f"folder {self.path} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        self._files = files
        self._i = 0
        if self._last is not None:  # resume after the last file we read, not from the start
            self._i = next((i for i, p in enumerate(files) if p.name > self._last), len(files))
        self._decoded_this_pass = self._tried_this_pass = 0

    def read(self) -> RawFrame | None:
        while True:
            if self._i >= len(self._files):
                if not self.loop:
                    return None
                if self._tried_this_pass and not self._decoded_this_pass:
                    # a whole pass without one readable image: back off instead of spinning
                    raise SourceLost(f"no readable image in {self.path}")
                self._files = self._list()
                if not self._files:
                    raise SourceLost(f"folder {self.path} is empty")
                self._i = 0
                self._last = None
                self._decoded_this_pass = self._tried_this_pass = 0
            path = self._files[self._i]
            self._i += 1
            self._tried_this_pass += 1
            img = read_image(path)
            if img is not None:
                self._last = path.name
                self._decoded_this_pass += 1
                return RawFrame(img, rgb=True, ref=path.name)
            if not self.path.is_dir():
                raise SourceLost(f"folder {self.path} disappeared")  # _last unchanged: retried on reopen
            if path.exists():
                self._last = path.name
                raise FrameDecodeError(f"cannot decode {path}", ref=path.name)
            # removed since the listing: not a frame, nothing to count; go on with the next file

    def close(self) -> None:
        self._files = []


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
            raise SourceError(f"cannot open {self.description}")
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
            raise SourceLost(f"{self.description} delivered no frame within {self.timeout_ms} ms")
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


class MemorySource:
    """Frames already decoded and held in memory, handed over the way a raw camera (V4L2, GigE Vision)
    delivers them: full camera resolution, no decode. For benchmarks and tests (``linewatch bench``); it
    is not a config source kind, a :class:`CameraThread` gets it through its ``source`` argument.

    Frames are handed out in turn (looping unless ``loop`` is False), as live frames (``paced`` False: an
    fps cap skips frames, it never waits).
    """

    paced = False

    def __init__(self, frames: Sequence[np.ndarray], *, rgb: bool = True, loop: bool = True, name: str = "memory"):
        if not frames:
            raise ValueError("MemorySource needs at least one frame")
        self.frames = list(frames)
        self.rgb = rgb
        self.loop = loop
        h, w = self.frames[0].shape[:2]
        self.description = f"raw://{name} ({len(self.frames)} frames {w}x{h} in memory)"
        self._i = 0

    def open(self) -> None:
        pass

    def read(self) -> RawFrame | None:
        if self._i >= len(self.frames):
            if not self.loop:
                return None
            self._i = 0
        img = self.frames[self._i]
        self._i += 1
        return RawFrame(img, rgb=self.rgb)

    def close(self) -> None:
        pass


def make_source(cfg: CameraConfig) -> Source:
    kind = cfg.kind
    if kind == "dir":
        return DirSource(cfg.source[len("dir://"):], loop=cfg.on_end == "loop")
    if kind == "http":
        return MJPEGSource(cfg.source, cfg.timeout_s)
    return OpenCVSource(kind, cfg.source, cfg.timeout_s, loop=cfg.on_end == "loop")


# --------------------------------------------------------------------------- frame preparation


def prepare(raw: RawFrame, roi: tuple[int, int, int, int] | None, input_size: tuple[int, int]
            ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]]:
    """ROI crop → resize to the model's input → RGB. Returns (image, (frame w, h), effective roi).

    Cropping first means only the region is resized; colour conversion runs on the small image
    (it commutes with resizing, so the result equals converting first). The resize is
    :func:`linewatch.imaging.images.resize`, the same one used offline, so streamed scores equal offline scores.
    """
    img = raw.image
    h, w = img.shape[:2]
    if roi is not None:
        x, y, rw, rh = roi
        if x >= w or y >= h:
            raise SourceError(f"roi {list(roi)} lies outside the {w}x{h} frame; fix the camera's roi")
        x2, y2 = min(x + rw, w), min(y + rh, h)
        img = img[y:y2, x:x2]
        eff = (x, y, x2 - x, y2 - y)
    else:
        eff = (0, 0, w, h)
    small = resize(img, input_size)
    small = np.ascontiguousarray(small) if raw.rgb and small.ndim == 3 and small.shape[2] == 3 else to_rgb8(small)
    return small, (w, h), eff


def backoff_delay(attempt: int, policy: ReconnectConfig, rng: random.Random) -> float:
    """initial·2^attempt, capped at max_s, ± jitter (never above the cap)."""
    base = policy.initial_s * (2 ** min(attempt, 32))
    jittered = base * (1.0 + rng.uniform(-policy.jitter, policy.jitter))
    return max(0.0, min(policy.max_s, jittered))


# --------------------------------------------------------------------------- the camera thread

StateCallback = Callable[[str, str, "str | None"], None]  # (camera, state, reason)


class CameraThread(threading.Thread):
    """Reads one camera until stopped: open → stream → (lost → back off → reopen) | (end → stop or loop)."""

    def __init__(self, cfg: CameraConfig, queue: FrameQueue, metrics: Metrics, input_size: tuple[int, int],
                 on_state: StateCallback | None = None, source: Source | None = None,
                 rng: random.Random | None = None):
        super().__init__(name=f"capture-{cfg.name}", daemon=True)
        self.cfg = cfg
        self.name_ = cfg.name
        self.queue = queue
        self.metrics = metrics
        self.input_size = input_size
        self.source = source if source is not None else make_source(cfg)
        self.on_state = on_state
        self.rng = rng or random.Random()
        self.state = "starting"
        self.sequence = 0  # next sequence number
        self.first_attempt = threading.Event()  # set once the first open has succeeded or failed
        self.last_frame_mono: float | None = None
        self._delivered = 0  # frames delivered since the last (re)open
        self._stage_read = metrics.stage["read"]
        self._stage_prepare = metrics.stage["prepare"]
        self._stop_event = threading.Event()
        self._log = log.bind(camera=cfg.name)

    # -- control

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def _set_state(self, state: str, reason: str | None = None) -> None:
        if state == self.state:
            return
        self.state = state
        self.metrics.camera_up.labels(self.name_).set(1 if state == "up" else 0)
        if self.on_state is not None:
            try:
                self.on_state(self.name_, state, reason)
            except Exception:  # a status hook must never kill capture
                self._log.exception("state_callback_failed")

    # -- main loop

    def run(self) -> None:
        attempt = 0  # consecutive failures, for the backoff
        first = True
        while not self.stopping:
            if not first:
                self.metrics.reconnects.labels(self.name_).inc()
                self._log.info("reconnect", attempt=attempt, source=self.source.description)
            first = False
            try:
                self.source.open()
            except SourceError as exc:
                self.first_attempt.set()
                attempt = self._lost(str(exc), attempt, opening=True)
                continue
            except Exception as exc:  # an unexpected library error must not end the camera for good
                self.first_attempt.set()
                attempt = self._lost(f"{type(exc).__name__}: {exc}", attempt, opening=True)
                continue
            self.first_attempt.set()
            try:
                ended = self._stream()
            except SourceError as exc:
                self.source.close()
                attempt = self._lost(str(exc), 0 if self._delivered else attempt)
                continue
            except Exception as exc:
                self.source.close()
                self._log.exception("capture_error")
                attempt = self._lost(f"{type(exc).__name__}: {exc}", 0 if self._delivered else attempt)
                continue
            self.source.close()
            if ended:
                self._log.info("camera_ended", seq=self.sequence - 1, source=self.source.description)
                self._set_state("ended", "source ended")
                return
        self.source.close()

    def _lost(self, reason: str, attempt: int, opening: bool = False) -> int:
        delay = backoff_delay(attempt, self.cfg.reconnect, self.rng)
        was = self.state
        self._set_state("down", reason)
        if was != "down":
            self._log.warning("camera_down", reason=reason, retry_in_s=round(delay, 3),
                              phase="open" if opening else "stream", seq=self.sequence - 1)
        else:
            self._log.info("camera_still_down", reason=reason, retry_in_s=round(delay, 3), attempt=attempt)
        self._stop_event.wait(delay)
        return attempt + 1

    def _stream(self) -> bool:
        """Read until stopped, lost (raises SourceError) or ended (returns True)."""
        period = 1.0 / self.cfg.fps if self.cfg.fps else 0.0
        next_due = time.monotonic()
        self._delivered = 0
        src = self.source
        while not self.stopping:
            if src.paced and period:
                wait = next_due - time.monotonic()
                if wait > 0 and self._stop_event.wait(wait):
                    break
                next_due = max(next_due + period, time.monotonic() - period)  # no bursts after a stall
            t_read = time.perf_counter()
            try:
                raw = src.read()
            except FrameDecodeError as exc:
                self._decode_error(exc)
                continue
            if raw is None:
                return True
            now = time.monotonic()
            if not src.paced and period:
                if now + 0.25 * period < next_due:  # quarter-period slack for arrival jitter
                    self.metrics.skipped.labels(self.name_).inc()
                    continue
                next_due = max(next_due, now - period) + period
            capture_time = time.time()
            t_prep = time.perf_counter()
            image, frame_size, roi = prepare(raw, self.cfg.roi, self.input_size)
            self._stage_read.inc(t_prep - t_read)
            self._stage_prepare.inc(time.perf_counter() - t_prep)
            seq = self.sequence
            self.sequence += 1
            if self.state != "up":
                self._set_state("up")
                self._log.info("camera_up", seq=seq, source=src.description, frame_width=frame_size[0],
                               frame_height=frame_size[1])
            self._delivered += 1
            self.last_frame_mono = now
            self.metrics.captured.labels(self.name_).inc()
            self.queue.put(Frame(self.name_, seq, capture_time, now, image, frame_size, roi, raw.ref))
        return False

    def _decode_error(self, exc: FrameDecodeError) -> None:
        seq = self.sequence  # the unreadable frame still uses a number: gaps stay accounted for
        self.sequence += 1
        self.metrics.decode_errors.labels(self.name_).inc()
        self.metrics.drop(self.name_, "decode_error")
        self._log.warning("decode_error", seq=seq, file=exc.ref, error=str(exc), action="skipped")
