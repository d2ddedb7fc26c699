"""A minimal sd_notify(3): datagrams to ``$NOTIFY_SOCKET`` (a no-op when not run by systemd)."""

from __future__ import annotations

import os
import socket


def _one_line(text: str) -> str:
    return " ".join(text.split())


class SdNotifier:
    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        self.address = addr
        self.watchdog_s = self._watchdog(env)
        self._sock: socket.socket | None = None

    @staticmethod
    def _watchdog(env: dict[str, str]) -> float | None:
        """The watchdog period systemd expects pings within, if it asked for any (and asked *us*)."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        try:
            v = int(usec)
        except ValueError:
            return None
        return v / 1e6 if v > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False if there is no socket or sending failed.
        Never raises: telling systemd is best effort and must not take the daemon down."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
