"""Fakes shared by the unit and integration tests: a network camera, a subscriber that never reads.

Imported as ``from fakes import ...`` (``tests/`` is on sys.path because conftest.py lives there)."""

from __future__ import annotations

import socket
import struct
import threading
from types import SimpleNamespace

import cv2
import numpy as np
import zmq


def jpeg(i: int, size: tuple[int, int] = (48, 64)) -> bytes:
    """Frame ``i`` of a test stream: a flat grey level that changes per frame, with its number written on it."""
    img = np.full((*size, 3), (i * 37) % 256, np.uint8)
    cv2.putText(img, str(i), (2, size[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, size[0] / 60, (255, 255, 255), 1)
    return cv2.imencode(".jpg", img)[1].tobytes()


def write_jpegs(src_images, folder, quality: int = 90, progressive_every: int = 0) -> list:
    """Each image file in ``src_images`` re-encoded as ``folder/NNN_<stem>.jpg`` (a JPEG camera's frames, e.g.
    from bottle/test); every ``progressive_every``-th one progressive. Returns the paths written, in order."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(src_images):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        flags = [cv2.IMWRITE_JPEG_QUALITY, quality]
        if progressive_every and i % progressive_every == progressive_every - 1:
            flags += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
        dst = folder / f"{i:03d}_{Path(p).stem}.jpg"
        dst.write_bytes(cv2.imencode(".jpg", img, flags)[1].tobytes())
        out.append(dst)
    return out


class MJPEGCamera:
    """An HTTP MJPEG camera (multipart/x-mixed-replace JPEGs) on a raw socket, any path streams, except:
    ``/nolength``: parts without Content-Length; ``/corrupt``: every third part is not a JPEG; ``/page``: an
    HTML page, not a stream. ``stop()`` ends every stream after a whole part and closes cleanly; ``kill()``
    cuts every stream in the middle of a JPEG part and resets the connections (RST), as a camera losing
    power or a cable being pulled would. A new instance on the same ``port`` is the camera coming back."""

    BOUNDARY = b"fr"

    def __init__(self, port: int = 0, size: tuple[int, int] = (48, 64), interval_s: float = 0.02):
        self.size = size
        self.interval_s = interval_s
        self.parts_sent = 0
        self._stopping = threading.Event()
        self._killed = threading.Event()
        self._open = threading.Condition()
        self._conns = 0
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="fake-camera", daemon=True)
        self._acceptor.start()

    def url(self, path: str = "/stream") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:  # the listening socket was closed: stop() or kill()
                return
            with self._open:
                self._conns += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _request_path(conn: socket.socket) -> str:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.settimeout(None)
        parts = data.split(b"\r\n", 1)[0].split()
        return parts[1].decode("latin-1") if len(parts) >= 2 else "/"

    def _serve(self, conn: socket.socket) -> None:
        reset = False
        try:
            path = self._request_path(conn)
            if path == "/page":
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n"
                             b"<html></html>")
                return
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary="
                         + self.BOUNDARY + b"\r\n\r\n")
            i = 0
            while True:
                data = b"garbage" if path == "/corrupt" and i % 3 == 2 else jpeg(i, self.size)
                head = b"--" + self.BOUNDARY + b"\r\nContent-Type: image/jpeg\r\n"
                if path != "/nolength":
                    head += b"Content-Length: %d\r\n" % len(data)
                part = head + b"\r\n" + data + b"\r\n"
                if self._killed.is_set():
                    conn.sendall(part[: len(part) // 2])  # half a frame, then the line goes dead
                    reset = True
                    return
                if self._stopping.is_set():
                    return
                conn.sendall(part)
                self.parts_sent += 1
                i += 1
                self._stopping.wait(self.interval_s)  # the frame rate; wakes at once on stop() or kill()
        except OSError:  # the client went away
            pass
        finally:
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
            conn.close()
            with self._open:
                self._conns -= 1
                self._open.notify_all()

    def _end(self, kill: bool, timeout: float) -> None:
        if kill:
            self._killed.set()
        self._stopping.set()
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not, on Linux)
        except OSError:  # already shut down: a second stop() or kill()
            pass
        self.srv.close()
        self._acceptor.join(timeout)
        with self._open:
            if not self._open.wait_for(lambda: self._conns == 0, timeout):
                raise AssertionError(f"the fake camera still has {self._conns} open connection(s)")

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the part being sent, close every connection cleanly, stop listening."""
        self._end(kill=False, timeout=timeout)

    def kill(self, timeout: float = 5.0) -> None:
        """Cut every stream mid-frame with a connection reset; stop listening."""
        self._end(kill=True, timeout=timeout)


def stalled_subscriber(ctx: zmq.Context, endpoint: str, topic: str = "verdict.", rcvbuf: int = 2048) -> zmq.Socket:
    """A SUB socket with the smallest buffers (HWM 1, ``rcvbuf`` bytes) that reads nothing unless told to:
    what the daemon must survive without slowing down."""
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, rcvbuf)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt_string(zmq.SUBSCRIBE, topic)
    s.connect(endpoint)
    return s


class StallingSource:
    """A folder replay (looping, live pace) whose ``read()`` blocks, without returning or raising, while
    the file ``STALL`` exists in the folder (a hung camera or a stalled network path that the backend keeps
    retrying); and that kills its whole process (exit code 3) at a read while ``CRASH`` exists (a crashing
    decoder). Made in a capture process by ``stalling_source`` (``CameraProcess(source_ref="fakes:stalling_source")``).
    """

    paced = False

    def __init__(self, folder: str):
        from pathlib import Path

        from linewatch.service.sources.files import DirSource

        self.folder = Path(folder)
        self.inner = DirSource(folder, loop=True)
        self.description = f"stalling://{folder}"
        self.reads = 0

    def open(self) -> None:
        self.inner.open()

    def read(self):
        import os
        import time

        if (self.folder / "CRASH").exists():
            os._exit(3)
        while (self.folder / "STALL").exists():
            time.sleep(0.02)  # never returns while stalled; only SIGTERM/SIGKILL ends it
        self.reads += 1
        time.sleep(0.01)  # ~100 frames/s at most: a camera, not a tight loop
        return self.inner.read()

    def close(self) -> None:
        self.inner.close()


def stalling_source(cfg) -> StallingSource:
    return StallingSource(cfg.source[len("dir://"):])


# --------------------------------------------------------------------------- the inference worker, in process

FRAME_HW = (16, 16)  # the fake detectors' input size (h, w)


class BrightnessDetector:
    """The tests' fake model (a service Detector): score = brightest pixel / 255, map = per-pixel brightness, so a
    frame's verdict is set by its pixels (threshold 0.5: :func:`mk_frame`'s bright patch fails). Records the
    batch sizes it saw (``batches``) and, with ``keep_inputs``, the input images; ``fail_first`` simulated CUDA
    OOMs, then ``delay`` seconds per batch (the model's time, not test synchronisation)."""

    def __init__(self, fail_first: int = 0, delay: float = 0.0, keep_inputs: bool = False,
                 model_id: str = "fake0000"):
        import torch

        from linewatch.model import Calibration

        self.input_size = FRAME_HW
        self.model_id = model_id
        self.meta = SimpleNamespace(backbone="fake")
        self.device = torch.device("cpu")
        self.engine = "fake"
        self.calibration = Calibration(image_threshold=0.5, pixel_threshold=0.4, alpha=0.1,
                                       false_reject_bound=0.1, scores=[0.1, 0.2, 0.3, 0.45])
        self.batches: list[int] = []
        self.inputs: list[np.ndarray] = []
        self.fail_first = fail_first
        self.delay = delay
        self.keep_inputs = keep_inputs

    def predict(self, batch):
        import time

        import torch

        from linewatch.model import Prediction

        assert batch.dtype == torch.uint8 and tuple(batch.shape[1:]) == (*FRAME_HW, 3)
        self.batches.append(batch.shape[0])
        if self.keep_inputs:
            self.inputs.extend(batch.numpy().copy())
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("CUDA out of memory (simulated)")
        if self.delay:
            time.sleep(self.delay)
        maps = batch.float().amax(-1) / 255.0
        return Prediction(maps=maps, scores=maps.flatten(1).amax(1))

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        pass  # nothing to build


def mk_frame(cam: str, seq: int, bright: bool, roi=(0, 0, 64, 48), too_big: bool = False):
    """A 16×16 frame from a 64×48 camera: ``bright`` puts a 4×6 white patch in it (the fakes fail it);
    ``too_big`` marks it for fake detectors that refuse it."""
    import time

    from linewatch.service.frames import Frame

    img = np.zeros((*FRAME_HW, 3), np.uint8)
    if bright:
        img[4:8, 6:12] = 255
    if too_big:
        img[0, 0, 0] = 77
    return Frame(cam, seq, time.time(), time.monotonic(), img, (64, 48), roi, ref=f"{seq:03d}.png")


def value(m, name: str, **labels) -> float:
    """One sample of a Metrics registry (0 when absent)."""
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


class Sink:
    """The worker's publish callback: keeps every (verdict, mask) it is handed, and the previews apart
    ((verdict, (frame image, anomaly map))) when the worker was given a preview policy."""

    def __init__(self):
        self.items = []
        self.previews = []
        self.lock = threading.Lock()

    def __call__(self, verdict, mask, preview=None):
        with self.lock:
            self.items.append((verdict, mask))
            if preview is not None:
                self.previews.append((verdict, preview))


def drain_worker(frames, det, *, max_batch: int = 8, queue_size: int = 1000, drain_s: float = 30.0,
                 join_s: float = 60.0, **kw):
    """Queue ``frames``, run an InferenceWorker in drain mode until they are done; (items, metrics, worker)."""
    import time

    from linewatch.service.frames import FrameQueue
    from linewatch.service.telemetry.prometheus import Metrics
    from linewatch.service.worker import InferenceWorker

    m, sink = Metrics(), Sink()
    q = FrameQueue(queue_size, m)
    for f in frames:
        q.put(f)
    w = InferenceWorker(det, q, sink, m, max_batch=max_batch, max_wait_ms=1, run_id=kw.pop("run_id", "run1"), **kw)
    w.stop(time.monotonic() + drain_s)  # drain mode: process what is queued, then exit
    w.start()
    w.join(join_s)
    assert not w.is_alive()
    return sink.items, m, w


class QueueDrainer:
    """Takes frames off a FrameQueue in the background (the worker's part in capture tests); keeps them."""

    def __init__(self, q):
        self.q = q
        self.frames: list = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.frames.extend(self.q.get_batch(64, 0.0, 0.05))

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)


# --------------------------------------------------------------------------- the command line, as a user runs it


def run_cli(*args, check: bool = True, timeout: float = 600):
    """`linewatch ARGS...` in a subprocess; with ``check``, a non-zero exit fails with its output."""
    import subprocess

    from linewatch.tools.harness import linewatch_cmd, subprocess_env

    p = subprocess.run(linewatch_cmd(*map(str, args)), capture_output=True, text=True, env=subprocess_env(),
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def assert_one_line_error(p, *needles: str) -> None:
    """A user mistake: exit 2, no traceback, exactly one `linewatch: error:` line naming each needle."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("linewatch: error:")]
    assert len(err) == 1, p.stderr
    for n in needles:
        assert n in err[0], err[0]
