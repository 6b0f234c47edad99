"""ModelMesh's type constraints on two pods sharing a real etcd: a pod offers model types
(--model-types), and placement sends a model only to a pod that offers its type. A request reaching a
pod that offers none is served by one that does, and the model never loads on the first; with no pod
offering the type the answer is UNAVAILABLE naming it."""
import grpc
import numpy as np
import pytest

from meshd import EXAMPLES, raw_request, wait_for
from test_etcd import etcd, mm  # noqa: F401  (etcd: the fixture, for the tests below)

X = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
FORWARDED_OK = 'densemesh_forwarded_requests_total{result="ok"}'


def instances(server, admin_api):
    pb2, pb2_grpc = admin_api
    answer = pb2_grpc.AdminStub(server.channel).ListInstances(pb2.ListInstancesRequest())
    return {i.instance_id: list(i.model_types) for i in answer.instances}


def local_status(server, admin_api, model_id):
    """The model's status in this pod's own cache (ListModels reports this node only)."""
    pb2, pb2_grpc = admin_api
    models = pb2_grpc.AdminStub(server.channel).ListModels(pb2.ListModelsRequest()).models
    return next(m.status for m in models if m.model_id == model_id)


def registered_on(server, mmesh, model_id):
    """Whether `server`'s view has the registration yet (a peer asked to serve a model its view does
    not have yet answers NOT_FOUND: the registry is eventually consistent across pods)."""
    pb2, stub = mm(server, mmesh)
    status = stub.getModelStatus(pb2.GetStatusRequest(modelId=model_id)).status
    return pb2.ModelStatusInfo.ModelStatus.Name(status) != "NOT_FOUND"


def test_a_model_goes_only_to_a_pod_that_offers_its_type(start_meshd, etcd, mmesh, admin_api, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ("--etcd", etcd.endpoint, "--lease-ttl", "3s")
    b = start_meshd(repo, "--instance-id", "pod-b", "--model-types", "", *common)
    a = start_meshd(repo, "--instance-id", "pod-a", "--model-types", "onnx", *common)
    wait_for(lambda: instances(b, admin_api) == {"pod-a": ["onnx"], "pod-b": []}, 30,
             "both pods, with their types, in ListInstances")
    assert instances(a, admin_api) == {"pod-a": ["onnx"], "pod-b": []}

    pb2, stub_b = mm(b, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub_b.registerModel(pb2.RegisterModelRequest(modelId="iris", modelInfo=info))
    wait_for(lambda: registered_on(a, mmesh, "iris"), 30, "pod-a to see the registration")
    for _ in range(5):
        response = b.stub.ModelInfer(raw_request("iris", [("input", "FP32", X)]))
        assert [o.name for o in response.outputs] == ["label", "probabilities"]
    assert b.metrics().get(FORWARDED_OK, 0) >= 5, "pod-b forwarded every request"
    assert local_status(a, admin_api, "iris") == "LOADED"
    assert local_status(b, admin_api, "iris") == "NOT_LOADED", "never loaded on the pod that offers no type"
    copies = stub_b.getModelStatus(pb2.GetStatusRequest(modelId="iris")).modelCopyInfos
    assert [c.location for c in copies] == ["pod-a"]

    # ensureLoaded through pod-b places the model on pod-a too.
    stub_b.registerModel(pb2.RegisterModelRequest(modelId="iris-2", modelInfo=info))
    wait_for(lambda: registered_on(a, mmesh, "iris-2"), 30, "pod-a to see the registration")
    status = stub_b.ensureLoaded(pb2.EnsureLoadedRequest(modelId="iris-2", sync=True))
    assert pb2.ModelStatusInfo.ModelStatus.Name(status.status) == "LOADED"
    assert [c.location for c in status.modelCopyInfos] == ["pod-a"]
    assert local_status(b, admin_api, "iris-2") == "NOT_LOADED"

    # pod-a leaves: no pod offers onnx, and pod-b says so rather than loading it.
    assert a.terminate() == 0
    wait_for(lambda: set(instances(b, admin_api)) == {"pod-b"}, 30, "pod-a to leave the registry")
    with pytest.raises(grpc.RpcError) as e:
        b.stub.ModelInfer(raw_request("iris", [("input", "FP32", X)]))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert "no pod offers model type onnx" in e.value.details(), e.value.details()
    assert local_status(b, admin_api, "iris") == "NOT_LOADED"


def test_an_unknown_model_type_stops_meshd_at_start_naming_it(tmp_path):
    import os
    import subprocess

    from meshd import REPO

    binary = os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))
    run = subprocess.run([binary, "serve", "--model-repo", str(tmp_path), "--model-types", "onnx,pytorch"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "--model-types" in run.stderr and '"pytorch"' in run.stderr and "onnx" in run.stderr, run.stderr
