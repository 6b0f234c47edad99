"""The ModelMesh management API from outside the process, through stubs generated from the proto."""
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from meshd import EXAMPLES, REPO, raw_request, wait_for

sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402

IRIS = str(EXAMPLES / "iris-logreg" / "model.onnx")
X = np.ones((1, 4), dtype=np.float32)


@pytest.fixture
def server(start_meshd, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    return start_meshd(repo, "--load-retry-backoff", "1s")


@pytest.fixture
def api(server, mmesh):
    pb2, pb2_grpc = mmesh
    return pb2, pb2_grpc.ModelMeshStub(server.channel)


def info(pb2, path=IRIS, type_="onnx"):
    return pb2.ModelInfo(type=type_, path=path)


def status_name(pb2, status):
    return pb2.ModelStatusInfo.ModelStatus.Name(status.status)


def predict(server, model=None, vmodel=None, x=X, name="input"):
    metadata = [("mm-vmodel-id", vmodel)] if vmodel else [("mm-model-id", model)]
    request = raw_request("ignored", [(name, "FP32", x)])
    return server.stub.ModelInfer(request, metadata=metadata)


def test_register_status_predict_unregister(server, api):
    pb2, stub = api
    assert status_name(pb2, stub.getModelStatus(pb2.GetStatusRequest(modelId="m"))) == "NOT_FOUND"
    s = stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info(pb2)))
    assert status_name(pb2, s) == "NOT_LOADED"
    assert stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info(pb2))).status == s.status, "idempotent"
    loaded = stub.ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True))
    assert status_name(pb2, loaded) == "LOADED"
    assert loaded.modelCopyInfos[0].location
    assert [o.name for o in predict(server, "m").outputs] == ["label", "probabilities"]

    with pytest.raises(grpc.RpcError) as e:
        stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info(pb2, path=str(EXAMPLES / "elsewhere"))))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for bad, needle in [(info(pb2, type_="tensorflow"), '"tensorflow" is offered by no pod; offered: huggingface, onnx'),
                        (info(pb2, type_="Tensor Flow"), "not a format name"), (info(pb2, type_=""), "type")]:
        with pytest.raises(grpc.RpcError) as e:
            stub.registerModel(pb2.RegisterModelRequest(modelId="other", modelInfo=bad))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.registerModel(pb2.RegisterModelRequest(modelId="../x", modelInfo=info(pb2)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    stub.unregisterModel(pb2.UnregisterModelRequest(modelId="m"))
    stub.unregisterModel(pb2.UnregisterModelRequest(modelId="m"))  # a no-op for unknown ids
    assert status_name(pb2, stub.getModelStatus(pb2.GetStatusRequest(modelId="m"))) == "NOT_FOUND"
    with pytest.raises(grpc.RpcError) as e:
        predict(server, "m")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.metrics()["densemesh_models_loaded"] == 0, "unregistering unloads"


def test_a_broken_model_reports_loading_failed(server, api, tmp_path):
    pb2, stub = api
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    stub.registerModel(pb2.RegisterModelRequest(modelId="broken", modelInfo=info(pb2, path=str(broken)), loadNow=True, sync=True))
    s = stub.getModelStatus(pb2.GetStatusRequest(modelId="broken"))
    assert status_name(pb2, s) == "LOADING_FAILED" and "broken" in s.errors[0]


def test_a_thousand_registrations_nothing_lost_nothing_stale(server, api):
    pb2, stub = api
    ids = [f"model-{i:04d}" for i in range(1000)]

    def register(i):
        return stub.registerModel(pb2.RegisterModelRequest(modelId=i, modelInfo=info(pb2)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(status_name(pb2, s) == "NOT_LOADED" for s in pool.map(register, ids))
        list(pool.map(lambda i: stub.unregisterModel(pb2.UnregisterModelRequest(modelId=i)), ids[::2]))
        statuses = list(pool.map(lambda i: status_name(pb2, stub.getModelStatus(pb2.GetStatusRequest(modelId=i))), ids))
    assert statuses[::2] == ["NOT_FOUND"] * 500
    assert statuses[1::2] == ["NOT_LOADED"] * 500
    assert predict(server, ids[1]).outputs[0].name == "label"
    with pytest.raises(grpc.RpcError) as e:
        predict(server, ids[0])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def vstatus(pb2, stub, vmodel):
    s = stub.getVModelStatus(pb2.GetVModelStatusRequest(vModelId=vmodel))
    return pb2.VModelStatusInfo.VModelStatus.Name(s.status), s


def test_vmodel_switch_under_load_has_no_gap(server, api, tmp_path):
    pb2, stub = api
    for seed, name in [(1, "old"), (2, "new")]:
        make_dense_model(tmp_path / name / "model.onnx", 1, seed=seed)
        stub.registerModel(pb2.RegisterModelRequest(modelId=name, modelInfo=info(pb2, path=str(tmp_path / name))))
    x = np.random.default_rng(0).normal(size=(2, 256)).astype(np.float32)
    want = {name: ort.InferenceSession(str(tmp_path / name / "model.onnx")).run(None, {"x": x})[0] for name in ("old", "new")}
    s = stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="old", loadNow=True, sync=True))
    assert s.activeModelId == "old"

    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = predict(server, vmodel="v", x=x, name="x")
                got = np.frombuffer(r.raw_output_contents[0], dtype=np.float32).reshape(2, 16)
                answers.append(next((n for n, w in want.items() if np.allclose(got, w, rtol=1e-4, atol=1e-5)), "other"))
            except grpc.RpcError as e:
                failures.append(e.details())

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(answers) > 50, 30, "traffic on the old model")
    s = stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="new"))
    assert s.targetModelId == "new"
    wait_for(lambda: vstatus(pb2, stub, "v")[1].activeModelId == "new", 30, "the switch")
    switched_at = len(answers)
    wait_for(lambda: len(answers) > switched_at + 100, 30, "traffic after the switch")
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert set(answers) <= {"old", "new"}, "every answer came from the old or the new model"
    assert answers[-50:] == ["new"] * 50
    assert vstatus(pb2, stub, "v")[0] == "DEFINED"
    # model_name naming the vmodel routes through it too (modelmesh-serving clients send the isvc name).
    request = raw_request("v", [("x", "FP32", x)])
    got = np.frombuffer(server.stub.ModelInfer(request).raw_output_contents[0], dtype=np.float32).reshape(2, 16)
    np.testing.assert_allclose(got, want["new"], rtol=1e-4, atol=1e-5)


def test_a_failing_target_leaves_the_active_model_serving(server, api, tmp_path):
    pb2, stub = api
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="good", modelInfo=info(pb2), loadNow=True, sync=True))
    stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="bad",
                                        modelInfo=info(pb2, path=str(tmp_path / "bad.onnx"))))
    state, s = wait_for(lambda: (lambda r: r if r[0] == "TRANSITION_FAILED" else None)(vstatus(pb2, stub, "v")), 30, "failure")
    assert (s.activeModelId, s.targetModelId) == ("good", "bad")
    assert any("bad" in e for e in s.targetModelStatus.errors), s
    assert predict(server, vmodel="v").outputs[0].name == "label", "the old model keeps serving"
    with pytest.raises(grpc.RpcError) as e:
        stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="good", expectedTargetModelId="good"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="good", expectedTargetModelId="bad"))
    assert vstatus(pb2, stub, "v")[0] == "DEFINED"
    stub.deleteVModel(pb2.DeleteVModelRequest(vModelId="v"))
    assert vstatus(pb2, stub, "v")[0] == "NOT_FOUND"
    with pytest.raises(grpc.RpcError) as e:
        predict(server, vmodel="v")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_vmodel_errors(server, api):
    pb2, stub = api
    with pytest.raises(grpc.RpcError) as e:
        stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="unregistered"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unregistered" in e.value.details()
    stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info(pb2)))
    with pytest.raises(grpc.RpcError) as e:
        stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="m", updateOnly=True))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="m", owner="team-a"))
    with pytest.raises(grpc.RpcError) as e:
        stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="m", owner="team-b"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert vstatus(pb2, stub, "v")[1].owner == "team-a"


def test_the_repository_directory_is_a_registration_source(server, api):
    pb2, stub = api
    repo = server.model_repo
    stub.registerModel(pb2.RegisterModelRequest(modelId="api-model", modelInfo=info(pb2)))
    shutil.copytree(EXAMPLES / "iris-logreg", repo / "dropped")
    wait_for(lambda: status_name(pb2, stub.getModelStatus(pb2.GetStatusRequest(modelId="dropped"))) != "NOT_FOUND",
             30, "the new directory to be registered")
    assert predict(server, "dropped").outputs[0].name == "label"
    # A directory named like an API model does not take it over, and its removal does not unregister it.
    shutil.copytree(EXAMPLES / "mlp-regressor", repo / "api-model")
    shutil.rmtree(repo / "dropped")
    wait_for(lambda: status_name(pb2, stub.getModelStatus(pb2.GetStatusRequest(modelId="dropped"))) == "NOT_FOUND",
             30, "the removed directory to be unregistered")
    shutil.rmtree(repo / "api-model")
    time.sleep(1)  # a full settle period of the watcher, to show nothing happens to the API model
    assert predict(server, "api-model").outputs[0].name == "label", "still the API's iris model"


def test_a_repository_model_whose_file_changes_is_replaced_and_only_then(server, api, tmp_path):
    """The view tells a spec change that reloads from one that does not; meshd unloads on the first only."""
    pb2, stub = api
    x = np.ones((1, 256), dtype=np.float32)
    want = {}
    for seed in (1, 2):
        make_dense_model(tmp_path / f"seed{seed}" / "model.onnx", 0.25, seed=seed)
        want[seed] = ort.InferenceSession(str(tmp_path / f"seed{seed}" / "model.onnx")).run(None, {"x": x})[0]

    def served():
        r = predict(server, "swapped", x=x, name="x")
        return np.frombuffer(r.raw_output_contents[0], dtype=np.float32).reshape(1, 16)

    shutil.copytree(tmp_path / "seed1", server.model_repo / "swapped")
    wait_for(lambda: status_name(pb2, stub.getModelStatus(pb2.GetStatusRequest(modelId="swapped"))) != "NOT_FOUND",
             30, "the new directory to be registered")
    assert np.allclose(served(), want[1], rtol=1e-4, atol=1e-5)
    # The same bytes written again (a new mtime, same content): same generation, nothing unloaded.
    shutil.copyfile(tmp_path / "seed1" / "model.onnx", server.model_repo / "swapped" / "model.onnx")
    time.sleep(1.5)  # more than a settle period of the watcher
    assert server.metrics().get("densemesh_model_unloads_total", 0) == 0
    # New weights: the loaded copy is replaced, and the next request loads them.
    shutil.copyfile(tmp_path / "seed2" / "model.onnx", server.model_repo / "swapped" / "model.onnx")
    wait_for(lambda: server.metrics().get("densemesh_model_unloads_total", 0) == 1, 30, "the old copy to be unloaded")
    assert np.allclose(served(), want[2], rtol=1e-4, atol=1e-5)


def test_traffic_split_follows_weights_and_sticks_to_request_keys(server, api, mmesh, tmp_path):
    pb2, stub = api
    import importlib
    import math

    from grpc_tools import protoc

    out = tmp_path / "admin_stubs"
    out.mkdir()
    proto_dir = REPO / "proto" / "proto" / "densemesh"
    assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto_dir / "admin.proto")]) == 0
    sys.path.insert(0, str(out))
    admin_pb2, admin_grpc = importlib.import_module("admin_pb2"), importlib.import_module("admin_pb2_grpc")
    admin = admin_grpc.AdminStub(server.channel)

    for seed, name in [(1, "a"), (2, "b")]:
        make_dense_model(tmp_path / name / "model.onnx", 0.25, seed=seed)
        stub.registerModel(pb2.RegisterModelRequest(modelId=name, modelInfo=info(pb2, path=str(tmp_path / name))))
    x = np.ones((1, 256), dtype=np.float32)
    want = {n: ort.InferenceSession(str(tmp_path / n / "model.onnx")).run(None, {"x": x})[0] for n in ("a", "b")}
    stub.setVModel(pb2.SetVModelRequest(vModelId="split", targetModelId="a", loadNow=True, sync=True))
    admin.SetVModelSplit(admin_pb2.SetVModelSplitRequest(vmodel_id="split", split=[
        admin_pb2.WeightedModel(model_id="a", weight=80), admin_pb2.WeightedModel(model_id="b", weight=20)]))

    def which(metadata):
        r = server.stub.ModelInfer(raw_request("ignored", [("x", "FP32", x)]), metadata=[("mm-vmodel-id", "split"), *metadata])
        got = np.frombuffer(r.raw_output_contents[0], dtype=np.float32).reshape(1, 16)
        return next(n for n, w in want.items() if np.allclose(got, w, rtol=1e-4, atol=1e-5))

    n = 2000
    share_a = sum(which([]) == "a" for _ in range(n)) / n
    sigma = math.sqrt(0.8 * 0.2 / n)
    assert abs(share_a - 0.8) < 5 * sigma, f"observed {share_a:.3f} for weight 0.8 (5 sigma = {5 * sigma:.3f})"
    for key in ("user-1", "user-2", "user-3", "user-42"):
        first = which([("densemesh-route-key", key)])
        assert all(which([("densemesh-route-key", key)]) == first for _ in range(20)), f"{key} is not sticky"
    keyed = {which([("densemesh-route-key", f"user-{i}")]) for i in range(200)}
    assert keyed == {"a", "b"}, "keys spread over the split"

    with pytest.raises(grpc.RpcError) as e:
        admin.SetVModelSplit(admin_pb2.SetVModelSplitRequest(vmodel_id="split", split=[admin_pb2.WeightedModel(model_id="ghost", weight=1)]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    admin.SetVModelSplit(admin_pb2.SetVModelSplitRequest(vmodel_id="split"))
    assert all(which([]) == "a" for _ in range(50)), "an empty split returns all traffic to the active model"


def test_local_paths_outside_the_roots_are_refused_alike_whether_or_not_they_exist(start_meshd, mmesh, tmp_path):
    pb2, pb2_grpc = mmesh
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    shutil.copytree(EXAMPLES / "iris-logreg", repo / "iris")
    shutil.copytree(EXAMPLES / "iris-logreg", outside / "iris")
    (repo / "escape").symlink_to(outside)
    server = start_meshd(repo, "--local-model-roots", str(repo))
    stub = pb2_grpc.ModelMeshStub(server.channel)
    inside = stub.registerModel(pb2.RegisterModelRequest(modelId="inside", modelInfo=info(pb2, str(repo / "iris")),
                                                         loadNow=True, sync=True))
    assert status_name(pb2, inside) == "LOADED"

    def refusal(path):
        with pytest.raises(grpc.RpcError) as refused:
            stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info(pb2, path)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert "--local-model-roots" in refused.value.details(), refused.value.details()
        return refused.value.details()

    # The same answer, but for the path itself, whether or not something is there.
    exists, missing = refusal(str(outside / "iris")), refusal(str(outside / "nothing"))
    assert exists.replace(str(outside / "iris"), "P") == missing.replace(str(outside / "nothing"), "P")
    for sneaky in (f"{repo}/../outside/iris", str(repo / "escape" / "iris"), "/etc/passwd", f"file://{outside}/iris"):
        refusal(sneaky)
    with pytest.raises(grpc.RpcError) as refused:
        stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="t", modelInfo=info(pb2, "/etc/passwd")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status_name(pb2, stub.getModelStatus(pb2.GetStatusRequest(modelId="m"))) == "NOT_FOUND", "nothing written"
