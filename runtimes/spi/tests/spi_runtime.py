#!/usr/bin/env python3
"""A model server speaking ModelMesh's model-runtime SPI (mmesh.ModelRuntime), for densemesh's tests.

It serves, on one gRPC endpoint (TCP or a unix socket):
  * mmesh.ModelRuntime: runtimeStatus, loadModel, unloadModel, modelSize, predictModelSize;
  * KServe V2 ModelInfer / ModelMetadata for a trivial model, routed by the mm-model-id header:
    output "y" (FP32) = input "x" (FP32) x the model's factor, and output "id" (BYTES, [1]) = the model id;
  * echo.Echo/Say (tests/echo.proto), a method of its own declared in methodInfos with
    idInjectionPath [2, 1], answering with the injected model id, the mm-model-id header and the text.

A model file is JSON (a directory holds it as model.json):
  {"factor": 2.0, "load_size": 0, "model_size": 0, "predict_size": 0,
   "typed_output": false, "refuse": null, "load_delay_s": 0, "infer_delay_s": 0, "max_concurrency": 0}
load_size is what loadModel answers as sizeInBytes, model_size what modelSize answers; refuse makes
loadModel fail with FAILED_PRECONDITION and that message; typed_output answers in typed contents
instead of raw_output_contents; max_concurrency is loadModel's maxConcurrency (enforced by the client
when the runtime runs with --limit-model-concurrency); each infer event reports how many calls for
the model were in flight.

Stubs are generated at start into a temporary directory with grpc_tools.protoc from the repository's
protos. Every event is one JSON line on stdout, flushed: first
  {"event": "listening", "endpoint": "http://127.0.0.1:PORT"}   (or "unix:///path")
once the server accepts calls, then {"event": "load" | "unload" | "infer", "model_id": ...}.
"""

import argparse
import array
import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def generate_stubs(proto_root, out):
    """Compiles the SPI, V2 and echo protos into `out` and puts it on sys.path."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for include, name in [
        (proto_root / "modelmesh", "model-runtime.proto"),
        (proto_root / "kserve", "grpc_predict_v2.proto"),
        (HERE, "echo.proto"),
    ]:
        args = ["protoc", f"-I{include}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", str(include / name)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {include / name}")
    sys.path.insert(0, str(out))


class Model:
    def __init__(self, model_id, spec):
        self.model_id = model_id
        self.factor = float(spec.get("factor", 1.0))
        self.load_size = int(spec.get("load_size", 0))
        self.model_size = int(spec.get("model_size", 0))
        self.typed_output = bool(spec.get("typed_output", False))
        self.infer_delay_s = float(spec.get("infer_delay_s", 0))


def read_spec(path):
    path = Path(path)
    if path.is_dir():
        path = path / "model.json"
    return json.loads(path.read_text())


def serve(args):
    import grpc

    import echo_pb2
    import echo_pb2_grpc
    import grpc_predict_v2_pb2 as v2
    import grpc_predict_v2_pb2_grpc as v2_grpc
    import model_runtime_pb2 as spi
    import model_runtime_pb2_grpc as spi_grpc

    models = {}
    lock = threading.Lock()
    in_flight = {}
    started = time.monotonic()

    def header_model_id(context):
        for key, value in context.invocation_metadata():
            if key == "mm-model-id":
                return value
        return None

    def routed_model(context):
        model_id = header_model_id(context)
        if model_id is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing mm-model-id header")
        with lock:
            model = models.get(model_id)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {model_id} is not loaded")
        return model

    class ModelRuntime(spi_grpc.ModelRuntimeServicer):
        def runtimeStatus(self, request, context):
            if args.failing:
                return spi.RuntimeStatusResponse(status=spi.RuntimeStatusResponse.FAILING)
            if time.monotonic() - started < args.startup_delay:
                return spi.RuntimeStatusResponse(status=spi.RuntimeStatusResponse.STARTING)
            methods = {
                "echo.Echo/Say": spi.RuntimeStatusResponse.MethodInfo(idInjectionPath=[2, 1]),
            }
            if not args.no_v2:
                methods["inference.GRPCInferenceService/ModelInfer"] = spi.RuntimeStatusResponse.MethodInfo(idInjectionPath=[1])
                methods["inference.GRPCInferenceService/ModelMetadata"] = spi.RuntimeStatusResponse.MethodInfo(idInjectionPath=[1])
            return spi.RuntimeStatusResponse(
                status=spi.RuntimeStatusResponse.READY,
                capacityInBytes=args.capacity,
                maxLoadingConcurrency=args.max_loading_concurrency,
                modelLoadingTimeoutMs=args.loading_timeout_ms,
                defaultModelSizeInBytes=args.default_model_size,
                runtimeVersion="spi-test-0.1",
                numericRuntimeVersion=1,
                methodInfos=methods,
                limitModelConcurrency=args.limit_model_concurrency,
                allowAnyMethod=False,
            )

        def loadModel(self, request, context):
            emit("load", model_id=request.modelId, model_type=request.modelType, model_path=request.modelPath, model_key=request.modelKey)
            try:
                spec = read_spec(request.modelPath)
            except (OSError, ValueError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read model file {request.modelPath}: {e}")
            time.sleep(float(spec.get("load_delay_s", 0)))
            if spec.get("refuse"):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(spec["refuse"]))
            model = Model(request.modelId, spec)
            with lock:
                models[request.modelId] = model
            return spi.LoadModelResponse(sizeInBytes=model.load_size, maxConcurrency=int(spec.get("max_concurrency", 0)))

        def unloadModel(self, request, context):
            with lock:
                known = models.pop(request.modelId, None) is not None
            emit("unload", model_id=request.modelId, known=known)
            return spi.UnloadModelResponse()

        def modelSize(self, request, context):
            with lock:
                model = models.get(request.modelId)
            if model is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.modelId} is not loaded")
            return spi.ModelSizeResponse(sizeInBytes=model.model_size)

        def predictModelSize(self, request, context):
            try:
                spec = read_spec(request.modelPath)
            except (OSError, ValueError):
                return spi.PredictModelSizeResponse(sizeInBytes=0)
            return spi.PredictModelSizeResponse(sizeInBytes=int(spec.get("predict_size", 0)))

    class Inference(v2_grpc.GRPCInferenceServiceServicer):
        def ModelMetadata(self, request, context):
            model = routed_model(context)
            meta = v2.ModelMetadataResponse.TensorMetadata
            return v2.ModelMetadataResponse(
                name=model.model_id,
                platform="spi_test_multiplier",
                inputs=[meta(name="x", datatype="FP32", shape=[-1])],
                outputs=[meta(name="y", datatype="FP32", shape=[-1]), meta(name="id", datatype="BYTES", shape=[1])],
            )

        def ModelInfer(self, request, context):
            model = routed_model(context)
            with lock:
                in_flight[model.model_id] = in_flight.get(model.model_id, 0) + 1
                concurrent = in_flight[model.model_id]
            emit("infer", model_id=model.model_id, model_name=request.model_name, in_flight=concurrent)
            try:
                time.sleep(model.infer_delay_s)
                return self.answer(model, request, context)
            finally:
                with lock:
                    in_flight[model.model_id] -= 1

        def answer(self, model, request, context):
            index = next((i for i, t in enumerate(request.inputs) if t.name == "x"), None)
            if index is None or request.inputs[index].datatype != "FP32":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected an FP32 input named x")
            x = array.array("f")
            if request.raw_input_contents:
                x.frombytes(request.raw_input_contents[index])
            else:
                x.extend(request.inputs[index].contents.fp32_contents)
            if sys.byteorder == "big":
                x.byteswap()
            y = array.array("f", (v * model.factor for v in x))
            shape = list(request.inputs[index].shape)
            wanted = {o.name for o in request.outputs} or {"y", "id"}
            out = v2.ModelInferResponse(model_name=model.model_id, id=request.id)
            raw = []
            if "y" in wanted:
                tensor = out.outputs.add(name="y", datatype="FP32", shape=shape)
                if model.typed_output:
                    tensor.contents.fp32_contents.extend(y)
                else:
                    if sys.byteorder == "big":
                        y.byteswap()
                    raw.append(y.tobytes())
            if "id" in wanted:
                tensor = out.outputs.add(name="id", datatype="BYTES", shape=[1])
                encoded = model.model_id.encode()
                if model.typed_output:
                    tensor.contents.bytes_contents.append(encoded)
                else:
                    raw.append(len(encoded).to_bytes(4, "little") + encoded)
            out.raw_output_contents.extend(raw)
            return out

    class Echo(echo_pb2_grpc.EchoServicer):
        def Say(self, request, context):
            return echo_pb2.SayReply(
                model_id=request.target.model_id,
                text=request.text,
                header_model_id=header_model_id(context) or "",
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    spi_grpc.add_ModelRuntimeServicer_to_server(ModelRuntime(), server)
    if not args.no_v2:
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(), server)
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)

    if args.listen.startswith("unix://"):
        path = Path(args.listen[len("unix://"):])
        if path.exists():
            path.unlink()
        server.add_insecure_port(f"unix:{path}")
        endpoint = f"unix://{path}"
    else:
        host, _, port = args.listen.rpartition(":")
        bound = server.add_insecure_port(args.listen)
        if bound == 0:
            raise SystemExit(f"cannot listen on {args.listen}")
        endpoint = f"http://{host}:{bound}"
    server.start()
    emit("listening", endpoint=endpoint)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    server.stop(grace=1).wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free port) or unix:///path.sock")
    parser.add_argument("--proto-root", default=str(REPO / "proto" / "proto"), help="the repository's proto/proto directory")
    parser.add_argument("--startup-delay", type=float, default=0.0, help="seconds runtimeStatus answers STARTING")
    parser.add_argument("--capacity", type=int, default=1 << 30, help="capacityInBytes")
    parser.add_argument("--max-loading-concurrency", type=int, default=2)
    parser.add_argument("--loading-timeout-ms", type=int, default=30000)
    parser.add_argument("--default-model-size", type=int, default=1 << 20)
    parser.add_argument("--limit-model-concurrency", action="store_true")
    parser.add_argument("--failing", action="store_true", help="runtimeStatus answers FAILING")
    parser.add_argument("--no-v2", action="store_true", help="serve no KServe V2 methods (a runtime with its own API only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spi-stubs-") as out:
        generate_stubs(Path(args.proto_root), Path(out))
        serve(args)


if __name__ == "__main__":
    main()
