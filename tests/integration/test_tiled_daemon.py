"""A tiled bundle (``calibrate --tile``) in a real `linewatch run` (issue 11): a small defect away from the centre of a
part seen through an offset ROI comes back, on a real ZeroMQ subscriber, as a fail whose largest defect box and whose
mask sit at the defect's frame coordinates; a good part passes with the score calibration gives it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from linewatch.client import Subscriber
from linewatch.messages import Verdict
from linewatch.tools.harness import DaemonProcess, wait_until, write_config

PART_H, PART_W = 96, 256  # the part at native resolution: 10 tiles of 64x64 (overlap 16) per frame
ROI = (20, 10, PART_W, PART_H)  # where the part sits in the camera's 296x116 frame
FRAME_H, FRAME_W = PART_H + 2 * ROI[1], PART_W + 2 * ROI[0]
DEFECT_XY, DEFECT_R = (205, 28), 6  # in part coordinates: right of and above the centre (128, 48)
N_GOOD = 16


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A grey part: blurred noise (every part differs in detail, alike in kind), BGR for cv2.imwrite."""
    base = cv2.GaussianBlur(rng.integers(0, 256, (PART_H, PART_W), dtype=np.uint8), (0, 0), 2.0)
    return cv2.cvtColor(cv2.normalize(base, None, 80, 180, cv2.NORM_MINMAX), cv2.COLOR_GRAY2BGR)


def _in_frame(part: np.ndarray) -> np.ndarray:
    """The part where the camera sees it: inside a flat border, at the ROI."""
    frame = np.full((FRAME_H, FRAME_W, 3), 130, np.uint8)
    x, y, w, h = ROI
    frame[y:y + h, x:x + w] = part
    return frame


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> dict:
    """16 good parts, a tiled bundle trained 2 epochs on them (~10 s on two busy cores; seeded), and in-process
    scores of every good part and of the defective one."""
    from linewatch.model import load_detector
    from linewatch.station.calibration import CalibrateOptions, calibrate_station
    from linewatch.station.training import TrainConfig

    root = tmp_path_factory.mktemp("tiled")
    rng = np.random.default_rng(0)
    good_dir = root / "good"
    good_dir.mkdir()
    goods = [_texture(rng) for _ in range(N_GOOD)]
    for i, img in enumerate(goods):
        cv2.imwrite(str(good_dir / f"{i:03d}.png"), img)
    bad = _texture(rng)
    cv2.circle(bad, DEFECT_XY, DEFECT_R, (0, 0, 0), -1)
    opts = CalibrateOptions(tile=(64, 64), tile_overlap=16, val_fraction=0.15, cal_fraction=0.35, device="cpu",
                            train=TrainConfig(max_epochs=2, batch_size=16, patience=2), progress=False, report=False)
    bundle = root / "tiled.lwm"
    calibrate_station(good_dir, bundle, opts)
    det = load_detector(bundle, "cpu")
    assert det.meta.tiling is not None and det.input_size == (PART_H, PART_W)
    rgb = torch.from_numpy(np.ascontiguousarray(np.stack([*goods, bad])[..., ::-1]))
    pred = det.predict(rgb)
    scores = pred.scores.tolist()
    assert tuple(pred.maps.shape[1:]) == (PART_H, PART_W)  # the stitched map covers the part at native resolution
    return {"bundle": bundle, "goods": goods, "bad": bad, "good_scores": scores[:-1], "bad_score": scores[-1],
            "bad_map": pred.maps[-1].numpy(), "threshold": det.calibration.image_threshold,
            "pixel_threshold": det.calibration.pixel_threshold}


def test_tiled_bundle_in_the_daemon_puts_the_defect_box_and_mask_at_frame_coordinates(tiled, tmp_path):
    # the good frame: the good part with the lowest score. A held-out good part is no reliable pass with this tiny
    # model (6 calibration images make the threshold their maximum: a fresh part measured 0.725 against 0.762);
    # the lowest-scoring part is below every calibration score, so its pass is certain if the daemon scores
    # tiled frames as calibration does, which the score comparison checks.
    i_good = int(np.argmin(tiled["good_scores"]))
    assert tiled["good_scores"][i_good] < tiled["threshold"]
    assert tiled["bad_score"] > tiled["threshold"] * 1.2, tiled  # the tiny model does see the defect (margin)
    cam_dir = tmp_path / "cam"
    cam_dir.mkdir()
    cv2.imwrite(str(cam_dir / "000_good.png"), _in_frame(tiled["goods"][i_good]))
    cv2.imwrite(str(cam_dir / "001_defect.png"), _in_frame(tiled["bad"]))
    cams = [{"name": "tiled", "source": f"dir://{cam_dir}", "roi": list(ROI), "on_end": "stop"}]
    cfg = write_config(tmp_path / "lw.yaml", tiled["bundle"], cams, publisher={"wait_for_subscriber_s": 60,
                                                                              "masks": "all"})
    got: dict[str, Verdict] = {}
    with DaemonProcess(cfg) as d:
        with Subscriber(d.endpoint) as sub:
            def both() -> bool:
                msg = sub.recv(0.2)
                if isinstance(msg, Verdict):
                    got[msg.ref or ""] = msg
                return len(got) == 2

            wait_until(both, 120, interval=0, what="two verdicts")
        assert d.terminate() == 0
        loaded = d.wait_event("model_loaded", 5)
    assert loaded["input_size"] == [PART_H, PART_W]  # the cameras deliver native-resolution parts; tiles inside
    good, bad = got["000_good.png"], got["001_defect.png"]

    assert good.verdict == "pass", good
    assert good.score == pytest.approx(tiled["good_scores"][i_good], rel=1e-3)
    assert bad.verdict == "fail"
    assert bad.score == pytest.approx(tiled["bad_score"], rel=1e-3)
    assert (bad.frame_width, bad.frame_height) == (FRAME_W, FRAME_H) and tuple(bad.roi) == ROI

    # the defect in camera-frame coordinates: the part's position plus the ROI's offset
    dx, dy = DEFECT_XY[0] + ROI[0], DEFECT_XY[1] + ROI[1]
    x0, y0, x1, y1 = dx - DEFECT_R, dy - DEFECT_R, dx + DEFECT_R, dy + DEFECT_R
    box = bad.boxes[0]  # the largest region
    assert box.x <= x0 and box.y <= y0 and box.x + box.w >= x1 and box.y + box.h >= y1, (box, (x0, y0, x1, y1))
    # ... and about the defect, not the part: the blurred map of a 2-epoch model spreads, but the box stays near the
    # defect and off the part's centre. How far it spreads follows the pixel threshold: this model's good-pixel
    # quantile is above its image threshold, so the mask is cut at the image threshold (fit_calibration's cap), and
    # the top 2 % score puts that lower than the top 1 % did (box measured 59x56 px with top 1 %, 80–82 x 77 with 2 %,
    # for a 13 px disc)
    assert tiled["pixel_threshold"] <= tiled["threshold"]
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    assert abs(cx - dx) < 40 and abs(cy - dy) < 40, box
    px, py = ROI[0] + PART_W / 2, ROI[1] + PART_H / 2
    assert not (box.x <= px <= box.x + box.w and box.y <= py <= box.y + box.h), box
    assert box.w * box.h < PART_W * PART_H / 3, box
    # that spread makes the containment above blind to an ROI offset lost on the way (20 px right, 10 down would
    # still contain the disc): the box must be the in-process map's largest region, shifted by exactly the offset
    above = (tiled["bad_map"] > tiled["pixel_threshold"]).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    ex, ey, ew, eh = (int(v) for v in stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])), :4])
    want = (ex + ROI[0], ey + ROI[1], ew, eh)
    assert np.abs(np.subtract((box.x, box.y, box.w, box.h), want)).max() <= 2, (box, want)

    # the mask, on the camera frame (the ROI's mask placed at the ROI): the defect's pixels set, the border and
    # most of the part clear
    mask = cv2.imdecode(np.frombuffer(bad.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (FRAME_H, FRAME_W)
    disc = np.zeros_like(mask)
    cv2.circle(disc, (dx, dy), DEFECT_R - 1, 255, -1)
    # most of the disc: a 2-epoch model's response to a flat black disc can be a ring (measured 0.74–1.0 of the
    # disc across runs); where the mask lies exactly is checked against the in-process map below (IoU)
    assert (mask[disc > 0] > 0).mean() > 0.5
    x, y, w, h = ROI
    inside = np.zeros(mask.shape, bool)
    inside[y:y + h, x:x + w] = True
    assert not mask[~inside].any()
    assert (mask[inside] > 0).mean() < 0.25
    roi_mask = mask[y:y + h, x:x + w] > 0
    iou = (roi_mask & (above > 0)).sum() / (roi_mask | (above > 0)).sum()
    assert iou > 0.95, iou  # the map the daemon thresholded is the one calibration's detector gives
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - dx) < 50 and abs(ys.mean() - dy) < 30  # its mass is at the defect

