"""The model bundle: one safetensors file with the student weights and a JSON header.

safetensors holds only tensors and strings, so loading a bundle cannot run code. The header
names the backbone and the teacher weights (by sha256), input size, normalisation, the
calibration and how the student was trained.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from linewatch import __version__
from linewatch.errors import BundleError
from linewatch.model.backbones import BACKBONES, check_stages

FORMAT = "linewatch-bundle"
FORMAT_VERSION = 2  # what save_bundle writes when the image score uses the defect map's levels
SPLIT_SCORE_VERSION = 3  # ... and when it uses levels of its own (score_stages)
# v1 (linewatch 0.1 and 0.2 before the stages field) always matched pyramid levels 1, 2, 3: read as such.
# v2 records the levels; an older linewatch refuses it by version rather than mis-scoring with the wrong levels.
# v3 adds score_stages (the image score's levels, when they differ); a v2 reader would score with the map's
# levels against a threshold fitted on others, so such a bundle is v3 and refused there by version. A bundle
# whose score uses the map's levels is still written as v2, readable by the linewatch before this field.
READABLE_VERSIONS = (1, 2, 3)
V1_STAGES = (1, 2, 3)
MAX_TILES = 1024  # per frame: a header asking for more is not a station anyone built
SCORER_PREFIX = "scorer."  # tensors of the image scorer (per-position statistics), beside the student weights


@dataclass
class Calibration:
    """Thresholds fitted on held-out good images, and the scores they came from."""

    image_threshold: float
    pixel_threshold: float
    alpha: float  # target false-reject rate
    false_reject_bound: float  # what the conformal order statistic guarantees: ≤ alpha when n is large enough
    scores: list[float] = field(default_factory=list)  # sorted calibration image scores
    pixel_alpha: float = 1e-3
    stats: dict[str, float] = field(default_factory=dict)

    def p_value(self, score: float) -> float:
        """Conformal p-value: (1 + #{calibration scores ≥ score}) / (n + 1)."""
        n = len(self.scores)
        if n == 0:
            return float("nan")
        at_least = n - bisect.bisect_left(self.scores, score)
        return (1 + at_least) / (n + 1)

    def is_fail(self, score: float) -> bool:
        return score > self.image_threshold


@dataclass
class BundleMeta:
    backbone: str
    teacher_sha256: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_students: int
    blur_sigma: float
    calibration: Calibration | None = None
    training: dict[str, Any] = field(default_factory=dict)
    # image score (linewatch.model.scoring.ScoreSpec.to_dict); empty = max of the blurred map
    score: dict[str, Any] = field(default_factory=dict)
    # tiling (linewatch.model.tiling.TileSpec.to_dict): frames scored as tiles at native resolution; None = off
    tiling: dict[str, Any] | None = None
    # how the calibration images were framed (see framing_problem); None = a bundle older than this field
    framing: dict[str, Any] | None = None
    # pyramid levels matched (linewatch.model.backbones: 1–4 = strides 4/8/16/32); None: the backbone's default,
    # as STFPM takes it. A header without the field (v1) reads as V1_STAGES.
    stages: tuple[int, ...] | None = None
    # the levels of the map the image score is taken from; None: with stages also None the backbone's
    # default_score_stages, else the same as stages. A header without the field (v1, v2) reads as stages.
    score_stages: tuple[int, ...] | None = None
    linewatch_version: str = __version__
    format: str = FORMAT
    format_version: int | None = None  # None: the lowest version that says it (v2, or v3 with score_stages)

    def __post_init__(self) -> None:
        if self.stages is None and self.backbone in BACKBONES:
            self.stages = BACKBONES[self.backbone].default_stages
            if self.score_stages is None:
                self.score_stages = BACKBONES[self.backbone].default_score_stages
        if self.score_stages is None:
            self.score_stages = self.stages
        if self.format_version is None:
            self.format_version = SPLIT_SCORE_VERSION if self.split_score else FORMAT_VERSION

    @property
    def split_score(self) -> bool:
        return self.score_stages != self.stages

    def to_json(self) -> str:
        d = asdict(self)
        if self.split_score:
            d["format_version"] = max(self.format_version, SPLIT_SCORE_VERSION)
        else:
            del d["score_stages"]  # same as stages: a v2 header, which the linewatch before v3 reads
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BundleMeta:
        d = json.loads(text)
        cal = d.pop("calibration", None)
        d["input_size"] = tuple(d["input_size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        if "stages" not in d:
            d["stages"] = V1_STAGES
        elif isinstance(d["stages"], list):  # anything else stays as it is, for _meta_problem to name
            d["stages"] = tuple(d["stages"])
        if "score_stages" not in d:
            d["score_stages"] = d["stages"]
        elif isinstance(d["score_stages"], list):
            d["score_stages"] = tuple(d["score_stages"])
        meta = cls(**d)
        meta.calibration = Calibration(**cal) if cal else None
        return meta


def save_bundle(path: str | os.PathLike, students_state: dict[str, torch.Tensor], meta: BundleMeta,
                scorer_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write atomically (temp file + rename) so a daemon reloading it never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in students_state.items()}
    tensors.update({SCORER_PREFIX + k: v.detach().cpu().contiguous() for k, v in (scorer_state or {}).items()})
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"linewatch": meta.to_json()})
        # mkstemp makes 0600; a model is read by the service user, so honour the umask like open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class LoadedBundle:
    meta: BundleMeta
    students_state: dict[str, torch.Tensor]
    model_id: str  # first 12 hex digits of the file's sha256: changes whenever weights or thresholds do
    path: Path
    scorer_state: dict[str, torch.Tensor] = field(default_factory=dict)  # per-position statistics, if any


def describe_levels(meta: BundleMeta) -> str:
    """``2,3`` or, when the image score has levels of its own, ``2,3 (image score 2,3,4)``."""
    text = ",".join(map(str, meta.stages or ()))
    if meta.split_score:
        text += f" (image score {','.join(map(str, meta.score_stages or ()))})"
    return text


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _meta_problem(meta: BundleMeta) -> str | None:
    """What is wrong with a header that parsed (types and ranges), or None. A bundle is data from a file:
    nothing in it may make the loader build something absurd (10⁹ students) or fail later, mid-stream."""
    if not isinstance(meta.backbone, str) or not meta.backbone:
        return "backbone is not a name"
    if not isinstance(meta.teacher_sha256, str) or len(meta.teacher_sha256) != 64 or \
            any(c not in "0123456789abcdef" for c in meta.teacher_sha256):
        return "teacher_sha256 is not a sha256"
    size = meta.input_size
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 4096 for v in size):
        return f"input_size {list(size)!r} is not two integers in 16..4096"
    for name in ("mean", "std"):
        vals = getattr(meta, name)
        if len(vals) != 3 or not all(_finite(v) for v in vals):
            return f"{name} is not three finite numbers"
    if not all(v > 0 for v in meta.std):
        return "std must be positive"
    if not isinstance(meta.n_students, int) or isinstance(meta.n_students, bool) or not 1 <= meta.n_students <= 64:
        return f"n_students {meta.n_students!r} is not an integer in 1..64"
    if not _finite(meta.blur_sigma) or not 0 <= meta.blur_sigma <= 64:
        return f"blur_sigma {meta.blur_sigma!r} is not a number in 0..64"
    if not isinstance(meta.training, dict):
        return "training is not an object"
    if meta.format_version == 1 and meta.stages != V1_STAGES:
        return "stages in a v1 bundle (v1 always matched levels 1, 2, 3)"
    if not isinstance(meta.stages, tuple):
        return "stages is not a list of pyramid levels"
    if not isinstance(meta.score_stages, tuple):
        return "score_stages is not a list of pyramid levels"
    if meta.format_version < SPLIT_SCORE_VERSION and meta.split_score:
        return f"score_stages in a v{meta.format_version} bundle (before v{SPLIT_SCORE_VERSION} the score used stages)"
    if meta.backbone in BACKBONES:
        try:
            check_stages(meta.backbone, meta.stages)
            check_stages(meta.backbone, meta.score_stages)
        except ValueError as exc:
            return str(exc)
    problem = _score_tiling_problem(meta)
    if problem:
        return problem
    if meta.framing is not None and not isinstance(meta.framing, dict):
        return "framing is not an object"
    cal = meta.calibration
    if cal is not None:
        for name in ("image_threshold", "pixel_threshold", "alpha", "false_reject_bound", "pixel_alpha"):
            if not _finite(getattr(cal, name)):
                return f"invalid {name} ({getattr(cal, name)!r})"
        if not isinstance(cal.scores, list) or not all(_finite(v) for v in cal.scores):
            return "calibration scores are not a list of finite numbers"
        if cal.scores != sorted(cal.scores):
            return "calibration scores are not sorted"
        if not cal.scores:  # p-values need them; calibrate never writes an empty set
            return "calibration has no scores"
        if not isinstance(cal.stats, dict):
            return "calibration stats is not an object"
    return None


def _score_tiling_problem(meta: BundleMeta) -> str | None:
    from linewatch.model.scoring import ScoreSpec
    from linewatch.model.tiling import TileSpec, axis_origins

    if not isinstance(meta.score, dict):
        return "score is not an object"
    try:
        ScoreSpec.from_dict(meta.score)
    except (TypeError, ValueError) as exc:
        return f"score: {exc}"
    if meta.tiling is not None:
        if not isinstance(meta.tiling, dict):
            return "tiling is not an object"
        try:
            spec = TileSpec.from_dict(meta.tiling)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            return f"tiling: {exc}"
        if spec.tile != tuple(meta.input_size) or not all(16 <= v <= 8192 for v in spec.frame):
            return "tiling: tile is not the input size or frame is not in 16..8192"
        if len(axis_origins(spec.frame[0], spec.tile[0], spec.overlap)) * \
                len(axis_origins(spec.frame[1], spec.tile[1], spec.overlap)) > MAX_TILES:
            return f"tiling: more than {MAX_TILES} tiles per frame"
    return None


def split_scorer_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(student weights, scorer tensors): per-position statistics are stored as ``scorer.pos_mean`` etc."""
    students = {k: v for k, v in tensors.items() if not k.startswith(SCORER_PREFIX)}
    scorer = {k[len(SCORER_PREFIX):]: v for k, v in tensors.items() if k.startswith(SCORER_PREFIX)}
    return students, scorer


def load_bundle(path: str | os.PathLike) -> LoadedBundle:
    path = Path(path)
    fix = "re-create it with `linewatch calibrate`"
    if not path.is_file():
        raise BundleError(f"model file {path} not found; {fix}")
    try:
        raw = path.read_bytes()
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("linewatch")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BundleError(f"model file {path} is corrupt or not a linewatch bundle ({reason}); {fix}") from None
    if header is None:
        raise BundleError(f"model file {path} is a safetensors file but not a linewatch bundle; {fix}")
    try:
        d = json.loads(header)
        if d.get("format") != FORMAT:
            raise ValueError("wrong format tag")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(
                f"model file {path} is bundle format v{version} (written by linewatch "
                f"{d.get('linewatch_version', '?')}), this linewatch {__version__} reads "
                f"{_and_list([f'v{v}' for v in READABLE_VERSIONS])}; "
                f"{fix} or run the matching linewatch version"
            )
        meta = BundleMeta.from_json(header)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"model file {path} has an unreadable header ({exc}); {fix}") from None
    problem = _meta_problem(meta)
    if problem:
        raise BundleError(f"model file {path} has an invalid header ({problem}); {fix}")
    model_id = hashlib.sha256(raw).hexdigest()[:12]
    tensors, scorer_state = split_scorer_state(tensors)
    return LoadedBundle(meta=meta, students_state=tensors, model_id=model_id, path=path, scorer_state=scorer_state)


# --------------------------------------------------------------------------- framing
# A model only means something for frames framed like its calibration images: same region of the scene
# (ROI), same aspect once resized to the model input, same colour. The bundle records what calibrate saw;
# the daemon compares each camera against it at start (and at the first frame, when the size is known).

ASPECT_TOLERANCE = 0.03  # relative: 900x900 vs 900x880 is the same framing, 900x900 vs 600x300 is not


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v):
        return int(v[0]), int(v[1])
    return None


def _roi(v: Any) -> tuple[int, int, int, int] | None:
    if isinstance(v, (list, tuple)) and len(v) == 4 and all(isinstance(x, int) and x >= 0 for x in v):
        return int(v[0]), int(v[1]), int(v[2]), int(v[3])
    return None


def framing_region(framing: dict[str, Any]) -> tuple[int, int] | None:
    """(w, h) of the image region the model was calibrated on: the ROI, else the (single) source frame size."""
    roi = _roi(framing.get("roi"))
    if roi is not None:
        return roi[2], roi[3]
    sizes = [s for s in (_pair(x) for x in framing.get("source_sizes") or []) if s is not None]
    if len(sizes) == 1:
        return sizes[0]
    return None  # mixed sizes, or nothing recorded


def describe_framing(framing: dict[str, Any]) -> str:
    """One phrase, e.g. ``roi [10, 20, 300, 150] of 900x900 frames (aspect 2.00, rgb)``."""
    sizes = [s for s in (_pair(x) for x in framing.get("source_sizes") or []) if s is not None]
    frames = "/".join(f"{w}x{h}" for w, h in sizes[:3]) + ("/…" if len(sizes) > 3 else "") if sizes else "?"
    roi = _roi(framing.get("roi"))
    where = f"roi {list(roi)} of {frames} frames" if roi is not None else f"full {frames} frames"
    region = framing_region(framing)
    aspect = f"aspect {region[0] / region[1]:.2f}" if region else "aspect ?"
    return f"{where} ({aspect}, {framing.get('colour', '?')})"


def camera_framing(roi: tuple[int, int, int, int] | None, frame_size: tuple[int, int] | None,
                   colour: str | None = None) -> dict[str, Any]:
    """A camera's framing in the bundle's terms (``frame_size`` (w, h) once a frame was seen)."""
    return {"roi": list(roi) if roi is not None else None,
            "source_sizes": [list(frame_size)] if frame_size is not None else [], "colour": colour or "?"}


def framing_problem(model: dict[str, Any], camera: dict[str, Any]) -> tuple[str, str] | None:
    """Compare a camera's framing with the model's: None when they agree (as far as is known),
    ("error", why) when the region's aspect, the ROI or the colour differ, ("warning", why) when only the
    size differs (same aspect: the model sees the same picture at another resolution)."""
    m_region, c_region = framing_region(model), framing_region(camera)
    m_roi, c_roi = _roi(model.get("roi")), _roi(camera.get("roi"))
    m_sizes = [s for s in (_pair(x) for x in model.get("source_sizes") or []) if s is not None]
    if m_roi is not None and len(m_sizes) == 1 and m_roi == (0, 0, *m_sizes[0]):
        m_roi = None  # an ROI covering the whole frame is no crop
    if m_region is not None and c_region is not None:
        ma, ca = m_region[0] / m_region[1], c_region[0] / c_region[1]
        if abs(ca - ma) > ASPECT_TOLERANCE * ma:
            return "error", "the image region has another aspect"
    elif m_roi is not None and c_roi is None and c_region is None:
        return "error", "the model was calibrated on a crop and the camera has no roi"
    mc, cc = model.get("colour"), camera.get("colour")
    if mc in ("rgb", "mono") and cc in ("rgb", "mono") and mc != cc:
        return "error", f"the model was calibrated on {mc} images, the camera delivers {cc}"
    if m_region is not None and c_region is not None and m_region != c_region:
        return "warning", "same aspect, another size (the model sees the same picture at another resolution)"
    if m_roi is not None and c_roi is not None and m_roi[:2] != c_roi[:2]:
        return "warning", "same size, the roi is at another place in the frame"
    return None
