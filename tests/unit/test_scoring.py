"""Image score alternatives: max, top-k mean, per-position normalisation; recorded in and loaded from the bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linewatch.errors import BundleError
from linewatch.model.scoring import DEFAULT_TOPK, ImageScorer, ScoreSpec, position_stats
from linewatch.station.accuracy import image_auroc


def _maps(n: int, seed: int, hot: bool = True, defect: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = 0.1 + 0.02 * torch.rand((n, 32, 48), generator=g)
    if hot:
        m[:, 2:6, 40:46] += 1.0  # a fixed hot spot (an edge, a logo) on every part, good or not
    if defect:
        m[:, 20:23, 10:13] += 0.5  # a real defect, weaker than the hot spot
    return m


def test_per_position_normalisation_stops_a_fixed_hot_spot_from_counting():
    good_ref = _maps(20, 0)
    good, bad = _maps(10, 1), _maps(10, 2, defect=True)
    labels = np.r_[np.zeros(10), np.ones(10)]
    plain = ImageScorer(blur_sigma=0.0)
    s_plain = torch.cat([plain(good)[1], plain(bad)[1]]).numpy()
    assert image_auroc(labels, s_plain) < 0.8  # the max is the hot spot's on every image: no separation
    norm = ImageScorer(blur_sigma=0.0, spec=ScoreSpec(normalise="position"))
    norm.set_position_stats(*position_stats(good_ref))
    s_norm = torch.cat([norm(good)[1], norm(bad)[1]]).numpy()
    assert image_auroc(labels, s_norm) == 1.0
    maps, _ = norm(bad)
    peak = np.unravel_index(int(maps[0].argmax()), maps[0].shape)
    assert 20 <= peak[0] < 23 and 10 <= peak[1] < 13  # the map points at the defect, not at the hot spot


def test_normalisation_without_statistics_is_an_error():
    with pytest.raises(RuntimeError, match="no statistics"):
        ImageScorer(0.0, ScoreSpec(normalise="position"))(torch.rand(1, 8, 8))


def test_position_std_has_a_floor_so_constant_pixels_do_not_explode():
    maps = torch.rand(5, 8, 8)
    maps[:, 0, 0] = 0.3  # never varies
    _, std = position_stats(maps)
    assert float(std[0, 0]) > 0 and float(std.min()) >= float(maps.std(0).median()) - 1e-6


def test_topk_is_the_mean_of_the_top_fraction_and_a_lone_hot_pixel_moves_it_less_than_the_max():
    m = torch.zeros(1, 10, 10)
    m[0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    top = ImageScorer(0.0, ScoreSpec(reduce="topk", topk=0.03))  # 3 of 100 pixels
    assert float(top(m)[1][0]) == pytest.approx(4.0)
    assert float(ImageScorer(0.0)(m)[1][0]) == 5.0
    spike = m.clone()
    spike[0, 9, 9] = 50.0
    assert float(top(spike)[1][0]) - float(top(m)[1][0]) < float(ImageScorer(0.0)(spike)[1][0]) - 5.0


def test_default_score_is_max_of_the_blurred_map():
    s = ImageScorer(2.0)
    raw = torch.rand(2, 20, 30)
    maps, scores = s(raw)
    torch.testing.assert_close(maps, s.blur(raw))
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


def test_score_spec_validates_and_round_trips():
    spec = ScoreSpec(reduce="topk", topk=0.05, normalise="position")
    assert ScoreSpec.from_dict(spec.to_dict()) == spec
    assert ScoreSpec.from_dict({}) == ScoreSpec()  # bundles written before scores were choosable
    for bad in ({"reduce": "median"}, {"normalise": "global"}, {"topk": 0}):
        with pytest.raises(ValueError):
            ScoreSpec.from_dict(bad)


def test_a_position_normalised_bundle_keeps_its_statistics_and_scores(tmp_path):
    from linewatch.model import load_bundle, load_detector, save_bundle
    from linewatch.station.calibration import CalibrateOptions, calibrate_station
    from linewatch.station.training import TrainConfig
    from linewatch.tools.harness import write_images

    write_images(tmp_path / "good", 10, size=(64, 64))
    opts = CalibrateOptions(input_size=(64, 64), val_fraction=0.3, cal_fraction=0.4, device="cpu",
                            train=TrainConfig(max_epochs=0), progress=False, stages=(2, 3), score_stages=(2, 3, 4),
                            score=ScoreSpec(reduce="topk", normalise="position"))
    report = calibrate_station(tmp_path / "good", tmp_path / "m.lwm", opts)
    b = load_bundle(tmp_path / "m.lwm")
    assert b.meta.score == {"reduce": "topk", "topk": 0.01, "normalise": "position"}
    # a score with levels of its own (2,3,4 against the map's 2,3): statistics for both maps
    assert b.meta.score_stages != b.meta.stages
    assert set(b.scorer_state) == {"pos_mean", "pos_std", "score_pos_mean", "score_pos_std"}
    assert all(v.shape == (64, 64) for v in b.scorer_state.values())
    assert not torch.equal(b.scorer_state["pos_mean"], b.scorer_state["score_pos_mean"])
    assert not any(k.startswith("scorer.") for k in b.students_state)
    det = load_detector(tmp_path / "m.lwm", "cpu")
    from linewatch.imaging.images import list_images, load_images

    imgs = load_images(list_images(tmp_path / "good"), (64, 64)).images
    scores = sorted(det.predict_many(imgs).scores.tolist())
    cal = sorted(report.calibration.scores)
    # the calibration scores are scores this loaded detector gives (a subset of the images)
    assert all(min(abs(c - s) for s in scores) < 1e-4 for c in cal)
    # a bundle that says "position" but lost its statistics is refused, in one line
    save_bundle(tmp_path / "broken.lwm", b.students_state, b.meta)
    with pytest.raises(BundleError, match="per-position"):
        load_detector(tmp_path / "broken.lwm", "cpu")
    # ... or kept the defect map's statistics but not the score map's
    half = {k: v for k, v in b.scorer_state.items() if not k.startswith("score_")}
    save_bundle(tmp_path / "half.lwm", b.students_state, b.meta, scorer_state=half)
    with pytest.raises(BundleError, match="per-position"):
        load_detector(tmp_path / "half.lwm", "cpu")


def test_a_split_scorer_normalises_each_map_with_its_own_statistics():
    raw, score_raw = torch.rand(2, 8, 8), torch.rand(2, 8, 8) + 5
    sc = ImageScorer(0.0, ScoreSpec(reduce="max", normalise="position"), split=True)
    with pytest.raises(ValueError, match="score map"):
        sc.set_position_stats(torch.zeros(8, 8), torch.ones(8, 8))  # the score map's are missing
    sc.set_position_stats(torch.zeros(8, 8), torch.ones(8, 8), torch.full((8, 8), 5.0), torch.full((8, 8), 2.0))
    maps, scores = sc(raw, score_raw)
    torch.testing.assert_close(maps, raw)
    torch.testing.assert_close(scores, ((score_raw - 5) / 2).flatten(1).amax(1))
    with pytest.raises(ValueError, match="a defect map and a score map"):
        sc(raw)
    with pytest.raises(ValueError, match="one map"):
        ImageScorer(0.0)(raw, score_raw)


def test_calibrate_defaults_to_the_top_2_percent_mean_and_old_bundles_keep_their_score():
    from linewatch.station.calibration import CalibrateOptions

    assert DEFAULT_TOPK == 0.02
    assert CalibrateOptions().score == ScoreSpec(reduce="topk", topk=DEFAULT_TOPK, normalise="none")
    assert ScoreSpec.from_dict({}).reduce == "max"  # a bundle without a score field is scored as it always was
    # a bundle calibrated with the earlier default names its fraction, and keeps it
    assert ScoreSpec.from_dict({"reduce": "topk", "topk": 0.01}).topk == 0.01


def test_the_command_line_score_fraction_defaults_to_calibrates():
    from linewatch.cli import build_parser
    from linewatch.cli.station import _calibrate_options

    parser = build_parser()
    base = ["calibrate", "--normal-dir", "good", "--out", "m.lwm"]
    assert _calibrate_options(parser.parse_args(base)).score.topk == DEFAULT_TOPK
    assert _calibrate_options(parser.parse_args([*base, "--score-topk", "0.05"])).score.topk == 0.05
    help_text = " ".join(parser._subparsers._group_actions[0].choices["calibrate"].format_help().split())
    assert f"--score topk (default {DEFAULT_TOPK:g})" in help_text  # the help says what the code does
    assert _calibrate_options(parser.parse_args([*base, "--score-topk", "1"])).score.topk == 1.0  # the map's mean


@pytest.mark.parametrize("bad", ["0", "-0.1", "1.5", "nan", "two"])
def test_a_score_fraction_outside_0_1_is_a_one_line_usage_error(bad, capsys):
    from linewatch.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["calibrate", "--normal-dir", "good", "--out", "m.lwm", "--score-topk", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"argument --score-topk: {bad} is not a fraction in (0, 1]; "
                        "e.g. 0.02 averages the map's top 2 %")


def test_calibrate_says_when_the_pixel_threshold_is_cut_at_the_image_threshold():
    from linewatch.cli.station import _pixel_threshold_line
    from linewatch.model.bundle import Calibration

    def cal(pixel: float) -> Calibration:
        return Calibration(image_threshold=0.12, pixel_threshold=pixel, alpha=0.005, false_reject_bound=0.012,
                           scores=[0.1, 0.12], pixel_alpha=0.001)

    assert _pixel_threshold_line(cal(0.1)) == "pixel threshold: 0.1 (0.999 quantile of good-part pixels)"
    assert _pixel_threshold_line(cal(0.12)) == \
        "pixel threshold: 0.12 (the image threshold: the 0.999 quantile of good-part pixels is above it)"


def test_calibrate_names_the_image_score_it_wrote():
    from linewatch.cli.station import _describe_score

    assert _describe_score(ScoreSpec(reduce="topk", topk=DEFAULT_TOPK)) == "mean of the map's top 2 %"
    assert _describe_score(ScoreSpec(reduce="topk", topk=0.005)) == "mean of the map's top 0.5 %"
    assert _describe_score(ScoreSpec(reduce="max", normalise="position")) == \
        "the map's max after per-position normalisation"


@pytest.mark.parametrize("split", [False, True], ids=["score-from-the-map", "score-from-levels-2-3-4"])
def test_default_score_traces_with_the_jit_engine(untrained_bundle, bottle, tmp_path, split):
    """The top-k score must survive TorchScript tracing: a shape under trace is a tensor, and a scorer that
    cannot handle that silently costs the CPU its fastest engine (the daemon falls back to eager). The same for
    a score from its own levels (the scorer takes two maps)."""
    import torch

    from linewatch.model import load_detector
    from linewatch.tools.fixtures import make_untrained_bundle

    if split:
        untrained_bundle = make_untrained_bundle(tmp_path / "split.lwm", bottle, stages=(2, 3),
                                                 score_stages=(2, 3, 4))
    det = load_detector(untrained_bundle, "cpu", engine="jit")
    det.warm_up((1, 2))
    assert det.engine == "jit"
    eager = load_detector(untrained_bundle, "cpu", engine="eager")
    x = torch.randint(0, 255, (2, *det.input_size, 3), dtype=torch.uint8)
    torch.testing.assert_close(det.predict(x).scores, eager.predict(x).scores, rtol=1e-4, atol=1e-5)
