"""A real RTSP server for tests: GStreamer's gst-rtsp-server serving a live H.264 test pattern.

    python3 tests/rtsp_server.py PORT [--path /cam] [--size 160x120] [--fps 10]

Run by tests/integration/test_rtsp.py as a child process with any Python that has PyGObject and Debian's
``gir1.2-gst-rtsp-server-1.0``, ``gstreamer1.0-plugins-{base,good,ugly}`` (x264enc) — Debian's
``/usr/bin/python3`` with ``python3-gi`` will do, so linewatch's venv does not need gi. Prints ``READY`` on
stdout once listening; runs until killed. The stream is shared: every client sees the same live pattern,
and a client that reconnects joins it again.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--path", default="/cam")
    ap.add_argument("--size", default="160x120")
    ap.add_argument("--fps", type=int, default=10)
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.split("x"))

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    if Gst.ElementFactory.find("x264enc") is None:
        print("ERROR x264enc missing (gstreamer1.0-plugins-ugly)", flush=True)
        return 2
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    # a keyframe every second: a client that (re)connects decodes within a second
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
        f"framerate={args.fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} "
        f"! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"ERROR cannot listen on 127.0.0.1:{args.port}", flush=True)
        return 1
    print("READY", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
