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
- A restore's safety backup ends a moment before PostgreSQL is stopped;
  writes committed in between are in neither the safety backup nor the
  restored cluster.
- Logical restores recreate databases with their owner, encoding and
  locale, not database-level settings or grants (ALTER DATABASE ... SET,
  GRANT ... ON DATABASE); roles are dumped (roles.sql) but never applied.
- A restore interrupted by a crash of Piglet leaves PostgreSQL as it was at
  that moment; the job reads INTERRUPTED and names nothing more.
"""

import argparse
import base64
import contextlib
import copy
import datetime
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

    def submit(self, kind, request, work, exclusive=True, conflicts=()):
        """Start `work(job)` in a thread; its return value becomes the result.

        `conflicts`: kinds of job that must not be queued or running meanwhile.
        """
        with self.lock:
            running = self.exclusive if exclusive else None
            running = running or next(
                (j for j in self.jobs.values() if j.data["kind"] in conflicts
                 and j.data["state"] in ("queued", "running")), None)
            if running is not None:
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
#
# Physical backups are pgBackRest's (its label is the id); logical backups
# are folders of pg_dump custom-format files under backups.dir.  Every tool
# runs as the cluster's OS user in its own process group, so files in the
# repository stay the cluster's and a tool orphaned by a crash of Piglet
# can be found and stopped at the next start (reap_orphan_tools).

BACKUP_TIMEOUT = 6 * 3600       # one pgbackrest backup, pg_dump or pg_restore
RESTORE_TIMEOUT = 6 * 3600      # one pgbackrest restore
PGBACKREST_SHORT_TIMEOUT = 120  # info, stanza-create, expire
ARCHIVE_WAIT_SECONDS = 60       # a switched WAL segment must be archived within this
RECOVERY_WAIT_SECONDS = 900     # after a restore: until PostgreSQL is promoted and writable
TOOL_STOP_GRACE_SECONDS = 10    # SIGTERM to SIGKILL for a tool past its timeout
DEFAULT_LOCK_PATH = "/tmp/pgbackrest"   # pgBackRest's default lock-path

PHYSICAL_LABEL_RE = re.compile(r"^\d{8}-\d{6}F(_\d{8}-\d{6}[DI])?$")
LOGICAL_ID_RE = re.compile(r"^\d{8}-\d{6}L-[0-9a-f]{6}$")
RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?"
                        r"([Zz]|[+-]\d{2}:\d{2})$")
WAL_NAME_RE = re.compile(r"^[0-9A-F]{24}$")
PARTIAL_PREFIX = ".partial-"
RESTORE_DB_PREFIX = "piglet_restore_"
PHYSICAL_TYPES = ("full", "diff", "incr")
# Roles a schema-only script names: owners and grantees.
ROLE_REF_RE = re.compile(r'(?:OWNER TO|GRANT .* TO|REVOKE .* FROM) (.+?)(?: WITH .*|'
                         r' GRANTED BY .*)?;$')
IDENT_RE = re.compile(r'"((?:[^"]|"")+)"|([^\s,"]+)')


class JobFailed(ApiError):
    """A job's own failure; `code` names what failed (e.g. BACKUP_FAILED)."""

    def __init__(self, code, message, details=None):
        super().__init__(message, details)
        self.code = code


def tool_user(app):
    """The cluster's OS user, never root (files in the repository stay its own)."""
    import pwd
    user = app.config["postgres"]["os_user"]
    try:
        if pwd.getpwnam(user).pw_uid == 0:
            raise Unavailable("postgres.os_user must not be root", "postgres")
    except KeyError:
        raise Unavailable(f"OS user {user!r} does not exist", "postgres") from None
    return user


def as_user(user):
    """subprocess keyword arguments that run a child as `user`."""
    if user == current_user():
        return {}
    return {"user": user, "group": primary_group(user), "extra_groups": []}


def tool_conninfo(app, dbname):
    """Where PostgreSQL tools connect: Piglet's host and port, as the OS user's role."""
    params = psycopg.conninfo.conninfo_to_dict(app.config["postgres"]["dsn"])
    params.pop("password", None)
    params.update(user=app.config["postgres"]["os_user"], dbname=dbname)
    return psycopg.conninfo.make_conninfo(**params)


# -- running tools -----------------------------------------------------------

def tool_pid_file(app, job):
    return os.path.join(app.jobs.dir, job.id + ".tool")


def run_tool(app, job, argv, timeout, stdout=None, stdin=None, poll=None, reap=True):
    """Run a PostgreSQL tool as the cluster's OS user; returns (exit code, lines).

    Output lines go to the job's log as they come.  With `reap`, the process
    group is recorded so that the next start of Piglet stops a tool that
    outlived it (a kill -9 leaves it running, holding pgBackRest's lock).
    """
    kwargs = as_user(tool_user(app))
    proc = subprocess.Popen(
        argv, stdin=stdin or subprocess.DEVNULL, cwd="/", start_new_session=True,
        stdout=stdout or subprocess.PIPE,
        stderr=subprocess.PIPE if stdout else subprocess.STDOUT, **kwargs)
    pid_file = tool_pid_file(app, job)
    if reap:
        atomic_write_json(pid_file, {"pid": proc.pid, "tool": os.path.basename(argv[0])})
    lines = []
    reader = threading.Thread(target=collect_lines,
                              args=(proc.stderr if stdout else proc.stdout, lines, job),
                              daemon=True)
    reader.start()
    try:
        wait_tool(proc, argv, timeout, poll, lines)
    finally:
        reader.join(timeout=5)
        if reap:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pid_file)
    return proc.returncode, lines


def collect_lines(stream, lines, job):
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            lines.append(line)
            del lines[:-400]
            job.log(line)


def wait_tool(proc, argv, timeout, poll, lines):
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=1)
            return
        except subprocess.TimeoutExpired:
            pass
        if poll:
            poll(lines)
        if time.monotonic() > deadline:
            stop_process_group(proc.pid)
            proc.wait()
            raise JobFailed("TIMEOUT", f"{os.path.basename(argv[0])} did not finish "
                            f"within {timeout} s and was stopped", {"timeout": timeout})


def stop_process_group(pgid):
    """SIGTERM (and SIGCONT, should it be stopped), then SIGKILL after a grace
    period, to a tool's whole process group."""
    for signals in ((signal.SIGTERM, signal.SIGCONT), (signal.SIGKILL,)):
        for sig in signals:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + TOOL_STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-pgid, os.WNOHANG)
            if not group_alive(pgid):
                return
            time.sleep(0.1)


def group_alive(pgid):
    """Whether a process of the group still runs; zombies do not count (an
    orphan's zombie waits for a PID 1 that may never reap it).  Where /proc
    hides other users' processes (ProtectProc=invisible), a group that still
    answers signals counts as alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    seen = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            if fields[0] != "Z":
                return True
            seen = True
    return not seen


def reap_orphan_tools(jobs_dir):
    """At start-up: stop backup tools a killed Piglet left running.

    pgBackRest holds its lock for as long as its process lives; an orphaned
    backup would make every new one fail until it ends, and the job that
    owned it already reads INTERRUPTED.
    """
    for name in os.listdir(jobs_dir):
        if not name.endswith(".tool"):
            continue
        path = os.path.join(jobs_dir, name)
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
            pid = int(record["pid"])
            if os.getpgid(pid) == pid and record["tool"] in process_cmdline(pid):
                log.warning("stopping %s (pid %d) left by a previous run",
                            record["tool"], pid)
                stop_process_group(pid)
        with contextlib.suppress(OSError):
            os.unlink(path)


def process_cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode("utf-8", "replace")


def tool_error(lines):
    """pgBackRest's own ERROR line (and its HINT), else the last lines."""
    for index, line in enumerate(lines):
        if "ERROR: [" in line:
            found = line.split("ERROR: ", 1)[1]
            hint = [h.strip() for h in lines[index + 1:index + 2] if "HINT:" in h]
            return " ".join([found] + hint)
    return " | ".join(lines[-3:]) or "no output"


# -- pgBackRest ----------------------------------------------------------------

class PgBackRest:
    """pgbackrest with the configured --config and --stanza, as the OS user."""

    def __init__(self, app):
        self.app = app
        self.stanza = app.config["pgbackrest"]["stanza"]
        self.config_file = app.config["pgbackrest"]["config"]

    def configured(self):
        """None when usable, else why not."""
        if not self.app.config["pgbackrest"]["enabled"]:
            return "pgBackRest is disabled in Piglet's config"
        if not shutil.which("pgbackrest"):
            return "pgbackrest is not installed"
        if not os.path.isfile(self.config_file):
            return f"pgBackRest config {self.config_file} does not exist"
        return None

    def require(self):
        reason = self.configured()
        if reason:
            raise Unavailable(reason, "pgbackrest")

    def argv(self, command, *options):
        return ["pgbackrest", f"--config={self.config_file}", f"--stanza={self.stanza}",
                *options, command]

    def run_short(self, command, *options):
        try:
            return run_command(self.argv(command, *options), user=tool_user(self.app),
                               timeout=PGBACKREST_SHORT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"pgbackrest {command} timed out", "pgbackrest") from None

    def info(self):
        """The stanza's entry of `info --output=json` ({} when there is none yet)."""
        result = self.run_short("info", "--output=json")
        if result.returncode != 0:
            raise Unavailable("pgbackrest info failed: " + tool_error(
                (result.stderr + result.stdout).splitlines()), "pgbackrest")
        stanzas = json.loads(result.stdout or "[]")
        return next((s for s in stanzas if s.get("name") == self.stanza), {})

    def backups(self):
        return [b for b in self.info().get("backup", []) if b.get("label")]

    def stanza_missing(self, info):
        # Status 1 is pgBackRest's "missing stanza path": nothing created yet.
        return info.get("status", {}).get("code") == 1 or not info.get("db")


def physical_backup_object(backup):
    stamps, info = backup.get("timestamp", {}), backup.get("info", {})
    repo = info.get("repository", {})
    size = repo.get("delta", info.get("delta", 0)) or 0
    return {"id": backup["label"], "method": "physical", "type": backup.get("type"),
            "size": human_size(size), "size_bytes": size,
            "created_at": utc_iso(stamps.get("start")),
            "finished_at": utc_iso(stamps.get("stop")),
            "databases": "all", "prior": backup.get("prior"),
            "database_size_bytes": info.get("size"),
            "repository_size_bytes": repo.get("size"),
            "wal": backup.get("archive"), "lsn": backup.get("lsn"),
            "checksum_errors": bool(backup.get("error"))}


def dependents_of(label, backups):
    """Labels of the backups that need `label` to be restored."""
    return [b["label"] for b in backups
            if b["label"] != label and (label in (b.get("reference") or [])
                                        or b.get("prior") == label)]


# -- recovery window -----------------------------------------------------------

def archiver_state(app):
    """pg_stat_archiver's row plus archive_mode, or None when PostgreSQL is down."""
    try:
        with app.db.connect(timeout=3) as conn:
            with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
                cur.execute("SELECT current_setting('archive_mode') AS mode, "
                            "last_archived_wal, last_archived_time, last_failed_wal, "
                            "last_failed_time FROM pg_stat_archiver")
                return cur.fetchone()
    except (ApiError, psycopg.Error):
        return None


def archiver_healthy(state):
    if state is None or state["mode"] == "off":
        return False
    failed, archived = state["last_failed_time"], state["last_archived_time"]
    return failed is None or (archived is not None and archived > failed)


def recovery_window(app, backups):
    """What point-in-time restore can reach.

    earliest: the stop time of the oldest backup.  latest: now, when WAL
    archiving works (a time-target restore switches WAL and waits for the
    archive before it touches anything); else the newest backup's stop time,
    the last point known to be restorable.
    """
    stops = [b["timestamp"]["stop"] for b in backups if not b.get("error")]
    if not stops:
        return {"earliest": None, "latest": None}
    latest = time.time() if archiver_healthy(archiver_state(app)) else max(stops)
    return {"earliest": utc_iso(min(stops)), "latest": utc_iso(latest)}


def wal_reached(archived, segment):
    """Whether pg_stat_archiver's last_archived_wal covers `segment`.

    Backup history files (SEGMENT.OFFSET.backup) are archived before their
    segment, so only a later segment name, or the segment itself, counts.
    """
    if not archived:
        return False
    base = archived[:24]
    if not WAL_NAME_RE.match(base):
        return False
    return base > segment or archived == segment


def seal_archive(app):
    """Write a commit, switch WAL and wait for the archive; the segment or None.

    Recovery to a target time stops at the first commit after it, and
    PostgreSQL refuses to end recovery short of its target: so the archive
    must hold a commit later than any target up to now.  None means the
    archiver failed or did not catch up within ARCHIVE_WAIT_SECONDS.
    """
    with app.db.connect(timeout=5) as conn:
        conn.execute("SELECT txid_current()")
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        started = conn.execute("SELECT now()").fetchone()[0]
        deadline = time.monotonic() + ARCHIVE_WAIT_SECONDS
        while time.monotonic() < deadline:
            row = conn.execute("SELECT last_archived_wal, last_failed_wal, "
                               "last_failed_time FROM pg_stat_archiver").fetchone()
            if wal_reached(row[0], segment):
                return segment
            if row[1] == segment and row[2] is not None and row[2] >= started:
                log.warning("archiving WAL segment %s failed", segment)
                return None
            time.sleep(0.2)
    log.warning("WAL segment %s not archived within %d s", segment, ARCHIVE_WAIT_SECONDS)
    return None


def parse_target_time(value):
    """RFC 3339 with an explicit offset -> epoch seconds (float)."""
    if not isinstance(value, str) or not RFC3339_RE.match(value):
        raise BadRequest("target_time must be RFC 3339 with an offset, e.g. "
                         "2024-05-01T12:00:00Z", {"field": "target_time", "value": value})
    text = re.sub(r"[Zz]$", "+00:00", value)
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)  # fromisoformat takes microseconds
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadRequest("target_time is not a valid time",
                         {"field": "target_time", "value": value}) from None


def pgbackrest_time(epoch):
    """UTC with an explicit +00:00, as PostgreSQL's recovery_target_time reads it."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f+00:00")


def check_target_time(app, backup, backups, target):
    """400 unless `target` lies between the backup's stop and the end of archived WAL."""
    earliest = backup["timestamp"]["stop"]
    now = time.time()
    window = {"earliest": utc_iso(earliest), "latest": utc_iso(now)}
    details = {"target_time": utc_iso_fraction(target), "backup": backup["label"],
               "window": window}
    if earliest <= target <= now:
        if app.postgres_info() is not None and seal_archive(app):
            return
        # Archived WAL ends before now: only the newest backup's end is sure.
        window["latest"] = utc_iso(max(b["timestamp"]["stop"] for b in backups))
        details["archive"] = "WAL archiving is failing or PostgreSQL is down"
        if target <= max(b["timestamp"]["stop"] for b in backups):
            return
    raise BadRequest("target_time is outside the window this backup can reach", details)


def utc_iso_fraction(epoch):
    text = utc_iso(int(epoch))
    fraction = epoch - int(epoch)
    return text if fraction < 1e-6 else text[:-1] + f"{fraction:.6f}"[1:].rstrip("0") + "Z"


# -- logical backups -----------------------------------------------------------

def backups_dir(app):
    path = app.config["backups"]["dir"]
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def new_logical_folder(directory):
    """(id, hidden work folder): ids stay unique within one second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    while True:
        backup_id = f"{stamp}L-{secrets.token_hex(3)}"
        partial = os.path.join(directory, PARTIAL_PREFIX + backup_id)
        if os.path.exists(os.path.join(directory, backup_id)):
            continue
        with contextlib.suppress(FileExistsError):
            os.mkdir(partial, 0o700)
            return backup_id, partial


def read_manifest(app, backup_id):
    """The manifest of a logical backup, or None; the id is checked first."""
    if not LOGICAL_ID_RE.match(backup_id):
        return None
    path = os.path.join(backups_dir(app), backup_id, "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def logical_backups(app):
    directory = backups_dir(app)
    found = []
    for name in sorted(os.listdir(directory)):
        manifest = read_manifest(app, name)
        if manifest is not None:
            found.append(logical_backup_object(manifest))
    return found


def logical_backup_object(manifest):
    size = sum(d["size_bytes"] for d in manifest["databases"]) + manifest.get(
        "roles_size_bytes", 0)
    return {"id": manifest["id"], "method": "logical", "type": "logical",
            "size": human_size(size), "size_bytes": size,
            "created_at": manifest["created_at"], "finished_at": manifest["finished_at"],
            "databases": [d["name"] for d in manifest["databases"]],
            "roles": bool(manifest.get("roles_file"))}


def clean_partial_dumps(directory):
    """Folders of dumps a killed Piglet never finished: never listed, removed."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def database_facts(app, names):
    """name -> owner, encoding, collate, ctype for the databases that exist."""
    rows = app.db.query(
        "SELECT datname AS name, pg_get_userbyid(datdba) AS owner, "
        "pg_encoding_to_char(encoding) AS encoding, datcollate AS collate, "
        "datctype AS ctype FROM pg_database WHERE datname = ANY(%s)", (list(names),))
    return {r["name"]: r for r in rows}


def all_database_names(app):
    rows = app.db.query("SELECT datname FROM pg_database WHERE datallowconn "
                        "AND NOT datistemplate AND datname NOT LIKE %s ORDER BY datname",
                        (RESTORE_DB_PREFIX + "%",))
    return [r["datname"] for r in rows]


def dump_databases(app, job, names, with_roles):
    """Dump into a hidden folder, then rename it: a failure leaves nothing listed."""
    directory = backups_dir(app)
    backup_id, partial = new_logical_folder(directory)
    manifest = {"id": backup_id, "method": "logical", "format": 1,
                "created_at": utc_iso(time.time()), "databases": [], "roles_file": None}
    try:
        facts = database_facts(app, names)
        for index, name in enumerate(names, 1):
            if name not in facts:
                raise JobFailed("BACKUP_FAILED", f"Database {name!r} no longer exists",
                                {"database": name})
            manifest["databases"].append(dump_one(app, job, partial, index, facts[name]))
            job.set_progress(int(100 * index / (len(names) + 1)))
        if with_roles:
            manifest["roles_size_bytes"] = dump_roles(app, job, partial)
            manifest["roles_file"] = "roles.sql"
        manifest["finished_at"] = utc_iso(time.time())
        manifest["postgres_version"] = (app.postgres_info() or {}).get("version")
        atomic_write_json(os.path.join(partial, "manifest.json"), manifest)
        os.rename(partial, os.path.join(directory, backup_id))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def dump_one(app, job, folder, index, facts):
    """pg_dump -Fc, its stdout streamed into a file only root can read."""
    filename = f"db-{index:04d}.dump"
    path = os.path.join(folder, filename)
    job.log(f"piglet: dumping database {facts['name']!r}")
    with open(path, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
        code, lines = run_tool(app, job, ["pg_dump", "-Fc", "--dbname",
                                          tool_conninfo(app, facts["name"])],
                               BACKUP_TIMEOUT, stdout=out)
    if code != 0:
        raise JobFailed("BACKUP_FAILED", f"pg_dump of {facts['name']!r} failed: "
                        + tool_error(lines), {"database": facts["name"], "exit_code": code})
    return dict(facts, file=filename, size_bytes=os.path.getsize(path))


def dump_roles(app, job, folder):
    path = os.path.join(folder, "roles.sql")
    with open(path, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
        code, lines = run_tool(app, job, ["pg_dumpall", "--roles-only", "--dbname",
                                          tool_conninfo(app, "postgres")],
                               BACKUP_TIMEOUT, stdout=out)
    if code != 0:
        raise JobFailed("BACKUP_FAILED", "pg_dumpall --roles-only failed: "
                        + tool_error(lines), {"exit_code": code})
    return os.path.getsize(path)


# -- physical backups ----------------------------------------------------------

def lock_progress(stanza):
    """A poll function: pgBackRest 2.45 writes pctCplt (hundredths of a percent)
    into its backup lock file; its JSON `info` shows only whether it is held."""
    seen = {"lock_path": None}

    def poll(job, lines):
        # The "command begin" line lists non-default options, lock-path among them.
        for line in lines[:5] if seen["lock_path"] is None else ():
            found = re.search(r"--lock-path=(\S+)", line)
            if found or "command begin" in line:
                seen["lock_path"] = found.group(1) if found else DEFAULT_LOCK_PATH
        try:
            with open(os.path.join(seen["lock_path"] or DEFAULT_LOCK_PATH,
                                   f"{stanza}-backup.lock"),
                      encoding="utf-8") as handle:
                percent = json.load(handle).get("pctCplt")
        except (OSError, ValueError):
            return
        if isinstance(percent, int):
            job.set_progress(min(99, percent // 100))
    return poll


def ensure_stanza(app, job, pgbr):
    """Create the stanza when the repository has none yet; True if created."""
    if not pgbr.stanza_missing(pgbr.info()):
        return False
    job.log(f"piglet: stanza {pgbr.stanza!r} does not exist yet; creating it")
    code, lines = run_tool(app, job, pgbr.argv("stanza-create", "--log-level-console=info"),
                           PGBACKREST_SHORT_TIMEOUT)
    if code != 0:
        raise JobFailed("BACKUP_FAILED", "pgbackrest stanza-create failed: "
                        + tool_error(lines), {"exit_code": code})
    return True


def physical_backup(app, job, backup_type):
    """One pgbackrest backup; returns its label."""
    pgbr = PgBackRest(app)
    created = ensure_stanza(app, job, pgbr)
    poll = lock_progress(pgbr.stanza)
    code, lines = run_tool(app, job, pgbr.argv("backup", f"--type={backup_type}",
                                               "--log-level-console=info"),
                           BACKUP_TIMEOUT, poll=lambda lines: poll(job, lines))
    if code != 0:
        raise JobFailed("BACKUP_FAILED", "pgbackrest backup failed: " + tool_error(lines),
                        {"exit_code": code, "stanza": pgbr.stanza})
    label = next((m.group(1) for m in map(re.compile(r"new backup label = (\S+)").search,
                                          lines) if m), None)
    if label is None:
        label = pgbr.backups()[-1]["label"]
    return label, created


# -- restores --------------------------------------------------------------------

def wait_writable(app, timeout):
    """Until pg_is_in_recovery() is false and a write commits; the timeline."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with app.db.connect(timeout=3) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    last = "still in recovery"
                else:
                    with conn.transaction():
                        conn.execute("CREATE TEMP TABLE piglet_write_check (x int)")
                        conn.execute("INSERT INTO piglet_write_check VALUES (1)")
                    conn.execute("SELECT txid_current()")
                    return conn.execute("SELECT timeline_id FROM "
                                        "pg_control_checkpoint()").fetchone()[0]
        except (ApiError, psycopg.Error) as exc:
            last = exc.message if isinstance(exc, ApiError) else first_line(exc)
            if postgres_gone(app):
                raise JobFailed("RESTORE_FAILED", f"PostgreSQL is not running ({last})",
                                {"service": app.config["postgres"]["service"]}) from None
        time.sleep(0.5)
    raise JobFailed("RESTORE_FAILED", f"PostgreSQL did not accept writes within "
                    f"{timeout} s ({last})", {"timeout": timeout})


def postgres_gone(app):
    """Whether the PostgreSQL service has stopped or failed (e.g. a FATAL in
    recovery), so waiting longer for it is pointless."""
    try:
        status = app.services.get(app.config["postgres"]["service"])["status"]
    except ApiError:
        return False
    return status in ("stopped", "failed")


def postgres_act(app, job, action):
    job.log(f"piglet: {action} PostgreSQL")
    try:
        app.services.act(app.config["postgres"]["service"], action)
    finally:
        app.db.close()            # pooled sessions died with the server
        app.db.health.invalidate()


def start_postgres(app, job):
    """Start through the services layer and wait until it takes writes.

    A start command may give up (pg_ctl waits 60 s) while recovery goes on,
    so a failed start is only logged; the write check decides.
    """
    try:
        postgres_act(app, job, "start")
    except ApiError as exc:
        job.log(f"piglet: start reported: {exc.message}")
    return wait_writable(app, RECOVERY_WAIT_SECONDS)


def pgbackrest_restore(app, job, label, target=None):
    pgbr = PgBackRest(app)
    options = ["--delta", f"--set={label}", "--target-action=promote",
               "--log-level-console=info"]
    if target is None:
        options.append("--type=immediate")   # the end of that backup, no more WAL
    else:
        options += ["--type=time", f"--target={pgbackrest_time(target)}"]
    code, lines = run_tool(app, job, pgbr.argv("restore", *options), RESTORE_TIMEOUT,
                           reap=False)
    if code != 0:
        # [038]: PostgreSQL still running; pgBackRest stopped before any change.
        untouched = any("[038]" in line for line in lines)
        raise JobFailed("RESTORE_FAILED", "pgbackrest restore failed: " + tool_error(lines),
                        {"exit_code": code, "data_untouched": untouched})


def physical_restore(app, job, label, target, safety):
    """The restore job: safety backup, stop, restore, start, verify; else roll back."""
    safety_label = None
    if safety:
        job.log("piglet: taking the safety backup of the present")
        safety_label, _ = physical_backup(app, job, "incr")
    job.set_progress(None)
    stage = "stop"
    try:
        postgres_act(app, job, "stop")
        stage = "restore"
        pgbackrest_restore(app, job, label, target)
        stage = "start"
        timeline = start_postgres(app, job)
    except Exception as exc:  # noqa: BLE001 - every failure must bring PostgreSQL back
        if not isinstance(exc, ApiError):
            log.error("restore job %s: %s", job.id, traceback.format_exc())
            exc = JobFailed("RESTORE_FAILED", first_line(exc))
        untouched = stage == "stop" or (stage == "restore"
                                        and exc.details.get("data_untouched"))
        raise roll_back(app, job, exc, stage, untouched, safety_label) from None
    return {"backup": label, "target_time": None if target is None
            else utc_iso_fraction(target), "safety_backup": safety_label,
            "timeline": timeline, "postgres": "running"}


def roll_back(app, job, error, stage, untouched, safety_label):
    """Bring PostgreSQL back after a failed restore; the JobFailed to report."""
    details = {"stage": stage, "cause": error.message, "safety_backup": safety_label}
    try:
        if untouched:
            job.log("piglet: data untouched; starting PostgreSQL on it")
            start_postgres(app, job)
            outcome = "PostgreSQL runs again on its previous, untouched data"
        elif safety_label:
            job.log(f"piglet: restoring the safety backup {safety_label}")
            with contextlib.suppress(ApiError):
                postgres_act(app, job, "stop")
            pgbackrest_restore(app, job, safety_label)
            start_postgres(app, job)
            outcome = f"PostgreSQL was restored from the safety backup {safety_label}"
        else:
            outcome = "no safety backup was taken; PostgreSQL's data may be half restored"
            details["postgres"] = "unknown"
            return JobFailed("RESTORE_FAILED", f"Restore failed at {stage}: "
                             f"{error.message}; {outcome}", details)
    except ApiError as second:
        details.update(postgres="down", rollback_error=second.message)
        return JobFailed("RESTORE_FAILED", f"Restore failed at {stage}: {error.message}; "
                         f"bringing PostgreSQL back also failed: {second.message}", details)
    details["postgres"] = "running"
    return JobFailed("RESTORE_FAILED", f"Restore failed at {stage}: {error.message}; "
                     f"{outcome}", details)


def role_references(script):
    """Role names a schema-only SQL script assigns ownership or privileges to."""
    roles = set()
    for line in script.splitlines():
        found = ROLE_REF_RE.search(line)
        if not found:
            continue
        for quoted, plain in IDENT_RE.findall(found.group(1)):
            name = quoted.replace('""', '"') if quoted else plain
            if name.upper() not in ("PUBLIC", "GROUP", "CURRENT_USER", "SESSION_USER",
                                    "CURRENT_ROLE"):
                roles.add(name)
    return roles


def missing_roles(app, job, folder, entries):
    """Roles the dumps need that the cluster lacks (owners, grantees)."""
    needed = {d["owner"] for d in entries}
    for entry in entries:
        with open(os.path.join(folder, entry["file"]), "rb") as dump:
            proc = subprocess.run(["pg_restore", "--schema-only", "-f", "-"], stdin=dump,
                                  capture_output=True, timeout=BACKUP_TIMEOUT, cwd="/",
                                  **as_user(tool_user(app)))
        if proc.returncode != 0:
            raise JobFailed("RESTORE_FAILED", f"Cannot read the dump of {entry['name']!r}: "
                            + proc.stderr.decode("utf-8", "replace").strip()[-300:])
        needed |= role_references(proc.stdout.decode("utf-8", "replace"))
    rows = app.db.query("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                        (sorted(needed),))
    return sorted(needed - {r["rolname"] for r in rows})


def restore_into_temp(app, job, folder, entry):
    """A new database filled from the dump; its name. Dropped again on failure."""
    temp = RESTORE_DB_PREFIX + secrets.token_hex(6)
    app.db.query(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING {} "
                         "LC_COLLATE {} LC_CTYPE {}").format(
        sql.Identifier(temp), sql.Identifier(entry["owner"]),
        sql.Literal(entry["encoding"]), sql.Literal(entry["collate"]),
        sql.Literal(entry["ctype"])))
    job.log(f"piglet: restoring {entry['name']!r} into {temp}")
    try:
        with open(os.path.join(folder, entry["file"]), "rb") as dump:
            code, lines = run_tool(app, job, ["pg_restore", "--exit-on-error",
                                              "--single-transaction", "--dbname",
                                              tool_conninfo(app, temp)],
                                   BACKUP_TIMEOUT, stdin=dump, reap=False)
        if code != 0:
            raise JobFailed("RESTORE_FAILED", f"pg_restore of {entry['name']!r} failed: "
                            + tool_error(lines), {"database": entry["name"]})
    except BaseException:
        drop_database(app, temp)
        raise
    return temp


def drop_database(app, name):
    with contextlib.suppress(ApiError, psycopg.Error):
        app.db.query(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def swap_databases(app, pairs):
    """Put each restored copy in place of its database, all renames in one
    transaction; the old databases are dropped after it commits."""
    maintenance = "template1" if any(n == "postgres" for n, _ in pairs) else "postgres"
    old = {name: RESTORE_DB_PREFIX + "old_" + secrets.token_hex(5) for name, _ in pairs}
    existing = set(database_facts(app, [n for n, _ in pairs]))
    with app.db.connect(maintenance) as conn:
        for name in existing:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident))
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        try:
            with conn.transaction():
                for name, temp in pairs:
                    if name in existing:
                        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                            sql.Identifier(name), sql.Identifier(old[name])))
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(temp), sql.Identifier(name)))
        except psycopg.Error:
            for name in existing:
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                    sql.Identifier(name)))
            raise
        for name in existing:
            with contextlib.suppress(psycopg.Error):
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    sql.Identifier(old[name])))
    app.db.close()


def logical_restore(app, job, manifest, names, safety):
    """Recreate each listed database whole from its dump."""
    folder = os.path.join(backups_dir(app), manifest["id"])
    entries = [d for d in manifest["databases"] if d["name"] in names]
    missing = missing_roles(app, job, folder, entries)
    if missing:
        raise JobFailed("MISSING_ROLES", "The dump's objects belong to roles that do not "
                        "exist: " + ", ".join(missing) + "; create them (the roles.sql "
                        "of a full logical backup has them) and retry", {"roles": missing})
    present = [n for n in names if n in database_facts(app, names)]
    safety_id = None
    if safety and present:
        job.log("piglet: dumping the present state of " + ", ".join(present))
        safety_id = dump_databases(app, job, present, False)["id"]
    pairs = []
    try:
        for entry in entries:
            pairs.append((entry["name"], restore_into_temp(app, job, folder, entry)))
        swap_databases(app, pairs)
    except BaseException:
        for _, temp in pairs:
            drop_database(app, temp)
        raise
    return {"backup": manifest["id"], "databases": [e["name"] for e in entries],
            "safety_backup": safety_id}


# -- handlers ----------------------------------------------------------------------

def list_backups(app, req):
    """200: physical (pgBackRest) and logical backups, newest first, and the
    window point-in-time restore can reach; 503 pgBackRest configured but failing."""
    pgbr = PgBackRest(app)
    physical = [] if pgbr.configured() else pgbr.backups()
    listed = [physical_backup_object(b) for b in physical] + logical_backups(app)
    listed.sort(key=lambda b: (b["created_at"] or "", b["id"]), reverse=True)
    return {"backups": listed, "recovery_window": recovery_window(app, physical)}


def create_backup(app, req):
    """202 job.  400 bad type/databases; 404 unknown database; 409 another
    cluster-wide operation (or a restore) runs; 503 pgBackRest not configured."""
    backup_type, names = req.body.get("type"), req.body.get("databases")
    if names is not None:
        return create_logical_backup(app, req, names, backup_type)
    backup_type = backup_type or "full"
    if backup_type == "logical":
        return submit_dump(app, req, all_database_names(app), True)
    PgBackRest(app).require()
    tool_user(app)

    def work(job):
        label, created = physical_backup(app, job, backup_type)
        return {"backup": label, "type": backup_type, "stanza_created": created}
    return job_accepted(app.jobs.submit("backup", req.body, work))


def create_logical_backup(app, req, names, backup_type):
    if backup_type not in (None, "full", "logical"):
        raise BadRequest("With 'databases', type must be omitted, 'full' or 'logical'",
                         {"field": "type", "allowed": ["full", "logical"]})
    if not names or len(set(names)) != len(names):
        raise BadRequest("databases must list distinct database names",
                         {"field": "databases"})
    facts = database_facts(app, names)
    for name in names:
        if name not in facts:
            raise NotFound("Database not found", {"database": name})
    return submit_dump(app, req, names, False)


def submit_dump(app, req, names, with_roles):
    # Dumps read through MVCC snapshots and may run beside anything but a
    # restore, which would pull the databases from under them.
    def work(job):
        manifest = dump_databases(app, job, names, with_roles)
        return {"backup": manifest["id"], "databases": names, "roles": with_roles}
    return job_accepted(app.jobs.submit("logical-backup", req.body, work,
                                        exclusive=False, conflicts=("restore",)))


def restore_backup(app, req):
    """202 job.  404 unknown backup; 400 bad target_time (outside the window:
    `details.window`), target_time on a logical backup, unknown databases;
    409 another cluster-wide operation runs; 503 pgBackRest not configured."""
    backup_id, body = req.params["id"], req.body
    safety = body.get("safety_backup", True)
    manifest = read_manifest(app, backup_id)
    if manifest is not None:
        return submit_logical_restore(app, req, manifest, safety)
    if not PHYSICAL_LABEL_RE.match(backup_id):
        raise NotFound("Backup not found", {"backup": backup_id})
    pgbr = PgBackRest(app)
    pgbr.require()
    backups = pgbr.backups()
    backup = next((b for b in backups if b["label"] == backup_id), None)
    if backup is None:
        raise NotFound("Backup not found", {"backup": backup_id})
    if "databases" in body:
        raise BadRequest("databases applies to logical backups only; a physical "
                         "restore replaces the whole cluster", {"field": "databases"})
    running = app.jobs.running_exclusive()
    if running is not None:
        raise Conflict(f"Another operation is running: job {running.id}",
                       {"job": running.id, "kind": running.data["kind"]})
    target = None
    if body.get("target_time") is not None:
        target = parse_target_time(body["target_time"])
        check_target_time(app, backup, backups, target)
    if safety and app.postgres_info() is None:
        raise Unavailable("PostgreSQL is down, so no safety backup can be taken; start "
                          "it, or restore with safety_backup false", "postgres")
    return job_accepted(app.jobs.submit(
        "restore", dict(body, backup=backup_id),
        lambda job: physical_restore(app, job, backup_id, target, safety),
        conflicts=("logical-backup",)))


def submit_logical_restore(app, req, manifest, safety):
    body = req.body
    if body.get("target_time") is not None:
        raise BadRequest("target_time applies to physical backups only",
                         {"field": "target_time"})
    dumped = [d["name"] for d in manifest["databases"]]
    names = body.get("databases") or dumped
    unknown = [n for n in names if n not in dumped]
    if unknown:
        raise BadRequest("These databases are not in the backup: " + ", ".join(unknown),
                         {"field": "databases", "databases": unknown, "allowed": dumped})
    return job_accepted(app.jobs.submit(
        "restore", dict(body, backup=manifest["id"]),
        lambda job: logical_restore(app, job, manifest, names, safety),
        conflicts=("logical-backup",)))


def job_using(app, backup_id):
    return next((j for j in app.jobs.list() if j["state"] in ("queued", "running")
                 and j["request"].get("backup") == backup_id), None)


def delete_backup(app, req):
    """204.  404 unknown; 409 a physical backup others depend on (details
    .dependents), the last full backup, or an operation using the backup."""
    backup_id = req.params["id"]
    if read_manifest(app, backup_id) is not None:
        user = job_using(app, backup_id)
        if user is not None:
            raise Conflict(f"Job {user['id']} is using this backup", {"job": user["id"]})
        shutil.rmtree(os.path.join(backups_dir(app), backup_id))
        return Reply(HTTPStatus.NO_CONTENT)
    if not PHYSICAL_LABEL_RE.match(backup_id):
        raise NotFound("Backup not found", {"backup": backup_id})
    pgbr = PgBackRest(app)
    pgbr.require()
    backups = pgbr.backups()
    if backup_id not in [b["label"] for b in backups]:
        raise NotFound("Backup not found", {"backup": backup_id})
    dependents = dependents_of(backup_id, backups)
    if dependents:
        raise Conflict("Other backups depend on this one; delete them first",
                       {"backup": backup_id, "dependents": dependents})
    running = app.jobs.running_exclusive()
    if running is not None:
        raise Conflict(f"Another operation is running: job {running.id}",
                       {"job": running.id})
    result = pgbr.run_short("expire", f"--set={backup_id}", "--log-level-console=info")
    if result.returncode != 0:
        message = tool_error((result.stdout + result.stderr).splitlines())
        if "[075]" in message:   # the last full backup of the repository
            raise Conflict("pgBackRest keeps at least one full backup: " + message,
                           {"backup": backup_id})
        raise Unavailable("pgbackrest expire failed: " + message, "pgbackrest")
    log.info("backup %s expired", backup_id)
    return Reply(HTTPStatus.NO_CONTENT)


RESTORE_BODY = {"target_time": Field("string", nullable=True),
                "databases": Field("array", items="string"),
                "safety_backup": Field("boolean")}
BACKUP_BODY = {"type": Field("string", enum=["full", "diff", "incr", "logical"]),
               "databases": Field("array", items="string")}

BACKUP_ROUTES = [
    Route("GET", "/backups", list_backups),
    Route("POST", "/backups", create_backup, "admin", BACKUP_BODY, body_required=False),
    Route("POST", "/backups/{id}/restore", restore_backup, "admin", RESTORE_BODY,
          body_required=False),
    Route("DELETE", "/backups/{id}", delete_backup, "admin"),
]


# ---------------------------------------------------------------------------
# Snapshots: workspace files and databases together
# ---------------------------------------------------------------------------

SNAPSHOT_ROUTES = []


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
        reap_orphan_tools(self.jobs.dir)
        clean_partial_dumps(config["backups"]["dir"])

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
