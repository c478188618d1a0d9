#!/usr/bin/env bash
# Runs every benchmark and writes BENCHMARKS.md: the machine, the versions, the commands and every
# figure, measured in one run. Later benchmarks add their sections here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-python.sh
export DATABASE_URL="${DATABASE_URL:-$(scripts/ensure-postgres.sh)}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/ort-dylib.sh)}"
export MODELPRESS_MODELS_DIR="${MODELPRESS_MODELS_DIR:-$(scripts/fetch-models.sh)}"
cargo build --release --bin modelpress --examples >&2

out=BENCHMARKS.md.tmp
{
  echo "# ModelPress benchmarks"
  echo
  echo "Written by \`make bench\` (bench/run.sh) on $(date -u +%Y-%m-%d). Rerun it to reproduce; figures vary by machine."
  echo
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "- OS: $(uname -sr); rustc $(rustc --version | cut -d' ' -f2)"
  echo "- ONNX Runtime: $(basename "$ORT_DYLIB_PATH" | sed 's/libonnxruntime.so.//')"
  echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  ./target/release/examples/queue_bench
  ./target/release/examples/onnx_bench
  .venv/bin/python bench/quantize_vs_python.py
  .venv/bin/python bench/passes_bench.py
  .venv/bin/python bench/physical_reference.py
  .venv/bin/python bench/advisor_bench.py
  bench/service_bench.sh
  bench/infer_bench.sh
} > "$out"
mv "$out" BENCHMARKS.md
echo "wrote BENCHMARKS.md" >&2
