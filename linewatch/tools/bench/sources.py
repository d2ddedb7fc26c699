"""The bench's cameras: frames held in memory (a raw camera, minus the camera), and a trigger that hands
a camera's next frame over only when the pipeline has room for it — through :class:`RoomQueue`, the frame
queue the bench gives the daemon (``Daemon(queue_factory=RoomQueue)``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from linewatch.service.frames import Frame, FrameQueue, RawFrame

if TYPE_CHECKING:
    from linewatch.service.sources import Source
    from linewatch.service.telemetry.prometheus import Metrics


class RoomQueue(FrameQueue):
    """The daemon's frame queue, plus :meth:`wait_for_room` for sources that hold a frame back rather than
    have the oldest dropped. Queueing, batching and the drop policy are :class:`FrameQueue`'s own."""

    def __init__(self, maxsize: int, metrics: Metrics | None = None):
        super().__init__(maxsize, metrics)
        # a condition of its own over the queue's lock: put()'s notify() must always reach the worker, never
        # a source waiting here
        self._room = threading.Condition(self._lock)

    def _taken(self, frame: Frame) -> None:
        self._room.notify_all()  # with no source waiting: nearly free

    def wait_for_room(self, camera: str, timeout: float) -> bool:
        """Wait ≤ ``timeout`` s until ``camera``'s deque has room; True if it has."""
        end = time.monotonic() + timeout
        with self._room:
            while self.depth(camera) >= self.maxsize:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._room.wait(remaining)
            return True


class MemorySource:
    """Frames already decoded and held in memory, handed over the way a raw camera (V4L2, GigE Vision)
    delivers them: full camera resolution, no decode. For benchmarks and tests (``linewatch bench``); it is
    not a config source kind: a :class:`~linewatch.service.capture.CameraThread` gets it through its ``source``
    argument (``Daemon(source_factory=…)``).

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


class TriggeredSource:
    """Wraps a source so that each frame is taken only when its camera's queue has room: a camera that is
    triggered whenever the inspection can take the next part. With ``rate`` (frames/s) it is a free-running
    camera instead: a frame every 1/rate s whether or not there is room (the queue then drops the oldest).
    Time spent waiting is kept apart (it is not camera work) so ``--profile`` can show the source's own cost."""

    def __init__(self, inner: Source, queue: RoomQueue, camera: str, max_wait_s: float = 30.0,
                 rate: float | None = None):
        self.inner = inner
        self.queue = queue
        self.camera = camera
        self.max_wait_s = max_wait_s
        self.period = 1.0 / rate if rate else None
        self._next = time.monotonic()
        self.paced = inner.paced
        self.description = inner.description
        self.wait_s = 0.0
        self.released = threading.Event()  # set at the end of a run: stop holding frames back

    @property
    def jpeg_passthrough(self) -> bool:
        """The wrapped source's (capture.jpeg_decode): JPEG files reach the daemon undecoded, as in a real camera."""
        return bool(getattr(self.inner, "jpeg_passthrough", False))

    @jpeg_passthrough.setter
    def jpeg_passthrough(self, on: bool) -> None:
        if hasattr(self.inner, "jpeg_passthrough"):
            self.inner.jpeg_passthrough = on  # type: ignore[attr-defined]

    def open(self) -> None:
        self.inner.open()

    def read(self) -> RawFrame | None:
        t0 = time.perf_counter()
        if self.period is not None:  # the sensor's frame clock: not faster, and no catching up after a stall
            self._next = max(self._next + self.period, time.monotonic())
            while not self.released.is_set() and (wait := self._next - time.monotonic()) > 0:
                self.released.wait(wait)
        else:
            end = time.monotonic() + self.max_wait_s
            while not self.released.is_set() and time.monotonic() < end:
                if self.queue.wait_for_room(self.camera, 0.05):
                    break
        self.wait_s += time.perf_counter() - t0
        return self.inner.read()

    def close(self) -> None:
        self.inner.close()

