"""Tiling: tile grid, stitching, a small defect found at native resolution at the right frame coordinates,
and tiled / non-square bundles through calibrate, evaluate, infer and the inference worker."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from linewatch.model.scoring import ImageScorer
from linewatch.model.tiling import TiledNet, TileSpec, axis_origins, extract_tiles, stitch
from linewatch.service.worker import find_defects


@pytest.mark.parametrize(("length", "tile", "overlap"), [(64, 64, 0), (100, 64, 16), (1200, 256, 32), (300, 128, 0),
                                                         (257, 256, 32)])
def test_tiles_cover_the_axis_inside_it_and_overlap_at_least_as_asked(length, tile, overlap):
    o = axis_origins(length, tile, overlap)
    assert o[0] == 0 and o[-1] + tile == length  # first at the start, last ends at the edge
    assert all(0 <= a <= length - tile for a in o)
    assert all(b - a <= tile - overlap for a, b in zip(o, o[1:], strict=False))  # no gaps, overlap ≥ asked
    assert o == sorted(set(o))


def test_a_frame_smaller_than_the_tile_is_refused():
    with pytest.raises(ValueError, match="smaller than the tile"):
        TileSpec(frame=(100, 50), tile=(64, 64))
    with pytest.raises(ValueError, match="overlap"):
        TileSpec(frame=(100, 100), tile=(64, 64), overlap=64)


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_extract_then_stitch_gives_back_the_frame(mode):
    spec = TileSpec(frame=(100, 230), tile=(64, 64), overlap=16, stitch=mode)
    frames = torch.rand(3, 100, 230)
    tiles = extract_tiles(frames[..., None], spec)[..., 0]
    assert tiles.shape == (3 * spec.n_tiles, 64, 64)
    torch.testing.assert_close(stitch(tiles, spec), frames)


def test_overlaps_are_stitched_with_the_max_or_the_mean():
    spec = TileSpec(frame=(32, 48), tile=(32, 32), overlap=16)  # two tiles: x 0..31 and 16..47
    tiles = torch.stack([torch.full((32, 32), 1.0), torch.full((32, 32), 3.0)])
    mx = stitch(tiles, spec)[0]
    assert float(mx[0, 0]) == 1.0 and float(mx[0, 20]) == 3.0 and float(mx[0, 47]) == 3.0
    mean = stitch(tiles, TileSpec(frame=(32, 48), tile=(32, 32), overlap=16, stitch="mean"))[0]
    assert float(mean[0, 0]) == 1.0 and float(mean[0, 20]) == 2.0 and float(mean[0, 47]) == 3.0


class _Brightness(torch.nn.Module):
    """A stand-in model: raw map = how far each pixel is from mid-grey; it also records the tiles it saw."""

    def __init__(self, tile: tuple[int, int]):
        super().__init__()
        self.input_size = tile
        self.scorer = ImageScorer(blur_sigma=0.0)
        self.seen: list[torch.Tensor] = []

    def raw_pair(self, tiles: torch.Tensor) -> tuple[torch.Tensor, None]:
        assert tuple(tiles.shape[1:3]) == self.input_size  # the model only ever sees tiles at its input size
        self.seen.append(tiles)
        return (tiles.float() - 128).abs().amax(-1) / 127, None


def test_a_small_defect_at_native_resolution_is_found_in_a_tile_at_the_right_frame_coordinates():
    spec = TileSpec(frame=(300, 1200), tile=(128, 128), overlap=16)
    frame = np.full((300, 1200, 3), 128, np.uint8)
    frame[201:204, 905:908] = 255  # a 3×3 px defect: squashed to 256×256 it would be under one pixel wide
    net = _Brightness(spec.tile)
    maps, scores = TiledNet(net, spec)(torch.from_numpy(frame)[None])
    assert maps.shape == (1, 300, 1200) and float(scores[0]) == pytest.approx(1.0)
    tiles = net.seen[0]
    hit = [i for i in range(len(tiles)) if int(tiles[i].amax()) == 255]
    assert hit  # seen at full resolution by at least one tile
    for i in hit:  # and each of those tiles places it where it is in the frame
        y, x = spec.origins()[i]
        ys, xs = np.nonzero(tiles[i].numpy().max(-1) == 255)
        assert (ys.min() + y, xs.min() + x) == (201, 905)
    # the ROI is offset in the camera frame: the box comes back in camera-frame coordinates
    d = find_defects(maps[0].numpy(), 0.5, (40, 10, 1200, 300), want_mask=True, failed=True)
    assert [(b.x, b.y, b.w, b.h) for b in d.boxes] == [(905 + 40, 201 + 10, 3, 3)]
    assert d.mask is not None and d.mask[201:204, 905:908].all() and int(d.mask.sum()) == 9 * 255


# ------------------------------------------------------------------ real model: calibrate → evaluate / infer / worker
def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (0, 0), 2)
    return cv2.cvtColor(cv2.normalize(base, None, 60, 200, cv2.NORM_MINMAX), cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def long_parts(tmp_path_factory):
    """An MVTec-layout tree of 96×256 (h×w) textured parts: train/good, test/good, test/crack + masks."""
    root = tmp_path_factory.mktemp("long") / "part"
    rng = np.random.default_rng(0)
    for sub, n in (("train/good", 10), ("test/good", 3), ("test/crack", 3)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            img = _texture(rng, 96, 256)
            if sub == "test/crack":
                mask = np.zeros((96, 256), np.uint8)
                cv2.line(mask, (40 + 50 * i, 20), (90 + 50 * i, 70), 255, 2)
                img[mask > 0] = 0
                (root / "ground_truth/crack").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / f"ground_truth/crack/{i:03d}_mask.png"), mask)
            cv2.imwrite(str(root / sub / f"{i:03d}.png"), img)
    return root


def _calibrate(root, out, **kw):
    from linewatch.station.calibration import CalibrateOptions, calibrate_station
    from linewatch.station.training import TrainConfig

    opts = CalibrateOptions(val_fraction=0.2, cal_fraction=0.4, device="cpu", train=TrainConfig(max_epochs=0),
                            progress=False, **kw)
    calibrate_station(root / "train" / "good", out, opts)
    return out


@pytest.mark.parametrize("kind", ["tiled", "aspect"])
def test_non_square_and_tiled_bundles_work_through_evaluate_infer_and_the_worker(long_parts, tmp_path, kind):
    from linewatch.model import load_detector
    from linewatch.service.frames import Frame, FrameQueue
    from linewatch.service.telemetry.prometheus import Metrics
    from linewatch.service.worker import InferenceWorker
    from linewatch.station.evaluation import evaluate_mvtec
    from linewatch.station.infer import infer_files

    if kind == "tiled":
        path = _calibrate(long_parts, tmp_path / "m.lwm", tile=(64, 64), tile_overlap=16)
        want_input, want_frame = (64, 64), (96, 256)
    else:  # auto at a small budget: the 8:3 aspect kept, multiples of 16
        path = _calibrate(long_parts, tmp_path / "m.lwm", input_size=(48, 128))
        want_input, want_frame = (48, 128), (48, 128)
    det = load_detector(path, "cpu")
    assert det.model.input_size == want_input and det.input_size == want_frame
    assert (det.meta.tiling is not None) == (kind == "tiled")

    r = evaluate_mvtec(det, long_parts)
    assert (r.n_good, r.n_defect) == (3, 3) and 0 <= r.image_auroc <= 1 and 0 <= r.pixel_auroc <= 1

    results, skipped = infer_files(det, [long_parts / "test" / "crack"], tmp_path / "infer")
    assert len(results) == 3 and not skipped
    assert cv2.imread(results[0].mask, cv2.IMREAD_UNCHANGED).shape == (96, 256)  # at the image's own size

    metrics, got = Metrics(), []
    q = FrameQueue(8, metrics)
    w = InferenceWorker(det, q, lambda v, m, **_: got.append((v, m)), metrics, max_batch=2, masks="all")
    img = cv2.resize(cv2.imread(str(long_parts / "test/crack/000.png"))[:, :, ::-1], want_frame[::-1])
    for s in range(3):
        q.put(Frame("cam", s, time.time(), time.monotonic(), np.ascontiguousarray(img), (256, 96), (0, 0, 256, 96)))
    w.start()
    w.stop(time.monotonic() + 60)
    w.join(60)
    assert [v.sequence for v, _ in got] == [0, 1, 2]
    assert all(m.shape == (96, 256) for _, m in got)
    assert len({round(v.score, 5) for v, _ in got}) == 1  # one frame alone or with others in a batch: same score


def test_auto_input_size_keeps_the_aspect_under_the_budget_and_square_stays_256():
    from linewatch.station.calibration import auto_input_size

    assert auto_input_size((900, 900)) == (256, 256)
    assert auto_input_size((1000, 1030)) == (256, 256)  # near-square counts as square
    assert auto_input_size((300, 1200)) == (128, 512)
    h, w = auto_input_size((256, 640))  # 2.5 : 1
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 2.5) < 0.1 and h * w <= 1.05 * 65536
    assert auto_input_size((1200, 300)) == (512, 128)  # tall parts too
    assert min(auto_input_size((10, 5000))) >= 32  # extreme aspect: never below 32 px


def test_calibrate_defaults_to_auto_and_keeps_a_long_parts_aspect(long_parts, tmp_path, monkeypatch):
    import linewatch.station.calibration as calibration

    monkeypatch.setattr(calibration, "PIXEL_BUDGET", 48 * 128)  # small for a fast test; same rule as 256²
    from linewatch.model import load_bundle

    meta = load_bundle(_calibrate(long_parts, tmp_path / "auto.lwm")).meta
    assert tuple(meta.input_size) == (48, 128) and meta.tiling is None


@pytest.mark.parametrize(("tiling", "problem"), [
    ({"frame": [300, 1200], "tile": [128, 128], "overlap": 16}, None),
    ({"frame": [300, 1200], "tile": [64, 64], "overlap": 16}, "tile is not the input size"),
    ({"frame": [100, 100], "tile": [128, 128]}, "smaller than the tile"),
    ({"frame": [8000, 8000], "tile": [128, 128], "overlap": 127}, "more than"),
    ({"frame": [300, 1200], "tile": [128, 128], "stitch": "median"}, "stitch"),
    ({"tile": [128, 128]}, "tiling"),
    ("yes", "not an object"),
])
def test_a_bundle_header_with_a_bad_tiling_is_refused(tiling, problem):
    from linewatch.model.bundle import BundleMeta, _meta_problem

    meta = BundleMeta(backbone="mobilenet_v2", teacher_sha256="0" * 64, input_size=(128, 128), mean=(0, 0, 0),
                      std=(1, 1, 1), n_students=1, blur_sigma=2.0, tiling=tiling)
    got = _meta_problem(meta)
    assert (got is None) if problem is None else (problem in got)


def test_input_size_and_tile_are_written_width_first():
    import argparse

    from linewatch.cli.args import parse_input_size
    from linewatch.cli.args import parse_size as parse_wxh

    assert parse_input_size("auto") == "auto"
    assert parse_input_size("512x128") == (128, 512)  # (h, w): a wide part
    assert parse_input_size("256") == (256, 256)
    assert parse_wxh("256x128") == (128, 256)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_input_size("500x128")  # not a multiple of 16


def test_a_score_from_other_levels_is_stitched_like_the_map_and_normalised_with_its_own_statistics(tmp_path):
    """A map from levels 2·3 and a score from 2·3·4, through tiles: both raw maps are stitched,
    and calibrate's per-position statistics cover both at frame size."""
    from linewatch.model import load_bundle, load_detector
    from linewatch.model.scoring import ScoreSpec
    from linewatch.model.stfpm import STFPM
    from linewatch.station.calibration import CalibrateOptions, calibrate_station
    from linewatch.station.training import TrainConfig
    from linewatch.tools.harness import write_images

    torch.manual_seed(0)
    model = STFPM("mobilenet_v2", input_size=(64, 64), blur_sigma=0, score=ScoreSpec(reduce="max"), stages=(2, 3),
                  score_stages=(2, 3, 4)).eval()
    spec = TileSpec(frame=(64, 160), tile=(64, 64), overlap=16)
    x = torch.randint(0, 256, (2, 64, 160, 3), dtype=torch.uint8)
    with torch.inference_mode():
        maps, scores = TiledNet(model, spec)(x)
        raw, score_raw = model.raw_pair(extract_tiles(x, spec))
    assert maps.shape == (2, 64, 160) and score_raw is not None
    torch.testing.assert_close(maps, stitch(raw, spec))
    torch.testing.assert_close(scores, stitch(score_raw, spec).flatten(1).amax(1))

    write_images(tmp_path / "good", 10, size=(64, 160))
    opts = CalibrateOptions(tile=(64, 64), tile_overlap=16, val_fraction=0.3, cal_fraction=0.4, device="cpu",
                            train=TrainConfig(max_epochs=1, batch_size=8), progress=False, report=False,
                            stages=(2, 3), score_stages=(2, 3, 4),
                            score=ScoreSpec(reduce="topk", normalise="position"))
    calibrate_station(tmp_path / "good", tmp_path / "m.lwm", opts)
    b = load_bundle(tmp_path / "m.lwm")
    assert b.meta.split_score and b.meta.tiling is not None
    assert {k: tuple(v.shape) for k, v in b.scorer_state.items()} == {
        k: (64, 160) for k in ("pos_mean", "pos_std", "score_pos_mean", "score_pos_std")}
    det = load_detector(tmp_path / "m.lwm", "cpu")
    p = det.predict(x)
    assert p.maps.shape == (2, 64, 160) and bool(torch.isfinite(p.scores).all())
