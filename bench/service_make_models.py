"""Builds the valid models bench/service_bench.sh uploads.

    service_make_models.py bundle OUT.tar MEGABYTES   # .tar: model.onnx + w.bin (external data)
    service_make_models.py single OUT.onnx MEGABYTES  # one .onnx, the weight inline

Each model is one MatMul, Y = X @ W, with X [1, n] and W [n, n] float32 filled with random normals,
n = floor(sqrt(MEGABYTES * 1e6 / 4)), so the weight is just under MEGABYTES (decimal) megabytes.
Prints the size in bytes of what it wrote.
"""

import math
import os
import sys
import tarfile
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def matmul_model(megabytes: float) -> onnx.ModelProto:
    n = int(math.sqrt(megabytes * 1e6 / 4))
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "svcbench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    del weight
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    kind, out, megabytes = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = matmul_model(megabytes)
    if kind == "single":
        onnx.save_model(model, out)
    elif kind == "bundle":
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
            onnx_path = os.path.join(tmp, "model.onnx")
            onnx.save_model(
                model,
                onnx_path,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location="w.bin",
            )
            del model
            with tarfile.open(out, "w") as tar:
                tar.add(onnx_path, arcname="model.onnx")
                tar.add(os.path.join(tmp, "w.bin"), arcname="w.bin")
    else:
        sys.exit(f"unknown kind {kind!r}: bundle or single")
    print(os.path.getsize(out))


if __name__ == "__main__":
    main()
