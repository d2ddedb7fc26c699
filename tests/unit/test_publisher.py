"""Publisher: real ZeroMQ sockets — delivery, status, masks, and subscribers that stop reading."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from linewatch.client import Subscriber
from linewatch.errors import ConfigError
from linewatch.messages import Box, Status, Verdict
from linewatch.service.config import PublisherConfig
from linewatch.service.publisher import Publisher, encode_mask_png, encode_preview_images
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.tools.harness import wait_until


def verdict(cam: str = "a", seq: int = 0, failed: bool = False, roi=(0, 0, 64, 48)) -> Verdict:
    return Verdict(camera=cam, sequence=seq, capture_time=time.time(), verdict_time=time.time(),
                   verdict="fail" if failed else "pass", score=0.9 if failed else 0.1, threshold=0.5,
                   pixel_threshold=0.4, p_value=0.2, model_id="m", frame_width=64, frame_height=48,
                   boxes=[Box(1, 2, 3, 4, 12)] if failed else [], n_regions=1 if failed else 0,
                   defect_area=12 if failed else 0, roi=roi, run_id="r")


def value(m: Metrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def publisher(m: Metrics, **cfg) -> Publisher:
    cfg.setdefault("bind", "tcp://127.0.0.1:*")
    cfg.setdefault("linger_ms", 500)
    status_provider = cfg.pop("status_provider", None)
    queue_size = cfg.pop("queue_size", 1000)
    return Publisher(PublisherConfig(**cfg), m, queue_size=queue_size, run_id="r", status_provider=status_provider)


@pytest.fixture
def metrics():
    return Metrics()


def test_mask_png_is_frame_sized_with_the_roi_in_place():
    mask = np.full((10, 20), 255, np.uint8)
    png = encode_mask_png(mask, (5, 7, 20, 10), 64, 48)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (48, 64)
    assert (img[7:17, 5:25] == 255).all() and img.sum() == 255 * 200


def test_verdicts_status_and_heartbeats_reach_a_subscriber(metrics):
    hb = Status(kind="heartbeat", time=1.0, run_id="r", frames=3, cameras={"a": "up"})
    pub = publisher(metrics, heartbeat_s=0.1, status_provider=lambda: hb)
    endpoint = pub.bind()
    pub.start()
    sub = Subscriber(endpoint, cameras=["a"], status=True)
    try:
        assert pub.wait_for_subscriber(10)
        got: list = []
        # a heartbeat arriving shows the subscriptions are active
        wait_until(lambda: got.append(sub.recv(0.05)) or any(got), 10, what="a heartbeat")
        pub.submit_verdict(verdict("a", 0, failed=True, roi=(8, 8, 16, 16)), np.full((16, 16), 255, np.uint8))
        pub.submit_verdict(verdict("ab", 0))  # another camera whose topic starts with "verdict.a"
        pub.submit_verdict(verdict("a", 1))
        pub.submit_status(Status(kind="camera", time=2.0, run_id="r", camera="a", state="down", reason="gone"))
        end = time.monotonic() + 10
        while time.monotonic() < end and not (
            sum(isinstance(m, Verdict) for m in got) >= 2 and any(getattr(m, "kind", "") == "camera" for m in got)
        ):
            msg = sub.recv(0.5)
            if msg is not None:
                got.append(msg)
        got += list(sub.verdicts(timeout=0.3))  # anything else that was coming (there should be nothing)
    finally:
        sub.close()
        pub.close(2)
    got = [m for m in got if m is not None]
    verdicts = [m for m in got if isinstance(m, Verdict)]
    assert [(v.camera, v.sequence) for v in verdicts] == [("a", 0), ("a", 1)]  # exact camera filter
    v0 = verdicts[0]
    assert v0.failed and v0.has_mask and v0.boxes == [Box(1, 2, 3, 4, 12)]
    mask = cv2.imdecode(np.frombuffer(v0.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (48, 64) and (mask[8:24, 8:24] == 255).all() and mask.sum() == 255 * 256
    assert not verdicts[1].has_mask
    statuses = [m for m in got if isinstance(m, Status)]
    assert any(s.kind == "camera" and s.camera == "a" and s.state == "down" for s in statuses)
    assert any(s.kind == "heartbeat" for s in statuses)
    assert value(metrics, "linewatch_messages_published_total", topic="verdict") == 3
    assert sub.gaps == {}


def test_wait_for_subscriber(metrics):
    pub = publisher(metrics)
    endpoint = pub.bind()
    pub.start()
    try:
        assert not pub.wait_for_subscriber(0.05)
        with Subscriber(endpoint):
            assert pub.wait_for_subscriber(10)
    finally:
        pub.close(1)


def stalled_subscriber(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A SUB that connects, subscribes, and never reads; tiny buffers so it fills up fast."""
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 2048)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt_string(zmq.SUBSCRIBE, "")
    s.connect(endpoint)
    return s


def test_stalled_subscriber_never_blocks_and_drops_are_counted(metrics):
    pub = publisher(metrics, sndhwm=2, sndbuf=2048, hwm_policy="count", queue_size=100_000)
    endpoint = pub.bind()
    pub.start()
    ctx = zmq.Context()
    stalled = stalled_subscriber(ctx, endpoint)
    try:
        assert pub.wait_for_subscriber(10)
        n = 3000
        for i in range(n):
            pub.submit_verdict(verdict("a", i, failed=True), np.full((48, 64), 255, np.uint8))  # returns at once
        wait_until(lambda: pub.pending == 0, 60, what="publisher caught up")
        assert pub.healthy  # still running: the stalled subscriber did not block it
    finally:
        pub.close(2)
        stalled.close()
        ctx.term()
    hwm = value(metrics, "linewatch_frames_dropped_total", camera="a", reason="publish_hwm")
    sent = value(metrics, "linewatch_messages_published_total", topic="verdict")
    assert hwm > 0
    assert sent + hwm == n  # every verdict either went out or was counted


def test_per_subscriber_policy_keeps_fast_subscribers_whole(metrics):
    pub = publisher(metrics, sndhwm=100, sndbuf=2048, hwm_policy="per_subscriber", queue_size=100_000)
    endpoint = pub.bind()
    pub.start()
    ctx = zmq.Context()
    stalled = stalled_subscriber(ctx, endpoint)
    fast = Subscriber(endpoint, cameras=["a"])
    received: list[int] = []
    stop = threading.Event()

    def read():
        while not stop.is_set():
            v = fast.recv(0.05)
            if v is not None:
                received.append(v.sequence)

    try:
        wait_until(lambda: pub.subscribed.is_set(), 10)
        probe = 0
        while fast.recv(0.05) is None:  # until the fast subscriber's subscription is live
            pub.submit_verdict(verdict("a", probe))
            probe += 1
            assert probe < 200
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        chunk, chunks = 50, 40  # 2000 messages: far more than the stalled subscriber can buffer
        for c in range(chunks):
            for i in range(chunk):
                pub.submit_verdict(verdict("a", 1000 + c * chunk + i))
            # paced like a camera: the fast subscriber keeps up, so only the stalled one overflows
            wait_until(lambda c=c: sum(s >= 1000 for s in received) >= (c + 1) * chunk, 10, interval=0.002,
                       what="fast reader")
        stop.set()
        reader.join(5)
        stalled_got = 0
        while stalled.poll(200):
            stalled.recv_multipart()
            stalled_got += 1
        assert stalled_got < chunk * chunks  # the stalled subscriber really did overflow (and lose messages)
    finally:
        stop.set()
        fast.close()
        pub.close(2)
        stalled.close()
        ctx.term()
    assert [s for s in received if s >= 1000] == list(range(1000, 1000 + chunk * chunks))
    assert value(metrics, "linewatch_frames_dropped_total", camera="a", reason="publish_hwm") == 0


def test_publish_queue_full_drops_oldest_and_counts(metrics):
    pub = publisher(metrics, queue_size=5)
    endpoint = pub.bind()
    for i in range(8):  # the thread is not running yet: the queue fills
        pub.submit_verdict(verdict("a", i))
    assert value(metrics, "linewatch_frames_dropped_total", camera="a", reason="publish_queue_full") == 3
    assert value(metrics, "linewatch_queue_depth", queue="publish") == 5
    with Subscriber(endpoint) as sub:
        # before the thread owns the socket, this thread may read the subscription itself
        wait_until(lambda: pub._poll_subscriptions() or pub.subscribed.is_set(), 10)
        pub.start()
        got = [v.sequence for v in sub.verdicts(timeout=5.0, count=5)]
        got += [v.sequence for v in sub.verdicts(timeout=0.2)]
    pub.close(1)
    assert got == [3, 4, 5, 6, 7]  # the newest five


def test_close_flushes_what_is_queued(metrics):
    pub = publisher(metrics)
    endpoint = pub.bind()
    pub.start()
    with Subscriber(endpoint) as sub:
        assert pub.wait_for_subscriber(10)
        time.sleep(0.1)
        for i in range(50):
            pub.submit_verdict(verdict("a", i))
        pub.close(5)
        got = [v.sequence for v in sub.verdicts(timeout=5.0, count=50)]
    assert got == list(range(50))


def test_bind_conflict_is_a_clear_error(metrics):
    pub = publisher(metrics)
    endpoint = pub.bind()
    try:
        other = publisher(Metrics(), bind=endpoint)
        with pytest.raises(ConfigError, match=r"publisher cannot bind tcp://127\.0\.0\.1:\d+ .*publisher\.bind"):
            other.bind()
        other.close(0.1)
    finally:
        pub.close(0.1)


# --------------------------------------------------------------------------- previews


def test_preview_images_share_a_size_and_the_heatmap_scale_puts_the_threshold_mid_grey():
    img = np.zeros((256, 192, 3), np.uint8)
    img[:, :, 0] = 200  # red in RGB
    amap = np.full((256, 192), 0.5, np.float32)  # at the threshold
    amap[:64] = 2.0  # far above: saturates
    amap[-64:] = 0.0
    jpeg, png = encode_preview_images(img, amap, threshold=0.5, max_px=128)
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    heat = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert frame.shape == (128, 96, 3) and heat.shape == (128, 96)  # longest side 128, aspect kept
    assert frame[..., 2].mean() > 150 and frame[..., 0].mean() < 50  # still red (BGR on disk)
    assert heat[:30].min() == 255 and heat[-30:].max() == 0 and abs(int(heat[64].mean()) - 128) <= 1
    small, _ = encode_preview_images(img[:64, :48], amap[:64, :48], 0.5, max_px=320)  # never upscaled
    assert cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR).shape == (64, 48, 3)
    # a 1280×960 ROI squeezed into a square model input is shown in its own proportions again
    square = np.zeros((256, 256, 3), np.uint8)
    jpeg, png = encode_preview_images(square, np.zeros((256, 256), np.float32), 0.5, 320, roi_size=(1280, 960))
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (192, 256, 3)
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape == (192, 256)


def preview_subscriber(pub: Publisher, endpoint: str, **kw) -> Subscriber:
    """A subscriber that asks for previews, once the publisher knows it does (the thread is not started)."""
    sub = Subscriber(endpoint, status=False, previews=True, **kw)
    wait_until(lambda: pub._poll_subscriptions() or pub.preview_subscribed(kw.get("cameras", ["a"])[0]), 10,
               what="preview subscription seen")
    return sub


@pytest.mark.parametrize("policy, wanted", [
    ("none", []),
    ("fail", [2, 4]),
    ("all", [0, 1, 2, 3, 4, 5]),
    ("every_nth", [0, 2, 3, 4]),  # every 3rd, and every fail
])
def test_wants_preview_follows_the_policy(metrics, policy, wanted):
    pub = publisher(metrics, preview=policy, preview_every_n=3, preview_max_per_s=1000)
    endpoint = pub.bind()
    with preview_subscriber(pub, endpoint):
        got = [seq for seq in range(6) if pub.wants_preview(verdict("a", seq, failed=seq in (2, 4)))]
    pub.close(0.1)
    assert got == wanted
    assert value(metrics, "linewatch_previews_skipped_total", reason="rate_limit") == 0


def test_wants_preview_needs_a_subscriber_and_keeps_the_rate_cap(metrics):
    pub = publisher(metrics, preview="all", preview_max_per_s=0.01)  # one token, the next in 100 s
    endpoint = pub.bind()
    assert not pub.wants_preview(verdict("a", 0))  # nobody subscribed to previews: nothing to encode
    assert value(metrics, "linewatch_previews_skipped_total", reason="no_subscriber") == 1
    with Subscriber(endpoint, cameras=["a"]):  # an ordinary subscriber does not want previews
        wait_until(lambda: pub._poll_subscriptions() or pub.subscribed.is_set(), 10)
        assert not pub.wants_preview(verdict("a", 1))
    assert value(metrics, "linewatch_previews_skipped_total", reason="no_subscriber") == 2
    sub = preview_subscriber(pub, endpoint, cameras=["a"])
    try:
        assert not pub.preview_subscribed("b")  # subscribed to preview.a only
        assert [pub.wants_preview(verdict("a", s)) for s in (2, 3, 4)] == [True, False, False]
        assert pub.wants_preview(verdict("ab", 0))  # a camera's cap is its own; "preview.a" also matches "ab"
        assert value(metrics, "linewatch_previews_skipped_total", reason="rate_limit") == 2
    finally:
        sub.close()
    # the subscriber went away: XPUB reports the unsubscription and previews stop
    wait_until(lambda: pub._poll_subscriptions() or not pub.preview_subscribed("a"), 10, what="unsubscribed")
    pub.close(0.1)


class BrightnessDetector:
    """Map = brightness / 255, score = its max: frames with a bright patch fail (threshold 0.5)."""

    def __init__(self):
        from types import SimpleNamespace

        import torch

        from linewatch.model import Calibration

        self.input_size = (32, 48)
        self.model_id = "bright00"
        self.meta = SimpleNamespace(backbone="fake")
        self.device = torch.device("cpu")
        self.calibration = Calibration(image_threshold=0.5, pixel_threshold=0.4, alpha=0.1, false_reject_bound=0.1,
                                       scores=[0.1, 0.2, 0.3])

    def predict(self, batch):
        from linewatch.model import Prediction

        maps = batch.float().amax(-1) / 255.0
        return Prediction(maps=maps, scores=maps.flatten(1).amax(1))


def test_worker_hands_frames_over_only_for_wanted_previews_and_subscribers_get_them(metrics):
    """The real worker → publisher path: frames and maps go over only for the verdicts the policy picks;
    a preview subscriber gets them attached to exactly those verdicts, an ordinary one gets verdicts only."""
    from linewatch.service.frames import Frame, FrameQueue
    from linewatch.service.worker import InferenceWorker

    pub = publisher(metrics, preview="every_nth", preview_every_n=4, preview_max_px=24, preview_max_per_s=1000)
    endpoint = pub.bind()
    viewer = preview_subscriber(pub, endpoint)
    plain = Subscriber(endpoint, cameras=["a"])
    handed: list[tuple[int, bool]] = []

    def publish(v, mask, preview=None):
        handed.append((v.sequence, preview is not None))
        pub.submit_verdict(v, mask, preview)

    q = FrameQueue(100, metrics)
    fails = {1, 6}
    for seq in range(9):
        img = np.zeros((32, 48, 3), np.uint8)
        if seq in fails:
            img[8:16, 20:28] = 255
        q.put(Frame("a", seq, time.time(), time.monotonic(), img, (48, 32), (0, 0, 48, 32)))
    w = InferenceWorker(BrightnessDetector(), q, publish, metrics, max_batch=4, max_wait_ms=1, run_id="r",
                        preview=pub.wants_preview)
    w.stop(time.monotonic() + 10)
    w.start()
    w.join(30)
    assert sorted(handed) == [(s, s in fails or s % 4 == 0) for s in range(9)]
    try:
        wait_until(lambda: pub._poll_subscriptions() or pub.subscribed.is_set(), 10)
        # the viewer's two topics (preview., verdict.) were seen before; wait for the plain subscriber's own, or
        # the verdicts can go out before its subscription reaches the socket and it gets none (ZeroMQ drops them)
        wait_until(lambda: pub._poll_subscriptions() or b"verdict.a" in pub._topics, 10, what="plain subscription")
        pub.start()
        got = list(viewer.verdicts(timeout=5, count=9))
        plain_got = list(plain.verdicts(timeout=5, count=9))
    finally:
        viewer.close()
        plain.close()
        pub.close(1)
    with_preview = {0, 1, 4, 6, 8}
    assert [v.sequence for v in got] == list(range(9))
    assert {v.sequence for v in got if v.has_preview} == with_preview
    assert {v.sequence for v in got if v.preview_sent} == with_preview and viewer.previews_missed == 0
    for v in got:
        if v.has_preview:
            frame = cv2.imdecode(np.frombuffer(v.preview_jpeg, np.uint8), cv2.IMREAD_COLOR)
            heat = cv2.imdecode(np.frombuffer(v.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
            assert frame.shape == (16, 24, 3) and heat.shape == (16, 24)  # max_px 24 on a 32×48 model input
            assert (heat.max() == 255) == v.failed  # 2 × threshold = 1.0: the bright patch saturates
        else:
            assert v.heatmap_png is None
    assert [v.sequence for v in plain_got] == list(range(9)) and not any(v.has_preview for v in plain_got)
    assert plain.malformed == 0 and viewer.malformed == 0
    assert value(metrics, "linewatch_previews_total", camera="a") == len(with_preview)
