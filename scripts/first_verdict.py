#!/usr/bin/env python3
"""Time from `linewatch run` to the first verdict (issue 10's start-up target: ≤ 5 s on the GPU).

Starts a real daemon (tools/harness) on N looping `dir://` cameras over a folder of images, subscribes as soon as
its publisher is bound, and prints JSON: seconds from the process start to the daemon's `model_loaded` and `ready`
log events and to the first verdict a subscriber receives (the median of --runs starts).

    python scripts/first_verdict.py --model BUNDLE --images DIR [--cameras 8] [--device cuda] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from linewatch.client import Subscriber
from linewatch.tools.harness import DaemonProcess, write_config


def _event_s(daemon: DaemonProcess, name: str, t0_wall: float) -> float | None:
    ev = daemon.first.get(name)
    if ev is None or "timestamp" not in ev:
        return None
    return datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp() - t0_wall


def one_start(cfg: Path, timeout: float) -> dict[str, float | None]:
    t0_wall, t0 = time.time(), time.monotonic()
    with DaemonProcess(cfg) as daemon:
        bound = daemon.wait_event("publisher_bound", timeout)
        first = None
        with Subscriber(bound["endpoint"]) as sub:
            end = t0 + timeout
            while time.monotonic() < end:
                v = sub.recv(timeout=0.5)
                if v is not None and hasattr(v, "verdict"):
                    first = time.monotonic() - t0
                    break
        daemon.stop(30)
        return {"model_loaded_s": _event_s(daemon, "model_loaded", t0_wall),
                "ready_s": _event_s(daemon, "ready", t0_wall), "first_verdict_s": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path, help="folder the cameras replay (looping)")
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    cams = [{"name": f"cam{i}", "source": f"dir://{args.images.resolve()}", "on_end": "loop", "recursive": True}
            for i in range(args.cameras)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp) / "linewatch.yaml", args.model.resolve(), cams, device=args.device,
                           batching={"max_batch": args.max_batch, "torch_threads": None})
        for _ in range(args.runs):
            runs.append(one_start(cfg, args.timeout))
    out = {"device": args.device, "cameras": args.cameras, "runs": runs}
    for key in ("model_loaded_s", "ready_s", "first_verdict_s"):
        vals = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(vals), 2) if vals else None
    print(json.dumps(out, indent=1))
    return 0 if out["first_verdict_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
