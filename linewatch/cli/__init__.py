"""``linewatch`` command line: thin. One parser, one ``main()``, one error path.

Each floor's commands live beside this file (station, service, tools) and only parse arguments and
call the floors below; heavy imports (torch) happen inside the handlers so that ``check-config``
and ``subscribe`` start fast.
"""

from __future__ import annotations

import argparse
import sys

from linewatch import __version__
from linewatch.cli import bridge, service, station, tools, view
from linewatch.errors import LinewatchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linewatch", description="Streaming visual inspection (STFPM).")
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    station.register(sub)
    service.register(sub)
    tools.register(sub)
    bridge.register(sub)
    view.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from linewatch.logsetup import configure_logging

    configure_logging("console", args.log_level)
    try:
        return int(args.func(args) or 0)
    except LinewatchError as exc:
        print(f"linewatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linewatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
