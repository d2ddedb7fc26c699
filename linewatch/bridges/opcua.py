"""OPC UA sink: an ``asyncua`` server whose nodes follow the verdicts, for a PLC (reject gate) or SCADA.

Node map (namespace ``opcua.namespace``, string node ids, so a PLC can be configured by name)::

    Objects/Linewatch                                  ns=N;s=linewatch
      Bridge/DaemonUp        Boolean                   ns=N;s=bridge.DaemonUp
      Bridge/DaemonRunId     String                    ns=N;s=bridge.DaemonRunId
      Cameras/<camera>/…                               ns=N;s=cameras.<camera>.<Name>
        LastVerdict String "pass"|"fail" · Score Double · Threshold Double · PValue Double (NaN: none)
        PartId String (the verdict's part_id, else its sequence) · Sequence UInt64 · Timestamp DateTime
        (capture) · VerdictTime DateTime · TimedOut Boolean · PassCount UInt64 · FailCount UInt64 · Reject Boolean ·
        State String · StateReason String · Condition String · RunId String · ModelId String

Per verdict every value is written first and ``Reject`` last, so a client that reacts to ``Reject`` (or to
``Sequence``) reads the matching score and part id. ``Reject`` alone cannot tell two fails in a row apart
(it stays true): count parts with ``Sequence`` or ``FailCount``. All nodes are read-only.

The server runs in its own thread with its own asyncio loop; the queue from the subscriber is read there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import math
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from linewatch.bridges.config import OpcuaConfig
from linewatch.bridges.sink import CameraState, Message, Sink, UpstreamEvent
from linewatch.bridges.telemetry import BridgeMetrics
from linewatch.errors import ConfigError
from linewatch.messages import Status, Verdict

QUEUE_POLL_S = 0.2  # how long one executor wait for the queue lasts (bounds the reaction to a stop request)
OPCUA_EPOCH = dt.datetime(1601, 1, 1, tzinfo=dt.timezone.utc)  # DateTime 0 in OPC UA: "no time"

# name → (variant type name, initial value); the order is the write order, Reject last
_VERDICT_NODES: tuple[tuple[str, str, Any], ...] = (
    ("LastVerdict", "String", ""),
    ("Score", "Double", math.nan),
    ("Threshold", "Double", math.nan),
    ("PValue", "Double", math.nan),
    ("PartId", "String", ""),
    ("Timestamp", "DateTime", OPCUA_EPOCH),
    ("VerdictTime", "DateTime", OPCUA_EPOCH),
    ("RunId", "String", ""),
    ("ModelId", "String", ""),
    ("TimedOut", "Boolean", False),
    ("PassCount", "UInt64", 0),
    ("FailCount", "UInt64", 0),
    ("Sequence", "UInt64", 0),
    ("Reject", "Boolean", False),
)
_STATE_NODES: tuple[tuple[str, str, Any], ...] = (
    ("State", "String", "unknown"),
    ("StateReason", "String", ""),
    ("Condition", "String", ""),
)
NODE_NAMES = tuple(n for n, _, _ in _VERDICT_NODES + _STATE_NODES)
# before the camera's first verdict these carry status BadWaitingForInitialData (OPC UA's "no value yet"),
# so the first verdict is a change a subscriber sees even when its value equals the placeholder
_WAITING = frozenset(n for n, _, _ in _VERDICT_NODES) - {"PassCount", "FailCount", "Reject"}


def _utc(t: float | None) -> dt.datetime | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc)


class _LibraryLogs(logging.Handler):
    """asyncua logs through the standard library: its warnings become one-line JSON events like ours."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # a malformed library log call must not break the server
            text = str(record.msg)
        structlog.get_logger("linewatch.bridge.opcua").warning("opcua_library", logger=record.name,
                                                               level_name=record.levelname.lower(), message=text)


def _route_library_logs() -> None:
    lib = logging.getLogger("asyncua")
    if not any(isinstance(h, _LibraryLogs) for h in lib.handlers):
        lib.addHandler(_LibraryLogs(logging.WARNING))
    lib.setLevel(logging.WARNING)
    lib.propagate = False


def _read_pem_or_der(path: Path, what: str, key: str) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"opcua.{key}: cannot read the {what} {path} ({exc.strerror or exc})") from None
    return data, ("pem" if data.lstrip().startswith(b"-----BEGIN") else "der")


def load_certificate(path: Path, key: str = "certificate") -> tuple[bytes, str]:
    """The certificate's bytes and format, checked now so that a bad file is a one-line error at start."""
    data, fmt = _read_pem_or_der(path, "certificate", key)
    try:
        (x509.load_pem_x509_certificate if fmt == "pem" else x509.load_der_x509_certificate)(data)
    except ValueError as exc:
        raise ConfigError(f"opcua.{key}: {path} is not an X.509 certificate in PEM or DER ({exc})") from None
    return data, fmt


def load_private_key(path: Path) -> tuple[bytes, str]:
    data, fmt = _read_pem_or_der(path, "private key", "private_key")
    try:
        if fmt == "pem":
            serialization.load_pem_private_key(data, password=None)
        else:
            serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"opcua.private_key: {path} is not an unencrypted private key in PEM or DER "
                          f"({exc})") from None
    return data, fmt


def load_trusted_clients(folder: Path) -> set[bytes]:
    """DER bytes of every client certificate in the folder (*.pem, *.crt, *.der)."""
    if not folder.is_dir():
        raise ConfigError(f"opcua.trusted_clients_dir: {folder} is not a folder")
    trusted: set[bytes] = set()
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in (".pem", ".crt", ".der") or not p.is_file():
            continue
        data, fmt = load_certificate(p, "trusted_clients_dir")
        cert = x509.load_pem_x509_certificate(data) if fmt == "pem" else x509.load_der_x509_certificate(data)
        trusted.add(cert.public_bytes(serialization.Encoding.DER))
    if not trusted:
        raise ConfigError(f"opcua.trusted_clients_dir: no certificate (*.pem, *.crt, *.der) in {folder}")
    return trusted


class _Users:
    """asyncua user manager: only the configured names and passwords (compared in constant time)."""

    def __init__(self, users: dict[str, str], on_refused: Any):
        self._users = {name: pw.encode("utf-8") for name, pw in users.items()}
        self._on_refused = on_refused

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        expected = self._users.get(username or "")
        given = (password or "").encode("utf-8")
        # compare even for an unknown name, so the time taken does not tell which names exist
        ok = hmac.compare_digest(expected if expected is not None else b"\0" * 16, given) and expected is not None
        if not ok:
            self._on_refused(username)
            return None
        return User(role=UserRole.User, name=username)


class OpcuaSink(Sink):
    sink = "opcua"

    def __init__(self, cfg: OpcuaConfig, metrics: BridgeMetrics, cameras: list[str] | None):
        super().__init__(cfg.queue, cfg.reconnect, metrics, cameras)
        self.cfg = cfg
        # files are read now, in the main thread: a bad path is a one-line error before READY
        self._cert = load_certificate(cfg.certificate) if cfg.certificate else None
        self._key = load_private_key(cfg.private_key) if cfg.private_key else None
        self._trusted = load_trusted_clients(cfg.trusted_clients_dir) if cfg.trusted_clients_dir else None
        self._server: Any = None
        self._ns = 0
        self._cameras_folder: Any = None
        self._node_ids: dict[str, dict[str, Any]] = {}  # camera → node name → NodeId
        self._values: dict[str, dict[str, Any]] = {}  # camera → node name → last value (re-written after a restart)
        self._bridge_values: dict[str, Any] = {"DaemonUp": False, "DaemonRunId": ""}
        self._pulses: dict[str, asyncio.TimerHandle] = {}
        self.endpoint = cfg.endpoint
        _route_library_logs()

    # -- server setup

    async def _build_server(self) -> Any:
        from asyncua import Server, ua

        cfg = self.cfg
        server = Server()
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name("linewatch bridge")
        server.product_uri = "urn:linewatch"
        server.manufacturer_name = "linewatch"
        await server.set_application_uri(cfg.application_uri)
        server.allow_remote_admin(False)  # asyncua's built-in "admin" user could otherwise edit the address space
        policy = {"none": ua.SecurityPolicyType.NoSecurity,
                  "sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                  "sign_and_encrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}[cfg.security]
        server.set_security_policy([policy])
        if self._cert is not None and self._key is not None:
            await server.load_certificate(self._cert[0], format=self._cert[1])
            await server.load_private_key(self._key[0], format=self._key[1])
        if self._trusted is not None:
            server.set_certificate_validator(self._validate_client)
        if cfg.users:
            server.iserver.set_user_manager(_Users({u.name: u.password.get_secret_value() for u in cfg.users},
                                                   self._refused))
            server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        self._ns = await server.register_namespace(cfg.namespace)
        root = await server.nodes.objects.add_object(ua.NodeId("linewatch", self._ns), ua.QualifiedName(
            "Linewatch", self._ns))
        bridge = await root.add_object(ua.NodeId("bridge", self._ns), ua.QualifiedName("Bridge", self._ns))
        await bridge.add_variable(ua.NodeId("bridge.DaemonUp", self._ns), ua.QualifiedName("DaemonUp", self._ns),
                                  self._bridge_values["DaemonUp"], ua.VariantType.Boolean)
        await bridge.add_variable(ua.NodeId("bridge.DaemonRunId", self._ns), ua.QualifiedName("DaemonRunId", self._ns),
                                  self._bridge_values["DaemonRunId"], ua.VariantType.String)
        self._cameras_folder = await root.add_folder(ua.NodeId("cameras", self._ns), ua.QualifiedName(
            "Cameras", self._ns))
        self._server = server
        self._node_ids.clear()
        for cam in list(self._values) or sorted(self.states.wanted or ()):
            await self._camera_nodes(cam)
        return server

    async def _validate_client(self, cert: Any, _app: Any) -> None:
        from asyncua import ua
        from asyncua.common.utils import ServiceError

        if self._trusted is not None and cert.public_bytes(serialization.Encoding.DER) not in self._trusted:
            self.metrics.auth_failures.labels(self.sink).inc()
            self.log.warning("opcua_client_refused", subject=cert.subject.rfc4514_string(),
                             reason="client certificate not in opcua.trusted_clients_dir")
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    def _refused(self, username: str | None) -> None:
        self.metrics.auth_failures.labels(self.sink).inc()
        self.log.warning("opcua_login_refused", user=username, reason="unknown user or wrong password")

    async def _camera_nodes(self, cam: str) -> dict[str, Any]:
        """The camera's nodes, created on first use (with its last values after a server restart)."""
        ids = self._node_ids.get(cam)
        if ids is not None:
            return ids
        from asyncua import ua

        obj = await self._cameras_folder.add_object(ua.NodeId(f"cameras.{cam}", self._ns),
                                                    ua.QualifiedName(cam, self._ns))
        values = self._values.setdefault(cam, {})
        ids = {}
        for name, vtype, initial in _VERDICT_NODES + _STATE_NODES:
            value = values.get(name, initial)
            variant = ua.Variant(value, getattr(ua.VariantType, vtype))
            var = await obj.add_variable(ua.NodeId(f"cameras.{cam}.{name}", self._ns),
                                         ua.QualifiedName(name, self._ns), variant)
            if name in _WAITING and name not in values:
                await self._server.write_attribute_value(var.nodeid, ua.DataValue(
                    variant, StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData)))
            ids[name] = var.nodeid
        self._node_ids[cam] = ids
        return ids

    # -- writing

    async def _write(self, nodeid: Any, value: Any, vtype: str, source_time: dt.datetime | None = None) -> None:
        from asyncua import ua

        now = dt.datetime.now(dt.timezone.utc)
        dv = ua.DataValue(ua.Variant(value, getattr(ua.VariantType, vtype)), SourceTimestamp=source_time or now,
                          ServerTimestamp=now)
        await self._server.write_attribute_value(nodeid, dv)

    async def _set(self, cam: str, name: str, value: Any, source_time: dt.datetime | None = None) -> None:
        ids = await self._camera_nodes(cam)
        self._values[cam][name] = value
        vtype = next(t for n, t, _ in _VERDICT_NODES + _STATE_NODES if n == name)
        await self._write(ids[name], value, vtype, source_time)

    async def _set_bridge(self, name: str, value: Any) -> None:
        from asyncua import ua

        self._bridge_values[name] = value
        await self._write(ua.NodeId(f"bridge.{name}", self._ns), value,
                          "Boolean" if isinstance(value, bool) else "String")

    async def _verdict(self, v: Verdict) -> None:
        if self.states.wanted is not None and v.camera not in self.states.wanted:
            return
        cam = v.camera
        await self._camera_nodes(cam)
        values = self._values[cam]
        t = _utc(v.capture_time)
        part = getattr(v, "part_id", None)  # not in schema v1; used as soon as the daemon sends one
        score = v.score if math.isfinite(v.score) else math.nan
        for name, value in (("LastVerdict", v.verdict), ("Score", float(score)), ("Threshold", float(v.threshold)),
                            ("PValue", math.nan if v.p_value is None else float(v.p_value)),
                            ("PartId", str(part) if part is not None else str(v.sequence)),
                            ("Timestamp", t), ("VerdictTime", _utc(v.verdict_time)), ("RunId", v.run_id),
                            ("ModelId", v.model_id), ("TimedOut", bool(getattr(v, "timed_out", False)))):
            await self._set(cam, name, value, t)
        counter = "FailCount" if v.failed else "PassCount"
        await self._set(cam, counter, int(values.get(counter, 0)) + 1, t)
        await self._set(cam, "Sequence", int(v.sequence), t)
        await self._reject(cam, v.failed, t)

    async def _reject(self, cam: str, failed: bool, t: dt.datetime | None) -> None:
        pulse = self.cfg.reject_pulse_ms
        if pulse is None:
            await self._set(cam, "Reject", failed, t)
            return
        if not failed:
            return  # in pulse mode only the timer clears Reject
        old = self._pulses.pop(cam, None)
        if old is not None:
            old.cancel()
        await self._set(cam, "Reject", True, t)
        loop = asyncio.get_running_loop()
        self._pulses[cam] = loop.call_later(pulse / 1000.0, lambda: loop.create_task(self._end_pulse(cam)))

    async def _end_pulse(self, cam: str) -> None:
        self._pulses.pop(cam, None)
        if self._server is not None:
            await self._set(cam, "Reject", False)

    async def _camera_state(self, cam: str, cs: CameraState) -> None:
        t = _utc(cs.time)
        await self._set(cam, "State", cs.state, t)
        await self._set(cam, "StateReason", cs.reason or "", t)
        await self._set(cam, "Condition", cs.condition or "", t)

    async def _apply(self, item: Message | UpstreamEvent) -> None:
        if isinstance(item, UpstreamEvent):
            await self._set_bridge("DaemonUp", item.up)
            if not item.up:
                for cam in self.states.all_unknown(item.reason, item.time):
                    await self._camera_state(cam, self.states.cameras[cam])
            return
        if isinstance(item, Status):
            if item.run_id and item.run_id != self._bridge_values["DaemonRunId"]:
                await self._set_bridge("DaemonRunId", item.run_id)
            for cam in self.states.apply(item):
                await self._camera_state(cam, self.states.cameras[cam])
            self.metrics.delivered.labels(self.sink, "status").inc()
            return
        await self._verdict(item)
        self.metrics.delivered.labels(self.sink, "verdict").inc()

    # -- the thread

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            self.log.exception("opcua_sink_crashed", error=str(exc))
            raise
        finally:
            self.set_connected(False)
            self.first_attempt.set()
            left = self.count_leftovers()
            self.log.info("opcua_stopped", dropped_at_shutdown=left)

    async def _wait(self, seconds: float) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.stop_event.wait, seconds)

    async def _main(self) -> None:
        attempt = 0
        ever = False
        while not self.stop_event.is_set():
            try:
                server = await self._build_server()
                await server.start()
            except (OSError, asyncio.TimeoutError) as exc:
                self.first_attempt.set()
                delay = self.backoff(attempt)
                attempt += 1
                self.log.warning("opcua_listen_failed", endpoint=self.endpoint, attempt=attempt,
                                 retry_in_s=round(delay, 2),
                                 error=f"OPC UA server cannot listen on {self.endpoint} "
                                 f"({getattr(exc, 'strerror', None) or exc}); retrying in {delay:.1f} s (not fatal)")
                if await self._wait(delay):
                    return
                continue
            if ever:
                self.metrics.reconnects.labels(self.sink).inc()
            ever, attempt = True, 0
            self.set_connected(True)
            self.first_attempt.set()
            self.log.info("opcua_listening", endpoint=self.endpoint, namespace=self.cfg.namespace,
                          namespace_index=self._ns, security=self.cfg.security,
                          users=[u.name for u in self.cfg.users] or None, anonymous=not self.cfg.users,
                          reject_pulse_ms=self.cfg.reject_pulse_ms)
            if self.cfg.users and self.cfg.security == "none":
                self.log.warning("opcua_password_in_clear", endpoint=self.endpoint,
                                 reason="users are set but security is none: passwords cross the network "
                                 "unencrypted; use security sign_and_encrypt")
            try:
                await self._serve()
                return
            except Exception as exc:  # keep the PLC's view alive: restart the server rather than die
                self.log.exception("opcua_server_error", error=str(exc))
                if await self._wait(self.backoff(attempt)):
                    return
            finally:
                for cam, handle in self._pulses.items():
                    handle.cancel()
                    self._values[cam]["Reject"] = False  # the pulse's end is not coming: a new server starts clear
                self._pulses.clear()
                self.set_connected(False)
                self._server = None
                await server.stop()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.stop_event.is_set() and (not len(self.queue) or self.draining_over()):
                return
            item = await loop.run_in_executor(None, self.queue.get, QUEUE_POLL_S)
            if item is None:
                continue
            try:
                await self._apply(item)
            except Exception as exc:
                if not isinstance(item, UpstreamEvent):
                    self.metrics.dropped.labels(self.sink, "error").inc()
                self.log.error("opcua_write_failed", error=str(exc), kind=type(item).__name__)
                raise
