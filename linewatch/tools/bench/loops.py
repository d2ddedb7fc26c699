"""The two modes without the daemon, as plain timing loops: ``bare`` (Detector.predict on preloaded
batches, after a sweep for the best batch size) and ``naive`` (one image at a time, the reference way)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from linewatch.model import Detector

BATCH_CANDIDATES = (1, 2, 4, 8, 16)
BATCH_CANDIDATES_CUDA = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # issue 10: 16 → 256 still gained on an H200


@dataclass
class LoopRound:
    images_per_s: float
    images: int
    cpu_ms_per_image: float  # process CPU (all threads), so a multi-threaded torch is counted in full
    step_s: float  # median time of one step (a batch for bare)


def timed_loop(step: Callable[[], int], seconds: float) -> LoopRound:
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
            results[b].append(timed_loop(bare_batch(det, frames, b), seconds).images_per_s)
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

