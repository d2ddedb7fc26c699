"""``pylon://<serial>``: Basler cameras (GigE, USB3, CoaXPress) through Basler's pylon SDK (``pypylon``,
the optional extra ``linewatch[pylon]``; its wheels bundle the pylon runtime).

The same shape as :mod:`.aravis`: at open the trigger mode, then ``features`` by GenICam name in the
order written; grabbing keeps only the newest image (``GrabStrategy_LatestImageOnly``); each read
returns one image with the camera's block id (frame id) and timestamp; a failed grab result (incomplete
buffer, missing packets, the emulator's ``ForceFailedBuffer``) is a :class:`FrameDecodeError` with
``incomplete`` set; no result within ``timeout_s`` or a removed device is :class:`SourceLost` (with
``trigger: hardware``, no part yet from a camera still there is :class:`SourceIdle`: the loop reads again).

pylon's camera emulation (``PYLON_CAMEMU=N`` in the environment: N emulated cameras, serials
``0815-0000``…) runs every path here without hardware (tests/unit/test_sources_pylon.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from linewatch.service.frames import FrameDecodeError, RawFrame, SourceError, SourceIdle, SourceLost
from linewatch.service.sources.genicam import PFNC_CODES, convert

if TYPE_CHECKING:
    from linewatch.service.config import CameraConfig

INSTALL_HINT = "pip install 'linewatch[pylon]' (pypylon, which bundles the pylon runtime)"
# pylon's PixelType names → PFNC names (convert() works on PFNC names; the pylon codes equal PFNC's)
PYLON_NAMES = {"Mono8": "Mono8", "Mono10": "Mono10", "Mono12": "Mono12", "Mono16": "Mono16",
               "BayerRG8": "BayerRG8", "BayerGR8": "BayerGR8", "BayerGB8": "BayerGB8", "BayerBG8": "BayerBG8",
               "RGB8packed": "RGB8", "BGR8packed": "BGR8"}


def load_pylon() -> Any:
    try:
        from pypylon import pylon
    except ImportError as exc:
        raise SourceError(f"pylon:// needs pypylon ({exc}); {INSTALL_HINT}") from None
    return pylon


def pixel_format_names(pylon: Any) -> dict[int, str]:
    """pylon PixelType codes → PFNC names for the formats :func:`convert` handles."""
    names = dict(PFNC_CODES)
    for pylon_name, pfnc in PYLON_NAMES.items():
        code = getattr(pylon, f"PixelType_{pylon_name}", None)
        if code is not None:
            names[int(code)] = pfnc
    return names


def _set_feature(camera: Any, name: str, value: object) -> None:
    node = camera.GetNodeMap().GetNode(name)
    if node is None:
        raise SourceError(f"camera has no feature {name!r}; check the name in features: (GenICam names)")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    try:
        node.FromString(text)  # every node type parses its own text form; raises saying why it refuses
    except Exception as exc:  # genicam.GenericException: out of range, not writable, unknown entry…
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"cannot set feature {name} = {text!r} ({first})") from None


class PylonSource:
    """One Basler camera through pypylon; see the module docstring."""

    def __init__(self, cfg: CameraConfig):
        self.serial = cfg.source[len("pylon://"):].strip()
        self.features = dict(cfg.features)
        self.trigger = cfg.trigger
        self.timeout_ms = max(1, int(cfg.timeout_s * 1000))
        self.paced = cfg.trigger == "software"  # the capture loop paces us at fps; each read fires a trigger
        self.description = f"pylon://{self.serial}"
        self._pylon: Any = None
        self._camera: Any = None
        self._formats: dict[int, str] = {}

    def open(self) -> None:
        pylon = self._pylon = load_pylon()
        if not self.serial:
            raise SourceError("pylon:// needs the camera's serial number, e.g. pylon://40012345")
        try:
            factory = pylon.TlFactory.GetInstance()
            devices = factory.EnumerateDevices()
            match = [d for d in devices if d.GetSerialNumber() == self.serial]
            if not match:
                seen = ", ".join(d.GetSerialNumber() for d in devices[:8]) or "none"
                raise SourceError(f"pylon camera {self.serial!r} not found (cameras seen: {seen})")
            camera = pylon.InstantCamera(factory.CreateDevice(match[0]))
            camera.Open()
        except SourceError:
            raise
        except Exception as exc:  # genicam.RuntimeException and friends: camera busy, access denied…
            raise SourceError(f"cannot open {self.description} ({str(exc).splitlines()[0] if str(exc) else exc})"
                              ) from None
        self._camera = camera
        self._formats = pixel_format_names(pylon)
        try:
            if self.trigger == "none":
                if camera.GetNodeMap().GetNode("TriggerMode") is not None:
                    _set_feature(camera, "TriggerMode", "Off")
            else:
                if self.trigger == "software":
                    _set_feature(camera, "TriggerSource", "Software")
                _set_feature(camera, "TriggerMode", "On")
            for name, value in self.features.items():
                _set_feature(camera, name, value)
            camera.StartGrabbing(pylon.GrabStrategy_LatestImageOnly)
        except SourceError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise SourceError(f"cannot start {self.description} ({exc})") from None

    def read(self) -> RawFrame:
        pylon, camera = self._pylon, self._camera
        assert camera is not None
        if camera.IsCameraDeviceRemoved():
            raise SourceLost(f"{self.description}: camera removed or unreachable")
        try:
            if self.trigger == "software":
                # waits (≤ timeout) until the camera can take a trigger, then fires TriggerSoftware
                if not camera.WaitForFrameTriggerReady(self.timeout_ms, pylon.TimeoutHandling_Return):
                    raise SourceLost(f"{self.description} was not ready for a trigger within {self.timeout_ms} ms")
                camera.ExecuteSoftwareTrigger()
            # hardware trigger: no part for a while is normal, and the read returns within the timeout anyway
            hardware = self.trigger == "hardware"
            result = camera.RetrieveResult(self.timeout_ms // 2 if hardware else self.timeout_ms,
                                           pylon.TimeoutHandling_Return)
        except SourceLost:
            raise
        except Exception as exc:  # the device went away mid-call
            raise SourceLost(f"{self.description}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        if result is None or not result.IsValid():
            if hardware and not camera.IsCameraDeviceRemoved():  # pylon's heartbeat says it is there
                raise SourceIdle(f"{self.description}: no trigger")
            raise SourceLost(f"{self.description} delivered no frame within {self.timeout_ms} ms")
        try:
            frame_id = int(result.GetBlockID())
            if not result.GrabSucceeded():
                raise FrameDecodeError(f"{self.description}: frame {frame_id} failed (0x{result.GetErrorCode():x}: "
                                       f"{result.GetErrorDescription()})", ref=f"frame {frame_id}",
                                       incomplete="failed_buffer")
            code = int(result.GetPixelType())
            fmt = self._formats.get(code, f"0x{code:08x}")
            width, height = int(result.GetWidth()), int(result.GetHeight())
            if result.GetPaddingX():
                raise FrameDecodeError(f"{self.description}: rows with padding are not supported; set the camera's "
                                       "Width to a multiple of 4", ref=f"frame {frame_id}")
            image, rgb = convert(result.GetBuffer(), width, height, fmt)
            return RawFrame(image, rgb=rgb, ref=f"frame {frame_id}", device_time=int(result.GetTimeStamp()),
                            frame_id=frame_id)
        finally:
            result.Release()

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is None:
            return
        for step in (camera.StopGrabbing, camera.Close):
            try:
                step()
            except Exception:  # a removed camera: closing must not fail
                pass
