"""MQTT sink: each verdict as JSON on ``<prefix>/<camera>/verdict``, retained camera status on
``<prefix>/<camera>/status``, and ``<prefix>/bridge/status`` = ``online`` | ``offline`` (retained; ``offline``
is also the last will, so a crashed bridge or a lost network shows as offline). ``<prefix>/bridge/daemon``
= ``up`` | ``down`` tells whether the daemon itself is heard.

One thread owns the paho client and drives its network loop itself, so reconnecting follows the bridge's
backoff (capped exponential with jitter) instead of paho's fixed one. While disconnected, messages wait
in the bounded queue (oldest dropped when full, counted); QoS 1/2 messages in flight when the connection
broke are sent again by paho after the reconnect.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import time
from typing import Any

from paho.mqtt.client import CallbackAPIVersion, Client, MQTTErrorCode, MQTTProtocolVersion

from linewatch.bridges.config import BRIDGE_TOPIC_LEVEL, MqttConfig
from linewatch.bridges.sink import CameraState, Message, Sink, UpstreamEvent
from linewatch.bridges.telemetry import BridgeMetrics
from linewatch.errors import ConfigError
from linewatch.messages import Status, Verdict, verdict_to_dict

IDLE_WAIT_S = 0.05  # queue wait between network-loop turns: bounds ack/keepalive handling latency
OFFLINE_FLUSH_S = 1.0  # at shutdown, how long to wait for the broker to take the retained "offline"


def default_client_id() -> str:
    return f"linewatch-bridge-{socket.gethostname()[:40]}-{os.urandom(3).hex()}"


def verdict_payload(v: Verdict, include_mask: bool) -> bytes:
    """The verdict header as `linewatch subscribe --json` prints it, optionally with the mask (base64)."""
    d: dict[str, Any] = verdict_to_dict(v)
    if include_mask and v.mask_png is not None:
        d["mask_png_base64"] = base64.b64encode(v.mask_png).decode("ascii")
    return json.dumps(d, separators=(",", ":")).encode("utf-8")


class MqttSink(Sink):
    sink = "mqtt"

    def __init__(self, cfg: MqttConfig, metrics: BridgeMetrics, cameras: list[str] | None):
        super().__init__(cfg.queue, cfg.reconnect, metrics, cameras)
        self.cfg = cfg
        self.prefix = cfg.topic_prefix
        self.client_id = cfg.client_id or default_client_id()
        self.daemon_up: bool | None = None
        self._connected = False
        self._connack: Any = None  # reason code of the last CONNACK, None while waiting
        self._pending: dict[int, str] = {}  # mid → kind, sent and not yet confirmed by paho
        self._warned_bridge_camera = False
        self.client = self._make_client()
        self.client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)  # only stores where to connect

    # -- setup

    def _make_client(self) -> Client:
        cfg = self.cfg
        protocol = MQTTProtocolVersion.MQTTv5 if cfg.protocol == "5" else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = {"clean_session": True} if protocol == MQTTProtocolVersion.MQTTv311 else {}
        c = Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
                   reconnect_on_failure=False, **kwargs)
        c.connect_timeout = cfg.connect_timeout_s
        c.max_inflight_messages_set(cfg.max_inflight)
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password is not None else None)
        if cfg.tls is not None:
            t = cfg.tls
            try:
                c.tls_set(ca_certs=str(t.ca_file) if t.ca_file else None,
                          certfile=str(t.cert_file) if t.cert_file else None,
                          keyfile=str(t.key_file) if t.key_file else None,
                          cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ValueError) as exc:  # missing file, not PEM, key not matching the certificate
                raise ConfigError(f"mqtt.tls: cannot load the CA/certificate/key ({exc}); check mqtt.tls.*") from None
        c.will_set(self.topic(BRIDGE_TOPIC_LEVEL, "status"), "offline", qos=cfg.qos, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        return c

    def topic(self, level: str, leaf: str) -> str:
        return f"{self.prefix}/{level}/{leaf}"

    # -- paho callbacks (called from this thread, inside loop()/publish())

    def _on_connect(self, _c: Client, _u: object, _flags: object, reason: Any, _props: object) -> None:
        self._connack = reason
        self._connected = not reason.is_failure

    def _on_disconnect(self, _c: Client, _u: object, _flags: object, reason: Any, _props: object) -> None:
        was = self._connected
        self._connected = False
        self.set_connected(False)
        if self.cfg.qos == 0 and self._pending:
            # QoS 0 messages still in paho's buffer are gone with the socket (QoS ≥ 1 ones are resent)
            lost = list(self._pending.values())
            self._pending.clear()
            for _ in lost:
                self.metrics.dropped.labels(self.sink, "connection_lost").inc()
        if was and not self.stop_event.is_set():
            self.log.warning("mqtt_disconnected", broker=f"{self.cfg.host}:{self.cfg.port}", reason=str(reason),
                             unconfirmed=len(self._pending))

    def _on_publish(self, _c: Client, _u: object, mid: int, _reason: object, _props: object) -> None:
        kind = self._pending.pop(mid, None)
        if kind is not None:
            self.metrics.delivered.labels(self.sink, kind).inc()

    # -- connecting

    def _connect_once(self) -> str | None:
        """One attempt: TCP (+TLS) and CONNACK. None on success, else why not (one line)."""
        where = f"{self.cfg.host}:{self.cfg.port}"
        self._connack = None
        try:
            # one client object for the process: QoS ≥ 1 messages in flight survive a reconnect
            self.client.reconnect()
        except ssl.SSLError as exc:
            return f"TLS with the MQTT broker {where} failed ({exc.reason or exc})"
        except (OSError, ValueError) as exc:
            return f"cannot connect to the MQTT broker {where} ({getattr(exc, 'strerror', None) or exc})"
        end = time.monotonic() + self.cfg.connect_timeout_s
        while self._connack is None and time.monotonic() < end and not self.stop_event.is_set():
            rc = self.client.loop(IDLE_WAIT_S)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,) and self._connack is None:
                return f"the MQTT broker {where} closed the connection before CONNACK ({rc.name})"
        if self._connack is None:
            self._drop_socket()
            return f"no CONNACK from the MQTT broker {where} within {self.cfg.connect_timeout_s:g} s"
        if self._connack.is_failure:
            self._drop_socket()
            if self._connack.value in (0x04, 0x05, 0x86, 0x87):  # bad user name or password / not authorised
                self.metrics.auth_failures.labels(self.sink).inc()
            return f"the MQTT broker {where} refused the connection ({self._connack})"
        return None

    def _drop_socket(self) -> None:
        try:
            self.client.disconnect()
            self.client.loop(0)
        except (OSError, ValueError):
            pass
        self._connected = False

    def _announce(self) -> None:
        """After each (re)connect: the retained topics again (a broker restarted without persistence lost them)."""
        self._publish_retained(self.topic(BRIDGE_TOPIC_LEVEL, "status"), b"online")
        if self.daemon_up is not None:
            self._publish_retained(self.topic(BRIDGE_TOPIC_LEVEL, "daemon"), b"up" if self.daemon_up else b"down")
        for cam, cs in self.states.cameras.items():
            self._publish_camera(cam, cs)

    # -- publishing

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=self.cfg.qos, retain=True)  # not counted: the bridge's own

    def _publish_camera(self, camera: str, cs: CameraState) -> None:
        if camera == BRIDGE_TOPIC_LEVEL:
            if not self._warned_bridge_camera:
                self._warned_bridge_camera = True
                self.log.warning("mqtt_camera_status_skipped", camera=camera,
                                 reason=f"{self.prefix}/{camera}/status is the bridge's own topic; rename the camera")
            return
        payload = json.dumps(cs.as_dict(camera), separators=(",", ":")).encode("utf-8")
        self._publish_retained(self.topic(camera, "status"), payload)

    def _handle(self, item: Message | UpstreamEvent) -> bool:
        """Send or apply one queued item; False if the connection is gone (the item goes back to the queue)."""
        if isinstance(item, UpstreamEvent):
            self.daemon_up = item.up
            self._publish_retained(self.topic(BRIDGE_TOPIC_LEVEL, "daemon"), b"up" if item.up else b"down")
            if not item.up:
                for cam in self.states.all_unknown(item.reason, item.time):
                    self._publish_camera(cam, self.states.cameras[cam])
            return True
        if isinstance(item, Status):
            for cam in self.states.apply(item):
                self._publish_camera(cam, self.states.cameras[cam])
            self.metrics.delivered.labels(self.sink, "status").inc()
            return True
        try:
            info = self.client.publish(self.topic(item.camera, "verdict"), verdict_payload(item, self.cfg.include_mask),
                                       qos=self.cfg.qos, retain=self.cfg.retain_verdicts)
        except ValueError as exc:  # e.g. payload over the MQTT size limit
            self.metrics.dropped.labels(self.sink, "error").inc()
            self.log.error("mqtt_publish_refused", camera=item.camera, sequence=item.sequence, error=str(exc))
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if self.cfg.qos == 0:
                self.queue.put_back(item)
                return False
            # QoS ≥ 1: paho keeps it and sends it after the reconnect
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.metrics.dropped.labels(self.sink, "error").inc()
            self.log.error("mqtt_publish_failed", camera=item.camera, sequence=item.sequence, rc=info.rc.name)
            return True
        if info.is_published():  # QoS 0 written at once (on_publish already ran, before the mid was known)
            self.metrics.delivered.labels(self.sink, "verdict").inc()
        else:
            self._pending[info.mid] = "verdict"
        return self._connected

    def _pump(self) -> None:
        """Connected: move queued messages to the broker until the connection drops or the drain is over."""
        while self._connected:
            if self.stop_event.is_set() and ((not len(self.queue) and not self._pending) or self.draining_over()):
                return
            self.client.loop(0)  # acks in, queued bytes out, keepalive
            if not self._connected:
                return
            if len(self._pending) >= self.cfg.max_inflight:
                self.client.loop(IDLE_WAIT_S)
                continue
            item = self.queue.get(IDLE_WAIT_S)
            if item is not None and not self._handle(item):
                return

    def run(self) -> None:
        attempt = 0
        ever = False
        broker = f"{self.cfg.host}:{self.cfg.port}"
        try:
            while not self.stop_event.is_set():
                error = self._connect_once()
                self.first_attempt.set()
                if error is not None:
                    if self.stop_event.is_set():
                        break
                    delay = self.backoff(attempt)
                    attempt += 1
                    self.log.warning("mqtt_unreachable", broker=broker, attempt=attempt, retry_in_s=round(delay, 2),
                                     error=f"{error}; retrying in {delay:.1f} s (not fatal)")
                    if self.wait_or_stop(delay):
                        break
                    continue
                if ever:
                    self.metrics.reconnects.labels(self.sink).inc()
                self.set_connected(True)
                self.log.info("mqtt_connected", broker=broker, client_id=self.client_id, attempts=attempt + 1,
                              reconnect=ever, tls=self.cfg.tls is not None, qos=self.cfg.qos)
                ever, attempt = True, 0
                self._announce()
                self._pump()
        except Exception as exc:  # a bug must not leave the sink silently dead: log it, the watchdog sees the thread
            self.log.exception("mqtt_sink_crashed", error=str(exc))
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._connected:
            info = self.client.publish(self.topic(BRIDGE_TOPIC_LEVEL, "status"), b"offline", qos=self.cfg.qos,
                                       retain=True)
            end = time.monotonic() + OFFLINE_FLUSH_S
            while self._connected and not info.is_published() and time.monotonic() < end:
                self.client.loop(IDLE_WAIT_S)
            self._drop_socket()
        self.set_connected(False)
        left = self.count_leftovers(len(self._pending))
        self._pending.clear()
        self.log.info("mqtt_stopped", dropped_at_shutdown=left)
