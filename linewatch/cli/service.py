"""Service commands: ``run``, ``check-config``, ``subscribe``, ``keys``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from linewatch.errors import LinewatchError

DEFAULT_CONFIG = "/etc/linewatch/linewatch.yaml"
CONFIG_ENV = "LINEWATCH_CONFIG"


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    from linewatch.service.config import load_config

    path = _config_path(args.config)
    cfg = load_config(path)
    from linewatch.service.app import run_daemon

    return run_daemon(cfg, path)


def cmd_check_config(args: argparse.Namespace) -> int:
    import yaml

    from linewatch.service.config import load_config

    cfg = load_config(args.file)
    print(f"# {args.file}: valid (environment overrides applied)")
    print(yaml.safe_dump(cfg.effective(), sort_keys=False, default_flow_style=None), end="")
    if not cfg.model.bundle.is_file():
        print(f"linewatch: warning: model.bundle {cfg.model.bundle} does not exist (yet); "
              "`linewatch run` will refuse to start without it", file=sys.stderr)
    return 0


def _fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def cmd_subscribe(args: argparse.Namespace) -> int:
    from linewatch.client import Subscriber
    from linewatch.messages import Status, Verdict, status_to_dict, verdict_to_dict

    save = Path(args.save_masks) if args.save_masks else None
    if save is not None:
        try:
            save.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LinewatchError(f"cannot create --save-masks folder {save} ({exc.strerror})") from None
    n = 0
    got_any = False
    curve = None
    if args.server_key:
        curve = {"server_public_key": args.server_key, "client_secret_key": args.client_key}
    elif args.client_key:
        raise LinewatchError("--client-key needs --server-key (the daemon's server.key)")
    with Subscriber(args.endpoint, cameras=[args.camera] if args.camera else None, status=args.status,
                    curve=curve) as sub:
        try:
            while args.count is None or n < args.count:
                msg = sub.recv(args.timeout)
                if msg is None:
                    what = "message" if got_any else "verdict"
                    hint = "; is `linewatch run` running and publisher.bind reachable?"
                    if sub.handshake_failures:
                        hint = f"; {sub.last_error}"
                    print(f"linewatch: no {what} within {args.timeout:g} s from {args.endpoint}"
                          + ("" if got_any else hint), file=sys.stderr)
                    return 1 if (args.count is not None or not got_any) else 0
                got_any = True
                if isinstance(msg, Status):
                    if args.json:
                        print(json.dumps(status_to_dict(msg)), flush=True)
                    else:
                        detail = msg.state or ""
                        if msg.kind == "heartbeat":
                            detail = (f"{msg.frames} verdicts, {msg.fps or 0:.1f} fps, {msg.dropped} dropped, "
                                      f"cameras {msg.cameras}")
                        print(f"{_fmt_time(msg.time)} status {msg.kind} {msg.camera or ''} {detail} "
                              f"{msg.reason or ''}".rstrip(), flush=True)
                    continue
                assert isinstance(msg, Verdict)
                n += 1
                saved = ""
                if save is not None and msg.mask_png is not None:
                    out = save / f"{msg.camera}_{msg.sequence:08d}_{msg.verdict}.png"
                    out.write_bytes(msg.mask_png)
                    saved = f" mask={out}"
                if args.json:
                    print(json.dumps(verdict_to_dict(msg)), flush=True)
                    continue
                p = "-" if msg.p_value is None else f"{msg.p_value:.3g}"
                print(f"{_fmt_time(msg.capture_time)} {msg.camera} #{msg.sequence} {msg.verdict.upper()} "
                      f"score={msg.score:.4g} thr={msg.threshold:.4g} p={p} regions={msg.n_regions} "
                      f"area={msg.defect_area}px latency={msg.latency * 1000:.0f}ms"
                      + (f" ref={msg.ref}" if msg.ref else "") + saved, flush=True)
        except KeyboardInterrupt:
            pass
        if sub.malformed:
            print(f"linewatch: warning: {sub.malformed} malformed message(s) skipped (last: {sub.last_error})",
                  file=sys.stderr)
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from linewatch.security import generate_keypair, read_public_key

    public, secret = generate_keypair(args.dir, args.name, force=args.force)
    print(f"public key  {public}  {read_public_key(public).decode('ascii')}")
    print(f"secret key  {secret}  (mode 0600: keep it on this host)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the streaming inspection daemon",
                              description="Capture → micro-batched inference → ZeroMQ verdicts + Prometheus.")
    p.add_argument("--config", metavar="FILE",
                   help=f"YAML config (default: ${CONFIG_ENV} or {DEFAULT_CONFIG}); "
                   "LINEWATCH_<SECTION>__<KEY> environment variables override it")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("check-config", help="validate a daemon config and print the effective config")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = subparsers.add_parser("subscribe", help="print verdicts from a running daemon")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="publisher address (default: %(default)s)")
    p.add_argument("--camera", metavar="NAME", help="only this camera")
    p.add_argument("--save-masks", metavar="DIR", help="write each received defect mask PNG here")
    p.add_argument("--count", type=int, metavar="N", help="exit after N verdicts")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds without a message")
    p.add_argument("--status", action="store_true", help="also print heartbeats and camera up/down")
    p.add_argument("--json", action="store_true", help="print each message header as one JSON line")
    p.add_argument("--server-key", metavar="FILE", help="the daemon's CURVE public key (server.key) when it "
                   "sets publisher.curve")
    p.add_argument("--client-key", metavar="FILE", help="this client's secret key (NAME.key_secret) when the "
                   "daemon admits only listed clients (publisher.curve.authorized_clients_dir)")
    p.set_defaults(func=cmd_subscribe)

    p = subparsers.add_parser("keys", help="CURVE keys for the verdict socket")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (secret, mode 0600)",
                        description="Generate a CURVE key pair in ZeroMQ's certificate format. The daemon uses "
                        "server.key_secret (publisher.curve.server_secret_key) and gives server.key to its "
                        "subscribers; each subscriber keeps its NAME.key_secret and NAME.key goes into the "
                        "daemon's publisher.curve.authorized_clients_dir.")
    k.add_argument("--dir", required=True, metavar="DIR", help="folder for the two files (created if missing)")
    k.add_argument("--name", default="server", help="file name stem, e.g. server or a client's name "
                   "(default: %(default)s)")
    k.add_argument("--force", action="store_true", help="replace existing files with a new key pair")
    k.set_defaults(func=cmd_keys_generate)

