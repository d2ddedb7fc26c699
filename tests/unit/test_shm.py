"""The shared-memory frame ring: round trips, drop-oldest by overwriting, torn reads, unlinking."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from linewatch.service.shm import KIND_JPEG, KIND_PIXELS, FrameRing, SlotTooSmall, slot_bytes_for


def img(v: int, shape=(8, 10, 3)) -> np.ndarray:
    a = np.full(shape, v, np.uint8)
    a[0, 0] = (v + 1) % 256  # not flat: a reshape mistake would show
    return a


@pytest.fixture
def ring():
    r = FrameRing.create(3, 8 * 10 * 3)
    yield r
    r.close()


def test_round_trip_keeps_pixels_and_metadata(ring):
    reader = FrameRing.attach(ring.name, 3, 8 * 10 * 3)  # the other side, as a capture process would
    try:
        slot = reader.write(7, 1234.5, 99.25, img(5), frame_size=(900, 800), roi=(1, 2, 30, 40), ref="007.png",
                            device_time=123456789, frame_id=42)
        assert slot == 7 % 3
        got = ring.read(slot, 7)
        assert got is not None and got.kind == KIND_PIXELS
        assert np.array_equal(got.data, img(5)) and not np.shares_memory(got.data, ring._arr)  # a copy
        assert (got.sequence, got.capture_time, got.capture_mono) == (7, 1234.5, 99.25)
        assert got.frame_size == (900, 800) and got.roi == (1, 2, 30, 40) and got.ref == "007.png"
        assert got.device_time == 123456789 and got.frame_id == 42
        # absent optional fields stay absent; an empty ref stays empty
        reader.write(8, 0.0, 0.0, img(6), frame_size=(10, 8), roi=None)
        got = ring.read(8 % 3, 8)
        assert got.ref is None and got.device_time is None and got.frame_id is None and got.roi == (0, 0, 0, 0)
        reader.write(9, 0.0, 0.0, img(6), frame_size=(10, 8), roi=None, ref="")
        assert ring.read(0, 9).ref == ""
    finally:
        reader.close()


def test_grey_and_jpeg_frames(ring):
    ring.write(0, 0.0, 0.0, np.full((4, 5), 9, np.uint8), frame_size=(5, 4), roi=None)
    got = ring.read(0, 0)
    assert got.data.shape == (4, 5) and (got.data == 9).all()
    blob = b"\xff\xd8jpeg-bytes\xff\xd9"
    ring.write(1, 0.0, 0.0, blob, frame_size=(0, 0), roi=None)
    got = ring.read(1, 1)
    assert got.kind == KIND_JPEG and got.data.tobytes() == blob


def test_a_lapped_slot_reads_as_gone_and_the_newest_frame_wins(ring):
    for seq in range(5):  # 3 slots: 0 and 1 were overwritten by 3 and 4 before anyone read them
        ring.write(seq, float(seq), 0.0, img(seq), frame_size=(10, 8), roi=None)
    assert ring.read(0, 0) is None and ring.read(1, 1) is None  # the oldest made room (the caller counts them)
    assert np.array_equal(ring.read(0, 3).data, img(3))
    assert np.array_equal(ring.read(1, 4).data, img(4))
    assert np.array_equal(ring.read(2, 2).data, img(2))
    assert ring.read(2, 5) is None  # not written yet


def test_a_slot_being_written_reads_as_gone(ring):
    ring.write(0, 0.0, 0.0, img(1), frame_size=(10, 8), roi=None)
    gen = struct.unpack_from("<Q", ring.shm.buf, 0)[0]
    struct.pack_into("<Q", ring.shm.buf, 0, gen + 1)  # odd: a writer is (or died) in the middle of it
    assert ring.read(0, 0) is None
    # the next write of that slot completes normally after a writer died mid-frame
    ring.write(3, 0.0, 0.0, img(4), frame_size=(10, 8), roi=None)
    assert np.array_equal(ring.read(0, 3).data, img(4))


def test_frames_larger_than_a_slot_are_refused(ring):
    with pytest.raises(SlotTooSmall, match="does not fit"):
        ring.write(0, 0.0, 0.0, np.zeros((100, 100, 3), np.uint8), frame_size=(100, 100), roi=None)
    with pytest.raises(ValueError, match="uint8"):
        ring.write(0, 0.0, 0.0, np.zeros((2, 2, 3), np.float32), frame_size=(2, 2), roi=None)


def test_close_unlinks_the_owners_segment():
    r = FrameRing.create(2, 16)
    path = Path("/dev/shm") / r.name.lstrip("/")
    assert path.exists()
    other = FrameRing.attach(r.name, 2, 16)
    other.close()  # a reader/writer closing does not remove it
    assert path.exists()
    r.close()
    assert not path.exists()
    r.close()  # twice is fine
    with pytest.raises(FileNotFoundError):
        FrameRing.attach(r.name, 2, 16)


def test_slot_size():
    assert slot_bytes_for((256, 128), 8.0) == 256 * 128 * 3
    assert slot_bytes_for(None, 8.0) == 8 << 20
    with pytest.raises(ValueError, match="smaller"):
        r = FrameRing.create(1, 16)
        try:
            FrameRing.attach(r.name, 4, 1 << 20)
        finally:
            r.close()
