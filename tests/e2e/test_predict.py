"""Every example model through real clients, compared with onnxruntime's own answers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from meshd import EXAMPLES

DATATYPES = {
    np.float32: "FP32", np.float64: "FP64", np.float16: "FP16", np.int64: "INT64", np.int32: "INT32",
    np.int16: "INT16", np.int8: "INT8", np.uint8: "UINT8", np.uint16: "UINT16", np.uint32: "UINT32",
    np.uint64: "UINT64", np.bool_: "BOOL", np.object_: "BYTES",
}


ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
EXAMPLE_MODELS = sorted(p.parent.name for p in EXAMPLES.glob("*/model.onnx"))


def reference(model, feeds):
    session = ort.InferenceSession(str(EXAMPLES / model / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def infer(client, model, feeds, **kwargs):
    inputs = []
    for name, array in feeds.items():
        i = grpcclient.InferInput(name, list(array.shape), DATATYPES[array.dtype.type])
        i.set_data_from_numpy(array)
        inputs.append(i)
    return client.infer(model, inputs, **kwargs)


def assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, (got, want)
    if np.issubdtype(want.dtype, np.floating):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


def test_server_is_live_ready_and_healthy(client, examples_server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "densemesh"
    assert examples_server.http_status("/healthz") == 200
    assert examples_server.http_status("/readyz") == 200


@pytest.mark.parametrize("batch", [1, 7])
def test_sklearn_models_match_onnxruntime(client, batch):
    rng = np.random.default_rng(batch)
    x = rng.normal(5, 2, size=(batch, 4)).astype(np.float32)
    result = infer(client, "iris-logreg", {"input": x})
    want = reference("iris-logreg", {"input": x})
    assert_same(result.as_numpy("label"), want["label"])
    assert_same(result.as_numpy("probabilities"), want["probabilities"])

    x = rng.normal(size=(batch, 8)).astype(np.float32)
    result = infer(client, "mlp-regressor", {"input": x})
    assert_same(result.as_numpy("variable"), reference("mlp-regressor", {"input": x})["variable"])


def test_several_inputs_with_int64_and_bool(client):
    rng = np.random.default_rng(3)
    feeds = {
        "ids": rng.integers(-(2**40), 2**40, size=(5, 4), dtype=np.int64),
        "mask": rng.random((5, 4)) > 0.5,
        "scale": np.array([0.25], dtype=np.float32),
    }
    result = infer(client, "multi-input", feeds)
    want = reference("multi-input", feeds)
    for name in ("masked_sum", "scaled", "any_masked"):
        assert_same(result.as_numpy(name), want[name])


def test_every_datatype_round_trips(client):
    rng = np.random.default_rng(4)
    feeds = {
        "in_bool": np.array([True, False, True]),
        "in_uint8": np.array([0, 7, 255], dtype=np.uint8),
        "in_uint16": np.array([0, 65535], dtype=np.uint16),
        "in_uint32": np.array([2**32 - 1], dtype=np.uint32),
        "in_uint64": np.array([2**64 - 1, 0], dtype=np.uint64),
        "in_int8": np.array([-128, 127], dtype=np.int8),
        "in_int16": np.array([-32768, 5], dtype=np.int16),
        "in_int32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "in_int64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        "in_fp16": rng.normal(size=4).astype(np.float16),
        "in_fp32": rng.normal(size=4).astype(np.float32),
        "in_fp64": rng.normal(size=4).astype(np.float64),
        "in_string": np.array([b"hello", "wörld".encode(), b""], dtype=np.object_),
    }
    result = infer(client, "dtypes", feeds)
    for name, array in feeds.items():
        got = result.as_numpy("out_" + name[3:])
        if array.dtype == np.object_:
            assert list(got) == list(array)
        else:
            assert got.dtype == array.dtype
            np.testing.assert_array_equal(got, array)


def test_model_metadata_and_readiness(start_meshd):
    server = start_meshd(EXAMPLES)
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    assert not client.is_model_ready("iris-logreg"), "nothing is loaded before the first request"
    meta = client.get_model_metadata("iris-logreg")
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 4])]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("label", "INT64"), ("probabilities", "FP32")]
    assert client.is_model_ready("iris-logreg")
    client.close()


@pytest.mark.parametrize("model", EXAMPLE_MODELS)
def test_metadata_describes_the_model_as_onnxruntime_does(client, model):
    session = ort.InferenceSession(str(EXAMPLES / model / "model.onnx"))

    def described(args):
        return [(a.name, ORT_TYPES[a.type], [d if isinstance(d, int) else -1 for d in a.shape]) for a in args]

    meta = client.get_model_metadata(model)
    assert (meta.name, meta.platform) == (model, "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == described(session.get_inputs())
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == described(session.get_outputs())
    assert client.is_model_ready(model)


def test_the_model_id_header_wins_over_model_name(client, examples_server):
    x = np.ones((1, 4), dtype=np.float32)
    result = infer(client, "no-such-model", {"input": x}, headers={"mm-model-id": "iris-logreg"})
    assert result.as_numpy("probabilities").shape == (1, 3)

    request = service_pb2.ModelInferRequest(model_name="no-such-model")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(x.tobytes())
    response = examples_server.stub.ModelInfer(request, metadata=[("mm-model-id-bin", b"iris-logreg")])
    assert [o.name for o in response.outputs] == ["label", "probabilities"]


def test_typed_contents_get_typed_contents_back(examples_server):
    x = [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
    request = service_pb2.ModelInferRequest(model_name="iris-logreg", id="req-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(x)
    request.outputs.add(name="probabilities")
    response = examples_server.stub.ModelInfer(request)
    assert response.id == "req-1" and not response.raw_output_contents
    [out] = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [2, 3])
    want = reference("iris-logreg", {"input": np.array(x, dtype=np.float32).reshape(2, 4)})["probabilities"]
    np.testing.assert_allclose(np.array(out.contents.fp32_contents).reshape(2, 3), want, rtol=1e-5)


def test_reflection_lists_the_services_served(examples_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(examples_server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for r in responses for s in r.list_services_response.service}
    # What meshd serves, and not the runtime SPI (mmesh.ModelRuntime) it only calls.
    assert services == {"inference.GRPCInferenceService", "mmesh.ModelMesh", "densemesh.v1.Admin",
                        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}, services


def test_the_kserve_sdk_client(examples_server):
    """kserve's own gRPC client, raw and typed, in its own interpreter ($KSERVE_PYTHON, set by
    scripts/env.sh to the .venv-kserve that scripts/setup.sh makes; see kserve_client.py). Without
    $KSERVE_PYTHON (running pytest by hand) it is skipped; with it, a missing kserve is a failure."""
    python = os.environ.get("KSERVE_PYTHON")
    if not python:
        pytest.skip("KSERVE_PYTHON is not set; scripts/test.sh sets it")
    script = Path(__file__).with_name("kserve_client.py")
    run = subprocess.run([python, str(script), examples_server.grpc_addr], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["ready"]
    x = np.random.default_rng(5).normal(5, 2, size=(3, 4)).astype(np.float32)
    want = reference("iris-logreg", {"input": x})
    assert len(result["answers"]) == 2
    for answer in result["answers"]:
        assert answer["id"] == "k1"
        outputs = answer["outputs"]
        assert (outputs["label"]["datatype"], outputs["label"]["shape"]) == ("INT64", [3])
        assert outputs["label"]["data"] == want["label"].tolist()
        assert (outputs["probabilities"]["datatype"], outputs["probabilities"]["shape"]) == ("FP32", [3, 3])
        got = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(3, 3)
        np.testing.assert_allclose(got, want["probabilities"], rtol=1e-5, atol=1e-6)


def test_the_tiny_evaluator_answers_as_onnxruntime_does_in_less_memory(start_meshd):
    """--tiny-max-bytes puts small graphs on the tiny evaluator: the same answers and metadata as ONNX
    Runtime's, charged a fraction of a session; a model it lacks operators for still loads (in ONNX
    Runtime)."""
    charged = {}
    for tiny in ("0", "1MiB"):
        server = start_meshd(EXAMPLES, "--tiny-max-bytes", tiny)
        client = grpcclient.InferenceServerClient(server.grpc_addr)
        rng = np.random.default_rng(11)
        x = rng.normal(5, 2, size=(9, 4)).astype(np.float32)
        result = infer(client, "iris-logreg", {"input": x})
        want = reference("iris-logreg", {"input": x})
        assert_same(result.as_numpy("label"), want["label"])
        assert_same(result.as_numpy("probabilities"), want["probabilities"])
        x = rng.normal(size=(3, 8)).astype(np.float32)
        assert_same(infer(client, "mlp-regressor", {"input": x}).as_numpy("variable"),
                    reference("mlp-regressor", {"input": x})["variable"])
        # Where and ReduceSum are not the evaluator's: ONNX Runtime serves it.
        feeds = {"ids": np.arange(8, dtype=np.int64).reshape(2, 4), "mask": np.ones((2, 4), dtype=bool),
                 "scale": np.array([0.5], dtype=np.float32)}
        assert_same(infer(client, "multi-input", feeds).as_numpy("scaled"),
                    reference("multi-input", feeds)["scaled"])
        meta = client.get_model_metadata("mlp-regressor")
        assert meta.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 8])]
        charged[tiny] = server.metrics()["densemesh_loaded_model_size_bytes_sum"]
        client.close()
    # Two ONNX Runtime sessions and one tiny model against three sessions.
    assert charged["1MiB"] < charged["0"] * 0.8, charged
