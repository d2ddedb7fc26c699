"""``linewatch bridge``: subscribe to the daemon's verdicts → one bounded queue per sink → OPC UA / MQTT.

The daemon's hot path is untouched: the bridge is an ordinary subscriber in its own process. The main
thread reads ZeroMQ and fans each message out to the sinks' queues (never blocking: a full queue drops
its oldest message, counted); each sink thread delivers at its own pace and reconnects on its own.

Start: config errors (and unreadable key/certificate files) are one line, exit 2. An unreachable broker
or a port in use is not fatal: the sink logs why, retries with backoff, and READY=1 is sent anyway.
SIGTERM/SIGINT: stop reading, let each sink deliver what is queued within ``drain_timeout_s``, exit 0.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import structlog

from linewatch.bridges.config import BridgeConfig
from linewatch.bridges.sink import Sink, UpstreamEvent
from linewatch.bridges.telemetry import DROP_REASONS, KINDS, BridgeMetrics
from linewatch.client import Subscriber
from linewatch.errors import ConfigError
from linewatch.logsetup import configure_logging
from linewatch.messages import Status, Verdict
from linewatch.service.telemetry.prometheus import MetricsServer
from linewatch.service.telemetry.sdnotify import SdNotifier

log = structlog.get_logger("linewatch.bridge")

RECV_POLL_S = 0.2  # the main loop's tick: stop requests, watchdog pings, staleness checks
FIRST_ATTEMPT_WAIT_S = 30.0  # at most this long for each sink's first connect/listen attempt before READY=1
STATUS_EVERY_S = 5.0


class Bridge:
    def __init__(self, cfg: BridgeConfig, notifier: SdNotifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or SdNotifier()
        self.metrics = BridgeMetrics()
        self.sinks: list[Sink] = []
        self._stop = threading.Event()
        self._stop_reason = "requested"
        self.metrics_server: Any = None
        self.subscriber: Subscriber | None = None
        self._upstream_up = False
        self._last_message: float | None = None  # monotonic
        self._gaps_seen: dict[str, int] = {}
        self._malformed_seen = 0
        self._handshake_seen = 0
        self._silence_warned = False
        self.wanted = set(cfg.cameras) if cfg.cameras else None

    # -- control

    def request_stop(self, reason: str = "requested") -> None:
        self._stop_reason = reason
        self._stop.set()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.request_stop(signal.Signals(signum).name)

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload; never exit on it

    # -- setup

    def _make_sinks(self) -> None:
        cfg = self.cfg
        if cfg.mqtt is not None:
            from linewatch.bridges.mqtt import MqttSink

            self.sinks.append(MqttSink(cfg.mqtt, self.metrics, cfg.cameras))
        if cfg.opcua is not None:
            from linewatch.bridges.opcua import OpcuaSink  # asyncua takes a second to import: only when used

            self.sinks.append(OpcuaSink(cfg.opcua, self.metrics, cfg.cameras))

    def _subscribe(self) -> Subscriber:
        up = self.cfg.upstream
        curve = None
        if up.server_key is not None:
            curve = {"server_public_key": up.server_key, "client_secret_key": up.client_key}
        try:
            return Subscriber(up.endpoint, cameras=self.cfg.cameras, status=True, curve=curve)
        except OSError as exc:  # a key file that cannot be read
            raise ConfigError(f"upstream: cannot read the CURVE key ({exc.strerror or exc})") from None

    def start(self) -> None:
        """Everything up to READY=1. Raises :class:`ConfigError` (one line) on what the operator must fix."""
        self._make_sinks()  # reads certificate/key files: fails before anything is listening
        if self.cfg.metrics.enabled:
            self.metrics_server = MetricsServer(self.metrics, self.cfg.metrics.host, self.cfg.metrics.port)  # type: ignore[arg-type]
            url = f"http://{self.metrics_server.host}:{self.metrics_server.port}/metrics"
            log.info("metrics_listening", host=self.metrics_server.host, port=self.metrics_server.port, url=url)
        self.subscriber = self._subscribe()
        log.info("bridge_subscribed", endpoint=self.cfg.upstream.endpoint, cameras=self.cfg.cameras or "all",
                 curve=self.cfg.upstream.server_key is not None, sinks=[s.sink for s in self.sinks])
        for sink in self.sinks:
            sink.start()
        end = time.monotonic() + FIRST_ATTEMPT_WAIT_S
        for sink in self.sinks:
            while not sink.first_attempt.wait(RECV_POLL_S) and time.monotonic() < end and not self._stop.is_set():
                pass
        self.notifier.ready(self._status_line())
        log.info("bridge_ready", sinks={s.sink: bool(self.metrics.sample("linewatch_bridge_connected", sink=s.sink))
                                        for s in self.sinks})

    # -- the loop

    def _status_line(self) -> str:
        parts = []
        for s in self.sinks:
            up = self.metrics.sample("linewatch_bridge_connected", sink=s.sink)
            parts.append(f"{s.sink} {'up' if up else 'DOWN'} (queue {len(s.queue)})")
        daemon = "daemon up" if self._upstream_up else "daemon not heard"
        return f"{daemon}; " + ", ".join(parts)

    def _fan_out(self, msg: Any) -> None:
        for sink in self.sinks:
            sink.offer(msg)

    def _set_upstream(self, up: bool, reason: str) -> None:
        if up == self._upstream_up:
            return
        self._upstream_up = up
        self.metrics.upstream_up.set(1 if up else 0)
        (log.info if up else log.warning)("upstream_up" if up else "upstream_down", endpoint=self.cfg.upstream.endpoint,
                                          reason=reason)
        self._fan_out(UpstreamEvent(up=up, reason=reason, time=time.time()))

    def _count_subscriber(self, sub: Subscriber) -> None:
        for cam, n in sub.gaps.items():
            seen = self._gaps_seen.get(cam, 0)
            if n > seen:
                self.metrics.upstream_gaps.labels(cam).inc(n - seen)
                self._gaps_seen[cam] = n
        if sub.malformed > self._malformed_seen:
            self.metrics.malformed.inc(sub.malformed - self._malformed_seen)
            self._malformed_seen = sub.malformed
            log.warning("upstream_malformed", count=sub.malformed, error=sub.last_error)
        if sub.handshake_failures > self._handshake_seen:
            self._handshake_seen = sub.handshake_failures
            log.error("upstream_refused", endpoint=self.cfg.upstream.endpoint, error=sub.last_error)

    def _on_message(self, msg: Verdict | Status) -> None:
        self._last_message = time.monotonic()
        self.metrics.upstream_last.set(time.time())
        if isinstance(msg, Status):
            if msg.camera is not None and self.wanted is not None and msg.camera not in self.wanted:
                return
            if msg.kind == "lifecycle" and msg.state == "stopped":  # ("stopping" is followed by the drain's verdicts)
                self._fan_out(msg)
                self.metrics.received.labels("status").inc()
                self._set_upstream(False, "the daemon stopped")
                return
            self._set_upstream(True, "message received")
            self.metrics.received.labels("status").inc()
        else:
            self._set_upstream(True, "message received")
            self.metrics.received.labels("verdict").inc()
        self._fan_out(msg)
        self._silence_warned = False

    def _check_silence(self, now: float, started: float) -> None:
        stale = self.cfg.upstream.stale_after_s
        last = self._last_message if self._last_message is not None else started
        if now - last < stale:
            return
        if self._upstream_up:
            self._set_upstream(False, f"no message from the daemon for {stale:g} s")
        if not self._silence_warned:
            self._silence_warned = True
            log.warning("upstream_silent", endpoint=self.cfg.upstream.endpoint, seconds=round(now - last, 1),
                        hint="is `linewatch run` running and its publisher.bind reachable from here?")

    def run(self) -> int:
        self.notifier.status("starting")
        try:
            self.start()
        except BaseException:
            self._close(drain=False, report=False)
            raise
        assert self.subscriber is not None
        sub = self.subscriber
        started = time.monotonic()
        last_status = last_ping = 0.0
        exit_code = 0
        while not self._stop.is_set():
            dead = [s.sink for s in self.sinks if not s.is_alive()]
            if dead:  # a bug, already logged by the sink: exit non-zero so that systemd restarts the bridge
                log.error("sink_died", sinks=dead)
                self.request_stop("sink died")
                exit_code = 1
                break
            msg = sub.recv(RECV_POLL_S)
            if msg is not None:
                self._on_message(msg)
            now = time.monotonic()
            self._count_subscriber(sub)
            self._check_silence(now, started)
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                self.notifier.status(self._status_line())
            wd = self.notifier.watchdog_s
            if wd and now - last_ping >= wd / 2 and all(s.is_alive() for s in self.sinks):
                last_ping = now  # a dead sink thread stops the pings: systemd restarts the bridge
                self.notifier.watchdog()
        log.info("bridge_stopping", reason=self._stop_reason)
        self.notifier.stopping(f"stopping ({self._stop_reason})")
        self._close(drain=True)
        return exit_code

    def _close(self, drain: bool, report: bool = True) -> None:
        t0 = time.monotonic()
        if self.subscriber is not None:
            self.subscriber.close()
            self.subscriber = None
        for sink in self.sinks:
            sink.stop(self.cfg.drain_timeout_s if drain else 0.0)
        for sink in self.sinks:
            if sink.is_alive():
                sink.join(self.cfg.drain_timeout_s + 5.0)
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if not report:
            return
        m = self.metrics
        dropped = {s.sink: {r: m.sample("linewatch_bridge_dropped_total", sink=s.sink, reason=r) for r in DROP_REASONS}
                   for s in self.sinks}
        delivered = {s.sink: {k: m.sample("linewatch_bridge_delivered_total", sink=s.sink, kind=k) for k in KINDS}
                     for s in self.sinks}
        log.info("shutdown", seconds=round(time.monotonic() - t0, 3), delivered=delivered, dropped=dropped,
                 received={k: m.sample("linewatch_bridge_received_total", kind=k) for k in KINDS})


def run_bridge(cfg: BridgeConfig) -> int:
    configure_logging(cfg.logging.format, cfg.logging.level)
    bridge = Bridge(cfg)
    bridge.install_signal_handlers()
    return bridge.run()
