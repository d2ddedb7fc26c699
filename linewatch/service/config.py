"""Daemon configuration: one YAML file plus ``LINEWATCH_…`` environment overrides.

Precedence: environment > file > defaults. Nested keys use ``__`` in variable names, e.g.
``LINEWATCH_BATCHING__MAX_BATCH=16`` or ``LINEWATCH_PUBLISHER__BIND=tcp://0.0.0.0:5555``; a list
(``cameras``) is replaced as a whole by a JSON value. Unknown keys are errors that name the key, so a
typo never silently falls back to a default. Relative paths (the model, ``dir://`` folders, video files)
are relative to the config file's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from linewatch.errors import ConfigError
from linewatch.messages import CAMERA_NAME_RE

DEFAULT_CONFIG_PATH = Path("/etc/linewatch/linewatch.yaml")
ENV_PREFIX = "LINEWATCH_"

PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    # allow_inf_nan=False: every time and size in the config is finite (a wait of .inf is no bound)
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    bundle: Path = Field(description="model bundle written by `linewatch calibrate`")
    teacher_weights: Path | None = Field(
        None, description="ImageNet weights of the backbone; default: $TORCH_HOME/hub/checkpoints/<file>")
    engine: Literal["auto", "eager", "jit", "compile", "graph", "reference"] = Field(
        "auto", description="how the model runs: auto (what measured fastest for the backbone and device), "
        "eager (BatchNorm folded), jit (TorchScript, CPU), graph (CUDA graphs, CUDA), compile (torch.compile: "
        "needs a C++ compiler, slow start), reference (unoptimised); see docs/performance.md")


class BatchingConfig(_Section):
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000, description="wait at most this long after the first frame")
    frame_queue: int = Field(4, ge=1, le=10_000, description="frames held per camera; when full the oldest goes")
    publish_queue: int = Field(256, ge=1, le=100_000, description="verdicts waiting for the publisher thread")
    torch_threads: int | None = Field(None, ge=1, le=256, description="CPU threads for inference; null = auto")


class ReconnectConfig(_Section):
    initial_s: PositiveFloat = 0.5
    max_s: PositiveFloat = 30.0
    jitter: float = Field(0.2, ge=0, le=1, description="± fraction of the delay, so cameras do not retry in step")

    @model_validator(mode="after")
    def _order(self) -> ReconnectConfig:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be ≥ initial_s ({self.initial_s})")
        return self


class CaptureConfig(_Section):
    """How frames get from the cameras to inference (see linewatch.service.capture_process)."""

    mode: Literal["process", "thread"] = Field(
        "process", description="process: one capture process per camera, frames over shared memory (decoding "
        "never holds the daemon's GIL; a hung source is killed and restarted); thread: capture threads in the "
        "daemon (a hung read is reported down but cannot be killed)")
    slots: int = Field(8, ge=2, le=1024, description="process mode: shared-memory frame slots per camera; the "
                       "oldest unread slot is overwritten (and counted as dropped) when all are full")
    slot_mb: float = Field(8.0, gt=0, le=1024, description="process mode, when the model resizes on the GPU: "
                           "bytes per slot for a frame at ROI resolution (or a JPEG); a larger frame is dropped "
                           "and counted")
    jpeg_decode: Literal["auto", "capture", "device"] = Field(
        "auto", description="JPEG sources (http(s):// MJPEG, .jpg/.jpeg files in dir://): capture decodes them in "
        "the capture process or thread; device hands the JPEG bytes to the model's device, decoded in batches "
        "there (nvJPEG on CUDA, libjpeg-turbo on the CPU); auto: device when the model preprocesses on its "
        "device (CUDA), else capture. Other images and sources are always decoded in capture")

    def jpeg_on_device(self, device_preprocess: bool) -> bool:
        """Whether JPEG sources hand over their bytes undecoded, for a model that does (``device_preprocess``)
        or does not resize on its device."""
        return self.jpeg_decode == "device" or (self.jpeg_decode == "auto" and device_preprocess)


SOURCE_KINDS = ("v4l2", "rtsp", "http", "dir", "file", "aravis", "pylon")
GENICAM_KINDS = ("aravis", "pylon")  # sources with GenICam features and a software trigger
GENICAM_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")


def source_kind(source: str) -> str:
    s = source.strip()
    if re.fullmatch(r"\d+", s) or re.fullmatch(r"/dev/video\d+", s):
        return "v4l2"
    low = s.lower()
    if low.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if low.startswith(("http://", "https://")):
        return "http"
    if low.startswith("dir://"):
        return "dir"
    if low.startswith("aravis://"):
        return "aravis"
    if low.startswith("pylon://"):
        return "pylon"
    if "://" in s and not low.startswith("file://"):
        raise ValueError(f"source {source!r} has an unsupported scheme; use a V4L2 index or /dev/videoN, "
                         "rtsp://, http(s)://, dir://FOLDER, aravis://CAMERA, pylon://SERIAL or a video file path")
    return "file"


class CameraConfig(_Section):
    name: str = Field(description="letters, digits, _ and -; it is in the topic verdict.<name>")
    source: str = Field(description="0 | /dev/videoN | rtsp://… | http(s)://… (MJPEG) | dir://FOLDER | video file | "
                        "aravis://DEVICE-ID-OR-SERIAL | pylon://SERIAL")
    roi: tuple[int, int, int, int] | None = Field(None, description="[x, y, w, h] crop in frame pixels")
    fps: float | None = Field(None, gt=0, le=1000, description="rate cap; for files and folders the replay rate")
    on_end: Literal["stop", "loop"] = Field("stop", description="files and folders: stop at the end or loop")
    timeout_s: PositiveFloat = Field(10.0, description="network sources: open/read timeout before 'lost'")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    recursive: bool = Field(False, description="dir:// only: replay the images in sub-folders too (sorted by "
                            "relative path; a verdict's ref is that relative path)")
    features: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="aravis:// and pylon:// only: GenICam features set at open, by name, "
        "e.g. {ExposureTime: 5000, Gain: 2, PixelFormat: BayerRG8}; applied in the order written")
    trigger: Literal["none", "hardware", "software"] = Field(
        "none", description="none: free-running; hardware: every frame is a part (the camera waits for its trigger "
        "line); software: every frame is a part, linewatch fires the camera's software trigger at fps "
        "(aravis://, pylon://)")
    verdict_deadline_ms: float | None = Field(
        None, gt=0, le=600_000, description="triggered cameras: a part with no verdict this long after capture gets "
        "a timeout verdict (fail, timed_out: true); its late verdict is not published (counted)")

    @field_validator("source", mode="before")
    @classmethod
    def _source_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not CAMERA_NAME_RE.match(v):
            raise ValueError(f"camera name {v!r} may use only letters, digits, _ and - (1–64 characters)")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("source is empty")
        kind = source_kind(v)
        if kind == "dir" and not v.strip()[len("dir://"):]:
            raise ValueError("dir:// needs a folder, e.g. dir:///data/replay")
        if kind == "v4l2" and int(re.sub(r"\D", "", v) or 0) > 4095:
            raise ValueError(f"V4L2 device index {v.strip()} is out of range (0–4095)")
        return v.strip()

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None:
            x, y, w, h = v
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise ValueError(f"roi {list(v)} must be [x ≥ 0, y ≥ 0, w ≥ 1, h ≥ 1]")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not GENICAM_NAME_RE.match(name):
                raise ValueError(f"feature name {name!r} is not a GenICam name (letters, digits and _)")
        return v

    @model_validator(mode="after")
    def _camera_kind(self) -> CameraConfig:
        kind = self.kind
        if self.features and kind not in GENICAM_KINDS:
            raise ValueError(f"features are for aravis:// and pylon:// cameras, not {kind} sources")
        if self.trigger == "software" and kind not in GENICAM_KINDS:
            raise ValueError(f"trigger: software needs an aravis:// or pylon:// camera, not a {kind} source")
        if self.trigger == "software" and not self.fps:
            raise ValueError("trigger: software needs fps (the trigger rate)")
        if self.verdict_deadline_ms is not None and self.trigger == "none":
            raise ValueError("verdict_deadline_ms needs trigger: hardware or software (each frame a part)")
        return self

    @model_validator(mode="after")
    def _recursive_dir_only(self) -> CameraConfig:
        if self.recursive and self.kind != "dir":
            raise ValueError("recursive: true applies to dir:// sources only")
        return self

    @property
    def kind(self) -> str:
        return source_kind(self.source)


class CurveConfig(_Section):
    """ZeroMQ CURVE on the verdict socket: encryption, and optionally client authentication."""

    server_secret_key: Path = Field(description="server.key_secret from `linewatch keys generate --name server`; "
                                    "mode 0600 or 0640")
    authorized_clients_dir: Path | None = Field(
        None, description="folder of client public keys (*.key) allowed to subscribe; null = any client that "
        "knows the server's public key (encryption without client authentication)")


class PublisherConfig(_Section):
    bind: str = Field("tcp://127.0.0.1:5555", description="ZeroMQ endpoint; tcp://HOST:* picks a free port")
    sndhwm: int = Field(1000, ge=1, le=1_000_000, description="messages queued per subscriber before dropping")
    sndbuf: int | None = Field(None, ge=1024, description="kernel send buffer bytes per subscriber; null = OS")
    hwm_policy: Literal["count", "per_subscriber"] = Field(
        "count", description="count: a message a subscriber cannot take is sent to nobody and counted; "
        "per_subscriber: ZeroMQ's default, only the slow subscriber misses it (seen as sequence gaps)")
    masks: Literal["fail", "all", "none"] = "fail"
    preview: Literal["none", "fail", "all", "every_nth"] = Field(
        "none", description="send the frame (JPEG) and anomaly heatmap (PNG) on preview.<camera> for: none | fail | "
        "all | every_nth (every fail and every preview_every_n-th frame); only while someone subscribes to them")
    preview_every_n: int = Field(10, ge=1, le=1_000_000, description="every_nth: one frame in this many per camera")
    preview_max_px: int = Field(320, ge=16, le=4096, description="longest side of the preview JPEG and heatmap")
    preview_max_per_s: float = Field(2.0, gt=0, le=1000, description="previews per second per camera at most; "
                                     "over it a preview is skipped and counted")
    heartbeat_s: PositiveFloat = 5.0
    linger_ms: int = Field(1000, ge=0, le=60_000, description="at shutdown, time to flush queued messages")
    wait_for_subscriber_s: float = Field(
        0.0, ge=0, le=3600, description="hold cameras until a subscriber connects (replay/demo); 0 = never wait")
    curve: CurveConfig | None = Field(None, description="CURVE encryption/authentication; null = plain TCP")

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        if not re.match(r"^(tcp|ipc|inproc)://.+", v):
            raise ValueError(f"bind {v!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:5555 or ipc:///run/lw.sock")
        return v


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="0.0.0.0 exposes /metrics on every interface")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port (logged at start)")


class LoggingConfig(_Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class DaemonConfig(_Section):
    drain_timeout_s: PositiveFloat = Field(10.0, description="on SIGTERM: finish queued frames within this")
    stall_timeout_s: PositiveFloat = Field(30.0, description="no progress on queued frames this long → "
                                           "stop WATCHDOG=1 pings so systemd restarts us")
    exit_when_sources_end: bool = Field(False, description="exit 0 once every camera has ended (replay jobs)")


class HealthConfig(_Section):
    """The ``health:`` section configures the drift monitor (:mod:`linewatch.service.observers.drift`): drift
    and camera-condition checks, on a sample of frames in their own thread (off the inference path)."""

    enabled: bool = True
    window: int = Field(500, ge=10, le=100_000, description="verdicts per camera in the rolling fail rate / median")
    queue: int = Field(64, ge=1, le=10_000, description="frames waiting for the health thread; full = skip the check")
    black_level: float = Field(8.0, ge=0, le=255, description="mean grey level below which a frame is black")
    frozen_diff: float = Field(0.05, ge=0, le=255, description="mean |frame − previous| (grey levels) under which "
                               "two frames count as identical")
    frozen_frames: int = Field(50, ge=2, le=100_000, description="identical frames in a row → camera frozen")
    blur_ratio: float = Field(0.3, gt=0, le=1, description="sharpness below this fraction of the calibration "
                              "images' median → blurred (needs a bundle calibrated by linewatch ≥ 0.1)")
    bad_frames: int = Field(10, ge=1, le=100_000, description="black/blurred frames in a row before it is reported")
    startup_check_frames: int = Field(
        20, ge=0, le=100_000, description="start-up sanity check: if a camera's first N verdicts fail far beyond "
        "the calibrated false-reject bound (binomial test), report calibration_mismatch once; 0 = off")
    startup_check_p: float = Field(1e-3, gt=0, lt=1, description="p-value under which the start-up fails count "
                                   "as far beyond the calibrated rate")
    sample_every_n: int = Field(4, ge=1, le=100_000, description="check one verdict in this many per camera "
                                "(frozen_frames and bad_frames count checked frames); 1 = every verdict")


class ArchiveConfig(_Section):
    """Failing frames saved with mask, overlay and header JSON: evidence and re-calibration material."""

    enabled: bool = False
    dir: Path = Field(Path("/var/lib/linewatch/rejects"), description="archive root (created if missing)")
    max_mb: float = Field(2048.0, gt=0, description="disk cap; oldest entries are deleted first")
    max_age_days: float = Field(30.0, gt=0, description="entries older than this are deleted")
    queue: int = Field(64, ge=1, le=10_000, description="failing frames waiting to be written; full = drop oldest")


_S = TypeVar("_S", bound="FileSettings")


class FileSettings(BaseSettings):
    """Settings read from a YAML file (passed as init kwargs) where the environment wins over the file: the
    daemon's and the bridge's configs. ``effective()``: plain data (what ``check-config`` / ``bridge --check``
    print; secrets stay masked)."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init kwargs; listing env first makes the environment win.
        return (env_settings, init_settings)

    def effective(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls: type[_S], data: dict[str, Any], origin: str = "<dict>", env: bool = True) -> _S:
        """Validate ``data`` (merged with the environment unless ``env`` is False); one-line ConfigError."""
        _check_plain(data, origin)
        prefix = cls.model_config.get("env_prefix", "")
        try:
            if env:
                return cls(**data)
            # Without the environment: exactly what was given (an unused prefix switches env lookups off).
            return cls(_env_prefix=f"{prefix}NO_ENV_OVERRIDES_", **data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, origin, cls)) from None
        except SettingsError as exc:  # e.g. LINEWATCH_CAMERAS holding malformed JSON
            raise ConfigError(f"config {origin}: {str(exc).splitlines()[0]}; "
                              f"check the {prefix}… environment variables") from None
        except RecursionError:
            raise ConfigError(f"config {origin}: nested too deeply") from None


class LinewatchConfig(FileSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False,
        validate_assignment=True,
    )

    model: ModelConfig
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    cameras: list[CameraConfig] = Field(min_length=1)
    publisher: PublisherConfig = Field(default_factory=PublisherConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N")
        return v

    @field_validator("cameras")
    @classmethod
    def _unique(cls, v: list[CameraConfig]) -> list[CameraConfig]:
        seen: set[str] = set()
        for cam in v:
            if cam.name in seen:
                raise ValueError(f"camera name {cam.name!r} is used twice; names must be unique")
            seen.add(cam.name)
        return v


# --------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            if not text.isprintable() or not text or any(c.isspace() for c in text):
                text = repr(text)  # a key with a newline (or nothing) must not break the one-line message
            out += ("." if out else "") + text
    return out or "(top level)"


def _model_at(loc: tuple[Any, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The section class that a validation error location points into (for listing allowed keys)."""
    cls: Any = root or LinewatchConfig
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return None
    return cls


def _describe(err: dict[str, Any], root: type[BaseModel] | None = None) -> str:
    loc = tuple(err.get("loc", ()))
    where = _loc(loc)
    if err.get("type") == "extra_forbidden":
        parent = _model_at(loc[:-1], root)
        allowed = f" (allowed: {', '.join(parent.model_fields)})" if parent is not None else ""
        return f"{where}: unknown key{allowed}"
    if err.get("type") == "missing":
        return f"{where}: required key is missing"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{where}: {msg}{shown}"


def format_validation_error(exc: ValidationError, origin: str, root: type[BaseModel] | None = None) -> str:
    """One line; ``root``: the model validated (default: the daemon's), for listing allowed keys."""
    errors = exc.errors()
    parts = [_describe(e, root) for e in errors[:3]]
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    text = f"config {origin}: " + "; ".join(parts) + more
    return text.replace("\r", "\\r").replace("\n", "\\n")  # always one line


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file, not to wherever the daemon was started."""
    model = data.get("model")
    if isinstance(model, dict):
        for key in ("bundle", "teacher_weights"):
            if isinstance(model.get(key), str) and model[key] and not Path(model[key]).is_absolute():
                model[key] = str(base / model[key])
    curve = data.get("publisher", {}).get("curve") if isinstance(data.get("publisher"), dict) else None
    if isinstance(curve, dict):
        for key in ("server_secret_key", "authorized_clients_dir"):
            if isinstance(curve.get(key), str) and curve[key] and not Path(curve[key]).is_absolute():
                curve[key] = str(base / curve[key])
    archive = data.get("archive")
    if isinstance(archive, dict) and isinstance(archive.get("dir"), str) and not Path(archive["dir"]).is_absolute():
        archive["dir"] = str(base / archive["dir"])
    cams = data.get("cameras")
    if isinstance(cams, list):
        for cam in cams:
            if not isinstance(cam, dict) or not isinstance(cam.get("source"), str):
                continue
            src = cam["source"].strip()
            try:
                kind = source_kind(src)
            except ValueError:
                continue
            if kind == "dir":
                p = src[len("dir://"):]
                if p and not Path(p).is_absolute():
                    cam["source"] = "dir://" + str(base / p)
            elif kind == "file":
                p = src[len("file://"):] if src.lower().startswith("file://") else src
                if not Path(p).is_absolute():
                    cam["source"] = str(base / p)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:  # e.g. a NUL byte in the name
        raise ConfigError(f"config file {path!r} cannot be used ({exc})") from None
    if not exists:
        hint = " (the default); pass --config FILE" if path == DEFAULT_CONFIG_PATH else ""
        raise ConfigError(f"config file {path} not found{hint}; see config/linewatch.example.yaml")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; is it the right file?")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a YAML mapping (key: value), not a {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, env: bool = True) -> LinewatchConfig:
    """Read, merge with the environment, validate. Raises :class:`ConfigError` with a one-line message."""
    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    data = _read_yaml(p)
    _resolve_paths(data, p.resolve().parent)
    return config_from_dict(data, origin=str(p), env=env)


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000  # YAML aliases can make a small file expand into a huge structure
MAX_CONFIG_DEPTH = 32


def _check_plain(data: Any, origin: str) -> None:
    """Before validation: keys are strings, no NUL characters, bounded size and depth (so that aliases,
    self-references and deep nesting give a one-line ConfigError instead of a hang or a RecursionError)."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    seen = 0
    while stack:
        obj, loc = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"config {origin}: more than {MAX_CONFIG_VALUES} values (YAML aliases?)")
        if len(loc) > MAX_CONFIG_DEPTH:
            raise ConfigError(f"config {origin}: {_loc(loc[:4])}…: nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(obj, dict):
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise ConfigError(f"config {origin}: {_loc(loc)}: key {k!r} is not a string")
                stack.append((v, (*loc, k)))
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, (*loc, i)) for i, v in enumerate(obj))
        elif isinstance(obj, str) and "\x00" in obj:
            raise ConfigError(f"config {origin}: {_loc(loc)}: contains a NUL character")


def config_from_dict(data: dict[str, Any], origin: str = "<dict>", env: bool = True) -> LinewatchConfig:
    return LinewatchConfig.from_dict(data, origin, env)
