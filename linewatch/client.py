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

With ``previews=True`` (and ``publisher.preview`` set on the daemon) verdicts may carry the frame the
model saw and its anomaly heatmap: ``v.preview_jpeg`` and ``v.heatmap_png`` (None when absent; see
:mod:`linewatch.messages` for the heatmap's scale). Verdicts whose preview this subscriber missed are
counted in ``previews_missed``.

A daemon with ``publisher.curve`` (encrypted, optionally only for listed clients) needs keys::

    Subscriber("tcp://10.0.0.5:5555", curve={"server_public_key": "/etc/lw/server.key",
                                             "client_secret_key": "/etc/lw/mes.key_secret"})
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import zmq

from linewatch.messages import (
    PREVIEW_PREFIX,
    STATUS_TOPIC,
    MessageError,
    Preview,
    Status,
    Verdict,
    decode,
    preview_topic,
    verdict_topic,
)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
MAX_HELD_PREVIEWS = 256  # previews waiting for their verdict: one per camera normally; bounded whatever comes
_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the daemon refused this client key (not in its authorized_clients_dir?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "CURVE handshake failed (wrong server public key, or the daemon "
                                         "does not use CURVE?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "CURVE handshake failed (wrong server public key?)",
}


@dataclass
class CurveKeys:
    """Keys for a daemon with ``publisher.curve`` (see ``linewatch keys generate``).

    ``server_public_key``: the daemon's ``server.key`` file (or its 40 Z85 characters).
    ``client_secret_key``: this subscriber's ``NAME.key_secret``; None = a throwaway key, enough for a
    daemon without ``authorized_clients_dir`` (encryption only)."""

    server_public_key: str | os.PathLike | bytes
    client_secret_key: str | os.PathLike | None = None


class Subscriber:
    """``curve``: :class:`CurveKeys` or a dict with the same keys, for a daemon with ``publisher.curve``.
    With CURVE, handshakes the daemon refused are counted in ``handshake_failures`` (reason in
    ``last_error``): a refused subscriber receives nothing, it does not raise."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, cameras: Iterable[str] | None = None,
                 status: bool = False, rcvhwm: int = 10_000, context: zmq.Context | None = None,
                 curve: CurveKeys | Mapping[str, object] | None = None, previews: bool = False):
        self.endpoint = endpoint
        self.cameras = set(cameras) if cameras else None
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # a restarting daemon is found again quickly
        self.handshake_failures = 0
        self._monitor: zmq.Socket | None = None
        if curve is not None:
            try:
                self._setup_curve(curve if isinstance(curve, CurveKeys) else CurveKeys(**curve))  # type: ignore[arg-type]
            except BaseException:
                self._sock.close(linger=0)
                if self._own_ctx:
                    self._ctx.term()
                raise
        if self.cameras:
            # ZeroMQ matches prefixes ("verdict.a" also matches "verdict.ab"): filtered exactly below
            for cam in self.cameras:
                self._sock.setsockopt_string(zmq.SUBSCRIBE, verdict_topic(cam))
        else:
            self._sock.setsockopt_string(zmq.SUBSCRIBE, "verdict.")
        if previews:
            # a preview comes just before its verdict, on a topic of its own (old subscribers never see it)
            for topic in ([preview_topic(cam) for cam in self.cameras] if self.cameras else [PREVIEW_PREFIX]):
                self._sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        if status:
            self._sock.setsockopt_string(zmq.SUBSCRIBE, STATUS_TOPIC)
        self._sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)
        self.malformed = 0
        self.last_error: str | None = None
        self.gaps: dict[str, int] = {}
        self._last_seq: dict[tuple[str, str], int] = {}
        self.previews = previews
        self.previews_missed = 0
        self._held: dict[tuple[str, str], Preview] = {}  # (run_id, camera) → the preview of its next verdict

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup_curve(self, keys: CurveKeys) -> None:
        from linewatch.security import read_public_key, read_secret_key

        server = read_public_key(keys.server_public_key)
        if keys.client_secret_key is not None:
            public, secret = read_secret_key(keys.client_secret_key)
        else:
            public, secret = zmq.curve_keypair()
        self._sock.curve_serverkey = server
        self._sock.curve_publickey = public
        self._sock.curve_secretkey = secret
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        assert self._monitor is not None
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            reason = _HANDSHAKE_FAILED.get(event["event"])
            if reason is not None:
                self.handshake_failures += 1
                self.last_error = reason

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
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
            ready = dict(self._poller.poll(wait_ms))
            if not ready:
                return None
            if self._monitor is not None and self._monitor in ready:
                self._read_monitor()
            if self._sock not in ready:
                continue
            parts = self._sock.recv_multipart(zmq.NOBLOCK)
            try:
                msg = decode(parts)
            except MessageError as exc:
                self.malformed += 1
                self.last_error = str(exc)
                continue
            if isinstance(msg, Preview):
                self._hold(msg)
                continue
            if isinstance(msg, Verdict):
                if self.cameras is not None and msg.camera not in self.cameras:
                    continue
                self._track(msg)
                self._attach(msg)
            return msg

    def _hold(self, p: Preview) -> None:
        if self.cameras is not None and p.camera not in self.cameras:
            return
        key = (p.run_id, p.camera)
        self._held.pop(key, None)  # a preview whose verdict never came (lost on the way) is replaced
        if len(self._held) >= MAX_HELD_PREVIEWS:
            self._held.pop(next(iter(self._held)))
        self._held[key] = p

    def _attach(self, v: Verdict) -> None:
        if not self.previews:
            return
        p = self._held.get((v.run_id, v.camera))
        if p is not None and p.sequence == v.sequence:
            del self._held[(v.run_id, v.camera)]
            v.preview_jpeg, v.heatmap_png = p.preview_jpeg, p.heatmap_png
        elif v.preview_sent:
            self.previews_missed += 1

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
              count: int | None = None, curve: CurveKeys | Mapping[str, object] | None = None) -> Iterator[Verdict]:
    """One-liner form: ``for v in subscribe("tcp://host:5555", camera="line1", timeout=5): ...``"""
    with Subscriber(endpoint, cameras=[camera] if camera else None, curve=curve) as sub:
        yield from sub.verdicts(timeout=timeout, count=count)
