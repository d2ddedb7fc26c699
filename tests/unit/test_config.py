"""Daemon config: YAML + environment, unknown keys named, clear one-line errors, check-config CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from linewatch.cli import main as cli_main
from linewatch.errors import ConfigError
from linewatch.service.config import config_from_dict, load_config, source_kind
from linewatch.tools.harness import ROOT, linewatch_cmd, subprocess_env

EXAMPLE = ROOT / "config" / "linewatch.example.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("LINEWATCH_"):
            monkeypatch.delenv(k)


def minimal(**extra) -> dict:
    d = {"model": {"bundle": "/models/m.lwm"}, "cameras": [{"name": "cam1", "source": "dir:///data/x"}]}
    d.update(extra)
    return d


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "lw.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_example_config_is_valid_and_complete():
    cfg = load_config(EXAMPLE)
    assert [c.name for c in cfg.cameras] == ["line1", "replay", "gige1"]
    assert cfg.metrics.host == "127.0.0.1"
    assert cfg.publisher.masks == "fail"
    # every key of every section is spelled out in the example (it documents them all)
    raw = yaml.safe_load(EXAMPLE.read_text())
    effective = cfg.effective()
    for section, value in effective.items():
        assert section in raw, f"example lacks section {section}"
        if isinstance(value, dict):
            assert set(value) == set(raw[section]), f"example section {section} is incomplete"
    assert set(effective["cameras"][0]) == set().union(*(set(c) for c in raw["cameras"]))


def test_defaults_are_safe():
    cfg = config_from_dict(minimal(), env=False)
    assert cfg.metrics.host == "127.0.0.1"
    assert cfg.publisher.bind.startswith("tcp://127.0.0.1:")
    assert cfg.device == "auto"
    assert cfg.batching.frame_queue >= 1 and cfg.batching.publish_queue >= 1


@pytest.mark.parametrize("data, needle", [
    (minimal(batchin={}), "batchin: unknown key (allowed: model, device, batching, capture, cameras,"),
    (minimal(batching={"max_bach": 4}), "batching.max_bach: unknown key (allowed: max_batch,"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a", "source": "0", "fsp": 5}]},
     "cameras[0].fsp: unknown key (allowed: name, source, roi, fps,"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a", "source": "0", "reconnect": {"max": 1}}]},
     "cameras[0].reconnect.max: unknown key"),
])
def test_unknown_keys_are_errors_naming_the_key(data, needle):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, env=False)
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg


@pytest.mark.parametrize("data, needle", [
    ({"cameras": [{"name": "a", "source": "0"}]}, "model: required key is missing"),
    ({"model": {"bundle": "m"}}, "cameras: required key is missing"),
    ({"model": {"bundle": "m"}, "cameras": []}, "cameras:"),
    (minimal(device="gpu"), "device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a.b", "source": "0"}]}, "cameras[0].name: camera name"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a", "source": "ftp://x"}]}, "unsupported scheme"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a", "source": "0"}, {"name": "a", "source": "1"}]},
     "used twice"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a", "source": "0", "roi": [0, 0, 0, 10]}]}, "roi"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a", "source": "0", "fps": -1}]}, "cameras[0].fps"),
    ({"model": {"bundle": "m"}, "cameras": [{"name": "a", "source": "0",
                                             "reconnect": {"initial_s": 5, "max_s": 1}}]}, "max_s"),
    (minimal(batching={"max_batch": 0}), "batching.max_batch"),
    (minimal(publisher={"bind": "localhost:5555"}), "not a ZeroMQ endpoint"),
    (minimal(publisher={"masks": "some"}), "publisher.masks"),
    (minimal(logging={"format": "xml"}), "logging.format"),
])
def test_invalid_values_give_one_line_errors(data, needle):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, origin="test.yaml", env=False)
    msg = str(exc.value)
    assert msg.startswith("config test.yaml: ")
    assert needle in msg
    assert "\n" not in msg


def test_env_overrides_file_and_unknown_env_keys_fail(tmp_path, monkeypatch):
    p = write(tmp_path, minimal(batching={"max_batch": 4, "max_wait_ms": 7}))
    monkeypatch.setenv("LINEWATCH_BATCHING__MAX_BATCH", "16")
    monkeypatch.setenv("LINEWATCH_METRICS__PORT", "9999")
    monkeypatch.setenv("LINEWATCH_DEVICE", "cpu")
    monkeypatch.setenv("LINEWATCH_UNRELATED_TOOL_SETTING", "x")  # not a section: ignored
    cfg = load_config(p)
    assert cfg.batching.max_batch == 16
    assert cfg.batching.max_wait_ms == 7  # merged, not replaced
    assert cfg.metrics.port == 9999
    assert cfg.device == "cpu"
    monkeypatch.setenv("LINEWATCH_CAMERAS", '[{"name": "env_cam", "source": "rtsp://h/s"}]')
    assert [c.name for c in load_config(p).cameras] == ["env_cam"]
    monkeypatch.setenv("LINEWATCH_BATCHING__MAX_BACH", "3")
    with pytest.raises(ConfigError, match="batching.max_bach: unknown key"):
        load_config(p)
    monkeypatch.delenv("LINEWATCH_BATCHING__MAX_BACH")
    monkeypatch.setenv("LINEWATCH_CAMERAS", "[{not json")
    with pytest.raises(ConfigError, match="environment variables"):
        load_config(p)


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    p = write(tmp_path, {"model": {"bundle": "models/m.lwm"},
                         "cameras": [{"name": "a", "source": "dir://replay"}, {"name": "b", "source": "v.mp4"},
                                     {"name": "c", "source": "/abs/v.mp4"}, {"name": "d", "source": 0}]})
    cfg = load_config(p)
    assert cfg.model.bundle == tmp_path / "models" / "m.lwm"
    assert cfg.cameras[0].source == f"dir://{tmp_path / 'replay'}"
    assert cfg.cameras[1].source == str(tmp_path / "v.mp4")
    assert cfg.cameras[2].source == "/abs/v.mp4"
    assert cfg.cameras[3].source == "0" and cfg.cameras[3].kind == "v4l2"


@pytest.mark.parametrize("source, kind", [
    ("0", "v4l2"), ("/dev/video2", "v4l2"), ("rtsp://h/s", "rtsp"), ("RTSP://h/s", "rtsp"),
    ("http://h/mjpg", "http"), ("https://h/x", "http"), ("dir:///d", "dir"), ("/v/a.mp4", "file"),
    ("file:///v/a.mp4", "file"), ("clip.avi", "file"),
])
def test_source_kinds(source, kind):
    assert source_kind(source) == kind


def test_file_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.setattr("linewatch.service.config.DEFAULT_CONFIG_PATH", tmp_path / "etc" / "linewatch.yaml")
    with pytest.raises(ConfigError, match="not found .the default.; pass --config FILE"):
        load_config(None)
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(write(tmp_path, "model:\n  bundle: [unclosed\ncameras: 1\n"))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_check_config_cli_in_process(tmp_path, capsys):
    p = write(tmp_path, minimal(model={"bundle": str(tmp_path / "m.lwm")}))
    assert cli_main(["check-config", str(p)]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed["cameras"][0]["name"] == "cam1"
    assert printed["batching"]["max_batch"] == 8  # defaults filled in: the effective config
    assert "does not exist" in err  # the missing bundle is flagged, not fatal
    bad = write(tmp_path, minimal(publisher={"bnd": "tcp://*:1"}))
    assert cli_main(["check-config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("linewatch: error: config ") and "publisher.bnd: unknown key" in err
    assert err.count("\n") == 1


def test_check_config_real_process_invalid(tmp_path):
    bad = write(tmp_path, minimal(cameras=[{"name": "a", "source": "0", "fsp": 3}]))
    proc = subprocess.run(linewatch_cmd("check-config", str(bad)), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("linewatch: error: config ") and "cameras[0].fsp: unknown key" in lines[0]
    assert "Traceback" not in proc.stderr
