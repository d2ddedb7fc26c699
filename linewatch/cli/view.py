"""``linewatch view``: the live web view of a running daemon (its own process; see docs/view.md)."""

from __future__ import annotations

import argparse
import sys

from linewatch.errors import LinewatchError


def _bounded(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}–{hi}")
        return v
    return parse


def cmd_view(args: argparse.Namespace) -> int:
    from linewatch.client import Subscriber
    from linewatch.view.app import create_app, load_credentials, normalise_root_path, serve
    from linewatch.view.hub import Feeder, Hub

    credentials = load_credentials(args.basic_auth_file, args.token_file)
    root = normalise_root_path(args.root_path)
    curve = None
    if args.server_key:
        curve = {"server_public_key": args.server_key, "client_secret_key": args.client_key}
    elif args.client_key:
        raise LinewatchError("--client-key needs --server-key (the daemon's server.key)")
    hub = Hub(rejects=args.rejects, history=args.history, client_queue=args.client_queue,
              max_clients=args.max_clients)
    app = create_app(hub, root_path=root, credentials=credentials)
    # previews and status too; a bounded receive queue (previews are tens of KB each): the thread reads
    # continuously, so the daemon never sees this subscriber at its high-water mark
    sub = Subscriber(args.endpoint, cameras=args.camera or None, status=True, previews=True, curve=curve,
                     rcvhwm=1000)
    feeder = Feeder(hub, sub)
    feeder.start()

    def listening(url: str) -> None:
        auth = ("basic auth" if credentials.basic else "") + (" + " if credentials.basic and credentials.token
                                                              else "") + ("bearer token" if credentials.token else "")
        print(f"linewatch view: serving {url} (verdicts from {args.endpoint}; {auth or 'no authentication'})",
              flush=True)

    try:
        serve(app, args.host, args.port, root_path=root, secure=credentials.enabled, on_listening=listening,
              on_exit=hub.close)
    finally:
        feeder.stop()
        feeder.join(2.0)
    if sub.handshake_failures:
        print(f"linewatch: warning: {sub.last_error}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "view", help="live web page of every camera, its rejects and its drift",
        description="Subscribes to a running daemon (previews need publisher.preview) and serves a read-only "
        "page with the latest frame and heatmap of each camera, its recent rejects and its score history. "
        "Secrets: --basic-auth-file/--token-file, or LINEWATCH_VIEW_BASIC_AUTH=user:password / "
        "LINEWATCH_VIEW_TOKEN in the environment (never on the command line).")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="the daemon's publisher (default: %(default)s)")
    p.add_argument("--camera", metavar="NAME", action="append", help="only this camera (repeat for more)")
    p.add_argument("--server-key", metavar="FILE", help="the daemon's CURVE public key (server.key) when it sets "
                   "publisher.curve")
    p.add_argument("--client-key", metavar="FILE", help="this client's secret key (NAME.key_secret) when the daemon "
                   "admits only listed clients")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s; another address "
                   "exposes the line to the network: set authentication)")
    p.add_argument("--port", type=_bounded(0, 65535), default=8090, help="0 picks a free port (default: %(default)s)")
    p.add_argument("--root-path", default="", metavar="PREFIX", help="URL prefix when served behind a reverse "
                   "proxy, e.g. /linewatch (works whether or not the proxy strips it)")
    p.add_argument("--basic-auth-file", metavar="FILE", help="one line user:password (not world-readable): "
                   "browsers ask for it")
    p.add_argument("--token-file", metavar="FILE", help="one line, a bearer token of ≥ 16 characters: for scripts "
                   "and proxies that send 'Authorization: Bearer …'")
    p.add_argument("--rejects", type=_bounded(1, 200), default=12, help="failed verdicts kept per camera "
                   "(default: %(default)s)")
    p.add_argument("--history", type=_bounded(10, 10_000), default=300, help="scores kept per camera for the "
                   "chart (default: %(default)s)")
    p.add_argument("--client-queue", type=_bounded(8, 100_000), default=256, help="events queued per browser; "
                   "a browser that does not keep up loses the oldest (counted) (default: %(default)s)")
    p.add_argument("--max-clients", type=_bounded(1, 1000), default=32, help="browsers connected at once "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_view)
