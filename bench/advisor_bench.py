"""The advisor on real models: for each model, three goals (tight accuracy, tight size, tight
latency) run through the offline CLI (`modelpress compress MODEL --goal ...`, the same code a goal
job's child process runs), then the decision's recipe is re-run as a plain recipe on the same
samples (a fresh measurement) to check that the constraints still hold; and, for "smallest within
the accuracy budget", every single technique with default settings is run too, to compare sizes.
Prints a Markdown section for BENCHMARKS.md on stdout; progress goes to stderr.

    .venv/bin/python bench/advisor_bench.py            the section (bench/run.sh calls this)
    ADVISOR_BENCH_QUICK=1 ...                           digits and PP-OCR cls only

Models without labels are judged on output fidelity (cosine similarity against the original's
outputs) on 40 seeded inputs of the model's real input shape (synthetic text images for the PaddleOCR
models, as in bench/quantize_vs_python.py; uniform noise for NudeNet), written as an .npz dataset so the
advisor calibrates on 8 of them and evaluates on the other 32. The digits classifier uses its
labelled test set and accuracy.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_vs_python as q  # noqa: E402  (its models' input generator)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("MODELPRESS_BIN", ROOT / "target" / "release" / "modelpress"))
MODELS_DIR = Path(os.environ.get("MODELPRESS_MODELS_DIR", ROOT / ".cache" / "models"))
SAMPLES = 40
BUDGET_S = 45
RAPID = "rapidocr/rapidocr_onnxruntime/models/"
# name, path, input shape (None: the digits dataset), input values as in quantize_vs_python.MODELS
MODELS = [
    ("digits MLP", "tests/fixtures/digits/mlp.onnx", None, None),
    ("PP-OCR mobile v2.0 cls", RAPID + "ch_ppocr_mobile_v2.0_cls_infer.onnx", [3, 48, 192], q.TEXT_LINE),
    ("transformer encoder", "tests/fixtures/transformer/encoder.onnx", [16], q.TOKEN_IDS),
    ("PP-OCRv4 rec", RAPID + "ch_PP-OCRv4_rec_infer.onnx", [3, 48, 320], q.TEXT_LINE),
    ("NudeNet 320n (YOLOv8n)", "nudenet/nudenet/320n.onnx", [3, 320, 320], None),
]
SINGLES = [
    ("int8 dynamic", [{"pass": "quantize_int8_dynamic"}]),
    ("int8 static", [{"pass": "quantize_int8_static"}]),
    ("int4 weight-only", [{"pass": "quantize_int4_weight_only"}]),
    ("fp16", [{"pass": "fp16"}]),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def model_path(rel):
    return ROOT / rel if rel.startswith("tests/") else MODELS_DIR / rel


def make_dataset(path, model, shape, values, out):
    """A seeded .npz of SAMPLES inputs of the model's first input (generic task: fidelity only)."""
    import numpy as np
    import onnx

    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    np.savez(out, **{name: q.sample(np.random.default_rng(0), [SAMPLES] + shape, values)})


def run_cli(model, out, dataset, task, goal=None, recipe=None, hold_out=False):
    evaluation = {"task": task, "label_key": "labels", "calibration_fraction": 0.2, "seed": 42,
                  "execution_provider": "cpu", "hold_out_calibration": hold_out}
    cmd = [str(BIN), "compress", str(model), "--out", str(out), "--dataset", str(dataset),
           "--evaluation", json.dumps(evaluation)]
    cmd += ["--goal", json.dumps(goal)] if goal is not None else ["--recipe", json.dumps(recipe)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    report = out / "report.json"
    if not report.exists():
        return None, (p.stderr.strip().splitlines() or ["no report"])[-1]
    return json.loads(report.read_text()), None


def metric_of(report, metric):
    """(original, result) of `metric` in a plain recipe report."""
    if metric == "cosine":
        return 1.0, report["result"]["fidelity"]["cosine_similarity"]
    return report["original"]["metrics"][metric], report["result"]["metrics"][metric]


def goals(task):
    if task == "classification":
        accuracy = {"metric": "accuracy", "absolute": 0.01}
    else:
        accuracy = {"metric": "cosine", "absolute": 0.001}
    return [
        ("tight accuracy (smallest, drop <= %s %s)" % (accuracy["absolute"], accuracy["metric"]),
         {"objective": "smallest", "constraints": {"max_accuracy_drop": accuracy}, "time_budget_s": BUDGET_S}),
        ("tight size (most accurate, <= 30% of the size)",
         {"objective": "most_accurate", "constraints": {"max_size_bytes": None}, "time_budget_s": BUDGET_S}),
        ("tight latency (fastest, same accuracy budget)",
         {"objective": "fastest", "constraints": {"max_accuracy_drop": accuracy}, "time_budget_s": BUDGET_S}),
    ]


def holds(goal, report, original_size):
    """Whether a fresh plain-recipe report meets the goal's size and accuracy constraints (latency is
    re-measured too, but a single run's p50 is only indicative; see the speed-up column)."""
    c = goal["constraints"]
    ok = True
    if c.get("max_size_bytes") is not None:
        ok &= report["result"]["size_bytes"] <= c["max_size_bytes"]
    d = c.get("max_accuracy_drop")
    if d:
        o, r = metric_of(report, d["metric"])
        ok &= (o - r) <= d["absolute"] + 1e-12
    return ok


def main():
    quick = os.environ.get("ADVISOR_BENCH_QUICK") == "1"
    models = MODELS[:2] if quick else MODELS
    rows, single_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, rel, shape, values in models:
            path = model_path(rel)
            if not path.exists():
                log(f"skipping {name}: {path} is missing (run scripts/fetch-models.sh)")
                continue
            if shape is None:
                dataset, task = ROOT / "tests/fixtures/digits/test.npz", "classification"
            else:
                dataset, task = tmp / (path.stem + ".npz"), "generic"
                make_dataset(path, None, shape, values, dataset)
            size = path.stat().st_size
            for gi, (gname, goal) in enumerate(goals(task)):
                if "max_size_bytes" in goal["constraints"]:
                    goal["constraints"]["max_size_bytes"] = int(size * 0.3)
                log(f"{name}: {gname}")
                out = tmp / f"{path.stem}-goal{gi}"
                report, err = run_cli(path, out, dataset, task, goal=goal)
                if report is None:
                    rows.append((name, gname, f"failed: {err}", "", "", "", "", ""))
                    continue
                a = report["advisor"]
                d = a["decision"]
                n = len(a["candidates"])
                if d is None:
                    miss = a["nearest_miss"]
                    rows.append((name, gname, "none (infeasible)", "", "", "",
                                 "nearest miss: %s; %s" % (miss["label"], "; ".join(miss["advice"])) if miss else "",
                                 f"{n} / {a['elapsed_s']:.0f} s"))
                    continue
                c = a["candidates"][d["candidate"]]
                metric = c.get("metric") or {}
                fresh, ferr = run_cli(path, tmp / f"{path.stem}-rerun{gi}", dataset, task,
                                      recipe=d["recipe"], hold_out=True)
                recheck = "error: " + ferr if fresh is None else ("yes" if holds(goal, fresh, size) else "**no**")
                rows.append((name, gname, d["label"], f"{size / c['size_bytes']:.2f}x",
                             f"{c.get('speedup', 0):.2f}x",
                             f"{metric.get('name', '')} {metric.get('original', 0):.4f} -> {metric.get('value', 0):.4f}",
                             recheck, f"{n} / {a['elapsed_s']:.0f} s"))
                if gi == 0:
                    # Every single technique at default settings, under the same accuracy budget.
                    budget = goal["constraints"]["max_accuracy_drop"]
                    best = None
                    for sname, recipe in SINGLES:
                        r, _ = run_cli(path, tmp / f"{path.stem}-single-{sname}", dataset, task,
                                       recipe=recipe, hold_out=True)
                        if r is None:
                            continue
                        o, v = metric_of(r, budget["metric"])
                        if o - v <= budget["absolute"] and (best is None or r["result"]["size_bytes"] < best[1]):
                            best = (sname, r["result"]["size_bytes"])
                    single_rows.append((name, d["label"], c["size_bytes"],
                                        f"{best[0]} ({best[1]} B)" if best else "none within budget",
                                        "yes" if best is None or c["size_bytes"] <= best[1] else "**no**"))
    print("## Advisor: one decision per goal, on real models\n")
    print("`bench/advisor_bench.py`: each goal runs through `modelpress compress MODEL --goal ...` (what a goal job's")
    print(f"process runs) with a {BUDGET_S} s budget; models without labels are judged on cosine similarity to the")
    print(f"original's outputs on {SAMPLES} seeded inputs (8 calibrate, 32 evaluate). *Holds* re-runs the decision's")
    print("recipe as a plain recipe on the same evaluation samples (`hold_out_calibration`) and checks the size and")
    print("accuracy constraints again; speed-ups are paired p50 ratios at one thread.\n")
    print("| model | goal | decision | smaller | faster | metric | holds on re-run | candidates / time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print("\n### Smallest within the accuracy budget vs the best single technique at default settings\n")
    print("| model | advisor's choice | its size (B) | best single technique within budget | advisor no larger |")
    print("|---|---|---|---|---|")
    for r in single_rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print()


if __name__ == "__main__":
    main()
