"""The bench's results: one :class:`ModeSummary` per mode, and the text report of the whole result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from linewatch.tools.bench.stream import STREAM_MODES


@dataclass
class ModeSummary:
    mode: str
    images_per_s: float | None
    rounds: list[float]
    batch: int
    notes: str = ""
    latency_ms: dict[str, float | None] | None = None
    profile_ms: dict[str, float] | None = None
    cpu_ms: dict[str, float] | None = None
    dropped: dict[str, int] | None = None
    fail_fraction: float | None = None
    rss_mb_at_60s: float | None = None
    rss_mb_end: float | None = None
    rss_samples: list[list[float]] | None = None  # [seconds into the last round's window, RSS MB, RssAnon MB]
    cpu_ms_per_image: float | None = None  # process CPU per image (all threads, plus any capture processes)
    capture: str | None = None  # streaming modes: "process" or "thread" (capture.mode the daemon ran with)
    captured_per_s: float | None = None  # streaming modes: frames the cameras delivered per s (dropped included)
    verdicts: int | None = None  # streaming modes: verdicts the subscriber received in the measured windows


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(res: dict[str, Any], profile: bool = False) -> str:
    m = res["model"]
    lines = [
        f"linewatch bench: {m['backbone']} {m['input_size'][0]}x{m['input_size'][1]}, engine {m['engine']}, "
        f"device {m['device']}, torch threads {res['threads']['torch']} (interop 1, OpenCV 1, {res['threads']['cpus']} "
        f"CPUs), {res['cameras']} camera(s), batch {res['batch']}",
        f"model: {m['source']}; teacher: {m['teacher']}"
        + (f"; GPU {res['device']['name']} ({res['device']['memory_gb']} GB, CUDA {res['device']['cuda']})"
           if res.get("device", {}).get("type") == "cuda" else ""),
        f"images: {res['images']['files']} files from {res['images']['dir']} "
        f"({res['images']['frame_size'][0]}x{res['images']['frame_size'][1]}; {res['images']['raw_frames']} "
        f"pre-decoded for linewatch-raw); {res['rounds']} round(s) x {res['duration_s']:g} s per mode, medians",
    ]
    if res.get("capture"):
        lines.append(f"capture: --capture {res['capture']} ("
                     + ("linewatch-files/-jpeg in capture processes as the daemon runs them, free-running (a process "
                        "cannot wait for room: what the daemon cannot take is dropped, shown next to the rate)"
                        if res["capture"] == "process" else "linewatch-files/-jpeg in capture threads, triggered")
                     + "; linewatch-raw always in threads: its frames need no decode)")
    if res["batch_sweep"]:
        sweep = ", ".join(f"{b}: {v:.1f}" for b, v in res["batch_sweep"].items())
        lines.append(f"bare batch sweep (images/s): {sweep}")
    lines += ["", f"{'mode':18s} {'images/s':>9s} {'CPU ms/img':>10s}   {'rounds':24s} notes"]
    for k, v in res["modes"].items():
        rounds = " ".join(f"{x:.1f}" for x in v["rounds"])
        cpu = _fmt(v.get("cpu_ms_per_image"), "10.1f")
        note = v["notes"]
        if v.get("latency_ms"):
            lat = v["latency_ms"]
            note += (f"; capture→verdict p50/p95/p99 {_fmt(lat['p50'], '.0f')}/{_fmt(lat['p95'], '.0f')}/"
                     f"{_fmt(lat['p99'], '.0f')} ms")
            if v.get("fail_fraction") is not None:
                note += f"; {100 * v['fail_fraction']:.0f}% fail"
            if v.get("dropped"):
                note += f"; dropped {v['dropped']}"
                span = res["duration_s"] * len(v["rounds"])
                if v.get("capture") == "process" and span:
                    n = sum(v["dropped"].values())
                    note += f" ({n / span:.1f}/s while free-running)"
            if v.get("capture") == "process" and v.get("captured_per_s") is not None:
                note += f"; cameras delivered {v['captured_per_s']:.1f} frames/s"
        lines.append(f"{k:18s} {_fmt(v['images_per_s'], '9.2f')} {cpu:>10s}   {rounds:24s} {note}")
    r, t, lat = res["ratios"], res["targets"], res["latency"]
    lines += ["",
              f"linewatch-raw / bare     {_fmt(r['raw_over_bare'], '.3f')}   (target ≥ {t['raw_over_bare']})",
              f"linewatch-files / naive  {_fmt(r['files_over_naive'], '.3f')}   (target ≥ {t['files_over_naive']})",
              *([f"linewatch-jpeg / bare    {_fmt(r['jpeg_over_bare'], '.3f')}"] if r.get("jpeg_over_bare") else []),
              *([f"bare graph / bare eager  {_fmt(r['graph_over_eager'], '.3f')}   (CUDA graphs at the best batch)"]
                if r.get("graph_over_eager") else []),
              f"on a fixed CPU budget (CPU per image, all threads): raw/bare {_fmt(r['cpu_raw_over_bare'], '.3f')}, "
              f"files/naive {_fmt(r['cpu_files_over_naive'], '.3f')}; load average during the run "
              f"{res['load_average'][0]:.2f} (this machine's other users)",
              f"p99 capture→verdict (raw) {_fmt(lat['raw_p99_ms'], '.1f')} ms = "
              f"{_fmt(lat['p99_over_bare_batch'], '.2f')} × the bare batch time {_fmt(lat['bare_batch_ms'], '.1f')} ms "
              f"(target ≤ {t['p99_over_bare_batch']}×), cameras triggered as soon as there is room (always a "
              f"full queue)"]
    if lat.get("paced_p99_ms") is not None:
        lines.append(f"p99 capture→verdict with free-running cameras at {lat['paced_load']:g} × that rate: "
                     f"{lat['paced_p99_ms']:.1f} ms = {_fmt(lat['paced_p99_over_bare_batch'], '.2f')} × the bare "
                     f"batch time")
    rss = res["rss_mb"]
    line = (f"RSS: peak {rss['peak']:.0f} MB (process, incl. preloaded frames), before streaming "
            f"{rss['before_streaming']:.0f} MB")
    for k in STREAM_MODES:
        v = res["modes"].get(k)
        if v and v.get("rss_mb_end") is not None:
            at60 = f"at 60 s {v['rss_mb_at_60s']:.0f} MB, " if v.get("rss_mb_at_60s") is not None else ""
            line += f"; {k} {at60}end {v['rss_mb_end']:.0f} MB"
    lines.append(line)
    if profile:
        lines += ["", "where a frame's time goes (ms per frame, medians over rounds; capture stages run in the",
                  "camera threads or processes, preprocess/forward/postprocess in the worker, publish in the "
                  "publisher thread):"]
        for k in STREAM_MODES:
            v = res["modes"].get(k)
            if not v or not v.get("profile_ms"):
                continue
            p = v["profile_ms"]
            lines.append(f"  {k} (capture {v.get('capture') or 'thread'}): "
                         + ", ".join(f"{s} {_fmt(p.get(s), '.2f')}" for s in p))
            cap = (p.get("read") or 0) + (p.get("prepare") or 0)
            work = (p.get("preprocess") or 0) + (p.get("forward") or 0) + (p.get("postprocess") or 0)
            rate = v.get("images_per_s")
            per = 1000.0 / rate if rate else None
            unit = "capture process(es), incl. frames later dropped" if v.get("capture") == "process" \
                else "camera thread(s)"
            lines.append(f"    busy per frame: capture {cap:.2f} ms (shared by {res['cameras']} {unit}), "
                         f"worker {work:.2f} ms, publisher {_fmt(p.get('publish'), '.2f')} ms; "
                         f"a verdict every {_fmt(per, '.2f')} ms")
            cpu = v.get("cpu_ms") or {}
            children = cpu.get("capture processes")
            if v.get("capture") == "process" and children is not None and rate and v.get("captured_per_s"):
                # the children's stage times reach the daemon only in heartbeats, which frames in flow replace:
                # their CPU per frame they delivered is the measure of capture's own cost here
                lines.append(f"    capture processes: {children * rate / v['captured_per_s']:.2f} ms CPU per frame "
                             f"read ({v['captured_per_s']:.1f} frames/s delivered, {rate:.1f} verdicts/s)")
            if cpu:
                total = cpu.get("(process)")
                parts = ", ".join(f"{k} {_fmt(x, '.2f')}" for k, x in sorted(cpu.items(), key=lambda kv: -(kv[1] or 0))
                                  if k not in ("(process)", "capture processes") and (x or 0) >= 0.005)
                lines.append(f"    CPU per frame (what the kernel ran, waits excluded): {parts}; "
                             f"whole process {_fmt(total, '.2f')} ms"
                             + (f" (+ capture processes {children:.2f} ms)" if children is not None else ""))
    return "\n".join(lines)
