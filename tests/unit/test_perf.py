"""The speed-ups change nothing a user can see: same regions and masks, same scores, same frames."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import torch

from linewatch.messages import MAX_BOXES, Box
from linewatch.service.frames import Frame
from linewatch.service.telemetry.prometheus import STAGES, Metrics
from linewatch.service.worker import find_defects
from linewatch.tools.bench.sources import MemorySource, RoomQueue


def reference_find_defects(amap, thr, roi, want_mask, failed):
    """find_defects as it was before the speed-ups: full-frame np.where and labelling."""
    x0, y0, rw, rh = roi
    if float(amap.max()) <= thr and not failed:
        return [], 0, 0, (np.zeros((rh, rw), np.uint8) if want_mask else None)
    up = cv2.resize(amap, (rw, rh), interpolation=cv2.INTER_LINEAR) if amap.shape != (rh, rw) else amap
    mask = np.where(up > thr, np.uint8(255), np.uint8(0))
    if failed and not mask.any():
        iy, ix = np.unravel_index(int(np.argmax(amap)), amap.shape)
        mask[min(rh - 1, int((iy + 0.5) * rh / amap.shape[0])), min(rw - 1, int((ix + 0.5) * rw / amap.shape[1]))] = 255
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = stats[1:]
    order = np.argsort(-regions[:, cv2.CC_STAT_AREA], kind="stable")[:MAX_BOXES] if len(regions) else []
    boxes = [Box(x=int(regions[i, 0]) + x0, y=int(regions[i, 1]) + y0, w=int(regions[i, 2]), h=int(regions[i, 3]),
                 area=int(regions[i, 4])) for i in order]
    return boxes, int(n - 1), int(regions[:, cv2.CC_STAT_AREA].sum()), (mask if want_mask else None)


def test_find_defects_equals_the_full_frame_reference_on_random_maps():
    """Bounding-box labelling + cv2.compare give exactly the boxes (order included), counts, areas and masks
    of thresholding and labelling the whole frame."""
    rng = np.random.default_rng(0)
    for _ in range(600):
        s = int(rng.choice([16, 32, 64]))
        amap = rng.random((s, s)).astype(np.float32)
        k = int(rng.choice([1, 3, 5]))
        if k > 1:
            amap = cv2.GaussianBlur(amap, (k, k), 0)  # clustered regions, many of equal area
        thr = float(np.quantile(amap, rng.choice([0.5, 0.9, 0.99, 1.0])))
        rw, rh = int(rng.integers(s // 2, 4 * s)), int(rng.integers(s // 2, 4 * s))
        roi = (int(rng.integers(0, 9)), int(rng.integers(0, 9)), rw, rh)
        want, failed = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        boxes, n, area, mask = reference_find_defects(amap, thr, roi, want, failed)
        d = find_defects(amap, thr, roi, want_mask=want, failed=failed)
        assert (d.boxes, d.n_regions, d.area) == (boxes, n, area)
        assert (mask is None and d.mask is None) or np.array_equal(mask, d.mask)


def test_memory_source_and_waiting_for_room():
    frames = [np.full((90, 120, 3), i, np.uint8) for i in range(3)]
    src = MemorySource(frames, loop=True)
    assert not src.paced and "3 frames 120x90" in src.description
    got = [src.read().image[0, 0, 0] for _ in range(5)]
    assert got == [0, 1, 2, 0, 1]
    assert MemorySource(frames[:1], loop=False).read() is not None
    once = MemorySource(frames[:1], loop=False)
    once.read()
    assert once.read() is None

    q = RoomQueue(2)
    img = np.zeros((8, 8, 3), np.uint8)
    for s in range(2):
        q.put(Frame("a", s, time.time(), time.monotonic(), img, (8, 8), (0, 0, 8, 8)))
    assert q.wait_for_room("b", 0.0)  # another camera's deque is empty
    assert not q.wait_for_room("a", 0.05)  # full
    freed = threading.Event()

    def take() -> None:
        time.sleep(0.05)
        q.get_batch(1, 0.0, 1.0)
        freed.set()

    threading.Thread(target=take).start()
    t0 = time.monotonic()
    assert q.wait_for_room("a", 5.0)  # woken by the worker taking a frame, not by the timeout
    assert time.monotonic() - t0 < 2.0 and freed.wait(2)


@pytest.fixture(scope="module")
def stfpm():
    from linewatch.model.backbones import build_extractor
    from linewatch.model.stfpm import STFPM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small shared CI box several OpenMP threads per op only wait for each other
    torch.manual_seed(0)
    model = STFPM("mobilenet_v2", teacher=build_extractor("mobilenet_v2"), input_size=(64, 64), blur_sigma=1.0)
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is really tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    yield model.eval()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("engine", ["eager", "jit"])
def test_engines_score_like_the_unmodified_model(stfpm, engine):
    from linewatch.model import BundleMeta, Detector

    meta = BundleMeta("mobilenet_v2", "x", (64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1, 1.0)
    before = {k: v.clone() for k, v in stfpm.state_dict().items()}
    det = Detector(stfpm, meta, "m", torch.device("cpu"), engine=engine)
    x = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_maps, ref_scores = stfpm(x)
    for b in (1, 2, 5):  # the traced graph must not depend on the batch size it was traced with
        p = det.predict(x[:b])
        torch.testing.assert_close(p.maps, ref_maps[:b], rtol=1e-4, atol=1e-4 * float(ref_maps.abs().max()))
        torch.testing.assert_close(p.scores, ref_scores[:b], rtol=1e-4, atol=1e-7)
    # another shape than uint8 (B,H,W,3) at input size takes the eager path, still right
    p = det.predict(x[:2].permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(p.scores, ref_scores[:2], rtol=1e-4, atol=1e-7)
    # the model itself (what a bundle stores) is untouched: BatchNorm is folded into a copy
    after = stfpm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert det.engine == engine


def test_unknown_engine_is_a_one_line_error(stfpm):
    from linewatch.errors import LinewatchError
    from linewatch.model import BundleMeta, Detector

    meta = BundleMeta("mobilenet_v2", "x", (64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1, 1.0)
    with pytest.raises(LinewatchError, match="engine 'fast'"):
        Detector(stfpm, meta, "m", torch.device("cpu"), engine="fast")


def test_stage_counters_exist_from_the_start():
    m = Metrics()
    for s in STAGES:
        assert m.registry.get_sample_value("linewatch_stage_seconds_total", {"stage": s}) == 0.0
