"""Inference worker: micro-batches frames from all cameras, runs the model once per batch, turns each
anomaly map into a verdict, defect boxes and (optionally) a mask, and hands them to the publisher.

It sees the model only through the :class:`linewatch.service.detector.Detector` protocol: ``input_size``,
``predict``, ``calibration``, ``model_id``, ``device``; and uses ``predict_frames`` (frames at ROI resolution)
and ``decode_jpegs`` (frames that came as JPEG, ``capture.jpeg_decode: device``) where the detector has them.
"""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import structlog
import torch

from linewatch.imaging.images import resize
from linewatch.messages import MAX_BOXES, Box, Verdict
from linewatch.service.deadlines import part_id
from linewatch.service.frames import Frame, FrameQueue
from linewatch.service.telemetry.prometheus import Metrics

if TYPE_CHECKING:
    from linewatch.service.deadlines import DeadlineTracker, Part
    from linewatch.service.detector import Detector

log = structlog.get_logger("linewatch.worker")

# (verdict, ROI-size mask or None); called with preview=(frame RGB, anomaly map) only when PreviewFn said yes
PublishFn = Callable[..., None]
PreviewFn = Callable[[Verdict], bool]  # Publisher.wants_preview: policy, subscribers, rate cap
# (frame, verdict, anomaly map at model size); the map is None for a pass whose map stayed on the device (no
# pixel over the pixel threshold: nothing to see in it), never for a fail
Observer = Callable[["Frame", Verdict, "np.ndarray | None"], None]
SwapCallback = Callable[[str, "Detector"], None]  # (old model_id, new detector): called on the worker thread
MAX_CONSECUTIVE_FAILURES = 3  # batches in a row: then the worker reports itself unhealthy (watchdog)
# CUDA out-of-memory (torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class): the batch is
# split in halves and retried, and the worker's effective max batch is lowered to the size that is retried.
OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
# After this long without an out-of-memory error the effective max batch is doubled again (capped at
# batching.max_batch): one probe per period at most, and a probe that fails costs a retry, not a verdict.
OOM_RECOVERY_S = 600.0


@dataclass
class Defects:
    boxes: list[Box] = field(default_factory=list)  # largest first, at most MAX_BOXES, frame coordinates
    n_regions: int = 0
    area: int = 0  # defect pixels at frame resolution
    mask: np.ndarray | None = None  # (roi h, roi w) uint8 0/255, when asked for


def find_defects(amap: np.ndarray, pixel_threshold: float, roi: tuple[int, int, int, int], *,
                 want_mask: bool, failed: bool) -> Defects:
    """Map the anomaly map (model input size) back onto the ROI, threshold it and find regions.

    The map is upsampled before thresholding (bilinear) so region outlines follow the map rather than
    the model's pixel grid. Bilinear sampling can miss a lone peak; a failed part always gets at least
    the peak's pixel, so "fail" never comes with an empty mask.
    """
    x0, y0, rw, rh = roi
    peak = float(amap.max()) if amap.size else float("-inf")
    if peak <= pixel_threshold and not failed:
        return Defects(mask=np.zeros((rh, rw), np.uint8) if want_mask else None)
    up = cv2.resize(amap, (rw, rh), interpolation=cv2.INTER_LINEAR) if amap.shape != (rh, rw) else amap
    # 0/255 in one SIMD pass (same result as np.where(up > thr, 255, 0): both compare in float32)
    mask = cv2.compare(up, pixel_threshold, cv2.CMP_GT)
    bx, by, bw, bh = cv2.boundingRect(mask)  # every defect pixel lies in here; (0, 0, 0, 0) if none
    if failed and bw == 0:
        iy, ix = np.unravel_index(int(np.argmax(amap)), amap.shape)
        py = min(rh - 1, int((iy + 0.5) * rh / amap.shape[0]))
        px = min(rw - 1, int((ix + 0.5) * rw / amap.shape[1]))
        mask[py, px] = 255
        bx, by, bw, bh = px, py, 1, 1
    elif bw == 0:  # a peak above the pixel threshold that bilinear upsampling smoothed away: nothing to label
        return Defects(mask=mask if want_mask else None)
    # Connected components of the bounding box only (a defect is usually a small part of the frame: 0.1 ms
    # instead of 5 ms at 900×900); outside it the mask is empty, so the components are the same. Its origin
    # is rounded down to even coordinates: OpenCV's 8-connectivity labelling scans 2×2 blocks, and on the
    # same block grid it numbers the regions in the same order as a whole-frame scan (equal-area boxes keep
    # their order).
    cx, cy = bx & ~1, by & ~1
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask[cy:by + bh, cx:bx + bw], connectivity=8)
    regions = stats[1:]  # label 0 is the background
    regions[:, 0] += cx
    regions[:, 1] += cy
    order = np.argsort(-regions[:, cv2.CC_STAT_AREA], kind="stable")[:MAX_BOXES] if len(regions) else []
    boxes = [
        Box(x=int(regions[i, 0]) + x0, y=int(regions[i, 1]) + y0, w=int(regions[i, 2]), h=int(regions[i, 3]),
            area=int(regions[i, 4]))
        for i in order
    ]
    return Defects(boxes=boxes, n_regions=int(n - 1), area=int(regions[:, cv2.CC_STAT_AREA].sum()),
                   mask=mask if want_mask else None)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text else ""


def _crop_decoded(f: Frame, decoded: Any) -> str | None:
    """Set ``f.image`` to its ROI of ``decoded`` (a (H,W,3) tensor) and release ``f.jpeg``; or why not (a
    decode error, or an image that is not the size its header promised capture)."""
    if not isinstance(decoded, torch.Tensor):
        return _first_line(decoded) or type(decoded).__name__
    fw, fh = f.frame_size
    if tuple(decoded.shape) != (fh, fw, 3):
        return f"decoded to {tuple(decoded.shape)}, its header says {fw}x{fh}"
    x, y, w, h = f.roi
    f.image = decoded[y:y + h, x:x + w]
    f.jpeg = None
    return None


class _AllFailed(Exception):
    """Every frame of a batch ran out of memory alone (already counted and logged)."""


class InferenceWorker(threading.Thread):
    def __init__(self, detector: Detector, queue: FrameQueue, publish: PublishFn, metrics: Metrics, *,
                 max_batch: int = 8, max_wait_ms: float = 10.0, masks: str = "fail", run_id: str | None = None,
                 poll_s: float = 0.1, observers: list[Observer] | None = None,
                 oom_recovery_s: float | None = OOM_RECOVERY_S, preview: PreviewFn | None = None,
                 deadlines: DeadlineTracker | None = None, sampled_observers: list[Observer] | None = None,
                 sample_every_n: int = 1):
        super().__init__(name="inference", daemon=True)
        self.detector = detector
        self.queue = queue
        self.publish = publish
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.masks = masks
        self.preview = preview
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.poll_s = poll_s
        # called with every verdict after it is handed to the publisher (health, archive): each must only
        # enqueue, never block; an observer that raises is logged and skipped
        self.observers: list[Observer] = list(observers or [])
        # called with one verdict in sample_every_n per camera (the drift monitor): fewer per-frame calls
        self.sampled_observers: list[Observer] = list(sampled_observers or [])
        self.sample_every_n = max(1, sample_every_n)
        self._sample_count: dict[str, int] = {}
        cal = detector.calibration
        self.image_threshold = float(cal.image_threshold)
        self.pixel_threshold = float(cal.pixel_threshold)
        self.model_id = str(detector.model_id)
        h, w = detector.input_size
        # One buffer for every batch: no per-batch allocation of the largest array we handle. On CUDA it
        # is pinned so the upload is a straight DMA; reusing it is safe because predict() returns CPU
        # results, which waits for the whole batch, upload included.
        pin = torch.device(detector.device).type == "cuda"
        self._tbuf = torch.empty((max_batch, h, w, 3), dtype=torch.uint8, pin_memory=pin)
        self._buf = self._tbuf.numpy()
        self._stage = metrics.stage  # per-stage time counters (`linewatch bench --profile`)
        self.last_tick = time.monotonic()  # the loop went round (health)
        self.busy_since: float | None = None  # a batch is in the model since then (health)
        self.consecutive_failures = 0
        self.frames_done = 0
        self.batches = 0
        self._stop_event = threading.Event()
        self._deadline: float | None = None
        # out of memory: batches are capped at effective_max_batch (≤ max_batch), raised again after
        # oom_recovery_s without one (None: never)
        self.effective_max_batch = max_batch
        self.oom_recovery_s = oom_recovery_s
        self._limit_changed = time.monotonic()
        self.metrics.effective_max_batch.set(max_batch)
        # model reload: a new detector waits here until the next batch boundary (see swap_detector)
        self._swap_lock = threading.Lock()
        # Held around every model call. Preparing a model's inference copy (BatchNorm folding with torch.fx)
        # patches torch.nn.Module.__call__ process-wide while it traces, which breaks any model running in
        # another thread at that moment: a reload prepares the new model under this lock (a short pause).
        self.model_lock = threading.Lock()
        self._pending: tuple[Detector, SwapCallback | None] | None = None
        self._model_interface(detector)
        # part-triggered cameras: part ids on verdicts; with deadlines, timeout verdicts and late ones withheld
        self.deadlines = deadlines
        if deadlines is not None:
            deadlines.on_timeout = self._timed_out
            if deadlines.has_deadlines:
                queue.on_put = deadlines.register

    def stop(self, deadline: float) -> None:
        """Finish the frames already queued (no new ones will come) until ``deadline`` (monotonic)."""
        self._deadline = deadline
        self._stop_event.set()
        self.queue.wake()

    @property
    def healthy(self) -> bool:
        return self.is_alive() and self.consecutive_failures < MAX_CONSECUTIVE_FAILURES

    def run(self) -> None:
        if self.deadlines is not None:
            self.deadlines.start()
        try:
            self._run()
        finally:
            if self.deadlines is not None:
                self.deadlines.close()  # parts still without a verdict time out now: never silent

    def _run(self) -> None:
        while True:
            self.last_tick = time.monotonic()
            self._apply_swap()  # between batches: a reloaded model takes over here
            self._maybe_raise_batch_limit()
            if self._stop_event.is_set():
                if self._deadline is not None and time.monotonic() > self._deadline:
                    break
                batch = self.queue.get_batch(self.effective_max_batch, 0.0, 0.0)
                if not batch:
                    break
            else:
                batch = self.queue.get_batch(self.effective_max_batch, self.max_wait_s, self.poll_s)
            if batch:
                self.process(batch)
        left = self.queue.drain()
        for f in left:
            self.metrics.drop(f.camera, "shutdown")
        if left:
            log.warning("drain_timeout", frames_dropped=len(left))

    def process(self, batch: list[Frame]) -> None:
        """Verdicts for ``batch``: one model call per chunk of at most ``effective_max_batch`` frames.

        Out of memory on a chunk of k > 1 frames: the effective max batch drops to k // 2 and the same
        frames are retried in smaller chunks (log ``inference_oom``, ``linewatch_oom_total``), so no
        verdict is lost. A single frame that does not fit loses only itself; any other error loses the
        frames of this batch still without a verdict. Both are counted as ``inference_error``. Frames that
        came as JPEG are decoded first, all in one call; one that does not decode is a ``decode_error``.
        """
        start = time.monotonic()
        self.busy_since = start
        for f in batch:
            self.metrics.queue_wait.observe(start - f.enqueued)
            self._stage["queue_wait"].inc(start - f.enqueued)
        handled = 0  # frames of the batch with a verdict or counted as lost
        lost_alone = 0  # frames that ran out of memory on their own (no verdict)
        try:
            batch = self._decode_jpegs(batch)  # frames that came as JPEG; one that does not decode drops out
            n = len(batch)
            if n == 0:  # every frame was a JPEG that did not decode (counted): not an inference failure
                return
            if not self._device_preprocess:  # else frames go as they are (ROI resolution) to predict_frames
                for i, f in enumerate(batch):
                    self._buf[i] = f.image if isinstance(f.image, np.ndarray) else self._input_size_image(f)
            self._stage["preprocess"].inc(time.monotonic() - start)
            while handled < n:
                size = min(self.effective_max_batch, n - handled)
                t0 = time.monotonic()
                try:
                    with self.model_lock:
                        pred = self._predict(batch, handled, size)
                except OOM_ERRORS as exc:
                    if self._out_of_memory(size, exc):
                        continue  # retry the same frames in smaller chunks
                    f = batch[handled]  # one frame does not fit: it alone gets no verdict
                    self.metrics.drop(f.camera, "inference_error")
                    log.error("inference_failed", error=f"{type(exc).__name__}: {_first_line(exc)}", frames=1,
                              cameras=[f.camera], seq=[f.sequence], consecutive=self.consecutive_failures + 1)
                    handled += 1
                    lost_alone += 1
                    continue
                t1 = time.monotonic()
                self.metrics.inference.observe(t1 - t0)
                self._stage["forward"].inc(t1 - t0)
                self.metrics.batch_size.observe(size)
                for amap, score, is_fail, fetch in self._batch_results(pred, size):
                    self._verdict(batch[handled], amap, score, is_fail, fetch)
                    handled += 1
                self._stage["postprocess"].inc(time.monotonic() - t1)
            if lost_alone == n:
                raise _AllFailed()
            self.consecutive_failures = 0
        except Exception as exc:  # a bad batch must not end the daemon: count, log, go on
            self.consecutive_failures += 1
            lost = batch[handled:]
            for f in lost:
                self.metrics.drop(f.camera, "inference_error")
            if lost:
                log.error("inference_failed", error=f"{type(exc).__name__}: {exc}", frames=len(lost),
                          cameras=sorted({f.camera for f in lost}), seq=[f.sequence for f in lost][:16],
                          consecutive=self.consecutive_failures)
            # back off a little so a persistent error does not spin the CPU
            self._stop_event.wait(min(5.0, 0.1 * 2 ** self.consecutive_failures))
        finally:
            self.busy_since = None
            self.batches += 1

    # -- frames that came as JPEG (capture.jpeg_decode: device)

    def _decode_jpegs(self, batch: list[Frame]) -> list[Frame]:
        """Decode the batch's JPEG frames in one call on the model's device and crop each to its ROI (its
        ``image`` becomes a tensor there; ``jpeg`` is released). A frame that does not decode is dropped and
        counted as ``decode_error``; the batch without it is returned."""
        idx = [i for i, f in enumerate(batch) if f.jpeg is not None]
        if not idx:
            return batch
        try:
            decoded: list[Any] = list(self._decoder([batch[i].jpeg for i in idx]))
        except Exception as exc:  # the decoder itself failed: each of these frames is lost, the others go on
            decoded = [exc] * len(idx)
        bad: set[int] = set()
        for i, d in zip(idx, decoded, strict=True):
            f = batch[i]
            error = _crop_decoded(f, d)
            if error is not None:
                bad.add(i)
                self.metrics.decode_errors.labels(f.camera).inc()
                self.metrics.drop(f.camera, "decode_error")
                log.warning("decode_error", camera=f.camera, seq=f.sequence, ref=f.ref, error=error,
                            action="skipped", where="worker")
        return [f for i, f in enumerate(batch) if i not in bad] if bad else batch

    def _input_size_image(self, f: Frame) -> np.ndarray:
        """A decoded frame (a tensor at ROI resolution) resized to the model's input as capture would have
        (same resize, same order: crop, resize; RGB already), for a model that does not resize itself. That
        model runs on the CPU, where the tensor's numpy view costs no copy."""
        arr = f.image.detach().cpu().numpy()
        return resize(np.ascontiguousarray(arr), tuple(self._tbuf.shape[1:3]))  # type: ignore[arg-type]

    # -- out of memory

    def _out_of_memory(self, size: int, exc: BaseException) -> bool:
        """A chunk of ``size`` frames did not fit. True: retry at size // 2, now the effective max batch;
        False: a single frame, nothing left to split."""
        self.metrics.oom.inc()
        if torch.device(self.detector.device).type == "cuda":
            try:
                torch.cuda.empty_cache()  # give the allocator's cached blocks back before the retry
            except Exception:
                pass
        if size <= 1:
            return False
        old = self.effective_max_batch
        self.effective_max_batch = max(1, size // 2)
        self._limit_changed = time.monotonic()
        self.metrics.effective_max_batch.set(self.effective_max_batch)
        log.warning("inference_oom", batch=size, retry_batch=self.effective_max_batch,
                    effective_max_batch=self.effective_max_batch, previous_max_batch=old,
                    error=f"{type(exc).__name__}: {_first_line(exc)}")
        return True

    def _maybe_raise_batch_limit(self) -> None:
        """Double the effective max batch (≤ max_batch) after ``oom_recovery_s`` without running out of memory."""
        if self.effective_max_batch >= self.max_batch or self.oom_recovery_s is None:
            return
        now = time.monotonic()
        if now - self._limit_changed < self.oom_recovery_s:
            return
        old = self.effective_max_batch
        self.effective_max_batch = min(self.max_batch, old * 2)
        self._limit_changed = now
        self.metrics.effective_max_batch.set(self.effective_max_batch)
        log.info("batch_limit_raised", effective_max_batch=self.effective_max_batch, previous_max_batch=old,
                 max_batch=self.max_batch, oom_free_s=self.oom_recovery_s)

    # -- model reload

    def swap_detector(self, detector: Detector, on_swapped: SwapCallback | None = None) -> None:
        """Use ``detector`` from the next batch on. Thread-safe; the worker swaps between two batches, so
        every verdict comes wholly from one model. ``detector`` must have the same input size and device.
        ``on_swapped(old_model_id, detector)`` runs on the worker thread right after the swap."""
        if tuple(detector.input_size) != tuple(self._tbuf.shape[1:3]):
            raise ValueError(f"input size {tuple(detector.input_size)} differs from the running model's "
                             f"{tuple(self._tbuf.shape[1:3])}")
        detector.calibration  # noqa: B018 -- raises if the bundle has no calibration
        with self._swap_lock:
            self._pending = (detector, on_swapped)
        self.queue.wake()

    @property
    def swap_pending(self) -> bool:
        return self._pending is not None

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        detector, on_swapped = pending
        old = self.model_id
        cal = detector.calibration
        self.detector = detector
        self.image_threshold = float(cal.image_threshold)
        self.pixel_threshold = float(cal.pixel_threshold)
        self.model_id = str(detector.model_id)
        self._model_interface(detector)
        if on_swapped is not None:
            try:
                on_swapped(old, detector)
            except Exception:
                log.exception("swap_callback_failed")

    def _timed_out(self, part: Part) -> None:
        """The deadline tracker's callback (its timer thread, or this thread from settle): publish a timeout
        verdict for a part, a fail without a score that a PLC rejects."""
        v = Verdict(
            camera=part.camera, sequence=part.sequence, capture_time=part.capture_time, verdict_time=time.time(),
            verdict="fail", score=float("nan"), threshold=self.image_threshold, pixel_threshold=self.pixel_threshold,
            p_value=None, model_id=self.model_id, frame_width=part.frame_size[0], frame_height=part.frame_size[1],
            roi=part.roi, ref=part.ref, run_id=self.run_id, part_id=part.part_id, timed_out=True,
            frame_id=part.frame_id, device_time=part.device_time,
        )
        self.metrics.parts_timed_out.labels(part.camera).inc()
        log.warning("part_timed_out", camera=part.camera, seq=part.sequence, part_id=part.part_id,
                    reason=part.reason)
        self.publish(v, None)

    # -- the model call and its results, batch-wide

    def _model_interface(self, detector: Detector) -> None:
        """What this detector offers beyond the protocol (a test's fake may have neither)."""
        try:
            params = inspect.signature(detector.predict).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        # maps left on the device: only those of frames that can show a defect are copied to the host
        self._host_maps_kw = "host_maps" in params
        # the device resizes ROI-resolution frames itself (capture skipped its resize)
        self._device_preprocess = bool(getattr(detector, "device_preprocess", False)) and hasattr(
            detector, "predict_frames")
        # JPEG frames: decoded on the model's device (a detector without decode_jpegs: the same decoder here)
        decode = getattr(detector, "decode_jpegs", None)
        if decode is None:
            from linewatch.model.preprocess import decode_jpegs

            device = detector.device
            decode = lambda blobs: decode_jpegs(blobs, device)  # noqa: E731
        self._decoder: Callable[[list[bytes]], list[Any]] = decode

    def _predict(self, batch: list[Frame], start: int, size: int) -> Any:
        if self._device_preprocess:
            return self.detector.predict_frames([f.image for f in batch[start:start + size]])  # type: ignore[attr-defined]
        x = self._tbuf[start:start + size]
        if self._host_maps_kw:
            return self.detector.predict(x, host_maps=False)  # type: ignore[call-arg]
        return self.detector.predict(x)

    def _fetch_maps(self, maps: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        """The maps of frames ``idx`` on the host, in one copy."""
        return maps[torch.from_numpy(idx).to(maps.device)].float().cpu().numpy()

    def _batch_results(self, pred: Any, size: int) -> list[tuple[np.ndarray | None, float, bool, Any]]:
        """Per frame (map or None, score, failed, fetch): scores and pass/fail for the whole batch in one op
        each. Copying the scores to the host also waits for the batch, upload included: the reused input
        buffer is free again after this. Maps that may be on the device are copied only for frames that
        fail or have a pixel over the pixel threshold (boxes, masks); the others cannot show anything."""
        scores = pred.scores.detach().float().cpu().numpy()
        fails = scores.astype(np.float64) > self.image_threshold  # as Calibration.is_fail, in float64
        maps_t = pred.maps
        if not self._host_maps_kw and not self._device_preprocess:
            maps = maps_t.numpy()  # already on the host (the protocol's default)
            return [(maps[j], float(scores[j]), bool(fails[j]), None) for j in range(size)]
        peaks = maps_t.detach().flatten(1).amax(1).float().cpu().numpy().astype(np.float64)
        idx = np.flatnonzero(fails | (peaks > self.pixel_threshold))
        host = self._fetch_maps(maps_t, idx) if len(idx) else None
        row = {int(j): k for k, j in enumerate(idx)}
        out: list[tuple[np.ndarray | None, float, bool, Any]] = []
        for j in range(size):
            k = row.get(j)
            amap = host[k] if host is not None and k is not None else None
            fetch = None if amap is not None else (lambda j=j: maps_t[j].float().cpu().numpy())
            out.append((amap, float(scores[j]), bool(fails[j]), fetch))
        return out

    def _verdict(self, f: Frame, amap: np.ndarray | None, score: float, failed: bool | None = None,
                 fetch: Callable[[], np.ndarray] | None = None) -> None:
        """``amap`` None: the map stayed on the device because nothing in it can show (a pass with no pixel
        over the pixel threshold); ``fetch`` copies it if a preview asks for it after all."""
        cal = self.detector.calibration
        failed = bool(cal.is_fail(score)) if failed is None else failed
        verdict = "fail" if failed else "pass"
        want_mask = self.masks == "all" or (self.masks == "fail" and failed)
        if amap is not None:
            defects = find_defects(amap, self.pixel_threshold, f.roi, want_mask=want_mask, failed=failed)
        else:  # what find_defects returns for a map with no pixel over the threshold
            defects = Defects(mask=np.zeros((f.roi[3], f.roi[2]), np.uint8) if want_mask else None)
        now_mono = time.monotonic()
        v = Verdict(
            camera=f.camera, sequence=f.sequence, capture_time=f.capture_time, verdict_time=time.time(),
            verdict=verdict, score=score, threshold=self.image_threshold, pixel_threshold=self.pixel_threshold,
            p_value=cal.p_value(score), model_id=self.model_id, frame_width=f.frame_size[0],
            frame_height=f.frame_size[1], boxes=defects.boxes, n_regions=defects.n_regions,
            defect_area=defects.area, roi=f.roi, ref=f.ref, run_id=self.run_id, frame_id=f.frame_id,
            device_time=f.device_time,
        )
        late = False
        if self.deadlines is not None and self.deadlines.triggered(f.camera):
            v.part_id = part_id(f)
            late = not self.deadlines.settle(f)  # past the deadline: the timeout verdict stands
        self.metrics.verdicts.labels(f.camera, verdict).inc()
        self.metrics.latency.labels(f.camera).observe(max(0.0, now_mono - f.capture_mono))
        if self.image_threshold > 0:
            self.metrics.score_ratio.labels(f.camera).observe(score / self.image_threshold)
        self.frames_done += 1
        if late:
            self.metrics.parts_late.labels(f.camera).inc()
            log.warning("late_verdict_withheld", camera=f.camera, seq=f.sequence, part_id=v.part_id,
                        verdict=verdict, latency_s=round(now_mono - f.capture_mono, 3))
        elif self.preview is not None and self.preview(v):
            # a copy of the map: a view would keep the whole batch's maps alive until the publisher encodes it
            self.publish(v, defects.mask, preview=(f.host_image(), amap.copy() if amap is not None else fetch()))
        else:
            self.publish(v, defects.mask)
        observers = self.observers
        if self.sampled_observers:
            n = self._sample_count.get(f.camera, 0)
            self._sample_count[f.camera] = n + 1
            if n % self.sample_every_n == 0:
                observers = observers + self.sampled_observers
        for observe in observers:
            try:
                observe(f, v, amap)
            except Exception as exc:
                log.error("observer_failed", observer=getattr(observe, "__qualname__", str(observe)),
                          error=f"{type(exc).__name__}: {exc}", camera=f.camera, seq=f.sequence)
