#!/usr/bin/env bash
# Checks the container files as far as a machine without a Docker engine can:
#   1. hadolint on docker/Dockerfile and docker/Dockerfile.cuda (.hadolint.yaml says what is ignored);
#   2. `docker compose config` on docker/compose.yaml, alone and with docker/compose.s3.yaml, then
#      the resolved files' shape: PostgreSQL, one API and two workers, health checks on /readyz,
#      workers after a ready API, one shared volume or the S3 settings;
#   3. the build steps that can run here: every COPY source exists, the onnxruntime wheel the image
#      installs ships libonnxruntime.so.1.31*, and the CUDA image's onnxruntime-gpu version matches
#      the CPU one. With CHECK_DOCKER_RELEASE_BUILD=1 also `cargo build --release --locked`.
# The tools come from PyPI (scripts/requirements-docker.txt) into .venv-docker.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-docker
REQ=scripts/requirements-docker.txt
if ! cmp -s "$REQ" "$VENV/.stamp" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$VENV/.stamp"
fi
fail() { echo "check-docker: $*" >&2; exit 1; }

echo "== hadolint"
"$VENV/bin/hadolint" docker/Dockerfile docker/Dockerfile.cuda
echo "ok"

echo "== compose files"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/docker-compose" -f docker/compose.yaml config --format json > "$tmp/local.json"
"$VENV/bin/docker-compose" -f docker/compose.yaml -f docker/compose.s3.yaml config --format json > "$tmp/s3.json"
python3 - "$tmp/local.json" "$tmp/s3.json" <<'PY'
import json, sys

def check(path, s3):
    c = json.load(open(path))
    s = c["services"]
    for name in ("postgres", "api", "worker"):
        assert name in s, f"{path}: no {name} service"
    api, worker = s["api"], s["worker"]
    assert api["command"] == ["serve", "--role", "api"], api["command"]
    assert worker["command"] == ["serve", "--role", "worker"], worker["command"]
    assert worker["deploy"]["replicas"] == 2, "two workers"
    assert any("/readyz" in part for part in api["healthcheck"]["test"]), "API health check on /readyz"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    for svc in (api, worker):
        env = svc["environment"]
        assert env["DATABASE_URL"].startswith("postgres://"), env
        assert env.get("MODELPRESS_LOG_FORMAT") == "json"
        if s3:
            assert env["MODELPRESS_STORAGE__BACKEND"] == "s3"
            assert env["MODELPRESS_STORAGE__ENDPOINT"] == "http://minio:9000"
            assert not svc.get("volumes"), "no shared volume with S3"
        else:
            assert "MODELPRESS_STORAGE__BACKEND" not in env
            targets = [v["target"] for v in svc.get("volumes", []) if v["type"] == "volume" and v["source"] == "objects"]
            assert targets == ["/var/lib/modelpress"], f"the shared objects volume: {svc.get('volumes')}"
    if s3:
        assert "minio" in s and "bucket" in s
        assert api["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    print(f"ok: {path.rsplit('/', 1)[-1]}")

check(sys.argv[1], s3=False)
check(sys.argv[2], s3=True)
PY

echo "== build steps"
for f in docker/Dockerfile docker/Dockerfile.cuda; do
  # COPY sources from the build context (not --from=stage) must exist.
  grep -E '^COPY ' "$f" | grep -v -- '--from=' | while read -r _ args; do
    read -ra parts <<< "$args"
    for src in "${parts[@]:0:${#parts[@]}-1}"; do
      [ -e "$src" ] || fail "$f copies $src, which does not exist"
    done
  done
done
cpu=$(grep -E '^onnxruntime==' scripts/requirements.txt | sed 's/^onnxruntime==//; s/ .*//')
gpu=$(grep -E '^onnxruntime-gpu==' docker/requirements-cuda.txt | sed 's/^onnxruntime-gpu==//; s/ .*//')
[ -n "$cpu" ] && [ "$cpu" = "$gpu" ] || fail "onnxruntime $cpu (CPU image) and onnxruntime-gpu $gpu (CUDA image) differ"
echo "ok: onnxruntime $cpu in both images"
# The ort stage's own command, into a scratch folder, and the file the final stage copies.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --target "$tmp/py" "onnxruntime==$cpu"
ls "$tmp"/py/onnxruntime/capi/libonnxruntime.so.1.31* > /dev/null || fail "the onnxruntime wheel has no libonnxruntime.so.1.31*"
echo "ok: the onnxruntime wheel ships $(basename "$(ls "$tmp"/py/onnxruntime/capi/libonnxruntime.so.1.31*)")"
if [ "${CHECK_DOCKER_RELEASE_BUILD:-0}" = 1 ]; then
  cargo build --release --locked
  echo "ok: cargo build --release --locked"
fi
echo "check-docker: all checks passed (no Docker engine here: images were not built or run)"
