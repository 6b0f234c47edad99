"""KServe V2 REST on --http-addr through real clients (tritonclient.http, the kserve SDK, plain HTTP):
JSON and binary tensors, routing by header and by vmodel name, errors as V2 bodies, and a request that
reaches the pod without the model in a two-pod mesh on etcd."""
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from meshd import EXAMPLES, wait_for
from test_etcd import Etcd, mm
from test_predict import DATATYPES, assert_same, reference

X = np.random.default_rng(5).normal(5, 2, size=(3, 4)).astype(np.float32)


@pytest.fixture
def rest(examples_server):
    c = httpclient.InferenceServerClient(examples_server.http_addr)
    yield c
    c.close()


def call(server, path, body=None, headers=None, method=None):
    """(status, content type, parsed JSON body) of one plain HTTP call."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.http_addr}{path}", data=data, headers=headers or {},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers.get("content-type"), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), json.loads(e.read() or b"null")


def infer(client, model, feeds, binary=True, outputs=None, **kwargs):
    inputs = []
    for name, array in feeds.items():
        i = httpclient.InferInput(name, list(array.shape), DATATYPES[array.dtype.type])
        i.set_data_from_numpy(array, binary_data=binary)
        inputs.append(i)
    requested = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    return client.infer(model, inputs, outputs=requested, **kwargs)


def test_health_and_server_metadata(rest, examples_server):
    assert rest.is_server_live() and rest.is_server_ready()
    assert rest.get_server_metadata()["name"] == "densemesh"
    assert call(examples_server, "/v2/health/live") == (200, "application/json", {"live": True})
    assert call(examples_server, "/v2/health/ready") == (200, "application/json", {"ready": True})
    status, _, body = call(examples_server, "/v2")
    assert status == 200 and body["name"] == "densemesh" and body["version"]


def test_model_metadata_and_readiness(start_meshd):
    server = start_meshd(EXAMPLES)
    client = httpclient.InferenceServerClient(server.http_addr)
    try:
        assert not client.is_model_ready("iris-logreg"), "nothing is loaded before the first request"
        assert call(server, "/v2/models/iris-logreg/ready") == (503, "application/json",
                                                                 {"name": "iris-logreg", "ready": False})
        meta = client.get_model_metadata("iris-logreg")
        assert (meta["name"], meta["platform"]) == ("iris-logreg", "onnxruntime_onnx")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("label", "INT64"), ("probabilities", "FP32")]
        assert client.is_model_ready("iris-logreg"), "metadata loaded it"
        assert client.get_model_metadata("iris-logreg", model_version="1")["name"] == "iris-logreg"
        assert client.is_model_ready("iris-logreg", model_version="1")
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_iris_matches_onnxruntime(rest, binary):
    result = infer(rest, "iris-logreg", {"input": X}, binary=binary, outputs=["label", "probabilities"],
                   request_id="r-1")
    want = reference("iris-logreg", {"input": X})
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_name"] == "iris-logreg"
    for name in ("label", "probabilities"):
        assert_same(result.as_numpy(name), want[name])
        output = result.get_output(name)
        assert ("data" in output) == (not binary) and ("binary_data_size" in output.get("parameters", {})) == binary


def test_several_inputs_and_outputs_not_named_come_back_binary(rest):
    rng = np.random.default_rng(3)
    feeds = {
        "ids": rng.integers(-(2**40), 2**40, size=(5, 4), dtype=np.int64),
        "mask": rng.random((5, 4)) > 0.5,
        "scale": np.array([0.25], dtype=np.float32),
    }
    result = infer(rest, "multi-input", feeds)  # no outputs named: tritonclient asks binary_data_output
    want = reference("multi-input", feeds)
    for name in ("masked_sum", "scaled", "any_masked"):
        assert "binary_data_size" in result.get_output(name)["parameters"]
        assert_same(result.as_numpy(name), want[name])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(rest, binary):
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
        "in_fp16": rng.normal(size=4).astype(np.float16),  # JSON numbers when not binary
        "in_fp32": rng.normal(size=4).astype(np.float32),
        "in_fp64": rng.normal(size=4).astype(np.float64),
        "in_string": np.array([b"hello", "wörld".encode(), b""], dtype=np.object_),
    }
    outputs = ["out_" + name[3:] for name in feeds]
    result = infer(rest, "dtypes", feeds, binary=binary, outputs=outputs)
    for name, array in feeds.items():
        got = result.as_numpy("out_" + name[3:])
        if array.dtype == np.object_:
            # tritonclient gives JSON strings back as str, binary ones as bytes.
            assert [g if isinstance(g, bytes) else g.encode() for g in got] == list(array)
        else:
            assert got.dtype == array.dtype, name
            np.testing.assert_array_equal(got, array)


def test_nested_json_data_and_a_body_written_by_hand(examples_server):
    body = {"id": "by-hand", "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 4],
                                         "data": X.tolist()}]}
    status, content_type, answer = call(examples_server, "/v2/models/iris-logreg/infer", body)
    assert (status, content_type, answer["id"]) == (200, "application/json", "by-hand")
    probabilities = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    assert probabilities["shape"] == [3, 3]
    want = reference("iris-logreg", {"input": X})["probabilities"]
    np.testing.assert_allclose(np.array(probabilities["data"], dtype=np.float32).reshape(3, 3), want, rtol=1e-5)


def test_headers_and_vmodel_names_route_as_over_grpc(rest, examples_server, mmesh):
    pb2, pb2_grpc = mmesh
    stub = pb2_grpc.ModelMeshStub(examples_server.channel)
    stub.setVModel(pb2.SetVModelRequest(vModelId="iris", targetModelId="iris-logreg", loadNow=True, sync=True))
    want = reference("iris-logreg", {"input": X})["probabilities"]
    by_model_header = infer(rest, "no-such-model", {"input": X}, headers={"mm-model-id": "iris-logreg"})
    by_vmodel_header = infer(rest, "no-such-model", {"input": X}, headers={"mm-vmodel-id": "iris"})
    by_vmodel_name = infer(rest, "iris", {"input": X})  # modelmesh-serving clients name the isvc
    for result in (by_model_header, by_vmodel_header, by_vmodel_name):
        assert_same(result.as_numpy("probabilities"), want)
    status, _, body = call(examples_server, "/v2/models/anything/ready", headers={"mm-vmodel-id": "iris"})
    assert (status, body["ready"]) == (200, True)
    with pytest.raises(InferenceServerException) as e:
        infer(rest, "iris-logreg", {"input": X}, headers={"mm-vmodel-id": "nope"})
    assert e.value.status() == "404" and "vmodel nope" in e.value.message()


def test_errors_are_v2_bodies_with_the_status_of_their_grpc_code(rest, examples_server):
    def refused(path, body, headers=None):
        status, content_type, answer = call(examples_server, path, body, headers)
        assert content_type == "application/json" and set(answer) == {"error"}, answer
        return status, answer["error"]

    tensor = lambda **kw: {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], **kw}]}
    cases = [
        ("/v2/models/ghost/infer", tensor(), 404, "ghost"),
        ("/v2/models/ghost", None, 404, "ghost"),
        ("/v2/models/iris-logreg/infer", tensor(shape=[1, 3], data=[1, 2, 3]), 400, "input input: shape [1, 3]"),
        ("/v2/models/iris-logreg/infer", tensor(datatype="INT32"), 400, "datatype INT32 does not match the model's FP32"),
        ("/v2/models/iris-logreg/infer", tensor(data=[1, 2, 3]), 400, "3 elements but the shape needs 4"),
        ("/v2/models/iris-logreg/infer", tensor(data=[1, 2, 3, "x"]), 400, "element 3"),
        ("/v2/models/iris-logreg/infer", tensor(name="inputs"), 400, "no input named \"inputs\""),
        ("/v2/models/iris-logreg/infer", b"{\"inputs\": [", 400, "not a V2 inference request"),
        ("/v2/models/iris-logreg/infer", b"\xff", 400, "not UTF-8"),
        ("/v2/models/..%2Fetc/infer", tensor(), 400, "model_name"),
        ("/v2/nothing/here", None, 404, "no such KServe V2 REST endpoint"),
    ]
    for path, body, status, says in cases:
        got_status, message = refused(path, body)
        assert (got_status, says in message) == (status, True), (path, got_status, message)
    # Binary-data extension mistakes.
    status, message = refused("/v2/models/iris-logreg/infer", tensor(), {"Inference-Header-Content-Length": "999999"})
    assert status == 400 and "Inference-Header-Content-Length".lower() in message.lower(), message
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    status, message = refused("/v2/models/iris-logreg/infer", body + b"\0" * 8,
                              {"Inference-Header-Content-Length": str(len(body))})
    assert status == 400 and "binary_data_size is 16 but only 8 bytes" in message, message
    # tritonclient reads the same body.
    with pytest.raises(InferenceServerException) as e:
        infer(rest, "iris-logreg", {"input": X[:, :3].copy()})
    assert e.value.status() == "400" and "shape [3, 3]" in e.value.message(), e.value


def test_a_body_over_the_message_size_limit_is_refused_naming_the_flag(start_meshd):
    server = start_meshd(EXAMPLES, "--max-message-size", "4KiB")
    small = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    assert call(server, "/v2/models/iris-logreg/infer", small)[0] == 200
    big = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1000, 4], "data": [0.5] * 4000}]}
    status, _, answer = call(server, "/v2/models/iris-logreg/infer", big)
    assert status == 400 and "--max-message-size" in answer["error"], answer
    # JSON under the limit whose tensors are over it once decoded is refused as gRPC refuses it.
    wide = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [700, 2], "data": [0] * 1400}]}
    status, _, answer = call(server, "/v2/models/iris-logreg/infer", wide)
    assert status == 400 and "--max-message-size" in answer["error"], answer
    assert call(server, "/v2/health/live")[0] == 200, "still serving"


def test_the_kserve_sdk_rest_client(examples_server):
    """kserve's own REST client in its own interpreter ($KSERVE_PYTHON, as test_predict's gRPC one)."""
    python = os.environ.get("KSERVE_PYTHON")
    if not python:
        pytest.skip("KSERVE_PYTHON is not set; scripts/test.sh sets it")
    script = Path(__file__).with_name("kserve_rest_client.py")
    run = subprocess.run([python, str(script), examples_server.http_addr], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["live"] and result["ready"]
    want = reference("iris-logreg", {"input": X})
    assert len(result["answers"]) == 2
    for answer in result["answers"]:
        assert answer["id"] == "k1"
        outputs = answer["outputs"]
        assert (outputs["label"]["datatype"], outputs["label"]["shape"]) == ("INT64", [3])
        assert outputs["label"]["data"] == want["label"].tolist()
        got = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(3, 3)
        np.testing.assert_allclose(got, want["probabilities"], rtol=1e-5, atol=1e-6)
    assert result["error"]["status"] == 400 and "shape [1, 3]" in result["error"]["message"], result["error"]


def test_a_rest_request_to_the_pod_without_the_model_is_forwarded(start_meshd, mmesh, tmp_path):
    etcd = Etcd()
    try:
        repo = tmp_path / "repo"
        repo.mkdir()
        common = ["--etcd", etcd.endpoint, "--lease-ttl", "30s"]
        a = start_meshd(repo, *common, "--instance-id", "pod-a")
        b = start_meshd(repo, *common, "--instance-id", "pod-b")
        pb2, stub = mm(a, mmesh)
        stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=pb2.ModelInfo(
            type="onnx", path=str(EXAMPLES / "iris-logreg"))))
        client_a = httpclient.InferenceServerClient(a.http_addr)
        client_b = httpclient.InferenceServerClient(b.http_addr)
        try:
            want = infer(client_a, "m", {"input": X}).as_numpy("probabilities")  # loads on pod-a

            def b_sees_a_copy():
                s = mm(b, mmesh)[1].getModelStatus(pb2.GetStatusRequest(modelId="m"))
                return any(c.location == "pod-a" for c in s.modelCopyInfos)

            wait_for(b_sees_a_copy, 30, "pod-b to see pod-a's copy")
            assert client_b.is_model_ready("m"), "a copy on a live peer is ready"
            for binary in (True, False):
                for _ in range(5):
                    assert_same(infer(client_b, "m", {"input": X}, binary=binary).as_numpy("probabilities"), want)
            assert client_b.get_model_metadata("m")["inputs"][0]["shape"] == [-1, 4]
            metrics_b, metrics_a = b.metrics(), a.metrics()
            assert metrics_b["densemesh_models_loaded"] == 0, "pod-b forwarded instead of loading a second copy"
            assert metrics_b['densemesh_forwarded_requests_total{result="ok"}'] == 10
            assert metrics_a['densemesh_requests_total{method="ModelInfer",code="OK"}'] == 11, "pod-a served them"
            status, _, answer = call(b, "/v2/models/m/infer", {"inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
            assert status == 400 and "shape [1, 3]" in answer["error"], "pod-a's refusal, passed back"
        finally:
            client_a.close()
            client_b.close()
    finally:
        etcd.stop()
        etcd.dir.cleanup()


def test_sigterm_with_a_kept_alive_rest_connection_exits_at_once(start_meshd):
    """The REST server stops with the gRPC one: an idle kept-alive connection does not hold the exit
    for the whole grace period."""
    import http.client
    import time

    server = start_meshd(EXAMPLES, "--shutdown-grace", "20s")
    host, port = server.http_addr.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    connection.request("POST", "/v2/models/iris-logreg/infer", body, {"Content-Type": "application/json"})
    assert connection.getresponse().status == 200
    started = time.monotonic()
    assert server.terminate(timeout=30) == 0
    assert time.monotonic() - started < 10, "the idle connection did not hold the shutdown"
    connection.close()
