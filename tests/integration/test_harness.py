"""The harness the other tests, soak, bench and the demo stand on: bounded daemon logs, the verdict counter,
/metrics helpers. Fake processes and a plain ZeroMQ publisher stand in for the daemon (seconds, no model)."""

from __future__ import annotations

import sys
import time

import pytest
import zmq

from linewatch.messages import Status, Verdict, encode
from linewatch.service.telemetry.prometheus import Metrics, MetricsServer
from linewatch.tools.harness import (
    DaemonError,
    DaemonProcess,
    VerdictCounter,
    metric,
    metric_total,
    process_stats,
    scrape,
    wait_until,
)


def fake_daemon(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_daemon_log_stays_bounded_but_keeps_first_events_and_counts(tmp_path):
    # 5000 events and 300 plain lines; the first event of each name survives however many follow
    script = ("import json, sys\n"
              "print(json.dumps({'event': 'publisher_bound', 'endpoint': 'tcp://x'}), file=sys.stderr)\n"
              "for i in range(5000):\n"
              "    print(json.dumps({'event': 'tick', 'i': i}), file=sys.stderr)\n"
              "for i in range(300):\n"
              "    print('plain line', i)\n"
              "print(json.dumps({'event': 'shutdown', 'published': 7}), file=sys.stderr)\n")
    log = tmp_path / "daemon.log"
    with DaemonProcess(tmp_path / "unused.yaml", command=fake_daemon(script), max_events=100, tail_lines=50,
                       log_file=log) as d:
        assert d.wait_event("shutdown", 30)["published"] == 7
        assert d.proc.wait(30) == 0
        d.join_readers()
        assert d.endpoint == "tcp://x"  # long gone from the latest events, still found
        assert len(d.events) == 100 and len(d.tail) == 50
        assert d.counts == {"publisher_bound": 1, "tick": 5000, "shutdown": 1}
        assert d.find("tick", i=4999) and not d.find("tick", i=0)  # only the latest are kept
        assert d.wait_event("tick", 1)["i"] == 0  # but the first of each name is
        assert len(d.log_text().splitlines()) == 50
    assert len(log.read_text().splitlines()) == 5302  # the file on disk has every line


def test_daemon_that_exits_early_is_one_line_with_the_log_attached(tmp_path):
    script = "import sys\nprint('linewatch: error: config x.yaml: cameras[0].fsp: unknown key', file=sys.stderr)\n" \
             "sys.exit(2)\n"
    with DaemonProcess(tmp_path / "x.yaml", command=fake_daemon(script)) as d:
        with pytest.raises(DaemonError) as exc:
            d.wait_event("ready", 30)
    msg = str(exc.value)
    assert "\n" not in msg and "exited (2) before 'ready'" in msg and "unknown key" in msg
    assert "unknown key" in exc.value.log_tail


def test_terminate_reports_a_daemon_that_ignores_sigterm(tmp_path):
    script = ("import json, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "print(json.dumps({'event': 'ready'}), file=sys.stderr, flush=True)\n"
              "time.sleep(60)\n")
    with DaemonProcess(tmp_path / "x.yaml", command=fake_daemon(script)) as d:
        d.wait_event("ready", 30)
        with pytest.raises(DaemonError, match="did not exit within 0.5 s after SIGTERM"):
            d.terminate(0.5)
        assert d.proc.poll() is not None  # killed, not left behind


# --------------------------------------------------------------------------- VerdictCounter


def verdict(camera: str, seq: int, failed: bool = False, age_s: float = 0.0) -> Verdict:
    now = time.time()
    return Verdict(camera=camera, sequence=seq, capture_time=now - age_s, verdict_time=now,
                   verdict="fail" if failed else "pass", score=0.9 if failed else 0.1, threshold=0.5,
                   p_value=0.5, model_id="m", frame_width=64, frame_height=48)


@pytest.fixture
def publisher():
    """A bare XPUB on a free port, and a function that waits until n subscriptions arrived."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")

    def subscribed(n: int = 1) -> None:
        got = 0
        while got < n:
            assert pub.poll(10_000), "no subscription"
            got += pub.recv()[:1] == b"\x01"

    yield pub, f"tcp://127.0.0.1:{port}", subscribed
    pub.close()
    ctx.term()


def test_counter_counts_per_camera_keeps_a_bounded_window_and_stops_at_its_target(publisher):
    pub, endpoint, subscribed = publisher
    col = VerdictCounter(endpoint, status=True, keep=5)
    col.start()
    subscribed(2)  # verdicts and status
    for i in range(6):
        pub.send_multipart(encode(verdict("a", i)))
    pub.send_multipart(encode(verdict("b", 0)))
    pub.send_multipart(encode(Status(kind="camera", time=time.time(), camera="a", state="down", reason="x")))
    wait_until(lambda: col.count() == 7 and col.statuses_seen == 1, 10, what="7 verdicts and a status")
    assert col.by_camera == {"a": 6, "b": 1} and col.count("a") == 6
    assert [(v.camera, v.sequence) for v in col.verdicts] == [("a", 2), ("a", 3), ("a", 4), ("a", 5), ("b", 0)]
    assert col.evicted == 2 and [v.sequence for v in col.of("a")] == [2, 3, 4, 5]
    assert [s.state for s in col.camera_events("a")] == ["down"] and col.camera_events("b") == []
    assert col.window_count == 0 and col.latencies_ms == []  # no window set: nothing measured

    assert col.finish(7, quiet_s=30, timeout=10)  # already there: stops without waiting for quiet
    assert not col.is_alive()


def test_counter_window_latencies_and_quiet_stop(publisher):
    pub, endpoint, subscribed = publisher
    col = VerdictCounter(endpoint, max_latencies=10)
    col.start()
    subscribed()
    pub.send_multipart(encode(verdict("a", 0)))
    wait_until(lambda: col.count() == 1, 10, what="the first verdict")
    now = time.time()
    col.window = (now, now + 3600)
    for i in range(1, 41):
        pub.send_multipart(encode(verdict("a", i, failed=i % 4 == 0, age_s=0.2)))
    wait_until(lambda: col.count() == 41, 10, what="41 verdicts")
    assert col.window_count == 40 and col.window_fails == 10
    assert len(col.latencies_ms) == 10 and all(190 <= x < 10_000 for x in col.latencies_ms)

    t0 = time.monotonic()
    assert not col.finish(100, quiet_s=0.5, timeout=10)  # never comes: gives up once quiet
    assert not col.is_alive() and time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- /metrics


def test_scrape_totals_and_process_stats_from_a_live_registry():
    m = Metrics()
    m.dropped.labels("a", "queue_full").inc(2)
    m.dropped.labels("a", "decode_error").inc()
    m.dropped.labels("b", "queue_full").inc(4)
    server = MetricsServer(m, "127.0.0.1", 0)
    try:
        samples = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.close()
    assert metric(samples, "linewatch_frames_dropped_total", camera="a", reason="queue_full") == 2
    assert metric(samples, "linewatch_frames_dropped_total", camera="a") == 0  # exact labels only
    assert metric_total(samples, "linewatch_frames_dropped_total", camera="a") == 3
    assert metric_total(samples, "linewatch_frames_dropped_total", reason="queue_full") == 6
    assert metric_total(samples, "linewatch_frames_dropped_total") == 7
    stats = process_stats(samples)  # this test process: the registry's ProcessCollector reads /proc/self
    assert stats.open_fds > 3 and 10 * 2**20 < stats.rss_bytes < 64 * 2**30
    assert stats.rss_kb == stats.rss_bytes // 1024
    with pytest.raises(Exception, match="ProcessCollector"):
        process_stats({})
