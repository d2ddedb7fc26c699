"""`linewatch view`: its bounded hub, its HTTP surface (auth, prefix, read-only), a real Chromium against a real
daemon with previews, and stalled or vanished browsers that must not slow the daemon nor grow the view."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from linewatch.client import Subscriber
from linewatch.messages import Box, Status, Verdict
from linewatch.tools.harness import (
    ROOT,
    DaemonProcess,
    linewatch_cmd,
    metric,
    subprocess_env,
    wait_until,
    write_config,
    write_images,
)
from linewatch.view.hub import Hub

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
JPEG = b"\xff\xd8\xff\xe0fake-jpeg"
PNG = b"\x89PNG\r\n\x1a\nfake-png"


# --------------------------------------------------------------------------- the hub's bounds


def verdict(cam: str, seq: int, failed: bool = False, shot: bool = True, run_id: str = "r") -> Verdict:
    return Verdict(camera=cam, sequence=seq, capture_time=1000.0 + seq, verdict_time=1000.05 + seq,
                   verdict="fail" if failed else "pass", score=0.9 if failed else 0.1, threshold=0.5,
                   pixel_threshold=0.4, p_value=0.01 if failed else 0.6, model_id="m", frame_width=64,
                   frame_height=48, boxes=[Box(1, 2, 3, 4, 12)] if failed else [], n_regions=int(failed),
                   defect_area=12 if failed else 0, roi=(0, 0, 64, 48), run_id=run_id,
                   preview_jpeg=JPEG + bytes([seq % 256]) if shot else None, heatmap_png=PNG if shot else None)


def test_hub_keeps_bounded_state_per_camera():
    hub = Hub(rejects=3, history=5, client_queue=4, max_clients=2, max_cameras=2)
    for seq in range(40):
        hub.on_message(verdict("a", seq, failed=seq % 2 == 1, shot=seq != 39))
    hub.on_message(verdict("b", 0))
    hub.on_message(verdict("c", 0))  # a third camera: over max_cameras, ignored and counted
    snap = hub.snapshot()
    assert [c["camera"] for c in snap["cameras"]] == ["a", "b"] and hub.cameras_ignored == 1
    a = snap["cameras"][0]
    assert len(a["history"]) == 5 and [h[2] for h in a["history"]] == [True, False, True, False, True]
    assert [r["seq"] for r in a["rejects"]] == [35, 37, 39]  # the last three fails, oldest first
    assert a["rejects"][-1]["shot"] is None and a["rejects"][0]["shot"] == "r-35"
    assert a["last"]["seq"] == 39 and a["shot"]["seq"] == 38  # the latest picture is #38: #39 came without one
    assert a["verdicts"] == 40 and a["fails"] == 20
    assert hub.image("a", "r-38", "frame") == JPEG + bytes([38]) and hub.image("a", "r-38", "heatmap") == PNG
    # held a little longer than shown (RECENT_SHOTS = 8): the 8 latest pictures, and 8 rejects more
    assert hub.image("a", "r-32", "frame") == JPEG + bytes([32])  # a pass among the latest pictures
    assert hub.image("a", "r-21", "frame") == JPEG + bytes([21])  # an older reject, no longer listed
    assert hub.image("a", "r-17", "frame") is None  # neither recent nor among the rejects held
    assert hub.image("a", "r-30", "frame") is None  # a pass that is no longer among the latest
    assert hub.image("zz", "r-38", "frame") is None


def test_hub_client_queues_drop_the_oldest_and_count():
    hub = Hub(client_queue=4, max_clients=2)
    slow, first = hub.register(None)
    fast, _ = hub.register(None)
    assert first.startswith(b"event: snapshot\ndata: ")
    assert hub.register(None) is None  # max_clients
    for seq in range(10):
        hub.on_message(verdict("a", seq))
        if seq in (3, 7):  # a client that reads
            fast.drain()
    assert slow.queued == 4 and slow.dropped == 6  # never read: bounded, the oldest went
    events, dropped = slow.drain()
    assert dropped == 6 and [json.loads(e.split(b"data: ")[1])["seq"] for e in events] == [6, 7, 8, 9]
    assert fast.dropped == 0 and fast.queued == 2
    assert hub.events_dropped == 6
    hub.unregister(slow)
    assert [c["id"] for c in hub.stats()["clients"]] == [fast.id]
    assert hub.register(None) is not None  # its place is free again


def test_hub_follows_camera_status_health_and_heartbeats():
    hub = Hub()
    hub.on_message(Status(kind="lifecycle", time=1.0, run_id="r", state="starting"))
    hub.on_message(Status(kind="camera", time=1.0, run_id="r", camera="a", state="down", reason="gone"))
    hub.on_message(Status(kind="health", time=2.0, run_id="r", camera="a", condition="blurred", fail_rate=0.25,
                          score_median_ratio=1.4))
    a = hub.snapshot()["cameras"][0]
    assert (a["state"], a["reason"], a["condition"], a["fail_rate"], a["score_median_ratio"]) == \
        ("down", "gone", "blurred", 0.25, 1.4)
    assert hub.daemon["lifecycle"] == "starting"
    hub.on_message(Status(kind="heartbeat", time=3.0, run_id="r2", cameras={"a": "up", "b": "starting"},
                          health={"a": {"condition": "ok", "fail_rate": 0.5, "score_median_ratio": 1.0}},
                          model_id="m2"))
    cams = {c["camera"]: c for c in hub.snapshot()["cameras"]}
    assert cams["a"]["state"] == "up" and cams["a"]["condition"] == "ok" and cams["a"]["fail_rate"] == 0.5
    assert cams["b"]["state"] == "starting"
    assert hub.daemon["lifecycle"] == "ready" and hub.daemon["model_id"] == "m2"  # a new run is running
    hub.on_message(Status(kind="calibration_mismatch", time=4.0, run_id="r2", camera="b", reason="fails 90 %"))
    assert {c["camera"]: c["mismatch"] for c in hub.snapshot()["cameras"]} == {"a": None, "b": "fails 90 %"}


# --------------------------------------------------------------------------- the view process


class ViewProcess:
    """``linewatch view`` as a child process; its URL comes from the line it prints when serving."""

    def __init__(self, endpoint: str, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(linewatch_cmd("view", "--endpoint", endpoint, "--port", "0", *args), cwd=ROOT,
                                     env=subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def url(self) -> str:
        def serving() -> str | None:
            return next((ln.split("serving ", 1)[1].split(" ", 1)[0] for ln in self.lines if "serving http" in ln),
                        None)

        wait_until(lambda: serving() is not None or self.proc.poll() is not None, 60, what="view serving")
        found = serving()
        assert found, "view exited:\n" + "\n".join(self.lines)
        return found

    @property
    def base(self) -> str:
        """scheme://host:port, without the prefix."""
        return self.url.split("/", 3)[0] + "//" + self.url.split("/", 3)[2]

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("view did not exit within 20 s of SIGTERM:\n" + self.output()) from None
        self._reader.join(5)
        return rc

    def __enter__(self) -> ViewProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed."""
    hostport, _, path = url.split("//", 1)[1].partition("/")
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, "/" + path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_view_http_is_read_only_authenticated_and_prefix_aware(tmp_path):
    """No daemon needed: the view serves (an empty state) while it waits for one."""
    secret, token = "s3cret-pass!", "tok-" + "x" * 28
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    env = {"LINEWATCH_VIEW_BASIC_AUTH": f"op:{secret}"}
    with ViewProcess("tcp://127.0.0.1:1", "--root-path", "/lw/", "--token-file", str(token_file), env=env) as view:
        base, url = view.base, view.url
        assert url == base + "/lw/" and base.startswith("http://127.0.0.1:")  # loopback by default
        assert get(url)[0] == 401
        status, headers, _ = get(url, basic("op", "wrong"))
        assert status == 401 and headers["www-authenticate"].startswith("Basic")
        status, headers, body = get(url, basic("op", secret))
        assert status == 200 and b'src="static/app.js"' in body  # relative: works under any prefix
        assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
        assert get(base + "/lw/api/state", {"Authorization": f"Bearer {token}"})[0] == 200
        assert get(base + "/lw/api/state", {"Authorization": f"Bearer {token[:-1]}"})[0] == 401
        # a proxy that strips the prefix, one that does not, and the bare prefix
        assert get(base + "/api/state", basic("op", secret))[0] == 200
        assert json.loads(get(base + "/lw/api/state", basic("op", secret))[2])["cameras"] == []
        status, headers, _ = get(base + "/lw")
        assert status == 308 and headers["location"] == "/lw/"
        assert get(base + "/lw/static/app.js", basic("op", secret))[0] == 200
        assert get(base + "/lw/healthz")[0] == 200  # liveness for a load balancer: no secret needed
        # read-only
        assert get(base + "/lw/api/state", basic("op", secret), method="POST")[0] == 405
        assert get(base + "/lw/img/a/r-1/frame.jpg", basic("op", secret))[0] == 404
        assert get(base + "/lw/img/a/r-1/../../etc/passwd", basic("op", secret))[0] == 404
        assert view.stop() == 0
    assert secret not in view.output() and token not in view.output()
    assert "basic auth + bearer token" in view.output()

    token_file.chmod(0o644)  # readable by everyone: refused, in one line
    proc = subprocess.run(linewatch_cmd("view", "--token-file", str(token_file), "--port", "0"), cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "chmod 600" in proc.stderr
    assert token not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------- a real browser


def _browser_missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} not found: apt-get install {package} (make sysdeps does it as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture
def browser(tmp_path):
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Receipts(threading.Thread):
    """A subscriber of its own: when each verdict reached a client (the yardstick for the page)."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.sub = Subscriber(endpoint)
        self.got: dict[tuple[str, str, int], tuple[float, Verdict]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                v = self.sub.recv(0.2)
                if isinstance(v, Verdict):
                    self.got[(v.run_id, v.camera, v.sequence)] = (time.time(), v)
        finally:
            self.sub.close()


JS_REJECTS = """
return [...document.querySelectorAll('section.camera')].flatMap(cam => [...cam.querySelectorAll('li.reject')].map(li =>
  ({camera: cam.dataset.camera, run: li.dataset.run, seq: +li.dataset.seq, shown: +li.dataset.shownAt,
    loaded: li.dataset.loadedAt ? +li.dataset.loadedAt : null,
    width: li.querySelector('img') ? li.querySelector('img').naturalWidth : 0})));
"""


def test_view_in_a_real_browser_shows_cameras_rejects_and_heatmaps(tmp_path, bottle, bottle_bundle, browser):
    """Two cameras (good and broken bottles) with previews; the page, behind basic auth and a path prefix, shows
    both; each fail appears in the rejects strip within 2 s of a subscriber receiving its verdict; the heatmap
    loads; a reject opens its full-size overlay with boxes and p-value; no script errors; a screenshot."""
    cams = [{"name": "good", "source": f"dir://{bottle / 'test' / 'good'}", "fps": 3, "on_end": "loop"},
            {"name": "defect", "source": f"dir://{bottle / 'test' / 'broken_large'}", "fps": 3, "on_end": "loop"}]
    cfg = write_config(tmp_path / "lw.yaml", bottle_bundle, cams,
                       publisher={"preview": "every_nth", "preview_every_n": 3, "preview_max_per_s": 10,
                                  "preview_max_px": 256},
                       health={"window": 20})
    password = "floor-" + "p" * 10
    with DaemonProcess(cfg) as daemon:
        receipts = Receipts(daemon.endpoint)
        receipts.start()
        with ViewProcess(daemon.endpoint, "--root-path", "/linewatch", "--rejects", "8",
                         env={"LINEWATCH_VIEW_BASIC_AUTH": f"qa:{password}"}) as view:
            # what a browser sends once the user typed the password (Chromium does not take it from the URL
            # for the event stream and the pictures)
            browser.execute_cdp_cmd("Network.enable", {})
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": basic("qa", password)})
            browser.get(view.url)
            assert view.url.endswith("/linewatch/")
            wait_until(lambda: browser.execute_script("return document.querySelector('#conn').textContent")
                       == "live", 60, what="live updates")
            t_live = time.time()
            wait_until(lambda: set(browser.execute_script(
                "return [...document.querySelectorAll('section.camera')].map(e => e.dataset.camera)"))
                == {"good", "defect"}, 60, what="both cameras on the page")

            # fails that reach the page while it is live: shown within 2 s of a subscriber getting the verdict
            def measured() -> list[tuple[float, dict]]:
                out = []
                for tile in browser.execute_script(JS_REJECTS):
                    got = receipts.got.get((tile["run"], tile["camera"], tile["seq"]))
                    if got is not None and got[0] > t_live + 0.5:
                        out.append((tile["shown"] / 1000.0 - got[0], tile))
                return out

            wait_until(lambda: len(measured()) >= 3, 90, what="three fails reaching the page while live")
            lags = measured()
            print("fail → rejects strip, s after a subscriber got the verdict:", [round(lag, 3) for lag, _ in lags])
            assert max(lag for lag, _ in lags) <= 2.0, lags
            assert all(receipts.got[(t["run"], t["camera"], t["seq"])][1].failed for _, t in lags)  # fails only
            wait_until(lambda: any(t["width"] > 0 for t in browser.execute_script(JS_REJECTS)), 30,
                       what="a reject thumbnail loaded")

            # the latest frame and its heatmap, drawn into the overlay
            heat_width = ("return document.querySelector('section.camera[data-camera=defect] img.heatmap')"
                          ".naturalWidth")
            wait_until(lambda: browser.execute_script(heat_width) > 0, 30, what="heatmap loaded")
            assert browser.execute_script(heat_width) <= 256
            assert browser.execute_script("return document.querySelector('section.camera[data-camera=defect] "
                                          "canvas.overlay').width") > 0
            assert browser.execute_script("return document.querySelector('section.camera[data-camera=defect] "
                                          "img.frame').naturalWidth") > 0

            # a reject opens the full-size overlay, its p-value and its boxes
            tile = next(t for _, t in lags if t["camera"] == "defect" and t["width"] > 0) if any(
                t["camera"] == "defect" and t["width"] > 0 for _, t in lags) else lags[0][1]
            v = receipts.got[(tile["run"], tile["camera"], tile["seq"])][1]
            browser.execute_script(
                f"document.querySelector('section.camera[data-camera={tile['camera']}] "
                f"li.reject[data-seq=\"{tile['seq']}\"]').click()")
            wait_until(lambda: browser.execute_script("return document.querySelector('#detail').open"), 10,
                       what="the reject's detail")
            facts = browser.execute_script("return document.querySelector('#detail-facts').innerText")
            assert "p-value" in facts and f"#{v.sequence}" in browser.execute_script(
                "return document.querySelector('#detail-title').textContent")
            rows = browser.execute_script("return document.querySelectorAll('#detail-boxes tbody tr').length")
            assert rows == len(v.boxes) >= 1
            if tile["width"] > 0:
                wait_until(lambda: browser.execute_script("return document.querySelector('#detail-overlay')"
                                                          ".width") > 0, 10, what="the full-size overlay")
            shot = tmp_path / "view.png"
            browser.save_screenshot(str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # no script errors. (A picture the view no longer holds when a slow page asks for it is a 404 the
            # page shows as a label: allowed.)
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                      and not (e["source"] == "network" and "/img/" in e["message"] and " 404 " in e["message"])]
            assert errors == [], errors
            stats = json.loads(get(view.base + "/linewatch/api/stats", basic("qa", password))[2])
            assert stats["subscriber"]["malformed"] == 0 and stats["subscriber"]["previews_missed"] == 0
            assert view.stop() == 0
        assert password not in view.output()
        receipts.stop.set()
        receipts.join(5)
        samples = daemon.scrape()
        assert metric(samples, "linewatch_previews_total", camera="defect") > 0
        assert metric(samples, "linewatch_frames_dropped_total", camera="defect", reason="publish_hwm") == 0
        assert daemon.terminate() == 0


# --------------------------------------------------------------------------- stalled and vanished browsers


def stalled_sse_client(url: str) -> socket.socket:
    """Asks for the event stream and never reads it: a tiny receive buffer fills after a few events."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.connect((host, int(port)))
    s.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    return s


class SseReader(threading.Thread):
    """A browser that keeps up: the verdict events it got."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.seqs: dict[str, int] = {}
        self.events = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with urllib.request.urlopen(self.url, timeout=30) as resp:
            event = None
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "verdict":
                    d = json.loads(line[6:])
                    self.seqs[d["camera"]] = d["seq"]
                    self.events += 1
                if self.stop.is_set():
                    return


def test_stalled_and_vanished_browsers_do_not_slow_the_daemon_or_grow_the_view(tmp_path, untrained_bundle):
    """Three event-stream clients that never read and one that disconnects, while a daemon streams previews
    at a steady rate: the stalled clients' queues stay at their bound (the rest dropped and counted), the view
    keeps reading every verdict (no gaps, no high-water-mark drops at the daemon), and a reading client
    stays current."""
    cams = []
    for name in ("a", "b"):
        write_images(tmp_path / name, 20, size=(48, 64), seed=ord(name))
        cams.append({"name": name, "source": f"dir://{tmp_path / name}", "fps": 20, "on_end": "loop"})
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle, cams,
                       publisher={"preview": "all", "preview_max_per_s": 1000, "preview_max_px": 64,
                                  "hwm_policy": "count", "sndhwm": 200},
                       health={"enabled": False})
    queue = 32
    with DaemonProcess(cfg) as daemon, ViewProcess(daemon.endpoint, "--client-queue", str(queue)) as view:
        url = view.url
        sub = Subscriber(daemon.endpoint)
        stalled = [stalled_sse_client(url) for _ in range(3)]
        reader = SseReader(url + "api/events")
        reader.start()
        try:
            def stats() -> dict:
                return json.loads(get(url + "api/stats")[2])

            wait_until(lambda: len(stats()["clients"]) == 4, 30, what="four event-stream clients")
            gone = stalled_sse_client(url)  # a browser tab that is closed at once
            wait_until(lambda: len(stats()["clients"]) == 5, 30, what="the fifth client")
            gone.close()
            wait_until(lambda: len(stats()["clients"]) == 4, 30, what="the closed client to be forgotten")

            # until the stalled clients really are stalled: their queues full, events dropped for them
            wait_until(lambda: sum(c["dropped"] > 0 for c in stats()["clients"]) >= 3, 120,
                       what="three stalled clients dropping events")
            before = stats()
            while sub.recv(0) is not None:  # what it got while we waited (gaps are counted over all of it)
                pass
            window = list(sub.verdicts(timeout=10, count=200))
            after = stats()
            last = {v.camera: v.sequence for v in window}
            wait_until(lambda: all(reader.seqs.get(c, -1) >= s for c, s in last.items()), 10,
                       what="the reading client to be current")
        finally:
            reader.stop.set()
            for s in stalled:
                s.close()
            sub.close()
        assert len(window) == 200 and sub.gaps == {}  # the daemon kept streaming, nothing lost on the way
        # the view read every verdict in the window (its subscriber has no gaps and kept counting)
        assert after["subscriber"]["gaps"] == {} and after["subscriber"]["malformed"] == 0
        assert after["subscriber"]["received"] - before["subscriber"]["received"] >= 200
        # the stalled clients are held at their bound, the overflow dropped and counted
        stalled_stats = [c for c in after["clients"] if c["dropped"] > 0]
        assert len(stalled_stats) >= 3 and all(c["queued"] <= queue for c in after["clients"])
        assert after["events_dropped"] > before["events_dropped"]  # still dropping for them, not piling up
        samples = daemon.scrape()
        for cam in ("a", "b"):
            assert metric(samples, "linewatch_frames_dropped_total", camera=cam, reason="publish_hwm") == 0
            assert metric(samples, "linewatch_frames_dropped_total", camera=cam, reason="publish_queue_full") == 0
            assert metric(samples, "linewatch_previews_total", camera=cam) > 0
        assert metric(samples, "linewatch_previews_skipped_total", reason="publish_hwm") == 0
        assert view.stop() == 0
        assert daemon.terminate() == 0
