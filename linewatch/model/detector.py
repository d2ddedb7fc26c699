"""A loaded, calibrated model on a device: what the daemon, `evaluate` and `infer` call.

The callers see images in, (maps, scores) out, plus thresholds; STFPM's internals stay here, and how
the inference copy is built (BatchNorm folding, TorchScript, torch.compile, CUDA graphs) is in :mod:`.engines`,
how frames at camera resolution and JPEG bytes become the model's input in :mod:`.preprocess`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linewatch.errors import BundleError, LinewatchError
from linewatch.model.bundle import BundleMeta, Calibration, load_bundle
from linewatch.model.engines import BucketedRunner, build_inference_net, resolve_engine
from linewatch.model.preprocess import (
    DecodeError,
    Frame,
    PinnedUploader,
    frames_to_device,
    resize_frames_cpu,
    resize_frames_device,
)
from linewatch.model.scoring import ScoreSpec
from linewatch.model.stfpm import STFPM
from linewatch.model.tiling import TiledNet, TileSpec
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
    """What :meth:`Detector.predict` returns. ``fails``/``hot`` only when it was given thresholds: computed
    on the device with the scores and copied to the host with them in one transfer."""

    maps: torch.Tensor  # (B,H,W) float32 at the model's input size: on the CPU unless predict(host_maps=False)
    scores: torch.Tensor  # (B,) float32 on the CPU
    fails: torch.Tensor | None = None  # (B,) bool on the CPU: score > image threshold
    hot: torch.Tensor | None = None  # (B,) bool on the CPU: map peak > pixel threshold (the map has defect pixels)

    def host_maps(self, index: Sequence[int]) -> np.ndarray:
        """(k,H,W) float32 numpy: the maps of frames ``index`` only, gathered on the device and copied in one
        transfer (the worker needs the maps of failing frames and of those it must mask, not the rest)."""
        if len(index) == 0:
            return np.empty((0, *self.maps.shape[1:]), dtype=np.float32)
        if self.maps.device.type == "cpu":
            return self.maps.numpy()[list(index)]
        sel = torch.as_tensor(list(index), dtype=torch.long, device=self.maps.device)
        return self.maps.index_select(0, sel).float().cpu().numpy()


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
        # tiled bundles: frames at tiling.frame are cut into tiles of the model's input size (see .tiling)
        self.tiling = TileSpec.from_dict(meta.tiling) if meta.tiling else None
        # the engine that runs (see .engines): ``auto`` resolved here, eager after a failed jit/compile build
        self.engine = resolve_engine(engine, device, meta.backbone)
        if self.tiling is not None and self.engine in ("jit", "compile", "graph"):
            self.engine = "eager"  # the traced/compiled copies take whole frames at input size; tiles run eager
        # The inference copy (BatchNorm folded, maybe traced/compiled) is built at the first predict(), so
        # it reflects the weights as they are then; after that, changes to ``model`` are not seen by
        # predict(). Built under a lock: a reload thread's trial batch may race the worker's first batch.
        self._net: nn.Module | None = None
        self._fast: nn.Module | None = None  # jit/compile: for uint8 (B,H,W,3) at input size only
        self._build_lock = threading.Lock()
        self._max_batch = 1  # the largest batch warm_up was told of: the graph engine's largest bucket
        self._uploader = PinnedUploader(device)  # predict_frames on CUDA: pinned staging, reused
        self._upload_lock = threading.Lock()

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the frames :meth:`predict` takes: the model's input, or with tiling the whole frame."""
        return self.tiling.frame if self.tiling is not None else self.model.input_size

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

    @property
    def device_preprocess(self) -> bool:
        """True when :meth:`predict_frames` resizes on the device (CUDA): capture should then hand over frames
        at ROI resolution and skip its own resize; False on the CPU (capture resizes, as calibration did)."""
        return self.device.type == "cuda"

    def predict(self, images: torch.Tensor, *, host_maps: bool = True,
                thresholds: tuple[float, float] | None = None) -> Prediction:
        """Score a batch: uint8 (B,H,W,3) RGB (or (B,3,H,W)), any size (resized to the input size).

        uint8 travels to the device and is normalised there (4× less to copy than float32);
        on CUDA the forward runs under fp16 autocast. ``host_maps=False``: the maps stay on the model's device
        (fetch the few that are needed with :meth:`Prediction.host_maps`); ``thresholds`` (image, pixel):
        the prediction also carries ``fails`` and ``hot`` for the whole batch.
        """
        x = images.to(self.device, non_blocking=True)
        amp = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.device.type == "cuda"
            else nullcontext()
        )
        net = self._net if self._net is not None else self._build()
        fast = self._fast
        if fast is not None and x.dtype == torch.uint8 and tuple(x.shape[1:]) == (*self.input_size, 3) and (
                not isinstance(fast, BucketedRunner) or x.shape[0] <= fast.max_batch):
            net = fast  # a batch above the graph engine's largest bucket runs eager (same results)
        with torch.inference_mode(), amp:
            maps, scores = net(x)
            scores = scores.float()
            fails = hot = None
            if thresholds is not None:
                # one stacked tensor: the scores and both flags reach the host in a single copy
                peak = maps.flatten(1).amax(1).float()
                packed = torch.stack([scores, (scores > thresholds[0]).float(), (peak > thresholds[1]).float()]).cpu()
                scores, fails, hot = packed[0], packed[1].bool(), packed[2].bool()
            else:
                scores = scores.cpu()
            maps = maps.float()
        return Prediction(maps=maps.cpu() if host_maps else maps, scores=scores, fails=fails, hot=hot)

    def predict_frames(self, frames: Sequence[Frame], *, host_maps: bool = True,
                       thresholds: tuple[float, float] | None = None) -> Prediction:
        """Score frames at camera/ROI resolution: uint8 (H,W,3) RGB, numpy or tensors (sizes may differ).

        CUDA: uploaded at that resolution through a pinned, reused buffer (tensors already on the device,
        from :meth:`decode_jpegs`, are used as they are) and resized there with OpenCV's area weights as
        matrix products. CPU: resized with OpenCV area interpolation exactly as calibration resized its images,
        so CPU scores are unchanged.
        """
        if len(frames) == 0:
            raise ValueError("predict_frames needs at least one frame")
        if self.device.type == "cuda":
            with self._upload_lock:  # one staging buffer: batches from two threads take turns
                on_dev = frames_to_device(frames, self.device, self._uploader)
                batch = resize_frames_device(on_dev, self.input_size)
        else:
            batch = torch.from_numpy(resize_frames_cpu(frames, self.input_size))
        return self.predict(batch, host_maps=host_maps, thresholds=thresholds)

    def decode_jpegs(self, blobs: Sequence[bytes]) -> list[torch.Tensor | DecodeError]:
        """JPEG bytes → uint8 (H,W,3) RGB tensors on the model's device (batched nvJPEG on CUDA, libjpeg-turbo
        on the CPU). A blob that does not decode is a :class:`~linewatch.model.preprocess.DecodeError` in its
        slot (count it, drop the frame); the others are unaffected."""
        from linewatch.model.preprocess import decode_jpegs

        return decode_jpegs(blobs, self.device)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Build the inference copy and run a batch of each size once (tracing, compiling and oneDNN's
        first-call setup happen here rather than on the first frames). The largest size is the graph
        engine's largest bucket: pass the worker's max batch (a larger batch later runs eager)."""
        want = max((1, *batch_sizes))
        if want > self._max_batch:
            with self._build_lock:
                self._max_batch = want
                if self._net is not None and isinstance(self._fast, BucketedRunner):
                    self._net = None  # captured for a smaller max batch: capture again, up to ``want``
                    self._fast = None
                    self.engine = "graph"
        h, w = self.input_size
        for b in batch_sizes:
            self.predict(torch.zeros((b, h, w, 3), dtype=torch.uint8))

    def _build(self) -> nn.Module:
        with self._build_lock:
            if self._net is not None:
                return self._net
            built = build_inference_net(self.model, self.engine, self.device, max_batch=self._max_batch)
            self._fast, self.engine = built.fast, built.engine
            self._net = built.net if self.tiling is None else TiledNet(built.net, self.tiling)
            return self._net

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
        mean=meta.mean, std=meta.std, blur_sigma=meta.blur_sigma, score=ScoreSpec.from_dict(meta.score),
        stages=meta.stages, score_stages=meta.score_stages,
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
    if model.scorer.spec.normalise == "position":
        st = bundle.scorer_state
        tiling = bundle.meta.tiling
        map_size = tuple(tiling["frame"]) if tiling else tuple(bundle.meta.input_size)
        names = model.scorer.position_names
        if any(n not in st or tuple(st[n].shape) != map_size for n in names):
            raise BundleError(f"model file {Path(path)} asks for per-position score normalisation but has no valid "
                              "statistics; re-create it with `linewatch calibrate`")
        model.scorer.set_position_stats(*(st[n] for n in names))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return Detector(model, bundle.meta, bundle.model_id, dev, engine=engine)
