"""The demo's live web view: ``linewatch view`` as a child process (through the harness) on the demo daemon's
stream. Best effort: whatever goes wrong with it is a warning line, never a failed demo."""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from linewatch.errors import LinewatchError
from linewatch.messages import PREVIEW_PREFIX
from linewatch.tools.harness import DaemonProcess, linewatch_cmd, subprocess_env

START_TIMEOUT_S = 60.0  # python, starlette and ZeroMQ on a busy machine
_SERVING = re.compile(r"serving (http://\S+)")


class LiveView:
    """``linewatch view --endpoint ENDPOINT --port PORT`` (0: the view picks a free loopback port and prints
    it). ``warning`` says why it is not available, if it is not; the demo goes on without it."""

    def __init__(self, endpoint: str, port: int, log_file: Path):
        self.url: str | None = None
        self.warning: str | None = None
        self.exit_code: int | None = None
        self.log_file = log_file
        cmd = linewatch_cmd("view", "--endpoint", endpoint, "--port", str(port), "--host", "127.0.0.1")
        try:
            # the view reads the same stream as the demo; it logs plain lines, kept by the harness all the same
            self.proc: DaemonProcess | None = DaemonProcess(
                log_file, environ=subprocess_env(clean=False, checkout=False), cwd=None, log_file=log_file,
                command=cmd)
        except OSError as exc:
            self.proc = None
            self.warning = f"the live view could not start ({exc.strerror or exc})"

    def _served_url(self) -> str | None:
        assert self.proc is not None
        found = _SERVING.search(self.proc.log_text())
        return found.group(1) if found else None

    def wait_subscribed(self, daemon: DaemonProcess, timeout: float = START_TIMEOUT_S) -> bool:
        """Until the view serves and the daemon has logged the view's subscription (``preview.``: only the view
        asks for previews), so that the view sees the stream from its first frame. False (and ``warning``) if
        the view exited or took longer than ``timeout`` s."""
        if self.proc is None:
            return False
        end = time.monotonic() + timeout
        while True:
            if self.url is None:
                self.url = self._served_url()
            if self.url is not None and daemon.find("subscribed", topic=PREVIEW_PREFIX):
                return True
            if self.proc.proc.poll() is not None:
                self.proc.join_readers()
                last = self.proc.tail[-1] if self.proc.tail else "(nothing printed)"
                self.warning = f"the live view exited ({self.proc.returncode}): {last[:200]}; see {self.log_file}"
                return False
            if daemon.proc.poll() is not None:
                return False  # the demo reports the daemon's exit itself
            remaining = end - time.monotonic()
            if remaining <= 0:
                self.warning = f"the live view did not connect within {timeout:g} s; see {self.log_file}"
                return False
            try:  # wakes at the daemon's next log line (its subscription), else re-checks the view twice a second
                daemon.wait_event("subscribed", min(remaining, 0.5), topic=PREVIEW_PREFIX)
            except LinewatchError:
                pass

    def state(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The view's whole state (``/api/state``), or None when it cannot be read."""
        if self.url is None:
            return None
        try:
            with urllib.request.urlopen(self.url + "api/state", timeout=timeout) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def counts(self) -> tuple[int, int] | None:
        """(verdicts, of them with a picture now shown) as the view has them; None when unreadable."""
        s = self.state()
        if s is None:
            return None
        cams = s.get("cameras") or []
        return sum(int(c.get("verdicts") or 0) for c in cams), sum(c.get("shot") is not None for c in cams)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed). A non-zero one becomes ``warning``."""
        if self.proc is None:
            return None
        try:
            took = self.proc.stop(timeout)
            self.exit_code = self.proc.returncode
            if took is None:
                self.warning = f"the live view did not exit within {timeout:g} s of SIGTERM (killed)"
            elif self.exit_code != 0:
                self.warning = f"the live view exited with code {self.exit_code}; see {self.log_file}"
        finally:
            self.proc.close()
        return self.exit_code if took is not None else None


def keep_open(seconds: float | None, url: str) -> None:
    """Let a person look at the page before the demo stops the view: ``seconds`` given, that long (at a
    terminal, Enter ends it sooner); not given, until Enter at a terminal (at most an hour), and not at all
    otherwise (CI, tests, a pipe)."""
    tty = sys.stdin is not None and sys.stdin.isatty()
    if seconds is None:
        if not tty:
            return
        seconds = 3600.0
    if seconds <= 0:
        return
    if not tty:
        time.sleep(seconds)
        return
    print(f"   the view stays at {url} — press Enter to stop it" +
          ("" if seconds >= 3600 else f" (or wait {seconds:g} s)"), flush=True)
    readable, _, _ = select.select([sys.stdin], [], [], seconds)
    if readable:
        os.read(sys.stdin.fileno(), 4096)
