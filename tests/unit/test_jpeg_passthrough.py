"""JPEG frames decoded by the model's device (capture.jpeg_decode: device): the JPEG header parser, sources
handing over bytes, capture and the shared-memory slot carrying them, and the worker decoding them in a batch.

Here on the CPU the worker's decoder is the CPU fallback (libjpeg-turbo, bit-identical to cv2.imdecode), so
the very path a GPU runs is exercised, and scores must equal those of frames decoded in capture."""

from __future__ import annotations

import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import structlog
import torch
from fakes import BrightnessDetector, MJPEGCamera, QueueDrainer, drain_worker, jpeg, value, write_jpegs

from linewatch.errors import LinewatchError
from linewatch.imaging.images import JPEGHeaderError, jpeg_size, list_images
from linewatch.service.capture import CameraThread, prepare
from linewatch.service.capture_process import CameraProcess, _ChildLoop
from linewatch.service.config import CameraConfig, CaptureConfig
from linewatch.service.frames import Frame, FrameDecodeError, FrameQueue, RawFrame, SourceError
from linewatch.service.shm import KIND_JPEG, KIND_PIXELS, FrameRing, slot_bytes_for
from linewatch.service.sources.files import DirSource
from linewatch.service.sources.mjpeg import MJPEGSource
from linewatch.service.telemetry.prometheus import Metrics
from linewatch.tools.harness import wait_until

H = W = 16


def encode(img: np.ndarray, *flags: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, list(flags))
    assert ok
    return buf.tobytes()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def part(bright: bool, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A dark frame; ``bright``: a 16×16 white square in it (the fake detector fails it)."""
    img = np.full((*size, 3), 20, np.uint8)
    if bright:
        img[16:32, 24:40] = 255
    return img


def jpeg_frame(cam: str, seq: int, blob: bytes, roi=None, input_size=(H, W)) -> Frame:
    """A frame as capture hands it over in device mode: the JPEG bytes, size and ROI from its header."""
    image, size, eff = prepare(RawFrame(None, rgb=True, ref=f"{seq:03d}.jpg", jpeg=blob), roi, input_size)
    assert image is None
    return Frame(cam, seq, time.time(), time.monotonic(), None, size, eff, f"{seq:03d}.jpg", jpeg=blob)


def pixel_frame(cam: str, seq: int, img_bgr: np.ndarray, roi=None, input_size=(H, W)) -> Frame:
    """The same frame decoded in capture (capture mode): cropped, resized and RGB, as capture does it."""
    image, size, eff = prepare(RawFrame(img_bgr, rgb=False, ref=f"{seq:03d}.jpg"), roi, input_size)
    return Frame(cam, seq, time.time(), time.monotonic(), image, size, eff, f"{seq:03d}.jpg")


# --------------------------------------------------------------------------- the JPEG header


def test_jpeg_size_reads_baseline_progressive_and_grey_headers():
    img = noise(37, 53)
    assert jpeg_size(encode(img)) == (53, 37)
    assert jpeg_size(encode(img, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)) == (53, 37)
    assert jpeg_size(encode(img[:, :, 0])) == (53, 37)
    assert jpeg_size(bytearray(encode(img))) == (53, 37)
    assert jpeg_size(np.frombuffer(encode(img), np.uint8)) == (53, 37)  # a slot's bytes


def test_jpeg_size_skips_metadata_segments_and_fill_bytes():
    blob = encode(noise(20, 30))
    app1 = b"\xff\xe1" + (2 + 3000).to_bytes(2, "big") + b"Exif\x00\x00" + b"\xc0" * 2994  # SOF-like bytes inside
    assert jpeg_size(blob[:2] + app1 + b"\xff\xff" + blob[2:]) == (30, 20)


@pytest.mark.parametrize("blob", [
    b"", b"garbage", b"\xff\xd8", b"\xff\xd8\xff\xd9",
    pytest.param("png", id="png"), pytest.param("cut", id="cut-before-sof"), pytest.param("zero", id="0x0"),
])
def test_jpeg_size_rejects_a_blob_without_a_frame_header(blob):
    img = noise(20, 30)
    if blob == "png":
        blob = cv2.imencode(".png", img)[1].tobytes()
    elif blob == "cut":
        full = encode(img)
        blob = full[:full.index(b"\xff\xc0") + 3]
    elif blob == "zero":
        full = bytearray(encode(img))
        i = full.index(b"\xff\xc0")
        full[i + 5:i + 9] = b"\x00\x00\x00\x00"  # height and width 0
        blob = bytes(full)
    with pytest.raises(JPEGHeaderError) as err:
        jpeg_size(blob)
    assert isinstance(err.value, LinewatchError) and "\n" not in str(err.value) and str(err.value)


# --------------------------------------------------------------------------- sources and capture


def test_prepare_keeps_the_bytes_and_checks_the_roi_against_the_header():
    blob = encode(noise(48, 64))
    image, size, roi = prepare(RawFrame(None, rgb=True, jpeg=blob), None, (H, W))
    assert image is None and size == (64, 48) and roi == (0, 0, 64, 48)
    assert prepare(RawFrame(None, rgb=True, jpeg=blob), (40, 30, 100, 100), None)[2] == (40, 30, 24, 18)
    with pytest.raises(SourceError, match="outside the 64x48 frame"):
        prepare(RawFrame(None, rgb=True, jpeg=blob), (64, 0, 8, 8), None)


def test_dir_source_hands_over_jpeg_files_undecoded(tmp_path):
    good = encode(noise(24, 32))
    (tmp_path / "a.jpg").write_bytes(good)
    cv2.imwrite(str(tmp_path / "b.png"), noise(24, 32, 1))
    (tmp_path / "c.jpeg").write_bytes(b"not a jpeg at all")
    (tmp_path / "d.JPG").write_bytes(encode(noise(10, 12, 2), cv2.IMWRITE_JPEG_PROGRESSIVE, 1))

    src = DirSource(tmp_path, loop=False)
    src.jpeg_passthrough = True
    src.open()
    a = src.read()
    assert a.jpeg == good and a.image is None and a.ref == "a.jpg"
    b = src.read()
    assert b.jpeg is None and b.image.shape == (24, 32, 3) and b.ref == "b.png"  # PNG: decoded here
    with pytest.raises(FrameDecodeError) as err:  # no JPEG header and not decodable: counted in capture
        src.read()
    assert err.value.ref == "c.jpeg"
    d = src.read()
    assert d.jpeg is not None and jpeg_size(d.jpeg) == (12, 10)
    assert src.read() is None

    plain = DirSource(tmp_path, loop=False)  # capture mode: everything decoded here, as before
    plain.open()
    first = plain.read()
    assert first.jpeg is None and first.image.shape == (24, 32, 3)


def test_mjpeg_source_hands_over_parts_undecoded():
    cam = MJPEGCamera(size=(24, 32), interval_s=0.01)
    try:
        src = MJPEGSource(cam.url("/corrupt"), timeout_s=5)  # every third part is b"garbage"
        src.jpeg_passthrough = True
        src.open()
        for i in range(2):
            raw = src.read()
            assert raw.image is None and raw.jpeg == jpeg(i, (24, 32)) and jpeg_size(raw.jpeg) == (32, 24)
        with pytest.raises(FrameDecodeError):  # no JPEG header: tried here, counted as before
            src.read()
        src.close()
    finally:
        cam.stop()


def test_a_capture_thread_queues_jpeg_frames_with_their_header_size(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(encode(noise(30, 40, i)))
    m = Metrics()
    q = FrameQueue(100, m)
    cfg = CameraConfig(name="cam", source=f"dir://{tmp_path}", roi=(10, 5, 100, 100))
    cam = CameraThread(cfg, q, m, (H, W), jpeg=True)
    drainer = QueueDrainer(q)
    cam.start()
    try:
        wait_until(lambda: len(drainer.frames) == 3, 30, what="three frames")
    finally:
        cam.stop()
        cam.join(10)
        drainer.close()
    for i, f in enumerate(drainer.frames):
        assert f.image is None and f.jpeg == (tmp_path / f"{i}.jpg").read_bytes()
        assert f.frame_size == (40, 30) and f.roi == (10, 5, 30, 25)


# --------------------------------------------------------------------------- the shared-memory slot


class FakeConn:
    """The child's end of the pipe: keeps what it is sent."""

    def __init__(self):
        self.sent: list[bytes] = []

    def send_bytes(self, b: bytes) -> None:
        self.sent.append(b)

    def events(self) -> list[dict]:
        import json

        return [json.loads(b[1:]) for b in self.sent if b[:1] == b"J"]


def child(ring: FrameRing, input_size, roi=None) -> tuple[_ChildLoop, FakeConn]:
    import threading

    cfg = CameraConfig(name="cam", source="dir:///nowhere", roi=roi)
    conn = FakeConn()
    loop = _ChildLoop(cfg, input_size, SimpleNamespace(description="fake", paced=True), conn, ring,
                      threading.Event(), 0, 60.0, jpeg=True)
    return loop, conn


def daemon_side(q: FrameQueue, m: Metrics) -> CameraProcess:
    cfg = CameraConfig(name="cam", source="dir:///nowhere")
    return CameraProcess(cfg, q, m, (H, W), slots=2, slot_bytes=1)  # not started: only its message handling


def test_a_jpeg_travels_through_its_slot_as_bytes():
    blob = encode(noise(48, 64))
    ring = FrameRing.create(2, 1 << 16)
    try:
        loop, conn = child(ring, (H, W), roi=(8, 4, 32, 32))
        loop._frame(RawFrame(None, rgb=True, ref="x.jpg", jpeg=blob), 5, 1.0, 2.0, 0.0)
        got = ring.read(5 % 2, 5)
        assert got.kind == KIND_JPEG and got.data.tobytes() == blob
        assert got.frame_size == (64, 48) and got.roi == (8, 4, 32, 32) and got.ref == "x.jpg"
        assert not [e for e in conn.events() if e["e"] == "count"]

        m = Metrics()
        q = FrameQueue(10, m)
        daemon_side(q, m)._take(ring, 5 % 2, 5)
        (f,) = q.drain()
        assert f.jpeg == blob and f.image is None and f.frame_size == (64, 48) and f.roi == (8, 4, 32, 32)
    finally:
        ring.close()


def test_a_jpeg_larger_than_its_slot_is_decoded_in_capture_not_lost():
    img = noise(48, 64)
    blob = encode(img)
    slot = slot_bytes_for((H, W), 8.0)  # capture mode's slot: a 16×16 frame, much smaller than the JPEG
    assert len(blob) > slot
    ring = FrameRing.create(2, slot)
    try:
        loop, conn = child(ring, (H, W), roi=(8, 4, 32, 32))
        loop._frame(RawFrame(None, rgb=True, ref="big.jpg", jpeg=blob), 0, 1.0, 2.0, 0.0)
        got = ring.read(0, 0)
        assert got is not None and got.kind == KIND_PIXELS
        expect, _, _ = prepare(RawFrame(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), rgb=False),
                               (8, 4, 32, 32), (H, W))
        assert np.array_equal(got.data, expect)  # what capture mode would have queued
        assert got.frame_size == (64, 48) and got.roi == (8, 4, 32, 32)
        counted = [e for e in conn.events() if e["e"] == "count"]
        assert [e["what"] for e in counted] == ["jpeg_decoded_here"]
        assert conn.sent[-1][:1] == b"F"  # and the frame was announced

        # an over-size JPEG that does not decode either: a decode error, as in capture mode
        conn.sent.clear()
        bad = blob[:len(blob) // 4]
        assert len(bad) > slot
        loop._frame(RawFrame(None, rgb=True, ref="bad.jpg", jpeg=bad), 1, 1.0, 2.0, 0.0)
        counted = [e for e in conn.events() if e["e"] == "count"]
        assert [e["what"] for e in counted] == ["jpeg_decoded_here", "decode_error"]
        assert counted[1]["seq"] == 1 and counted[1]["info"]["file"] == "bad.jpg"
        assert not [b for b in conn.sent if b[:1] == b"F"]

        # the daemon's side: counted each time, logged once
        m = Metrics()
        cam = daemon_side(FrameQueue(10, m), m)
        with structlog.testing.capture_logs() as logs:
            for seq in (0, 2):
                cam._event({"e": "count", "what": "jpeg_decoded_here", "seq": seq, "info": {"error": "big"}})
        assert cam.jpeg_decoded_here == 2
        assert [e["event"] for e in logs] == ["jpeg_decoded_in_capture"]
        assert value(m, "linewatch_frames_dropped_total", camera="cam", reason="decode_error") == 0
    finally:
        ring.close()


def test_slot_size_leaves_room_for_jpegs():
    assert slot_bytes_for((H, W), 1.0) == H * W * 3
    assert slot_bytes_for((H, W), 1.0, jpeg=True) == 1 << 20
    assert slot_bytes_for((1024, 1024), 1.0, jpeg=True) == 1024 * 1024 * 3  # never smaller than a frame
    assert slot_bytes_for(None, 2.0, jpeg=True) == 2 << 20


def test_jpeg_decode_setting():
    assert CaptureConfig().jpeg_decode == "auto"
    assert CaptureConfig(jpeg_decode="auto").jpeg_on_device(True)
    assert not CaptureConfig(jpeg_decode="auto").jpeg_on_device(False)
    assert CaptureConfig(jpeg_decode="device").jpeg_on_device(False)
    assert not CaptureConfig(jpeg_decode="capture").jpeg_on_device(True)
    with pytest.raises(ValueError):
        CaptureConfig(jpeg_decode="gpu")


# --------------------------------------------------------------------------- the worker


class FakeDetector(BrightnessDetector):
    """Score = brightest pixel / 255 over a 16×16 input; keeps the input images it was given."""

    def __init__(self):
        super().__init__(keep_inputs=True)


class DecodingDetector(FakeDetector):
    """Resizes on its "device" (frames at ROI resolution through predict_frames) and decodes JPEGs itself."""

    device_preprocess = True

    def __init__(self):
        super().__init__()
        self.decoded_batches: list[int] = []
        self.frame_kinds: list[tuple[str, tuple[int, ...]]] = []

    def decode_jpegs(self, blobs):
        from linewatch.model.preprocess import decode_jpegs

        self.decoded_batches.append(len(blobs))
        return decode_jpegs(blobs, self.device)

    def predict(self, batch):  # pragma: no cover - must not be called
        raise AssertionError("predict() called although the device preprocesses")

    def predict_frames(self, frames):
        self.frame_kinds.extend((type(f).__name__, tuple(f.shape)) for f in frames)
        host = [f.numpy() if isinstance(f, torch.Tensor) else f for f in frames]
        resized = np.stack([cv2.resize(np.ascontiguousarray(f), (W, H), interpolation=cv2.INTER_AREA) for f in host])
        return FakeDetector.predict(self, torch.from_numpy(resized))


def mixed_batch() -> list[Frame]:
    """JPEG frames (pass, fail, corrupt, fail) and capture-decoded pixel frames, two cameras."""
    good = encode(part(False))
    cut = encode(part(True))
    frames = [
        jpeg_frame("a", 0, good),
        jpeg_frame("a", 1, encode(part(True))),
        jpeg_frame("a", 2, cut[:len(cut) // 2]),  # a valid header, but cut short: does not decode
        pixel_frame("b", 0, part(True)),
        jpeg_frame("a", 3, encode(part(True), cv2.IMWRITE_JPEG_PROGRESSIVE, 1), roi=(16, 8, 32, 32)),
        pixel_frame("b", 1, part(False)),
    ]
    assert frames[2].frame_size == (64, 48)  # its header parsed: capture handed it over
    return frames


def test_a_corrupt_jpeg_costs_only_itself():
    with structlog.testing.capture_logs() as logs:
        items, m, _ = drain_worker(mixed_batch(), FakeDetector(), max_batch=8)
    got = {(v.camera, v.sequence): v for v, _ in items}
    assert sorted(got) == [("a", 0), ("a", 1), ("a", 3), ("b", 0), ("b", 1)]
    assert [got[k].verdict for k in sorted(got)] == ["pass", "fail", "fail", "fail", "pass"]
    assert got[("a", 3)].roi == (16, 8, 32, 32) and got[("a", 1)].frame_width == 64
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="decode_error") == 1
    assert value(m, "linewatch_decode_errors_total", camera="a") == 1
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="inference_error") == 0
    errors = [e for e in logs if e["event"] == "decode_error"]
    assert len(errors) == 1 and errors[0]["camera"] == "a" and errors[0]["seq"] == 2 and errors[0]["ref"] == "002.jpg"
    assert "\n" not in errors[0]["error"]
    assert not [e for e in logs if e["event"] == "inference_failed"]


def test_a_batch_of_only_corrupt_jpegs_is_no_inference_failure():
    cut = encode(part(False))
    frames = [jpeg_frame("a", i, cut[:len(cut) // 2]) for i in range(3)]
    items, m, w = drain_worker(frames, FakeDetector(), max_batch=8)
    assert items == [] and w.consecutive_failures == 0 and w.batches == 1
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="decode_error") == 3


def test_jpeg_frames_reach_a_preprocessing_device_as_decoded_roi_tensors():
    det = DecodingDetector()
    items, m, _ = drain_worker(mixed_batch(), det, max_batch=8)
    assert det.decoded_batches == [4]  # every JPEG of the batch in one decoder call
    assert det.frame_kinds == [("Tensor", (48, 64, 3)), ("Tensor", (48, 64, 3)), ("ndarray", (H, W, 3)),
                               ("Tensor", (32, 32, 3)), ("ndarray", (H, W, 3))]  # ROI cropped on the tensor
    assert sorted((v.camera, v.sequence, v.verdict) for v, _ in items) == [
        ("a", 0, "pass"), ("a", 1, "fail"), ("a", 3, "fail"), ("b", 0, "fail"), ("b", 1, "pass")]
    assert value(m, "linewatch_frames_dropped_total", camera="a", reason="decode_error") == 1


def test_the_model_sees_the_same_pixels_as_when_capture_decodes():
    imgs = [noise(48, 64, s) for s in range(4)]
    roi = (5, 3, 50, 40)
    by_jpeg, by_capture = FakeDetector(), FakeDetector()
    drain_worker([jpeg_frame("a", i, encode(im)) for i, im in enumerate(imgs)]
                 + [jpeg_frame("r", i, encode(im), roi=roi) for i, im in enumerate(imgs)], by_jpeg)
    drain_worker([pixel_frame("a", i, cv2.imdecode(np.frombuffer(encode(im), np.uint8), cv2.IMREAD_COLOR))
                  for i, im in enumerate(imgs)]
                 + [pixel_frame("r", i, cv2.imdecode(np.frombuffer(encode(im), np.uint8), cv2.IMREAD_COLOR), roi=roi)
                    for i, im in enumerate(imgs)], by_capture)
    assert len(by_jpeg.inputs) == len(by_capture.inputs) == 8
    for a, b in zip(by_jpeg.inputs, by_capture.inputs, strict=True):
        assert np.array_equal(a, b)


def test_device_mode_scores_equal_capture_mode_with_the_real_model(untrained_bundle, bottle, tmp_path):
    from linewatch.model import load_detector

    torch.set_num_threads(1)
    det = load_detector(untrained_bundle, "cpu")
    paths = list_images(bottle / "test" / "broken_large")[:3] + list_images(bottle / "test" / "good")[:3]
    files = write_jpegs(paths, tmp_path, progressive_every=3)
    roi = (100, 50, 700, 800)
    device = [jpeg_frame("cam", i, p.read_bytes(), roi=roi if i % 2 else None, input_size=det.input_size)
              for i, p in enumerate(files)]
    capture = [pixel_frame("cam", i, cv2.imread(str(p), cv2.IMREAD_COLOR), roi=roi if i % 2 else None,
                           input_size=det.input_size) for i, p in enumerate(files)]
    a, _, _ = drain_worker(device, det, max_batch=4, masks="all")
    b, _, _ = drain_worker(capture, det, max_batch=4, masks="all")
    va = {v.sequence: (v, mask) for v, mask in a}
    vb = {v.sequence: (v, mask) for v, mask in b}
    assert sorted(va) == sorted(vb) == list(range(len(files)))
    for i in range(len(files)):
        assert va[i][0].score == pytest.approx(vb[i][0].score, abs=1e-6)
        assert va[i][0].verdict == vb[i][0].verdict and va[i][0].roi == vb[i][0].roi
        assert np.array_equal(va[i][1], vb[i][1])


def test_the_host_image_is_fetched_only_for_frames_that_need_it(tmp_path):
    from linewatch.service.config import ArchiveConfig
    from linewatch.service.observers.archive import RejectArchive

    fetched: list[tuple[str, int]] = []
    real = Frame.host_image

    def spy(self):
        fetched.append((self.camera, self.sequence))
        return real(self)

    frames = [jpeg_frame("a", i, encode(part(i in (1, 4)))) for i in range(6)]
    m = Metrics()
    archive = RejectArchive(ArchiveConfig(enabled=True, dir=tmp_path / "rejects"), m, 0.4)  # not started
    previewed = {3}
    Frame.host_image = spy  # type: ignore[method-assign]
    try:
        items, _, _ = drain_worker(frames, FakeDetector(), max_batch=8, observers=[archive.observe],
                                   preview=lambda v: v.sequence in previewed)
    finally:
        Frame.host_image = real  # type: ignore[method-assign]
    assert len(items) == 6
    assert sorted(fetched) == [("a", 1), ("a", 3), ("a", 4)]  # the two fails (archive) and the preview
    assert all(f.jpeg is None for f in frames)  # released once decoded
    archived = [(img, v.sequence) for img, _, v in archive._pending]
    assert [s for _, s in archived] == [1, 4]
    assert all(isinstance(img, np.ndarray) and img.shape == (48, 64, 3) for img, _ in archived)
    assert [f._host is not None for f in frames] == [False, True, False, True, True, False]


def test_host_image_copies_a_device_tensor_once():
    t = torch.arange(2 * 3 * 3, dtype=torch.uint8).reshape(2, 3, 3)
    f = Frame("a", 0, 0.0, 0.0, t[:, 1:], (3, 2), (1, 0, 2, 2))
    host = f.host_image()
    assert isinstance(host, np.ndarray) and host.flags.c_contiguous and np.array_equal(host, t[:, 1:].numpy())
    assert f.host_image() is host
    arr = np.zeros((2, 2, 3), np.uint8)
    assert Frame("a", 1, 0.0, 0.0, arr, (2, 2), (0, 0, 2, 2)).host_image() is arr
    with pytest.raises(ValueError, match="not been decoded"):
        Frame("a", 2, 0.0, 0.0, None, (2, 2), (0, 0, 2, 2), jpeg=b"\xff\xd8").host_image()



def test_the_bench_triggered_source_passes_the_setting_to_its_folder(tmp_path):
    from linewatch.tools.bench.sources import RoomQueue, TriggeredSource

    (tmp_path / "a.jpg").write_bytes(encode(noise(8, 8)))
    inner = DirSource(tmp_path, loop=False)
    src = TriggeredSource(inner, RoomQueue(4, Metrics()), "cam")
    assert hasattr(src, "jpeg_passthrough") and not src.jpeg_passthrough
    cam = CameraThread(CameraConfig(name="cam", source=f"dir://{tmp_path}"), FrameQueue(4, Metrics()), Metrics(),
                       (H, W), source=src, jpeg=True)
    assert cam.source is src and inner.jpeg_passthrough and src.jpeg_passthrough
