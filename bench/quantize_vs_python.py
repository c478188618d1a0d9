"""Compares ModelPress's compression passes with the Python tools people use for the same job, on the
same models with the same settings, and prints Markdown sections for BENCHMARKS.md on stdout
(progress goes to stderr):

- `quantize_int8_dynamic` vs ONNX Runtime's `onnxruntime.quantization.quantize_dynamic`;
- `quantize_int4_weight_only` vs ONNX Runtime's
  `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`;
- `fp16` vs onnxconverter-common's `float16.convert_float_to_float16`;
- `quantize_int8_static` (QDQ, minmax) vs ONNX Runtime's `onnxruntime.quantization.quantize_static`,
  both calibrated on exactly the same samples: ModelPress's job's calibration split, which the harness
  reads back from the binary itself (see `calibration_split`).

    .venv/bin/python bench/quantize_vs_python.py                    the sections (bench/run.sh calls this)
    .venv/bin/python bench/quantize_vs_python.py child-quantize KIND IN OUT [CALIB]   (internal) the Python tool, one model
    .venv/bin/python bench/quantize_vs_python.py child-baseline KIND          (internal) its imports alone

KIND is int8, int4, fp16 or static (CALIB: an .npz of the calibration samples, for static). For every model and kind the two tools each convert the fp32 original,
then one harness here evaluates the fp32 original and both outputs with onnxruntime on the same seeded inputs: output size, fidelity of
the first output against fp32 (cosine similarity, top-1 agreement), task accuracy where there are
labels, CPU latency p50 with one intra-op thread, and `onnx.checker.check_model`. A tool that fails on
a model is shown as failing, with its error, never dropped.

Environment: ORT_DYLIB_PATH and MODELPRESS_MODELS_DIR as bench/run.sh exports them (found with
scripts/ort-dylib.sh and scripts/fetch-models.sh when unset). The release binary is (re)built with
`cargo build --release --bin modelpress` first. While developing, MP_BENCH_KINDS (e.g. `static,int4`)
and MP_BENCH_MODELS (substrings of the model names, e.g. `cls,rec`) run part of it; `make bench`
sets neither.
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
SLOWER = 1.05  # the same 5% margin the service uses for its "slower than the original" warning,
SLOWER_MIN_MS = 0.01  # and the same 10 µs timer-noise floor for models that run in microseconds
DIVERGED = 0.99  # a cosine below this against fp32: the output no longer computes what the original did
NEAR_ZERO = 1e-3  # an fp32 first output whose largest |value| is below this: its cosine compares noise
OP_TYPES = ["MatMul", "Gemm"]  # ModelPress's pass quantizes MatMul/Gemm only
INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"}
INT4_BLOCK = 32  # int4 weight-only: block size along K, symmetric (no zero points), for both tools
STATIC_OPS = ["Conv", "MatMul", "Gemm"]  # quantize_int8_static's default op set, given to quantize_static too
CAL_SAMPLES = 40  # seeded samples (uniform, or token ids) per model without a dataset for int8 static; the job calibrates on 20% of them
CAL_SEED = SEED + 1  # their NumPy seed: not the harness's own evaluation inputs
RSS_MODEL = "PP-OCR mobile v2.0 cls"  # the model of the calibration-memory table
RSS_SCALE = 4  # that table's second row: this many times the calibration samples
STATIC_RECIPE = [{"pass": "quantize_int8_static", "calibration": "minmax", "per_channel": False}]
# The static section's extra row: every weight with a zero point, the dequantized values ORT's tool
# gives weights it finds in Constant nodes (uint8; ModelPress stores them as int8, minus 128).
STATIC_RECIPE_U8 = [{**STATIC_RECIPE[0], "symmetric_weights": False}]
U8_LABEL = "ModelPress, `symmetric_weights: false`"

TOKEN_IDS = (0, 256)  # the transformer encoder's inputs: int64 token ids in [0, 256), its vocabulary
# The PaddleOCR models' inputs: synthetic pages of text (see `text_page`), normalized as PaddleOCR
# feeds each model: ImageNet mean/std for det, (x - 0.5) / 0.5 for rec and cls. On uniform noise
# the detector's probability map is all but empty, which makes its fidelity meaningless.
TEXT_DET = ("text", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TEXT_LINE = ("text", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# name, path (relative to the models folder, or to the repo for the fixtures under tests/), input shape
# (None: the digits dataset), input values (None: uniform [0,1) float32; (low, high): int64 in [low, high);
# TEXT_*: synthetic text images)
MODELS = [
    ("digits MLP", "tests/fixtures/digits/mlp.onnx", None, None),
    ("transformer encoder", "tests/fixtures/transformer/encoder.onnx", [1, 16], TOKEN_IDS),
    ("PP-OCRv4 rec", "rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", [1, 3, 48, 320], TEXT_LINE),
    ("PP-OCRv4 det", "rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", [1, 3, 320, 320], TEXT_DET),
    ("PP-OCR mobile v2.0 cls", "rapidocr/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", [1, 3, 48, 192], TEXT_LINE),
    ("NudeNet 320n (YOLOv8n)", "nudenet/nudenet/320n.onnx", [1, 3, 320, 320], None),
]


def in_repo(rel: str) -> bool:
    """A fixture of this repository (tests/fixtures/...), not a model of the models folder."""
    return rel.startswith("tests/")


def sample(rng, shape, values):
    """Seeded model inputs: uniform [0,1) float32, int64 in [low, high) for a token-id input, or
    synthetic text images (NCHW, one page per sample)."""
    import numpy as np

    if values is None:
        return rng.random(shape, dtype=np.float32)
    if values[0] == "text":
        _, mean, std = values
        return np.concatenate([text_page(rng, shape[2], shape[3], mean, std) for _ in range(shape[0])])
    return rng.integers(values[0], values[1], size=shape, dtype=np.int64)


def text_page(rng, h: int, w: int, mean, std):
    """One [1, 3, h, w] image of pseudo-text: lines of words made of random 5x7 glyph bitmaps, scaled
    2-3x, dark ink on light, slightly noisy paper; normalized as (x - mean) / std. No font or image
    library needed, and PP-OCRv4 det finds text in about a quarter of such a page (on uniform noise:
    none)."""
    import numpy as np

    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(0.85, 1.0, size=3)
    img += rng.normal(0.0, 0.02, size=(h, w, 3)).astype(np.float32)
    glyphs = rng.random((64, 7, 5)) < 0.45
    y = int(rng.integers(2, 10))
    while True:
        scale = int(rng.integers(2, 4))
        gh, gw = 7 * scale, 5 * scale
        if y + gh >= h:
            break
        ink = rng.uniform(0.0, 0.3, size=3).astype(np.float32)
        x = int(rng.integers(2, 20))
        while x + gw < w:
            for _ in range(int(rng.integers(2, 8))):  # one word
                if x + gw >= w:
                    break
                glyph = np.kron(glyphs[rng.integers(64)], np.ones((scale, scale), bool))
                img[y:y + gh, x:x + gw][glyph] = ink
                x += gw + scale
            x += int(rng.integers(3, 6)) * scale
        y += gh + int(rng.integers(4, 16))
    img = (np.clip(img, 0.0, 1.0) - np.array(mean, np.float32)) / np.array(std, np.float32)
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def values_words(values) -> str:
    if values is None:
        return "uniform [0,1)"
    if values[0] == "text":
        return f"synthetic text-image (pseudo-glyph lines, normalized with mean {values[1][0]}.., std {values[2][0]}..)"
    return f"int64 [{values[0]}, {values[1]}) token-id"


def log(msg: str) -> None:
    print(f"quantize_vs_python: {msg}", file=sys.stderr, flush=True)


def short(err: str, limit: int = 140) -> str:
    """First non-empty line of an error, without ANSI colours, table-safe and shortened."""
    err = re.sub(r"\x1b\[[0-9;]*m", "", err or "")
    line = next((ln.strip() for ln in err.splitlines() if ln.strip()), "unknown error")
    line = line.replace("|", "\\|")
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---------------------------------------------------------------- children (the Python tool, alone)


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def cpu_has_vnni() -> bool:
    """AVX512-VNNI or AVX-VNNI in /proc/cpuinfo, ModelPress's test for its `reduce_range` default."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Both tools get the same weight range: ModelPress leaves `reduce_range` unset, which on x86 means
# 7-bit int8 weights exactly when the CPU has no VNNI (ONNX Runtime's AVX2 u8s8 kernels saturate
# otherwise); ORT's tools are given the same choice explicitly (their default is full range).
REDUCE_RANGE = not cpu_has_vnni()


def tool_imports(kind: str):
    """The Python tool for KIND, imported: a function (src path, dst path) -> None, file in to file out."""
    import logging
    import warnings

    logging.disable(logging.WARNING)  # "Please consider to run pre-processing..." on every call
    warnings.simplefilter("ignore")  # onnxconverter-common warns once per constant it clamps
    import onnx

    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        def run(src, dst):
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize=OP_TYPES,
                             reduce_range=REDUCE_RANGE)

    elif kind == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        def run(src, dst):
            # onnxruntime 1.31: bits 4 and QOperator format (MatMulNBits) are the defaults; the
            # default algorithm is plain round-to-nearest per block, as ModelPress's pass does.
            quant = MatMulNBitsQuantizer(src, block_size=INT4_BLOCK, is_symmetric=True)
            quant.process()
            quant.model.save_model_to_file(dst, use_external_data_format=False)

    elif kind == "static":
        import numpy as np
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            """One sample a call, batch of one, as ModelPress's calibration feeds them."""

            def __init__(self, calib):
                data = np.load(calib)
                self.arrays = {k: data[k] for k in data.files}  # [K, 1, ...] per input
                self.count = min(len(a) for a in self.arrays.values())
                self.i = 0

            def get_next(self):
                if self.i >= self.count:
                    return None
                self.i += 1
                return {k: a[self.i - 1] for k, a in self.arrays.items()}

        def run(src, dst, calib):
            reader = Reader(calib)  # inside the timer: ModelPress's pass reads its samples too
            quantize_static(
                src,
                dst,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=STATIC_OPS,
                reduce_range=REDUCE_RANGE,
            )

    elif kind == "fp16":
        from onnxconverter_common import float16

        def run(src, dst):
            onnx.save(float16.convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)

    else:
        raise SystemExit(f"unknown kind {kind!r}")
    return run


def child_quantize(kind: str, src: str, dst: str, *extra: str) -> None:
    try:
        run = tool_imports(kind)
    except Exception as e:  # a missing package is reported in the table, not hidden
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return
    try:
        t0 = time.perf_counter()
        run(src, dst, *extra)
        ms = (time.perf_counter() - t0) * 1e3
        print(json.dumps({"pass_ms": ms, "vm_hwm_kib": vm_hwm_kib()}))
    except Exception as e:  # reported in the table, not hidden
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))


def child_baseline(kind: str) -> None:
    tool_imports(kind)
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


# Error codes with which `compress` declines a model, with its reason, rather than writing a broken
# one: shown as "refused", not "failed" (pass_failed: the pass refused it; non_finite_output: the result
# computed NaN/Inf and was withheld). Any other error is a failure.
REFUSAL_CODES = {"pass_failed", "non_finite_output"}


def ours(model: Path, recipe: list, out_dir: Path, env: dict, extra: tuple = (), evaluate: bool = False) -> dict:
    """ModelPress's `compress`, one model; `extra`: more arguments (`--dataset ...`). Without
    `evaluate`, `--no-eval`: the passes alone, their records in passes.json; with it, the whole job
    and its report.json (for callers that read the report's own measurements)."""
    cmd = [str(BIN), "compress", str(model), *([] if evaluate else ["--no-eval"]), "--recipe", json.dumps(recipe),
           "--out", str(out_dir), *extra]
    rc, stdout, stderr, wall = run_measured(cmd, env)
    if rc != 0:
        # The job's error: a JSON error event on stdout (`--events`, the worker protocol) or, as here
        # without --events, "modelpress compress: CODE: MESSAGE" on stderr; otherwise the last line
        # that is not a tracing log line.
        for ln in reversed(stdout.splitlines()):
            try:
                ev = json.loads(ln)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == "error":
                code, msg = ev.get("code", ""), ev.get("message", "")
                break
        else:
            text = re.sub(r"\x1b\[[0-9;]*m", "", stderr + "\n" + stdout)
            lines = [ln for ln in text.splitlines() if ln.strip()]
            m = next((re.match(r"^modelpress compress: ([a-z_]+): (.*)$", ln) for ln in reversed(lines)
                      if ln.startswith("modelpress compress: ")), None)
            if m:
                code, msg = m.group(1), m.group(2)
            else:
                errs = [ln for ln in lines if not re.match(r"^\d{4}-\d\d-\d\dT\S+\s+(TRACE|DEBUG|INFO|WARN)\b", ln)]
                return {"error": short(errs[-1] if errs else (lines[-1] if lines else f"exit {rc}"), 200)}
        if code in REFUSAL_CODES:
            return {"error": short(msg if code == "pass_failed" else f"{code}: {msg}", 200), "refused": True}
        return {"error": short(f"{code}: {msg}", 200)}
    if evaluate:
        report = json.loads((out_dir / "report.json").read_text())
        done = {
            "passes": report["passes"],
            "peak_memory_bytes": report["environment"]["peak_memory_bytes"],
            "calibration_samples": report["evaluation"]["calibration_samples"],
        }
    else:
        done = json.loads((out_dir / "passes.json").read_text())
    return {
        "path": out_dir / "model.onnx",
        "pass_ms": done["passes"][0]["duration_ms"],
        "peak_mib": done["peak_memory_bytes"] / 2**20,
        "wall_s": wall,
        "calibration_samples": done["calibration_samples"],
    }


RUNS_WEIGHT_ONLY = 3


def median_of(run) -> dict:
    """`run(r)` for r in 0..RUNS_WEIGHT_ONLY: the first run's row with the median pass ms, peak RSS
    and wall time of all of them (or the first error)."""
    import statistics

    rows = []
    for r in range(RUNS_WEIGHT_ONLY):
        row = run(r)
        if "error" in row:
            return row
        rows.append(row)
    first = dict(rows[0])
    for key in ("pass_ms", "peak_mib", "wall_s"):
        first[key] = statistics.median(row[key] for row in rows)
    return first


def theirs(kind: str, model: Path, out_path: Path, extra: tuple = ()) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child-quantize", kind, str(model), str(out_path), *extra]
    rc, stdout, stderr, wall = run_measured(cmd)
    try:
        res = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = [ln for ln in stderr.splitlines() if ln.strip()]
        return {"error": short(tail[-1] if tail else f"exit {rc}")}
    if "error" in res:
        return {"error": short(res["error"], 200)}
    if rc != 0 or not out_path.exists():
        return {"error": short(stderr or f"exit {rc}, no output written")}
    return {"path": out_path, "pass_ms": res["pass_ms"], "peak_mib": res["vm_hwm_kib"] / 1024, "wall_s": wall}


# ---------------------------------------------------------------- what each comparison counts


def all_nodes(graph):
    """Every node of a graph and of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_nodes(attr.g)
            for g in attr.graphs:
                yield from all_nodes(g)


def weight_tensors(graph):
    """Initializers and Constant-node tensors (the PaddleOCR exports hold their weights in the latter)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                yield attr.t
            if attr.HasField("g"):
                yield from weight_tensors(attr.g)
            for g in attr.graphs:
                yield from weight_tensors(g)


def count_int8(model):
    return sum(n.op_type in INT8_OPS for n in all_nodes(model.graph))


def count_int4(model):
    return sum(n.op_type == "MatMulNBits" for n in all_nodes(model.graph))


def count_static(model):
    """(Conv/MatMul/Gemm whose data and weight inputs both come from DequantizeLinear,
    QuantizeLinear + DequantizeLinear + QLinear* nodes)."""
    nodes = list(all_nodes(model.graph))
    dq_out = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sum(
        n.op_type in STATIC_OPS and len(n.input) >= 2 and n.input[0] in dq_out and n.input[1] in dq_out for n in nodes
    )
    quantized += sum(n.op_type in ("QLinearConv", "QLinearMatMul", "QGemm") for n in nodes)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear") for n in nodes)
    return quantized, qdq


def count_fp16(model):
    """(float16 tensors, float32 tensors) among the weights."""
    from onnx import TensorProto

    types = [t.data_type for t in weight_tensors(model.graph)]
    return types.count(TensorProto.FLOAT16), types.count(TensorProto.FLOAT)


# kind, heading, ModelPress recipe, the counted column (label, count, format, "did nothing" test, wording),
# the Python tool's row label and its peak-RSS note.
SECTIONS = [
    {
        "kind": "int8",
        "heading": "Quantization: int8 dynamic vs ONNX Runtime's quantize_dynamic",
        "recipe": [{"pass": "quantize_int8_dynamic", "per_channel": False}],
        "col": "int8 MatMul nodes",
        "count": count_int8,
        "show": lambda c: f"{c:d}",
        "nothing": lambda c: c == 0,
        "nothing_words": "Quantized nothing",
        "theirs": "ORT Python",
        "rss_note": " (quantize process)",
    },
    {
        "kind": "int4",
        "heading": "Quantization: int4 weight-only vs ONNX Runtime's MatMulNBitsQuantizer",
        "recipe": [{"pass": "quantize_int4_weight_only", "block_size": INT4_BLOCK, "symmetric": True}],
        "col": "MatMulNBits nodes",
        "count": count_int4,
        "show": lambda c: f"{c:d}",
        "nothing": lambda c: c == 0,
        "nothing_words": "Quantized nothing",
        "theirs": "ORT Python",
        "rss_note": " (quantize process)",
    },
    {
        "kind": "fp16",
        "heading": "float16 vs onnxconverter-common's convert_float_to_float16",
        "recipe": [{"pass": "fp16"}],
        "col": "float16 / float32 weight tensors",
        "count": count_fp16,
        "show": lambda c: f"{c[0]:d} / {c[1]:d}",
        "nothing": lambda c: c[0] == 0,
        "nothing_words": "Converted nothing",
        "theirs": "onnxconverter-common",
        "rss_note": " (convert process)",
    },
    {
        "kind": "static",
        "heading": "Quantization: int8 static (QDQ) vs ONNX Runtime's quantize_static",
        "recipe": STATIC_RECIPE,
        "col": "quantized Conv/MatMul/Gemm / Q, DQ, QLinear nodes",
        "count": count_static,
        "show": lambda c: f"{c[0]:d} / {c[1]:d}",
        "nothing": lambda c: c[0] == 0,
        "nothing_words": "Quantized nothing",
        "theirs": "ORT Python",
        "rss_note": " (quantize process, with calibration)",
    },
]


# ---------------------------------------------------------------- the harness


def adapt(sess, feed: dict) -> dict:
    """The feed in the dtypes the session's inputs declare (a float16-input model gets float16)."""
    import numpy as np

    want = {i.name: i.type for i in sess.get_inputs()}
    return {k: v.astype(np.float16) if want.get(k) == "tensor(float16)" else v for k, v in feed.items()}


def evaluate(rows: dict, feeds: list, labels, latency_feed: dict, count) -> None:
    """Adds size, checker, the section's node count, outputs, accuracy and p50 to every row that has a model."""
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
            row["count"] = count(onnx.load(str(path)))
        except Exception:
            row["count"] = None
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            first = sess.get_outputs()[0].name
            row["outputs"] = [sess.run([first], adapt(sess, f))[0] for f in feeds]
            sessions[key] = (sess, first, adapt(sess, latency_feed))
        except Exception as e:
            # "... Load model from /tmp/.../x.onnx failed:Type Error: ...": the path says nothing
            msg = re.sub(r"Load model from \S+ failed:\s*", "", str(e))
            row["error"] = f"onnxruntime: {short(msg, 200)}"

    ref = rows["fp32"].get("outputs")
    if ref is not None and all(r.dtype.kind == "f" and r.size for r in ref):
        rows["fp32"]["ref_max_abs"] = max(float(np.abs(r.astype(np.float64)).max()) for r in ref)
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
    for sess, first, feed in sessions.values():
        for _ in range(WARMUP):
            sess.run([first], feed)
    times = {k: [] for k in sessions}
    for _ in range(RUNS):
        for key, (sess, first, feed) in sessions.items():
            t0 = time.perf_counter()
            sess.run([first], feed)
            times[key].append((time.perf_counter() - t0) * 1e3)
    for key, ts in times.items():
        rows[key]["p50"] = float(np.median(ts))


def inputs_for(model_path: Path, shape, values=None):
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
    feeds = [{name: sample(rng, shape, values)} for _ in range(FIDELITY_SAMPLES)]
    dims = "x".join(map(str, shape))
    return feeds, None, feeds[0], f"{FIDELITY_SAMPLES} seeded {values_words(values)} inputs {dims}"


# ---------------------------------------------------------------- int8 static: the calibration samples


_SPLITS = {}


def calibration_split(total: int, env: dict, tmp: Path) -> list:
    """The indices of the samples ModelPress's job calibrates on, for a dataset of `total` samples,
    read back from the binary itself.

    The job cuts its calibration split by shuffling 0..total with Rust's StdRng seeded from the
    configuration (`eval.seed`, `eval.calibration_fraction`), which NumPy cannot reproduce; but the
    split depends on the sample count alone, so a probe job with the same count and the same options
    shows it: a model whose input row is split into `total` one-element branches, each through a
    MatMul of its own, and a dataset whose sample i is row i of the identity. `quantize_int8_static`
    calibrates every branch's input on the calibration samples only, so branch i gets the range
    [0, 1] (scale 1/255) exactly when sample i is one of them, and [0, 0] (scale 1) otherwise."""
    if total in _SPLITS:
        return _SPLITS[total]
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", total])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", total])
    inits = [numpy_helper.from_array(np.ones(total, np.int64), "split"), numpy_helper.from_array(np.ones((1, 1), np.float32), "w")]
    nodes = [helper.make_node("Split", ["x", "split"], [f"s{i}" for i in range(total)], axis=1)]
    nodes += [helper.make_node("MatMul", [f"s{i}", "w"], [f"m{i}"]) for i in range(total)]
    nodes.append(helper.make_node("Concat", [f"m{i}" for i in range(total)], ["y"], axis=1))
    model = helper.make_model(helper.make_graph(nodes, "split_probe", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    probe = tmp / f"split-probe-{total}"
    probe.mkdir()
    onnx.save(model, str(probe / "probe.onnx"))
    np.savez(probe / "probe.npz", x=np.eye(total, dtype=np.float32))
    res = ours(probe / "probe.onnx", STATIC_RECIPE, probe / "out", env, ("--dataset", str(probe / "probe.npz")))
    if "error" in res:
        raise RuntimeError(f"the split probe failed: {res['error']}")
    out = onnx.load(str(res["path"]))
    scales = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    picked = sorted(
        int(n.input[0][1:])
        for n in out.graph.node
        if n.op_type == "QuantizeLinear" and re.fullmatch(r"s\d+", n.input[0]) and float(scales[n.input[1]]) < 0.5
    )
    if len(picked) != res["calibration_samples"]:
        raise RuntimeError(f"the split probe read {len(picked)} samples, its job reported {res['calibration_samples']}")
    _SPLITS[total] = picked
    return picked


def static_calibration(i: int, path: Path, shape, tmp: Path, env: dict, samples: int = CAL_SAMPLES, values=None) -> dict:
    """The calibration data for one model: ModelPress's `--dataset` arguments, and an .npz of just
    the samples of its calibration split (each [1, ...], batch of one) for ORT's reader."""
    import numpy as np
    import onnxruntime as ort

    if shape is None:
        dataset = ROOT / "tests/fixtures/digits/test.npz"
        arrays = {"input": np.load(dataset)["input"]}
        extra = ("--dataset", str(dataset), "--task", "classification")
    else:
        name = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        # the input's rank with a dynamic batch axis: the job reads samples along it
        arrays = {name: sample(np.random.default_rng(CAL_SEED), [samples, *shape[1:]], values)}
        dataset = tmp / f"calibration-{i}-{samples}.npz"
        np.savez(dataset, **arrays)
        extra = ("--dataset", str(dataset))
    total = len(next(iter(arrays.values())))
    try:
        idx = calibration_split(total, env, tmp)
    except Exception as e:
        return {"extra": extra, "total": total, "error": short(str(e), 200)}
    calib = tmp / f"calibration-{i}-{samples}-ort.npz"
    np.savez(calib, **{k: a[idx][:, None] for k, a in arrays.items()})
    return {"extra": extra, "total": total, "indices": idx, "calib": calib}


def theirs_static(path: Path, out_path: Path, cal: dict, ours_row: dict) -> dict:
    if "error" in cal:
        return {"error": f"no calibration samples: {cal['error']}"}
    got = ours_row.get("calibration_samples")
    if got is not None and got != len(cal["indices"]):
        return {"error": f"the split probe found {len(cal['indices'])} calibration samples, ModelPress's job used {got}"}
    return theirs("static", path, out_path, (str(cal["calib"]),))


def rss_table(path: Path, shape, tmp: Path, env: dict, base_mib: str) -> list:
    """Peak RSS of both tools calibrating one model on K and RSS_SCALE x K samples."""
    lines = [
        f"### Calibration memory: {RSS_MODEL}, {RSS_SCALE}x the calibration samples",
        "",
        f"The same model, options and harness as its table above, on {CAL_SAMPLES} and {CAL_SAMPLES * RSS_SCALE} "
        f"seeded samples of its inputs (NumPy seed {CAL_SEED}), so that ModelPress's job calibrates on "
        f"{round(CAL_SAMPLES * 0.2)} and {round(CAL_SAMPLES * RSS_SCALE * 0.2)} of them and ORT's reader yields "
        "exactly those. ModelPress's figure is its `compress --no-eval` process (parse, calibration, "
        "quantization, write); ORT's is the quantize process, with the Python interpreter and its imports "
        f"({base_mib} for a child that only imports them) and the calibration samples it reads.",
        "",
        "| | dataset samples | calibration samples | pass ms | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    peaks = {"ours": [], "theirs": []}
    for n in (CAL_SAMPLES, CAL_SAMPLES * RSS_SCALE):
        log(f"{RSS_MODEL}: static, calibration memory with {n} samples")
        cal = static_calibration(90, path, shape, tmp, env, n)
        o = ours(path, STATIC_RECIPE, tmp / f"ours-static-rss-{n}", env, cal["extra"])
        t = theirs_static(path, tmp / f"theirs-static-rss-{n}.onnx", cal, o)
        k = len(cal.get("indices", [])) or "–"
        for key, label, row in (("ours", "ModelPress (compress process)", o), ("theirs", "ORT Python (quantize process)", t)):
            if "error" in row:
                lines.append(f"| {label} | {n} | {k} | failed: {row['error']} | |")
                peaks[key].append(None)
            else:
                lines.append(f"| {label} | {n} | {k} | {row['pass_ms']:.1f} | {row['peak_mib']:.1f} |")
                peaks[key].append(row["peak_mib"])
    lines.append("")
    grow = [
        f"{who} {p[1] - p[0]:+.1f} MiB ({p[1] / p[0]:.2f}x)"
        for who, p in (("ModelPress", peaks["ours"]), ("ORT Python", peaks["theirs"]))
        if None not in p
    ]
    if grow:
        lines += [f"Peak RSS from {CAL_SAMPLES} to {CAL_SAMPLES * RSS_SCALE} samples: " + ", ".join(grow) + ".", ""]
    return lines


# ---------------------------------------------------------------- the sections


def fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def table(name: str, rel: str, desc: str, rows: dict, labels, sec: dict) -> list:
    lines = [f"### {name}", "", f"`{rel}`; inputs: {desc}.", ""]
    head = ["", "size bytes", sec["col"], "pass ms", "peak RSS MiB", "p50 ms", "cosine", "top-1 agreement"]
    if labels is not None:
        head.append("accuracy")
    head.append("checker")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels_shown = {"fp32": "fp32 original", "ours": "ModelPress", "ours_u8": U8_LABEL, "theirs": sec["theirs"]}
    rss_note = {"fp32": "", "ours": " (compress process)", "ours_u8": " (compress process)", "theirs": sec["rss_note"]}
    others = [k for k in rows if k != "fp32"]
    for key, row in rows.items():
        if "error" in row and "size" not in row:
            word = "refused" if row.get("refused") else "failed"
            cells = [labels_shown[key], f"{word}: {row['error']}"] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        failed_eval = row.get("error")
        cells = [
            labels_shown[key],
            fmt(row.get("size"), ","),
            "–" if row.get("count") is None else sec["show"](row["count"]),
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
    them = sec["theirs"]
    parts = [
        f"{them} ÷ ModelPress: pass time {ratio(t.get('pass_ms'), o.get('pass_ms'))}, "
        f"size {ratio(t.get('size'), o.get('size'))}",
        f"p50 ÷ fp32 p50: ModelPress {ratio(o.get('p50'), f.get('p50'))}, {them} {ratio(t.get('p50'), f.get('p50'))}",
    ]
    if o.get("size") and t.get("size") and f.get("size"):
        parts.append(f"size ÷ fp32 size: ModelPress {ratio(o['size'], f['size'])}, {them} {ratio(t['size'], f['size'])}")
    slower = [
        labels_shown[k]
        for k in others
        if rows[k].get("p50") and f.get("p50") and rows[k]["p50"] > f["p50"] * SLOWER and rows[k]["p50"] - f["p50"] > SLOWER_MIN_MS
    ]
    line = "Ratios: " + "; ".join(parts) + "."
    if slower:
        line += " **Slower than fp32:** " + ", ".join(slower) + "."
    unchanged = [labels_shown[k] for k in others if rows[k].get("count") is not None and sec["nothing"](rows[k]["count"])]
    if unchanged:
        line += f" {sec['nothing_words']}: " + ", ".join(unchanged) + "."
    broken = [labels_shown[k] for k in others if "size" in rows[k] and ("error" in rows[k] or rows[k].get("checker", "pass") != "pass")]
    if broken:
        line += " **Wrote a model that onnxruntime or the checker rejects:** " + ", ".join(broken) + "."
    diverged = [labels_shown[k] for k in others if rows[k].get("cosine") is not None and not rows[k]["cosine"] >= DIVERGED]
    if diverged:
        line += f" **Output diverges from fp32 (cosine below {DIVERGED}):** " + ", ".join(diverged) + "."
    if f.get("ref_max_abs") is not None and f["ref_max_abs"] < NEAR_ZERO:
        line += (
            f" The fp32 original's first output is all but empty on these inputs (largest |value| "
            f"{f['ref_max_abs']:.1e}), so cosine and top-1 agreement here compare near-zero values: "
            "they say little about the model on real data."
        )
    refused = [labels_shown[k] for k in others if rows[k].get("refused")]
    if refused:
        line += " Refused the model with a reason: " + ", ".join(refused) + "."
    walls = []
    if o.get("wall_s") is not None:
        walls.append(f"ModelPress `compress --no-eval` {o['wall_s']:.2f} s")
    if t.get("wall_s") is not None:
        walls.append(f"{them} {t['wall_s']:.2f} s (with interpreter start and imports)")
    if walls:
        line += " Whole process wall time: " + ", ".join(walls) + "."
    lines += [line, ""]
    return lines


def calibration_words(cal: dict, shape, values=None) -> str:
    if "error" in cal:
        return f"calibration: failed: {cal['error']}"
    k, n = len(cal["indices"]), cal["total"]
    shown = ", ".join(map(str, cal["indices"][:12])) + (", …" if k > 12 else "")
    if shape is None:
        return (
            f"calibration: the {k} rows of ModelPress's calibration split of `test.npz` (of {n}; rows {shown}), "
            f"the same {k} for both tools; accuracy and fidelity here count all {n} rows, those {k} included"
        )
    dims = "x".join(map(str, shape[1:]))
    return (
        f"calibration: the {k} samples of ModelPress's calibration split (of {n} seeded {values_words(values)} samples "
        f"{dims}, NumPy seed {CAL_SEED}; samples {shown}), the same {k} for both tools"
    )


def intro(kind: str, base_mib: str, ort_version: str, onnx_version: str) -> str:
    if kind == "int8":
        return (
            "For each model, ModelPress's `quantize_int8_dynamic` pass and ONNX Runtime's own Python tool "
            "quantize the same fp32 file with the same settings: int8 weights (`QInt8`), per tensor "
            "(`per_channel` false), dynamic activations, MatMul/Gemm only. ModelPress: "
            "`modelpress compress MODEL --no-eval --recipe '[{\"pass\":\"quantize_int8_dynamic\",\"per_channel\":false}]' "
            "--out DIR` (release build; `--no-eval` runs the passes alone and writes `passes.json` instead of "
            "measuring both models, since this harness measures them itself). ORT: `onnxruntime.quantization.quantize_dynamic(MODEL, OUT, "
            f"weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize={OP_TYPES}, "
            f"reduce_range={REDUCE_RANGE})` "
            f"(onnxruntime {ort_version}; `op_types_to_quantize` restricts it to ModelPress's op set; no "
            "`quant_pre_process`), in a child process of its own. **reduce_range** "
            f"({'7-bit' if REDUCE_RANGE else 'full 8-bit'} int8 weights here): this CPU "
            f"{'has no' if REDUCE_RANGE else 'has'} VNNI, so ModelPress's pass, whose `reduce_range` is left "
            "unset, picks that range itself (ONNX Runtime's AVX2 uint8×int8 kernels add pairs of products into "
            "a saturating int16, which full-range weights overflow), and ORT's tool, whose default is the full "
            "range, is given the same value. ORT's tool only quantizes a MatMul whose "
            "weight is an initializer; weights held in `Constant` nodes (as in the PaddleOCR exports) are "
            "left alone unless `quant_pre_process` first folds them into initializers. "
            "**Pass ms** is the quantization step alone, file in to file out: for ModelPress the pass's own "
            "timing (`passes[0].duration_ms` in `passes.json`); for ORT a timer around the `quantize_dynamic(...)` call inside "
            "its child (imports and interpreter start excluded). Each tool runs "
            f"{RUNS_WEIGHT_ONLY} times in fresh processes, each writing a new file, and the tables show the "
            "median of pass ms, peak RSS and wall time (int8 dynamic, int4 and fp16; static runs once). "
            "**Peak RSS** is each tool's whole process: for ModelPress the `compress --no-eval` process's "
            "VmHWM (`peak_memory_bytes` in `passes.json`: the model read, the pass, the write; ONNX Runtime's "
            "library is loaded only by passes that run a model, such as static calibration); for ORT it is the child's own VmHWM (`/proc/self/status`) after the call, which includes the "
            f"Python interpreter and the onnxruntime/onnx imports ({base_mib} for a child that only imports "
            "them). Both tools are started through a small `sh`, since a process's `getrusage` peak survives "
            "`execve` and would otherwise start at this harness's own. "
            "Then one harness evaluates the fp32 original and both outputs with onnxruntime "
            f"{ort_version} (CPUExecutionProvider, `intra_op_num_threads=1`, sequential) on the same "
            f"inputs (NumPy seed {SEED}): cosine similarity of the first output against fp32 (all samples "
            "flattened), top-1 agreement (argmax over the last axis of the first output, for every row of "
            "the leading axes), accuracy where there are labels, and **p50** of "
            f"{RUNS} runs after {WARMUP} warm-ups on the first input, the three models' runs interleaved. "
            f"**Slower than fp32** flags a p50 more than {round((SLOWER - 1) * 100)}% and more than "
            f"{SLOWER_MIN_MS * 1000:.0f} µs above the fp32 original's (the service's own margin and timer-noise "
            f"floor); **output diverges from fp32** flags a cosine below {DIVERGED} (a model that loads and "
            "runs but no longer computes what the original did). **Checker** is `onnx.checker.check_model` (onnx "
            f"{onnx_version}). **int8 MatMul nodes** counts the integer matmul nodes in the output "
            "(0: the tool left the model's arithmetic unchanged). A tool that fails on a model shows "
            "`failed:` and its error."
        )
    if kind == "int4":
        return (
            "For each model, ModelPress's `quantize_int4_weight_only` pass and ONNX Runtime's own Python "
            f"tool quantize the same fp32 file the same way: MatMul weights to 4 bits in blocks of {INT4_BLOCK} "
            "along K, symmetric (no zero points), round to nearest, stored in `com.microsoft.MatMulNBits` "
            "nodes; activations stay float32. ModelPress: `modelpress compress MODEL --no-eval --recipe "
            f"'[{{\"pass\":\"quantize_int4_weight_only\",\"block_size\":{INT4_BLOCK},\"symmetric\":true}}]' "
            "--out DIR`. ORT: `quant = onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer("
            f"MODEL, block_size={INT4_BLOCK}, is_symmetric=True)`, `quant.process()`, "
            "`quant.model.save_model_to_file(OUT, use_external_data_format=False)` (onnxruntime "
            f"{ort_version}'s defaults otherwise: 4 bits, QOperator format, the default round-to-nearest "
            "algorithm, `accuracy_level` unset, MatMul only), timed together, file in to file out, in a "
            f"child process of its own ({base_mib} for a child that only imports it; the quantizer needs the "
            "onnx-ir package, which the onnxruntime wheel does not pull in). Like `quantize_dynamic`, it "
            "quantizes only a MatMul whose weight is an initializer, so weights held in `Constant` nodes (the "
            "PaddleOCR exports) are left alone. Pass ms, peak RSS (with the same caveats), the inputs, p50, "
            "cosine, top-1 agreement, accuracy, the checker and both flags (**slower than fp32**, **output "
            "diverges from fp32**) are measured exactly as in the int8 section above. **MatMulNBits nodes** counts the 4-bit matmuls in the "
            "output (0: the tool quantized nothing). A tool that fails shows `failed:` and its error; a "
            "written model that onnxruntime cannot load shows `failed: onnxruntime: ...` in the p50 column, "
            "and a checker failure shows in the checker column. ModelPress declining a model with a reason "
            "(its job exits 1 with the error) shows `refused:` and the reason."
        )
    if kind == "static":
        return (
            "For each model, ModelPress's `quantize_int8_static` pass and ONNX Runtime's own Python tool "
            "quantize the same fp32 file the same way, calibrated on the same samples: QDQ format "
            "(QuantizeLinear → DequantizeLinear pairs around each quantized node, which ONNX Runtime fuses "
            "into its integer kernels when it loads the model), int8 weights per tensor, uint8 activations "
            f"with a zero point, ranges by min/max, {'/'.join(STATIC_OPS)} only. ModelPress: `modelpress "
            "compress MODEL --no-eval --recipe '[{\"pass\":\"quantize_int8_static\",\"calibration\":\"minmax\","
            "\"per_channel\":false}]' --out DIR --dataset DATA.npz` (plus `--task classification` for the "
            "digits MLP, whose `DATA.npz` is `tests/fixtures/digits/test.npz`; for the real models "
            f"`DATA.npz` holds {CAL_SAMPLES} seeded samples of the model's harness inputs (synthetic text images for "
            f"the PaddleOCR models, uniform [0,1) float32 for NudeNet), NumPy seed {CAL_SEED}, under "
            "the model's input name, shaped [N, 3, H, W] with the harness's H and W, read along the input's "
            f"dynamic batch axis; for the transformer encoder, {CAL_SAMPLES} seeded int64 token ids in "
            f"[{TOKEN_IDS[0]}, {TOKEN_IDS[1]}) shaped [N, 16] under `input_ids`, read the same way). The job calibrates on its deterministic calibration split (20% of the "
            "samples, seed 42, from the configuration; the other 80% are its own evaluation) one sample at "
            "a time (with `--no-eval` it still splits the dataset the same way, and only calibrates). ORT: `onnxruntime.quantization.quantize_static(MODEL, OUT, reader, "
            "quant_format=QuantFormat.QDQ, per_channel=False, activation_type=QuantType.QUInt8, "
            "weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, "
            f"op_types_to_quantize={STATIC_OPS}, reduce_range={REDUCE_RANGE})` (the same weight range as "
            f"ModelPress picks on this CPU, as in the int8 dynamic section; onnxruntime {ort_version}; its "
            "defaults otherwise; no "
            "`quant_pre_process`), in a child process of its own, where `reader` is a "
            "`CalibrationDataReader` that yields, one at a time as batches of one, **exactly the samples of "
            "ModelPress's calibration split**. That split comes from Rust's `StdRng`, which NumPy cannot "
            "replay, so the harness reads it back from the binary: for a dataset of N samples it runs "
            "`compress` with the same recipe once on a probe model that splits its input row into N "
            "one-element branches, each through a MatMul of its own, with a dataset whose sample i is row i "
            "of the identity; branch i gets a nonzero range exactly when sample i was calibrated on (the "
            "split depends on N alone, and the count read back is checked against what the real run reports in `passes.json`). "
            "**Pass ms** includes calibration for both: ModelPress's `passes[0].duration_ms` (it "
            "reads its calibration samples and runs them through ONNX Runtime inside the pass); for ORT a "
            "timer around building the reader (loading its .npz of calibration samples) and the "
            "`quantize_static(...)` call, which writes an augmented model, runs ONNX Runtime on every sample "
            "and quantizes. Peak RSS (with the same caveats: ModelPress's is the `compress --no-eval` process, "
            f"its calibration runs included; ORT's child is {base_mib} once it has only imported onnxruntime, onnx and NumPy), the "
            "harness's inputs, p50, cosine, top-1 agreement, accuracy, the checker and both flags are "
            "measured exactly as in the int8 dynamic section above; the harness's own evaluation inputs are "
            f"the same seeded samples as there (NumPy seed {SEED}), not the calibration samples. **Quantized "
            "Conv/MatMul/Gemm / Q, DQ, QLinear nodes**: the Conv/MatMul/Gemm nodes whose data and weight "
            "inputs both come from a DequantizeLinear (0: the tool quantized nothing), then the count of "
            "QuantizeLinear, DequantizeLinear and QLinear* nodes. The PaddleOCR exports hold their weights in "
            "`Constant` nodes: ORT's tool then quantizes those weights as if they were activations (a "
            "QuantizeLinear on the float constant at run time, uint8 with a calibrated range), so the float "
            "weights stay in its file; ModelPress stores them as int8 initializers (with `symmetric_weights` "
            "unset it gives a weight a zero point only where its range is so skewed that this halves "
            "its rounding error). So each table has a third row, **" + U8_LABEL + "**: the same recipe with "
            "every weight given a zero point, per tensor: the same dequantized weights as the uint8 ones ORT's tool "
            "gives `Constant`-node weights, stored as int8 (uint8's codes and zero point minus 128; uint8 where "
            "`reduce_range` is on), which ONNX Runtime runs through its uint8×int8 kernels instead of the slower "
            "uint8×uint8 ones; both tools calibrate on the graph as written (ORT's calibrator disables ONNX Runtime's "
            "graph optimizations, and so does ModelPress's), so where the two quantize the same nodes (PP-OCR cls) "
            "this row and ORT's compute the same outputs; on PP-OCRv4 rec ORT also quantizes differently around "
            "the attention (more Q/DQ nodes), and the two differ slightly. ModelPress quantizes only "
            "nodes with a constant weight (its report notes the rest as skipped); ORT also quantizes a MatMul of "
            "two activations (the attention MatMuls of PP-OCRv4 rec). After the tables, one "
            "more measures whether calibration memory grows with the number of samples. A tool that fails "
            "shows `failed:` and its error; ModelPress declining a model with a reason shows `refused:` and "
            "the reason."
        )
    return (
        "For each model, ModelPress's `fp16` pass and onnxconverter-common's converter turn the same fp32 "
        "file's weights and activations into float16, keeping float32 graph inputs and outputs (Casts at "
        "the edges) and running their block-listed operators in float32 between Casts. ModelPress: "
        "`modelpress compress MODEL --no-eval --recipe '[{\"pass\":\"fp16\"}]' --out DIR` (`keep_io_types` defaults "
        "to true; its default block list keeps reductions, normalizations, Softmax, Resize, Pow and a few "
        "others in float32, and it refuses, with the reason, a model with control flow or an operator "
        "whose types it cannot tell). onnxconverter-common: `onnx.save(onnxconverter_common.float16."
        "convert_float_to_float16(onnx.load(MODEL), keep_io_types=True), OUT)` (its defaults otherwise: "
        "its own block list of ai.onnx.ml operators and a few others, constants clamped to [1e-7, 1e4] in "
        f"magnitude), timed together, file in to file out, in a child process of its own ({base_mib} for "
        "a child that only imports it). float16 on a CPU is expected to be *slower* than fp32: ONNX "
        "Runtime's CPU provider has float16 kernels for few operators, and computes most of them through "
        "inserted Casts to and from float32, so the **slower than fp32** flag is expected here and shown, "
        "not hidden; the gain is size (and speed on GPUs). Pass ms, peak RSS (with the same caveats), the "
        "inputs, p50, cosine, top-1 agreement, accuracy, the checker and the **output diverges from fp32** "
        "flag are measured exactly as in the int8 section above (a float16 input, were there one, gets the same samples converted). "
        "**float16 / float32 weight tensors** counts the output's initializers and `Constant`-node "
        "tensors by element type (the PaddleOCR exports keep their weights in `Constant` nodes). A tool "
        "that fails shows `failed:` and its error; a written model that onnxruntime cannot load shows "
        "`failed: onnxruntime: ...` in the p50 column; ModelPress declining a model with a reason (its "
        "job exits 1 with the error) shows `refused:` and the reason."
    )


def models_dir() -> Path:
    d = os.environ.get("MODELPRESS_MODELS_DIR")
    if not d:
        d = subprocess.run([str(ROOT / "scripts/fetch-models.sh")], capture_output=True, text=True).stdout.strip()
    return Path(d) if d else ROOT / ".cache/models"


def main() -> None:
    import numpy  # noqa: F401  (imported up front so a missing NumPy fails before any work)
    import onnx
    import onnxruntime as ort

    t_start = time.perf_counter()
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

    # Development filters (comma-separated substrings); `make bench` sets neither and runs everything.
    only_kinds = [k for k in os.environ.get("MP_BENCH_KINDS", "").split(",") if k]
    only_models = [m for m in os.environ.get("MP_BENCH_MODELS", "").split(",") if m]
    sections = [s for s in SECTIONS if not only_kinds or s["kind"] in only_kinds]
    models = [m for m in MODELS if not only_models or any(w in m[0] for w in only_models)]

    out = {}
    for sec in sections:
        kind = sec["kind"]
        _, base_out, base_err, _ = run_measured([sys.executable, str(Path(__file__).resolve()), "child-baseline", kind])
        try:
            base_mib = f"{json.loads(base_out)['vm_hwm_kib'] / 1024:.1f} MiB"
        except ValueError:
            base_mib = "not measured: " + short(base_err.strip().splitlines()[-1] if base_err.strip() else "no output")
        out[kind] = [f"## {sec['heading']}", "", intro(kind, base_mib, ort.__version__, onnx.__version__), ""]
        if kind == "static":
            base_static = base_mib

    rss_lines = None
    with tempfile.TemporaryDirectory(prefix="mp-quant-bench-") as tmp:
        tmp = Path(tmp)
        for i, (name, rel, shape, values) in enumerate(MODELS):
            if (name, rel, shape, values) not in models:
                continue
            path = ROOT / rel if in_repo(rel) else mdir / rel
            shown = rel if in_repo(rel) else f"$MODELPRESS_MODELS_DIR/{rel}"
            if not path.exists():
                for sec in sections:
                    hint = "its fixture script under scripts/" if in_repo(rel) else "scripts/fetch-models.sh"
                    out[sec["kind"]] += [f"### {name}", "", f"`{shown}`: failed: model not found ({hint})", ""]
                continue
            feeds, labels, latency_feed, desc = inputs_for(path, shape, values)
            for sec in sections:
                kind = sec["kind"]
                log(f"{name}: {kind}")
                rows = {"fp32": {"path": path}}
                shown_desc = desc
                if kind == "static":
                    cal = static_calibration(i, path, shape, tmp, env, values=values) if not build_error else {"error": build_error}
                    shown_desc += "; " + calibration_words(cal, shape, values)
                    rows["ours"] = {"error": build_error} if build_error else ours(path, sec["recipe"], tmp / f"ours-{kind}-{i}", env, cal["extra"])
                    rows["ours_u8"] = {"error": build_error} if build_error else ours(path, STATIC_RECIPE_U8, tmp / f"ours-{kind}-u8-{i}", env, cal["extra"])
                    rows["theirs"] = theirs_static(path, tmp / f"theirs-{kind}-{i}.onnx", cal, rows["ours"])
                else:
                    # Passes of a few milliseconds: one cold run is mostly noise, so both tools run
                    # RUNS_WEIGHT_ONLY times (fresh outputs each time) and show their medians.
                    rows["ours"] = {"error": build_error} if build_error else median_of(
                        lambda r: ours(path, sec["recipe"], tmp / f"ours-{kind}-{i}-{r}", env))
                    rows["theirs"] = median_of(lambda r: theirs(kind, path, tmp / f"theirs-{kind}-{i}-{r}.onnx"))
                evaluate(rows, feeds, labels, latency_feed, sec["count"])
                out[kind] += table(name, shown, shown_desc, rows, labels, sec)
            del feeds
            if name == RSS_MODEL and not build_error and "static" in out:
                rss_lines = rss_table(path, shape, tmp, env, base_static)
        if rss_lines is None and "static" in out:
            rss_lines = [f"### Calibration memory: {RSS_MODEL}", "", "failed: " + (build_error or "model not found (scripts/fetch-models.sh)"), ""]
        if "static" in out:
            out["static"] += rss_lines
    print("\n".join(line for sec in sections for line in out[sec["kind"]]))
    log(f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child-quantize":
        child_quantize(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "child-baseline":
        child_baseline(sys.argv[2] if len(sys.argv) > 2 else "int8")
    else:
        main()
