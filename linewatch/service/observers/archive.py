"""Reject archive (off by default): every failing frame saved with its mask, overlay and verdict header.

The evidence a quality engineer asks for, and the material for the next calibration. Entries are
``<dir>/<camera>/<YYYY-MM-DD>/<HHMMSS.mmm>_<sequence>/`` holding ``image.png`` (what the model saw: the
ROI at the model's input size), ``overlay.png``, ``mask.png`` and ``verdict.json``. The archive is
capped in size and age; the oldest entries go first, each deletion counted.

Writing happens in this module's thread; the worker only appends to a bounded queue (full: the oldest
waiting frame is dropped and counted).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

from linewatch.imaging.overlays import overlay, write_png
from linewatch.messages import Verdict, verdict_to_dict
from linewatch.service.telemetry.prometheus import Metrics

if TYPE_CHECKING:
    from linewatch.service.config import ArchiveConfig
    from linewatch.service.frames import Frame

log = structlog.get_logger("linewatch.archive")

AGE_CHECK_EVERY_S = 60.0


@dataclass
class _Entry:
    path: Path
    created: float  # epoch seconds
    size: int


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


class RejectArchive(threading.Thread):
    def __init__(self, cfg: ArchiveConfig, metrics: Metrics, pixel_threshold: float):
        super().__init__(name="archive", daemon=True)
        self.root = Path(cfg.dir)
        self.max_bytes = int(cfg.max_mb * 1024 * 1024)
        self.max_age_s = cfg.max_age_days * 86400.0
        self.metrics = metrics
        self.pixel_threshold = pixel_threshold  # only for verdicts that carry none
        self._pending: deque = deque(maxlen=cfg.queue)
        self._cv = threading.Condition()
        self._stop_event = threading.Event()
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        """Pick up what earlier runs left, so the caps hold across restarts."""
        found = []
        for entry in self.root.glob("*/*/*"):
            if entry.is_dir() and (entry / "verdict.json").is_file():
                try:
                    found.append(_Entry(entry, (entry / "verdict.json").stat().st_mtime, _dir_size(entry)))
                except OSError:
                    continue
        found.sort(key=lambda e: e.created)
        self._entries.extend(found)
        self._bytes = sum(e.size for e in found)
        self.metrics.archive_bytes.set(self._bytes)
        self._enforce_caps()

    # -- worker thread
    def observe(self, frame: Frame, verdict: Verdict, amap: np.ndarray) -> None:
        if not verdict.failed:
            return
        with self._cv:
            if len(self._pending) == self._pending.maxlen:
                self.metrics.archive_dropped.labels("queue_full").inc()
            self._pending.append((frame.host_image(), amap, verdict))
            self._cv.notify()

    # -- archive thread
    def run(self) -> None:
        next_age_check = time.monotonic() + AGE_CHECK_EVERY_S
        while True:
            with self._cv:
                if not self._pending and not self._stop_event.is_set():
                    self._cv.wait(timeout=1.0)
                item = self._pending.popleft() if self._pending else None
                if item is None and self._stop_event.is_set():
                    return
            if item is not None:
                self._write(*item)
            if time.monotonic() >= next_age_check:
                self._enforce_caps()
                next_age_check = time.monotonic() + AGE_CHECK_EVERY_S

    def _write(self, image: np.ndarray, amap: np.ndarray, v: Verdict) -> None:
        t = time.localtime(v.capture_time)
        ms = int((v.capture_time % 1) * 1000)
        path = (self.root / v.camera / time.strftime("%Y-%m-%d", t)
                / f"{time.strftime('%H%M%S', t)}.{ms:03d}_{v.sequence}")
        try:
            path.mkdir(parents=True, exist_ok=True)
            write_png(path / "image.png", image)
            # the verdict's own thresholds: after a model reload, queued frames still match their model
            thr = v.threshold
            pix = v.pixel_threshold if v.pixel_threshold is not None else self.pixel_threshold
            write_png(path / "overlay.png", overlay(image, amap, thr, pix, v.verdict, v.score))
            write_png(path / "mask.png", ((amap > pix) * 255).astype(np.uint8))
            (path / "verdict.json").write_text(json.dumps(verdict_to_dict(v), indent=1, default=str))
            size = _dir_size(path)
        except OSError as exc:
            self.metrics.archive_dropped.labels("write_error").inc()
            log.error("archive_write_failed", camera=v.camera, seq=v.sequence, path=str(path), error=str(exc))
            shutil.rmtree(path, ignore_errors=True)
            return
        self._entries.append(_Entry(path, time.time(), size))
        self._bytes += size
        self.metrics.archive_written.inc()
        self._enforce_caps()

    def _enforce_caps(self) -> None:
        now = time.time()
        while self._entries:
            oldest = self._entries[0]
            if self._bytes > self.max_bytes:
                reason = "size"
            elif now - oldest.created > self.max_age_s:
                reason = "age"
            else:
                break
            self._entries.popleft()
            self._bytes -= oldest.size
            shutil.rmtree(oldest.path, ignore_errors=True)
            self.metrics.archive_deleted.labels(reason).inc()
            try:  # tidy empty day/camera folders
                oldest.path.parent.rmdir()
                oldest.path.parent.parent.rmdir()
            except OSError:
                pass
        self.metrics.archive_bytes.set(self._bytes)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (within ``timeout``), then stop."""
        self._stop_event.set()
        with self._cv:
            self._cv.notify_all()
        self.join(timeout)
