"""``dir://PATH``: a folder of images replayed in name order, for a line without a camera yet, tests and demos."""

from __future__ import annotations

from pathlib import Path

from linewatch.imaging.images import IMAGE_EXTS, read_image
from linewatch.service.frames import FrameDecodeError, RawFrame, SourceError, SourceLost


class DirSource:
    """``dir://PATH``: replay the images in a folder in name order (re-listed at each pass)."""

    paced = True

    def __init__(self, path: str | Path, loop: bool):
        self.path = Path(path)
        self.loop = loop
        self.description = f"dir://{self.path}"
        self._files: list[Path] = []
        self._i = 0
        self._last: str | None = None  # last file handled (read or undecodable): a reopen resumes after it
        self._decoded_this_pass = 0
        self._tried_this_pass = 0

    def _list(self) -> list[Path]:
        try:
            return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        except OSError as exc:
            raise SourceLost(f"folder {self.path} is not readable ({exc.strerror or exc})") from None

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"folder {self.path} does not exist")
        files = self._list()
        if not files:
            raise SourceError(f"folder {self.path} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        self._files = files
        self._i = 0
        if self._last is not None:  # resume after the last file we read, not from the start
            self._i = next((i for i, p in enumerate(files) if p.name > self._last), len(files))
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
            img = read_image(path)
            if img is not None:
                self._last = path.name
                self._decoded_this_pass += 1
                return RawFrame(img, rgb=True, ref=path.name)
            if not self.path.is_dir():
                raise SourceLost(f"folder {self.path} disappeared")  # _last unchanged: retried on reopen
            if path.exists():
                self._last = path.name
                raise FrameDecodeError(f"cannot decode {path}", ref=path.name)
            # removed since the listing: not a frame, nothing to count; go on with the next file

    def close(self) -> None:
        self._files = []
