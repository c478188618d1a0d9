#!/usr/bin/env python3
"""Builds the small BERT-style transformer encoder fixture (tests/fixtures/transformer/encoder.onnx).

The graph is written by hand with onnx.helper (no torch), opset 17, IR 8, with random weights
(NumPy seed 0, normal * 0.05, float32 raw data):

  input_ids int64 [batch, sequence]
    -> token embedding Gather [256, 64] + position embedding [32, 64] sliced to the sequence length
       (Shape -> Slice)
    -> 2 x [ multi-head self-attention (4 heads of 16; Q/K/V/O MatMul [64, 64] + Add bias,
             Reshape/Transpose to heads, Q.K^T MatMul, Mul by 1/sqrt(16), Softmax(-1), MatMul with V,
             Transpose/Reshape back) + residual + LayerNormalization(-1, eps 1e-5)
           + FFN (MatMul [64, 256] + bias, Gelu as x*0.5*(1+Erf(x/sqrt(2))), MatMul [256, 64] + bias)
             + residual + LayerNormalization ]
    -> hidden float32 [batch, sequence, 64]
    -> first token (Gather index 0 on axis 1) MatMul [64, 8] + bias -> logits float32 [batch, 8]

It is the transformer-style model of the MatMul quantization passes (int8 dynamic/static, int4
weight-only) and fp16. The script checks the model with onnx.checker (full_check) and runs it in
onnxruntime on input_ids [2, 16] before writing. Deterministic: rerunning gives a byte-identical file.

Usage: .venv/bin/python scripts/make-transformer-fixture.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "transformer"
OUT = OUT_DIR / "encoder.onnx"

VOCAB = 256
MAX_LEN = 32
HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
FFN = 256
LAYERS = 2
CLASSES = 8
EPS = 1e-5
OPSET = 17
IR_VERSION = 8
SEED = 0
STD = 0.05
MAX_BYTES = 1 << 20


class Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, shape, base: float = 0.0) -> str:
        arr = (base + self.rng.standard_normal(shape) * STD).astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> str | list[str]:
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def linear(self, x: str, prefix: str, k: int, n: int) -> str:
        w = self.weight(f"{prefix}.weight", (k, n))
        b = self.weight(f"{prefix}.bias", (n,))
        y = self.node("MatMul", [x, w], f"{prefix}/MatMul")
        return self.node("Add", [y, b], f"{prefix}/Add")

    def layer_norm(self, x: str, prefix: str) -> str:
        g = self.weight(f"{prefix}.weight", (HIDDEN,), base=1.0)
        b = self.weight(f"{prefix}.bias", (HIDDEN,))
        return self.node("LayerNormalization", [x, g, b], f"{prefix}/LayerNormalization", axis=-1, epsilon=EPS)


def build() -> onnx.ModelProto:
    m = Builder(SEED)
    heads_shape = m.const("shape.heads", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    merged_shape = m.const("shape.hidden", np.array([0, 0, HIDDEN], np.int64))
    scale = m.const("attention.scale", np.array(1.0 / math.sqrt(HEAD_DIM), np.float32))
    inv_sqrt2 = m.const("gelu.inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    half = m.const("gelu.half", np.array(0.5, np.float32))
    one = m.const("gelu.one", np.array(1.0, np.float32))
    zero_1d = m.const("slice.starts", np.array([0], np.int64))
    axis0_1d = m.const("slice.axes", np.array([0], np.int64))
    first = m.const("first_token.index", np.array(0, np.int64))

    # Embeddings: token Gather + the position table sliced to the sequence length.
    tok_table = m.weight("embeddings.token", (VOCAB, HIDDEN))
    pos_table = m.weight("embeddings.position", (MAX_LEN, HIDDEN))
    tok = m.node("Gather", [tok_table, "input_ids"], "embeddings/token/Gather", axis=0)
    seq_len = m.node("Shape", ["input_ids"], "embeddings/Shape", start=1, end=2)
    pos = m.node("Slice", [pos_table, zero_1d, seq_len, axis0_1d], "embeddings/position/Slice")
    x = m.node("Add", [tok, pos], "embeddings/Add")

    for layer in range(LAYERS):
        p = f"layer{layer}"

        def to_heads(t: str, name: str, perm: list[int]) -> str:
            r = m.node("Reshape", [t, heads_shape], f"{p}/attention/{name}/Reshape")
            return m.node("Transpose", [r], f"{p}/attention/{name}/Transpose", perm=perm)

        q = to_heads(m.linear(x, f"{p}.attention.query", HIDDEN, HIDDEN), "query", [0, 2, 1, 3])  # [B, H, S, D]
        k = to_heads(m.linear(x, f"{p}.attention.key", HIDDEN, HIDDEN), "key", [0, 2, 3, 1])  # [B, H, D, S]
        v = to_heads(m.linear(x, f"{p}.attention.value", HIDDEN, HIDDEN), "value", [0, 2, 1, 3])  # [B, H, S, D]
        scores = m.node("MatMul", [q, k], f"{p}/attention/scores/MatMul")
        scores = m.node("Mul", [scores, scale], f"{p}/attention/scores/Mul")
        probs = m.node("Softmax", [scores], f"{p}/attention/Softmax", axis=-1)
        ctx = m.node("MatMul", [probs, v], f"{p}/attention/context/MatMul")
        ctx = m.node("Transpose", [ctx], f"{p}/attention/context/Transpose", perm=[0, 2, 1, 3])
        ctx = m.node("Reshape", [ctx, merged_shape], f"{p}/attention/context/Reshape")
        attn = m.linear(ctx, f"{p}.attention.output", HIDDEN, HIDDEN)
        x = m.layer_norm(m.node("Add", [x, attn], f"{p}/attention/residual/Add"), f"{p}.attention.norm")

        h = m.linear(x, f"{p}.ffn.up", HIDDEN, FFN)
        e = m.node("Mul", [h, inv_sqrt2], f"{p}/ffn/gelu/Mul_inv_sqrt2")
        e = m.node("Erf", [e], f"{p}/ffn/gelu/Erf")
        e = m.node("Add", [e, one], f"{p}/ffn/gelu/Add_one")
        e = m.node("Mul", [e, half], f"{p}/ffn/gelu/Mul_half")
        h = m.node("Mul", [h, e], f"{p}/ffn/gelu/Mul")
        h = m.linear(h, f"{p}.ffn.down", FFN, HIDDEN)
        x = m.layer_norm(m.node("Add", [x, h], f"{p}/ffn/residual/Add"), f"{p}.ffn.norm")

    m.nodes.append(helper.make_node("Identity", [x], ["hidden"], name="hidden/Identity"))
    cls = m.node("Gather", ["hidden", first], "classifier/first_token/Gather", axis=1)  # [B, 64]
    logits = m.linear(cls, "classifier", HIDDEN, CLASSES)
    m.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits/Identity"))

    graph = helper.make_graph(
        m.nodes,
        "transformer_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
        ],
        m.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="modelpress-fixture",
        producer_version="1",
        doc_string="BERT-style encoder, 2 layers, hidden 64, 4 heads, random weights (seed 0): a test fixture",
    )
    model.ir_version = IR_VERSION
    return model


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(SEED).integers(0, VOCAB, size=(2, 16), dtype=np.int64)
    hidden, logits = sess.run(["hidden", "logits"], {"input_ids": ids})
    assert hidden.shape == (2, 16, HIDDEN) and hidden.dtype == np.float32, (hidden.shape, hidden.dtype)
    assert logits.shape == (2, CLASSES) and logits.dtype == np.float32, (logits.shape, logits.dtype)
    assert np.isfinite(hidden).all() and np.isfinite(logits).all(), "non-finite outputs"
    # the first token's hidden state feeds the classifier
    assert np.allclose(logits, hidden[:, 0] @ numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "classifier.weight")
    ) + numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "classifier.bias")), atol=1e-5)
    # a shorter sequence works too (the position table is sliced to it)
    short_hidden = sess.run(["hidden"], {"input_ids": ids[:1, :5]})[0]
    assert short_hidden.shape == (1, 5, HIDDEN) and np.isfinite(short_hidden).all()


def main() -> None:
    model = build()
    check(model)
    data = model.SerializeToString()
    assert len(data) < MAX_BYTES, f"{len(data)} bytes, over {MAX_BYTES}"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(data)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(data)} bytes, {params} float parameters, {len(model.graph.node)} nodes")


if __name__ == "__main__":
    main()
