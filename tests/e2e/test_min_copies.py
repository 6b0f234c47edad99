"""densemesh's extensions of ModelMesh's ModelInfo on three pods sharing a real etcd: minCopies (the
leader keeps that many copies loaded, each on its own pod, and restores them when a pod dies) and
sizeBytes (placement's size hint, used before any pod has measured the model)."""
import time

import numpy as np

from meshd import EXAMPLES, raw_request, wait_for
from test_etcd import etcd, mm  # noqa: F401  (etcd: the fixture, for the tests below)

X = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
MIB = 1 << 20


def live_instances(server, admin_api):
    pb2, pb2_grpc = admin_api
    answer = pb2_grpc.AdminStub(server.channel).ListInstances(pb2.ListInstancesRequest())
    return {i.instance_id for i in answer.instances}


def loaded_on(server, mmesh, model_id):
    """The pods holding a loaded copy of the model, as `server` sees the mesh."""
    pb2, stub = mm(server, mmesh)
    status = stub.getModelStatus(pb2.GetStatusRequest(modelId=model_id))
    loaded = pb2.ModelStatusInfo.ModelStatus.Value("LOADED")
    return sorted(c.location for c in status.modelCopyInfos if c.copyStatus == loaded)


def summary(server, admin_api, model_id):
    pb2, pb2_grpc = admin_api
    models = pb2_grpc.AdminStub(server.channel).ListModels(pb2.ListModelsRequest()).models
    return next(m for m in models if m.model_id == model_id)


def test_min_copies_are_kept_on_distinct_pods_and_restored_when_a_pod_dies(
        start_meshd, etcd, mmesh, admin_api, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ("--etcd", etcd.endpoint, "--lease-ttl", "3s", "--capacity", "64MiB")
    pods = {name: start_meshd(repo, "--instance-id", name, *common) for name in ("pod-0", "pod-1", "pod-2")}
    wait_for(lambda: live_instances(pods["pod-0"], admin_api) == set(pods), 30, "all three pods in the registry")

    pb2, stub = mm(pods["pod-0"], mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"), minCopies=2)
    stub.setVModel(pb2.SetVModelRequest(vModelId="iris", targetModelId="iris__rev1", modelInfo=info,
                                        autoDeleteTargetModel=True, loadNow=True))
    holders = wait_for(lambda: (lambda h: h if len(h) == 2 else None)(loaded_on(pods["pod-0"], mmesh, "iris__rev1")),
                       60, "two loaded copies")
    assert len(set(holders)) == 2, holders
    assert summary(pods["pod-0"], admin_api, "iris__rev1").min_copies == 2
    # The minimum, not more: no third copy appears with nothing asking for one.
    time.sleep(2)
    assert loaded_on(pods["pod-0"], mmesh, "iris__rev1") == holders

    # A holder dies: once its lease runs out the leader loads a copy on the one pod left without one.
    victim = holders[-1]
    survivors = sorted(set(pods) - {victim})
    pods.pop(victim).stop()
    asker = pods[survivors[0]]
    wait_for(lambda: loaded_on(asker, mmesh, "iris__rev1") == survivors, 60,
             f"copies on {survivors} after {victim} died")
    response = pods[survivors[1]].stub.ModelInfer(raw_request("iris", [("input", "FP32", X)]))
    assert [o.name for o in response.outputs] == ["label", "probabilities"]

    # Registering the same model again with a lower minimum takes effect (no conflict) and unloads
    # nothing; the copies stay until idle.
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"), minCopies=1)
    stub = mm(asker, mmesh)[1]
    stub.registerModel(pb2.RegisterModelRequest(modelId="iris__rev1", modelInfo=info))
    assert summary(asker, admin_api, "iris__rev1").min_copies == 1
    assert loaded_on(asker, mmesh, "iris__rev1") == survivors


def test_a_size_hint_sends_the_first_load_to_a_pod_it_fits(start_meshd, etcd, mmesh, admin_api, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ("--etcd", etcd.endpoint, "--lease-ttl", "3s")
    small = start_meshd(repo, "--instance-id", "pod-small", "--capacity", "1MiB", *common)
    big = start_meshd(repo, "--instance-id", "pod-big", "--capacity", "64MiB", *common)
    wait_for(lambda: live_instances(small, admin_api) == {"pod-small", "pod-big"}, 30, "both pods in the registry")

    pb2, stub = mm(small, mmesh)
    path = str(EXAMPLES / "iris-logreg")
    # Without a hint the model's few KiB fit the asking pod, which loads it itself.
    status = stub.registerModel(pb2.RegisterModelRequest(
        modelId="plain", modelInfo=pb2.ModelInfo(type="onnx", path=path), loadNow=True, sync=True))
    assert [c.location for c in status.modelCopyInfos] == ["pod-small"], status
    # With a hint of 8 MiB, more than pod-small holds, the first load goes to pod-big.
    info = pb2.ModelInfo(type="onnx", path=path, sizeBytes=8 * MIB)
    status = stub.registerModel(pb2.RegisterModelRequest(modelId="hinted", modelInfo=info, loadNow=True, sync=True))
    assert pb2.ModelStatusInfo.ModelStatus.Name(status.status) == "LOADED", status
    assert [c.location for c in status.modelCopyInfos] == ["pod-big"], status
    assert summary(small, admin_api, "hinted").size_hint_bytes == 8 * MIB
    assert summary(big, admin_api, "hinted").status == "LOADED"
