"""Capture in processes (``capture.mode: process``, the default): one process per camera reads, decodes, crops
and resizes, and hands uint8 frames to the daemon through a ring of shared-memory slots
(:class:`~linewatch.service.shm.FrameRing`).

Why: decoding a 900×900 PNG holds the GIL for milliseconds, and every kernel launch of the inference thread
waits for the GIL; with decoding in threads of the daemon, throughput on a GPU collapsed 20×. In a process
of its own a camera can only compete for CPU cores, never for the daemon's interpreter.

The child (started with ``spawn``: a fresh interpreter that imports the capture and source modules, never
torch) runs the same read loop as a capture thread (:class:`~linewatch.service.capture.CaptureLoop`) and
tells the daemon what happens through one pipe (bounded by the kernel's pipe buffer): per frame a 13-byte
message naming the slot, and small JSON events for state changes (up/down/ended with the reason), counts
and a heartbeat. No pixels are pickled; the daemon copies each frame out of its slot into the
:class:`~linewatch.service.frames.FrameQueue`, whose drop-oldest accounting is unchanged.

In the daemon a supervisor thread per camera (:class:`CameraProcess`) watches the child: a child that exits
(a crash) or sends nothing for the camera's ``timeout_s`` (a read that blocks for ever, whatever the
backend does) is reported down, killed, and restarted with the reconnect backoff; its shared memory is
unlinked and a new ring made. Sequence numbers carry on across restarts.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import structlog

from linewatch.backoff import backoff_delay
from linewatch.service.capture import CameraStatus, CaptureLoop, StateCallback, decode_here, prepare
from linewatch.service.config import CameraConfig
from linewatch.service.frames import Frame, FrameDecodeError, FrameQueue, RawFrame
from linewatch.service.shm import KIND_JPEG, FrameRing, SlotTooSmall
from linewatch.service.sources import Source, make_source
from linewatch.service.telemetry.prometheus import Metrics

log = structlog.get_logger("linewatch.capture")

_FRAME = struct.Struct("<Iq")  # slot, sequence (after the b"F" tag)
START_GRACE_S = 30.0  # a fresh child may take this long to import and say hello (a loaded box, a slow disk)
STOP_GRACE_S = 1.0  # at shutdown: time for a child to leave its loop before it is terminated
KILL_WAIT_S = 2.0


def heartbeat_interval(timeout_s: float) -> float:
    return max(0.05, min(1.0, timeout_s / 4))


# --------------------------------------------------------------------------- the child


def _die_with_parent() -> None:
    """Ask Linux to kill us when the daemon dies, even while we are stuck inside a read (best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _load_source(cfg: CameraConfig, source_ref: str | None) -> Source:
    if source_ref is None:
        return make_source(cfg)
    module, _, name = source_ref.partition(":")
    return getattr(importlib.import_module(module), name)(cfg)  # tests: a source the config cannot name


class _ChildLoop(CaptureLoop):
    """The read loop inside the capture process: frames into the ring, everything else as messages."""

    def __init__(self, cfg: CameraConfig, input_size: tuple[int, int] | None, source: Source, conn: Connection,
                 ring: FrameRing, stop_event: Any, start_sequence: int, heartbeat_s: float, jpeg: bool = False):
        super().__init__(cfg, input_size, source, start_sequence=start_sequence, jpeg=jpeg)
        self._stop_event = stop_event  # a multiprocessing.Event: the daemon asks us to stop
        self.conn = conn
        self.ring = ring
        self.heartbeat_s = heartbeat_s
        # the last heartbeat: it carries the stage timers and skip counts, so it must go out every heartbeat_s
        # even while frames flow (frames alone prove liveness but carry no stats)
        self._last_hb = time.monotonic()
        self._skipped = 0
        self._read_s = 0.0
        self._prepare_s = 0.0

    def _send(self, event: dict[str, Any]) -> None:
        self.conn.send_bytes(b"J" + json.dumps(event, separators=(",", ":"), default=str).encode())

    def _heartbeat(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last_hb >= self.heartbeat_s:
            self._last_hb = time.monotonic()
            self._send({"e": "hb", "skipped": self._skipped, "read_s": self._read_s, "prepare_s": self._prepare_s})
            self._skipped = 0
            self._read_s = self._prepare_s = 0.0

    def _wait(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while True:
            self._heartbeat()
            left = end - time.monotonic()
            if left <= 0:
                return self._stop_event.is_set()
            if self._stop_event.wait(min(left, self.heartbeat_s)):
                return True

    def _wait_for(self, event: Any, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not event.wait(min(self.heartbeat_s, max(0.0, end - time.monotonic()))):
            if self._stop_event.is_set() or time.monotonic() >= end:
                return
            self._heartbeat(force=True)

    def _set_state(self, state: str, reason: str | None = None, **info: object) -> None:
        self.state = state
        self._send({"e": "state", "state": state, "reason": reason, "info": info})

    def _count(self, what: str, seq: int | None = None, **info: object) -> None:
        if what == "skipped":
            self._skipped += 1
            self._heartbeat()
        elif what == "idle":  # a triggered camera waiting for a part: alive; the heartbeat says so
            self._heartbeat()
        else:
            self._send({"e": "count", "what": what, "seq": seq, "info": info})

    def _opened(self, ok: bool) -> None:
        self._send({"e": "opened", "ok": ok})

    def _capture_error(self, exc: BaseException) -> None:
        self._send({"e": "error", "error": f"{type(exc).__name__}: {exc}"})

    def _frame(self, raw: RawFrame, seq: int, capture_time: float, now: float, t_read: float) -> None:
        t_prep = time.perf_counter()
        image, frame_size, roi = prepare(raw, self.cfg.roi, self.input_size)
        self._read_s += t_prep - t_read
        self._prepare_s += time.perf_counter() - t_prep
        if self.state != "up":
            self._set_state("up", None, seq=seq, source=self.source.description, frame_width=frame_size[0],
                            frame_height=frame_size[1])
        try:
            slot = self.ring.write(seq, capture_time, now, raw.jpeg if raw.jpeg is not None else image,
                                   frame_size=frame_size, roi=roi, ref=raw.ref, device_time=raw.device_time,
                                   frame_id=raw.frame_id)
        except SlotTooSmall as exc:
            if raw.jpeg is None:
                self._send({"e": "count", "what": "too_large", "seq": seq, "info": {"error": str(exc)}})
                return
            slot = self._decoded_here(raw, seq, capture_time, now, str(exc))
            if slot is None:
                return
        self.conn.send_bytes(b"F" + _FRAME.pack(slot, seq))
        self._heartbeat()

    def _decoded_here(self, raw: RawFrame, seq: int, capture_time: float, now: float, why: str) -> int | None:
        """A JPEG larger than a slot: decoded here instead, so the frame still goes through (as pixels).
        Returns its slot, or None when it was counted instead (does not decode, or its pixels do not fit)."""
        self._send({"e": "count", "what": "jpeg_decoded_here", "seq": seq, "info": {"error": why}})
        try:
            pixels = decode_here(raw)
        except FrameDecodeError as exc:
            self._count("decode_error", seq=seq, file=raw.ref, error=str(exc))
            return None
        image, frame_size, roi = prepare(pixels, self.cfg.roi, self.input_size)
        try:
            return self.ring.write(seq, capture_time, now, image, frame_size=frame_size, roi=roi, ref=raw.ref,
                                   device_time=raw.device_time, frame_id=raw.frame_id)
        except SlotTooSmall as exc:
            self._send({"e": "count", "what": "too_large", "seq": seq, "info": {"error": str(exc)}})
            return None


def child_main(spec: dict[str, Any], conn: Connection, stop_event: Any, gate: Any = None) -> None:
    """Entry point of a capture process. ``spec`` is plain data (see :meth:`CameraProcess._spec`); ``gate``:
    an event to wait for after saying hello, so that cameras started together begin reading together."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the daemon decides
    _die_with_parent()
    import cv2

    cv2.setNumThreads(1)  # one process per camera already runs in parallel; per-call threads oversubscribe
    if spec.get("logging") is not None:  # what a source logs goes out in the daemon's format
        from linewatch.logsetup import configure_logging

        configure_logging(*spec["logging"])
    cfg = CameraConfig.model_validate_json(spec["camera"])
    ring = FrameRing.attach(spec["ring"], spec["slots"], spec["slot_bytes"])
    try:
        input_size = tuple(spec["input_size"]) if spec["input_size"] is not None else None
        source = _load_source(cfg, spec.get("source_ref"))
        resume = spec.get("resume_ref")
        if resume is not None and hasattr(source, "_last"):
            source._last = resume  # a folder replay resumes after the last file the previous process read
        loop = _ChildLoop(cfg, input_size, source, conn, ring, stop_event, spec["start_sequence"],
                          spec["heartbeat_s"], jpeg=bool(spec.get("jpeg")))
        loop._send({"e": "hello", "pid": os.getpid(), "torch": "torch" in sys.modules})
        if gate is not None:
            loop._wait_for(gate, START_GRACE_S)
        loop.run_loop()
    except (BrokenPipeError, EOFError):
        pass  # the daemon went away
    finally:
        ring.close()
        conn.close()


# --------------------------------------------------------------------------- the daemon's side


def start_gate(start_method: str = "spawn") -> Any:
    """An event for :class:`CameraProcess` ``gate``: children wait for it after starting up (a process takes a
    second or more to import on a loaded box), so that cameras begin together; see :func:`open_gate`."""
    return multiprocessing.get_context(start_method).Event()


def open_gate(gate: Any, cameras: list[CameraProcess], timeout: float = START_GRACE_S) -> None:
    """Let every child read once all have started, or after ``timeout`` (a child that cannot start must not
    hold the others)."""
    end = time.monotonic() + timeout
    for cam in cameras:
        cam.hello.wait(max(0.0, end - time.monotonic()))
    gate.set()


class CameraProcess(CameraStatus, threading.Thread):
    """In the daemon: runs one camera's capture process and supervises it (see the module docstring).

    Offers what the daemon uses of a :class:`~linewatch.service.capture.CameraThread`: ``camera``, ``state``,
    ``sequence``, ``first_attempt``, ``last_frame_mono``, ``stop()``, ``join()``, ``is_alive()``.
    """

    def __init__(self, cfg: CameraConfig, queue: FrameQueue, metrics: Metrics, input_size: tuple[int, int] | None,
                 *, slots: int, slot_bytes: int, on_state: StateCallback | None = None,
                 source_ref: str | None = None, rng: random.Random | None = None,
                 start_method: str = "spawn", gate: Any = None, logging: tuple[str, str] | None = None,
                 jpeg: bool = False):
        super().__init__(name=f"capture-{cfg.name}", daemon=True)
        self.cfg = cfg
        self.camera = cfg.name
        self.queue = queue
        self.metrics = metrics
        self.input_size = input_size
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.on_state = on_state
        self.source_ref = source_ref
        self.jpeg = jpeg  # capture.jpeg_decode: JPEG sources hand their bytes over undecoded
        self.jpeg_decoded_here = 0  # JPEGs too large for a slot, decoded in the capture process instead
        self.rng = rng or random.Random()
        self.state = "starting"
        self.sequence = 0  # next sequence number
        self.first_attempt = threading.Event()
        self.last_frame_mono: float | None = None
        self.restarts = 0  # capture processes killed or crashed and started again
        self.child_pid: int | None = None
        self.child_imported_torch: bool | None = None  # from the child's hello (tests check it stays False)
        self.ring_name: str | None = None
        self._ctx = multiprocessing.get_context(start_method)
        self.logging = logging  # (format, level) for the child's own log lines, as configure_logging takes
        self.gate = gate  # see start_gate(): cameras started together read their first frames together
        self.hello = threading.Event()  # a capture process has started (its imports are done) at least once
        self._stop_event = threading.Event()
        self._proc: Any = None
        self._ended = False
        self._hello = False  # the current child has said hello (its imports are done)
        self._delivered = 0
        self._last_ref: str | None = None
        self._stage_read = metrics.stage["read"]
        self._stage_prepare = metrics.stage["prepare"]
        self._log = log.bind(camera=cfg.name)

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def _spec(self, ring: FrameRing) -> dict[str, Any]:
        return {"camera": self.cfg.model_dump_json(), "ring": ring.name, "slots": self.slots,
                "slot_bytes": self.slot_bytes,
                "input_size": list(self.input_size) if self.input_size is not None else None,
                "start_sequence": self.sequence, "resume_ref": self._last_ref,
                "heartbeat_s": heartbeat_interval(self.cfg.timeout_s), "source_ref": self.source_ref,
                "logging": list(self.logging) if self.logging is not None else None, "jpeg": self.jpeg}

    def run(self) -> None:
        attempt = 0
        while not self.stopping:
            outcome, reason = self._life()
            self.first_attempt.set()
            if outcome in ("ended", "stopped"):
                return
            self.restarts += 1
            delay = backoff_delay(attempt, self.cfg.reconnect, self.rng)
            self._report_state("down", reason, retry_in_s=round(delay, 3), phase=outcome, seq=self.sequence - 1,
                               attempt=attempt)
            attempt = 0 if self._delivered else attempt + 1
            if self._stop_event.wait(delay):
                return
            self._report_count("reconnect", attempt=attempt, source=f"capture process ({outcome})")

    def _life(self) -> tuple[str, str]:
        """One capture process from start to end: ("ended" | "stopped" | "crashed" | "stalled", reason)."""
        ring = FrameRing.create(self.slots, self.slot_bytes)
        self.ring_name = ring.name
        recv, send = self._ctx.Pipe(duplex=False)
        child_stop = self._ctx.Event()
        proc = self._ctx.Process(target=child_main, args=(self._spec(ring), send, child_stop, self.gate),
                                 name=f"linewatch-capture-{self.camera}", daemon=True)
        self._delivered = 0
        self._hello = False
        try:
            try:
                proc.start()
            except Exception as exc:  # e.g. out of processes or memory: the camera is down, retried later
                return "crashed", f"cannot start a capture process ({type(exc).__name__}: {exc})"
            self._proc = proc
            self.child_pid = proc.pid
            send.close()  # ours is closed: the pipe reads EOF once the child's end is gone too
            return self._supervise(proc, recv, ring, child_stop)
        finally:
            self._end_child(proc)
            recv.close()
            ring.close()  # unlink: a restarted child gets a fresh ring

    def _supervise(self, proc: Any, recv: Connection, ring: FrameRing, child_stop: Any) -> tuple[str, str]:
        limit = self.cfg.timeout_s
        tick = max(0.02, min(0.1, limit / 10))
        last = time.monotonic()
        while True:
            if self.stopping:
                child_stop.set()
                end = time.monotonic() + STOP_GRACE_S
                while proc.is_alive() and time.monotonic() < end:  # deliver what it still sends
                    if recv.poll(0.05) and self._drain(recv, ring) is None:
                        break
                return "stopped", "stopping"
            ready = multiprocessing.connection.wait([recv, proc.sentinel], timeout=tick)
            now = time.monotonic()
            if recv in ready:
                got = self._drain(recv, ring)
                if got:
                    last = now
                if got is None or (proc.sentinel in ready and not proc.is_alive()):
                    proc.join(KILL_WAIT_S)
                    if self._ended:
                        return "ended", "source ended"
                    return "crashed", f"the capture process exited (code {proc.exitcode})"
            elif proc.sentinel in ready:
                proc.join(KILL_WAIT_S)
                if self._ended:
                    return "ended", "source ended"
                return "crashed", f"the capture process exited (code {proc.exitcode})"
            waited = now - last
            if waited > (limit if self._hello else max(limit, START_GRACE_S)):
                return "stalled", (f"no frame or heartbeat for {waited:.1f} s (timeout_s {limit:g}): the source is "
                                   "blocked; its capture process is killed and restarted")

    def _drain(self, recv: Connection, ring: FrameRing) -> int | None:
        """Handle every message waiting; returns how many, None at end of stream (the child is gone)."""
        n = 0
        try:
            while recv.poll(0):
                msg = recv.recv_bytes()
                n += 1
                if msg[:1] == b"F":
                    slot, seq = _FRAME.unpack_from(msg, 1)
                    self._take(ring, slot, seq)
                else:
                    self._event(json.loads(msg[1:]))
        except (EOFError, OSError):
            return None
        return n

    def _take(self, ring: FrameRing, slot: int, seq: int) -> None:
        self.sequence = max(self.sequence, seq + 1)
        got = ring.read(slot, seq)
        if got is None:  # overwritten in the ring before we came to it: the oldest frame made room
            self.metrics.drop(self.camera, "queue_full")
            return
        self._delivered += 1
        self._last_ref = got.ref
        self.last_frame_mono = got.capture_mono
        self.metrics.captured.labels(self.camera).inc()
        jpeg = got.kind == KIND_JPEG
        self.queue.put(Frame(self.camera, seq, got.capture_time, got.capture_mono, None if jpeg else got.data,
                             got.frame_size, got.roi, got.ref, device_time=got.device_time, frame_id=got.frame_id,
                             jpeg=got.data.tobytes() if jpeg else None))

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("e")
        if kind == "hb":
            if ev.get("skipped"):
                self.metrics.skipped.labels(self.camera).inc(ev["skipped"])
            self._stage_read.inc(ev.get("read_s", 0.0))
            self._stage_prepare.inc(ev.get("prepare_s", 0.0))
        elif kind == "state":
            if ev["state"] == "ended":
                self._ended = True
            self._report_state(ev["state"], ev.get("reason"), **ev.get("info", {}))
        elif kind == "count":
            seq = ev.get("seq")
            if seq is not None:
                self.sequence = max(self.sequence, seq + 1)
            if ev["what"] == "jpeg_decoded_here":  # not lost: decoded in the capture process instead
                self.jpeg_decoded_here += 1
                if self.jpeg_decoded_here == 1:  # once per camera: it repeats for every large JPEG
                    self._log.warning("jpeg_decoded_in_capture", seq=seq, error=ev["info"].get("error"),
                                      action="decoded in the capture process; raise capture.slot_mb to decode "
                                      "such JPEGs on the device")
            elif ev["what"] == "too_large":
                self.metrics.drop(self.camera, "decode_error")
                self._log.warning("frame_too_large", seq=seq, error=ev["info"].get("error"),
                                  action="skipped; raise capture.slot_mb")
            else:
                self._report_count(ev["what"], seq, **ev.get("info", {}))
        elif kind == "opened":
            self.first_attempt.set()
        elif kind == "hello":
            self._hello = True
            self.hello.set()
            self.child_imported_torch = bool(ev.get("torch"))
            self._log.debug("capture_process_started", pid=ev.get("pid"))
        elif kind == "error":
            self._log.error("capture_error", error=ev.get("error"))

    def _end_child(self, proc: Any) -> None:
        """Make sure the child is gone: terminate, then kill (a read stuck in C ignores nothing but SIGKILL)."""
        if proc.pid is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(KILL_WAIT_S / 2)
        if proc.is_alive():
            proc.kill()
            proc.join(KILL_WAIT_S)
        if proc.is_alive():
            self._log.error("capture_process_stuck", pid=proc.pid)
        else:
            proc.close()
        self._proc = None
