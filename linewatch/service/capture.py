"""Capture: per camera, read, decode, crop to the ROI, resize to the model's input size and convert to RGB,
then hand the frame to the shared :class:`~linewatch.service.frames.FrameQueue`. With
``capture.jpeg_decode: device`` JPEG sources skip the decode: their frames travel as JPEG bytes, and the
worker decodes them in batches on the model's device.

The read loop (:class:`CaptureLoop`: open → stream → lost → back off → reopen) runs either in a thread of
the daemon (:class:`CameraThread`, ``capture.mode: thread``) or in a process of its own per camera
(:mod:`linewatch.service.capture_process`, the default), which hands frames over shared memory so that
decoding never competes with inference for the daemon's GIL. Every frame read gets the camera's next
sequence number; each number then ends either as a verdict or as one count in
``linewatch_frames_dropped_total``. The sources themselves are in :mod:`linewatch.service.sources`.

Watchdog: a source whose ``open()`` or ``read()`` has not returned for the camera's ``timeout_s`` is
reported down, whatever the backend does inside (OpenCV's FFmpeg read can retry a stalled RTSP stream for
ever). A capture process is then killed and restarted; a thread cannot be killed, so in thread mode the
camera stays down until the read returns, and the source is then closed and reopened.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import numpy as np
import structlog

from linewatch.backoff import backoff_delay
from linewatch.imaging.images import decode_image, jpeg_size, resize, to_rgb8
from linewatch.service.config import CameraConfig
from linewatch.service.frames import (
    Frame,
    FrameDecodeError,
    FrameQueue,
    RawFrame,
    SourceError,
    SourceIdle,
    SourceLost,
)
from linewatch.service.sources import Source, make_source
from linewatch.service.telemetry.prometheus import Metrics

log = structlog.get_logger("linewatch.capture")


# --------------------------------------------------------------------------- frame preparation


def prepare(raw: RawFrame, roi: tuple[int, int, int, int] | None, input_size: tuple[int, int] | None
            ) -> tuple[np.ndarray | None, tuple[int, int], tuple[int, int, int, int]]:
    """ROI crop → resize to the model's input → RGB. Returns (image, (frame w, h), effective roi).
    ``input_size`` None: no resize (the model resizes on its device, ``Detector.device_preprocess``).
    A JPEG frame (``raw.jpeg``) is not decoded: image None, the size from its header, the ROI checked against
    it; the worker decodes, crops and resizes it.

    Cropping first means only the region is resized; colour conversion runs on the small image
    (it commutes with resizing, so the result equals converting first). The resize is
    :func:`linewatch.imaging.images.resize`, the same one used offline, so streamed scores equal offline scores.
    """
    if raw.jpeg is not None:
        w, h = jpeg_size(raw.jpeg)  # the source checked it has a header
        return None, (w, h), _effective_roi(roi, w, h)
    img = raw.image
    assert img is not None
    h, w = img.shape[:2]
    x, y, rw, rh = eff = _effective_roi(roi, w, h)
    if roi is not None:
        img = img[y:y + rh, x:x + rw]
    small = resize(img, input_size) if input_size is not None else img
    small = np.ascontiguousarray(small) if raw.rgb and small.ndim == 3 and small.shape[2] == 3 else to_rgb8(small)
    return small, (w, h), eff


def _effective_roi(roi: tuple[int, int, int, int] | None, w: int, h: int) -> tuple[int, int, int, int]:
    """The part of a ``w``×``h`` frame that ``roi`` covers (the whole frame without one)."""
    if roi is None:
        return (0, 0, w, h)
    x, y, rw, rh = roi
    if x >= w or y >= h:
        raise SourceError(f"roi {list(roi)} lies outside the {w}x{h} frame; fix the camera's roi")
    x2, y2 = min(x + rw, w), min(y + rh, h)
    return (x, y, x2 - x, y2 - y)


def decode_here(raw: RawFrame) -> RawFrame:
    """A JPEG frame decoded in capture after all (it does not fit a shared-memory slot); raises
    :class:`FrameDecodeError` for one that does not decode."""
    assert raw.jpeg is not None
    img = decode_image(raw.jpeg)
    if img is None:
        raise FrameDecodeError(f"a {len(raw.jpeg)}-byte JPEG does not decode", ref=raw.ref)
    return RawFrame(img, rgb=True, ref=raw.ref, device_time=raw.device_time, frame_id=raw.frame_id)


# --------------------------------------------------------------------------- the read loop

StateCallback = Callable[[str, str, "str | None"], None]  # (camera, state, reason)
WATCHDOG_MIN_TICK_S = 0.05


class CaptureLoop:
    """One camera's read loop, independent of where it runs: a subclass says what happens to frames, states
    and counts (:class:`CameraThread`: the daemon's queue and metrics; the capture process: messages to the
    daemon)."""

    def __init__(self, cfg: CameraConfig, input_size: tuple[int, int] | None, source: Source,
                 rng: random.Random | None = None, start_sequence: int = 0, jpeg: bool = False):
        self.cfg = cfg
        self.camera = cfg.name
        self.input_size = input_size  # None: frames stay at ROI resolution (the model resizes on its device)
        self.source = source
        # capture.jpeg_decode: a source that can (dir://, http MJPEG: they have the attribute) delivers JPEG
        # bytes undecoded, for the worker to decode on the model's device
        if jpeg and hasattr(source, "jpeg_passthrough"):
            source.jpeg_passthrough = True  # type: ignore[attr-defined]
        self.rng = rng or random.Random()
        self.state = "starting"
        self.sequence = start_sequence  # next sequence number
        self.last_frame_mono: float | None = None
        self.blocked_since: float | None = None  # monotonic: inside source.open()/read() since then
        self._delivered = 0  # frames delivered since the last (re)open
        self._stop_event = threading.Event()

    # -- what a subclass provides

    def _set_state(self, state: str, reason: str | None = None, **info: object) -> None:
        raise NotImplementedError

    def _frame(self, raw: RawFrame, seq: int, capture_time: float, now: float, t_read: float) -> None:
        """A frame read at ``now`` (monotonic); ``t_read``: perf_counter when its read began."""
        raise NotImplementedError

    def _count(self, what: str, seq: int | None = None, **info: object) -> None:
        """``skipped`` | ``decode_error`` (seq, file, error) | ``reconnect`` (attempt, source) | ``idle`` (a
        triggered camera waiting for a part: nothing is counted)."""
        raise NotImplementedError

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested."""
        return self._stop_event.wait(seconds)

    def _stalled_read_returned(self) -> bool:
        """True: the read that just returned had been declared stalled by the watchdog (reopen the source)."""
        return False

    # -- control

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    # -- the loop

    def run_loop(self) -> None:
        attempt = 0  # consecutive failures, for the backoff
        first = True
        while not self.stopping:
            if not first:
                self._count("reconnect", attempt=attempt, source=self.source.description)
            first = False
            try:
                self.blocked_since = time.monotonic()
                try:
                    self.source.open()
                finally:
                    self.blocked_since = None
            except SourceError as exc:
                self._opened(False)
                attempt = self._lost(str(exc), attempt, opening=True)
                continue
            except Exception as exc:  # an unexpected library error must not end the camera for good
                self._opened(False)
                attempt = self._lost(f"{type(exc).__name__}: {exc}", attempt, opening=True)
                continue
            self._opened(True)
            try:
                ended = self._stream()
            except SourceError as exc:
                self.source.close()
                attempt = self._lost(str(exc), 0 if self._delivered else attempt)
                continue
            except Exception as exc:
                self.source.close()
                self._capture_error(exc)
                attempt = self._lost(f"{type(exc).__name__}: {exc}", 0 if self._delivered else attempt)
                continue
            self.source.close()
            if ended:
                self._set_state("ended", "source ended", seq=self.sequence - 1, source=self.source.description)
                return
        self.source.close()

    def _opened(self, ok: bool) -> None:
        """The first open attempt is over (ok or not)."""

    def _capture_error(self, exc: BaseException) -> None:
        pass

    def _lost(self, reason: str, attempt: int, opening: bool = False) -> int:
        delay = backoff_delay(attempt, self.cfg.reconnect, self.rng)
        self._set_state("down", reason, retry_in_s=round(delay, 3), phase="open" if opening else "stream",
                        seq=self.sequence - 1, attempt=attempt)
        self._wait(delay)
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
                if wait > 0 and self._wait(wait):
                    break
                next_due = max(next_due + period, time.monotonic() - period)  # no bursts after a stall
            t_read = time.perf_counter()
            self.blocked_since = time.monotonic()
            try:
                raw = src.read()
            except FrameDecodeError as exc:
                self.blocked_since = None
                self._decode_error(exc)
                continue
            except SourceIdle:  # a hardware-triggered camera waiting for its next part: alive, read again
                self._count("idle")  # nothing is counted; a capture process sends it as a sign of life
                continue
            finally:
                self.blocked_since = None
            if self._stalled_read_returned():
                raise SourceLost(f"the read was blocked for more than {self.cfg.timeout_s:g} s; reopening")
            if raw is None:
                return True
            now = time.monotonic()
            if not src.paced and period:
                if now + 0.25 * period < next_due:  # quarter-period slack for arrival jitter
                    self._count("skipped")
                    continue
                next_due = max(next_due, now - period) + period
            capture_time = time.time()
            seq = self.sequence
            self.sequence += 1
            self._delivered += 1
            self.last_frame_mono = now
            self._frame(raw, seq, capture_time, now, t_read)
        return False

    def _decode_error(self, exc: FrameDecodeError) -> None:
        seq = self.sequence  # the unreadable frame still uses a number: gaps stay accounted for
        self.sequence += 1
        self._count("decode_error", seq=seq, file=exc.ref, error=str(exc), incomplete=exc.incomplete)


# --------------------------------------------------------------------------- the daemon's side of a camera


class CameraStatus:
    """State, logs and metrics of a camera as the daemon reports them (whether it is read by a thread here or
    by a capture process)."""

    camera: str
    state: str
    metrics: Metrics
    on_state: StateCallback | None
    _log: structlog.typing.FilteringBoundLogger

    def _report_state(self, state: str, reason: str | None = None, **info: object) -> None:
        was = self.state
        if state == "down":
            if was != "down":
                self._log.warning("camera_down", reason=reason, **{k: v for k, v in info.items() if k != "attempt"})
            else:
                self._log.info("camera_still_down", reason=reason, retry_in_s=info.get("retry_in_s"),
                               attempt=info.get("attempt"))
        elif state == "up" and was != "up":
            self._log.info("camera_up", **info)
        elif state == "ended" and was != "ended":
            self._log.info("camera_ended", **info)
        if state == was:
            return
        self.state = state
        self.metrics.camera_up.labels(self.camera).set(1 if state == "up" else 0)
        if self.on_state is not None:
            try:
                self.on_state(self.camera, state, reason)
            except Exception:  # a status hook must never kill capture
                self._log.exception("state_callback_failed")

    def _report_count(self, what: str, seq: int | None = None, **info: object) -> None:
        if what == "skipped":
            self.metrics.skipped.labels(self.camera).inc()
        elif what == "decode_error":
            self.metrics.decode_errors.labels(self.camera).inc()
            self.metrics.drop(self.camera, "decode_error")
            if info.get("incomplete"):  # a GenICam camera's failed buffer or lost frame (aravis://, pylon://)
                self.metrics.incomplete_frames.labels(self.camera, str(info["incomplete"])).inc()
            self._log.warning("decode_error", seq=seq, file=info.get("file"), error=info.get("error"),
                              action="skipped")
        elif what == "reconnect":
            self.metrics.reconnects.labels(self.camera).inc()
            self._log.info("reconnect", **info)


class CameraThread(CameraStatus, CaptureLoop, threading.Thread):
    """Reads one camera in a thread of the daemon (``capture.mode: thread``), with a watchdog beside it that
    reports the camera down when ``open()``/``read()`` blocks for longer than ``timeout_s``."""

    def __init__(self, cfg: CameraConfig, queue: FrameQueue, metrics: Metrics, input_size: tuple[int, int] | None,
                 on_state: StateCallback | None = None, source: Source | None = None,
                 rng: random.Random | None = None, jpeg: bool = False):
        threading.Thread.__init__(self, name=f"capture-{cfg.name}", daemon=True)
        CaptureLoop.__init__(self, cfg, input_size, source if source is not None else make_source(cfg), rng,
                             jpeg=jpeg)
        self.queue = queue
        self.metrics = metrics
        self.on_state = on_state
        self.first_attempt = threading.Event()  # set once the first open has succeeded or failed
        self._stage_read = metrics.stage["read"]
        self._stage_prepare = metrics.stage["prepare"]
        self._stalled = False  # the watchdog declared the read in progress stalled
        self._log = log.bind(camera=cfg.name)
        self._watchdog = threading.Thread(target=self._watch, name=f"capture-watchdog-{cfg.name}", daemon=True)

    def start(self) -> None:
        super().start()
        self._watchdog.start()

    def run(self) -> None:
        try:
            self.run_loop()
        finally:
            self._stop_event.set()  # ends the watchdog

    # -- CaptureLoop hooks

    def _set_state(self, state: str, reason: str | None = None, **info: object) -> None:
        self._report_state(state, reason, **info)

    def _count(self, what: str, seq: int | None = None, **info: object) -> None:
        self._report_count(what, seq, **info)

    def _opened(self, ok: bool) -> None:
        self.first_attempt.set()

    def _capture_error(self, exc: BaseException) -> None:
        self._log.error("capture_error", error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    def _stalled_read_returned(self) -> bool:
        stalled, self._stalled = self._stalled, False
        return stalled

    def _frame(self, raw: RawFrame, seq: int, capture_time: float, now: float, t_read: float) -> None:
        t_prep = time.perf_counter()
        image, frame_size, roi = prepare(raw, self.cfg.roi, self.input_size)
        self._stage_read.inc(t_prep - t_read)
        self._stage_prepare.inc(time.perf_counter() - t_prep)
        if self.state != "up":
            self._set_state("up", None, seq=seq, source=self.source.description, frame_width=frame_size[0],
                            frame_height=frame_size[1])
        self.metrics.captured.labels(self.camera).inc()
        self.queue.put(Frame(self.camera, seq, capture_time, now, image, frame_size, roi, raw.ref,
                             device_time=raw.device_time, frame_id=raw.frame_id, jpeg=raw.jpeg))

    # -- the watchdog: a thread cannot be killed, so it only reports; the loop reopens when the read returns

    def _watch(self) -> None:
        limit = self.cfg.timeout_s
        tick = max(WATCHDOG_MIN_TICK_S, min(0.5, limit / 10))
        while not self._stop_event.wait(tick):
            since = self.blocked_since
            if since is None or self._stalled:
                continue
            blocked = time.monotonic() - since
            if blocked > limit:
                self._stalled = True
                self._set_state("down", f"no frame for {blocked:.1f} s: the source's read is blocked "
                                f"(timeout_s {limit:g}); it is reopened when the read returns",
                                phase="watchdog", seq=self.sequence - 1)
