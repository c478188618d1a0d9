#!/usr/bin/env bash
# Prints the path of the ONNX Runtime 1.31 shared library from the project's .venv (the onnxruntime
# wheel ships it as onnxruntime/capi/libonnxruntime.so.1.31.*).
set -euo pipefail
cd "$(dirname "$0")/.."
lib=$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31* 2>/dev/null | head -n 1 || true)
[ -n "$lib" ] || { echo "ort-dylib: libonnxruntime.so.1.31.* not found; run scripts/ensure-python.sh" >&2; exit 1; }
echo "$lib"
