"""Security: CURVE keys, encrypted and authenticated verdicts, loopback-only defaults, endpoints that
cannot be hijacked."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml
import zmq
import zmq.auth

from linewatch.cli import main as cli_main
from linewatch.client import Subscriber
from linewatch.errors import ConfigError
from linewatch.messages import Verdict
from linewatch.security import KeyFileError, generate_keypair, read_public_key, read_secret_key
from linewatch.service.config import CurveConfig, MetricsConfig, PublisherConfig
from linewatch.service.publisher import Publisher
from linewatch.service.telemetry.prometheus import Metrics, MetricsServer
from linewatch.tools.harness import (
    ROOT,
    DaemonProcess,
    free_tcp_port,
    linewatch_cmd,
    metric,
    subprocess_env,
    wait_until,
    write_config,
    write_images,
)

needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(linewatch_cmd(*args), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- keys


def test_keys_generate_writes_zeromq_certificates_with_safe_modes(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert cli_main(["keys", "generate", "--dir", str(keys), "--name", "server"]) == 0
    out = capsys.readouterr().out
    pub, sec = keys / "server.key", keys / "server.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
    # ZeroMQ's own certificate format: pyzmq (and czmq) read it
    public, secret = zmq.auth.load_certificate(sec)
    assert zmq.auth.load_certificate(pub) == (public, None)
    assert zmq.curve_public(secret) == public and public.decode() in out
    assert read_secret_key(sec) == (public, secret) and read_public_key(pub) == public
    assert b"secret-key" not in pub.read_bytes()

    # never overwritten by accident; --force makes a new pair
    assert cli_main(["keys", "generate", "--dir", str(keys), "--name", "server"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "exists; pass --force" in err
    assert cli_main(["keys", "generate", "--dir", str(keys), "--name", "server", "--force"]) == 0
    assert read_public_key(pub) != public and stat.S_IMODE(sec.stat().st_mode) == 0o600

    with pytest.raises(KeyFileError, match="may use only letters"):
        generate_keypair(keys, "../evil")


def test_bad_key_files_are_refused_with_the_fix(tmp_path):
    pub, sec = generate_keypair(tmp_path, "c")
    os.chmod(sec, 0o644)
    with pytest.raises(KeyFileError, match=r"accessible to every user \(mode 0644\); chmod 600"):
        read_secret_key(sec)
    os.chmod(sec, 0o640)  # group-readable (root:linewatch) is fine
    read_secret_key(sec)
    with pytest.raises(KeyFileError, match="has no secret-key \\(use c.key_secret\\)"):
        read_secret_key(pub)
    with pytest.raises(KeyFileError, match="not found; create it with `linewatch keys generate`"):
        read_public_key(tmp_path / "nope.key")
    (tmp_path / "bad.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(KeyFileError, match="not a 40-character Z85 key"):
        read_public_key(tmp_path / "bad.key")
    other_pub, _ = zmq.curve_keypair()
    text = sec.read_text().replace(read_public_key(pub).decode(), other_pub.decode())
    sec.write_text(text)
    with pytest.raises(KeyFileError, match="does not belong to secret-key"):
        read_secret_key(sec)


@needs_curve
def test_publisher_refuses_unusable_curve_settings_in_one_line(tmp_path):
    _, sec = generate_keypair(tmp_path / "k", "server")
    cases = [
        (CurveConfig(server_secret_key=tmp_path / "missing.key_secret"), "not found"),
        (CurveConfig(server_secret_key=tmp_path / "k" / "server.key"), "has no secret-key"),
        (CurveConfig(server_secret_key=sec, authorized_clients_dir=tmp_path / "nodir"), "is not a folder"),
    ]
    for curve, needle in cases:
        pub = Publisher(PublisherConfig(bind="tcp://127.0.0.1:*", curve=curve), Metrics())
        with pytest.raises(ConfigError) as exc:
            pub.bind()
        assert needle in str(exc.value) and "\n" not in str(exc.value)
        pub.close(0.1)
        assert pub._auth is None  # no authenticator thread left behind


# --------------------------------------------------------------------------- CURVE end to end


@needs_curve
def test_only_authorized_subscribers_get_verdicts(tmp_path, folder_camera, daemon_config):
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    generate_keypair(keys, "server")
    generate_keypair(keys, "alice")
    generate_keypair(keys, "mallory")
    clients.mkdir()
    (clients / "alice.key").write_bytes((keys / "alice.key").read_bytes())  # only alice is authorized

    cfg = daemon_config([folder_camera("cam", 3, fps=20)], publisher={
        "wait_for_subscriber_s": 60,
        "curve": {"server_secret_key": str(keys / "server.key_secret"), "authorized_clients_dir": "clients"}})
    data = yaml.safe_load(cfg.read_text())
    del data["metrics"]["host"]  # the default
    cfg.write_text(yaml.safe_dump(data))
    server_key = keys / "server.key"

    def curve(client: str | None) -> dict:
        return {"server_public_key": str(server_key),
                "client_secret_key": str(keys / f"{client}.key_secret") if client else None}

    with DaemonProcess(cfg) as d:
        endpoint = d.endpoint
        plain = Subscriber(endpoint)  # no keys at all
        mallory = Subscriber(endpoint, curve=curve("mallory"))  # a key the daemon does not know
        anonymous = Subscriber(endpoint, curve=curve(None))  # knows the server key, throwaway client key
        ev = d.wait_event("curve_enabled", 30)
        assert ev["client_auth"] is True and ev["authorized_clients"] == 1
        assert ev["server_public_key"] == read_public_key(server_key).decode()
        # both CURVE handshakes (mallory, the throwaway key) refused: by then any wrong admission would show
        wait_until(lambda: metric(d.scrape(), "linewatch_subscribers_refused_total") >= 2, 30,
                   what="the unknown client keys refused")
        assert not d.find("subscriber_wait_over")  # nobody unauthorized counts as a subscriber
        alice = Subscriber(endpoint, curve=curve("alice"))
        try:
            got = list(alice.verdicts(timeout=60, count=10))
            assert len(got) == 10 and all(isinstance(v, Verdict) for v in got)
            assert d.find("subscriber_authenticated", client="alice")
            # meanwhile the others got nothing at all
            for who in (plain, mallory, anonymous):
                assert who.recv(1.0) is None
            assert mallory.handshake_failures >= 1 and "refused" in (mallory.last_error or "")
            samples = d.scrape()
            assert metric(samples, "linewatch_subscribers_refused_total") >= 2  # mallory and the anonymous key
            refused = {e["client_key"] for e in d.find("subscriber_refused")}
            assert read_public_key(keys / "mallory.key").decode() in refused  # logged: who knocked

            # the CLI with keys
            ok = run_cli("subscribe", "--endpoint", endpoint, "--server-key", str(server_key), "--client-key",
                         str(keys / "alice.key_secret"), "--count", "2", "--json", "--timeout", "30")
            assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 2, ok.stderr
            no = run_cli("subscribe", "--endpoint", endpoint, "--server-key", str(server_key), "--client-key",
                         str(keys / "mallory.key_secret"), "--count", "1", "--timeout", "3")
            assert no.returncode == 1 and "refused this client key" in no.stderr, no.stderr

            # authorize mallory: copy the key in, SIGHUP (systemctl reload); new connections are let in
            (clients / "mallory.key").write_bytes((keys / "mallory.key").read_bytes())
            d.proc.send_signal(signal.SIGHUP)
            assert d.wait_event("authorized_clients_reloaded", 30)["keys"] == 2
            with Subscriber(endpoint, curve=curve("mallory")) as again:
                assert isinstance(again.recv(30), Verdict)

            # /metrics: loopback only by default, not on another local address
            url = d.metrics_url
            assert d.wait_event("metrics_listening")["host"] == "127.0.0.1"
            port = d.wait_event("metrics_listening")["port"]
            assert_loopback_only(port)
            assert urllib.request.urlopen(url, timeout=5).status == 200
        finally:
            for s in (plain, mallory, anonymous, alice):
                s.close()
        assert d.terminate() == 0


def assert_loopback_only(port: int) -> None:
    """Nothing answers on ``port`` at 127.0.0.2 (same host, other address: a 0.0.0.0 bind would) nor on
    this host's non-loopback addresses."""
    others = {"127.0.0.2"}
    try:
        others |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
                   if not a[4][0].startswith("127.")}
    except OSError:
        pass
    for addr in sorted(others):
        with socket.socket() as s:
            s.settimeout(2)
            with pytest.raises(OSError):
                s.connect((addr, port))


def test_metrics_default_to_loopback_only():
    cfg = MetricsConfig()
    assert cfg.host == "127.0.0.1"
    server = MetricsServer(Metrics(), cfg.host, 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            assert b"linewatch_verdicts_total" in resp.read() or resp.status == 200
        assert_loopback_only(server.port)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.2:{server.port}/metrics", timeout=2)
    finally:
        server.close()
    assert PublisherConfig().bind.startswith("tcp://127.0.0.1:")


def test_an_ipc_endpoint_in_use_is_not_taken_over_but_a_stale_one_is_reused(tmp_path):
    path = tmp_path / "lw.sock"
    first = Publisher(PublisherConfig(bind=f"ipc://{path}"), Metrics())
    first.bind()
    try:
        second = Publisher(PublisherConfig(bind=f"ipc://{path}"), Metrics())
        with pytest.raises(ConfigError, match="another process is listening on it"):
            second.bind()
        second.close(0.1)
    finally:
        first.close(0.1)
    # what a SIGKILLed daemon leaves: a socket file nobody listens on; the next start binds over it
    stale = socket.socket(socket.AF_UNIX)
    path.unlink(missing_ok=True)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    third = Publisher(PublisherConfig(bind=f"ipc://{path}"), Metrics())
    assert third.bind() == f"ipc://{path}"
    third.close(0.1)
    # a path that is not a socket is never deleted to make room
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    fourth = Publisher(PublisherConfig(bind=f"ipc://{regular}"), Metrics())
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        fourth.bind()
    fourth.close(0.1)
    assert regular.read_text() == "keep me"


def test_run_with_a_world_readable_server_key_exits_2_in_one_line(tmp_path, untrained_bundle):
    _, sec = generate_keypair(tmp_path / "keys", "server")
    os.chmod(sec, 0o644)
    write_images(tmp_path / "cam", 1)
    cfg = write_config(tmp_path / "lw.yaml", untrained_bundle,
                       [{"name": "cam", "source": f"dir://{tmp_path / 'cam'}"}],
                       publisher={"curve": {"server_secret_key": str(sec)}})
    proc = run_cli("run", "--config", str(cfg))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("linewatch: error: secret key file ") and "chmod 600" in last
    assert "Traceback" not in proc.stderr


def test_systemd_hardening_is_kept():
    """The unit keeps its sandbox (test_deploy checks every key); here: what protects the keys."""
    unit = (ROOT / "deploy" / "systemd" / "linewatch.service").read_text()
    for line in ("ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "CapabilityBoundingSet=", "User=linewatch"):
        assert any(ln.strip() == line for ln in unit.splitlines()), line
    assert "## Security" in (ROOT / "README.md").read_text()


def test_camera_passwords_never_reach_logs_or_status_messages():
    from linewatch.service.frames import SourceError
    from linewatch.service.sources import redact_url
    from linewatch.service.sources.mjpeg import MJPEGSource
    from linewatch.service.sources.opencv import OpenCVSource

    assert redact_url("rtsp://admin:s3cret@10.0.0.21:554/stream1") == "rtsp://10.0.0.21:554/stream1"
    assert redact_url("rtsp://10.0.0.21/stream1") == "rtsp://10.0.0.21/stream1"
    src = OpenCVSource("rtsp", f"rtsp://admin:s3cret@127.0.0.1:{free_tcp_port()}/stream1", 0.5, loop=False)
    assert "s3cret" not in src.description and "127.0.0.1" in src.description
    with pytest.raises(SourceError) as exc:
        src.open()  # nothing listens there: "cannot open …" goes to the log and the status topic
    assert "s3cret" not in str(exc.value) and "admin" not in str(exc.value)
    assert "s3cret" not in MJPEGSource("http://admin:s3cret@cam:8080/video", 1).description

