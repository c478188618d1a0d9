#!/usr/bin/env bash
# Installs what the browser test needs (Debian's chromium, playwright-core from npm), starts the
# service on a fresh database and a free port, and runs tests/e2e/dashboard.mjs. Screenshots land
# in target/e2e/.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
if ! command -v chromium >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
fi
(cd tests/e2e && npm install --silent --no-audit --no-fund >/dev/null)
scripts/ensure-python.sh
# The debug build `make test` already made: the browser test checks behaviour, not speed.
cargo build --bin modelpress >&2
admin="$(scripts/ensure-postgres.sh)"
db="modelpress_e2e_$$"
psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
url="${admin%/*}/$db"
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null; rm -rf "$data"; }
trap cleanup EXIT
DATABASE_URL="$url" ORT_DYLIB_PATH="$(scripts/ort-dylib.sh)" RUST_LOG=warn \
  ./target/debug/modelpress serve --listen "127.0.0.1:$port" --data-dir "$data" &
server=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
mkdir -p target/e2e
node tests/e2e/dashboard.mjs "http://127.0.0.1:$port" "$root" "$root/target/e2e"
