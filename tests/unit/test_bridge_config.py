"""`linewatch bridge` config (one-line errors naming the key, secrets never shown), the bounded
drop-oldest queue between subscriber and sink, and the camera state the sinks publish."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from linewatch.bridges.config import bridge_config_from_dict, load_bridge_config
from linewatch.bridges.sink import CameraStates, DropOldestQueue, Sink, UpstreamEvent
from linewatch.bridges.telemetry import BridgeMetrics
from linewatch.cli import main as cli_main
from linewatch.errors import ConfigError
from linewatch.messages import Status, Verdict
from linewatch.service.config import ReconnectConfig
from linewatch.tools.harness import ROOT

EXAMPLE = ROOT / "config" / "bridge.example.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("LINEWATCH_"):
            monkeypatch.delenv(k)


def cfg_of(**data):
    return bridge_config_from_dict(data, env=False)


def error_of(**data) -> str:
    with pytest.raises(ConfigError) as err:
        cfg_of(**data)
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- config


def test_example_config_is_valid_and_documents_every_key():
    cfg = load_bridge_config(EXAMPLE, env=False)
    assert cfg.opcua is not None and cfg.mqtt is not None
    assert cfg.opcua.host == "127.0.0.1" and cfg.mqtt.host == "127.0.0.1" and cfg.metrics.host == "127.0.0.1"
    raw = yaml.safe_load(EXAMPLE.read_text())
    effective = cfg.effective()
    assert set(effective) == set(raw)
    for section, value in effective.items():
        if isinstance(value, dict):
            assert set(value) == set(raw[section]), f"example section {section} is incomplete"


def test_defaults_bind_to_loopback_and_need_a_sink():
    cfg = cfg_of(mqtt={})
    assert cfg.upstream.endpoint == "tcp://127.0.0.1:5555"
    assert cfg.mqtt.host == "127.0.0.1" and cfg.mqtt.qos == 1 and cfg.mqtt.include_mask is False
    assert cfg.metrics.host == "127.0.0.1" and cfg.metrics.port == 9109
    assert cfg.opcua is None
    assert cfg_of(opcua={}).opcua.endpoint.startswith("opc.tcp://127.0.0.1:")
    assert "no sink configured" in error_of()


@pytest.mark.parametrize("data, expected", [
    ({"mqtt": {"hots": "x"}}, "mqtt.hots: unknown key (allowed: queue, reconnect, host, port"),
    ({"mqtt": {}, "opcua": {"users": [{"name": "a"}]}}, "opcua.users[0].password: required key is missing"),
    ({"mqtt": {"qos": 3}}, "mqtt.qos"),
    ({"mqtt": {"topic_prefix": "plant/#"}}, "topic_prefix 'plant/#' must be topic levels"),
    ({"mqtt": {"topic_prefix": "/plant"}}, "topic_prefix"),
    ({"mqtt": {"password": "x"}}, "password needs username"),
    ({"mqtt": {"tls": {"cert_file": "c.pem"}}}, "cert_file and key_file go together"),
    ({"opcua": {"security": "sign_and_encrypt"}}, "security sign_and_encrypt needs certificate and private_key"),
    ({"opcua": {"endpoint": "tcp://127.0.0.1:4840"}}, "is not like opc.tcp://"),
    ({"opcua": {"reject_pulse_ms": 0}}, "opcua.reject_pulse_ms"),
    ({"opcua": {"users": [{"name": "a", "password": "x"}, {"name": "a", "password": "y"}]}}, "listed twice"),
    ({"mqtt": {}, "upstream": {"client_key": "k"}}, "client_key needs server_key"),
    ({"mqtt": {}, "upstream": {"endpoint": "localhost:5555"}}, "is not a ZeroMQ address"),
    ({"mqtt": {}, "cameras": ["line.1"]}, "camera name 'line.1'"),
    ({"mqtt": {}, "cameras": []}, "cameras is empty"),
    ({"mqtt": {}, "cameras": ["bridge"]}, "would collide with the topic linewatch/bridge/status"),
    ({"mqtt": {"queue": 0}}, "mqtt.queue"),
    ({"mqtt": {"reconnect": {"initial_s": 5, "max_s": 1}}}, "max_s (1.0) must be ≥ initial_s"),
    ({"mqtt": {}, "sinks": {}}, "sinks: unknown key (allowed: upstream, cameras, opcua, mqtt"),
])
def test_config_errors_are_one_line_and_name_the_key(data, expected):
    assert expected in error_of(**data)


def test_secrets_come_from_the_environment_and_are_never_shown(monkeypatch, tmp_path):
    monkeypatch.setenv("LINEWATCH_BRIDGE_MQTT__PASSWORD", "s3cret-pw")
    monkeypatch.setenv("LINEWATCH_BRIDGE_OPCUA__USERS", '[{"name": "plc", "password": "plc-pw"}]')
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump({"mqtt": {"username": "lw"}, "opcua": {}}))
    cfg = load_bridge_config(p)
    assert cfg.mqtt.password.get_secret_value() == "s3cret-pw"
    assert cfg.opcua.users[0].password.get_secret_value() == "plc-pw"
    text = repr(cfg) + str(cfg.effective()) + yaml.safe_dump(cfg.effective())
    assert "s3cret-pw" not in text and "plc-pw" not in text
    monkeypatch.setenv("LINEWATCH_BRIDGE_OPCUA__USERS", "[{not json")
    with pytest.raises(ConfigError, match="LINEWATCH_BRIDGE_"):
        load_bridge_config(p)


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    p = tmp_path / "etc" / "b.yaml"
    p.write_text(yaml.safe_dump({
        "upstream": {"server_key": "keys/server.key"},
        "opcua": {"security": "sign", "certificate": "pki/s.pem", "private_key": "/abs/s.key"},
        "mqtt": {"tls": {"ca_file": "ca.pem"}},
    }))
    cfg = load_bridge_config(p, env=False)
    base = p.resolve().parent
    assert cfg.upstream.server_key == base / "keys" / "server.key"
    assert cfg.opcua.certificate == base / "pki" / "s.pem"
    assert cfg.opcua.private_key == Path("/abs/s.key")
    assert cfg.mqtt.tls.ca_file == base / "ca.pem"


def test_missing_or_broken_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found; see config/bridge.example.yaml"):
        load_bridge_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt: {host: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_bridge_config(bad)


def test_cli_reports_bad_config_in_one_line_and_exits_2(tmp_path, capsys):
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump({"mqtt": {"prot": 1883}}))
    assert cli_main(["bridge", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("linewatch: error: config ") and "mqtt.prot: unknown key" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_check_prints_the_effective_config_without_secrets(tmp_path, capsys):
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump({"mqtt": {"username": "lw", "password": "hunter2"}}))
    assert cli_main(["bridge", "--config", str(p), "--check"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "username: lw" in out
    assert yaml.safe_load(out)["mqtt"]["password"] == "**********"


def test_opcua_certificate_files_are_checked_at_start(tmp_path):
    pytest.importorskip("asyncua", reason="asyncua is not installed (pip install -e .)")
    from linewatch.bridges.opcua import OpcuaSink

    (tmp_path / "s.pem").write_text("not a certificate")
    (tmp_path / "s.key").write_text("not a key")
    cfg = cfg_of(opcua={"security": "sign", "certificate": str(tmp_path / "s.pem"),
                        "private_key": str(tmp_path / "s.key")})
    with pytest.raises(ConfigError, match="opcua.certificate: .* is not an X.509 certificate"):
        OpcuaSink(cfg.opcua, BridgeMetrics(), None)
    cfg = cfg_of(opcua={"security": "sign", "certificate": str(tmp_path / "gone.pem"),
                        "private_key": str(tmp_path / "s.key")})
    with pytest.raises(ConfigError, match="opcua.certificate: cannot read"):
        OpcuaSink(cfg.opcua, BridgeMetrics(), None)


# --------------------------------------------------------------------------- the bounded queue


def test_queue_is_bounded_and_drops_the_oldest():
    dropped = []
    q = DropOldestQueue(3, dropped.append)
    for i in range(5):
        q.put(i)
    assert len(q) == 3 and dropped == [0, 1] and q.dropped == 2
    assert [q.get(0), q.get(0), q.get(0)] == [2, 3, 4]
    assert q.get(0.01) is None
    q.put(7)
    q.put_back(6)
    assert q.drain() == [6, 7] and len(q) == 0
    with pytest.raises(ValueError):
        DropOldestQueue(0)


def test_queue_get_wakes_up_on_put_from_another_thread():
    q: DropOldestQueue[int] = DropOldestQueue(2)
    t = threading.Timer(0.05, q.put, args=(42,))
    t.start()
    assert q.get(30.0) == 42  # returns on the put, not after the timeout
    t.join()


class _IdleSink(Sink):
    sink = "test"


def verdict(camera: str = "a", seq: int = 0, verdict: str = "pass") -> Verdict:
    return Verdict(camera=camera, sequence=seq, capture_time=1.0, verdict_time=1.1, verdict=verdict, score=0.5,
                   threshold=1.0, p_value=0.5, model_id="m", frame_width=64, frame_height=48)


def test_a_full_sink_queue_counts_what_it_drops():
    metrics = BridgeMetrics()
    sink = _IdleSink(4, ReconnectConfig(), metrics, None)  # never started: nothing drains it
    for i in range(10):
        sink.offer(verdict(seq=i))
    sink.offer(UpstreamEvent(up=False, reason="x", time=0.0))  # pushes out a verdict; itself never counted
    assert metrics.sample("linewatch_bridge_dropped_total", sink="test", reason="queue_full") == 7
    assert metrics.sample("linewatch_bridge_queue_depth", sink="test") == 4
    assert [m.sequence for m in list(sink.queue.drain())[:3]] == [7, 8, 9]
    sink.offer(verdict(seq=11))
    assert sink.count_leftovers(extra=2) == 3
    assert metrics.sample("linewatch_bridge_dropped_total", sink="test", reason="shutdown") == 3


def test_camera_states_follow_status_messages():
    states = CameraStates({"a", "b"})
    assert states.apply(Status(kind="camera", time=1.0, camera="a", state="up")) == ["a"]
    assert states.apply(Status(kind="camera", time=2.0, camera="a", state="up")) == []  # no change
    assert states.apply(Status(kind="camera", time=3.0, camera="zz", state="up")) == []  # not bridged
    hb = Status(kind="heartbeat", time=4.0, cameras={"a": "down", "b": "up", "zz": "up"},
                health={"b": {"condition": "frozen"}})
    assert sorted(states.apply(hb)) == ["a", "b"]
    assert states.cameras["b"].state == "up" and states.cameras["b"].condition == "frozen"
    assert states.apply(Status(kind="health", time=5.0, camera="b", condition="ok")) == ["b"]
    assert sorted(states.all_unknown("daemon silent", 6.0)) == ["a", "b"]
    assert states.cameras["a"].as_dict("a")["state"] == "unknown"
    assert "zz" not in states.cameras
    every = CameraStates(None)  # all cameras: learnt as they appear
    assert every.apply(Status(kind="camera", time=1.0, camera="new", state="up")) == ["new"]


# --------------------------------------------------------------------------- the systemd unit

UNIT = ROOT / "deploy" / "systemd" / "linewatch-bridge.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_runs_the_bridge_as_notify_service_with_room_to_drain():
    from linewatch.bridges.config import DEFAULT_BRIDGE_CONFIG_PATH, BridgeConfig
    from linewatch.cli import build_parser

    s = _unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and s["Restart"] == ["on-failure"]
    exec_args = s["ExecStart"][0].split()
    assert exec_args[0].endswith("/linewatch") and exec_args[1:] == ["bridge", "--config",
                                                                    str(DEFAULT_BRIDGE_CONFIG_PATH)]
    assert build_parser().parse_args(exec_args[1:]).func.__name__ == "cmd_bridge"
    drain = BridgeConfig.model_fields["drain_timeout_s"].default
    assert int(s["TimeoutStopSec"][0].rstrip("s")) >= drain + 5
    assert int(s["WatchdogSec"][0].rstrip("s")) >= 10  # pinged every WatchdogSec/2
    assert s["User"] == ["linewatch"] and s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]


def _verify(text: str, folder: Path) -> list[str]:
    """`systemd-analyze verify` output for a unit with this text (ExecStart pointed at this venv): [] = clean."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "linewatch"
    path = folder / "linewatch-bridge.service"
    path.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={exe if exe.exists() else '/bin/true'}", text,
                           flags=re.M))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, SYSTEMD_LOG_COLOR="0", LC_ALL="C.UTF-8"))
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return lines or ([f"exit status {proc.returncode}"] if proc.returncode else [])


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)")
def test_unit_passes_systemd_analyze_verify_and_a_broken_copy_does_not(tmp_path):
    text = UNIT.read_text()
    assert _verify(text, tmp_path / "good") == []
    assert _verify(text.replace("Type=notify", "Type=notifyy"), tmp_path / "bad")
