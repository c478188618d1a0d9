#!/usr/bin/env python3
"""Builds the digits MLP fixture used by the Rust integration tests.

Trains a small scikit-learn MLP on the bundled 8x8 `digits` dataset (no download), exports it to
ONNX by hand with onnx.helper (no skl2onnx), and writes into tests/fixtures/digits/:

  mlp.onnx       input `input` float32 [batch, 64] -> output `logits` float32 [batch, 10]
  test.npz       uncompressed np.savez: `input` float32 [N, 64], `labels` int64 [N]
  expected.json  reference metrics of mlp.onnx on test.npz, computed with onnxruntime (CPU)

Deterministic (fixed seeds, fixed zip timestamps); rerunning gives byte-identical files on the same
platform and library versions.

Usage: .venv/bin/python scripts/make-digits-fixture.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Single-threaded BLAS so training is reproducible bit for bit on this machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "digits"
NUM_CLASSES = 10
NUM_FEATURES = 64
OPSET = 17
IR_VERSION = 8


def load_data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    assert x.shape == (1797, NUM_FEATURES), x.shape
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)


def train(x_train, y_train) -> MLPClassifier:
    clf = MLPClassifier(hidden_layer_sizes=(32,), activation="relu", max_iter=500, random_state=0)
    clf.fit(x_train, y_train)
    assert list(clf.classes_) == list(range(NUM_CLASSES)), clf.classes_
    assert clf.out_activation_ == "softmax", clf.out_activation_
    return clf


def export_onnx(clf: MLPClassifier) -> onnx.ModelProto:
    w0, w1 = (np.ascontiguousarray(w, dtype=np.float32) for w in clf.coefs_)
    b0, b1 = (np.ascontiguousarray(b, dtype=np.float32) for b in clf.intercepts_)
    hidden = w0.shape[1]
    assert w0.shape == (NUM_FEATURES, hidden) and w1.shape == (hidden, NUM_CLASSES)

    # numpy_helper.from_array stores float32 tensors as raw_data (little-endian bytes).
    initializers = [
        numpy_helper.from_array(w0, name="fc1.weight"),
        numpy_helper.from_array(b0, name="fc1.bias"),
        numpy_helper.from_array(w1, name="fc2.weight"),
        numpy_helper.from_array(b1, name="fc2.bias"),
    ]
    for init in initializers:
        assert init.data_type == TensorProto.FLOAT and init.raw_data and not init.float_data

    nodes = [
        helper.make_node("MatMul", ["input", "fc1.weight"], ["fc1.matmul"], name="fc1_matmul"),
        helper.make_node("Add", ["fc1.matmul", "fc1.bias"], ["fc1.out"], name="fc1_add"),
        helper.make_node("Relu", ["fc1.out"], ["relu.out"], name="relu"),
        helper.make_node("MatMul", ["relu.out", "fc2.weight"], ["fc2.matmul"], name="fc2_matmul"),
        helper.make_node("Add", ["fc2.matmul", "fc2.bias"], ["logits"], name="fc2_add"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", NUM_FEATURES])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="modelpress-fixture",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    model.doc_string = (
        "scikit-learn MLPClassifier(hidden_layer_sizes=(32,), relu) on sklearn digits (8x8, X/16); "
        "outputs raw class scores, argmax is the prediction"
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def metrics(labels: np.ndarray, preds: np.ndarray) -> dict:
    per_class_precision, per_class_recall, per_class_f1 = [], [], []
    for c in range(NUM_CLASSES):
        tp = int(np.sum((preds == c) & (labels == c)))
        fp = int(np.sum((preds == c) & (labels != c)))
        fn = int(np.sum((preds != c) & (labels == c)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class_precision.append(p)
        per_class_recall.append(r)
        per_class_f1.append(f)
    # Single-label multiclass: micro P = micro R = micro F1 = accuracy.
    accuracy = float(np.mean(preds == labels))
    return {
        "accuracy": accuracy,
        "precision_macro": float(np.mean(per_class_precision)),
        "recall_macro": float(np.mean(per_class_recall)),
        "f1_macro": float(np.mean(per_class_f1)),
        "f1_micro": accuracy,
        "f1_per_class": [float(f) for f in per_class_f1],
    }


def main() -> int:
    x_train, x_test, y_train, y_test = load_data()
    clf = train(x_train, y_train)
    model = export_onnx(clf)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    onnx_path = OUT_DIR / "mlp.onnx"
    npz_path = OUT_DIR / "test.npz"
    json_path = OUT_DIR / "expected.json"

    onnx_path.write_bytes(model.SerializeToString(deterministic=True))
    x_test = np.ascontiguousarray(x_test, dtype=np.float32)
    y_test = np.ascontiguousarray(y_test, dtype=np.int64)
    # Uncompressed; zip entry timestamps are the fixed 1980-01-01 default, so the bytes are stable.
    np.savez(npz_path, input=x_test, labels=y_test)

    # Reload everything from disk so the figures describe the files actually written.
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    with np.load(npz_path, allow_pickle=False) as data:
        xs, labels = data["input"], data["labels"]
    assert xs.dtype == np.float32 and xs.shape == (len(y_test), NUM_FEATURES)
    assert labels.dtype == np.int64 and labels.shape == (len(y_test),)

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": xs})
    assert logits.shape == (len(labels), NUM_CLASSES) and logits.dtype == np.float32
    preds = np.argmax(logits, axis=1).astype(np.int64)

    sk_preds = clf.predict(xs)
    mismatches = int(np.sum(preds != sk_preds))
    assert mismatches == 0, f"ONNX and sklearn predictions differ on {mismatches} samples"
    # Logits agree with sklearn's pre-softmax scores up to float32 rounding.
    sk_probs = clf.predict_proba(xs)
    ort_probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    ort_probs /= ort_probs.sum(axis=1, keepdims=True)
    max_prob_diff = float(np.max(np.abs(ort_probs - sk_probs)))
    assert max_prob_diff < 1e-4, max_prob_diff

    m = metrics(labels, preds)
    # Cross-check the hand-written metrics against sklearn.metrics.
    from sklearn import metrics as skm

    assert np.isclose(m["accuracy"], skm.accuracy_score(labels, preds))
    assert np.isclose(m["precision_macro"], skm.precision_score(labels, preds, average="macro"))
    assert np.isclose(m["recall_macro"], skm.recall_score(labels, preds, average="macro"))
    assert np.isclose(m["f1_macro"], skm.f1_score(labels, preds, average="macro"))
    assert np.isclose(m["f1_micro"], skm.f1_score(labels, preds, average="micro"))
    assert np.allclose(m["f1_per_class"], skm.f1_score(labels, preds, average=None))

    expected = {
        "samples": int(len(labels)),
        "accuracy": m["accuracy"],
        "precision_macro": m["precision_macro"],
        "recall_macro": m["recall_macro"],
        "f1_macro": m["f1_macro"],
        "f1_micro": m["f1_micro"],
        "classes": NUM_CLASSES,
        "sklearn_accuracy": float(clf.score(xs, labels)),
        "f1_per_class": m["f1_per_class"],
    }
    json_path.write_text(json.dumps(expected, indent=2) + "\n")

    print(json.dumps(expected, indent=2))
    print(
        f"train samples={len(y_train)} iterations={clf.n_iter_} "
        f"onnx-vs-sklearn max |prob diff|={max_prob_diff:.2e}",
        file=sys.stderr,
    )
    for path in (onnx_path, npz_path, json_path):
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
