#!/usr/bin/env python3
"""Writes the hostile-input corpus that tests/hostile.rs sends through the API.

Usage: make-hostile-corpus.py OUT_DIR

Each case is one request body (a file in OUT_DIR) and one line of OUT_DIR/manifest.json saying
where it goes and what the API must answer: {name, method, path, content_type, file, headers,
status, code}. The files are built with the reference tools (the `onnx` package, numpy, zipfile,
tarfile) so they are what an attacker would really produce, then broken on purpose. The test runs
the script each time (about a second), so the corpus and the script cannot drift apart.

The service under test must use limits.max_model_bytes and limits.max_dataset_bytes of 4 MiB (the
zip bombs expand to 64 MiB).
"""

import io
import json
import os
import sys
import tarfile
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIMIT = 4 * 1024 * 1024
cases = []


def case(name, body, *, path, status, code, content_type="application/octet-stream", method="POST", headers=None):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(body)
    cases.append(
        {
            "name": name,
            "method": method,
            "path": path,
            "content_type": content_type,
            "file": name,
            "headers": headers or {},
            "status": status,
            "code": code,
        }
    )


def model(code):
    return dict(path="/v1/models", status=400, code=code)


def dataset():
    return dict(path="/v1/datasets", status=400, code="invalid_dataset")


def job(status, code):
    return dict(path="/v1/jobs", status=status, code=code, content_type="application/json")


# ---------- ONNX models ----------
def mlp(weight=None, domain=""):
    """y = x @ W + b on a [1, 4] input; `weight` replaces W's TensorProto."""
    w = weight or numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "B")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm", domain=domain),
        helper.make_node("Add", ["h", "B"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w, b],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def float_tensor(name, dims, raw=b""):
    """A float tensor as declared, whatever its data says (helper.make_tensor checks; we must not)."""
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    if raw:
        t.raw_data = raw
    return t


def external_weight(location, offset=0, length=48):
    t = float_tensor("W", [4, 3])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


def nested_if(depth):
    """A model whose If node holds an If node that holds ... `depth` levels of subgraphs. Encoded
    by hand: the protobuf runtime refuses to build messages this deep, but an attacker's bytes are
    not built with it."""

    def varint(n):
        out = b""
        while True:
            byte = n & 0x7F
            n >>= 7
            if n:
                out += bytes([byte | 0x80])
            else:
                return out + bytes([byte])

    def field(number, payload):  # length-delimited
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    output = field(1, b"y")  # ValueInfoProto.name
    graph = field(12, output)  # a graph with only an output
    for level in range(depth):
        attribute = field(1, b"then_branch") + varint(20 << 3) + varint(5) + field(6, graph)
        node = field(1, b"c") + field(2, b"y") + field(4, b"If") + field(5, attribute)
        graph = field(1, node) + field(12, output)
    opset = varint(2 << 3) + varint(17)
    return varint(1 << 3) + varint(8) + field(7, graph) + field(8, opset)


def tar_of(files, symlink=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)
    return buf.getvalue()


def multipart(parts, boundary="hostileboundary"):
    out = b""
    for field, filename, data in parts:
        out += (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"".encode()
            + filename
            + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def main():
    good = mlp().SerializeToString()
    case("not_onnx.bin", b"This is a README, not a model.\n" * 20, **model("invalid_model"))
    case("elf_header.bin", b"\x7fELF\x02\x01\x01" + bytes(200), **model("invalid_model"))
    case("truncated.onnx", good[: len(good) // 2], **model("invalid_model"))
    # Deeper than the service's subgraph limit (32), and far deeper than any decoder's stack.
    case("nested_subgraphs_40.onnx", nested_if(40), **model("invalid_model"))
    case("nested_subgraphs_2000.onnx", nested_if(2000), **model("invalid_model"))
    short = float_tensor("W", [4, 3], b"\0" * 8)
    case("size_disagrees_with_data.onnx", mlp(short).SerializeToString(), **model("invalid_model"))
    huge = float_tensor("W", [1 << 31, 1 << 31], b"\0" * 4)
    case("huge_declared_shape.onnx", mlp(huge).SerializeToString(), **model("invalid_model"))
    for name, location in (
        ("external_absolute.onnx", "/etc/passwd"),
        ("external_dotdot.onnx", "../../../../etc/passwd"),
        ("external_ort_memory_marker.onnx", "*/_ORT_MEM_ADDR_/*"),
    ):
        offset = 140737488355328 if "ORT" in name else 0
        case(name, mlp(external_weight(location, offset)).SerializeToString(), **model("invalid_model"))
    pointing = mlp(external_weight("w.bin")).SerializeToString()
    case(
        "external_symlink.tar",
        tar_of([("model.onnx", pointing)], symlink=("w.bin", "/etc/passwd")),
        content_type="application/x-tar",
        **model("invalid_model"),
    )
    case(
        "external_past_eof.tar",
        tar_of([("model.onnx", mlp(external_weight("w.bin", offset=32)).SerializeToString()), ("w.bin", bytes(48))]),
        content_type="application/x-tar",
        **model("invalid_model"),
    )
    case("custom_op_domain.onnx", mlp(domain="com.evil.ops").SerializeToString(), **model("invalid_model"))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.onnx", good)
        z.writestr("w.bin", bytes(16 * LIMIT))
    case("bundle_zip_bomb.zip", bomb.getvalue(), content_type="application/zip", **model("invalid_model"))
    body, ctype = multipart([("file", b"m.onnx", good), ("data", b"../escape.bin", bytes(48))])
    case("multipart_filename_dotdot.bin", body, content_type=ctype, **model("invalid_model"))
    body, ctype = multipart([("file", b"m.onnx", good), ("data", b"/etc/cron.d/x", bytes(48))])
    case("multipart_filename_absolute.bin", body, content_type=ctype, **model("invalid_model"))
    body, ctype = multipart([("file", b"m.onnx", good), ("data", b"w\\u0000.bin", bytes(48)), ("data", b"a\x00b", bytes(48))])
    case("multipart_filename_nul.bin", body, content_type=ctype, **model("invalid_model"))

    # ---------- .npz datasets ----------
    def npz(members, compression=zipfile.ZIP_STORED):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression) as z:
            for name, data in members:
                z.writestr(name, data)
        return buf.getvalue()

    def npy(array, **kw):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, array, **kw)
        return buf.getvalue()

    pickled = npy(np.array([{"__reduce__": "os.system"}, None], dtype=object), allow_pickle=True)
    case("pickled_objects.npz", npz([("x.npy", pickled)]), **dataset())
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), " + " " * 12000 + "}\n"
    long_header = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode() + bytes(16)
    case("header_past_10000_bytes.npz", npz([("x.npy", long_header)]), **dataset())
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000,), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    mismatch = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(16)
    case("shape_times_itemsize_not_payload.npz", npz([("x.npy", mismatch)]), **dataset())
    zeros = npy(np.zeros(16 * LIMIT // 4, np.float32))
    case("zip_bomb.npz", npz([("x.npy", zeros)], zipfile.ZIP_DEFLATED), **dataset())
    one = npy(np.zeros(1, np.float32))
    case("thousands_of_members.npz", npz([(f"a{i}.npy", one) for i in range(3000)], zipfile.ZIP_DEFLATED), **dataset())
    case("not_a_zip.npz", b"PK\x03\x04" + bytes(100), **dataset())

    # ---------- JSON bodies ----------
    some_id = "00000000-0000-4000-8000-000000000000"
    recipe = [{"pass": "optimize"}]
    case("wrong_types.json", json.dumps({"model_id": 5, "recipe": "optimize"}).encode(), **job(400, "invalid_json"))
    case(
        "unknown_field.json",
        json.dumps({"model_id": some_id, "recipe": recipe, "run_as_root": True}).encode(),
        **job(400, "invalid_json"),
    )
    case("not_json.json", b"{\"model_id\": ", **job(400, "invalid_json"))
    case("deeply_nested.json", b"[" * 100000 + b"]" * 100000, **job(400, "invalid_json"))
    case(
        "huge_string_over_the_body_limit.json",
        json.dumps({"model_id": some_id, "recipe": [{"pass": "x" * (2 << 20)}]}).encode(),
        **job(413, "payload_too_large"),
    )
    case(
        "huge_string_in_a_recipe.json",
        json.dumps({"model_id": some_id, "recipe": [{"pass": "x" * 500000}]}).encode(),
        **job(400, "invalid_recipe"),
    )
    case(
        "huge_execution_provider.json",
        json.dumps({"model_id": some_id, "recipe": recipe, "execution_provider": "k" * 500000}).encode(),
        **job(400, "invalid_request"),
    )
    case(
        "webhook_to_cloud_metadata.json",
        json.dumps({"model_id": some_id, "recipe": recipe, "webhook_url": "http://169.254.169.254/latest/meta-data/"}).encode(),
        **job(422, "invalid_webhook_url"),
    )
    case(
        "webhook_to_loopback.json",
        json.dumps({"model_id": some_id, "recipe": recipe, "webhook_url": "http://[::ffff:127.0.0.1]:8080/v1/models"}).encode(),
        **job(422, "invalid_webhook_url"),
    )
    case(
        "webhook_file_scheme.json",
        json.dumps({"model_id": some_id, "recipe": recipe, "webhook_url": "file:///etc/passwd"}).encode(),
        **job(422, "invalid_webhook_url"),
    )

    # ---------- Range ({model} is a model the test uploaded first) ----------
    for name, spec in (("range_past_the_end.txt", "bytes=100000000-"), ("range_zero_suffix.txt", "bytes=-0")):
        case(
            name,
            b"",
            method="GET",
            path="/v1/models/{model}/content",
            content_type="",
            headers={"range": spec},
            status=416,
            code="range_not_satisfiable",
        )

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(cases, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, c["file"])) for c in cases)
    print(f"{len(cases)} cases, {total} bytes in {OUT}")


if __name__ == "__main__":
    OUT = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    main()
