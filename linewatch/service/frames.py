"""Frames on their way from the cameras to inference, the bounded :class:`FrameQueue` between them, and the
errors a source raises.

Every frame read gets its camera's next sequence number; each number then ends either as a verdict or as one
count in ``linewatch_frames_dropped_total``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from linewatch.service.telemetry.prometheus import Metrics


class SourceError(Exception):
    """The source cannot be opened (or its frames cannot be used): the camera is down, retry later."""


class SourceLost(SourceError):
    """An open source stopped delivering."""


class SourceIdle(Exception):
    """No frame yet, and nothing wrong: a hardware-triggered camera, alive, waiting for its next part. The
    capture loop reads again (a read returns within the camera's timeout, so the watchdog sees it alive)."""


class FrameDecodeError(Exception):
    """One frame could not be decoded; the source is still fine."""

    def __init__(self, message: str, ref: str | None = None, incomplete: str | None = None):
        super().__init__(message)
        self.ref = ref
        # a camera buffer that arrived incomplete or failed (GenICam sources): why, e.g. "missing_packets"
        self.incomplete = incomplete


@dataclass
class RawFrame:
    """A frame as a source delivers it, before :func:`linewatch.service.capture.prepare`."""

    image: np.ndarray | None  # None when the frame comes as ``jpeg`` (decoded by the model's device)
    rgb: bool  # False: OpenCV's BGR (or gray/BGRA)
    ref: str | None = None
    device_time: int | None = None  # the camera's own timestamp (ns on its clock), GenICam cameras only
    frame_id: int | None = None  # the camera's frame (block) id, GenICam cameras only
    # the undecoded JPEG (capture.jpeg_decode: device; its header was checked by the source), else None
    jpeg: bytes | None = None


@dataclass
class Frame:
    camera: str
    sequence: int
    capture_time: float  # wall clock (epoch seconds): what subscribers see
    capture_mono: float  # monotonic: for latency metrics, immune to clock steps
    # (H, W, 3) uint8 RGB at the model's input size, or at ROI resolution when the model resizes on its device.
    # None while the frame is still ``jpeg``: the worker then sets the decoded, ROI-cropped image, a tensor
    # on the model's device (read it on the host with host_image())
    image: Any
    frame_size: tuple[int, int]  # (width, height) of the original frame
    roi: tuple[int, int, int, int]  # (x, y, w, h) actually cropped (the whole frame without an ROI)
    ref: str | None = None  # e.g. the file name for dir:// replay
    device_time: int | None = None  # from RawFrame: the camera's timestamp (ns) and frame id, when it has them
    frame_id: int | None = None
    jpeg: bytes | None = None  # the whole frame as JPEG, for the worker to decode (capture.jpeg_decode: device)
    enqueued: float = 0.0  # monotonic, set by FrameQueue.put
    order: int = field(default=0, repr=False)
    _host: np.ndarray | None = field(default=None, repr=False)  # host_image()'s copy

    def host_image(self) -> np.ndarray:
        """The image as a host (numpy) array: the image itself, or, for a frame decoded on the device, one
        copy made on the first call and kept. Only what needs pixels on the host calls this (preview, archive,
        drift, the framing check), so most frames decoded on a GPU never come back."""
        img = self.image
        if isinstance(img, np.ndarray):
            return img
        if self._host is None:
            if img is None:
                raise ValueError(f"frame {self.camera}#{self.sequence} has not been decoded yet")
            # a torch tensor (duck-typed: this module is imported by capture processes, which never load torch)
            self._host = np.ascontiguousarray(img.detach().cpu().numpy())
        return self._host


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
        # protected, not private: a subclass may wait on a condition of its own over the same lock
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # the worker waits here for frames
        self._queues: dict[str, deque[Frame]] = {}
        self._n = 0
        self._order = itertools.count()
        # called with each frame before it is queued (part deadlines: linewatch.service.deadlines), so the
        # worker can never take a frame whose part is not yet registered
        self.on_put: Callable[[Frame], None] | None = None

    def __len__(self) -> int:
        with self._cond:
            return self._n

    def depth(self, camera: str) -> int:
        """Frames of ``camera`` waiting now."""
        with self._cond:
            return len(self._queues.get(camera, ()))

    def _depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels("frames").set(self._n)

    def put(self, frame: Frame) -> Frame | None:
        """Queue a frame; returns the frame dropped to make room, if any."""
        dropped = None
        if self.on_put is not None:
            self.on_put(frame)
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
        frame = best.popleft()
        self._taken(frame)
        return frame

    def _taken(self, frame: Frame) -> None:
        """Called with the lock held each time a frame leaves for inference (or at drain), so a subclass can
        wake whoever waits for room (`linewatch bench`'s triggered cameras). Nothing to do here."""

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

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
