"""The view's web server (Starlette on uvicorn): the page, its state, server-sent events and pictures.

Read-only (GET only), loopback by default, optionally behind HTTP basic auth and/or a bearer token (read
from files or the environment, compared in constant time, never logged). Works under a reverse-proxy path
prefix (``root_path``) whether or not the proxy strips it: the page uses relative URLs only.

Routes (below the prefix): ``/`` the page, ``/static/…`` its files, ``/api/state`` the whole state (JSON),
``/api/events`` live updates (server-sent events: ``snapshot`` first, then ``verdict``, ``camera``,
``daemon``, and ``dropped`` when this client fell behind), ``/img/<camera>/<key>/frame.jpg|heatmap.png``
the pictures still held, ``/api/stats`` queue and subscriber counters, ``/healthz`` (no auth) liveness.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from linewatch.errors import ConfigError
from linewatch.messages import CAMERA_NAME_RE
from linewatch.view.hub import Hub, sse

log = structlog.get_logger("linewatch.view")

STATIC = Path(__file__).resolve().parent / "static"
# Kernel send buffer of every connection (inherited from the listening socket). Fixed rather than autotuned
# (which grows to megabytes): a browser that stops reading holds at most this much in the kernel before its
# event queue, bounded and counted, takes over. Plenty for pictures of tens of KB.
SEND_BUFFER = 128 * 1024
KEEPALIVE_S = 15.0  # an SSE comment this often: proxies keep the stream open, a vanished browser is noticed
MIN_TOKEN_CHARS = 16
TOKEN_ENV = "LINEWATCH_VIEW_TOKEN"
BASIC_ENV = "LINEWATCH_VIEW_BASIC_AUTH"
TOP_ROUTES = ("static", "api", "img", "healthz")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                  b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                                  b"base-uri 'none'; form-action 'none'"),
]


# ----------------------------------------------------------------------------- authentication


@dataclass(frozen=True)
class Credentials:
    """What a request may present: ``Authorization: Basic`` (user:password) and/or ``Bearer`` (token)."""

    basic: str | None = None  # "user:password"
    token: str | None = None

    @property
    def enabled(self) -> bool:
        return self.basic is not None or self.token is not None

    def __repr__(self) -> str:  # never print a secret, e.g. in a traceback's locals
        return f"Credentials(basic={'set' if self.basic else None}, token={'set' if self.token else None})"


def _read_secret(path: Path, what: str) -> str:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(f"the {what} file {path} is readable by everyone; chmod 600 {path}")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise ConfigError(f"the {what} file {path} must hold exactly one line")
    return lines[0]


def load_credentials(basic_file: str | os.PathLike | None = None, token_file: str | os.PathLike | None = None,
                     environ: dict[str, str] | None = None) -> Credentials:
    """Files win over the environment (``LINEWATCH_VIEW_BASIC_AUTH=user:password``, ``LINEWATCH_VIEW_TOKEN``)."""
    env = os.environ if environ is None else environ
    basic = _read_secret(Path(basic_file), "basic auth") if basic_file else env.get(BASIC_ENV) or None
    token = _read_secret(Path(token_file), "token") if token_file else env.get(TOKEN_ENV) or None
    if basic is not None:
        user, sep, password = basic.partition(":")
        if not sep or not user or not password:
            raise ConfigError("basic auth must be one line user:password (both non-empty)")
    if token is not None and (len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token)):
        raise ConfigError(f"the bearer token must be at least {MIN_TOKEN_CHARS} characters without spaces; "
                          "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return Credentials(basic=basic, token=token)


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


def _authorized(header: bytes | None, creds: Credentials) -> bool:
    if header is None:
        return False
    scheme, _, value = header.decode("latin-1").partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "bearer" and creds.token is not None:
        return hmac.compare_digest(value.encode(), creds.token.encode())
    if scheme == "basic" and creds.basic is not None:
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, creds.basic.encode("utf-8"))
    return False


class AuthMiddleware:
    def __init__(self, app: ASGIApp, creds: Credentials):
        self.app = app
        self.creds = creds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.creds.enabled or _route_path(scope) == "/healthz":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if _authorized(header, self.creds):
            await self.app(scope, receive, send)
            return
        challenge = 'Basic realm="linewatch view", charset="UTF-8"' if self.creds.basic else "Bearer"
        await PlainTextResponse("authentication required\n", 401, headers={"WWW-Authenticate": challenge})(
            scope, receive, send)


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RootPath:
    """Serves under ``root`` (e.g. /linewatch) whether a reverse proxy strips the prefix or passes it on:
    the scope gets ``root_path`` and a path that starts with it, as ASGI says, and the bare prefix
    redirects to prefix + "/" (the page's relative URLs need the slash)."""

    def __init__(self, app: ASGIApp, root: str):
        self.app = app
        self.root = root

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.root:
            path = scope["path"]
            if path == self.root:
                await Response(status_code=308, headers={"Location": self.root + "/"})(scope, receive, send)
                return
            if not path.startswith(self.root + "/"):
                path = self.root + path  # the proxy stripped the prefix
            scope = {**scope, "root_path": self.root, "path": path}
        await self.app(scope, receive, send)


def normalise_root_path(root: str | None) -> str:
    root = (root or "").strip()
    if not root or root == "/":
        return ""
    root = "/" + root.strip("/")
    if any(c in root for c in "?#% ") or "//" in root or "/.." in root:
        raise ConfigError(f"--root-path {root!r} must be a plain URL path such as /linewatch")
    if root.split("/")[1] in TOP_ROUTES:
        raise ConfigError(f"--root-path {root!r} starts like one of the view's own routes "
                          f"({', '.join('/' + r for r in TOP_ROUTES)}); choose another prefix")
    return root


# ----------------------------------------------------------------------------- the app


class _StaticFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"  # revalidated (ETag): an upgraded view never runs old code
        return response


def create_app(hub: Hub, *, root_path: str = "", credentials: Credentials | None = None) -> ASGIApp:
    index = (STATIC / "index.html").read_bytes()

    async def page(request: Request) -> Response:
        return Response(index, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def state(request: Request) -> Response:
        return JSONResponse(hub.snapshot(), headers={"Cache-Control": "no-store"})

    async def stats(request: Request) -> Response:
        return JSONResponse(hub.stats(), headers={"Cache-Control": "no-store"})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def image(request: Request) -> Response:
        camera, key, name = (request.path_params[k] for k in ("camera", "key", "name"))
        kind = {"frame.jpg": ("frame", "image/jpeg"), "heatmap.png": ("heatmap", "image/png")}.get(name)
        data = hub.image(camera, key, kind[0]) if kind is not None and CAMERA_NAME_RE.match(camera) else None
        if data is None:
            return PlainTextResponse("not held any more (or never was)\n", 404)
        # a key names one verdict's picture for ever: the browser may keep it
        return Response(data, media_type=kind[1], headers={"Cache-Control": "private, max-age=86400, immutable"})

    async def events(request: Request) -> Response:
        registered = hub.register(asyncio.get_running_loop())
        if registered is None:
            return PlainTextResponse(f"too many viewers (at most {hub.max_clients})\n", 503,
                                     headers={"Retry-After": "10"})
        client, first = registered
        assert client.wake is not None

        async def stream():
            try:
                yield b"retry: 2000\n\n" + first
                while not hub.closed:
                    try:
                        await asyncio.wait_for(client.wake.wait(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    queued, dropped = client.drain()
                    if dropped:  # tell the page it missed updates (heartbeats bring states back)
                        queued.insert(0, sse("dropped", {"events": dropped, "total": client.dropped}))
                    if queued:
                        yield b"".join(queued)
            finally:
                hub.unregister(client)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    routes = [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/api/state", state, methods=["GET"]),
        Route("/api/stats", stats, methods=["GET"]),
        Route("/api/events", events, methods=["GET"]),
        Route("/img/{camera}/{key}/{name}", image, methods=["GET", "HEAD"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Mount("/static", _StaticFiles(directory=STATIC), name="static"),
    ]
    app: ASGIApp = Starlette(routes=routes)
    app = SecurityHeaders(app)
    app = AuthMiddleware(app, credentials or Credentials())
    return RootPath(app, normalise_root_path(root_path))


# ----------------------------------------------------------------------------- serving


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.bind(infos[0][4])
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"view cannot listen on {host}:{port} ({exc.strerror or exc}); choose a free --port "
                          "(0 picks one)") from None
    sock.set_inheritable(True)
    return sock


def serve(app: ASGIApp, host: str, port: int, *, root_path: str = "", secure: bool = False,
          on_listening: Callable[[str], Any] | None = None, on_exit: Callable[[], Any] | None = None) -> None:
    """Run until SIGINT/SIGTERM. ``on_listening(url)`` is called once the socket is bound; ``on_exit()`` on
    the server's loop when a signal arrives (ends the event streams, which would otherwise hold it open)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # a signal handler may interrupt code holding a lock: the work runs as a loop callback instead
            if on_exit is not None:
                try:
                    asyncio.get_running_loop().call_soon_threadsafe(on_exit)
                except RuntimeError:
                    pass
            super().handle_exit(sig, frame)

    if not _is_loopback(host) and not secure:
        log.warning("view_open_to_the_network", host=host,
                    hint="anyone who reaches this port sees the line; set --basic-auth-file or --token-file")
    sock = bind_socket(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown}:{bound[1]}{normalise_root_path(root_path)}/"
    if on_listening is not None:
        on_listening(url)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2, server_header=False, proxy_headers=False)
    # uvicorn re-raises the signal it stopped on once it is done: SIGTERM then ends here, as a clean exit 0
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        Server(config).run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
