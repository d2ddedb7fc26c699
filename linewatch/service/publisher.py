"""Publisher: one thread owns the ZeroMQ socket and sends verdicts and status messages.

The worker hands verdicts over through a bounded queue (full → the oldest is dropped and counted), so
publishing never slows inference; PNG encoding of masks happens here, off the worker thread.

Previews (``publisher.preview``, for ``linewatch view``): the worker asks :meth:`Publisher.wants_preview`
for each verdict — policy, someone subscribed to ``preview.<camera>``, and a per-camera rate cap
(``preview_max_per_s``, token bucket) — and only then hands over the frame and anomaly map. The JPEG and
heatmap PNG are encoded here, sent as their own message just before the verdict (see
:mod:`linewatch.messages`), and counted (``linewatch_previews_total``, ``linewatch_previews_skipped_total``).

The socket is an XPUB (a PUB that also tells us about subscriptions: used to hold a replay until
someone listens). Every send is non-blocking. With ``hwm_policy: count`` (default) the socket has
``XPUB_NODROP``: a message that a subscriber at its high-water mark cannot take is refused, not
silently discarded, and we count it (``linewatch_frames_dropped_total{reason="publish_hwm"}``). The
price: one stalled subscriber makes everyone miss messages while it is stalled. ``per_subscriber``
is ZeroMQ's plain PUB behaviour: only the slow subscriber misses messages (it sees sequence gaps),
which the daemon cannot count.

With ``publisher.curve`` the socket is a CURVE server (encrypted; see docs/security.md); with
``authorized_clients_dir`` a ZAP handler (pyzmq's ThreadAuthenticator, on the same context) admits
only the listed client keys, and refusals are counted and logged.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable

import cv2
import numpy as np
import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator

from linewatch.errors import ConfigError
from linewatch.messages import (
    PREVIEW_PREFIX,
    MessageError,
    Preview,
    Status,
    Verdict,
    encode_preview,
    encode_status,
    encode_verdict,
    preview_topic,
)
from linewatch.service.config import PublisherConfig
from linewatch.service.telemetry.prometheus import Metrics

log = structlog.get_logger("linewatch.publisher")

STATUS_QUEUE = 256  # status messages are rare; this only fills if sending is impossible
SEND_CHUNK = 64  # items taken per lock acquisition
PREVIEW_JPEG_QUALITY = 80

PreviewImages = tuple[np.ndarray, np.ndarray]  # (frame RGB at the model's input size, anomaly map at model size)


def encode_mask_png(mask: np.ndarray, roi: tuple[int, int, int, int] | None, frame_w: int, frame_h: int) -> bytes:
    """The ROI mask placed on a frame-size canvas, as a 1-bit PNG (small and fast for binary masks)."""
    if roi is None or (roi[0] == 0 and roi[1] == 0 and mask.shape == (frame_h, frame_w)):
        canvas = mask
    else:
        x, y, w, h = roi
        canvas = np.zeros((frame_h, frame_w), np.uint8)
        canvas[y:y + h, x:x + w] = mask[:h, :w]
    ok, buf = cv2.imencode(".png", canvas, [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise MessageError("PNG encoding of the mask failed")
    return buf.tobytes()


def encode_preview_images(image_rgb: np.ndarray, amap: np.ndarray, threshold: float, max_px: int,
                          roi_size: tuple[int, int] | None = None) -> tuple[bytes, bytes]:
    """(JPEG of the frame, PNG of the heatmap) of the same size: the ROI's aspect ratio (``roi_size`` = (w, h);
    the model's input squeezes it), the longest side ≤ ``max_px`` and ≤ the model input's (never upscaled).

    The heatmap is single-channel uint8: clip(map / (2 × threshold), 0, 1) × 255, so 128 is the image
    threshold (the scale of the archive's overlays); it has the JPEG's size, so the two overlay exactly.
    """
    h, w = image_rgb.shape[:2]
    rw, rh = roi_size if roi_size is not None and min(roi_size) > 0 else (w, h)
    side = min(max_px, max(h, w))
    size = (max(1, round(side * rw / max(rw, rh))), max(1, round(side * rh / max(rw, rh))))  # (w, h) for OpenCV
    img = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA) if size != (w, h) else image_rgb
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY,
                                                                          PREVIEW_JPEG_QUALITY])
    if not ok:
        raise MessageError("JPEG encoding of the preview failed")
    m = amap.astype(np.float32, copy=False)
    if m.shape != (size[1], size[0]):
        shrink = m.shape[0] * m.shape[1] > size[0] * size[1]
        m = cv2.resize(m, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    k = 255.0 / (2.0 * threshold) if threshold > 0 else 0.0
    heat = np.clip(np.nan_to_num(m * k + 0.5, nan=0.0, posinf=255.0, neginf=0.0), 0, 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", heat, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise MessageError("PNG encoding of the heatmap failed")
    return jpeg.tobytes(), png.tobytes()


def _refuse_live_ipc(endpoint: str) -> None:
    """ZeroMQ unlinks an existing ipc:// socket file before binding: good for the stale file a killed
    daemon leaves, but a second daemon on the same path would silently take it over from a live one.
    So: a file that accepts a connection is in use (ConfigError); one that refuses is stale (bind over it)."""
    import socket

    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[len("ipc://"):]
    if path == "*" or not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):  # ZeroMQ would delete whatever file is there
        raise ConfigError(f"publisher cannot bind {endpoint}: {path} exists and is not a socket; "
                          "choose another path for publisher.bind")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return  # stale (nobody listening) or not a socket: let ZeroMQ replace it
    raise ConfigError(f"publisher cannot bind {endpoint}: another process is listening on it (is linewatch "
                      "already running?); stop it or use another publisher.bind")


class AuthorizedClients:
    """The ZAP credentials provider: admits the CURVE public keys found in authorized_clients_dir.

    Called on the authenticator's thread for every handshake. Refusals are counted
    (``linewatch_subscribers_refused_total``) and logged at most once a minute per key, since a refused
    ZeroMQ client keeps reconnecting."""

    LOG_EVERY_S = 60.0
    MAX_TRACKED = 1024

    def __init__(self, keys: dict[bytes, str], metrics: Metrics):
        self.keys = keys  # replaced whole on reload: a dict swap is atomic
        self.metrics = metrics
        self._logged: dict[bytes, float] = {}

    def _should_log(self, key: bytes) -> bool:
        now = time.monotonic()
        if len(self._logged) > self.MAX_TRACKED:
            self._logged.clear()
        if now - self._logged.get(key, -self.LOG_EVERY_S) < self.LOG_EVERY_S:
            return False
        self._logged[key] = now
        return True

    def callback(self, domain: str, key: bytes) -> bool:
        name = self.keys.get(key)
        if name is None:
            self.metrics.auth_refused.inc()
            if self._should_log(key):
                log.warning("subscriber_refused", client_key=key.decode("ascii", "replace"),
                            reason="key not in authorized_clients_dir")
            return False
        if self._should_log(key):
            log.info("subscriber_authenticated", client=name)
        return True


class Publisher:
    def __init__(self, cfg: PublisherConfig, metrics: Metrics, *, queue_size: int = 256, run_id: str = "",
                 status_provider: Callable[[], Status] | None = None, context: zmq.Context | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.queue_size = queue_size
        self.run_id = run_id
        self.status_provider = status_provider
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self.endpoint: str | None = None
        self._cond = threading.Condition()
        self._verdicts: deque[tuple[Verdict, np.ndarray | None, PreviewImages | None]] = deque()
        self._status: deque[Status] = deque()
        self._closing = False
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        self.subscribed = threading.Event()
        self.last_tick = time.monotonic()
        self.sent = 0
        self._auth: ThreadAuthenticator | None = None  # ZAP handler when CURVE clients are authenticated
        self._clients: AuthorizedClients | None = None
        self.public_key: bytes | None = None  # the server's CURVE public key (Z85) when CURVE is on
        # previews: topics subscribed on the socket (XPUB reports the first subscribe and the last unsubscribe
        # of each topic), kept by the publisher thread and swapped whole so the worker reads it without a lock
        self._topics: dict[bytes, int] = {}
        self._preview_topics: frozenset[bytes] = frozenset()
        self._preview_lock = threading.Lock()
        self._preview_tokens: dict[str, tuple[float, float]] = {}  # camera → (tokens, monotonic time)

    # -- setup (main thread)

    def _setup_curve(self, sock: zmq.Socket) -> None:
        """CURVE server: encrypt everything; with authorized_clients_dir, a ZAP handler admits only listed keys."""
        from linewatch.security import load_authorized_keys, read_secret_key

        curve = self.cfg.curve
        assert curve is not None
        if not zmq.has("curve"):
            raise ConfigError("publisher.curve is set but this libzmq has no CURVE support; install pyzmq's wheel "
                              "(bundled libzmq with libsodium) or drop publisher.curve")
        public, secret = read_secret_key(curve.server_secret_key)
        if curve.authorized_clients_dir is not None:
            self._clients = AuthorizedClients(load_authorized_keys(curve.authorized_clients_dir), self.metrics)
            if not self._clients.keys:
                log.warning("no_authorized_clients", dir=str(curve.authorized_clients_dir),
                            hint="every subscriber will be refused until a client .key is added and SIGHUP sent")
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self._clients)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        self.public_key = public
        log.info("curve_enabled", server_public_key=public.decode("ascii"),
                 client_auth=curve.authorized_clients_dir is not None,
                 authorized_clients=len(self._clients.keys) if self._clients is not None else None)

    def reload_authorized_clients(self) -> int | None:
        """Re-read authorized_clients_dir (SIGHUP); the number of keys, or None without client authentication.
        Applies to new connections; a subscriber already connected stays until it disconnects."""
        from linewatch.security import load_authorized_keys

        curve = self.cfg.curve
        if self._clients is None or curve is None or curve.authorized_clients_dir is None:
            return None
        keys = load_authorized_keys(curve.authorized_clients_dir)  # raises: the old keys stay
        self._clients.keys = keys
        return len(keys)

    def bind(self) -> str:
        """Create and bind the socket; raises ConfigError with the endpoint and the fix."""
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, self.cfg.sndhwm)
        sock.setsockopt(zmq.LINGER, self.cfg.linger_ms)
        sock.setsockopt(zmq.RCVHWM, 1000)  # subscription messages: few, read continuously
        if self.cfg.sndbuf:
            sock.setsockopt(zmq.SNDBUF, self.cfg.sndbuf)
        if self.cfg.hwm_policy == "count":
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        # ZMTP heartbeats drop subscribers whose host vanished, instead of keeping their pipe full.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        try:
            if self.cfg.curve is not None:
                self._setup_curve(sock)
            _refuse_live_ipc(self.cfg.bind)
            sock.bind(self.cfg.bind)
        except (zmq.ZMQError, ConfigError) as exc:
            sock.close(linger=0)
            self._stop_auth()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"publisher cannot bind {self.cfg.bind} ({exc.strerror}); set publisher.bind to a "
                              "free address (tcp://127.0.0.1:* picks a port) or stop what is using it") from None
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    # -- producers (any thread)

    def preview_subscribed(self, camera: str) -> bool:
        """Someone subscribes to a prefix of ``preview.<camera>`` (an empty subscription matches it too)."""
        topic = preview_topic(camera).encode("ascii")
        return any(topic.startswith(t) for t in self._preview_topics)

    def wants_preview(self, verdict: Verdict) -> bool:
        """Called by the worker for every verdict: should it hand over the frame and map for a preview?
        Policy first (free), then a subscriber to ``preview.<camera>``, then the camera's rate cap; the
        last two are counted in ``linewatch_previews_skipped_total`` when they say no."""
        policy = self.cfg.preview
        if policy == "none" or (policy == "fail" and not verdict.failed):
            return False
        if policy == "every_nth" and not verdict.failed and verdict.sequence % self.cfg.preview_every_n:
            return False
        if not self.preview_subscribed(verdict.camera):
            self.metrics.previews_skipped.labels("no_subscriber").inc()
            return False
        rate = self.cfg.preview_max_per_s
        burst = max(1.0, rate)
        now = time.monotonic()
        with self._preview_lock:
            tokens, last = self._preview_tokens.get(verdict.camera, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            ok = tokens >= 1.0
            self._preview_tokens[verdict.camera] = (tokens - 1.0 if ok else tokens, now)
        if not ok:
            self.metrics.previews_skipped.labels("rate_limit").inc()
        return ok

    def submit_verdict(self, verdict: Verdict, mask: np.ndarray | None = None,
                       preview: PreviewImages | None = None) -> None:
        """Queue a verdict; ``preview`` (frame, anomaly map) only when :meth:`wants_preview` said so."""
        dropped = None
        with self._cond:
            if len(self._verdicts) >= self.queue_size:
                dropped = self._verdicts.popleft()
            self._verdicts.append((verdict, mask, preview))
            self.metrics.queue_depth.labels("publish").set(len(self._verdicts))
            self._cond.notify()
        if dropped is not None:
            self.metrics.drop(dropped[0].camera, "publish_queue_full")

    def submit_status(self, status: Status) -> None:
        with self._cond:
            if len(self._status) >= STATUS_QUEUE:
                self._status.popleft()
                self.metrics.status_dropped.labels("queue_full").inc()
            self._status.append(status)
            self._cond.notify()

    def wait_for_subscriber(self, timeout: float) -> bool:
        return self.subscribed.wait(timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._verdicts) + len(self._status)

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (≤ ``timeout`` s), then close; ZeroMQ gets ``linger_ms`` more to flush."""
        with self._cond:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + self.cfg.linger_ms / 1000.0 + 2.0)
            if self._thread.is_alive():
                log.warning("publisher_close_timeout")
                return
        else:
            self._close_socket()

    # -- the thread

    def _run(self) -> None:
        hb_next = time.monotonic() + self.cfg.heartbeat_s
        try:
            while True:
                self.last_tick = time.monotonic()
                with self._cond:
                    if not self._verdicts and not self._status and not self._closing:
                        # short waits: subscription messages arrive on the socket, not through the condition
                        self._cond.wait(max(0.0, min(0.05, hb_next - time.monotonic())))
                    statuses = list(self._status)
                    self._status.clear()
                    items = [self._verdicts.popleft() for _ in range(min(SEND_CHUNK, len(self._verdicts)))]
                    self.metrics.queue_depth.labels("publish").set(len(self._verdicts))
                    closing = self._closing
                    remaining = len(self._verdicts)
                for s in statuses:
                    self._send_status(s)
                if items:
                    t_pub = time.monotonic()
                    for v, mask, preview in items:
                        self._send_verdict(v, mask, preview)
                    self.metrics.stage["publish"].inc(time.monotonic() - t_pub)  # `linewatch bench --profile`
                self._poll_subscriptions()
                now = time.monotonic()
                if now >= hb_next and self.status_provider is not None and not closing:
                    hb_next = now + self.cfg.heartbeat_s
                    try:
                        self._send_status(self.status_provider())
                    except Exception:
                        log.exception("heartbeat_failed")
                if closing and remaining == 0 and not items and not statuses:
                    break
                if closing and now > self._close_deadline:
                    with self._cond:
                        left = list(self._verdicts)
                        self._verdicts.clear()
                    for v, *_ in left:
                        self.metrics.drop(v.camera, "shutdown")
                    log.warning("publisher_drain_timeout", verdicts_dropped=len(left))
                    break
        except Exception:
            log.exception("publisher_failed")
            raise
        finally:
            self._close_socket()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            try:
                self._auth.stop()
            except Exception:
                log.exception("authenticator_stop_failed")
            self._auth = None

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=self.cfg.linger_ms)
            self._sock = None
        self._stop_auth()
        if self._own_ctx:
            self._ctx.term()  # waits ≤ linger for queued messages to go out

    def _poll_subscriptions(self) -> None:
        assert self._sock is not None
        for _ in range(100):
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                topic = msg[1:].decode("ascii", "replace")
                log.info("subscribed", topic=topic or "(all)")
                self.subscribed.set()
                self._track_topic(msg[1:], +1)
            elif msg[:1] == b"\x00":
                self._track_topic(msg[1:], -1)

    def _track_topic(self, topic: bytes, delta: int) -> None:
        n = self._topics.get(topic, 0) + delta
        if n > 0:
            self._topics[topic] = n
        else:
            self._topics.pop(topic, None)
        prefix = PREVIEW_PREFIX.encode("ascii")
        # the topics that can match some preview.<camera>: prefixes of "preview." and longer ones under it
        self._preview_topics = frozenset(t for t in self._topics if prefix.startswith(t) or t.startswith(prefix))

    def _send(self, parts: list[bytes]) -> bool:
        assert self._sock is not None
        self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=len(parts[-1]) < 65536)
        return True

    def _send_preview(self, v: Verdict, image: np.ndarray, amap: np.ndarray) -> None:
        """The preview message, just before its verdict; on success the verdict says ``preview_sent``."""
        try:
            roi = (v.roi[2], v.roi[3]) if v.roi is not None else (v.frame_width, v.frame_height)
            jpeg, png = encode_preview_images(image, amap, v.threshold, self.cfg.preview_max_px, roi)
            parts = encode_preview(Preview(camera=v.camera, sequence=v.sequence, run_id=v.run_id,
                                           preview_jpeg=jpeg, heatmap_png=png))
            self._send(parts)
        except zmq.Again:
            self.metrics.previews_skipped.labels("publish_hwm").inc()
            return
        except Exception as exc:  # never lose the verdict over its preview
            self.metrics.previews_skipped.labels("error").inc()
            log.error("preview_failed", camera=v.camera, seq=v.sequence, error=f"{type(exc).__name__}: {exc}")
            return
        self.metrics.previews.labels(v.camera).inc()
        v.preview_sent = True

    def _send_verdict(self, v: Verdict, mask: np.ndarray | None, preview: PreviewImages | None = None) -> None:
        if preview is not None:
            self._send_preview(v, *preview)
        try:
            if mask is not None:
                v.mask_png = encode_mask_png(mask, v.roi, v.frame_width, v.frame_height)
            parts = encode_verdict(v)
        except Exception as exc:  # a bug, not a user error: never take the publisher down for one message
            self.metrics.drop(v.camera, "publish_error")
            log.error("encode_failed", camera=v.camera, seq=v.sequence, error=f"{type(exc).__name__}: {exc}")
            return
        try:
            self._send(parts)
        except zmq.Again:
            self.metrics.drop(v.camera, "publish_hwm")
            return
        except zmq.ZMQError as exc:
            self.metrics.drop(v.camera, "publish_error")
            log.error("send_failed", camera=v.camera, seq=v.sequence, error=str(exc))
            return
        self.metrics.published.labels("verdict").inc()
        self.sent += 1

    def _send_status(self, s: Status) -> None:
        try:
            self._send(encode_status(s))
        except zmq.Again:
            self.metrics.status_dropped.labels("publish_hwm").inc()
            return
        except (zmq.ZMQError, MessageError) as exc:
            self.metrics.status_dropped.labels("publish_error").inc()
            log.error("status_send_failed", error=str(exc), kind=s.kind)
            return
        self.metrics.published.labels("status").inc()
