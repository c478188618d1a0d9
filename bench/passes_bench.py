"""The parameter-removing passes (`prune_unstructured`, `low_rank`, `cluster_weights`,
`prune_structured`, the last two also followed by `reconstruct`) at two or three
strengths on the digits classifier, the transformer encoder and the PP-OCR cls/rec models, against
the fp32 original: size, zstd size, MACs, fidelity (cosine, top-1 agreement), digits accuracy and
CPU latency. Prints a Markdown section for BENCHMARKS.md on stdout (progress on stderr).

    .venv/bin/python bench/passes_bench.py              the section (bench/run.sh calls this)
    PASSES_BENCH_QUICK=1 .venv/bin/python bench/passes_bench.py   one strength per pass, fewer timed runs

Every result comes from ModelPress's own `compress` (the release binary, or MODELPRESS_BIN), and
is measured here by one harness (bench/quantize_vs_python.py's `evaluate`): onnxruntime with one
intra-op thread on the same seeded inputs for every row, timed runs interleaved across rows.
MACs are those of MatMul, Gemm and Conv per sample (batch 1), from `onnx.shape_inference` with the
benchmark's input shape; a MatMul fed by two activations (attention) counts too.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_vs_python as q  # noqa: E402

QUICK = os.environ.get("PASSES_BENCH_QUICK") == "1"
BIN = Path(os.environ.get("MODELPRESS_BIN", str(q.BIN)))

# (label, recipe); in quick mode the first of each pass only.
CONFIGS = [
    ("prune 50% per layer", [{"pass": "prune_unstructured", "sparsity": 0.5}]),
    ("prune 2:4", [{"pass": "prune_unstructured", "pattern": "2:4"}]),
    ("prune 80% global", [{"pass": "prune_unstructured", "sparsity": 0.8, "scope": "global"}]),
    ("low-rank energy 0.95", [{"pass": "low_rank", "energy": 0.95}]),
    ("low-rank rank_ratio 0.5", [{"pass": "low_rank", "rank_ratio": 0.5}]),
    ("low-rank rank_ratio 0.25", [{"pass": "low_rank", "rank_ratio": 0.25}]),
    ("cluster 4 bits", [{"pass": "cluster_weights", "bits": 4}]),
    ("cluster 8 bits", [{"pass": "cluster_weights", "bits": 8}]),
    ("cluster 2 bits", [{"pass": "cluster_weights", "bits": 2}]),
    ("structured 30%", [{"pass": "prune_structured", "ratio": 0.3}]),
    ("structured 30% + reconstruct", [{"pass": "prune_structured", "ratio": 0.3}, {"pass": "reconstruct"}]),
    ("structured 50% + reconstruct", [{"pass": "prune_structured", "ratio": 0.5}, {"pass": "reconstruct"}]),
    ("low-rank rank_ratio 0.5 + reconstruct", [{"pass": "low_rank", "rank_ratio": 0.5}, {"pass": "reconstruct"}]),
]
QUICK_CONFIGS = {"prune 50% per layer", "low-rank rank_ratio 0.5", "cluster 4 bits", "structured 30% + reconstruct"}

MODELS = [m for m in q.MODELS if m[0] in {"digits MLP", "transformer encoder", "PP-OCR mobile v2.0 cls", "PP-OCRv4 rec"}]


def macs(model, shape, values) -> tuple:
    """(MACs of MatMul/Gemm/Conv for one sample, nodes whose shapes ONNX's shape inference could not
    derive and which are therefore not counted)."""
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    feed = [i for i in m.graph.input if i.name not in inits]
    for d, v in zip(feed[0].type.tensor_type.shape.dim, shape or [1, 64]):
        d.Clear()
        d.dim_value = v
    m = shape_inference.infer_shapes(m, data_prop=True)
    dims = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for t in m.graph.initializer:
        dims[t.name] = list(t.dims)
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    dims[n.output[0]] = list(a.t.dims)

    def prod(xs):
        p = 1
        for x in xs:
            p *= x
        return p

    total, uncounted = 0, 0
    for n in m.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv") or len(n.input) < 2:
            continue
        out, a, w = dims.get(n.output[0]), dims.get(n.input[0]), dims.get(n.input[1])
        if not out or None in out or not a or None in a:
            uncounted += 1
            continue
        if n.op_type == "MatMul":
            total += prod(out) * a[-1]
        elif n.op_type == "Gemm":
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            total += prod(out) * (a[0] if trans_a else a[1])
        elif n.op_type == "Conv" and w and None not in w:
            total += prod(out) * prod(w[1:])
    return total, uncounted


def main() -> None:
    env = dict(os.environ)
    if not env.get("ORT_DYLIB_PATH"):
        env["ORT_DYLIB_PATH"] = subprocess.run([str(q.ROOT / "scripts/ort-dylib.sh")], capture_output=True, text=True).stdout.strip()
    if "MODELPRESS_BIN" not in os.environ:
        q.log("cargo build --release --bin modelpress")
        subprocess.run(["cargo", "build", "--release", "--bin", "modelpress"], cwd=q.ROOT, check=True)
    q.BIN = BIN
    if QUICK:
        q.RUNS = 20
    configs = [c for c in CONFIGS if not QUICK or c[0] in QUICK_CONFIGS]
    mdir = q.models_dir()
    lines = [
        "## Pruning, low-rank factorization and weight clustering",
        "",
        "Each pass at " + ("one strength (quick mode)" if QUICK else "three strengths")
        + " against the fp32 original, measured by one harness (onnxruntime, one intra-op thread, timed runs "
        "interleaved across rows). *zstd*: the model compressed with zstd level 3, what `model.onnx.zst` "
        "weighs (pruning and clustering ship it). *MACs*: MatMul/Gemm/Conv multiply-accumulates per sample from "
        "`onnx.shape_inference`; nodes whose shapes it cannot derive are not counted, and their number is shown. Pruning zeroes values but keeps dense tensors: no fewer MACs and no speed-up "
        "on CPU (ONNX Runtime has no sparse kernels for these ops); the gain is in the zstd size. Clustering "
        "stores uint8 indices (about 4x smaller whatever the bits) that ONNX Runtime expands at session load. "
        "Low-rank changes MACs, and latency with them. Structured pruning removes whole units: fewer MACs and "
        "less time. `reconstruct` re-fits on the job's calibration split (108 of the 540 digits samples; seeded "
        "synthetic inputs for the other models); the harness scores all 540, those 108 included.",
        "",
    ]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mp-passes-bench-") as tmp:
        tmp = Path(tmp)
        for name, rel, shape, values in MODELS:
            path = q.ROOT / rel if q.in_repo(rel) else mdir / rel
            shown = rel if q.in_repo(rel) else f"$MODELPRESS_MODELS_DIR/{rel}"
            lines += [f"### {name}", ""]
            if not path.exists():
                lines += [f"`{shown}` is missing (scripts/fetch-models.sh fetches it).", ""]
                continue
            feeds, labels, latency_feed, desc = q.inputs_for(path, shape, values)
            extra = ()
            if labels is not None:
                extra = ("--dataset", str(q.ROOT / "tests/fixtures/digits/test.npz"), "--task", "classification")
            rows = {"fp32": {"path": path}}
            notes = {}
            for label, recipe in configs:
                q.log(f"{name}: {label}")
                out_dir = tmp / f"{len(rows)}"
                r = q.ours(path, recipe, out_dir, env, extra, evaluate=True)
                rows[label] = r
                if "error" not in r:
                    report = json.loads((out_dir / "report.json").read_text())
                    notes[label] = report["passes"][0]["notes"][0]
                    # zstd level 3, what the service reports as compressed_size_bytes (and
                    # model.onnx.zst weighs); the original's is the same in every report.
                    r["zstd"] = report["result"]["compressed_size_bytes"]
                    rows["fp32"]["zstd"] = report["original"]["compressed_size_bytes"]
            q.evaluate(rows, feeds, labels, latency_feed, lambda m: macs(m, shape, values))
            lines += [f"`{shown}`; inputs: {desc}.", ""]
            head = ["", "size bytes", "zstd bytes", "MACs", "p50 ms", "p50 ÷ fp32", "cosine", "top-1 agreement"]
            if labels is not None:
                head.append("accuracy")
            head.append("checker")
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            base = rows["fp32"]
            for label, row in rows.items():
                if "size" not in row:
                    word = "refused" if row.get("refused") else "failed"
                    lines.append("| " + " | ".join([label, f"{word}: {row.get('error')}"] + [""] * (len(head) - 2)) + " |")
                    continue
                cells = [
                    "fp32 original" if label == "fp32" else label,
                    f"{row['size']:,}",
                    q.fmt(row.get("zstd"), ","),
                    "–" if row.get("count") is None
                    else f"{row['count'][0]:,}" + (f" (+{row['count'][1]} uncounted)" if row["count"][1] else ""),
                    q.fmt(row.get("p50"), ".3f"),
                    f"{row['p50'] / base['p50']:.2f}x" if row.get("p50") and base.get("p50") else "–",
                    q.fmt(row.get("cosine"), ".6f"),
                    q.fmt(row.get("top1"), ".4f"),
                ]
                if labels is not None:
                    cells.append(q.fmt(row.get("accuracy"), ".4f"))
                cells.append(row.get("checker", "–"))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            for label, note in notes.items():
                lines.append(f"- {label}: {note}")
            lines.append("")
    lines.append(f"({time.perf_counter() - t0:.0f} s for this section.)")
    lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
