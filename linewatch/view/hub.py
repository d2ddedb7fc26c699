"""The view's state: one bounded record per camera, fed by a subscriber thread, read by the web clients.

Everything here is bounded whatever the daemon or the browsers do: at most ``max_cameras`` cameras (more
are ignored and counted: names come from the wire), a history of ``history`` scores and ``rejects``
failed verdicts per camera, one latest picture per camera, and per web client a queue of ``client_queue``
events — when a client does not read (a stalled or vanished browser), its oldest events are dropped and
counted, and the subscriber thread never waits for it. The daemon sees the view as one more subscriber
that reads continuously.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from linewatch.client import Subscriber
from linewatch.messages import Status, Verdict

log = structlog.get_logger("linewatch.view")

FPS_WINDOW = 20  # verdicts per camera over which the frame rate is measured
# Pictures held per camera beyond what is shown: the latest RECENT_SHOTS, and as many rejects more than the
# page lists. A page that was just told of a picture can still fetch it after newer ones have arrived.
RECENT_SHOTS = 8


def _num(x: float | None, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


@dataclass
class Shot:
    """One verdict's pictures: the preview JPEG and the heatmap PNG (see linewatch.messages)."""

    key: str  # "<run_id>-<sequence>": unique per camera, so its URL can be cached
    jpeg: bytes
    heatmap: bytes


@dataclass
class CameraView:
    name: str
    history: deque  # (verdict_time, score, failed)
    rejects: deque  # (summary, Shot | None), newest last; RECENT_SHOTS more than are shown
    state: str = "unknown"  # starting | up | down | ended (camera status), unknown before the first one
    reason: str | None = None
    condition: str | None = None  # ok | black | frozen | blurred (health status)
    fail_rate: float | None = None
    score_median_ratio: float | None = None
    mismatch: str | None = None  # a calibration_mismatch status: its reason (the camera does not look calibrated)
    last: dict[str, Any] | None = None  # the latest verdict's summary
    shot: Shot | None = None  # the latest picture
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_SHOTS))  # Shot, the latest last
    shot_summary: dict[str, Any] | None = None  # the verdict it belongs to
    times: deque = field(default_factory=lambda: deque(maxlen=FPS_WINDOW))
    verdicts: int = 0
    fails: int = 0

    def fps(self) -> float | None:
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def info(self) -> dict[str, Any]:
        """Everything but the pictures and the history: what a camera event carries."""
        return {"camera": self.name, "state": self.state, "reason": self.reason, "condition": self.condition,
                "fail_rate": _num(self.fail_rate, 4), "score_median_ratio": _num(self.score_median_ratio, 4),
                "mismatch": self.mismatch, "fps": _num(self.fps(), 2), "verdicts": self.verdicts, "fails": self.fails}

    def snapshot(self, rejects: int) -> dict[str, Any]:
        shown = list(self.rejects)[-rejects:]
        return {**self.info(), "last": self.last, "shot": self.shot_summary,
                "history": [[round(t, 3), _num(s), f] for t, s, f in self.history],
                "rejects": [summary for summary, _ in shown]}


def verdict_summary(v: Verdict, shot: Shot | None) -> dict[str, Any]:
    """A verdict as the page needs it (no mask, no image bytes: pictures are fetched by key)."""
    return {
        "camera": v.camera, "seq": v.sequence, "run_id": v.run_id, "verdict": v.verdict,
        "time": round(v.verdict_time, 3), "capture_time": round(v.capture_time, 3),
        "latency_ms": _num(v.latency * 1000.0, 1), "score": _num(v.score), "threshold": _num(v.threshold),
        "pixel_threshold": _num(v.pixel_threshold), "p_value": _num(v.p_value),
        "frame": [v.frame_width, v.frame_height], "roi": list(v.roi) if v.roi is not None else None,
        "boxes": [[b.x, b.y, b.w, b.h, b.area] for b in v.boxes], "n_regions": v.n_regions,
        "defect_area": v.defect_area, "ref": v.ref, "model_id": v.model_id,
        "shot": shot.key if shot is not None else None,
        # triggered cameras: no verdict in time is a fail without a score
        "timed_out": bool(getattr(v, "timed_out", False)), "part_id": getattr(v, "part_id", None),
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event (JSON on one line: no newline can end it early)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n".encode()


class Client:
    """One web client's bounded event queue. Filled by the subscriber thread, emptied by the server's loop."""

    _ids = itertools.count(1)

    def __init__(self, maxlen: int, loop: asyncio.AbstractEventLoop | None):
        self.id = next(self._ids)
        self.since = time.time()
        self._events: deque[bytes] = deque()
        self.maxlen = maxlen
        self.dropped = 0  # events this client never got (it did not read fast enough)
        self.unreported = 0  # drops not yet told to the page
        self._lock = threading.Lock()
        self._loop = loop
        self.wake = asyncio.Event() if loop is not None else None
        self._wake_pending = False

    def push(self, event: bytes) -> int:
        """Queue an event (never blocks); returns how many were dropped to make room (0 or 1)."""
        dropped = 0
        with self._lock:
            if len(self._events) >= self.maxlen:
                self._events.popleft()
                self.dropped += 1
                self.unreported += 1
                dropped = 1
            self._events.append(event)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake and self._loop is not None and self.wake is not None:
            try:
                self._loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:  # the server's loop is closed: nobody will read this client any more
                pass
        return dropped

    def drain(self) -> tuple[list[bytes], int]:
        """(queued events, drops since the last drain)."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            self._wake_pending = False
            unreported, self.unreported = self.unreported, 0
        if self.wake is not None:
            self.wake.clear()
        return events, unreported

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._events)


class Hub:
    """Thread-safe: :meth:`on_message` from the subscriber thread, everything else from the web server."""

    def __init__(self, *, rejects: int = 12, history: int = 300, client_queue: int = 256, max_clients: int = 32,
                 max_cameras: int = 64):
        self.rejects = rejects
        self.history = history
        self.client_queue = client_queue
        self.max_clients = max_clients
        self.max_cameras = max_cameras
        self._lock = threading.Lock()
        self._cameras: dict[str, CameraView] = {}
        self._clients: dict[int, Client] = {}
        self.daemon: dict[str, Any] = {"lifecycle": None, "run_id": None, "model_id": None, "uptime_s": None,
                                       "fps": None, "last_heard": None}
        self._lifecycle_run: str | None = None  # the run whose lifecycle message set daemon["lifecycle"]
        self.events_dropped = 0
        self.cameras_ignored = 0
        self.subscriber: dict[str, Any] = {}
        self.closed = False

    # -- cameras

    def _camera(self, name: str) -> CameraView | None:
        cam = self._cameras.get(name)
        if cam is None:
            if len(self._cameras) >= self.max_cameras:
                self.cameras_ignored += 1
                return None
            cam = CameraView(name, history=deque(maxlen=self.history),
                             rejects=deque(maxlen=self.rejects + RECENT_SHOTS))
            self._cameras[name] = cam
        return cam

    def camera_names(self) -> list[str]:
        with self._lock:
            return sorted(self._cameras)

    # -- the subscriber thread

    def on_message(self, msg: Verdict | Status) -> None:
        with self._lock:
            self.daemon["last_heard"] = time.time()
            events = self._on_verdict(msg) if isinstance(msg, Verdict) else self._on_status(msg)
            clients = list(self._clients.values())
        for ev in events:
            for c in clients:
                self.events_dropped += c.push(ev)  # only this thread adds to it

    def _on_verdict(self, v: Verdict) -> list[bytes]:
        cam = self._camera(v.camera)
        if cam is None:
            return []
        shot = None
        if v.preview_jpeg is not None and v.heatmap_png is not None:
            shot = Shot(key=f"{v.run_id}-{v.sequence}", jpeg=v.preview_jpeg, heatmap=v.heatmap_png)
        summary = verdict_summary(v, shot)
        cam.last = summary
        cam.verdicts += 1
        cam.times.append(v.verdict_time)
        cam.history.append((v.verdict_time, v.score, v.failed))
        if shot is not None:
            cam.shot, cam.shot_summary = shot, summary
            cam.recent.append(shot)
        if v.failed:
            cam.fails += 1
            cam.rejects.append((summary, shot))
        if cam.state in ("unknown", "starting", "down"):
            cam.state = "up"  # verdicts are flowing: it is up, whatever we missed
        return [sse("verdict", {**summary, "fps": _num(cam.fps(), 2), "state": cam.state})]

    def _on_status(self, s: Status) -> list[bytes]:
        events: list[bytes] = []
        changed: set[str] = set()
        if s.run_id:
            self.daemon["run_id"] = s.run_id
        if s.kind == "camera" and s.camera is not None:
            cam = self._camera(s.camera)
            if cam is not None:
                cam.state, cam.reason = s.state or cam.state, s.reason
                changed.add(cam.name)
        elif s.kind == "health" and s.camera is not None:
            cam = self._camera(s.camera)
            if cam is not None:
                cam.condition = s.condition
                cam.fail_rate = s.fail_rate if s.fail_rate is not None else cam.fail_rate
                cam.score_median_ratio = s.score_median_ratio if s.score_median_ratio is not None \
                    else cam.score_median_ratio
                changed.add(cam.name)
        elif s.kind == "heartbeat":
            self.daemon.update(model_id=s.model_id, uptime_s=_num(s.uptime_s, 1), fps=_num(s.fps, 2))
            if self._lifecycle_run != s.run_id:  # the view started late, or the daemon restarted: it is running
                self.daemon["lifecycle"], self._lifecycle_run = "ready", s.run_id
            for name, state in (s.cameras or {}).items():
                cam = self._camera(name)
                if cam is not None and cam.state != state:
                    cam.state = state
                    changed.add(name)
            for name, h in (s.health or {}).items():
                cam = self._camera(name)
                if cam is None:
                    continue
                before = (cam.condition, cam.fail_rate, cam.score_median_ratio)
                cond, fr, smr = h.get("condition"), h.get("fail_rate"), h.get("score_median_ratio")
                cam.condition = cond if isinstance(cond, str) else cam.condition
                cam.fail_rate = float(fr) if isinstance(fr, (int, float)) else cam.fail_rate
                cam.score_median_ratio = float(smr) if isinstance(smr, (int, float)) else cam.score_median_ratio
                if (cam.condition, cam.fail_rate, cam.score_median_ratio) != before:
                    changed.add(name)
        elif s.kind == "calibration_mismatch" and s.camera is not None:
            cam = self._camera(s.camera)
            if cam is not None:
                cam.mismatch = s.reason or "the camera's verdicts do not look like its calibration"
                changed.add(cam.name)
        elif s.kind == "lifecycle":
            self.daemon["lifecycle"], self._lifecycle_run = s.state, s.run_id
        events.extend(sse("camera", self._cameras[name].info()) for name in sorted(changed))
        events.append(sse("daemon", dict(self.daemon)))
        return events

    def set_subscriber_stats(self, stats: dict[str, Any]) -> None:
        with self._lock:
            self.subscriber = stats

    # -- the web server

    def register(self, loop: asyncio.AbstractEventLoop | None) -> tuple[Client, bytes] | None:
        """A new client and its first event (the whole state); None when ``max_clients`` are connected.
        Taken under the lock: every later change reaches the client as an event, none is missed."""
        with self._lock:
            if len(self._clients) >= self.max_clients:
                return None
            client = Client(self.client_queue, loop)
            self._clients[client.id] = client
            return client, sse("snapshot", self._snapshot())

    def unregister(self, client: Client) -> None:
        with self._lock:
            self._clients.pop(client.id, None)

    def _snapshot(self) -> dict[str, Any]:
        return {"daemon": dict(self.daemon),
                "cameras": [self._cameras[n].snapshot(self.rejects) for n in sorted(self._cameras)],
                "rejects_max": self.rejects, "history_max": self.history}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def image(self, camera: str, key: str, kind: str) -> bytes | None:
        """A picture still held (one of a camera's latest, or of its rejects), else None."""
        with self._lock:
            cam = self._cameras.get(camera)
            if cam is None:
                return None
            shots = [*reversed(cam.recent), *(s for _, s in cam.rejects)]
            for shot in shots:
                if shot is not None and shot.key == key:
                    return shot.jpeg if kind == "frame" else shot.heatmap
        return None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            clients = list(self._clients.values())
            out = {"cameras": len(self._cameras), "cameras_ignored": self.cameras_ignored,
                   "events_dropped": self.events_dropped, "subscriber": dict(self.subscriber)}
        out["clients"] = [{"id": c.id, "since": round(c.since, 3), "queued": c.queued, "dropped": c.dropped,
                           "max_queued": c.maxlen} for c in clients]
        return out

    def close(self) -> None:
        """Wake every client so that its stream ends."""
        with self._lock:
            self.closed = True
            clients = list(self._clients.values())
        for c in clients:
            c.push(b": closing\n\n")


class Feeder(threading.Thread):
    """Reads the daemon's stream into the hub until :meth:`stop`. The subscriber is made by the caller (so a
    bad key file is a one-line error at start, not a dead thread) and used only by this thread from then on."""

    def __init__(self, hub: Hub, subscriber: Subscriber):
        super().__init__(name="view-subscriber", daemon=True)
        self.hub = hub
        self.sub = subscriber
        self._stop_event = threading.Event()
        self.received = 0

    def stop(self) -> None:
        self._stop_event.set()

    def _stats(self) -> dict[str, Any]:
        s = self.sub
        return {"endpoint": s.endpoint, "received": self.received, "malformed": s.malformed,
                "gaps": dict(s.gaps), "previews_missed": s.previews_missed,
                "handshake_failures": s.handshake_failures, "last_error": s.last_error}

    def run(self) -> None:
        next_stats = 0.0
        try:
            while not self._stop_event.is_set():
                msg = self.sub.recv(0.25)
                if msg is not None:
                    self.received += 1
                    try:
                        self.hub.on_message(msg)
                    except Exception:  # one odd message must not end the view
                        log.exception("view_message_failed")
                now = time.monotonic()
                if now >= next_stats:
                    self.hub.set_subscriber_stats(self._stats())
                    next_stats = now + 0.2
        finally:
            self.sub.close()
