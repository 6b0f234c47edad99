"""Paging: six models, room for about two, eight concurrent clients; every answer right. And ModelMesh's
anti-churn rule: a load that would evict a model used moments ago is refused, naming it."""
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from meshd import REPO, raw_request

sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402

MODELS = 6
MB = 4
REQUESTS = 300


def test_six_models_paged_through_room_for_two(start_meshd, tmp_path):
    for i in range(MODELS):
        make_dense_model(tmp_path / f"dense-{i}" / "model.onnx", MB, seed=i)
    file_bytes = (tmp_path / "dense-0" / "model.onnx").stat().st_size
    capacity = int(file_bytes * 2.5)
    # Paging through recently used models is the point here, so the anti-churn rule is off.
    server = start_meshd(tmp_path, "--capacity", str(capacity), "--max-concurrent-loads", "2", "--anti-churn-age", "0")
    sessions = [ort.InferenceSession(str(tmp_path / f"dense-{i}" / "model.onnx")) for i in range(MODELS)]
    rng = np.random.default_rng(0)
    plan = [(int(rng.integers(MODELS)), rng.normal(size=(int(rng.integers(1, 5)), 256)).astype(np.float32))
            for _ in range(REQUESTS)]

    local = threading.local()

    def call(item):
        model, x = item
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(server.grpc_addr)
        i = grpcclient.InferInput("x", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        got = local.client.infer(f"dense-{model}", [i]).as_numpy("y")
        want = sessions[model].run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        return model

    with ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(call, plan))
    assert sorted(set(served)) == list(range(MODELS))

    metrics = server.metrics()
    loads = metrics['densemesh_model_loads_total{result="success"}']
    print(f"capacity {metrics['densemesh_capacity_bytes']:.0f} B, used {metrics['densemesh_used_bytes']:.0f} B, "
          f"{metrics['densemesh_models_loaded']:.0f} loaded, {metrics['densemesh_cache_evictions_total']:.0f} "
          f"evictions, {loads:.0f} loads for {REQUESTS} requests")
    assert metrics["densemesh_cache_evictions_total"] > 0, metrics
    assert metrics["densemesh_used_bytes"] <= metrics["densemesh_capacity_bytes"] == capacity
    assert metrics['densemesh_model_loads_total{result="success"}'] >= MODELS
    assert metrics.get('densemesh_model_loads_total{result="failure"}', 0) == 0
    assert metrics['densemesh_requests_total{method="ModelInfer",code="OK"}'] == REQUESTS


def test_anti_churn_refuses_with_the_model_it_would_evict(start_meshd, tmp_path):
    for i in range(3):
        make_dense_model(tmp_path / f"dense-{i}" / "model.onnx", MB, seed=i)
    capacity = int((tmp_path / "dense-0" / "model.onnx").stat().st_size * 2.5)
    x = np.random.default_rng(3).normal(size=(2, 256)).astype(np.float32)
    want = [ort.InferenceSession(str(tmp_path / f"dense-{i}" / "model.onnx")).run(None, {"x": x})[0] for i in range(3)]

    def infer(server, i):
        r = server.stub.ModelInfer(raw_request(f"dense-{i}", [("x", "FP32", x)]))
        np.testing.assert_allclose(np.frombuffer(r.raw_output_contents[0], dtype=np.float32).reshape(want[i].shape),
                                   want[i], rtol=1e-4, atol=1e-5)

    # The default age (10 minutes): both models were used moments ago, so the third is refused.
    server = start_meshd(tmp_path, "--capacity", str(capacity))
    infer(server, 0)
    infer(server, 1)
    with pytest.raises(grpc.RpcError) as e:
        infer(server, 2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "dense-0" in e.value.details() or "dense-1" in e.value.details(), e.value.details()
    metrics = server.metrics()
    assert metrics.get("densemesh_cache_evictions_total", 0) == 0, "nothing was evicted for the refused load"
    assert metrics["densemesh_models_loaded"] == 2
    infer(server, 0)
    infer(server, 1)

    # With the rule off (--anti-churn-age 0) the third model loads by evicting one used moments ago.
    paging = start_meshd(tmp_path, "--capacity", str(capacity), "--anti-churn-age", "0")
    for i in (0, 1, 2, 0):
        infer(paging, i)
    metrics = paging.metrics()
    assert metrics["densemesh_cache_evictions_total"] >= 1, metrics
    assert metrics['densemesh_model_loads_total{result="success"}'] >= 3, metrics
    assert metrics.get('densemesh_model_loads_total{result="failure"}', 0) == 0


@pytest.mark.parametrize("policy, evicted", [("lru", "dense-0"), ("gdsf", "dense-1")])
def test_the_eviction_policy_picks_which_model_makes_room(start_meshd, mmesh, tmp_path, policy, evicted):
    """Room for two: dense-0 is busy but used first, dense-1 used once, after it. A third model must
    evict one: LRU takes the longest idle (dense-0), GDSF the one worth least per byte (dense-1)."""
    for i in range(3):
        make_dense_model(tmp_path / f"dense-{i}" / "model.onnx", MB, seed=i)
    capacity = int((tmp_path / "dense-0" / "model.onnx").stat().st_size * 2.5)
    server = start_meshd(tmp_path, "--capacity", str(capacity), "--anti-churn-age", "0", "--eviction", policy)
    x = np.ones((1, 256), dtype=np.float32)
    for model, times in (("dense-0", 20), ("dense-1", 1), ("dense-2", 1)):
        for _ in range(times):
            server.stub.ModelInfer(raw_request(model, [("x", "FP32", x)]))
    pb2, pb2_grpc = mmesh
    stub = pb2_grpc.ModelMeshStub(server.channel)
    loaded = {m for m in ("dense-0", "dense-1", "dense-2")
              if pb2.ModelStatusInfo.ModelStatus.Name(stub.getModelStatus(pb2.GetStatusRequest(modelId=m)).status)
              == "LOADED"}
    assert loaded == {"dense-0", "dense-1", "dense-2"} - {evicted}, f"{policy}: {loaded}"
