"""Process-wide runtime settings for the daemon: thread pools (torch, OpenCV) and the garbage collector.

torch is imported inside the functions, so that commands that never run a model (`check-config`,
`subscribe`) do not pay for it.
"""

from __future__ import annotations

import gc
import os

import cv2


def auto_torch_threads(n_cameras: int) -> int:
    """Leave cores for the capture threads (decode + resize), give the rest to inference."""
    cpus = os.cpu_count() or 1
    return max(1, cpus - min(n_cameras, cpus // 2))


def configure_threads(torch_threads: int | None, n_cameras: int) -> int:
    """Size torch's and OpenCV's thread pools for the daemon; returns torch's intra-op thread count
    (``torch_threads``, or :func:`auto_torch_threads` when it is 0/None)."""
    import torch

    threads = torch_threads or auto_torch_threads(n_cameras)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # one batch at a time: inter-op parallelism only adds threads
    except RuntimeError:
        pass  # already fixed for this process (e.g. in tests): keep it
    cv2.setNumThreads(1)  # capture threads already run in parallel; per-call OpenCV threads oversubscribe
    return threads


def freeze_startup_objects() -> None:
    """Call once everything long-lived is loaded, before streaming starts."""
    # What is loaded by now (torch, the model, the libraries) lives as long as the daemon: take it out of
    # the cyclic garbage collector's sight, so that its full collections scan only what streaming
    # allocates. Otherwise each one (rare: every few minutes at most) walks ~1e6 objects and stops every
    # thread for ~200 ms on a small CPU, a latency spike for the frames in flight. Reference counting
    # still frees everything as before; only cycles among these startup objects are never collected.
    gc.collect()
    gc.freeze()
