"""Subscribe to a running ``linewatch run`` from Python::

    from linewatch.client import Subscriber

    with Subscriber("tcp://127.0.0.1:5555", cameras=["line1"]) as sub:
        for v in sub.verdicts(timeout=10):          # stops after 10 s without a verdict
            if v.failed:
                print(v.camera, v.sequence, v.score, v.boxes)
                open(f"{v.sequence}.png", "wb").write(v.mask_png or b"")

Only pyzmq and :mod:`linewatch.messages` are needed (no torch, no OpenCV). Messages that do not follow
the schema are skipped and counted in ``malformed``; sequence gaps (verdicts this subscriber never
got, e.g. while it was too slow) are counted per camera in ``gaps``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import zmq

from linewatch.messages import STATUS_TOPIC, MessageError, Status, Verdict, decode, verdict_topic

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class Subscriber:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, cameras: Iterable[str] | None = None,
                 status: bool = False, rcvhwm: int = 10_000, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.cameras = set(cameras) if cameras else None
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # a restarting daemon is found again quickly
        if self.cameras:
            # ZeroMQ matches prefixes ("verdict.a" also matches "verdict.ab"): filtered exactly below
            for cam in self.cameras:
                self._sock.setsockopt_string(zmq.SUBSCRIBE, verdict_topic(cam))
        else:
            self._sock.setsockopt_string(zmq.SUBSCRIBE, "verdict.")
        if status:
            self._sock.setsockopt_string(zmq.SUBSCRIBE, STATUS_TOPIC)
        self._sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self.malformed = 0
        self.last_error: str | None = None
        self.gaps: dict[str, int] = {}
        self._last_seq: dict[tuple[str, str], int] = {}

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def _track(self, v: Verdict) -> None:
        key = (v.run_id, v.camera)
        last = self._last_seq.get(key)
        if last is not None and v.sequence > last + 1:
            self.gaps[v.camera] = self.gaps.get(v.camera, 0) + v.sequence - last - 1
        self._last_seq[key] = v.sequence if last is None else max(last, v.sequence)

    def recv(self, timeout: float | None = None) -> Verdict | Status | None:
        """The next verdict (or status, if subscribed) — None if nothing valid arrived within ``timeout`` s."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = None if end is None else max(0, int((end - time.monotonic()) * 1000))
            if not self._poller.poll(wait_ms):
                return None
            parts = self._sock.recv_multipart(zmq.NOBLOCK)
            try:
                msg = decode(parts)
            except MessageError as exc:
                self.malformed += 1
                self.last_error = str(exc)
                continue
            if isinstance(msg, Verdict):
                if self.cameras is not None and msg.camera not in self.cameras:
                    continue
                self._track(msg)
            return msg

    def messages(self, timeout: float | None = None) -> Iterator[Verdict | Status]:
        """Verdicts and status messages until ``timeout`` s pass without one (forever if None)."""
        while True:
            msg = self.recv(timeout)
            if msg is None:
                return
            yield msg

    def verdicts(self, timeout: float | None = None, count: int | None = None) -> Iterator[Verdict]:
        """Verdicts until ``count`` arrived or ``timeout`` s pass without one."""
        n = 0
        end = None if timeout is None else time.monotonic() + timeout
        while count is None or n < count:
            msg = self.recv(None if end is None else max(0.0, end - time.monotonic()))
            if msg is None:
                return
            if isinstance(msg, Verdict):
                n += 1
                if timeout is not None:
                    end = time.monotonic() + timeout
                yield msg


def subscribe(endpoint: str = DEFAULT_ENDPOINT, camera: str | None = None, timeout: float | None = None,
              count: int | None = None) -> Iterator[Verdict]:
    """One-liner form: ``for v in subscribe("tcp://host:5555", camera="line1", timeout=5): ...``"""
    with Subscriber(endpoint, cameras=[camera] if camera else None) as sub:
        yield from sub.verdicts(timeout=timeout, count=count)
