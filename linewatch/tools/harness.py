"""The one harness for running ``linewatch run`` as a real child process and talking to it over ZeroMQ and
HTTP: used by the tests, bench, soak and demo.

* :class:`DaemonProcess`: the child, its JSON log parsed as it arrives, kept bounded (soak runs for hours).
* :class:`VerdictCounter`: a subscriber thread counting verdicts per camera; optionally keeps the messages
  (bounded), measures capture → receipt latency in a time window, stops once a target arrived or all is quiet.
* :func:`scrape`, :func:`metric`, :func:`metric_total`, :func:`process_stats`: ``/metrics`` as numbers,
  including the daemon's own memory and open file descriptors (prometheus_client's ProcessCollector).
* :func:`free_tcp_port`, :func:`wait_until`, :func:`write_images`, :func:`write_config`.

Only the standard library and :mod:`linewatch.errors` are imported up front (``linewatch soak`` imports this
module with the CLI); OpenCV, numpy, YAML, ZeroMQ and prometheus_client are imported where they are used.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from linewatch.errors import LinewatchError

if TYPE_CHECKING:
    from linewatch.messages import Status, Verdict

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding `linewatch`

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) → value


class DaemonError(LinewatchError):
    """The child daemon exited, or did not log what was awaited in time. ``str()`` is one line; the log's
    last lines are in ``log_tail`` (and attached as a note, which pytest prints)."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail
        if log_tail and hasattr(self, "add_note"):  # Python ≥ 3.11
            self.add_note("daemon log (last lines):\n" + log_tail[-4000:])


# --------------------------------------------------------------------------- the child process


def linewatch_cmd(*args: str) -> list[str]:
    """The `linewatch` CLI as a subprocess command (module form: works without installing the package)."""
    return [sys.executable, "-m", "linewatch.cli", *args]


def subprocess_env(extra: Mapping[str, str] | None = None, *, clean: bool = True,
                   checkout: bool = True) -> dict[str, str]:
    """The environment for a child ``linewatch``. ``clean``: without LINEWATCH_* settings and systemd's
    NOTIFY_SOCKET/WATCHDOG_USEC (they belong to this process, not the child). ``checkout``: this checkout
    first on PYTHONPATH and, unless TORCH_HOME is set, its weights cache."""
    env = dict(os.environ)
    if clean:
        env = {k: v for k, v in env.items() if not k.startswith("LINEWATCH_")}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
    if checkout:
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TORCH_HOME", str(ROOT / ".cache" / "torch"))
    env["PYTHONUNBUFFERED"] = "1"  # log lines arrive as they are written
    env.update(extra or {})
    return env


def write_images(folder: Path, n: int, size: tuple[int, int] = (48, 64), seed: int = 0, start: int = 0) -> list[Path]:
    """n small random PNGs (h, w) named 000.png, 001.png, …"""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        p = folder / f"{i:03d}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        out.append(p)
    return out


def write_config(path: Path, bundle: Path, cameras: list[dict[str, Any]], **sections: Any) -> Path:
    """A daemon config for tests and tools: CPU, loopback on free ports, JSON logs; ``sections`` update or
    replace the defaults (``publisher={"sndhwm": 5}`` keeps the other publisher keys)."""
    import yaml

    cfg: dict[str, Any] = {
        "model": {"bundle": str(bundle)},
        "device": "cpu",
        "batching": {"max_batch": 8, "max_wait_ms": 5, "frame_queue": 64, "torch_threads": 1},
        "cameras": cameras,
        "publisher": {"bind": "tcp://127.0.0.1:*", "heartbeat_s": 0.5, "linger_ms": 500},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"format": "json", "level": "info"},
        "daemon": {"drain_timeout_s": 10},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _matches(event: dict[str, Any], name: str, fields: dict[str, Any]) -> bool:
    return event.get("event") == name and all(event.get(k) == v for k, v in fields.items())


class DaemonProcess:
    """``linewatch run --config CONFIG`` in a subprocess; its JSON log lines (stderr and stdout) are parsed as
    they arrive.

    Memory stays bounded however long it runs: ``events`` holds the latest ``max_events`` events, ``first``
    the first event of each name (so ``publisher_bound`` is found hours later), ``counts`` how many of each
    name came, ``tail`` the last ``tail_lines`` raw lines. ``log_file``: every line also goes there (on disk,
    for a person to read). ``environ``: the child's whole environment (default: :func:`subprocess_env` with
    ``env`` added); ``cwd``: None = this process's working directory; ``command``: another program speaking
    the same JSON log (default ``linewatch run --config CONFIG``)."""

    MAX_NAMES = 1000  # distinct event names tracked in first/counts (the daemon logs a few dozen)
    MAX_LINE = 2000  # characters of a raw line kept in the tail

    def __init__(self, config: str | os.PathLike, env: Mapping[str, str] | None = None, *,
                 environ: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = ROOT,
                 max_events: int = 10_000, tail_lines: int = 200, log_file: str | os.PathLike | None = None,
                 command: list[str] | None = None):
        self.config = Path(config)
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.first: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, int] = {}
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._cond = threading.Condition()
        self._log: IO[str] | None = open(log_file, "w", encoding="utf-8") if log_file is not None else None
        try:
            self.proc = subprocess.Popen(
                command or linewatch_cmd("run", "--config", str(config)), cwd=cwd,
                env=dict(environ) if environ is not None else subprocess_env(env),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        except BaseException:
            if self._log is not None:
                self._log.close()
            raise
        streams = [s for s in (self.proc.stderr, self.proc.stdout) if s is not None]
        self._open_streams = len(streams)
        self._readers = [threading.Thread(target=self._read, args=(s,), name="daemon-log-reader", daemon=True)
                         for s in streams]
        for t in self._readers:
            t.start()

    # ------------------------------------------------------------------ the log

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                line = line.rstrip("\n")
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = None
                with self._cond:
                    if self._log is not None:
                        self._log.write(line + "\n")
                        self._log.flush()
                    self.tail.append(line[: self.MAX_LINE])
                    if isinstance(ev, dict) and isinstance(ev.get("event"), str):
                        self.events.append(ev)
                        name = ev["event"]
                        if name in self.counts or len(self.counts) < self.MAX_NAMES:
                            self.counts[name] = self.counts.get(name, 0) + 1
                            self.first.setdefault(name, ev)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()

    def log_text(self) -> str:
        """The last raw log lines (bounded by ``tail_lines``)."""
        with self._cond:
            return "\n".join(self.tail)

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """Kept events named ``event`` whose ``fields`` match, oldest first."""
        with self._cond:
            return [e for e in self.events if _matches(e, event, fields)]

    def _first_match(self, event: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        first = self.first.get(event)
        if first is not None and _matches(first, event, fields):
            return first
        return next((e for e in self.events if _matches(e, event, fields)), None)

    def _error(self, message: str) -> DaemonError:
        last = self.tail[-1] if self.tail else "(nothing logged)"
        return DaemonError(f"{message}; last log line: {last[:300]}", "\n".join(self.tail))

    def wait_event(self, event: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """The first event named ``event`` with these ``fields``; raises :class:`DaemonError` if the daemon
        exits without it or it does not come within ``timeout`` s."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._first_match(event, fields)
                if found is not None:
                    return found
                if self.proc.poll() is not None:
                    # the process is gone: what it wrote before exiting is read once both pipes hit EOF
                    self._cond.wait_for(lambda: self._open_streams == 0, 5.0)
                    found = self._first_match(event, fields)
                    if found is not None:
                        return found
                    raise self._error(f"the daemon exited ({self.proc.returncode}) before {event!r}")
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise self._error(f"no {event!r} from the daemon within {timeout:g} s")
                self._cond.wait(min(remaining, 0.2))  # also wakes to notice an exit without output

    @property
    def endpoint(self) -> str:
        return self.wait_event("publisher_bound")["endpoint"]

    @property
    def metrics_url(self) -> str:
        return self.wait_event("metrics_listening")["url"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    # ------------------------------------------------------------------ /metrics

    def scrape(self) -> Samples:
        return scrape(self.metrics_url)

    def process_stats(self) -> ProcessStats:
        """The daemon's resident memory and open file descriptors, from its /metrics."""
        return process_stats(self.scrape())

    # ------------------------------------------------------------------ stopping

    def join_readers(self, timeout: float = 5.0) -> None:
        """Wait until the log readers have read everything the (exited) daemon wrote."""
        for t in self._readers:
            t.join(timeout)

    def stop(self, timeout: float = 30.0) -> float | None:
        """SIGTERM, then up to ``timeout`` s for the drain and exit. Returns the seconds it took (0 if it had
        already exited), or None if it did not exit in time and was killed."""
        took: float | None = 0.0
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                took = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                took = None
        self.join_readers()
        return took

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the exit status; :class:`DaemonError` if it had to be killed."""
        if self.stop(timeout) is None:
            raise self._error(f"the daemon did not exit within {timeout:g} s after SIGTERM (killed)")
        return self.proc.returncode

    def close(self) -> None:
        """Kill the daemon if it still runs; release the pipes and the log file."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.join_readers()
        with self._cond:
            if self._log is not None:
                self._log.close()
                self._log = None
        for s in (self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- /metrics


def scrape(url: str, timeout: float = 10.0) -> Samples:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 if absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_total(samples: Samples, name: str, **labels: str) -> float:
    """A metric summed over every label set that has ``labels`` (none given: over all of them), e.g.
    ``metric_total(s, "linewatch_frames_dropped_total", camera="a")`` = a's drops for every reason."""
    want = labels.items()
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= dict(lbl).items())


@dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int  # process_resident_memory_bytes
    open_fds: int  # process_open_fds

    @property
    def rss_kb(self) -> int:
        return self.rss_bytes // 1024


def process_stats(samples: Samples) -> ProcessStats:
    """Resident memory and open file descriptors of the scraped process (prometheus_client's
    ProcessCollector on the daemon's registry)."""
    rss = samples.get(("process_resident_memory_bytes", ()))
    fds = samples.get(("process_open_fds", ()))
    if rss is None or fds is None:
        raise LinewatchError("no process_resident_memory_bytes/process_open_fds in /metrics "
                             "(prometheus_client's ProcessCollector reads /proc: Linux only)")
    return ProcessStats(rss_bytes=int(rss), open_fds=int(fds))


# --------------------------------------------------------------------------- small helpers


def free_tcp_port() -> int:
    """A loopback TCP port free right now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition") -> None:
    """Poll ``cond`` until it is true; AssertionError after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- the subscriber


class VerdictCounter(threading.Thread):
    """A subscriber in its own thread: counts verdicts (``total``, ``by_camera``).

    ``keep``: also keep up to this many verdicts and, with ``status=True``, status messages (the oldest
    go first, counted in ``evicted``); read them with :attr:`verdicts`, :meth:`of`, :attr:`statuses`,
    :meth:`camera_events`. ``window = (start, end)`` in wall-clock seconds: verdicts received inside it are
    counted in ``window_count``/``window_fails`` and their capture → receipt latency sampled into
    ``latencies_ms`` (at most ``max_latencies``, a uniform sample beyond that). The socket connects at
    construction; call :meth:`start`, then :meth:`finish` (stop once a target arrived, or all is quiet) or
    :meth:`stop` (at once)."""

    def __init__(self, endpoint: str, *, cameras: list[str] | None = None, status: bool = False, keep: int = 0,
                 rcvhwm: int = 1_000_000, curve: Any = None, max_latencies: int = 200_000,
                 poll_s: float = 0.1, name: str = "verdict-counter"):
        super().__init__(name=name, daemon=True)
        from linewatch.client import Subscriber

        self.sub = Subscriber(endpoint, cameras=cameras, status=status, rcvhwm=rcvhwm, curve=curve)
        self.poll_s = poll_s
        self.total = 0
        self.by_camera: dict[str, int] = {}
        self.statuses_seen = 0
        self.evicted = 0  # kept messages pushed out by newer ones
        self._verdicts: deque[Verdict] = deque(maxlen=keep or 1)
        self._statuses: deque[Status] = deque(maxlen=keep or 1)
        self._keep = keep > 0
        self.window: tuple[float, float] | None = None
        self.window_count = 0
        self.window_fails = 0
        self.latencies_ms: list[float] = []
        self._max_latencies = max_latencies
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._finish: tuple[int | None, float, float, float] | None = None  # target, settle_s, quiet_s, since
        self._last_msg = time.monotonic()

    def run(self) -> None:
        from linewatch.messages import Status, Verdict

        try:
            while not self._halt.is_set():
                msg = self.sub.recv(self.poll_s)
                now = time.monotonic()
                if isinstance(msg, Verdict):
                    self._last_msg = now
                    self._count(msg)
                elif isinstance(msg, Status):
                    self._last_msg = now
                    with self._lock:
                        self.statuses_seen += 1
                        if self._keep:
                            self.evicted += len(self._statuses) == self._statuses.maxlen
                            self._statuses.append(msg)
                if self._finish is not None and self._done(now):
                    return
        finally:
            self.sub.close()

    def _count(self, v: Verdict) -> None:
        received = time.time()
        with self._lock:
            self.total += 1
            self.by_camera[v.camera] = self.by_camera.get(v.camera, 0) + 1
            if self._keep:
                self.evicted += len(self._verdicts) == self._verdicts.maxlen
                self._verdicts.append(v)
            w = self.window
            if w is not None and w[0] <= received < w[1]:
                self.window_count += 1
                self.window_fails += int(v.failed)
                latency = (received - v.capture_time) * 1000.0
                if len(self.latencies_ms) < self._max_latencies:
                    self.latencies_ms.append(latency)
                else:  # reservoir sampling: every verdict of the window equally likely to be in the sample
                    j = self._rng.randrange(self.window_count)
                    if j < self._max_latencies:
                        self.latencies_ms[j] = latency

    def _done(self, now: float) -> bool:
        assert self._finish is not None
        target, settle_s, quiet_s, since = self._finish
        quiet = now - max(self._last_msg, since)
        if target is not None and self.total >= target:
            return quiet >= settle_s
        return quiet >= quiet_s

    def finish(self, target: int | None = None, *, quiet_s: float = 5.0, settle_s: float = 0.0,
               timeout: float = 60.0) -> bool:
        """Stop once ``target`` verdicts arrived and then ``settle_s`` passed without a message (time for
        anything beyond the target to show up), or once ``quiet_s`` passed without any message; wait for
        that up to ``timeout`` s. True if the target (if any) was reached."""
        self._finish = (target, settle_s, quiet_s, time.monotonic())
        if self.is_alive():
            self.join(timeout)
        if self.is_alive():
            self.stop()
        return target is None or self.total >= target

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading now."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    @property
    def verdicts(self) -> list[Verdict]:
        """A copy of the kept verdicts, in arrival order."""
        with self._lock:
            return list(self._verdicts) if self._keep else []

    @property
    def statuses(self) -> list[Status]:
        """A copy of the kept status messages, in arrival order."""
        with self._lock:
            return list(self._statuses) if self._keep else []

    def count(self, camera: str | None = None) -> int:
        """Verdicts received (from ``camera``)."""
        with self._lock:
            return self.total if camera is None else self.by_camera.get(camera, 0)

    def of(self, camera: str) -> list[Verdict]:
        """The kept verdicts of one camera."""
        return [v for v in self.verdicts if v.camera == camera]

    def camera_events(self, camera: str) -> list[Status]:
        """The kept camera status messages (up/down/ended) of one camera."""
        return [s for s in self.statuses if s.kind == "camera" and s.camera == camera]
