"""Physical reference for the compression passes: how close each pass comes to being I/O bound. For the
largest fetched model, each pass's own duration (report.json `passes[0].duration_ms` of
`modelpress compress`, median of 3 runs) is turned into a throughput, bytes moved (input model + output
model) / duration, and compared with a plain file copy of the same model into the same folder
(`shutil.copyfile`, median of 5 runs, bytes moved = 2 x size). Prints one Markdown section for
BENCHMARKS.md on stdout; progress goes to stderr.

    .venv/bin/python bench/physical_reference.py        (bench/run.sh calls this)

Environment: ORT_DYLIB_PATH and MODELPRESS_MODELS_DIR as bench/run.sh exports them (found with
scripts/ort-dylib.sh and scripts/fetch-models.sh when unset). The release binary is (re)built with
`cargo build --release --bin modelpress` first.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "modelpress"
PASS_RUNS, COPY_RUNS = 3, 5
MB = 1e6  # throughputs in MB/s, 10^6 bytes

# Each pass alone with its defaults. quantize_int8_static gets no --dataset, so it calibrates on the
# pipeline's seeded synthetic inputs (32 samples from the model's signature).
PASSES = [
    ("quantize_int8_dynamic", [{"pass": "quantize_int8_dynamic"}]),
    ("quantize_int8_static", [{"pass": "quantize_int8_static"}]),
    ("quantize_int4_weight_only", [{"pass": "quantize_int4_weight_only"}]),
    ("fp16", [{"pass": "fp16"}]),
    ("optimize", [{"pass": "optimize"}]),
]


def log(msg: str) -> None:
    print(f"physical_reference: {msg}", file=sys.stderr, flush=True)


def from_script(var: str, script: str) -> str:
    value = os.environ.get(var)
    if value:
        return value
    return subprocess.run([str(ROOT / "scripts" / script)], check=True, capture_output=True, text=True).stdout.strip()


def largest_model(models_dir: Path) -> Path:
    models = sorted(models_dir.rglob("*.onnx"), key=lambda p: p.stat().st_size, reverse=True)
    if not models:
        sys.exit(f"physical_reference: no .onnx file under {models_dir}; run scripts/fetch-models.sh")
    return models[0]


def compress_env() -> dict:
    # The built-in defaults only: no MODELPRESS_* setting of the caller changes the pass (threads, seed).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env["ORT_DYLIB_PATH"] = from_script("ORT_DYLIB_PATH", "ort-dylib.sh")
    return env


def run_pass(model: Path, recipe: list, out: Path, env: dict) -> dict:
    """One `compress` run: the pass's own duration, the output size and the pass's first note."""
    cmd = [str(BIN), "compress", str(model), "--recipe", json.dumps(recipe), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:200]}
    report = json.loads((out / "report.json").read_text())
    record = report["passes"][0]
    return {
        "ms": record["duration_ms"],
        "out_bytes": (out / "model.onnx").stat().st_size,
        # The first clause of the first note, without long parentheticals (fp16's block list).
        "note": re.sub(r"\s*\([^()]{40,}\)", "", (record.get("notes") or [""])[0].split(";")[0]),
    }


def time_copy(model: Path, folder: Path) -> float:
    """Milliseconds of one `shutil.copyfile` of the model into `folder` (the copy is removed after)."""
    dest = folder / "copy.onnx"
    start = time.perf_counter()
    shutil.copyfile(model, dest)
    ms = (time.perf_counter() - start) * 1e3
    dest.unlink()
    return ms


def main() -> None:
    subprocess.run(["cargo", "build", "--release", "--bin", "modelpress"], cwd=ROOT, check=True,
                   stdout=sys.stderr)
    models_dir = Path(from_script("MODELPRESS_MODELS_DIR", "fetch-models.sh"))
    model = largest_model(models_dir)
    size = model.stat().st_size
    env = compress_env()
    rel = model.relative_to(models_dir)

    rows = []
    with tempfile.TemporaryDirectory(prefix="modelpress-physical-") as tmp:
        folder = Path(tmp)
        same_fs = folder.stat().st_dev == model.stat().st_dev
        for name, recipe in PASSES:
            runs = []
            for i in range(PASS_RUNS):
                log(f"{name} run {i + 1}/{PASS_RUNS} on {rel}")
                out = folder / f"{name}-{i}"
                runs.append(run_pass(model, recipe, out, env))
                shutil.rmtree(out, ignore_errors=True)
            failed = next((r for r in runs if "error" in r), None)
            if failed:
                rows.append({"pass": name, "error": failed["error"]})
                continue
            ms = statistics.median(r["ms"] for r in runs)
            moved = size + runs[0]["out_bytes"]
            rows.append({"pass": name, "ms": ms, "moved": moved, "mbps": moved / MB / (ms / 1e3),
                         "note": runs[0]["note"]})
        log(f"file copy x{COPY_RUNS}")
        copy_ms = statistics.median(time_copy(model, folder) for _ in range(COPY_RUNS))
    copy_moved = 2 * size
    copy_mbps = copy_moved / MB / (copy_ms / 1e3)

    out = []
    out.append("## Physical reference: passes vs a file copy\n")
    out.append(
        f"How close each pass comes to being I/O bound, on the largest fetched model (`{rel}`, {size / MB:.1f} MB). "
        f"A pass's time is its own duration in `report.json` (`passes[0].duration_ms` of `modelpress compress MODEL "
        f"--recipe '[{{\"pass\": \"NAME\"}}]' --out DIR`, each pass alone with its defaults, median of {PASS_RUNS} "
        f"runs); bytes moved = input model + output model; throughput = bytes moved / time. The reference is a plain "
        f"copy of the same model into the same temporary folder (`shutil.copyfile`, median of {COPY_RUNS} runs, bytes "
        f"moved = 2 x size); the ratio is the pass's throughput / the copy's (1.00 = as fast as copying the bytes). "
        f"Temporary folder on the model's filesystem: {'yes' if same_fs else 'no'}. "
        f"Command: `.venv/bin/python bench/physical_reference.py`.\n"
    )
    out.append("| | what the pass did (its report's first note) | time ms | MB moved | MB/s | ÷ copy |")
    out.append("|---|---|---:|---:|---:|---:|")
    out.append(f"| file copy | `shutil.copyfile` | {copy_ms:.2f} | {copy_moved / MB:.1f} | {copy_mbps:.0f} | 1.00 |")
    for r in rows:
        if "error" in r:
            out.append(f"| `{r['pass']}` | failed: {r['error'].replace('|', '/')} | | | | |")
            continue
        out.append(
            f"| `{r['pass']}` | {r['note'].replace('|', '/')} | {r['ms']:.2f} | {r['moved'] / MB:.1f} | "
            f"{r['mbps']:.0f} | {r['mbps'] / copy_mbps:.2f} |"
        )
    out.append("")
    idle = " and ".join(f"`{r['pass']}`" for r in rows if r.get("note", "").startswith("0 "))
    out.append(
        "Caveats: the page cache is warm (every run reads the same model, which the pipeline has already loaded once "
        "before the pass starts, and nothing is synced to disk), so the copy measures moving bytes through the "
        "kernel's cache, not the disk; on Linux `shutil.copyfile` copies in the kernel (sendfile), with no pass through "
        "user space. The pass time includes reading and parsing the input, rewriting the graph and serializing and "
        "writing the output, but not the evaluation (ONNX Runtime sessions, latency and fidelity runs) or the "
        "pipeline's own checks. `quantize_int8_static`'s time also includes its calibration (running the model in "
        "ONNX Runtime on the synthetic samples) and `optimize`'s includes building an ONNX Runtime session with graph "
        "optimizations."
        + (f" {idle} found nothing to do on this model (the note counts 0 nodes) but still read, parse, rewrite and "
           "write the whole model: those rows measure that floor." if idle else "")
        + "\n"
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
