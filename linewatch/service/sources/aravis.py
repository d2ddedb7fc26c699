"""``aravis://<device id | serial | address>``: GenICam cameras (GigE Vision, USB3 Vision) through Aravis.

Aravis is a C library used through GObject introspection: Debian's ``gir1.2-aravis-0.8`` plus PyGObject
(``gi``) in the interpreter that runs linewatch (see docs/cameras.md). Neither is a Python dependency of
linewatch: a camera using this source without them is down with a one-line reason, nothing else breaks.

At open: the camera is found by device id, serial number or IP address, the trigger mode is set
(``trigger``), then the camera's ``features`` in the order written (so a feature can override the trigger
defaults, e.g. ``TriggerSource: Line2``), then acquisition starts with a few buffers (few: we want the
newest frame, not a backlog). Each read returns one buffer's image with the camera's frame id and
timestamp (a hardware-triggered camera with no part yet is :class:`SourceIdle`, not lost, while its
control channel lives); a buffer that arrived incomplete, and a frame the camera sent while no buffer was free
(underrun), is a :class:`FrameDecodeError` with ``incomplete`` set (a sequence number and a count, the
stream goes on). No buffer within ``timeout_s``, or the control channel lost (Aravis's heartbeat), is
:class:`SourceLost`: the capture loop closes, backs off and reopens.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from linewatch.service.frames import FrameDecodeError, RawFrame, SourceError, SourceIdle, SourceLost
from linewatch.service.sources.genicam import PFNC_CODES, convert

if TYPE_CHECKING:
    from linewatch.service.config import CameraConfig

N_BUFFERS = 4
POP_SLICE_S = 0.2  # a read waits in slices this long, so a lost control channel is noticed within one
INSTALL_HINT = ("install Debian's gir1.2-aravis-0.8 and PyGObject in linewatch's Python "
                "(pip install PyGObject, or python3-gi for Debian's python3); see docs/cameras.md")


def load_aravis() -> Any:
    """The Aravis module through GObject introspection, or :class:`SourceError` saying what to install."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as exc:
        raise SourceError(f"aravis:// needs Aravis 0.8 ({exc}); {INSTALL_HINT}") from None
    return Aravis


def _glib_error_text(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def find_device(aravis: Any, ident: str) -> str:
    """The Aravis device id of the camera whose device id, serial number, physical id or address is ``ident``."""
    aravis.update_device_list()
    seen = []
    for i in range(aravis.get_n_devices()):
        device_id = aravis.get_device_id(i)
        names = (device_id, aravis.get_device_serial_nbr(i), aravis.get_device_physical_id(i),
                 aravis.get_device_address(i))
        if ident in names:
            return device_id
        seen.append(device_id)
    listed = ", ".join(seen[:8]) if seen else "none"
    raise SourceError(f"aravis camera {ident!r} not found (cameras seen: {listed})")


def _set_feature(device: Any, name: str, value: object) -> None:
    node = device.get_feature(name)
    if node is None:
        raise SourceError(f"camera has no feature {name!r}; check the name in features: (GenICam names, e.g. "
                          "ExposureTime or ExposureTimeAbs depending on the camera)")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    try:
        node.set_value_from_string(text)
    except Exception as exc:  # GLib.Error: out of range, not writable, not an enumeration entry…
        raise SourceError(f"cannot set feature {name} = {text!r} ({_glib_error_text(exc)})") from None


class AravisSource:
    """One GenICam camera through Aravis; see the module docstring."""

    def __init__(self, cfg: CameraConfig):
        self.ident = cfg.source[len("aravis://"):].strip()
        self.features = dict(cfg.features)
        self.trigger = cfg.trigger
        self.timeout_s = cfg.timeout_s
        # software trigger: the capture loop paces us at fps and each read fires one trigger
        self.paced = cfg.trigger == "software"
        self.description = f"aravis://{self.ident}"
        self._aravis: Any = None
        self._camera: Any = None
        self._stream: Any = None
        self._lost = threading.Event()  # Aravis's "control-lost" signal (emitted on its heartbeat thread)
        self._underruns_seen = 0
        self._underruns_pending = 0

    def open(self) -> None:
        aravis = self._aravis = load_aravis()
        if not self.ident:
            raise SourceError("aravis:// needs a device id, serial number or address, e.g. aravis://LW01")
        device_id = find_device(aravis, self.ident)
        try:
            camera = aravis.Camera.new(device_id)
        except Exception as exc:
            raise SourceError(f"cannot open {self.description} ({_glib_error_text(exc)})") from None
        self._camera = camera
        self._lost.clear()
        device = camera.get_device()
        try:
            device.connect("control-lost", lambda *_: self._lost.set())
        except TypeError:  # not a GigE device (USB3 Vision has no such signal): the pop timeout still bounds us
            pass
        try:
            self._configure(device)
            camera.set_acquisition_mode(aravis.AcquisitionMode.CONTINUOUS)
            stream = camera.create_stream(None, None)
            payload = camera.get_payload()
            for _ in range(N_BUFFERS):
                stream.push_buffer(aravis.Buffer.new_allocate(payload))
            self._stream = stream
            self._underruns_seen = self._underruns()
            self._underruns_pending = 0
            camera.start_acquisition()
        except SourceError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise SourceError(f"cannot start {self.description} ({_glib_error_text(exc)})") from None

    def _configure(self, device: Any) -> None:
        if self.trigger == "none":
            if device.get_feature("TriggerMode") is not None:
                _set_feature(device, "TriggerMode", "Off")
        else:
            if self.trigger == "software":
                _set_feature(device, "TriggerSource", "Software")
            _set_feature(device, "TriggerMode", "On")
        for name, value in self.features.items():
            _set_feature(device, name, value)

    def _underruns(self) -> int:
        if self._stream is None:
            return 0
        # ArvStream's own statistics (n_completed, n_failures, n_underruns); ArvGvStream hides them
        # behind a method of the same name with packet statistics
        return int(self._aravis.Stream.get_statistics(self._stream)[2])

    def read(self) -> RawFrame:
        aravis, stream = self._aravis, self._stream
        assert stream is not None
        underruns = self._underruns()
        self._underruns_pending += max(0, underruns - self._underruns_seen)
        self._underruns_seen = underruns
        if self._underruns_pending:  # frames the camera sent while we had no free buffer: lost, counted
            self._underruns_pending -= 1
            raise FrameDecodeError(f"{self.description}: buffer underrun, a camera frame was lost",
                                   incomplete="underrun")
        if self.trigger == "software":
            try:
                self._camera.software_trigger()
            except Exception as exc:
                raise SourceLost(f"{self.description}: software trigger failed ({_glib_error_text(exc)})") from None
        # hardware trigger: no part for a while is normal; while the control channel lives (Aravis's heartbeat)
        # the camera is idle, not lost. The read still returns within timeout_s, for the capture watchdog.
        hardware = self.trigger == "hardware"
        end = time.monotonic() + (self.timeout_s / 2 if hardware else self.timeout_s)
        buf = None
        while buf is None:
            if self._lost.is_set():
                raise SourceLost(f"{self.description}: control channel lost (camera gone or unreachable)")
            left = end - time.monotonic()
            if left <= 0:
                if hardware:
                    raise SourceIdle(f"{self.description}: no trigger")
                raise SourceLost(f"{self.description} delivered no frame within {self.timeout_s:g} s")
            buf = stream.timeout_pop_buffer(int(min(left, POP_SLICE_S) * 1e6))
        try:
            status = buf.get_status()
            frame_id = int(buf.get_frame_id())
            if status != aravis.BufferStatus.SUCCESS:
                reason = status.value_nick.replace("-", "_") if hasattr(status, "value_nick") else str(status)
                raise FrameDecodeError(f"{self.description}: frame {frame_id} arrived {reason}",
                                       ref=f"frame {frame_id}", incomplete=reason)
            if buf.get_payload_type() not in (aravis.BufferPayloadType.IMAGE,
                                              aravis.BufferPayloadType.EXTENDED_CHUNK_DATA):
                raise FrameDecodeError(f"{self.description}: frame {frame_id} is not an image "
                                       f"({buf.get_payload_type().value_nick})", ref=f"frame {frame_id}")
            code = int(buf.get_image_pixel_format())
            fmt = PFNC_CODES.get(code, f"0x{code:08x}")
            image, rgb = convert(buf.get_image_data(), buf.get_image_width(), buf.get_image_height(), fmt)
            return RawFrame(image, rgb=rgb, ref=f"frame {frame_id}", device_time=int(buf.get_timestamp()),
                            frame_id=frame_id)
        finally:
            stream.push_buffer(buf)  # convert() copied the pixels: the buffer goes back to the camera

    def close(self) -> None:
        camera, self._camera = self._camera, None
        self._stream = None
        if camera is not None:
            try:
                camera.stop_acquisition()
            except Exception:  # the camera may be gone already: closing must not fail
                pass
