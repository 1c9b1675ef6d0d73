#!/usr/bin/python3
"""Benchmarks for piglet.py: figures to read, not a timed test.

Run as root, from the repository:

    /usr/bin/python3 bench_piglet.py [--quick] [--only SECTION[,SECTION]]
                                     [--databases N] [--scale N]

Each run builds everything it measures and removes it on exit, Ctrl-C
included: a throwaway PostgreSQL cluster (initdb as the `postgres` OS user
into a temp dir, a free port, its own socket dir, fsync off), Piglet on
port 0 with its own config and keys, and whatever else a section needs.
All traffic stays on 127.0.0.1.  The load generator is wrk (Debian package
`wrk`), a second process, with a Lua script that adds the Authorization
header and reports the latency percentiles.  Sections databases and backups
also need pgbench and pgbackrest.

Sections (all by default; --only picks some):
    http    GET /api/v1/status against a bare ThreadingHTTPServer that
            answers the same bytes, at 1, 10 and 50 keep-alive connections
            (requests/s, p50, p99, server CPU per request), then Piglet's
            RSS before and after the points and 100,000 more requests.
            CPU per request is the figure to trust on a loaded machine.
    databases
            A cluster of its own with --databases (1,000) empty databases:
            GET /databases 30 times in a row, median and p95 as Piglet's
            access log times it and as the client sees it, beside the bare
            catalogue query and sum(pg_database_size()) over all; then
            10,000 mixed reads (/status, /databases, /users, /system,
            /services) at 20 connections while a thread counts Piglet's
            sessions in pg_stat_activity, against the bound: pool_size
            plus the health probe's own session.
    backups A cluster of its own archiving into its own pgBackRest
            repository (lz4, process-max 2, as install.sh sets up) and a
            pgbench database of --scale (70, about 1 GB): full backups
            through Piglet (POST /backups until the job reads succeeded)
            and by hand (pgbackrest backup --type=full), interleaved,
            median of 3; then GET /status p99 under wrk during one more
            Piglet backup, beside the same load idle; then pg_dump -Fc of
            the database.  The timed rounds run without the /status load,
            which on a small machine would take CPU from pgBackRest.
    snapshots  ~1 GB in 10,000 files (--quick: a tenth of both): the first
            snapshot, a second one after changing 1% of the files, a
            restore of the unchanged workspace; wall time and disk added
            for each.  Databases as logical dumps of a near-empty cluster.

A section is a function `bench_<name>(env)` registered in SECTIONS; it
prints its own table and returns a list of Target results.  The exit
status is 0 when the run completes, whether or not targets are met, and
1 when it cannot run.

Absolute figures depend on the machine and its load; compare the ratios
measured inside one run.
"""

import argparse
import contextlib
import glob
import http.client
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
PIGLET = os.path.join(HERE, "piglet.py")
PG_USER = "postgres"
IS_ROOT = os.geteuid() == 0
API_PREFIX = "/api/v1"
STATUS_PATH = API_PREFIX + "/status"

POINT_SECONDS = 10            # wrk duration of one measured point
QUICK_POINT_SECONDS = 3       # the same with --quick
CONNECTIONS = (1, 10, 50)     # keep-alive connections per point
WARMUP_REQUESTS = 1000        # per server, on one connection, not measured
SOAK_REQUESTS = 100_000       # the RSS check: this many requests in a row
SOAK_CONNECTIONS = 50
SOAK_MAX_SECONDS = 600        # the soak stops here even short of its count
WRK_REPLY_TIMEOUT = "5s"      # a reply slower than this counts as an error
START_TIMEOUT = 20            # seconds for a server to say it listens
STOP_TIMEOUT = 20             # seconds for a server to exit after SIGTERM
COMMAND_TIMEOUT = 120         # initdb, pg_ctl, piglet.py key
LONG_TIMEOUT = 3600           # pgbench -i, a backup, pg_dump
POOL_SIZE = 8                 # postgres.pool_size given to Piglet (its default)

TARGET_RATIO_C10 = 0.30       # Piglet req/s at 10 connections vs bare
TARGET_P99_C50_MS = 40.0      # Piglet p99 at 50 connections
TARGET_RSS_GROWTH = 0.10      # Piglet RSS growth over the run


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


# ---------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                   key=lambda path: int(path.split("/")[-2]))
    if not found:
        raise BenchError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return found[-1]


def run_as_pg(argv, timeout=COMMAND_TIMEOUT):
    """Run a PostgreSQL tool as the cluster owner, in its own session so
    that a Ctrl-C at the terminal reaches only this script."""
    kwargs = {}
    if IS_ROOT:
        kwargs.update(user=PG_USER, group=pwd.getpwnam(PG_USER).pw_gid,
                      extra_groups=[])
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/",
                            timeout=timeout, start_new_session=True, **kwargs)
    if result.returncode != 0:
        raise BenchError(f"{os.path.basename(argv[0])} failed: "
                         f"{(result.stderr or result.stdout).strip()}")
    return result


def make_temp_dir(prefix, owner=None):
    path = tempfile.mkdtemp(prefix=prefix)
    if owner is not None:
        os.chown(path, pwd.getpwnam(owner).pw_uid, -1)
    return path


def wait_for_port(proc, log_file, what):
    """The port from the "listening on 127.0.0.1:PORT" line in a log."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with open(log_file, encoding="utf-8", errors="replace") as handle:
            found = re.findall(r"listening on 127\.0\.0\.1:(\d+)", handle.read())
        if found:
            return int(found[-1])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_file, encoding="utf-8", errors="replace") as handle:
        tail = handle.read()[-2000:]
    raise BenchError(f"{what} did not start:\n{tail}")


def stop_process(proc, timeout=STOP_TIMEOUT):
    """SIGTERM, then SIGKILL when it overstays; never waits unbounded."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


def raw_get(port, path, headers):
    """One keep-alive GET over a plain socket: the reply's exact bytes."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += recv_some(sock)
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
        while len(body) < length:
            body += recv_some(sock)
    return head + b"\r\n\r\n" + body


def recv_some(sock):
    data = sock.recv(65536)
    if not data:
        raise BenchError("the server closed the connection mid-reply")
    return data


def mb(size):
    return f"{size / 1048576:.1f} MB"


# ---------------------------------------------------------------------------
# What a run measures against: a cluster, Piglet, a bare server
# ---------------------------------------------------------------------------


class Cluster:
    """A throwaway PostgreSQL cluster: temp dir, free port, own socket dir."""

    def __init__(self, settings=()):
        self.bin = pg_bin()
        self.owner = PG_USER if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
        self.base = make_temp_dir("piglet-bench-pg-", PG_USER if IS_ROOT else None)
        self.data = os.path.join(self.base, "data")
        self.logfile = os.path.join(self.base, "server.log")
        self.port = free_port()
        self.settings = list(settings)
        self.started = False

    def create(self):
        run_as_pg([f"{self.bin}/initdb", "-D", self.data, "-U", "postgres",
                   "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"])
        settings = ["fsync = off", "synchronous_commit = off",
                    "full_page_writes = off", f"port = {self.port}",
                    f"unix_socket_directories = '{self.base}'",
                    "listen_addresses = '127.0.0.1'", *self.settings]
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as handle:
            handle.write("\n".join(settings) + "\n")
        self.started = True  # from here on, destroy() tries a stop
        run_as_pg(self.pg_ctl("start", "-w", "-l", self.logfile))

    @property
    def dsn(self):
        return f"host={self.base} port={self.port} dbname=postgres user=postgres"

    def pg_ctl(self, *args):
        return [f"{self.bin}/pg_ctl", *args, "-D", self.data]

    def service_entry(self):
        """Explicit start/stop/status commands, as on a host without systemd."""
        return {"start": self.pg_ctl("start", "-w", "-l", self.logfile),
                "stop": self.pg_ctl("stop", "-w", "-m", "fast"),
                "status": self.pg_ctl("status"), "user": self.owner,
                "port": self.port}

    def destroy(self):
        if self.started:
            with contextlib.suppress(BenchError, subprocess.SubprocessError):
                run_as_pg(self.pg_ctl("stop", "-w", "-m", "immediate"))
        shutil.rmtree(self.base, ignore_errors=True)


class Piglet:
    """`piglet.py serve` on port 0 with limits raised and its own keys;
    `extra` adds to (or, one level deep, overrides) the config."""

    def __init__(self, cluster, workdir, extra=None):
        self.dir = workdir
        self.config_file = os.path.join(workdir, "piglet.json")
        self.log_file = os.path.join(workdir, "piglet.log")
        self.proc = None
        self.port = None
        self.key = None
        self.config = {
            "listen": "127.0.0.1", "port": 0,
            "keys_file": os.path.join(workdir, "keys.json"),
            "state_dir": os.path.join(workdir, "state"),
            # Far above any load here, so no request meets a 429.
            "rate_limit": {"per_minute": 10**9, "burst": 10**9},
            "postgres": {"dsn": cluster.dsn, "service": "postgres",
                         "os_user": cluster.owner, "pool_size": POOL_SIZE},
            "backups": {"dir": os.path.join(workdir, "backups")},
            "snapshots": {"dir": os.path.join(workdir, "snapshots")},
            "services": {"postgres": cluster.service_entry()},
        }
        for name, value in (extra or {}).items():
            if isinstance(value, dict) and name in self.config:
                self.config[name] = dict(self.config[name], **value)
            else:
                self.config[name] = value

    def start(self):
        with open(self.config_file, "w", encoding="utf-8") as handle:
            json.dump(self.config, handle)
        self.key = self.cli("key", "create", "--name", "bench").strip()
        with open(self.log_file, "ab") as log_handle:
            self.proc = subprocess.Popen(
                [sys.executable, PIGLET, "serve", "--config", self.config_file],
                stdin=subprocess.DEVNULL, stdout=log_handle,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.port = wait_for_port(self.proc, self.log_file, "piglet")

    def cli(self, *args):
        result = subprocess.run(
            [sys.executable, PIGLET, *args, "--config", self.config_file],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            start_new_session=True)
        if result.returncode != 0:
            raise BenchError(f"piglet.py {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def headers(self):
        return {"Authorization": f"Bearer {self.key}"}

    def client(self):
        return Client(self.port, self.headers())

    def log_size(self):
        return os.path.getsize(self.log_file)

    def access_log(self, since=0):
        """(method, path, status, ms, request id) of each request logged
        after byte offset `since`: the time Piglet itself measured."""
        with open(self.log_file, "rb") as handle:
            handle.seek(since)
            text = handle.read().decode("utf-8", "replace")
        return [(m[0], m[1], int(m[2]), float(m[3]), m[4])
                for m in ACCESS_RE.findall(text)]

    def rss(self):
        return rss_bytes(self.proc.pid)

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)


# Piglet's access-log line: GET '/api/v1/status' 200 0.8ms key=bench rid=...
ACCESS_RE = re.compile(r" INFO (\S+) '([^']*)' (\d{3}) ([\d.]+)ms key=\S* rid=(\S+)")


class Client:
    """Sequential JSON requests over one keep-alive connection."""

    def __init__(self, port, headers):
        self.port, self.headers = port, headers
        self.conn = None

    def request(self, method, path, body=None, request_id=None):
        """(status, parsed JSON or None, seconds until the whole reply)."""
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if request_id:
            headers["X-Request-Id"] = request_id
        for attempt in range(2):  # a kept-alive connection the server closed
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=60)
            began = time.monotonic()
            try:
                self.conn.request(method, API_PREFIX + path, data, headers)
                reply = self.conn.getresponse()
                raw = reply.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
                continue
            seconds = time.monotonic() - began
            return reply.status, json.loads(raw) if raw else None, seconds

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# A ThreadingHTTPServer doing nothing but answer fixed bytes: the floor
# Piglet is compared with.  It parses the request line and headers as any
# stdlib server does, and sends each reply in one write.
BARE_SERVER = r"""
import http.server, sys

with open(sys.argv[1], "rb") as handle:
    REPLY = handle.read()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        self.wfile.write(REPLY)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

server = Server(("127.0.0.1", 0), Handler)
print("listening on 127.0.0.1:%d" % server.server_address[1], flush=True)
server.serve_forever()
"""


class BareServer:
    """BARE_SERVER in a subprocess, answering `reply` to every GET."""

    def __init__(self, workdir, reply):
        self.reply_file = os.path.join(workdir, "bare-reply.bin")
        self.log_file = os.path.join(workdir, "bare.log")
        with open(self.reply_file, "wb") as handle:
            handle.write(reply)
        self.proc = None
        self.port = None

    def start(self):
        with open(self.log_file, "ab") as log_handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BARE_SERVER, self.reply_file],
                stdin=subprocess.DEVNULL, stdout=log_handle,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.port = wait_for_port(self.proc, self.log_file, "the bare server")

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)


# ---------------------------------------------------------------------------
# Load generation: wrk with a Lua script
# ---------------------------------------------------------------------------

# BENCH_AUTH becomes the Authorization header.  With BENCH_MAX_REQUESTS
# the thread stops after that many replies and raises SIGINT in wrk itself,
# which is how wrk's main thread cuts its sleep short and prints the
# summary (run with one thread, so the count is exact).  BENCH_PATHS, a
# comma-separated list, makes the requests go to those paths in turn.
WRK_SCRIPT = r"""
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

local paths = {}
for path in string.gmatch(os.getenv("BENCH_PATHS") or "", "[^,]+") do
  table.insert(paths, path)
end
if #paths > 0 then
  local turn = 0
  function request()
    turn = turn + 1
    return wrk.format(nil, paths[(turn - 1) % #paths + 1])
  end
end

local limit = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0")
if limit > 0 then
  local ffi = require("ffi")
  ffi.cdef("int kill(int pid, int sig); int getpid(void);")
  local seen = 0
  function response(status, headers, body)
    seen = seen + 1
    if seen == limit then
      wrk.thread:stop()
      ffi.C.kill(ffi.C.getpid(), 2)
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d "
    .. "bad_status=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), latency.max, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""

RESULT_RE = re.compile(r"BENCH-RESULT (.*)")


class LoadResult:
    def __init__(self, fields):
        self.requests = fields["requests"]
        self.seconds = fields["duration_us"] / 1e6
        self.rate = self.requests / self.seconds if self.seconds else 0.0
        self.p50_ms = fields["p50_us"] / 1000
        self.p99_ms = fields["p99_us"] / 1000
        self.max_ms = fields["max_us"] / 1000
        self.errors = fields["bad_status"] + fields["socket_errors"]
        self.cpu_us = None  # server CPU per request, when measured


class Wrk:
    def __init__(self, workdir):
        self.script = os.path.join(workdir, "bench.lua")
        with open(self.script, "w", encoding="utf-8") as handle:
            handle.write(WRK_SCRIPT)

    def run(self, port, headers, connections, seconds, max_requests=0,
            paths=(STATUS_PATH,)):
        """One wrk run against GET `paths` in turn; one thread is plenty for
        a Python server and leaves the other core to it."""
        proc = self.start(port, headers, connections, seconds, max_requests, paths)
        try:
            out, err = proc.communicate(timeout=seconds + 60)
        finally:
            stop_process(proc, timeout=5)
        return self.result(proc, out, err)

    def start(self, port, headers, connections, seconds, max_requests=0,
              paths=(STATUS_PATH,)):
        """wrk running in the background; `stop` ends it early."""
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                f"--timeout={WRK_REPLY_TIMEOUT}", "-s", self.script,
                f"http://127.0.0.1:{port}{paths[0]}"]
        env = dict(os.environ, BENCH_AUTH=headers.get("Authorization", ""),
                   BENCH_MAX_REQUESTS=str(max_requests),
                   BENCH_PATHS=",".join(paths) if len(paths) > 1 else "")
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)

    def stop(self, proc):
        """SIGINT: wrk stops at once and prints its summary."""
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            stop_process(proc, timeout=5)
        return self.result(proc, out, err)

    @staticmethod
    def result(proc, out, err):
        found = RESULT_RE.search(out or "")
        if proc.returncode != 0 or not found:
            raise BenchError(f"wrk failed ({proc.returncode}): "
                             f"{(err or '').strip() or (out or '').strip()}")
        fields = dict(item.split("=") for item in found.group(1).split())
        return LoadResult({name: int(value) for name, value in fields.items()})


# ---------------------------------------------------------------------------
# The environment shared by sections, torn down on exit
# ---------------------------------------------------------------------------


class Target:
    def __init__(self, text, met, measured):
        self.text, self.met, self.measured = text, met, measured

    def line(self):
        mark = "met    " if self.met else "NOT MET"
        return f"  [{mark}] {self.text}: {self.measured}"


class Env:
    """Lazily built shared pieces; every one registers its own cleanup."""

    def __init__(self, args):
        if "http" in args.only and shutil.which("wrk") is None:
            raise BenchError("wrk is not installed (apt-get install wrk)")
        self.args = args
        self.seconds = QUICK_POINT_SECONDS if args.quick else POINT_SECONDS
        self.stack = contextlib.ExitStack()
        self.workdir = make_temp_dir("piglet-bench-")
        self.stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self._cluster = self._piglet = None
        self.wrk = Wrk(self.workdir)

    def cluster(self):
        """The cluster sections share; one that changes its cluster much
        makes its own with new_cluster()."""
        if self._cluster is None:
            self._cluster = self.new_cluster(Cluster())
        return self._cluster

    def piglet(self):
        if self._piglet is None:
            self._piglet = self.new_piglet(self.cluster(), "piglet")
        return self._piglet

    def new_cluster(self, cluster):
        """Create `cluster` (a Cluster not yet created), removed on exit."""
        self.stack.callback(cluster.destroy)
        cluster.create()
        return cluster

    def new_piglet(self, cluster, name, extra=None):
        """A started Piglet of its own on `cluster`, stopped on exit."""
        piglet = Piglet(cluster, os.path.join(self.workdir, name), extra)
        os.makedirs(piglet.dir)
        self.stack.callback(piglet.stop)
        piglet.start()
        return piglet

    def close(self):
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.stack.close()


# ---------------------------------------------------------------------------
# Section http: Piglet's GET /status against a bare stdlib server
# ---------------------------------------------------------------------------


def bench_http(env):
    piglet = env.piglet()
    reply = raw_get(piglet.port, STATUS_PATH, piglet.headers())
    check_healthy(reply)
    bare = BareServer(env.workdir, reply)
    env.stack.callback(bare.stop)
    bare.start()
    servers = {"piglet": piglet, "bare": bare}
    for server in servers.values():
        env.wrk.run(server.port, piglet.headers(), 1, 30, WARMUP_REQUESTS)
    rss = [("idle, after warm-up", piglet.rss())]
    points = measure_points(env, servers, piglet.headers())
    rss.append(("after the points", piglet.rss()))
    soak = env.wrk.run(piglet.port, piglet.headers(), SOAK_CONNECTIONS,
                       SOAK_MAX_SECONDS, SOAK_REQUESTS)
    rss.append((f"after {soak.requests:,} more requests", piglet.rss()))
    print_http_table(env, points, rss, soak)
    return http_targets(points, rss)


def check_healthy(reply):
    head, _, body = reply.partition(b"\r\n\r\n")
    status = None
    if head.startswith(b"HTTP/1.1 200"):
        status = json.loads(body).get("status")
    if status != "healthy":
        raise BenchError("Piglet's /status is not a healthy 200; measuring it "
                         f"would mislead:\n{reply.decode('utf-8', 'replace')}")


def measure_points(env, servers, headers):
    """{(server, connections): LoadResult}, the servers taking turns at
    each level so that a change in the machine's load hits both alike.

    Each point also records the server's CPU time per request, which other
    work on a shared machine disturbs far less than requests per second.
    """
    points = {}
    for connections in CONNECTIONS:
        for name, server in servers.items():
            before = cpu_seconds(server.proc.pid)
            result = env.wrk.run(server.port, headers, connections, env.seconds)
            used = cpu_seconds(server.proc.pid) - before
            result.cpu_us = used * 1e6 / result.requests if result.requests else 0
            points[name, connections] = result
    return points


def print_http_table(env, points, rss, soak):
    print(f"\nHTTP: GET {STATUS_PATH}, keep-alive, wrk -t1, {env.seconds} s "
          "per point (bare = ThreadingHTTPServer answering the same bytes)")
    print(f"{'conns':>5} | {'Piglet req/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU us/req':>10} | {'bare req/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU us/req':>10} | {'Piglet/bare':>11}")
    for connections in CONNECTIONS:
        ours, bare = points["piglet", connections], points["bare", connections]
        print(f"{connections:>5} | {point_cells(ours, 12)} | "
              f"{point_cells(bare, 10)} | {ratio(ours, bare):>11.1%}")
    for (name, connections), result in points.items():
        if result.errors:
            print(f"  warning: {name} at {connections} connections: "
                  f"{result.errors} errors or non-2xx replies")
    print(f"Soak: {soak.requests:,} requests at {SOAK_CONNECTIONS} connections, "
          f"{soak.rate:,.0f} req/s, p99 {soak.p99_ms:.2f} ms, "
          f"max {soak.max_ms:.1f} ms, {soak.errors} errors")
    print("Piglet RSS: " + " -> ".join(f"{mb(size)} ({when})" for when, size in rss))


def point_cells(result, width):
    return (f"{result.rate:>{width},.0f} {result.p50_ms:>7.2f} "
            f"{result.p99_ms:>7.2f} {result.cpu_us:>10.0f}")


def ratio(ours, bare):
    return ours.rate / bare.rate if bare.rate else 0.0


def http_targets(points, rss):
    c10 = ratio(points["piglet", 10], points["bare", 10])
    p99 = points["piglet", 50].p99_ms
    growth = rss[-1][1] / rss[0][1] - 1
    return [
        Target(f"req/s at 10 connections >= {TARGET_RATIO_C10:.0%} of bare",
               c10 >= TARGET_RATIO_C10, f"{c10:.1%}"),
        Target(f"p99 at 50 connections < {TARGET_P99_C50_MS:.0f} ms",
               p99 < TARGET_P99_C50_MS, f"{p99:.1f} ms"),
        Target(f"RSS growth over the run < {TARGET_RSS_GROWTH:.0%}",
               growth < TARGET_RSS_GROWTH,
               f"{growth:+.1%} ({mb(rss[0][1])} -> {mb(rss[-1][1])})"),
    ]


# ---------------------------------------------------------------------------
# Section databases: GET /databases over many databases; sessions bounded
# ---------------------------------------------------------------------------

DATABASES = 1000              # databases the cluster holds (--databases)
LIST_REQUESTS = 30            # GET /databases, one after another, measured
CATALOGUE_RUNS = 30           # the bare catalogue query, timed the same way
SIZE_RUNS = 3                 # sum(pg_database_size()) over all databases
MIXED_REQUESTS = 10_000       # mixed read requests while sessions are counted
MIXED_CONNECTIONS = 20
MIXED_PATHS = tuple(API_PREFIX + path for path in
                    ("/status", "/databases", "/users", "/system", "/services"))
SAMPLE_SECONDS = 0.01         # how often pg_stat_activity is counted
LOG_SETTLE_SECONDS = 0.5      # Piglet logs a request just after its reply
TARGET_LIST_MS = 150.0        # GET /databases median at the server

# Piglet's listing query without the sizes: the floor a listing can reach.
CATALOGUE_SQL = """
SELECT d.oid, d.datname, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding),
       d.datcollate, coalesce(a.sessions, 0)
  FROM pg_database d
  LEFT JOIN (SELECT datid, count(*) AS sessions FROM pg_stat_activity
              GROUP BY datid) a ON a.datid = d.oid
 WHERE NOT d.datistemplate ORDER BY d.datname"""
SIZES_SQL = "SELECT sum(pg_database_size(oid)) FROM pg_database"
PIGLET_SESSIONS_SQL = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'piglet'"


def connect(cluster, dbname="postgres"):
    return psycopg.connect(cluster.dsn, dbname=dbname, autocommit=True,
                           application_name="piglet-bench")


def timed(conn, statement):
    """Seconds for one statement, its rows fetched, over the socket."""
    began = time.monotonic()
    conn.execute(statement).fetchall()
    return time.monotonic() - began


def median_ms(seconds):
    return statistics.median(seconds) * 1000


def p95_ms(seconds):
    return percentile(seconds, 95) * 1000


def percentile(values, pct):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * pct // 100) - 1)]


class SessionSampler:
    """Counts Piglet's sessions in pg_stat_activity, from a thread of its
    own, for as long as the `with` block lasts."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.counts = []
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            with connect(self.cluster) as conn:
                while not self._stop.is_set():
                    self.counts.append(conn.execute(PIGLET_SESSIONS_SQL).fetchone()[0])
                    self._stop.wait(SAMPLE_SECONDS)
        except psycopg.Error as exc:
            self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=30)
        if self.error is not None and exc_info[0] is None:
            raise BenchError(f"counting Piglet's sessions failed: {self.error}")


def bench_databases(env):
    count = env.args.databases
    cluster = env.new_cluster(Cluster())
    created = create_databases(cluster, count)
    piglet = env.new_piglet(cluster, "piglet-databases")
    with connect(cluster) as conn:
        catalogue = [timed(conn, CATALOGUE_SQL) for _ in range(CATALOGUE_RUNS)]
        sizes = [timed(conn, SIZES_SQL) for _ in range(SIZE_RUNS)]
    client = piglet.client()
    first = list_once(client, "bench-first")
    since = piglet.log_size()
    client_side = [list_once(client, f"bench-list-{n}") for n in range(LIST_REQUESTS)]
    client.close()
    time.sleep(LOG_SETTLE_SECONDS)
    server_side = [ms / 1000 for method, path, status, ms, rid
                   in piglet.access_log(since) if rid.startswith("bench-list-")]
    if len(server_side) != LIST_REQUESTS:
        raise BenchError(f"found {len(server_side)} of {LIST_REQUESTS} GET /databases "
                         "lines in Piglet's access log")
    since = piglet.log_size()
    with SessionSampler(cluster) as sampler:
        mixed = env.wrk.run(piglet.port, piglet.headers(), MIXED_CONNECTIONS,
                            SOAK_MAX_SECONDS, MIXED_REQUESTS, MIXED_PATHS)
    time.sleep(LOG_SETTLE_SECONDS)
    by_path = {}
    for method, path, status, ms, rid in piglet.access_log(since):
        if not rid.startswith("bench-"):  # wrk's, not the listing's
            by_path.setdefault(path, []).append((status, ms / 1000))
    bound = POOL_SIZE + 1
    print(f"\nDatabases: {count:,} databases ({created:.1f} s to create), "
          f"{LIST_REQUESTS} x GET /databases in a row, one keep-alive connection")
    print(f"  {'':<44} {'median ms':>9} {'p95 ms':>8}")
    for label, seconds in (
            ("GET /databases at the server (access log)", server_side),
            ("GET /databases at the client", client_side),
            ("bare catalogue query, no sizes", catalogue),
            ("sum(pg_database_size()) over all", sizes)):
        print(f"  {label:<44} {median_ms(seconds):>9.1f} {p95_ms(seconds):>8.1f}")
    print(f"  first GET /databases after Piglet started: {first * 1000:.0f} ms "
          f"(sizes warm; {len(sizes)} sizing runs: "
          + ", ".join(f"{s * 1000:.0f}" for s in sizes) + " ms)")
    print(f"Mixed reads: {mixed.requests:,} requests at {MIXED_CONNECTIONS} connections "
          f"over {len(MIXED_PATHS)} paths, {mixed.rate:,.0f} req/s, "
          f"p50 {mixed.p50_ms:.1f} ms, p99 {mixed.p99_ms:.1f} ms, {mixed.errors} errors")
    print(f"  {'at the server':<24} {'requests':>8} {'non-200':>7} {'median ms':>9} "
          f"{'p99 ms':>8}")
    for path in MIXED_PATHS:
        seen = by_path.get(path, [])
        times = [seconds for _, seconds in seen] or [0.0]
        print(f"  {path:<24} {len(seen):>8,} {sum(s != 200 for s, _ in seen):>7} "
              f"{median_ms(times):>9.1f} {percentile(times, 99) * 1000:>8.1f}")
    most = max(sampler.counts, default=0)
    print(f"  Piglet sessions in pg_stat_activity: at most {most} in "
          f"{len(sampler.counts):,} samples; bound {bound} = postgres.pool_size "
          f"{POOL_SIZE} + 1 for /status's health probe (the size refresher "
          "borrows a pooled session)")
    median = median_ms(server_side)
    return [
        Target(f"GET /databases median at the server, {count:,} databases, "
               f"< {TARGET_LIST_MS:.0f} ms", median < TARGET_LIST_MS, f"{median:.1f} ms"),
        Target(f"Piglet sessions during {mixed.requests:,} mixed reads <= {bound}",
               most <= bound and bool(sampler.counts), f"at most {most}"),
    ]


def create_databases(cluster, count):
    """`count` empty databases copied from template0; the seconds it took."""
    began = time.monotonic()
    with connect(cluster) as conn:
        for number in range(count):
            conn.execute(f"CREATE DATABASE bench_{number:05d} TEMPLATE template0 "
                         "STRATEGY FILE_COPY")
    return time.monotonic() - began


def list_once(client, request_id):
    status, body, seconds = client.request("GET", "/databases", request_id=request_id)
    if status != 200:
        raise BenchError(f"GET /databases answered {status}: {body}")
    return seconds


# ---------------------------------------------------------------------------
# Section backups: a full pgBackRest backup through Piglet and by hand
# ---------------------------------------------------------------------------

PGBENCH_SCALE = 70            # about 1.05 GB (--scale)
BACKUP_ROUNDS = 3             # interleaved pairs; the medians are compared
JOB_POLL_SECONDS = 0.1
STATUS_CONNECTIONS = 10       # wrk on GET /status while a backup runs
ARCHIVE_WAIT_SECONDS = 600    # the WAL pgbench -i wrote must be archived within this
STANZA = "bench"
TARGET_BACKUP_OVERHEAD = 0.05  # Piglet's median over the hand-run median
TARGET_STATUS_P99_MS = 50.0   # GET /status p99 while Piglet's backup runs


class BackupCluster(Cluster):
    """A cluster archiving WAL into a pgBackRest repository of its own,
    configured as install.sh configures the real one: lz4, two processes,
    fast start, two full backups kept."""

    def __init__(self):
        super().__init__()
        self.pgbr_conf = os.path.join(self.base, "pgbackrest.conf")
        self.pgbr_dirs = {name: os.path.join(self.base, "pgbr-" + name)
                          for name in ("repo", "log", "lock", "spool")}
        self.settings += [
            "archive_mode = on",
            f"archive_command = 'pgbackrest --config={self.pgbr_conf} "
            f"--stanza={STANZA} archive-push %p'"]

    def create(self):
        owner = pwd.getpwnam(self.owner)
        for path in self.pgbr_dirs.values():
            os.mkdir(path, 0o750)
            os.chown(path, owner.pw_uid, owner.pw_gid)
        dirs = self.pgbr_dirs
        with open(self.pgbr_conf, "w", encoding="utf-8") as handle:
            handle.write(
                f"[global]\nrepo1-path={dirs['repo']}\nlog-path={dirs['log']}\n"
                f"lock-path={dirs['lock']}\nspool-path={dirs['spool']}\n"
                "repo1-retention-full=2\ncompress-type=lz4\nprocess-max=2\n"
                f"start-fast=y\n\n[{STANZA}]\npg1-path={self.data}\n"
                f"pg1-port={self.port}\npg1-socket-path={self.base}\n")
        os.chmod(self.pgbr_conf, 0o644)
        super().create()
        self.pgbackrest("stanza-create")

    def pgbackrest(self, *args):
        return run_as_pg(["pgbackrest", f"--config={self.pgbr_conf}",
                          f"--stanza={STANZA}", *args], timeout=LONG_TIMEOUT)


def bench_backups(env):
    scale = env.args.scale
    cluster = env.new_cluster(BackupCluster())
    db_size = load_pgbench(cluster, scale)
    piglet = env.new_piglet(cluster, "piglet-backups", {"pgbackrest": {
        "stanza": STANZA, "config": cluster.pgbr_conf, "enabled": True}})
    client = piglet.client()
    warmup = hand_backup(cluster)  # and the page cache holds what the others read
    times = {"piglet": [], "hand": []}
    for round_number in range(BACKUP_ROUNDS):
        order = ("piglet", "hand") if round_number % 2 == 0 else ("hand", "piglet")
        for who in order:
            took = piglet_backup(client) if who == "piglet" else hand_backup(cluster)
            times[who].append(took)
    idle = env.wrk.run(piglet.port, piglet.headers(), STATUS_CONNECTIONS,
                       max(1, round(statistics.median(times["piglet"]))))
    loaded, loaded_took = status_during_backup(env, piglet, client)
    client.close()
    dump_took, dump_size = pg_dump_once(cluster)
    repo_size = tree_size(cluster.pgbr_dirs["repo"])
    ours, by_hand = statistics.median(times["piglet"]), statistics.median(times["hand"])
    overhead = ours / by_hand - 1
    print(f"\nBackups: pgbench scale {scale} ({mb(db_size)} database), "
          "pgBackRest full backups, lz4, process-max 2; Piglet = POST /backups "
          f"until its job reads succeeded (polled every {JOB_POLL_SECONDS} s)")
    print(f"  {'round':>5} {'Piglet s':>9} {'by hand s':>9}")
    for number in range(BACKUP_ROUNDS):
        print(f"  {number + 1:>5} {times['piglet'][number]:>9.2f} "
              f"{times['hand'][number]:>9.2f}")
    print(f"  {'median':>5} {ours:>9.2f} {by_hand:>9.2f}   Piglet/hand {overhead:+.1%} "
          f"(unmeasured warm-up by hand: {warmup:.2f} s)")
    print(f"GET /status at {STATUS_CONNECTIONS} connections (wrk): idle p99 "
          f"{idle.p99_ms:.1f} ms ({idle.rate:,.0f} req/s); during a Piglet backup p99 "
          f"{loaded.p99_ms:.1f} ms, max {loaded.max_ms:.1f} ms ({loaded.rate:,.0f} req/s, "
          f"{loaded.errors} errors), that backup {loaded_took:.2f} s")
    print(f"pg_dump -Fc of the same database: {dump_took:.2f} s, {mb(dump_size)}; "
          f"pgBackRest repository now {mb(repo_size)}")
    return [
        Target(f"full backup through Piglet <= {TARGET_BACKUP_OVERHEAD:.0%} longer "
               "than by hand (medians)", overhead <= TARGET_BACKUP_OVERHEAD,
               f"{overhead:+.1%} ({ours:.2f} s vs {by_hand:.2f} s)"),
        Target(f"GET /status p99 during a Piglet backup < {TARGET_STATUS_P99_MS:.0f} ms",
               loaded.p99_ms < TARGET_STATUS_P99_MS and not loaded.errors,
               f"{loaded.p99_ms:.1f} ms, {loaded.errors} errors"),
    ]


def load_pgbench(cluster, scale):
    """pgbench -i into database `pgbench`, all its WAL archived; its size."""
    with connect(cluster) as conn:
        conn.execute("CREATE DATABASE pgbench")
    run_as_pg([f"{cluster.bin}/pgbench", "-i", "-q", "-s", str(scale), "-h", cluster.base,
               "-p", str(cluster.port), "-U", "postgres", "pgbench"], timeout=LONG_TIMEOUT)
    with connect(cluster) as conn:
        # Else the first backup's immediate checkpoint writes pgbench's pages.
        conn.execute("CHECKPOINT")
        wait_archived(conn)
        return conn.execute("SELECT pg_database_size('pgbench')").fetchone()[0]


def wait_archived(conn):
    """Until the archive holds every WAL segment written so far."""
    conn.execute("SELECT txid_current()")
    segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    deadline = time.monotonic() + ARCHIVE_WAIT_SECONDS
    while time.monotonic() < deadline:
        archived = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
        if archived and archived[:24] >= segment:
            return
        time.sleep(0.2)
    raise BenchError(f"WAL segment {segment} was not archived within "
                     f"{ARCHIVE_WAIT_SECONDS} s")


def hand_backup(cluster):
    began = time.monotonic()
    cluster.pgbackrest("backup", "--type=full")
    return time.monotonic() - began


def piglet_backup(client):
    """Seconds from POST /backups until the job reads succeeded."""
    began = time.monotonic()
    status, body, _ = client.request("POST", "/backups", {"type": "full"})
    if status != 202:
        raise BenchError(f"POST /backups answered {status}: {body}")
    job_id = body["job"]["id"]
    while time.monotonic() - began < LONG_TIMEOUT:
        time.sleep(JOB_POLL_SECONDS)
        status, body, _ = client.request("GET", f"/jobs/{job_id}")
        job = body["job"] if status == 200 else {}
        if job.get("state") == "succeeded":
            return time.monotonic() - began
        if job.get("state") not in ("queued", "running"):
            raise BenchError(f"backup job {job_id}: {status} {body}")
    raise BenchError(f"backup job {job_id} did not finish within {LONG_TIMEOUT} s")


def status_during_backup(env, piglet, client):
    """wrk on GET /status for exactly one Piglet backup: its result and the
    backup's seconds.  Apart from the timed rounds, whose comparison a
    second load on a small machine would blur."""
    proc = env.wrk.start(piglet.port, piglet.headers(), STATUS_CONNECTIONS, LONG_TIMEOUT)
    try:
        took = piglet_backup(client)
        return env.wrk.stop(proc), took
    finally:
        stop_process(proc, timeout=5)


def pg_dump_once(cluster):
    """Seconds for pg_dump -Fc of the pgbench database, and the file's size."""
    path = os.path.join(cluster.base, "pgbench.dump")
    began = time.monotonic()
    run_as_pg([f"{cluster.bin}/pg_dump", "-Fc", "-h", cluster.base, "-p", str(cluster.port),
               "-U", "postgres", "-f", path, "pgbench"], timeout=LONG_TIMEOUT)
    took = time.monotonic() - began
    size = os.path.getsize(path)
    os.remove(path)
    return took, size


# ---------------------------------------------------------------------------
# Section snapshots: a workspace of ~1 GB in 10,000 files
# ---------------------------------------------------------------------------

SNAP_FILES = 10_000           # files in the workspace, in 100 directories
SNAP_TOTAL_BYTES = 1 << 30    # their total size, sizes spread 1 byte .. 2x mean
SNAP_CHANGED_SHARE = 0.01     # files rewritten before the second snapshot
SNAP_CHANGED_BYTES = 4096     # bytes rewritten at the start of each of them
SNAP_JOB_TIMEOUT = 1800       # seconds for one snapshot or restore job
SNAP_POLL_SECONDS = 0.05

TARGET_SNAP2_TIME = 0.15      # second snapshot's time vs the first's
TARGET_SNAP2_DISK = 0.05      # second snapshot's disk added vs the first's
TARGET_RESTORE_TIME = 0.25    # restore of an unchanged workspace vs first snapshot


def tree_size(root):
    return sum(os.lstat(os.path.join(folder, name)).st_size
               for folder, _, names in os.walk(root) for name in names)


def bench_snapshots(env):
    # A fresh directory: on an ext4 without a journal, recreating many
    # just-deleted inodes is slow and would be measured instead.
    base = tempfile.mkdtemp(prefix="snapshots-", dir=env.workdir)
    ws, store = os.path.join(base, "ws"), os.path.join(base, "store")
    scale = 10 if env.args.quick else 1
    files, size = make_snapshot_workspace(ws, SNAP_FILES // scale,
                                          SNAP_TOTAL_BYTES // scale)
    piglet = snapshot_piglet(env, base, ws, store)
    os.sync()  # the workspace's own write-back is not the snapshot's cost
    rows = []
    first = timed_job(piglet, "/api/v1/snapshots", {"name": "first"})
    rows.append(("first snapshot", first, disk_used(store)))
    changed = change_some_files(files)
    os.sync()
    second = timed_job(piglet, "/api/v1/snapshots", {"name": "second"})
    rows.append((f"second, after changing {changed} files", second,
                 disk_used(store) - rows[0][2]))
    restore = timed_job(piglet, "/api/v1/snapshots/second/restore", None)
    rows.append(("restore of the unchanged workspace", restore,
                 disk_used(store) - rows[0][2] - rows[1][2]))
    print_snapshot_table(len(files), size, rows)
    return snapshot_targets(rows)


def make_snapshot_workspace(ws, count, total_bytes):
    """`count` random files of about `total_bytes` in all: (paths, bytes)."""
    rng = random.Random(42)
    mean = total_bytes // count
    paths, total = [], 0
    for index in range(count):
        directory = os.path.join(ws, f"d{index % 100:02d}")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"f{index:05d}.bin")
        size = rng.randint(1, 2 * mean)
        with open(path, "wb") as handle:
            handle.write(rng.randbytes(size))
        paths.append(path)
        total += size
    return paths, total


def change_some_files(paths):
    rng = random.Random(7)
    chosen = rng.sample(paths, int(len(paths) * SNAP_CHANGED_SHARE))
    for path in chosen:
        with open(path, "r+b") as handle:
            handle.write(rng.randbytes(SNAP_CHANGED_BYTES))
    return len(chosen)


def snapshot_piglet(env, base, ws, store):
    piglet = Piglet(env.cluster(), os.path.join(base, "piglet"))
    os.makedirs(piglet.dir)
    piglet.config["snapshots"] = {"dir": store, "paths": [ws], "stop_services": []}
    piglet.config["pgbackrest"] = {"enabled": False}
    env.stack.callback(piglet.stop)
    piglet.start()
    return piglet


def timed_job(piglet, path, body):
    """Seconds from the POST to the job's end, polling its status."""
    started = time.monotonic()
    status, reply = api_call(piglet, "POST", path, body)
    if status != 202:
        raise BenchError(f"POST {path}: {status} {reply}")
    job_path = f"/api/v1/jobs/{reply['job']['id']}"
    while time.monotonic() - started < SNAP_JOB_TIMEOUT:
        status, reply = api_call(piglet, "GET", job_path, None)
        state = reply["job"]["state"]
        if state == "succeeded":
            return time.monotonic() - started
        if state == "failed":
            raise BenchError(f"job {job_path} failed: {reply['job']['error']}")
        time.sleep(SNAP_POLL_SECONDS)
    raise BenchError(f"job {job_path} still running after {SNAP_JOB_TIMEOUT} s")


def api_call(piglet, method, path, body):
    headers = dict(piglet.headers())
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", piglet.port, timeout=30)
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def disk_used(root):
    """Bytes of disk under root, each inode once however many links it has."""
    seen, total = set(), 0
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            st = os.lstat(os.path.join(directory, name) if name else directory)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def print_snapshot_table(count, size, rows):
    print(f"\nSnapshots: a workspace of {count:,} files, {mb(size)}; "
          "logical dump of a near-empty cluster")
    print(f"  {'step':<42} {'time':>9} {'disk added':>12}")
    for label, seconds, disk in rows:
        print(f"  {label:<42} {seconds:>7.2f} s {mb(disk):>12}")


def snapshot_targets(rows):
    (_, t1, d1), (_, t2, d2), (_, t3, _) = rows
    return [
        Target(f"second snapshot < {TARGET_SNAP2_TIME:.0%} of the first's time",
               t2 < TARGET_SNAP2_TIME * t1, f"{t2 / t1:.1%} ({t2:.2f} s / {t1:.2f} s)"),
        Target(f"second snapshot adds < {TARGET_SNAP2_DISK:.0%} of the first's disk",
               d2 < TARGET_SNAP2_DISK * d1, f"{d2 / d1:.2%} ({mb(d2)} / {mb(d1)})"),
        Target(f"restore of an unchanged workspace < {TARGET_RESTORE_TIME:.0%} "
               "of the first snapshot's time",
               t3 < TARGET_RESTORE_TIME * t1, f"{t3 / t1:.1%} ({t3:.2f} s)"),
    ]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

SECTIONS = {"http": bench_http, "databases": bench_databases,
            "backups": bench_backups, "snapshots": bench_snapshots}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_POINT_SECONDS} s per point instead of "
                        f"{POINT_SECONDS} s; a tenth of the snapshot workspace")
    parser.add_argument("--databases", type=positive, default=DATABASES, metavar="N",
                        help=f"databases for section databases (default {DATABASES})")
    parser.add_argument("--scale", type=positive, default=PGBENCH_SCALE, metavar="N",
                        help="pgbench scale for section backups (default "
                        f"{PGBENCH_SCALE}, about 1 GB)")
    parser.add_argument("--only", type=parse_sections, default=list(SECTIONS),
                        metavar="SECTION[,SECTION]",
                        help="run only these sections: " + ", ".join(SECTIONS))
    return parser.parse_args(argv)


def positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def parse_sections(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(SECTIONS)}")
    return names


def on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the same orderly cleanup as Ctrl-C


def run(args):
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"piglet benchmarks: {', '.join(args.only)}; {os.cpu_count()} CPUs, "
          f"load average {load}")
    env = Env(args)
    try:
        targets = []
        for name in args.only:
            targets += SECTIONS[name](env)
    finally:
        env.close()
    print("\nTargets")
    for target in targets:
        print(target.line())


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    # Even when started with SIGINT ignored (a background job), so that
    # `kill -INT` cleans up like Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run(args)
    except BenchError as exc:
        print(f"bench_piglet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_piglet: interrupted; everything it started is removed",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
