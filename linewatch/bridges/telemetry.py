"""The bridge's Prometheus metrics: its own registry and its own ``/metrics`` port (not the daemon's).

Per sink, every message taken from the daemon ends as exactly one of: delivered, dropped{reason}, or still
queued (``linewatch_bridge_queue_depth``) — so ``received = delivered + dropped + queue depth`` (+ MQTT
messages sent and not yet acknowledged) holds for each sink.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

DROP_REASONS = ("queue_full", "connection_lost", "error", "shutdown")
KINDS = ("verdict", "status")


class BridgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.received = Counter("linewatch_bridge_received", "Messages received from the daemon (after the "
                                "camera filter)", ["kind"], registry=r)
        self.malformed = Counter("linewatch_bridge_malformed", "Messages from the daemon that did not follow the "
                                 "wire schema (skipped)", registry=r)
        self.upstream_gaps = Counter("linewatch_bridge_upstream_gaps", "Verdicts the bridge never received from the "
                                     "daemon (sequence gaps)", ["camera"], registry=r)
        self.upstream_up = Gauge("linewatch_bridge_upstream_up", "1 while messages from the daemon arrive "
                                 "(within upstream.stale_after_s)", registry=r)
        self.upstream_last = Gauge("linewatch_bridge_upstream_last_message_timestamp_seconds",
                                   "Wall-clock time of the last message from the daemon", registry=r)
        self.delivered = Counter("linewatch_bridge_delivered", "Messages a sink delivered (MQTT: acknowledged by "
                                 "the broker at QoS ≥ 1; OPC UA: written to the nodes)", ["sink", "kind"],
                                 registry=r)
        self.dropped = Counter("linewatch_bridge_dropped", "Messages a sink did not deliver, by reason: queue_full "
                               "(oldest dropped while the sink was slow or disconnected), connection_lost (MQTT QoS 0 "
                               "messages not yet written when the connection broke), error (refused), shutdown "
                               "(still queued or unconfirmed at exit)", ["sink", "reason"], registry=r)
        self.reconnects = Counter("linewatch_bridge_reconnects", "Connections re-established (MQTT) or server "
                                  "restarts (OPC UA) after the first", ["sink"], registry=r)
        self.connected = Gauge("linewatch_bridge_connected", "1 while the sink can deliver (MQTT: connected to the "
                               "broker; OPC UA: listening)", ["sink"], registry=r)
        self.queue_depth = Gauge("linewatch_bridge_queue_depth", "Messages waiting in the sink's queue", ["sink"],
                                 registry=r)
        self.auth_failures = Counter("linewatch_bridge_auth_failures", "Refused OPC UA logins (wrong user or "
                                     "password) and client certificates; MQTT connections the broker refused "
                                     "(bad user name or password, not authorised)", ["sink"], registry=r)
        ProcessCollector(registry=r)  # process_* series like the daemon's (memory, CPU, open files)

    def sample(self, name: str, **labels: str) -> float:
        """One sample's current value (0 if it does not exist yet)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def init_sink(self, sink: str, depth: Callable[[], int]) -> None:
        """Every series of a sink exists from the start (at 0), so rate() and alerts see it before the first event."""
        for kind in KINDS:
            self.delivered.labels(sink, kind)
        for reason in DROP_REASONS:
            self.dropped.labels(sink, reason)
        self.reconnects.labels(sink)
        self.auth_failures.labels(sink)
        self.connected.labels(sink).set(0)
        self.queue_depth.labels(sink).set_function(lambda: float(depth()))

