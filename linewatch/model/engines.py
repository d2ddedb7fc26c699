"""Inference engines: how the inference copy of a loaded model is built and run.

``model.engine`` in the daemon config, ``--engine`` in bench:
  eager     BatchNorm folded into the convolutions, plain PyTorch: works everywhere, no start-up cost
  jit       CPU: the folded model traced and frozen (TorchScript + oneDNN weight pre-packing, conv+ReLU
            fusion); no Python per layer. ~1 s to build at the first batch. Other devices: eager
  compile   torch.compile (Inductor, weights frozen): fastest per batch on CPU in `linewatch bench`, but it
            needs a C++ compiler at run time and costs minutes of start-up on small CPUs (and a recompile
            the first time a batch of 1 or 2 frames comes); falls back to eager if compiling fails
  auto      on CPU the engine measured fastest for the backbone (AUTO_CPU), eager on CUDA (fp16 autocast +
            channels_last there)
  reference the model exactly as trained, BatchNorm unfolded: for checking the others, and the baseline
            that `linewatch bench --engine reference` compares them with
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import structlog
import torch
from torch import nn

from linewatch.errors import LinewatchError
from linewatch.model.stfpm import STFPM

log = structlog.get_logger("linewatch.engines")

ENGINES = ("auto", "eager", "jit", "compile", "reference")
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
        return AUTO_CPU.get(backbone or "", "eager") if device.type == "cpu" else "eager"
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
    fast: nn.Module | None
    engine: str


def build_inference_net(model: STFPM, engine: str, device: torch.device) -> InferenceNet:
    """The inference copy of ``model`` (on ``device``, in eval mode) for a resolved ``engine``; a jit or
    compile engine that fails to build falls back to eager (log ``engine_fallback``)."""
    net = model if engine == "reference" else fold_batchnorm(model)
    h, w = model.input_size
    fast = None
    if engine == "jit":
        fast = trace(net, h, w)
    elif engine == "compile":
        fast = compile_frozen(net, h, w, device)
    if fast is None and engine in ("jit", "compile"):
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
