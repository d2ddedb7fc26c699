"""Part-triggered mode inside the real Daemon (in process): a hardware-triggered camera whose third part meets a
slow model. That part gets a timeout verdict (fail, timed_out) at its deadline, counted; its late real verdict
is withheld and counted; the parts before and after get their own verdicts; every part exactly one verdict."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from fakes import BrightnessDetector

from linewatch.model import Prediction
from linewatch.service.app import Daemon
from linewatch.service.config import config_from_dict
from linewatch.service.frames import RawFrame
from linewatch.service.telemetry.sdnotify import SdNotifier
from linewatch.tools.harness import VerdictCounter, wait_until

pytestmark = pytest.mark.slow

H = W = 16
SLOW_MARK = 99  # first pixel of a part the fake model is slow on
DEADLINE_MS = 1000
SLOW_S = 3.0


class SlowOnMarkDetector(BrightnessDetector):
    """Score = brightest pixel / 255; a batch holding a part marked SLOW_MARK takes SLOW_S seconds."""

    def __init__(self):
        super().__init__(model_id="slowfake")
        self.slow_done = threading.Event()

    def predict(self, batch: torch.Tensor) -> Prediction:
        slow = bool((batch[:, 0, 0, 0] == SLOW_MARK).any())
        if slow:
            time.sleep(SLOW_S)  # the slow model under test, not test synchronisation
        pred = super().predict(batch)
        if slow:
            self.slow_done.set()
        return pred


class TriggeredParts:
    """A hardware-triggered camera in memory: parts with the camera's frame ids 500, 501, …; the part after the
    slow one is only triggered once the slow inference has finished (so the parts after it are in time)."""

    paced = False
    description = "parts-in-memory"

    def __init__(self, n: int, slow_index: int, slow_done: threading.Event):
        self.n = n
        self.slow_index = slow_index
        self.slow_done = slow_done
        self.i = 0

    def open(self) -> None:
        pass

    def read(self) -> RawFrame | None:
        if self.i >= self.n:
            return None
        if self.i == self.slow_index + 1 and not self.slow_done.wait(30):
            raise AssertionError("the slow inference never finished")
        img = np.zeros((H, W, 3), np.uint8)
        if self.i == self.slow_index:
            img[0, 0, 0] = SLOW_MARK
        frame = RawFrame(img, rgb=True, ref=f"part{self.i}", frame_id=500 + self.i, device_time=10_000 + self.i)
        self.i += 1
        return frame

    def close(self) -> None:
        pass


def test_slow_part_times_out_and_its_late_verdict_is_withheld():
    det = SlowOnMarkDetector()
    n, slow = 5, 2
    cfg = config_from_dict({
        "model": {"bundle": "in-memory"},
        "device": "cpu",
        "batching": {"max_batch": 1, "max_wait_ms": 0, "frame_queue": 16, "torch_threads": 1},
        "cameras": [{"name": "line", "source": "dir:///unused", "trigger": "hardware",
                     "verdict_deadline_ms": DEADLINE_MS}],
        "publisher": {"bind": "tcp://127.0.0.1:*", "wait_for_subscriber_s": 30, "heartbeat_s": 0.5},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "logging": {"format": "console", "level": "warning"},
        "health": {"enabled": False},
    }, origin="<test>", env=False)
    daemon = Daemon(cfg, "<test>", notifier=SdNotifier({}), detector=det,
                    source_factory=lambda cam, q: TriggeredParts(n, slow, det.slow_done))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    t = threading.Thread(target=run, name="daemon", daemon=True)
    t.start()
    wait_until(lambda: errors or (daemon.publisher is not None and daemon.publisher.endpoint), 60,
               what="the daemon's publisher")
    assert not errors, errors
    col = VerdictCounter(daemon.publisher.endpoint, keep=100)
    col.start()
    try:
        # every part gets one verdict; then the withheld late one is counted once the slow model returns
        wait_until(lambda: col.count("line") >= n, 60, what=f"{n} verdicts")
        wait_until(lambda: daemon.metrics.parts_late.labels("line")._value.get() >= 1, 30, what="late verdict")
    finally:
        daemon.request_stop("test over")
        t.join(60)
        col.finish(quiet_s=1.0, timeout=10)
    assert not errors, errors
    vs = col.of("line")
    assert [v.sequence for v in vs if not v.timed_out] == [0, 1, 3, 4]
    assert len(vs) == n and sorted(v.sequence for v in vs) == list(range(n))  # exactly one verdict per part
    assert [v.part_id for v in sorted(vs, key=lambda v: v.sequence)] == [500 + i for i in range(n)]
    timed_out = [v for v in vs if v.timed_out]
    assert len(timed_out) == 1
    to = timed_out[0]
    assert to.sequence == slow and to.verdict == "fail" and to.ref == f"part{slow}"
    assert to.frame_id == 500 + slow and to.device_time == 10_000 + slow
    # published at the deadline, not when the slow verdict came (SLOW_S after capture)
    assert to.latency < SLOW_S - 0.5, to.latency
    assert all(not v.timed_out and v.verdict == "pass" for v in vs if v.sequence != slow)
    assert daemon.metrics.parts_timed_out.labels("line")._value.get() == 1
    assert daemon.metrics.parts_late.labels("line")._value.get() == 1
