import copy

import numpy as np
import pytest
import torch

from linewatch.model.backbones import BACKBONES, build_extractor
from linewatch.model.scoring import ScoreSpec
from linewatch.model.stfpm import STFPM, level_distances, stage_distances, stfpm_loss
from linewatch.model.weights import load_teacher


def _feats(seed: int, shapes=((2, 8, 16, 16), (2, 12, 8, 8), (2, 16, 4, 4))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_loss_is_zero_for_identical_features_and_scale_invariant():
    t = _feats(0)
    assert stfpm_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    # channel-L2 normalisation: scaling the student's features changes nothing
    assert stfpm_loss(t, [3.0 * x for x in t]).item() == pytest.approx(0.0, abs=1e-6)
    s = _feats(1)
    loss = stfpm_loss(t, s)
    # per stage the distance of two unit vectors is in [0, 2]: 0.5·||·||² ∈ [0, 2], summed over 3 stages
    assert 0 < loss.item() <= 6.0


def test_loss_matches_the_paper_formula():
    t, s = _feats(2), _feats(3)
    expected = 0.0
    for a, b in zip(t, s, strict=True):
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        h, w = a.shape[-2:]
        expected += (0.5 / (h * w) * ((a - b) ** 2).sum(dim=(1, 2, 3))).mean().item()
    assert stfpm_loss(t, s).item() == pytest.approx(expected, rel=1e-5)


def test_anomaly_map_is_higher_where_the_student_disagrees():
    t = _feats(4)
    s = [x.clone() for x in t]
    # perturb the student in the top-left quarter of every stage
    for x in s:
        h, w = x.shape[-2:]
        x[:, :, : h // 2, : w // 2] += 5 * torch.randn_like(x[:, :, : h // 2, : w // 2])
    amap = stage_distances(t, s, (64, 64))
    assert amap.shape == (2, 64, 64)
    inside = amap[:, 4:28, 4:28].mean()
    outside = amap[:, 36:, 36:].mean()
    assert inside > 100 * max(outside.item(), 1e-12)


def test_pretrained_model_scores_a_perturbed_region_higher(bottle):
    """Real teacher, student trained briefly on one image: pasting noise into a region raises the map there."""
    from linewatch.imaging.images import list_images, load_images

    teacher, _ = load_teacher("mobilenet_v2")
    # seeded students; one set of levels for map and score (the stride-32 level is 2×2 at 64², a toy's scale)
    torch.manual_seed(0)
    model = STFPM("mobilenet_v2", teacher=teacher, input_size=(64, 64), blur_sigma=1.0, stages=(2, 3))
    imgs = load_images(list_images(bottle / "train" / "good")[:4], (64, 64)).images
    opt = torch.optim.SGD(model.students.parameters(), lr=0.4, momentum=0.9)
    x = torch.from_numpy(imgs)
    torch.manual_seed(0)
    for _ in range(30):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    img = imgs[:1].copy()
    rng = np.random.default_rng(0)
    img[0, 8:24, 8:24] = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    with torch.inference_mode():
        maps, scores = model(torch.from_numpy(img))
        _, clean_scores = model(torch.from_numpy(imgs[:1]))
    m = maps[0]
    assert m[8:24, 8:24].mean() > 2 * m[40:, 40:].mean()
    assert scores[0] > clean_scores[0]


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = STFPM("mobilenet_v2", input_size=(64, 64))
    model.train()
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.students.parameters())


def test_preprocess_accepts_nhwc_nchw_uint8_and_float():
    model = STFPM("mobilenet_v2", input_size=(64, 64))
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    a = model.preprocess(x)
    b = model.preprocess(x.permute(0, 3, 1, 2))
    c = model.preprocess(x.permute(0, 3, 1, 2).float() / 255)
    assert a.shape == (2, 3, 64, 64)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # other sizes are resized to the input size
    assert model.preprocess(torch.randint(0, 256, (1, 100, 80, 3), dtype=torch.uint8)).shape == (1, 3, 64, 64)


def test_forward_shapes_and_score_is_max_of_map():
    model = STFPM("mobilenet_v2", input_size=(64, 64), stages=(2, 3)).eval()  # score from the map's levels
    with torch.inference_mode():
        maps, scores = model(torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8))
    assert maps.shape == (3, 64, 64) and scores.shape == (3,)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


def test_ensemble_map_is_mean_plus_variance():
    model = STFPM("mobilenet_v2", n_students=3, input_size=(64, 64), blur_sigma=0, score=ScoreSpec(reduce="max"),
                  stages=(2, 3), score_stages=(2, 3, 4)).eval()
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        maps, scores = model(x)
        t, ss = model.features(model.preprocess(x))  # levels 2, 3, 4: the map multiplies 2·3, the score 2·3·4
        per = torch.stack([stage_distances(t[:2], s[:2], (64, 64)) for s in ss])
        per_score = torch.stack([stage_distances(t, s, (64, 64)) for s in ss])
    torch.testing.assert_close(maps, per.mean(0) + per.var(0, unbiased=False))
    torch.testing.assert_close(scores, (per_score.mean(0) + per_score.var(0, unbiased=False)).flatten(1).amax(1))


def test_the_image_score_can_come_from_other_levels_than_the_defect_map():
    model = STFPM("mobilenet_v2", input_size=(64, 64), blur_sigma=0, score=ScoreSpec(reduce="max"), stages=(2, 3),
                  score_stages=(2, 3, 4)).eval()
    assert model.levels == (2, 3, 4) and len(model.students[0].stages) == 4 and model.split_score
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        maps, scores = model(x)
        t, ss = model.features(model.preprocess(x))
        d2, d3, d4 = level_distances(t, ss[0], (64, 64))
        loss = model.loss(x)
    torch.testing.assert_close(maps, d2 * d3)
    torch.testing.assert_close(scores, (d2 * d3 * d4).flatten(1).amax(1))
    assert not torch.allclose(scores, maps.flatten(1).amax(1))
    # the students learn every level either map reads
    torch.testing.assert_close(loss, stfpm_loss(t, ss[0]))
    # with neither given, the backbone's defaults; the map's levels alone give the score the same ones
    spec = BACKBONES["mobilenet_v2"]
    default = STFPM("mobilenet_v2", input_size=(64, 64))
    assert (default.stages, default.score_stages) == (spec.default_stages, spec.default_score_stages)
    assert STFPM("mobilenet_v2", input_size=(64, 64), stages=(1, 2, 3)).score_stages == (1, 2, 3)
    both = STFPM("mobilenet_v2", input_size=(64, 64), stages=(3, 4), score_stages=(2, 3))
    assert both.levels == (2, 3, 4) and both.split_score
    with pytest.raises(ValueError, match=r"choose from 1\.\.4"):
        STFPM("mobilenet_v2", input_size=(64, 64), score_stages=(4, 2))


def test_blur_keeps_constant_maps_constant():
    model = STFPM("mobilenet_v2", input_size=(64, 64), blur_sigma=4.0)
    m = torch.full((2, 64, 64), 0.25)
    torch.testing.assert_close(model.blur(m), m)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_levels_have_strides_4_8_16_32(name):
    ext = build_extractor(name).eval()
    with torch.inference_mode():
        feats = ext(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert tuple(f.shape[1] for f in feats) == BACKBONES[name].channels
    assert len(build_extractor(name, levels=2).stages) == 2


def test_stages_choose_the_levels_matched_and_how_deep_the_students_go():
    model = STFPM("mobilenet_v2", input_size=(64, 64), stages=(2, 3, 4))
    t, ss = model.features(model.preprocess(torch.rand(1, 3, 64, 64)))
    assert [f.shape[-1] for f in t] == [8, 4, 2] and [f.shape[-1] for f in ss[0]] == [8, 4, 2]
    assert [f.shape[1] for f in t] == [32, 96, 160]
    # levels 1-3 (what every bundle before the stages field used): no stride-32 layers are built
    old = STFPM("mobilenet_v2", input_size=(64, 64), stages=(1, 2, 3))
    assert len(old.students[0].stages) == 3 and len(old.teacher.stages) == 3
    assert not any(k.startswith("stages.3.") for k in old.students[0].state_dict())
    # a shared 4-level teacher (load_teacher builds them so) is cut to the levels used, its modules shared
    full = build_extractor("mobilenet_v2")
    trimmed = STFPM("mobilenet_v2", teacher=full, input_size=(64, 64), stages=(2, 3))
    assert len(trimmed.teacher.stages) == 3 and trimmed.teacher.stages[0] is full.stages[0]
    assert STFPM("mobilenet_v2", input_size=(64, 64)).stages == BACKBONES["mobilenet_v2"].default_stages


@pytest.mark.parametrize("stages", [(), (0, 1), (3, 2), (2, 2), (5,), (1.5,)])
def test_stages_outside_the_pyramid_are_refused_with_the_choices(stages):
    with pytest.raises(ValueError, match=r"choose from 1\.\.4"):
        STFPM("mobilenet_v2", input_size=(64, 64), stages=stages)


def test_students_are_randomly_initialised_not_copies_of_the_teacher():
    teacher, _ = load_teacher("mobilenet_v2")
    model = STFPM("mobilenet_v2", teacher=copy.deepcopy(teacher))
    t = dict(model.teacher.named_parameters())
    s = dict(model.students[0].named_parameters())
    assert not torch.equal(t["stages.0.0.0.weight"], s["stages.0.0.0.weight"])


# --------------------------------------------------------------------------- detector and engines


def _detector(engine: str = "eager"):
    from linewatch.model import BundleMeta, Calibration, Detector

    cal = Calibration(image_threshold=0.5, pixel_threshold=0.4, alpha=0.1, false_reject_bound=0.1,
                      scores=[0.1, 0.2], stats={"median": 0.15})
    meta = BundleMeta("mobilenet_v2", "x", (32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1, 1.0,
                      calibration=cal)
    model = STFPM("mobilenet_v2", input_size=(32, 32))
    return Detector(model, meta, "m0", torch.device("cpu"), engine=engine)


def test_the_loaded_detector_is_what_the_service_expects():
    from linewatch.service.detector import Detector as ServiceDetector

    det = _detector()
    assert isinstance(det, ServiceDetector)
    assert det.engine == "eager" and det.meta.backbone == "mobilenet_v2" and det.input_size == (32, 32)


def test_something_without_warm_up_or_engine_is_not_a_service_detector():
    from linewatch.service.detector import Detector as ServiceDetector

    det = _detector()

    class NoWarmUp:
        model_id, meta, input_size, device, engine = det.model_id, det.meta, det.input_size, det.device, "eager"
        calibration = det.calibration
        predict = det.predict

    assert not isinstance(NoWarmUp(), ServiceDetector)
    NoWarmUp.warm_up = det.warm_up
    assert isinstance(NoWarmUp(), ServiceDetector)
    del NoWarmUp.engine
    assert not isinstance(NoWarmUp(), ServiceDetector)


def test_warm_up_builds_the_inference_copy_before_the_first_frame():
    det = _detector("eager")
    assert det._net is None
    det.warm_up((1, 2))
    assert det._net is not None and det._net is not det.model  # eager: a BatchNorm-folded copy
    ref = _detector("reference")
    ref.warm_up()
    assert ref._net is ref.model  # reference: the model exactly as trained


def test_resolve_engine():
    from linewatch.errors import LinewatchError
    from linewatch.model.engines import resolve_engine

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_engine("auto", cpu, "mobilenet_v2") == "jit"  # measured fastest there (AUTO_CPU)
    assert resolve_engine("auto", cpu, "resnet18") == "eager"
    assert resolve_engine("auto", cuda, "mobilenet_v2") == "graph"  # eager if the capture check fails (build)
    assert resolve_engine("jit", cuda) == "eager"  # TorchScript's oneDNN passes are CPU-only
    assert resolve_engine("compile", cuda) == "compile"
    assert resolve_engine("reference", cpu) == "reference"
    with pytest.raises(LinewatchError, match="engine 'fast' is not one of"):
        resolve_engine("fast", cpu)


def test_a_jit_engine_that_fails_to_build_runs_eager(monkeypatch):
    import structlog

    def broken_trace(*_a, **_k):
        raise RuntimeError("simulated tracer failure")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    det = _detector("jit")
    assert det.engine == "jit"
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with structlog.testing.capture_logs() as logs:
        p = det.predict(x)
    assert det.engine == "eager" and det._fast is None
    assert [(e["event"], e["engine"]) for e in logs if e["event"] == "engine_fallback"] == [("engine_fallback", "jit")]
    with torch.inference_mode():
        _, ref_scores = det.model(x)
    torch.testing.assert_close(p.scores, ref_scores, rtol=1e-4, atol=1e-7)
