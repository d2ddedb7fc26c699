"""A ring of fixed, reused frame slots in shared memory: how a capture process hands frames to the daemon.

One writer (the capture process) and one reader (the daemon) per ring. The writer fills slot
``sequence % slots``, so when the reader falls behind the oldest unread frame is the one overwritten:
drop-oldest, as in :class:`~linewatch.service.frames.FrameQueue`. Each slot is guarded by a generation
counter (a seqlock): odd while the writer is in the slot, incremented again once the frame is complete.
The reader copies the frame out and checks that the generation did not move meanwhile; a frame that was
overwritten (or torn) is reported as gone, for the caller to count. No locks: a writer killed in the
middle of a frame cannot block the reader, it only leaves one slot that reads as gone.

Only plain numbers and bytes cross the boundary (no pickling); the reader is told which slot to read by
a small message (see :mod:`linewatch.service.capture_process`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

# generation, sequence, capture_time, capture_mono, kind, h, w, c, nbytes, frame w, frame h, roi x y w h,
# device_time, frame_id, ref length; then the ref (utf-8, at most REF_MAX bytes)
_HEAD = struct.Struct("<QqddIIIIIIIiiiiqqI")
REF_MAX = 240
HEADER_BYTES = 512  # the fixed header plus the ref, padded so every slot's pixels start 64-byte aligned
_NONE = -(2 ** 63)  # device_time / frame_id absent
KIND_PIXELS = 0  # uint8 (h, w, c) array
KIND_JPEG = 1  # the encoded bytes of a JPEG, for a device that decodes them (shape unknown: 0, 0, 0)


class SlotTooSmall(ValueError):
    """A frame does not fit in a slot (counted by the caller, never raised past it)."""


@dataclass
class SlotFrame:
    """One frame as read back from a slot (its pixels copied out of shared memory)."""

    sequence: int
    capture_time: float
    capture_mono: float
    kind: int
    data: np.ndarray  # (h, w, c) uint8 for KIND_PIXELS; 1-D uint8 bytes for KIND_JPEG
    frame_size: tuple[int, int]
    roi: tuple[int, int, int, int]
    ref: str | None
    device_time: int | None
    frame_id: int | None


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


class FrameRing:
    """``slots`` slots of ``slot_bytes`` each in one shared-memory segment.

    The daemon creates it (``FrameRing.create``) and unlinks it when the capture process is gone (restart or
    exit); the capture process attaches by name (``FrameRing.attach``) and only closes it.
    """

    def __init__(self, shm: shared_memory.SharedMemory, slots: int, slot_bytes: int, owner: bool):
        self.shm = shm
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.stride = HEADER_BYTES + _align(slot_bytes)
        self.owner = owner
        self._buf = shm.buf
        self._arr = np.frombuffer(shm.buf, np.uint8, count=slots * self.stride)
        self._closed = False

    @property
    def name(self) -> str:
        return self.shm.name

    @staticmethod
    def size_for(slots: int, slot_bytes: int) -> int:
        return slots * (HEADER_BYTES + _align(slot_bytes))

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> FrameRing:
        if slots < 1 or slot_bytes < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        shm = shared_memory.SharedMemory(create=True, size=cls.size_for(slots, slot_bytes))
        ring = cls(shm, slots, slot_bytes, owner=True)
        ring._arr[:] = 0  # fresh segments are zeroed by the kernel; explicit for clarity (generation 0: empty)
        return ring

    @classmethod
    def attach(cls, name: str, slots: int, slot_bytes: int) -> FrameRing:
        shm = shared_memory.SharedMemory(name=name, create=False)
        if shm.size < cls.size_for(slots, slot_bytes):
            shm.close()
            raise ValueError(f"shared memory {name} is smaller than {slots} slots of {slot_bytes} bytes")
        return cls(shm, slots, slot_bytes, owner=False)

    def close(self) -> None:
        """Detach (and, for the owner, unlink: the segment disappears once nobody maps it)."""
        if self._closed:
            return
        self._closed = True
        del self._arr
        self._buf = None
        try:
            self.shm.close()
        except BufferError:  # a view still exported somewhere; the mapping goes with the process
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    # -- writer (capture process)

    def write(self, sequence: int, capture_time: float, capture_mono: float, data: np.ndarray | bytes, *,
              frame_size: tuple[int, int], roi: tuple[int, int, int, int] | None, ref: str | None = None,
              device_time: int | None = None, frame_id: int | None = None) -> int:
        """Put a frame in slot ``sequence % slots`` (overwriting what is there); returns the slot.
        ``data``: a uint8 (h, w, c) array, or JPEG bytes. Raises :class:`SlotTooSmall`."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            kind, shape = KIND_JPEG, (0, 0, 0)
            flat = np.frombuffer(data, np.uint8)
        else:
            if data.dtype != np.uint8:
                raise ValueError(f"frames are uint8, not {data.dtype}")
            kind = KIND_PIXELS
            shape = (*data.shape[:2], data.shape[2] if data.ndim == 3 else 1)
            flat = np.ascontiguousarray(data).reshape(-1)
        n = flat.size
        if n > self.slot_bytes:
            raise SlotTooSmall(f"a frame of {n} bytes does not fit a {self.slot_bytes}-byte slot")
        slot = sequence % self.slots
        off = slot * self.stride
        gen = _HEAD.unpack_from(self._buf, off)[0]
        gen = gen + 1 if gen % 2 == 0 else gen + 2  # odd: being written (an odd leftover means a dead writer)
        struct.pack_into("<Q", self._buf, off, gen)
        start = off + HEADER_BYTES
        self._arr[start:start + n] = flat
        ref_b = (ref or "").encode("utf-8", "replace")[:REF_MAX]
        rx, ry, rw, rh = roi if roi is not None else (0, 0, 0, 0)
        _HEAD.pack_into(self._buf, off, gen, sequence, capture_time, capture_mono, kind, shape[0], shape[1],
                        shape[2], n, frame_size[0], frame_size[1], rx, ry, rw, rh,
                        _NONE if device_time is None else device_time, _NONE if frame_id is None else frame_id,
                        len(ref_b) if ref is not None else 0xFFFFFFFF)
        self._buf[off + _HEAD.size:off + _HEAD.size + len(ref_b)] = ref_b
        struct.pack_into("<Q", self._buf, off, gen + 1)  # even: complete
        return slot

    # -- reader (daemon)

    def read(self, slot: int, sequence: int) -> SlotFrame | None:
        """Copy frame ``sequence`` out of ``slot``; None when it was overwritten before or while we read it."""
        off = slot * self.stride
        head = _HEAD.unpack_from(self._buf, off)
        gen = head[0]
        if gen % 2 or gen == 0 or head[1] != sequence:
            return None
        (_, seq, t_wall, t_mono, kind, h, w, c, n, fw, fh, rx, ry, rw, rh, dev_t, fid, ref_len) = head
        start = off + HEADER_BYTES
        data = self._arr[start:start + n].copy()
        ref = None
        if ref_len != 0xFFFFFFFF:
            ref = bytes(self._buf[off + _HEAD.size:off + _HEAD.size + ref_len]).decode("utf-8", "replace")
        if struct.unpack_from("<Q", self._buf, off)[0] != gen:
            return None  # the writer came round while we copied: torn
        if kind == KIND_PIXELS:
            data = data.reshape((h, w, c)) if c != 1 else data.reshape((h, w))
        return SlotFrame(seq, t_wall, t_mono, kind, data, (fw, fh), (rx, ry, rw, rh), ref,
                         None if dev_t == _NONE else dev_t, None if fid == _NONE else fid)


def slot_bytes_for(input_size: tuple[int, int] | None, slot_mb: float, jpeg: bool = False) -> int:
    """Bytes per slot: an RGB frame at the model's input size (resized in the capture process), or ``slot_mb``
    MiB when frames travel at ROI resolution or as JPEG (the device resizes or decodes them; ``jpeg``: JPEG
    sources hand over their bytes, which must fit too)."""
    pixels = input_size[0] * input_size[1] * 3 if input_size is not None else 0
    if input_size is not None and not jpeg:
        return pixels
    return max(1, pixels, math.ceil(slot_mb * (1 << 20)))
