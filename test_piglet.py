"""Tests for piglet.py against real PostgreSQL clusters and a real server.

Run as root (the README's command):  /usr/bin/python3 -m pytest -q test_piglet.py
Each cluster is initdb'd into its own temp dir as the `postgres` OS user,
on a free port with its own socket dir; each server listens on port 0.
"""

import contextlib
import glob
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psycopg
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PIGLET = os.path.join(HERE, "piglet.py")
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                key=lambda p: int(p.split("/")[-2]))[-1]
PG_USER = "postgres"
IS_ROOT = os.geteuid() == 0
API = "/api/v1"


# ---------------------------------------------------------------------------
# Fixtures: clusters, servers, a small client
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_as_pg(argv, **kwargs):
    if IS_ROOT:
        kwargs.update(user=PG_USER, group=pwd.getpwnam(PG_USER).pw_gid, extra_groups=[])
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd="/",
                          timeout=120, **kwargs)


def make_temp_dir(prefix):
    """A temp dir the cluster's OS user can use."""
    path = tempfile.mkdtemp(prefix=prefix)
    if IS_ROOT:
        os.chown(path, pwd.getpwnam(PG_USER).pw_uid, -1)
    return path


class Cluster:
    """A throwaway PostgreSQL cluster: temp dir, free port, own socket dir."""

    def __init__(self, settings=()):
        self.base = make_temp_dir("piglet-pg-")
        self.data = os.path.join(self.base, "data")
        self.sock = self.base
        self.logfile = os.path.join(self.base, "server.log")
        self.port = free_port()
        run_as_pg([f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                   "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"])
        lines = ["fsync = off", "synchronous_commit = off", "full_page_writes = off",
                 f"port = {self.port}", f"unix_socket_directories = '{self.sock}'",
                 "listen_addresses = '127.0.0.1'", *settings]
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as handle:
            handle.write("\n".join(lines) + "\n")
        self.start()

    @property
    def dsn(self):
        return f"host={self.sock} port={self.port} dbname=postgres user=postgres"

    def pg_ctl(self, *args):
        return [f"{PG_BIN}/pg_ctl", *args, "-D", self.data]

    def start(self):
        run_as_pg(self.pg_ctl("start", "-w", "-l", self.logfile))

    def stop(self):
        run_as_pg(self.pg_ctl("stop", "-w", "-m", "fast"))

    def connect(self, dbname="postgres", **kwargs):
        return psycopg.connect(self.dsn, dbname=dbname, autocommit=True, **kwargs)

    def service_entry(self):
        """Explicit start/stop/status commands, as on a host without systemd."""
        return {"start": self.pg_ctl("start", "-w", "-l", self.logfile),
                "stop": self.pg_ctl("stop", "-w", "-m", "fast"),
                "status": self.pg_ctl("status"), "user": PG_USER, "port": self.port}

    def destroy(self):
        with contextlib.suppress(subprocess.SubprocessError):
            run_as_pg(self.pg_ctl("stop", "-w", "-m", "immediate"))
        shutil.rmtree(self.base, ignore_errors=True)


class Server:
    """piglet.py serve on port 0, with its own config, keys and state dir."""

    def __init__(self, cluster, **overrides):
        self.dir = tempfile.mkdtemp(prefix="piglet-srv-")
        self.config_file = os.path.join(self.dir, "piglet.json")
        self.log_file = os.path.join(self.dir, "piglet.log")
        config = {
            "listen": "127.0.0.1", "port": 0,
            "keys_file": os.path.join(self.dir, "keys.json"),
            "state_dir": os.path.join(self.dir, "state"),
            "rate_limit": {"per_minute": 100000, "burst": 100000},
            "postgres": {"dsn": cluster.dsn, "service": "postgres"},
            "backups": {"dir": os.path.join(self.dir, "backups")},
            "snapshots": {"dir": os.path.join(self.dir, "snapshots")},
            "services": {"postgres": cluster.service_entry()},
        }
        config.update(overrides)
        self.write_config(config)
        self.admin_key = self.cli("key", "create", "--name", "admin").strip()
        self.read_key = self.cli("key", "create", "--name", "reader",
                                 "--scope", "read").strip()
        self.proc = None
        self.start()

    def write_config(self, config):
        self.config = config
        with open(self.config_file, "w") as handle:
            json.dump(config, handle)

    def cli(self, *args, check=True):
        result = subprocess.run([sys.executable, PIGLET, *args, "--config", self.config_file],
                                capture_output=True, text=True, timeout=30)
        if check:
            assert result.returncode == 0, result.stderr
        return result.stdout

    def start(self, env=None):
        self.log_handle = open(self.log_file, "a")
        self.proc = subprocess.Popen(
            [sys.executable, PIGLET, "serve", "--config", self.config_file],
            stdout=self.log_handle, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})))
        self.port = self.wait_for_port()

    def wait_for_port(self):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            found = re.findall(r"listening on 127\.0\.0\.1:(\d+)", self.log())
            if found:
                return int(found[-1])
            assert self.proc.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError("piglet did not start:\n" + self.log())

    def log(self):
        with open(self.log_file) as handle:
            return handle.read()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.log_handle.close()

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method, path, body=None, key="admin", headers=None, conn=None):
        """(status, headers, json or None) for one request."""
        headers = dict(headers or {})
        if key is not None:
            secret = {"admin": self.admin_key, "read": self.read_key}.get(key, key)
            headers.setdefault("Authorization", f"Bearer {secret}")
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.request(method, path if path.startswith("/") else f"{API}/{path}",
                         body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            data = json.loads(raw) if raw else None
            return resp.status, resp.headers, data
        finally:
            if own:
                conn.close()


@pytest.fixture(scope="session")
def cluster():
    cluster = Cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def server(cluster):
    server = Server(cluster)
    yield server
    server.destroy()


@pytest.fixture
def fresh_cluster():
    cluster = Cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def make_server():
    """Servers made inside one test, destroyed after it."""
    made = []

    def make(cluster, **overrides):
        made.append(Server(cluster, **overrides))
        return made[-1]

    yield make
    for server in made:
        server.destroy()


def assert_error(status, data, want_status, want_code):
    assert status == want_status, data
    assert set(data) == {"error"}, data
    assert data["error"]["code"] == want_code, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert isinstance(data["error"]["details"], dict)


def raw_exchange(port, payload, timeout=10):
    """Send raw bytes, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def parse_raw(response):
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), json.loads(body) if body else None


# ---------------------------------------------------------------------------
# Core: status, system, HTTP behaviour
# ---------------------------------------------------------------------------


def test_status_real_postgres_healthy(server):
    status, headers, data = server.request("GET", "status")
    assert status == 200
    assert data["status"] == "healthy"
    assert data["services"] == {"postgres": "running"}
    assert isinstance(data["uptime"], int) and data["uptime"] >= 0
    assert data["version"]
    assert headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{16}", headers["X-Request-Id"])


def test_head_status_same_headers_no_body_then_get_on_same_connection(server):
    conn = server.connection()
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    conn.request("HEAD", f"{API}/status", headers=auth)
    head = conn.getresponse()
    assert head.read() == b""
    conn.request("GET", f"{API}/status", headers=auth)
    get = conn.getresponse()
    body = get.read()
    assert head.status == get.status == 200
    assert head.headers["Content-Length"] == get.headers["Content-Length"] == str(len(body))
    assert json.loads(body)["status"] == "healthy"
    conn.close()


def test_system_reports_host_and_postgres(server, cluster):
    status, _, data = server.request("GET", "system")
    assert status == 200
    assert data["hostname"] == socket.gethostname()
    assert data["cpu"] == os.cpu_count()
    assert data["kernel"] == os.uname().release
    assert data["memory_bytes"] > 0 and data["memory"].endswith("B")
    stat = os.statvfs(cluster.data)
    assert data["disk_bytes"] == stat.f_blocks * stat.f_frsize
    assert 0 < data["disk_free_bytes"] <= data["disk_bytes"]
    with cluster.connect() as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
    assert data["postgres_version"] == version
    assert data["uptime"] > 0


def test_unknown_route_404_envelope(server):
    status, _, data = server.request("GET", "nosuch/route")
    assert_error(status, data, 404, "NOT_FOUND")
    status, _, data = server.request("GET", "/elsewhere")
    assert_error(status, data, 404, "NOT_FOUND")


@pytest.mark.parametrize("method", ["DELETE", "POST", "BREW"])
def test_wrong_method_405_with_allow(server, method):
    status, headers, data = server.request(method, "status")
    assert_error(status, data, 405, "METHOD_NOT_ALLOWED")
    assert headers["Allow"] == "GET, HEAD"


def test_trailing_slash_names_same_route(server):
    status, _, data = server.request("GET", "status/")
    assert status == 200 and data["status"] == "healthy"


def test_request_id_echoed_and_logged(server):
    status, headers, _ = server.request("GET", "status", headers={"X-Request-Id": "abc-123"})
    assert status == 200 and headers["X-Request-Id"] == "abc-123"
    _, headers, _ = server.request("GET", "status", headers={"X-Request-Id": "bad id\x7f"})
    assert headers["X-Request-Id"] != "bad id\x7f"
    time.sleep(0.1)
    assert re.search(r"GET '/api/v1/status' 200 [\d.]+ms key=admin rid=abc-123", server.log())


@pytest.mark.parametrize("body,ctype,want", [
    (b'{"name":', "application/json", (400, "BAD_REQUEST")),
    (b"", "application/json", (400, "BAD_REQUEST")),
    (b"[]", "application/json", (400, "BAD_REQUEST")),
    (b'{"name": 123}', "application/json", (400, "BAD_REQUEST")),
    (b'"just a string"', "application/json", (400, "BAD_REQUEST")),
    (b'{"name": "x"}', "text/plain", (415, "UNSUPPORTED_MEDIA_TYPE")),
    (b'{"name": "x", "scope": "root"}', "application/json", (400, "BAD_REQUEST")),
    (b'\xff\xfe', "application/json", (400, "BAD_REQUEST")),
])
def test_bad_bodies_get_envelope(server, body, ctype, want):
    status, _, data = server.request("POST", "keys", body=body,
                                     headers={"Content-Type": ctype})
    assert_error(status, data, *want)


def test_unknown_body_field_named(server):
    status, _, data = server.request("POST", "keys", body={"name": "x1", "scop": "read"})
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["field"] == "scop"
    status, _, data = server.request("GET", "keys")
    assert "x1" not in [k["name"] for k in data["keys"]]


def test_json_with_charset_accepted(server):
    status, _, data = server.request("POST", "keys", body=b'{"name": "charset-key"}',
                                     headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 201 and data["name"] == "charset-key"


def test_content_length_not_a_number_400(server):
    response = raw_exchange(server.port, (
        f"POST {API}/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin_key}\r\n"
        "Content-Type: application/json\r\nContent-Length: abc\r\n\r\n").encode())
    status, _, data = parse_raw(response)
    assert_error(status, data, 400, "BAD_REQUEST")


def test_body_over_limit_413_without_reading_it(server):
    size = 1024 * 1024 + 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((f"POST {API}/keys HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {server.admin_key}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
                      ).encode())
        # No body byte is sent: the answer must come anyway.
        response = sock.recv(65536)
    status, head, data = parse_raw(response)
    assert_error(status, data, 413, "PAYLOAD_TOO_LARGE")
    assert "Connection: close" in head


@pytest.mark.parametrize("payload,want_status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /api/v1/status HTTP/9.9\r\n\r\n", 505),
    (b"GET /api/v1/status HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
])
def test_stdlib_error_replies_are_json(server, payload, want_status):
    status, head, data = parse_raw(raw_exchange(server.port, payload))
    assert status == want_status
    assert "Content-Type: application/json" in head
    assert data["error"]["code"] == "BAD_REQUEST"
    assert data["error"]["details"]["http_status"] == want_status


def test_bad_path_encoding_400(server):
    status, _, data = server.request("DELETE", "keys/%ff%fe")
    assert_error(status, data, 400, "BAD_REQUEST")


# ---------------------------------------------------------------------------
# Authentication and keys
# ---------------------------------------------------------------------------


def test_no_key_401_with_challenge(server):
    status, headers, data = server.request("GET", "status", key=None)
    assert_error(status, data, 401, "UNAUTHORIZED")
    assert headers["WWW-Authenticate"] == "Bearer"


def test_key_differing_in_last_character_401(server):
    real = server.admin_key
    wrong = real[:-1] + ("A" if real[-1] != "A" else "B")
    status, headers, data = server.request("GET", "status", key=wrong)
    assert_error(status, data, 401, "UNAUTHORIZED")
    assert headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer a b", "token"])
def test_malformed_authorization_401(server, header):
    status, _, data = server.request("GET", "status", key=None,
                                     headers={"Authorization": header})
    assert_error(status, data, 401, "UNAUTHORIZED")


def test_lowercase_bearer_scheme_accepted(server):
    status, _, _ = server.request("GET", "status", key=None,
                                  headers={"Authorization": f"bearer {server.admin_key}"})
    assert status == 200


def test_keys_file_holds_only_hashes_mode_0600(server):
    mode = os.stat(server.config["keys_file"]).st_mode & 0o777
    assert mode == 0o600
    with open(server.config["keys_file"]) as handle:
        text = handle.read()
    assert server.admin_key not in text and server.read_key not in text
    names = {k["name"] for k in json.loads(text)["keys"]}
    assert {"admin", "reader"} <= names
    leftovers = [n for n in os.listdir(server.dir) if n.startswith(".keys.json")]
    assert leftovers == []


def test_key_secret_has_256_bits(server):
    secret = server.admin_key
    assert secret.startswith("pgl_") and len(secret) >= 4 + 43


def test_cli_key_changes_seen_by_running_daemon(server):
    secret = server.cli("key", "create", "--name", "cli-made", "--scope", "read").strip()
    assert server.request("GET", "status", key=secret)[0] == 200
    listing = server.cli("key", "list")
    assert "cli-made\tread" in listing and secret not in listing
    server.cli("key", "revoke", "--name", "cli-made")
    status, _, data = server.request("GET", "status", key=secret)
    assert_error(status, data, 401, "UNAUTHORIZED")


def test_cli_duplicate_key_name_fails_cleanly(server):
    result = subprocess.run([sys.executable, PIGLET, "key", "create", "--name", "admin",
                             "--config", server.config_file],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "exists" in result.stderr and result.stdout == ""


def test_api_key_lifecycle(server):
    status, headers, data = server.request("POST", "keys", {"name": "ops", "scope": "admin"})
    assert status == 201
    assert headers["Location"] == f"{API}/keys/ops"
    secret = data["key"]
    assert data["name"] == "ops" and data["scope"] == "admin"
    assert server.request("GET", "status", key=secret)[0] == 200
    status, _, listing = server.request("GET", "keys")
    assert status == 200
    ops = [k for k in listing["keys"] if k["name"] == "ops"][0]
    assert set(ops) == {"name", "scope", "created_at", "last_used_at"}
    assert ops["last_used_at"] is not None
    assert secret not in json.dumps(listing)
    status, _, data = server.request("POST", "keys", {"name": "ops"})
    assert_error(status, data, 409, "CONFLICT")
    assert server.request("DELETE", "keys/ops")[0] == 204
    assert server.request("GET", "status", key=secret)[0] == 401
    status, _, data = server.request("DELETE", "keys/ops")
    assert_error(status, data, 404, "NOT_FOUND")


def test_read_key_cannot_mutate_or_list_keys(server):
    assert server.request("GET", "status", key="read")[0] == 200
    status, _, data = server.request("POST", "keys", {"name": "sneaky"}, key="read")
    assert_error(status, data, 403, "FORBIDDEN")
    status, _, data = server.request("GET", "keys", key="read")
    assert_error(status, data, 403, "FORBIDDEN")
    status, _, data = server.request("DELETE", "keys/admin", key="read")
    assert_error(status, data, 403, "FORBIDDEN")


def test_secrets_never_logged(server):
    server.request("POST", "keys", {"name": "logged-check"})
    server.request("GET", "status", key=server.admin_key[:-1] + "x")
    time.sleep(0.1)
    text = server.log()
    assert server.admin_key not in text and server.read_key not in text
    assert server.admin_key[4:20] not in text


# ---------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------


@pytest.fixture
def limited_server(cluster, make_server):
    """A server on the contract's default limits: 100/min, burst 20."""
    return make_server(cluster, rate_limit={"per_minute": 100, "burst": 20})


def test_burst_of_25_passes_20_then_429(limited_server):
    conn = limited_server.connection()
    results = [limited_server.request("GET", "status", conn=conn) for _ in range(25)]
    statuses = [r[0] for r in results]
    assert statuses == [200] * 20 + [429] * 5
    remaining = [int(r[1]["X-RateLimit-Remaining"]) for r in results[:20]]
    assert remaining == list(range(19, -1, -1))
    assert all(r[1]["X-RateLimit-Limit"] == "100" for r in results)
    status, headers, data = results[20]
    assert_error(status, data, 429, "RATE_LIMITED")
    assert int(headers["Retry-After"]) >= 1
    assert int(headers["X-RateLimit-Reset"]) >= int(time.time())
    # One token comes back every 0.6 s; a rejected request costs none.
    time.sleep(0.7)
    assert limited_server.request("GET", "status", conn=conn)[0] == 200
    assert limited_server.request("GET", "status", conn=conn)[0] == 429
    conn.close()


def test_rate_limit_per_key_not_shared(limited_server):
    for _ in range(20):
        limited_server.request("GET", "status")
    assert limited_server.request("GET", "status")[0] == 429
    assert limited_server.request("GET", "status", key="read")[0] == 200


def test_unauthenticated_limited_by_peer_ignoring_forwarded_for(limited_server):
    statuses = [limited_server.request("GET", "status", key="pgl_guess%d" % i,
                                       headers={"X-Forwarded-For": f"10.0.0.{i}"})[0]
                for i in range(22)]
    assert statuses == [401] * 20 + [429] * 2


def test_sighup_reloads_rate_limit(limited_server):
    config = dict(limited_server.config, rate_limit={"per_minute": 600, "burst": 5})
    limited_server.write_config(config)
    limited_server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        headers = limited_server.request("GET", "status")[1]
        if headers["X-RateLimit-Limit"] == "600":
            break
        time.sleep(0.1)
    assert headers["X-RateLimit-Limit"] == "600"
    assert "reloaded" in limited_server.log()


# ---------------------------------------------------------------------------
# Robustness: idle and slow clients, PostgreSQL down, lifecycle
# ---------------------------------------------------------------------------


def test_200_idle_connections_do_not_block_a_request(server):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    try:
        started = time.monotonic()
        status, _, data = server.request("GET", "status")
        elapsed = time.monotonic() - started
        assert status == 200 and data["status"] == "healthy"
        assert elapsed < 5, f"request took {elapsed:.1f}s behind idle connections"
    finally:
        for sock in idle:
            sock.close()


def test_slow_header_trickle_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /api/v1/status HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 25:
            try:
                sock.sendall(b"X: y\r\n")
            except OSError:
                closed = True
                break
            sock.settimeout(1)
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
            except OSError:
                closed = True
                break
    assert closed, "a client trickling headers kept its connection"


def test_postgres_down_unhealthy_then_recovers(fresh_cluster, make_server):
    server = make_server(fresh_cluster)
    assert server.request("GET", "status")[2]["status"] == "healthy"
    fresh_cluster.stop()
    time.sleep(1.1)  # the health probe is cached for one second
    status, _, data = server.request("GET", "status")
    assert status == 200
    assert data["status"] == "unhealthy"
    assert data["services"]["postgres"] == "stopped"
    assert server.request("GET", "system")[2]["postgres_version"] is None
    fresh_cluster.start()
    time.sleep(1.1)
    assert server.request("GET", "status")[2]["status"] == "healthy"


def test_sigterm_exits_zero(cluster, make_server):
    server = make_server(cluster)
    conn = server.connection()
    assert server.request("GET", "status", conn=conn)[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    assert "stopped" in server.log()
    conn.close()


def test_notify_socket_gets_ready(cluster, make_server, tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(15)
        server = make_server(cluster)
        server.stop()
        server.start(env={"NOTIFY_SOCKET": path})
        assert sock.recv(1024) == b"READY=1"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def run_serve(config, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, PIGLET, "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("config,named", [
    ({"prot": 8080}, "prot"),
    ({"port": "8080"}, "port"),
    ({"port": True}, "port"),
    ({"rate_limit": {"burst": 20, "per_minut": 5}}, "rate_limit.per_minut"),
    ({"postgres": {"dsn": 5}}, "postgres.dsn"),
    ({"services": {"pg": {"unit": "x", "prot": 1}}}, "services.pg.prot"),
    ({"snapshots": {"paths": [1]}}, "snapshots.paths"),
])
def test_bad_config_stops_startup_naming_field(tmp_path, config, named):
    result = run_serve(config, tmp_path)
    assert result.returncode == 2
    assert repr(named) in result.stderr


def test_missing_explicit_config_file_fails(tmp_path):
    result = subprocess.run([sys.executable, PIGLET, "serve", "--config",
                             str(tmp_path / "none.json")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "does not exist" in result.stderr


# ---------------------------------------------------------------------------
# Unit checks of small helpers (imported, no server)
# ---------------------------------------------------------------------------

sys.path.insert(0, HERE)
import piglet  # noqa: E402


@pytest.mark.parametrize("size,text", [
    (0, "0B"), (512, "512B"), (1024, "1KB"), (1536, "1.5KB"), (10 * 1024, "10KB"),
    (50 * 1024 ** 2, "50MB"), (int(1.2 * 1024 ** 3), "1.2GB"),
    (int(9.96 * 1024 ** 2), "10MB"), (1023 * 1024, "1023KB"), (1024 ** 2 - 1, "1MB"),
])
def test_human_size(size, text):
    assert piglet.human_size(size) == text


def test_rate_limiter_bounds():
    limiter = piglet.RateLimiter(per_minute=60, burst=3)
    results = [limiter.take("k")[0] for _ in range(5)]
    assert results == [True, True, True, False, False]
    tokens = limiter._buckets["k"][0]
    assert 0 <= tokens < 1
    time.sleep(1.05)
    assert limiter.take("k")[0] is True


# ---------------------------------------------------------------------------
# Services (explicit commands: the path used where systemd is absent)
# ---------------------------------------------------------------------------


def test_services_list_and_get(server, cluster):
    status, _, data = server.request("GET", "services")
    assert status == 200
    assert data["services"] == [{"name": "postgres", "status": "running",
                                 "port": cluster.port, "unit": None, "enabled": None,
                                 "pid": None, "since": None}]
    status, _, data = server.request("GET", "services/postgres")
    assert status == 200 and data["status"] == "running"


def test_unknown_service_404_and_bad_action_400(server):
    for method, path in (("GET", "services/nosuch"), ("POST", "services/nosuch/restart")):
        status, _, data = server.request(method, path)
        assert_error(status, data, 404, "NOT_FOUND")
        assert data["error"]["details"]["service"] == "nosuch"
    status, _, data = server.request("POST", "services/postgres/reboot")
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["allowed"] == ["start", "stop", "restart"]
    status, headers, data = server.request("GET", "services/postgres/restart")
    assert_error(status, data, 405, "METHOD_NOT_ALLOWED")
    assert headers["Allow"] == "POST"


def test_service_stop_start_through_commands(fresh_cluster, make_server):
    server = make_server(fresh_cluster)
    status, _, data = server.request("POST", "services/postgres/stop")
    assert status == 200 and data["status"] == "stopped"
    with pytest.raises(psycopg.OperationalError):
        fresh_cluster.connect(connect_timeout=2)
    assert server.request("GET", "status")[2]["status"] == "unhealthy"
    status, _, data = server.request("POST", "services/postgres/start", body={})
    assert status == 200 and data["status"] == "running"
    with fresh_cluster.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    status, _, data = server.request("POST", "services/postgres/restart")
    assert status == 200 and data["status"] == "running"


# ---------------------------------------------------------------------------
# Snapshots: workspace files and databases rolled back together
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def snap_cluster():
    """A cluster of their own: snapshot restores drop and recreate every database."""
    cluster = Cluster()
    yield cluster
    cluster.destroy()


class SnapEnv:
    """A server whose workspace is `ws`, with an `editor` service to be stopped."""

    def __init__(self, cluster, make_server, base, paths=None, **overrides):
        self.cluster, self.base = cluster, str(base)
        self.ws = os.path.join(self.base, "ws")
        self.events = os.path.join(self.base, "editor.log")
        flag = os.path.join(self.base, "editor.running")
        os.mkdir(self.ws)
        editor = {"start": ["sh", "-c", f"echo start >> {self.events}; touch {flag}"],
                  "stop": ["sh", "-c", f"echo stop >> {self.events}; rm -f {flag}"],
                  "status": ["sh", "-c", f"test -e {flag} || exit 3"]}
        config = {"snapshots": {"dir": os.path.join(self.base, "snapshots"),
                                "paths": paths or [self.ws], "stop_services": ["editor"]},
                  "services": {"postgres": cluster.service_entry(), "editor": editor},
                  "pgbackrest": {"enabled": False}}
        config.update(overrides)
        self.server = make_server(cluster, **config)
        self.store = config["snapshots"]["dir"]

    def wait(self, data, state="succeeded"):
        job_id = data["job"]["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status, _, body = self.server.request("GET", f"jobs/{job_id}")
            assert status == 200
            if body["job"]["state"] in ("succeeded", "failed"):
                assert body["job"]["state"] == state, body["job"]
                return body["job"]
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish")

    def snapshot(self, name, state="succeeded"):
        status, headers, data = self.server.request("POST", "snapshots", {"name": name})
        assert status == 202, data
        assert headers["Location"] == f"{API}/jobs/{data['job']['id']}"
        return self.wait(data, state)

    def restore(self, name):
        status, _, data = self.server.request("POST", f"snapshots/{name}/restore")
        assert status == 202, data
        return self.wait(data)

    def stored(self, name, rel):
        return os.path.join(self.store, name, "files", "0", rel)


@pytest.fixture
def snap(snap_cluster, make_server, tmp_path):
    return SnapEnv(snap_cluster, make_server, tmp_path)


@pytest.fixture(scope="session")
def snap_shared(snap_cluster, tmp_path_factory):
    """One server for the snapshot tests that change nothing."""
    made = []
    env = SnapEnv(snap_cluster, lambda c, **o: made.append(Server(c, **o)) or made[-1],
                  tmp_path_factory.mktemp("snapshared"))
    yield env
    made[0].destroy()


def tree_state(root):
    """Everything `compare equal` means: type, content, mode, owner, mtime, links."""
    state, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            if not name and dirpath != root:
                continue
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat_is(st, "S_ISLNK"):
                what = ("link", os.readlink(path))
            elif stat_is(st, "S_ISREG"):
                with open(path, "rb") as handle:
                    what = ("file", handle.read(), inodes.setdefault(st.st_ino, rel))
            else:
                what = ("dir",)
            state[rel] = (what, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return state


def stat_is(st, test):
    import stat as stat_module
    return getattr(stat_module, test)(st.st_mode)


def make_workspace(ws):
    """Files, a symlink, an empty directory, an executable, a hard link, an owner."""
    def write(rel, text, mode=0o644):
        path = os.path.join(ws, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, mode)
    write("a.txt", "alpha\n")
    write("sub/b.txt", "beta\n", 0o640)
    write("run.sh", "#!/bin/sh\necho hi\n", 0o755)
    write("hard1", "shared inode\n")
    os.link(os.path.join(ws, "hard1"), os.path.join(ws, "sub", "hard2"))
    os.symlink("a.txt", os.path.join(ws, "link"))
    os.mkdir(os.path.join(ws, "empty"), 0o700)
    write("owned.txt", "someone else's\n", 0o600)
    os.chown(os.path.join(ws, "owned.txt"), 1234, 1234)
    os.lchown(os.path.join(ws, "link"), 1234, 1234)
    for rel in ("a.txt", "sub/b.txt", "run.sh", "sub", "empty", ""):
        os.utime(os.path.join(ws, rel), ns=(1_600_000_000_000_000_000,) * 2)


def rows(cluster, table="t", db="snapdb"):
    with cluster.connect(db) as conn:
        return [r[0] for r in conn.execute(f"SELECT v FROM {table} ORDER BY v")]


def object_exists(cluster, catalog, column, name):
    with cluster.connect() as conn:
        return conn.execute(f"SELECT count(*) FROM {catalog} WHERE {column} = %s",
                            (name,)).fetchone()[0] == 1


def edit_workspace_and_data(ws, cluster):
    with open(os.path.join(ws, "a.txt"), "a") as handle:
        handle.write("edited\n")
    os.unlink(os.path.join(ws, "sub", "b.txt"))
    os.makedirs(os.path.join(ws, "newdir"))
    with open(os.path.join(ws, "newdir", "new.txt"), "w") as handle:
        handle.write("new\n")
    os.chmod(os.path.join(ws, "run.sh"), 0o644)
    os.unlink(os.path.join(ws, "link"))
    os.symlink("run.sh", os.path.join(ws, "link"))
    with cluster.connect("snapdb") as conn:
        conn.execute("INSERT INTO t VALUES ('b1'), ('b2')")
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE laterdb")
        conn.execute("CREATE ROLE laterrole LOGIN PASSWORD 'secret-later'")


def test_snapshot_restore_brings_files_and_rows_back_and_pre_restore_undoes_it(snap):
    cluster = snap.cluster
    with cluster.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS snapdb WITH (FORCE)")
        conn.execute("DROP DATABASE IF EXISTS laterdb WITH (FORCE)")
        conn.execute("DROP ROLE IF EXISTS laterrole")
        conn.execute("CREATE DATABASE snapdb")
    with cluster.connect("snapdb") as conn:
        conn.execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('a1'), ('a2')")
    make_workspace(snap.ws)
    assert snap.server.request("POST", "services/editor/start")[0] == 200
    at_s1 = tree_state(snap.ws)
    job = snap.snapshot("s1")
    assert job["result"]["name"] == "s1" and job["result"]["files"] == 6
    assert job["result"]["paths"] == [snap.ws]
    assert "snapdb" in job["result"]["database"]["databases"]
    edit_workspace_and_data(snap.ws, cluster)
    edited = tree_state(snap.ws)

    result = snap.restore("s1")["result"]
    assert tree_state(snap.ws) == at_s1
    assert rows(cluster) == ["a1", "a2"]
    assert not object_exists(cluster, "pg_database", "datname", "laterdb")
    assert not object_exists(cluster, "pg_roles", "rolname", "laterrole")
    with open(snap.events) as handle:
        assert handle.read().split() == ["start", "stop", "start"]
    assert result["services_restarted"] == ["editor"]
    pre = result["pre_restore"]
    assert re.fullmatch(r"pre-restore-\d{8}T\d{6}Z", pre)
    status, _, data = snap.server.request("GET", f"snapshots/{pre}")
    assert status == 200 and data["paths"] == [snap.ws]

    snap.restore(pre)
    assert tree_state(snap.ws) == edited
    assert rows(cluster) == ["a1", "a2", "b1", "b2"]
    assert object_exists(cluster, "pg_database", "datname", "laterdb")
    with cluster.connect() as conn:
        verifier = conn.execute("SELECT rolpassword FROM pg_authid "
                                "WHERE rolname = 'laterrole'").fetchone()[0]
    assert verifier.startswith("SCRAM-SHA-256$")
    assert "secret-later" not in snap.server.log()


def test_snapshot_after_one_change_stores_only_that_file(snap):
    for index in range(40):
        with open(os.path.join(snap.ws, f"f{index:02d}"), "wb") as handle:
            handle.write(os.urandom(10240))
    snap.snapshot("s1")
    with open(os.path.join(snap.ws, "f07"), "r+b") as handle:
        handle.write(b"changed")
    s2 = snap.snapshot("s2")["result"]
    for index in range(40):
        rel = f"f{index:02d}"
        old, new = os.stat(snap.stored("s1", rel)), os.stat(snap.stored("s2", rel))
        live = os.stat(os.path.join(snap.ws, rel))
        assert new.st_ino != live.st_ino and new.st_mode & 0o777 == 0o400
        if rel == "f07":
            assert new.st_ino != old.st_ino and new.st_nlink == 1
        else:
            assert new.st_ino == old.st_ino and new.st_nlink == 2
    assert s2["added_bytes"] - s2["database"]["size_bytes"] == 10240
    assert s2["size_bytes"] - s2["database"]["size_bytes"] == 40 * 10240
    assert s2["added"] == piglet.human_size(s2["added_bytes"])


def test_snapshot_delete_shared_one_later_one_restores_whole(snap):
    make_workspace(snap.ws)
    snap.snapshot("s1")
    with open(os.path.join(snap.ws, "a.txt"), "w") as handle:
        handle.write("second\n")
    at_s2 = tree_state(snap.ws)
    snap.snapshot("s2")
    status, _, data = snap.server.request("DELETE", "snapshots/s1")
    assert status == 204 and data is None
    assert_error(*snap.server.request("GET", "snapshots/s1")[::2], 404, "NOT_FOUND")
    assert not os.path.exists(os.path.join(snap.store, "s1"))
    shutil.rmtree(snap.ws)
    os.makedirs(os.path.join(snap.ws, "junk"))
    snap.restore("s2")
    assert tree_state(snap.ws) == at_s2
    status, _, data = snap.server.request("GET", "snapshots")
    assert status == 200
    names = [s["name"] for s in data["snapshots"]]
    assert names[1] == "s2" and names[0].startswith("pre-restore-") and len(names) == 2


@pytest.mark.parametrize("name", ["../etc", "", "a" * 64, "\u20ac" * 22, ".hidden",
                                  "-x", "a/b", "a\n", "a b", None, 7])
def test_snapshot_bad_name_400_nothing_created(snap_shared, name):
    status, _, data = snap_shared.server.request("POST", "snapshots", {"name": name})
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["field"] == "name"
    assert not os.path.exists(snap_shared.store) or os.listdir(snap_shared.store) == []
    assert snap_shared.server.request("GET", "jobs")[2] == {"jobs": []}


def test_snapshot_same_name_twice_409_first_untouched(snap):
    name = "n" * 63
    first = snap.snapshot(name)["result"]
    with open(os.path.join(snap.store, name, "manifest.json"), "rb") as handle:
        manifest = handle.read()
    with open(os.path.join(snap.ws, "later.txt"), "w") as handle:
        handle.write("later\n")
    status, _, data = snap.server.request("POST", "snapshots", {"name": name})
    assert_error(status, data, 409, "CONFLICT")
    assert data["error"]["details"] == {"snapshot": name}
    status, _, data = snap.server.request("GET", f"snapshots/{name}")
    assert status == 200 and data == first
    with open(os.path.join(snap.store, name, "manifest.json"), "rb") as handle:
        assert handle.read() == manifest


@pytest.mark.parametrize("method,suffix", [("POST", "/restore"), ("GET", ""),
                                           ("DELETE", "")])
def test_snapshot_path_traversal_rejected(snap_shared, method, suffix):
    status, _, data = snap_shared.server.request(method, f"snapshots/..%2F..%2Fetc{suffix}")
    assert_error(status, data, 400, "BAD_REQUEST")
    status, _, data = snap_shared.server.request(method, f"snapshots/..{suffix}")
    assert status in (400, 404) and "error" in data


def test_snapshot_symlink_out_of_store_is_not_followed(snap, tmp_path):
    snap.snapshot("real")
    outside = tmp_path / "outside"
    shutil.copytree(os.path.join(snap.store, "real"), outside, symlinks=True)
    os.symlink(outside, os.path.join(snap.store, "evil"))
    for method, suffix in (("GET", ""), ("POST", "/restore"), ("DELETE", "")):
        status, _, data = snap.server.request(method, f"snapshots/evil{suffix}")
        assert_error(status, data, 404, "NOT_FOUND")
    status, _, data = snap.server.request("GET", "snapshots")
    assert [s["name"] for s in data["snapshots"]] == ["real"]
    assert os.path.isfile(outside / "snapshot.json")


def test_snapshot_unknown_404_and_read_key_403(snap_shared):
    for method, path in (("GET", "snapshots/nosuch"), ("DELETE", "snapshots/nosuch"),
                         ("POST", "snapshots/nosuch/restore")):
        status, _, data = snap_shared.server.request(method, path)
        assert_error(status, data, 404, "NOT_FOUND")
        assert data["error"]["details"] == {"snapshot": "nosuch"}
    status, _, data = snap_shared.server.request("POST", "snapshots", {"name": "x"},
                                                 key="read")
    assert_error(status, data, 403, "FORBIDDEN")
    status, _, data = snap_shared.server.request("GET", "snapshots", key="read")
    assert status == 200 and data == {"snapshots": []}


def test_snapshot_failing_dump_leaves_nothing(snap_cluster, make_server, tmp_path):
    env = SnapEnv(snap_cluster, make_server, tmp_path,
                  postgres={"dsn": snap_cluster.dsn, "os_user": "nobody"})
    job = env.snapshot("broken", state="failed")
    assert job["error"]["code"] == "UNAVAILABLE"
    assert "pg_dumpall failed" in job["error"]["message"]
    assert env.server.request("GET", "snapshots")[2] == {"snapshots": []}
    assert os.listdir(env.store) == []


def test_snapshot_workspace_overlapping_data_dir_503(snap_cluster, make_server, tmp_path):
    env = SnapEnv(snap_cluster, make_server, tmp_path,
                  paths=[os.path.dirname(snap_cluster.data)])
    status, _, data = env.server.request("POST", "snapshots", {"name": "x"})
    assert_error(status, data, 503, "UNAVAILABLE")
    assert data["error"]["details"]["dependency"] == "snapshots"
    assert "data directory" in data["error"]["message"]


def test_snapshot_restore_never_writes_through_a_planted_symlink(snap, tmp_path):
    make_workspace(snap.ws)
    at_s1 = tree_state(snap.ws)
    snap.snapshot("s1")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(os.path.join(snap.ws, "sub"))
    os.symlink(outside, os.path.join(snap.ws, "sub"))
    snap.restore("s1")
    assert tree_state(snap.ws) == at_s1
    assert os.listdir(outside) == []


def test_snapshot_role_script_keeps_existing_roles_and_masks_secrets():
    script = (b'\\restrict abc\nCREATE ROLE alice;\nALTER ROLE alice WITH LOGIN;\n'
              b'CREATE ROLE "odd ""name""";\nCREATE ROLE piglet;\n')
    kept = piglet.without_create_role(script, {"piglet", 'odd "name"'})
    assert kept == (b'\\restrict abc\nCREATE ROLE alice;\nALTER ROLE alice WITH LOGIN;\n')
    line = "LINE 1: ALTER ROLE a PASSWORD 'it''s' VALID; SCRAM-SHA-256$4096:abc$x:y"
    assert piglet.mask_secrets(line) == "LINE 1: ALTER ROLE a PASSWORD '***' VALID; ***"


def test_snapshot_restore_with_damaged_dump_fails_touching_nothing(snap):
    make_workspace(snap.ws)
    assert snap.server.request("POST", "services/editor/start")[0] == 200
    snap.snapshot("s1")
    with open(os.path.join(snap.store, "s1", "db", "0.dump"), "r+b") as handle:
        handle.write(b"garbage")
    os.unlink(os.path.join(snap.ws, "a.txt"))
    before = tree_state(snap.ws)
    status, _, data = snap.server.request("POST", "snapshots/s1/restore")
    assert status == 202
    job = snap.wait(data, state="failed")
    assert job["error"]["code"] == "UNAVAILABLE"
    assert "pg_restore failed" in job["error"]["message"]
    assert tree_state(snap.ws) == before
    with open(snap.events) as handle:
        assert handle.read().split() == ["start", "stop", "start"]
    assert snap.server.request("GET", "services/editor")[2]["status"] == "running"
