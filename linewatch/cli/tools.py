"""Tool commands: ``bench`` (speed side by side) and ``soak`` (minutes under load, leaks and lost frames).

Both modules keep torch and the daemon imports inside their functions, so this import is cheap.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from linewatch.cli.args import parse_size
from linewatch.errors import LinewatchError
from linewatch.tools import bench, soak


def cmd_bench(args: argparse.Namespace) -> int:
    from linewatch.logsetup import configure_logging

    configure_logging("console", "warning")
    res = bench.run_bench(args)
    print(bench.format_report(res, profile=args.profile))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _register_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="throughput and latency of linewatch against the bare model, side by side",
        description="Runs bare model, naive per-image inference, and the real daemon (raw frames and PNG "
        "files) in one process with the same model, input size and threads; prints images/s, the ratios "
        "linewatch-raw/bare and linewatch-files/naive, capture→verdict latency and RSS.")
    p.add_argument("--model", metavar="BUNDLE", help="a calibrated bundle (default: build an untrained model)")
    p.add_argument("--backbone", default="mobilenet_v2", help="without --model: mobilenet_v2 (default), resnet18, "
                   "wide_resnet50_2 (random-init teacher, labelled, where its ImageNet weights are missing)")
    p.add_argument("--input-size", type=parse_size, default=(256, 256), help="without --model (default 256)")
    p.add_argument("--batch", type=int, help="max batch for bare and the daemon (default: the best bare batch)")
    p.add_argument("--cameras", type=int, default=1, help="cameras in the streaming modes")
    p.add_argument("--capture", default="process", choices=list(bench.CAPTURE_MODES),
                   help="how linewatch-files/-jpeg capture: process (default, as the daemon: dir:// cameras in "
                   "capture processes, free-running, drops reported) or thread (capture threads triggered when "
                   "there is room); linewatch-raw always uses threads")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per mode per round (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3); medians are reported")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of streaming before measuring (default 3)")
    p.add_argument("--sweep-s", type=float, default=1.5, help="seconds per batch size in the batch sweep")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch threads (default: what `linewatch run` picks for --cameras)")
    p.add_argument("--engine", default="auto", help="auto, eager, jit, compile, graph or reference (model.engine)")
    p.add_argument("--compare-engines", metavar="LIST", help="also time bare with these engines, e.g. reference,eager")
    p.add_argument("--compare-models", metavar="LIST",
                   help="also time bare with these bundles (same input size), e.g. a.lwm,b.lwm")
    p.add_argument("--images", default=bench.DEFAULT_IMAGES, help="folder of test images, with or without sub-folders "
                   "(default: %(default)s)")
    p.add_argument("--max-images", type=int, help="use only the first N images")
    p.add_argument("--raw-frames", type=int, default=32, help="frames pre-decoded for linewatch-raw (default 32)")
    p.add_argument("--latency-load", type=float, default=0.9, metavar="F",
                   help="also run linewatch-raw with free-running cameras at F × its measured rate, for latency "
                   "below saturation (default 0.9; 0 = off)")
    p.add_argument("--masks", default="fail", choices=["fail", "all", "none"], help="publisher.masks (default fail)")
    p.add_argument("--modes", default=",".join(bench.MODES),
                   help="comma-separated subset of: " + ", ".join(bench.ALL_MODES))
    p.add_argument("--short", action="store_true", help="a few seconds in all (CI): 1 round, 1 s per mode")
    p.add_argument("--profile", action="store_true", help="show where a frame's time goes, stage by stage")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")
    p.set_defaults(func=cmd_bench)


def cmd_soak(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise LinewatchError("--minutes must be > 0")
    report = soak.run_soak(args.config, args.minutes, sample_s=args.sample_s, max_rss_growth=args.max_rss_growth)
    print(soak.format_report(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.passed else 1


def _register_soak(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "soak", help="run the daemon for N minutes and check frames, memory and file descriptors",
        description="Start `linewatch run` on CONFIG (own loopback ports, no CURVE), subscribe to every verdict, "
        "sample RSS and open fds, then SIGTERM and reconcile frames in = published + dropped. Exit 1 if "
        "RSS grew more than --max-rss-growth after the warm-up, fds grew, or frames went missing.")
    p.add_argument("--config", required=True, metavar="FILE", help="daemon config (its cameras and model)")
    p.add_argument("--minutes", type=float, default=30.0, help="how long to stream (default: %(default)g)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default: %(default)g)")
    p.add_argument("--max-rss-growth", type=float, default=0.05,
                   help="allowed RSS growth after the warm-up, as a fraction (default: %(default)g)")
    p.add_argument("--json", metavar="FILE", help="also write the report (with every sample) as JSON")
    p.set_defaults(func=cmd_soak)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_bench(subparsers)
    _register_soak(subparsers)
