"""Capture: one thread per camera reads, decodes, crops to the ROI, resizes to the model's input size
and converts to RGB, then hands the frame to the shared :class:`~linewatch.service.frames.FrameQueue`.

Doing the pixel work here keeps the inference worker free to batch, and lets several cameras decode in
parallel (OpenCV releases the GIL). Every frame read gets the camera's next sequence number; each
number then ends either as a verdict or as one count in ``linewatch_frames_dropped_total``. The sources
themselves (folders, OpenCV, MJPEG) are in :mod:`linewatch.service.sources`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import numpy as np
import structlog

from linewatch.imaging.images import resize, to_rgb8
from linewatch.service.config import CameraConfig, ReconnectConfig
from linewatch.service.frames import Frame, FrameDecodeError, FrameQueue, RawFrame, SourceError
from linewatch.service.sources import Source, make_source
from linewatch.service.telemetry.prometheus import Metrics

log = structlog.get_logger("linewatch.capture")


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
        self.camera = cfg.name  # the camera's name (the thread's own name is "capture-<camera>")
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
        self.metrics.camera_up.labels(self.camera).set(1 if state == "up" else 0)
        if self.on_state is not None:
            try:
                self.on_state(self.camera, state, reason)
            except Exception:  # a status hook must never kill capture
                self._log.exception("state_callback_failed")

    # -- main loop

    def run(self) -> None:
        attempt = 0  # consecutive failures, for the backoff
        first = True
        while not self.stopping:
            if not first:
                self.metrics.reconnects.labels(self.camera).inc()
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
                    self.metrics.skipped.labels(self.camera).inc()
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
            self.metrics.captured.labels(self.camera).inc()
            self.queue.put(Frame(self.camera, seq, capture_time, now, image, frame_size, roi, raw.ref))
        return False

    def _decode_error(self, exc: FrameDecodeError) -> None:
        seq = self.sequence  # the unreadable frame still uses a number: gaps stay accounted for
        self.sequence += 1
        self.metrics.decode_errors.labels(self.camera).inc()
        self.metrics.drop(self.camera, "decode_error")
        self._log.warning("decode_error", seq=seq, file=exc.ref, error=str(exc), action="skipped")
