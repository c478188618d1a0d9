#!/usr/bin/env bash
# Fetches the real ONNX models the tests and benchmarks use, and prints the folder that holds them.
#
# The models ship inside two PyPI wheels, pinned by version and SHA-256:
#   rapidocr-onnxruntime 1.4.4  PP-OCR det / rec / cls (rapidocr_onnxruntime/models/*.onnx)
#   nudenet 3.4.2               a YOLOv8n detector     (nudenet/320n.onnx)
# Each wheel is downloaded once with `pip download --no-deps` into .cache/models (or
# MODELPRESS_MODELS_DIR) and its .onnx members are extracted under <folder>/<wheel name>/, keeping
# their paths inside the wheel. Idempotent, and offline once fetched: pip is only called for a wheel
# that is missing or fails its checksum. Progress goes to stderr; stdout is the folder, nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${MODELPRESS_MODELS_DIR:-.cache/models}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

# name  version  wheel file  sha256
WHEELS=(
  "rapidocr rapidocr-onnxruntime==1.4.4 rapidocr_onnxruntime-1.4.4-py3-none-any.whl 971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
  "nudenet nudenet==3.4.2 nudenet-3.4.2-py3-none-any.whl 5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331"
)

if [ -x .venv/bin/pip ]; then PIP=(.venv/bin/pip); else PIP=(pip); fi
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

for entry in "${WHEELS[@]}"; do
  read -r name spec wheel sha <<<"$entry"
  if ! sha_ok "$DIR/$wheel" "$sha"; then
    echo "fetch-models: downloading $spec" >&2
    rm -f "$DIR/$wheel"
    "${PIP[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --dest "$DIR" "$spec" >&2
    sha_ok "$DIR/$wheel" "$sha" || {
      echo "fetch-models: $DIR/$wheel is missing or does not match sha256 $sha" >&2
      exit 1
    }
  fi
  # Extract every .onnx member whose file is missing or differs from the wheel (size or CRC-32).
  "$PY" - "$DIR/$wheel" "$DIR/$name" <<'EOF'
import os, sys, zipfile, zlib
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.infolist() if m.filename.endswith(".onnx")]
    if not members:
        sys.exit(f"fetch-models: {wheel} holds no .onnx file")
    for m in members:
        target = os.path.join(dest, m.filename)
        if os.path.isfile(target) and os.path.getsize(target) == m.file_size:
            with open(target, "rb") as f:
                crc = 0
                while chunk := f.read(1 << 20):
                    crc = zlib.crc32(chunk, crc)
            if crc == m.CRC:
                continue
        print(f"fetch-models: extracting {m.filename}", file=sys.stderr)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".partial"
        with z.open(m) as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(partial, target)
EOF
done
echo "$DIR"
