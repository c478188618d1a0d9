#!/usr/bin/env bash
# Service benchmark: status reads under load (wrk) and large uploads (curl) against a real
# `modelpress serve --no-worker` on a fresh database, with the server's RSS sampled during uploads.
# Prints a Markdown section ("## Service") on stdout; progress goes to stderr.
#
#   bench/service_bench.sh                        # 15 s wrk runs, 500 MB uploads (bench/run.sh)
#   SERVICE_BENCH_QUICK=1 bench/service_bench.sh  # 5 s wrk runs, 100 MB uploads (make bench-quick)
#
# Needs: PostgreSQL (DATABASE_URL's server, else 127.0.0.1:5432 as postgres), .venv (onnx, numpy,
# onnxruntime), wrk (installed with apt-get when missing), curl, about 4 GB of free disk.
# Not part of the tests or CI.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SERVICE_BENCH_QUICK:-0}" = 1 ]; then
  DURATION=5s UPLOAD_MB=100 SINGLE_MB=100 MODE="quick: 5 s load runs, 100 MB uploads"
else
  DURATION=15s UPLOAD_MB=500 SINGLE_MB=200 MODE="full: 15 s load runs, 500 MB uploads"
fi
CLIENTS=4
JOBS=10000
CONNECTIONS=(64 256)
THREADS=2
RSS_TARGET_MIB=64

log() { echo "service_bench: $*" >&2; }
die() { log "$*"; exit 1; }
PY=.venv/bin/python
[ -x "$PY" ] || scripts/ensure-python.sh >&2

# --- cleanup: server, background helpers, temp files, database ------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/modelpress-svcbench.XXXXXX")
db="modelpress_svcbench_$$"
server_pid="" sampler_pid="" db_created=0
bg_pids=()
pg_base=""
cleanup() {
  local rc=$?
  set +e
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null; done
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null
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

# --- prerequisites ---------------------------------------------------------------------------------
command -v curl >/dev/null || die "curl is needed"
command -v psql >/dev/null || die "psql is needed"
if ! command -v wrk >/dev/null; then
  log "installing wrk"
  { apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }; } >/dev/null 2>&1 \
    || die "wrk is missing and apt-get could not install it"
fi
log "building the release binary"
cargo build --release --bin modelpress >&2
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/ort-dylib.sh)}"

# The database server: DATABASE_URL's (as bench/run.sh sets it), else the local one on 5432.
if [ -n "${DATABASE_URL:-}" ]; then
  pg_base="${DATABASE_URL%%\?*}"
  pg_base="${pg_base%/*}"
else
  pg_base="postgres://postgres@127.0.0.1:5432"
fi
psql "$pg_base/postgres" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE $db" >/dev/null
db_created=1

# --- server ----------------------------------------------------------------------------------------
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
DATABASE_URL="$pg_base/$db" ORT_DYLIB_PATH="$ORT_DYLIB_PATH" RUST_LOG=warn \
  ./target/release/modelpress serve --listen "127.0.0.1:$port" --data-dir "$tmp/data" --no-worker \
  >"$tmp/server.log" 2>&1 &
server_pid=$!
for i in $(seq 600); do
  kill -0 "$server_pid" 2>/dev/null || die "the server exited while starting"
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/readyz" || true)" = 200 ] && break
  [ "$i" = 600 ] && die "GET /readyz did not answer 200 within 60 s"
  sleep 0.1
done
log "server pid $server_pid on $base, database $db"

# --- fill: one model, 10,000 jobs ------------------------------------------------------------------
model_id=$(curl -sf -X POST --data-binary @tests/fixtures/digits/mlp.onnx \
  -H 'content-type: application/octet-stream' "$base/v1/models?name=mlp" |
  "$PY" -c 'import json, sys; print(json.load(sys.stdin)["id"])')
psql "$pg_base/$db" -qX -v ON_ERROR_STOP=1 >/dev/null <<SQL
INSERT INTO jobs (id, tenant_id, model_id, recipe)
SELECT gen_random_uuid(), '00000000-0000-0000-0000-000000000001', '$model_id',
       '[{"pass":"optimize","level":"extended"}]'::jsonb
FROM generate_series(1, $JOBS);
ANALYZE jobs;
SQL
job_id=$(psql "$pg_base/$db" -qXtA -c "SELECT id FROM jobs ORDER BY id OFFSET $((JOBS / 2)) LIMIT 1")
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/v1/jobs/$job_id")" = 200 ] || die "GET /v1/jobs/$job_id is not 200"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/v1/jobs")" = 200 ] || die "GET /v1/jobs is not 200"
list_bytes=$(curl -s -o /dev/null -w '%{size_download}' "$base/v1/jobs")
job_bytes=$(curl -s -o /dev/null -w '%{size_download}' "$base/v1/jobs/$job_id")
log "model $model_id, $JOBS jobs; one job $job_bytes B, a page of 50 $list_bytes B"

# --- status reads: wrk -----------------------------------------------------------------------------
# wrk latencies come as 812.00us / 1.20ms / 2.01s; converted to ms.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.2f", n }'
}
# One wrk run; sets rps, p50, p99, nreq, errs (non-2xx and socket errors, "" when none).
run_wrk() { # url connections duration
  local out="$tmp/wrk.out"
  wrk -t"$THREADS" -c"$2" -d"$3" --latency "$1" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed"; }
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  p50=$(to_ms "$(awk '/Latency Distribution/ {d = 1} d && $1 == "50%" {print $2; exit}' "$out")")
  p99=$(to_ms "$(awk '/Latency Distribution/ {d = 1} d && $1 == "99%" {print $2; exit}' "$out")")
  nreq=$(awk '/requests in/ {print $1; exit}' "$out")
  errs=$(awk '/Non-2xx or 3xx responses:/ {printf "non-2xx %s; ", $NF} /Socket errors:/ {sub(/^ *Socket errors: */, ""); printf "socket errors: %s; ", $0}' "$out")
  errs=${errs%; }
}
declare -a read_rows=()
declare -A read_rps=() read_p99=()
endpoints=("GET /v1/jobs/{id}|$base/v1/jobs/$job_id" "GET /v1/jobs (page of 50)|$base/v1/jobs")
for ep in "${endpoints[@]}"; do
  name=${ep%%|*} url=${ep#*|}
  log "warm-up: $name"
  run_wrk "$url" 64 2s
  for c in "${CONNECTIONS[@]}"; do
    log "wrk -t$THREADS -c$c -d$DURATION $name"
    run_wrk "$url" "$c" "$DURATION"
    read_rows+=("| \`$name\` | $c | $(printf '%.0f' "$rps") | $p50 | $p99 | $nreq | ${errs:-none} |")
    read_rps["$name|$c"]=$rps read_p99["$name|$c"]=$p99
  done
done

# --- uploads: curl, RSS sampled every 100 ms -------------------------------------------------------
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k / 1024}'; }
declare -a upload_rows=() upload_verdicts=()
# upload_case LABEL FILE CONTENT-TYPE CLIENTS TARGETED(1/0); appends a table row and, when targeted,
# a verdict against the upload targets.
upload_case() {
  local label=$1 file=$2 ctype=$3 clients=$4 targeted=$5
  local bytes; bytes=$(stat -c %s "$file")
  sync; sleep 1
  local baseline; baseline=$(rss_kib)
  # The kernel's own high-water mark, reset here (clear_refs 5), catches peaks between samples.
  local hwm_ok=0
  echo 5 >"/proc/$server_pid/clear_refs" 2>/dev/null && hwm_ok=1
  local samples="$tmp/rss.samples"
  : >"$samples"
  ( while kill -0 "$server_pid" 2>/dev/null; do
      awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status" >>"$samples" 2>/dev/null || true
      sleep 0.1
    done ) &
  sampler_pid=$!
  local t0 t1 i pids=()
  t0=$(date +%s.%N)
  for i in $(seq "$clients"); do
    curl -s --max-time 900 -o "$tmp/up.$i.body" -w '%{http_code}' -X POST --data-binary "@$file" \
      -H "content-type: $ctype" "$base/v1/models?name=svcbench-$i" >"$tmp/up.$i.code" &
    pids+=($!)
  done
  bg_pids=("${pids[@]}")
  for i in "${pids[@]}"; do wait "$i" || true; done
  bg_pids=()
  t1=$(date +%s.%N)
  sleep 0.2
  kill "$sampler_pid" 2>/dev/null; wait "$sampler_pid" 2>/dev/null || true
  sampler_pid=""
  local peak; peak=$(awk -v b="$baseline" 'BEGIN {m = b} $1 > m {m = $1} END {print m}' "$samples")
  local hwm="n/a"
  [ "$hwm_ok" = 1 ] && hwm=$(mib "$(awk '/^VmHWM:/ {print $2}' "/proc/$server_pid/status")")
  local nsamples; nsamples=$(wc -l <"$samples")
  local statuses
  statuses=$(for i in $(seq "$clients"); do
      code=$(cat "$tmp/up.$i.code"); [ -n "$code" ] || code=000
      ecode=$("$PY" -c 'import json, sys
try: print(json.load(open(sys.argv[1]))["error"]["code"])
except Exception: pass' "$tmp/up.$i.body")
      echo "$code${ecode:+ $ecode}"
    done | sort | uniq -c | awk '{c = $1; $1 = ""; sub(/^ /, ""); printf "%s%s ×%d", (NR > 1 ? ", " : ""), $0, c}')
  rm -f "$tmp"/up.*
  local secs mbps growth
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
  mbps=$(awk -v n="$bytes" -v c="$clients" -v s="$secs" 'BEGIN {printf "%.0f", n * c / 1e6 / s}')
  growth=$(awk -v p="$peak" -v b="$baseline" 'BEGIN {printf "%.0f", (p - b) / 1024}')
  local size_mb; size_mb=$(awk -v n="$bytes" 'BEGIN {printf "%.0f", n / 1e6}')
  log "$label: ${secs}s, $mbps MB/s, RSS $(mib "$baseline") -> $(mib "$peak") MiB ($nsamples samples; VmHWM $hwm MiB), $statuses"
  upload_rows+=("| $label | $clients × $size_mb MB | $secs | $mbps | $(mib "$baseline") | $(mib "$peak") | $growth | $hwm | $statuses |")
  if [ "$targeted" = 1 ]; then
    local v_rate v_rss
    v_rate=$(awk -v m="$mbps" 'BEGIN {print (m >= 300 ? "met" : "not met")}')
    v_rss=$(awk -v g="$growth" -v t="$RSS_TARGET_MIB" 'BEGIN {print (g < t ? "met" : "not met")}')
    upload_verdicts+=("| Upload, $label: ≥ 300 MB/s | $mbps MB/s | $v_rate |")
    upload_verdicts+=("| Upload, $label: RSS growth < 64 MB | $growth MiB | $v_rss |")
  fi
}

log "making the upload files"
random_file="$tmp/random.bin"
head -c $((UPLOAD_MB * 1000 * 1000)) /dev/urandom >"$random_file"
bundle_file="$tmp/bundle.tar"
"$PY" bench/service_make_models.py bundle "$bundle_file" "$UPLOAD_MB" >/dev/null
single_file="$tmp/single.onnx"
"$PY" bench/service_make_models.py single "$single_file" "$SINGLE_MB" >/dev/null

log "uploads (a): random bytes"
upload_case "(a) random bytes, raw \`application/octet-stream\`" "$random_file" application/octet-stream "$CLIENTS" 1
rm -f "$random_file"
log "uploads (b): external-data bundle"
upload_case "(b) valid bundle (.onnx + w.bin), \`application/x-tar\`" "$bundle_file" application/x-tar "$CLIENTS" 1
rm -f "$bundle_file"
log "uploads (c): single-file model"
upload_case "(c) valid single-file model (weight inline), raw" "$single_file" application/octet-stream 1 0
rm -f "$single_file"

# --- report ----------------------------------------------------------------------------------------
verdict_reads() { # endpoint-name
  awk -v r="${read_rps["$1|256"]}" -v p="${read_p99["$1|256"]}" \
    'BEGIN {printf "%.0f req/s, p99 %.2f ms | %s", r, p, (r >= 10000 && p < 20 ? "met" : "not met")}'
}
cat <<EOF
## Service

\`bench/service_bench.sh\` ($MODE). A fresh database ($(echo "$JOBS" | sed ':a; s/\B[0-9]\{3\}\>/,&/; ta') queued jobs inserted with one SQL
statement, then \`ANALYZE jobs\`) and \`modelpress serve --no-worker\` (release build, \`RUST_LOG=warn\`)
on loopback. **Client and server share this machine's $(nproc) cores**: wrk's 2 threads (and curl)
take CPU from the server and PostgreSQL, so these figures are a floor, not what a dedicated server
would do.

Status reads: \`wrk -t$THREADS -c{64,256} -d$DURATION --latency URL\` after a 2 s warm-up per endpoint;
one job is $job_bytes bytes of JSON, a page of 50 is $list_bytes bytes.

| Endpoint | Connections | req/s | p50 ms | p99 ms | Requests | Errors |
|---|---:|---:|---:|---:|---:|---|
$(printf '%s\n' "${read_rows[@]}")

Uploads: $CLIENTS concurrent \`curl -X POST --data-binary @FILE -H 'content-type: ...' /v1/models\`
(one for (c)); MB/s is all bytes sent over the wall time from the first request to the last
response, so it includes the server's parsing, hashing and moving into storage. RSS is the server's
VmRSS from \`/proc/PID/status\`, sampled every 100 ms; growth is peak minus the baseline taken just
before the case (the targets are judged on it). VmHWM is the kernel's peak RSS over the case (reset
with \`clear_refs\` just before it), which also catches spikes shorter than the sampling interval. (a) is not a model: the server streams it to disk, then tries to parse it and refuses
it with 400 \`invalid_model\`. (b) is a .tar of a one-MatMul .onnx whose float32 weight (${UPLOAD_MB} MB) lives in
\`w.bin\` (external data). (c) is one .onnx with a ${SINGLE_MB} MB weight inline: the server parses a
single-file model in memory, so its RSS grows by about the model's size by design; it is reported
apart and not held to the upload target.

| Case | Clients × size | Wall s | MB/s | RSS baseline MiB | RSS peak MiB | Growth MiB | VmHWM MiB | Statuses |
|---|---|---:|---:|---:|---:|---:|---:|---|
$(printf '%s\n' "${upload_rows[@]}")

Targets from the issue:

| Target | Measured | |
|---|---|---|
| Status reads (\`GET /v1/jobs/{id}\`) at 256 connections: ≥ 10,000 req/s, p99 < 20 ms | $(verdict_reads "GET /v1/jobs/{id}") |
| Listing (\`GET /v1/jobs\`, page of 50) at 256 connections, same target | $(verdict_reads "GET /v1/jobs (page of 50)") |
$(printf '%s\n' "${upload_verdicts[@]}")

RSS growth is compared in MiB (64 MiB ≈ 67 MB).
EOF
