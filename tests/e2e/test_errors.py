"""Malformed requests get the right code and a message naming the problem; the server keeps serving."""
import shutil
import sys
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from meshd import EXAMPLES, REPO, raw_request, wait_for

sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402

X = np.ones((1, 4), dtype=np.float32)
BAD = grpc.StatusCode.INVALID_ARGUMENT


def with_(request, edit):
    edit(request)
    return request


def iris(**kwargs):
    return raw_request("iris-logreg", [("input", "FP32", X)], **kwargs)


def typed(datatype, shape, **contents):
    request = service_pb2.ModelInferRequest(model_name="iris-logreg")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


CASES = [
    ("unknown model", raw_request("no-such-model", [("input", "FP32", X)]), grpc.StatusCode.NOT_FOUND, ["no-such-model"]),
    ("path traversal id", raw_request("../etc", [("input", "FP32", X)]), BAD, ["model id", "'/'"]),
    ("id too long", raw_request("m" * 254, [("input", "FP32", X)]), BAD, ["254"]),
    ("no model at all", raw_request("", [("input", "FP32", X)]), BAD, ["model_name"]),
    ("unknown datatype", with_(iris(), lambda r: setattr(r.inputs[0], "datatype", "FLOAT32")), BAD, ["input input", "FLOAT32"]),
    ("wrong datatype", with_(iris(), lambda r: setattr(r.inputs[0], "datatype", "INT32")), BAD, ["input input", "INT32", "FP32"]),
    ("wrong shape", with_(iris(), lambda r: r.inputs[0].shape.__setitem__(1, 3)), BAD, ["input input", "shape"]),
    ("wrong rank", raw_request("iris-logreg", [("input", "FP32", np.ones(4, dtype=np.float32))]), BAD, ["input input", "shape"]),
    ("short raw", with_(iris(), lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12)), BAD, ["input input", "12 bytes", "16"]),
    ("negative dim", with_(iris(), lambda r: r.inputs[0].shape.__setitem__(0, -1)), BAD, ["input input", "negative"]),
    ("overflowing shape", with_(iris(), lambda r: r.inputs[0].shape.extend([2**62, 2**62])), BAD, ["input input", "more elements"]),
    ("unknown input", raw_request("iris-logreg", [("input", "FP32", X), ("extra", "FP32", X)]), BAD, ["extra"]),
    ("missing input", raw_request("multi-input", [("ids", "INT64", np.ones((1, 4), dtype=np.int64))]), BAD, ["mask", "missing"]),
    ("duplicate input", raw_request("iris-logreg", [("input", "FP32", X), ("input", "FP32", X)]), BAD, ["input input", "more than once"]),
    ("raw entries mismatch", with_(iris(), lambda r: r.raw_input_contents.append(b"")), BAD, ["raw_input_contents", "2 entries"]),
    ("raw and typed", with_(iris(), lambda r: r.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])), BAD, ["input input", "both"]),
    ("unknown output", iris(outputs=["nope"]), BAD, ["nope", "probabilities"]),
    ("duplicate output", iris(outputs=["label", "label"]), BAD, ["output label", "more than once"]),
    ("typed count", typed("FP32", [1, 4], fp32_contents=[1, 2, 3]), BAD, ["input input", "3 elements", "needs 4"]),
    ("typed wrong field", typed("FP32", [1, 4], int_contents=[1, 2, 3, 4]), BAD, ["input input", "fp32_contents", "int_contents"]),
    ("fp16 typed", typed("FP16", [1, 4]), BAD, ["input input", "raw_input_contents"]),
]


@pytest.mark.parametrize("what,request_,code,needles", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(examples_server, what, request_, code, needles):
    with pytest.raises(grpc.RpcError) as err:
        examples_server.stub.ModelInfer(request_)
    assert err.value.code() == code, err.value.details()
    for needle in needles:
        assert needle in err.value.details(), f"{what}: {err.value.details()!r} lacks {needle!r}"


def test_still_serving_after_the_battery(examples_server):
    for _, request, _, _ in CASES:
        try:
            examples_server.stub.ModelInfer(request)
        except grpc.RpcError:
            pass
    response = examples_server.stub.ModelInfer(iris())
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    assert examples_server.proc.poll() is None


def test_an_oversized_message_is_refused_and_the_server_keeps_serving(start_meshd):
    server = start_meshd(EXAMPLES, "--max-message-size", "64KiB")
    big = np.ones((8192, 4), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ModelInfer(raw_request("iris-logreg", [("input", "FP32", big)]))
    assert err.value.code() == BAD
    assert "--max-message-size" in err.value.details() and "65536" in err.value.details()
    assert server.stub.ModelInfer(iris()).outputs[0].name == "label"


def test_a_model_larger_than_the_capacity(start_meshd, tmp_path):
    make_dense_model(tmp_path / "big" / "model.onnx", 2)
    size = (tmp_path / "big" / "model.onnx").stat().st_size
    server = start_meshd(tmp_path, "--capacity", "1MiB")
    x = np.ones((1, 256), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ModelInfer(raw_request("big", [("x", "FP32", x)]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(size) in err.value.details() and str(1 << 20) in err.value.details()


def test_a_corrupt_model_fails_with_its_reason_then_backs_off(start_meshd, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"\x08\x07garbage that is not a model")
    shutil.copytree(EXAMPLES / "iris-logreg", tmp_path / "iris-logreg")
    server = start_meshd(tmp_path, "--load-retry-backoff", "30s")
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as first:
        server.stub.ModelInfer(raw_request("broken", [("input", "FP32", x)]))
    assert first.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "broken" in first.value.details() and "failed to load" in first.value.details()
    with pytest.raises(grpc.RpcError) as second:
        server.stub.ModelInfer(raw_request("broken", [("input", "FP32", x)]))
    assert second.value.code() == grpc.StatusCode.UNAVAILABLE and "next attempt in" in second.value.details()
    metrics = server.metrics()
    assert metrics['densemesh_model_loads_total{result="failure"}'] == 1, "the second answer came from memory"
    assert server.stub.ModelInfer(iris()).outputs[0].name == "label"


def test_sigterm_drains_in_flight_requests_and_exits_zero(start_meshd, tmp_path):
    make_dense_model(tmp_path / "slow" / "model.onnx", 16)
    server = start_meshd(tmp_path, "--inline-infer-below", "0us", "--infer-threads", "1")
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    x = np.random.default_rng(0).normal(size=(1024, 256)).astype(np.float32)
    i = grpcclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    client.infer("slow", [i])  # loaded, so the requests below are pure inference
    results, errors = [], []
    done = threading.Event()

    def callback(result, error):
        (errors if error else results).append(error or result)
        if len(results) + len(errors) == 6:
            done.set()

    for _ in range(6):
        client.async_infer("slow", [i], callback)
    # All six have reached the server (it sizes each request as it arrives) before the signal.
    wait_for(lambda: server.metrics().get("densemesh_request_size_bytes_count", 0) >= 7, 30, "six requests in")
    answered = server.metrics().get('densemesh_requests_total{method="ModelInfer",code="OK"}', 0) - 1
    assert server.terminate(timeout=60) == 0, server.logs()
    assert done.wait(30)
    assert not errors, errors
    assert len(results) == 6 and all(r.as_numpy("y").shape == (1024, 16) for r in results)
    assert answered < 6, "all six were answered before SIGTERM: nothing was left to drain; make them slower"
    client.close()
