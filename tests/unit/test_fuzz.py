"""Bad input, generated: whatever the config loader, the message decoder or the bundle loader is given,
it either works or raises its own one-line error (ConfigError / MessageError / BundleError), never
another exception, a hang, or — for bundles — code execution."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import json
import math
import os
import pickle
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from linewatch.errors import BundleError, ConfigError, LinewatchError
from linewatch.messages import (
    CAMERA_STATES,
    MAX_BOXES,
    Box,
    MessageError,
    Status,
    Verdict,
    decode,
    encode_status,
    encode_verdict,
)
from linewatch.model import load_bundle
from linewatch.service.config import LinewatchConfig, config_from_dict, load_config

pytestmark = pytest.mark.slow  # hypothesis runs hundreds of cases: make test runs them, make test-fast not


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def clean_env(extra: dict[str, str] | None = None):
    saved = {k: v for k, v in os.environ.items() if k.startswith("LINEWATCH_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(extra or {})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("LINEWATCH_")]:
            del os.environ[k]
        os.environ.update(saved)


def one_line_config_error_or_config(fn, *args, **kw) -> LinewatchConfig | None:
    try:
        cfg = fn(*args, **kw)
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and msg.startswith("config"), repr(msg)
        return None
    assert isinstance(cfg, LinewatchConfig)
    return cfg


# --------------------------------------------------------------------------- config

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
           | st.binary(max_size=6) | st.dates() | st.sampled_from(["0", "dir://", "rtsp://x/y", "tcp://*:1", "\x00",
                                                                     "auto", "cuda:1", "-1", ".inf", "1e999"]))
keys = st.sampled_from(["model", "bundle", "cameras", "name", "source", "fps", "roi", "reconnect", "initial_s",
                        "max_s", "batching", "max_batch", "publisher", "bind", "curve", "server_secret_key",
                        "metrics", "port", "host", "daemon", "drain_timeout_s", "logging", "level", "device",
                        "on_end", "timeout_s", "masks", "health", "archive"]) | st.text(max_size=8)
any_key = keys | st.integers() | st.booleans() | st.none() | st.tuples(st.integers())
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(any_key, c, max_size=4),
                      max_leaves=20)

VALID = {"model": {"bundle": "/models/m.lwm"}, "device": "cpu",
         "cameras": [{"name": "cam1", "source": "dir:///data/x", "fps": 5, "reconnect": {"initial_s": 1}}],
         "publisher": {"bind": "tcp://127.0.0.1:*"}, "batching": {"max_batch": 4}}
SECTIONS = ["model", "device", "batching", "cameras", "publisher", "metrics", "logging", "daemon"]


def paths_of(d, prefix=()):
    """Every (path) into a nested dict/list: where a mutation can land."""
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from paths_of(v, (*prefix, i))


ALL_PATHS = [p for p in paths_of(VALID) if p]


def mutate(base: dict, path: tuple, value, how: str) -> dict:
    d = json.loads(json.dumps(base))
    parent = d
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "set":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "add" and isinstance(parent, dict):
        parent[str(value)[:20]] = value
    elif how == "wrap":
        parent[last] = [parent[last]]
    return d


@fuzz(400)
@given(st.sampled_from(ALL_PATHS), values, st.sampled_from(["set", "delete", "add", "wrap"]))
@example(("cameras",), [{1: 2}], "set")
@example(("model", "bundle"), "\x00", "set")
@example(("daemon",), {"drain_timeout_s": float("inf")}, "set")
def test_config_mutations_give_a_config_or_one_config_error(path, value, how):
    data = mutate(VALID, path, value, how)
    with clean_env():
        one_line_config_error_or_config(config_from_dict, data, origin="fuzz.yaml", env=False)


@fuzz(200)
@given(st.dictionaries(any_key, values, max_size=6))
@example({1: 2})
@example({None: {"model": 1}})
def test_random_top_level_structures(data):
    with clean_env():
        one_line_config_error_or_config(config_from_dict, data, origin="fuzz.yaml", env=False)


yaml_text = st.one_of(
    st.text(alphabet=string.printable + "äß€\t", max_size=200),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=None, allow_unicode=True)
               if not isinstance(v, (bytes, dt.date)) else str(v)),
    st.sampled_from([
        "[" * 3000, "a: &x [*x]\n", "cameras: &x [*x]\nmodel: {bundle: m}\n", "!!python/object:os.system ls\n",
        "model: !!binary AAAA\n", "? [1, 2]\n: 3\n", "- 1\n- 2\n",
        "model: {bundle: m}\ncameras: [{name: a, source: 0}]\n2020-01-01: x\n",
        "\x00", "a: b\n\tc: d\n", "!!set {a, b}\n",
        # "billion laughs": a few lines that alias into 10^6 values
        "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\ncameras: [*e,*e,*e,*e]\n",
    ]),
)


@fuzz(200)
@given(yaml_text)
def test_config_files_with_any_text_load_or_give_one_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "lw.yaml"
    path.write_text(text, encoding="utf-8")
    with clean_env():
        one_line_config_error_or_config(load_config, path)


env_names = st.sampled_from([
    "LINEWATCH_DEVICE", "LINEWATCH_CAMERAS", "LINEWATCH_BATCHING", "LINEWATCH_BATCHING__MAX_BATCH",
    "LINEWATCH_PUBLISHER__BIND", "LINEWATCH_PUBLISHER__CURVE", "LINEWATCH_PUBLISHER__CURVE__SERVER_SECRET_KEY",
    "LINEWATCH_METRICS__PORT", "LINEWATCH_MODEL", "LINEWATCH_MODEL__BUNDLE", "LINEWATCH_DAEMON__DRAIN_TIMEOUT_S",
    "LINEWATCH_LOGGING__LEVEL", "LINEWATCH_NOPE", "LINEWATCH_BATCHING__NOPE"])
env_values = st.one_of(st.text(alphabet=string.printable.replace("\x0b", "").replace("\x0c", ""), max_size=40),
                       st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=4),
                                    max_leaves=12).map(lambda v: json.dumps(v, default=str)),
                       st.sampled_from(["null", "[", "{}", "[{}]", '{"max_batch": "x"}', "nan", "inf", "-0", "1e9"]))


@fuzz(200)
@given(st.dictionaries(env_names, env_values, max_size=3))
def test_environment_overrides_load_or_give_one_config_error(env):
    assume(all("\x00" not in v for v in env.values()))
    with clean_env(env):
        one_line_config_error_or_config(config_from_dict, json.loads(json.dumps(VALID)), origin="fuzz.yaml")


# --------------------------------------------------------------------------- messages

names = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
nonneg = st.integers(0, 2**53)
boxes = st.builds(Box, x=nonneg, y=nonneg, w=st.integers(1, 2**31), h=st.integers(1, 2**31), area=nonneg)
verdicts = st.builds(
    Verdict, camera=names, sequence=nonneg, capture_time=finite, verdict_time=finite,
    verdict=st.sampled_from(["pass", "fail"]), score=finite, threshold=finite, p_value=st.none() | st.floats(0, 1),
    model_id=st.text(max_size=20), frame_width=st.integers(1, 2**31), frame_height=st.integers(1, 2**31),
    boxes=st.lists(boxes, max_size=MAX_BOXES), defect_area=nonneg, n_regions=nonneg,
    pixel_threshold=st.none() | finite, roi=st.none() | st.tuples(nonneg, nonneg, nonneg, nonneg),
    ref=st.none() | st.text(max_size=30), run_id=st.text(max_size=12),
    mask_png=st.none() | st.binary(max_size=40).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
)


@fuzz(300)
@given(verdicts)
def test_every_valid_verdict_survives_the_wire(v):
    assert decode(encode_verdict(v)) == v


@fuzz(200)
@given(st.builds(Status, kind=st.sampled_from(["heartbeat", "camera", "lifecycle"]), time=finite,
                 run_id=st.text(max_size=12), camera=st.none() | names,
                 state=st.none() | st.sampled_from([*CAMERA_STATES, "ready", "stopped", "weird"]),
                 reason=st.none() | st.text(max_size=40), uptime_s=st.none() | finite,
                 frames=st.none() | nonneg, fps=st.none() | finite, dropped=st.none() | nonneg,
                 cameras=st.none() | st.dictionaries(names, st.sampled_from(CAMERA_STATES), max_size=3),
                 model_id=st.none() | st.text(max_size=12)))
def test_status_messages_encode_and_decode_or_are_refused(s):
    try:
        parts = encode_status(s)
    except MessageError:
        return  # the encoder refuses what the decoder would reject
    assert decode(parts) == s


@fuzz(400)
@given(verdicts, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 2), st.booleans())
def test_byte_mutations_of_real_messages_are_rejected_or_decode(v, flips, part, truncate):
    parts = [bytearray(p) for p in encode_verdict(v)]
    part = min(part, len(parts) - 1)
    target = parts[part]
    for pos, byte in flips:
        if target:
            target[pos % len(target)] = byte
    if truncate and target:
        del target[len(target) // 2:]
    try:
        msg = decode([bytes(p) for p in parts])
    except MessageError:
        return
    assert isinstance(msg, (Verdict, Status))


@fuzz(150)
@given(st.integers(1, 100_000))
def test_deeply_nested_or_huge_headers_are_refused(depth):
    for header in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(MessageError):
            decode([b"verdict.a", header])


# --------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def bundle_bytes(untrained_bundle) -> bytes:
    return Path(untrained_bundle).read_bytes()


@contextlib.contextmanager
def nothing_unpickled():
    """Any unpickling while loading a bundle would be a way to run code: make it an error."""
    def refuse(*_a, **_k):
        raise AssertionError("the bundle loader unpickled something")

    saved = (pickle.loads, pickle.load, pickle.Unpickler, torch.load)
    pickle.loads = pickle.load = torch.load = refuse
    pickle.Unpickler = refuse
    try:
        yield
    finally:
        pickle.loads, pickle.load, pickle.Unpickler, torch.load = saved


def header_end(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def load_or_bundle_error(path: Path):
    try:
        with nothing_unpickled():
            return load_bundle(path)
    except BundleError as exc:
        assert str(exc) and "\n" not in str(exc), str(exc)
        return None


@fuzz(150)
@given(data=st.data())
def test_byte_mutations_of_a_real_bundle_load_or_give_bundle_error(tmp_path_factory, bundle_bytes, data):
    raw = bytearray(bundle_bytes)
    # most mutations land in the 8-byte length and the JSON header, where the parser works
    hdr = min(header_end(bundle_bytes), len(raw))
    kind = data.draw(st.sampled_from(["flip_header", "flip_anywhere", "truncate", "insert", "length"]))
    if kind == "flip_header":
        for pos, byte in data.draw(st.lists(st.tuples(st.integers(0, hdr - 1), st.integers(0, 255)), min_size=1,
                                            max_size=6)):
            raw[pos] = byte
    elif kind == "flip_anywhere":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif kind == "insert":
        pos = data.draw(st.integers(0, hdr))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:  # the header length itself: too large, zero, or past the end of the file
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    path = tmp_path_factory.mktemp("b") / "m.lwm"
    path.write_bytes(bytes(raw))
    load_or_bundle_error(path)


@pytest.fixture(scope="module")
def cached_teacher():
    """load_detector with the teacher loaded once (it is read-only): fuzzing the header is then fast."""
    from linewatch.model import detector, weights

    real = weights.load_teacher

    @functools.lru_cache(maxsize=4)
    def cached(name, override=None):
        return real(name, override)

    detector.load_teacher = cached
    yield
    detector.load_teacher = real


meta_values = st.one_of(values, st.integers(-5, 5), st.floats(), st.lists(st.integers(-10, 5000), max_size=4),
                        st.lists(st.floats(), max_size=4), st.sampled_from([10**9, "resnet18", "nope", "", [64, 64]]))


@fuzz(25)
@given(st.sampled_from(["backbone", "teacher_sha256", "input_size", "mean", "std", "n_students", "blur_sigma",
                        "calibration", "training", "linewatch_version", "format", "format_version", "unknown_key",
                        "calibration.image_threshold", "calibration.scores", "calibration.alpha",
                        "calibration.stats"]), meta_values)
@example("n_students", 10**9)
@example("input_size", [0, 0])
@example("calibration.scores", ["a", "b"])
def test_any_header_value_loads_or_is_refused_in_one_line(tmp_path_factory, untrained_bundle, cached_teacher,
                                                         field, value):
    """Field by field, a wrong value in the bundle's JSON header: load_bundle and load_detector (what the
    daemon runs at start and on SIGHUP) give a working model or a LinewatchError, nothing else."""
    from safetensors.torch import save_file

    from linewatch.model import load_detector

    b = load_bundle(untrained_bundle)
    meta = json.loads(b.meta.to_json())
    if "." in field:
        outer, inner = field.split(".")
        meta[outer][inner] = value
    else:
        meta[field] = value
    try:
        header = json.dumps(meta, default=str)
    except (TypeError, ValueError):  # not representable as JSON: cannot be in a header
        return
    path = tmp_path_factory.mktemp("h") / "m.lwm"
    save_file(b.students_state, str(path), metadata={"linewatch": header})
    try:
        det = load_detector(path, "cpu", engine="eager")  # eager: no tracing per example
        cal = det.calibration
    except LinewatchError as exc:
        assert str(exc) and "\n" not in str(exc), str(exc)
        return
    # it loaded: then it must also work
    h, w = det.input_size
    pred = det.predict(torch.zeros((1, h, w, 3), dtype=torch.uint8))
    assert pred.maps.shape == (1, h, w)
    assert math.isfinite(cal.image_threshold) and cal.p_value(float(pred.scores[0])) >= 0


def test_pickle_payloads_inside_a_safetensors_header_are_just_text(tmp_path, untrained_bundle):
    """A pickle where the JSON header should be: refused as an unreadable header, never unpickled."""
    from safetensors.torch import save_file

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "PWNED",))

    b = load_bundle(untrained_bundle)
    payload = pickle.dumps(Evil()).decode("latin-1")
    path = tmp_path / "m.lwm"
    save_file(b.students_state, str(path), metadata={"linewatch": payload})
    assert load_or_bundle_error(path) is None
    buf = io.BytesIO()
    torch.save({"linewatch": Evil()}, buf)
    (tmp_path / "t.lwm").write_bytes(buf.getvalue())
    assert load_or_bundle_error(tmp_path / "t.lwm") is None
    assert not (tmp_path / "PWNED").exists()
