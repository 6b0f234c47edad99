"""Small KServe V2 gRPC client steps for bench/run.sh (runs in the project's .venv, tritonclient).

    v2_client.py wait-ready ADDR MODEL [--timeout S]   wait until the server says the model is ready
    v2_client.py first-request ADDR MODEL --model-file PATH
                                                       time the first inference of a model on a fresh
                                                       server (its load included), then a second one

first-request takes the input's name, type and shape from the ONNX file, not from ModelMetadata
(meshd loads the model to answer that, which would take the load out of the timed call), opens the
connection beforehand, and drops the page cache when it may (root) so the load reads the disk.
Prints one JSON line.
"""
import argparse
import json
import subprocess
import sys
import time

import numpy as np
import tritonclient.grpc as v2

NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
         "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


def wait_ready(addr: str, model: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = v2.InferenceServerClient(addr)
    last = None
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready() and client.is_model_ready(model):
                return
        except Exception as e:  # not listening yet
            last = e
        time.sleep(0.2)
    sys.exit(f"{addr} did not report model {model} ready within {timeout:.0f} s (last error: {last})")


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def inputs_from_onnx(model_file: str):
    """One input tensor per graph input (initializers excluded), dynamic dimensions set to 1."""
    import onnx
    from onnx import TensorProto

    v2_types = {TensorProto.FLOAT: "FP32", TensorProto.DOUBLE: "FP64", TensorProto.FLOAT16: "FP16",
                TensorProto.INT64: "INT64", TensorProto.INT32: "INT32", TensorProto.INT16: "INT16",
                TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL"}
    graph = onnx.load(model_file, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = []
    for spec in graph.input:
        if spec.name in initializers:
            continue
        tensor_type = spec.type.tensor_type
        datatype = v2_types[tensor_type.elem_type]
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor_type.shape.dim]
        tensor = v2.InferInput(spec.name, shape, datatype)
        tensor.set_data_from_numpy(np.ones(shape, NUMPY[datatype]))
        inputs.append(tensor)
    return inputs


def first_request(addr: str, model: str, model_file: str) -> None:
    inputs = inputs_from_onnx(model_file)
    client = v2.InferenceServerClient(addr)
    client.is_server_live()  # opens the connection outside the timed call
    dropped = drop_page_cache()
    start = time.perf_counter()
    client.infer(model, inputs)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    client.infer(model, inputs)
    hot = time.perf_counter() - start
    print(json.dumps({"run": {"kind": "first-request", "target": f"{addr} {model}"},
                      "figures": {"cold_ms": cold * 1e3, "hot_ms": hot * 1e3, "page_cache_dropped": dropped}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["wait-ready", "first-request"])
    parser.add_argument("addr")
    parser.add_argument("model")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--model-file", help="first-request: the ONNX file the server will load")
    args = parser.parse_args()
    if args.step == "wait-ready":
        wait_ready(args.addr, args.model, args.timeout)
    else:
        if not args.model_file:
            parser.error("first-request needs --model-file")
        first_request(args.addr, args.model, args.model_file)


if __name__ == "__main__":
    main()
