"""The Python side of examples/onnx_bench.rs: times onnx's parse and serialize of one model.

    onnx_vs_python.py baseline            import onnx and exit (the interpreter's own peak RSS)
    onnx_vs_python.py run MODEL RUNS      parse + serialize MODEL RUNS times after one warm-up run

Prints one JSON line; the warm-up run is reported apart, as first_ms. The file is read once, outside
the timings, as the Rust side does: parse is `onnx.load_model_from_string` (what `onnx.load` does
after reading the file; these models have no external data), serialize is
`ModelProto.SerializeToString` (what `onnx.save` writes).
The parent measures the peak RSS (wait4) and checks it against the VmHWM reported here.
"""

import json
import sys
import time

import google.protobuf
import onnx
from google.protobuf.internal import api_implementation


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    info = {
        "onnx": onnx.__version__,
        "protobuf": google.protobuf.__version__,
        "protobuf_backend": api_implementation.Type(),
        "python": sys.version.split()[0],
    }
    if sys.argv[1] == "baseline":
        print(json.dumps({**info, "vm_hwm_kib": vm_hwm_kib()}))
        return
    _, _, path, runs = sys.argv
    with open(path, "rb") as f:
        data = f.read()
    parse_ms, serialize_ms = [], []
    identical = True
    first_ms = 0.0
    for i in range(int(runs) + 1):
        t0 = time.perf_counter()
        model = onnx.load_model_from_string(data)
        t1 = time.perf_counter()
        out = model.SerializeToString()
        t2 = time.perf_counter()
        identical = identical and out == data
        del model, out
        if i == 0:  # the warm-up run, reported apart
            first_ms = (t2 - t0) * 1e3
        else:
            parse_ms.append((t1 - t0) * 1e3)
            serialize_ms.append((t2 - t1) * 1e3)
    report = {
        "parse_ms": parse_ms,
        "serialize_ms": serialize_ms,
        "first_ms": first_ms,
        "identical": identical,
        "vm_hwm_kib": vm_hwm_kib(),
    }
    print(json.dumps({**info, **report}))


if __name__ == "__main__":
    main()
