"""aravis:// against a fake Aravis module (no camera, no gi): device lookup, trigger and features at open, buffer
statuses and underruns as counted incomplete frames, lost control. The real fake GigE camera is in
tests/integration/test_aravis.py."""

from __future__ import annotations

import enum
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from linewatch.service.config import CameraConfig
from linewatch.service.frames import FrameDecodeError, FrameQueue, RawFrame, SourceError, SourceIdle, SourceLost
from linewatch.service.sources import aravis as aravis_mod
from linewatch.service.sources.aravis import AravisSource, find_device, load_aravis
from linewatch.service.sources.genicam import mosaic


class Status(enum.Enum):
    SUCCESS = 0
    MISSING_PACKETS = 3

    @property
    def value_nick(self) -> str:
        return self.name.lower().replace("_", "-")


class PayloadType(enum.Enum):
    IMAGE = 1
    EXTENDED_CHUNK_DATA = 2
    CHUNK_DATA = 3


class Node:
    def __init__(self, device, name):
        self.device, self.name = device, name

    def set_value_from_string(self, text):
        if text == "bad":
            raise RuntimeError("value out of range")
        self.device.written.append((self.name, text))


class Device:
    def __init__(self, features):
        self.features = set(features)
        self.written: list[tuple[str, str]] = []
        self.handlers = {}

    def get_feature(self, name):
        return Node(self, name) if name in self.features else None

    def connect(self, signal, cb):
        self.handlers[signal] = cb


class Buffer:
    def __init__(self, data, w, h, code, status=Status.SUCCESS, frame_id=7, ts=123):
        self.data, self.w, self.h, self.code, self.status, self.fid, self.ts = data, w, h, code, status, frame_id, ts

    def get_status(self):
        return self.status

    def get_frame_id(self):
        return self.fid

    def get_payload_type(self):
        return PayloadType.IMAGE

    def get_image_pixel_format(self):
        return self.code

    def get_image_data(self):
        return self.data

    def get_image_width(self):
        return self.w

    def get_image_height(self):
        return self.h

    def get_timestamp(self):
        return self.ts


class Stream:
    def __init__(self, buffers):
        self.buffers = list(buffers)
        self.pushed = 0
        self.underruns = 0

    def push_buffer(self, b):
        self.pushed += 1

    def timeout_pop_buffer(self, timeout_us):
        return self.buffers.pop(0) if self.buffers else None

    def get_statistics(self):  # ArvGvStream's packet statistics: not what we read
        return (0, 0)


class Camera:
    def __init__(self, device, stream):
        self.device, self.stream = device, stream
        self.started = self.stopped = False
        self.triggers = 0

    def get_device(self):
        return self.device

    def set_acquisition_mode(self, mode):
        pass

    def create_stream(self, cb, data):
        return self.stream

    def get_payload(self):
        return 64

    def start_acquisition(self):
        self.started = True

    def stop_acquisition(self):
        self.stopped = True

    def software_trigger(self):
        self.triggers += 1


def fake_aravis(camera: Camera, devices=(("Aravis-Fake-LW01", "LW01", "phys-1", "127.0.0.1"),)):
    opened = []

    def new(device_id):
        opened.append(device_id)
        return camera

    return SimpleNamespace(
        update_device_list=lambda: None, get_n_devices=lambda: len(devices),
        get_device_id=lambda i: devices[i][0], get_device_serial_nbr=lambda i: devices[i][1],
        get_device_physical_id=lambda i: devices[i][2], get_device_address=lambda i: devices[i][3],
        Camera=SimpleNamespace(new=new), AcquisitionMode=SimpleNamespace(CONTINUOUS=1),
        Buffer=SimpleNamespace(new_allocate=lambda size: object()),
        Stream=SimpleNamespace(get_statistics=lambda s: (0, 0, s.underruns)),
        BufferStatus=Status, BufferPayloadType=PayloadType, opened=opened)


def make(monkeypatch, buffers, device_features=("TriggerMode", "TriggerSource", "PixelFormat", "Gain"), **cfg):
    cam = Camera(Device(device_features), Stream(buffers))
    fake = fake_aravis(cam)
    monkeypatch.setattr(aravis_mod, "load_aravis", lambda: fake)
    cfg.setdefault("timeout_s", 0.05)
    src = AravisSource(CameraConfig(name="c", source="aravis://LW01", **cfg))
    return src, cam, fake


@pytest.mark.parametrize("ident", ["Aravis-Fake-LW01", "LW01", "phys-1", "127.0.0.1"])
def test_find_device_by_id_serial_physical_id_or_address(ident):
    assert find_device(fake_aravis(None), ident) == "Aravis-Fake-LW01"


def test_unknown_camera_lists_what_was_seen():
    with pytest.raises(SourceError, match=r"'nope' not found \(cameras seen: Aravis-Fake-LW01\)"):
        find_device(fake_aravis(None), "nope")


def test_missing_gi_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gi", None)  # import gi → ImportError
    with pytest.raises(SourceError, match="gir1.2-aravis-0.8") as err:
        load_aravis()
    assert "\n" not in str(err.value)


def test_open_sets_trigger_then_features_in_order_and_reads_bayer(monkeypatch):
    scene = np.zeros((4, 6, 3), np.uint8)
    scene[:] = (200, 100, 30)
    buf = Buffer(mosaic(scene, "BayerRG8").tobytes(), 6, 4, 0x01080009, frame_id=41, ts=999)
    src, cam, fake = make(monkeypatch, [buf], trigger="software", fps=5,
                          features={"PixelFormat": "BayerRG8", "Gain": 2.5})
    src.open()
    assert cam.device.written == [("TriggerSource", "Software"), ("TriggerMode", "On"),
                                  ("PixelFormat", "BayerRG8"), ("Gain", "2.5")]
    assert cam.started and fake.opened == ["Aravis-Fake-LW01"] and src.paced
    f = src.read()
    assert cam.triggers == 1  # software trigger: one per read
    assert f.rgb and f.image.shape == (4, 6, 3) and f.frame_id == 41 and f.device_time == 999
    assert cam.stream.pushed == aravis_mod.N_BUFFERS + 1  # the buffer went back to the camera
    src.close()
    assert cam.stopped


def test_free_running_switches_trigger_off(monkeypatch):
    src, cam, _ = make(monkeypatch, [])
    src.open()
    assert cam.device.written == [("TriggerMode", "Off")] and not src.paced


def test_missing_or_refused_feature_fails_open_and_closes(monkeypatch):
    src, cam, _ = make(monkeypatch, [], features={"ExposureTime": 5000})
    with pytest.raises(SourceError, match="no feature 'ExposureTime'"):
        src.open()
    assert cam.stopped
    src, cam, _ = make(monkeypatch, [], features={"Gain": "bad"})
    with pytest.raises(SourceError, match="cannot set feature Gain = 'bad' .value out of range"):
        src.open()


def test_incomplete_buffer_and_underruns_are_counted_frames_and_the_stream_goes_on(monkeypatch):
    good = Buffer(bytes(range(16)), 4, 4, 0x01080001, frame_id=9)
    bad = Buffer(b"", 4, 4, 0x01080001, status=Status.MISSING_PACKETS, frame_id=8)
    src, cam, _ = make(monkeypatch, [bad, good])
    src.open()
    with pytest.raises(FrameDecodeError) as err:
        src.read()
    assert err.value.incomplete == "missing_packets" and err.value.ref == "frame 8"
    cam.stream.underruns = 2  # the camera sent two frames while we had no free buffer
    reasons = []
    for _ in range(2):
        with pytest.raises(FrameDecodeError) as err:
            src.read()
        reasons.append(err.value.incomplete)
    assert reasons == ["underrun", "underrun"]
    assert src.read().frame_id == 9
    assert cam.stream.pushed == aravis_mod.N_BUFFERS + 2  # both popped buffers were given back


def test_no_buffer_within_timeout_is_lost(monkeypatch):
    src, _, _ = make(monkeypatch, [])
    src.open()
    with pytest.raises(SourceLost, match="no frame within 0.05 s"):
        src.read()


def test_control_lost_signal_ends_the_read(monkeypatch):
    src, cam, _ = make(monkeypatch, [], timeout_s=30)
    src.open()
    cam.device.handlers["control-lost"](cam.device)  # Aravis's heartbeat thread gave up on the camera
    with pytest.raises(SourceLost, match="control channel lost"):
        src.read()


def test_hardware_trigger_waiting_for_a_part_is_idle_until_control_is_lost(monkeypatch):
    src, cam, _ = make(monkeypatch, [], trigger="hardware", timeout_s=0.1)
    src.open()
    assert ("TriggerMode", "On") in cam.device.written and ("TriggerSource", "Software") not in cam.device.written
    with pytest.raises(SourceIdle):
        src.read()
    cam.device.handlers["control-lost"](cam.device)
    with pytest.raises(SourceLost):
        src.read()


class IdleThenParts:
    """A hardware-triggered camera: idle for a while, then two parts, then idle again."""

    paced = False
    description = "idle-then-parts"

    def __init__(self):
        self.script = ["idle", "idle", "part", "idle", "part"]
        self.done = threading.Event()

    def open(self):
        pass

    def read(self):
        step = self.script.pop(0) if self.script else "end"
        if step == "idle":
            raise SourceIdle("no trigger")
        if step == "part":
            return RawFrame(np.zeros((8, 8, 3), np.uint8), rgb=True, frame_id=len(self.script))
        self.done.set()
        return None

    def close(self):
        pass


def test_capture_loop_keeps_an_idle_camera_up_and_numbers_only_parts():
    from linewatch.service.capture import CameraThread
    from linewatch.service.telemetry.prometheus import Metrics

    metrics = Metrics()
    metrics.init_cameras(["c"])
    q = FrameQueue(8, metrics)
    states = []
    src = IdleThenParts()
    t = CameraThread(CameraConfig(name="c", source="dir:///x", trigger="hardware"), q, metrics, (4, 4),
                     on_state=lambda cam, state, reason: states.append(state), source=src)
    t.start()
    assert src.done.wait(10)
    t.join(10)
    frames = q.drain()
    assert [f.sequence for f in frames] == [0, 1] and [f.frame_id for f in frames] == [2, 0]
    assert "down" not in states  # idle is not lost: no down, no reconnect
    assert metrics.reconnects.labels("c")._value.get() == 0
    assert metrics.dropped.labels("c", "decode_error")._value.get() == 0
