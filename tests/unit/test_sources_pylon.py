"""pylon:// against pylon's camera emulation (PYLON_CAMEMU): formats, software trigger, failed buffers.

The emulator ships inside pypylon's wheel (``linewatch[pylon]``); PYLON_CAMEMU must be in the environment
before pylon's transport layers load, so it is set when this module is imported.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("PYLON_CAMEMU", "1")
pylon = pytest.importorskip("pypylon.pylon", reason="pypylon is not installed (pip install 'linewatch[pylon]')")

from linewatch.service.config import CameraConfig  # noqa: E402
from linewatch.service.frames import FrameDecodeError, SourceError, SourceIdle, SourceLost  # noqa: E402
from linewatch.service.sources import make_source  # noqa: E402
from linewatch.service.sources.pylon import PylonSource, pixel_format_names  # noqa: E402

SERIAL = "0815-0000"  # the first emulated camera


def _emulated() -> bool:
    try:
        return any(d.GetSerialNumber() == SERIAL for d in pylon.TlFactory.GetInstance().EnumerateDevices())
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _emulated(), reason="pylon camera emulation (PYLON_CAMEMU) found no camera")


def source(**kw) -> PylonSource:
    kw.setdefault("features", {"Width": 320, "Height": 240})
    src = make_source(CameraConfig(name="cam", source=f"pylon://{SERIAL}", timeout_s=3, **kw))
    assert isinstance(src, PylonSource)
    return src


@pytest.mark.parametrize("fmt,shape,rgb", [("Mono8", (240, 320), False), ("Mono12", (240, 320), False),
                                           ("BayerRG8", (240, 320, 3), True), ("RGB8Packed", (240, 320, 3), True),
                                           ("BGR8Packed", (240, 320, 3), False)])
def test_emulated_camera_frames_in_each_format(fmt, shape, rgb):
    src = source(features={"Width": 320, "Height": 240, "PixelFormat": fmt})
    src.open()
    try:
        frames = [src.read() for _ in range(3)]
    finally:
        src.close()
    assert all(f.image.shape == shape and f.image.dtype == np.uint8 and f.rgb is rgb for f in frames)
    ids = [f.frame_id for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 3  # the camera's own block ids, increasing
    assert all(f.device_time is not None for f in frames)
    assert frames[0].image.std() > 0  # the emulator's test pattern, not an empty buffer


def test_software_trigger_one_frame_per_trigger():
    src = source(trigger="software", fps=20)
    src.open()
    try:
        node = src._camera.GetNodeMap().GetNode("TriggerMode")
        assert node.ToString() == "On"
        assert src._camera.GetNodeMap().GetNode("TriggerSource").ToString() == "Software"
        ids = [src.read().frame_id for _ in range(4)]
    finally:
        src.close()
    assert ids == list(range(ids[0], ids[0] + 4))  # consecutive: nothing grabbed between triggers


def test_hardware_trigger_without_a_trigger_is_idle_not_lost():
    src = source(trigger="hardware", features={"Width": 320, "Height": 240, "TriggerSource": "Line1"})
    src.timeout_ms = 300
    src.open()
    try:
        with pytest.raises(SourceIdle):
            src.read()
    finally:
        src.close()
    free = source()  # free-running: no frame in time is a lost camera
    free.open()
    free._camera.StopGrabbing()
    try:
        with pytest.raises(SourceLost):
            free.read()
    finally:
        free.close()


def test_failed_buffers_are_incomplete_frames_and_the_stream_goes_on():
    src = source(trigger="software", fps=20)
    src.open()
    try:
        src.read()
        nodes = src._camera.GetNodeMap()
        nodes.GetNode("ForceFailedBufferCount").FromString("2")
        nodes.GetNode("ForceFailedBuffer").Execute()
        outcomes = []
        for _ in range(4):
            try:
                outcomes.append(src.read().frame_id)
            except FrameDecodeError as exc:
                outcomes.append(exc.incomplete)
    finally:
        src.close()
    assert outcomes[:2] == ["failed_buffer", "failed_buffer"]
    assert all(isinstance(x, int) for x in outcomes[2:])


def test_unknown_serial_and_feature_are_one_line_errors():
    with pytest.raises(SourceError, match="not found.*0815-0000"):
        PylonSource(CameraConfig(name="c", source="pylon://nope", timeout_s=1)).open()
    src = source(features={"NoSuchFeature": 3})
    with pytest.raises(SourceError, match="NoSuchFeature") as err:
        src.open()
    assert "\n" not in str(err.value)
    src.close()


def test_pixel_format_names_cover_pylon_codes():
    names = pixel_format_names(pylon)
    assert names[int(pylon.PixelType_RGB8packed)] == "RGB8"
    assert names[int(pylon.PixelType_BayerBG8)] == "BayerBG8"
