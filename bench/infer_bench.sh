#!/usr/bin/env bash
# Inference benchmark: POST /v1/jobs/{id}/infer against ONNX Runtime called directly, for the
# digits MLP (int8 dynamic job) and the PP-OCR direction classifier (optimize job), at 1 and 16
# clients. Starts a release `modelpress serve` (API + workers) on a fresh database, runs the jobs,
# downloads their model.onnx and hands both to examples/infer_bench.rs, which prints a Markdown
# section ("## Inference endpoint") on stdout; progress goes to stderr.
#
#   bench/infer_bench.sh                      # 10 s per cell (bench/run.sh)
#   INFER_BENCH_QUICK=1 bench/infer_bench.sh  # 3 s per cell
#
# Needs: PostgreSQL (DATABASE_URL's server, else 127.0.0.1:5432 as postgres), .venv (ONNX
# Runtime), the PP-OCR models (scripts/fetch-models.sh), curl, psql. Not part of the tests or CI.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${INFER_BENCH_QUICK:-0}" = 1 ]; then SECONDS_PER_CELL=3; else SECONDS_PER_CELL=10; fi
log() { echo "infer_bench: $*" >&2; }
die() { log "$*"; exit 1; }
PY=.venv/bin/python
[ -x "$PY" ] || scripts/ensure-python.sh >&2
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/ort-dylib.sh)}"
export ORT_DYLIB_PATH
MODELS_DIR="${MODELPRESS_MODELS_DIR:-$(scripts/fetch-models.sh)}"
cls=$(find -L "$MODELS_DIR" -name ch_ppocr_mobile_v2.0_cls_infer.onnx | head -n 1)
[ -n "$cls" ] || die "ch_ppocr_mobile_v2.0_cls_infer.onnx not found under $MODELS_DIR"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/modelpress-inferbench.XXXXXX")
db="modelpress_inferbench_$$"
server_pid="" db_created=0 pg_base=""
cleanup() {
  local rc=$?
  set +e
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  if [ "$rc" != 0 ] && [ -f "$tmp/server.log" ]; then
    log "server log (last 20 lines):"; tail -n 20 "$tmp/server.log" >&2
  fi
  rm -rf "$tmp"
  if [ "$db_created" = 1 ]; then
    psql "$pg_base/postgres" -qX -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 \
      || log "could not drop database $db"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v curl >/dev/null || die "curl is needed"
command -v psql >/dev/null || die "psql is needed"
log "building the release binary and the benchmark"
cargo build --release --bin modelpress --example infer_bench >&2

if [ -n "${DATABASE_URL:-}" ]; then
  pg_base="${DATABASE_URL%%\?*}"
  pg_base="${pg_base%/*}"
else
  pg_base="postgres://postgres@127.0.0.1:5432"
fi
psql "$pg_base/postgres" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE $db" >/dev/null
db_created=1

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
DATABASE_URL="$pg_base/$db" RUST_LOG=warn \
  ./target/release/modelpress serve --listen "127.0.0.1:$port" --data-dir "$tmp/data" >"$tmp/server.log" 2>&1 &
server_pid=$!
for i in $(seq 600); do
  kill -0 "$server_pid" 2>/dev/null || die "the server exited while starting"
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/readyz" || true)" = 200 ] && break
  [ "$i" = 600 ] && die "GET /readyz did not answer 200 within 60 s"
  sleep 0.1
done
log "server pid $server_pid on $base, database $db"

json_field() { "$PY" -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
upload() { # file -> model id
  curl -sf -X POST --data-binary "@$1" -H 'content-type: application/octet-stream' "$base/v1/models?name=bench" | json_field id
}
run_job() { # json body -> job id, once succeeded
  local id state
  id=$(curl -sf -X POST "$base/v1/jobs" -H 'content-type: application/json' -d "$1" | json_field id)
  for _ in $(seq 1200); do
    state=$(curl -sf "$base/v1/jobs/$id" | json_field state)
    case "$state" in
      succeeded) echo "$id"; return ;;
      failed|cancelled) die "job $id ended $state: $(curl -sf "$base/v1/jobs/$id")" ;;
    esac
    sleep 0.25
  done
  die "job $id did not finish within 5 minutes"
}

log "digits: int8 dynamic job"
digits_model=$(upload tests/fixtures/digits/mlp.onnx)
dataset=$(curl -sf -X POST --data-binary @tests/fixtures/digits/test.npz -H 'content-type: application/octet-stream' \
  "$base/v1/datasets?name=digits" | json_field id)
digits_job=$(run_job "{\"model_id\": \"$digits_model\", \"dataset_id\": \"$dataset\", \"task\": \"classification\",
  \"recipe\": [{\"pass\": \"quantize_int8_dynamic\"}]}")
curl -sf -o "$tmp/digits.onnx" "$base/v1/jobs/$digits_job/artifacts/model.onnx"

log "PP-OCR cls: optimize job"
cls_model=$(upload "$cls")
cls_job=$(run_job "{\"model_id\": \"$cls_model\", \"recipe\": [{\"pass\": \"optimize\"}],
  \"dim_overrides\": {\"?\": 48}}")
curl -sf -o "$tmp/cls.onnx" "$base/v1/jobs/$cls_job/artifacts/model.onnx"

log "measuring ($SECONDS_PER_CELL s per cell)"
./target/release/examples/infer_bench --base "$base" --seconds "$SECONDS_PER_CELL" \
  --case "digits MLP (int8 dynamic)" "$digits_job" "$tmp/digits.onnx" 1x64 \
  --case "PP-OCR cls (optimized)" "$cls_job" "$tmp/cls.onnx" 1x3x48x192
