"""densemesh-controller end to end: the real kube-rs controller and kubectl against the Kubernetes
API-server double (tests/kube/apiserver_double.py, not a real API server), real etcd, two meshd pods and
a model in S3 (moto), inferred through tritonclient by the InferenceService's name."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import yaml

from meshd import REPO, free_port, moto_bucket, moto_storage_config, raw_request, upload_dense_models, start_moto, wait_for
from test_etcd import Etcd
from test_kube_double import find_kubectl
from test_runtimes import MLSERVER, infer_fp, trained  # noqa: F401 (trained is a fixture)


CRDS = REPO / "charts" / "densemesh" / "crds" / "serving.kserve.io.yaml"
CONTROLLER_BIN = os.environ.get("CONTROLLER_BIN", str(REPO / "target" / "debug" / "densemesh-controller"))


class Kube:
    """The API-server double in its own process, and kubectl pointed at it."""

    def __init__(self, tmp):
        self.kubeconfig = tmp / "kubeconfig"
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "kube" / "apiserver_double.py"), "--port", "0",
             "--kubeconfig-out", str(self.kubeconfig), "--crds", str(CRDS), "--bookmark-interval", "1"],
            stdout=subprocess.PIPE, stderr=open(tmp / "double.log", "wb"), text=True)
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://"), f"the double did not start: {(tmp / 'double.log').read_text()}"
        self.kubectl_bin = find_kubectl()
        self.cache = tmp / "kube-cache"

    def kubectl(self, *args, check=True, timeout=60, input=None):
        r = subprocess.run([self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache), *args],
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def apply(self, *docs):
        return self.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(docs))

    def get(self, kind, name):
        r = self.kubectl("get", kind, name, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Controller:
    def __init__(self, kube, mesh_addr, tmp, *args):
        self.log_path = tmp / f"controller-{len(list(tmp.glob('controller-*.log')))}.log"
        self.proc = subprocess.Popen(
            [CONTROLLER_BIN, "--mesh-endpoint", f"http://{mesh_addr}", "--public-grpc-url", f"grpc://{mesh_addr}",
             "--public-rest-url", "http://127.0.0.1:8008", "--metrics-addr", f"127.0.0.1:{free_port()}",
             "--lease-duration", "3s", *args],
            env={**os.environ, "KUBECONFIG": str(kube.kubeconfig), "RUST_LOG": "info,kube=warn", "NO_COLOR": "1"},
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)

    def logs(self):
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 with two models of the same shape but different weights."""
    proc, endpoint = start_moto()
    try:
        client = moto_bucket(endpoint)
        work = tmp_path_factory.mktemp("s3-models")
        x = np.random.default_rng(7).standard_normal((1, 256)).astype(np.float32)
        expected = {}
        for name, path in upload_dense_models(client, work, ["a", "b"], mb=1).items():
            expected[name] = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
        secrets = moto_storage_config(work / "storage-config", endpoint)
        yield secrets, x, expected
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def mesh(s3, start_meshd, tmp_path):
    """A real etcd and two meshd pods on it."""
    secrets, _, _ = s3
    etcd = Etcd()
    etcd.start()
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3s", "--storage-config", str(secrets),
              "--capacity", "64MiB", "--load-retry-backoff", "1s"]
    pods = [start_meshd(repo, *common, "--instance-id", name, "--cache-dir", str(tmp_path / f"cache-{name}"))
            for name in ("pod-a", "pod-b")]
    yield pods
    for p in pods:
        p.stop()
    etcd.stop()


@pytest.fixture
def kube(tmp_path):
    k = Kube(tmp_path)
    yield k
    k.stop()


@pytest.fixture
def controller(kube, mesh, tmp_path):
    c = Controller(kube, mesh[0].grpc_addr, tmp_path)
    yield c
    c.stop()
    # Captured, so shown only when the test failed.
    print(f"--- controller log ---\n{c.logs()}\n--- double log ---\n{(tmp_path / 'double.log').read_text()[-3000:]}")


RUNTIME = {
    "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
    "metadata": {"name": "densemesh-onnx", "namespace": "default"},
    "spec": {"supportedModelFormats": [{"name": "onnx", "version": "1", "autoSelect": True}], "multiModel": True},
}


def isvc(name, uri, **predictor):
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": "default", "annotations": {
            "serving.kserve.io/deploymentMode": "ModelMesh", "serving.kserve.io/secretKey": "moto"}},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"}, "storageUri": uri}, **predictor}},
    }


def infer(pod, name, x):
    response = pod.stub.ModelInfer(raw_request(name, [("x", "FP32", x)]), timeout=30)
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(x.shape[0], -1)


def model_status(obj):
    return (obj or {}).get("status", {}).get("modelStatus", {})


def test_an_inference_service_is_served_rolled_to_new_storage_under_load_and_deleted(s3, mesh, kube, controller, mmesh):
    import tritonclient.grpc as grpcclient

    _, x, expected = s3
    pod_a, pod_b = mesh
    kube.apply(RUNTIME, isvc("mnist", "s3://models/dense/a/model.onnx"))
    kube.kubectl("wait", "--for=condition=Ready", "isvc/mnist", "--timeout=90s", timeout=100)

    table = kube.kubectl("get", "isvc").stdout.splitlines()
    assert table[0].split() == ["NAME", "URL", "READY", "ACTIVE", "TARGET", "AGE"], table
    row = table[1].split()
    assert row[:4] == ["mnist", f"grpc://{pod_a.grpc_addr}", "True", "Loaded"], table

    obj = kube.get("isvc", "mnist")
    first_revision = obj["status"]["components"]["predictor"]["latestRolledoutRevision"]
    assert first_revision.startswith("mnist__isvc-") and len(first_revision) == len("mnist__isvc-") + 10
    assert model_status(obj)["transitionStatus"] == "UpToDate"
    assert model_status(obj)["copies"]["totalCopies"] >= 1
    assert "serving.kserve.io/densemesh" in obj["metadata"]["finalizers"]

    # tritonclient by the InferenceService's name, through the other pod.
    client = grpcclient.InferenceServerClient(pod_b.grpc_addr)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("mnist", [inp]).as_numpy("y"), expected["a"], rtol=1e-5)

    # Change storageUri under load: no request fails, every answer is the old model's or the new one's.
    answers, failures, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                answers.append(infer(pod_b, "mnist", x))
            except grpc.RpcError as e:
                failures.append(f"{e.code()}: {e.details()}")

    sender = threading.Thread(target=load)
    sender.start()
    try:
        time.sleep(0.5)
        kube.apply(RUNTIME, isvc("mnist", "s3://models/dense/b/model.onnx"))

        def rolled_out():
            obj = kube.get("isvc", "mnist")
            rev = obj["status"]["components"]["predictor"].get("latestRolledoutRevision")
            return rev != first_revision and model_status(obj).get("transitionStatus") == "UpToDate" and obj
        obj = wait_for(rolled_out, 90, "the new revision to roll out")
        wait_for(lambda: any(np.allclose(a, expected["b"], rtol=1e-5) for a in answers[-5:]), 30,
                 "answers from the new model")
    finally:
        stop.set()
        sender.join()
    assert not failures, failures[:5]
    olds = sum(np.allclose(a, expected["a"], rtol=1e-5) for a in answers)
    news = sum(np.allclose(a, expected["b"], rtol=1e-5) for a in answers)
    assert olds + news == len(answers), "an answer came from neither model"
    assert olds > 0 and news > 0
    assert obj["status"]["components"]["predictor"]["previousRolledoutRevision"] == first_revision

    # Delete: the finalizer deletes the vmodel, and with it the auto-delete models.
    kube.kubectl("delete", "isvc", "mnist", "--timeout=60s", timeout=70)
    pb2, pb2_grpc = mmesh
    stub = pb2_grpc.ModelMeshStub(pod_a.channel)
    vstatus = stub.getVModelStatus(pb2.GetVModelStatusRequest(vModelId="mnist"))
    assert pb2.VModelStatusInfo.VModelStatus.Name(vstatus.status) == "NOT_FOUND"
    for rev in (first_revision, obj["status"]["components"]["predictor"]["latestRolledoutRevision"]):
        wait_for(lambda: pb2.ModelStatusInfo.ModelStatus.Name(
            stub.getModelStatus(pb2.GetStatusRequest(modelId=rev)).status) == "NOT_FOUND", 30, f"{rev} to go")


def test_bad_specs_become_invalid_spec_and_the_serving_revision_keeps_serving(s3, mesh, kube, controller):
    _, x, expected = s3
    kube.apply(RUNTIME, isvc("keep", "s3://models/dense/a/model.onnx"))
    kube.kubectl("wait", "--for=condition=Ready", "isvc/keep", "--timeout=90s", timeout=100)

    no_storage = isvc("nostorage", "")
    del no_storage["spec"]["predictor"]["model"]["storageUri"]
    unknown_runtime = isvc("norun", "s3://models/dense/a/model.onnx")
    unknown_runtime["spec"]["predictor"]["model"]["runtime"] = "triton-nope"
    no_format = isvc("xgb", "s3://models/dense/a/model.onnx")
    no_format["spec"]["predictor"]["model"]["modelFormat"]["name"] = "xgboost"
    broken_keep = isvc("keep", "ftp://models/dense/a/model.onnx")
    kube.apply(no_storage, unknown_runtime, no_format, broken_keep)

    cases = {"nostorage": ("InvalidPredictorSpec", "has no storage"),
             "norun": ("RuntimeNotRecognized", '"triton-nope" does not exist'),
             "xgb": ("NoSupportingRuntime", "xgboost"),
             "keep": ("InvalidPredictorSpec", "ftp://")}
    for name, (reason, words) in cases.items():
        def invalid():
            ms = model_status(kube.get("isvc", name))
            return ms.get("transitionStatus") == "InvalidSpec" and ms
        ms = wait_for(invalid, 30, f"{name} to be InvalidSpec")
        assert ms["lastFailureInfo"]["reason"] == reason, (name, ms)
        assert words in ms["lastFailureInfo"]["message"], (name, ms)
    # The serving revision of `keep` is untouched and still answers.
    obj = kube.get("isvc", "keep")
    assert [c["status"] for c in obj["status"]["conditions"] if c["type"] == "Ready"] == ["True"]
    np.testing.assert_allclose(infer(mesh[1], "keep", x), expected["a"], rtol=1e-5)
    # The controller is still up and serving.
    assert controller.proc.poll() is None, controller.logs()


def test_objects_without_the_model_mesh_annotation_are_left_alone(s3, mesh, kube, controller, mmesh):
    serverless = isvc("kserve-owned", "s3://models/dense/a/model.onnx")
    del serverless["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    kube.apply(RUNTIME, serverless, isvc("ours", "s3://models/dense/a/model.onnx"))
    kube.kubectl("wait", "--for=condition=Ready", "isvc/ours", "--timeout=90s", timeout=100)
    obj = kube.get("isvc", "kserve-owned")
    assert "status" not in obj and not obj["metadata"].get("finalizers"), obj

    # Handed back to KServe: the vmodel goes, and the finalizer with it.
    handed_back = isvc("ours", "s3://models/dense/a/model.onnx")
    del handed_back["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    kube.apply(handed_back)
    wait_for(lambda: not kube.get("isvc", "ours")["metadata"].get("finalizers"), 30, "the finalizer to go")
    pb2, pb2_grpc = mmesh
    stub = pb2_grpc.ModelMeshStub(mesh[0].channel)
    wait_for(lambda: pb2.VModelStatusInfo.VModelStatus.Name(
        stub.getVModelStatus(pb2.GetVModelStatusRequest(vModelId="ours")).status) == "NOT_FOUND", 30, "the vmodel to go")


def test_a_predictor_is_served_as_a_ksp_vmodel(s3, mesh, kube, controller):
    _, x, expected = s3
    predictor = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "Predictor",
        "metadata": {"name": "example-predictor", "namespace": "default"},
        "spec": {"modelType": {"name": "onnx"}, "path": "dense/b/model.onnx",
                 "storage": {"s3": {"secretKey": "moto", "bucket": "models"}}},
    }
    kube.apply(RUNTIME, predictor)
    wait_for(lambda: (kube.get("predictor", "example-predictor") or {}).get("status", {}).get("available"),
             90, "the predictor to be available")
    np.testing.assert_allclose(infer(mesh[0], "example-predictor", x), expected["b"], rtol=1e-5)


def test_a_second_replica_stands_by_until_the_leader_goes(s3, mesh, kube, controller, tmp_path):
    kube.apply(RUNTIME, isvc("first", "s3://models/dense/a/model.onnx"))
    kube.kubectl("wait", "--for=condition=Ready", "isvc/first", "--timeout=90s", timeout=100)
    standby = Controller(kube, mesh[1].grpc_addr, tmp_path, "--identity", "standby")
    try:
        time.sleep(2)
        assert "standing by" in standby.logs()
        controller.stop()
        wait_for(lambda: "took the leader lease" in standby.logs(), 30, "the standby to take over")
        kube.apply(isvc("second", "s3://models/dense/b/model.onnx"))
        kube.kubectl("wait", "--for=condition=Ready", "isvc/second", "--timeout=90s", timeout=100)
    finally:
        standby.stop()


MESHCTL = os.environ.get("MESHCTL_BIN", str(REPO / "target" / "debug" / "meshctl"))


def test_meshctl_apply_registers_the_same_yaml_without_kubernetes(s3, start_meshd, tmp_path):
    secrets, x, expected = s3
    repo = tmp_path / "repo"
    repo.mkdir()
    pod = start_meshd(repo, "--storage-config", str(secrets), "--cache-dir", str(tmp_path / "cache"))
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    predictor = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "Predictor", "metadata": {"name": "pred"},
        "spec": {"modelType": {"name": "onnx"}, "path": "dense/b/model.onnx",
                 "storage": {"s3": {"secretKey": "moto", "bucket": "models"}}},
    }
    serverless = isvc("kserve-owned", "s3://models/dense/a/model.onnx")
    del serverless["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    (manifests / "a.yaml").write_text(yaml.safe_dump_all([RUNTIME, isvc("mnist", "s3://models/dense/a/model.onnx"), serverless]))
    (manifests / "b.json").write_text(json.dumps(predictor))

    def apply(*args):
        return subprocess.run([MESHCTL, "--addr", pod.grpc_addr, "-o", "json", "apply", *args],
                              capture_output=True, text=True, timeout=120)

    r = apply("-f", str(manifests), "--wait", "90s")
    assert r.returncode == 0, r.stderr + r.stdout
    rows = {row["object"]: row for row in json.loads(r.stdout)}
    assert rows["inferenceservice/mnist"]["result"] == "configured" and rows["inferenceservice/mnist"]["state"] == "ready"
    assert rows["predictor/pred"]["state"] == "ready"
    assert rows["servingruntime/densemesh-onnx"]["result"].startswith("skipped")
    assert "ModelMesh" in rows["inferenceservice/kserve-owned"]["result"]
    np.testing.assert_allclose(infer(pod, "mnist", x), expected["a"], rtol=1e-5)
    np.testing.assert_allclose(infer(pod, "pred", x), expected["b"], rtol=1e-5)

    again = json.loads(apply("-f", str(manifests / "a.yaml")).stdout)
    assert {row["object"]: row["result"] for row in again}["inferenceservice/mnist"] == "unchanged"

    (manifests / "a.yaml").write_text(yaml.safe_dump(isvc("mnist", "s3://models/dense/b/model.onnx")))
    r = apply("-f", str(manifests / "a.yaml"), "--wait", "90s")
    assert r.returncode == 0, r.stderr + r.stdout
    wait_for(lambda: np.allclose(infer(pod, "mnist", x), expected["b"], rtol=1e-5), 30, "the new revision to serve")

    bad = isvc("bad", "s3://models/dense/a/model.onnx")
    bad["spec"]["predictor"]["model"]["modelFormat"]["name"] = "xgboost"
    (manifests / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = apply("-f", str(manifests / "bad.yaml"))
    assert r.returncode == 1
    assert "no pod of this mesh offers model type xgboost" in r.stdout, r.stdout
    r = apply("-f", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr


def test_a_serving_runtime_becomes_a_deployment_scaled_to_zero_when_unused_and_back(s3, mesh, kube, tmp_path):
    template = tmp_path / "pod-template.yaml"
    template.write_text(yaml.safe_dump({
        "metadata": {"labels": {"app.kubernetes.io/name": "densemesh", "app.kubernetes.io/component": "meshd"}},
        "spec": {"containers": [{"name": "meshd", "image": "densemesh/meshd:test", "args": ["serve"],
                                 "env": [{"name": "DENSEMESH_CAPACITY", "value": "60%"}]}]},
    }))
    runtime = {**RUNTIME, "spec": {**RUNTIME["spec"], "replicas": 3, "nodeSelector": {"pool": "models"}}}
    kube.apply(runtime)
    controller = Controller(kube, mesh[0].grpc_addr, tmp_path, "--meshd-pod-template", str(template),
                            "--scale-to-zero-grace", "3s")
    try:
        def replicas():
            d = kube.get("deployment", "densemesh-densemesh-onnx")
            return d and d["spec"]["replicas"]
        deployment = wait_for(lambda: kube.get("deployment", "densemesh-densemesh-onnx"), 30, "the runtime's Deployment")
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["labels"]["serving.kserve.io/servingRuntime"] == "densemesh-onnx"
        assert pod["spec"]["nodeSelector"] == {"pool": "models"}
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env == {"DENSEMESH_CAPACITY": "60%", "DENSEMESH_MODEL_TYPES": "onnx"}
        assert deployment["metadata"]["ownerReferences"][0]["kind"] == "ServingRuntime"
        # No model uses it: after the grace period it has no pods.
        wait_for(lambda: replicas() == 0, 60, "the unused runtime to scale to zero")
        # A model arrives: the runtime scales back up.
        kube.apply(isvc("arrives", "s3://models/dense/a/model.onnx"))
        wait_for(lambda: replicas() == 3, 60, "the runtime to scale back up")
        kube.kubectl("wait", "--for=condition=Ready", "isvc/arrives", "--timeout=90s", timeout=100)
        # A nodeSelector dropped from the runtime leaves its pods too.
        kube.apply({**RUNTIME, "spec": {**RUNTIME["spec"], "replicas": 3}})
        wait_for(lambda: "nodeSelector" not in kube.get("deployment", "densemesh-densemesh-onnx")["spec"]["template"]["spec"],
                 60, "the dropped nodeSelector to leave the pod template")
    finally:
        controller.stop()
        print(controller.logs())


def test_a_canary_splits_traffic_and_promotion_is_one_edit(s3, mesh, kube, controller):
    _, x, expected = s3
    kube.apply(RUNTIME, isvc("canary", "s3://models/dense/a/model.onnx"))
    kube.kubectl("wait", "--for=condition=Ready", "isvc/canary", "--timeout=90s", timeout=100)
    stable = kube.get("isvc", "canary")["status"]["components"]["predictor"]["latestRolledoutRevision"]

    kube.apply(isvc("canary", "s3://models/dense/b/model.onnx", canaryTrafficPercent=50))

    def split():
        traffic = kube.get("isvc", "canary")["status"]["components"]["predictor"].get("traffic", [])
        return len(traffic) == 2 and traffic
    traffic = wait_for(split, 90, "the canary split")
    assert {t["revisionName"]: t["percent"] for t in traffic}[stable] == 50
    answers = [infer(mesh[1], "canary", x) for _ in range(60)]
    olds = sum(np.allclose(a, expected["a"], rtol=1e-5) for a in answers)
    news = sum(np.allclose(a, expected["b"], rtol=1e-5) for a in answers)
    assert olds + news == 60 and olds > 5 and news > 5, (olds, news)

    # Promotion: the field goes; every request then reaches the new revision.
    kube.apply(isvc("canary", "s3://models/dense/b/model.onnx"))

    def promoted():
        obj = kube.get("isvc", "canary")
        p = obj["status"]["components"]["predictor"]
        return p.get("latestRolledoutRevision") != stable and len(p.get("traffic", [])) == 1 and obj
    obj = wait_for(promoted, 90, "the promotion")
    assert obj["status"]["components"]["predictor"]["previousRolledoutRevision"] == stable
    assert all(np.allclose(infer(mesh[1], "canary", x), expected["b"], rtol=1e-5) for _ in range(10))


def test_min_copies_and_the_size_hint_reach_placement(s3, mesh, kube, controller, mmesh):
    spec = isvc("pinned", "s3://models/dense/a/model.onnx", minCopies=2)
    spec["spec"]["predictor"]["model"]["size"] = "2Mi"
    kube.apply(RUNTIME, spec)
    kube.kubectl("wait", "--for=condition=Ready", "isvc/pinned", "--timeout=90s", timeout=100)
    wait_for(lambda: model_status(kube.get("isvc", "pinned"))["copies"]["totalCopies"] == 2, 60,
             "two copies, one per pod")
    pb2, pb2_grpc = mmesh
    revision = kube.get("isvc", "pinned")["status"]["components"]["predictor"]["latestRolledoutRevision"]
    status = pb2_grpc.ModelMeshStub(mesh[0].channel).getModelStatus(pb2.GetStatusRequest(modelId=revision))
    assert {c.location for c in status.modelCopyInfos} == {"pod-a", "pod-b"}


def test_a_runtime_with_its_own_server_gets_a_runtime_file_meshd_serves_it_by(kube, tmp_path, start_meshd, mmesh):
    """A ServingRuntime bringing a server container that speaks ModelMesh's SPI becomes a Deployment whose
    meshd mounts a rendered --runtime-config; a real meshd given that very file reaches the real runtime at
    the grpcEndpoint the ServingRuntime names (port:N, the pod's loopback) and serves its model."""
    spi = subprocess.Popen([sys.executable, str(REPO / "runtimes" / "spi" / "tests" / "spi_runtime.py"), "--listen",
                            "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    controller = None
    try:
        first = json.loads(spi.stdout.readline())
        assert first["event"] == "listening", first
        port = int(first["endpoint"].rpartition(":")[2])
        template = tmp_path / "pod-template.yaml"
        template.write_text(yaml.safe_dump({
            "metadata": {"labels": {"app.kubernetes.io/name": "densemesh", "app.kubernetes.io/component": "meshd"}},
            "spec": {"containers": [{"name": "meshd", "image": "densemesh/meshd:test", "args": ["serve"],
                                     "volumeMounts": [{"name": "cache", "mountPath": "/var/cache/densemesh"}]}],
                     "volumes": [{"name": "cache", "emptyDir": {}}]},
        }))
        runtime = {
            "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
            "metadata": {"name": "custom-rt", "namespace": "default"},
            "spec": {"supportedModelFormats": [{"name": "custom", "autoSelect": True}], "multiModel": True,
                     "grpcEndpoint": f"port:{port}",
                     "containers": [{"name": "runtime", "image": "example/spi-runtime:1",
                                     "ports": [{"containerPort": port}]}]},
        }
        kube.apply(runtime)
        # The runtime's Deployment needs no mesh; a mesh endpoint nobody listens at will do.
        controller = Controller(kube, f"127.0.0.1:{free_port()}", tmp_path, "--meshd-pod-template", str(template))
        config_map = wait_for(lambda: kube.get("configmap", "densemesh-custom-rt-runtime-config"), 30,
                              "the runtime's --runtime-config")
        assert config_map["metadata"]["ownerReferences"][0]["kind"] == "ServingRuntime"
        file = config_map["data"]["runtimes.yaml"]
        assert yaml.safe_load(file) == {"runtimes": [{
            "kind": "spi", "name": "custom-rt", "supportedModelFormats": [{"name": "custom", "autoSelect": True}],
            "endpoint": f"port:{port}"}]}

        deployment = wait_for(lambda: kube.get("deployment", "densemesh-custom-rt"), 30, "the runtime's Deployment")
        pod = deployment["spec"]["template"]
        assert [c["name"] for c in pod["spec"]["containers"]] == ["meshd", "runtime"]
        meshd, server = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in meshd["env"]}
        assert env["DENSEMESH_RUNTIME_CONFIG"] == "/etc/densemesh/runtime-config/runtimes.yaml"
        assert env["DENSEMESH_MODEL_TYPES"] == "custom"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["densemesh-runtime-config"]["configMap"]["name"] == "densemesh-custom-rt-runtime-config"
        mounted = {m["mountPath"]: m["name"] for m in meshd["volumeMounts"]}
        assert mounted["/etc/densemesh/runtime-config"] == "densemesh-runtime-config"
        assert {m["mountPath"] for m in server["volumeMounts"]} == {"/var/cache/densemesh", "/models"}, \
            "the server sees meshd's model cache at the same path"
        digest = pod["metadata"]["annotations"]["densemesh.io/runtime-config-sha256"]

        # meshd as the pod would run it: with exactly the rendered file.
        (tmp_path / "runtimes.yaml").write_text(file)
        repo = tmp_path / "repo"
        repo.mkdir()
        server = start_meshd(repo, "--runtime-config", str(tmp_path / "runtimes.yaml"))
        model = tmp_path / "doubler" / "model.json"
        model.parent.mkdir()
        model.write_text('{"factor": 3.0, "load_size": 300000}')
        pb2, pb2_grpc = mmesh
        pb2_grpc.ModelMeshStub(server.channel).registerModel(
            pb2.RegisterModelRequest(modelId="tripler", modelInfo=pb2.ModelInfo(type="custom", path=str(model))))
        client = grpcclient.InferenceServerClient(server.grpc_addr)
        x = grpcclient.InferInput("x", [2], "FP32")
        x.set_data_from_numpy(np.array([1.0, -2.0], dtype=np.float32))
        assert client.infer("tripler", [x]).as_numpy("y").tolist() == [3.0, -6.0]
        client.close()

        # A changed runtime rewrites the file and rolls the pods, which read it once at start.
        runtime["spec"]["grpcDataEndpoint"] = f"port:{port}"
        kube.apply(runtime)
        wait_for(lambda: "dataEndpoint" in kube.get("configmap", "densemesh-custom-rt-runtime-config")["data"]["runtimes.yaml"],
                 30, "the file to follow the runtime")
        wait_for(lambda: kube.get("deployment", "densemesh-custom-rt")["spec"]["template"]["metadata"]["annotations"]
                 ["densemesh.io/runtime-config-sha256"] != digest, 30, "the pods to roll with the new file")
        # A runtime that drops its containers is meshd's own again: no file.
        kube.apply({**runtime, "spec": {"supportedModelFormats": [{"name": "custom"}], "multiModel": True}})
        wait_for(lambda: kube.get("configmap", "densemesh-custom-rt-runtime-config") is None, 30,
                 "the unneeded file to go")
        pod = kube.get("deployment", "densemesh-custom-rt")["spec"]["template"]
        assert [c["name"] for c in pod["spec"]["containers"]] == ["meshd"]
    finally:
        if controller:
            controller.stop()
            print(controller.logs())
        spi.terminate()
        spi.wait(timeout=10)


def test_an_mlserver_runtime_gets_a_runtime_file_meshd_drives_mlserver_by(kube, tmp_path, start_meshd, mmesh, trained):
    """modelmesh-serving's MLServer ServingRuntime shape (builtInAdapter.serverType mlserver): the rendered
    file points meshd at MLServer's data port and at the repository both containers share, and a real
    meshd given that file loads a scikit-learn model into a real MLServer there."""
    models, expected = trained
    repository = tmp_path / "mlserver-models"
    repository.mkdir()
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {"MLSERVER_HOST": "127.0.0.1", "MLSERVER_GRPC_PORT": str(grpc_port), "MLSERVER_HTTP_PORT": str(http_port),
           "MLSERVER_METRICS_PORT": str(metrics_port), "MLSERVER_PARALLEL_WORKERS": "0",
           "MLSERVER_LOAD_MODELS_AT_STARTUP": "false", "MLSERVER_MODELS_DIR": f"{repository}/"}
    # The container the ServingRuntime declares, run here as the pod would run it.
    mlserver = subprocess.Popen([str(MLSERVER / "mlserver"), "start", str(repository)], env={**os.environ, **env},
                                stdout=open(tmp_path / "mlserver.log", "wb"), stderr=subprocess.STDOUT)
    controller = None
    try:
        template = tmp_path / "pod-template.yaml"
        template.write_text(yaml.safe_dump({
            "metadata": {"labels": {"app.kubernetes.io/name": "densemesh", "app.kubernetes.io/component": "meshd"}},
            "spec": {"containers": [{"name": "meshd", "image": "densemesh/meshd:test", "args": ["serve"]}]},
        }))
        kube.apply({
            "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
            "metadata": {"name": "mlserver-1.x", "namespace": "default"},
            "spec": {"supportedModelFormats": [{"name": "sklearn", "version": "1", "autoSelect": True}],
                     "multiModel": True, "grpcEndpoint": "port:8085", "grpcDataEndpoint": f"port:{grpc_port}",
                     "containers": [{"name": "mlserver", "image": "seldonio/mlserver:1.7.1",
                                     "env": [{"name": k, "value": v} for k, v in env.items()]}],
                     "builtInAdapter": {"serverType": "mlserver", "runtimeManagementPort": 8001,
                                        "modelLoadingTimeoutMillis": 120000}},
        })
        controller = Controller(kube, f"127.0.0.1:{free_port()}", tmp_path, "--meshd-pod-template", str(template))
        config_map = wait_for(lambda: kube.get("configmap", "densemesh-mlserver-1.x-runtime-config"), 30,
                              "the runtime's --runtime-config")
        file = config_map["data"]["runtimes.yaml"]
        assert yaml.safe_load(file) == {"runtimes": [{
            "kind": "v2", "name": "mlserver-1.x",
            "supportedModelFormats": [{"name": "sklearn", "version": "1", "autoSelect": True}],
            "endpoint": f"127.0.0.1:{grpc_port}", "repository": str(repository), "timeouts": {"load": "120000ms"}}]}
        pod = wait_for(lambda: kube.get("deployment", "densemesh-mlserver-1.x"), 30, "the Deployment")["spec"]["template"]
        for container in pod["spec"]["containers"]:
            assert {"name": "densemesh-repository", "mountPath": str(repository)} in container["volumeMounts"], \
                "meshd and MLServer share the repository"

        (tmp_path / "runtimes.yaml").write_text(file)
        empty = tmp_path / "repo"
        empty.mkdir()
        server = start_meshd(empty, "--runtime-config", str(tmp_path / "runtimes.yaml"), "--local-model-roots",
                             str(models))
        pb2, pb2_grpc = mmesh
        pb2_grpc.ModelMeshStub(server.channel).registerModel(pb2.RegisterModelRequest(
            modelId="iris-sk", modelInfo=pb2.ModelInfo(type="sklearn", path=str(models / "sklearn.joblib"))))
        query = np.array(expected["input"], dtype=np.float64)
        assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]
        assert (repository / "iris-sk" / "model-settings.json").is_file(), "meshd wrote where MLServer reads"
    finally:
        if controller:
            controller.stop()
            print(controller.logs())
        mlserver.kill()
        mlserver.wait(timeout=10)


def inference_graph(name, nodes):
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "InferenceGraph",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"nodes": nodes}}


def ready_condition(obj):
    return next((c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)


def test_an_inference_graph_waits_for_its_services_then_serves_and_a_bad_one_says_why(
        s3, mesh, kube, controller, admin_api):
    _, x, expected = s3
    pod_a, pod_b = mesh
    # The graph first: its InferenceServices are not registered yet, so it waits, saying so.
    pair = inference_graph("pair", {"root": {"routerType": "Ensemble", "steps": [
        {"name": "first", "serviceName": "ga"}, {"name": "second", "serviceName": "gb"}]}})
    kube.apply(pair)

    def waiting():
        c = ready_condition(kube.get("ig", "pair"))
        return c and c["status"] == "False" and c["reason"] == "ServiceNotRegistered" and c
    c = wait_for(waiting, 30, "the graph to wait for its services")
    assert "is not a registered model or vmodel" in c["message"], c

    kube.apply(RUNTIME, isvc("ga", "s3://models/dense/a/model.onnx"), isvc("gb", "s3://models/dense/b/model.onnx"))
    kube.kubectl("wait", "--for=condition=Ready", "ig/pair", "--timeout=90s", timeout=100)
    obj = kube.get("ig", "pair")
    assert obj["status"]["url"] == "http://127.0.0.1:8008/v2/models/pair/infer", obj["status"]
    assert "serving.kserve.io/densemesh" in obj["metadata"]["finalizers"]
    table = kube.kubectl("get", "ig").stdout.splitlines()
    assert table[0].split() == ["NAME", "URL", "READY", "AGE"], table
    assert table[1].split()[2] == "True", table
    # Both InferenceServices are loaded now: ready means loaded, as ModelReady on the graph says.
    for name in ("ga", "gb"):
        assert [c["status"] for c in kube.get("isvc", name)["status"]["conditions"] if c["type"] == "Ready"] == ["True"]

    # Called through the other pod by the graph's name, like a model.
    response = pod_b.stub.ModelInfer(raw_request("pair", [("x", "FP32", x)]), timeout=30)
    outputs = {o.name: np.frombuffer(raw, dtype=np.float32).reshape(x.shape[0], -1)
               for o, raw in zip(response.outputs, response.raw_output_contents)}
    assert set(outputs) == {"first.y", "second.y"}, list(outputs)
    np.testing.assert_allclose(outputs["first.y"], expected["a"], rtol=1e-5)
    np.testing.assert_allclose(outputs["second.y"], expected["b"], rtol=1e-5)

    # A graph the mesh refuses: Ready=False with the mesh's message; fixed, it serves.
    bad = inference_graph("picky", {"root": {"routerType": "Switch", "steps": [
        {"serviceName": "ga", "condition": "inputs.*.data"}]}})
    kube.apply(bad)

    def refused():
        c = ready_condition(kube.get("ig", "picky"))
        return c and c["status"] == "False" and c["reason"] == "InvalidSpec" and c
    c = wait_for(refused, 30, "the bad graph to be refused")
    assert "inputs.*.data" in c["message"], c
    assert "url" not in kube.get("ig", "picky")["status"]
    bad["spec"]["nodes"]["root"]["steps"][0]["condition"] = 'inputs.#(name=="x").data.#(>-1000)'
    kube.apply(bad)
    kube.kubectl("wait", "--for=condition=Ready", "ig/picky", "--timeout=60s", timeout=70)

    # Deleted: the finalizer deletes the graph from the mesh before the object goes.
    pb2, pb2_grpc = admin_api
    stub = pb2_grpc.AdminStub(pod_a.channel)
    assert stub.GetGraph(pb2.GetGraphRequest(name="pair")).name == "pair"
    kube.kubectl("delete", "ig", "pair", "--timeout=60s", timeout=70)
    with pytest.raises(grpc.RpcError) as gone:
        stub.GetGraph(pb2.GetGraphRequest(name="pair"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as unknown:
        pod_b.stub.ModelInfer(raw_request("pair", [("x", "FP32", x)]), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert [g.name for g in stub.ListGraphs(pb2.ListGraphsRequest()).graphs] == ["picky"]
    assert controller.proc.poll() is None, controller.logs()


def test_a_runtime_the_controller_cannot_render_gets_a_warning_event_saying_why(kube, tmp_path):
    """A ServingRuntime meshd cannot be given a --runtime-config for gets no ConfigMap and no Deployment,
    and a Warning Event on it (ServingRuntime has no status to carry the reason) saying what to change;
    once fixed, its Deployment is made."""
    template = tmp_path / "pod-template.yaml"
    template.write_text(yaml.safe_dump({
        "metadata": {"labels": {"app.kubernetes.io/name": "densemesh", "app.kubernetes.io/component": "meshd"}},
        "spec": {"containers": [{"name": "meshd", "image": "densemesh/meshd:test", "args": ["serve"]}]},
    }))
    runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": "broken-rt", "namespace": "default"},
        "spec": {"supportedModelFormats": [{"name": "sklearn", "autoSelect": True}], "multiModel": True,
                 "builtInAdapter": {"serverType": "mlserver", "modelLoadingTimeoutMillis": 0},
                 "containers": [{"name": "mlserver", "image": "seldonio/mlserver:1.7.1"}]},
    }
    kube.apply(runtime)
    controller = Controller(kube, f"127.0.0.1:{free_port()}", tmp_path, "--meshd-pod-template", str(template))
    try:
        def warnings():
            r = kube.kubectl("get", "events.events.k8s.io", "-n", "default", "-o", "json", check=False)
            items = json.loads(r.stdout)["items"] if r.returncode == 0 else []
            return [e for e in items if (e.get("regarding") or {}).get("name") == "broken-rt"]

        [event] = wait_for(warnings, 30, "the runtime's Warning Event")
        assert event["type"] == "Warning" and event["reason"] == "InvalidSpec", event
        assert event["action"] == "RenderRuntimeConfig", event
        assert event["regarding"]["kind"] == "ServingRuntime" and event["regarding"]["namespace"] == "default"
        assert "builtInAdapter.modelLoadingTimeoutMillis 0 is not positive" in event["note"], event["note"]
        assert event["reportingController"] == "densemesh-controller"
        # kubectl describe reads the core v1 view of the same Event.
        described = kube.kubectl("get", "events", "-n", "default", "-o", "json").stdout
        assert "modelLoadingTimeoutMillis 0 is not positive" in described
        assert kube.get("configmap", "densemesh-broken-rt-runtime-config") is None
        assert kube.get("deployment", "densemesh-broken-rt") is None

        runtime["spec"]["builtInAdapter"]["modelLoadingTimeoutMillis"] = 90000
        kube.apply(runtime)
        wait_for(lambda: kube.get("deployment", "densemesh-broken-rt"), 30, "the fixed runtime's Deployment")
        assert "90000ms" in kube.get("configmap", "densemesh-broken-rt-runtime-config")["data"]["runtimes.yaml"]
        assert len(warnings()) == 1, "a runtime that renders gets no further warning"
    finally:
        controller.stop()
        print(controller.logs())
