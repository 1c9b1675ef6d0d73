#!/usr/bin/python3
"""Piglet: a REST control daemon for a one-machine PostgreSQL appliance.

Piglet serves a JSON API under /api/v1 from the standard library's
ThreadingHTTPServer.  It reports the machine's health, manages databases,
roles, backups, services and workspace snapshots, and runs long work as
tracked jobs.  Its only dependency beyond the standard library is psycopg 3.

Run:
    piglet.py serve [--config PATH]
    piglet.py key create --name NAME [--scope admin|read] [--config PATH]
    piglet.py key list [--config PATH]
    piglet.py key revoke --name NAME [--config PATH]

The configuration is JSON: --config, else $PIGLET_CONFIG, else
/etc/piglet/piglet.json.  Every field has a default (see DEFAULT_CONFIG and
the README); an unknown field or a wrong type stops start-up.

Privileges: the daemon runs as root because it drives systemctl and owns
restores; every PostgreSQL tool (pg_dump, pgbackrest, pg_ctl) runs as the
cluster's OS user, never as root.

Known limitations:
- The rate limiter and the last-used times of keys live in memory; a
  restart refills every bucket and last-used times are flushed to the keys
  file at most once a minute.
"""

import argparse
import base64
import contextlib
import copy
import email.utils
import fcntl
import hashlib
import hmac
import http.server
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from http import HTTPStatus

import psycopg
from psycopg import sql

# ---------------------------------------------------------------------------
# Constants and timeouts
# ---------------------------------------------------------------------------

VERSION = "0.1.0"
API_PREFIX = "/api/v1"
DEFAULT_CONFIG_PATH = "/etc/piglet/piglet.json"

KEEPALIVE_IDLE_SECONDS = 15    # an idle keep-alive connection is closed after this
HEADER_DEADLINE_SECONDS = 10   # request line + headers must arrive within this
BODY_DEADLINE_SECONDS = 30     # the body must arrive within this
WORK_SLOT_WAIT_SECONDS = 10    # a request waits this long for a free worker slot
SHUTDOWN_GRACE_SECONDS = 10    # SIGTERM waits this long for in-flight requests
LISTEN_BACKLOG = 128           # the stdlib's 5 causes SYN retransmits under load
POOL_WAIT_SECONDS = 5          # waiting for a pooled PostgreSQL connection
HEALTH_CACHE_SECONDS = 1.0     # /status reuses a PostgreSQL probe this long
SERVICE_CACHE_SECONDS = 2.0    # and a service state reading this long
SERVICE_ACTION_TIMEOUT = 120   # start/stop/restart of one unit
SUBPROCESS_TIMEOUT = 30        # short helper commands (systemctl show, status)
KEY_FLUSH_SECONDS = 60         # last_used_at is written back this often
LOG_TAIL_LINES = 40            # lines of tool output kept in a job

KEY_PREFIX = "pgl_"
SCOPES = ("admin", "read")
OBJECT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

log = logging.getLogger("piglet")

# ---------------------------------------------------------------------------
# Errors: one type per contract code; the dispatcher renders them
# ---------------------------------------------------------------------------


class ApiError(Exception):
    """An error the client sees as the JSON envelope."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "INTERNAL_ERROR"

    def __init__(self, message, details=None, headers=None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self):
        return {"error": {"code": self.code, "message": self.message,
                          "details": self.details}}


class BadRequest(ApiError):
    status, code = HTTPStatus.BAD_REQUEST, "BAD_REQUEST"


class Unauthorized(ApiError):
    status, code = HTTPStatus.UNAUTHORIZED, "UNAUTHORIZED"

    def __init__(self, message, details=None):
        super().__init__(message, details, {"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status, code = HTTPStatus.FORBIDDEN, "FORBIDDEN"


class NotFound(ApiError):
    status, code = HTTPStatus.NOT_FOUND, "NOT_FOUND"


class MethodNotAllowed(ApiError):
    status, code = HTTPStatus.METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"

    def __init__(self, allowed):
        super().__init__("Method not allowed on this path",
                         {"allowed": allowed}, {"Allow": ", ".join(allowed)})


class Conflict(ApiError):
    status, code = HTTPStatus.CONFLICT, "CONFLICT"


class PayloadTooLarge(ApiError):
    status, code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(ApiError):
    status, code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE"


class RateLimited(ApiError):
    status, code = HTTPStatus.TOO_MANY_REQUESTS, "RATE_LIMITED"


class Unavailable(ApiError):
    status, code = HTTPStatus.SERVICE_UNAVAILABLE, "UNAVAILABLE"

    def __init__(self, message, dependency, details=None):
        super().__init__(message, dict(details or {}, dependency=dependency))


class ConfigError(Exception):
    """The configuration cannot be used; the message names the field."""


# ---------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------


def utc_iso(timestamp):
    """RFC 3339 in UTC with a Z suffix, whole seconds; None stays None."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def human_size(size):
    """Powers of 1024; one decimal below 10, none from 10 up, never '.0'."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        rounded = round(value, 1) if value < 10 else round(value)
        if rounded < 1024 or unit == "PB":
            text = f"{rounded:.1f}" if rounded < 10 else f"{rounded:.0f}"
            return text.removesuffix(".0") + unit
        value /= 1024
    raise AssertionError("unreachable")


def atomic_write(path, data, mode=0o600):
    """Write bytes to path so that readers see the old or the new file whole."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path, obj, mode=0o600):
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def check_object_name(name, what):
    """Names that become file or key names: 1-63 of [A-Za-z0-9._-]."""
    if not isinstance(name, str) or not OBJECT_NAME_RE.match(name):
        raise BadRequest(f"Invalid {what} name: 1 to 63 characters of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit", {"field": what, "value": name})


def redact_dsn(dsn):
    """The DSN as it may be logged: any password replaced."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return psycopg.conninfo.make_conninfo(**params)


class TtlCache:
    """One value recomputed at most every `ttl` seconds, one caller at a time."""

    def __init__(self, ttl, compute):
        self.ttl, self.compute = ttl, compute
        self._lock = threading.Lock()
        self._value, self._stamp = None, -math.inf

    def get(self):
        with self._lock:
            if time.monotonic() - self._stamp >= self.ttl:
                self._value = self.compute()
                self._stamp = time.monotonic()
            return self._value

    def invalidate(self):
        with self._lock:
            self._stamp = -math.inf


def run_command(argv, user=None, timeout=SUBPROCESS_TIMEOUT, env=None):
    """Run an argument list (never a shell string), as `user` when given.

    Returns CompletedProcess with text output; a timeout raises
    subprocess.TimeoutExpired after killing the child.
    """
    kwargs = {}
    if user is not None and user != current_user():
        kwargs.update(user=user, group=primary_group(user), extra_groups=[])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL, cwd="/", **kwargs)


def current_user():
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


def primary_group(user):
    import pwd
    return pwd.getpwnam(user).pw_gid


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

DEFAULT_CONFIG = {
    "listen": "127.0.0.1",
    "port": 8910,
    "keys_file": "/etc/piglet/keys.json",
    "state_dir": "/var/lib/piglet",
    "tls": {"cert": None, "key": None},
    "rate_limit": {"per_minute": 100, "burst": 20},
    "max_body_bytes": 1048576,
    "max_connections": 512,
    "workers": 16,
    "log_level": "INFO",
    "postgres": {
        "dsn": "host=/var/run/postgresql port=5432 dbname=postgres user=piglet",
        "os_user": "postgres",
        "service": "postgres",
        "connect_timeout": 5,
        "statement_timeout_ms": 30000,
        "pool_size": 8,
    },
    "pgbackrest": {"stanza": "main", "config": "/etc/pgbackrest/pgbackrest.conf",
                   "enabled": True},
    "backups": {"dir": "/var/lib/piglet/backups"},
    "snapshots": {"dir": "/var/lib/piglet/snapshots", "paths": [], "stop_services": []},
    "services": {
        "postgres": {"unit": "postgresql@15-main", "port": 5432},
        "vscode": {"unit": "code-server@root", "port": 8080},
        "jupyter": {"unit": "jupyter", "port": 8888},
    },
}

# Fields whose default is null take a string or null.
NULLABLE_STRINGS = {"tls.cert", "tls.key"}
SERVICE_FIELDS = {"unit": str, "port": int, "start": list, "stop": list,
                  "status": list, "user": str}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def type_name(kind):
    return {str: "a string", int: "an integer", bool: "a boolean", list: "a list",
            dict: "an object", float: "a number"}[kind]


def check_type(field, value, kind):
    # bool is a subclass of int in Python; a JSON true is not a port number.
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"config field {field!r} must be {type_name(kind)}")


def merge_config(defaults, given, prefix=""):
    """Defaults overlaid by the given JSON, checking names and types."""
    if not isinstance(given, dict):
        raise ConfigError(f"config {prefix.rstrip('.') or 'file'!r} must be an object")
    merged = copy.deepcopy(defaults)
    for name, value in given.items():
        field = prefix + name
        if name not in defaults:
            raise ConfigError(f"unknown config field {field!r}")
        default = defaults[name]
        if field == "services":
            merged[name] = check_services(value)
        elif isinstance(default, dict):
            merged[name] = merge_config(default, value, field + ".")
        elif field in NULLABLE_STRINGS:
            if value is not None:
                check_type(field, value, str)
            merged[name] = value
        else:
            check_type(field, value, type(default))
            if isinstance(default, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"config field {field!r} must be a list of strings")
            merged[name] = value
    return merged


def check_services(services):
    if not isinstance(services, dict):
        raise ConfigError("config field 'services' must be an object")
    for name, entry in services.items():
        field = f"services.{name}"
        if not OBJECT_NAME_RE.match(name):
            raise ConfigError(f"config field {field!r}: invalid service name")
        check_type(field, entry, dict)
        for key, value in entry.items():
            if key not in SERVICE_FIELDS:
                raise ConfigError(f"unknown config field {field + '.' + key!r}")
            check_type(f"{field}.{key}", value, SERVICE_FIELDS[key])
        if ("unit" in entry) == ("status" in entry):
            raise ConfigError(f"config field {field!r} needs either 'unit' or "
                              "'start', 'stop' and 'status'")
        if "status" in entry and not ("start" in entry and "stop" in entry):
            raise ConfigError(f"config field {field!r} needs 'start' and 'stop' too")
    return services


def check_config_values(config):
    if not 0 <= config["port"] <= 65535:
        raise ConfigError("config field 'port' must be between 0 and 65535")
    for field in ("rate_limit.per_minute", "rate_limit.burst", "max_body_bytes",
                  "max_connections", "workers", "postgres.pool_size"):
        section, _, name = field.rpartition(".")
        value = config[section][name] if section else config[name]
        if value < 1:
            raise ConfigError(f"config field {field!r} must be at least 1")
    if config["log_level"] not in LOG_LEVELS:
        raise ConfigError(f"config field 'log_level' must be one of {', '.join(LOG_LEVELS)}")
    if bool(config["tls"]["cert"]) != bool(config["tls"]["key"]):
        raise ConfigError("config fields 'tls.cert' and 'tls.key' go together")
    if config["postgres"]["service"] not in config["services"]:
        log.warning("postgres.service %r names no entry in 'services'",
                    config["postgres"]["service"])


def load_config(path):
    """Read and check the config file; a missing file means all defaults."""
    try:
        with open(path, encoding="utf-8") as handle:
            given = json.load(handle)
    except FileNotFoundError:
        if path != DEFAULT_CONFIG_PATH:
            raise ConfigError(f"config file {path} does not exist") from None
        given = {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    config = merge_config(DEFAULT_CONFIG, given)
    check_config_values(config)
    return config


def config_path(explicit):
    return explicit or os.environ.get("PIGLET_CONFIG") or DEFAULT_CONFIG_PATH


# ---------------------------------------------------------------------------
# API keys and rate limits
# ---------------------------------------------------------------------------


def hash_secret(secret):
    # Secrets carry 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyStore:
    """The keys file: a JSON list of {name, scope, hash, created_at, last_used_at}.

    Every read checks the file's identity (inode, size, mtime) and reloads
    it when it changed, so `piglet.py key ...` takes effect in a running
    daemon at once.  Writers hold an flock on a side file and replace the
    keys file atomically.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._signature = None
        self._keys = []
        self._used = {}
        self._flushed = time.monotonic()

    # -- reading -------------------------------------------------------------
    def _read_file(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return []
        return data.get("keys", [])

    def _refresh(self):
        try:
            stat = os.stat(self.path)
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        if signature != self._signature:
            self._keys = self._read_file()
            self._signature = signature

    def authenticate(self, secret):
        """The key record whose secret this is, or None; constant-time per key."""
        digest = hash_secret(secret)
        found = None
        with self._lock:
            self._refresh()
            for record in self._keys:
                # Compare with every key, no early exit: timing reveals nothing.
                if hmac.compare_digest(record["hash"], digest):
                    found = record
            if found is not None:
                self._used[found["name"]] = time.time()
        return found

    def list(self):
        with self._lock:
            self._refresh()
            used = dict(self._used)
            return [self._public(k, used) for k in sorted(self._keys, key=lambda k: k["name"])]

    @staticmethod
    def _public(record, used=None):
        last = (used or {}).get(record["name"])
        return {"name": record["name"], "scope": record["scope"],
                "created_at": record["created_at"],
                "last_used_at": utc_iso(last) if last else record.get("last_used_at")}

    # -- writing -------------------------------------------------------------
    @contextlib.contextmanager
    def _locked_file(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        with open(self.path + ".lock", "a") as lock_handle:
            fcntl.flock(lock_handle, fcntl.LOCK_EX)
            keys = self._read_file()
            yield keys
            atomic_write_json(self.path, {"keys": keys})

    def create(self, name, scope):
        check_object_name(name, "key")
        if scope not in SCOPES:
            raise BadRequest("scope must be admin or read",
                             {"field": "scope", "allowed": list(SCOPES)})
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = {"name": name, "scope": scope, "hash": hash_secret(secret),
                  "created_at": utc_iso(time.time()), "last_used_at": None}
        with self._locked_file() as keys:
            if any(k["name"] == name for k in keys):
                raise Conflict("A key with this name exists", {"key": name})
            keys.append(record)
        return secret, self._public(record)

    def revoke(self, name):
        with self._locked_file() as keys:
            remaining = [k for k in keys if k["name"] != name]
            if len(remaining) == len(keys):
                raise NotFound("Key not found", {"key": name})
            keys[:] = remaining
        with self._lock:
            self._used.pop(name, None)

    def flush_last_used(self, force=False):
        """Write in-memory last-used times back, at most once a minute."""
        with self._lock:
            due = force or time.monotonic() - self._flushed >= KEY_FLUSH_SECONDS
            if not due or not self._used:
                return
            used, self._used = self._used, {}
            self._flushed = time.monotonic()
        with self._locked_file() as keys:
            for record in keys:
                if record["name"] in used:
                    record["last_used_at"] = utc_iso(used[record["name"]])


class RateLimiter:
    """Token buckets: `burst` tokens, refilled at per_minute/60 a second.

    A rejected request takes no token; tokens stay within [0, burst].
    """

    MAX_BUCKETS = 10000   # full buckets are dropped past this, bounding memory

    def __init__(self, per_minute, burst):
        self.per_minute, self.burst = per_minute, burst
        self.rate = per_minute / 60.0
        self._lock = threading.Lock()
        self._buckets = {}  # identity -> [tokens, monotonic stamp]

    def take(self, identity):
        """Returns (allowed, headers) for one request by `identity`."""
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - stamp) * self.rate)
            allowed = tokens >= 1
            if allowed:
                tokens -= 1
            self._buckets[identity] = [tokens, now]
            if len(self._buckets) > self.MAX_BUCKETS:
                self._drop_full(now)
        return allowed, self._headers(tokens, allowed)

    def _headers(self, tokens, allowed):
        full_in = (self.burst - tokens) / self.rate
        headers = {"X-RateLimit-Limit": str(self.per_minute),
                   "X-RateLimit-Remaining": str(int(tokens)),
                   "X-RateLimit-Reset": str(math.ceil(time.time() + full_in))}
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil((1 - tokens) / self.rate)))
        return headers

    def _drop_full(self, now):
        for identity, (tokens, stamp) in list(self._buckets.items()):
            if tokens + (now - stamp) * self.rate >= self.burst:
                del self._buckets[identity]


# ---------------------------------------------------------------------------
# PostgreSQL: a small bounded pool and a cached health probe
# ---------------------------------------------------------------------------


def postgres_unavailable(exc):
    return Unavailable(f"PostgreSQL is unreachable: {first_line(exc)}", "postgres")


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Database:
    """At most `pool_size` sessions, reused; broken ones are dropped.

    Sessions run in autocommit; multi-statement work wraps itself in
    `conn.transaction()`, so no session is ever returned inside a failed
    transaction.
    """

    def __init__(self, pg_config):
        self.dsn = pg_config["dsn"]
        self.size = pg_config["pool_size"]
        self.connect_timeout = pg_config["connect_timeout"]
        self.statement_timeout_ms = pg_config["statement_timeout_ms"]
        self._idle = []
        self._open = 0
        self._cond = threading.Condition()
        self.health = TtlCache(HEALTH_CACHE_SECONDS, self._probe)

    def connect(self, dbname=None, timeout=None):
        """A new session outside the pool (e.g. on another database)."""
        extra = {"dbname": dbname} if dbname else {}
        try:
            return psycopg.connect(
                self.dsn, autocommit=True, application_name="piglet",
                connect_timeout=timeout or self.connect_timeout,
                options=f"-c statement_timeout={self.statement_timeout_ms}", **extra)
        except psycopg.OperationalError as exc:
            raise postgres_unavailable(exc) from None

    def _checkout(self):
        deadline = time.monotonic() + POOL_WAIT_SECONDS
        with self._cond:
            while not self._idle and self._open >= self.size:
                if not self._cond.wait(deadline - time.monotonic()):
                    raise Unavailable("All PostgreSQL sessions are busy", "postgres")
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self.connect()
        except BaseException:
            self._release(None)
            raise

    def _release(self, conn):
        reusable = (conn is not None and not conn.closed and not conn.broken
                    and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)
        with self._cond:
            if reusable:
                self._idle.append(conn)
            else:
                self._open -= 1
            self._cond.notify()
        if conn is not None and not reusable:
            conn.close()

    @contextlib.contextmanager
    def connection(self):
        conn = self._checkout()
        try:
            yield conn
        except psycopg.OperationalError as exc:
            conn.close()
            raise postgres_unavailable(exc) from None
        finally:
            self._release(conn)

    def query(self, statement, params=None):
        """All rows of one statement as dicts."""
        with self.connection() as conn:
            with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []

    def _probe(self):
        try:
            return self.query("SELECT current_setting('server_version') AS version, "
                              "current_setting('data_directory') AS data_dir")[0]
        except (ApiError, psycopg.Error):
            return None

    def close(self):
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.close()


# ---------------------------------------------------------------------------
# Services: systemd units, or explicit commands where systemd is absent
# ---------------------------------------------------------------------------

SERVICE_ACTIONS = ("start", "stop", "restart")
SYSTEMD_PROPERTIES = ("Id", "LoadState", "ActiveState", "SubState", "MainPID",
                      "ActiveEnterTimestamp", "UnitFileState")
ACTIVE_STATE_STATUS = {"active": "running", "reloading": "running", "inactive": "stopped",
                       "failed": "failed", "activating": "starting",
                       "deactivating": "stopping"}


def systemd_running():
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    return os.path.isdir("/run/systemd/system")


def systemctl(*args, timeout=SUBPROCESS_TIMEOUT):
    if not systemd_running():
        raise Unavailable("systemd is not running on this host", "systemd")
    try:
        return run_command(["systemctl", *args], timeout=timeout)
    except FileNotFoundError:
        raise Unavailable("systemctl is not installed", "systemd") from None
    except subprocess.TimeoutExpired:
        raise Unavailable(f"systemctl {args[0]} timed out", "systemd") from None


def parse_systemctl_show(text):
    """`systemctl show` output for several units: blocks split by blank lines."""
    units, current = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                units.append(current)
            current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    return units


def systemd_timestamp(value):
    # With --timestamp=unix systemd prints "@<seconds>"; empty when never entered.
    if value.startswith("@") and value[1:].isdigit() and int(value[1:]) > 0:
        return utc_iso(int(value[1:]))
    return None


def systemd_service_object(name, entry, props):
    load_state = props.get("LoadState", "")
    status = ACTIVE_STATE_STATUS.get(props.get("ActiveState"), "unknown")
    if load_state != "loaded":
        status = "unknown"
    pid = int(props.get("MainPID") or 0)
    service = {"name": name, "status": status, "port": entry.get("port"),
               "unit": entry["unit"],
               "enabled": props.get("UnitFileState") in ("enabled", "enabled-runtime"),
               "pid": pid or None,
               "since": systemd_timestamp(props.get("ActiveEnterTimestamp", "")),
               "load_state": load_state, "active_state": props.get("ActiveState"),
               "sub_state": props.get("SubState")}
    return service


def command_service_object(name, entry):
    """A service defined by start/stop/status argument lists (no systemd)."""
    try:
        code = run_command(entry["status"], user=entry.get("user")).returncode
        status = {0: "running", 3: "stopped", 4: "unknown"}.get(code, "failed")
    except (OSError, subprocess.SubprocessError):
        status = "unknown"
    return {"name": name, "status": status, "port": entry.get("port"), "unit": None,
            "enabled": None, "pid": None, "since": None}


class Services:
    """The services named in the config, and nothing else."""

    def __init__(self, entries):
        self.entries = entries
        self._cache = TtlCache(SERVICE_CACHE_SECONDS, self._read_all)
        self._action_lock = threading.Lock()

    def entry(self, name):
        if name not in self.entries:
            raise NotFound("Service not found", {"service": name})
        return self.entries[name]

    def _read_all(self):
        units = {n: e for n, e in self.entries.items() if "unit" in e}
        found = {}
        if units:
            found.update(self._read_systemd(units))
        for name, entry in self.entries.items():
            if "unit" not in entry:
                found[name] = command_service_object(name, entry)
        return found

    def _read_systemd(self, units):
        # One systemctl call for every unit: a process per unit per request is
        # what makes status endpoints slow.
        try:
            result = systemctl("show", "--timestamp=unix",
                               "-p", ",".join(SYSTEMD_PROPERTIES),
                               *[e["unit"] for e in units.values()])
        except Unavailable:
            return {n: dict(systemd_service_object(n, e, {}), load_state="no-systemd")
                    for n, e in units.items()}
        blocks = parse_systemctl_show(result.stdout)
        by_unit = {b.get("Id"): b for b in blocks}
        objects = {}
        for index, (name, entry) in enumerate(units.items()):
            props = by_unit.get(entry["unit"])
            if props is None and index < len(blocks):
                props = blocks[index]  # aliases report their real Id
            objects[name] = systemd_service_object(name, entry, props or {})
        return objects

    def all(self):
        return self._cache.get()

    def get(self, name):
        self.entry(name)
        return self.all()[name]

    def act(self, name, action):
        """Run start/stop/restart and return the settled service object."""
        entry = self.entry(name)
        with self._action_lock:
            if "unit" in entry:
                self._act_systemd(entry["unit"], action)
            else:
                self._act_command(name, entry, action)
            self._cache.invalidate()
        log.info("service %s: %s done", name, action)
        return self.get(name)

    @staticmethod
    def _act_systemd(unit, action):
        result = systemctl(action, unit, timeout=SERVICE_ACTION_TIMEOUT)
        if result.returncode != 0:
            raise Conflict(f"systemctl {action} {unit} failed: "
                           f"{result.stderr.strip() or result.returncode}",
                           {"service": unit, "action": action})

    @staticmethod
    def _act_command(name, entry, action):
        steps = ["stop", "start"] if action == "restart" else [action]
        for step in steps:
            try:
                result = run_command(entry[step], user=entry.get("user"),
                                     timeout=SERVICE_ACTION_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise Conflict(f"{step} of {name} timed out", {"service": name}) from None
            if result.returncode != 0 and not (step == "stop" and action == "restart"):
                raise Conflict(f"{step} of {name} failed: "
                               f"{(result.stderr or result.stdout).strip()[-400:]}",
                               {"service": name, "action": action})


# ---------------------------------------------------------------------------
# Jobs: long work in threads, recorded on disk
# ---------------------------------------------------------------------------

JOB_FIELDS = ("id", "kind", "state", "created_at", "started_at", "finished_at",
              "progress", "request", "result", "error", "log_tail")


class Job:
    """One long operation.  The worker function reports through this."""

    def __init__(self, manager, job_id, kind, request):
        self.manager = manager
        self.data = dict.fromkeys(JOB_FIELDS)
        self.data.update(id=job_id, kind=kind, state="queued", request=request,
                         created_at=utc_iso(time.time()), log_tail=[])

    @property
    def id(self):
        return self.data["id"]

    def log(self, line):
        """Keep a line of tool output (the caller masks any secret)."""
        with self.manager.lock:
            tail = self.data["log_tail"]
            tail.append(line.rstrip()[:500])
            del tail[:-LOG_TAIL_LINES]

    def set_progress(self, percent):
        with self.manager.lock:
            self.data["progress"] = None if percent is None else max(0, min(100, percent))

    def snapshot(self):
        with self.manager.lock:
            return copy.deepcopy(self.data)


class JobManager:
    """Runs jobs one thread each; cluster-wide jobs one at a time."""

    def __init__(self, state_dir):
        self.dir = os.path.join(state_dir, "jobs")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.lock = threading.RLock()
        self.jobs = {}
        self.exclusive = None   # the cluster-wide job running now, if any
        self._load()

    def _load(self):
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(self.dir, name), encoding="utf-8") as handle:
                data = json.load(handle)
            job = Job(self, data["id"], data["kind"], data["request"])
            job.data.update(data)
            self.jobs[job.id] = job
            if data["state"] in ("queued", "running"):
                self._finish(job, "failed", error={
                    "code": "INTERRUPTED", "message": "Piglet stopped while this job ran",
                    "details": {}})

    def _new_id(self, kind):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:
            job_id = f"{stamp}-{kind}-{secrets.token_hex(3)}"
            if job_id not in self.jobs:
                return job_id

    def _save(self, job):
        atomic_write_json(os.path.join(self.dir, job.id + ".json"), job.data)

    def submit(self, kind, request, work, exclusive=True):
        """Start `work(job)` in a thread; its return value becomes the result."""
        with self.lock:
            if exclusive and self.exclusive is not None:
                running = self.exclusive
                raise Conflict(f"Another operation is running: job {running.id}",
                               {"job": running.id, "kind": running.data["kind"]})
            job = Job(self, self._new_id(kind), kind, request)
            self.jobs[job.id] = job
            if exclusive:
                self.exclusive = job
            self._save(job)
        log.info("job %s %s: queued", job.id, kind)
        threading.Thread(target=self._run, args=(job, work, exclusive),
                         name=f"job-{job.id}", daemon=True).start()
        return job

    def _run(self, job, work, exclusive):
        with self.lock:
            job.data.update(state="running", started_at=utc_iso(time.time()))
            self._save(job)
        log.info("job %s: running", job.id)
        try:
            result = work(job)
        except ApiError as exc:
            self._finish(job, "failed", error=exc.body()["error"])
        except Exception as exc:  # the job reports it; the daemon goes on
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            self._finish(job, "failed", error={"code": "INTERNAL_ERROR",
                                               "message": first_line(exc), "details": {}})
        else:
            self._finish(job, "succeeded", result=result)
        finally:
            if exclusive:
                with self.lock:
                    self.exclusive = None

    def _finish(self, job, state, result=None, error=None):
        with self.lock:
            job.data.update(state=state, result=result, error=error,
                            finished_at=utc_iso(time.time()))
            if state == "succeeded":
                job.data["progress"] = 100
            self._save(job)
        log.info("job %s: %s%s", job.id, state,
                 f" ({error['code']}: {error['message']})" if error else "")

    def running_exclusive(self):
        with self.lock:
            return self.exclusive

    def get(self, job_id):
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise NotFound("Job not found", {"job": job_id})
        return job.snapshot()

    def list(self):
        with self.lock:
            jobs = list(self.jobs.values())
        return sorted((j.snapshot() for j in jobs), key=lambda j: j["created_at"],
                      reverse=True)


# ---------------------------------------------------------------------------
# Requests and replies: the types every handler uses
# ---------------------------------------------------------------------------


class Field:
    """One JSON body field: its JSON type and whether it must be there."""

    PY_TYPES = {"string": str, "integer": int, "boolean": bool, "array": list,
                "object": dict}

    def __init__(self, kind, required=False, items=None, nullable=False, enum=None):
        self.kind, self.required, self.items = kind, required, items
        self.nullable, self.enum = nullable, enum

    def accepts(self, value):
        if value is None:
            return self.nullable
        if self.kind == "integer" and isinstance(value, bool):
            return False
        if not isinstance(value, self.PY_TYPES[self.kind]):
            return False
        if self.enum is not None and value not in self.enum:
            return False
        if self.items is not None:
            return all(isinstance(v, self.PY_TYPES[self.items]) for v in value)
        return True


class Route:
    def __init__(self, method, pattern, handler, scope="read", body=None,
                 body_required=True):
        self.method, self.pattern, self.handler = method, pattern, handler
        self.scope = scope           # None: no key needed; "read": any key; "admin"
        self.body = body             # {field: Field} or None for no body
        self.body_required = body_required and bool(body)
        self.segments = pattern.strip("/").split("/")

    def match(self, segments):
        if len(segments) != len(self.segments):
            return None
        params = {}
        for want, got in zip(self.segments, segments):
            if want.startswith("{"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


class Reply:
    def __init__(self, status=HTTPStatus.OK, body=None, headers=None):
        self.status, self.body, self.headers = status, body, headers or {}


class Request:
    """What a handler sees: path params, query, parsed body and the caller."""

    def __init__(self, method, params, query, body, key, request_id, client):
        self.method, self.params, self.query, self.body = method, params, query, body
        self.key, self.request_id, self.client = key, request_id, client


def job_accepted(job):
    """The 202 reply every job-starting route gives."""
    return Reply(HTTPStatus.ACCEPTED, {"job": job.snapshot()},
                 {"Location": f"{API_PREFIX}/jobs/{job.id}"})


# ---------------------------------------------------------------------------
# Databases and users
# ---------------------------------------------------------------------------

DATABASE_ROUTES = []


# ---------------------------------------------------------------------------
# Backups and restores
# ---------------------------------------------------------------------------

BACKUP_ROUTES = []


# ---------------------------------------------------------------------------
# Snapshots: workspace files and databases together
# ---------------------------------------------------------------------------
#
# A snapshot is a directory under snapshots.dir (root only, 0700):
#   <name>/snapshot.json   summary: name, description, created_at, paths, database
#   <name>/manifest.json   every entry of every workspace tree (type, mode,
#                          owner, size, mtime, symlink target)
#   <name>/files/<i>/...   the regular files of workspace tree i, read-only
#   <name>/db/...          the databases (logical: roles.sql and one dump each)
# It is written under a dot name and renamed into place when complete, so a
# failed snapshot leaves nothing listed.  An unchanged file is a hard link to
# the previous snapshot's copy, never to the live file: stored files are
# immutable, and restores copy out of them.

SNAPSHOT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SNAPSHOT_JOB_KINDS = ("snapshot", "snapshot-restore")
DESCRIPTION_MAX_CHARS = 1000
PG_TOOL_TIMEOUT = 6 * 3600      # one pg_dump, pg_restore or psql run
COPY_CHUNK = 1 << 24            # bytes per copy_file_range or read
COPY_ATTEMPTS = 3               # a file that changes while copied is read again
STORED_MODE = 0o400             # stored copies are shared by links: never written
FICLONE = 0x40049409            # ioctl sharing extents (btrfs, xfs); ext4 has none
# A file changed within this long before we looked may change again in the
# same timestamp tick ("racy git"); its ctime is not trusted later.
RACY_NS = 1_000_000_000
WORKSPACE_STATE = ".workspace.json"   # which snapshot the workspace was restored to


def check_snapshot_name(name):
    """Before any path is built: 1-63 of [A-Za-z0-9._-], a letter or digit first."""
    if not isinstance(name, str) or not SNAPSHOT_NAME_RE.fullmatch(name):
        raise BadRequest("Invalid snapshot name: 1 to 63 characters of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit", {"field": "name"})


def snapshots_root(app, create=False):
    root = app.config["snapshots"]["dir"]
    if create:
        os.makedirs(root, mode=0o700, exist_ok=True)
    return os.path.realpath(root)


def snapshot_path(app, name):
    """Where `name` lives; resolved, then checked to be a plain child of the root."""
    check_snapshot_name(name)
    root = snapshots_root(app)
    path = os.path.join(root, name)
    if os.path.realpath(path) != path:
        raise NotFound("Snapshot not found", {"snapshot": name})
    return path


def read_json(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, encoding="utf-8") as handle:
        return json.load(handle)


def write_json(path, obj):
    # ASCII escapes keep file names that are not UTF-8 (surrogate escapes) intact.
    atomic_write(path, json.dumps(obj, separators=(",", ":")).encode("ascii"))


def load_summary(app, name):
    """snapshot.json of a complete snapshot; 400 bad name, 404 none."""
    path = snapshot_path(app, name)
    try:
        return read_json(os.path.join(path, "snapshot.json"))
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound("Snapshot not found", {"snapshot": name}) from None


def all_summaries(app):
    """Every complete snapshot's summary, newest first."""
    root = snapshots_root(app)
    try:
        names = [n for n in os.listdir(root) if SNAPSHOT_NAME_RE.fullmatch(n)]
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            found.append(load_summary(app, name))
        except NotFound:
            pass
        except (OSError, ValueError) as exc:
            log.warning("snapshot %r unreadable: %s", name, exc)
    return sorted(found, key=lambda s: s["created_ns"], reverse=True)


def public_snapshot(summary):
    db = summary["database"]
    database = {k: v for k, v in db.items() if k not in ("roles", "dumps")}
    if "dumps" in db:
        database["databases"] = [d["name"] for d in db["dumps"]]
    return {"name": summary["name"], "description": summary["description"],
            "created_at": summary["created_at"], "size": human_size(summary["size_bytes"]),
            "size_bytes": summary["size_bytes"], "files": summary["files"],
            "paths": [t["path"] for t in summary["trees"]], "database": database,
            "added": human_size(summary["added_bytes"]),
            "added_bytes": summary["added_bytes"]}


# -- configuration checks -----------------------------------------------------


def overlaps(a, b):
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def workspace_paths(app, extra=()):
    """The configured workspace paths (plus `extra`), resolved and checked.

    A workspace may not overlap Piglet's own directories or PostgreSQL's data
    directory: a restore would roll those back too.
    """
    config = app.config
    paths = []
    for given in list(config["snapshots"]["paths"]) + list(extra):
        if not os.path.isabs(given):
            raise snapshots_misconfigured(f"workspace path {given!r} is not absolute")
        real = os.path.realpath(given)
        if real not in paths:
            paths.append(real)
    pg = app.postgres_info()
    own = {"snapshots.dir": snapshots_root(app), "state_dir": config["state_dir"],
           "backups.dir": config["backups"]["dir"],
           "PostgreSQL's data directory": pg and pg["data_dir"]}
    for path in paths:
        for what, other in own.items():
            if other and overlaps(path, os.path.realpath(other)):
                raise snapshots_misconfigured(f"workspace path {path!r} overlaps {what}")
        if any(p != path and overlaps(p, path) for p in paths):
            raise snapshots_misconfigured(f"workspace path {path!r} overlaps another one")
    return paths


def check_workspace_dir(path):
    if not os.path.isdir(path):
        raise snapshots_misconfigured(f"workspace path {path!r} is not a directory")


def snapshots_misconfigured(message):
    return Unavailable(f"Snapshots are not set up: {message}", "snapshots")


def check_stop_services(app):
    for name in app.config["snapshots"]["stop_services"]:
        if name not in app.config["services"]:
            raise snapshots_misconfigured(f"stop_services names unknown service {name!r}")


def require_postgres(app):
    app.db.health.invalidate()
    if app.postgres_info() is None:
        raise Unavailable("PostgreSQL is unreachable", "postgres")


# -- walking and copying files ------------------------------------------------


def entry_type(mode):
    for kind, test in (("file", stat.S_ISREG), ("dir", stat.S_ISDIR),
                       ("symlink", stat.S_ISLNK), ("fifo", stat.S_ISFIFO)):
        if test(mode):
            return kind
    return None  # sockets and devices are not kept


def walk_tree(root):
    """(relative path, lstat) of root ('') and all below it, parents first.

    Symlinks are recorded, never followed.  Entries that vanish while we
    look (the workspace may be in use) are skipped.
    """
    yield "", os.lstat(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as listing:
                children = sorted(listing, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for child in children:
            sub = os.path.join(rel, child.name)
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield sub, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)


def stat_fields(st):
    """What a manifest entry records of one lstat."""
    fields = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
              "mtime_ns": st.st_mtime_ns}
    if stat.S_ISREG(st.st_mode):
        racy = time.time_ns() - st.st_ctime_ns < RACY_NS
        fields.update(size=st.st_size, ino=st.st_ino,
                      ctime_ns=None if racy else st.st_ctime_ns)
    return fields


def untouched(old, st):
    """The file has not been written, chmod'ed or replaced since `old` was recorded."""
    return (old.get("ctime_ns") is not None and old["ino"] == st.st_ino
            and old["ctime_ns"] == st.st_ctime_ns and old["size"] == st.st_size
            and old["mtime_ns"] == st.st_mtime_ns)


def is_regular_file(path):
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def same_metadata(old, entry):
    return all(old.get(k) == entry.get(k)
               for k in ("type", "size", "mtime_ns", "mode", "uid", "gid"))


def files_equal(path_a, path_b):
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        while True:
            chunk = a.read(COPY_CHUNK)
            if chunk != b.read(COPY_CHUNK):
                return False
            if not chunk:
                return True


def copy_data(src_fd, dst_fd):
    """Every byte of src into dst, inside the kernel where it can."""
    offset = 0
    with contextlib.suppress(OSError):  # EXDEV, ENOSYS...: fall back to reads
        while count := os.copy_file_range(src_fd, dst_fd, COPY_CHUNK, offset, offset):
            offset += count
        return
    while data := os.pread(src_fd, COPY_CHUNK, offset):
        offset += os.pwrite(dst_fd, data, offset)


class Copier:
    """Copies file contents, sharing extents (reflink) where the filesystem can."""

    def __init__(self):
        self.no_reflink = set()   # devices where FICLONE failed once

    def copy(self, src_fd, dst_fd, device):
        if device not in self.no_reflink:
            try:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
                return
            except OSError:
                self.no_reflink.add(device)
        copy_data(src_fd, dst_fd)


class TreeSnapshot:
    """Stores one workspace tree into `dest`, sharing unchanged files with bases.

    `bases` are (stored tree dir, {relative path: entry}) of earlier
    snapshots: the newest one, and the one last restored.
    """

    def __init__(self, job, copier, root, dest, bases):
        self.job, self.copier, self.root, self.dest = job, copier, root, dest
        self.bases = bases
        self.inner_links = {}   # (dev, ino) -> first path, for hard-linked files
        self.added_bytes = 0
        self.skipped = 0

    def run(self, progress):
        os.mkdir(self.dest, 0o700)
        entries = []
        for rel, st in walk_tree(self.root):
            kind = entry_type(st.st_mode)
            if kind is None:
                self.skipped += 1
                continue
            entry = dict({"path": rel, "type": kind}, **stat_fields(st))
            if kind == "dir" and rel:
                os.mkdir(os.path.join(self.dest, rel), 0o700)
            elif kind == "symlink":
                entry["target"] = os.readlink(os.path.join(self.root, rel))
            elif kind == "file":
                if not self.store(rel, st, entry):
                    continue
                progress(entry["size"])
            entries.append(entry)
        if self.skipped:
            self.job.log(f"{self.root}: {self.skipped} sockets or devices not kept")
        return entries

    def store(self, rel, st, entry):
        """Put the file in the snapshot; False when it vanished meanwhile."""
        target = os.path.join(self.dest, rel)
        key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
        first = self.inner_links.get(key)
        if first is not None:   # hard-linked in the workspace: linked here too
            os.link(os.path.join(self.dest, first), target)
            entry["link"] = first
            return True
        stored = self.share(rel, st, entry, target) or self.copy_in(rel, entry, target)
        if stored and key:
            self.inner_links[key] = rel
        return stored

    def share(self, rel, st, entry, target):
        """Hard-link the copy an earlier snapshot holds, if the file is the same."""
        for base_dir, base_entries in self.bases:
            old = base_entries.get(rel)
            if old is None or not same_metadata(old, entry):
                continue
            stored = os.path.join(base_dir, rel)
            try:
                if untouched(old, st) or files_equal(os.path.join(self.root, rel), stored):
                    os.link(stored, target)
                    return True
            except OSError:   # gone meanwhile, or EMLINK: a copy will do
                continue
        return False

    def copy_in(self, rel, entry, target):
        source = os.path.join(self.root, rel)
        for _ in range(COPY_ATTEMPTS):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            try:
                # O_NONBLOCK: a FIFO swapped in meanwhile must not hang us.
                src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                if is_regular_file(source):
                    raise
                return False   # gone, or replaced by a symlink, meanwhile
            try:
                before = os.fstat(src)
                if not stat.S_ISREG(before.st_mode):
                    return False
                self.copy_to(src, target, before)
                after = os.fstat(src)
            finally:
                os.close(src)
            entry.update(stat_fields(before))
            if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                break
        else:
            self.job.log(f"{source}: kept changing while copied; stored as last read")
        self.added_bytes += entry["size"]
        return True

    def copy_to(self, src, target, st):
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                      STORED_MODE)
        try:
            self.copier.copy(src, dst, st.st_dev)
            # The real mtime helps someone browsing the store; the manifest rules.
            os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)


def tree_bases(bases, root):
    found = []
    for path, manifest in bases:
        for index, tree in enumerate(manifest["trees"]):
            if tree["path"] == root:
                found.append((os.path.join(path, "files", str(index)),
                              {e["path"]: e for e in tree["entries"]}))
    return found


# -- restoring files ----------------------------------------------------------


def remove_path(path, kind):
    if kind == "dir":
        shutil.rmtree(path)
    else:
        os.unlink(path)


def temp_name(path):
    return os.path.join(os.path.dirname(path), f".piglet-restore-{secrets.token_hex(6)}")


class TreeRestore:
    """Makes one live tree equal to a stored one.

    Files are copied out of the snapshot (never linked: the store must stay
    immutable) into a temporary name and renamed over the live path.
    """

    def __init__(self, copier, root, stored, entries, pre):
        self.copier, self.root, self.stored = copier, root, stored
        self.entries = entries
        self.want = {e["path"]: e for e in entries}
        self.pre = pre          # (stored dir, entries) of the pre-restore snapshot
        self.counts = {"copied": 0, "unchanged": 0, "removed": 0}
        self.as_root = os.geteuid() == 0

    def run(self):
        if not os.path.lexists(self.root):
            os.makedirs(self.root, 0o700)   # mode and owner follow from the manifest
        if not stat.S_ISDIR(os.lstat(self.root).st_mode):
            raise ApiError(f"Workspace path {self.root!r} is not a directory",
                           {"path": self.root})
        self.remove_unwanted()
        for entry in self.entries:
            self.put(entry, self.live(entry["path"]))
        for entry in reversed(self.entries):  # children first: their changes touch parents
            if entry["type"] == "dir":
                self.set_metadata(self.live(entry["path"]), entry)
        return self.counts

    def live(self, rel):
        return os.path.join(self.root, rel) if rel else self.root

    def remove_unwanted(self):
        """Delete what the snapshot does not have, or has as another type."""
        stack = [""]
        while stack:
            rel = stack.pop()
            with os.scandir(os.path.join(self.root, rel)) as listing:
                children = list(listing)
            for child in children:
                sub = os.path.join(rel, child.name)
                kind = entry_type(child.stat(follow_symlinks=False).st_mode)
                wanted = self.want.get(sub)
                if wanted is None or wanted["type"] != kind:
                    remove_path(child.path, kind)
                    self.counts["removed"] += 1
                elif kind == "dir":
                    stack.append(sub)

    def put(self, entry, path):
        kind = entry["type"]
        live = os.lstat(path) if os.path.lexists(path) else None
        if kind == "dir":
            if live is None:
                os.mkdir(path, 0o700)
        elif kind == "file" and entry.get("link"):
            self.put_link(entry, path, live)
        elif kind == "file":
            self.put_file(entry, path, live)
        elif kind == "symlink":
            self.put_symlink(entry, path, live)
        elif live is None:
            tmp = temp_name(path)
            os.mkfifo(tmp, 0o600)
            os.replace(tmp, path)
        if kind != "dir":
            self.set_metadata(path, entry)

    def put_file(self, entry, path, live):
        if live is not None and self.same_content(entry, live):
            self.counts["unchanged"] += 1
            return
        tmp = temp_name(path)
        with open(os.path.join(self.stored, entry["path"]), "rb") as src:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                self.copier.copy(src.fileno(), dst, os.fstat(src.fileno()).st_dev)
            finally:
                os.close(dst)
        try:
            self.set_metadata(tmp, entry)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        self.counts["copied"] += 1

    def same_content(self, entry, live):
        """Cheap proof that the live file holds the stored bytes, else False."""
        if live.st_size != entry["size"]:
            return False
        if untouched(entry, live):
            return True   # not written since this very snapshot
        pre_dir, pre_entries = self.pre
        old = pre_entries.get(entry["path"])
        if old is None or old.get("type") != "file" or not untouched(old, live):
            return False
        # Unchanged since the pre-restore snapshot, which stored it as the
        # same inode as this snapshot's copy: the same bytes.
        try:
            mine = os.stat(os.path.join(self.stored, entry["path"]))
            theirs = os.stat(os.path.join(pre_dir, entry["path"]))
        except FileNotFoundError:
            return False
        return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)

    def put_link(self, entry, path, live):
        first = os.path.join(self.root, entry["link"])
        if live is not None and live.st_ino == os.lstat(first).st_ino:
            return
        tmp = temp_name(path)
        os.link(first, tmp)
        os.replace(tmp, path)

    def put_symlink(self, entry, path, live):
        if live is not None and os.readlink(path) == entry["target"]:
            return
        tmp = temp_name(path)
        os.symlink(entry["target"], tmp)
        os.replace(tmp, path)

    def set_metadata(self, path, entry):
        """Owner, then mode (chown clears set-id bits), then mtime; no symlink followed."""
        live = os.lstat(path)
        is_link = entry["type"] == "symlink"
        if self.as_root and (live.st_uid, live.st_gid) != (entry["uid"], entry["gid"]):
            os.lchown(path, entry["uid"], entry["gid"])
        if not is_link and stat.S_IMODE(os.lstat(path).st_mode) != entry["mode"]:
            os.chmod(path, entry["mode"])
        if live.st_mtime_ns != entry["mtime_ns"]:
            os.utime(path, ns=(live.st_atime_ns, entry["mtime_ns"]), follow_symlinks=False)


def restore_files(app, job, path, pre_path):
    """Every tree of the snapshot at `path` back in place; returns counts."""
    manifest = read_json(os.path.join(path, "manifest.json"))
    pre_manifest = read_json(os.path.join(pre_path, "manifest.json"))
    copier, totals = Copier(), {"copied": 0, "unchanged": 0, "removed": 0}
    for index, tree in enumerate(manifest["trees"]):
        pre = (tree_bases([(pre_path, pre_manifest)], tree["path"]) or [(None, {})])[0]
        counts = TreeRestore(copier, tree["path"], os.path.join(path, "files", str(index)),
                             tree["entries"], pre).run()
        job.log(f"{tree['path']}: {counts['copied']} copied back, {counts['unchanged']} "
                f"unchanged, {counts['removed']} removed")
        totals = {k: totals[k] + counts[k] for k in totals}
    os.sync()
    return totals


# ---------------------------------------------------------------------------
# Snapshots, continued: databases, jobs and routes
# ---------------------------------------------------------------------------

# -- databases: logical dumps -------------------------------------------------


def mask_secrets(text):
    return re.sub(r"(?i)(PASSWORD\s+)'(?:[^']|'')*'", r"\1'***'",
                  re.sub(r"SCRAM-SHA-256\$\S+", "***", text))


def pg_tool(app, name):
    """The tool of the server's major version where Debian keeps it, else PATH's."""
    with app.db.connection() as conn:
        version = int(conn.execute("SHOW server_version_num").fetchone()[0])
    path = f"/usr/lib/postgresql/{version // 10000}/bin/{name}"
    return path if os.path.exists(path) else name


def pg_tool_env(app, dbname):
    """libpq settings for a tool run as postgres.os_user.

    The database name goes in PGDATABASE, never -d: a name like
    "host=elsewhere" would be read as a connection string.
    """
    params = psycopg.conninfo.conninfo_to_dict(app.config["postgres"]["dsn"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "PGAPPNAME": "piglet", "PGDATABASE": dbname,
           "PGUSER": app.config["postgres"]["os_user"],
           "PGCONNECT_TIMEOUT": str(app.config["postgres"]["connect_timeout"])}
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("sslmode", "PGSSLMODE")):
        if params.get(key):
            env[var] = str(params[key])
    return env


def run_pg_tool(app, job, argv, dbname="template1", stdin=None, stdout=None, data=None):
    """Run a PostgreSQL client tool as postgres.os_user.

    Piglet opens the snapshot's files itself and hands them over as stdin or
    stdout, so that user never needs access to the snapshot directory.
    """
    user = app.config["postgres"]["os_user"]
    kwargs = {}
    try:
        if user != current_user():
            kwargs.update(user=user, group=primary_group(user), extra_groups=[])
        feed = {"input": data} if data is not None else {"stdin": stdin or subprocess.DEVNULL}
        result = subprocess.run(
            argv, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
            timeout=PG_TOOL_TIMEOUT, env=pg_tool_env(app, dbname), **feed, **kwargs)
    except (KeyError, FileNotFoundError) as exc:
        raise Unavailable(f"Cannot run {os.path.basename(argv[0])}: {first_line(exc)}",
                          "postgres") from None
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{os.path.basename(argv[0])} timed out", "postgres") from None
    errors = mask_secrets(result.stderr.decode("utf-8", "replace")).strip()
    for line in errors.splitlines()[-10:]:
        job.log(line)
    if result.returncode != 0:
        tool = os.path.basename(argv[0])
        raise Unavailable(f"{tool} failed: {errors.splitlines()[-1] if errors else ''}",
                          "postgres", {"tool": tool, "exit_code": result.returncode})
    return result.stdout


def dump_databases(app, job, dest):
    """Roles (pg_dumpall --roles-only) and each database (pg_dump -Fc) into dest."""
    os.mkdir(dest, 0o700)
    rows = app.db.query("SELECT datname, datallowconn FROM pg_database "
                        "WHERE NOT datistemplate ORDER BY datname")
    for row in rows:
        if not row["datallowconn"]:
            job.log(f"database {row['datname']!r} allows no connections: not kept")
    with open(os.path.join(dest, "roles.sql"), "xb") as out:
        run_pg_tool(app, job, [pg_tool(app, "pg_dumpall"), "--roles-only", "-w"],
                    stdout=out)
    dumps = []
    for index, row in enumerate(r for r in rows if r["datallowconn"]):
        path = os.path.join(dest, f"{index}.dump")
        with open(path, "xb") as out:
            run_pg_tool(app, job, [pg_tool(app, "pg_dump"), "-Fc", "-w"],
                        dbname=row["datname"], stdout=out)
        dumps.append({"name": row["datname"], "file": f"{index}.dump",
                      "size_bytes": os.path.getsize(path)})
        job.log(f"dumped database {row['datname']!r} ({human_size(dumps[-1]['size_bytes'])})")
    size = os.path.getsize(os.path.join(dest, "roles.sql"))
    size += sum(d["size_bytes"] for d in dumps)
    return {"method": "logical", "roles": "roles.sql", "dumps": dumps,
            "size": human_size(size), "size_bytes": size}


# Never dropped: the bootstrap superuser, the role Piglet connects as, and the
# role the tools connect as.
KEPT_ROLES_SQL = ("SELECT rolname FROM pg_roles WHERE oid = 10 OR rolname = session_user "
                  "OR rolname = %s")


def check_dumps(app, job, db_dir, info):
    """Read every dump's table of contents: a damaged one fails the restore
    before anything is touched."""
    pg_restore = pg_tool(app, "pg_restore")
    for dump in info["dumps"]:
        with open(os.path.join(db_dir, dump["file"]), "rb") as src:
            run_pg_tool(app, job, [pg_restore, "-l"], stdin=src)


def restore_databases(app, job, db_dir, info):
    """Drop every database and role made since, then recreate from the dumps."""
    tools = {t: pg_tool(app, t) for t in ("pg_restore", "psql")}
    with open(os.path.join(db_dir, info["roles"]), "rb") as handle:
        roles_sql = handle.read()
    app.db.close()   # our idle sessions would only be terminated
    try:
        with app.db.connect("template1") as conn:
            conn.execute("SET statement_timeout = 0")
            drop_databases(conn, job)
            kept = drop_roles(conn, job, app.config["postgres"]["os_user"])
        run_pg_tool(app, job, [tools["psql"], "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1"],
                    data=without_create_role(roles_sql, kept))
        for dump in info["dumps"]:
            with open(os.path.join(db_dir, dump["file"]), "rb") as src:
                run_pg_tool(app, job, [tools["pg_restore"], "--create", "--exit-on-error",
                                       "-w", "-d", "template1"], stdin=src)
            job.log(f"restored database {dump['name']!r}")
    finally:
        app.db.close()
        app.db.health.invalidate()
    return [d["name"] for d in info["dumps"]]


def drop_databases(conn, job):
    # Databases that allow no connections could not be dumped: left alone.
    names = [r[0] for r in conn.execute(
        "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn")]
    for name in names:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    job.log(f"dropped {len(names)} databases")


def drop_roles(conn, job, os_user):
    """Drop the roles that the dump will recreate; returns the names kept."""
    kept = {r[0] for r in conn.execute(KEPT_ROLES_SQL, (os_user,))}
    names = [r[0] for r in conn.execute(
        "SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY rolname")]
    for name in names:
        if name in kept:
            conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(name)))
            continue
        try:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
        except psycopg.errors.DependentObjectsStillReferenced as exc:
            # Owns something in template1 or a tablespace: keep it and say so.
            job.log(f"role {name!r} kept: {first_line(exc)}")
            kept.add(name)
    return kept


def without_create_role(script, kept):
    """pg_dumpall's role script minus CREATE ROLE of roles that still exist."""
    lines = []
    for line in script.split(b"\n"):
        match = re.fullmatch(rb"CREATE ROLE (.+);", line)
        if match:
            ident = match.group(1).decode("utf-8", "surrogateescape")
            if ident.startswith('"'):
                ident = ident[1:-1].replace('""', '"')
            if ident in kept:
                continue
        lines.append(line)
    return b"\n".join(lines)


# -- creating a snapshot ------------------------------------------------------


def base_snapshots(app):
    """Snapshots to share unchanged files with: the newest, and the one the
    workspace was last restored to (its files come back as new inodes)."""
    summaries = all_summaries(app)
    names = [summaries[0]["name"]] if summaries else []
    with contextlib.suppress(OSError, ValueError, KeyError):
        state = read_json(os.path.join(snapshots_root(app), WORKSPACE_STATE))
        if state["restored"] not in names:
            names.append(state["restored"])
    bases = []
    for name in names:
        with contextlib.suppress(ApiError, OSError, ValueError):
            path = snapshot_path(app, name)
            bases.append((path, read_json(os.path.join(path, "manifest.json"))))
    return bases


def clean_leftovers(root):
    """Half-written or half-deleted snapshots from a crash."""
    for name in os.listdir(root):
        if name.startswith((".tmp-", ".deleting-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def build_snapshot(app, job, name, description, paths, missing_ok=False):
    """Write snapshot `name` completely, then rename it into place.

    missing_ok: leave out workspace paths that do not exist (the snapshot
    taken before a restore that brings such a path back)."""
    root = snapshots_root(app, create=True)
    clean_leftovers(root)
    created = time.time_ns()
    tmp = os.path.join(root, f".tmp-{name}-{secrets.token_hex(4)}")
    os.mkdir(tmp, 0o700)
    try:
        trees, added = snapshot_files(app, job, tmp, paths, missing_ok)
        database = dump_databases(app, job, os.path.join(tmp, "db"))
        summary = snapshot_summary(name, description, created, trees, database, added)
        write_json(os.path.join(tmp, "manifest.json"), {"trees": trees})
        write_json(os.path.join(tmp, "snapshot.json"), summary)
        os.sync()   # the snapshot is whole on disk before it is listed
        if os.path.lexists(os.path.join(root, name)):
            raise Conflict("Snapshot already exists", {"snapshot": name})
        os.rename(tmp, os.path.join(root, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    job.log(f"snapshot {name}: {summary['files']} files, "
            f"{human_size(summary['added_bytes'])} new on disk")
    return summary


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot_files(app, job, tmp, paths, missing_ok):
    """Each workspace tree into tmp/files/<i>; returns (trees, bytes added)."""
    os.mkdir(os.path.join(tmp, "files"), 0o700)
    bases, copier, trees, added = base_snapshots(app), Copier(), [], 0
    # Progress is a guess from the newest snapshot's size; none for the first.
    expected = bases and sum(e.get("size", 0) for t in bases[0][1]["trees"]
                             for e in t["entries"] if "link" not in e)
    done = [0]

    def progress(size):
        done[0] += size
        if expected:
            job.set_progress(min(90, done[0] * 90 // expected))

    for root in paths:
        if missing_ok and not os.path.lexists(root):
            continue
        check_workspace_dir(root)
        tree = TreeSnapshot(job, copier, root, os.path.join(tmp, "files", str(len(trees))),
                            tree_bases(bases, root))
        trees.append({"path": root, "entries": tree.run(progress)})
        added += tree.added_bytes
    return trees, added


def snapshot_summary(name, description, created_ns, trees, database, added):
    files = [e for t in trees for e in t["entries"] if e["type"] == "file"]
    file_bytes = sum(e["size"] for e in files if "link" not in e)
    return {"name": name, "description": description, "created_ns": created_ns,
            "created_at": utc_iso(created_ns / 1e9), "files": len(files),
            "trees": [{"path": t["path"]} for t in trees], "database": database,
            "size_bytes": file_bytes + database["size_bytes"],
            "added_bytes": added + database["size_bytes"]}


# -- restoring: services and the whole job ------------------------------------


def stop_services(app, job):
    """Stop the services in snapshots.stop_services that run; returns their names."""
    stopped = []
    for name in app.config["snapshots"]["stop_services"]:
        if name == app.config["postgres"]["service"]:
            job.log(f"service {name} not stopped: the database restore handles PostgreSQL")
            continue
        if app.services.get(name)["status"] == "stopped":
            continue
        try:
            app.services.act(name, "stop")
        except ApiError:
            start_services(app, job, stopped)
            raise
        job.log(f"service {name} stopped")
        stopped.append(name)
    return stopped


def start_services(app, job, names):
    """Start each of `names`; returns {name: error message} for those that failed."""
    failed = {}
    for name in names:
        try:
            app.services.act(name, "start")
            job.log(f"service {name} started")
        except ApiError as exc:
            failed[name] = exc.message
            job.log(f"service {name} failed to start: {exc.message}")
    return failed


def pre_restore_name(app):
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, count = f"pre-restore-{stamp}", 1
    while os.path.lexists(os.path.join(snapshots_root(app), name)):
        count += 1
        name = f"pre-restore-{stamp}-{count}"
    return name


def restore_work(app, job, name):
    """Stop services, keep the present, put files and databases back, start again."""
    path = snapshot_path(app, name)
    summary = read_json(os.path.join(path, "snapshot.json"))
    paths = workspace_paths(app, [t["path"] for t in summary["trees"]])
    stopped = stop_services(app, job)
    try:
        result = restore_steps(app, job, name, path, summary, paths)
    except BaseException as exc:
        failed = start_services(app, job, stopped)
        if failed and isinstance(exc, ApiError):
            exc.details["services_not_started"] = failed
        raise
    failed = start_services(app, job, stopped)
    if failed:
        raise Unavailable(f"Restored {name}, but services did not start: "
                          + ", ".join(failed), "services",
                          {"services": failed, "pre_restore": result["pre_restore"]})
    return dict(result, services_restarted=stopped)


def restore_steps(app, job, name, path, summary, paths):
    check_dumps(app, job, os.path.join(path, "db"), summary["database"])
    pre_name = pre_restore_name(app)
    build_snapshot(app, job, pre_name, f"Taken before restoring {name}", paths,
                   missing_ok=True)
    job.set_progress(50)
    try:
        files = restore_files(app, job, path, snapshot_path(app, pre_name))
        write_json(os.path.join(snapshots_root(app), WORKSPACE_STATE), {"restored": name})
        job.set_progress(70)
        databases = restore_databases(app, job, os.path.join(path, "db"),
                                      summary["database"])
    except ApiError as exc:
        exc.details["pre_restore"] = pre_name
        raise
    except (OSError, psycopg.Error) as exc:
        raise ApiError(f"Restore failed: {first_line(exc)}",
                       {"pre_restore": pre_name}) from None
    return {"snapshot": name, "pre_restore": pre_name, "files": files,
            "databases": databases}


# -- handlers -----------------------------------------------------------------


def list_snapshots(app, req):
    """200: every complete snapshot, newest first."""
    return {"snapshots": [public_snapshot(s) for s in all_summaries(app)]}


def get_snapshot(app, req):
    """200; 400 invalid name; 404 no such snapshot."""
    return public_snapshot(load_summary(app, req.params["name"]))


def create_snapshot(app, req):
    """202 job; 400 invalid name or description; 409 name taken or another
    cluster-wide job running; 503 PostgreSQL down or workspace paths unusable."""
    name, description = req.body["name"], req.body.get("description")
    check_snapshot_name(name)
    if description is not None and (len(description) > DESCRIPTION_MAX_CHARS
                                    or "\0" in description):
        raise BadRequest(f"description: at most {DESCRIPTION_MAX_CHARS} characters, no NUL",
                         {"field": "description"})
    if os.path.lexists(os.path.join(snapshots_root(app), name)):
        raise Conflict("Snapshot already exists", {"snapshot": name})
    require_postgres(app)
    paths = workspace_paths(app)
    for path in paths:
        check_workspace_dir(path)
    job = app.jobs.submit("snapshot", {"name": name, "description": description},
                          lambda job: public_snapshot(
                              build_snapshot(app, job, name, description, paths)))
    return job_accepted(job)


def restore_snapshot(app, req):
    """202 job; 400 invalid name; 404 no such snapshot; 409 another cluster-wide
    job running; 503 PostgreSQL down or snapshots misconfigured."""
    name = req.params["name"]
    summary = load_summary(app, name)
    require_postgres(app)
    workspace_paths(app, [t["path"] for t in summary["trees"]])
    check_stop_services(app)
    job = app.jobs.submit("snapshot-restore", {"name": name},
                          lambda job: restore_work(app, job, name))
    return job_accepted(job)


def delete_snapshot(app, req):
    """204; 400 invalid name; 404 no such snapshot; 409 while a snapshot job runs."""
    name = req.params["name"]
    load_summary(app, name)
    path = snapshot_path(app, name)
    trash = os.path.join(os.path.dirname(path), f".deleting-{name}-{secrets.token_hex(4)}")
    # Under the job lock: no snapshot job can start linking to it meanwhile.
    with app.jobs.lock:
        running = app.jobs.running_exclusive()
        if running is not None and running.data["kind"] in SNAPSHOT_JOB_KINDS:
            raise Conflict(f"Job {running.id} uses the snapshots; wait for it to finish",
                           {"job": running.id})
        try:
            os.rename(path, trash)
        except FileNotFoundError:   # another DELETE was quicker
            raise NotFound("Snapshot not found", {"snapshot": name}) from None
    shutil.rmtree(trash)
    return Reply(HTTPStatus.NO_CONTENT)


SNAPSHOT_BODY = {"name": Field("string", required=True),
                 "description": Field("string", nullable=True)}

SNAPSHOT_ROUTES = [
    Route("GET", "/snapshots", list_snapshots),
    Route("POST", "/snapshots", create_snapshot, "admin", SNAPSHOT_BODY),
    Route("GET", "/snapshots/{name}", get_snapshot),
    Route("DELETE", "/snapshots/{name}", delete_snapshot, "admin"),
    Route("POST", "/snapshots/{name}/restore", restore_snapshot, "admin", {},
          body_required=False),
]


# ---------------------------------------------------------------------------
# Meta: OpenAPI document, metrics, audit
# ---------------------------------------------------------------------------

META_ROUTES = []


# ---------------------------------------------------------------------------
# The application: everything a handler needs, built from one config
# ---------------------------------------------------------------------------


class App:
    def __init__(self, config, config_file):
        self.config = config
        self.config_file = config_file
        self.started = time.monotonic()
        self.keys = KeyStore(config["keys_file"])
        rate = config["rate_limit"]
        self.limiter = RateLimiter(rate["per_minute"], rate["burst"])
        os.makedirs(config["state_dir"], mode=0o700, exist_ok=True)
        self.db = Database(config["postgres"])
        self.services = Services(config["services"])
        self.jobs = JobManager(config["state_dir"])

    def reload(self):
        """SIGHUP: re-read what can change safely; listen address and port stay."""
        config = load_config(self.config_file)
        for fixed in ("listen", "port", "tls", "state_dir", "postgres"):
            if config[fixed] != self.config[fixed]:
                log.warning("reload: %s changed; it takes effect at the next restart", fixed)
                config[fixed] = self.config[fixed]
        rate = config["rate_limit"]
        self.limiter = RateLimiter(rate["per_minute"], rate["burst"])
        self.keys = KeyStore(config["keys_file"])
        self.services = Services(config["services"])
        self.config = config
        logging.getLogger().setLevel(config["log_level"])

    def postgres_info(self):
        """{'version', 'data_dir'} from a live session, or None when it is down."""
        return self.db.health.get()


# ---------------------------------------------------------------------------
# Handlers: system, keys, jobs, services
# ---------------------------------------------------------------------------


def service_statuses(app):
    """name -> status, with PostgreSQL judged by a real connection.

    Debian's postgresql.service reads "active (exited)" while its cluster is
    down, so the unit alone cannot be trusted for PostgreSQL.
    """
    statuses = {name: s["status"] for name, s in app.services.all().items()}
    pg_name = app.config["postgres"]["service"]
    if pg_name in statuses:
        if app.postgres_info() is not None:
            statuses[pg_name] = "running"
        elif statuses[pg_name] in ("running", "unknown"):
            statuses[pg_name] = "stopped"
    return statuses


def get_status(app, req):
    """200 always: healthy, degraded (a service down) or unhealthy (PostgreSQL down)."""
    statuses = service_statuses(app)
    if app.postgres_info() is None:
        status = "unhealthy"
    elif all(s == "running" for s in statuses.values()):
        status = "healthy"
    else:
        status = "degraded"
    return {"status": status, "version": VERSION,
            "uptime": int(time.monotonic() - app.started), "services": statuses}


def read_os_release():
    try:
        with open("/etc/os-release", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key == "PRETTY_NAME":
                    return value.strip('"')
    except OSError:
        pass
    return None


def read_meminfo_total():
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def get_system(app, req):
    """200: host facts; disk figures are for PostgreSQL's data volume."""
    pg = app.postgres_info()
    disk_path = pg["data_dir"] if pg else "/"
    vfs = os.statvfs(disk_path)
    memory = read_meminfo_total()
    with open("/proc/uptime", encoding="ascii") as handle:
        uptime = int(float(handle.read().split()[0]))
    disk = vfs.f_blocks * vfs.f_frsize
    return {"hostname": socket.gethostname(), "os": read_os_release(),
            "kernel": os.uname().release, "cpu": os.cpu_count(),
            "memory": human_size(memory), "memory_bytes": memory,
            "disk": human_size(disk), "disk_bytes": disk,
            "disk_free_bytes": vfs.f_bavail * vfs.f_frsize,
            "uptime": uptime, "postgres_version": pg["version"] if pg else None}


def list_keys(app, req):
    """200: key metadata, never a secret or a hash."""
    return {"keys": app.keys.list()}


def create_key(app, req):
    """201 with the secret, shown this once; 400 bad name or scope; 409 name taken."""
    secret, record = app.keys.create(req.body["name"], req.body.get("scope", "admin"))
    return Reply(HTTPStatus.CREATED, dict(record, key=secret),
                 {"Location": f"{API_PREFIX}/keys/{record['name']}"})


def revoke_key(app, req):
    """204; 404 unknown name."""
    app.keys.revoke(req.params["name"])
    return Reply(HTTPStatus.NO_CONTENT)


def list_jobs(app, req):
    return {"jobs": app.jobs.list()}


def get_job(app, req):
    """200; 404 unknown id."""
    return {"job": app.jobs.get(req.params["id"])}


def list_services(app, req):
    return {"services": [public_service(s) for s in app.services.all().values()]}


def get_service(app, req):
    """200; 404 for a name not in the config (systemctl is never asked)."""
    return public_service(app.services.get(req.params["name"]))


def act_service(app, req):
    """200 once settled; 400 unknown action; 404 unknown service;
    409 stopping PostgreSQL while a cluster job runs; 503 no systemd."""
    name, action = req.params["name"], req.params["action"]
    app.services.entry(name)
    if action not in SERVICE_ACTIONS:
        raise BadRequest(f"Unknown action {action!r}", {"allowed": list(SERVICE_ACTIONS)})
    running = app.jobs.running_exclusive()
    if name == app.config["postgres"]["service"] and action != "start" and running:
        raise Conflict(f"Job {running.id} needs PostgreSQL; wait for it to finish",
                       {"job": running.id})
    service = app.services.act(name, action)
    if name == app.config["postgres"]["service"]:
        app.db.health.invalidate()  # the next /status must not trust the old probe
    return public_service(service)


def public_service(service):
    """The contract's fields, plus systemd's own states for units."""
    return {k: v for k, v in service.items() if v is not None or k in PUBLIC_SERVICE_FIELDS}


PUBLIC_SERVICE_FIELDS = ("name", "status", "port", "unit", "enabled", "pid", "since")


KEY_BODY = {"name": Field("string", required=True),
            "scope": Field("string", enum=list(SCOPES))}

CORE_ROUTES = [
    Route("GET", "/status", get_status),
    Route("GET", "/system", get_system),
    Route("GET", "/keys", list_keys, "admin"),
    Route("POST", "/keys", create_key, "admin", KEY_BODY),
    Route("DELETE", "/keys/{name}", revoke_key, "admin"),
    Route("GET", "/jobs", list_jobs),
    Route("GET", "/jobs/{id}", get_job),
]

SERVICE_ROUTES = [
    Route("GET", "/services", list_services),
    Route("GET", "/services/{name}", get_service),
    Route("POST", "/services/{name}/{action}", act_service, "admin", {},
          body_required=False),
]


# ---------------------------------------------------------------------------
# Routing: one table drives dispatch
# ---------------------------------------------------------------------------


ROUTES = (CORE_ROUTES + SERVICE_ROUTES + DATABASE_ROUTES + BACKUP_ROUTES
          + SNAPSHOT_ROUTES + META_ROUTES)


def split_path(path):
    """Percent-decoded segments of an /api/v1 path, or None for other paths.

    Splitting before decoding keeps an encoded slash inside its segment, so
    `/databases/a%2Fb` names the database "a/b" (rejected later by name
    rules), never the route /databases/a/b.  One trailing slash is ignored.
    """
    if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
        return None
    rest = path[len(API_PREFIX):].removesuffix("/")
    if not rest:
        return []
    raw = rest[1:].split("/")
    if "" in raw:
        return None
    try:
        return [urllib.parse.unquote(part, errors="strict") for part in raw]
    except UnicodeDecodeError:
        raise BadRequest("Path is not valid UTF-8 after percent-decoding") from None


def find_route(method, path):
    """(route, params) for the request; raises 404 or 405 with Allow."""
    segments = split_path(path)
    if segments is None:
        raise NotFound("No such route", {"path": path})
    wanted = "GET" if method == "HEAD" else method
    allowed = []
    for route in ROUTES:
        params = route.match(segments)
        if params is None:
            continue
        if route.method == wanted:
            return route, params
        allowed.append(route.method)
    if not allowed:
        raise NotFound("No such route", {"path": path})
    if "GET" in allowed:
        allowed.append("HEAD")
    raise MethodNotAllowed(sorted(set(allowed), key=("GET", "HEAD", "POST", "PATCH",
                                                     "PUT", "DELETE").index))


def check_body(route, body):
    """The body must be a JSON object with known fields of the right types."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object")
    for name, value in body.items():
        field = route.body.get(name)
        if field is None:
            raise BadRequest(f"Unknown field {name!r}", {"field": name})
        if not field.accepts(value):
            expected = field.kind + (f" of {field.items}s" if field.items else "")
            if field.enum:
                expected = "one of " + ", ".join(map(str, field.enum))
            raise BadRequest(f"Field {name!r} must be {expected}", {"field": name})
    for name, field in route.body.items():
        if field.required and name not in body:
            raise BadRequest(f"Missing field {name!r}", {"field": name})


# ---------------------------------------------------------------------------
# HTTP: request handler and server
# ---------------------------------------------------------------------------


def authorize(route, key):
    """`read` keys may only read; `admin` routes need an admin key."""
    if key is None or key["scope"] == "admin":
        return
    if route.scope == "admin" or route.method != "GET":
        raise Forbidden("This key's scope does not allow this request",
                        {"scope": key["scope"]})


class Deadlines:
    """Shuts down sockets that overrun an absolute deadline.

    A per-recv timeout alone lets a client trickle a byte every few seconds
    and hold a thread forever (slowloris); this bounds the whole read.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._deadlines = {}
        threading.Thread(target=self._reap, name="deadlines", daemon=True).start()

    def arm(self, sock, seconds):
        with self._lock:
            self._deadlines[sock] = time.monotonic() + seconds

    def disarm(self, sock):
        with self._lock:
            self._deadlines.pop(sock, None)

    def _reap(self):
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                expired = [s for s, d in self._deadlines.items() if d <= now]
                for sock in expired:
                    del self._deadlines[sock]
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


class RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "piglet/" + VERSION
    sys_version = ""
    disable_nagle_algorithm = True

    # Any method name reaches dispatch, so an unknown method on a known path
    # is a 405 with Allow rather than the stdlib's 501.
    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    # -- reading ---------------------------------------------------------------
    def handle_one_request(self):
        sock = self.connection
        deadlines = self.server.deadlines
        sock.settimeout(KEEPALIVE_IDLE_SECONDS)
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        self._reset_request_state()
        deadlines.arm(sock, HEADER_DEADLINE_SECONDS)
        sock.settimeout(HEADER_DEADLINE_SECONDS)
        try:
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            elif self.parse_request():
                deadlines.disarm(sock)
                getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.info("connection from %s dropped: %s", self.client_address[0], exc)
            self.close_connection = True
        finally:
            deadlines.disarm(sock)

    def _reset_request_state(self):
        self.started = time.monotonic()
        self.request_id = secrets.token_hex(8)
        self.key_name = "-"
        self.body_pending = False
        self.extra_headers = {}

    def read_body(self, route):
        """The parsed JSON body ({} when the route takes none and none was sent)."""
        length = self.body_length()
        if route.body is None:
            self.discard_body(length)
            return {}
        if length == 0:
            if route.body_required:
                raise BadRequest("A JSON body is required")
            return {}
        self.check_content_type()
        raw = self.read_exactly(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"Malformed JSON: {exc}") from None
        check_body(route, body)
        return body

    def body_length(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise BadRequest("Chunked bodies are not supported; send Content-Length")
        value = self.headers.get("Content-Length")
        if value is None:
            return 0
        if not value.strip().isdigit():
            self.close_connection = True
            raise BadRequest("Content-Length must be a non-negative integer")
        length = int(value)
        if length > self.server.app.config["max_body_bytes"]:
            self.close_connection = True  # the body is never read, so the stream is lost
            raise PayloadTooLarge("Body over the limit", {
                "limit_bytes": self.server.app.config["max_body_bytes"]})
        self.body_pending = length > 0
        return length

    def check_content_type(self):
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("The body must be application/json",
                                       {"content_type": ctype})

    def read_exactly(self, length):
        self.server.deadlines.arm(self.connection, BODY_DEADLINE_SECONDS)
        try:
            raw = self.rfile.read(length)
        finally:
            self.server.deadlines.disarm(self.connection)
        if len(raw) != length:
            self.close_connection = True
            raise BadRequest("The body ended early")
        self.body_pending = False
        return raw

    def discard_body(self, length):
        if length:
            self.read_exactly(length)

    # -- dispatch --------------------------------------------------------------
    def dispatch(self):
        if self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"):
            self.body_pending = True
        client_rid = self.headers.get("X-Request-Id", "")
        if REQUEST_ID_RE.match(client_rid):
            self.request_id = client_rid
        try:
            reply = self.route_request()
        except ApiError as exc:
            reply = Reply(exc.status, exc.body(), exc.headers)
        except psycopg.OperationalError as exc:
            error = postgres_unavailable(exc)
            reply = Reply(error.status, error.body())
        except Exception:
            log.error("request %s failed:\n%s", self.request_id, traceback.format_exc())
            error = ApiError(f"Internal error; see the log for request {self.request_id}",
                             {"request_id": self.request_id})
            reply = Reply(error.status, error.body())
        if self.body_pending:
            self.close_connection = True  # an unread body would be taken as the next request
        self.send_reply(reply)

    def route_request(self):
        app = self.server.app
        path, _, query = self.path.partition("?")
        route, params = find_route(self.command, path)
        key = self.authenticate(app, route)
        authorize(route, key)
        body = self.read_body(route)
        request = Request(self.command, params, urllib.parse.parse_qs(query), body,
                          key, self.request_id, self.client_address[0])
        with self.server.work_slot():
            result = route.handler(app, request)
        return result if isinstance(result, Reply) else Reply(HTTPStatus.OK, result)

    def authenticate(self, app, route):
        """The key record, rate-limited; None only for routes needing no key."""
        secret = self.bearer_token()
        key = app.keys.authenticate(secret) if secret else None
        if key is not None:
            self.key_name = key["name"]
        # Requests without a valid key share a bucket per TCP peer, which also
        # throttles key guessing; client headers (X-Forwarded-For) are ignored.
        identity = "key:" + key["name"] if key else "addr:" + self.client_address[0]
        allowed, headers = app.limiter.take(identity)
        self.extra_headers.update(headers)
        if not allowed:
            self.server.stats_rate_limited += 1
            raise RateLimited("Too many requests; retry later",
                              {"retry_after": int(headers["Retry-After"])})
        if key is None and route.scope is not None:
            raise Unauthorized("A valid API key is required" if secret is None
                               else "Unknown or revoked API key")
        return key

    def bearer_token(self):
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Unauthorized("Authorization must be 'Bearer <key>'")
        return token

    # -- writing ---------------------------------------------------------------
    def send_reply(self, reply):
        """Status line, headers and body in one write (Nagle meets delayed ACK
        otherwise: ~40 ms per keep-alive request)."""
        body = b""
        if reply.body is not None:
            body = (json.dumps(reply.body, ensure_ascii=False) + "\n").encode("utf-8")
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   "X-Request-Id": self.request_id,
                   "Date": email.utils.formatdate(usegmt=True),
                   "Server": self.server_version}
        if reply.status == HTTPStatus.NO_CONTENT:
            del headers["Content-Type"], headers["Content-Length"]
        headers.update(self.extra_headers)
        headers.update(reply.headers)
        if self.close_connection or self.server.stopping:
            headers["Connection"] = "close"
            self.close_connection = True
        lines = [f"HTTP/1.1 {reply.status.value} {reply.status.phrase}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self.log_access(reply.status)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (bad request line, long headers) as JSON."""
        status = HTTPStatus(code)
        self.close_connection = True
        if not hasattr(self, "started"):
            self._reset_request_state()
        self.command = getattr(self, "command", None) or "-"
        if self.command == "HEAD":
            self.command = "-"  # the stdlib parsed nothing; send the body anyway
        # Everything the stdlib rejects itself is the client's doing (even 505,
        # an HTTP version it cannot speak), so the code is BAD_REQUEST.
        error = BadRequest(message or status.phrase, {"http_status": status.value})
        self.send_reply(Reply(status, error.body()))

    def log_access(self, status):
        elapsed = (time.monotonic() - self.started) * 1000
        path = getattr(self, "path", "-").partition("?")[0]
        self.server.count_request(status)
        log.info("%s %r %d %.1fms key=%s rid=%s", getattr(self, "command", "-"), path,
                 status.value, elapsed, self.key_name, self.request_id)

    def log_message(self, fmt, *args):
        log.info("http: %s", (fmt % args).encode("unicode_escape").decode("ascii"))


class PigletServer(http.server.ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app):
        config = app.config
        self.address_family = (socket.AF_INET6 if ":" in config["listen"]
                               else socket.AF_INET)
        self.app = app
        self.deadlines = Deadlines()
        self.stopping = False
        self.stats_rate_limited = 0
        self._slots = threading.BoundedSemaphore(config["workers"])
        self._lock = threading.Lock()
        self._connections = 0
        self._in_flight = 0
        super().__init__((config["listen"], config["port"]), RequestHandler)

    @contextlib.contextmanager
    def work_slot(self):
        """Bound on concurrent handler work; idle connections hold no slot."""
        if not self._slots.acquire(timeout=WORK_SLOT_WAIT_SECONDS):
            raise Unavailable("Piglet is busy; retry shortly", "piglet")
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
            self._slots.release()

    def count_request(self, status):
        pass  # metrics hook

    def process_request(self, request, client_address):
        with self._lock:
            full = self._connections >= self.app.config["max_connections"]
            if not full:
                self._connections += 1
        if full:
            self.refuse(request)
            return
        super().process_request(request, client_address)

    def refuse(self, sock):
        body = json.dumps(Unavailable("Too many connections", "piglet").body()).encode()
        with contextlib.suppress(OSError):
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.shutdown_request(sock)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections -= 1

    def in_flight(self):
        with self._lock:
            return self._in_flight

    def handle_error(self, request, client_address):
        log.error("unhandled error on a connection from %s:\n%s",
                  client_address[0], traceback.format_exc())


# ---------------------------------------------------------------------------
# Lifecycle: systemd notification, signals, serve
# ---------------------------------------------------------------------------


def sd_notify(message):
    """Tell systemd about our state (Type=notify); a no-op without systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())


def install_signal_handlers(server, app):
    def on_term(signum, frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        server.stopping = True
        sd_notify("STOPPING=1")
        # shutdown() waits for serve_forever, which runs in this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    def on_hup(signum, frame):
        threading.Thread(target=reload_app, args=(app,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)


def reload_app(app):
    sd_notify("RELOADING=1")
    try:
        app.reload()
        log.info("reloaded %s", app.config_file)
    except (ConfigError, OSError) as exc:
        log.error("reload failed, keeping the running config: %s", exc)
    sd_notify("READY=1")


def housekeeping(app, server):
    """Background chores: flush key use times."""
    while not server.stopping:
        time.sleep(5)
        try:
            app.keys.flush_last_used()
        except OSError as exc:
            log.warning("could not record key use: %s", exc)


def serve(config, config_file):
    app = App(config, config_file)
    server = PigletServer(app)
    host, port = server.server_address[:2]
    if config["listen"] not in ("127.0.0.1", "::1", "localhost") and not config["tls"]["cert"]:
        log.warning("listening on %s without TLS: keys cross the network in clear", host)
    install_signal_handlers(server, app)
    threading.Thread(target=housekeeping, args=(app, server), daemon=True).start()
    log.info("piglet %s listening on %s:%d (postgres: %s)", VERSION, host, port,
             redact_dsn(config["postgres"]["dsn"]))
    sd_notify("READY=1")
    server.serve_forever(poll_interval=0.5)
    drain(server)
    with contextlib.suppress(OSError):
        app.keys.flush_last_used(force=True)
    server.server_close()
    app.db.close()
    log.info("stopped")
    return 0


def drain(server):
    """Let in-flight requests finish, within SHUTDOWN_GRACE_SECONDS."""
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while server.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.in_flight():
        log.warning("%d requests still running at exit", server.in_flight())


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def command_key(args, config):
    store = KeyStore(config["keys_file"])
    if args.key_command == "create":
        secret, _ = store.create(args.name, args.scope)
        print(secret)
    elif args.key_command == "list":
        for key in store.list():
            print(f"{key['name']}\t{key['scope']}\tcreated {key['created_at']}"
                  f"\tlast used {key['last_used_at'] or 'never'}")
    else:
        store.revoke(args.name)
        print(f"revoked {args.name}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="piglet.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="config file (default: $PIGLET_CONFIG or "
                        + DEFAULT_CONFIG_PATH + ")")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the API server")
    serve_parser.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    key = commands.add_parser("key", help="manage API keys")
    key.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    key_commands = key.add_subparsers(dest="key_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", choices=SCOPES, default="admin")
    key_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("--name", required=True)
    for sub in (create, revoke):
        sub.add_argument("--config", dest="leaf_config", help=argparse.SUPPRESS)
    key_commands.choices["list"].add_argument("--config", dest="leaf_config",
                                              help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = (getattr(args, "leaf_config", None) or getattr(args, "sub_config", None)
                   or args.config)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    logging.getLogger().setLevel(config["log_level"])
    try:
        if args.command == "key":
            return command_key(args, config)
        return serve(config, path)
    except ApiError as exc:
        print(f"piglet: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
