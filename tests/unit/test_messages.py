"""The wire schema: round trips, validation, and garbage never crashing the decoder."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linewatch.messages import (
    JPEG_SIGNATURE,
    MAX_BOXES,
    PNG_SIGNATURE,
    SCHEMA_VERSION,
    Box,
    MessageError,
    Preview,
    Status,
    Verdict,
    decode,
    encode,
    encode_preview,
    encode_status,
    encode_verdict,
)
from linewatch.tools.harness import ROOT, subprocess_env

PNG = PNG_SIGNATURE + b"rest-of-png"
JPEG = JPEG_SIGNATURE + b"\xe0rest-of-jpeg"
# the last commit whose messages.py is the decoder released before previews existed
RELEASED_V1_COMMIT = "2e56bae1d1803db543ac8d7bfa956adb1c15ec95"


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


# --------------------------------------------------------------------------- previews


def preview(**kw) -> Preview:
    d = dict(camera="line-1", sequence=7, run_id="r1", preview_jpeg=JPEG, heatmap_png=PNG)
    d.update(kw)
    return Preview(**d)


def test_preview_round_trip_and_the_verdict_flag():
    parts = encode_preview(preview())
    assert parts[0] == b"preview.line-1" and len(parts) == 4 and parts[2] == JPEG and parts[3] == PNG
    assert json.loads(parts[1]) == {"schema": SCHEMA_VERSION, "type": "preview", "camera": "line-1", "sequence": 7,
                                    "run_id": "r1"}
    assert decode(parts) == preview()
    # the verdict says a preview went out before it; without one its header is exactly what it always was
    assert "preview_sent" not in json.loads(encode_verdict(verdict())[1])
    flagged = encode_verdict(verdict(preview_sent=True))
    assert json.loads(flagged[1])["preview_sent"] is True
    back = decode(flagged)
    assert back.preview_sent and not back.has_preview and back.preview_jpeg is None and back.heatmap_png is None


@pytest.mark.parametrize("parts, needle", [
    (encode_preview(preview())[:3], "a preview has 4 message parts, got 3"),
    ([b"preview.line-1", json.dumps({"schema": 1, "type": "verdict", "camera": "line-1", "sequence": 1}).encode(),
      JPEG, PNG], "non-preview header"),
    ([b"preview.other", *encode_preview(preview())[1:]], "does not match camera"),
    ([*encode_preview(preview())[:2], PNG, PNG], "not a JPEG"),
    ([*encode_preview(preview())[:3], JPEG], "heatmap part is not a PNG"),
    ([b"preview.line-1", json.dumps({"schema": 1, "type": "preview", "camera": "line-1"}).encode(), JPEG, PNG],
     "'sequence' is missing"),
    ([*encode_verdict(verdict(mask_png=PNG)), PNG], "expected 2 or 3 message parts, got 4"),
    (_parts(_header(preview_sent="yes")), "'preview_sent' has type str"),
])
def test_malformed_previews_are_rejected_clearly(parts, needle):
    with pytest.raises(MessageError) as exc:
        decode(parts)
    assert needle in str(exc.value)


def test_encoder_refuses_previews_that_are_not_jpeg_and_png():
    with pytest.raises(MessageError):
        encode_preview(preview(preview_jpeg=PNG))
    with pytest.raises(MessageError):
        encode_preview(preview(heatmap_png=JPEG))
    with pytest.raises(MessageError):
        encode_preview(preview(camera="a.b"))
    assert encode(preview()) == encode_preview(preview())


def _what_the_publisher_sends(v: Verdict) -> list[list[bytes]]:
    """A verdict with a preview, as on the wire: the preview message, then the flagged verdict."""
    v.preview_sent = True
    return [encode_preview(preview(camera=v.camera, sequence=v.sequence, run_id=v.run_id)), encode_verdict(v)]


def _delivered(messages: list[list[bytes]], subscriptions: list[bytes]) -> list[list[bytes]]:
    """ZeroMQ's SUB filter: a message reaches a subscriber when its topic starts with a subscription."""
    return [m for m in messages if any(m[0].startswith(s) for s in subscriptions)]


@pytest.mark.parametrize("subscriptions", [[b"verdict."], [b"verdict.line-1", b"status"]])
def test_old_subscribers_receive_verdicts_with_previews_unchanged(subscriptions):
    """What a pre-preview subscriber (linewatch.client before previews: it subscribes to verdict.<camera> or
    verdict., and status) gets of a verdict that has a preview: the verdict message only, which decodes
    under the released v1 rules — two or three parts, has_mask matching them, unknown header keys ignored."""
    messages = _what_the_publisher_sends(verdict(mask_png=PNG))
    got = _delivered(messages, subscriptions)
    assert got == [messages[1]]  # the preview's topic matches none of them
    parts = got[0]
    header = json.loads(parts[1])
    assert 2 <= len(parts) <= 3 and header["has_mask"] == (len(parts) == 3) and header["schema"] == 1
    assert decode(parts) == verdict(mask_png=PNG, preview_sent=True)


def _released_v1_decoder() -> types.ModuleType:
    proc = subprocess.run(["git", "show", f"{RELEASED_V1_COMMIT}:linewatch/messages.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"git history with commit {RELEASED_V1_COMMIT[:12]} is not available here (shallow clone?)")
    mod = types.ModuleType("released_v1_messages")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up while the class is made
    try:
        exec(compile(proc.stdout, f"{RELEASED_V1_COMMIT[:12]}:linewatch/messages.py", "exec"), mod.__dict__)
    finally:
        del sys.modules[mod.__name__]
    return mod


def test_the_released_v1_decoder_reads_verdicts_that_have_previews():
    """The decoder as released before previews, from git history, run on today's messages."""
    old = _released_v1_decoder()
    for v in (verdict(mask_png=PNG), verdict(verdict="pass", boxes=[], n_regions=0, defect_area=0)):
        preview_msg, verdict_msg = _what_the_publisher_sends(v)
        back = old.decode(verdict_msg)
        assert isinstance(back, old.Verdict)
        assert (back.camera, back.sequence, back.verdict, back.score, back.mask_png) == \
            (v.camera, v.sequence, v.verdict, v.score, v.mask_png)
        # a raw subscriber to everything ("") would also get the preview: the old decoder refuses it as one
        # message it does not know (a subscriber counts it as malformed and goes on), never as a verdict
        with pytest.raises(old.MessageError):
            old.decode(preview_msg)
