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
- Database sizes in GET /databases come from a cache refreshed every
  SIZE_REFRESH_SECONDS (60 s); each carries `size_as_of`.  GET of one
  database measures its size afresh.
- The rate limiter and the last-used times of keys live in memory; a
  restart refills every bucket and last-used times are flushed to the keys
  file at most once a minute.
- Service actions run one at a time: a unit that is slow to settle holds
  the others back for up to SERVICE_ACTION_TIMEOUT. The check that no job
  runs before PostgreSQL is stopped is not atomic with a job starting.
- Metrics live in memory and restart at zero with Piglet (Prometheus
  handles counter resets).  The last-backup time comes from Piglet's own
  backup jobs (kind "backup..."), not from backups made by other means.
- The audit log grows without bound; rotate it with logrotate (Piglet
  opens it for every line, so a renamed file is simply left behind).
- Expired idempotency replies are dropped when their API key next sends
  one and at start.  A reply's secret (POST /keys) is never stored, so
  its replay carries "key": null.
- TLS certificate changes take effect at the next restart, not on SIGHUP.
- A restore's safety backup ends a moment before PostgreSQL is stopped;
  writes committed in between are in neither the safety backup nor the
  restored cluster.
- Logical restores recreate databases with their owner, encoding and
  locale, not database-level settings or grants (ALTER DATABASE ... SET,
  GRANT ... ON DATABASE); roles are dumped (roles.sql) but never applied.
- A restore interrupted by a crash of Piglet leaves PostgreSQL as it was at
  that moment; the job reads INTERRUPTED and names nothing more.
- A snapshot takes the files first, then the databases: the two are a few
  moments apart, not one instant.  If a snapshot restore fails at the
  database step, the files are already back; the job names the
  pre-restore snapshot that holds the present.
- With pgBackRest, a snapshot is a restore point: it stays restorable only
  while the repository keeps a backup before it and the WAL up to it.
  pgBackRest's retention may expire them; the restore then answers 409,
  and GET /snapshots does not flag such snapshots beforehand.  Restoring
  one takes an incremental safety backup besides the pre-restore snapshot,
  so that a failed restore can roll PostgreSQL back.
"""

import argparse
import base64
import collections
import contextlib
import copy
import datetime
import email.utils
import fcntl
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import itertools
import json
import logging
import math
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import stat
import stringprep
import subprocess
import sys
import threading
import time
import traceback
import unicodedata
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
PG_INT_MAX = 2147483647        # PostgreSQL's int4, e.g. a connection limit
MAX_LINE_BYTES = 65536         # longest request line or header line
MAX_HEADER_BYTES = 65536       # all header lines of one request together
LISTEN_BACKLOG = 128           # the stdlib's 5 causes SYN retransmits under load
POOL_WAIT_SECONDS = 5          # waiting for a pooled PostgreSQL connection
HEALTH_CACHE_SECONDS = 1.0     # /status reuses a PostgreSQL probe this long
HEALTH_CONNECT_TIMEOUT = 2     # the probe's own connection attempt
SERVICE_CACHE_SECONDS = 2.0    # and a service state reading this long
SERVICE_ACTION_TIMEOUT = 120   # start/stop/restart of one unit, until it settles
SERVICE_POLL_SECONDS = 0.2     # how often a settling unit is looked at
POSTGRES_READY_SECONDS = 15    # after its unit started, PostgreSQL must answer within this
SUBPROCESS_TIMEOUT = 30        # short helper commands (systemctl show)
STATUS_COMMAND_TIMEOUT = 5     # a service's own status command
KEY_FLUSH_SECONDS = 60         # last_used_at is written back this often
ACCESS_LOG_FLUSH_SECONDS = 0.02  # access lines reach the log within this
ACCESS_LOG_MAX_QUEUE = 1000    # past this many waiting lines, requests write their own
LOG_TAIL_LINES = 40            # lines of tool output kept in a job

KEY_PREFIX = "pgl_"
SCOPES = ("admin", "read")
OBJECT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # use fullmatch
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
    fsync_dir(directory)


def fsync_dir(path):
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path, obj, mode=0o600):
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def check_object_name(name, what, field="name"):
    """Names that become file or key names: 1-63 of [A-Za-z0-9._-]."""
    if not isinstance(name, str) or not OBJECT_NAME_RE.fullmatch(name):
        raise BadRequest(f"Invalid {what} name: 1 to 63 characters of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit", {"field": field, "value": name})


def redact_dsn(dsn):
    """The DSN as it may be logged: any password replaced."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return psycopg.conninfo.make_conninfo(**params)


def mask_secrets(text):
    """Tool output as it may be kept: quoted passwords and SCRAM verifiers
    masked (a failing pg_restore echoes the statement it ran)."""
    return re.sub(r"(?i)(PASSWORD\s+)'(?:[^']|'')*'", r"\1'***'",
                  re.sub(r"SCRAM-SHA-256\$\S+", "***", text))


class TtlCache:
    """One value recomputed at most every `ttl` seconds, by one caller at a time.

    While one caller recomputes a stale value, the others get the stale one
    instead of queueing behind it: a slow probe must not stall every reader.
    Only when there is no value at all do callers wait for it.
    """

    _EMPTY = object()

    def __init__(self, ttl, compute):
        self.ttl, self.compute = ttl, compute
        self._refresh = threading.Lock()
        # One attribute, read once per call: value and stamp never disagree.
        self._entry = (self._EMPTY, -math.inf)

    def get(self):
        value, stamp = self._entry
        if time.monotonic() - stamp < self.ttl:
            return value
        if value is not self._EMPTY and not self._refresh.acquire(blocking=False):
            return value  # another caller is refreshing it
        if value is self._EMPTY:
            self._refresh.acquire()
        try:
            value, stamp = self._entry
            if time.monotonic() - stamp >= self.ttl:
                value = self.compute()
                self._entry = (value, time.monotonic())
            return value
        finally:
            self._refresh.release()

    def invalidate(self):
        """Forget the value (after any refresh under way): the next reader
        waits for a fresh one."""
        with self._refresh:
            self._entry = (self._EMPTY, -math.inf)


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
    return pwd.getpwuid(os.geteuid()).pw_name


def primary_group(user):
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
# systemd.unit(5) name characters; systemctl would silently escape others and
# then ask about a different unit.
UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9:_.\\@][A-Za-z0-9:_.\\@-]{0,254}$")


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
        if not OBJECT_NAME_RE.fullmatch(name):
            raise ConfigError(f"config field {field!r}: invalid service name")
        check_type(field, entry, dict)
        for key, value in entry.items():
            if key not in SERVICE_FIELDS:
                raise ConfigError(f"unknown config field {field + '.' + key!r}")
            check_type(f"{field}.{key}", value, SERVICE_FIELDS[key])
            if isinstance(value, list) and not (
                    value and all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"config field {field + '.' + key!r} must be a "
                                  "non-empty list of non-empty strings")
        if "user" in entry:
            check_os_user(f"{field}.user", entry["user"])
        if "unit" in entry and not UNIT_NAME_RE.match(entry["unit"]):
            raise ConfigError(f"config field {field + '.unit'!r}: invalid systemd unit name")
        if ("unit" in entry) == ("status" in entry):
            raise ConfigError(f"config field {field!r} needs either 'unit' or "
                              "'start', 'stop' and 'status'")
        if "status" in entry and not ("start" in entry and "stop" in entry):
            raise ConfigError(f"config field {field!r} needs 'start' and 'stop' too")
    return services


def check_os_user(field, user):
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"config field {field!r}: no OS user {user!r}") from None


def check_config_values(config):
    if not 0 <= config["port"] <= 65535:
        raise ConfigError("config field 'port' must be between 0 and 65535")
    for field in ("rate_limit.per_minute", "rate_limit.burst", "max_body_bytes",
                  "max_connections", "workers", "postgres.pool_size"):
        section, _, name = field.rpartition(".")
        value = config[section][name] if section else config[name]
        if value < 1:
            raise ConfigError(f"config field {field!r} must be at least 1")
    if config["postgres"]["connect_timeout"] < 1:
        raise ConfigError("config field 'postgres.connect_timeout' must be at least 1 "
                          "(libpq waits forever on 0)")
    if config["postgres"]["statement_timeout_ms"] < 0:
        raise ConfigError("config field 'postgres.statement_timeout_ms' must not be negative")
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
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and Python's limit on digits.
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
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
    """The keys file: {"keys": [{name, scope, hash, created_at, last_used_at}]}.

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
        """The key records; ConfigError when the file is not a keys file."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return []
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"keys file {self.path} is not valid JSON: {exc}") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        fields = ("name", "scope", "hash", "created_at")
        if not isinstance(keys, list) or not all(
                isinstance(k, dict) and all(isinstance(k.get(f), str) for f in fields)
                for k in keys):
            raise ConfigError(f"keys file {self.path} is malformed: expected "
                              '{"keys": [{"name", "scope", "hash", "created_at"}, ...]}')
        return keys

    def check(self):
        """Raise ConfigError when the keys file exists but is not usable."""
        self._read_file()

    def _refresh(self):
        signature = self._file_signature()
        if signature == self._signature:
            return
        try:
            self._keys = self._read_file()
        except (ConfigError, OSError) as exc:
            # Keep serving with the last good keys rather than failing every request.
            log.error("%s; keeping the %d keys read before", exc, len(self._keys))
        # Only now: readers that see the new signature without the lock must
        # also see the keys read for it (else a burst at start gets 401s).
        self._signature = signature

    def authenticate(self, secret):
        """The key record whose secret this is, or None; constant-time per key."""
        digest = hash_secret(secret)
        found = None
        for record in self._current_keys():
            # Compare with every key, no early exit: timing reveals nothing.
            if hmac.compare_digest(record["hash"], digest):
                found = record
        if found is not None:
            # No lock: a use recorded just as flush_last_used swaps the dict
            # is lost, which costs one last-used time, not correctness.
            self._used[found["name"]] = time.time()
        return found

    def _current_keys(self):
        """The keys, re-read only when the file changed; the lock is taken
        only then, so requests do not queue behind each other's stat()."""
        if self._file_signature() != self._signature:
            with self._lock:
                self._refresh()
        return self._keys

    def _file_signature(self):
        try:
            stat_result = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat_result.st_ino, stat_result.st_size, stat_result.st_mtime_ns)

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
    return Unavailable(f"PostgreSQL did not answer: {first_line(exc)}", "postgres")


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def session_alive(conn):
    """False for an idle session the server has closed (e.g. after a restart).

    An idle session has nothing to read; a readable socket means the
    server's goodbye or EOF, and using it would fail one request with 503.
    """
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


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
        self._probe_conn = None
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
            while self._idle:
                conn = self._idle.pop()
                if session_alive(conn):
                    return conn
                self._open -= 1
                conn.close()
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
            if conn.broken or conn.closed:
                # The server went away (a restart?): the idle sessions are stale too.
                self._drop_idle()
            raise postgres_unavailable(exc) from None
        finally:
            self._release(conn)

    def _drop_idle(self):
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def query(self, statement, params=None):
        """All rows of one statement as dicts."""
        with self.connection() as conn:
            with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []

    def _probe(self):
        """Ask PostgreSQL itself, on a session of the probe's own, so a pool
        full of busy sessions does not read as PostgreSQL being down."""
        for _ in range(2):  # a session from before a server restart fails once
            try:
                if self._probe_conn is None or self._probe_conn.closed:
                    self._probe_conn = self.connect(timeout=HEALTH_CONNECT_TIMEOUT)
                version, data_dir = self._probe_conn.execute(
                    "SELECT current_setting('server_version'), "
                    "current_setting('data_directory')").fetchone()
                return {"version": version, "data_dir": data_dir}
            except (ApiError, psycopg.Error):
                if self._probe_conn is not None:
                    self._probe_conn.close()
                self._probe_conn = None
        return None

    def close(self):
        self._drop_idle()
        if self._probe_conn is not None:
            self._probe_conn.close()


# ---------------------------------------------------------------------------
# Services: systemd units, or explicit commands where systemd is absent
# ---------------------------------------------------------------------------

SERVICE_ACTIONS = ("start", "stop", "restart")
# systemctl status's "since": the timestamp of entering the current state.
SINCE_PROPERTY = {"active": "ActiveEnterTimestamp", "reloading": "ActiveEnterTimestamp",
                  "inactive": "InactiveEnterTimestamp", "failed": "InactiveEnterTimestamp",
                  "activating": "InactiveExitTimestamp",
                  "deactivating": "ActiveExitTimestamp"}
SYSTEMD_PROPERTIES = ("Id", "LoadState", "ActiveState", "SubState", "MainPID",
                      "UnitFileState", "Result", "Job", *sorted(set(SINCE_PROPERTY.values())))
ACTIVE_STATE_STATUS = {"active": "running", "reloading": "running", "inactive": "stopped",
                       "failed": "failed", "activating": "starting",
                       "deactivating": "stopping"}
# A unit has settled when no job is queued for it and it is in one of these.
SETTLED_STATES = ("active", "inactive", "failed")
ENABLED_STATES = ("enabled", "enabled-runtime", "linked", "linked-runtime", "alias")


def systemd_running():
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    return os.path.isdir("/run/systemd/system")


def systemctl(*args, timeout=SUBPROCESS_TIMEOUT):
    """Run systemctl; 503 when there is no systemd to ask.

    A timeout raises subprocess.TimeoutExpired: what it means depends on the
    command (a hung `show` is an unreachable systemd, a slow `start` is not).
    """
    if not systemd_running():
        raise Unavailable("systemd is not running on this host", "systemd")
    try:
        return run_command(["systemctl", *args], timeout=timeout)
    except FileNotFoundError:
        raise Unavailable("systemctl is not installed", "systemd") from None


def systemctl_show(units, properties=SYSTEMD_PROPERTIES):
    """One property dict per unit, in the order asked, from one systemctl call."""
    try:
        result = systemctl("show", "--timestamp=unix", "-p", ",".join(properties),
                           "--", *units)
    except subprocess.TimeoutExpired:
        raise Unavailable("systemctl show timed out", "systemd") from None
    blocks = parse_systemctl_show(result.stdout)
    # systemctl prints one block per name, in order (aliases under their real
    # Id); anything else means it could not talk to systemd.
    if result.returncode != 0 or len(blocks) != len(units):
        raise Unavailable(f"systemctl show failed: {result.stderr.strip()[:300]}",
                          "systemd")
    return blocks


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
    """The contract's fields, plus systemd's own states (LoadState first:
    a unit that is not installed reads `unknown`, never `stopped`)."""
    load_state = props.get("LoadState", "")
    active_state = props.get("ActiveState", "")
    loaded = load_state == "loaded"
    pid = int(props.get("MainPID") or 0)
    status = ACTIVE_STATE_STATUS.get(active_state, "unknown") if loaded else "unknown"
    return {"name": name, "port": entry.get("port"), "unit": entry["unit"],
            "status": status,
            "enabled": props.get("UnitFileState") in ENABLED_STATES if loaded else None,
            "pid": pid or None,
            "since": systemd_timestamp(props.get(SINCE_PROPERTY.get(active_state), "")),
            "load_state": load_state, "active_state": active_state,
            "sub_state": props.get("SubState")}


def command_service_object(name, entry):
    """A service defined by start/stop/status argument lists (no systemd)."""
    try:
        code = run_command(entry["status"], user=entry.get("user"),
                           timeout=STATUS_COMMAND_TIMEOUT).returncode
        status = {0: "running", 3: "stopped", 4: "unknown"}.get(code, "failed")
    except (OSError, subprocess.SubprocessError, KeyError) as exc:
        # KeyError: the configured user does not exist (any more).
        log.warning("status command of service %s failed: %s", name, exc)
        status = "unknown"
    return {"name": name, "status": status, "port": entry.get("port"), "unit": None,
            "enabled": None, "pid": None, "since": None}


def is_settled(props):
    return not props.get("Job") and props.get("ActiveState") in SETTLED_STATES


def wait_until_settled(unit, deadline):
    """Poll the unit until it settles; its last properties either way."""
    while True:
        props = systemctl_show([unit])[0]
        if is_settled(props) or time.monotonic() >= deadline:
            return props
        time.sleep(SERVICE_POLL_SECONDS)


class Services:
    """The services named in the config, and nothing else."""

    # One action at a time on this host, across reloads that replace the object.
    _action_lock = threading.Lock()

    def __init__(self, entries):
        self.entries = entries
        self._cache = TtlCache(SERVICE_CACHE_SECONDS, self._read_all)

    def entry(self, name):
        if name not in self.entries:
            raise NotFound("Service not found", {"service": name})
        return self.entries[name]

    def _read_all(self):
        """({name: object}, the Unavailable error when systemd could not be asked)."""
        units = {n: e for n, e in self.entries.items() if "unit" in e}
        found, error = {}, None
        if units:
            try:
                blocks = systemctl_show([e["unit"] for e in units.values()])
            except Unavailable as exc:
                blocks, error = [{}] * len(units), exc
            for (name, entry), props in zip(units.items(), blocks):
                found[name] = systemd_service_object(name, entry, props)
        # Status commands run side by side, so one slow command costs its own
        # timeout once, not once per service.
        threads = [threading.Thread(target=lambda n=n, e=e: found.update(
                       {n: command_service_object(n, e)}), daemon=True)
                   for n, e in self.entries.items() if "unit" not in e]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {n: found[n] for n in self.entries}, error

    def all(self, strict=True):
        """Every service; 503 if one is a unit and systemd cannot be asked,
        unless not strict (/status reports those as `unknown`)."""
        found, error = self._cache.get()
        if error is not None and strict:
            raise Unavailable(error.message, "systemd")
        return found

    def get(self, name):
        entry = self.entry(name)
        return self.all(strict="unit" in entry)[name]

    def act(self, name, action, wait=False):
        """Run start/stop/restart and return the settled service object."""
        entry = self.entry(name)
        # A second request meanwhile is refused rather than queued: queued
        # actions of up to SERVICE_ACTION_TIMEOUT each would hold every worker.
        # Jobs (`wait`) queue instead: a restore must not fail for a restart.
        if not self._action_lock.acquire(timeout=SERVICE_ACTION_TIMEOUT if wait else 0):
            raise Conflict("Another service action is running; retry when it ends",
                           {"service": name})
        try:
            if "unit" in entry:
                self._act_systemd(name, entry["unit"], action)
            else:
                self._act_command(name, entry, action)
        finally:
            self._cache.invalidate()
            self._action_lock.release()
        log.info("service %s: %s done", name, action)
        return self.get(name)

    @staticmethod
    def _act_systemd(name, unit, action):
        deadline = time.monotonic() + SERVICE_ACTION_TIMEOUT
        try:
            # Blocking: systemctl waits for the job and says why it failed.
            result = systemctl(action, "--", unit, timeout=SERVICE_ACTION_TIMEOUT)
        except subprocess.TimeoutExpired:
            result = None   # systemd goes on with the job; report where it stands
        props = wait_until_settled(unit, deadline)
        details = {"service": name, "action": action,
                   "status": systemd_service_object(name, {"unit": unit}, props)["status"],
                   "load_state": props.get("LoadState")}
        if not is_settled(props):
            raise Conflict(f"{unit} has not settled after {SERVICE_ACTION_TIMEOUT} s "
                           f"({details['status']}); systemd goes on with the {action}",
                           details)
        wanted = ("inactive", "failed") if action == "stop" else ("active",)
        failed = result is not None and result.returncode != 0
        if failed or props["ActiveState"] not in wanted:
            reason = (result.stderr.strip() if result else "") or \
                f"the unit is {props['ActiveState']} (result: {props.get('Result')})"
            raise Conflict(f"systemctl {action} {unit} failed: {reason[:400]}", details)

    @staticmethod
    def _act_command(name, entry, action):
        current = command_service_object(name, entry)["status"]
        if (action, current) in (("start", "running"), ("stop", "stopped")):
            return  # already there: a no-op, as systemctl makes it for units
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
        """Keep a line of tool output, passwords masked."""
        line = mask_secrets(line.rstrip())[:500]
        with self.manager.lock:
            tail = self.data["log_tail"]
            tail.append(line)
            del tail[:-LOG_TAIL_LINES]

    def set_progress(self, percent):
        with self.manager.lock:
            self.data["progress"] = None if percent is None else max(0, min(100, percent))

    def snapshot(self):
        with self.manager.lock:
            return copy.deepcopy(self.data)


def busy_conflict(running):
    """The 409 for a request that must wait for job `running`."""
    return Conflict(f"Another operation is running: job {running.id}",
                    {"job": running.id, "kind": running.data["kind"]})


class JobManager:
    """Runs jobs one thread each; cluster-wide jobs one at a time."""

    def __init__(self, state_dir, listener=None):
        self.dir = os.path.join(state_dir, "jobs")
        self.listener = listener  # listener(event, job dict): "queued", "finished"
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.lock = threading.RLock()
        self.jobs = {}
        self.exclusive = None   # the cluster-wide job running now, if any
        self._load()

    def _load(self):
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.dir, name), encoding="utf-8") as handle:
                    data = json.load(handle)
                job = Job(self, data["id"], data["kind"], data["request"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable job file %s: %s", name, exc)
                continue
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
                raise busy_conflict(running)
            job = Job(self, self._new_id(kind), kind, request)
            self._save(job)  # first: a failed write must leave no job claiming the cluster
            self.jobs[job.id] = job
            if exclusive:
                self.exclusive = job
        log.info("job %s %s: queued", job.id, kind)
        if self.listener:
            self.listener("queued", job.snapshot())
        threading.Thread(target=self._run, args=(job, work, exclusive),
                         name=f"job-{job.id}", daemon=True).start()
        return job

    def _run(self, job, work, exclusive):
        try:
            with self.lock:
                job.data.update(state="running", started_at=utc_iso(time.time()))
                self._save(job)
            log.info("job %s: running", job.id)
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
        if self.listener:
            self.listener("finished", job.snapshot())

    def refuse_if_busy(self):
        """409 now, before slow checks, when a cluster-wide job runs."""
        running = self.running_exclusive()
        if running is not None:
            raise busy_conflict(running)

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
    """One entry of the route table, which also drives the OpenAPI document.

    The optional documentation arguments: `status`, the success status
    (default 200, 204 for DELETE; an unannotated POST is documented as
    200, 201 or 202; 202 means a job reply); `reply`, a JSON Schema of the
    success body (default: any object); `reply_type`, its media type;
    `query`, {name: Field} of the query parameters the handler reads.
    """

    def __init__(self, method, pattern, handler, scope="read", body=None,
                 body_required=True, status=None, reply=None,
                 reply_type="application/json", query=None):
        self.method, self.pattern, self.handler = method, pattern, handler
        self.scope = scope           # None: no key needed; "read": any key; "admin"
        self.body = body             # {field: Field} or None for no body
        self.body_required = body_required and bool(body)
        self.status, self.reply, self.reply_type = status, reply, reply_type
        self.query = query or {}
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

PROTECTED_DATABASES = ("postgres", "template0", "template1")
RESERVED_ROLES = ("public", "none")  # PostgreSQL refuses these even quoted
NAME_MAX_BYTES = 63             # NAMEDATALEN - 1: PostgreSQL truncates longer names
PASSWORD_MIN_CHARS = 8
PASSWORD_MAX_CHARS = 1024
SCRAM_ITERATIONS = 4096         # RFC 7677's minimum and PostgreSQL's default
SCRAM_SALT_BYTES = 16
SIZE_REFRESH_SECONDS = 60       # database sizes are recomputed in the background this often
NOT_AUTOVACUUM = "backend_type <> 'autovacuum worker'"  # DROP DATABASE ends those itself
SESSION_EXIT_WAIT_SECONDS = 2   # a closed session's backend leaves pg_stat_activity within this


def check_pg_name(name, field):
    """An identifier PostgreSQL stores as given: 1 to 63 bytes of UTF-8, no NUL."""
    try:
        size = len(name.encode("utf-8")) if isinstance(name, str) else 0
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        size = 0
    if not 1 <= size <= NAME_MAX_BYTES or "\0" in name:
        raise BadRequest(f"Invalid {field}: 1 to {NAME_MAX_BYTES} bytes of UTF-8, no NUL",
                         {"field": field})
    return name


def check_role_name(name, field="username"):
    check_pg_name(name, field)
    if name.startswith("pg_") or name in RESERVED_ROLES:
        raise BadRequest(f"Invalid {field}: names starting pg_, and public and none, "
                         "are reserved by PostgreSQL", {"field": field})
    return name


def check_password(password):
    """8 to 1024 characters, no NUL; the value never appears in an error."""
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        raise BadRequest("Invalid password: not valid Unicode", {"field": "password"}) from None
    if not PASSWORD_MIN_CHARS <= len(password) <= PASSWORD_MAX_CHARS or "\0" in password:
        raise BadRequest(f"Invalid password: {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} "
                         "characters, no NUL", {"field": "password"})
    return password


def saslprep(password):
    """RFC 4013 exactly as PostgreSQL applies it (src/common/saslprep.c).

    Server and libpq prepare the password the same way before hashing, so a
    verifier computed here must too.  ASCII is used as is, and so is a
    password SASLprep prohibits (both sides fall back to the raw bytes).
    """
    if password.isascii():
        return password
    mapped = [" " if stringprep.in_table_c12(c) else c
              for c in password if not stringprep.in_table_b1(c)]
    # PostgreSQL checks the mapped characters, before normalisation.
    if not mapped or any(saslprep_prohibited(c) for c in mapped):
        return password
    if any(stringprep.in_table_d1(c) for c in mapped):
        if (any(stringprep.in_table_d2(c) for c in mapped)
                or not stringprep.in_table_d1(mapped[0])
                or not stringprep.in_table_d1(mapped[-1])):
            return password
    return unicodedata.ucd_3_2_0.normalize("NFKC", "".join(mapped))


def saslprep_prohibited(c):
    return (stringprep.in_table_c12(c) or stringprep.in_table_c21_c22(c)
            or stringprep.in_table_c3(c) or stringprep.in_table_c4(c)
            or stringprep.in_table_c5(c) or stringprep.in_table_c6(c)
            or stringprep.in_table_c7(c) or stringprep.in_table_c8(c)
            or stringprep.in_table_c9(c) or stringprep.in_table_a1(c))


def scram_verifier(password, salt=None, iterations=SCRAM_ITERATIONS):
    """The SCRAM-SHA-256 secret PostgreSQL stores (RFC 5802 section 3, RFC 7677).

    PostgreSQL keeps a string of this shape as it is, so the plain password
    never reaches the server, its log or pg_stat_activity.
    """
    salt = salt or secrets.token_bytes(SCRAM_SALT_BYTES)
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt,
                                 iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode("ascii")  # noqa: E731
    return (f"SCRAM-SHA-256${iterations}:{b64(salt)}"
            f"${b64(stored_key)}:{b64(server_key)}")


def query_flag(req, name):
    values = req.query.get(name, ["false"])
    if len(values) != 1 or values[0] not in ("true", "false"):
        raise BadRequest(f"Query parameter {name!r} must be true or false",
                         {"field": name, "allowed": ["true", "false"]})
    return values[0] == "true"


def rows(conn, statement, params=None):
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(statement, params)
        return cur.fetchall()


def other_sessions(conn, oid):
    """Sessions on a database that block DROP or CREATE ... TEMPLATE."""
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datid = %s AND pid <> pg_backend_pid() "
        "AND " + NOT_AUTOVACUUM, (oid,)).fetchone()[0]


@contextlib.contextmanager
def session_on(app, database, watcher):
    """A short session on another database, gone from the server when this ends.

    A backend outlives its client's close by a few milliseconds; a DROP
    DATABASE right after would count it as a connected session, so the
    caller's pooled session `watcher` waits for it to leave.
    """
    conn = app.db.connect(database)
    pid = conn.info.backend_pid
    try:
        with conn:
            yield conn
    finally:
        conn.close()
        wait_backend_exit(watcher, pid)


def wait_backend_exit(conn, pid):
    deadline = time.monotonic() + SESSION_EXIT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                            (pid,)).fetchone():
            return
        time.sleep(0.005)
    log.warning("session %d on another database is still exiting", pid)


class DatabaseSizes:
    """pg_database_size() by database oid, refreshed in a background thread.

    Sizing a thousand databases costs about half a second warm and seconds
    cold, far too slow for each listing; a listing reads this cache and
    measures only the databases it has never seen.  Each size carries the
    time it was measured.
    """

    def __init__(self, db, interval=SIZE_REFRESH_SECONDS):
        self.db, self.interval = db, interval
        self._lock = threading.Lock()
        self._sizes = {}  # oid -> (size_bytes or None, unix time measured)

    def start(self):
        threading.Thread(target=self._run, name="database-sizes", daemon=True).start()

    def _run(self):
        while True:
            try:
                self.refresh()
            except (ApiError, psycopg.Error) as exc:
                log.debug("database sizes not refreshed: %s", first_line(exc))
            time.sleep(self.interval)

    def refresh(self):
        with self.db.connection() as conn:
            oids = [r[0] for r in conn.execute(
                "SELECT oid FROM pg_database WHERE NOT datistemplate")]
            sizes = {oid: (self.measure(conn, oid), time.time()) for oid in oids}
        with self._lock:
            self._sizes = sizes

    @staticmethod
    def measure(conn, oid):
        """One database's size; None when it cannot be measured (dropped meanwhile)."""
        try:
            return conn.execute("SELECT pg_database_size(%s)", (oid,)).fetchone()[0]
        except psycopg.OperationalError:
            raise
        except psycopg.Error:
            return None

    def lookup(self, conn, oids, fresh=False):
        """oid -> (size_bytes, measured_at); missing ones measured now."""
        with self._lock:
            known = {} if fresh else {o: self._sizes[o] for o in oids if o in self._sizes}
        missing = [o for o in oids if o not in known]
        measured = {o: (self.measure(conn, o), time.time()) for o in missing}
        with self._lock:
            self._sizes.update(measured)
        return {**known, **measured}

    def forget(self, oid):
        with self._lock:
            self._sizes.pop(oid, None)


# -- databases ----------------------------------------------------------------

DATABASE_SQL = """
SELECT d.oid, d.datname AS name, pg_get_userbyid(d.datdba) AS owner,
       pg_encoding_to_char(d.encoding) AS encoding, d.datcollate AS collation,
       d.datistemplate AS is_template, d.datallowconn AS allow_connections,
       coalesce(a.sessions, 0)::int AS connections
  FROM pg_database d
  LEFT JOIN (SELECT datid, count(*) AS sessions FROM pg_stat_activity
              WHERE {not_autovacuum} GROUP BY datid) a ON a.datid = d.oid
 WHERE {where}
 ORDER BY d.datname"""


def database_rows(conn, where, params=None):
    statement = sql.SQL(DATABASE_SQL).format(not_autovacuum=sql.SQL(NOT_AUTOVACUUM),
                                             where=sql.SQL(where))
    return rows(conn, statement, params)


def database_row(conn, name):
    found = database_rows(conn, "d.datname = %s", (name,))
    return found[0] if found else None


def database_object(row, size):
    size_bytes, measured = size
    return {"name": row["name"], "owner": row["owner"],
            "size": None if size_bytes is None else human_size(size_bytes),
            "size_bytes": size_bytes, "encoding": row["encoding"],
            "collation": row["collation"], "connections": row["connections"],
            "size_as_of": utc_iso(measured)}


def database_location(name):
    return f"{API_PREFIX}/databases/{urllib.parse.quote(name, safe='')}"


def list_databases(app, req):
    """200: every database but templates, by name; sizes from the background cache."""
    with app.db.connection() as conn:
        found = database_rows(conn, "NOT d.datistemplate")
        sizes = app.db_sizes.lookup(conn, [r["oid"] for r in found])
    measured = [when for _, when in sizes.values()]
    return {"databases": [database_object(r, sizes[r["oid"]]) for r in found],
            "sizes_as_of": utc_iso(min(measured)) if measured else None}


def get_database(app, req):
    """200 with a size measured now; 400 invalid name; 404 unknown."""
    name = check_pg_name(req.params["name"], "name")
    with app.db.connection() as conn:
        row = database_row(conn, name)
        if row is None:
            raise NotFound("Database not found", {"database": name})
        size = app.db_sizes.lookup(conn, [row["oid"]], fresh=True)[row["oid"]]
    return database_object(row, size)


def create_database(app, req):
    """201 with Location; 400 invalid name; 404 owner (details.role) or template
    (details.database) missing; 409 exists, or template in use (details.connections)."""
    name = check_pg_name(req.body["name"], "name")
    owner, template = req.body.get("owner"), req.body.get("template")
    if owner is not None:
        check_pg_name(owner, "owner")
    if template is not None:
        check_pg_name(template, "template")
    with app.db.connection() as conn:
        check_new_database(conn, name, owner, template or "template1")
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        run_create_database(conn, statement, name, owner, template or "template1")
        row = database_row(conn, name)
        size = app.db_sizes.lookup(conn, [row["oid"]], fresh=True)[row["oid"]]
    log.info("created database %r (owner %r, template %r)", name, owner, template)
    return Reply(HTTPStatus.CREATED, database_object(row, size),
                 {"Location": database_location(name)})


def check_new_database(conn, name, owner, template):
    """Everything CREATE DATABASE would refuse, found first and named clearly.

    CREATE DATABASE also waits five seconds for a busy template's sessions
    to leave before failing; checking first answers at once.
    """
    if database_row(conn, name) is not None:
        raise Conflict(f"Database {name!r} already exists", {"database": name})
    if owner is not None and not conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,)).fetchone():
        raise NotFound(f"Owner role {owner!r} not found", {"role": owner})
    source = database_row(conn, template)
    if source is None:
        raise NotFound(f"Template database {template!r} not found", {"database": template})
    busy = other_sessions(conn, source["oid"])
    if busy:
        raise template_in_use(template, busy)


def template_in_use(template, sessions):
    return Conflict(f"Cannot copy database {template!r}: {sessions} other session(s) "
                    "are connected to it", {"database": template, "connections": sessions})


def run_create_database(conn, statement, name, owner, template):
    """CREATE DATABASE is one statement in autocommit: it makes all or nothing."""
    try:
        conn.execute(statement)
    except psycopg.errors.DuplicateDatabase:
        raise Conflict(f"Database {name!r} already exists", {"database": name}) from None
    except psycopg.errors.UndefinedObject:
        raise NotFound(f"Owner role {owner!r} not found", {"role": owner}) from None
    except psycopg.errors.InvalidCatalogName:
        raise NotFound(f"Template database {template!r} not found",
                       {"database": template}) from None
    except psycopg.errors.ObjectInUse:
        source = database_row(conn, template)
        raise template_in_use(template, other_sessions(conn, source["oid"]) if source
                              else 0) from None


def delete_database(app, req):
    """204; 400 invalid name or force; 403 system, template or Piglet's own database;
    404 unknown; 409 sessions connected (details.connections) unless force=true."""
    name = check_pg_name(req.params["name"], "name")
    force = query_flag(req, "force")
    with app.db.connection() as conn:
        if name in PROTECTED_DATABASES or name == conn.info.dbname:
            raise Forbidden(f"Database {name!r} is protected", {"database": name})
        row = database_row(conn, name)
        if row is None:
            raise NotFound("Database not found", {"database": name})
        if row["is_template"]:
            raise Forbidden(f"Database {name!r} is a template; clear its IS_TEMPLATE flag "
                            "first", {"database": name})
        busy = other_sessions(conn, row["oid"])
        if busy and not force:
            raise Conflict(f"Database {name!r} has {busy} session(s) connected; "
                           "use force=true to end them", {"database": name,
                                                          "connections": busy})
        drop_database(conn, name, row["oid"], force)
    app.db_sizes.forget(row["oid"])
    log.info("dropped database %r%s", name, " (force)" if force else "")
    return Reply(HTTPStatus.NO_CONTENT)


def drop_database(conn, name, oid, force):
    statement = sql.SQL("DROP DATABASE {}").format(sql.Identifier(name))
    if force:
        statement += sql.SQL(" WITH (FORCE)")
    try:
        conn.execute(statement)
    except psycopg.errors.InvalidCatalogName:
        raise NotFound("Database not found", {"database": name}) from None
    except psycopg.errors.ObjectInUse as exc:
        # Sessions arrived meanwhile, or prepared transactions or
        # replication slots hold it (which FORCE does not end).
        raise Conflict(f"Database {name!r} is in use: {first_line(exc)}",
                       {"database": name,
                        "connections": other_sessions(conn, oid)}) from None


# ---------------------------------------------------------------------------
# Users: login roles with SCRAM verifiers computed here
# ---------------------------------------------------------------------------

USER_SQL = """
SELECT r.oid, r.rolname AS username, r.rolsuper AS superuser,
       r.rolcreatedb AS createdb, r.rolcanlogin AS login,
       nullif(r.rolconnlimit, -1) AS connection_limit,
       CASE WHEN r.rolvaliduntil IS NULL OR r.rolvaliduntil = 'infinity' THEN NULL
            WHEN r.rolvaliduntil = '-infinity' THEN '-infinity'
            ELSE to_char(r.rolvaliduntil AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
       END AS valid_until,
       ARRAY(SELECT g.rolname::text FROM pg_auth_members m
               JOIN pg_roles g ON g.oid = m.roleid
              WHERE m.member = r.oid ORDER BY g.rolname) AS member_of,
       ARRAY(SELECT d.datname::text FROM pg_database d
              WHERE NOT d.datistemplate AND (d.datdba = r.oid OR EXISTS (
                    SELECT 1 FROM aclexplode(d.datacl) a
                     WHERE a.grantee = r.oid AND a.privilege_type = 'CONNECT'))
              ORDER BY d.datname) AS databases
  FROM pg_roles r
 WHERE r.rolname !~ '^pg_' AND {where}
 ORDER BY r.rolname"""

USER_FIELDS = ("username", "superuser", "createdb", "login", "connection_limit",
               "valid_until", "member_of", "databases")


def user_rows(conn, where, params=None):
    return rows(conn, sql.SQL(USER_SQL).format(where=sql.SQL(where)), params)


def user_row(conn, name):
    found = user_rows(conn, "r.rolname = %s", (name,))
    return found[0] if found else None


def user_object(row):
    return {field: row[field] for field in USER_FIELDS}


def existing_user(conn, name):
    """The row of a visible role (pg_* roles are hidden), else 404."""
    row = user_row(conn, name)
    if row is None:
        raise NotFound("User not found", {"username": name})
    return row


def list_users(app, req):
    """200: every role except pg_* ones, by name."""
    with app.db.connection() as conn:
        return {"users": [user_object(r) for r in user_rows(conn, "true")]}


def get_user(app, req):
    """200; 400 invalid name; 404 unknown or a pg_* role."""
    name = check_pg_name(req.params["username"], "username")
    with app.db.connection() as conn:
        return user_object(existing_user(conn, name))


def role_options(body):
    """ALTER/CREATE ROLE options from a request body; the password only as a verifier."""
    options = []
    if "password" in body:
        verifier = scram_verifier(check_password(body["password"]))
        options.append(sql.SQL("PASSWORD {}").format(sql.Literal(verifier)))
    if "createdb" in body:
        options.append(sql.SQL("CREATEDB" if body["createdb"] else "NOCREATEDB"))
    if "connection_limit" in body:
        limit = body["connection_limit"]
        if limit is not None and not -1 <= limit <= PG_INT_MAX:
            raise BadRequest("connection_limit must be -1 (none), null (none) or 0 to "
                             f"{PG_INT_MAX}",
                             {"field": "connection_limit"})
        options.append(sql.SQL("CONNECTION LIMIT {}").format(
            sql.Literal(-1 if limit is None else limit)))
    if "valid_until" in body:
        options.append(sql.SQL("VALID UNTIL {}").format(
            sql.Literal(parse_valid_until(body["valid_until"]))))
    return options


def parse_valid_until(value):
    """An RFC 3339 time with an offset, as UTC; null means no expiry."""
    if value is None:
        return "infinity"
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise BadRequest("valid_until must be an RFC 3339 time with an offset or Z",
                         {"field": "valid_until"})
    return when.astimezone(datetime.timezone.utc).isoformat()


def check_grant_databases(conn, names):
    """The listed databases, deduplicated in order; 404 for the first missing."""
    wanted = list(dict.fromkeys(check_pg_name(n, "databases") for n in names))
    for name in wanted:
        row = database_row(conn, name)
        if row is None:
            raise NotFound(f"Database {name!r} not found", {"database": name})
        if row["is_template"]:
            raise BadRequest(f"Database {name!r} is a template; grants go on real databases",
                             {"database": name})
        if not row["allow_connections"]:
            raise Conflict(f"Database {name!r} does not allow connections",
                           {"database": name})
    return wanted


def database_grant(role, names, grant=True):
    """CONNECT and TEMPORARY on each database, granted or revoked."""
    verb = "GRANT {} ON DATABASE {} TO {}" if grant else "REVOKE {} ON DATABASE {} FROM {}"
    return [sql.SQL(verb).format(sql.SQL("CONNECT, TEMPORARY"), sql.Identifier(name),
                                 sql.Identifier(role)) for name in names]


def change_public_schemas(app, conn, role, changes):
    """USAGE and CREATE on `public` in each database: [(db, grant?)].

    Each change needs a session on its database, so these cannot share the
    role's transaction; on a failure the changes already made are undone.
    """
    done = []
    try:
        for name, grant in changes:
            set_public_schema(app, conn, role, name, grant)
            done.append((name, grant))
    except BaseException:
        undo_public_schemas(app, conn, role, done)
        raise
    return done


def undo_public_schemas(app, conn, role, done):
    for name, grant in reversed(done):
        try:
            set_public_schema(app, conn, role, name, not grant)
        except (ApiError, psycopg.Error) as exc:
            log.error("could not undo a grant on schema public of %r to %r: %s",
                      name, role, first_line(exc))


def set_public_schema(app, watcher, role, database, grant):
    verb = ("GRANT USAGE, CREATE ON SCHEMA public TO {}" if grant
            else "REVOKE USAGE, CREATE ON SCHEMA public FROM {}")
    with session_on(app, database, watcher) as conn:
        try:
            conn.execute(sql.SQL(verb).format(sql.Identifier(role)))
        except psycopg.errors.InvalidSchemaName:
            log.warning("database %r has no schema public; nothing to grant", database)


def create_user(app, req):
    """201 without the password; 400 invalid field or pg_* name; 404 a listed
    database missing (details.database; no role is left); 409 exists."""
    body = req.body
    name = check_role_name(body["username"])
    check_password(body["password"])
    options = role_options(body)
    with app.db.connection() as conn:
        databases = check_grant_databases(conn, body.get("databases", []))
        create_role(conn, name, options, databases)
        try:
            change_public_schemas(app, conn, name, [(db, True) for db in databases])
        except BaseException:
            remove_new_role(conn, name, databases)
            raise
        row = existing_user(conn, name)
    log.info("created user %r with access to %r", name, databases)
    return Reply(HTTPStatus.CREATED, user_object(row),
                 {"Location": f"{API_PREFIX}/users/{urllib.parse.quote(name, safe='')}"})


def create_role(conn, name, options, databases):
    """The role and its database grants in one transaction."""
    statements = [sql.SQL("CREATE ROLE {} LOGIN ").format(sql.Identifier(name))
                  + sql.SQL(" ").join(options)]
    try:
        with conn.transaction():
            for statement in statements + database_grant(name, databases):
                conn.execute(statement)
    except psycopg.errors.DuplicateObject:
        raise Conflict(f"User {name!r} already exists", {"username": name}) from None
    except psycopg.errors.InvalidCatalogName:
        raise NotFound("A listed database was dropped meanwhile",
                       {"databases": databases}) from None


def remove_new_role(conn, name, databases):
    """Undo a half-made user: its database grants and the role itself."""
    try:
        with conn.transaction():
            for statement in database_grant(name, databases, grant=False):
                conn.execute(statement)
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        log.error("could not remove half-made role %r: %s", name, first_line(exc))


def update_user(app, req):
    """200 with the user; 400 invalid field; 403 a superuser or the role Piglet
    connects as; 404 unknown user or listed database.  `databases` replaces
    the granted set; databases the user owns stay listed."""
    name = check_pg_name(req.params["username"], "username")
    body = req.body
    options = role_options(body)
    with app.db.connection() as conn:
        row = existing_user(conn, name)
        # An admin key must not be a way to take over or lock out `postgres`.
        if name == conn.info.user or row["superuser"]:
            raise Forbidden(f"Role {name!r} is protected: it is a superuser or Piglet's own "
                            "role", {"username": name})
        add, remove = database_changes(conn, row["oid"], body)
        statements = database_grant(name, add) + database_grant(name, remove, grant=False)
        if options:
            statements.insert(0, sql.SQL("ALTER ROLE {} WITH ").format(sql.Identifier(name))
                              + sql.SQL(" ").join(options))
        done = change_public_schemas(app, conn, name, [(db, True) for db in add]
                                     + [(db, False) for db in remove])
        try:
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement)
        except BaseException:
            undo_public_schemas(app, conn, name, done)
            raise
        row = existing_user(conn, name)
    log.info("updated user %r (%s)", name, ", ".join(sorted(body)) or "nothing")
    return user_object(row)


def database_changes(conn, oid, body):
    """(to grant, to revoke) for a PATCH whose `databases` replaces the set."""
    if "databases" not in body:
        return [], []
    wanted = check_grant_databases(conn, body["databases"])
    granted = granted_databases(conn, oid)
    return ([db for db in wanted if db not in granted],
            [db for db in granted if db not in wanted])


def granted_databases(conn, oid):
    """Databases where the role holds CONNECT by explicit grant."""
    return [r[0] for r in conn.execute(
        "SELECT d.datname::text FROM pg_database d WHERE NOT d.datistemplate AND EXISTS ("
        " SELECT 1 FROM aclexplode(d.datacl) a WHERE a.grantee = %s"
        " AND a.privilege_type = 'CONNECT') ORDER BY d.datname", (oid,))]


def delete_user(app, req):
    """204; 403 a superuser or the role Piglet connects as; 404 unknown;
    409 owns databases (details.databases) or objects inside databases
    (details.owns_objects_in)."""
    name = check_pg_name(req.params["username"], "username")
    with app.db.connection() as conn:
        row = existing_user(conn, name)
        if name == conn.info.user or row["superuser"]:
            raise Forbidden(f"Role {name!r} is protected: it is a superuser or Piglet's own "
                            "role", {"username": name})
        check_nothing_owned(conn, name, row["oid"])
        for database in dependent_databases(conn, row["oid"]):
            with session_on(app, database, conn) as other:
                drop_privileges(other, name)
        try:
            drop_privileges(conn, name, drop_role=True)
        except psycopg.errors.DependentObjectsStillExist as exc:
            raise Conflict(f"User {name!r} still has dependent objects: {first_line(exc)}",
                           {"username": name}) from None
    log.info("dropped user %r", name)
    return Reply(HTTPStatus.NO_CONTENT)


def check_nothing_owned(conn, name, oid):
    """409 when dropping the role would need its databases or objects gone."""
    owned = [r[0] for r in conn.execute(
        "SELECT datname::text FROM pg_database WHERE datdba = %s ORDER BY datname", (oid,))]
    if owned:
        raise Conflict(f"User {name!r} owns databases; change their owner or drop them first",
                       {"username": name, "databases": owned})
    inside = [r[0] for r in conn.execute(
        "SELECT DISTINCT coalesce(d.datname::text, '(cluster-wide)') FROM pg_shdepend s"
        "  LEFT JOIN pg_database d ON d.oid = s.dbid"
        " WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = %s"
        "   AND s.deptype = 'o' AND s.classid <> 'pg_database'::regclass ORDER BY 1",
        (oid,))]
    if inside:
        raise Conflict(f"User {name!r} owns objects in {', '.join(inside)}; reassign or "
                       "drop them first", {"username": name, "owns_objects_in": inside})


def dependent_databases(conn, oid):
    """Other databases holding privileges granted to the role."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT d.datname::text FROM pg_shdepend s"
        "  JOIN pg_database d ON d.oid = s.dbid"
        " WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = %s"
        "   AND d.datallowconn AND d.datname <> current_database() ORDER BY 1", (oid,))]


def drop_privileges(conn, name, drop_role=False):
    """Revoke everything granted to the role in this session's database.

    REASSIGN OWNED runs first so that an object the user created after the
    ownership check changes hands instead of being dropped by DROP OWNED.
    """
    role = sql.Identifier(name)
    with conn.transaction():
        conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role))
        conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
        if drop_role:
            conn.execute(sql.SQL("DROP ROLE {}").format(role))


DATABASE_BODY = {"name": Field("string", required=True),
                 "owner": Field("string", nullable=True),
                 "template": Field("string", nullable=True)}
USER_CHANGES = {"password": Field("string"),
                "databases": Field("array", items="string"),
                "createdb": Field("boolean"),
                "connection_limit": Field("integer", nullable=True),
                "valid_until": Field("string", nullable=True)}
USER_BODY = dict(USER_CHANGES, username=Field("string", required=True),
                 password=Field("string", required=True))

DATABASE_ROUTES = [
    Route("GET", "/databases", list_databases),
    Route("POST", "/databases", create_database, "admin", DATABASE_BODY),
    Route("GET", "/databases/{name}", get_database),
    Route("DELETE", "/databases/{name}", delete_database, "admin"),
    Route("GET", "/users", list_users),
    Route("POST", "/users", create_user, "admin", USER_BODY),
    Route("GET", "/users/{username}", get_user),
    Route("PATCH", "/users/{username}", update_user, "admin", USER_CHANGES),
    Route("DELETE", "/users/{username}", delete_user, "admin"),
]


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
# Roles a schema-only script names: owners and grantees.
ROLE_REF_RE = re.compile(r'(?:OWNER TO|GRANT .* TO|REVOKE .* FROM) (.+?)(?: WITH .*|'
                         r' GRANTED BY .*)?;$')
IDENT_RE = re.compile(r'"((?:[^"]|"")+)"|([^\s,"]+)')


class JobFailed(ApiError):
    """A job's own failure; `code` names what failed (e.g. BACKUP_FAILED)."""

    def __init__(self, code, message, details=None):
        super().__init__(mask_secrets(message), details)
        self.code = code


def tool_user(app):
    """The cluster's OS user, never root (files in the repository stay its own)."""
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
        try:
            stanzas = json.loads(result.stdout or "[]")
            return next((s for s in stanzas if s.get("name") == self.stanza), {})
        except (ValueError, AttributeError, TypeError):
            raise Unavailable("pgbackrest info gave output Piglet cannot read",
                              "pgbackrest") from None

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
        rows = app.db.query("SELECT current_setting('archive_mode') AS mode, "
                            "last_archived_wal, last_archived_time, last_failed_wal, "
                            "last_failed_time FROM pg_stat_archiver")
    except (ApiError, psycopg.Error):
        return None
    return rows[0] if rows else None


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
    micros = round((epoch - int(epoch)) * 1e6)
    if micros in (0, 1000000):  # 0.9999997 s rounds up to the next second
        return utc_iso(round(epoch))
    return text[:-1] + f".{micros:06d}".rstrip("0") + "Z"


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


# ---------------------------------------------------------------------------
# Restores: physical and logical, never losing the present
# ---------------------------------------------------------------------------

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
        app.services.act(app.config["postgres"]["service"], action, wait=True)
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


def pgbackrest_restore(app, job, label, target=None, target_args=None):
    """target: a time (epoch) or None for the backup's end; target_args, when
    given, are pgbackrest's own target options instead (e.g. --type=name)."""
    pgbr = PgBackRest(app)
    options = ["--delta", f"--set={label}", "--target-action=promote",
               "--log-level-console=info"]
    if target_args:
        options += target_args
    elif target is None:
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


def physical_restore(app, job, label, target, safety, target_args=None):
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
        pgbackrest_restore(app, job, label, target, target_args)
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
        drop_scratch_database(app, temp)
        raise
    return temp


def drop_scratch_database(app, name):
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
            drop_scratch_database(app, temp)
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
    return job_accepted(app.jobs.submit("logical-backup", req.body, work, exclusive=False,
                                        conflicts=("restore", "snapshot-restore")))


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
    app.jobs.refuse_if_busy()
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
    names = body.get("databases")
    if names is None:
        names = dumped
    elif not names:
        raise BadRequest("databases, when given, must name at least one database",
                         {"field": "databases", "allowed": dumped})
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
    app.jobs.refuse_if_busy()
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
#
# A snapshot is a directory under snapshots.dir (root only, 0700):
#   <name>/snapshot.json   summary: name, description, created_at, paths, database
#   <name>/manifest.json   every entry of every workspace tree (type, mode,
#                          owner, size, mtime, symlink target)
#   <name>/files/<i>/...   the regular files of workspace tree i, read-only
#   <name>/db/...          logical mode: roles.sql and one dump per database
# With pgBackRest, the databases are a restore point in its archive instead
# (snapshot.json names it, with its LSN and timeline); without, logical dumps.
# It is written under a dot name and renamed into place when complete, so a
# failed snapshot leaves nothing listed.  An unchanged file is a hard link to
# the previous snapshot's copy, never to the live file: stored files are
# immutable, and restores copy out of them.

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
    """Before any path is built: the same rule as every file-backed name."""
    check_object_name(name, "snapshot")


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
        names = [n for n in os.listdir(root) if OBJECT_NAME_RE.fullmatch(n)]
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
    database = {k: v for k, v in db.items() if k not in ("roles", "dumps", "history")}
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


def dump_cluster_into(app, job, dest):
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


# -- databases: pgBackRest restore points -------------------------------------
#
# With pgBackRest, a snapshot is a named restore point in the archived WAL.
# Its name gets a random suffix: recovery stops at the first restore point
# of that name it meets, and a deleted snapshot's name may be used again.
# The point's timeline history is kept with it: after a restore, the archive
# holds diverging timelines, and only a backup on the point's own line of
# history (its timeline, or an ancestor before the branch) can replay to it.


def lsn_int(text):
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def snapshot_pgbackrest(app):
    """The PgBackRest to snapshot with, or None for logical dumps; 503 when
    pgBackRest is enabled and installed but archiving is off."""
    pgbr = PgBackRest(app)
    if pgbr.configured():
        return None
    state = archiver_state(app)
    if state is not None and state["mode"] == "off":
        raise Unavailable("pgBackRest is enabled but archive_mode is off, so no restore "
                          "point can be archived; turn archiving on, or set "
                          "pgbackrest.enabled false to snapshot by logical dumps",
                          "pgbackrest")
    return pgbr


def timeline_history(conn, timeline):
    """[[timeline, "its end LSN"], ...] of the ancestors of `timeline`, or None
    when its history file is not in pg_wal."""
    if timeline == 1:
        return []
    try:
        text = conn.execute("SELECT pg_read_file(%s)",
                            (f"pg_wal/{timeline:08X}.history",)).fetchone()[0]
    except psycopg.errors.UndefinedFile:
        return None
    found = re.findall(r"^\s*(\d+)\s+([0-9A-Fa-f]+/[0-9A-Fa-f]+)", text, re.MULTILINE)
    return [[int(tli), lsn] for tli, lsn in found]


def wal_position(conn):
    """{"lsn", "timeline", "history"} of the server's WAL insert position now."""
    lsn, walfile = conn.execute("SELECT lsn, pg_walfile_name(lsn) FROM "
                                "pg_current_wal_insert_lsn() AS lsn").fetchone()
    timeline = int(walfile[:8], 16)
    return {"lsn": str(lsn), "timeline": timeline,
            "history": timeline_history(conn, timeline)}


def backup_reaches(backup, point):
    """Whether recovery from `backup` can replay to `point`: it stopped before
    the point on the point's timeline, or on an ancestor before the branch."""
    if backup.get("error") or not backup.get("lsn") or not backup.get("archive"):
        return False
    timeline = int(backup["archive"]["start"][:8], 16)
    stop = lsn_int(backup["lsn"]["stop"])
    if timeline == point["timeline"]:
        return stop < lsn_int(point["lsn"])
    ends = {tli: lsn_int(lsn) for tli, lsn in point["history"] or ()}
    return timeline in ends and stop <= ends[timeline]


def backup_for_point(backups, point):
    """The newest backup that reaches `point`, or None."""
    usable = [b for b in backups if backup_reaches(b, point)]
    return max(usable, key=lambda b: lsn_int(b["lsn"]["stop"]), default=None)


def create_restore_point(app, job, pgbr, name):
    """A full backup if none reaches the present, then the restore point,
    archived; returns the snapshot's database record."""
    ensure_stanza(app, job, pgbr)
    with app.db.connect() as conn:
        present = wal_position(conn)
    taken = None
    if backup_for_point(pgbr.backups(), present) is None:
        job.log("piglet: no backup precedes this snapshot; taking a full backup first")
        taken, _ = physical_backup(app, job, "full")
    point_name = f"{name[:50]}-{secrets.token_hex(6)}"   # at most 63 bytes
    with app.db.connect() as conn:
        lsn = conn.execute("SELECT pg_create_restore_point(%s)", (point_name,)).fetchone()[0]
        point = dict(wal_position(conn), lsn=str(lsn))
    job.log(f"piglet: restore point {point_name!r} at {lsn} on timeline "
            f"{point['timeline']}")
    segment = seal_archive(app)
    if segment is None:
        raise Unavailable(f"The WAL holding restore point {point_name!r} was not archived "
                          f"within {ARCHIVE_WAIT_SECONDS} s; see pg_stat_archiver",
                          "pgbackrest", {"restore_point": point_name})
    return dict(point, method="pgbackrest", stanza=pgbr.stanza, restore_point=point_name,
                wal=segment, backup_taken=taken, size=human_size(0), size_bytes=0)


def restore_backup_for(app, name, point):
    """The label of the backup to restore snapshot `name` from; 409 if none."""
    pgbr = PgBackRest(app)
    pgbr.require()
    backup = backup_for_point(pgbr.backups(), point)
    if backup is None:
        raise Conflict("No pgBackRest backup reaches this snapshot's restore point "
                       "(expired?)", {"snapshot": name, "restore_point": point["restore_point"],
                                      "lsn": point["lsn"]})
    return backup["label"]


def restore_to_point(app, job, label, point):
    """The backup section's physical restore, aimed at the restore point."""
    job.log(f"piglet: restoring backup {label} up to restore point "
            f"{point['restore_point']!r}")
    args = ["--type=name", f"--target={point['restore_point']}",
            f"--target-timeline={point['timeline']}"]
    result = physical_restore(app, job, label, None, True, target_args=args)
    del result["target_time"]
    return dict(result, databases="all", restore_point=point["restore_point"],
                lsn=point["lsn"])


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
        pgbr = snapshot_pgbackrest(app)
        database = (create_restore_point(app, job, pgbr, name) if pgbr
                    else dump_cluster_into(app, job, os.path.join(tmp, "db")))
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
            app.services.act(name, "stop", wait=True)
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
            app.services.act(name, "start", wait=True)
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
    point = summary["database"]
    if point["method"] == "pgbackrest":
        label = restore_backup_for(app, name, point)
    else:
        check_dumps(app, job, os.path.join(path, "db"), point)
    pre_name = pre_restore_name(app)
    build_snapshot(app, job, pre_name, f"Taken before restoring {name}", paths,
                   missing_ok=True)
    job.set_progress(50)
    try:
        files = restore_files(app, job, path, snapshot_path(app, pre_name))
        write_json(os.path.join(snapshots_root(app), WORKSPACE_STATE), {"restored": name})
        job.set_progress(70)
        if point["method"] == "pgbackrest":
            database = restore_to_point(app, job, label, point)
        else:
            database = {"databases": restore_databases(app, job, os.path.join(path, "db"),
                                                       point)}
    except ApiError as exc:
        exc.details["pre_restore"] = pre_name
        raise
    except (OSError, psycopg.Error) as exc:
        raise ApiError(f"Restore failed: {first_line(exc)}",
                       {"pre_restore": pre_name}) from None
    return dict(database, snapshot=name, pre_restore=pre_name, files=files)


# -- handlers -----------------------------------------------------------------


def list_snapshots(app, req):
    """200: every complete snapshot, newest first."""
    return {"snapshots": [public_snapshot(s) for s in all_summaries(app)]}


def get_snapshot(app, req):
    """200; 400 invalid name; 404 no such snapshot."""
    return public_snapshot(load_summary(app, req.params["name"]))


def create_snapshot(app, req):
    """202 job; 400 invalid name or description; 409 name taken or another
    cluster-wide job running; 503 PostgreSQL down, workspace paths unusable,
    or pgBackRest enabled with archiving off."""
    name, description = req.body["name"], req.body.get("description")
    check_snapshot_name(name)
    if description is not None and (len(description) > DESCRIPTION_MAX_CHARS
                                    or "\0" in description):
        raise BadRequest(f"description: at most {DESCRIPTION_MAX_CHARS} characters, no NUL",
                         {"field": "description"})
    if os.path.lexists(os.path.join(snapshots_root(app), name)):
        raise Conflict("Snapshot already exists", {"snapshot": name})
    require_postgres(app)
    snapshot_pgbackrest(app)
    paths = workspace_paths(app)
    for path in paths:
        check_workspace_dir(path)
    job = app.jobs.submit("snapshot", {"name": name, "description": description},
                          lambda job: public_snapshot(
                              build_snapshot(app, job, name, description, paths)))
    return job_accepted(job)


def restore_snapshot(app, req):
    """202 job; 400 invalid name; 404 no such snapshot; 409 another cluster-wide
    job running, or no pgBackRest backup reaches the snapshot's restore point;
    503 PostgreSQL down, snapshots misconfigured, or the snapshot is a restore
    point and pgBackRest is not configured."""
    name = req.params["name"]
    summary = load_summary(app, name)
    require_postgres(app)
    workspace_paths(app, [t["path"] for t in summary["trees"]])
    check_stop_services(app)
    if summary["database"]["method"] == "pgbackrest":
        restore_backup_for(app, name, summary["database"])
    snapshot_pgbackrest(app)   # the pre-restore snapshot's way
    job = app.jobs.submit("snapshot-restore", {"name": name},
                          lambda job: restore_work(app, job, name),
                          conflicts=("logical-backup",))
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
    shutil.rmtree(trash, ignore_errors=True)  # a starting job may clean it up too
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
# Meta: OpenAPI document, metrics, audit, idempotent retries, TLS
# ---------------------------------------------------------------------------

AUDIT_DEFAULT_LIMIT = 100
AUDIT_MAX_LIMIT = 1000
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
IDEMPOTENCY_MAX_PER_KEY = 10000   # past this the oldest replies are forgotten
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x20-\x7e]{1,255}$")
# Replies are kept on disk for replay; a secret in one (POST /keys) is not.
REPLAY_WITHHELD_FIELDS = ("key", "password")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METRIC_METHODS = ("GET", "HEAD", "POST", "PATCH", "PUT", "DELETE")
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_rfc3339(text):
    """Seconds since the epoch; ValueError unless it is a time with a zone."""
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("no time zone")
    return moment.timestamp()


# -- OpenAPI -----------------------------------------------------------------

ERROR_CODES = sorted({ApiError.code} | {cls.code for cls in ApiError.__subclasses__()})
ERROR_OBJECT = {
    "type": "object", "required": ["code", "message", "details"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                   "details": {"type": "object"}}}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": dict(ERROR_OBJECT, additionalProperties=False, properties=dict(
        ERROR_OBJECT["properties"], code={"type": "string", "enum": ERROR_CODES}))}}
TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
JOB_SCHEMA = {
    "type": "object", "required": list(JOB_FIELDS),
    "properties": {
        "id": {"type": "string"}, "kind": {"type": "string"},
        "state": {"enum": ["queued", "running", "succeeded", "failed"]},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": TIME_OR_NULL, "finished_at": TIME_OR_NULL,
        "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
        "request": {"type": "object"}, "result": {},
        "error": {"oneOf": [{"type": "null"}, ERROR_OBJECT]},
        "log_tail": {"type": "array", "items": {"type": "string"}}}}
AUDIT_ENTRY_SCHEMA = {
    "type": "object",
    "required": ["time", "event", "key", "client", "method", "path", "status",
                 "request_id", "job"],
    "properties": {
        "time": {"type": "string", "format": "date-time"},
        "event": {"enum": ["request", "job"]},
        "key": {"type": ["string", "null"]}, "client": {"type": ["string", "null"]},
        "method": {"type": ["string", "null"]}, "path": {"type": ["string", "null"]},
        "status": {"type": ["integer", "null"]},
        "request_id": {"type": ["string", "null"]}, "job": {"type": ["string", "null"]},
        "kind": {"type": "string"}, "state": {"type": "string"},
        "error": {"type": ["string", "null"]}}}
HEADER_DOCS = {
    "X-Request-Id": "The request's id, also in the log and the audit log",
    "Location": "Where the created object or the job can be read",
    "WWW-Authenticate": "Always 'Bearer'",
    "Allow": "The methods this path answers",
    "Retry-After": "Whole seconds to wait",
}
# Error statuses every operation can give: any request can carry a bad
# Content-Length or none of the rate-limit tokens, or meet a busy server.
COMMON_ERRORS = (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                 HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.INTERNAL_SERVER_ERROR,
                 HTTPStatus.SERVICE_UNAVAILABLE)


def field_schema(field):
    """JSON Schema of one Field."""
    schema = {"type": [field.kind, "null"] if field.nullable else field.kind}
    if field.items:
        schema["items"] = {"type": field.items}
    if field.enum is not None:
        schema["enum"] = list(field.enum) + ([None] if field.nullable else [])
    return schema


def object_schema(fields):
    """A JSON object with exactly these fields: unknown ones are rejected."""
    schema = {"type": "object", "additionalProperties": False,
              "properties": {name: field_schema(f) for name, f in fields.items()}}
    required = [name for name, f in fields.items() if f.required]
    if required:
        schema["required"] = required
    return schema


def route_parameters(route):
    params = [{"name": seg[1:-1], "in": "path", "required": True,
               "schema": {"type": "string", "minLength": 1}}
              for seg in route.segments if seg.startswith("{")]
    params += [{"name": name, "in": "query", "required": field.required,
                "schema": field_schema(field)} for name, field in route.query.items()]
    return params


def success_statuses(route):
    if route.status is not None:
        return [HTTPStatus(route.status)]
    if route.method == "DELETE":
        return [HTTPStatus.NO_CONTENT]
    if route.method == "POST":  # unannotated: created, done or a job
        return [HTTPStatus.OK, HTTPStatus.CREATED, HTTPStatus.ACCEPTED]
    return [HTTPStatus.OK]


def header_refs(*names):
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def success_response(route, status):
    response = {"description": status.phrase, "headers": header_refs("X-Request-Id")}
    if status == HTTPStatus.NO_CONTENT:
        return response
    if status == HTTPStatus.ACCEPTED:
        response["headers"].update(header_refs("Location"))
    elif status == HTTPStatus.CREATED:  # where the contract asks for one
        response["headers"]["Location"] = {"$ref": "#/components/headers/CreatedLocation"}
    schema = route.reply or {"type": "object"}
    if status == HTTPStatus.ACCEPTED and route.reply is None:
        schema = {"$ref": "#/components/schemas/JobAccepted"}
    response["content"] = {route.reply_type: {"schema": schema}}
    return response


def error_statuses(route):
    statuses = set(COMMON_ERRORS)
    if route.scope is not None:
        statuses.add(HTTPStatus.UNAUTHORIZED)
    if route.scope == "admin" or route.method != "GET":
        statuses.add(HTTPStatus.FORBIDDEN)
    if route.method != "GET":
        statuses.add(HTTPStatus.CONFLICT)
    if route.body is not None:
        statuses.add(HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    if route.body or "{" in route.pattern or route.method != "GET":
        statuses.add(HTTPStatus.NOT_FOUND)  # the object, or one the body names
    return sorted(statuses)


def route_responses(route):
    responses = {str(s.value): success_response(route, s) for s in success_statuses(route)}
    for status in error_statuses(route):
        responses[str(status.value)] = {"$ref": f"#/components/responses/E{status.value}"}
    return responses


def route_operation(route):
    doc = " ".join((route.handler.__doc__ or "").split())
    operation = {"operationId": route.handler.__name__,
                 "tags": [route.segments[0]],
                 "summary": f"{route.method} {route.pattern}",
                 "responses": route_responses(route)}
    if doc:
        operation["description"] = doc
    params = route_parameters(route)
    if params:
        operation["parameters"] = params
    if route.body is not None:
        operation["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": object_schema(route.body)}}}
    if route.scope is None:
        operation["security"] = []
    return operation


def error_response_components():
    extra = {HTTPStatus.UNAUTHORIZED: "WWW-Authenticate",
             HTTPStatus.METHOD_NOT_ALLOWED: "Allow",
             HTTPStatus.TOO_MANY_REQUESTS: "Retry-After"}
    responses = {}
    for cls in ApiError.__subclasses__():
        status = cls.status
        headers = header_refs("X-Request-Id", *([extra[status]] if status in extra else []))
        responses[f"E{status.value}"] = {
            "description": f"{status.phrase} ({cls.code})", "headers": headers,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    responses["E500"] = dict(responses["E400"], description="Internal error (INTERNAL_ERROR)")
    return responses


def openapi_components():
    return {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "An API key: Bearer pgl_..."}},
        "schemas": {"Error": ERROR_SCHEMA, "Job": JOB_SCHEMA,
                    "JobAccepted": {"type": "object", "required": ["job"],
                                    "properties": {"job": {"$ref": "#/components/schemas/Job"}}}},
        "headers": dict({name: {"description": text, "required": True,
                                "schema": {"type": "string"}}
                         for name, text in HEADER_DOCS.items()},
                        CreatedLocation={"description": HEADER_DOCS["Location"],
                                         "schema": {"type": "string"}}),
        "responses": error_response_components(),
    }


def openapi_document(routes):
    """OpenAPI 3.1 for `routes`; the router and this document share the table."""
    paths, seen = {}, set()
    for route in routes:
        operation = route_operation(route)
        while operation["operationId"] in seen:  # one handler on two routes
            operation["operationId"] += "_" + route.method.lower()
        seen.add(operation["operationId"])
        paths.setdefault("/" + route.pattern.strip("/"), {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Piglet", "version": VERSION,
                 "description": "Control API of a one-machine PostgreSQL appliance. "
                                "Every error body is the Error envelope."},
        "servers": [{"url": API_PREFIX}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": openapi_components(),
    }


def get_openapi(app, req):
    """200: this API's OpenAPI 3.1 document; no key needed."""
    return openapi_document(ROUTES)


# -- Metrics -----------------------------------------------------------------


class Metrics:
    """Request counts and latencies, in memory: they restart at zero with Piglet."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {}       # (method, route, status) -> count
        self.latency = {}        # route -> [cumulative bucket counts..., sum, count]
        self.rate_limited = 0

    def observe(self, method, route, status, seconds):
        method = method if method in METRIC_METHODS else "OTHER"
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.setdefault(route, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def count_rate_limited(self):
        with self._lock:
            self.rate_limited += 1

    def copy(self):
        with self._lock:
            return (dict(self.requests), {k: list(v) for k, v in self.latency.items()},
                    self.rate_limited)


def label_text(labels):
    def escape(value):
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    inner = ",".join(f'{name}="{escape(value)}"' for name, value in labels.items())
    return "{" + inner + "}" if inner else ""


def metric_family(name, kind, help_text, samples):
    """Text-format lines of one family; samples are (suffix, labels, value)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        lines.append(f"{name}{suffix}{label_text(labels)} {value!r}")
    return lines


def request_families(metrics):
    requests, latency, rate_limited = metrics.copy()
    counts = [("", {"method": m, "route": r, "status": str(s)}, n)
              for (m, r, s), n in sorted(requests.items())]
    buckets = []
    for route, hist in sorted(latency.items()):
        for bound, count in zip(LATENCY_BUCKETS, hist):
            buckets.append(("_bucket", {"route": route, "le": repr(bound)}, count))
        buckets.append(("_bucket", {"route": route, "le": "+Inf"}, hist[-1]))
        buckets += [("_sum", {"route": route}, hist[-2]), ("_count", {"route": route}, hist[-1])]
    return (metric_family("piglet_http_requests_total", "counter",
                          "Requests answered, by method, route pattern and status", counts)
            + metric_family("piglet_http_request_duration_seconds", "histogram",
                            "Time from request line to response, by route pattern", buckets)
            + metric_family("piglet_rate_limited_total", "counter",
                            "Requests rejected with 429 by the rate limiter",
                            [("", {}, rate_limited)]))


def last_backup_time(jobs):
    """When the newest successful backup job ended (epoch seconds), else 0."""
    times = [parse_rfc3339(j["finished_at"]) for j in jobs
             if j["kind"] in ("backup", "logical-backup") and j["state"] == "succeeded"]
    return max(times, default=0)


def state_families(app):
    jobs = app.jobs.list()
    counts = {}
    for job in jobs:
        key = (job["kind"], job["state"])
        counts[key] = counts.get(key, 0) + 1
    kinds = sorted({job["kind"] for job in jobs})
    samples = [("", {"kind": kind, "state": state}, counts.get((kind, state), 0))
               for kind in kinds for state in JOB_SCHEMA["properties"]["state"]["enum"]]
    pg_up = 1 if app.postgres_info() is not None else 0
    started = time.time() - (time.monotonic() - app.started)
    return (metric_family("piglet_jobs", "gauge", "Jobs on record, by kind and state", samples)
            + metric_family("piglet_last_backup_success_timestamp_seconds", "gauge",
                            "End of the newest successful backup job (0: none yet)",
                            [("", {}, last_backup_time(jobs))])
            + metric_family("piglet_postgres_up", "gauge",
                            "1 when PostgreSQL accepts connections", [("", {}, pg_up)])
            + metric_family("piglet_start_time_seconds", "gauge",
                            "When this Piglet process started", [("", {}, round(started, 3))])
            + metric_family("piglet_info", "gauge", "Piglet's version",
                            [("", {"version": VERSION}, 1)]))


def get_metrics(app, req):
    """200: Prometheus text format (any key)."""
    text = "\n".join(request_families(app.metrics) + state_families(app)) + "\n"
    return Reply(HTTPStatus.OK, text.encode("utf-8"), {"Content-Type": METRICS_TYPE})


def observe_request(app, handler, reply):
    """After every response: count and time it; audit it if it may change something."""
    route = getattr(handler, "route", None)
    elapsed = time.monotonic() - handler.started
    app.metrics.observe(handler.command, route.pattern if route else "unmatched",
                        reply.status.value, elapsed)
    if route is not None and handler.command not in ("GET", "HEAD"):
        app.audit.record_request(handler, reply)


# ---------------------------------------------------------------------------
# Audit log, idempotent retries and TLS
# ---------------------------------------------------------------------------


def reversed_lines(path, block=65536):
    """The file's non-empty lines, last first, reading from the end."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        position = handle.seek(0, os.SEEK_END)
        rest = b""
        while position > 0:
            step = min(block, position)
            position -= step
            handle.seek(position)
            lines = (handle.read(step) + rest).split(b"\n")
            rest = lines.pop(0)
            yield from (line for line in reversed(lines) if line)
        if rest:
            yield rest


class AuditLog:
    """state_dir/audit.log: one JSON line per mutating request and per job end.

    Lines carry who, from where, what path and the outcome, never a body, so
    a password or key sent in one never reaches this file.
    """

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, "audit.log")
        self._lock = threading.Lock()
        self._local = threading.local()   # the request a handler thread serves
        self._job_owners = {}             # job id -> who started it, until it ends

    def append(self, entry):
        try:
            with self._lock:
                # The time is taken under the lock so the file stays in time order.
                entry = dict(time=utc_iso(time.time()), **entry)
                line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error("could not write the audit log %s: %s", self.path, exc)

    def record_request(self, handler, reply):
        job = reply.body.get("job") if isinstance(reply.body, dict) else None
        self.append({"event": "request",
                     "key": None if handler.key_name == "-" else handler.key_name,
                     "client": handler.client_address[0], "method": handler.command,
                     "path": handler.path[:2048], "status": reply.status.value,
                     "request_id": handler.request_id,
                     "job": job.get("id") if isinstance(job, dict) else None})

    def set_context(self, req):
        """Jobs submitted by this thread from now on belong to `req` (None: nobody)."""
        self._local.context = None if req is None else {
            "key": req.key["name"] if req.key else None, "client": req.client,
            "request_id": req.request_id}

    def job_event(self, event, job):
        """JobManager's listener: remember who queued a job, write its end."""
        if event == "queued":
            context = getattr(self._local, "context", None)
            if context is not None:
                with self._lock:
                    self._job_owners[job["id"]] = context
            return
        with self._lock:
            owner = self._job_owners.pop(job["id"], {})
        error = job.get("error") or {}
        self.append({"event": "job", "key": owner.get("key"), "client": owner.get("client"),
                     "method": None, "path": None, "status": None,
                     "request_id": owner.get("request_id"), "job": job["id"],
                     "kind": job["kind"], "state": job["state"], "error": error.get("code")})

    def read(self, since, limit):
        """Up to `limit` entries at or after `since` (epoch seconds), newest first."""
        entries = []
        for line in reversed_lines(self.path):
            try:
                entry = json.loads(line)
                moment = parse_rfc3339(entry["time"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash mid-write
            if since is not None and moment < since:
                break  # the file is in time order
            entries.append(entry)
            if len(entries) >= limit:
                break
        return entries


def query_value(req, name):
    values = req.query.get(name)
    return values[-1] if values else None


def audit_query(req):
    """(since, limit) from the query string; 400 naming the bad parameter."""
    since, limit = query_value(req, "since"), query_value(req, "limit")
    try:
        since = None if since is None else parse_rfc3339(since)
    except ValueError:
        raise BadRequest("'since' must be an RFC 3339 time such as 2024-05-01T12:00:00Z",
                         {"field": "since"}) from None
    if limit is None:
        return since, AUDIT_DEFAULT_LIMIT
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= AUDIT_MAX_LIMIT:
        raise BadRequest(f"'limit' must be an integer from 1 to {AUDIT_MAX_LIMIT}",
                         {"field": "limit"})
    return since, int(limit)


def list_audit(app, req):
    """200: audit entries newest first (admin); 400 bad since or limit."""
    since, limit = audit_query(req)
    return {"entries": app.audit.read(since, limit)}


# -- Idempotent retries --------------------------------------------------------


class IdempotencyStore:
    """Replies to POSTs that carried an Idempotency-Key, one file per API key.

    Only successful replies are kept: a failed request changed nothing, so
    its retry may as well run again.
    """

    def __init__(self, state_dir):
        self.dir = os.path.join(state_dir, "idempotency")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._running = set()
        self._prune()

    def _prune(self):
        """Drop expired replies, and files left with none (revoked keys)."""
        for name in os.listdir(self.dir):
            owner, ext = os.path.splitext(name)
            if ext != ".json":
                continue
            entries = self._load(owner)
            if not entries:
                os.unlink(os.path.join(self.dir, name))
            else:
                atomic_write_json(os.path.join(self.dir, name), entries)

    def _load(self, owner):
        try:
            with open(os.path.join(self.dir, owner + ".json"), encoding="utf-8") as handle:
                entries = json.load(handle)
        except FileNotFoundError:
            return {}
        except ValueError as exc:  # only a hand edit can do this: writes are atomic
            log.warning("ignoring unreadable idempotency file for %s: %s", owner, exc)
            return {}
        cutoff = time.time() - IDEMPOTENCY_TTL_SECONDS
        return {key: e for key, e in entries.items() if e["created"] >= cutoff}

    def begin(self, owner, key, fingerprint):
        """The stored Reply of a repeat, else None and the key is marked running."""
        with self._lock:
            entry = self._load(owner).get(key)
            if entry is not None and entry["fingerprint"] != fingerprint:
                raise Conflict("This Idempotency-Key was used with another request",
                               {"idempotency_key": key})
            if entry is not None:
                return Reply(HTTPStatus(entry["status"]), entry["body"],
                             dict(entry["headers"], **{"Idempotent-Replayed": "true"}))
            if (owner, key) in self._running:
                raise Conflict("A request with this Idempotency-Key is still running",
                               {"idempotency_key": key})
            self._running.add((owner, key))
        return None

    def finish(self, owner, key, fingerprint, reply):
        """Keep a successful reply; a failed or crashed request leaves nothing."""
        with self._lock:
            self._running.discard((owner, key))
            if reply is None or not 200 <= reply.status < 300:
                return
            body = reply.body
            if isinstance(body, dict):
                body = {k: None if k in REPLAY_WITHHELD_FIELDS else v for k, v in body.items()}
            entries = self._load(owner)
            entries[key] = {"fingerprint": fingerprint, "created": time.time(),
                            "status": reply.status.value, "body": body,
                            "headers": reply.headers}
            if len(entries) > IDEMPOTENCY_MAX_PER_KEY:
                oldest = sorted(entries, key=lambda k: entries[k]["created"])
                for stale in oldest[:len(entries) - IDEMPOTENCY_MAX_PER_KEY]:
                    del entries[stale]
            atomic_write_json(os.path.join(self.dir, owner + ".json"), entries)


def request_fingerprint(route, req):
    """Same route, same path parameters, same body (key order aside).

    An HMAC keyed by the API key's stored hash, not a bare hash: a body may
    hold a password, and a plain digest on disk could be brute-forced.
    """
    text = json.dumps([route.method, route.pattern, req.params, req.body], sort_keys=True)
    return hmac.new(req.key["hash"].encode(), text.encode("utf-8"), hashlib.sha256).hexdigest()


def run_handler(app, route, req):
    app.audit.set_context(req)   # a job queued now is credited to this request
    try:
        result = route.handler(app, req)
    finally:
        app.audit.set_context(None)
    return result if isinstance(result, Reply) else Reply(HTTPStatus.OK, result)


def call_handler(app, route, req, idempotency_key=None):
    """The handler's Reply; a repeated POST with an Idempotency-Key gets the first."""
    if req.method != "POST" or idempotency_key is None or req.key is None:
        return run_handler(app, route, req)
    if not IDEMPOTENCY_KEY_RE.match(idempotency_key):
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters",
                         {"header": "Idempotency-Key"})
    # Keyed by the API key's hash: a revoked and re-made name starts afresh.
    owner = hashlib.sha256(req.key["hash"].encode()).hexdigest()[:32]
    fingerprint = request_fingerprint(route, req)
    stored = app.idempotency.begin(owner, idempotency_key, fingerprint)
    if stored is not None:
        return stored
    reply = None
    try:
        reply = run_handler(app, route, req)
    finally:
        app.idempotency.finish(owner, idempotency_key, fingerprint, reply)
    return reply


# -- TLS -----------------------------------------------------------------------


def tls_context(tls):
    """A server context for tls.cert and tls.key (TLS 1.2 or later), or None."""
    if not tls["cert"]:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls["cert"], tls["key"])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls.cert/tls.key: {exc}") from None
    return context


def tls_accept(server, sock, client_address):
    """The connection after its TLS handshake, or None.

    Runs in the connection's own thread, bounded by the header deadline, so
    a client that never finishes its handshake holds only itself up.  A
    plain-HTTP request fails the handshake at once and is never read.
    """
    tls_sock = server.tls_context.wrap_socket(sock, server_side=True,
                                              do_handshake_on_connect=False)
    server.deadlines.arm(tls_sock, HEADER_DEADLINE_SECONDS)
    tls_sock.settimeout(HEADER_DEADLINE_SECONDS)
    try:
        tls_sock.do_handshake()
        return tls_sock
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        log.info("TLS handshake with %s failed: %s", client_address[0], exc)
        tls_sock.close()
        return None
    finally:
        server.deadlines.disarm(tls_sock)


def listen_warning(config):
    """The start-up warning when API keys would cross a network in clear."""
    host = config["listen"]
    if config["tls"]["cert"] or host == "localhost":
        return None
    with contextlib.suppress(ValueError):  # a host name: assume it is reachable
        if ipaddress.ip_address(host).is_loopback:
            return None
    return f"serving {host} without TLS: API keys cross the network in clear"


META_ROUTES = [
    Route("GET", "/openapi.json", get_openapi, None,
          reply={"type": "object", "required": ["openapi", "paths"]}),
    Route("GET", "/metrics", get_metrics, reply={"type": "string"},
          reply_type="text/plain"),
    Route("GET", "/audit", list_audit, "admin",
          reply={"type": "object", "required": ["entries"], "properties": {
              "entries": {"type": "array", "items": AUDIT_ENTRY_SCHEMA}}},
          query={"since": Field("string"), "limit": Field("integer")}),
]


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
        self.metrics = Metrics()
        self.audit = AuditLog(config["state_dir"])
        self.idempotency = IdempotencyStore(config["state_dir"])
        self.jobs = JobManager(config["state_dir"], listener=self.audit.job_event)
        self.db_sizes = DatabaseSizes(self.db)
        self.db_sizes.start()
        reap_orphan_tools(self.jobs.dir)
        clean_partial_dumps(config["backups"]["dir"])

    def reload(self):
        """SIGHUP: re-read what can change safely; listen address and port stay."""
        config = load_config(self.config_file)
        for fixed in ("listen", "port", "tls", "state_dir", "postgres"):
            if config[fixed] != self.config[fixed]:
                log.warning("reload: %s changed; it takes effect at the next restart", fixed)
                config[fixed] = self.config[fixed]
        # Replace only what changed: a new limiter refills every bucket, a new
        # key store forgets unsaved last-used times.
        rate = config["rate_limit"]
        if rate != self.config["rate_limit"]:
            self.limiter = RateLimiter(rate["per_minute"], rate["burst"])
        if config["keys_file"] != self.config["keys_file"]:
            self.keys.flush_last_used(force=True)
            self.keys = KeyStore(config["keys_file"])
        if config["services"] != self.config["services"]:
            self.services = Services(config["services"])
        self.config = config
        logging.getLogger().setLevel(config["log_level"])

    def postgres_info(self):
        """{'version', 'data_dir'} from a live session, or None when it is down."""
        return self.db.health.get()


# ---------------------------------------------------------------------------
# Handlers: system, keys, jobs, services
# ---------------------------------------------------------------------------


def judge_postgres(app, services, pg_up=None):
    """The services with PostgreSQL's entry judged by a real connection.

    Debian's postgresql.service reads "active (exited)" while its cluster is
    down, and a cluster started by hand runs while its unit is inactive: the
    unit alone cannot be trusted for PostgreSQL.
    """
    name = app.config["postgres"]["service"]
    service = services.get(name)
    if service is None:
        return services
    if pg_up is None:
        pg_up = app.postgres_info() is not None
    if pg_up:
        status = "running"
    elif service["status"] in ("running", "unknown"):
        status = "stopped"
    else:
        status = service["status"]   # failed, starting, stopping say more
    return dict(services, **{name: dict(service, status=status)})


def service_statuses(app, pg_up):
    """name -> status for /status, which never fails for want of systemd."""
    services = judge_postgres(app, app.services.all(strict=False), pg_up)
    return {name: s["status"] for name, s in services.items()}


def get_status(app, req):
    """200 always: healthy, degraded (a service down) or unhealthy (PostgreSQL down)."""
    pg_up = app.postgres_info() is not None
    statuses = service_statuses(app, pg_up)
    if not pg_up:
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
    # Least privilege over the network: a key is `read` unless asked otherwise.
    secret, record = app.keys.create(req.body["name"], req.body.get("scope", "read"))
    return Reply(HTTPStatus.CREATED, dict(record, key=secret),
                 {"Location": f"{API_PREFIX}/keys/{record['name']}"})


def revoke_key(app, req):
    """204; 404 unknown name."""
    app.keys.revoke(req.params["name"])
    return Reply(HTTPStatus.NO_CONTENT)


def list_jobs(app, req):
    """200: every job kept on disk, newest first."""
    return {"jobs": app.jobs.list()}


def get_job(app, req):
    """200; 404 unknown id."""
    return {"job": app.jobs.get(req.params["id"])}


def list_services(app, req):
    """200; 503 when a service is a unit and systemd cannot be asked."""
    services = judge_postgres(app, app.services.all())
    return {"services": [public_service(s) for s in services.values()]}


def get_service(app, req):
    """200; 404 for a name not in the config (systemctl is never asked);
    503 for a unit when systemd cannot be asked."""
    name = req.params["name"]
    return public_service(judge_postgres(app, {name: app.services.get(name)})[name])


def act_service(app, req):
    """200 once settled; 400 unknown action; 404 unknown service; 409 the unit
    failed or did not settle in time, or stopping PostgreSQL while a job runs;
    503 no systemd."""
    name, action = req.params["name"], req.params["action"]
    app.services.entry(name)
    if action not in SERVICE_ACTIONS:
        raise BadRequest(f"Unknown action {action!r}", {"allowed": list(SERVICE_ACTIONS)})
    is_postgres = name == app.config["postgres"]["service"]
    if is_postgres and action != "start":
        check_no_running_job(app)
    try:
        service = app.services.act(name, action)
    finally:
        if is_postgres:
            app.db.close()   # idle sessions to the old server are dead now
            app.db.health.invalidate()
    if is_postgres and action != "stop" and service["status"] == "running":
        wait_for_postgres(app)
    return public_service(judge_postgres(app, {name: service})[name])


def check_no_running_job(app):
    """409 when a job (backup, restore, snapshot) is under way: each needs PostgreSQL."""
    for job in app.jobs.list():
        if job["state"] in ("queued", "running"):
            raise Conflict(f"Job {job['id']} needs PostgreSQL; wait for it to finish",
                           {"job": job["id"]})


def wait_for_postgres(app):
    """pg_ctlcluster waits for start-up, a unit of one's own may not."""
    deadline = time.monotonic() + POSTGRES_READY_SECONDS
    while app.postgres_info() is None and time.monotonic() < deadline:
        time.sleep(SERVICE_POLL_SECONDS)
        app.db.health.invalidate()


def public_service(service):
    """The contract's fields, plus systemd's own states for units."""
    return {k: v for k, v in service.items() if v is not None or k in PUBLIC_SERVICE_FIELDS}


PUBLIC_SERVICE_FIELDS = ("name", "status", "port", "unit", "enabled", "pid", "since")


KEY_BODY = {"name": Field("string", required=True),
            "scope": Field("string", enum=list(SCOPES))}


def reply_object(required, **properties):
    """A reply schema: these fields at least, each {} (any) unless given."""
    props = {name: properties.get(name, {}) for name in required}
    return {"type": "object", "required": list(required), "properties": props}


STRING, INTEGER = {"type": "string"}, {"type": "integer"}
OPT_STRING, OPT_INTEGER = {"type": ["string", "null"]}, {"type": ["integer", "null"]}
KEY_SCHEMA = reply_object(("name", "scope", "created_at", "last_used_at"), name=STRING,
                          scope={"enum": list(SCOPES)}, last_used_at=OPT_STRING)
SERVICE_SCHEMA = reply_object(PUBLIC_SERVICE_FIELDS, name=STRING, port=OPT_INTEGER,
                              status={"enum": ["running", "stopped", "failed", "starting",
                                               "stopping", "unknown"]})
STATUS_SCHEMA = reply_object(("status", "version", "uptime", "services"),
                             status={"enum": ["healthy", "degraded", "unhealthy"]},
                             version=STRING, uptime=INTEGER, services={"type": "object"})
SYSTEM_SCHEMA = reply_object(("hostname", "os", "kernel", "cpu", "memory", "memory_bytes",
                              "disk", "disk_bytes", "disk_free_bytes", "uptime",
                              "postgres_version"),
                             hostname=STRING, cpu=OPT_INTEGER, memory_bytes=OPT_INTEGER,
                             disk_bytes=INTEGER, disk_free_bytes=INTEGER, uptime=INTEGER,
                             postgres_version=OPT_STRING)
# The secret is null when an Idempotency-Key replays the reply: it is never stored.
NEW_KEY_SCHEMA = dict(KEY_SCHEMA, required=KEY_SCHEMA["required"] + ["key"],
                      properties=dict(KEY_SCHEMA["properties"], key=OPT_STRING))
JOB_REF = {"$ref": "#/components/schemas/Job"}

CORE_ROUTES = [
    Route("GET", "/status", get_status, reply=STATUS_SCHEMA),
    Route("GET", "/system", get_system, reply=SYSTEM_SCHEMA),
    Route("GET", "/keys", list_keys, "admin",
          reply=reply_object(["keys"], keys={"type": "array", "items": KEY_SCHEMA})),
    Route("POST", "/keys", create_key, "admin", KEY_BODY, status=HTTPStatus.CREATED,
          reply=NEW_KEY_SCHEMA),
    Route("DELETE", "/keys/{name}", revoke_key, "admin"),
    Route("GET", "/jobs", list_jobs,
          reply=reply_object(["jobs"], jobs={"type": "array", "items": JOB_REF})),
    Route("GET", "/jobs/{id}", get_job, reply=reply_object(["job"], job=JOB_REF)),
]

SERVICE_ROUTES = [
    Route("GET", "/services", list_services,
          reply=reply_object(["services"], services={"type": "array",
                                                     "items": SERVICE_SCHEMA})),
    Route("GET", "/services/{name}", get_service, reply=SERVICE_SCHEMA),
    Route("POST", "/services/{name}/{action}", act_service, "admin", {},
          body_required=False, status=HTTPStatus.OK, reply=SERVICE_SCHEMA),
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


_date_cache = (0, "")


def http_date():
    """The Date header, formatted once a second rather than per response."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


class AccessLog:
    """Access lines pass through a queue to one writer thread.

    Written by the request threads themselves, each line waited for the log
    handler's lock while another thread wrote to stderr: a quarter of all
    time at 10 connections in bench_piglet.py.  deque.append needs no lock.
    """

    def __init__(self):
        self._queue = collections.deque()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def write(self, fmt, *args):
        if len(self._queue) > ACCESS_LOG_MAX_QUEUE:
            # The writer is behind: this line is written here, bounding memory.
            # Only this one: draining the queue here held one request for seconds.
            log.info(fmt, *args)
        else:
            self._queue.append((fmt, args))

    def _run(self):
        while True:
            time.sleep(ACCESS_LOG_FLUSH_SECONDS)
            self.flush()

    def flush(self):
        """Everything queued, in one write per log handler: a write per line
        would pass the GIL back and forth once per line."""
        records = []
        while self._queue:
            fmt, args = self._queue.popleft()
            records.append(log.makeRecord(log.name, logging.INFO, __file__, 0, fmt, args,
                                          None))
        if not records or not log.isEnabledFor(logging.INFO):
            return
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.StreamHandler):
                for record in records:
                    handler.handle(record)
                continue
            text = "".join(handler.format(record) + "\n" for record in records)
            with handler.lock:
                handler.stream.write(text)
                handler.flush()


ACCESS_LOG = AccessLog()


class HeaderBudget:
    """A reader whose readline() fails once `budget` bytes have been read."""

    def __init__(self, stream, budget):
        self.stream, self.budget = stream, budget

    def readline(self, limit=-1):
        line = self.stream.readline(limit)
        self.budget -= len(line)
        if self.budget < 0:
            raise http.client.LineTooLong("header block")
        return line

    def __getattr__(self, name):
        return getattr(self.stream, name)


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
                        # The plain socket's call, also for a TLS socket, whose
                        # own shutdown() would unwrap it under its reader's feet.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)


# Request ids: unique, not secret.  A counter after a random per-process
# prefix costs no system call per request, unlike reading random bytes.
_REQUEST_ID_PREFIX = secrets.token_hex(3)
_request_counter = itertools.count()


def new_request_id():
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter) & 0xFFFFFFFFFF:010x}"


class RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Set once per connection by setup(): a settimeout() per request costs two
    # fcntl calls, each handing the GIL to another thread.
    timeout = KEEPALIVE_IDLE_SECONDS
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
        # The whole request line must come within the idle time: a per-recv
        # timeout alone would let a byte every few seconds hold the connection.
        deadlines.arm(sock, KEEPALIVE_IDLE_SECONDS)
        try:
            self.raw_requestline = self.read_request_line()
            if not self.raw_requestline:
                self.close_connection = True
                return
            self._reset_request_state()
            deadlines.arm(sock, HEADER_DEADLINE_SECONDS)
            if len(self.raw_requestline) > MAX_LINE_BYTES:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            elif self.parse_request_bounded():
                deadlines.disarm(sock)
                getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.info("connection from %s dropped: %s", self.client_address[0], exc)
            self.close_connection = True
        finally:
            deadlines.disarm(sock)

    def read_request_line(self):
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        if line in (b"\r\n", b"\n"):
            # RFC 9112 section 2.2: ignore an empty line before the request line.
            line = self.rfile.readline(MAX_LINE_BYTES + 1)
        return line

    def parse_request_bounded(self):
        """The stdlib's parse_request, with all header lines capped together.

        Alone it allows 100 lines of 64 KiB each: 6.4 MB held per connection.
        """
        real = self.rfile
        self.rfile = HeaderBudget(real, MAX_HEADER_BYTES)
        try:
            return self.parse_request()
        finally:
            self.rfile = real

    def parse_request(self):
        if not super().parse_request():
            return False
        if not self.path.isascii() or not self.path.isprintable():
            self.send_error(HTTPStatus.BAD_REQUEST,
                            "The request target must be printable ASCII (percent-encode)")
            return False
        if self.path.startswith(("http://", "https://")):
            # Absolute form (RFC 9112 section 3.2.2): keep only the path.
            self.path = "/" + self.path.split("/", 3)[3] if self.path.count("/") >= 3 else "/"
        return True

    def handle_expect_100(self):
        # Answer "100 Continue" only once the body is known to be wanted (key,
        # scope and size checked), not before as the stdlib does.
        self.expect_continue = True
        return True

    def _reset_request_state(self):
        self.started = time.monotonic()
        self.request_id = new_request_id()
        self.key_name = "-"
        self.route = None
        self.body_pending = False
        self.expect_continue = False
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
        except (ValueError, RecursionError) as exc:
            # ValueError: bad UTF-8, bad JSON, or over Python's 4300-digit limit.
            raise BadRequest(f"Malformed JSON: {first_line(exc)[:200]}") from None
        check_body(route, body)
        return body

    def body_length(self):
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("Transfer-Encoding is not supported; send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        value = values[0].strip()
        # One plain decimal number only (RFC 9112 section 6.3): anything else
        # leaves the end of the body unknown, so the connection is closed too.
        if len(values) > 1 or not (value.isascii() and value.isdigit()):
            self.close_connection = True
            raise BadRequest("Content-Length must be one non-negative integer")
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
        if self.expect_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.expect_continue = False
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
        # In flight from here until the reply is written, so a SIGTERM drain
        # never cuts a reply off.
        with self.server.in_flight_request():
            reply = self.reply_for_request()
            if self.body_pending:
                self.close_connection = True  # an unread body would become the next request
            self.send_reply(reply)

    def reply_for_request(self):
        """The handler's reply, or the error envelope for whatever went wrong."""
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
        return reply

    def route_request(self):
        app = self.server.app
        path, _, query = self.path.partition("?")
        route, params = find_route(self.command, path)
        self.route = route
        key = self.authenticate(app, route)
        authorize(route, key)
        body = self.read_body(route)
        request = Request(self.command, params, urllib.parse.parse_qs(query), body,
                          key, self.request_id, self.client_address[0])
        with self.server.work_slot():
            return call_handler(app, route, request, self.headers.get("Idempotency-Key"))

    def authenticate(self, app, route):
        """The key record, rate-limited; None only for routes needing no key."""
        secret, malformed = self.bearer_token()
        key = app.keys.authenticate(secret) if secret else None
        if key is not None:
            self.key_name = key["name"]
        # Requests without a valid key share a bucket per TCP peer, which also
        # throttles key guessing; client headers (X-Forwarded-For) are ignored.
        identity = "key:" + key["name"] if key else "addr:" + self.client_address[0]
        allowed, headers = app.limiter.take(identity)
        self.extra_headers.update(headers)
        if not allowed:
            app.metrics.count_rate_limited()
            raise RateLimited("Too many requests; retry later",
                              {"retry_after": int(headers["Retry-After"])})
        if malformed:
            raise Unauthorized("Authorization must be one 'Bearer <key>' header")
        if key is None and route.scope is not None:
            raise Unauthorized("A valid API key is required" if secret is None
                               else "Unknown or revoked API key")
        return key

    def bearer_token(self):
        """(secret or None, malformed?) from the Authorization header."""
        headers = self.headers.get_all("Authorization") or []
        if not headers:
            return None, False
        scheme, _, token = headers[0].strip().partition(" ")
        token = token.strip()
        if len(headers) > 1 or scheme.lower() != "bearer" or not token or " " in token:
            return None, True
        return token, False

    # -- writing ---------------------------------------------------------------
    def send_reply(self, reply):
        """Status line, headers and body in one write (Nagle meets delayed ACK
        otherwise: ~40 ms per keep-alive request)."""
        body = b""
        if isinstance(reply.body, bytes):  # already encoded, e.g. metrics text
            body = reply.body
        elif reply.body is not None:
            # ASCII escapes: a lone surrogate echoed from a client cannot break it.
            body = (json.dumps(reply.body) + "\n").encode("ascii")
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   "X-Request-Id": self.request_id,
                   "Date": http_date(),
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
        # Logged and counted first: a client that reads /metrics right after
        # this reply must find this request in it.
        self.log_access(reply)
        self.wfile.write(head if self.command == "HEAD" else head + body)

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

    def log_access(self, reply):
        status = reply.status
        elapsed = (time.monotonic() - self.started) * 1000
        path = getattr(self, "path", "-").partition("?")[0]
        self.server.count_request(self, reply)
        ACCESS_LOG.write("%s %r %d %.1fms key=%s rid=%s", getattr(self, "command", "-"),
                         path, status.value, elapsed, self.key_name, self.request_id)

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
        self.tls_context = None   # set by serve() when tls.cert is configured
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
        try:
            yield
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def in_flight_request(self):
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def count_request(self, handler, reply):
        observe_request(self.app, handler, reply)

    def finish_request(self, request, client_address):
        if self.tls_context is None:
            super().finish_request(request, client_address)
            return
        tls_sock = tls_accept(self, request, client_address)
        if tls_sock is None:
            return
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            tls_sock.close()

    def process_request(self, request, client_address):
        with self._lock:
            full = self._connections >= self.app.config["max_connections"]
            if not full:
                self._connections += 1
        if full:
            self.refuse(request, client_address)
            return
        super().process_request(request, client_address)

    def refuse(self, sock, client_address):
        body = json.dumps(Unavailable("Too many connections", "piglet").body()).encode()
        head = ("HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                "Content-Type: application/json\r\n"
                f"X-Request-Id: {secrets.token_hex(8)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        log.warning("refused a connection from %s: %d open", client_address[0],
                    self.app.config["max_connections"])
        with contextlib.suppress(OSError):
            sock.sendall(head + body)
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
    except Exception as exc:  # whatever happens, systemd must hear READY again
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
    try:
        context = tls_context(config["tls"])
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    app = App(config, config_file)
    server = PigletServer(app)
    server.tls_context = context
    ACCESS_LOG.start()
    host, port = server.server_address[:2]
    warning = listen_warning(config)
    if warning:
        log.warning("%s", warning)
    install_signal_handlers(server, app)
    threading.Thread(target=housekeeping, args=(app, server), daemon=True).start()
    log.info("piglet %s listening on %s:%d over %s (postgres: %s)", VERSION, host, port,
             "https" if context else "http", redact_dsn(config["postgres"]["dsn"]))
    sd_notify("READY=1")
    server.serve_forever(poll_interval=0.5)
    server.socket.close()  # new connections are refused at once, not left hanging
    drain(server)
    with contextlib.suppress(OSError):
        app.keys.flush_last_used(force=True)
    server.server_close()
    app.db.close()
    ACCESS_LOG.flush()
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
    store.check()  # a corrupt keys file is reported, never silently overwritten
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
    except (ConfigError, OSError) as exc:
        print(f"piglet: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
