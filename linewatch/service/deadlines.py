"""Part-triggered mode: every frame of a triggered camera (``trigger: hardware|software``) is a part, and a part
whose verdict is not ready within the camera's ``verdict_deadline_ms`` gets a *timeout* verdict instead.

A PLC gating rejects cannot wait: a part that reaches the gate without a verdict must be rejected, and the
reason must be visible. So, per part:

* :meth:`DeadlineTracker.register` when the frame is queued (the :class:`~linewatch.service.frames.FrameQueue`
  ``on_put`` hook): its deadline is ``capture_mono + verdict_deadline_ms``;
* :meth:`DeadlineTracker.settle` when the worker has its verdict: True if in time (publish it); False if the
  deadline has passed — the timeout verdict was (or is, right then) published and the late verdict is **not**
  published, only counted (``linewatch_parts_late_total``). One verdict per part and per sequence number,
  so a v1 subscriber never sees the same sequence twice; the part was rejected already;
* parts past their deadline are expired by one timer thread (a heap, not a thread per frame) which calls
  ``on_timeout`` (the worker publishes a ``fail`` verdict with ``timed_out: true`` and no score, counted in
  ``linewatch_parts_timed_out_total``). A frame dropped before inference (queue full, shutdown) thus still
  gets its timeout verdict: never silent.

Pending parts are bounded (``max_pending``): when full, the oldest part times out at once (reason
``overflow``), which is what would happen to it anyway with that many parts ahead of it. At shutdown every
part still pending times out (reason ``shutdown``). The clock is injectable so tests can drive time.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from linewatch.service.config import CameraConfig
    from linewatch.service.frames import Frame

log = structlog.get_logger("linewatch.deadlines")

MAX_PENDING = 4096
MAX_TIMER_WAIT_S = 1.0  # the timer thread re-checks at least this often (a bound on every wait)


def part_id(frame: Frame) -> int:
    """The part a frame shows: the camera's frame id when it gives one, else the frame's sequence number."""
    return int(frame.frame_id) if frame.frame_id is not None else int(frame.sequence)


@dataclass
class Part:
    """A part waiting for its verdict: what a timeout verdict needs to say which part it is about."""

    camera: str
    sequence: int
    part_id: int
    capture_time: float
    deadline: float  # on the tracker's clock (monotonic)
    frame_size: tuple[int, int]
    roi: tuple[int, int, int, int]
    ref: str | None = None
    frame_id: int | None = None
    device_time: int | None = None
    reason: str = "deadline"  # why it timed out: deadline | overflow | shutdown


TimeoutFn = Callable[[Part], None]


class DeadlineTracker:
    """Deadlines of the parts of triggered cameras; see the module docstring."""

    def __init__(self, deadlines_s: dict[str, float | None], *, on_timeout: TimeoutFn | None = None,
                 max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.monotonic):
        """``deadlines_s``: every triggered camera → its deadline in seconds (None: parts, but no deadline)."""
        if max_pending < 1:
            raise ValueError("max_pending must be ≥ 1")
        self.deadlines_s = dict(deadlines_s)
        self.on_timeout = on_timeout
        self.max_pending = max_pending
        self.clock = clock
        self._cond = threading.Condition()
        self._pending: dict[tuple[str, int], Part] = {}  # insertion order = oldest first
        self._heap: list[tuple[float, int, tuple[str, int]]] = []  # (deadline, order, key); lazily cleaned
        self._order = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.timed_out = 0

    @classmethod
    def for_cameras(cls, cameras: Iterable[CameraConfig], **kwargs: object) -> DeadlineTracker | None:
        """A tracker for the triggered cameras of a config, or None when no camera is triggered."""
        triggered = {c.name: (c.verdict_deadline_ms / 1000.0 if c.verdict_deadline_ms is not None else None)
                     for c in cameras if c.trigger != "none"}
        return cls(triggered, **kwargs) if triggered else None  # type: ignore[arg-type]

    # -- queries

    def triggered(self, camera: str) -> bool:
        return camera in self.deadlines_s

    @property
    def has_deadlines(self) -> bool:
        return any(d is not None for d in self.deadlines_s.values())

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def next_due(self) -> float | None:
        """The earliest deadline still pending (tracker clock), or None."""
        with self._cond:
            self._clean_heap()
            return self._heap[0][0] if self._heap else None

    # -- the hooks

    def register(self, frame: Frame) -> None:
        """A frame of a camera with a deadline was queued (FrameQueue.on_put): start its part's clock."""
        limit = self.deadlines_s.get(frame.camera)
        if limit is None:
            return
        part = Part(camera=frame.camera, sequence=frame.sequence, part_id=part_id(frame),
                    capture_time=frame.capture_time, deadline=frame.capture_mono + limit,
                    frame_size=frame.frame_size, roi=frame.roi, ref=frame.ref, frame_id=frame.frame_id,
                    device_time=frame.device_time)
        overflow: Part | None = None
        with self._cond:
            if self._closing:
                part.reason = "shutdown"
                overflow = part
            else:
                if len(self._pending) >= self.max_pending:
                    overflow = self._pending.pop(next(iter(self._pending)))
                    overflow.reason = "overflow"
                key = (part.camera, part.sequence)
                self._pending[key] = part
                heapq.heappush(self._heap, (part.deadline, next(self._order), key))
                self._cond.notify()
        if overflow is not None:
            self._fire([overflow])

    def settle(self, frame: Frame) -> bool:
        """The worker has the verdict for ``frame``: True → publish it; False → its part has timed out
        (the timeout verdict went out, now if not before) and this late verdict must not be published."""
        if self.deadlines_s.get(frame.camera) is None:
            return True
        key = (frame.camera, frame.sequence)
        with self._cond:
            part = self._pending.pop(key, None)
        if part is None:
            return False  # expired already (deadline, overflow or shutdown)
        if self.clock() > part.deadline:  # due, but the timer has not got to it yet: the deadline still rules
            self._fire([part])
            return False
        return True

    def expire(self) -> int:
        """Time out every part past its deadline now; returns how many. The timer thread calls this."""
        now = self.clock()
        due: list[Part] = []
        with self._cond:
            while self._heap and self._heap[0][0] < now:
                _, _, key = heapq.heappop(self._heap)
                part = self._pending.pop(key, None)
                if part is not None:
                    due.append(part)
        self._fire(due)
        return len(due)

    def _clean_heap(self) -> None:
        while self._heap and self._heap[0][2] not in self._pending:
            heapq.heappop(self._heap)

    def _fire(self, parts: list[Part]) -> None:
        """Outside the lock: on_timeout publishes, and must not hold up register/settle."""
        for part in parts:
            self.timed_out += 1
            if self.on_timeout is None:
                continue
            try:
                self.on_timeout(part)
            except Exception:  # one failed timeout must not stop the others
                log.exception("timeout_callback_failed", camera=part.camera, seq=part.sequence)

    # -- the timer thread

    def start(self) -> None:
        if self._thread is not None or not self.has_deadlines:
            return
        self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
                self._clean_heap()
                wait = MAX_TIMER_WAIT_S if not self._heap else self._heap[0][0] - self.clock()
                if wait > 0:
                    self._cond.wait(min(wait, MAX_TIMER_WAIT_S))
                    continue
            self.expire()

    def close(self, timeout: float = 5.0) -> int:
        """Stop the timer; every part still pending times out (reason ``shutdown``). Returns how many."""
        with self._cond:
            self._closing = True
            left = list(self._pending.values())
            self._pending.clear()
            self._heap.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for part in left:
            part.reason = "shutdown"
        self._fire(left)
        return len(left)
