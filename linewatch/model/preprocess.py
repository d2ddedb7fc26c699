"""Frames at camera (ROI) resolution → the model's uint8 input batch, and JPEG bytes → frames.

On the CPU a frame is resized with OpenCV's area interpolation, exactly as
:func:`linewatch.imaging.images.resize` does for calibration, so CPU scores do not change. On CUDA the frames
travel at camera resolution through one pinned, reused staging buffer and are resized on the device with the
same area weights, as two small matrix products (:func:`resize_frames_device`); the CPU then does no per-pixel
work at all (issue 10: a 900² resize was 4.7 ms of GIL-holding CPU per frame). torch's antialiased bilinear
was measured too and moves scores ten times further from calibration's (tests/unit/test_preprocess.py, figures
in docs/performance.md).

JPEG: batched nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``) on CUDA, libjpeg-turbo on the CPU
otherwise (bit-identical to ``cv2.imdecode``); a blob that does not decode is a :class:`DecodeError` in its
slot of the result, never an exception for the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from linewatch.errors import LinewatchError
from linewatch.imaging.images import resize as cpu_resize

Frame = np.ndarray | torch.Tensor  # uint8 (H,W,3) RGB


class DecodeError(LinewatchError):
    """A JPEG blob that could not be decoded (corrupt, truncated, empty, not a JPEG)."""


def _check_frame(f: Frame) -> None:
    if f.ndim != 3 or f.shape[2] != 3 or f.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"expected a uint8 (H,W,3) RGB frame, got shape {tuple(f.shape)} dtype {f.dtype}")


def resize_frames_cpu(frames: Sequence[Frame], size: tuple[int, int]) -> np.ndarray:
    """(B,h,w,3) uint8: each frame resized as calibration resized its images (area when shrinking)."""
    h, w = size
    out = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        _check_frame(f)
        arr = f.cpu().numpy() if isinstance(f, torch.Tensor) else f
        out[i] = cpu_resize(np.ascontiguousarray(arr), size)
    return out


@functools.lru_cache(maxsize=64)
def _area_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) float32: output pixel i is the mean of input span [i·s, (i+1)·s), s = n_in / n_out, each
    input pixel weighted by the part of it inside the span: OpenCV's INTER_AREA when shrinking, as a matrix."""
    s = n_in / n_out
    start = torch.arange(n_out, dtype=torch.float64)[:, None] * s
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(start + s, j + 1) - torch.maximum(start, j)).clamp_(min=0)
    return (overlap / s).to(torch.float32).to(device)


def resize_frames_device(frames: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(B,h,w,3) uint8 on the frames' device, resized as :func:`linewatch.imaging.images.resize` resizes on the
    CPU: shrinking is OpenCV's area interpolation done as two small matrix products (exact area weights; ±1
    level from rounding), enlarging is bilinear. A frame that shrinks one way and grows the other (no camera
    ROI the daemon accepts does that with a square model) gets antialiased bilinear. Frames of one shape are
    resized in one call; any device, so the CPU tests run the very path CUDA runs."""
    def area_or_bilinear(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        hi, wi = x.shape[-2:]
        if hi >= h and wi >= w:
            return _area_matrix(hi, h, x.device) @ x @ _area_matrix(wi, w, x.device).T
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                             antialias=not (hi <= h and wi <= w))

    return _resize_grouped(frames, size, area_or_bilinear)


def _groups(frames: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(frames):
        _check_frame(f)
        groups.setdefault(tuple(f.shape), []).append(i)
    return groups


def resize_frames_antialias(frames: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(B,h,w,3) uint8: torch's bilinear with antialiasing (a triangle filter as wide as the scale factor),
    rounded back to uint8. Not what :meth:`Detector.predict_frames` uses: against the area resize that
    calibration used it moved bottle scores by up to 9 % of the threshold (docs/performance.md), where
    :func:`resize_frames_device` moves them by well under 1 %. Kept to measure that."""
    return _resize_grouped(frames, size, lambda x, h, w: F.interpolate(
        x, size=(h, w), mode="bilinear", align_corners=False, antialias=True))


def _resize_grouped(frames: Sequence[torch.Tensor], size: tuple[int, int],
                    resize: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """(B,h,w,3) uint8 on the frames' device: frames of one shape go through ``resize`` ((b,3,H,W) float →
    (b,3,h,w)) together; frames already at ``size`` are copied."""
    if not frames:
        raise ValueError("no frames")
    h, w = size
    out = torch.empty((len(frames), h, w, 3), dtype=torch.uint8, device=frames[0].device)
    for shape, idx in _groups(frames).items():
        if shape[:2] == (h, w):
            for i in idx:
                out[i] = frames[i]
            continue
        x = torch.stack([frames[i] for i in idx]).permute(0, 3, 1, 2).float()  # (b,3,H,W)
        out[idx] = resize(x, h, w).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


class PinnedUploader:
    """Host frames → one device copy through a pinned staging buffer that is reused (grown when a batch
    needs more): one DMA per batch, no per-frame allocation. On a CPU device the frames are only wrapped."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._buf: torch.Tensor | None = None
        self._done: torch.cuda.Event | None = None  # the last copy out of the staging buffer
        self.grown = 0  # times the buffer was (re)allocated: for tests and logs

    def upload(self, frames: Sequence[np.ndarray]) -> list[torch.Tensor]:
        if not self._cuda:
            return [torch.from_numpy(np.ascontiguousarray(f)) for f in frames]
        total = sum(int(f.nbytes) for f in frames)
        if self._done is not None:
            self._done.synchronize()  # the previous batch has left the buffer: it may be overwritten
        if self._buf is None or self._buf.numel() < total:
            old = 0 if self._buf is None else self._buf.numel()
            self._buf = torch.empty(max(total, old + old // 4), dtype=torch.uint8, pin_memory=True)
            self.grown += 1
        host = self._buf.numpy()
        spans, off = [], 0
        for f in frames:
            n = int(f.nbytes)
            host[off:off + n] = np.ascontiguousarray(f).reshape(-1)
            spans.append((off, n, f.shape))
            off += n
        dev = self._buf[:total].to(self.device, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()
        return [dev[o:o + n].view(*shape) for o, n, shape in spans]


def frames_to_device(frames: Sequence[Frame], device: torch.device, uploader: PinnedUploader) -> list[torch.Tensor]:
    """Each frame as a tensor on ``device``: host frames (numpy or CPU tensors) through ``uploader`` in one
    copy, frames already there (decoded by nvJPEG) as they are."""
    out: list[torch.Tensor | None] = [None] * len(frames)
    host_idx, host = [], []
    for i, f in enumerate(frames):
        _check_frame(f)
        if isinstance(f, torch.Tensor) and f.device.type != "cpu":
            out[i] = f.to(device)  # already on a GPU (nvJPEG): a no-op on the model's ("cuda" is "cuda:0")
        else:
            host_idx.append(i)
            host.append(f.numpy() if isinstance(f, torch.Tensor) else f)
    if host:
        for i, t in zip(host_idx, uploader.upload(host), strict=True):
            out[i] = t
    return out  # type: ignore[return-value]


def decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | DecodeError]:
    """Each blob as uint8 (H,W,3) RGB on ``device`` (grey and CMYK JPEGs converted), or a
    :class:`DecodeError` in its slot. On CUDA one batched nvJPEG call; if it fails, each blob alone, so one
    corrupt blob costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    out: list[torch.Tensor | DecodeError] = [DecodeError("not decoded")] * len(blobs)
    datas: list[torch.Tensor] = []
    idx: list[int] = []
    for i, b in enumerate(blobs):
        if not b:
            out[i] = DecodeError("empty JPEG blob")
            continue
        datas.append(torch.frombuffer(bytearray(b), dtype=torch.uint8))
        idx.append(i)
    if not datas:
        return out

    def one(data: torch.Tensor) -> torch.Tensor | DecodeError:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device).permute(1, 2, 0)
        except Exception as exc:  # libjpeg / nvJPEG say why in the first line
            return DecodeError(f"JPEG does not decode: {str(exc).splitlines()[-1][:160] if str(exc) else exc!r}")

    if device.type == "cuda":
        try:
            imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
            for i, t in zip(idx, imgs, strict=True):
                out[i] = t.permute(1, 2, 0)
            return out
        except Exception:
            pass  # a bad blob fails the whole batched call: find it by decoding one at a time
    for i, d in zip(idx, datas, strict=True):
        out[i] = one(d)
    return out
