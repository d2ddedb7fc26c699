"""``linewatch soak``: run the daemon for N minutes under load and check that nothing leaks or goes missing.

It starts ``linewatch run`` on the given config as a child process — on free loopback ports, without
CURVE, JSON logs — subscribes to every verdict, and samples the child's ``/metrics`` every ``--sample-s``
seconds: its counters, resident memory (``process_resident_memory_bytes``) and open file descriptors
(``process_open_fds``). At the end it sends SIGTERM, waits for the drain, and reconciles::

    frames in (captured, sequence numbers used) == verdicts published + frames dropped (by reason)
    verdicts published == verdicts this subscriber received

It exits 1 if any check fails: the child died or exited non-zero, no verdict at all, the frames do
not reconcile, RSS grew more than ``--max-rss-growth`` (5 %) between the end of the warm-up (the first
minute; the first quarter of shorter runs) and the end, or the open file descriptors grew (the
largest count over the warm-up's last three samples against the smallest over the last three, so a
file open for a moment does not count). The report is printed, and written as JSON with ``--json``.

Example (the bottle test images in a loop, at full rate)::

    linewatch soak --config config/soak.yaml --minutes 30 --json soak.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from linewatch.errors import LinewatchError
from linewatch.tools.harness import (
    DaemonProcess,
    VerdictCounter,
    metric_total,
    process_stats,
    scrape,
    subprocess_env,
)

WARMUP_MAX_S = 60.0
START_TIMEOUT_S = 180.0


@dataclass
class Sample:
    t: float  # seconds since READY
    rss_kb: int
    fds: int
    captured: float = 0.0
    verdicts: float = 0.0
    dropped: float = 0.0


@dataclass
class SoakReport:
    config: str
    minutes: float
    passed: bool = False
    problems: list[str] = field(default_factory=list)
    exit_code: int | None = None
    frames_in: int = 0  # sequence numbers used (every frame read, decodable or not)
    verdicts: int = 0  # verdicts made
    published: int = 0  # verdicts handed to ZeroMQ
    received: int = 0  # verdicts this soak's subscriber got
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    received_by_camera: dict[str, int] = field(default_factory=dict)
    rss_kb_start: int = 0  # at READY
    rss_kb_warm: int = 0  # end of the warm-up: the baseline
    rss_kb_end: int = 0
    rss_growth: float = 0.0  # (end − warm) / warm
    fds_start: int = 0
    fds_warm: int = 0
    fds_end: int = 0
    warmup_s: float = 0.0
    duration_s: float = 0.0
    shutdown_s: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)


def _effective_config(config: str, folder: Path) -> Path:
    """The user's config, validated, on free loopback ports, without CURVE, with JSON logs."""
    import yaml

    from linewatch.service.config import config_from_dict, load_config

    data = load_config(config).effective()  # environment applied, paths absolute
    data["publisher"]["bind"] = "tcp://127.0.0.1:*"
    data["publisher"]["curve"] = None
    data["publisher"]["wait_for_subscriber_s"] = 120.0  # hold the cameras until the soak's subscriber is in
    data["metrics"].update(enabled=True, host="127.0.0.1", port=0)
    data["logging"]["format"] = "json"
    data["daemon"]["exit_when_sources_end"] = False
    config_from_dict(data, origin=config, env=False)  # still valid after our changes
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_soak(config: str, minutes: float, sample_s: float = 5.0, max_rss_growth: float = 0.05,
             out=sys.stdout) -> SoakReport:
    duration = minutes * 60.0
    warmup = min(WARMUP_MAX_S, duration / 4.0)
    report = SoakReport(config=config, minutes=minutes, warmup_s=warmup)
    with tempfile.TemporaryDirectory(prefix="linewatch-soak-") as tmp:
        # the user's environment minus LINEWATCH_* and systemd's variables; their working directory
        child = DaemonProcess(_effective_config(config, Path(tmp)), environ=subprocess_env(checkout=False),
                              cwd=None, max_events=1000, tail_lines=40)
        counter: VerdictCounter | None = None
        try:
            endpoint = child.wait_event("publisher_bound", START_TIMEOUT_S)["endpoint"]
            url = child.wait_event("metrics_listening", START_TIMEOUT_S)["url"]
            counter = VerdictCounter(endpoint, name="soak-subscriber")
            counter.start()
            child.wait_event("ready", START_TIMEOUT_S)
            t0 = time.monotonic()
            samples: list[Sample] = []
            print(f"soak: daemon pid {child.pid} ready; {minutes:g} min, warm-up {warmup:.0f} s, sample every "
                  f"{sample_s:g} s", file=out, flush=True)
            next_at = t0
            while True:
                now = time.monotonic()
                if child.proc.poll() is not None:
                    report.problems.append(f"the daemon exited early with status {child.returncode}")
                    break
                if now >= next_at:
                    try:
                        m = scrape(url)
                        stats = process_stats(m)
                    except (OSError, LinewatchError) as exc:
                        report.problems.append(f"cannot sample the daemon ({exc})")
                        break
                    s = Sample(t=round(now - t0, 1), rss_kb=stats.rss_kb, fds=stats.open_fds,
                               captured=metric_total(m, "linewatch_frames_captured_total"),
                               verdicts=metric_total(m, "linewatch_verdicts_total"),
                               dropped=metric_total(m, "linewatch_frames_dropped_total"))
                    samples.append(s)
                    if len(samples) == 1 or int(s.t) // 60 != int(samples[-2].t) // 60 or now - t0 >= duration:
                        print(f"soak: t={s.t:6.0f}s rss={s.rss_kb / 1024:.1f} MiB fds={s.fds} "
                              f"captured={s.captured:.0f} verdicts={s.verdicts:.0f} dropped={s.dropped:.0f}",
                              file=out, flush=True)
                    next_at += sample_s
                    if now - t0 >= duration:
                        break
                time.sleep(max(0.0, min(next_at - time.monotonic(), t0 + duration - time.monotonic(), 1.0)))
            report.duration_s = round(time.monotonic() - t0, 1)
            report.samples = [asdict(s) for s in samples]
            _judge_resources(report, samples, warmup, max_rss_growth)
        finally:
            if child.proc.poll() is None:
                took = child.stop(120)
                if took is None:
                    report.problems.append("the daemon did not exit within 120 s of SIGTERM")
                else:
                    report.shutdown_s = round(took, 2)
            child.close()
            report.exit_code = child.returncode
            if counter is not None:
                shutdown = child.first.get("shutdown")
                # every verdict published before the exit, or 5 s without any when that number is unknown
                counter.finish(int(shutdown.get("published", -1)) if shutdown else None, quiet_s=5.0, timeout=60)
                report.received = counter.total
                report.received_by_camera = dict(sorted(counter.by_camera.items()))
    _reconcile(report, child)
    report.passed = not report.problems
    return report


def _judge_resources(report: SoakReport, samples: list[Sample], warmup: float, max_growth: float) -> None:
    if len(samples) < 2:
        report.problems.append("fewer than two samples: run longer")
        return
    warm = [s for s in samples if s.t <= warmup + 1e-6][-3:] or samples[:1]
    tail = samples[-3:]
    report.rss_kb_start, report.fds_start = samples[0].rss_kb, samples[0].fds
    report.rss_kb_warm, report.fds_warm = warm[-1].rss_kb, max(s.fds for s in warm)
    report.rss_kb_end, report.fds_end = samples[-1].rss_kb, min(s.fds for s in tail)
    report.rss_growth = round((report.rss_kb_end - report.rss_kb_warm) / max(1, report.rss_kb_warm), 4)
    if report.rss_growth > max_growth:
        report.problems.append(f"RSS grew {report.rss_growth:.1%} after the warm-up "
                               f"({report.rss_kb_warm / 1024:.1f} → {report.rss_kb_end / 1024:.1f} MiB), "
                               f"more than {max_growth:.0%}")
    if report.fds_end > report.fds_warm:
        report.problems.append(f"open file descriptors grew from {report.fds_warm} to {report.fds_end}")


def _reconcile(report: SoakReport, child: DaemonProcess) -> None:
    shutdown = child.first.get("shutdown")
    if report.exit_code not in (0, None):
        report.problems.append(f"the daemon exited with status {report.exit_code}")
    if "fatal" in child.first:
        report.problems.append(f"the daemon logged fatal: {child.first['fatal'].get('reason')}")
    if shutdown is None:
        report.problems.append("no shutdown event: the daemon did not stop cleanly")
        return
    last_seq = shutdown.get("last_seq") or {}
    report.frames_in = int(sum(int(v) + 1 for v in last_seq.values()))
    report.verdicts = int(shutdown.get("frames", 0))
    report.published = int(shutdown.get("published", 0))
    report.dropped = int(shutdown.get("dropped", 0))
    report.dropped_by_reason = {k: int(v) for k, v in (shutdown.get("dropped_by_reason") or {}).items()}
    if report.verdicts == 0:
        report.problems.append("no verdict at all")
    if report.frames_in != report.published + report.dropped:
        report.problems.append(f"frames do not reconcile: {report.frames_in} in, {report.published} published "
                               f"+ {report.dropped} dropped = {report.published + report.dropped}")
    if report.received != report.published:
        report.problems.append(f"the subscriber received {report.received} of {report.published} published "
                               "verdicts")


def format_report(r: SoakReport) -> str:
    mib = 1024.0
    drops = ", ".join(f"{k} {v}" for k, v in sorted(r.dropped_by_reason.items())) or "none"
    lines = [
        f"soak {'PASSED' if r.passed else 'FAILED'}: {r.config}, {r.duration_s:.0f} s "
        f"(warm-up {r.warmup_s:.0f} s), daemon exit {r.exit_code}, shutdown {r.shutdown_s} s",
        f"  frames in {r.frames_in}  verdicts {r.verdicts}  published {r.published}  received {r.received}  "
        f"dropped {r.dropped} ({drops})",
        f"  RSS  start {r.rss_kb_start / mib:.1f} MiB  after warm-up {r.rss_kb_warm / mib:.1f} MiB  "
        f"end {r.rss_kb_end / mib:.1f} MiB  growth {r.rss_growth:+.2%}",
        f"  open fds  start {r.fds_start}  after warm-up {r.fds_warm}  end {r.fds_end}",
    ]
    lines += [f"  problem: {p}" for p in r.problems]
    return "\n".join(lines)
