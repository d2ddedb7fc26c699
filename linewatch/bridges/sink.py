"""What every sink shares: a bounded drop-oldest queue fed by the subscriber, a thread that drains it,
capped exponential backoff between connection attempts, and the per-camera state the sinks publish."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from linewatch.backoff import backoff_delay
from linewatch.bridges.telemetry import BridgeMetrics
from linewatch.messages import Status, Verdict
from linewatch.service.config import ReconnectConfig

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    """A thread-safe FIFO of at most ``maxsize`` items: a put into a full queue drops the oldest item and
    calls ``on_drop`` with it, so a slow or disconnected sink never blocks the subscriber nor grows memory."""

    def __init__(self, maxsize: int, on_drop: Callable[[T], None] | None = None):
        if maxsize < 1:
            raise ValueError("maxsize must be ≥ 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._on_drop = on_drop
        self.dropped = 0

    def put(self, item: T) -> None:
        dropped: list[T] = []
        with self._cond:
            while len(self._items) >= self.maxsize:
                dropped.append(self._items.popleft())
            self._items.append(item)
            self.dropped += len(dropped)
            self._cond.notify()
        for old in dropped:  # outside the lock: the callback may log or count
            if self._on_drop is not None:
                self._on_drop(old)

    def get(self, timeout: float) -> T | None:
        """The oldest item, or None after ``timeout`` s without one."""
        end = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._items:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._items.popleft()

    def put_back(self, item: T) -> None:
        """Return an item taken with :meth:`get` to the front (it could not be handled yet)."""
        with self._cond:
            self._items.appendleft(item)
            self._cond.notify()

    def drain(self) -> list[T]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


Message = Verdict | Status


def message_kind(msg: Message) -> str:
    return "verdict" if isinstance(msg, Verdict) else "status"


@dataclass
class CameraState:
    """What the bridge knows about one camera from the status topic."""

    state: str = "unknown"  # the daemon's starting|up|down|ended, or unknown (daemon silent or not seen yet)
    reason: str | None = None
    condition: str | None = None  # ok|black|frozen|blurred from health messages
    time: float | None = None
    run_id: str = ""

    def as_dict(self, camera: str) -> dict[str, object]:
        return {"camera": camera, "state": self.state, "reason": self.reason, "condition": self.condition,
                "time": self.time, "run_id": self.run_id}


class CameraStates:
    """Camera states from status messages. ``apply`` returns the cameras whose state changed."""

    def __init__(self, wanted: set[str] | None):
        self.wanted = wanted
        self.cameras: dict[str, CameraState] = {c: CameraState() for c in sorted(wanted or ())}

    def _get(self, camera: str) -> CameraState | None:
        if self.wanted is not None and camera not in self.wanted:
            return None
        return self.cameras.setdefault(camera, CameraState())

    def _set(self, camera: str, changed: list[str], when: float, run_id: str, **values: object) -> None:
        cs = self._get(camera)
        if cs is None:
            return
        if any(getattr(cs, k) != v for k, v in values.items()):
            for k, v in values.items():
                setattr(cs, k, v)
            cs.time, cs.run_id = when, run_id
            changed.append(camera)

    def apply(self, s: Status) -> list[str]:
        changed: list[str] = []
        if s.kind == "camera" and s.camera:
            self._set(s.camera, changed, s.time, s.run_id, state=s.state, reason=s.reason)
        elif s.kind == "health" and s.camera:
            self._set(s.camera, changed, s.time, s.run_id, condition=s.condition)
        elif s.kind == "heartbeat":
            for cam, state in (s.cameras or {}).items():
                cs = self._get(cam)
                if cs is not None and cs.state != state:  # the reason is only known from the camera event
                    self._set(cam, changed, s.time, s.run_id, state=state, reason=None)
            for cam, health in (s.health or {}).items():
                cond = health.get("condition")
                if isinstance(cond, str):
                    self._set(cam, changed, s.time, s.run_id, condition=cond)
        return list(dict.fromkeys(changed))

    def all_unknown(self, reason: str, when: float) -> list[str]:
        """The daemon went silent or stopped: nothing it said about its cameras still holds."""
        changed: list[str] = []
        for cam in list(self.cameras):
            self._set(cam, changed, when, self.cameras[cam].run_id, state="unknown", reason=reason)
        return changed


@dataclass(frozen=True)
class UpstreamEvent:
    """From the bridge itself, in the sinks' queues like a message: the daemon is reachable or not."""

    up: bool
    reason: str
    time: float


class Sink(threading.Thread):
    """A thread that owns one outside connection (or server) and drains its queue into it."""

    sink: str = "sink"

    def __init__(self, queue_size: int, reconnect: ReconnectConfig, metrics: BridgeMetrics,
                 cameras: list[str] | None, rng: random.Random | None = None):
        super().__init__(name=f"bridge-{self.sink}", daemon=True)
        self.metrics = metrics
        self.policy = reconnect
        self.rng = rng or random.Random()
        self.queue: DropOldestQueue[Message | UpstreamEvent] = DropOldestQueue(queue_size, self._dropped_full)
        self.states = CameraStates(set(cameras) if cameras else None)
        self.stop_event = threading.Event()
        self.first_attempt = threading.Event()  # set after the first connect/listen attempt, success or not
        self.drain_deadline: float | None = None
        self.log = structlog.get_logger(f"linewatch.bridge.{self.sink}").bind(sink=self.sink)
        metrics.init_sink(self.sink, self.queue.__len__)

    # -- from the subscriber thread

    def offer(self, msg: Message | UpstreamEvent) -> None:
        self.queue.put(msg)

    def _dropped_full(self, msg: Message | UpstreamEvent) -> None:
        if not isinstance(msg, UpstreamEvent):
            self.metrics.dropped.labels(self.sink, "queue_full").inc()

    def stop(self, drain_s: float) -> None:
        """Deliver what is queued within ``drain_s`` (if connected), then end the thread."""
        self.drain_deadline = time.monotonic() + drain_s
        self.stop_event.set()

    # -- helpers for subclasses

    def backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self.policy, self.rng)

    def wait_or_stop(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless asked to stop; True if stopping."""
        return self.stop_event.wait(seconds)

    def draining_over(self) -> bool:
        return self.stop_event.is_set() and (self.drain_deadline is None or time.monotonic() >= self.drain_deadline)

    def count_leftovers(self, extra: int = 0) -> int:
        """At exit: what is still queued (plus ``extra`` sent but unconfirmed) counts as dropped at shutdown."""
        n = sum(1 for m in self.queue.drain() if not isinstance(m, UpstreamEvent)) + extra
        if n:
            self.metrics.dropped.labels(self.sink, "shutdown").inc(n)
        return n

    def set_connected(self, up: bool) -> None:
        self.metrics.connected.labels(self.sink).set(1 if up else 0)
