#!/usr/bin/env bash
# install.sh: install or update Piglet on Debian or Ubuntu.
#
#   ./install.sh        (as root)
#
# Idempotent: run it again after every update; what already works is left
# alone. What it does, in order:
#   1. apt packages: python3, python3-psycopg, pgbackrest, curl, openssl, and for
#      the test suite python3-pytest and python3-venv
#      (and postgresql when no cluster exists yet);
#   2. picks the PostgreSQL cluster (newest version, first cluster of it, from
#      pg_lsclusters; override with PIGLET_CLUSTER=15/main) and starts it;
#   3. creates the role "piglet" (SUPERUSER LOGIN), reached by OS user root over
#      the unix socket with peer authentication and the pg_ident map "piglet";
#   4. sets pgBackRest up: /etc/pgbackrest/pgbackrest.conf, archive_mode and
#      archive_command, stanza-create, check (all pgBackRest commands run as
#      the cluster owner, never as root);
#   5. installs piglet.py to /usr/local/lib/piglet/ (/usr/local: installed by
#      the administrator, not by dpkg) and piglet.service to
#      /etc/systemd/system/;
#   6. writes /etc/piglet/piglet.json only if it does not exist;
#   7. creates the admin key on the first install only and prints it once;
#   8. starts Piglet: with systemd as PID 1 through piglet.service, otherwise in
#      the background with a pid file (/run/piglet.pid) and a log file
#      (/var/log/piglet.log); it is restarted when piglet.py or the unit changed;
#   9. waits until the API answers.
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3
LIB_DIR=/usr/local/lib/piglet
PIGLET=$LIB_DIR/piglet.py
CONF_DIR=/etc/piglet
CONF=$CONF_DIR/piglet.json
UNIT=/etc/systemd/system/piglet.service
DROPIN_DIR=/etc/systemd/system/piglet.service.d
PIDFILE=/run/piglet.pid
LOGFILE=/var/log/piglet.log
STANZA=${PIGLET_STANZA:-main}
PGBR_CONF=/etc/pgbackrest/pgbackrest.conf
PGBR_REPO=/var/lib/pgbackrest
PGBR_LOG=/var/log/pgbackrest
PGBR_MARK="# Managed by Piglet's install.sh"
ARCHIVE_CMD="pgbackrest --stanza=$STANZA archive-push %p"

log() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -f "$SRC_DIR/piglet.py" ] || die "piglet.py not found next to install.sh ($SRC_DIR)"
[ -f "$SRC_DIR/piglet.service" ] || die "piglet.service not found next to install.sh ($SRC_DIR)"
command -v apt-get >/dev/null || die "this installer supports Debian and Ubuntu (apt-get) only"

SYSTEMD=0
if [ -d /run/systemd/system ]; then SYSTEMD=1; fi
cd /   # tools run as postgres must not start in a directory they cannot read

# ---------------------------------------------------------------- packages
is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}
have_cluster() {
  command -v pg_lsclusters >/dev/null && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]
}
want=(python3 python3-psycopg python3-pytest python3-venv pgbackrest curl openssl)
if ! have_cluster; then want+=(postgresql); fi
missing=()
for p in "${want[@]}"; do is_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
else
  log "packages already installed"
fi
if ! have_cluster; then
  ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$ver" ] || die "no PostgreSQL server installed"
  log "creating cluster $ver/main"
  pg_createcluster "$ver" main
fi

# ---------------------------------------------------------------- cluster
if [ -n "${PIGLET_CLUSTER:-}" ]; then
  line=$(pg_lsclusters -h | awk -v v="${PIGLET_CLUSTER%%/*}" -v c="${PIGLET_CLUSTER#*/}" '$1 == v && $2 == c')
  [ -n "$line" ] || die "cluster $PIGLET_CLUSTER not found by pg_lsclusters"
else
  # newest version first; within a version, pg_lsclusters order (stable sort)
  line=$(pg_lsclusters -h | sort -s -k1,1Vr | awk 'NR == 1')
fi
read -r PG_VER PG_NAME PG_PORT _ PG_OWNER PG_DATA _ <<<"$line"
PG_UNIT="postgresql@$PG_VER-$PG_NAME"
PG_SOCK=$(pg_conftool -s "$PG_VER" "$PG_NAME" show unix_socket_directories 2>/dev/null || true)
PG_SOCK=${PG_SOCK%%,*}
PG_SOCK=$(printf '%s' "$PG_SOCK" | tr -d "' ")
[ -n "$PG_SOCK" ] || PG_SOCK=/var/run/postgresql
log "cluster $PG_VER/$PG_NAME: port $PG_PORT, data $PG_DATA, socket $PG_SOCK, owner $PG_OWNER"

pg_running() { pg_ctlcluster "$PG_VER" "$PG_NAME" status >/dev/null 2>&1; }
pg_wait_ready() {
  local i
  for i in $(seq 60); do
    if pg_isready -q -h "$PG_SOCK" -p "$PG_PORT" -t 1; then return 0; fi
    sleep 0.5
  done
  die "cluster $PG_VER/$PG_NAME does not accept connections (see /var/log/postgresql/)"
}
pg_do() {  # start|restart
  if [ "$SYSTEMD" = 1 ]; then
    systemctl "$1" "$PG_UNIT"
  else
    pg_ctlcluster "$PG_VER" "$PG_NAME" "$1"
  fi
}
if ! pg_running; then
  log "starting cluster $PG_VER/$PG_NAME"
  pg_do start
fi
pg_wait_ready

# SQL as the cluster owner (peer authentication over the socket)
pg_sql() {
  runuser -u "$PG_OWNER" -- psql -X -q -At -v ON_ERROR_STOP=1 \
    -h "$PG_SOCK" -p "$PG_PORT" -d postgres "$@"
}
[ "$(pg_sql -c 'SELECT pg_is_in_recovery()')" = f ] ||
  die "cluster $PG_VER/$PG_NAME is a standby; Piglet needs the primary"

# ---------------------------------------------------------------- role, hba, ident
role=$(pg_sql -c "SELECT rolsuper AND rolcanlogin FROM pg_roles WHERE rolname = 'piglet'")
if [ -z "$role" ]; then
  log "creating role piglet"
  pg_sql -c 'CREATE ROLE piglet SUPERUSER LOGIN'
elif [ "$role" != t ]; then
  log "granting SUPERUSER LOGIN to role piglet"
  pg_sql -c 'ALTER ROLE piglet SUPERUSER LOGIN'
fi

HBA=$(pg_sql -c 'SHOW hba_file')
IDENT=$(pg_sql -c 'SHOW ident_file')
reload=0
if ! grep -Eq '^[[:space:]]*local[[:space:]]+all[[:space:]]+piglet[[:space:]]+peer[[:space:]]+map=piglet[[:space:]]*$' "$HBA"; then
  log "adding the piglet line at the top of $HBA"
  tmp=$(mktemp)
  # before the first rule, so that no other line catches the role first
  awk 'BEGIN { done = 0 }
       !done && $0 !~ /^[[:space:]]*(#|$)/ {
         print "# Piglet: OS user root connects as role piglet (map \"piglet\" in pg_ident.conf)"
         print "local   all             piglet                                  peer map=piglet"
         done = 1 }
       { print }
       END { if (!done) {
         print "local   all             piglet                                  peer map=piglet" } }' "$HBA" >"$tmp"
  cat "$tmp" >"$HBA"   # keeps the file's owner and mode
  rm -f "$tmp"
  reload=1
fi
if ! grep -Eq '^[[:space:]]*piglet[[:space:]]+root[[:space:]]+piglet[[:space:]]*$' "$IDENT"; then
  log "adding the piglet map to $IDENT"
  printf '%s\n' "piglet          root                    piglet" >>"$IDENT"
  reload=1
fi
if [ "$reload" = 1 ]; then
  pg_sql -c 'SELECT pg_reload_conf()' >/dev/null
  bad=$(pg_sql -c 'SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL')
  [ "$bad" = 0 ] || die "$HBA has errors (SELECT * FROM pg_hba_file_rules WHERE error IS NOT NULL)"
fi
ok=0
for i in $(seq 10); do
  if [ "$(psql -X -At -h "$PG_SOCK" -p "$PG_PORT" -U piglet -d postgres -c 'SELECT 1' 2>/dev/null)" = 1 ]; then
    ok=1; break
  fi
  sleep 0.5   # the reload is asynchronous
done
[ "$ok" = 1 ] || die "root cannot connect as role piglet: is another line above ours in $HBA?"
log "root connects as role piglet over $PG_SOCK"

# ---------------------------------------------------------------- pgBackRest
PGBR=1
PG_GROUP=$(id -gn "$PG_OWNER")
# repository and logs belong to the cluster owner (pgBackRest never runs as root here)
install -d -o "$PG_OWNER" -g "$PG_GROUP" -m 0750 "$PGBR_REPO" "$PGBR_LOG"
find "$PGBR_REPO" "$PGBR_LOG" \( ! -user "$PG_OWNER" -o ! -group "$PG_GROUP" \) \
  -exec chown -h "$PG_OWNER:$PG_GROUP" {} +
install -d -m 0755 /etc/pgbackrest
pgbr_conf=$(cat <<EOF
$PGBR_MARK: rewritten on every run while this line is
# here. Delete this line to manage the file yourself; install.sh then leaves it alone.
[global]
repo1-path=$PGBR_REPO
# Keep the two newest full backups, and the differential and incremental
# backups and WAL that depend on them.
repo1-retention-full=2
# Compression, measured for a full backup of a real 1.2 GB database:
# none 6.1 s, lz4 7.7 s, zstd 11.8 s. lz4 saves most of the space for about
# a quarter more time; zstd saves a little more and nearly doubles it.
compress-type=lz4
process-max=2
log-path=$PGBR_LOG
# Checkpoint at once when a backup starts instead of waiting for the next one.
start-fast=y

[$STANZA]
pg1-path=$PG_DATA
pg1-port=$PG_PORT
pg1-socket-path=$PG_SOCK
EOF
)
if [ ! -e "$PGBR_CONF" ] || head -n 1 "$PGBR_CONF" | grep -qF "$PGBR_MARK"; then
  if [ "$(cat "$PGBR_CONF" 2>/dev/null || true)" != "$pgbr_conf" ]; then
    log "writing $PGBR_CONF"
    tmp=$(mktemp /etc/pgbackrest/.pgbackrest.conf.XXXXXX)
    printf '%s\n' "$pgbr_conf" >"$tmp"
    chown "root:$PG_GROUP" "$tmp"
    chmod 0640 "$tmp"
    mv -f "$tmp" "$PGBR_CONF"
  fi
elif grep -Eq "^[[:space:]]*\[$STANZA\][[:space:]]*$" "$PGBR_CONF"; then
  log "keeping your own $PGBR_CONF (it has a [$STANZA] section)"
else
  warn "$PGBR_CONF is not managed by Piglet and has no [$STANZA] section: pgBackRest setup skipped"
  PGBR=0
fi
# Debian's package ships /etc/pgbackrest.conf; pgBackRest ignores it once
# /etc/pgbackrest/pgbackrest.conf exists.
if [ -f /etc/pgbackrest.conf ] && grep -Eq '^[[:space:]]*\[[^]]+\]' /etc/pgbackrest.conf &&
   grep -E '^[[:space:]]*\[' /etc/pgbackrest.conf | grep -vq '^\[global\]$'; then
  warn "/etc/pgbackrest.conf has stanza sections; pgBackRest now reads $PGBR_CONF instead"
fi

if [ "$PGBR" = 1 ]; then
  # archive_command as configured in the files (SHOW hides it while archive_mode is off)
  cur_cmd=$(pg_sql -c "SELECT setting FROM pg_file_settings WHERE name = 'archive_command' AND applied")
  cur_lib=$(pg_sql -c "SELECT coalesce((SELECT setting FROM pg_settings WHERE name = 'archive_library'), '')")  # PostgreSQL 15+
  cur_mode=$(pg_sql -c "SHOW archive_mode")
  if [ -n "$cur_lib" ] || { [ -n "$cur_cmd" ] && [ "$cur_cmd" != "$ARCHIVE_CMD" ] && [ -z "${PIGLET_FORCE_ARCHIVE:-}" ]; }; then
    warn "WAL archiving is already set up (archive_command='$cur_cmd' archive_library='$cur_lib');"
    warn "left alone. Set PIGLET_FORCE_ARCHIVE=1 to replace it with: $ARCHIVE_CMD"
    PGBR=0
  else
    changed=0
    if [ "$cur_cmd" != "$ARCHIVE_CMD" ]; then
      log "archive_command = '$ARCHIVE_CMD'"
      pg_sql -c "ALTER SYSTEM SET archive_command = '$ARCHIVE_CMD'"
      changed=1
    fi
    if [ "$cur_mode" != on ] && [ "$cur_mode" != always ]; then
      log "archive_mode = on"
      pg_sql -c "ALTER SYSTEM SET archive_mode = on"
      changed=1
    fi
    if [ "$changed" = 1 ]; then pg_sql -c 'SELECT pg_reload_conf()' >/dev/null; fi
    # archive_command takes effect on reload; archive_mode only on a restart
    if [ "$cur_mode" != on ] && [ "$cur_mode" != always ]; then
      log "restarting cluster $PG_VER/$PG_NAME (archive_mode needs a restart)"
      pg_do restart
      pg_wait_ready
    fi
  fi
fi
if [ "$PGBR" = 1 ]; then
  pgbr() { runuser -u "$PG_OWNER" -- pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" "$@"; }
  log "pgBackRest stanza-create"
  pgbr --log-level-console=warn stanza-create ||
    die "pgbackrest stanza-create failed (a repository in $PGBR_REPO made for another cluster?)"
  log "pgBackRest check (archives one WAL segment)"
  pgbr --log-level-console=warn check || die "pgbackrest check failed; see $PGBR_LOG"
fi

# ---------------------------------------------------------------- piglet files
changed=0
install -d -m 0755 "$LIB_DIR"
if ! cmp -s "$SRC_DIR/piglet.py" "$PIGLET"; then
  log "installing $PIGLET"
  install -m 0644 "$SRC_DIR/piglet.py" "$PIGLET"
  changed=1
fi
install -d -m 0755 /etc/systemd/system
if ! cmp -s "$SRC_DIR/piglet.service" "$UNIT"; then
  log "installing $UNIT"
  install -m 0644 "$SRC_DIR/piglet.service" "$UNIT"
  changed=1
fi
# The unit may write /var/lib/postgresql only; a data directory elsewhere needs a drop-in.
case "$PG_DATA/" in
  /var/lib/postgresql/*) ;;
  *)
    dropin="[Service]
# written by install.sh: the cluster's data directory (restores rewrite it)
ReadWritePaths=$PG_DATA"
    if [ "$(cat "$DROPIN_DIR/data-directory.conf" 2>/dev/null || true)" != "$dropin" ]; then
      install -d -m 0755 "$DROPIN_DIR"
      printf '%s\n' "$dropin" >"$DROPIN_DIR/data-directory.conf"
      changed=1
    fi ;;
esac
install -d -m 0700 "$CONF_DIR" /var/lib/piglet

unit_exists() { [ "$SYSTEMD" = 1 ] && [ -n "$(systemctl list-unit-files --no-legend "$1" 2>/dev/null)" ]; }
if [ ! -e "$CONF" ]; then
  log "writing $CONF"
  extra=""
  if unit_exists code-server@.service; then extra="$extra vscode"; fi
  if unit_exists jupyter.service; then extra="$extra jupyter"; fi
  tmp=$(mktemp "$CONF_DIR/.piglet.json.XXXXXX")
  SYSTEMD=$SYSTEMD PG_VER=$PG_VER PG_NAME=$PG_NAME PG_PORT=$PG_PORT PG_SOCK=$PG_SOCK \
  PG_OWNER=$PG_OWNER PG_UNIT=$PG_UNIT STANZA=$STANZA PGBR=$PGBR PGBR_CONF=$PGBR_CONF \
  EXTRA=$extra "$PY" - "$tmp" <<'EOF'
import json, os, sys
e = os.environ
ver, name, port = e["PG_VER"], e["PG_NAME"], int(e["PG_PORT"])
if e["SYSTEMD"] == "1":
    services = {"postgres": {"unit": e["PG_UNIT"], "port": port}}
    # only services whose unit is installed, so that a fresh machine reads "healthy"
    if "vscode" in e["EXTRA"].split():
        services["vscode"] = {"unit": "code-server@root", "port": 8080}
    if "jupyter" in e["EXTRA"].split():
        services["jupyter"] = {"unit": "jupyter", "port": 8888}
else:
    # no systemd: pg_ctlcluster's status exits 0 running, 3 stopped
    ctl = ["/usr/bin/pg_ctlcluster", ver, name]
    services = {"postgres": {"start": ctl + ["start"], "stop": ctl + ["stop"],
                             "status": ctl + ["status"], "user": e["PG_OWNER"],
                             "port": port}}
cfg = {
    "listen": "127.0.0.1",
    "port": 8910,
    "keys_file": "/etc/piglet/keys.json",
    "state_dir": "/var/lib/piglet",
    "postgres": {
        "dsn": f"host={e['PG_SOCK']} port={port} dbname=postgres user=piglet",
        "os_user": e["PG_OWNER"],
        "service": "postgres",
    },
    "pgbackrest": {"stanza": e["STANZA"], "config": e["PGBR_CONF"],
                   "enabled": e["PGBR"] == "1"},
    "services": services,
}
with open(sys.argv[1], "w") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")
EOF
  chmod 0600 "$tmp"
  mv -f "$tmp" "$CONF"
else
  log "keeping $CONF"
  if [ "$SYSTEMD" = 1 ] && grep -q '"start"' "$CONF"; then
    warn "$CONF describes services by commands (written without systemd); with systemd, \"unit\" entries are better"
  fi
fi

# settings install.sh needs back from the config (defaults as in piglet.py)
cfg_get() {
  "$PY" -c 'import json, sys
c = json.load(open(sys.argv[1]))
v = c
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print(sys.argv[3] if v is None else v)' "$CONF" "$1" "$2"
}
KEYS_FILE=$(cfg_get keys_file /etc/piglet/keys.json)
LISTEN=$(cfg_get listen 127.0.0.1)
PORT=$(cfg_get port 8910)
TLS_CERT=$(cfg_get tls.cert "")
case "$LISTEN" in
  0.0.0.0|"") HOST=127.0.0.1 ;;
  ::) HOST="[::1]" ;;
  *:*) HOST="[$LISTEN]" ;;
  *) HOST=$LISTEN ;;
esac
SCHEME=http; CURL_K=""
if [ -n "$TLS_CERT" ]; then SCHEME=https; CURL_K="-k "; fi
BASE="$SCHEME://$HOST:$PORT/api/v1"

KEY=""
if [ ! -e "$KEYS_FILE" ]; then
  log "creating the admin key"
  KEY=$("$PY" "$PIGLET" key create --name admin --scope admin --config "$CONF")
  [ -n "$KEY" ] || die "key creation printed nothing"
  # Shown once: if a later step fails, show it on the way out all the same.
  trap 'if [ -n "$KEY" ]; then printf "\nAdmin API key (shown only now): %s\n" "$KEY" >&2; fi' EXIT
fi

# ---------------------------------------------------------------- start
if [ "$SYSTEMD" = 1 ]; then
  systemctl daemon-reload
  systemctl enable --quiet piglet.service
  if [ "$changed" = 1 ] && systemctl is-active --quiet piglet.service; then
    log "restarting piglet.service"
    systemctl restart piglet.service
  else
    systemctl start piglet.service   # no-op when running
  fi
  STOP_HINT="systemctl stop piglet   (logs: journalctl -u piglet)"
else
  pid=""
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    if ! { kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'piglet\.py serve'; }; then
      pid=""
    fi
  fi
  if [ -n "$pid" ] && [ "$changed" = 1 ]; then
    log "stopping Piglet (pid $pid) to start the new version"
    kill -TERM "$pid"
    for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    pid=""
  fi
  if [ -z "$pid" ]; then
    log "starting Piglet in the background (log $LOGFILE)"
    touch "$LOGFILE"; chmod 0640 "$LOGFILE"
    # setsid: not killed with the terminal that ran install.sh
    setsid nohup "$PY" "$PIGLET" serve --config "$CONF" >>"$LOGFILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
  else
    log "Piglet already running (pid $pid)"
  fi
  STOP_HINT="kill \$(cat $PIDFILE)   (log: $LOGFILE; start again: ./install.sh, as root)"
fi

# ---------------------------------------------------------------- wait
up=0
for i in $(seq 60); do
  if curl -sf $CURL_K -o /dev/null "$BASE/openapi.json"; then up=1; break; fi
  if [ -n "$KEY" ] && curl -sf $CURL_K -o /dev/null -H "Authorization: Bearer $KEY" "$BASE/status"; then up=1; break; fi
  # no key at hand (not the first install): a 401 from /status also proves it answers
  if [ -z "$KEY" ] && [ "$(curl -s $CURL_K -o /dev/null -w '%{http_code}' "$BASE/status" || true)" = 401 ]; then up=1; break; fi
  if [ "$SYSTEMD" = 0 ] && ! kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.5
done
if [ "$up" != 1 ]; then
  if [ "$SYSTEMD" = 1 ]; then
    journalctl -u piglet.service -n 30 --no-pager >&2 || true
  else
    tail -n 30 "$LOGFILE" >&2 || true
  fi
  die "Piglet does not answer on $BASE"
fi

echo
echo "Piglet is running: $BASE"
echo "Stop it with: $STOP_HINT"
if [ -n "$KEY" ]; then
  echo
  echo "Admin API key (shown only now; keep it somewhere safe):"
  echo "  $KEY"
  echo "Try it:"
  echo "  curl ${CURL_K}-H \"Authorization: Bearer $KEY\" $BASE/status"
  trap - EXIT
else
  echo "Existing keys kept ($KEYS_FILE). Another key:"
  echo "  $PY $PIGLET key create --name NAME --scope admin --config $CONF"
fi
