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
# Backups and restores (real pgBackRest and pg_dump)
# ---------------------------------------------------------------------------

import datetime  # noqa: E402

STANZA = "piglet"
PHYSICAL_LABEL = re.compile(r"^\d{8}-\d{6}F(_\d{8}-\d{6}[DI])?$")
LOGICAL_ID = re.compile(r"^\d{8}-\d{6}L-[0-9a-f]{6}$")


def archive_command(cluster, stanza=STANZA):
    return f"pgbackrest --config {cluster.pgbr_conf} --stanza {stanza} archive-push %p"


def set_archive_command(cluster, command):
    with cluster.connect() as conn:
        conn.execute("ALTER SYSTEM SET archive_command = %s" % sql_literal(command))
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)  # the archiver re-reads its config on its next loop


def sql_literal(text):
    return "'" + text.replace("'", "''") + "'"


def backup_cluster(stanza_create=True):
    """A cluster archiving through its own pgBackRest config, all in its temp dir."""
    cluster = Cluster(settings=["archive_mode = on"])
    uid = pwd.getpwnam(PG_USER).pw_uid
    dirs = {}
    for name in ("repo", "log", "lock", "spool"):
        dirs[name] = os.path.join(cluster.base, "pgbr-" + name)
        os.mkdir(dirs[name], 0o750)
        if IS_ROOT:
            os.chown(dirs[name], uid, -1)
    cluster.pgbr_dirs = dirs
    cluster.pgbr_conf = os.path.join(cluster.base, "pgbackrest.conf")
    with open(cluster.pgbr_conf, "w") as handle:
        handle.write(f"[global]\nrepo1-path={dirs['repo']}\nlog-path={dirs['log']}\n"
                     f"lock-path={dirs['lock']}\nspool-path={dirs['spool']}\n"
                     "compress-type=none\nstart-fast=y\narchive-timeout=8\njob-retry=0\n"
                     f"repo1-retention-full=9999\n\n[{STANZA}]\npg1-path={cluster.data}\n"
                     f"pg1-port={cluster.port}\npg1-socket-path={cluster.sock}\n")
    os.chmod(cluster.pgbr_conf, 0o644)
    set_archive_command(cluster, archive_command(cluster))
    if stanza_create:
        pgbackrest(cluster, "stanza-create")
    return cluster


def pgbackrest(cluster, *args):
    return run_as_pg(["pgbackrest", f"--config={cluster.pgbr_conf}",
                      f"--stanza={STANZA}", *args]).stdout


def backup_server(make, cluster):
    return make(cluster, pgbackrest={"stanza": STANZA, "config": cluster.pgbr_conf,
                                     "enabled": True})


@pytest.fixture(scope="session")
def br_cluster():
    cluster = backup_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def br_server(br_cluster):
    server = backup_server(Server, br_cluster)
    yield server
    server.destroy()


@pytest.fixture
def make_backup_cluster():
    made = []

    def make(**kwargs):
        made.append(backup_cluster(**kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.destroy()


def start_job(server, method, path, body=None):
    status, headers, data = server.request(method, path, body)
    assert status == 202, data
    job = data["job"]
    assert headers["Location"] == f"{API}/jobs/{job['id']}"
    assert job["state"] in ("queued", "running")
    return job


def wait_job(server, job_id, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, data = server.request("GET", f"jobs/{job_id}")
        assert status == 200, data
        if data["job"]["state"] in ("succeeded", "failed"):
            return data["job"]
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {data['job']['state']}: {data}")


def run_job(server, method, path, body=None, state="succeeded"):
    job = wait_job(server, start_job(server, method, path, body)["id"])
    assert job["state"] == state, job
    return job


def query(cluster, statement, db="postgres"):
    with cluster.connect(db) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else None


def postmaster_pid(cluster):
    with open(os.path.join(cluster.data, "postmaster.pid")) as handle:
        return int(handle.readline())


def listed(server):
    status, _, data = server.request("GET", "backups")
    assert status == 200, data
    return data


def rfc3339(moment, hours=0):
    zone = datetime.timezone(datetime.timedelta(hours=hours))
    return moment.astimezone(zone).isoformat(timespec="microseconds")


def test_backups_no_stanza_empty_list_then_backup_creates_it(make_backup_cluster,
                                                             make_server):
    cluster = make_backup_cluster(stanza_create=False)
    server = backup_server(make_server, cluster)
    data = listed(server)
    assert data == {"backups": [], "recovery_window": {"earliest": None, "latest": None}}
    job = run_job(server, "POST", "backups", {})
    assert job["result"]["stanza_created"] is True
    assert job["result"]["type"] == "full" and job["progress"] == 100
    assert any("creating it" in line for line in job["log_tail"])
    data = listed(server)
    assert [b["id"] for b in data["backups"]] == [job["result"]["backup"]]
    assert data["recovery_window"]["earliest"] == data["backups"][0]["finished_at"]
    # The only full backup of the repository cannot go: pgBackRest keeps one.
    status, _, body = server.request("DELETE", f"backups/{job['result']['backup']}")
    assert_error(status, body, 409, "CONFLICT")


def test_backup_full_then_incr_listed_with_fields_and_owned_by_postgres(br_server,
                                                                       br_cluster):
    full = run_job(br_server, "POST", "backups", {"type": "full"})["result"]["backup"]
    incr = run_job(br_server, "POST", "backups", {"type": "incr"})["result"]["backup"]
    assert PHYSICAL_LABEL.match(full) and full.endswith("F")
    assert incr.startswith(full + "_") and incr.endswith("I")
    data = listed(br_server)
    by_id = {b["id"]: b for b in data["backups"]}
    assert by_id[incr]["prior"] == full and by_id[full]["prior"] is None
    entry = by_id[full]
    assert entry["method"] == "physical" and entry["type"] == "full"
    assert entry["databases"] == "all" and entry["size_bytes"] > 0
    assert entry["size"].endswith("B")
    assert entry["created_at"] <= entry["finished_at"]
    assert re.fullmatch(r"[0-9A-F]{24}", entry["wal"]["start"])
    assert [b["created_at"] for b in data["backups"]] == sorted(
        (b["created_at"] for b in data["backups"]), reverse=True)
    window = data["recovery_window"]
    assert window["earliest"] <= entry["finished_at"] <= window["latest"]
    uid = pwd.getpwnam(PG_USER).pw_uid
    for top in (br_cluster.pgbr_dirs["repo"], br_cluster.pgbr_dirs["log"]):
        for root, dirs, files in os.walk(top):
            for name in [root] + [os.path.join(root, f) for f in dirs + files]:
                assert os.stat(name).st_uid == uid, name


def test_backup_incr_while_full_runs_409_naming_job(br_server):
    first = start_job(br_server, "POST", "backups", {"type": "full"})
    status, _, data = br_server.request("POST", "backups", {"type": "incr"})
    assert_error(status, data, 409, "CONFLICT")
    assert data["error"]["details"]["job"] == first["id"]
    status, _, data = br_server.request("GET", "status")
    assert status == 200 and data["status"] == "healthy"
    job = wait_job(br_server, first["id"])
    assert job["state"] == "succeeded" and job["result"]["type"] == "full"


def test_backup_archive_command_wrong_stanza_fails_with_pgbackrest_error(br_server,
                                                                         br_cluster):
    set_archive_command(br_cluster, archive_command(br_cluster, stanza="wrong"))
    try:
        job = start_job(br_server, "POST", "backups", {"type": "full"})
        started = time.monotonic()
        status, _, data = br_server.request("GET", "status")
        assert status == 200 and data["status"] == "healthy"
        job = wait_job(br_server, job["id"], timeout=120)
        assert time.monotonic() - started < 120
    finally:
        set_archive_command(br_cluster, archive_command(br_cluster))
    assert job["state"] == "failed"
    assert job["error"]["code"] == "BACKUP_FAILED"
    assert "pgbackrest backup failed: [082]" in job["error"]["message"]
    assert any("ERROR: [082]" in line for line in job["log_tail"])


def test_backup_bad_requests(br_server):
    status, _, data = br_server.request("POST", "backups", {"type": "weekly"})
    assert_error(status, data, 400, "BAD_REQUEST")
    status, _, data = br_server.request("POST", "backups", {"databases": ["nosuchdb"]})
    assert_error(status, data, 404, "NOT_FOUND")
    assert data["error"]["details"] == {"database": "nosuchdb"}
    status, _, data = br_server.request("POST", "backups",
                                        {"databases": ["postgres"], "type": "incr"})
    assert_error(status, data, 400, "BAD_REQUEST")
    status, _, data = br_server.request("POST", "backups", {}, key="read")
    assert_error(status, data, 403, "FORBIDDEN")
    assert br_server.request("GET", "backups", key="read")[0] == 200


def test_backup_pgbackrest_not_configured_503(cluster, make_server, tmp_path):
    server = make_server(cluster, pgbackrest={"stanza": "x",
                                              "config": str(tmp_path / "none.conf")})
    status, _, data = server.request("POST", "backups", {"type": "full"})
    assert_error(status, data, 503, "UNAVAILABLE")
    assert data["error"]["details"]["dependency"] == "pgbackrest"
    assert listed(server) == {"backups": [], "recovery_window": {"earliest": None,
                                                                 "latest": None}}


def test_restore_unknown_backup_404_nothing_stopped(br_server, br_cluster):
    pid = postmaster_pid(br_cluster)
    for backup_id in ("20990101-000000F", "nonsense", "..%2F..%2Fetc"):
        status, _, data = br_server.request("POST", f"backups/{backup_id}/restore", {})
        assert_error(status, data, 404, "NOT_FOUND")
    assert postmaster_pid(br_cluster) == pid
    assert query(br_cluster, "SELECT 1") == [(1,)]


@pytest.fixture
def newest_full(br_server, br_cluster):
    data = listed(br_server)
    fulls = [b for b in data["backups"] if b["type"] == "full"]
    if not fulls:
        run_job(br_server, "POST", "backups", {"type": "full"})
        fulls = [b for b in listed(br_server)["backups"] if b["type"] == "full"]
    return fulls[0]


@pytest.mark.parametrize("case", ["before_stop", "tomorrow", "after_archived_wal"])
def test_restore_target_time_outside_window_400_postgres_untouched(
        br_server, br_cluster, newest_full, case):
    pid = postmaster_pid(br_cluster)
    finished = datetime.datetime.fromisoformat(newest_full["finished_at"].replace(
        "Z", "+00:00"))
    now = datetime.datetime.now(datetime.timezone.utc)
    target = {"before_stop": finished - datetime.timedelta(minutes=1),
              "tomorrow": now + datetime.timedelta(days=1),
              "after_archived_wal": now - datetime.timedelta(milliseconds=200)}[case]
    if case == "after_archived_wal":
        while datetime.datetime.now(datetime.timezone.utc) < finished + \
                datetime.timedelta(seconds=1.5):
            time.sleep(0.2)   # the target must come after every backup's stop
        target = datetime.datetime.now(datetime.timezone.utc)
        set_archive_command(br_cluster, "/bin/false")
    try:
        status, _, data = br_server.request(
            "POST", f"backups/{newest_full['id']}/restore",
            {"target_time": rfc3339(target, hours=-5)})
    finally:
        set_archive_command(br_cluster, archive_command(br_cluster))
    assert_error(status, data, 400, "BAD_REQUEST")
    details = data["error"]["details"]
    assert details["window"]["earliest"] == newest_full["finished_at"]
    assert details["window"]["latest"] >= details["window"]["earliest"]
    assert details["backup"] == newest_full["id"]
    if case == "after_archived_wal":
        assert details["window"]["latest"] < details["target_time"]
    assert postmaster_pid(br_cluster) == pid
    jobs = br_server.request("GET", "jobs")[2]["jobs"]
    assert not [j for j in jobs if j["kind"] == "restore"
                and j["request"].get("backup") == newest_full["id"]]


@pytest.mark.parametrize("value", ["2024-05-01 12:00:00", "2024-05-01T12:00:00",
                                   "yesterday", "2024-13-01T12:00:00Z"])
def test_restore_target_time_not_rfc3339_400(br_server, newest_full, value):
    status, _, data = br_server.request("POST", f"backups/{newest_full['id']}/restore",
                                        {"target_time": value})
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["field"] == "target_time"


def test_restore_point_in_time_exact_rows_then_safety_backup_brings_rest_back(
        make_backup_cluster, make_server):
    cluster = make_backup_cluster()
    server = backup_server(make_server, cluster)
    query(cluster, "CREATE TABLE t (v text)")
    full = run_job(server, "POST", "backups", {})["result"]["backup"]
    query(cluster, "INSERT INTO t VALUES ('a1'), ('a2')")
    time.sleep(1.1)
    target = rfc3339(datetime.datetime.now(datetime.timezone.utc), hours=2)
    time.sleep(1.1)
    query(cluster, "INSERT INTO t VALUES ('b1')")
    job = run_job(server, "POST", f"backups/{full}/restore", {"target_time": target})
    assert sorted(query(cluster, "SELECT v FROM t")) == [("a1",), ("a2",)]
    result = job["result"]
    assert result["backup"] == full and result["timeline"] == 2
    assert result["postgres"] == "running"
    assert query(cluster, "SELECT pg_is_in_recovery()") == [(False,)]
    query(cluster, "CREATE TABLE after_restore (x int)")
    assert server.request("GET", "status")[2]["status"] == "healthy"
    safety = result["safety_backup"]
    assert safety in [b["id"] for b in listed(server)["backups"]]
    run_job(server, "POST", f"backups/{safety}/restore", {})
    assert sorted(query(cluster, "SELECT v FROM t")) == [("a1",), ("a2",), ("b1",)]
    query(cluster, "INSERT INTO t VALUES ('c1')")


def test_restore_failure_after_stop_rolls_back_from_safety_backup(make_backup_cluster,
                                                                  make_server):
    cluster = make_backup_cluster()
    server = backup_server(make_server, cluster)
    old = run_job(server, "POST", "backups", {})["result"]["backup"]
    run_job(server, "POST", "backups", {"type": "full"})
    query(cluster, "CREATE TABLE present (v int); INSERT INTO present VALUES (7)")
    # Damage the older backup in the repository: its restore fails half way.
    os.unlink(os.path.join(cluster.pgbr_dirs["repo"], "backup", STANZA, old,
                           "pg_data", "global", "pg_control"))
    job = run_job(server, "POST", f"backups/{old}/restore", {}, state="failed")
    error = job["error"]
    assert error["code"] == "RESTORE_FAILED"
    assert error["details"]["stage"] == "restore"
    assert error["details"]["postgres"] == "running"
    assert error["details"]["safety_backup"] in error["message"]
    assert query(cluster, "SELECT v FROM present") == [(7,)]
    query(cluster, "INSERT INTO present VALUES (8)")


def test_logical_backups_same_second_distinct_ids(br_server, br_cluster):
    first = start_job(br_server, "POST", "backups", {"databases": ["postgres"]})
    second = start_job(br_server, "POST", "backups", {"databases": ["postgres"]})
    ids = [wait_job(br_server, j["id"])["result"]["backup"] for j in (first, second)]
    third = run_job(br_server, "POST", "backups", {"databases": ["postgres"],
                                                   "type": "logical"})
    ids.append(third["result"]["backup"])
    assert len(set(ids)) == 3 and all(LOGICAL_ID.match(i) for i in ids)
    folders = os.listdir(br_server.config["backups"]["dir"])
    assert set(ids) <= set(folders)
    entries = {b["id"]: b for b in listed(br_server)["backups"]}
    assert entries[ids[0]]["method"] == "logical"
    assert entries[ids[0]]["type"] == "logical"
    assert entries[ids[0]]["databases"] == ["postgres"]


def test_logical_restore_subset_replaces_whole_other_untouched(br_server, br_cluster):
    for db in ("appdb", "otherdb"):
        query(br_cluster, f"CREATE DATABASE {db}")
        query(br_cluster, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)", db)
    job = run_job(br_server, "POST", "backups", {"databases": ["appdb", "otherdb"]})
    backup = job["result"]["backup"]
    for db in ("appdb", "otherdb"):
        query(br_cluster, "INSERT INTO t VALUES (2); CREATE TABLE extra (x int)", db)
    job = run_job(br_server, "POST", f"backups/{backup}/restore", {"databases": ["appdb"]})
    assert job["result"]["databases"] == ["appdb"]
    assert query(br_cluster, "SELECT v FROM t", "appdb") == [(1,)]
    assert query(br_cluster, "SELECT to_regclass('extra') IS NULL", "appdb") == [(True,)]
    assert sorted(query(br_cluster, "SELECT v FROM t", "otherdb")) == [(1,), (2,)]
    safety = job["result"]["safety_backup"]
    assert listed_ids(br_server)[safety]["databases"] == ["appdb"]
    leftovers = query(br_cluster, "SELECT datname FROM pg_database "
                                  "WHERE datname LIKE 'piglet_restore_%'")
    assert leftovers == []
    status, _, data = br_server.request("POST", f"backups/{backup}/restore",
                                        {"target_time": "2024-01-01T00:00:00Z"})
    assert_error(status, data, 400, "BAD_REQUEST")
    status, _, data = br_server.request("POST", f"backups/{backup}/restore",
                                        {"databases": ["postgres"]})
    assert_error(status, data, 400, "BAD_REQUEST")


def listed_ids(server):
    return {b["id"]: b for b in listed(server)["backups"]}


def test_logical_restore_missing_role_fails_listing_it(br_server, br_cluster):
    query(br_cluster, "CREATE ROLE gone_owner")
    query(br_cluster, "CREATE DATABASE roledb")
    query(br_cluster, "CREATE TABLE owned (v int); ALTER TABLE owned OWNER TO gone_owner",
          "roledb")
    backup = run_job(br_server, "POST", "backups",
                     {"databases": ["roledb"]})["result"]["backup"]
    query(br_cluster, "DROP OWNED BY gone_owner; CREATE TABLE marker (x int)", "roledb")
    query(br_cluster, "DROP ROLE gone_owner")
    job = run_job(br_server, "POST", f"backups/{backup}/restore", {}, state="failed")
    assert job["error"]["code"] == "MISSING_ROLES"
    assert job["error"]["details"]["roles"] == ["gone_owner"]
    assert "gone_owner" in job["error"]["message"]
    assert query(br_cluster, "SELECT to_regclass('marker') IS NOT NULL", "roledb") == [
        (True,)]


def test_logical_backup_failed_dump_leaves_nothing(br_server, br_cluster):
    query(br_cluster, "CREATE DATABASE closeddb")
    query(br_cluster, "ALTER DATABASE closeddb ALLOW_CONNECTIONS false")
    before = set(os.listdir(br_server.config["backups"]["dir"]))
    job = run_job(br_server, "POST", "backups", {"databases": ["postgres", "closeddb"]},
                  state="failed")
    assert job["error"]["code"] == "BACKUP_FAILED"
    assert "closeddb" in job["error"]["message"]
    assert set(os.listdir(br_server.config["backups"]["dir"])) == before


def test_delete_backups_logical_and_physical_dependents_409(br_server, br_cluster):
    logical = run_job(br_server, "POST", "backups",
                      {"databases": ["postgres"]})["result"]["backup"]
    assert br_server.request("DELETE", f"backups/{logical}")[0] == 204
    assert logical not in listed_ids(br_server)
    assert logical not in os.listdir(br_server.config["backups"]["dir"])
    full = run_job(br_server, "POST", "backups", {"type": "full"})["result"]["backup"]
    incr = run_job(br_server, "POST", "backups", {"type": "incr"})["result"]["backup"]
    status, _, data = br_server.request("DELETE", f"backups/{full}")
    assert_error(status, data, 409, "CONFLICT")
    assert data["error"]["details"]["dependents"] == [incr]
    assert br_server.request("DELETE", f"backups/{incr}")[0] == 204
    ids = listed_ids(br_server)
    assert incr not in ids and full in ids
    for missing in ("20990101-000000F", "20990101-000000L-abcdef", "x"):
        status, _, data = br_server.request("DELETE", f"backups/{missing}")
        assert_error(status, data, 404, "NOT_FOUND")


def test_kill9_during_backup_interrupted_lock_free_new_backup_works(br_cluster,
                                                                   make_server):
    server = backup_server(make_server, br_cluster)
    job = start_job(server, "POST", "backups", {"type": "full"})
    lock = os.path.join(br_cluster.pgbr_dirs["lock"], f"{STANZA}-backup.lock")
    deadline = time.monotonic() + 30
    while not os.path.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(lock)
    time.sleep(0.5)
    with open(lock) as handle:
        tool_pid = json.load(handle)["pid"]
    # Stopped, the orphan can neither finish nor die of a broken pipe: it
    # holds pgBackRest's lock until the restarted Piglet deals with it.
    os.kill(tool_pid, signal.SIGSTOP)
    server.proc.kill()
    server.proc.wait(timeout=10)
    server.log_handle.close()
    os.rename(server.log_file, server.log_file + ".before-kill")  # a fresh port line
    server.start()
    data = server.request("GET", f"jobs/{job['id']}")[2]["job"]
    assert data["state"] == "failed" and data["error"]["code"] == "INTERRUPTED"
    assert f"stopping pgbackrest (pid {tool_pid}) left by a previous run" in server.log()
    assert process_gone(tool_pid)
    info = json.loads(pgbackrest(br_cluster, "info", "--output=json"))[0]
    assert info["status"]["lock"]["backup"]["held"] is False
    again = run_job(server, "POST", "backups", {"type": "full"})
    assert again["result"]["backup"] in listed_ids(server)


def process_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
