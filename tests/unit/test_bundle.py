import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from linewatch.errors import BundleError
from linewatch.model import load_bundle, load_detector, save_bundle
from linewatch.model.bundle import FORMAT_VERSION, READABLE_VERSIONS, SPLIT_SCORE_VERSION


def test_round_trip_keeps_weights_meta_and_predictions(untrained_bundle, tmp_path):
    b = load_bundle(untrained_bundle)
    copy = tmp_path / "copy.lwm"
    save_bundle(copy, b.students_state, b.meta)
    b2 = load_bundle(copy)
    assert b2.meta == b.meta
    assert b2.students_state.keys() == b.students_state.keys()
    for k in b.students_state:
        assert torch.equal(b.students_state[k], b2.students_state[k])
    d1 = load_detector(untrained_bundle, "cpu")
    d2 = load_detector(copy, "cpu")
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch.testing.assert_close(d1.predict(x).maps, d2.predict(x).maps)
    assert d1.calibration.image_threshold == b.meta.calibration.image_threshold
    assert b.meta.backbone == "mobilenet_v2" and b.meta.input_size == (64, 64)
    assert len(b.meta.teacher_sha256) == 64 and b.meta.linewatch_version
    assert len(b.model_id) == 12


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(BundleError, match=r"not found.*linewatch calibrate"):
        load_bundle(tmp_path / "nope.lwm")


@pytest.mark.parametrize("cut", [0, 7, 100, -50])
def test_truncated_bundle_is_rejected(untrained_bundle, tmp_path, cut):
    raw = Path(untrained_bundle).read_bytes()
    bad = tmp_path / "bad.lwm"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    with pytest.raises(BundleError, match="corrupt|not a linewatch bundle|unreadable"):
        load_detector(bad, "cpu")


def test_random_bytes_are_rejected(tmp_path):
    bad = tmp_path / "bad.lwm"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(BundleError):
        load_bundle(bad)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "PWNED",))


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = Path(__file__).parent / "PWNED"
    marker.unlink(missing_ok=True)
    for name, writer in [("p.lwm", lambda p: p.write_bytes(pickle.dumps(_Evil()))),
                         ("t.lwm", lambda p: torch.save({"x": _Evil()}, p))]:
        path = tmp_path / name
        writer(path)
        with pytest.raises(BundleError):
            load_bundle(path)
    assert not marker.exists()


def test_other_format_version_is_refused_with_a_clear_message(untrained_bundle, tmp_path):
    b = load_bundle(untrained_bundle)
    meta = json.loads(b.meta.to_json())
    future = max(READABLE_VERSIONS) + 1
    meta["format_version"] = future
    meta["linewatch_version"] = "9.9.9"
    path = tmp_path / "future.lwm"
    save_file(b.students_state, str(path), metadata={"linewatch": json.dumps(meta)})
    newer = rf"format v{future} \(written by linewatch 9.9.9\).*reads v1, v2 and v3"
    with pytest.raises(BundleError, match=newer):
        load_bundle(path)


def _rewrite_header(src: Path, dst: Path, **changes) -> Path:
    b = load_bundle(src)
    meta = json.loads(b.meta.to_json())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(b.students_state, str(dst), metadata={"linewatch": json.dumps(meta)})
    return dst


def test_v1_bundle_reads_as_levels_1_2_3_and_scores_as_before(bottle, tmp_path):
    """Bundles from before the stages field (format v1) matched levels 1-3; they must keep working unchanged."""
    from linewatch.tools.fixtures import make_untrained_bundle

    src = make_untrained_bundle(tmp_path / "src.lwm", bottle, stages=(1, 2, 3))
    assert load_bundle(src).meta.stages == (1, 2, 3) and load_bundle(src).meta.format_version == FORMAT_VERSION
    v1 = _rewrite_header(src, tmp_path / "v1.lwm", stages=None, format_version=1)
    assert load_bundle(v1).meta.stages == (1, 2, 3)
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch.testing.assert_close(load_detector(v1, "cpu").predict(x).maps, load_detector(src, "cpu").predict(x).maps)
    # a v1 header claiming other levels is not something any linewatch wrote
    with pytest.raises(BundleError, match="stages in a v1 bundle"):
        load_bundle(_rewrite_header(src, tmp_path / "odd.lwm", stages=[2, 3, 4], format_version=1))


def test_new_bundles_record_the_default_levels(untrained_bundle):
    from linewatch.model.backbones import BACKBONES

    meta = load_bundle(untrained_bundle).meta
    spec = BACKBONES["mobilenet_v2"]
    assert meta.stages == spec.default_stages and meta.score_stages == spec.default_score_stages
    # v3 only where the score has levels of its own (a v2 reader would score with the map's levels)
    split = spec.default_score_stages != spec.default_stages
    assert meta.format_version == (SPLIT_SCORE_VERSION if split else FORMAT_VERSION)
    model = load_detector(untrained_bundle, "cpu").model
    assert (model.stages, model.score_stages) == (meta.stages, meta.score_stages)


def test_a_bundle_whose_score_uses_the_map_levels_is_still_v2(bottle, tmp_path):
    """Nothing a v2 reader would mis-read: written as v2 without the new field, so the previous linewatch runs it."""
    from linewatch.tools.fixtures import make_untrained_bundle

    src = make_untrained_bundle(tmp_path / "same.lwm", bottle, stages=(2, 3))
    header = json.loads(load_bundle(src).meta.to_json())
    assert header["format_version"] == FORMAT_VERSION == 2 and "score_stages" not in header
    assert load_bundle(src).meta.score_stages == (2, 3)


@pytest.fixture(scope="module")
def split_bundle(bottle, tmp_path_factory) -> Path:
    from linewatch.tools.fixtures import make_untrained_bundle

    return make_untrained_bundle(tmp_path_factory.mktemp("split") / "split.lwm", bottle, stages=(2, 3),
                                 score_stages=(2, 3, 4))


def test_a_score_from_its_own_levels_is_a_v3_bundle_that_loads_as_written(split_bundle):
    header = json.loads(load_bundle(split_bundle).meta.to_json())
    assert header["format_version"] == SPLIT_SCORE_VERSION == 3 and header["score_stages"] == [2, 3, 4]
    model = load_detector(split_bundle, "cpu").model
    assert (model.stages, model.score_stages) == ((2, 3), (2, 3, 4))


def test_score_stages_in_a_v2_header_or_impossible_ones_are_refused(split_bundle, tmp_path):
    v2 = _rewrite_header(split_bundle, tmp_path / "v2.lwm", format_version=2)
    with pytest.raises(BundleError, match="score_stages in a v2 bundle"):
        load_bundle(v2)
    with pytest.raises(BundleError, match="choose from 1..4"):
        load_bundle(_rewrite_header(split_bundle, tmp_path / "bad.lwm", score_stages=[2, 5]))
    with pytest.raises(BundleError, match="score_stages is not a list"):
        load_bundle(_rewrite_header(split_bundle, tmp_path / "bad2.lwm", score_stages="2,3,4"))


@pytest.mark.parametrize("stages, match", [([0, 1], "choose from 1..4"), ([3, 2], "choose from 1..4"),
                                           ("2,3", "not a list of pyramid levels")])
def test_impossible_stages_in_a_header_are_refused(untrained_bundle, tmp_path, stages, match):
    bad = _rewrite_header(untrained_bundle, tmp_path / "bad.lwm", stages=stages)
    with pytest.raises(BundleError, match=match):
        load_bundle(bad)


def test_stages_that_disagree_with_the_weights_are_refused(bottle, split_bundle, tmp_path):
    """A header whose levels need students of another depth than the weights: a clear error, not a crash
    mid-stream. Levels 2-4 against weights of 3 levels, and 2-3 against weights of 4."""
    from linewatch.tools.fixtures import make_untrained_bundle

    three = make_untrained_bundle(tmp_path / "three.lwm", bottle, stages=(2, 3))
    bad = _rewrite_header(three, tmp_path / "mismatch.lwm", stages=[2, 3, 4], score_stages=None, format_version=2)
    with pytest.raises(BundleError, match=r"does not match backbone mobilenet_v2.*linewatch calibrate"):
        load_detector(bad, "cpu")
    bad = _rewrite_header(split_bundle, tmp_path / "mismatch2.lwm", stages=[2, 3], score_stages=[2, 3],
                          format_version=2)
    with pytest.raises(BundleError, match=r"does not match backbone mobilenet_v2.*linewatch calibrate"):
        load_detector(bad, "cpu")


def test_plain_safetensors_file_is_not_a_bundle(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(BundleError, match="not a linewatch bundle"):
        load_bundle(path)


def test_teacher_weights_mismatch_is_refused(untrained_bundle, tmp_path):
    b = load_bundle(untrained_bundle)
    b.meta.teacher_sha256 = "0" * 64
    path = tmp_path / "other-teacher.lwm"
    save_bundle(path, b.students_state, b.meta)
    with pytest.raises(BundleError, match="teacher weights"):
        load_detector(path, "cpu")


def test_save_is_atomic_no_temp_files_left(untrained_bundle, tmp_path):
    b = load_bundle(untrained_bundle)
    save_bundle(tmp_path / "m.lwm", b.students_state, b.meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m.lwm"]
    # readable by the service user like any file written with the umask (mkstemp alone makes 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.lwm").stat().st_mode & 0o777 == 0o666 & ~umask


def test_calibrate_refuses_impossible_stages_in_one_line_before_any_work(tmp_path, capsys):
    from linewatch.cli import main as cli_main

    assert cli_main(["calibrate", "--normal-dir", str(tmp_path), "--out", str(tmp_path / "m.lwm"),
                     "--stages", "3,2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linewatch: error: --stages: ") and "choose from 1..4" in err and err.count("\n") == 1
    assert not (tmp_path / "m.lwm").exists()
    assert cli_main(["calibrate", "--normal-dir", str(tmp_path), "--out", str(tmp_path / "m.lwm"),
                     "--score-stages", "2,3,5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linewatch: error: --score-stages: ") and err.count("\n") == 1
