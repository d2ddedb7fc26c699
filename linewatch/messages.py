"""The wire schema shared by the publisher (``linewatch run``) and subscribers (``linewatch.client``).

ZeroMQ multipart messages, all parts bytes:

* verdicts, topic ``verdict.<camera>``: ``[topic, header JSON, mask PNG]`` — the mask part is present
  iff the header says ``has_mask``. The mask is single-channel (0 = good, 255 = defect) at the camera
  frame's full size; pixels outside the ROI are 0. Boxes are in frame coordinates.
* status, topic ``status``: ``[topic, header JSON]`` — heartbeats, camera up/down/ended, lifecycle.
* previews, topic ``preview.<camera>``: ``[topic, header JSON, frame JPEG, heatmap PNG]`` — optional
  (``publisher.preview``), sent just *before* the verdict they belong to, whose header then says
  ``"preview_sent": true``. The JPEG is what the model saw (the ROI at the model's input size, downscaled
  to ``publisher.preview_max_px``); the heatmap is a single-channel PNG of the anomaly map at the same
  size, value = clip(map / (2 × threshold), 0, 1) × 255, so 128 is the verdict's image threshold.

Previews travel as a message of their own, on a topic of their own, because the v1 decoder refuses a
verdict with more than three parts: subscribers that never subscribe to ``preview.`` (every release
before previews, and :class:`linewatch.client.Subscriber` unless asked) receive the verdict messages
exactly as before, and the daemon sends a preview only while someone subscribes to ``preview.``.

Verdicts of triggered cameras (``trigger: hardware|software``) add ``part_id`` and, past the camera's
``verdict_deadline_ms``, come as a timeout verdict: ``"verdict": "fail"``, ``"timed_out": true``, no score — a v1
subscriber reads it as a fail, which is what a reject gate needs. GenICam cameras add ``frame_id`` and
``device_time`` (the camera's clock, ns). These keys appear only when set, so other headers are unchanged.

Only the standard library is used so a subscriber needs nothing but pyzmq. The decoder validates
everything it reads and raises :class:`MessageError` (a ``ValueError``) on anything malformed; it
ignores header keys it does not know, so fields can be added without a schema bump. A subscriber
accepts any message whose ``schema`` major version equals :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
VERDICT_PREFIX = "verdict."
PREVIEW_PREFIX = "preview."
STATUS_TOPIC = "status"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
MAX_HEADER_BYTES = 1 << 20  # a header is ~1 KB; anything near this is garbage, not a verdict
MAX_BOXES = 32  # boxes per verdict (largest first); n_regions tells how many there were in all
CAMERA_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # no dots: topics stay unambiguous
VERDICTS = ("pass", "fail")
# calibration_mismatch: once per camera, when its first verdicts fail far beyond the calibrated rate
STATUS_KINDS = ("heartbeat", "camera", "lifecycle", "health", "calibration_mismatch")
CONDITIONS = ("ok", "black", "frozen", "blurred")  # camera health, kind "health"
CAMERA_STATES = ("starting", "up", "down", "ended")
LIFECYCLE_STATES = ("starting", "ready", "stopping", "stopped")


class MessageError(ValueError):
    """A message that does not follow this schema (the text says what is wrong)."""


def verdict_topic(camera: str) -> str:
    return VERDICT_PREFIX + camera


def preview_topic(camera: str) -> str:
    return PREVIEW_PREFIX + camera


@dataclass(frozen=True)
class Box:
    """A connected defect region: bounding box in frame pixels and its area in pixels."""

    x: int
    y: int
    w: int
    h: int
    area: int


@dataclass
class Verdict:
    camera: str
    sequence: int  # per camera, monotonic for the daemon's lifetime (gaps = frames lost somewhere)
    capture_time: float  # wall-clock epoch seconds when the frame was read
    verdict_time: float  # wall-clock epoch seconds when the verdict was made
    verdict: str  # "pass" | "fail"
    score: float
    threshold: float  # image threshold: fail iff score > threshold
    p_value: float | None  # conformal p-value against the calibration scores (None: no calibration scores)
    model_id: str
    frame_width: int
    frame_height: int
    boxes: list[Box] = field(default_factory=list)
    defect_area: int = 0  # defect pixels in the frame (all regions, not only the boxes listed)
    n_regions: int = 0
    pixel_threshold: float | None = None
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h of the crop the model saw
    ref: str | None = None  # source detail, e.g. the file name for dir:// replay
    run_id: str = ""  # changes when the daemon restarts (sequences restart at 0)
    mask_png: bytes | None = None  # not in the header: the optional third part
    # header "preview_sent": a preview message for this verdict went out just before it (preview.<camera>)
    preview_sent: bool = False
    # not on the verdict message: the preview's parts, attached by a subscriber that asked for previews
    preview_jpeg: bytes | None = None
    heatmap_png: bytes | None = None
    # part-triggered cameras (trigger: software|hardware): the part this verdict is for (the camera's frame id,
    # else the sequence); timed_out: no verdict within verdict_deadline_ms, so verdict is "fail" (a v1
    # subscriber and a PLC reject the part) with no score. Header keys only when set (old headers unchanged).
    part_id: int | None = None
    timed_out: bool = False
    # GenICam cameras: the camera's own frame id and timestamp (ns on the camera's clock)
    frame_id: int | None = None
    device_time: int | None = None
    schema: int = SCHEMA_VERSION

    @property
    def has_mask(self) -> bool:
        return self.mask_png is not None

    @property
    def has_preview(self) -> bool:
        return self.preview_jpeg is not None

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"

    @property
    def latency(self) -> float:
        return self.verdict_time - self.capture_time


@dataclass
class Status:
    kind: str  # heartbeat | camera | lifecycle | health | calibration_mismatch (camera, reason, fail_rate)
    time: float
    run_id: str = ""
    camera: str | None = None  # camera events
    state: str | None = None  # camera: starting|up|down|ended; lifecycle: starting|ready|stopping|stopped
    reason: str | None = None
    uptime_s: float | None = None  # heartbeat fields from here on
    frames: int | None = None
    fps: float | None = None
    dropped: int | None = None
    cameras: dict[str, str] | None = None
    model_id: str | None = None
    # kind "health" (per camera, on every change of condition) and in heartbeats (per camera, under
    # "health"): what the line is seeing compared with calibration
    condition: str | None = None  # ok | black | frozen | blurred
    fail_rate: float | None = None  # rolling fraction of fails over the last health.window verdicts
    score_median_ratio: float | None = None  # rolling median score / calibration median score
    health: dict[str, dict[str, Any]] | None = None
    schema: int = SCHEMA_VERSION


@dataclass
class Preview:
    """The frame (JPEG) and anomaly heatmap (PNG) of one verdict: see the module docstring."""

    camera: str
    sequence: int
    run_id: str
    preview_jpeg: bytes
    heatmap_png: bytes
    schema: int = SCHEMA_VERSION


Message = Verdict | Status | Preview


# --------------------------------------------------------------------------- encoding


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode_verdict(v: Verdict) -> list[bytes]:
    if not CAMERA_NAME_RE.match(v.camera):
        raise MessageError(f"camera name {v.camera!r} is not valid in a topic")
    if v.verdict not in VERDICTS:
        raise MessageError(f"verdict must be pass or fail, not {v.verdict!r}")
    if v.mask_png is not None and not v.mask_png.startswith(PNG_SIGNATURE):
        raise MessageError("mask_png is not a PNG image")
    header = {
        "schema": SCHEMA_VERSION,
        "type": "verdict",
        "camera": v.camera,
        "sequence": int(v.sequence),
        "capture_time": float(v.capture_time),
        "verdict_time": float(v.verdict_time),
        "verdict": v.verdict,
        "score": _finite_or_none(v.score),
        "threshold": float(v.threshold),
        "pixel_threshold": _finite_or_none(v.pixel_threshold),
        "p_value": _finite_or_none(v.p_value),
        "model_id": v.model_id,
        "frame_width": int(v.frame_width),
        "frame_height": int(v.frame_height),
        "roi": list(map(int, v.roi)) if v.roi is not None else None,
        "boxes": [{"x": b.x, "y": b.y, "w": b.w, "h": b.h, "area": b.area} for b in v.boxes[:MAX_BOXES]],
        "n_regions": int(v.n_regions),
        "defect_area": int(v.defect_area),
        "has_mask": v.mask_png is not None,
        "ref": v.ref,
        "run_id": v.run_id,
    }
    if v.preview_sent:  # only then: headers of a daemon without previews stay as they were
        header["preview_sent"] = True
    for key in ("part_id", "frame_id", "device_time"):  # likewise: only for cameras that have them
        value = getattr(v, key)
        if value is not None:
            header[key] = int(value)
    if v.timed_out:
        header["timed_out"] = True
    parts = [verdict_topic(v.camera).encode("ascii"), _dumps(header)]
    if v.mask_png is not None:
        parts.append(v.mask_png)
    return parts


def encode_status(s: Status) -> list[bytes]:
    _check_status(s)
    header: dict[str, Any] = {"schema": SCHEMA_VERSION, "type": "status", "kind": s.kind, "time": float(s.time),
                              "run_id": s.run_id}
    for name in ("camera", "state", "reason", "uptime_s", "frames", "fps", "dropped", "cameras", "model_id",
                 "condition", "fail_rate", "score_median_ratio", "health"):
        value = getattr(s, name)
        if value is not None:
            header[name] = (_finite_or_none(value) if name in ("uptime_s", "fps", "fail_rate", "score_median_ratio")
                            else value)
    return [STATUS_TOPIC.encode("ascii"), _dumps(header)]


def encode_preview(p: Preview) -> list[bytes]:
    if not CAMERA_NAME_RE.match(p.camera):
        raise MessageError(f"camera name {p.camera!r} is not valid in a topic")
    if not p.preview_jpeg.startswith(JPEG_SIGNATURE):
        raise MessageError("preview_jpeg is not a JPEG image")
    if not p.heatmap_png.startswith(PNG_SIGNATURE):
        raise MessageError("heatmap_png is not a PNG image")
    header = {"schema": SCHEMA_VERSION, "type": "preview", "camera": p.camera, "sequence": int(p.sequence),
              "run_id": p.run_id}
    return [preview_topic(p.camera).encode("ascii"), _dumps(header), p.preview_jpeg, p.heatmap_png]


def encode(msg: Message) -> list[bytes]:
    if isinstance(msg, Verdict):
        return encode_verdict(msg)
    if isinstance(msg, Preview):
        return encode_preview(msg)
    return encode_status(msg)


# --------------------------------------------------------------------------- decoding


def _get(h: dict[str, Any], key: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if key not in h or h[key] is None:
        if optional:
            return None
        raise MessageError(f"header field {key!r} is missing")
    v = h[key]
    # bool is an int in Python: refuse it where a number is expected
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise MessageError(f"header field {key!r} has type bool")
    if not isinstance(v, types):
        raise MessageError(f"header field {key!r} has type {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise MessageError(f"header field {key!r} is not finite")
    return v


def _int(h: dict[str, Any], key: str, minimum: int = 0) -> int:
    v = _get(h, key, int)
    if v < minimum:
        raise MessageError(f"header field {key!r} is {v}, below {minimum}")
    return v


def _num(h: dict[str, Any], key: str, *, optional: bool = False) -> float | None:
    v = _get(h, key, (int, float), optional=optional)
    return None if v is None else float(v)


def _header(part: bytes) -> dict[str, Any]:
    if len(part) > MAX_HEADER_BYTES:
        raise MessageError(f"header is {len(part)} bytes, over the {MAX_HEADER_BYTES} limit")
    try:
        h = json.loads(part.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"header is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise MessageError("header JSON is nested too deeply") from None
    if not isinstance(h, dict):
        raise MessageError("header is not a JSON object")
    schema = h.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise MessageError("header has no integer 'schema' field")
    if schema != SCHEMA_VERSION:
        raise MessageError(f"message schema v{schema} is not supported (this linewatch reads v{SCHEMA_VERSION}); "
                           "upgrade the subscriber or the daemon so they match")
    return h


def _decode_verdict(topic: str, h: dict[str, Any], mask: bytes | None) -> Verdict:
    camera = _get(h, "camera", str)
    if not CAMERA_NAME_RE.match(camera):
        raise MessageError(f"camera name {camera!r} is not valid")
    if topic != verdict_topic(camera):
        raise MessageError(f"topic {topic!r} does not match camera {camera!r}")
    verdict = _get(h, "verdict", str)
    if verdict not in VERDICTS:
        raise MessageError(f"verdict {verdict!r} is not pass or fail")
    has_mask = _get(h, "has_mask", bool)
    if has_mask != (mask is not None):
        raise MessageError("has_mask does not match the number of message parts")
    if mask is not None and not mask.startswith(PNG_SIGNATURE):
        raise MessageError("mask part is not a PNG image")
    raw_boxes = _get(h, "boxes", list)
    if len(raw_boxes) > MAX_BOXES:
        raise MessageError(f"{len(raw_boxes)} boxes, more than the {MAX_BOXES} allowed")
    boxes = []
    for b in raw_boxes:
        if not isinstance(b, dict):
            raise MessageError("a box is not a JSON object")
        boxes.append(Box(x=_int(b, "x"), y=_int(b, "y"), w=_int(b, "w", 1), h=_int(b, "h", 1), area=_int(b, "area")))
    roi = _get(h, "roi", list, optional=True)
    if roi is not None:
        if len(roi) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in roi):
            raise MessageError("roi is not four non-negative integers [x, y, w, h]")
        roi = tuple(roi)
    p_value = _num(h, "p_value", optional=True)
    if p_value is not None and not 0.0 <= p_value <= 1.0:
        raise MessageError(f"p_value {p_value} is outside [0, 1]")
    score = _num(h, "score", optional=True)
    return Verdict(
        camera=camera,
        sequence=_int(h, "sequence"),
        capture_time=_num(h, "capture_time"),
        verdict_time=_num(h, "verdict_time"),
        verdict=verdict,
        score=score if score is not None else float("nan"),
        threshold=_num(h, "threshold"),
        pixel_threshold=_num(h, "pixel_threshold", optional=True),
        p_value=p_value,
        model_id=_get(h, "model_id", str),
        frame_width=_int(h, "frame_width", 1),
        frame_height=_int(h, "frame_height", 1),
        boxes=boxes,
        n_regions=_int(h, "n_regions"),
        defect_area=_int(h, "defect_area"),
        roi=roi,
        ref=_get(h, "ref", str, optional=True),
        run_id=_get(h, "run_id", str, optional=True) or "",
        mask_png=mask,
        preview_sent=_get(h, "preview_sent", bool, optional=True) or False,
        part_id=_get(h, "part_id", int, optional=True),
        timed_out=_get(h, "timed_out", bool, optional=True) or False,
        frame_id=_get(h, "frame_id", int, optional=True),
        device_time=_get(h, "device_time", int, optional=True),
    )


def _decode_preview(topic: str, h: dict[str, Any], jpeg: bytes, png: bytes) -> Preview:
    camera = _get(h, "camera", str)
    if not CAMERA_NAME_RE.match(camera):
        raise MessageError(f"camera name {camera!r} is not valid")
    if topic != preview_topic(camera):
        raise MessageError(f"topic {topic!r} does not match camera {camera!r}")
    if not jpeg.startswith(JPEG_SIGNATURE):
        raise MessageError("preview part is not a JPEG image")
    if not png.startswith(PNG_SIGNATURE):
        raise MessageError("heatmap part is not a PNG image")
    return Preview(camera=camera, sequence=_int(h, "sequence"), run_id=_get(h, "run_id", str, optional=True) or "",
                   preview_jpeg=jpeg, heatmap_png=png)


def _check_status(s: Status) -> None:
    if s.kind not in STATUS_KINDS:
        raise MessageError(f"status kind {s.kind!r} is not one of {', '.join(STATUS_KINDS)}")
    if s.kind == "camera":
        if not s.camera or not CAMERA_NAME_RE.match(s.camera):
            raise MessageError("camera status without a valid camera name")
        if s.state not in CAMERA_STATES:
            raise MessageError(f"camera state {s.state!r} is not one of {', '.join(CAMERA_STATES)}")
    elif s.kind == "lifecycle" and s.state not in LIFECYCLE_STATES:
        raise MessageError(f"lifecycle state {s.state!r} is not one of {', '.join(LIFECYCLE_STATES)}")
    elif s.kind == "calibration_mismatch":
        if not s.camera or not CAMERA_NAME_RE.match(s.camera):
            raise MessageError("calibration_mismatch status without a valid camera name")
    elif s.kind == "health":
        if not s.camera or not CAMERA_NAME_RE.match(s.camera):
            raise MessageError("health status without a valid camera name")
        if s.condition not in CONDITIONS:
            raise MessageError(f"condition {s.condition!r} is not one of {', '.join(CONDITIONS)}")
    if s.health is not None and not (
        isinstance(s.health, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in s.health.items())
    ):
        raise MessageError("health must map camera names to objects")
    if s.cameras is not None and not (
        isinstance(s.cameras, dict)
        and all(isinstance(k, str) and v in CAMERA_STATES for k, v in s.cameras.items())
    ):
        raise MessageError("cameras must map camera names to states")


def _decode_status(h: dict[str, Any]) -> Status:
    frames = _get(h, "frames", int, optional=True)
    dropped = _get(h, "dropped", int, optional=True)
    s = Status(
        kind=_get(h, "kind", str),
        time=_num(h, "time"),
        run_id=_get(h, "run_id", str, optional=True) or "",
        camera=_get(h, "camera", str, optional=True),
        state=_get(h, "state", str, optional=True),
        reason=_get(h, "reason", str, optional=True),
        uptime_s=_num(h, "uptime_s", optional=True),
        frames=frames,
        fps=_num(h, "fps", optional=True),
        dropped=dropped,
        cameras=_get(h, "cameras", dict, optional=True),
        model_id=_get(h, "model_id", str, optional=True),
        condition=_get(h, "condition", str, optional=True),
        fail_rate=_num(h, "fail_rate", optional=True),
        score_median_ratio=_num(h, "score_median_ratio", optional=True),
        health=_get(h, "health", dict, optional=True),
    )
    _check_status(s)
    return s


def decode(parts: list[bytes] | tuple[bytes, ...]) -> Message:
    """Parse one multipart message; raise :class:`MessageError` if it is not a valid verdict, status or preview."""
    if not isinstance(parts, (list, tuple)) or not 2 <= len(parts) <= 4:
        n = len(parts) if isinstance(parts, (list, tuple)) else "?"
        raise MessageError(f"expected 2 or 3 message parts (4 for a preview), got {n}")
    if not all(isinstance(p, (bytes, bytearray, memoryview)) for p in parts):
        raise MessageError("message parts must be bytes")
    parts = [bytes(p) for p in parts]
    try:
        topic = parts[0].decode("ascii")
    except UnicodeDecodeError:
        raise MessageError("topic is not ASCII") from None
    if topic.startswith(PREVIEW_PREFIX):
        if len(parts) != 4:
            raise MessageError(f"a preview has 4 message parts, got {len(parts)}")
        h = _header(parts[1])
        if h.get("type") != "preview":
            raise MessageError("preview topic with a non-preview header")
        return _decode_preview(topic, h, parts[2], parts[3])
    if len(parts) == 4:
        raise MessageError("expected 2 or 3 message parts, got 4")
    h = _header(parts[1])
    mask = parts[2] if len(parts) == 3 else None
    if topic == STATUS_TOPIC:
        if h.get("type") != "status":
            raise MessageError("status topic with a non-status header")
        if mask is not None:
            raise MessageError("status messages have two parts")
        return _decode_status(h)
    if topic.startswith(VERDICT_PREFIX):
        if h.get("type") != "verdict":
            raise MessageError("verdict topic with a non-verdict header")
        return _decode_verdict(topic, h, mask)
    raise MessageError(f"unknown topic {topic[:80]!r}")


def verdict_to_dict(v: Verdict) -> dict[str, Any]:
    """The header as a plain dict (what `linewatch subscribe --json` prints)."""
    return json.loads(encode_verdict(v)[1])


def status_to_dict(s: Status) -> dict[str, Any]:
    return json.loads(encode_status(s)[1])
