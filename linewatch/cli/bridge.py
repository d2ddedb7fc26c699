"""``linewatch bridge``: verdicts from a running daemon to a PLC (OPC UA) and the MES (MQTT)."""

from __future__ import annotations

import argparse
import os

DEFAULT_CONFIG = "/etc/linewatch/bridge.yaml"
CONFIG_ENV = "LINEWATCH_BRIDGE_CONFIG"


def cmd_bridge(args: argparse.Namespace) -> int:
    from linewatch.bridges.config import load_bridge_config

    cfg = load_bridge_config(args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    if args.check:
        import yaml

        print(f"# {args.config}: valid (environment overrides applied; secrets masked)")
        print(yaml.safe_dump(cfg.effective(), sort_keys=False, default_flow_style=None), end="")
        return 0
    from linewatch.bridges.app import run_bridge

    return run_bridge(cfg)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bridge", help="forward verdicts to OPC UA (PLC) and MQTT (MES)",
        description="Subscribe to a running `linewatch run` and serve its verdicts as OPC UA nodes and/or MQTT "
        "topics. A separate process: the daemon's inspection path is unaffected. See docs/connect-a-line.md.")
    p.add_argument("--config", metavar="FILE",
                   help=f"YAML config (default: ${CONFIG_ENV} or {DEFAULT_CONFIG}); LINEWATCH_BRIDGE_<SECTION>__<KEY> "
                   "environment variables override it")
    p.add_argument("--check", action="store_true", help="validate the config, print the effective config and exit")
    p.set_defaults(func=cmd_bridge)
