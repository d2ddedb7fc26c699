"""A loaded, calibrated model on a device: what the daemon, `evaluate` and `infer` call.

The callers see images in, (maps, scores) out, plus thresholds; STFPM's internals stay here, and how
the inference copy is built (BatchNorm folding, TorchScript, torch.compile) is in :mod:`.engines`.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linewatch.errors import BundleError, LinewatchError
from linewatch.model.bundle import BundleMeta, Calibration, load_bundle
from linewatch.model.engines import build_inference_net, resolve_engine
from linewatch.model.stfpm import STFPM
from linewatch.model.weights import load_teacher


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
        # the engine that runs (see .engines): ``auto`` resolved here, eager after a failed jit/compile build
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
            built = build_inference_net(self.model, self.engine, self.device)
            self._fast, self.engine = built.fast, built.engine
            self._net = built.net
            return built.net

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
