"""A loaded, calibrated model on a device: what the pipeline, `evaluate` and `infer` call.

The callers see images in, (maps, scores) out, plus thresholds; STFPM's internals stay here.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import nn

from linewatch.errors import BundleError, LinewatchError
from linewatch.model.bundle import BundleMeta, Calibration, load_bundle
from linewatch.model.stfpm import STFPM
from linewatch.model.weights import load_teacher

log = structlog.get_logger("linewatch.detector")

# How the inference copy of the model runs (``model.engine`` in the daemon config, ``--engine`` in bench):
#   eager    BatchNorm folded into the convolutions, plain PyTorch: works everywhere, no start-up cost
#   jit      CPU: the folded model traced and frozen (TorchScript + oneDNN weight pre-packing, conv+ReLU
#            fusion); no Python per layer. ~1 s to build at the first batch. Other devices: eager
#   compile  torch.compile (Inductor, weights frozen): fastest per batch on CPU in `linewatch bench`, but it
#            needs a C++ compiler at run time and costs minutes of start-up on small CPUs (and a recompile
#            the first time a batch of 1 or 2 frames comes); falls back to eager if compiling fails
#   auto     on CPU the engine measured fastest for the backbone (AUTO_CPU), eager on CUDA (fp16 autocast +
#            channels_last there)
#   reference the model exactly as trained, BatchNorm unfolded: for checking the others, and the baseline
#            that `linewatch bench --engine reference` compares them with
ENGINES = ("auto", "eager", "jit", "compile", "reference")
# `linewatch bench --compare-engines reference,eager` on 2 cores, 256×256, 1 thread, best batch: mobilenet_v2
# eager 52.6 → jit 71.2 images/s (its many small depthwise layers gain from TorchScript + oneDNN fusion);
# resnet18 eager 26.0, jit 24.6 (few large convolutions: nothing to gain, and the oneDNN layout conversions
# at the three feature taps cost). Backbones not listed here run eager.
AUTO_CPU = {"mobilenet_v2": "jit"}


def resolve_engine(engine: str, device: torch.device, backbone: str | None = None) -> str:
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


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → first CUDA GPU if there is one, else CPU; ``cuda``/``cuda:N``/``cpu`` as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise LinewatchError(f"device {spec!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LinewatchError(f"device {spec!r} asked for but no CUDA GPU is visible; use device: cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LinewatchError(
                f"device {spec!r} does not exist ({torch.cuda.device_count()} GPU(s) visible); pick another index"
            )
    elif dev.type != "cpu":
        raise LinewatchError(f"device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


@dataclass
class Prediction:
    maps: torch.Tensor  # (B,H,W) float32 on the CPU, at the model's input size
    scores: torch.Tensor  # (B,) float32 on the CPU


class Detector:
    """Teacher + students + calibration, ready to score batches of frames."""

    def __init__(self, model: STFPM, meta: BundleMeta, model_id: str, device: torch.device, *,
                 engine: str = "auto"):
        self.model = model.to(device).eval()
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.meta = meta
        self.model_id = model_id
        self.device = device
        self.engine = resolve_engine(engine, device, meta.backbone)
        # The inference copy (BatchNorm folded, maybe traced/compiled) is built at the first predict(), so
        # it reflects the weights as they are then; after that, changes to ``model`` are not seen by
        # predict(). Built under a lock: a reload thread's trial batch may race the worker's first batch.
        self._net: nn.Module | None = None
        self._fast: nn.Module | None = None  # jit/compile: for uint8 (B,H,W,3) at input size only
        self._build_lock = threading.Lock()

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input_size

    @property
    def calibration(self) -> Calibration:
        if self.meta.calibration is None:
            raise LinewatchError("this model has no calibration; run `linewatch calibrate` first")
        return self.meta.calibration

    @property
    def image_threshold(self) -> float:
        return self.calibration.image_threshold

    @property
    def pixel_threshold(self) -> float:
        return self.calibration.pixel_threshold

    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch: uint8 (B,H,W,3) RGB (or (B,3,H,W)), any size (resized to the input size).

        uint8 travels to the device and is normalised there (4× less to copy than float32);
        on CUDA the forward runs under fp16 autocast.
        """
        x = images.to(self.device, non_blocking=True)
        amp = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.device.type == "cuda"
            else nullcontext()
        )
        net = self._net if self._net is not None else self._build()
        if self._fast is not None and x.dtype == torch.uint8 and tuple(x.shape[1:]) == (*self.input_size, 3):
            net = self._fast
        with torch.inference_mode(), amp:
            maps, scores = net(x)
        return Prediction(maps=maps.float().cpu(), scores=scores.float().cpu())

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Build the inference copy and run a batch of each size once (tracing, compiling and oneDNN's
        first-call setup happen here rather than on the first frames)."""
        h, w = self.input_size
        for b in batch_sizes:
            self.predict(torch.zeros((b, h, w, 3), dtype=torch.uint8))

    def _build(self) -> nn.Module:
        with self._build_lock:
            if self._net is not None:
                return self._net
            net = self.model if self.engine == "reference" else fold_batchnorm(self.model)
            h, w = self.input_size
            if self.engine == "jit":
                self._fast = self._trace(net, h, w)
            elif self.engine == "compile":
                self._fast = self._compile(net, h, w)
            self._net = net
            return net

    def _trace(self, net: nn.Module, h: int, w: int) -> nn.Module | None:
        """TorchScript: trace on a uint8 batch, freeze (weights become constants), let oneDNN pre-pack them.
        The traced graph is checked against eager on batches of 1 and 3 (it must not depend on the batch
        size it was traced with); any failure falls back to eager."""
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
            self.engine = "eager"
            return None

    def _compile(self, net: nn.Module, h: int, w: int) -> nn.Module | None:
        """torch.compile with Inductor's weight freezing; the batch dimension is dynamic so new batch sizes
        do not recompile (except 1, which Dynamo specialises). Compiled here, for batches of 1 and 2."""
        try:
            import torch._inductor.config as inductor_config

            compiled = torch.compile(net, dynamic=True)
            with inductor_config.patch(freezing=True), torch.inference_mode():
                for b in (1, 2):
                    compiled(torch.zeros((b, h, w, 3), dtype=torch.uint8, device=self.device))
            return _FrozenCompiled(compiled)
        except Exception as exc:
            log.warning("engine_fallback", engine="compile", error=f"{type(exc).__name__}: {exc}"[:300],
                        action="running eager")
            self.engine = "eager"
            return None

    def predict_many(self, images: np.ndarray, batch_size: int = 16) -> Prediction:
        """Score an (N,H,W,3) uint8 array in batches (offline use: calibration, evaluation, infer)."""
        maps, scores = [], []
        for i in range(0, len(images), batch_size):
            p = self.predict(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
            maps.append(p.maps)
            scores.append(p.scores)
        if not maps:
            h, w = self.input_size
            return Prediction(maps=torch.empty(0, h, w), scores=torch.empty(0))
        return Prediction(maps=torch.cat(maps), scores=torch.cat(scores))


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


def build_model(meta: BundleMeta, teacher_weights: str | os.PathLike | None = None) -> tuple[STFPM, str]:
    teacher, digest = load_teacher(meta.backbone, teacher_weights)
    model = STFPM(
        meta.backbone, teacher=teacher, n_students=meta.n_students, input_size=meta.input_size,
        mean=meta.mean, std=meta.std, blur_sigma=meta.blur_sigma,
    )
    return model, digest


def load_detector(
    path: str | os.PathLike,
    device: str | torch.device = "auto",
    teacher_weights: str | os.PathLike | None = None,
    engine: str = "auto",
) -> Detector:
    """Load a bundle and its teacher; refuse a teacher whose weights differ from the ones trained against."""
    bundle = load_bundle(path)
    model, digest = build_model(bundle.meta, teacher_weights)
    if digest != bundle.meta.teacher_sha256:
        raise BundleError(
            f"model file {Path(path)} was trained against teacher weights {bundle.meta.teacher_sha256[:12]}…, "
            f"but the {bundle.meta.backbone} weights here are {digest[:12]}…; use the same weights file or re-calibrate"
        )
    try:
        model.students.load_state_dict(bundle.students_state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:160]
        raise BundleError(f"model file {Path(path)} does not match backbone {bundle.meta.backbone} ({first}); "
                          "re-create it with `linewatch calibrate`") from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return Detector(model, bundle.meta, bundle.model_id, dev, engine=engine)
