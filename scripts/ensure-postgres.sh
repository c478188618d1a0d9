#!/usr/bin/env bash
# Prints a PostgreSQL URL the service and tests can use, starting a database if needed:
#   1. $DATABASE_URL, when set;
#   2. the local server on 127.0.0.1:5432 (trust auth, user postgres), creating database "modelpress";
#   3. otherwise (or with MODELPRESS_PG_PRIVATE=1) a private cluster under .pgdata (initdb + pg_ctl)
#      on port ${MODELPRESS_PG_PORT:-5433}.
# Progress goes to stderr; stdout carries only the URL.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${MODELPRESS_DB_NAME:-modelpress}

if [ -n "${DATABASE_URL:-}" ]; then
  echo "$DATABASE_URL"
  exit 0
fi

pg_bin() {
  local found
  found=$(command -v "$1" 2>/dev/null || true)
  if [ -z "$found" ]; then
    found=$(ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  [ -n "$found" ] || { echo "ensure-postgres: $1 not found; install PostgreSQL or set DATABASE_URL" >&2; exit 1; }
  echo "$found"
}

ensure_db() { # host port
  local psql; psql=$(pg_bin psql)
  if ! "$psql" -h "$1" -p "$2" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    "$psql" -h "$1" -p "$2" -U postgres -d postgres -qc "CREATE DATABASE \"$DB\"" >&2
  fi
}

if [ "${MODELPRESS_PG_PRIVATE:-0}" != 1 ] && "$(pg_bin pg_isready)" -q -h 127.0.0.1 -p 5432 -U postgres 2>/dev/null; then
  ensure_db 127.0.0.1 5432
  echo "postgres://postgres@127.0.0.1:5432/$DB"
  exit 0
fi

# No server reachable: run a private cluster in the project folder.
PORT=${MODELPRESS_PG_PORT:-5433}
DATA="$PWD/.pgdata"
as_owner=()
if [ "$(id -u)" = 0 ]; then
  # initdb and postgres refuse to run as root; run them as the postgres system user.
  id postgres >/dev/null 2>&1 || { echo "ensure-postgres: running as root needs a 'postgres' user" >&2; exit 1; }
  mkdir -p "$DATA" && chown postgres "$DATA"
  as_owner=(runuser -u postgres --)
fi
if [ ! -f "$DATA/PG_VERSION" ]; then
  echo "ensure-postgres: creating a private cluster in $DATA" >&2
  "${as_owner[@]}" "$(pg_bin initdb)" -D "$DATA" -U postgres --auth=trust >/dev/null
fi
if ! "$(pg_bin pg_isready)" -q -h 127.0.0.1 -p "$PORT"; then
  echo "ensure-postgres: starting the private cluster on 127.0.0.1:$PORT" >&2
  "${as_owner[@]}" "$(pg_bin pg_ctl)" -D "$DATA" -l "$DATA/server.log" -w \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -k $DATA" start >/dev/null
fi
ensure_db 127.0.0.1 "$PORT"
echo "postgres://postgres@127.0.0.1:$PORT/$DB"
