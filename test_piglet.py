"""Tests for piglet.py against real PostgreSQL clusters and a real server.

Run as root (the README's command):  /usr/bin/python3 -m pytest -q test_piglet.py
Each cluster is initdb'd into its own temp dir as the `postgres` OS user,
on a free port with its own socket dir; each server listens on port 0.
The Meta tests run PyPI tools (schemathesis, openapi-spec-validator,
prometheus-client) from a virtualenv they build once with
`/usr/bin/python3 -m venv` (apt: python3-venv) under $PIGLET_TEST_TOOLS,
default /var/cache/piglet-test-tools; they skip only when PyPI is
unreachable and CI is unset.
"""

import atexit
import contextlib
import fcntl
import glob
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import warnings

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

    temp_root = None   # where its directory goes (None: the usual temp dir)

    def __init__(self, cluster, **overrides):
        self.dir = tempfile.mkdtemp(prefix="piglet-srv-", dir=self.temp_root)
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
            # Never the machine's own pgBackRest setup: tests that need one
            # pass their own config and stanza.
            "pgbackrest": {"enabled": False,
                           "config": os.path.join(self.dir, "no-pgbackrest.conf")},
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
        self.log_offset = os.path.getsize(self.log_file) if os.path.exists(self.log_file) else 0
        self.log_handle = open(self.log_file, "a")
        self.proc = subprocess.Popen(
            [sys.executable, PIGLET, "serve", "--config", self.config_file],
            stdout=self.log_handle, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})))
        self.port = self.wait_for_port()

    def wait_for_port(self):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            # Only this start's lines: after a restart the old port is in the log too.
            found = re.findall(r"listening on 127\.0\.0\.1:(\d+)",
                               self.log()[self.log_offset:])
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


def destroyed_after(thing):
    """Fixture body: hand `thing` to the tests, destroy it after them."""
    yield thing
    thing.destroy()


@pytest.fixture(scope="session")
def cluster():
    yield from destroyed_after(Cluster())


@pytest.fixture(scope="session")
def server(cluster):
    yield from destroyed_after(Server(cluster))


@pytest.fixture
def fresh_cluster():
    yield from destroyed_after(Cluster())


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


def wait_job(server, job_id, timeout=240):
    """The job once it has ended (succeeded or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, data = server.request("GET", f"jobs/{job_id}")
        assert status == 200, data
        if data["job"]["state"] in ("succeeded", "failed"):
            return data["job"]
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {data['job']['state']}: {data}")


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


@pytest.mark.parametrize("body", [
    b'{"name": "\\ud800"}',            # a lone surrogate, echoed in the error
    b'{"\\ud800": 1}',
    b"[" * 100000 + b"]" * 100000,       # nesting deeper than the parser's stack
    b'{"name": "x", "scope": ' + b"9" * 5000 + b"}",  # over Python's digit limit
])
def test_hostile_json_gets_400_envelope(server, body):
    status, _, data = server.request("POST", "keys", body=body,
                                     headers={"Content-Type": "application/json"})
    assert_error(status, data, 400, "BAD_REQUEST")


@pytest.mark.parametrize("framing", [
    "Content-Length: \u00b2",                       # a Unicode digit
    "Content-Length: 2\r\nContent-Length: 20",     # two lengths
    "Transfer-Encoding: gzip\r\nContent-Length: 2",
])
def test_ambiguous_body_framing_400_and_close(server, framing):
    response = raw_exchange(server.port, (
        f"POST {API}/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin_key}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n{{}}"
        f"GET {API}/status HTTP/1.1\r\n\r\n").encode("utf-8"))
    status, head, data = parse_raw(response)
    assert_error(status, data, 400, "BAD_REQUEST")
    assert "Connection: close" in head
    assert response.count(b"HTTP/1.1 ") == 1  # the smuggled request was not served


def test_expect_continue_not_sent_before_auth(server):
    response = raw_exchange(server.port, (
        f"POST {API}/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 99999\r\nExpect: 100-continue\r\n\r\n").encode())
    assert b"100 Continue" not in response
    status, _, data = parse_raw(response)
    assert_error(status, data, 401, "UNAUTHORIZED")


def test_expect_continue_sent_when_body_wanted(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        body = b'{"name": "expect-key"}'
        sock.sendall((f"POST {API}/keys HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {server.admin_key}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status, _, data = parse_raw(sock.recv(65536))
    assert status == 201 and data["name"] == "expect-key"


def test_absolute_form_and_leading_crlf_accepted(server):
    response = raw_exchange(server.port, (
        f"\r\nGET http://127.0.0.1:{server.port}{API}/status HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {server.admin_key}\r\nConnection: close\r\n\r\n").encode())
    status, _, data = parse_raw(response)
    assert status == 200 and data["status"] == "healthy"


def test_two_authorization_headers_401(server):
    conn = server.connection()
    conn.putrequest("GET", f"{API}/status")
    conn.putheader("Authorization", f"Bearer {server.admin_key}")
    conn.putheader("Authorization", f"Bearer {server.read_key}")
    conn.endheaders()
    resp = conn.getresponse()
    assert_error(resp.status, json.loads(resp.read()), 401, "UNAUTHORIZED")
    conn.close()


def test_raw_control_bytes_in_path_400(server):
    status, _, data = parse_raw(raw_exchange(
        server.port, b"GET /api/v1/jobs/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert_error(status, data, 400, "BAD_REQUEST")


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


def test_api_key_scope_defaults_to_read(server):
    status, _, data = server.request("POST", "keys", {"name": "default-scope"})
    assert status == 201 and data["scope"] == "read"
    status, _, data = server.request("POST", "keys", {"name": "nope"}, key=data["key"])
    assert_error(status, data, 403, "FORBIDDEN")


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


def test_slow_request_line_trickle_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.settimeout(2)
        started = time.monotonic()
        closed = False
        for byte in (b"GET /api/v1/status HTTP/1.1" * 10)[:40]:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
    assert closed and time.monotonic() - started < 30


def test_stuck_status_command_does_not_stall_status(cluster, make_server):
    server = make_server(cluster, services={
        "postgres": cluster.service_entry(),
        "hang": {"status": ["sleep", "40"], "start": ["true"], "stop": ["true"]}})
    status, _, data = server.request("GET", "status")
    assert status == 200
    assert data["status"] == "degraded"
    assert data["services"] == {"postgres": "running", "hang": "unknown"}


def test_corrupt_keys_file_keeps_last_good_keys(cluster, make_server):
    server = make_server(cluster)
    assert server.request("GET", "status")[0] == 200
    with open(server.config["keys_file"], "w") as handle:
        handle.write('{"keys": [')
    status, _, _ = server.request("GET", "status")
    assert status == 200
    assert "is not valid JSON" in server.log()
    result = subprocess.run([sys.executable, PIGLET, "key", "create", "--name", "x",
                             "--config", server.config_file],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "not valid JSON" in result.stderr
    with open(server.config["keys_file"]) as handle:
        assert handle.read() == '{"keys": ['  # never overwritten


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
    ({"services": {"pg": {"status": [], "start": ["a"], "stop": ["b"]}}}, "services.pg.status"),
    ({"services": {"pg": {"status": ["a"], "start": ["a"], "stop": ["b"],
                          "user": "no-such-user"}}}, "services.pg.user"),
    ({"postgres": {"connect_timeout": 0}}, "postgres.connect_timeout"),
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


def test_job_log_and_failure_mask_passwords():
    line = "Command was: CREATE USER MAPPING FOR x SERVER s OPTIONS (password 'hunter2')"
    assert "hunter2" not in piglet.mask_secrets(line)
    assert "hunter2" not in piglet.JobFailed("RESTORE_FAILED", line).message
    assert "***" in piglet.mask_secrets("PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi'")


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
    status, _, data = server.request("POST", "services/postgres/stop")  # already stopped
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
# Databases and users
# ---------------------------------------------------------------------------

import base64  # noqa: E402
from urllib.parse import quote  # noqa: E402

import psycopg.sql  # noqa: E402

ODD_NAMES = ["app-new", "my db", 'we"ird', "Ünïcødé"]


def db_path(name):
    return "databases/" + quote(name, safe="")


def user_path(name):
    return "users/" + quote(name, safe="")


def sql_exec(cluster, statement, params=None, dbname="postgres"):
    with cluster.connect(dbname) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


def database_exists(cluster, name):
    return bool(sql_exec(cluster, "SELECT 1 FROM pg_database WHERE datname = %s", (name,)))


def role_exists(cluster, name):
    return bool(sql_exec(cluster, "SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)))


def drop_database(server, name):
    status, _, _ = server.request("DELETE", db_path(name) + "?force=true")
    assert status in (204, 404)


class ScramCluster(Cluster):
    """Logs every statement and takes TCP logins with scram-sha-256 only."""

    def __init__(self):
        super().__init__(settings=["log_statement = 'all'",
                                   "password_encryption = 'scram-sha-256'"])
        hba = os.path.join(self.data, "pg_hba.conf")
        with open(hba) as handle:
            rules = handle.read()
        with open(hba, "w") as handle:  # first match wins: scram before initdb's trust
            handle.write("host all all 127.0.0.1/32 scram-sha-256\n" + rules)
        run_as_pg(self.pg_ctl("reload"))

    def log(self):
        with open(self.logfile, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def tcp_login(self, user, password, dbname="postgres"):
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname, user=user,
                               password=password, autocommit=True, connect_timeout=5,
                               sslmode="disable")


@pytest.fixture(scope="session")
def scram_cluster():
    yield from destroyed_after(ScramCluster())


@pytest.fixture(scope="session")
def scram_server(scram_cluster):
    yield from destroyed_after(Server(scram_cluster))


def test_database_create_with_owner_twice_201_then_409(server, cluster):
    sql_exec(cluster, "CREATE ROLE app_user")
    try:
        body = {"name": "appdb", "owner": "app_user"}
        status, headers, data = server.request("POST", "databases", body)
        assert status == 201, data
        assert headers["Location"] == f"{API}/databases/appdb"
        assert data["name"] == "appdb" and data["owner"] == "app_user"
        assert data["encoding"] == "UTF8" and data["collation"] == "C.UTF-8"
        assert data["connections"] == 0
        assert data["size_bytes"] > 0 and data["size"].endswith("B")
        status, _, data = server.request("POST", "databases", body)
        assert_error(status, data, 409, "CONFLICT")
        assert data["error"]["details"] == {"database": "appdb"}
        status, _, data = server.request("GET", "databases")
        assert status == 200 and "appdb" in [d["name"] for d in data["databases"]]
    finally:
        drop_database(server, "appdb")
        sql_exec(cluster, "DROP ROLE app_user")


@pytest.mark.parametrize("name", ODD_NAMES)
def test_database_odd_name_full_lifecycle(server, cluster, name):
    status, headers, data = server.request("POST", "databases", {"name": name})
    assert status == 201, data
    assert data["name"] == name
    assert headers["Location"] == f"{API}/{db_path(name)}"
    assert database_exists(cluster, name)
    status, _, data = server.request("GET", "databases")
    assert name in [d["name"] for d in data["databases"]]
    status, _, data = server.request("GET", db_path(name))
    assert status == 200 and data["name"] == name
    user = "u_" + name
    status, _, data = server.request("POST", "users", {
        "username": user, "password": "odd-name-pass", "databases": [name]})
    assert status == 201 and data["username"] == user and data["databases"] == [name]
    status, _, data = server.request("GET", user_path(user))
    assert status == 200 and data["databases"] == [name]
    assert server.request("DELETE", user_path(user))[0] == 204
    status, _, data = server.request("DELETE", db_path(name))
    assert status == 204 and data is None
    assert not database_exists(cluster, name) and not role_exists(cluster, user)
    status, _, data = server.request("GET", db_path(name))
    assert_error(status, data, 404, "NOT_FOUND")
    assert data["error"]["details"] == {"database": name}


@pytest.mark.parametrize("name", ["", "é" * 32, "a\0b", 5, "a" * 64])
def test_database_invalid_name_400_nothing_created(server, name):
    status, _, data = server.request("POST", "databases", {"name": name})
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["field"] == "name"


def test_database_name_of_63_bytes_kept_exactly(server, cluster):
    name = "é" * 31 + "x"
    status, _, data = server.request("POST", "databases", {"name": name})
    try:
        assert status == 201 and data["name"] == name
        assert database_exists(cluster, name)
    finally:
        drop_database(server, name)


def test_database_delete_with_session_409_then_force_204(server, cluster):
    assert server.request("POST", "databases", {"name": "busydb"})[0] == 201
    session = cluster.connect("busydb")
    try:
        status, _, data = server.request("DELETE", "databases/busydb")
        assert_error(status, data, 409, "CONFLICT")
        assert data["error"]["details"]["connections"] == 1
        assert database_exists(cluster, "busydb")
        status, _, data = server.request("GET", "databases/busydb")
        assert status == 200 and data["connections"] == 1
        status, _, data = server.request("DELETE", "databases/busydb?force=true")
        assert status == 204 and data is None
        assert not database_exists(cluster, "busydb")
    finally:
        session.close()


def test_database_delete_bad_force_value_400(server):
    status, _, data = server.request("DELETE", "databases/whatever?force=yes")
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["allowed"] == ["true", "false"]


@pytest.mark.parametrize("name", ["postgres", "template0", "template1"])
def test_database_delete_system_403(server, cluster, name):
    status, _, data = server.request("DELETE", db_path(name) + "?force=true")
    assert_error(status, data, 403, "FORBIDDEN")
    assert data["error"]["details"] == {"database": name}
    assert database_exists(cluster, name)


def test_database_create_while_template1_in_use_409_nothing_created(server, cluster):
    session = cluster.connect("template1")
    try:
        status, _, data = server.request("POST", "databases", {"name": "newdb"})
        assert_error(status, data, 409, "CONFLICT")
        assert "template1" in data["error"]["message"]
        assert data["error"]["details"] == {"database": "template1", "connections": 1}
        assert not database_exists(cluster, "newdb")
    finally:
        session.close()
    status, _, data = server.request("POST", "databases", {"name": "newdb"})
    assert status == 201, data
    drop_database(server, "newdb")


def test_database_clone_by_template_copies_content(server, cluster):
    assert server.request("POST", "databases", {"name": "clonesrc"})[0] == 201
    sql_exec(cluster, "CREATE TABLE t AS SELECT 42 AS i", dbname="clonesrc")
    try:
        body = {"name": "clonedst", "template": "clonesrc"}
        session = cluster.connect("clonesrc")
        status, _, data = server.request("POST", "databases", body)
        session.close()
        assert_error(status, data, 409, "CONFLICT")
        assert data["error"]["details"] == {"database": "clonesrc", "connections": 1}
        status, _, data = server.request("POST", "databases", body)
        assert status == 201 and data["name"] == "clonedst"
        assert sql_exec(cluster, "SELECT i FROM t", dbname="clonedst") == [(42,)]
        status, _, data = server.request("POST", "databases", {"name": "x1",
                                                                 "template": "nosuchdb"})
        assert_error(status, data, 404, "NOT_FOUND")
        assert data["error"]["details"] == {"database": "nosuchdb"}
        assert not database_exists(cluster, "x1")
    finally:
        drop_database(server, "clonedst")
        drop_database(server, "clonesrc")


def test_database_missing_owner_404_then_retry_201(server, cluster):
    body = {"name": "appdb2", "owner": "no_such_role"}
    status, _, data = server.request("POST", "databases", body)
    assert_error(status, data, 404, "NOT_FOUND")
    assert data["error"]["details"] == {"role": "no_such_role"}
    assert not database_exists(cluster, "appdb2")
    sql_exec(cluster, "CREATE ROLE no_such_role")
    try:
        status, _, data = server.request("POST", "databases", body)
        assert status == 201 and data["owner"] == "no_such_role"
    finally:
        drop_database(server, "appdb2")
        sql_exec(cluster, "DROP ROLE no_such_role")


def test_database_list_sorted_no_templates_with_sizes_and_connections(server, cluster):
    for name in ("lst_b", "lst_a"):
        assert server.request("POST", "databases", {"name": name})[0] == 201
    sessions = [cluster.connect("lst_b") for _ in range(2)]
    try:
        status, _, data = server.request("GET", "databases", key="read")
        assert status == 200
        names = [d["name"] for d in data["databases"]]
        assert names == sorted(names, key=lambda n: n.encode())
        assert "template0" not in names and "template1" not in names
        by_name = {d["name"]: d for d in data["databases"]}
        assert by_name["lst_b"]["connections"] == 2 and by_name["lst_a"]["connections"] == 0
        for db in data["databases"]:
            assert set(db) == {"name", "owner", "size", "size_bytes", "encoding",
                               "collation", "connections", "size_as_of"}
            assert db["size"] == piglet.human_size(db["size_bytes"])
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", db["size_as_of"])
        assert data["sizes_as_of"] == min(d["size_as_of"] for d in data["databases"])
    finally:
        for session in sessions:
            session.close()
        drop_database(server, "lst_a")
        drop_database(server, "lst_b")


def test_database_read_key_cannot_create_or_drop(server):
    status, _, data = server.request("POST", "databases", {"name": "ro"}, key="read")
    assert_error(status, data, 403, "FORBIDDEN")
    status, _, data = server.request("DELETE", "databases/postgres", key="read")
    assert_error(status, data, 403, "FORBIDDEN")


def test_database_unknown_body_field_400(server):
    status, _, data = server.request("POST", "databases", {"name": "z", "ownr": "x"})
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"] == {"field": "ownr"}


def test_user_password_with_quotes_logs_in_over_scram(scram_server, scram_cluster):
    password = "it's \"x\" \\ $$ %s {}"
    assert scram_server.request("POST", "databases", {"name": "appdb"})[0] == 201
    status, headers, data = scram_server.request("POST", "users", {
        "username": "app_user", "password": password, "databases": ["appdb"]})
    assert status == 201, data
    assert headers["Location"] == f"{API}/users/app_user"
    assert data == {"username": "app_user", "superuser": False, "createdb": False,
                    "login": True, "connection_limit": None, "valid_until": None,
                    "member_of": [], "databases": ["appdb"]}
    with scram_cluster.tcp_login("app_user", password, "appdb") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app_user",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        scram_cluster.tcp_login("app_user", password + "x", "appdb")
    stored = sql_exec(scram_cluster, "SELECT rolpassword FROM pg_authid "
                      "WHERE rolname = 'app_user'")[0][0]
    assert re.fullmatch(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}"
                        r":[A-Za-z0-9+/=]{44}", stored)
    assert base64_len(stored.split(":")[1].split("$")[0]) == 16


def base64_len(text):
    return len(base64.b64decode(text))


@pytest.mark.parametrize("password", ["Pässwörd\u00a0\u2168-x", "ｆｕｌｌｗｉｄｔｈ",
                                      "é" * 1024, "\u05d0\u05d1\u05d2\u05d3\u05d4abcd"])
def test_user_non_ascii_password_logs_in(scram_server, scram_cluster, password):
    """SASLprep must match libpq's, including its fallback for prohibited input."""
    name = "nonascii_" + str(abs(hash(password)) % 10000)
    status, _, data = scram_server.request("POST", "users", {"username": name,
                                                              "password": password})
    assert status == 201, data
    try:
        with scram_cluster.tcp_login(name, password) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (name,)
    finally:
        assert scram_server.request("DELETE", user_path(name))[0] == 204


@pytest.mark.parametrize("password", ["plain-ascii-pw", "Pässwörd\u00a0\u2168-x",
                                      "\u00ad\u00adcafé\u0301", "\u05d0abc\u05d1"])
def test_scram_verifier_matches_postgres_own(cluster, password):
    """Same salt, same verifier as PostgreSQL computes from the plain text."""
    with cluster.connect() as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute("CREATE ROLE verifier_check")
        try:
            conn.execute(psycopg.sql.SQL("ALTER ROLE verifier_check PASSWORD {}").format(
                psycopg.sql.Literal(password)))
            stored = conn.execute("SELECT rolpassword FROM pg_authid "
                                  "WHERE rolname = 'verifier_check'").fetchone()[0]
        finally:
            conn.execute("DROP ROLE verifier_check")
    salt = base64.b64decode(stored.split(":")[1].split("$")[0])
    assert piglet.scram_verifier(password, salt=salt) == stored


def test_user_missing_database_404_no_role_left(server, cluster):
    status, _, data = server.request("POST", "users", {
        "username": "app_user", "password": "long-enough", "databases": ["missing_db"]})
    assert_error(status, data, 404, "NOT_FOUND")
    assert data["error"]["details"] == {"database": "missing_db"}
    assert not role_exists(cluster, "app_user")


def test_user_granted_database_can_create_table_in_public(server, cluster):
    assert server.request("POST", "databases", {"name": "grantdb"})[0] == 201
    try:
        status, _, data = server.request("POST", "users", {
            "username": "grant_user", "password": "long-enough", "databases": ["grantdb"]})
        assert status == 201 and data["databases"] == ["grantdb"]
        privileges = sql_exec(cluster, """
            SELECT has_database_privilege('grant_user', 'grantdb', 'CONNECT'),
                   has_database_privilege('grant_user', 'grantdb', 'TEMPORARY'),
                   has_schema_privilege('grant_user', 'public', 'USAGE'),
                   has_schema_privilege('grant_user', 'public', 'CREATE')""",
                              dbname="grantdb")
        assert privileges == [(True, True, True, True)]
        with cluster.connect("grantdb", user="grant_user") as conn:
            conn.execute("CREATE TABLE t(i int)")
            conn.execute("INSERT INTO t VALUES (1)")
        status, _, data = server.request("DELETE", "users/grant_user")
        assert_error(status, data, 409, "CONFLICT")
        assert data["error"]["details"] == {"username": "grant_user",
                                            "owns_objects_in": ["grantdb"]}
        assert sql_exec(cluster, "SELECT i FROM t", dbname="grantdb") == [(1,)]
        sql_exec(cluster, "DROP TABLE t", dbname="grantdb")
        assert server.request("DELETE", "users/grant_user")[0] == 204
        assert not role_exists(cluster, "grant_user")
    finally:
        drop_database(server, "grantdb")


def test_user_canary_password_never_logged(scram_server, scram_cluster):
    canary = "Canary-7f3a9"
    body = {"username": "canary_user", "password": canary}
    replies = [scram_server.request("POST", "users", body) for _ in range(2)]
    assert replies[0][0] == 201 and replies[1][0] == 409
    assert_error(replies[1][0], replies[1][2], 409, "CONFLICT")
    with scram_cluster.tcp_login("canary_user", canary) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    patch = scram_server.request("PATCH", "users/canary_user", {"password": canary + "!"})
    assert patch[0] == 200
    pg_log = scram_cluster.log()
    assert "canary_user" in pg_log and "SCRAM-SHA-256$4096:" in pg_log  # it did log
    for text in (pg_log, scram_server.log(), *(json.dumps(r[2]) for r in replies),
                 json.dumps(patch[2]), str(replies[0][1]), str(replies[1][1])):
        assert canary not in text
    assert scram_server.request("DELETE", "users/canary_user")[0] == 204


def test_user_duplicate_409_then_list_databases_200(server, cluster):
    body = {"username": "dup_user", "password": "long-enough"}
    assert server.request("POST", "users", body)[0] == 201
    try:
        conn = server.connection()
        status, _, data = server.request("POST", "users", body, conn=conn)
        assert_error(status, data, 409, "CONFLICT")
        assert data["error"]["details"] == {"username": "dup_user"}
        status, _, data = server.request("GET", "databases", conn=conn)
        assert status == 200 and "postgres" in [d["name"] for d in data["databases"]]
        conn.close()
    finally:
        assert server.request("DELETE", "users/dup_user")[0] == 204


@pytest.mark.parametrize("body,field", [
    ({"username": "pg_mine", "password": "long-enough"}, "username"),
    ({"username": "public", "password": "long-enough"}, "username"),
    ({"username": "x" * 64, "password": "long-enough"}, "username"),
    ({"username": "ok_user", "password": "short"}, "password"),
    ({"username": "ok_user", "password": "x" * 1025}, "password"),
    ({"username": "ok_user", "password": "é" * 1025}, "password"),
    ({"username": "ok_user", "password": "lone-\ud800-surrogate"}, "password"),
    ({"username": "ok_user", "password": "has\u0000nul-inside"}, "password"),
    ({"username": "ok_user", "password": "long-enough", "connection_limit": -2},
     "connection_limit"),
    ({"username": "ok_user", "password": "long-enough", "valid_until": "tomorrow"},
     "valid_until"),
    ({"username": "ok_user", "password": "long-enough", "valid_until": "2030-01-01T00:00"},
     "valid_until"),
    ({"username": "ok_user", "password": "long-enough", "databases": [""]}, "databases"),
])
def test_user_invalid_fields_400_nothing_created(server, cluster, body, field):
    status, _, data = server.request("POST", "users", body)
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["field"] == field
    assert body["password"] not in json.dumps(data)
    assert not role_exists(cluster, body["username"])


def test_user_password_of_1024_ascii_accepted(server):
    body = {"username": "long_pw", "password": "p" * 1024}
    assert server.request("POST", "users", body)[0] == 201
    assert server.request("DELETE", "users/long_pw")[0] == 204


def test_user_list_and_get_hide_pg_roles(server, cluster):
    status, _, data = server.request("GET", "users", key="read")
    assert status == 200
    names = [u["username"] for u in data["users"]]
    assert "postgres" in names and not any(n.startswith("pg_") for n in names)
    postgres = next(u for u in data["users"] if u["username"] == "postgres")
    assert postgres["superuser"] is True and postgres["login"] is True
    assert "postgres" in postgres["databases"]  # owner of it
    status, _, data = server.request("GET", "users/pg_monitor")
    assert_error(status, data, 404, "NOT_FOUND")
    status, _, data = server.request("GET", "users/nobody_here")
    assert_error(status, data, 404, "NOT_FOUND")
    assert data["error"]["details"] == {"username": "nobody_here"}


def test_user_patch_replaces_databases_and_attributes(server, cluster):
    for name in ("patch_a", "patch_b"):
        assert server.request("POST", "databases", {"name": name})[0] == 201
    sql_exec(cluster, "CREATE ROLE patch_group")
    try:
        body = {"username": "patch_user", "password": "long-enough",
                "databases": ["patch_a"], "createdb": True, "connection_limit": 3,
                "valid_until": "2031-02-03T04:05:06+01:00"}
        status, _, data = server.request("POST", "users", body)
        assert status == 201
        assert data["createdb"] is True and data["connection_limit"] == 3
        assert data["valid_until"] == "2031-02-03T03:05:06Z"
        sql_exec(cluster, "GRANT patch_group TO patch_user")
        old = sql_exec(cluster, "SELECT rolpassword FROM pg_authid "
                       "WHERE rolname = 'patch_user'")
        status, _, data = server.request("PATCH", "users/patch_user", {
            "databases": ["patch_b"], "createdb": False, "connection_limit": None,
            "valid_until": None, "password": "another-one"})
        assert status == 200, data
        assert data == {"username": "patch_user", "superuser": False, "createdb": False,
                        "login": True, "connection_limit": None, "valid_until": None,
                        "member_of": ["patch_group"], "databases": ["patch_b"]}
        assert sql_exec(cluster, "SELECT rolpassword FROM pg_authid "
                        "WHERE rolname = 'patch_user'") != old
        for db, want in (("patch_a", False), ("patch_b", True)):
            assert sql_exec(cluster, """
                SELECT has_schema_privilege('patch_user', 'public', 'CREATE'),
                       EXISTS (SELECT 1 FROM pg_database d, aclexplode(d.datacl) a
                                WHERE d.datname = current_database()
                                  AND a.grantee = 'patch_user'::regrole)""",
                            dbname=db) == [(want, want)]
        status, _, data = server.request("PATCH", "users/patch_user", {"databases": ["nope"]})
        assert_error(status, data, 404, "NOT_FOUND")
        assert server.request("GET", "users/patch_user")[2]["databases"] == ["patch_b"]
        assert server.request("DELETE", "users/patch_user")[0] == 204
    finally:
        sql_exec(cluster, "DROP ROLE IF EXISTS patch_user")
        sql_exec(cluster, "DROP ROLE patch_group")
        drop_database(server, "patch_a")
        drop_database(server, "patch_b")


def test_user_connection_limit_out_of_range_400_no_role(server, cluster):
    status, _, data = server.request("POST", "users", {
        "username": "limit_user", "password": "long-enough-1", "connection_limit": 2 ** 31})
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["field"] == "connection_limit"
    assert not role_exists(cluster, "limit_user")


def test_user_delete_protected_403(server, cluster):
    status, _, data = server.request("DELETE", "users/postgres")  # Piglet's own role
    assert_error(status, data, 403, "FORBIDDEN")
    status, _, data = server.request("PATCH", "users/postgres", {"createdb": True})
    assert_error(status, data, 403, "FORBIDDEN")
    sql_exec(cluster, "CREATE ROLE other_super SUPERUSER")
    try:
        status, _, data = server.request("DELETE", "users/other_super")
        assert_error(status, data, 403, "FORBIDDEN")
        assert role_exists(cluster, "other_super")
        for change in ({"password": "take-over-123"}, {"connection_limit": 0}):
            status, _, data = server.request("PATCH", "users/other_super", change)
            assert_error(status, data, 403, "FORBIDDEN")
        assert sql_exec(cluster, "SELECT rolpassword IS NULL, rolconnlimit FROM pg_authid "
                        "WHERE rolname = 'other_super'") == [(True, -1)]
    finally:
        sql_exec(cluster, "DROP ROLE other_super")


def test_user_delete_owner_of_database_409(server, cluster):
    assert server.request("POST", "users", {"username": "owner_user",
                                            "password": "long-enough"})[0] == 201
    body = {"name": "owned_db", "owner": "owner_user"}
    assert server.request("POST", "databases", body)[0] == 201
    status, _, data = server.request("DELETE", "users/owner_user")
    assert_error(status, data, 409, "CONFLICT")
    assert data["error"]["details"] == {"username": "owner_user", "databases": ["owned_db"]}
    assert role_exists(cluster, "owner_user")
    drop_database(server, "owned_db")
    assert server.request("DELETE", "users/owner_user")[0] == 204
    assert not role_exists(cluster, "owner_user")


def test_databases_and_users_postgres_down_503_then_back(fresh_cluster, make_server):
    server = make_server(fresh_cluster)
    assert server.request("GET", "databases")[0] == 200
    assert server.request("GET", "users")[0] == 200
    fresh_cluster.stop()
    requests = [("GET", "databases", None), ("GET", "databases/postgres", None),
                ("POST", "databases", {"name": "down_db"}), ("GET", "users", None),
                ("POST", "users", {"username": "down_user", "password": "long-enough"}),
                ("DELETE", "users/down_user", None)]
    for method, path, body in requests:
        status, _, data = server.request(method, path, body)
        assert_error(status, data, 503, "UNAVAILABLE")
        assert data["error"]["details"]["dependency"] == "postgres"
    fresh_cluster.start()
    for path in ("databases", "users", "databases", "users"):
        assert server.request("GET", path)[0] == 200
    status, _, data = server.request("POST", "databases", {"name": "down_db"})
    assert status == 201, data
    fresh_cluster.stop()  # a restart with no request meanwhile: pooled sessions are stale
    fresh_cluster.start()
    for path in ("databases", "users", "databases/down_db", "users/postgres") * 3:
        status, _, data = server.request("GET", path)
        assert status == 200, data


def test_user_failed_grant_leaves_nothing_then_retry_201(server, cluster):
    """A grant refused in the second database undoes the first and the role."""
    for name in ("okdb", "trapdb"):
        assert server.request("POST", "databases", {"name": name})[0] == 201
    sql_exec(cluster, """
        CREATE FUNCTION no_grants() RETURNS event_trigger LANGUAGE plpgsql
            AS $$BEGIN RAISE EXCEPTION 'grants refused here'; END$$;
        CREATE EVENT TRIGGER no_grants ON ddl_command_start WHEN TAG IN ('GRANT')
            EXECUTE FUNCTION no_grants()""", dbname="trapdb")
    body = {"username": "trap_user", "password": "long-enough",
            "databases": ["okdb", "trapdb"]}
    try:
        status, _, data = server.request("POST", "users", body)
        assert_error(status, data, 500, "INTERNAL_ERROR")
        assert not role_exists(cluster, "trap_user")
        assert sql_exec(cluster, "SELECT nspacl::text FROM pg_namespace "
                        "WHERE nspname = 'public'", dbname="okdb")[0][0].count("=") == 2
        sql_exec(cluster, "DROP EVENT TRIGGER no_grants", dbname="trapdb")
        status, _, data = server.request("POST", "users", body)
        assert status == 201 and data["databases"] == ["okdb", "trapdb"]
        assert server.request("DELETE", "users/trap_user")[0] == 204
    finally:
        drop_database(server, "okdb")
        drop_database(server, "trapdb")


def test_user_database_refusing_connections_409_no_role(server, cluster):
    assert server.request("POST", "databases", {"name": "closeddb"})[0] == 201
    sql_exec(cluster, "ALTER DATABASE closeddb ALLOW_CONNECTIONS false")
    try:
        status, _, data = server.request("POST", "users", {
            "username": "closed_user", "password": "long-enough", "databases": ["closeddb"]})
        assert_error(status, data, 409, "CONFLICT")
        assert data["error"]["details"] == {"database": "closeddb"}
        assert not role_exists(cluster, "closed_user")
    finally:
        drop_database(server, "closeddb")


# ---------------------------------------------------------------------------
# Services under a real systemd, and the installed appliance end to end
# ---------------------------------------------------------------------------
#
# These tests boot systemd as PID 1 of private PID, mount and UTS namespaces
# that share the host's network, so what its units serve is on this machine's
# loopback. Fresh tmpfs mounts on /run, /tmp and /var/tmp come before systemd
# is exec'ed: systemd-tmpfiles empties /tmp at boot and would wipe the host's.
# Units that would reach the internet or change host-global state are masked
# in that private /run. /etc/systemd/system is the host's own: what a test
# installs there, it removes.

SYSTEMD_BIN = "/lib/systemd/systemd"
SYSTEMCTL_BIN = shutil.which("systemctl") or "/bin/systemctl"
# Without a cgroup namespace, a booted systemd manages the host's cgroup
# root: one at a time on this machine, whoever runs the tests.
SYSTEMD_LOCK = "/run/lock/piglet-test-systemd.lock"
SYSTEMD_LOCK_WAIT = 600
SYSTEMD_BOOT_WAIT = 60
SYSTEMD_HALT_WAIT = 60
# Seen at the same path on both sides (the namespace has its own /tmp).
SHARED_TEMP = "/dev/shm"
SYSTEMD_MASKS = (
    # would reach the internet: NTP; apt-daily*, man-db and the other timers
    "systemd-timesyncd.service", "timers.target",
    # would change host-global kernel state or remount the root file system
    "systemd-sysctl.service", "systemd-modules-load.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "systemd-remount-fs.service",
    "systemd-pstore.service", "systemd-firstboot.service", "systemd-repart.service",
    "systemd-machine-id-commit.service", "getty.target", "console-getty.service",
)
# PID 1 of the new namespaces until it execs systemd. `set -e`: no systemd
# unless every mount worked. container=other: no module loading, no clock
# changes, no swapoff or loop/DM detaching at shutdown (all host-global).
# basic.target: not every unit the host has enabled.
SYSTEMD_INIT = """set -e
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
mkdir -p /run/systemd/system
for unit in "$@"; do ln -s /dev/null "/run/systemd/system/$unit"; done
export container=other
exec %s --system --unit=basic.target
""" % SYSTEMD_BIN


_namespace_sources = []


def namespace_source(name):
    """A copy of one of the project's files that the booted systemd can see.

    The namespace mounts its own /tmp, /var/tmp and /run, which would hide a
    checkout under any of them; a copy in SHARED_TEMP is seen on both sides.
    """
    if not _namespace_sources:
        copy_dir = tempfile.mkdtemp(prefix="piglet-src-", dir=SHARED_TEMP)
        for file_name in ("piglet.py", "install.sh", "piglet.service"):
            shutil.copy2(os.path.join(HERE, file_name), copy_dir)
        os.chmod(copy_dir, 0o755)
        atexit.register(shutil.rmtree, copy_dir, True)
        _namespace_sources.append(copy_dir)
    return os.path.join(_namespace_sources[0], name)


def wait_until(check, timeout, what):
    """The first truthy value of check(), polled for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def child_pid(pid):
    """The first child of a process, by its host PID (None when it has none)."""
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            with open(path) as handle:
                children = handle.read().split()
            if children:
                return int(children[0])
    return None


def systemd_skip_reason():
    if not IS_ROOT:
        return "needs root to boot systemd in a namespace"
    if os.path.isdir("/run/systemd/system"):
        return "systemd is this host's PID 1; a second one would share its cgroup tree"
    for tool in (SYSTEMD_BIN, "/usr/bin/unshare", "/usr/bin/nsenter", SYSTEMCTL_BIN):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing"
    return None


@contextlib.contextmanager
def systemd_lock():
    os.makedirs(os.path.dirname(SYSTEMD_LOCK), exist_ok=True)
    with open(SYSTEMD_LOCK, "a") as handle:
        deadline = time.monotonic() + SYSTEMD_LOCK_WAIT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"another namespace systemd held {SYSTEMD_LOCK} "
                                f"for {SYSTEMD_LOCK_WAIT} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class NamespaceSystemd:
    """systemd booted as PID 1 of private PID, mount and UTS namespaces."""

    def __init__(self):
        self.console = tempfile.NamedTemporaryFile(prefix="piglet-systemd-", suffix=".log")
        self.pid = None   # systemd's PID on the host
        self.proc = subprocess.Popen(
            ["/usr/bin/unshare", "--pid", "--fork", "--mount", "--mount-proc", "--uts",
             "--propagation", "private", "/bin/sh", "-c", SYSTEMD_INIT, "sh",
             *SYSTEMD_MASKS],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
            start_new_session=True)

    def console_log(self):
        with open(self.console.name, errors="replace") as handle:
            return handle.read()[-3000:]

    def boot(self):
        """Wait until systemd runs and the boot is over; RuntimeError if not."""
        deadline = time.monotonic() + SYSTEMD_BOOT_WAIT
        state = "not started"
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.pid is None:
                pid = child_pid(self.proc.pid)
                with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as handle:
                    self.pid = pid if handle.read().strip() == "systemd" else None
            else:
                state = self.run("systemctl", "is-system-running",
                                 check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"systemd did not boot (state: {state}); console:\n"
                           + self.console_log())

    def command(self, *argv):
        """argv run inside the namespaces (nsenter forks into the PID namespace)."""
        return ["/usr/bin/nsenter", "-t", str(self.pid), "-m", "-p", "--", *argv]

    def run(self, *argv, check=True, timeout=60, env=None):
        result = subprocess.run(self.command(*argv), capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, cwd="/", env=env)
        if check:
            assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
        return result

    def show(self, unit, *properties):
        out = self.run("systemctl", "show", "-p", ",".join(properties), "--", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, inside):
        """The host's path to a file in the namespace's private mounts."""
        return f"/proc/{self.pid}/root{inside}"

    def add_unit(self, name, text):
        """A unit in the private /run/systemd/system: nothing on the host changes."""
        with open(self.path(f"/run/systemd/system/{name}"), "w") as handle:
            handle.write(text)
        self.run("systemctl", "daemon-reload")

    def halt(self):
        init = self.pid or child_pid(self.proc.pid)
        if self.proc.poll() is None:
            if self.pid is not None:
                os.kill(self.pid, signal.SIGRTMIN + 3)   # systemd's "halt"
            elif init is not None:
                os.kill(init, signal.SIGKILL)   # the boot never got that far
            else:
                self.proc.kill()
        try:
            self.proc.wait(timeout=SYSTEMD_HALT_WAIT)
        except subprocess.TimeoutExpired:
            # Killing a PID namespace's init kills everything in it.
            os.kill(init, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.console.close()


@pytest.fixture
def systemd():
    """A freshly booted systemd in namespaces, halted afterwards."""
    reason = systemd_skip_reason()
    if reason:
        pytest.skip(reason)
    with systemd_lock():
        booted = NamespaceSystemd()
        try:
            try:
                booted.boot()
            except RuntimeError as exc:
                pytest.skip(f"systemd cannot be booted in a namespace here: {exc}")
            yield booted
        finally:
            booted.halt()


class NamespaceServer(Server):
    """piglet.py serve inside the namespaces: their systemd is the one it sees."""

    temp_root = SHARED_TEMP

    def __init__(self, systemd, cluster, path=None, **overrides):
        self.systemd, self.path = systemd, path
        super().__init__(cluster, **overrides)

    def start(self, env=None):
        self.log_offset = os.path.getsize(self.log_file) if os.path.exists(self.log_file) else 0
        self.log_handle = open(self.log_file, "a")
        env = dict(os.environ, **(env or {}), **({"PATH": self.path} if self.path else {}))
        self.proc = subprocess.Popen(
            self.systemd.command(sys.executable, namespace_source("piglet.py"), "serve",
                                 "--config", self.config_file),
            stdout=self.log_handle, stderr=subprocess.STDOUT, env=env)
        self.port = self.wait_for_port()

    def stop(self):
        # nsenter passes no signal on: SIGTERM Piglet itself, by its host PID.
        if self.proc and self.proc.poll() is None:
            piglet_pid = child_pid(self.proc.pid)
            if piglet_pid:
                os.kill(piglet_pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.log_handle.close()


@pytest.fixture
def make_ns_server(systemd):
    """Servers inside the booted namespaces, PostgreSQL reached over TCP (the
    clusters' sockets are in the host's /tmp)."""
    made = []

    def make(cluster, services, path=None):
        dsn = f"host=127.0.0.1 port={cluster.port} dbname=postgres user=postgres"
        made.append(NamespaceServer(systemd, cluster, path=path, services=services,
                                    postgres={"dsn": dsn, "service": "postgres"}))
        return made[-1]

    yield make
    for server in made:
        server.destroy()


@pytest.fixture
def recording_path():
    """(PATH, calls file): a `systemctl` first on PATH that logs its arguments
    to the calls file, then runs the real one."""
    bindir = tempfile.mkdtemp(prefix="piglet-bin-", dir=SHARED_TEMP)
    calls = os.path.join(bindir, "calls")
    with open(os.path.join(bindir, "systemctl"), "w") as handle:
        handle.write(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n'
                     f'exec {SYSTEMCTL_BIN} "$@"\n')
    os.chmod(os.path.join(bindir, "systemctl"), 0o755)
    open(calls, "w").close()
    yield f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin", calls
    shutil.rmtree(bindir, ignore_errors=True)


def read_calls(calls):
    with open(calls) as handle:
        return handle.read().splitlines()


def test_systemd_unknown_service_404_never_asks_systemctl(cluster, make_ns_server,
                                                           recording_path):
    path, calls = recording_path
    server = make_ns_server(cluster, {"postgres": {"unit": "postgresql.service"}}, path)
    for method, route in (("GET", "services/nosuch"), ("POST", "services/nosuch/restart")):
        status, _, data = server.request(method, route)
        assert_error(status, data, 404, "NOT_FOUND")
        assert data["error"]["details"] == {"service": "nosuch"}
    assert read_calls(calls) == []
    # The same server does ask systemd about a configured name.
    status, _, data = server.request("GET", "services/postgres")
    assert status == 200 and data["unit"] == "postgresql.service", data
    assert [c.split()[0] for c in read_calls(calls)] == ["show"]
    assert read_calls(calls)[0].endswith(" -- postgresql.service")


def test_systemd_bad_action_400_and_get_action_405_never_ask_systemctl(
        cluster, make_ns_server, recording_path):
    path, calls = recording_path
    server = make_ns_server(cluster, {"postgres": {"unit": "postgresql.service"}}, path)
    status, _, data = server.request("POST", "services/postgres/reboot")
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"]["allowed"] == ["start", "stop", "restart"]
    status, headers, data = server.request("GET", "services/postgres/restart")
    assert_error(status, data, 405, "METHOD_NOT_ALLOWED")
    assert headers["Allow"] == "POST"
    assert read_calls(calls) == []


def test_systemd_units_not_installed_unknown_with_load_state_degraded(
        systemd, cluster, make_ns_server):
    for unit in ("code-server@root", "jupyter"):
        if systemd.show(unit, "LoadState")["LoadState"] != "not-found":
            pytest.skip(f"{unit} is installed on this host")
    server = make_ns_server(cluster, {
        "postgres": {"unit": "postgresql.service", "port": cluster.port},
        "vscode": {"unit": "code-server@root", "port": 8080},
        "jupyter": {"unit": "jupyter", "port": 8888}})
    status, _, data = server.request("GET", "status")
    assert status == 200, data
    assert data["status"] == "degraded"
    assert data["services"] == {"postgres": "running", "vscode": "unknown",
                                "jupyter": "unknown"}
    status, _, data = server.request("GET", "services/jupyter")
    assert status == 200
    assert data == {"name": "jupyter", "status": "unknown", "port": 8888, "unit": "jupyter",
                    "enabled": None, "pid": None, "since": None, "load_state": "not-found",
                    "active_state": "inactive", "sub_state": "dead"}
    status, _, data = server.request("GET", "services")
    assert status == 200
    assert [(s["name"], s["status"], s["load_state"]) for s in data["services"]] == [
        ("postgres", "running", "loaded"), ("vscode", "unknown", "not-found"),
        ("jupyter", "unknown", "not-found")]


def test_systemd_postgres_as_debian_meta_unit_judged_by_connecting(
        systemd, fresh_cluster, make_ns_server):
    if systemd.show("postgresql.service", "LoadState")["LoadState"] != "loaded":
        pytest.skip("Debian's postgresql.service is not installed")
    server = make_ns_server(fresh_cluster, {
        "postgres": {"unit": "postgresql.service", "port": fresh_cluster.port}})
    # ignore-requirements: its Wants= would start this machine's own clusters.
    systemd.run("systemctl", "start", "--job-mode=ignore-requirements",
                "postgresql.service")
    active = systemd.run("systemctl", "list-units", "--state=active", "--plain",
                         "--no-legend", "postgresql@*").stdout
    assert active == "", active
    fresh_cluster.stop()
    assert systemd.show("postgresql.service", "ActiveState", "SubState") == {
        "ActiveState": "active", "SubState": "exited"}
    status, _, data = server.request("GET", "status")
    assert status == 200
    assert (data["status"], data["services"]) == ("unhealthy", {"postgres": "stopped"})
    status, _, data = server.request("GET", "services/postgres")
    assert status == 200
    assert (data["status"], data["active_state"], data["sub_state"]) == (
        "stopped", "active", "exited")
    fresh_cluster.start()
    # /status reuses a probe for a second: poll.
    data = wait_until(lambda: (d := server.request("GET", "status")[2])["status"]
                      == "healthy" and d, 10, "healthy status")
    assert data["services"] == {"postgres": "running"}


SLOW_UNIT = """[Service]
# about a second in activating and in deactivating: replies must wait for it
ExecStartPre=/bin/sleep 1
ExecStart=/bin/sleep infinity
ExecStop=/bin/sleep 1
"""
BROKEN_UNIT = """[Service]
Type=oneshot
ExecStart=/bin/false
"""


def test_systemd_unit_actions_reply_after_settling(systemd, cluster, make_ns_server):
    systemd.add_unit("piglet-test-slow.service", SLOW_UNIT)
    server = make_ns_server(cluster, {"slow": {"unit": "piglet-test-slow", "port": 1}})
    status, _, data = server.request("POST", "services/slow/start")
    assert status == 200, data
    assert (data["status"], data["active_state"], data["sub_state"]) == (
        "running", "active", "running")
    first_pid = data["pid"]
    assert first_pid == int(systemd.show("piglet-test-slow", "MainPID")["MainPID"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["since"])
    status, _, data = server.request("POST", "services/slow/restart")
    assert (status, data["status"]) == (200, "running")
    assert data["pid"] not in (None, first_pid)
    status, _, data = server.request("POST", "services/slow/stop")
    assert (status, data["status"], data["active_state"], data["pid"]) == (
        200, "stopped", "inactive", None)


def test_systemd_unit_failing_to_start_409_with_status(systemd, cluster, make_ns_server):
    systemd.add_unit("piglet-test-broken.service", BROKEN_UNIT)
    server = make_ns_server(cluster, {"broken": {"unit": "piglet-test-broken"},
                                      "jupyter": {"unit": "jupyter"}})
    status, _, data = server.request("POST", "services/broken/start")
    assert_error(status, data, 409, "CONFLICT")
    assert data["error"]["details"] == {"service": "broken", "action": "start",
                                        "status": "failed", "load_state": "loaded"}
    assert "piglet-test-broken" in data["error"]["message"]
    status, _, data = server.request("GET", "services/broken")
    assert (status, data["status"], data["enabled"]) == (200, "failed", False)
    status, _, data = server.request("POST", "services/jupyter/start")
    assert_error(status, data, 409, "CONFLICT")
    assert data["error"]["details"]["load_state"] == "not-found"


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="systemd runs on this host")
def test_services_units_without_systemd_503_status_still_answers(cluster, make_server):
    server = make_server(cluster, services={"postgres": cluster.service_entry(),
                                            "jupyter": {"unit": "jupyter", "port": 8888}})
    for method, route in (("GET", "services"), ("GET", "services/jupyter"),
                          ("POST", "services/jupyter/start")):
        status, _, data = server.request(method, route)
        assert_error(status, data, 503, "UNAVAILABLE")
        assert data["error"]["details"] == {"dependency": "systemd"}
    status, _, data = server.request("GET", "services/postgres")
    assert (status, data["status"]) == (200, "running")
    status, _, data = server.request("GET", "status")
    assert status == 200
    assert (data["status"], data["services"]) == (
        "degraded", {"postgres": "running", "jupyter": "unknown"})


# What install.sh creates for Piglet itself; the end-to-end test removes
# each of these that did not exist before it ran.
INSTALLED_PIGLET = ("/etc/systemd/system/piglet.service",
                    "/etc/systemd/system/piglet.service.d",
                    "/etc/systemd/system/multi-user.target.wants/piglet.service",
                    "/etc/piglet", "/usr/local/lib/piglet", "/var/lib/piglet",
                    "/run/piglet.pid", "/var/log/piglet.log")
# Any of these means Piglet is installed here: the test would replace it.
INSTALL_MARKS = ("/etc/piglet/piglet.json", "/etc/systemd/system/piglet.service",
                 "/usr/local/lib/piglet")
INSTALLED_PORT = 8910   # install.sh's config
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def install_target_cluster():
    """The cluster install.sh picks (newest version, its first cluster) as
    {ver, name, port, status, data}, or None without one."""
    try:
        out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    rows = [line.split() for line in out.splitlines() if line.strip()]
    if not rows:
        return None
    # sorted() is stable in reverse too: pg_lsclusters order within a version.
    rows.sort(key=lambda r: [int(x) for x in r[0].split(".")], reverse=True)
    ver, name, port, status, _, data = rows[0][:6]
    return {"ver": ver, "name": name, "port": int(port), "status": status, "data": data}


def port_in_use(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def install_host():
    """The host facts the end-to-end test relies on, or a skip saying why not."""
    if not IS_ROOT:
        pytest.skip("install.sh needs root")
    installed = [p for p in INSTALL_MARKS if os.path.lexists(p)]
    if installed:
        pytest.skip(f"Piglet is installed on this host ({', '.join(installed)}): "
                    "the test would replace that installation")
    target = install_target_cluster()
    if target is None:
        pytest.skip("no PostgreSQL cluster (pg_lsclusters): install.sh would create one")
    cluster = f"{target['ver']}/{target['name']}"
    if target["status"] != "down" or os.path.exists(f"{target['data']}/postmaster.pid"):
        pytest.skip(f"cluster {cluster}, which install.sh would use, is not down "
                    f"({target['status']}); it must not run on both sides")
    for port in (target["port"], INSTALLED_PORT):
        if port_in_use(port):
            pytest.skip(f"port {port} on 127.0.0.1 is in use")
    target["unit"] = f"postgresql@{target['ver']}-{target['name']}"
    target["existed"] = {p for p in INSTALLED_PIGLET if os.path.lexists(p)}
    return target


class InstalledPiglet:
    """The API of the Piglet that install.sh started, with the key it printed."""

    read_key = None
    connection = Server.connection
    request = Server.request

    def __init__(self, port, admin_key):
        self.port, self.admin_key = port, admin_key

    def status(self):
        status, _, data = self.request("GET", "status")
        assert status == 200, data
        return data


def run_install_sh(systemd):
    """install.sh as a user runs it (sudo's PATH, no PIGLET_* overrides);
    the admin key it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGLET_")}
    result = systemd.run("/bin/bash", namespace_source("install.sh"), timeout=600,
                         check=False, env=dict(env, PATH=SYSTEM_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Admin API key \(shown only now[^\n]*\n\s+(\S+)", result.stdout)
    assert found, result.stdout
    return found.group(1)


def remove_piglet_install(systemd, host):
    """Undo install.sh's Piglet files; leave the cluster stopped."""
    # Inside: stop both; disable removes the host's wants symlink.
    systemd.run("systemctl", "disable", "--now", "piglet.service", check=False)
    systemd.run("systemctl", "stop", host["unit"], check=False, timeout=120)
    for path in INSTALLED_PIGLET:
        if path in host["existed"] or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    systemd.run("systemctl", "daemon-reload", check=False)


def check_postgres_actions(systemd, api, unit):
    """Restart, stop and start PostgreSQL through the API; the unit agrees."""
    before = api.request("GET", "services/postgres")[2]
    assert (before["status"], before["unit"]) == ("running", unit), before
    status, _, data = api.request("POST", "services/postgres/restart")
    assert (status, data["status"]) == (200, "running"), data
    assert data["pid"] not in (None, before["pid"])
    assert data["pid"] == int(systemd.show(unit, "MainPID")["MainPID"])
    assert api.status()["status"] == "healthy"
    status, _, data = api.request("POST", "services/postgres/stop")
    assert (status, data["status"], data["pid"]) == (200, "stopped", None), data
    assert systemd.show(unit, "ActiveState") == {"ActiveState": "inactive"}
    assert (api.status()["status"], api.status()["services"]["postgres"]) == (
        "unhealthy", "stopped")
    status, _, data = api.request("POST", "services/postgres/start")
    assert (status, data["status"]) == (200, "running"), data
    assert api.status()["status"] == "healthy"


def check_restart_after_kill(systemd, api):
    """kill -9 of Piglet's main process: systemd starts it again."""
    before = systemd.show("piglet.service", "MainPID", "NRestarts")
    systemd.run("kill", "-9", before["MainPID"])

    def restarted():
        now = systemd.show("piglet.service", "MainPID", "NRestarts", "ActiveState")
        return (now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
                and int(now["NRestarts"]) == int(before["NRestarts"]) + 1 and now)
    wait_until(restarted, 30, "restart of piglet.service")
    assert api.status()["status"] == "healthy"


def test_install_sh_under_systemd_end_to_end(install_host, systemd):
    """What a user does: install.sh, then the API drives PostgreSQL's unit.

    Runs only as root, only when systemd boots in a namespace, only without
    an existing Piglet installation and only while the cluster install.sh
    picks is down (it runs inside the namespace, never on both sides).
    Afterwards Piglet's own files are removed (unit, wants symlink,
    /etc/piglet, /usr/local/lib/piglet, /var/lib/piglet, pid and log file)
    and the cluster is stopped again. What install.sh set up in PostgreSQL
    and around it stays, as it would for a reinstall: apt packages, the role
    piglet, its pg_hba.conf and pg_ident.conf lines, the archive settings,
    /etc/pgbackrest/pgbackrest.conf and the pgBackRest stanza.
    """
    try:
        key = run_install_sh(systemd)
        assert systemd.show("piglet.service", "ActiveState", "UnitFileState") == {
            "ActiveState": "active", "UnitFileState": "enabled"}
        with open("/etc/piglet/piglet.json") as handle:
            config = json.load(handle)
        assert config["services"]["postgres"]["unit"] == install_host["unit"]
        api = InstalledPiglet(INSTALLED_PORT, key)
        assert api.status()["status"] == "healthy"
        check_postgres_actions(systemd, api, install_host["unit"])
        check_restart_after_kill(systemd, api)
        verify = systemd.run("systemd-analyze", "verify", "piglet.service", check=False)
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
        security = systemd.run("systemd-analyze", "security", "--no-pager",
                               "piglet.service", check=False).stdout
        print("\n".join(line for line in security.splitlines() if "exposure" in line))
    finally:
        remove_piglet_install(systemd, install_host)
    assert not os.path.exists(f"{install_host['data']}/postmaster.pid")


# ---------------------------------------------------------------------------
# Meta: OpenAPI, fuzzing, metrics, audit, idempotent retries, TLS
# ---------------------------------------------------------------------------
# The PyPI tools (schemathesis, an OpenAPI validator, Prometheus's parser)
# live in their own virtualenv, built once by the `tools` fixture and run as
# subprocesses: nothing is installed into the system python.

TOOLS_DIR = os.environ.get("PIGLET_TEST_TOOLS", "/var/cache/piglet-test-tools")
TOOLS_REQUIREMENTS = ["schemathesis==4.32.5", "openapi-spec-validator==0.9.0",
                      "prometheus-client==0.26.0"]
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name",
                  "Network is unreachable", "ConnectTimeout", "Name or service not known")
# Not positive_data_acceptance: names and actions are checked beyond what
# the document's types say, so a schema-valid request may rightly get 400.
FUZZ_CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
               "response_headers_conformance,response_schema_conformance,"
               "negative_data_rejection,unsupported_method,allow_header_conformance,"
               "ignored_auth,missing_required_header")


def build_tools(path):
    """Make the tools virtualenv at `path`; pip's output on failure.

    A virtualenv cannot be moved (its scripts name their interpreter's path),
    so it is built in place and the requirements file, written last, marks
    it complete.
    """
    shutil.rmtree(path, ignore_errors=True)
    made = subprocess.run(["/usr/bin/python3", "-m", "venv", path],
                          capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.fail("cannot create a virtualenv (apt-get install python3-venv):\n"
                    + made.stderr)
    pip = subprocess.run([f"{path}/bin/pip", "install", "--disable-pip-version-check",
                          "--timeout", "30", "--retries", "2", *TOOLS_REQUIREMENTS],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        shutil.rmtree(path, ignore_errors=True)
        return pip.stdout + pip.stderr
    with open(os.path.join(path, "piglet-requirements.txt"), "w") as handle:
        handle.write("\n".join(TOOLS_REQUIREMENTS) + "\n")
    return None


@pytest.fixture(scope="session")
def tools():
    """The tools virtualenv's bin directory, built on first use."""
    os.makedirs(os.path.dirname(TOOLS_DIR), exist_ok=True)
    marker = os.path.join(TOOLS_DIR, "piglet-requirements.txt")
    with open(TOOLS_DIR + ".lock", "w") as lock:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs build it once
        with contextlib.suppress(FileNotFoundError), open(marker) as handle:
            if handle.read().split() == TOOLS_REQUIREMENTS:
                return os.path.join(TOOLS_DIR, "bin")
        failure = build_tools(TOOLS_DIR)
    if failure is None:
        return os.path.join(TOOLS_DIR, "bin")
    offline = any(marker in failure for marker in NETWORK_ERRORS)
    if offline and not os.environ.get("CI"):
        pytest.skip("PyPI unreachable, cannot install the test tools: "
                    + failure.strip().splitlines()[-1])
    pytest.fail("pip could not install the test tools:\n" + failure[-3000:])


def run_tool(tools, code, stdin="", timeout=120):
    result = subprocess.run([os.path.join(tools, "python"), "-c", code], input=stdin,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def requires_route(method, pattern):
    """Skip a test until the route it needs is in the table."""
    if not any(r.method == method and r.pattern == pattern for r in piglet.ROUTES):
        pytest.skip(f"{method} {pattern} is not in this build's route table")


def get_text(server, path, key="admin", conn=None):
    conn = conn or server.connection()
    secret = {"admin": server.admin_key, "read": server.read_key}.get(key, key)
    conn.request("GET", f"{API}/{path}", headers={"Authorization": f"Bearer {secret}"})
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read().decode()


# -- OpenAPI -------------------------------------------------------------------


def test_openapi_public_and_valid_by_validator(server, tools):
    status, headers, doc = server.request("GET", "openapi.json", key=None)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"]
    out = run_tool(tools, "import json, sys\n"
                          "from openapi_spec_validator import validate\n"
                          "validate(json.load(sys.stdin)); print('valid')", json.dumps(doc))
    assert out.strip() == "valid"


def documented_pairs(doc):
    return {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}


def test_openapi_operations_match_router_both_ways(server):
    doc = server.request("GET", "openapi.json", key=None)[2]
    assert doc["servers"] == [{"url": API}]
    routed = {("/" + r.pattern.strip("/"), r.method) for r in piglet.ROUTES}
    assert documented_pairs(doc) == routed
    # The live router answers each documented operation: a read key on it
    # gets anything but "no such route" (mutations stop at 403, harmlessly).
    for path, method in sorted(documented_pairs(doc) - {("/metrics", "GET")}):
        concrete = re.sub(r"\{[^}/]+\}", "x", path)
        status, _, data = server.request(method, API + concrete, key="read")
        assert status != 405, (method, path, data)
        if status == 404:
            assert data["error"]["details"].get("path") is None, (method, path, data)
        if method != "GET":
            assert_error(status, data, 403, "FORBIDDEN")


def test_openapi_describes_bodies_params_security_errors(server):
    doc = server.request("GET", "openapi.json", key=None)[2]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "An API key: Bearer pgl_..."}
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []
    create = doc["paths"]["/keys"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["name"] and body["additionalProperties"] is False
    assert body["properties"]["scope"] == {"type": "string", "enum": ["admin", "read"]}
    assert set(create["responses"]) >= {"201", "400", "401", "403", "409", "415", "429"}
    revoke = doc["paths"]["/keys/{name}"]["delete"]
    assert revoke["parameters"][0]["in"] == "path" and revoke["parameters"][0]["required"]
    assert "204" in revoke["responses"] and "content" not in revoke["responses"]["204"]
    assert revoke["responses"]["404"] == {"$ref": "#/components/responses/E404"}
    error = doc["components"]["responses"]["E404"]["content"]["application/json"]
    assert error["schema"] == {"$ref": "#/components/schemas/Error"}
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    audit = doc["paths"]["/audit"]["get"]
    assert {p["name"] for p in audit["parameters"]} == {"since", "limit"}


def test_openapi_job_route_documents_202_job():
    def start(app, req):
        """202: a job."""
    route = piglet.Route("POST", "/things/{name}/run", start, "admin", {},
                         body_required=False, status=202)
    doc = piglet.openapi_document([route])
    op = doc["paths"]["/things/{name}/run"]["post"]
    accepted = op["responses"]["202"]
    assert list(op["responses"])[0] == "202"
    assert accepted["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobAccepted"}
    assert "Location" in accepted["headers"]
    assert op["requestBody"]["required"] is False


@pytest.fixture
def fuzz_cluster():
    """Throwaway, with pgBackRest set up: a 503 for a missing dependency is a 5xx too."""
    yield from destroyed_after(backup_cluster())


def test_schemathesis_fuzz_no_5xx_and_replies_match_document(fuzz_cluster, make_server,
                                                             tools, tmp_path):
    """Bounded fuzzing against a throwaway cluster and server, from the document."""
    server = backup_server(make_server, fuzz_cluster)
    # Its stateful phase follows links from GET /keys to DELETE /keys/{name}, so
    # that operation is left out: it would revoke the fuzzer's own key.
    secret = server.cli("key", "create", "--name", "fuzz-" + os.urandom(6).hex()).strip()
    base = f"http://127.0.0.1:{server.port}{API}"
    seed = os.environ.get("PIGLET_FUZZ_SEED", "20240501")
    # One worker: hypothesis's lambda introspection is not thread-safe on 3.11.
    result = subprocess.run(
        [os.path.join(tools, "schemathesis"), "run", f"{base}/openapi.json", "--url", base,
         "-H", f"Authorization: Bearer {secret}", "--checks", FUZZ_CHECKS,
         "--max-examples", "25", "--seed", seed, "--workers", "1",
         "--request-timeout", "60", "--max-failures", "20", "--no-shrink",
         "--exclude-operation-id", "revoke_key",
         # These stop PostgreSQL (or would, reached through links): every
         # request meanwhile is a correct 503, which the 5xx check flags.
         # Their own tests cover them.
         "--exclude-operation-id", "act_service",
         "--exclude-operation-id", "restore_backup",
         "--exclude-operation-id", "restore_snapshot"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env=dict(os.environ, SCHEMATHESIS_HOOKS="", NO_COLOR="1"))
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert re.search(r"\d+ generated, \d+ passed", result.stdout), report
    assert "Traceback" not in server.log()


# -- Metrics -------------------------------------------------------------------

PARSE_METRICS = """
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = [[s.name, s.labels, s.value]
           for family in text_string_to_metric_families(sys.stdin.read())
           for s in family.samples]
print(json.dumps(samples))
"""


def scrape(server, tools, key="admin"):
    """{(name, frozenset(labels)): value} parsed by Prometheus's own parser."""
    status, headers, text = get_text(server, "metrics", key)
    assert status == 200, text
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = json.loads(run_tool(tools, PARSE_METRICS, text))
    return {(name, frozenset(labels.items())): value for name, labels, value in samples}


def sample(metrics, name, **labels):
    return metrics.get((name, frozenset(labels.items())), 0)


def test_metrics_counters_and_histogram_move(server, tools):
    before = scrape(server, tools)
    for _ in range(3):
        assert server.request("GET", "status")[0] == 200
    assert server.request("GET", "jobs/nosuch")[0] == 404
    after = scrape(server, tools, key="read")
    total = "piglet_http_requests_total"
    assert sample(after, total, method="GET", route="/status", status="200") == \
        sample(before, total, method="GET", route="/status", status="200") + 3
    assert sample(after, total, method="GET", route="/jobs/{id}", status="404") == \
        sample(before, total, method="GET", route="/jobs/{id}", status="404") + 1
    count = "piglet_http_request_duration_seconds_count"
    assert sample(after, count, route="/status") == sample(before, count, route="/status") + 3
    inf = sample(after, "piglet_http_request_duration_seconds_bucket", route="/status",
                 le="+Inf")
    assert inf == sample(after, count, route="/status")
    assert sample(after, "piglet_postgres_up") == 1
    assert sample(after, "piglet_last_backup_success_timestamp_seconds") == 0
    assert sample(after, "piglet_info", version=piglet.VERSION) == 1


def restart(server, stopped=False):
    """Start the server again; its old "listening" line must not be mistaken."""
    if not stopped:
        server.stop()
    os.truncate(server.log_file, 0)
    server.start()


def write_job(state_dir, job_id, kind, state, finished_at=None):
    os.makedirs(os.path.join(state_dir, "jobs"), exist_ok=True)
    job = dict.fromkeys(piglet.JOB_FIELDS)
    job.update(id=job_id, kind=kind, state=state, request={}, log_tail=[],
               created_at="2024-05-01T11:00:00Z", finished_at=finished_at)
    with open(os.path.join(state_dir, "jobs", job_id + ".json"), "w") as handle:
        json.dump(job, handle)


def test_metrics_jobs_last_backup_rate_limit_postgres_down(fresh_cluster, make_server, tools):
    server = make_server(fresh_cluster, rate_limit={"per_minute": 60, "burst": 2})
    server.stop()
    state = server.config["state_dir"]
    write_job(state, "20240501T110000Z-backup-aaaaaa", "backup", "succeeded",
              "2024-05-01T12:00:00Z")
    write_job(state, "20240501T110001Z-backup-bbbbbb", "backup", "running")
    restart(server, stopped=True)
    statuses = [server.request("GET", "status")[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    fresh_cluster.stop()
    time.sleep(1.1)  # the PostgreSQL probe is cached for a second
    metrics = scrape(server, tools, key="read")
    assert sample(metrics, "piglet_rate_limited_total") == 1
    assert sample(metrics, "piglet_http_requests_total", method="GET", route="/status",
                  status="429") == 1
    assert sample(metrics, "piglet_jobs", kind="backup", state="succeeded") == 1
    # The job that was running when Piglet stopped is failed at start.
    assert sample(metrics, "piglet_jobs", kind="backup", state="failed") == 1
    assert sample(metrics, "piglet_jobs", kind="backup", state="running") == 0
    assert sample(metrics, "piglet_last_backup_success_timestamp_seconds") == 1714564800
    assert sample(metrics, "piglet_postgres_up") == 0


def test_metrics_needs_a_key(server):
    status, _, data = server.request("GET", "metrics", key=None)
    assert_error(status, data, 401, "UNAUTHORIZED")


# -- Audit log -----------------------------------------------------------------


def audit_entries(server, query="limit=1000"):
    status, _, data = server.request("GET", f"audit?{query}")
    assert status == 200, data
    return data["entries"]


def test_audit_mutation_by_named_key_one_line_no_secret(server):
    status, _, made = server.request("POST", "keys", {"name": "audit-ops", "scope": "admin"})
    assert status == 201
    status, headers, data = server.request("POST", "keys", {"name": "made-by-ops"},
                                           key=made["key"])
    assert status == 201
    lines = [e for e in audit_entries(server) if e["request_id"] == headers["X-Request-Id"]]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["key"] == "audit-ops" and entry["client"] == "127.0.0.1"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", f"{API}/keys", 201)
    assert entry["event"] == "request" and entry["job"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])
    with open(os.path.join(server.config["state_dir"], "audit.log")) as handle:
        text = handle.read()
    assert data["key"] not in text and made["key"] not in text
    assert os.stat(os.path.join(server.config["state_dir"], "audit.log")).st_mode & 0o777 \
        == 0o600


def test_audit_reads_not_logged_denials_are(server):
    before = audit_entries(server)
    server.request("GET", "status")
    server.request("GET", "keys")
    status, headers, _ = server.request("DELETE", "keys/admin", key="read")
    assert status == 403
    new = audit_entries(server)[:len(audit_entries(server)) - len(before)]
    assert [(e["method"], e["status"], e["key"]) for e in new] == [("DELETE", 403, "reader")]
    assert new[0]["request_id"] == headers["X-Request-Id"]


def test_audit_newest_first_limit_since(server):
    for name in ("audit-a", "audit-b"):
        assert server.request("POST", "keys", {"name": name})[0] == 201
    newest = audit_entries(server, "limit=2")
    assert len(newest) == 2
    assert newest[0]["time"] >= newest[1]["time"]
    assert audit_entries(server, "since=2999-01-01T00:00:00Z") == []
    since = newest[0]["time"]
    assert all(e["time"] >= since for e in audit_entries(server, f"since={since}"))
    assert audit_entries(server, "since=2000-01-01T00:00:00%2B02:00&limit=1") == newest[:1]


@pytest.mark.parametrize("query,field", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=x", "limit"),
    ("limit=%C2%B2", "limit"),
    ("since=yesterday", "since"), ("since=2024-05-01T12:00:00", "since"),
])
def test_audit_bad_query_400(server, query, field):
    status, _, data = server.request("GET", f"audit?{query}")
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"] == {"field": field}


def test_audit_admin_only(server):
    status, _, data = server.request("GET", "audit", key="read")
    assert_error(status, data, 403, "FORBIDDEN")


def test_audit_job_end_line_for_interrupted_job(cluster, make_server):
    server = make_server(cluster)
    server.stop()
    write_job(server.config["state_dir"], "20240501T110000Z-restore-cccccc", "restore",
              "running")
    restart(server, stopped=True)
    jobs = [e for e in audit_entries(server) if e["event"] == "job"]
    assert len(jobs) == 1
    assert jobs[0]["job"] == "20240501T110000Z-restore-cccccc"
    assert (jobs[0]["kind"], jobs[0]["state"], jobs[0]["error"]) == \
        ("restore", "failed", "INTERRUPTED")
    assert jobs[0]["key"] is None and jobs[0]["method"] is None


def test_audit_database_and_user_lines_without_password(server):
    requires_route("POST", "/databases")
    requires_route("POST", "/users")
    status, _, made = server.request("POST", "keys", {"name": "ops", "scope": "admin"})
    assert status == 201, made
    status, db_headers, data = server.request("POST", "databases", {"name": "audit_db"},
                                              key=made["key"])
    assert status == 201, data
    password = "n0t-in-any-log-" + os.urandom(4).hex()
    status, user_headers, data = server.request("POST", "users", {"username": "audit_user",
                                                                  "password": password})
    assert status == 201, data
    entries = audit_entries(server)
    db_lines = [e for e in entries if e["path"] == f"{API}/databases"
                and e["request_id"] == db_headers["X-Request-Id"]]
    assert [(e["key"], e["method"], e["status"]) for e in db_lines] == [("ops", "POST", 201)]
    user_lines = [e for e in entries if e["request_id"] == user_headers["X-Request-Id"]]
    assert [(e["path"], e["method"], e["status"]) for e in user_lines] == \
        [(f"{API}/users", "POST", 201)]
    assert set(user_lines[0]) == {"time", "event", "key", "client", "method", "path",
                                  "status", "request_id", "job"}
    with open(os.path.join(server.config["state_dir"], "audit.log")) as handle:
        assert password not in handle.read()
    assert server.request("DELETE", "users/audit_user")[0] == 204
    assert server.request("DELETE", "databases/audit_db")[0] == 204
    assert server.request("DELETE", "keys/ops")[0] == 204


def test_audit_job_credited_to_request_that_queued_it(tmp_path):
    audit = piglet.AuditLog(str(tmp_path))
    jobs = piglet.JobManager(str(tmp_path), listener=audit.job_event)
    req = piglet.Request("POST", {}, {}, {}, {"name": "ops"}, "rid-1", "127.0.0.1")
    audit.set_context(req)
    job = jobs.submit("backup", {}, lambda job: {"ok": True})
    audit.set_context(None)
    deadline = time.monotonic() + 10
    while not audit.read(None, 10) and time.monotonic() < deadline:
        time.sleep(0.05)
    [entry] = audit.read(None, 10)
    assert (entry["event"], entry["job"], entry["state"], entry["error"]) == \
        ("job", job.id, "succeeded", None)
    assert (entry["key"], entry["client"], entry["request_id"]) == ("ops", "127.0.0.1", "rid-1")


# -- Idempotency-Key ------------------------------------------------------------


def test_idempotent_post_replayed_secret_withheld_other_body_409(server):
    headers = {"Idempotency-Key": "create-idem-1"}
    status, first_headers, first = server.request("POST", "keys", {"name": "idem-1"},
                                                  headers=headers)
    assert status == 201 and first["key"]
    status, again_headers, again = server.request("POST", "keys", {"name": "idem-1"},
                                                  headers=headers)
    assert status == 201 and again_headers["Idempotent-Replayed"] == "true"
    assert again == dict(first, key=None)  # the secret is never stored
    assert again_headers["Location"] == first_headers["Location"]
    assert "Idempotent-Replayed" not in first_headers
    status, _, data = server.request("POST", "keys", {"name": "idem-2"}, headers=headers)
    assert_error(status, data, 409, "CONFLICT")
    assert data["error"]["details"] == {"idempotency_key": "create-idem-1"}
    names = [k["name"] for k in server.request("GET", "keys")[2]["keys"]]
    assert names.count("idem-1") == 1 and "idem-2" not in names
    store = os.path.join(server.config["state_dir"], "idempotency")
    for name in os.listdir(store):
        with open(os.path.join(store, name)) as handle:
            assert first["key"] not in handle.read()


def test_idempotency_keys_are_per_api_key(server):
    other = server.request("POST", "keys", {"name": "idem-other", "scope": "admin"})[2]["key"]
    headers = {"Idempotency-Key": "shared-name"}
    assert server.request("POST", "keys", {"name": "idem-a"}, headers=headers)[0] == 201
    status, _, data = server.request("POST", "keys", {"name": "idem-b"}, headers=headers,
                                     key=other)
    assert status == 201 and data["name"] == "idem-b"


def test_idempotency_failed_request_not_stored(server):
    headers = {"Idempotency-Key": "retry-after-failure"}
    status, _, data = server.request("POST", "keys", {"name": "admin"}, headers=headers)
    assert_error(status, data, 409, "CONFLICT")  # the name exists: nothing was done
    status, _, data = server.request("POST", "keys", {"name": "admin"}, headers=headers)
    assert_error(status, data, 409, "CONFLICT")
    assert "idempotency_key" not in data["error"]["details"]


@pytest.mark.parametrize("value", ["a" * 256, "caf\xe9"])
def test_idempotency_key_invalid_400(server, value):
    status, _, data = server.request("POST", "keys", {"name": "idem-bad"},
                                     headers={"Idempotency-Key": value})
    assert_error(status, data, 400, "BAD_REQUEST")
    assert data["error"]["details"] == {"header": "Idempotency-Key"}


def test_idempotency_same_key_while_running_409(tmp_path):
    store = piglet.IdempotencyStore(str(tmp_path))
    assert store.begin("owner", "k", "fp") is None
    with pytest.raises(piglet.Conflict, match="still running"):
        store.begin("owner", "k", "fp")
    store.finish("owner", "k", "fp", piglet.Reply(piglet.HTTPStatus.ACCEPTED, {"job": {}}))
    replay = store.begin("owner", "k", "fp")
    assert (replay.status, replay.body) == (202, {"job": {}})


def test_idempotency_survives_restart(cluster, make_server):
    server = make_server(cluster)
    headers = {"Idempotency-Key": "x" * 255}
    status, _, first = server.request("POST", "keys", {"name": "kept"}, headers=headers)
    assert status == 201
    restart(server)
    status, replay_headers, again = server.request("POST", "keys", {"name": "kept"},
                                                   headers=headers)
    assert status == 201 and replay_headers["Idempotent-Replayed"] == "true"
    assert again == dict(first, key=None)
    status, _, data = server.request("POST", "keys", {"name": "kept2"}, headers=headers)
    assert_error(status, data, 409, "CONFLICT")
    assert [k["name"] for k in server.request("GET", "keys")[2]["keys"]].count("kept") == 1


def test_idempotent_logical_backup_one_job(fresh_cluster, make_server):
    requires_route("POST", "/backups")
    with fresh_cluster.connect() as conn:
        conn.execute("CREATE DATABASE appdb")
    server = make_server(fresh_cluster)
    body = {"type": "logical", "databases": ["appdb"]}
    headers = {"Idempotency-Key": "nightly-appdb"}
    status, _, first = server.request("POST", "backups", body, headers=headers)
    assert status == 202, first
    status, _, again = server.request("POST", "backups", body, headers=headers)
    assert status == 202 and again == first
    assert len(server.request("GET", "jobs")[2]["jobs"]) == 1
    status, _, data = server.request("POST", "backups", dict(body, databases=["postgres"]),
                                     headers=headers)
    assert_error(status, data, 409, "CONFLICT")
    assert wait_job(server, first["job"]["id"])["state"] == "succeeded"
    ends = [e for e in audit_entries(server) if e["event"] == "job"]
    assert [(e["job"], e["key"], e["state"]) for e in ends] == \
        [(first["job"]["id"], "admin", "succeeded")]
    assert len(server.request("GET", "jobs")[2]["jobs"]) == 1


# -- TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert path, key path)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = str(where / "cert.pem"), str(where / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_server(cluster, make_server, certificate):
    cert, key = certificate
    return make_server(cluster, tls={"cert": cert, "key": key})


def https(server, certificate, **context_options):
    context = ssl.create_default_context(cafile=certificate[0])
    for name, value in context_options.items():
        setattr(context, name, value)
    return http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30, context=context)


def test_tls_serves_https_with_tls12_or_later(tls_server, certificate):
    conn = https(tls_server, certificate)
    status, _, data = tls_server.request("GET", "status", conn=conn)
    assert status == 200 and data["status"] == "healthy"
    assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    status, _, data = tls_server.request("GET", "openapi.json", key=None, conn=conn)
    assert status == 200 and data["openapi"] == "3.1.0"
    conn.close()
    assert re.search(r"listening on 127\.0\.0\.1:\d+ over https", tls_server.log())


def test_tls_refuses_tls11(tls_server, certificate):
    context = ssl.create_default_context(cafile=certificate[0])
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets this client offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            context.wrap_socket(sock, server_hostname="127.0.0.1")
    server_context = piglet.tls_context({"cert": certificate[0], "key": certificate[1]})
    assert server_context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_port_plain_http_closed_promptly_key_never_read(tls_server, certificate):
    secret = tls_server.cli("key", "create", "--name", "plain-probe").strip()
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as sock:
        sock.sendall(f"GET {API}/status HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {secret}\r\n\r\n".encode())
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):  # socket.timeout here: not closed in 5 s
                received += chunk
    assert not received.startswith(b"HTTP/")
    keys = tls_server.request("GET", "keys", conn=https(tls_server, certificate))[2]["keys"]
    assert [k["last_used_at"] for k in keys if k["name"] == "plain-probe"] == [None]
    assert "plain-probe" not in tls_server.log()


def test_tls_silent_handshake_blocks_nobody_and_is_cut_off(tls_server, certificate):
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=30) as silent:
        conn = https(tls_server, certificate)
        status, _, _ = tls_server.request("GET", "status", conn=conn)
        assert status == 200
        conn.close()
        # The header deadline (10 s) ends the handshake that never starts.
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(4096) == b""


def test_tls_unreadable_certificate_stops_startup(tmp_path):
    config = {"tls": {"cert": str(tmp_path / "none.pem"), "key": str(tmp_path / "none.key")}}
    result = run_serve(config, tmp_path)
    assert result.returncode == 2
    assert "tls.cert" in result.stderr


@pytest.mark.parametrize("listen,tls,warned", [
    ("127.0.0.1", None, False), ("::1", None, False), ("127.0.0.9", None, False),
    ("localhost", None, False), ("0.0.0.0", None, True), ("::", None, True),
    ("192.0.2.10", None, True), ("db.example", None, True), ("0.0.0.0", "c.pem", False),
])
def test_listen_without_tls_warning(listen, tls, warned):
    warning = piglet.listen_warning({"listen": listen, "tls": {"cert": tls, "key": tls}})
    assert (warning is not None) == warned
    if warned:
        assert listen in warning and "without TLS" in warning


# ---------------------------------------------------------------------------
# Snapshots: workspace files and databases rolled back together
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def snap_cluster():
    """A cluster of their own: snapshot restores drop and recreate every database."""
    yield from destroyed_after(Cluster())


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
    yield from destroyed_after(backup_cluster())


@pytest.fixture(scope="session")
def br_server(br_cluster):
    yield from destroyed_after(backup_server(Server, br_cluster))


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
    status, _, data = server.request("POST", "databases", {"name": "after_pitr"})
    assert status == 201, data  # writable through Piglet too, not read-only
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


# ---------------------------------------------------------------------------
# Snapshots with pgBackRest: restore points (the backup fixtures above)
# ---------------------------------------------------------------------------


def pgbackrest_snap(cluster, make_server, base):
    return SnapEnv(cluster, make_server, base, pgbackrest={
        "stanza": STANZA, "config": cluster.pgbr_conf, "enabled": True})


def restore_points(cluster, since):
    """Names of the restore points in pg_wal from LSN `since` on."""
    result = subprocess.run([f"{PG_BIN}/pg_waldump", "-p",
                             os.path.join(cluster.data, "pg_wal"), "-s", since,
                             "-r", "XLOG"], capture_output=True, text=True, timeout=60)
    return re.findall(r"desc: RESTORE_POINT (\S+)", result.stdout)


def test_snapshot_pgbackrest_restore_point_rows_and_files_back_pre_restore_undoes_it(
        make_backup_cluster, make_server, tmp_path):
    cluster = make_backup_cluster()
    snap = pgbackrest_snap(cluster, make_server, tmp_path)
    query(cluster, "CREATE DATABASE snapdb")
    query(cluster, "CREATE TABLE t (v text); INSERT INTO t VALUES ('a1'), ('a2')", "snapdb")
    make_workspace(snap.ws)
    at_s1 = tree_state(snap.ws)
    s1 = snap.snapshot("s1")["result"]
    database = s1["database"]
    assert database["method"] == "pgbackrest" and database["timeline"] == 1
    assert re.fullmatch(r"s1-[0-9a-f]{12}", database["restore_point"])
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", database["lsn"])
    # No backup preceded it: a full one was taken first.
    assert [b["id"] for b in listed(snap.server)["backups"]] == [database["backup_taken"]]
    edit_workspace_and_data(snap.ws, cluster)
    edited = tree_state(snap.ws)

    result = snap.restore("s1")["result"]
    assert tree_state(snap.ws) == at_s1
    assert rows(cluster) == ["a1", "a2"]
    assert not object_exists(cluster, "pg_database", "datname", "laterdb")
    assert not object_exists(cluster, "pg_roles", "rolname", "laterrole")
    assert result["backup"] == database["backup_taken"] and result["timeline"] == 2
    assert result["restore_point"] == database["restore_point"]
    assert result["postgres"] == "running" and result["safety_backup"]
    pre = snap.server.request("GET", f"snapshots/{result['pre_restore']}")[2]
    assert pre["database"]["backup_taken"] is None and pre["database"]["timeline"] == 1

    # The pre-restore point lies on timeline 1, past where timeline 2 branched.
    again = snap.restore(result["pre_restore"])["result"]
    assert tree_state(snap.ws) == edited
    assert rows(cluster) == ["a1", "a2", "b1", "b2"]
    assert object_exists(cluster, "pg_roles", "rolname", "laterrole")
    assert again["backup"] == database["backup_taken"] and again["timeline"] == 3
    query(cluster, "INSERT INTO t VALUES ('c1')", "snapdb")


def test_snapshot_pgbackrest_bad_names_400_no_restore_point_or_backup(
        make_backup_cluster, make_server, tmp_path):
    cluster = make_backup_cluster(stanza_create=False)
    snap = pgbackrest_snap(cluster, make_server, tmp_path)
    start = query(cluster, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    for name in ["../etc", "", "a" * 64, "\u20ac" * 22, "-x", "a\n"]:
        status, _, data = snap.server.request("POST", "snapshots", {"name": name})
        assert_error(status, data, 400, "BAD_REQUEST")
        assert data["error"]["details"]["field"] == "name"
    assert snap.server.request("GET", "jobs")[2] == {"jobs": []}
    assert not os.path.exists(snap.store) or os.listdir(snap.store) == []
    assert restore_points(cluster, start) == []
    assert os.listdir(cluster.pgbr_dirs["repo"]) == []
    # The same check sees a point that was made: the first good name.
    point = snap.snapshot("good")["result"]["database"]["restore_point"]
    assert restore_points(cluster, start) == [point]


def test_snapshot_restore_point_backup_choice_follows_timeline_history():
    def backup(label, timeline, stop, error=False):
        return {"label": label, "error": error, "lsn": {"start": "0/1", "stop": stop},
                "archive": {"start": f"{timeline:08X}0000000000000001"}}
    backups = [backup("full1", 1, "0/3000100"), backup("safety1", 1, "0/8000100"),
               backup("onTL2", 2, "0/9000100"), backup("bad", 1, "0/4000000", True)]
    # Timeline 3 branched from timeline 1 at 0/7000000.
    point = {"timeline": 3, "lsn": "0/A000000", "history": [[1, "0/7000000"]]}
    assert piglet.backup_for_point(backups, point)["label"] == "full1"
    point = {"timeline": 1, "lsn": "0/9000000", "history": []}
    assert piglet.backup_for_point(backups, point)["label"] == "safety1"
    point = {"timeline": 1, "lsn": "0/3000000", "history": []}
    assert piglet.backup_for_point(backups, point) is None
    point = {"timeline": 2, "lsn": "0/9000200", "history": None}
    assert piglet.backup_for_point(backups, point)["label"] == "onTL2"
