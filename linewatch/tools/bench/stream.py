"""The streaming modes: the real daemon (:class:`~linewatch.service.app.Daemon`, in this process, with the
bench's detector) for a warm-up and a measured window, a ZeroMQ subscriber counting the verdicts, and the
daemon's own stage timers and /proc CPU per thread (and per capture process) over the same window.

Capture (``--capture``): ``thread`` gives the daemon the bench's own cameras (``source_factory``), which the
daemon runs as capture threads — triggered when there is room (:class:`~.sources.TriggeredSource`).
``process`` (the daemon's default) gives the file modes real ``dir://`` cameras from config with
``capture.mode: process``, so decoding happens in the capture processes as in ``linewatch run``. A process
cannot wait for room in the daemon's queue, so those cameras are free-running at :data:`PROCESS_FPS` and the
frames the daemon cannot take are dropped (``queue_full``, reported next to the rate). ``linewatch-raw``
always uses threads: its frames are already decoded, so there is nothing for a process to take off the daemon."""

from __future__ import annotations

import argparse
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linewatch.errors import LinewatchError
from linewatch.tools.bench.sources import MemorySource, RoomQueue, TriggeredSource
from linewatch.tools.bench.stats import pid_cpu_s, rss_mb, thread_cpu_s
from linewatch.tools.harness import VerdictCounter

if TYPE_CHECKING:
    from linewatch.model import Detector
    from linewatch.service.frames import FrameQueue
    from linewatch.service.sources import Source

PACED = "linewatch-raw-paced"  # free-running cameras at --latency-load × the measured linewatch-raw rate
STREAM_MODES = ("linewatch-raw", "linewatch-files", "linewatch-jpeg", PACED)
CAPTURE_MODES = ("process", "thread")
PROCESS_FPS = 1000.0  # per camera, the config's maximum: free-running well above what one camera can decode
CAPTURE_PROCESSES = "capture processes"  # cpu_ms key: the capture children's CPU (not in "(process)")


def capture_for(mode: str, capture: str) -> str:
    """The capture a streaming mode runs with under ``--capture capture``: raw frames always in threads."""
    return "thread" if mode.startswith("linewatch-raw") else capture


@dataclass
class StreamRound:
    images_per_s: float
    verdicts: int
    made: int  # verdicts the worker made in the window (metrics)
    fails: int
    dropped: dict[str, int]
    captured: int = 0  # frames the cameras delivered in the window (sequence numbers), dropped ones included
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    profile_ms: dict[str, float] = field(default_factory=dict)  # per frame, per stage
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per frame, per thread
    rss_mb: list[tuple[float, float, float]] = field(default_factory=list)  # (s into the window, RSS, anon MB)


def _stage_snapshot(daemon: Any) -> tuple[dict[str, float], float]:
    m = daemon.metrics
    return m.stage_totals(), m.total(m.verdicts)


def run_stream(mode: str, det: Detector, args: argparse.Namespace, batch: int, threads: int,
               raw_frames: list[np.ndarray], folder: Path, seconds: float, warmup: float,
               rate: float | None = None, capture: str = "thread") -> StreamRound:
    """One run of the real daemon for ``warmup + seconds``; measures the last ``seconds``. ``rate``: total
    frames/s of free-running cameras instead of cameras triggered when there is room. ``capture``: see the
    module docstring (``process`` only for the file modes; :func:`capture_for`)."""
    from linewatch.service.app import Daemon
    from linewatch.service.config import config_from_dict
    from linewatch.service.sources.files import DirSource
    from linewatch.service.telemetry.sdnotify import SdNotifier

    raw = mode.startswith("linewatch-raw")
    if capture not in CAPTURE_MODES or (raw and capture == "process"):
        raise ValueError(f"capture {capture!r} for {mode}")  # the caller picks it with capture_for()
    in_process = capture == "process"
    cams = [{"name": f"cam{i}", "source": "raw-in-memory" if raw else f"dir://{folder}", "on_end": "loop",
             **({"fps": PROCESS_FPS} if in_process else {})}
            for i in range(args.cameras)]
    cfg = config_from_dict({
        "model": {"bundle": "in-memory", "engine": args.engine},
        "device": args.device,
        # a queue of batch/cameras frames per camera: a full batch is always waiting, and no frame waits
        # behind more than one batch (capture → verdict stays within two batch times plus overheads)
        "batching": {"max_batch": batch, "frame_queue": max(1, math.ceil(batch / args.cameras)),
                     "torch_threads": threads},
        "cameras": cams,
        "capture": {"mode": capture},
        "publisher": {"bind": "tcp://127.0.0.1:*", "masks": args.masks},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "logging": {"format": "console", "level": "warning"},
    }, origin="<bench>", env=False)
    sources: list[TriggeredSource] = []

    def factory(cam_cfg: Any, queue: FrameQueue) -> Source:
        assert isinstance(queue, RoomQueue)  # the daemon's queue comes from queue_factory below
        inner: Source = (MemorySource(raw_frames, rgb=True, name=cam_cfg.name) if raw
                         else DirSource(folder, loop=True))
        src = TriggeredSource(inner, queue, cam_cfg.name, rate=rate / args.cameras if rate else None)
        sources.append(src)
        return src

    # without a source_factory the daemon makes its cameras from config: capture processes (capture.mode)
    daemon = Daemon(cfg, "<bench>", notifier=SdNotifier({}), detector=det,
                    source_factory=None if in_process else factory, queue_factory=RoomQueue)
    errors: list[BaseException] = []

    def run_daemon() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    t = threading.Thread(target=run_daemon, name="bench-daemon", daemon=True)
    t.start()
    end_wait = time.monotonic() + 120
    while (daemon.publisher is None or daemon.publisher.endpoint is None) and not errors:
        if time.monotonic() > end_wait:
            raise LinewatchError("the daemon did not bind its publisher within 120 s")
        time.sleep(0.01)
    if errors:
        raise errors[0]
    sub = VerdictCounter(daemon.publisher.endpoint, name="bench-subscriber")  # connected once made
    sub.start()
    # every camera delivering (a capture process first starts an interpreter), then the warm-up
    while (len(daemon.cameras) < args.cameras or any(c.state != "up" for c in daemon.cameras)) \
            and not errors and t.is_alive():
        if time.monotonic() > end_wait:
            daemon.request_stop("bench")
            raise LinewatchError(f"the daemon's cameras were not all up within 120 s ({mode}, capture {capture})")
        time.sleep(0.01)
    time.sleep(warmup)
    if errors:
        raise errors[0]
    stages0, frames0 = _stage_snapshot(daemon)
    cpu0 = thread_cpu_s()
    pids = [p for c in daemon.cameras if (p := getattr(c, "child_pid", None))]  # capture processes
    child0 = pid_cpu_s(pids)
    seq0 = sum(c.sequence for c in daemon.cameras)
    wait0 = sum(s.wait_s for s in sources)
    dropped0 = daemon.metrics.by_label(daemon.metrics.dropped, "reason")
    t0_wall = time.time()
    sub.window = (t0_wall, t0_wall + seconds)
    rss: list[tuple[float, float, float]] = [(0.0, rss_mb(), rss_mb("RssAnon"))]
    t_end = time.monotonic() + seconds
    next_sample = time.monotonic() + 1.0
    while True:
        now = time.monotonic()
        if now >= t_end or errors or not t.is_alive():
            break
        time.sleep(max(0.0, min(next_sample, t_end) - now))
        if time.monotonic() >= next_sample:
            rss.append((round(time.time() - t0_wall, 1), rss_mb(), rss_mb("RssAnon")))
            next_sample += 1.0
    stages1, frames1 = _stage_snapshot(daemon)
    cpu1 = thread_cpu_s()
    child1 = pid_cpu_s(pids)
    seq1 = sum(c.sequence for c in daemon.cameras)
    wait1 = sum(s.wait_s for s in sources)
    dropped1 = daemon.metrics.by_label(daemon.metrics.dropped, "reason")
    rss.append((round(time.time() - t0_wall, 1), rss_mb(), rss_mb("RssAnon")))
    time.sleep(0.3)  # verdicts of the window still in flight
    for s in sources:
        s.released.set()
    daemon.request_stop("bench")
    t.join(60)
    sub.stop(5)
    if errors:
        raise errors[0]
    made = int(frames1 - frames0)
    profile: dict[str, float] = {}
    if made > 0:
        for s in stages1:
            delta = stages1[s] - stages0[s]
            if s == "read":
                delta -= wait1 - wait0  # the trigger's wait for room is not the source's work
            profile[s] = max(0.0, delta) * 1000.0 / made
    dropped = {k: int(v - dropped0.get(k, 0)) for k, v in dropped1.items() if v - dropped0.get(k, 0)}
    cpu: dict[str, float] = {}
    if made > 0:
        for name, v in cpu1.items():
            if name in cpu0:
                key = (("capture supervisors" if in_process else "capture")  # all camera threads together
                       if name.startswith("capture-")
                       else "metrics server" if "serve_forever" in name else name)
                cpu[key] = cpu.get(key, 0.0) + (v - cpu0[name]) * 1000.0 / made
        named = sum(v for k, v in cpu.items() if k != "(process)")
        if "(process)" in cpu:
            cpu["other threads"] = max(0.0, cpu["(process)"] - named)  # ZeroMQ I/O, /metrics server, …
        if in_process:  # a child restarted in the window (a new pid) is left out: its CPU is not all known
            cpu[CAPTURE_PROCESSES] = sum(child1[p] - child0[p] for p in child0 if p in child1) * 1000.0 / made
    return StreamRound(images_per_s=sub.window_count / seconds, verdicts=sub.window_count, made=made,
                       fails=sub.window_fails, dropped=dropped, captured=seq1 - seq0, latencies_ms=sub.latencies_ms,
                       profile_ms=profile, cpu_ms=cpu, rss_mb=rss)

