"""``linewatch bench``: what linewatch costs on top of the bare model, measured side by side in one process.

Four modes, all with the same :class:`~linewatch.model.Detector` object (same model, engine, input size)
and the same torch/OpenCV thread settings, run one after the other in interleaved rounds (bare, naive,
raw, files, bare, naive, …) so that a neighbour's load on a shared machine hits every mode alike; each
figure is the median over the rounds and each ratio the median of the per-round ratios:

``bare``
    :meth:`Detector.predict` on preloaded uint8 tensors at the model's input size, at the best batch
    size (swept first): the floor. Normalisation is part of ``predict`` (on the device) in every mode.
``naive``
    The reference way, one image at a time: read and decode the file, resize, forward at batch 1, upsample
    the map to the image and threshold it (what the STFPM reference code and anomalib's per-image
    inferencer do). It does less than linewatch (no regions, no messages), which favours it.
``linewatch-raw``
    The real daemon — :class:`~linewatch.service.app.Daemon` with its capture threads, frame queue,
    micro-batching worker, publisher, metrics and health observer — fed by
    :class:`~linewatch.tools.bench.sources.MemorySource`: frames already decoded at camera resolution, as a
    V4L2 / GigE Vision camera hands them over. A real ZeroMQ subscriber counts the verdicts.
``linewatch-files``
    The same, from a ``dir://`` folder of the image files (decode in the capture threads).
``linewatch-jpeg`` (not in the default set)
    The same, from a ``dir://`` folder of the images re-encoded as JPEG (quality 95, written once before the
    rounds): JPEG cameras. On CUDA the daemon's ``capture.jpeg_decode: auto`` is ``device``: the cameras hand
    the JPEG bytes over undecoded and the worker decodes each batch with nvJPEG (``Detector.decode_jpegs``),
    then crops and resizes on the GPU; on the CPU it is libjpeg-turbo in capture.

On CUDA (``--device cuda``) the batch sweep goes up to 256 and ``bare`` is also timed with the eager and the
graph engine at the best batch (``bare[eager]``, ``bare[graph]``): the floor with and without CUDA graphs.

Capture (``--capture``, default ``process`` as in the daemon): with ``process`` the file modes run real
``dir://`` cameras in capture processes (``capture.mode: process``: decode off the daemon's GIL); with
``thread`` they run in capture threads, as ``linewatch-raw`` always does (its frames need no decode). Each
mode's ``capture`` field in the JSON says which it used.

The streaming modes measure capacity. In threads each camera is *triggered when the pipeline has room* (its
source waits for a free slot in its frame queue) — a camera running exactly as fast as linewatch can
inspect. A capture process cannot wait for room in the daemon's queue, so there the cameras are
*free-running* at up to 1000 fps each and the frames the daemon cannot take are dropped (``queue_full``,
reported next to the rate); the rate is still what the daemon inspects, but the capture processes also
pay for decoding the frames that are dropped (their CPU is reported apart: ``capture processes``).
Throughput counts verdicts received by the subscriber; latency is subscriber receipt − capture time.

Without ``--model`` an untrained model is built on the fly (speed does not depend on training); its
thresholds come from the ``good`` images. Where the backbone's ImageNet weights are not installed (resnet18
here) the teacher is randomly initialised — fine for timing, never for inspection, and said so in the
output.

The pieces: :mod:`.inputs` (images, model), :mod:`.loops` (bare, naive, the batch sweep), :mod:`.sources`
(in-memory and triggered cameras), :mod:`.stream` (the daemon in this process), :mod:`.stats` (/proc
sampling, medians) and :mod:`.report`. torch and the daemon are imported inside functions, so importing
this package is cheap.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linewatch.errors import LinewatchError
from linewatch.tools.bench.inputs import DEFAULT_IMAGES, build_detector, find_images, resolve_images_dir
from linewatch.tools.bench.loops import (
    BATCH_CANDIDATES,
    BATCH_CANDIDATES_CUDA,
    bare_batch,
    naive_step,
    sweep_batch,
    timed_loop,
)
from linewatch.tools.bench.report import ModeSummary, format_report
from linewatch.tools.bench.stats import median, peak_rss_mb, percentile, rss_mb
from linewatch.tools.bench.stream import (
    CAPTURE_MODES,
    CAPTURE_PROCESSES,
    PACED,
    PROCESS_FPS,
    STREAM_MODES,
    capture_for,
    run_stream,
)

if TYPE_CHECKING:
    from linewatch.model import Detector

__all__ = ["ALL_MODES", "CAPTURE_MODES", "DEFAULT_IMAGES", "MODES", "TARGETS", "format_report", "run_bench"]

MODES = ("bare", "naive", "linewatch-raw", "linewatch-files")  # the default set
ALL_MODES = (*MODES, "linewatch-jpeg")
JPEG_QUALITY = 95
TARGETS = {"raw_over_bare": 0.90, "files_over_naive": 1.3, "p99_over_bare_batch": 3.0}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import cv2
    import torch

    from linewatch.imaging.images import read_image, resize
    from linewatch.model import resolve_device
    from linewatch.service.runtime import auto_torch_threads

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        raise LinewatchError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(ALL_MODES)}")
    capture = getattr(args, "capture", "process")
    if capture not in CAPTURE_MODES:
        raise LinewatchError(f"unknown capture {capture!r}; choose from {', '.join(CAPTURE_MODES)}")
    cuda = resolve_device(args.device).type == "cuda"  # --device cuda without a GPU: a one-line error, here
    if args.short:
        args.duration = min(args.duration, 1.0)
        args.warmup = min(args.warmup, 0.5)
        args.rounds = 1
    images_dir = resolve_images_dir(args.images)
    paths = find_images(images_dir, args.max_images or (16 if args.short else None))

    # the thread layout the daemon would use, set once for every mode
    threads = args.threads or auto_torch_threads(args.cameras)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    cv2.setNumThreads(1)

    t_build = time.perf_counter()
    det, info = build_detector(args, paths)
    det.warm_up((1,))
    build_s = time.perf_counter() - t_build
    size = det.input_size

    # preload: camera-resolution frames (raw), input-size frames (bare), a flat folder of links (files)
    n_raw = min(len(paths), 8 if args.short else args.raw_frames)
    raw_frames = []
    for p in paths[:n_raw]:
        img = read_image(p)
        if img is not None:
            raw_frames.append(img)
    if not raw_frames:
        raise LinewatchError(f"none of the images in {images_dir} could be decoded")
    small_frames = [np.ascontiguousarray(resize(f, size)) for f in raw_frames]
    tmp = tempfile.TemporaryDirectory(prefix="linewatch-bench-")
    folder = Path(tmp.name)
    for i, p in enumerate(paths):
        (folder / f"{i:04d}_{p.parent.name}_{p.name}").symlink_to(p.resolve())
    jpeg_folder = folder / "jpeg"
    if "linewatch-jpeg" in modes:
        jpeg_folder.mkdir()
        for i, p in enumerate(paths):
            img = read_image(p)
            if img is not None:
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if ok:
                    (jpeg_folder / f"{i:04d}_{p.parent.name}_{p.stem}.jpg").write_bytes(buf.tobytes())

    # batch: the best for the bare model unless given
    sweep: dict[int, float] = {}
    if args.batch:
        batch = args.batch
    else:
        cands = (1, 2) if args.short else BATCH_CANDIDATES_CUDA if cuda else BATCH_CANDIDATES
        det.warm_up((1, max(cands)))  # the graph engine captures its buckets up to the largest candidate
        sweep = sweep_batch(det, small_frames, cands, 0.3 if args.short else args.sweep_s)
        batch = max(sweep, key=lambda b: sweep[b])
    det.warm_up((1, batch))  # a --batch above the sweep's: the graph engine captures up to it
    bare_step = bare_batch(det, small_frames, batch)
    bare_step()

    engines = [e.strip() for e in (args.compare_engines or "").split(",") if e.strip()]
    if cuda:  # the floor with and without CUDA graphs, at the best batch
        engines += [e for e in ("eager", "graph") if e not in engines]
    extra: dict[str, Detector] = {}
    for e in engines:
        from linewatch.model import Detector as _Detector

        d = _Detector(det.model, det.meta, det.model_id, det.device, engine=e)
        d.warm_up((1, batch))
        extra[f"bare[{e}]"] = d
    for path in [p.strip() for p in (getattr(args, "compare_models", None) or "").split(",") if p.strip()]:
        # other bundles timed in the same interleaved rounds (e.g. other pyramid levels): a cost ratio measured
        # side by side, as for engines
        from linewatch.model import load_detector

        d = load_detector(path, args.device, engine=args.engine)
        if d.input_size != size:
            raise LinewatchError(f"--compare-models: {path} takes {d.input_size[1]}x{d.input_size[0]} frames, the "
                                 f"benchmarked model {size[1]}x{size[0]}; compare models of one input size")
        d.warm_up((1, batch))
        key = f"bare[{Path(path).name}]"
        while key in extra:
            key += "'"
        extra[key] = d

    paced = args.latency_load > 0 and "linewatch-raw" in modes
    rounds: dict[str, list[Any]] = {m: [] for m in modes}
    rounds.update({k: [] for k in extra})
    if paced:
        rounds[PACED] = []
    bare_batch_times: list[float] = []
    rss_before_stream = rss_mb()
    for r in range(args.rounds):
        for m in modes:
            if m == "bare":
                rounds[m].append(timed_loop(bare_step, args.duration))
                bare_batch_times.append(rounds[m][-1].step_s)
                for k, d in extra.items():
                    rounds[k].append(timed_loop(bare_batch(d, small_frames, batch), args.duration))
            elif m == "naive":
                step = naive_step(det, paths)
                for _ in range(3):
                    step()  # warm (file cache, first batch-1 call)
                rounds[m].append(timed_loop(step, args.duration))
            else:
                rounds[m].append(run_stream(m, det, args, batch, threads, raw_frames,
                                            jpeg_folder if m == "linewatch-jpeg" else folder, args.duration,
                                            args.warmup, capture=capture_for(m, capture)))
            _progress(args, r, m, rounds[m][-1])
            if m == "linewatch-raw" and paced and rounds[m][-1].images_per_s > 0:
                # the same daemon with cameras free-running below capacity: latency as on a line that
                # runs at its rated speed (the triggered run above is the worst case: always a full queue)
                rate = args.latency_load * rounds[m][-1].images_per_s
                rounds[PACED].append(run_stream(PACED, det, args, batch, threads, raw_frames, folder,
                                                args.duration, args.warmup, rate=rate))
                _progress(args, r, PACED, rounds[PACED][-1])
    tmp.cleanup()

    summaries: dict[str, ModeSummary] = {}
    for k in list(extra) + modes + ([PACED] if paced else []):
        vals = rounds[k]
        rates = [v.images_per_s for v in vals]
        if k in STREAM_MODES:
            lat = [x for v in vals for x in v.latencies_ms]
            prof_keys = vals[0].profile_ms.keys() if vals else []
            profile = {s: median([v.profile_ms.get(s, float("nan")) for v in vals]) for s in prof_keys}
            cpu_keys = {key for v in vals for key in v.cpu_ms}
            cpu = {key: median([v.cpu_ms.get(key, float("nan")) for v in vals]) for key in sorted(cpu_keys)}
            dropped: dict[str, int] = {}
            for v in vals:
                for reason, n in v.dropped.items():
                    dropped[reason] = dropped.get(reason, 0) + n
            verdicts = sum(v.verdicts for v in vals)
            at60 = [mb for v in vals for t, mb, _ in v.rss_mb if 59.5 <= t <= 61.5]
            cap = capture_for(k, capture)
            if k == PACED:
                how = f"free-running at {args.latency_load:g} x linewatch-raw's rate"
            elif cap == "process":
                how = f"free-running at up to {PROCESS_FPS:g} fps each (a process cannot wait for room)"
            else:
                how = "triggered when there is room"
            where = ("capture processes" if cap == "process"
                     else "capture threads (raw frames: no decode)" if k.startswith("linewatch-raw")
                     else "capture threads")
            if k == "linewatch-jpeg":  # capture.jpeg_decode auto: JPEG bytes to the worker where the model is on CUDA
                where += ", JPEG decoded on the GPU in batches (nvJPEG)" if cuda else ", JPEG decoded in capture"
            proc_cpu = cpu.get("(process)")
            if proc_cpu is not None and cap == "process":  # the children's CPU counts toward CPU per image
                proc_cpu += cpu.get(CAPTURE_PROCESSES) or 0.0
            summaries[k] = ModeSummary(
                k, median(rates), [round(x, 2) for x in rates], batch,
                notes=(f"{where}; {args.cameras} camera(s) {how}"
                       + f", queue {max(1, math.ceil(batch / args.cameras))}/camera"),
                capture=cap, captured_per_s=median([v.captured / args.duration for v in vals]), verdicts=verdicts,
                latency_ms={"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                            "n": len(lat)},
                profile_ms=profile, cpu_ms=cpu, dropped=dropped,
                fail_fraction=(sum(v.fails for v in vals) / verdicts) if verdicts else None,
                rss_mb_at_60s=at60[0] if at60 else None, rss_mb_end=vals[-1].rss_mb[-1][1] if vals else None,
                rss_samples=[list(x) for x in vals[-1].rss_mb] if vals else None,
                cpu_ms_per_image=proc_cpu)
        else:
            summaries[k] = ModeSummary(k, median(rates), [round(x, 2) for x in rates], 1 if k == "naive" else batch,
                                       cpu_ms_per_image=median([v.cpu_ms_per_image for v in vals]))
    if "bare" in summaries:
        summaries["bare"].notes = f"Detector.predict, batch {batch}"
    if "naive" in summaries:
        summaries["naive"].notes = "decode + resize + forward(batch 1) + map upsample + threshold, per image"

    def ratio(a: str, b: str) -> float | None:
        if a not in rounds or b not in rounds or not rounds[a]:
            return None
        ra = [v.images_per_s for v in rounds[a]]
        rb = [v.images_per_s for v in rounds[b]]
        return median([x / y for x, y in zip(ra, rb, strict=True) if y])

    def cpu_ratio(a: str, b: str) -> float | None:
        """CPU per image of b ÷ CPU per image of a: the throughput ratio on a fixed CPU budget (a box
        whose other cores are busy), where the streaming modes' parallelism buys nothing."""
        ca = summaries[a].cpu_ms_per_image if a in summaries else None
        cb = summaries[b].cpu_ms_per_image if b in summaries else None
        return cb / ca if ca and cb else None

    bare_rate = summaries["bare"].images_per_s if "bare" in summaries else None
    bare_batch_ms = median(bare_batch_times) * 1000.0 if bare_batch_times else (
        batch / bare_rate * 1000.0 if bare_rate else None)
    raw_lat = summaries["linewatch-raw"].latency_ms if "linewatch-raw" in summaries else None
    p99 = raw_lat.get("p99") if raw_lat else None
    paced_lat = summaries[PACED].latency_ms if PACED in summaries else None
    paced_p99 = paced_lat.get("p99") if paced_lat else None
    result: dict[str, Any] = {
        "linewatch_bench": 1,
        "command": " ".join(["linewatch", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv else None,
        "model": asdict(info),
        "device": _device_info(det.device),
        "threads": {"torch": threads, "torch_interop": 1, "opencv": 1, "cpus": os.cpu_count()},
        "cameras": args.cameras,
        "capture": capture,
        "batch": batch,
        "batch_sweep": {str(b): round(v, 2) for b, v in sweep.items()},
        "images": {"dir": str(images_dir), "files": len(paths), "raw_frames": len(raw_frames),
                   "frame_size": list(raw_frames[0].shape[1::-1])},
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "modes": {k: asdict(v) for k, v in summaries.items()},
        "ratios": {
            "raw_over_bare": ratio("linewatch-raw", "bare"),
            "files_over_naive": ratio("linewatch-files", "naive"),
            "cpu_raw_over_bare": cpu_ratio("linewatch-raw", "bare"),
            "cpu_files_over_naive": cpu_ratio("linewatch-files", "naive"),
            "jpeg_over_bare": ratio("linewatch-jpeg", "bare"),
            "graph_over_eager": (summaries["bare[graph]"].images_per_s / summaries["bare[eager]"].images_per_s
                                 if "bare[graph]" in summaries and "bare[eager]" in summaries
                                 and summaries["bare[eager]"].images_per_s else None),
        },
        "load_average": list(os.getloadavg()),
        "latency": {
            "bare_batch_ms": bare_batch_ms,
            "raw_p50_ms": raw_lat.get("p50") if raw_lat else None,
            "raw_p95_ms": raw_lat.get("p95") if raw_lat else None,
            "raw_p99_ms": p99,
            "p99_over_bare_batch": (p99 / bare_batch_ms) if p99 and bare_batch_ms else None,
            "paced_load": args.latency_load if paced else None,
            "paced_p50_ms": paced_lat.get("p50") if paced_lat else None,
            "paced_p95_ms": paced_lat.get("p95") if paced_lat else None,
            "paced_p99_ms": paced_p99,
            "paced_p99_over_bare_batch": (paced_p99 / bare_batch_ms) if paced_p99 and bare_batch_ms else None,
        },
        "rss_mb": {
            "before_streaming": rss_before_stream,
            "peak": peak_rss_mb(),
            "end": rss_mb(),
            "end_anon": rss_mb("RssAnon"),
            "end_file": rss_mb("RssFile"),
        },
        "targets": TARGETS,
        "model_build_s": round(build_s, 2),
    }
    return result


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"type": dev.type, "torch": torch.__version__}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _progress(args: argparse.Namespace, r: int, mode: str, value: Any) -> None:
    if args.quiet:
        return
    print(f"  round {r + 1}/{args.rounds} {mode:16s} {value.images_per_s:8.2f} images/s  "
          f"(load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)

