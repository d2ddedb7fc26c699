"""``dir://PATH``: a folder of images replayed in name order, for a line without a camera yet, tests and demos.
With ``recursive: true`` the sub-folders too (an MVTec-style tree), in the order of their relative paths."""

from __future__ import annotations

from pathlib import Path

from linewatch.imaging.images import IMAGE_EXTS, JPEGHeaderError, jpeg_size, read_image
from linewatch.service.frames import FrameDecodeError, RawFrame, SourceError, SourceLost


class DirSource:
    """``dir://PATH``: replay the images in a folder in name order (re-listed at each pass). ``recursive``:
    every image below it, ordered by relative path (``a/001.png`` < ``b/000.png``), which is also the ref."""

    paced = True
    # capture.jpeg_decode: .jpg/.jpeg files are delivered as their bytes (RawFrame.jpeg), for the model's device
    # to decode; set by the capture loop
    jpeg_passthrough = False

    def __init__(self, path: str | Path, loop: bool, recursive: bool = False):
        self.path = Path(path)
        self.loop = loop
        self.recursive = recursive
        self.description = f"dir://{self.path}"
        self._files: list[Path] = []
        self._i = 0
        self._last: str | None = None  # last file handled (read or undecodable): a reopen resumes after it
        self._decoded_this_pass = 0
        self._tried_this_pass = 0

    def _list(self) -> list[Path]:
        try:
            found = self.path.rglob("*") if self.recursive else self.path.iterdir()
            return sorted((p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTS), key=self._ref)
        except OSError as exc:
            raise SourceLost(f"folder {self.path} is not readable ({exc.strerror or exc})") from None

    def _ref(self, p: Path) -> str:
        """The name a frame is known by: the file name, or its path relative to the folder (recursive)."""
        return p.relative_to(self.path).as_posix() if self.recursive else p.name

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"folder {self.path} does not exist")
        files = self._list()
        if not files:
            hint = "" if self.recursive or not any(p.is_dir() for p in self.path.iterdir()) else \
                "; it has sub-folders: set recursive: true on the camera to replay them"
            raise SourceError(f"folder {self.path} has no images ({', '.join(sorted(IMAGE_EXTS))}){hint}")
        self._files = files
        self._i = 0
        if self._last is not None:  # resume after the last file we read, not from the start
            self._i = next((i for i, p in enumerate(files) if self._ref(p) > self._last), len(files))
        self._decoded_this_pass = self._tried_this_pass = 0

    def read(self) -> RawFrame | None:
        while True:
            if self._i >= len(self._files):
                if not self.loop:
                    return None
                if self._tried_this_pass and not self._decoded_this_pass:
                    # a whole pass without one readable image: back off instead of spinning
                    raise SourceLost(f"no readable image in {self.path}")
                self._files = self._list()
                if not self._files:
                    raise SourceLost(f"folder {self.path} is empty")
                self._i = 0
                self._last = None
                self._decoded_this_pass = self._tried_this_pass = 0
            path = self._files[self._i]
            self._i += 1
            self._tried_this_pass += 1
            ref = self._ref(path)
            if self.jpeg_passthrough and path.suffix.lower() in (".jpg", ".jpeg"):
                blob = self._jpeg(path)
                if blob is not None:
                    self._last = ref
                    self._decoded_this_pass += 1
                    return RawFrame(None, rgb=True, ref=ref, jpeg=blob)
            img = read_image(path)  # not a JPEG after all (or unreadable): decoded here, or counted below
            if img is not None:
                self._last = ref
                self._decoded_this_pass += 1
                return RawFrame(img, rgb=True, ref=ref)
            if not self.path.is_dir():
                raise SourceLost(f"folder {self.path} disappeared")  # _last unchanged: retried on reopen
            if path.exists():
                self._last = ref
                raise FrameDecodeError(f"cannot decode {path}", ref=ref)
            # removed since the listing: not a frame, nothing to count; go on with the next file

    @staticmethod
    def _jpeg(path: Path) -> bytes | None:
        """The file's bytes if they are a JPEG with a frame header, else None."""
        try:
            blob = path.read_bytes()
            jpeg_size(blob)
        except (OSError, JPEGHeaderError):
            return None
        return blob

    def close(self) -> None:
        self._files = []
