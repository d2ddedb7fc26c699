"""The one harness for running ``linewatch run`` as a real child process and talking to it over ZeroMQ and
HTTP: used by the tests, bench, soak and demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding `linewatch`


def linewatch_cmd(*args: str) -> list[str]:
    """The `linewatch` CLI as a subprocess command (module form: works without installing the package)."""
    return [sys.executable, "-m", "linewatch.cli", *args]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TORCH_HOME", str(ROOT / ".cache" / "torch"))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.update(extra or {})
    return env


def write_images(folder: Path, n: int, size: tuple[int, int] = (48, 64), seed: int = 0, start: int = 0) -> list[Path]:
    """n small random PNGs (h, w) named 000.png, 001.png, …"""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        p = folder / f"{i:03d}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        out.append(p)
    return out


def write_config(path: Path, bundle: Path, cameras: list[dict[str, Any]], **sections: Any) -> Path:
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


class DaemonProcess:
    """``linewatch run`` in a subprocess; its JSON log lines on stderr are parsed as they arrive."""

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            linewatch_cmd("run", "--config", str(config)), cwd=ROOT, env=subprocess_env(env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stderr, self.proc.stdout)]
        for t in self._readers:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            line = line.rstrip("\n")
            try:
                ev = json.loads(line)
            except ValueError:
                ev = None
            with self._cond:
                if isinstance(ev, dict) and "event" in ev:
                    self.events.append(ev)
                else:
                    self.other.append(line)
                self._cond.notify_all()

    def log_text(self) -> str:
        with self._cond:
            return "\n".join([json.dumps(e) for e in self.events] + self.other)

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event
                    and all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, event: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == event
                         and all(e.get(k) == v for k, v in fields.items())]
                if found:
                    return found[0]
                if self.proc.poll() is not None:
                    self._cond.wait(0.2)  # let the readers catch up with the last lines
                    found = [e for e in self.events if e.get("event") == event]
                    if found:
                        return found[0]
                    raise AssertionError(f"daemon exited ({self.proc.returncode}) before {event!r}:\n"
                                         + self.log_text()[-4000:])
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {event!r} event within {timeout} s:\n" + self.log_text()[-4000:])
                self._cond.wait(min(remaining, 0.2))

    @property
    def endpoint(self) -> str:
        return self.wait_event("publisher_bound")["endpoint"]

    @property
    def metrics_url(self) -> str:
        return self.wait_event("metrics_listening")["url"]

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.metrics_url)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("daemon did not exit within the timeout after SIGTERM:\n"
                                 + self.log_text()[-4000:]) from None
        finally:
            for t in self._readers:
                t.join(5)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)
