"""Compares ModelPress's `quantize_int8_dynamic` pass with ONNX Runtime's own Python tool,
`onnxruntime.quantization.quantize_dynamic`, on the same models with the same settings, and prints a
Markdown section for BENCHMARKS.md on stdout (progress goes to stderr).

    .venv/bin/python bench/quantize_vs_python.py                  the section (bench/run.sh calls this)
    .venv/bin/python bench/quantize_vs_python.py child-quantize IN OUT    (internal) ORT's tool, one model
    .venv/bin/python bench/quantize_vs_python.py child-baseline           (internal) the imports alone

For every model the two tools each quantize the fp32 original, then one harness here evaluates the
fp32 original and both outputs with onnxruntime on the same seeded inputs: output size, fidelity of
the first output against fp32 (cosine similarity, top-1 agreement), task accuracy where there are
labels, CPU latency p50 with one intra-op thread, and `onnx.checker.check_model`. A tool that fails on
a model is shown as failing, with its error, never dropped.

Environment: ORT_DYLIB_PATH and MODELPRESS_MODELS_DIR as bench/run.sh exports them (found with
scripts/ort-dylib.sh and scripts/fetch-models.sh when unset). The release binary is (re)built with
`cargo build --release --bin modelpress` first.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "modelpress"
SEED = 0
FIDELITY_SAMPLES = 8  # seeded random inputs per real model (batch 1 each)
WARMUP, RUNS = 5, 50
SLOWER = 1.05  # the same 5% margin the service uses for its "slower than the original" warning
OP_TYPES = ["MatMul", "Gemm"]  # ModelPress's pass quantizes MatMul/Gemm only
INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"}

# name, path (relative to the models folder, or to the repo for digits), input shape (None: dataset)
MODELS = [
    ("digits MLP", "tests/fixtures/digits/mlp.onnx", None),
    ("PP-OCRv4 rec", "rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", [1, 3, 48, 320]),
    ("PP-OCRv4 det", "rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", [1, 3, 320, 320]),
    ("PP-OCR mobile v2.0 cls", "rapidocr/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", [1, 3, 48, 192]),
    ("NudeNet 320n (YOLOv8n)", "nudenet/nudenet/320n.onnx", [1, 3, 320, 320]),
]


def log(msg: str) -> None:
    print(f"quantize_vs_python: {msg}", file=sys.stderr, flush=True)


def short(err: str, limit: int = 140) -> str:
    """First non-empty line of an error, without ANSI colours, table-safe and shortened."""
    err = re.sub(r"\x1b\[[0-9;]*m", "", err or "")
    line = next((ln.strip() for ln in err.splitlines() if ln.strip()), "unknown error")
    line = line.replace("|", "\\|")
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---------------------------------------------------------------- children (ORT's tool, alone)


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child_quantize(src: str, dst: str) -> None:
    import logging

    logging.disable(logging.WARNING)  # "Please consider to run pre-processing..." on every call
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        t0 = time.perf_counter()
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize=OP_TYPES)
        ms = (time.perf_counter() - t0) * 1e3
        print(json.dumps({"pass_ms": ms, "vm_hwm_kib": vm_hwm_kib()}))
    except Exception as e:  # reported in the table, not hidden
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))


def child_baseline() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: F401

    print(json.dumps({"vm_hwm_kib": vm_hwm_kib()}))


def run_measured(cmd: list, env=None) -> tuple:
    """Runs cmd to completion; returns (exit code, stdout, stderr, wall s).

    The command is started by a small `sh`, not straight from this process: a process's
    getrusage ru_maxrss survives execve, and Python (like Rust's Command) spawns with vfork /
    posix_spawn, so a child exec'd straight from this harness, which holds several ONNX Runtime
    sessions, would report this harness's high-water mark as its own. sh's child starts from sh's
    small one. (The children's peak RSS is therefore read from what they report, not from wait4,
    whose figure for sh carries the same inheritance.)"""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        rc = subprocess.run(["sh", "-c", '"$0" "$@"; exit $?', *cmd], stdout=out, stderr=err, cwd=ROOT, env=env).returncode
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"), wall


# ---------------------------------------------------------------- the two tools


def ours(model: Path, out_dir: Path, env: dict) -> dict:
    recipe = json.dumps([{"pass": "quantize_int8_dynamic", "per_channel": False}])
    cmd = [str(BIN), "compress", str(model), "--recipe", recipe, "--out", str(out_dir)]
    rc, stdout, stderr, wall = run_measured(cmd, env)
    if rc != 0:
        # The error is the last line that is not a tracing log line ("modelpress compress: ...").
        text = re.sub(r"\x1b\[[0-9;]*m", "", stderr + "\n" + stdout)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        errs = [ln for ln in lines if not re.match(r"^\d{4}-\d\d-\d\dT\S+\s+(TRACE|DEBUG|INFO|WARN)\b", ln)]
        return {"error": short(errs[-1] if errs else (lines[-1] if lines else f"exit {rc}"))}
    report = json.loads((out_dir / "report.json").read_text())
    return {
        "path": out_dir / "model.onnx",
        "pass_ms": report["passes"][0]["duration_ms"],
        "peak_mib": report["environment"]["peak_memory_bytes"] / 2**20,
        "wall_s": wall,
    }


def theirs(model: Path, out_path: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child-quantize", str(model), str(out_path)]
    rc, stdout, stderr, wall = run_measured(cmd)
    try:
        res = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = [ln for ln in stderr.splitlines() if ln.strip()]
        return {"error": short(tail[-1] if tail else f"exit {rc}")}
    if "error" in res:
        return {"error": short(res["error"])}
    if rc != 0 or not out_path.exists():
        return {"error": short(stderr or f"exit {rc}, no output written")}
    return {"path": out_path, "pass_ms": res["pass_ms"], "peak_mib": res["vm_hwm_kib"] / 1024, "wall_s": wall}


# ---------------------------------------------------------------- the harness


def evaluate(rows: dict, feeds: list, labels, latency_feed: dict) -> None:
    """Adds size, checker, int8 node count, outputs, accuracy and p50 to every row that has a model."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sessions = {}
    for key, row in rows.items():
        if "error" in row:
            continue
        path = row["path"]
        row["size"] = path.stat().st_size
        try:
            onnx.checker.check_model(str(path))
            row["checker"] = "pass"
        except Exception as e:
            row["checker"] = f"fail: {short(str(e), 80)}"
        try:
            graph = onnx.load(str(path)).graph
            row["int8_nodes"] = sum(n.op_type in INT8_OPS for n in graph.node)
        except Exception:
            row["int8_nodes"] = None
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            first = sess.get_outputs()[0].name
            row["outputs"] = [sess.run([first], f)[0] for f in feeds]
            sessions[key] = (sess, first)
        except Exception as e:
            row["error"] = f"onnxruntime: {short(str(e))}"

    ref = rows["fp32"].get("outputs")
    for row in rows.values():
        outs = row.pop("outputs", None)
        if outs is None:
            continue
        if labels is not None:
            pred = np.concatenate([o.reshape(-1, o.shape[-1]).argmax(-1) for o in outs])
            row["accuracy"] = float((pred == labels).mean())
        if ref is None:
            continue
        a = np.concatenate([r.astype(np.float64).ravel() for r in ref])
        b = np.concatenate([o.astype(np.float64).ravel() for o in outs])
        den = np.linalg.norm(a) * np.linalg.norm(b)
        row["cosine"] = float(a @ b / den) if den > 0 else float("nan")
        ta = np.concatenate([r.reshape(-1, r.shape[-1]).argmax(-1) for r in ref])
        tb = np.concatenate([o.reshape(-1, o.shape[-1]).argmax(-1) for o in outs])
        row["top1"] = float((ta == tb).mean())

    # Latency: warm every session, then interleave the timed runs (fp32, ours, theirs, fp32, ...) so
    # that drift in the machine's speed falls on all three alike.
    for sess, first in sessions.values():
        for _ in range(WARMUP):
            sess.run([first], latency_feed)
    times = {k: [] for k in sessions}
    for _ in range(RUNS):
        for key, (sess, first) in sessions.items():
            t0 = time.perf_counter()
            sess.run([first], latency_feed)
            times[key].append((time.perf_counter() - t0) * 1e3)
    for key, ts in times.items():
        rows[key]["p50"] = float(np.median(ts))


def inputs_for(model_path: Path, shape):
    """(feeds for fidelity, labels or None, the feed timed for latency, a description)."""
    import numpy as np
    import onnxruntime as ort

    if shape is None:
        data = np.load(ROOT / "tests/fixtures/digits/test.npz")
        x, labels = data["input"].astype(np.float32), data["labels"]
        feed = {"input": x}
        return [feed], labels, feed, f"the {len(x)}-row test set (`test.npz`), one batch"
    name = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    rng = np.random.default_rng(SEED)
    feeds = [{name: rng.random(shape, dtype=np.float32)} for _ in range(FIDELITY_SAMPLES)]
    dims = "x".join(map(str, shape))
    return feeds, None, feeds[0], f"{FIDELITY_SAMPLES} seeded uniform [0,1) inputs {dims}"


# ---------------------------------------------------------------- the section


def fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def table(name: str, rel: str, desc: str, rows: dict, labels) -> list:
    lines = [f"### {name}", "", f"`{rel}`; inputs: {desc}.", ""]
    head = ["", "size bytes", "int8 MatMul nodes", "pass ms", "peak RSS MiB", "p50 ms", "cosine", "top-1 agreement"]
    if labels is not None:
        head.append("accuracy")
    head.append("checker")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels_shown = {"fp32": "fp32 original", "ours": "ModelPress", "theirs": "ORT Python"}
    rss_note = {"fp32": "", "ours": " (whole job)", "theirs": " (quantize process)"}
    for key, row in rows.items():
        if "error" in row and "size" not in row:
            cells = [labels_shown[key], f"failed: {row['error']}"] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        failed_eval = row.get("error")
        cells = [
            labels_shown[key],
            fmt(row.get("size"), ","),
            fmt(row.get("int8_nodes"), "d"),
            fmt(row.get("pass_ms"), ".1f"),
            fmt(row.get("peak_mib"), ".1f") + (rss_note[key] if "peak_mib" in row else ""),
            f"failed: {failed_eval}" if failed_eval else fmt(row.get("p50"), ".3f"),
            fmt(row.get("cosine"), ".6f"),
            fmt(row.get("top1"), ".4f"),
        ]
        if labels is not None:
            cells.append(fmt(row.get("accuracy"), ".4f"))
        cells.append(row.get("checker", "–"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b else "n/a"

    o, t, f = rows["ours"], rows["theirs"], rows["fp32"]
    parts = [
        f"ORT Python ÷ ModelPress: pass time {ratio(t.get('pass_ms'), o.get('pass_ms'))}, "
        f"size {ratio(t.get('size'), o.get('size'))}",
        f"p50 ÷ fp32 p50: ModelPress {ratio(o.get('p50'), f.get('p50'))}, ORT Python {ratio(t.get('p50'), f.get('p50'))}",
    ]
    slower = [labels_shown[k] for k in ("ours", "theirs") if rows[k].get("p50") and f.get("p50") and rows[k]["p50"] > f["p50"] * SLOWER]
    line = "Ratios: " + "; ".join(parts) + "."
    if slower:
        line += " **Slower than fp32:** " + ", ".join(slower) + "."
    unchanged = [labels_shown[k] for k in ("ours", "theirs") if rows[k].get("int8_nodes") == 0]
    if unchanged:
        line += " Quantized nothing: " + ", ".join(unchanged) + "."
    walls = []
    if o.get("wall_s") is not None:
        walls.append(f"ModelPress `compress` {o['wall_s']:.2f} s (with its evaluation)")
    if t.get("wall_s") is not None:
        walls.append(f"ORT Python {t['wall_s']:.2f} s (with interpreter start and imports)")
    if walls:
        line += " Whole process wall time: " + ", ".join(walls) + "."
    lines += [line, ""]
    return lines


def models_dir() -> Path:
    d = os.environ.get("MODELPRESS_MODELS_DIR")
    if not d:
        d = subprocess.run([str(ROOT / "scripts/fetch-models.sh")], capture_output=True, text=True).stdout.strip()
    return Path(d) if d else ROOT / ".cache/models"


def main() -> None:
    import numpy  # noqa: F401  (imported up front so a missing NumPy fails before any work)
    import onnx
    import onnxruntime as ort

    env = dict(os.environ)
    if not env.get("ORT_DYLIB_PATH"):
        env["ORT_DYLIB_PATH"] = subprocess.run(
            [str(ROOT / "scripts/ort-dylib.sh")], capture_output=True, text=True
        ).stdout.strip()
    build_error = None
    log("cargo build --release --bin modelpress")
    b = subprocess.run(["cargo", "build", "--release", "--bin", "modelpress"], cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(b.stderr[-2000:])
    if b.returncode != 0:
        errs = [ln for ln in b.stderr.splitlines() if ln.startswith("error")]
        build_error = "cargo build failed: " + short(errs[0] if errs else b.stderr)
    mdir = models_dir()

    _, base_out, _, _ = run_measured([sys.executable, str(Path(__file__).resolve()), "child-baseline"])
    try:
        base_mib = f"{json.loads(base_out)['vm_hwm_kib'] / 1024:.1f} MiB"
    except ValueError:
        base_mib = "not measured"

    out = [
        "## Quantization: int8 dynamic vs ONNX Runtime's quantize_dynamic",
        "",
        "For each model, ModelPress's `quantize_int8_dynamic` pass and ONNX Runtime's own Python tool "
        "quantize the same fp32 file with the same settings: int8 weights (`QInt8`), per tensor "
        "(`per_channel` false), dynamic activations, MatMul/Gemm only. ModelPress: "
        "`modelpress compress MODEL --recipe '[{\"pass\":\"quantize_int8_dynamic\",\"per_channel\":false}]' "
        "--out DIR` (release build). ORT: `onnxruntime.quantization.quantize_dynamic(MODEL, OUT, "
        f"weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize={OP_TYPES})` "
        f"(onnxruntime {ort.__version__}; `op_types_to_quantize` restricts it to ModelPress's op set; no "
        "`quant_pre_process`), in a child process of its own. ORT's tool only quantizes a MatMul whose "
        "weight is an initializer; weights held in `Constant` nodes (as in the PaddleOCR exports) are "
        "left alone unless `quant_pre_process` first folds them into initializers. "
        "**Pass ms** is the quantization step alone, file in to file out: for ModelPress the pass's own "
        "timing from its report (`passes[0].duration_ms`), since `compress` has no flag to skip the "
        "evaluation it runs afterwards; for ORT a timer around the `quantize_dynamic(...)` call inside "
        "its child (imports and interpreter start excluded). Both are one cold run. "
        "**Peak RSS** is not like for like: for ModelPress it is the whole job process "
        "(`environment.peak_memory_bytes`: load, pass, *and* its ONNX Runtime evaluation of both models); "
        "for ORT it is the child's own VmHWM (`/proc/self/status`) after the call, which includes the "
        f"Python interpreter and the onnxruntime/onnx imports ({base_mib} for a child that only imports "
        "them). Both tools are started through a small `sh`, since a process's `getrusage` peak survives "
        "`execve` and would otherwise start at this harness's own. "
        "Then one harness evaluates the fp32 original and both outputs with onnxruntime "
        f"{ort.__version__} (CPUExecutionProvider, `intra_op_num_threads=1`, sequential) on the same "
        f"inputs (NumPy seed {SEED}): cosine similarity of the first output against fp32 (all samples "
        "flattened), top-1 agreement (argmax over the last axis of the first output, for every row of "
        "the leading axes), accuracy where there are labels, and **p50** of "
        f"{RUNS} runs after {WARMUP} warm-ups on the first input, the three models' runs interleaved. "
        f"**Slower than fp32** flags a p50 more than {round((SLOWER - 1) * 100)}% above the fp32 "
        f"original's (the service's own margin). **Checker** is `onnx.checker.check_model` (onnx "
        f"{onnx.__version__}). **int8 MatMul nodes** counts the integer matmul nodes in the output "
        "(0: the tool left the model's arithmetic unchanged). A tool that fails on a model shows "
        "`failed:` and its error.",
        "",
    ]

    with tempfile.TemporaryDirectory(prefix="mp-quant-bench-") as tmp:
        tmp = Path(tmp)
        for i, (name, rel, shape) in enumerate(MODELS):
            path = ROOT / rel if shape is None else mdir / rel
            shown = rel if shape is None else f"$MODELPRESS_MODELS_DIR/{rel}"
            if not path.exists():
                out += [f"### {name}", "", f"`{shown}`: failed: model not found (scripts/fetch-models.sh)", ""]
                continue
            log(f"{name}: quantizing")
            rows = {"fp32": {"path": path}}
            rows["ours"] = {"error": build_error} if build_error else ours(path, tmp / f"ours-{i}", env)
            rows["theirs"] = theirs(path, tmp / f"theirs-{i}.onnx")
            log(f"{name}: evaluating")
            feeds, labels, latency_feed, desc = inputs_for(path, shape)
            evaluate(rows, feeds, labels, latency_feed)
            out += table(name, shown, desc, rows, labels)
            del feeds
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child-quantize":
        child_quantize(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "child-baseline":
        child_baseline()
    else:
        main()
