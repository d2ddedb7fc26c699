"""CURVE keys for the verdict socket: generate, read and check them.

The files are ZeroMQ's own certificate format (what ``zmq.auth.create_certificates`` and czmq write), so
keys made with other ZeroMQ tools work too:

* ``NAME.key`` — the public key, safe to copy anywhere (a server's goes to its subscribers; a client's
  goes into the daemon's ``publisher.curve.authorized_clients_dir``);
* ``NAME.key_secret`` — public and secret key, mode 0600, never leaves the host it was made on.

Only the standard library and pyzmq are used: subscribers import this through :mod:`linewatch.client`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from pathlib import Path

import zmq

from linewatch.errors import ConfigError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_Z85_KEY_RE = re.compile(rb"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")

_BANNER = """#   ****  Generated on {date} by linewatch keys generate  ****
#   ZeroMQ CURVE {kind} Certificate
{warning}
metadata
    name = "{name}"
curve
    public-key = "{public}"
{secret_line}"""


class KeyFileError(ConfigError):
    """A key file that is missing, malformed or too widely readable (the text names the file and the fix)."""


def is_z85_key(value: bytes | str) -> bool:
    """A 40-character Z85 string (a 32-byte CURVE key)."""
    raw = value.encode("ascii", "replace") if isinstance(value, str) else value
    return bool(_Z85_KEY_RE.match(raw))


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; pass --force to replace it (clients that use the old key "
                           "must be given the new one)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path} ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask, and an existing file keeps its own
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def generate_keypair(directory: str | os.PathLike, name: str = "server", force: bool = False) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public, 0644) and ``DIR/NAME.key_secret`` (public + secret, 0600)."""
    if not KEY_NAME_RE.match(name):
        raise KeyFileError(f"key name {name!r} may use only letters, digits, _ and - (1–64 characters)")
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise KeyFileError(f"cannot create key folder {folder} ({exc.strerror or exc})") from None
    public, secret = zmq.curve_keypair()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    pub_path, sec_path = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    common = {"date": date, "name": name, "public": public.decode("ascii")}
    # secret first: if it cannot be written, no orphan public key is left behind
    _write_new(sec_path, _BANNER.format(kind="**Secret**", secret_line=f'    secret-key = "{secret.decode("ascii")}"\n',
                                        warning="#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its "
                                        "permissions.\n", **common), 0o600, force)
    _write_new(pub_path, _BANNER.format(kind="Public", secret_line="", warning="#   Exchange securely, or use "
                                        "a secure mechanism to verify the contents\n#   of this file after "
                                        "exchange.\n", **common), 0o644, force)
    return pub_path, sec_path


def _read_keys(path: Path) -> tuple[bytes | None, bytes | None]:
    """(public, secret) from a certificate file; a key that is not 40 Z85 characters is an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found; create it with `linewatch keys generate`") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read ({exc.strerror or exc})") from None
    if len(data) > 64 * 1024:
        raise KeyFileError(f"key file {path} is {len(data)} bytes: not a ZeroMQ certificate")
    found: dict[str, bytes] = {}
    for line in data.splitlines():
        line = line.strip()
        for field in ("public-key", "secret-key"):
            if line.startswith(field.encode()) and b"=" in line:
                value = line.split(b"=", 1)[1].strip(b" \t'\"")
                if not is_z85_key(value):
                    raise KeyFileError(f"key file {path}: {field} is not a 40-character Z85 key")
                found[field] = value
    return found.get("public-key"), found.get("secret-key")


def read_public_key(source: str | os.PathLike | bytes) -> bytes:
    """A public key from a ``.key`` / ``.key_secret`` file, or given directly as its 40 Z85 characters."""
    if isinstance(source, (bytes, str)) and is_z85_key(source) and not Path(os.fsdecode(source)).exists():
        return source.encode("ascii") if isinstance(source, str) else source
    path = Path(os.fsdecode(source))
    public, _ = _read_keys(path)
    if public is None:
        raise KeyFileError(f"key file {path} has no public-key; is it a ZeroMQ certificate?")
    return public


def read_secret_key(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file that only its owner (and group) can read."""
    path = Path(path)
    public, secret = _read_keys(path)
    if secret is None:
        hint = f" (use {path.name[:-len(PUBLIC_SUFFIX)]}{SECRET_SUFFIX})" if path.name.endswith(PUBLIC_SUFFIX) else ""
        raise KeyFileError(f"key file {path} has no secret-key{hint}")
    if public is None:
        raise KeyFileError(f"key file {path} has a secret-key but no public-key")
    mode = path.stat().st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise KeyFileError(f"secret key file {path} is accessible to every user (mode {stat.S_IMODE(mode):04o}); "
                           f"chmod 600 {path} (or 640 with group linewatch)")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"key file {path}: public-key does not belong to secret-key")
    return public, secret


def load_authorized_keys(directory: str | os.PathLike) -> dict[bytes, str]:
    """{public key (Z85): name} for every ``*.key`` file in ``directory``; any unreadable one is an error."""
    folder = Path(directory)
    if not folder.is_dir():
        raise KeyFileError(f"authorized_clients_dir {folder} is not a folder; create it and copy the clients' "
                           f"*{PUBLIC_SUFFIX} files into it")
    keys: dict[bytes, str] = {}
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        keys[read_public_key(path)] = path.name[:-len(PUBLIC_SUFFIX)]
    return keys
