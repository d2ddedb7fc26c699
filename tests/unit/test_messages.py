"""The wire schema: round trips, validation, and garbage never crashing the decoder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linewatch.messages import (
    MAX_BOXES,
    PNG_SIGNATURE,
    SCHEMA_VERSION,
    Box,
    MessageError,
    Status,
    Verdict,
    decode,
    encode,
    encode_status,
    encode_verdict,
)
from linewatch.tools.harness import ROOT, subprocess_env

PNG = PNG_SIGNATURE + b"rest-of-png"


def verdict(**kw) -> Verdict:
    d = dict(camera="line-1", sequence=7, capture_time=1700000000.25, verdict_time=1700000000.3, verdict="fail",
             score=0.91, threshold=0.7, pixel_threshold=0.5, p_value=0.004, model_id="abc123def456",
             frame_width=900, frame_height=700, boxes=[Box(10, 20, 30, 40, 900), Box(1, 2, 3, 4, 5)],
             n_regions=2, defect_area=905, roi=(0, 0, 900, 700), ref="003.png", run_id="r1")
    d.update(kw)
    return Verdict(**d)


def test_verdict_round_trip_with_mask():
    v = verdict(mask_png=PNG)
    parts = encode_verdict(v)
    assert parts[0] == b"verdict.line-1"
    assert len(parts) == 3 and parts[2] == PNG
    header = json.loads(parts[1])
    assert header["schema"] == SCHEMA_VERSION and header["has_mask"] is True
    for key in ("camera", "sequence", "capture_time", "verdict_time", "verdict", "score", "threshold", "p_value",
                "model_id", "boxes", "defect_area", "frame_width", "frame_height", "has_mask"):
        assert key in header
    back = decode(parts)
    assert back == v
    assert back.failed and back.latency == pytest.approx(0.05)


def test_verdict_without_mask_and_nan_p_value():
    v = verdict(verdict="pass", p_value=float("nan"), boxes=[], n_regions=0, defect_area=0, roi=None, ref=None)
    parts = encode(v)
    assert len(parts) == 2
    assert json.loads(parts[1])["p_value"] is None  # strict JSON: no NaN on the wire
    back = decode(parts)
    assert back.p_value is None and back.mask_png is None and not back.has_mask and back.roi is None


@pytest.mark.parametrize("s", [
    Status(kind="heartbeat", time=1.0, run_id="r", uptime_s=3.5, frames=10, fps=2.5, dropped=1,
           cameras={"a": "up", "b": "down"}, model_id="m"),
    Status(kind="camera", time=2.0, run_id="r", camera="a", state="down", reason="folder gone"),
    Status(kind="lifecycle", time=3.0, run_id="r", state="ready"),
])
def test_status_round_trip(s):
    parts = encode_status(s)
    assert parts[0] == b"status" and len(parts) == 2
    assert decode(parts) == s


def _parts(header: dict, topic: bytes = b"verdict.line-1", mask: bytes | None = None) -> list[bytes]:
    p = [topic, json.dumps(header).encode()]
    return p + [mask] if mask is not None else p


def _header(**changes) -> dict:
    h = json.loads(encode_verdict(verdict())[1])
    for k, v in changes.items():
        if v is KeyError:
            h.pop(k)
        else:
            h[k] = v
    return h


@pytest.mark.parametrize("parts, needle", [
    ([b"verdict.line-1"], "expected 2 or 3 message parts"),
    ([b"a", b"b", b"c", b"d"], "expected 2 or 3"),
    (["verdict.x", "{}"], "must be bytes"),
    ([b"\xff", b"{}"], "topic is not ASCII"),
    ([b"verdict.line-1", b"not json"], "not UTF-8 JSON"),
    ([b"verdict.line-1", b"[1, 2]"], "not a JSON object"),
    ([b"verdict.line-1", b"{}"], "no integer 'schema'"),
    (_parts(_header(schema=2)), "schema v2 is not supported"),
    (_parts(_header(), topic=b"verdict.other"), "does not match camera"),
    (_parts(_header(), topic=b"nonsense"), "unknown topic"),
    (_parts(_header(verdict="maybe")), "not pass or fail"),
    (_parts(_header(sequence=-1)), "'sequence' is -1"),
    (_parts(_header(sequence=True)), "'sequence' has type bool"),
    (_parts(_header(sequence="7")), "'sequence' has type str"),
    (_parts(_header(camera=KeyError)), "'camera' is missing"),
    (_parts(_header(has_mask=True)), "has_mask does not match"),
    (_parts(_header(has_mask=True), mask=b"GIF89a"), "not a PNG"),
    (_parts(_header(p_value=1.5)), "outside [0, 1]"),
    (_parts(_header(roi=[1, 2, 3])), "roi is not four"),
    (_parts(_header(boxes=[{"x": 1}])), "'y' is missing"),
    (_parts(_header(boxes=[{"x": 0, "y": 0, "w": 1, "h": 1, "area": 1}] * (MAX_BOXES + 1))), "boxes"),
    (_parts(_header(type="status")), "non-verdict header"),
    ([b"status", json.dumps({"schema": 1, "type": "status", "kind": "bogus", "time": 1}).encode()], "kind"),
    ([b"status", json.dumps({"schema": 1, "type": "status", "kind": "camera", "time": 1,
                             "camera": "a", "state": "sideways"}).encode()], "camera state"),
    ([b"status", b'{"schema": 1, "type": "status", "kind": "heartbeat", "time": 1}', PNG], "two parts"),
])
def test_decoder_rejects_malformed_input_clearly(parts, needle):
    with pytest.raises(MessageError) as exc:
        decode(parts)
    assert needle in str(exc.value)


def test_decoder_ignores_unknown_fields():
    h = _header(future_field={"x": 1})
    assert decode(_parts(h)).camera == "line-1"


def test_encoder_refuses_what_the_decoder_would_reject():
    with pytest.raises(MessageError):
        encode_verdict(verdict(camera="has.dot"))
    with pytest.raises(MessageError):
        encode_verdict(verdict(verdict="unknown"))
    with pytest.raises(MessageError):
        encode_verdict(verdict(mask_png=b"JPEG"))
    with pytest.raises(MessageError):
        encode_status(Status(kind="camera", time=1.0, camera="a", state="exploded"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_garbage_never_crashes_the_decoder(parts):
    try:
        decode(parts)
    except MessageError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_header())), json_values)
def test_corrupted_header_fields_are_rejected_or_valid(key, value):
    h = _header()
    h[key] = value
    try:
        v = decode(_parts(h))
    except MessageError:
        return
    assert isinstance(v, Verdict)


def test_schema_module_is_light():
    """Subscribers need no torch or numpy: messages and client import neither."""
    code = ("import sys, linewatch.messages, linewatch.client; "
            "bad = [m for m in ('torch', 'numpy', 'cv2') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
