"""The graph engine's logic on the CPU (CI has no GPU): buckets, padding, slicing, the check against eager and
the fallbacks. The CUDA capture itself (:class:`CudaGraphBucket`) runs only on a GPU: scripts/gpu-bench.sh."""

from __future__ import annotations

import pytest
import structlog
import torch

from linewatch.model import BundleMeta, Calibration, Detector
from linewatch.model.engines import (
    GRAPH_TOLERANCE,
    BatchTooLarge,
    BucketedRunner,
    build_graph_engine,
    build_inference_net,
    check_close,
    fold_batchnorm,
    graph_buckets,
    pad_batch,
    pick_bucket,
)
from linewatch.model.stfpm import STFPM

CPU = torch.device("cpu")


def _model(size: int = 32) -> STFPM:
    torch.manual_seed(0)
    return STFPM("mobilenet_v2", input_size=(size, size)).eval()


def _batch(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _eager_bucket(net, batch, h, w, device, pool):
    """A stand-in for CudaGraphBucket: refuses any other batch size, as a captured graph would."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert x.shape == (batch, h, w, 3), f"bucket {batch} got {tuple(x.shape)}"
        with torch.inference_mode():
            return tuple(net(x))

    run.batch = batch  # type: ignore[attr-defined]
    return run


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert graph_buckets(1) == (1,)
    assert graph_buckets(8) == (1, 2, 4, 8)
    assert graph_buckets(12) == (1, 2, 4, 8, 12)  # the max itself, not 16: never pad past the configured limit
    assert graph_buckets(256)[-2:] == (128, 256)
    with pytest.raises(ValueError):
        graph_buckets(0)


def test_pick_bucket_and_refusal_above_the_largest():
    buckets = graph_buckets(12)
    assert [pick_bucket(n, buckets) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    with pytest.raises(BatchTooLarge, match="exceeds the largest captured bucket"):
        pick_bucket(13, buckets)
    with pytest.raises(ValueError):
        pick_bucket(0, buckets)


def test_pad_batch_appends_zero_frames_and_keeps_the_real_ones():
    x = _batch(3)
    p = pad_batch(x, 4)
    assert p.shape == (4, 32, 32, 3) and torch.equal(p[:3], x) and int(p[3].abs().sum()) == 0
    assert pad_batch(x, 3) is x
    with pytest.raises(BatchTooLarge):
        pad_batch(x, 2)


def test_bucketed_runner_pads_slices_and_equals_unpadded_eager():
    net = fold_batchnorm(_model())
    calls: list[int] = []

    def factory(net_, b, h, w, device, pool):
        inner = _eager_bucket(net_, b, h, w, device, pool)

        def run(x):
            calls.append(x.shape[0])
            return inner(x)

        return run

    runner = BucketedRunner({b: factory(net, b, 32, 32, CPU, None) for b in graph_buckets(8)})
    assert runner.buckets == (1, 2, 4, 8) and runner.max_batch == 8
    for n in (1, 3, 5, 8):
        x = _batch(n, seed=n)
        maps, scores = runner(x)
        assert maps.shape == (n, 32, 32) and scores.shape == (n,)
        with torch.inference_mode():
            ref_maps, ref_scores = net(x)
        # padding frames never change the real ones (BatchNorm folded: frames are independent)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps, ref_maps, rtol=1e-5, atol=1e-6)
    assert calls == [1, 4, 8, 8]  # the bucket each batch ran in
    with pytest.raises(BatchTooLarge):
        runner(_batch(9))


def test_check_close_passes_equal_and_refuses_different_outputs():
    net = fold_batchnorm(_model())

    def ref(x):
        with torch.inference_mode():
            return tuple(net(x))

    def off(x):  # a wrong graph: e.g. stale rows from another batch
        m, s = ref(x)
        return m * 1.5, s * 1.5

    def nan(x):
        m, s = ref(x)
        return m, s * float("nan")

    inputs = [_batch(2), _batch(3, seed=1)]
    assert check_close(ref, ref, inputs) == 0.0
    with pytest.raises(RuntimeError, match="differ from eager"):
        check_close(ref, off, inputs)
    with pytest.raises(RuntimeError, match="not finite"):
        check_close(ref, nan, inputs)
    assert GRAPH_TOLERANCE < 0.5  # the wrong graph above (50 % off) is always caught


def test_graph_engine_with_eager_buckets_builds_and_matches_eager():
    net = fold_batchnorm(_model())
    with structlog.testing.capture_logs() as logs:
        runner = build_graph_engine(net, 32, 32, CPU, 4, make_bucket=_eager_bucket)
    assert runner is not None and runner.buckets == (1, 2, 4)
    assert [e["event"] for e in logs] == ["graph_engine_ready"] and logs[0]["buckets"] == [1, 2, 4]


def test_graph_engine_falls_back_when_cuda_is_missing():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    net = fold_batchnorm(_model())
    with structlog.testing.capture_logs() as logs:
        assert build_graph_engine(net, 32, 32, CPU, 4) is None
    ev = [e for e in logs if e["event"] == "engine_fallback"]
    assert len(ev) == 1 and ev[0]["engine"] == "graph" and "CUDA" in ev[0]["error"]
    built = build_inference_net(_model(), "graph", CPU, max_batch=4)
    assert built.engine == "eager" and built.fast is None


def test_graph_engine_falls_back_when_the_check_fails():
    net = fold_batchnorm(_model())

    def failing_check(reference, candidate, inputs, tolerance):
        raise RuntimeError("maps differ from eager by 0.3 (relative), injected")

    with structlog.testing.capture_logs() as logs:
        assert build_graph_engine(net, 32, 32, CPU, 4, make_bucket=_eager_bucket, check=failing_check) is None
    assert [(e["event"], e["engine"]) for e in logs] == [("engine_fallback", "graph")]
    assert "injected" in logs[0]["error"]


def _detector(engine: str) -> Detector:
    cal = Calibration(image_threshold=1.0, pixel_threshold=0.5, alpha=0.01, false_reject_bound=0.01, scores=[0.1])
    meta = BundleMeta("mobilenet_v2", "x", (32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1, 1.0,
                      calibration=cal)
    return Detector(_model(), meta, "m0", CPU, engine=engine)


def test_detector_with_graph_engine_on_cpu_runs_eager_and_says_so():
    det = _detector("graph")
    assert det.engine == "graph" and det.device_preprocess is False
    with structlog.testing.capture_logs() as logs:
        det.warm_up((1, 8))
    assert det.engine == "eager" and det._fast is None
    assert [e["engine"] for e in logs if e["event"] == "engine_fallback"] == ["graph"]
    p = det.predict(_batch(3))
    assert p.scores.shape == (3,) and bool(torch.isfinite(p.scores).all())


def test_detector_graph_runner_serves_batches_up_to_its_max_and_eager_above(monkeypatch):
    """The Detector's use of a bucketed runner, with eager buckets injected in place of CUDA graphs: batches
    up to warm_up's max go through it (padded), a larger one runs eager with the same results."""
    import linewatch.model.engines as engines

    real = engines.build_graph_engine
    served: list[int] = []

    def fake_build(net, h, w, device, max_batch):
        def bucket(net_, b, h_, w_, dev, pool):
            inner = _eager_bucket(net_, b, h_, w_, dev, pool)

            def run(x):
                served.append(b)
                return inner(x)

            return run

        return real(net, h, w, device, max_batch, make_bucket=bucket)

    monkeypatch.setattr(engines, "build_graph_engine", fake_build)
    det = _detector("graph")
    det.warm_up((1, 4))
    assert det.engine == "graph" and isinstance(det._fast, BucketedRunner) and det._fast.max_batch == 4
    served.clear()
    x = _batch(6, seed=3)
    p3 = det.predict(x[:3])
    assert served == [4]  # 3 frames padded into the bucket of 4
    p6 = det.predict(x)
    assert served == [4]  # 6 > max bucket: eager
    torch.testing.assert_close(p3.scores, p6.scores[:3], rtol=1e-5, atol=1e-6)
    det.warm_up((1, 8))  # a larger max batch: captured again, up to 8
    assert isinstance(det._fast, BucketedRunner) and det._fast.buckets == (1, 2, 4, 8)
