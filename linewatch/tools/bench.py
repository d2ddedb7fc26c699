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
    :class:`~linewatch.service.capture.MemorySource`: frames already decoded at camera resolution, as a
    V4L2 / GigE Vision camera hands them over. A real ZeroMQ subscriber counts the verdicts.
``linewatch-files``
    The same, from a ``dir://`` folder of the image files (decode in the capture threads).

The streaming modes measure capacity: each camera is *triggered when the pipeline has room* (its source
waits for a free slot in its frame queue) — a camera running exactly as fast as linewatch can inspect. A
free-running camera faster than that would also pay for preparing frames that are then dropped.
Throughput counts verdicts received by the subscriber; latency is subscriber receipt − capture time.

Without ``--model`` an untrained model is built on the fly (speed does not depend on training); its
thresholds come from the ``good`` images. Where the backbone's ImageNet weights are not installed (resnet18
here) the teacher is randomly initialised — fine for timing, never for inspection, and said so in the
output.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linewatch.errors import LinewatchError

if TYPE_CHECKING:
    from linewatch.model import Detector
    from linewatch.service.capture import FrameQueue, RawFrame, Source

DEFAULT_IMAGES = "../shared/data/mvtec_ad/bottle/test"
MODES = ("bare", "naive", "linewatch-raw", "linewatch-files")
PACED = "linewatch-raw-paced"  # free-running cameras at --latency-load × the measured linewatch-raw rate
STREAM_MODES = ("linewatch-raw", "linewatch-files", PACED)
BATCH_CANDIDATES = (1, 2, 4, 8, 16)
TARGETS = {"raw_over_bare": 0.90, "files_over_naive": 1.3, "p99_over_bare_batch": 3.0}


# --------------------------------------------------------------------------- small helpers


def rss_mb(field_name: str = "VmRSS") -> float:
    """Resident memory now: VmRSS, or RssAnon (heap: what a leak grows) / RssFile (mapped libraries)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of each live Python thread by name, plus "(process)" for the whole
    process — from /proc, so it is what the kernel ran, not wall time (waits excluded)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}

    def cpu(path: str) -> float | None:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)

    for t in threading.enumerate():
        if t.native_id is not None:
            v = cpu(f"/proc/self/task/{t.native_id}/stat")
            if v is not None:
                out[t.name] = out.get(t.name, 0.0) + v
    total = cpu("/proc/self/stat")
    if total is not None:
        out["(process)"] = total
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(vals)) if vals else None


def find_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files in ``folder`` and its immediate sub-folders (the MVTec ``test/<defect>/`` layout)."""
    from linewatch.imaging.images import IMAGE_EXTS

    if not folder.is_dir():
        raise LinewatchError(f"--images folder {folder} does not exist (bench reads MVTec AD bottle test images "
                             f"from {DEFAULT_IMAGES} by default; pass --images DIR)")
    paths = sorted(p for p in list(folder.iterdir()) + [q for d in folder.iterdir() if d.is_dir() for q in d.iterdir()]
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise LinewatchError(f"no images in {folder} or its sub-folders")
    return paths[:limit] if limit else paths


def resolve_images_dir(arg: str) -> Path:
    """The default is relative to the repository's parent (like the tests' ../shared); an explicit path
    is taken as given."""
    p = Path(arg)
    if p.is_dir() or p.is_absolute() or arg != DEFAULT_IMAGES:
        return p
    repo_relative = Path(__file__).resolve().parents[1] / arg
    return repo_relative if repo_relative.is_dir() else p


# --------------------------------------------------------------------------- the model


@dataclass
class ModelInfo:
    backbone: str
    input_size: tuple[int, int]
    source: str  # the bundle path, or "untrained (built on the fly)"
    teacher: str  # "ImageNet (<sha256 prefix>)" or "RANDOM INIT (benchmark only)"
    engine: str
    device: str
    image_threshold: float
    pixel_threshold: float


def build_detector(args: argparse.Namespace, images: list[Path]) -> tuple[Detector, ModelInfo]:
    import torch

    from linewatch.errors import WeightsError
    from linewatch.imaging.images import load_images
    from linewatch.model import BundleMeta, Detector, load_detector, resolve_device
    from linewatch.model.backbones import build_extractor
    from linewatch.model.stfpm import IMAGENET_MEAN, IMAGENET_STD, STFPM, default_blur_sigma
    from linewatch.model.weights import load_teacher
    from linewatch.station.calibration import fit_calibration

    if args.model:
        det = load_detector(args.model, args.device, engine=args.engine)
        det.calibration  # noqa: B018 -- refuse an uncalibrated bundle here, not in the daemon
        info = ModelInfo(det.meta.backbone, det.input_size, str(args.model),
                         f"ImageNet ({det.meta.teacher_sha256[:12]})", det.engine, str(det.device),
                         det.image_threshold, det.pixel_threshold)
        return det, info
    torch.manual_seed(0)
    try:
        teacher, digest = load_teacher(args.backbone)
        teacher_label = f"ImageNet ({digest[:12]})"
    except WeightsError:
        teacher, digest = build_extractor(args.backbone), "random-init"
        teacher_label = "RANDOM INIT (benchmark only: no ImageNet weights installed; never inspect with this)"
    size = tuple(args.input_size)
    model = STFPM(args.backbone, teacher=teacher, n_students=1, input_size=size, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, blur_sigma=default_blur_sigma(size))
    meta = BundleMeta(backbone=args.backbone, teacher_sha256=digest, input_size=size, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, n_students=1, blur_sigma=default_blur_sigma(size),
                      training={"note": "untrained, built by linewatch bench"})
    det = Detector(model, meta, "bench-untrained", resolve_device(args.device), engine=args.engine)
    # thresholds as `calibrate` would set them, on the good images (the largest score: n is small)
    good = [p for p in images if p.parent.name == "good"] or images[:16]
    data = load_images(good[:20], size)
    pred = det.predict_many(data.images, batch_size=4)
    try:
        cal, _ = fit_calibration(pred.scores.numpy(), pred.maps.numpy(), 0.005, 1e-3, images=data.images)
    except TypeError:  # an older fit_calibration without the image statistics
        cal, _ = fit_calibration(pred.scores.numpy(), pred.maps.numpy(), 0.005, 1e-3)
    meta.calibration = cal
    info = ModelInfo(args.backbone, size, "untrained (built on the fly)", teacher_label, det.engine,
                     str(det.device), cal.image_threshold, cal.pixel_threshold)
    return det, info


# --------------------------------------------------------------------------- bare and naive


@dataclass
class LoopRound:
    images_per_s: float
    images: int
    cpu_ms_per_image: float  # process CPU (all threads), so a multi-threaded torch is counted in full
    step_s: float  # median time of one step (a batch for bare)


def _timed_loop(step: Callable[[], int], seconds: float) -> LoopRound:
    """Run ``step`` (returns images done) until ``seconds`` have passed."""
    times: list[float] = []
    n = 0
    cpu0 = time.process_time()
    t_start = time.perf_counter()
    end = t_start + seconds
    while True:
        t0 = time.perf_counter()
        n += step()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 >= end:
            break
    cpu = time.process_time() - cpu0
    return LoopRound(n / (t1 - t_start), n, cpu * 1000.0 / max(1, n), statistics.median(times))


def bare_batch(det: Detector, frames: list[np.ndarray], batch: int) -> Callable[[], int]:
    """One Detector.predict on a preloaded uint8 batch (pinned on CUDA, as the worker's buffer is)."""
    import torch

    x = torch.from_numpy(np.stack([frames[i % len(frames)] for i in range(batch)]))
    if torch.device(det.device).type == "cuda":
        x = x.pin_memory()

    def step() -> int:
        det.predict(x)
        return batch

    return step


def sweep_batch(det: Detector, frames: list[np.ndarray], candidates: tuple[int, ...], seconds: float,
                passes: int = 2) -> dict[int, float]:
    """images/s of Detector.predict per batch size (median of ``passes`` interleaved passes)."""
    results: dict[int, list[float]] = {b: [] for b in candidates}
    for b in candidates:  # first call per shape sets up oneDNN primitives: not timed
        bare_batch(det, frames, b)()
    for _ in range(passes):
        for b in candidates:
            results[b].append(_timed_loop(bare_batch(det, frames, b), seconds).images_per_s)
    return {b: float(statistics.median(v)) for b, v in results.items()}


def naive_step(det: Detector, paths: list[Path]) -> Callable[[], int]:
    """One image the reference way: decode, resize, forward at batch 1, map → image size, threshold."""
    import cv2
    import torch

    from linewatch.imaging.images import read_image, resize

    cal = det.calibration
    state = {"i": 0, "fails": 0}

    def step() -> int:
        path = paths[state["i"] % len(paths)]
        state["i"] += 1
        img = read_image(path)
        if img is None:
            return 0
        small = resize(img, det.input_size)
        pred = det.predict(torch.from_numpy(small[None]))
        amap = pred.maps[0].numpy()
        up = cv2.resize(amap, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
        mask = up > cal.pixel_threshold
        state["fails"] += int(cal.is_fail(float(pred.scores[0])))
        del mask
        return 1

    return step


# --------------------------------------------------------------------------- the daemon, streaming


class TriggeredSource:
    """Wraps a source so that each frame is taken only when its camera's queue has room: a camera that is
    triggered whenever the inspection can take the next part. With ``rate`` (frames/s) it is a free-running
    camera instead: a frame every 1/rate s whether or not there is room (the queue then drops the oldest).
    Time spent waiting is kept apart (it is not camera work) so ``--profile`` can show the source's own cost."""

    def __init__(self, inner: Source, queue: FrameQueue, camera: str, max_wait_s: float = 30.0,
                 rate: float | None = None):
        self.inner = inner
        self.queue = queue
        self.camera = camera
        self.max_wait_s = max_wait_s
        self.period = 1.0 / rate if rate else None
        self._next = time.monotonic()
        self.paced = inner.paced
        self.description = inner.description
        self.wait_s = 0.0
        self.released = threading.Event()  # set at the end of a run: stop holding frames back

    def open(self) -> None:
        self.inner.open()

    def read(self) -> RawFrame | None:
        t0 = time.perf_counter()
        if self.period is not None:  # the sensor's frame clock: not faster, and no catching up after a stall
            self._next = max(self._next + self.period, time.monotonic())
            while not self.released.is_set() and (wait := self._next - time.monotonic()) > 0:
                self.released.wait(wait)
        else:
            end = time.monotonic() + self.max_wait_s
            while not self.released.is_set() and time.monotonic() < end:
                if self.queue.wait_for_room(self.camera, 0.05):
                    break
        self.wait_s += time.perf_counter() - t0
        return self.inner.read()

    def close(self) -> None:
        self.inner.close()


@dataclass
class StreamRound:
    images_per_s: float
    verdicts: int
    made: int  # verdicts the worker made in the window (metrics)
    fails: int
    dropped: dict[str, int]
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    profile_ms: dict[str, float] = field(default_factory=dict)  # per frame, per stage
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per frame, per thread
    rss_mb: list[tuple[float, float, float]] = field(default_factory=list)  # (s into the window, RSS, anon MB)


class _Counter(threading.Thread):
    """A ZeroMQ subscriber in its own thread: counts verdicts and their capture → receipt latency."""

    def __init__(self, endpoint: str):
        super().__init__(name="bench-subscriber", daemon=True)
        self.endpoint = endpoint
        self.window: tuple[float, float] | None = None  # wall clock (receipt time)
        self.count = 0
        self.fails = 0
        self.total = 0
        self.latencies: list[float] = []
        self.connected = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        from linewatch.client import Subscriber
        from linewatch.messages import Verdict

        with Subscriber(self.endpoint) as sub:
            self.connected.set()
            while not self._halt.is_set():
                msg = sub.recv(0.1)
                if not isinstance(msg, Verdict):
                    continue
                now = time.time()
                self.total += 1
                w = self.window
                if w is not None and w[0] <= now < w[1]:
                    self.count += 1
                    self.fails += int(msg.failed)
                    self.latencies.append((now - msg.capture_time) * 1000.0)

    def stop(self) -> None:
        self._halt.set()


def _stage_snapshot(daemon: Any) -> tuple[dict[str, float], float]:
    m = daemon.metrics
    return m.stage_totals(), m.total(m.frames)


def run_stream(mode: str, det: Detector, args: argparse.Namespace, batch: int, threads: int,
               raw_frames: list[np.ndarray], folder: Path, seconds: float, warmup: float,
               rate: float | None = None) -> StreamRound:
    """One run of the real daemon for ``warmup + seconds``; measures the last ``seconds``. ``rate``: total
    frames/s of free-running cameras instead of cameras triggered when there is room."""
    from linewatch.service.app import Daemon
    from linewatch.service.capture import DirSource, MemorySource
    from linewatch.service.config import config_from_dict
    from linewatch.service.telemetry.sdnotify import SdNotifier

    raw = mode.startswith("linewatch-raw")
    cams = [{"name": f"cam{i}", "source": "raw-in-memory" if raw else f"dir://{folder}", "on_end": "loop"}
            for i in range(args.cameras)]
    cfg = config_from_dict({
        "model": {"bundle": "in-memory", "engine": args.engine},
        "device": args.device,
        # a queue of batch/cameras frames per camera: a full batch is always waiting, and no frame waits
        # behind more than one batch (capture → verdict stays within two batch times plus overheads)
        "batching": {"max_batch": batch, "frame_queue": max(1, math.ceil(batch / args.cameras)),
                     "torch_threads": threads},
        "cameras": cams,
        "publisher": {"bind": "tcp://127.0.0.1:*", "masks": args.masks},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "logging": {"format": "console", "level": "warning"},
    }, origin="<bench>", env=False)
    sources: list[TriggeredSource] = []

    def factory(cam_cfg: Any, queue: FrameQueue) -> Source:
        inner: Source = (MemorySource(raw_frames, rgb=True, name=cam_cfg.name) if raw
                         else DirSource(folder, loop=True))
        src = TriggeredSource(inner, queue, cam_cfg.name, rate=rate / args.cameras if rate else None)
        sources.append(src)
        return src

    daemon = Daemon(cfg, "<bench>", notifier=SdNotifier({}), detector=det, source_factory=factory)
    errors: list[BaseException] = []

    def run_daemon() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    t = threading.Thread(target=run_daemon, name="bench-daemon", daemon=True)
    t.start()
    end_wait = time.monotonic() + 120
    while (daemon.publisher is None or daemon.publisher.endpoint is None) and not errors:
        if time.monotonic() > end_wait:
            raise LinewatchError("the daemon did not bind its publisher within 120 s")
        time.sleep(0.01)
    if errors:
        raise errors[0]
    sub = _Counter(daemon.publisher.endpoint)
    sub.start()
    sub.connected.wait(10)
    while not daemon.cameras and not errors and t.is_alive():
        time.sleep(0.01)
    time.sleep(warmup)
    if errors:
        raise errors[0]
    stages0, frames0 = _stage_snapshot(daemon)
    cpu0 = thread_cpu_s()
    wait0 = sum(s.wait_s for s in sources)
    dropped0 = daemon.metrics.by_label(daemon.metrics.dropped, "reason")
    t0_wall = time.time()
    sub.window = (t0_wall, t0_wall + seconds)
    rss: list[tuple[float, float, float]] = [(0.0, rss_mb(), rss_mb("RssAnon"))]
    t_end = time.monotonic() + seconds
    next_sample = time.monotonic() + 1.0
    while True:
        now = time.monotonic()
        if now >= t_end or errors or not t.is_alive():
            break
        time.sleep(max(0.0, min(next_sample, t_end) - now))
        if time.monotonic() >= next_sample:
            rss.append((round(time.time() - t0_wall, 1), rss_mb(), rss_mb("RssAnon")))
            next_sample += 1.0
    stages1, frames1 = _stage_snapshot(daemon)
    cpu1 = thread_cpu_s()
    wait1 = sum(s.wait_s for s in sources)
    dropped1 = daemon.metrics.by_label(daemon.metrics.dropped, "reason")
    rss.append((round(time.time() - t0_wall, 1), rss_mb(), rss_mb("RssAnon")))
    time.sleep(0.3)  # verdicts of the window still in flight
    for s in sources:
        s.released.set()
    daemon.request_stop("bench")
    t.join(60)
    sub.stop()
    sub.join(5)
    if errors:
        raise errors[0]
    made = int(frames1 - frames0)
    profile: dict[str, float] = {}
    if made > 0:
        for s in stages1:
            delta = stages1[s] - stages0[s]
            if s == "read":
                delta -= wait1 - wait0  # the trigger's wait for room is not the source's work
            profile[s] = max(0.0, delta) * 1000.0 / made
    dropped = {k: int(v - dropped0.get(k, 0)) for k, v in dropped1.items() if v - dropped0.get(k, 0)}
    cpu: dict[str, float] = {}
    if made > 0:
        for name, v in cpu1.items():
            if name in cpu0:
                key = ("capture" if name.startswith("capture-")  # all camera threads together
                       else "metrics server" if "serve_forever" in name else name)
                cpu[key] = cpu.get(key, 0.0) + (v - cpu0[name]) * 1000.0 / made
        named = sum(v for k, v in cpu.items() if k != "(process)")
        if "(process)" in cpu:
            cpu["other threads"] = max(0.0, cpu["(process)"] - named)  # ZeroMQ I/O, /metrics server, …
    return StreamRound(images_per_s=sub.count / seconds, verdicts=sub.count, made=made, fails=sub.fails,
                       dropped=dropped, latencies_ms=sub.latencies, profile_ms=profile, cpu_ms=cpu, rss_mb=rss)


# --------------------------------------------------------------------------- the whole benchmark


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
    cpu_ms_per_image: float | None = None  # process CPU per image (all threads)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import cv2
    import torch

    from linewatch.imaging.images import read_image, resize
    from linewatch.service.app import auto_torch_threads

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise LinewatchError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
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

    # batch: the best for the bare model unless given
    sweep: dict[int, float] = {}
    if args.batch:
        batch = args.batch
    else:
        cands = (1, 2) if args.short else BATCH_CANDIDATES
        sweep = sweep_batch(det, small_frames, cands, 0.3 if args.short else args.sweep_s)
        batch = max(sweep, key=lambda b: sweep[b])
    bare_step = bare_batch(det, small_frames, batch)
    bare_step()

    engines = [e.strip() for e in (args.compare_engines or "").split(",") if e.strip()]
    extra: dict[str, Detector] = {}
    for e in engines:
        from linewatch.model import Detector as _Detector

        d = _Detector(det.model, det.meta, det.model_id, det.device, engine=e)
        d.warm_up((1, batch))
        extra[f"bare[{e}]"] = d

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
                rounds[m].append(_timed_loop(bare_step, args.duration))
                bare_batch_times.append(rounds[m][-1].step_s)
                for k, d in extra.items():
                    rounds[k].append(_timed_loop(bare_batch(d, small_frames, batch), args.duration))
            elif m == "naive":
                step = naive_step(det, paths)
                for _ in range(3):
                    step()  # warm (file cache, first batch-1 call)
                rounds[m].append(_timed_loop(step, args.duration))
            else:
                rounds[m].append(run_stream(m, det, args, batch, threads, raw_frames, folder, args.duration,
                                            args.warmup))
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
            profile = {s: _median([v.profile_ms.get(s, float("nan")) for v in vals]) for s in prof_keys}
            cpu_keys = {key for v in vals for key in v.cpu_ms}
            cpu = {key: _median([v.cpu_ms.get(key, float("nan")) for v in vals]) for key in sorted(cpu_keys)}
            dropped: dict[str, int] = {}
            for v in vals:
                for reason, n in v.dropped.items():
                    dropped[reason] = dropped.get(reason, 0) + n
            verdicts = sum(v.verdicts for v in vals)
            at60 = [mb for v in vals for t, mb, _ in v.rss_mb if 59.5 <= t <= 61.5]
            summaries[k] = ModeSummary(
                k, _median(rates), [round(x, 2) for x in rates], batch,
                notes=(f"{args.cameras} camera(s) " + (f"free-running at {args.latency_load:g} x linewatch-raw's rate"
                                                       if k == PACED else "triggered when there is room")
                       + f", queue {max(1, math.ceil(batch / args.cameras))}/camera"),
                latency_ms={"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99), "n": len(lat)},
                profile_ms=profile, cpu_ms=cpu, dropped=dropped,
                fail_fraction=(sum(v.fails for v in vals) / verdicts) if verdicts else None,
                rss_mb_at_60s=at60[0] if at60 else None, rss_mb_end=vals[-1].rss_mb[-1][1] if vals else None,
                rss_samples=[list(x) for x in vals[-1].rss_mb] if vals else None,
                cpu_ms_per_image=cpu.get("(process)"))
        else:
            summaries[k] = ModeSummary(k, _median(rates), [round(x, 2) for x in rates], 1 if k == "naive" else batch,
                                       cpu_ms_per_image=_median([v.cpu_ms_per_image for v in vals]))
    if "bare" in summaries:
        summaries["bare"].notes = f"Detector.predict, batch {batch}"
    if "naive" in summaries:
        summaries["naive"].notes = "decode + resize + forward(batch 1) + map upsample + threshold, per image"

    def ratio(a: str, b: str) -> float | None:
        if a not in rounds or b not in rounds or not rounds[a]:
            return None
        ra = [v.images_per_s for v in rounds[a]]
        rb = [v.images_per_s for v in rounds[b]]
        return _median([x / y for x, y in zip(ra, rb, strict=True) if y])

    def cpu_ratio(a: str, b: str) -> float | None:
        """CPU per image of b ÷ CPU per image of a: the throughput ratio on a fixed CPU budget (a box
        whose other cores are busy), where the streaming modes' parallelism buys nothing."""
        ca = summaries[a].cpu_ms_per_image if a in summaries else None
        cb = summaries[b].cpu_ms_per_image if b in summaries else None
        return cb / ca if ca and cb else None

    bare_rate = summaries["bare"].images_per_s if "bare" in summaries else None
    bare_batch_ms = _median(bare_batch_times) * 1000.0 if bare_batch_times else (
        batch / bare_rate * 1000.0 if bare_rate else None)
    raw_lat = summaries["linewatch-raw"].latency_ms if "linewatch-raw" in summaries else None
    p99 = raw_lat.get("p99") if raw_lat else None
    paced_lat = summaries[PACED].latency_ms if PACED in summaries else None
    paced_p99 = paced_lat.get("p99") if paced_lat else None
    result: dict[str, Any] = {
        "linewatch_bench": 1,
        "command": " ".join(["linewatch", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv else None,
        "model": asdict(info),
        "threads": {"torch": threads, "torch_interop": 1, "opencv": 1, "cpus": os.cpu_count()},
        "cameras": args.cameras,
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


def _progress(args: argparse.Namespace, r: int, mode: str, value: Any) -> None:
    if args.quiet:
        return
    print(f"  round {r + 1}/{args.rounds} {mode:16s} {value.images_per_s:8.2f} images/s  "
          f"(load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(res: dict[str, Any], profile: bool = False) -> str:
    m = res["model"]
    lines = [
        f"linewatch bench: {m['backbone']} {m['input_size'][0]}x{m['input_size'][1]}, engine {m['engine']}, "
        f"device {m['device']}, torch threads {res['threads']['torch']} (interop 1, OpenCV 1, {res['threads']['cpus']} "
        f"CPUs), {res['cameras']} camera(s), batch {res['batch']}",
        f"model: {m['source']}; teacher: {m['teacher']}",
        f"images: {res['images']['files']} files from {res['images']['dir']} "
        f"({res['images']['frame_size'][0]}x{res['images']['frame_size'][1]}; {res['images']['raw_frames']} "
        f"pre-decoded for linewatch-raw); {res['rounds']} round(s) x {res['duration_s']:g} s per mode, medians",
    ]
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
        lines.append(f"{k:18s} {_fmt(v['images_per_s'], '9.2f')} {cpu:>10s}   {rounds:24s} {note}")
    r, t, lat = res["ratios"], res["targets"], res["latency"]
    lines += ["",
              f"linewatch-raw / bare     {_fmt(r['raw_over_bare'], '.3f')}   (target ≥ {t['raw_over_bare']})",
              f"linewatch-files / naive  {_fmt(r['files_over_naive'], '.3f')}   (target ≥ {t['files_over_naive']})",
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
                  "camera threads, preprocess/forward/postprocess in the worker, publish in the publisher thread):"]
        for k in STREAM_MODES:
            v = res["modes"].get(k)
            if not v or not v.get("profile_ms"):
                continue
            p = v["profile_ms"]
            lines.append(f"  {k}: " + ", ".join(f"{s} {_fmt(p.get(s), '.2f')}" for s in p))
            cap = (p.get("read") or 0) + (p.get("prepare") or 0)
            work = (p.get("preprocess") or 0) + (p.get("forward") or 0) + (p.get("postprocess") or 0)
            rate = v.get("images_per_s")
            per = 1000.0 / rate if rate else None
            lines.append(f"    busy per frame: capture {cap:.2f} ms (shared by {res['cameras']} camera thread(s)), "
                         f"worker {work:.2f} ms, publisher {_fmt(p.get('publish'), '.2f')} ms; "
                         f"a verdict every {_fmt(per, '.2f')} ms")
            cpu = v.get("cpu_ms") or {}
            if cpu:
                total = cpu.get("(process)")
                parts = ", ".join(f"{k} {_fmt(x, '.2f')}" for k, x in sorted(cpu.items(), key=lambda kv: -(kv[1] or 0))
                                  if k != "(process)" and (x or 0) >= 0.005)
                lines.append(f"    CPU per frame (what the kernel ran, waits excluded): {parts}; "
                             f"whole process {_fmt(total, '.2f')} ms")
    return "\n".join(lines)
