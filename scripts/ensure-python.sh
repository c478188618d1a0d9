#!/usr/bin/env bash
# Creates the project-local Python environment (.venv) that supplies the ONNX Runtime shared library
# (from the onnxruntime wheel) and the reference tools the tests and benchmarks compare against.
# Idempotent: a stamp file records the requirements it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MODELPRESS_VENV:-.venv}
REQ=scripts/requirements.txt
STAMP="$VENV/.modelpress-stamp"
PY=${PYTHON:-python3}
if [ -f "$STAMP" ] && cmp -s "$REQ" "$STAMP"; then
  exit 0
fi
echo "ensure-python: installing $REQ into $VENV" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
cp "$REQ" "$STAMP"
