"""Bridge configuration: one YAML file plus ``LINEWATCH_BRIDGE_…`` environment overrides.

Same rules as the daemon's config (:mod:`linewatch.service.config`): environment > file > defaults,
nested keys with ``__`` (``LINEWATCH_BRIDGE_MQTT__PASSWORD=…`` keeps a secret out of the file), unknown
keys are errors that name the key, relative paths are relative to the config file's folder. Every
error is one line (:class:`~linewatch.errors.ConfigError`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from linewatch.errors import ConfigError
from linewatch.messages import CAMERA_NAME_RE
from linewatch.service.config import (
    FileSettings,
    LoggingConfig,
    MetricsConfig,
    ReconnectConfig,
    _read_yaml,
)

DEFAULT_BRIDGE_CONFIG_PATH = Path("/etc/linewatch/bridge.yaml")
ENV_PREFIX = "LINEWATCH_BRIDGE_"
BRIDGE_TOPIC_LEVEL = "bridge"  # <prefix>/bridge/status: a camera may not be called this when MQTT is on

PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class UpstreamConfig(_Section):
    """The daemon whose verdicts are bridged (what `linewatch subscribe` takes)."""

    endpoint: str = Field("tcp://127.0.0.1:5555", description="the daemon's publisher.bind address")
    server_key: Path | None = Field(None, description="the daemon's CURVE public key (server.key) when it sets "
                                    "publisher.curve; null = plain TCP")
    client_key: Path | None = Field(None, description="this bridge's CURVE secret key (NAME.key_secret) when the "
                                    "daemon admits only listed clients; null = a throwaway key")
    stale_after_s: PositiveFloat = Field(15.0, description="no message from the daemon this long → it counts as "
                                         "down (camera states become 'unknown'); keep above 2× heartbeat_s")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^(tcp|ipc)://.+", v):
            raise ValueError(f"endpoint {v!r} is not a ZeroMQ address like tcp://127.0.0.1:5555")
        return v

    @model_validator(mode="after")
    def _keys(self) -> UpstreamConfig:
        if self.client_key is not None and self.server_key is None:
            raise ValueError("client_key needs server_key (the daemon's server.key)")
        return self


class SinkQueueConfig(_Section):
    queue: int = Field(1000, ge=1, le=1_000_000, description="messages waiting for this sink; when full the "
                       "oldest is dropped and counted in linewatch_bridge_dropped_total{reason=\"queue_full\"}")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)


class OpcuaUser(_Section):
    name: str = Field(min_length=1, max_length=128)
    password: SecretStr = Field(description="set it from the environment, e.g. "
                                "LINEWATCH_BRIDGE_OPCUA__USERS='[{\"name\":\"plc\",\"password\":\"…\"}]'")

    @field_validator("password")
    @classmethod
    def _nonempty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("password is empty")
        return v


OPCUA_SECURITY = ("none", "sign", "sign_and_encrypt")


class OpcuaConfig(SinkQueueConfig):
    """An OPC UA server with nodes per camera, for a PLC (reject gate) or SCADA to poll or subscribe to."""

    endpoint: str = Field("opc.tcp://127.0.0.1:4840/linewatch/", description="address the server listens on; "
                          "opc.tcp://0.0.0.0:4840/linewatch/ for every interface")
    application_uri: str = Field("urn:linewatch:bridge", description="server application URI; must equal the "
                                 "URI in the certificate's subjectAltName when a certificate is used")
    namespace: str = Field("urn:linewatch:bridge", description="namespace URI of the linewatch nodes")
    reject_pulse_ms: int | None = Field(
        None, ge=1, le=600_000, description="null: Reject follows the last verdict (true iff it failed); a number: "
        "Reject goes true on each fail and back to false this long after the last fail")
    security: Literal["none", "sign", "sign_and_encrypt"] = Field(
        "none", description="Basic256Sha256 message security; sign/sign_and_encrypt need certificate and "
        "private_key, and then no unsecured endpoint is offered")
    certificate: Path | None = Field(None, description="server certificate (PEM or DER)")
    private_key: Path | None = Field(None, description="its private key (PEM or DER, unencrypted)")
    trusted_clients_dir: Path | None = Field(
        None, description="folder of client certificates (*.pem, *.der) allowed to connect with security; "
        "null = any client certificate")
    users: list[OpcuaUser] = Field(default_factory=list, description="empty: anonymous read access; else only "
                                   "these user names and passwords")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parts = urlsplit(v)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "opc.tcp" or not parts.hostname or port is None:
            raise ValueError(f"endpoint {v!r} is not like opc.tcp://127.0.0.1:4840/linewatch/")
        return v

    @field_validator("users")
    @classmethod
    def _unique_users(cls, v: list[OpcuaUser]) -> list[OpcuaUser]:
        names = [u.name for u in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"user {dup[0]!r} is listed twice")
        return v

    @model_validator(mode="after")
    def _security(self) -> OpcuaConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.security != "none" and self.certificate is None:
            raise ValueError(f"security {self.security} needs certificate and private_key")
        if self.trusted_clients_dir is not None and self.security == "none":
            raise ValueError("trusted_clients_dir needs security sign or sign_and_encrypt")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        return int(urlsplit(self.endpoint).port or 0)


class MqttTlsConfig(_Section):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate; null = the "
                                 "system's CAs")
    cert_file: Path | None = Field(None, description="client certificate, for brokers that require one")
    key_file: Path | None = Field(None, description="its private key")

    @model_validator(mode="after")
    def _pair(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


_TOPIC_PREFIX_RE = re.compile(r"^[^/#+\x00]+(/[^/#+\x00]+)*$")


class MqttConfig(SinkQueueConfig):
    """Verdicts and camera status to an MQTT broker, for the MES / historian / dashboards."""

    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="1883 plain, 8883 usually TLS")
    client_id: str | None = Field(None, max_length=128, description="null = linewatch-bridge-<host>-<random>")
    topic_prefix: str = Field("linewatch", description="topics are <prefix>/<camera>/verdict, "
                              "<prefix>/<camera>/status, <prefix>/bridge/status")
    qos: Literal[0, 1, 2] = Field(1, description="for every message; 1 = at least once (repeated after a "
                                  "reconnect if the broker's acknowledgement was lost)")
    retain_verdicts: bool = Field(False, description="keep the last verdict per camera on the broker")
    include_mask: bool = Field(False, description="add the defect mask PNG (base64) as mask_png_base64 when the "
                               "daemon sent one (publisher.masks)")
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = Field(30, ge=5, le=3600)
    connect_timeout_s: PositiveFloat = Field(10.0, le=300, description="TCP + TLS + CONNACK, per attempt")
    max_inflight: int = Field(100, ge=1, le=65_535, description="QoS 1/2 messages sent and not yet acknowledged; "
                              "more wait in the queue")
    username: str | None = Field(None, min_length=1)
    password: SecretStr | None = Field(None, description="never logged; set it from the environment: "
                                       "LINEWATCH_BRIDGE_MQTT__PASSWORD")
    tls: MqttTlsConfig | None = Field(None, description="null = plain TCP")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _TOPIC_PREFIX_RE.match(v) or len(v) > 200:
            raise ValueError(f"topic_prefix {v!r} must be topic levels separated by single '/', without "
                             "+, # or a leading/trailing '/'")
        return v

    @model_validator(mode="after")
    def _auth(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        return self


class BridgeMetricsConfig(MetricsConfig):
    port: int = Field(9109, ge=0, le=65535, description="0 picks a free port (logged at start)")


class BridgeConfig(FileSettings):  # as the daemon's: the environment wins over the file
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False,
        validate_assignment=True,
    )

    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    cameras: list[str] | None = Field(None, description="cameras to bridge; null = every camera the daemon has")
    opcua: OpcuaConfig | None = Field(None, description="OPC UA server; null = off")
    mqtt: MqttConfig | None = Field(None, description="MQTT publisher; null = off")
    metrics: BridgeMetricsConfig = Field(default_factory=BridgeMetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    drain_timeout_s: PositiveFloat = Field(5.0, le=300, description="on SIGTERM: deliver what is queued within "
                                           "this, then count the rest as dropped (reason shutdown)")

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("cameras is empty; list camera names or use null for every camera")
        for name in v:
            if not CAMERA_NAME_RE.match(name):
                raise ValueError(f"camera name {name!r} may use only letters, digits, _ and - (1–64 characters)")
        if len(set(v)) != len(v):
            raise ValueError("a camera is listed twice")
        return v

    @model_validator(mode="after")
    def _sinks(self) -> BridgeConfig:
        if self.opcua is None and self.mqtt is None:
            raise ValueError("no sink configured: add an opcua: and/or an mqtt: section")
        if self.mqtt is not None and self.cameras and BRIDGE_TOPIC_LEVEL in self.cameras:
            raise ValueError(f"camera {BRIDGE_TOPIC_LEVEL!r} would collide with the topic "
                             f"{self.mqtt.topic_prefix}/{BRIDGE_TOPIC_LEVEL}/status; rename the camera")
        return self


# --------------------------------------------------------------------------- loading

_PATH_KEYS = {
    ("upstream",): ("server_key", "client_key"),
    ("opcua",): ("certificate", "private_key", "trusted_clients_dir"),
    ("mqtt", "tls"): ("ca_file", "cert_file", "key_file"),
}


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file, not to wherever the bridge was started."""
    for section, keys in _PATH_KEYS.items():
        node: Any = data
        for part in section:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        for key in keys:
            value = node.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                node[key] = str(base / value)


def load_bridge_config(path: str | os.PathLike | None = None, env: bool = True) -> BridgeConfig:
    """Read, merge with the environment, validate. Raises :class:`ConfigError` with a one-line message."""
    p = Path(path) if path is not None else DEFAULT_BRIDGE_CONFIG_PATH
    try:
        exists = p.exists()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be used ({exc})") from None
    if not exists:
        hint = " (the default); pass --config FILE" if p == DEFAULT_BRIDGE_CONFIG_PATH else ""
        raise ConfigError(f"config file {p} not found{hint}; see config/bridge.example.yaml")
    data = _read_yaml(p)
    _resolve_paths(data, p.resolve().parent)
    return bridge_config_from_dict(data, origin=str(p), env=env)


def bridge_config_from_dict(data: dict[str, Any], origin: str = "<dict>", env: bool = True) -> BridgeConfig:
    return BridgeConfig.from_dict(data, origin, env)
