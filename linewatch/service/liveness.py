"""Liveness of the daemon's threads: what gates the systemd watchdog ping and the ``health`` log event.

Not to be confused with the drift monitor (:mod:`linewatch.service.observers.drift`), which judges
what the cameras see, not whether the threads run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from linewatch.service.capture import CameraThread
    from linewatch.service.publisher import Publisher
    from linewatch.service.worker import InferenceWorker


def check_liveness(worker: InferenceWorker | None, publisher: Publisher | None, cameras: Iterable[CameraThread],
                   stall_timeout_s: float, now: float | None = None) -> tuple[bool, str]:
    """(ok, reason): every stage alive and, where frames wait, making progress (idle with no frames is fine).
    ``now`` is a ``time.monotonic()`` reading (default: now)."""
    now = time.monotonic() if now is None else now
    if worker is None or not worker.healthy:
        return False, "inference worker dead or failing"
    if worker.busy_since is not None and now - worker.busy_since > stall_timeout_s:
        return False, f"a batch has been in the model for {now - worker.busy_since:.0f} s"
    if now - worker.last_tick > stall_timeout_s:
        return False, "inference worker stalled"
    if publisher is None or not publisher.healthy or now - publisher.last_tick > stall_timeout_s:
        return False, "publisher stalled"
    for c in cameras:
        if c.state != "ended" and not c.is_alive():
            return False, f"capture thread of {c.camera} died"
    return True, "ok"
