"""deploy/: the systemd unit, the Prometheus config and alert rules, the Grafana dashboard.

* The unit passes ``systemd-analyze verify`` (and a broken copy does not: the check can fail), keeps
  the settings the daemon relies on, and stays within a security-exposure budget.
* ``promtool check config`` / ``check rules`` pass, and ``promtool test rules`` shows every alert
  firing on the data it is meant for and staying quiet on look-alikes.
* A real Prometheus server scrapes a running ``linewatch run``; every PromQL expression of the dashboard
  parses and returns data through the HTTP API, every alert rule is loaded and healthy, and
  LinewatchCameraDown goes pending for a camera whose folder does not exist.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from linewatch.service.telemetry.prometheus import DEPRECATED_VERDICTS_NAME
from linewatch.tools.harness import DaemonProcess, free_tcp_port, write_config, write_images

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "linewatch.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "linewatch.env.example"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "linewatch.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "linewatch.json"
RUNBOOK = ROOT / "docs" / "operations.md"  # the alerts' runbook sections

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PROMTOOL = shutil.which("promtool")
PROMETHEUS = "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else shutil.which("prometheus")
APT_HINT = "apt-get install -y --no-install-recommends prometheus"

need_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)")
need_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not installed ({APT_HINT})")
need_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus server not installed ({APT_HINT})")


# --------------------------------------------------------------------------- systemd unit


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), …]} (keys repeat; continuation lines joined)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def unit_value(section: list[tuple[str, str]], key: str) -> str | None:
    values = unit_values(section, key)
    return values[-1] if values else None


def seconds(value: str) -> float:
    """systemd time span (``30s``, ``2min``, ``1min 30s``, plain seconds) → seconds."""
    units = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit or "s"]
    return total


def runnable_unit(text: str) -> str:
    """The unit with ExecStart's binary replaced by one that exists here (the venv's ``linewatch`` or
    /bin/true), so that ``verify`` judges the unit and not this machine's /opt."""
    venv_script = Path(sys.executable).parent / "linewatch"
    binary = str(venv_script) if os.access(venv_script, os.X_OK) else shutil.which("true") or "/bin/true"
    new, n = re.subn(r"^(ExecStart=[-+!@:]*)(\S+)", lambda m: m.group(1) + binary, text, flags=re.M)
    assert n == 1, "expected exactly one ExecStart= line"
    return new


def verify_problems(text: str, folder: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about a unit with this text: [] = clean.

    verify exits 0 on unknown keys and unparsable values (it only warns, as systemd would when
    loading the unit), so any output at all counts as a problem, and so does a non-zero status."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "linewatch.service"
    path.write_text(text)
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="cat", LC_ALL="C.UTF-8")
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60, env=env)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"exit status {proc.returncode}"]
    return lines


@need_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    problems = verify_problems(runnable_unit(UNIT.read_text()), tmp_path / "unit")
    assert problems == [], "systemd-analyze verify:\n" + "\n".join(problems)


@need_systemd_analyze
@pytest.mark.parametrize("broken", [
    pytest.param(lambda t: t.replace("WatchdogSec=30s", "WatchdogSec=30s\nWatchdogSecs=30s"), id="unknown-key"),
    pytest.param(lambda t: t.replace("Restart=on-failure", "Restart=sometimes"), id="bad-value"),
    pytest.param(lambda t: t.replace("[Service]", "[Servce]"), id="bad-section"),
    pytest.param(lambda t: t.replace("Type=notify", "Type=notify-please"), id="bad-type"),
])
def test_verify_check_catches_a_broken_unit(tmp_path, broken):
    """The positive test above means something only if the same check fails on real mistakes."""
    good = runnable_unit(UNIT.read_text())
    bad = broken(good)
    assert bad != good, "the mutation did not apply: update this test with the unit"
    assert verify_problems(bad, tmp_path / "unit"), "systemd-analyze verify did not report a broken unit"


@need_systemd_analyze
def test_unit_security_exposure_stays_low(tmp_path):
    """`systemd-analyze security` rates the sandbox (0 = locked down, 10 = none); keep it ≤ 3.0."""
    path = tmp_path / "linewatch.service"
    path.write_text(runnable_unit(UNIT.read_text()))
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=30", "--no-pager",
                           str(path)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SYSTEMD_LOG_COLOR="0", LC_ALL="C.UTF-8"))
    overall = [ln for ln in proc.stdout.splitlines() if "Overall exposure" in ln]
    assert proc.returncode == 0, f"exposure above 3.0: {overall}\n{proc.stdout[-3000:]}{proc.stderr}"


def test_unit_settings():
    """What the daemon and the deployment notes rely on (systemd-analyze cannot know these)."""
    from linewatch.cli import build_parser  # the console script ExecStart runs
    from linewatch.service.config import DEFAULT_CONFIG_PATH, DaemonConfig, PublisherConfig

    unit = parse_unit(UNIT.read_text())
    u, s = unit["Unit"], unit["Service"]
    assert unit_value(s, "Type") == "notify"
    assert unit_value(s, "NotifyAccess") == "main"
    assert unit_value(s, "Restart") == "on-failure"
    assert int(unit_value(u, "StartLimitBurst")) >= 2 and seconds(unit_value(u, "StartLimitIntervalSec")) > 0
    # the daemon pings every ≤ 1 s while healthy; the watchdog must leave room for that
    assert seconds(unit_value(s, "WatchdogSec")) >= 10
    # SIGTERM drain: drain_timeout_s + ZeroMQ linger must end before systemd's SIGKILL
    drain = DaemonConfig().drain_timeout_s + PublisherConfig().linger_ms / 1000
    assert seconds(unit_value(s, "TimeoutStopSec")) >= drain + 5
    assert unit_value(s, "KillMode") == "mixed"
    # a crash loop must reach the start limit (and leave the unit failed) instead of spinning forever
    assert int(unit_value(u, "StartLimitBurst")) * seconds(unit_value(s, "RestartSec")) \
        < seconds(unit_value(u, "StartLimitIntervalSec"))

    exec_start = shlex.split(unit_value(s, "ExecStart"))
    assert exec_start[0] == "/opt/linewatch/.venv/bin/linewatch"
    args = build_parser().parse_args(exec_start[1:])
    assert args.command == "run" and args.config == str(DEFAULT_CONFIG_PATH)
    assert unit_value(s, "EnvironmentFile") == "-/etc/linewatch/linewatch.env"
    # `systemctl reload` = SIGHUP to the main process: the daemon reloads its model on it (and must never
    # be ended by it: tests/test_faults.py sends SIGHUP to a running daemon)
    assert shlex.split(unit_value(s, "ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]

    assert unit_value(s, "User") == "linewatch" and unit_value(s, "Group") == "linewatch"
    assert unit_value(s, "DynamicUser") in (None, "no")
    assert "video" in unit_value(s, "SupplementaryGroups").split()
    assert unit_value(s, "StateDirectory") == "linewatch"
    assert "/var/lib/linewatch" in unit_value(s, "ReadWritePaths").split()
    for key, want in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                      ("NoNewPrivileges", "yes"), ("ProtectKernelTunables", "yes"), ("LockPersonality", "yes"),
                      ("RestrictRealtime", "yes"), ("SystemCallArchitectures", "native"),
                      ("CapabilityBoundingSet", ""), ("DevicePolicy", "closed")]:
        assert unit_value(s, key) == want, f"{key}={unit_value(s, key)!r}, expected {want!r}"
    families = unit_value(s, "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    # CUDA: no W^X enforcement (the driver JIT-compiles), no private /dev, /proc/driver/nvidia visible
    for key in ("MemoryDenyWriteExecute", "PrivateDevices", "PrivateUsers", "ProcSubset"):
        assert unit_value(s, key) in (None, "no"), f"{key}= would break CUDA or device access"
    allowed = {v.split()[0]: v.split()[1] for v in unit_values(s, "DeviceAllow")}
    for dev in ("char-video4linux", "/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                "/dev/nvidia-modeset"):
        assert allowed.get(dev) == "rw", f"DeviceAllow={dev} rw missing"
    assert unit_value(unit["Install"], "WantedBy") == "multi-user.target"


def env_example_assignments() -> list[tuple[str, str]]:
    """KEY=VALUE lines of the env example, commented out or not (systemd quoting: shlex is close enough)."""
    out = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            value = shlex.split(m.group(2))
            out.append((m.group(1), value[0] if value else ""))
    return out


def test_env_example_overrides_are_valid(monkeypatch):
    """Every LINEWATCH_… variable the env example offers is accepted by the config loader."""
    from linewatch.service.config import load_config

    assignments = env_example_assignments()
    names = [k for k, _ in assignments if k.startswith("LINEWATCH_")]
    assert len(names) >= 5, "the env example should document the common overrides"
    for key in list(os.environ):
        if key.startswith("LINEWATCH_"):
            monkeypatch.delenv(key)
    for key, value in assignments:
        monkeypatch.setenv(key, value)
    cfg = load_config(ROOT / "config" / "linewatch.example.yaml")
    values = dict(assignments)
    assert cfg.device == values["LINEWATCH_DEVICE"]  # the overrides really applied
    assert [c.name for c in cfg.cameras] == [c["name"] for c in json.loads(values["LINEWATCH_CAMERAS"])]


# --------------------------------------------------------------------------- Prometheus config and rules


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@need_promtool
def test_promtool_check_config():
    proc = subprocess.run([PROMTOOL, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout + proc.stderr, "prometheus.yml should load linewatch.rules.yml"


@need_promtool
def test_promtool_check_rules():
    proc = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_document_themselves():
    rules = load_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for want in ("LinewatchCameraDown", "LinewatchFailRateHigh", "LinewatchNoVerdicts", "LinewatchLatencyHigh",
                 "LinewatchTargetDown", "LinewatchFramesDropped"):
        assert want in names
    runbook = RUNBOOK.read_text()
    for r in rules:
        ann = r.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), f"{r['alert']}: summary/description missing"
        assert ann.get("runbook") == f"docs/operations.md#{r['alert'].lower()}", r["alert"]
        assert re.search(rf"^#+ {r['alert']}\s*$", runbook, re.M), f"docs/operations.md has no section {r['alert']}"
        assert r.get("labels", {}).get("severity") in ("critical", "warning"), r["alert"]


# Synthetic series per alert (1 sample per minute): each alert must fire on its case and not on the
# look-alike next to it. Annotations are stripped from the rule copy (promtool compares them verbatim);
# their templates are exercised by the live test below.
J = 'job="linewatch", instance="h:9108"'
RULE_TESTS: list[dict[str, Any]] = [
    {"name": "target down after 1m of failed scrapes",
     "series": {f"up{{{J}}}": "1x4 0x10"},
     "checks": [(4, "LinewatchTargetDown", []), (8, "LinewatchTargetDown", [{}])]},
    {"name": "target missing only when no linewatch job exists",
     "series": {'up{job="node", instance="n:9100"}': "1x10"},
     "checks": [(8, "LinewatchTargetMissing", [{"job": "linewatch"}])]},
    {"name": "target present: no TargetMissing",
     "series": {f"up{{{J}}}": "1x10"},
     "checks": [(8, "LinewatchTargetMissing", [])]},
    {"name": "no verdicts once the counters stop while the daemon is scraped",
     "series": {f"up{{{J}}}": "1x25",
                f'linewatch_verdicts_total{{{J}, camera="c1", verdict="pass"}}': "0+10x5 50x20",
                f'linewatch_verdicts_total{{{J}, camera="c1", verdict="fail"}}': "0x25"},
     "checks": [(9, "LinewatchNoVerdicts", []), (17, "LinewatchNoVerdicts", [{}])]},
    {"name": "camera down for over a minute",
     "series": {f'linewatch_camera_up{{{J}, camera="c1"}}': "1x3 0x6",
                f'linewatch_camera_up{{{J}, camera="c2"}}': "1x9"},
     "checks": [(4, "LinewatchCameraDown", []), (7, "LinewatchCameraDown", [{"camera": "c1"}])]},
    {"name": "flapping = reconnects while up; a camera that stays down is not flapping",
     "series": {f'linewatch_reconnects_total{{{J}, camera="c1"}}': "0+2x15",
                f'linewatch_camera_up{{{J}, camera="c1"}}': "1x15",
                f'linewatch_reconnects_total{{{J}, camera="c2"}}': "0+2x15",
                f'linewatch_camera_up{{{J}, camera="c2"}}': "0x15",
                f'linewatch_reconnects_total{{{J}, camera="c3"}}': "0x15",
                f'linewatch_camera_up{{{J}, camera="c3"}}': "1x15"},
     "checks": [(10, "LinewatchCameraFlapping", [{"camera": "c1"}])]},
    {"name": "fail rate: 33% fires; 5% and low-volume 50% do not",
     "series": {f'linewatch_verdicts_total{{{J}, camera="c1", verdict="pass"}}': "0+60x10",
                f'linewatch_verdicts_total{{{J}, camera="c1", verdict="fail"}}': "0+30x10",
                f'linewatch_verdicts_total{{{J}, camera="c2", verdict="pass"}}': "0+60x10",
                f'linewatch_verdicts_total{{{J}, camera="c2", verdict="fail"}}': "0+3x10",
                f'linewatch_verdicts_total{{{J}, camera="c3", verdict="pass"}}': "0+2x10",
                f'linewatch_verdicts_total{{{J}, camera="c3", verdict="fail"}}': "0+2x10"},
     "checks": [(8, "LinewatchFailRateHigh", [{"camera": "c1"}])]},
    {"name": "p99 latency above 1 s for 10 minutes",
     "series": {**{f'linewatch_latency_seconds_bucket{{{J}, camera="c1", le="{le}"}}': v
                   for le, v in [("0.5", "0x20"), ("1.0", "0x20"), ("2.5", "0+10x20"), ("+Inf", "0+10x20")]},
                **{f'linewatch_latency_seconds_bucket{{{J}, camera="c2", le="{le}"}}': v
                   for le, v in [("0.5", "0+10x20"), ("1.0", "0+10x20"), ("2.5", "0+10x20"), ("+Inf", "0+10x20")]}},
     "checks": [(6, "LinewatchLatencyHigh", []), (15, "LinewatchLatencyHigh", [{"camera": "c1"}])]},
    {"name": "drops above 5% by reason; shutdown drops and zero reasons do not count",
     "series": {f'linewatch_verdicts_total{{{J}, camera="c1", verdict="pass"}}': "0+100x20",
                f'linewatch_verdicts_total{{{J}, camera="c1", verdict="fail"}}': "0x20",
                f'linewatch_frames_dropped_total{{{J}, camera="c1", reason="queue_full"}}': "0+20x20",
                f'linewatch_frames_dropped_total{{{J}, camera="c1", reason="decode_error"}}': "0x20",
                f'linewatch_frames_dropped_total{{{J}, camera="c1", reason="shutdown"}}': "0+50x20"},
     "checks": [(15, "LinewatchFramesDropped", [{"camera": "c1", "reason": "queue_full"}])]},
    {"name": "restarting: two restarts in 30 minutes",
     "series": {f"linewatch_start_time_seconds{{{J}}}": "100 100 100 400 400 700 700 700"},
     "checks": [(2, "LinewatchRestarting", []), (6, "LinewatchRestarting", [{}])]},
]


@need_promtool
def test_alert_rules_fire_on_their_cases(tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    severity = {r["alert"]: r["labels"]["severity"] for g in rules["groups"] for r in g["rules"]}
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    base = {"job": "linewatch", "instance": "h:9108"}
    tests = []
    for case in RULE_TESTS:
        alert_tests = []
        for minute, alert, expected in case["checks"]:
            exp = []
            for labels in expected:
                lab = dict(labels) if "job" in labels and "instance" not in labels else {**base, **labels}
                lab["severity"] = severity[alert]
                exp.append({"exp_labels": lab})
            alert_tests.append({"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": exp})
        tests.append({"name": case["name"], "interval": "1m",
                      "input_series": [{"series": k, "values": v} for k, v in case["series"].items()],
                      "alert_rule_test": alert_tests})
    covered = {a for case in RULE_TESTS for _, a, exp in case["checks"] if exp}
    assert covered == set(severity), f"alerts without a firing case: {set(severity) - covered}"
    spec = tmp_path / "rules_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests},
                                   sort_keys=False))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- Grafana dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every panel query."""
    return [(f"{p.get('title')} / {t.get('refId')}", t["expr"]) for p in all_panels(dash)
            for t in p.get("targets", []) if t.get("expr")]


# Grafana's variables, as a test can resolve them against one Prometheus scraping at 1 s:
# $__rate_interval ≥ 4 scrape intervals, so that each rate() window holds several samples.
SUBSTITUTIONS = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "1m", "${camera}": ".*",
                 "$camera": ".*", "${instance}": ".*", "$instance": ".*"}


def substitute(expr: str) -> str:
    for k in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(k, SUBSTITUTIONS[k])
    assert "$" not in expr, f"unresolved variable in {expr!r}"
    return expr


def exported_sample_names() -> set[str]:
    """Every sample name the daemon's registry exposes (the source of truth: its Metrics, docs/metrics.md)."""
    from linewatch.service.telemetry.prometheus import Metrics

    m = Metrics()
    m.init_cameras(["cam"])
    m.set_model(backbone="b", model_id="m", input_size=(1, 1), device="cpu", image_threshold=1.0,
                pixel_threshold=1.0)
    m.start_time.set(1)
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\blinewatch_[a-z0-9_]+\b", expr))


def test_dashboard_structure():
    dash = dashboard()
    assert dash["schemaVersion"] >= 38
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    cam = variables["camera"]
    assert cam["type"] == "query" and re.fullmatch(r"label_values\(linewatch_camera_up(\{[^}]*\})?, camera\)",
                                                   cam["query"]["query"])
    assert cam["includeAll"] and cam["allValue"] == ".*"
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    exprs = dashboard_exprs(dash)
    text = " ".join(e for _, e in exprs)
    for name in ("linewatch_verdicts_total", "linewatch_latency_seconds_bucket", "linewatch_score_ratio_bucket",
                 "linewatch_frames_dropped_total", "linewatch_reconnects_total", "linewatch_camera_up",
                 "linewatch_inference_seconds_bucket", "linewatch_batch_size_bucket", "linewatch_queue_depth",
                 "linewatch_model_info"):
        assert name in text, f"no panel uses {name}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, camera) (rate(linewatch_latency_seconds_bucket" in text
    assert any(p["type"] == "heatmap" and "linewatch_score_ratio_bucket" in p["targets"][0]["expr"] for p in panels)
    for where, expr in exprs:
        if "rate(" in expr or "increase(" in expr:
            assert "$__rate_interval" in expr, f"{where}: use $__rate_interval in rate()/increase()"
        substitute(expr)


def test_dashboard_and_rules_use_exported_metric_names():
    exported = exported_sample_names()
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_exprs(dashboard()):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"dashboard: {where}")
    for v in dashboard()["templating"]["list"]:
        for name in metric_names(json.dumps(v.get("query", ""))):
            used.setdefault(name, set()).add(f"variable {v['name']}")
    for r in load_rules():
        for name in metric_names(r["expr"]):
            used.setdefault(name, set()).add(f"alert {r['alert']}")
    unknown = {n: sorted(w) for n, w in used.items() if n not in exported}
    assert not unknown, f"names not exported by linewatch.service.telemetry.prometheus: {unknown}"
    # the deprecated alias is for dashboards deployed before 0.2.0, never for ours
    deprecated = {n: sorted(w) for n, w in used.items() if n == f"{DEPRECATED_VERDICTS_NAME}_total"}
    assert not deprecated, f"deprecated names in use: {deprecated}"


# --------------------------------------------------------------------------- a real Prometheus


class PromAPI:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **params: str | list[str]) -> dict[str, Any]:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400 on a parse error: the body says why
            return json.loads(exc.read() or b"{}") | {"http_status": exc.code}

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False


def wait_for(cond, timeout: float, what: str, detail=lambda: "") -> Any:
    end = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s\n{detail()}")
        time.sleep(0.25)


def finite_values(result: dict[str, Any]) -> list[float]:
    data = result["data"]
    if data["resultType"] == "scalar":
        values = [data["result"][1]]
    elif data["resultType"] == "vector":
        values = [s["value"][1] for s in data["result"]]
    else:  # matrix
        values = [v[1] for s in data["result"] for v in s["values"]]
    return [float(v) for v in values if math.isfinite(float(v))]


def prometheus_config(folder: Path, target: str, own_address: str) -> Path:
    """deploy/prometheus/prometheus.yml made test-sized: same jobs and rules, 1 s intervals, our ports."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    cfg["rule_files"] = [str((PROM_CONFIG.parent / f).resolve()) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert "linewatch" in jobs, "the alert rules select job=\"linewatch\""
    for name, job in jobs.items():
        job["scrape_interval"] = "1s"
        job["scrape_timeout"] = "1s"
        job["static_configs"] = [{"targets": [target if name == "linewatch" else own_address]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@need_prometheus
@pytest.mark.slow
def test_real_prometheus_scrapes_daemon_dashboard_and_alerts(tmp_path, untrained_bundle):
    images = tmp_path / "line1"
    write_images(images, 6, size=(48, 64))
    cfg = write_config(
        tmp_path / "linewatch.yaml", untrained_bundle,
        [{"name": "line1", "source": f"dir://{images}", "fps": 10, "on_end": "loop"},
         # a camera whose folder does not exist: down from the start, reconnecting — LinewatchCameraDown
         {"name": "dead", "source": f"dir://{tmp_path / 'missing'}", "reconnect": {"initial_s": 0.2, "max_s": 0.5}}],
        metrics={"host": "127.0.0.1", "port": 0},
    )
    daemon = prom = None
    prom_log = (tmp_path / "prometheus.log").open("w")
    try:
        daemon = DaemonProcess(cfg)
        daemon.wait_event("ready", timeout=90)
        metrics_url = urllib.parse.urlparse(daemon.metrics_url)
        port = free_tcp_port()
        address = f"127.0.0.1:{port}"
        prom_cfg = prometheus_config(tmp_path, metrics_url.netloc, address)
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={address}", "--log.level=warn", "--storage.tsdb.retention.time=1h"],
            stdout=prom_log, stderr=subprocess.STDOUT, cwd=tmp_path)
        api = PromAPI(f"http://{address}")

        def why() -> str:
            prom_log.flush()
            return ("prometheus log:\n" + (tmp_path / "prometheus.log").read_text()[-3000:]
                    + "\ndaemon log:\n" + daemon.log_text()[-3000:])

        def prom_alive() -> None:
            assert prom.poll() is None, f"prometheus exited ({prom.returncode})\n{why()}"

        wait_for(lambda: prom_alive() or api.ready(), 30, "prometheus ready", why)

        def target_up() -> bool:
            prom_alive()
            targets = api.get("/api/v1/targets")["data"]["activeTargets"]
            return any(t["labels"].get("job") == "linewatch" and t["health"] == "up" for t in targets)

        wait_for(target_up, 20, "linewatch target up", why)
        # ≥ 4 scrapes inside the 10 s rate window, with frames flowing between them
        wait_for(lambda: finite_values(api.query('count_over_time(up{job="linewatch"}[10s]) >= 4'))
                 and finite_values(api.query('sum(rate(linewatch_verdicts_total{job="linewatch"}[10s])) > 0')),
                 30, "several scrapes with verdicts", why)
        # a dashboard made before 0.2.0 still finds the verdict counter under its deprecated name
        old = api.query(f'sum by (camera, verdict) (rate({DEPRECATED_VERDICTS_NAME}_total{{job="linewatch"}}[10s]))')
        assert {(s["metric"]["camera"], s["metric"]["verdict"]) for s in old["data"]["result"]} == \
            {(c, v) for c in ("line1", "dead") for v in ("pass", "fail")}, old
        assert sum(finite_values(old)) > 0, old

        dash = dashboard()
        failures = []
        for where, expr in dashboard_exprs(dash):
            q = substitute(expr)
            res = api.query(q)
            if res.get("status") != "success":
                failures.append(f"{where}: {q}\n    → {res.get('errorType')}: {res.get('error')}")
            elif not finite_values(res):
                failures.append(f"{where}: {q}\n    → no data ({json.dumps(res['data'])[:300]})")
        for ann in dash["annotations"]["list"]:
            if ann.get("expr"):  # annotations mark rare events: they must parse, not return data now
                res = api.query(substitute(ann["expr"]))
                if res.get("status") != "success":
                    failures.append(f"annotation {ann['name']}: {res.get('error')}")
        for v in dash["templating"]["list"]:
            if v["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
            assert m, f"variable {v['name']}: expected label_values(selector, label)"
            series = api.get("/api/v1/series", **{"match[]": substitute(m.group(1))})
            values = {s.get(m.group(2)) for s in series.get("data", [])}
            if series.get("status") != "success" or not values - {None}:
                failures.append(f"variable {v['name']}: {v['query']['query']} → {series}")
            if v["name"] == "camera" and values != {"line1", "dead"}:
                failures.append(f"variable camera lists {values}, expected line1 and dead")
        assert not failures, "dashboard queries failing against a live Prometheus:\n" + "\n".join(failures)

        # alert rules: all loaded, evaluated without error; every expression parses on its own too
        names = [r["alert"] for r in load_rules()]

        def evaluated_rules() -> list[dict[str, Any]] | None:
            groups = api.get("/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            done = [r for r in rules if not r.get("lastEvaluation", "").startswith("0001-")]
            return rules if len(done) == len(rules) == len(names) else None

        rules = wait_for(evaluated_rules, 15, "every rule evaluated",
                         lambda: json.dumps(api.get("/api/v1/rules"))[:3000])
        assert sorted(r["name"] for r in rules) == sorted(names)
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok" or r.get("lastError")]
        assert not bad, f"unhealthy rules: {bad}"
        for r in load_rules():
            res = api.query(r["expr"])
            assert res.get("status") == "success", f"{r['alert']}: {res.get('error')}"

        # end to end: the dead camera's alert goes pending (for: 1m) with its annotations rendered
        def camera_down_alert() -> dict[str, Any] | None:
            alerts = api.get("/api/v1/alerts")["data"]["alerts"]
            return next((a for a in alerts if a["labels"]["alertname"] == "LinewatchCameraDown"), None)

        alert = wait_for(camera_down_alert, 15, "LinewatchCameraDown pending", why)
        assert alert["labels"]["camera"] == "dead" and alert["labels"]["job"] == "linewatch"
        assert alert["state"] in ("pending", "firing")
        assert "dead" in alert["annotations"]["summary"] and "<no value>" not in json.dumps(alert["annotations"])
        states = {r["name"]: r["state"] for r in api.get("/api/v1/rules")["data"]["groups"][0]["rules"]}
        assert states["LinewatchTargetDown"] == "inactive" and states["LinewatchTargetMissing"] == "inactive"
        assert states["LinewatchNoVerdicts"] == "inactive"
    finally:
        if prom is not None and prom.poll() is None:
            prom.terminate()
            try:
                prom.wait(15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(5)
        prom_log.close()
        if daemon is not None and daemon.proc.poll() is None:
            daemon.proc.terminate()  # SIGTERM: the daemon drains (≤ drain_timeout_s) and exits
            try:
                daemon.proc.wait(30)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait(10)
