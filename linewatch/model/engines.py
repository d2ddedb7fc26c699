"""Inference engines: how the inference copy of a loaded model is built and run.

``model.engine`` in the daemon config, ``--engine`` in bench:
  eager     BatchNorm folded into the convolutions, plain PyTorch: works everywhere, no start-up cost
  jit       CPU: the folded model traced and frozen (TorchScript + oneDNN weight pre-packing, conv+ReLU
            fusion); no Python per layer. ~1 s to build at the first batch. Other devices: eager
  compile   torch.compile (Inductor, weights frozen): fastest per batch on CPU in `linewatch bench`, but it
            needs a C++ compiler at run time and costs minutes of start-up on small CPUs (and a recompile
            the first time a batch of 1 or 2 frames comes); falls back to eager if compiling fails
  graph     CUDA: the folded model under fp16 autocast captured as one CUDA graph per batch bucket (powers
            of two up to the max batch given to ``Detector.warm_up``, and that max itself); a batch is padded
            to its bucket and the outputs sliced back. One replay launches every kernel at once, so the
            inference thread no longer queues for the GIL per kernel (issue 10: eager batch 16 fell 2,007 →
            93 img/s with 4 busy Python threads; graph replay stayed at 3,600). Checked against eager at
            build; any failure (no CUDA, capture error, check outside GRAPH_TOLERANCE): eager + a log line
  auto      on CPU the engine measured fastest for the backbone (AUTO_CPU), graph on CUDA (eager after a
            failed check)
  reference the model exactly as trained, BatchNorm unfolded: for checking the others, and the baseline
            that `linewatch bench --engine reference` compares them with
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
import torch
from torch import nn

from linewatch.errors import LinewatchError
from linewatch.model.stfpm import STFPM

log = structlog.get_logger("linewatch.engines")

ENGINES = ("auto", "eager", "jit", "compile", "graph", "reference")
# `linewatch bench --compare-engines reference,eager` on 2 cores, 256×256, 1 thread, best batch: mobilenet_v2
# eager 52.6 → jit 71.2 images/s (its many small depthwise layers gain from TorchScript + oneDNN fusion);
# resnet18 eager 26.0, jit 24.6 (few large convolutions: nothing to gain, and the oneDNN layout conversions
# at the three feature taps cost). Backbones not listed here run eager.
AUTO_CPU = {"mobilenet_v2": "jit"}


def resolve_engine(engine: str, device: torch.device, backbone: str | None = None) -> str:
    """The engine that ``engine`` means on ``device`` for ``backbone`` (``auto`` resolved, jit → eager off CPU)."""
    if engine not in ENGINES:
        raise LinewatchError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "auto":
        return AUTO_CPU.get(backbone or "", "eager") if device.type == "cpu" else "graph"
    if engine == "jit" and device.type != "cpu":
        return "eager"  # TorchScript's oneDNN passes are CPU-only; CUDA gets eager + autocast
    return engine


def fold_batchnorm(model: STFPM) -> STFPM:
    """An inference copy of ``model`` with every BatchNorm folded into the convolution before it.

    In eval mode BatchNorm is a per-channel affine map, so conv→BN equals one conv with rescaled weights
    and a bias (equal up to float rounding, ~1e-7 relative). On CPU BatchNorm was a third of the
    mobilenet_v2 forward (torch.profiler), all of it saved. A copy, so the model's own modules and
    ``state_dict`` (what bundles store) never change.
    """
    from torch.fx.experimental.optimization import fuse

    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        net.teacher = fuse(net.teacher)
        net.students = nn.ModuleList(fuse(s) for s in net.students)
    except Exception as exc:  # a backbone fx cannot trace: run it unfolded rather than not at all
        log.warning("batchnorm_fold_failed", error=f"{type(exc).__name__}: {exc}", action="running unfolded")
        net = copy.deepcopy(model).eval()
    return net


@dataclass
class InferenceNet:
    """What :func:`build_inference_net` made: ``net`` takes any input; ``fast`` (jit/compile, or None) only
    uint8 (B,H,W,3) at the input size; ``engine`` is the one that runs (eager after a fallback)."""

    net: nn.Module
    fast: nn.Module | BucketedRunner | None
    engine: str


def build_inference_net(model: STFPM, engine: str, device: torch.device, max_batch: int = 1) -> InferenceNet:
    """The inference copy of ``model`` (on ``device``, in eval mode) for a resolved ``engine``; a jit,
    compile or graph engine that fails to build falls back to eager (log ``engine_fallback``).
    ``max_batch``: the largest batch the graph engine captures a bucket for (other engines ignore it)."""
    net = model if engine == "reference" else fold_batchnorm(model)
    h, w = model.input_size
    fast: nn.Module | BucketedRunner | None = None
    if engine == "jit":
        fast = trace(net, h, w)
    elif engine == "compile":
        fast = compile_frozen(net, h, w, device)
    elif engine == "graph":
        fast = build_graph_engine(net, h, w, device, max_batch)
    if fast is None and engine in ("jit", "compile", "graph"):
        engine = "eager"
    return InferenceNet(net=net, fast=fast, engine=engine)


def trace(net: nn.Module, h: int, w: int) -> nn.Module | None:
    """TorchScript: trace on a uint8 batch, freeze (weights become constants), let oneDNN pre-pack them.
    The traced graph is checked against eager on batches of 1 and 3 (it must not depend on the batch
    size it was traced with); any failure: None (run eager)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notices: not for users
            ex = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, ex,
                                                                                           check_trace=False)))
            with torch.inference_mode():
                for b in (1, 3):
                    xb = ex.repeat(2, 1, 1, 1)[:b]
                    ref, got = net(xb), traced(xb)
                    for r, g in zip(ref, got, strict=True):
                        if r.shape != g.shape or float((r - g).abs().max()) > 1e-3 * float(r.abs().max()):
                            raise RuntimeError(f"traced model differs from eager at batch {b}")
        return traced
    except Exception as exc:
        log.warning("engine_fallback", engine="jit", error=f"{type(exc).__name__}: {exc}"[:300],
                    action="running eager")
        return None


def compile_frozen(net: nn.Module, h: int, w: int, device: torch.device) -> nn.Module | None:
    """torch.compile with Inductor's weight freezing; the batch dimension is dynamic so new batch sizes
    do not recompile (except 1, which Dynamo specialises). Compiled here, for batches of 1 and 2; any
    failure: None (run eager)."""
    try:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(net, dynamic=True)
        with inductor_config.patch(freezing=True), torch.inference_mode():
            for b in (1, 2):
                compiled(torch.zeros((b, h, w, 3), dtype=torch.uint8, device=device))
        return _FrozenCompiled(compiled)
    except Exception as exc:
        log.warning("engine_fallback", engine="compile", error=f"{type(exc).__name__}: {exc}"[:300],
                    action="running eager")
        return None


class _FrozenCompiled(nn.Module):
    """Calls a compiled module with Inductor's freezing switched on, so that a recompile (a new batch size
    Dynamo could not generalise) keeps the weights frozen as at the first compile."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


# -- the graph engine ------------------------------------------------------------------------------------------

# graph vs eager at build: max |difference| ≤ GRAPH_TOLERANCE × max |eager|, for maps and for scores. Both run
# the same fp16 autocast kernels (fp16 keeps ~3 significant digits, 1e-3 relative); cuDNN may pick other
# algorithms for the captured shapes, so 1e-2 leaves room for that and still catches a wrong graph (stale
# buffers, a bucket fed the wrong rows), whose errors are of the order of the values themselves.
GRAPH_TOLERANCE = 1e-2

Runner = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # a batch → (maps, scores); fixed-size for a bucket


class BatchTooLarge(ValueError):
    """A batch larger than the largest bucket: there is no graph for it."""


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a graph is captured for: the powers of two below ``max_batch``, and ``max_batch`` itself
    (so a 12-frame limit pads at most to 12, and the worker's out-of-memory halving always finds a bucket)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


def pick_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` frames; :class:`BatchTooLarge` if none does."""
    if n < 1:
        raise ValueError(f"a batch needs at least one frame, got {n}")
    for b in sorted(buckets):
        if b >= n:
            return b
    raise BatchTooLarge(f"batch of {n} exceeds the largest captured bucket ({max(buckets)})")


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with zero frames appended up to ``size`` rows (frames are scored independently: BatchNorm is
    folded, so padding cannot change the real frames' results)."""
    n = x.shape[0]
    if n == size:
        return x
    if n > size:
        raise BatchTooLarge(f"batch of {n} does not fit a bucket of {size}")
    return torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])


class BucketedRunner:
    """Runs a batch with the runner of its bucket: padded up to the bucket, the outputs sliced back.

    ``runners`` maps a bucket size to a callable for batches of exactly that size (a CUDA graph replay on
    the GPU; plain eager callables in the CPU tests)."""

    def __init__(self, runners: dict[int, Runner]):
        if not runners:
            raise ValueError("BucketedRunner needs at least one bucket")
        self.runners = dict(sorted(runners.items()))
        self.buckets = tuple(self.runners)
        self.max_batch = self.buckets[-1]
        # one call at a time: CUDA graphs of one engine share a memory pool, so two buckets replayed at once
        # from two threads would overwrite each other's intermediates
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        b = pick_bucket(n, self.buckets)
        padded = pad_batch(x, b)
        with self._lock:
            out = self.runners[b](padded)
        return tuple(o[:n] for o in out)


def _autocast(device: torch.device) -> torch.autocast:
    # cache off: a weight cast cached outside a capture is not part of the graph (and capture forbids it)
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda", cache_enabled=False)


class CudaGraphBucket:
    """One batch size of ``net`` captured as a CUDA graph: a static uint8 (B,H,W,3) input on the device, the
    outputs as static buffers. A call copies the batch in, replays, and returns copies of the outputs (the
    next replay, or another bucket sharing the memory pool, overwrites the static ones)."""

    def __init__(self, net: nn.Module, batch: int, h: int, w: int, device: torch.device, pool: object = None):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CUDA graphs need a CUDA device; the model is on {device}")
        self.lock = threading.Lock()  # one replay at a time: the static buffers are shared state
        with torch.inference_mode():
            self.static_in = torch.zeros((batch, h, w, 3), dtype=torch.uint8, device=device)
            # warm-up on a side stream (cuDNN autotuning and the allocator's first blocks happen here, not in
            # the capture), as torch.cuda.graphs asks
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), _autocast(device):
                for _ in range(2):
                    net(self.static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA work (the running model during a reload) does not break it
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"), _autocast(device):
                self.static_out = tuple(net(self.static_in))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.lock, torch.inference_mode():
            self.static_in.copy_(x, non_blocking=True)
            self.graph.replay()
            return tuple(o.clone() for o in self.static_out)


BucketFactory = Callable[[nn.Module, int, int, int, torch.device, object], Runner]
Check = Callable[[Runner, Runner, Sequence[torch.Tensor], float], float]


def check_close(reference: Runner, candidate: Runner, inputs: Sequence[torch.Tensor],
                tolerance: float = GRAPH_TOLERANCE) -> float:
    """Run both on each input; the largest relative difference (max |Δ| / max |reference|) over maps and
    scores. RuntimeError if an output's shape differs, is not finite, or differs by more than ``tolerance``."""
    worst = 0.0
    for x in inputs:
        ref, got = reference(x), candidate(x)
        for name, r, g in zip(("maps", "scores"), ref, got, strict=True):
            if tuple(r.shape) != tuple(g.shape):
                raise RuntimeError(f"{name} shape {tuple(g.shape)} != eager {tuple(r.shape)} at batch {x.shape[0]}")
            r, g = r.float(), g.float()
            if not bool(torch.isfinite(g).all()):
                raise RuntimeError(f"{name} not finite at batch {x.shape[0]}")
            rel = float((r - g).abs().max()) / max(float(r.abs().max()), 1e-12)
            worst = max(worst, rel)
            if rel > tolerance:
                raise RuntimeError(f"{name} differ from eager by {rel:.3g} (relative) at batch {x.shape[0]}, "
                                   f"tolerance {tolerance:g}")
    return worst


def build_graph_engine(net: nn.Module, h: int, w: int, device: torch.device, max_batch: int, *,
                       make_bucket: BucketFactory | None = None, check: Check = check_close) -> BucketedRunner | None:
    """``net`` captured per bucket (:func:`graph_buckets`) and checked against eager on a full and a padded
    batch; None after any failure (log ``engine_fallback``: run eager). ``make_bucket`` and ``check`` are
    :class:`CudaGraphBucket` and :func:`check_close` unless a test injects others."""
    try:
        factory: BucketFactory = make_bucket or CudaGraphBucket
        buckets = graph_buckets(max_batch)
        pool = torch.cuda.graph_pool_handle() if make_bucket is None and torch.cuda.is_available() else None
        # the largest first: smaller graphs then reuse its blocks in the shared pool
        runner = BucketedRunner({b: factory(net, b, h, w, device, pool) for b in reversed(buckets)})

        def eager(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode(), _autocast(device):
                return tuple(net(x))

        gen = torch.Generator().manual_seed(0)
        sizes = sorted({max_batch, max(1, max_batch - 1)})  # a full bucket, and one that is padded
        inputs = [torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen).to(device) for n in sizes]
        worst = check(eager, runner, inputs, GRAPH_TOLERANCE)
        log.info("graph_engine_ready", buckets=list(buckets), max_rel_diff=float(f"{worst:.3g}"),
                 tolerance=GRAPH_TOLERANCE)
        return runner
    except Exception as exc:
        log.warning("engine_fallback", engine="graph", error=f"{type(exc).__name__}: {exc}"[:300],
                    action="running eager")
        return None
