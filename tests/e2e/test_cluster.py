"""Three pods on real etcd under a Zipf workload while pods are killed, restarted and drained and etcd
itself goes away for 20 s: no wrong answer, and no request that fails twice in a row. Each pod serves its
own copy of one repository (same models, another directory, other mtimes), and requests reach the pod
that placement picks, so models spread over the pods."""
import os
import random
import shutil
import sys
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from meshd import EXAMPLES, REPO, raw_request, wait_for
from test_etcd import Etcd, etcd, mm  # noqa: F401  (etcd: the fixture, for the tests below)

sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402

MODELS = 300
FILES = 3
FORWARDED_OK = 'densemesh_forwarded_requests_total{result="ok"}'


def copy_repository(src, dst, mtime):
    """A copy of the repository `src` at `dst` with every file and directory's mtime set to `mtime`, as
    each pod's volume would hold the same models written at another time."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (mtime, mtime))
    os.utime(dst, (mtime, mtime))
    return dst


def test_a_cluster_under_load_survives_kills_drains_and_an_etcd_outage(start_meshd, mmesh, tmp_path):
    etcd = Etcd()
    try:
        run_scenario(start_meshd, mmesh, tmp_path, etcd)
    finally:
        etcd.stop()
        etcd.dir.cleanup()


def run_scenario(start_meshd, mmesh, tmp_path, etcd):
    x = np.random.default_rng(0).normal(size=(1, 256)).astype(np.float32)
    want = []
    for f in range(FILES):
        path = tmp_path / f"file-{f}" / "model.onnx"
        make_dense_model(path, 0.1, seed=f)
        want.append(ort.InferenceSession(str(path)).run(None, {"x": x})[0].ravel())
    source = tmp_path / "source"
    for i in range(MODELS):
        (source / f"m-{i:03d}").mkdir(parents=True)
        shutil.copyfile(tmp_path / f"file-{i % FILES}" / "model.onnx", source / f"m-{i:03d}" / "model.onnx")
    names = ("pod-0", "pod-1", "pod-2")
    now = time.time()
    repos = {name: copy_repository(source, tmp_path / f"repo-{name}", now - 3600 * (k + 1)) for k, name in enumerate(names)}
    # Paging is the workload here: models used moments ago must make room, so the anti-churn rule is off.
    args = lambda name: (repos[name], "--etcd", etcd.endpoint, "--instance-id", name, "--lease-ttl", "3s",
                         "--capacity", "4MiB", "--shutdown-grace", "10s", "--anti-churn-age", "0")
    pods = {name: start_meshd(*args(name)) for name in names}
    pb2, _ = mm(pods["pod-0"], mmesh)

    pending = {(name, f"m-{i:03d}") for name in names for i in range(MODELS)}

    def registered_everywhere():
        for name, model in sorted(pending):
            s = mm(pods[name], mmesh)[1].getModelStatus(pb2.GetStatusRequest(modelId=model))
            if pb2.ModelStatusInfo.ModelStatus.Name(s.status) == "NOT_FOUND":
                return False
            pending.discard((name, model))
        return True

    wait_for(registered_everywhere, 60, "every pod to see the repository's models registered")

    lock = threading.Lock()
    live = dict(pods)
    stats = {"ok": 0, "retried": 0, "failed": [], "wrong": []}
    stop = threading.Event()
    zipf = np.random.default_rng(1).zipf(1.3, size=200_000)

    def client(seed):
        rnd = random.Random(seed)
        for n in range(len(zipf)):
            if stop.is_set():
                return
            i = int(zipf[(n * 7 + seed) % len(zipf)] - 1) % MODELS
            request = raw_request("ignored", [("x", "FP32", x)])
            metadata = [("mm-model-id", f"m-{i:03d}")]
            errors = []
            for attempt in range(2):
                with lock:
                    server = rnd.choice(list(live.values()))
                try:
                    r = server.stub.ModelInfer(request, metadata=metadata, timeout=30)
                    # Within 1e-5 of ONNX Runtime (the tiny evaluator may serve it); another model's
                    # answer is nowhere near.
                    got = np.frombuffer(r.raw_output_contents[0], dtype=np.float32)
                    if got.shape != want[i % FILES].shape or not np.allclose(got, want[i % FILES], rtol=1e-5, atol=1e-6):
                        stats["wrong"].append(f"m-{i:03d} from {server.proc.pid}")
                    with lock:
                        stats["ok"] += 1
                        stats["retried"] += attempt
                    break
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
            else:
                stats["failed"].append((f"m-{i:03d}", errors))

    gone_metrics = []  # the last /metrics of each pod before it was killed or drained

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    with lock:
        killed = live.pop("pod-1")
    gone_metrics.append(killed.metrics())
    killed.proc.kill()
    killed.proc.wait()
    time.sleep(3)
    restarted = start_meshd(*args("pod-1"))
    with lock:
        live["pod-1"] = restarted
    time.sleep(3)
    with lock:
        drained = live.pop("pod-2")
    gone_metrics.append(drained.metrics())
    assert drained.terminate(timeout=60) == 0
    time.sleep(2)
    etcd.stop()
    time.sleep(20)
    etcd.start()
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join()

    assert not stats["wrong"], stats["wrong"][:5]
    assert not stats["failed"], stats["failed"][:5]
    assert stats["ok"] > 500, stats
    final = {name: pod.metrics() for name, pod in live.items()}
    forwarded = sum(m.get(FORWARDED_OK, 0) for m in gone_metrics + list(final.values()))
    loaded = {name: m.get("densemesh_models_loaded", 0) for name, m in final.items()}
    print(f"cluster scenario: {stats['ok']} answers, {stats['retried']} after one retry, {forwarded:.0f} forwarded, "
          f"models loaded at the end {loaded}")
    assert forwarded > 0, "no request was forwarded to the pod holding (or picked for) its model"
    # Pods of one build forward over the pod wire, not HTTP/2.
    assert any("pod wire connected" in pod.log_path.read_text(errors="replace") for pod in live.values())
    # Placement spreads the models: each pod still running holds a fair part of what is loaded.
    total = sum(loaded.values())
    assert total > 0, loaded
    assert all(n >= 0.1 * total for n in loaded.values()), f"models not spread over the pods: {loaded}"


# Cluster correctness: one leader for the cluster-wide chores, a vmodel target loaded once, and a
# repository shared by pods that see it at different paths.

LOADS_OK = 'densemesh_model_loads_total{result="success"}'
UNLOADS = "densemesh_model_unloads_total"
IRIS_X = np.ones((1, 4), dtype=np.float32)


def leader_gauges(pods):
    """`densemesh_leader` as each pod's /metrics reports it (None when it does not)."""
    return {name: pod.metrics().get("densemesh_leader") for name, pod in pods.items()}


def wait_for_one_leader(pods, timeout, what):
    """Waits until exactly one of `pods` reports densemesh_leader 1 and every other one 0; its name."""
    seen = {}

    def one_leader():
        seen.clear()
        seen.update(leader_gauges(pods))
        leaders = [name for name, value in seen.items() if value == 1]
        if len(leaders) == 1 and all(value == 0 for name, value in seen.items() if name != leaders[0]):
            return leaders[0]
        return None

    try:
        return wait_for(one_leader, timeout, what)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; densemesh_leader last read {seen}") from None


def wait_equal(read, want, timeout, what):
    """Waits until `read()` returns `want`; on timeout the error says what it read last."""
    seen = []

    def equal():
        seen[:] = [read()]
        return seen[0] == want

    try:
        wait_for(equal, timeout, what)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; last read {seen[0]!r}, wanted {want!r}") from None


def status_name(pb2, stub, model):
    return pb2.ModelStatusInfo.ModelStatus.Name(stub.getModelStatus(pb2.GetStatusRequest(modelId=model)).status)


def registered(pb2, stub, *models):
    return all(status_name(pb2, stub, m) != "NOT_FOUND" for m in models)


def active_model(pb2, stub, vmodel):
    return stub.getVModelStatus(pb2.GetVModelStatusRequest(vModelId=vmodel)).activeModelId


def loaded_copies(pb2, stub, model):
    s = stub.getModelStatus(pb2.GetStatusRequest(modelId=model))
    return sorted(c.location for c in s.modelCopyInfos if pb2.ModelStatusInfo.ModelStatus.Name(c.copyStatus) == "LOADED")


def test_leader_failover(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    ttl = 3
    common = ["--etcd", etcd.endpoint, "--lease-ttl", f"{ttl}s"]
    pods = {name: start_meshd(repo, *common, "--instance-id", name) for name in ("pod-a", "pod-b", "pod-c")}
    leader = wait_for_one_leader(pods, 30, "exactly one pod to report densemesh_leader 1")
    pb2, stub = mm(pods[leader], mmesh)
    iris = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    for model in ("first", "second"):
        stub.registerModel(pb2.RegisterModelRequest(modelId=model, modelInfo=iris))
    stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="first", loadNow=True, sync=True))
    wait_equal(lambda: active_model(pb2, stub, "v"), "first", 30, "the vmodel to serve its first target")

    # SIGKILL: no goodbye, the leader key goes only with the lease.
    killed = pods.pop(leader)
    killed.proc.kill()
    killed.proc.wait()
    successor = wait_for_one_leader(pods, ttl + 5, f"another pod to take the lead within the lease TTL ({ttl}s) + 5s")
    assert successor != leader

    # The chores resume under the new leader. A vmodel transition, asked of a pod that is not the leader:
    other = next(name for name in pods if name != successor)
    _, stub = mm(pods[other], mmesh)
    s = stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="second", loadNow=True))
    assert s.targetModelId == "second"
    wait_equal(lambda: active_model(pb2, stub, "v"), "second", 30, "the new leader to complete the vmodel transition")
    response = pods[other].stub.ModelInfer(raw_request("ignored", [("input", "FP32", IRIS_X)]), metadata=[("mm-vmodel-id", "v")])
    assert response.outputs[0].name == "label"
    # Repository sync: a directory dropped into the shared repository gets registered.
    shutil.copytree(EXAMPLES / "iris-logreg", repo / "dropped")
    wait_for(lambda: registered(pb2, stub, "dropped"), 30, "the new leader to register the dropped directory")
    assert pods[other].stub.ModelInfer(raw_request("dropped", [("input", "FP32", IRIS_X)])).outputs[0].name == "label"
    assert wait_for_one_leader(pods, 5, "the lead to stay put") == successor


def test_set_vmodel_on_three_pods_loads_the_target_once(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3s"]
    pods = {name: start_meshd(repo, *common, "--instance-id", name) for name in ("pod-a", "pod-b", "pod-c")}
    pb2, stub = mm(pods["pod-a"], mmesh)
    stubs = {name: mm(pod, mmesh)[1] for name, pod in pods.items()}
    for seed, model in enumerate(("first", "second")):
        make_dense_model(tmp_path / model / "model.onnx", 0.25, seed=seed)
        stub.registerModel(pb2.RegisterModelRequest(modelId=model, modelInfo=pb2.ModelInfo(type="onnx", path=str(tmp_path / model))))

    def loads():
        return sum(pod.metrics().get(LOADS_OK, 0) for pod in pods.values())

    def settled(model):
        """Every pod sees the vmodel serving `model` (so every pod has seen the target set before it), and
        no pod is loading anything."""
        return (all(active_model(pb2, s, "v") == model for s in stubs.values())
                and all(pod.metrics().get("densemesh_loading_models", 0) == 0 for pod in pods.values()))

    assert loads() == 0
    s = stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="first", loadNow=True, sync=True))
    assert s.targetModelId == "first"
    wait_for(lambda: settled("first"), 30, "every pod to see the vmodel serving its target")
    copies = loaded_copies(pb2, stub, "first")
    assert len(copies) == 1 and loads() == 1, f"the target was loaded {loads():.0f} times, copies on {copies}"

    # A new target, asked of another pod: loaded once more, in one place, and then active.
    s = stubs["pod-b"].setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="second", loadNow=True))
    assert s.targetModelId == "second"
    wait_for(lambda: settled("second"), 30, "every pod to see the vmodel switched to the new target")
    copies = loaded_copies(pb2, stub, "second")
    assert len(copies) == 1 and loads() == 2, f"the new target was loaded {loads() - 1:.0f} times, copies on {copies}"
    assert active_model(pb2, stub, "v") == "second"


def test_two_pods_with_different_repository_paths_keep_each_others_registrations(start_meshd, etcd, mmesh, tmp_path):
    source = tmp_path / "source"
    for model in ("iris-logreg", "mlp-regressor"):
        shutil.copytree(EXAMPLES / model, source / model)
    now = time.time()
    repo_a = copy_repository(source, tmp_path / "a" / "models", now - 7200)
    repo_b = copy_repository(source, tmp_path / "b" / "volume" / "models", now - 60)

    def add_to_both(model):
        for repo, mtime in ((repo_a, now - 7200), (repo_b, now - 60)):
            copy_repository(EXAMPLES / "iris-logreg", repo / model, mtime)

    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3s"]
    a = start_meshd(repo_a, *common, "--instance-id", "pod-a")
    pb2, stub_a = mm(a, mmesh)
    wait_for(lambda: registered(pb2, stub_a, "iris-logreg", "mlp-regressor"), 30, "pod-a's repository to be registered")
    stub_a.ensureLoaded(pb2.EnsureLoadedRequest(modelId="iris-logreg", sync=True))
    assert loaded_copies(pb2, stub_a, "iris-logreg") == ["pod-a"]

    b = start_meshd(repo_b, *common, "--instance-id", "pod-b")
    _, stub_b = mm(b, mmesh)
    wait_equal(lambda: loaded_copies(pb2, stub_b, "iris-logreg"), ["pod-a"], 30, "pod-b to see pod-a's copy of iris-logreg")
    # A model added to both copies after pod-b started: once it is registered, the repository has been
    # synced since pod-b came up.
    add_to_both("marker-1")
    wait_for(lambda: registered(pb2, stub_a, "marker-1") and registered(pb2, stub_b, "marker-1"), 30,
             "the model added to both repositories to be registered")

    # pod-b's copy of the repository did not rewrite the registration pod-a's copy is loaded from.
    assert loaded_copies(pb2, stub_b, "iris-logreg") == ["pod-a"]
    assert status_name(pb2, stub_b, "iris-logreg") == "LOADED"
    assert a.stub.ModelInfer(raw_request("iris-logreg", [("input", "FP32", IRIS_X)])).outputs[0].name == "label"
    m = a.metrics()
    assert (m.get(LOADS_OK, 0), m.get(UNLOADS, 0), m["densemesh_models_loaded"]) == (1, 0, 1), \
        "pod-a unloaded or reloaded iris-logreg after pod-b started"

    # The other way round: a model loaded on pod-b (the emptier pod), then pod-b alone syncs its copy.
    assert b.stub.ModelInfer(raw_request("mlp-regressor", [("input", "FP32", np.ones((1, 8), dtype=np.float32))])).outputs
    wait_equal(lambda: loaded_copies(pb2, stub_b, "mlp-regressor"), ["pod-b"], 30, "pod-b's copy of mlp-regressor")
    a.proc.kill()
    a.proc.wait()
    copy_repository(EXAMPLES / "iris-logreg", repo_b / "marker-2", now - 60)
    wait_for(lambda: registered(pb2, stub_b, "marker-2"), 30, "pod-b to sync the repository once pod-a is gone")
    assert loaded_copies(pb2, stub_b, "mlp-regressor") == ["pod-b"]
    assert b.stub.ModelInfer(raw_request("mlp-regressor", [("input", "FP32", np.ones((1, 8), dtype=np.float32))])).outputs
    m = b.metrics()
    assert (m.get(LOADS_OK, 0), m.get(UNLOADS, 0)) == (1, 0), "pod-b unloaded or reloaded mlp-regressor when it took over the sync"


def test_a_model_registered_through_one_pod_is_served_at_once_by_another(start_meshd, etcd, mmesh, tmp_path):
    """Another pod's watch brings a registration a moment later; a request for a name a pod does not know
    reads the registry first (as ModelMesh does on a miss), so it is never NOT_FOUND for a model the
    registration call already answered for. Each round races the call against the watch."""
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3s"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a")
    b = start_meshd(repo, *common, "--instance-id", "pod-b")
    pb2, stub = mm(a, mmesh)
    make_dense_model(tmp_path / "m" / "model.onnx", 0.05, seed=3, hidden=16, out=4)
    x = np.ones((1, 16), dtype=np.float32)
    for i in range(30):
        stub.registerModel(pb2.RegisterModelRequest(modelId=f"fresh-{i}", modelInfo=pb2.ModelInfo(
            type="onnx", path=str(tmp_path / "m"))))
        answer = b.stub.ModelInfer(raw_request(f"fresh-{i}", [("x", "FP32", x)]))
        assert answer.outputs[0].name == "y"
    # A name registered nowhere is still NOT_FOUND, after the one read.
    with pytest.raises(grpc.RpcError) as e:
        b.stub.ModelInfer(raw_request("never-registered", [("x", "FP32", x)]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value
