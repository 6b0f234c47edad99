"""meshd with its registry on a real etcd: registrations outlive the process; an etcd outage leaves
loaded models serving and answers registry writes with UNAVAILABLE."""
import os
import shutil
import time
import socket
import subprocess
import sys
import threading
import tempfile
from pathlib import Path

import grpc
import pytest

from certs import issue, make_ca
from meshd import EXAMPLES, REPO, raw_request, wait_for

import numpy as np

X = np.ones((1, 4), dtype=np.float32)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """Debian's etcd on free loopback ports with a temporary data dir; restartable on the same dir."""

    def __init__(self, certs=None):
        """With `certs` (see `make_certificates`), clients must come over TLS with a certificate of its CA."""
        self.dir = tempfile.TemporaryDirectory(prefix="etcd-")
        self.client, self.peer = free_port(), free_port()
        self.certs = certs
        self.endpoint = f"{'https' if certs else 'http'}://127.0.0.1:{self.client}"
        self.proc = None
        self.start()

    def start(self):
        peer = f"http://127.0.0.1:{self.peer}"
        binary = shutil.which("etcd")
        assert binary, "etcd must be installed (Debian's etcd-server; scripts/setup.sh installs it)"
        tls = [] if not self.certs else [
            "--cert-file", str(self.certs / "server.crt"), "--key-file", str(self.certs / "server.key"),
            "--trusted-ca-file", str(self.certs / "ca.crt"), "--client-cert-auth"]
        self.proc = subprocess.Popen(
            [binary, "--name", "e2e", "--data-dir", str(Path(self.dir.name) / "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"e2e={peer}",
             *tls],
            stdout=subprocess.DEVNULL, stderr=open(Path(self.dir.name) / "etcd.log", "ab"))

        def healthy():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.client)) == 0

        wait_for(healthy, 30, "etcd to listen")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def etcd():
    e = Etcd()
    yield e
    e.stop()
    e.dir.cleanup()


def mm(server, mmesh):
    pb2, pb2_grpc = mmesh
    return pb2, pb2_grpc.ModelMeshStub(server.channel)


def test_registrations_outlive_meshd(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    first = start_meshd(repo, "--etcd", etcd.endpoint, "--etcd-prefix", "e2e")
    pb2, stub = mm(first, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub.registerModel(pb2.RegisterModelRequest(modelId="kept", modelInfo=info))
    stub.setVModel(pb2.SetVModelRequest(vModelId="alias", targetModelId="kept"))
    assert first.terminate() == 0

    second = start_meshd(repo, "--etcd", etcd.endpoint, "--etcd-prefix", "e2e")
    pb2, stub = mm(second, mmesh)
    status = stub.getModelStatus(pb2.GetStatusRequest(modelId="kept"))
    assert pb2.ModelStatusInfo.ModelStatus.Name(status.status) == "NOT_LOADED"
    response = second.stub.ModelInfer(raw_request("ignored", [("input", "FP32", X)]), metadata=[("mm-vmodel-id", "alias")])
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    # Another prefix is another mesh.
    other = start_meshd(repo, "--etcd", etcd.endpoint, "--etcd-prefix", "elsewhere")
    pb2, stub = mm(other, mmesh)
    assert pb2.ModelStatusInfo.ModelStatus.Name(stub.getModelStatus(pb2.GetStatusRequest(modelId="kept")).status) == "NOT_FOUND"


def make_certificates(dir):
    """A CA, etcd's certificate for 127.0.0.1 and a client certificate: ca.crt, server.crt/key, and
    tls.crt/key (a Kubernetes TLS secret's names, as meshd reads them)."""
    make_ca(dir, "ca")
    for name in ("server", "tls"):
        issue(dir, name, "ca")


def test_meshd_reaches_an_etcd_that_requires_client_certificates(start_meshd, mmesh, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    secret = tmp_path / "etcd-tls"  # what the chart mounts: the CA and the client's pair, nothing else
    secret.mkdir()
    for name in ("ca.crt", "tls.crt", "tls.key"):
        shutil.copy(certs / name, secret / name)
    etcd = Etcd(certs)
    try:
        repo = tmp_path / "repo"
        repo.mkdir()
        server = start_meshd(repo, "--etcd", etcd.endpoint, "--etcd-tls-dir", str(secret))
        pb2, stub = mm(server, mmesh)
        info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
        stub.registerModel(pb2.RegisterModelRequest(modelId="over-tls", modelInfo=info))
        response = server.stub.ModelInfer(raw_request("over-tls", [("input", "FP32", X)]))
        assert [o.name for o in response.outputs] == ["label", "probabilities"]
        # Without the flag an https endpoint is refused at start, naming the flag.
        binary = os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))
        refused = subprocess.run([binary, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
                                  "--metrics-addr", "127.0.0.1:0", "--model-repo", str(repo), "--etcd", etcd.endpoint],
                                 capture_output=True, text=True, timeout=60, env={**os.environ, "RUST_BACKTRACE": "0"})
        assert refused.returncode != 0 and "--etcd-tls-dir" in refused.stderr, refused.stderr[-2000:]
    finally:
        etcd.stop()


def test_an_etcd_outage_keeps_loaded_models_serving(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = start_meshd(repo, "--etcd", etcd.endpoint)
    pb2, stub = mm(server, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info, loadNow=True, sync=True))
    etcd.stop()
    for _ in range(20):
        assert server.stub.ModelInfer(raw_request("m", [("input", "FP32", X)])).outputs[0].name == "label"
    with pytest.raises(grpc.RpcError) as e:
        stub.registerModel(pb2.RegisterModelRequest(modelId="n", modelInfo=info), timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    etcd.start()
    # Back: writes succeed again and the view follows them.
    def registered():
        try:
            stub.registerModel(pb2.RegisterModelRequest(modelId="n", modelInfo=info), timeout=10)
            return True
        except grpc.RpcError:
            return False

    wait_for(registered, 60, "registration after etcd returns")
    assert server.stub.ModelInfer(raw_request("n", [("input", "FP32", X)])).outputs[0].name == "label"


def test_an_etcd_outage_past_its_grace_refuses_new_loads_with_the_reason_and_recovers(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = start_meshd(repo, "--etcd", etcd.endpoint, "--lease-ttl", "3s", "--registry-outage-grace", "2s")
    pb2, stub = mm(server, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub.registerModel(pb2.RegisterModelRequest(modelId="loaded", modelInfo=info, loadNow=True, sync=True))
    stub.registerModel(pb2.RegisterModelRequest(modelId="cold", modelInfo=info))
    etcd.stop()
    wait_for(lambda: server.metrics().get("densemesh_registry_up") == 0, 30, "the heartbeat to notice the outage")
    time.sleep(2.5)  # past --registry-outage-grace
    with pytest.raises(grpc.RpcError) as e:
        server.stub.ModelInfer(raw_request("cold", [("input", "FP32", X)]))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "registry (etcd) has not answered" in e.value.details() and "cold" in e.value.details(), e.value.details()
    assert server.stub.ModelInfer(raw_request("loaded", [("input", "FP32", X)])).outputs[0].name == "label"
    etcd.start()

    def cold_loads():
        try:
            return server.stub.ModelInfer(raw_request("cold", [("input", "FP32", X)])).outputs[0].name == "label"
        except grpc.RpcError:
            return False

    wait_for(cold_loads, 60, "new loads once etcd answers again")
    assert server.metrics()["densemesh_registry_up"] == 1


# Marks a management call as forwarded by a peer: the pod loads the model itself, as placement chose it.
HERE = [("densemesh-forwarded", "test")]


def test_every_pod_sees_every_copy_and_a_dead_pods_copies_vanish(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "2s"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a")
    b = start_meshd(repo, *common, "--instance-id", "pod-b")
    pb2, stub_a = mm(a, mmesh)
    _, stub_b = mm(b, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub_a.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info, loadNow=True, sync=True))

    def copies_seen_by_b():
        s = stub_b.getModelStatus(pb2.GetStatusRequest(modelId="m"))
        return {(c.location, pb2.ModelStatusInfo.ModelStatus.Name(c.copyStatus)) for c in s.modelCopyInfos}

    wait_for(lambda: copies_seen_by_b() == {("pod-a", "LOADED")}, 30, "pod-b to see pod-a's copy")
    assert pb2.ModelStatusInfo.ModelStatus.Name(stub_b.getModelStatus(pb2.GetStatusRequest(modelId="m")).status) == "LOADED"
    # ensureLoaded is satisfied by pod-a's copy (placement: any copy will do); one marked forwarded, as a
    # peer sends it when placement picked this pod, loads a copy here.
    assert stub_b.ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True)).status == pb2.ModelStatusInfo.LOADED
    assert copies_seen_by_b() == {("pod-a", "LOADED")}, "no second copy for an ensureLoaded"
    stub_b.ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True), metadata=HERE)
    wait_for(lambda: copies_seen_by_b() == {("pod-a", "LOADED"), ("pod-b", "LOADED")}, 30, "both copies")

    # SIGKILL: no goodbye; the lease runs out and pod-a's copy vanishes from everyone's view.
    a.proc.kill()
    a.proc.wait()
    wait_for(lambda: copies_seen_by_b() == {("pod-b", "LOADED")}, 30, "pod-a's copy to expire with its lease")

    # SIGTERM: the pod revokes its lease on the way out, so its copy vanishes at once.
    c = start_meshd(repo, "--etcd", etcd.endpoint, "--instance-id", "pod-c", "--lease-ttl", "600s")
    mm(c, mmesh)[1].ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True), metadata=HERE)
    wait_for(lambda: ("pod-c", "LOADED") in copies_seen_by_b(), 30, "pod-c's copy")
    assert c.terminate() == 0
    wait_for(lambda: ("pod-c", "LOADED") not in copies_seen_by_b(), 10, "pod-c's copy to go with its revoked lease")


@pytest.mark.parametrize("wire", ["true", "false"])
def test_requests_reach_the_pod_that_holds_the_model_and_survive_its_death(start_meshd, etcd, mmesh, tmp_path, wire):
    """Over the pod wire, and over HTTP/2 when the forwarding pod has it off (--peer-wire false)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "30s"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a")
    b = start_meshd(repo, *common, "--instance-id", "pod-b", "--peer-wire", wire)
    pb2, stub = mm(a, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info))
    want = a.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))  # loads on pod-a

    def b_sees_a_copy():
        s = mm(b, mmesh)[1].getModelStatus(pb2.GetStatusRequest(modelId="m"))
        return any(c.location == "pod-a" for c in s.modelCopyInfos)

    wait_for(b_sees_a_copy, 30, "pod-b to see pod-a's copy")
    for _ in range(10):
        got = b.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))
        assert got.raw_output_contents == want.raw_output_contents
    metrics_b, metrics_a = b.metrics(), a.metrics()
    assert metrics_b["densemesh_models_loaded"] == 0, "pod-b forwarded instead of loading a second copy"
    assert metrics_b['densemesh_forwarded_requests_total{result="ok"}'] == 10
    assert metrics_a['densemesh_requests_total{method="ModelInfer",code="OK"}'] == 11, "one hop: pod-a served them"
    assert ("pod wire connected" in b.log_path.read_text(errors="replace")) == (wire == "true")

    # pod-a dies without a goodbye; its placement lingers until the lease runs out, yet pod-b answers
    # at once by loading the model itself.
    a.proc.kill()
    a.proc.wait()
    got = b.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))
    assert got.raw_output_contents == want.raw_output_contents
    assert b.metrics()["densemesh_models_loaded"] == 1


def test_two_pods_racing_to_load_end_with_one_copy(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--copy-idle-period", "2s"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a")
    b = start_meshd(repo, *common, "--instance-id", "pod-b")
    pb2, stub_a = mm(a, mmesh)
    _, stub_b = mm(b, mmesh)
    stub_a.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))))
    # Both load at once (as two first requests racing on two pods would).
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True), metadata=HERE),
                      [stub_a, stub_b]))

    def holders():
        s = stub_a.getModelStatus(pb2.GetStatusRequest(modelId="m"))
        return sorted(c.location for c in s.modelCopyInfos if pb2.ModelStatusInfo.ModelStatus.Name(c.copyStatus) == "LOADED")

    wait_for(lambda: holders() == ["pod-a", "pod-b"], 30, "both copies")
    # Once idle past --copy-idle-period, the extra copy goes and exactly one stays.
    wait_for(lambda: holders() == ["pod-a"], 30, "the extra copy to be dropped")
    assert b.stub.ModelInfer(raw_request("m", [("input", "FP32", X)])).outputs[0].name == "label"
    assert b.metrics()["densemesh_models_loaded"] == 0, "pod-b forwards to the remaining copy"


def test_a_draining_pod_hands_its_recent_models_to_another_before_leaving(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    a = start_meshd(repo, "--etcd", etcd.endpoint, "--instance-id", "pod-a")
    b = start_meshd(repo, "--etcd", etcd.endpoint, "--instance-id", "pod-b")
    pb2, stub_a = mm(a, mmesh)
    _, stub_b = mm(b, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub_a.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=info))
    a.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))  # recently used, on pod-a only
    assert b.metrics()["densemesh_models_loaded"] == 0
    assert a.terminate() == 0
    # pod-b loaded it during pod-a's drain: its first request finds the model ready.
    assert b.metrics()["densemesh_models_loaded"] == 1
    s = stub_b.getModelStatus(pb2.GetStatusRequest(modelId="m"))
    assert [(c.location, pb2.ModelStatusInfo.ModelStatus.Name(c.copyStatus)) for c in s.modelCopyInfos] == [("pod-b", "LOADED")]
    assert b.stub.ModelInfer(raw_request("m", [("input", "FP32", X)])).outputs[0].name == "label"


def test_a_busy_model_gets_a_second_copy(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--copy-add-rate", "120", "--copy-check-interval", "1s"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a")
    b = start_meshd(repo, *common, "--instance-id", "pod-b")
    pb2, stub_a = mm(a, mmesh)
    stub_a.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))))
    quiet = start_meshd(repo, "--etcd", etcd.endpoint, "--instance-id", "pod-q", "--copy-add-rate", "0")
    assert quiet.metrics()["densemesh_models_loaded"] == 0

    def holders():
        s = stub_a.getModelStatus(pb2.GetStatusRequest(modelId="m"))
        return sorted(c.location for c in s.modelCopyInfos if pb2.ModelStatusInfo.ModelStatus.Name(c.copyStatus) == "LOADED")

    # Well above 120 requests a minute on pod-a's copy, for a few check intervals.
    deadline = time.monotonic() + 30
    while len(holders()) < 2 and time.monotonic() < deadline:
        for _ in range(20):
            a.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))
    assert len(holders()) == 2, holders()
    assert "pod-a" in holders()


def test_instances_publish_their_load(start_meshd, etcd, mmesh, tmp_path):
    import json
    import subprocess

    from test_meshctl import MESHCTL

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(EXAMPLES / "iris-logreg", repo / "iris")
    a = start_meshd(repo, "--etcd", etcd.endpoint, "--instance-id", "pod-a", "--lease-ttl", "1s")

    def instances():
        r = subprocess.run([MESHCTL, "--addr", a.grpc_addr, "-o", "json", "instances"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return {i["instance_id"]: i for i in json.loads(r.stdout)}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for _ in range(50):
            a.stub.ModelInfer(raw_request("iris", [("input", "FP32", X)]))
        me = instances().get("pod-a")
        if me and me["requests_per_minute"] > 0 and me["models_loaded"] == 1:
            break
    assert me["endpoint"] == a.grpc_addr and me["used_bytes"] > 0 and not me["draining"], me
    assert me["requests_per_minute"] > 0 and me["models_loaded"] == 1, me


def slow_model(parent, name="slow"):
    """A dense model (64 layers of 256x256) whose inferences take milliseconds, so requests overlap;
    outside any pod's repository, so it is registered through the API."""
    if str(REPO / "examples") not in sys.path:
        sys.path.insert(0, str(REPO / "examples"))
    from generate_models import make_dense_model

    make_dense_model(parent / name / "model.onnx", 16)
    return parent / name


def holders_of(stub, pb2, model):
    s = stub.getModelStatus(pb2.GetStatusRequest(modelId=model))
    return sorted(c.location for c in s.modelCopyInfos if pb2.ModelStatusInfo.ModelStatus.Name(c.copyStatus) == "LOADED")


def test_a_request_whose_copy_dies_mid_run_reaches_another_copy_without_loading_here(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    model_dir = slow_model(tmp_path)
    # A long lease: the killed pod's copy stays in everyone's view for the whole test, so the entry pod
    # keeps choosing it first. No copies by load: the copies are the ones the test places.
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "60s", "--copy-add-rate", "0", "--copy-add-queue-wait", "0"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a")
    b = start_meshd(repo, *common, "--instance-id", "pod-b")
    c = start_meshd(repo, *common, "--instance-id", "pod-c")
    pb2, stub_b = mm(b, mmesh)
    stub_b.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=pb2.ModelInfo(type="onnx", path=str(model_dir))))
    # pod-c loads first, pod-a second: pod-a's copy is the most recent, so pod-b tries it first.
    mm(c, mmesh)[1].ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True), metadata=HERE)
    wait_for(lambda: holders_of(stub_b, pb2, "m") == ["pod-c"], 30, "pod-b to see pod-c's copy")
    mm(a, mmesh)[1].ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True), metadata=HERE)
    wait_for(lambda: holders_of(stub_b, pb2, "m") == ["pod-a", "pod-c"], 30, "pod-b to see both copies")

    x = np.random.default_rng(1).normal(size=(64, 256)).astype(np.float32)
    request = raw_request("m", [("x", "FP32", x)])
    want = b.stub.ModelInfer(request).raw_output_contents
    assert a.metrics().get('densemesh_requests_total{method="ModelInfer",code="OK"}') == 1, "pod-a's copy is tried first"

    # The model's own answer is final: not retried on pod-c, not loaded on pod-b.
    with pytest.raises(grpc.RpcError) as e:
        b.stub.ModelInfer(raw_request("m", [("nope", "FP32", x)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert b.metrics()['densemesh_forwarded_requests_total{result="error"}'] == 1
    asked_c = sum(v for k, v in c.metrics().items() if k.startswith('densemesh_requests_total{method="ModelInfer"'))
    assert asked_c == 0, "pod-c was never asked"

    # Clients keep sending through pod-b while pod-a is SIGKILLed.
    answers, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                answers.append(b.stub.ModelInfer(request, timeout=60).raw_output_contents)
            except grpc.RpcError as err:
                errors.append(f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: a.metrics().get('densemesh_requests_total{method="ModelInfer",code="OK"}', 0) >= 10, 60, "pod-a serving")
        a.proc.kill()
        a.proc.wait()
        after_kill = len(answers)
        wait_for(lambda: len(answers) >= after_kill + 20 or errors, 60, "answers after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert all(got == want for got in answers)
    metrics_b = b.metrics()
    assert metrics_b['densemesh_forwarded_requests_total{result="retried"}'] >= 1, metrics_b
    assert metrics_b.get('densemesh_forwarded_requests_total{result="fallback"}', 0) == 0
    assert metrics_b["densemesh_models_loaded"] == 0, "pod-b never loaded the model itself"
    assert metrics_b.get('densemesh_model_loads_total{result="success"}', 0) == 0
    assert "pod-b" not in holders_of(stub_b, pb2, "m")
    assert c.metrics()['densemesh_requests_total{method="ModelInfer",code="OK"}'] >= 20, "pod-c served them"


def test_a_model_whose_inferences_queue_gets_a_copy_elsewhere(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    model_dir = slow_model(tmp_path)
    # The request-rate rule is off: only the queue wait can add the copy. One inference at a time on one
    # ONNX Runtime thread, so the wait does not shrink with the machine's core count.
    a = start_meshd(repo, "--etcd", etcd.endpoint, "--instance-id", "pod-a", "--infer-threads", "1", "--ort-threads", "1",
                    "--copy-add-rate", "0", "--copy-add-queue-wait", "10ms", "--copy-check-interval", "1s")
    b = start_meshd(repo, "--etcd", etcd.endpoint, "--instance-id", "pod-b", "--copy-add-rate", "0")
    pb2, stub_a = mm(a, mmesh)
    stub_a.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=pb2.ModelInfo(type="onnx", path=str(model_dir))))
    x = np.random.default_rng(2).normal(size=(128, 256)).astype(np.float32)
    request = raw_request("m", [("x", "FP32", x)])
    a.stub.ModelInfer(request)
    wait_for(lambda: holders_of(stub_a, pb2, "m") == ["pod-a"], 30, "pod-a's copy")

    # Eight clients on one inference thread: each request waits for several others.
    stop, errors = threading.Event(), []

    def client():
        while not stop.is_set():
            try:
                a.stub.ModelInfer(request, timeout=60)
            except grpc.RpcError as err:
                errors.append(f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: holders_of(stub_a, pb2, "m") == ["pod-a", "pod-b"], 30, "a copy on pod-b")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert b.metrics().get('densemesh_requests_total{method="ModelInfer",code="OK"}', 0) == 0, "pod-b got no requests: the copy came from pod-a's queue"


def test_a_pod_that_failed_a_model_gets_it_again_once_its_back_off_ends(start_meshd, etcd, mmesh, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    model_dir = tmp_path / "flaky"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"\x08\x07garbage that is not a model")
    # pod-b backs off for a second, pod-a for ten minutes: once pod-b's back-off is over, only
    # placement's reading of it decides whether pod-a may send the model there.
    common = ["--etcd", etcd.endpoint, "--copy-add-rate", "0", "--copy-add-queue-wait", "0"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a", "--load-retry-backoff", "10m", "--max-load-retry-backoff", "10m")
    b = start_meshd(repo, *common, "--instance-id", "pod-b", "--load-retry-backoff", "1s", "--max-load-retry-backoff", "1s")
    pb2, stub_a = mm(a, mmesh)
    stub_a.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=pb2.ModelInfo(type="onnx", path=str(model_dir))))
    request = raw_request("m", [("input", "FP32", X)])

    def copies_seen_by_a():
        s = stub_a.getModelStatus(pb2.GetStatusRequest(modelId="m"))
        return {(c.location, pb2.ModelStatusInfo.ModelStatus.Name(c.copyStatus)) for c in s.modelCopyInfos}

    # Both pods empty: pod-b loads it itself (ties go to the pod asked) and fails.
    with pytest.raises(grpc.RpcError) as e:
        b.stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in e.value.details(), e.value.details()
    wait_for(lambda: ("pod-b", "LOADING_FAILED") in copies_seen_by_a(), 30, "pod-a to see pod-b's failure")
    # pod-a never failed it, so it goes before pod-b (backing off, or failed before): it loads it and fails.
    with pytest.raises(grpc.RpcError) as e:
        a.stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert copies_seen_by_a() == {("pod-a", "LOADING_FAILED"), ("pod-b", "LOADING_FAILED")}

    # The model is fixed. pod-a is backing off for ten minutes; pod-b's failed record stays, yet once
    # its back-off ends pod-a sends the request there, and pod-b loads the model.
    shutil.copy(EXAMPLES / "iris-logreg" / "model.onnx", model_dir / "model.onnx")

    def served():
        try:
            return a.stub.ModelInfer(request, timeout=60)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in err.details(), err.details()
            return None

    assert [o.name for o in wait_for(served, 30, "pod-b to load the model once its back-off ends").outputs] == ["label", "probabilities"]
    metrics_a, metrics_b = a.metrics(), b.metrics()
    assert metrics_a['densemesh_forwarded_requests_total{result="ok"}'] == 1, "pod-b served it"
    assert metrics_a["densemesh_models_loaded"] == 0 and metrics_b["densemesh_models_loaded"] == 1
    assert metrics_a.get('densemesh_model_loads_total{result="failure"}') == 1, "pod-a kept to its own back-off"
    wait_for(lambda: copies_seen_by_a() == {("pod-a", "LOADING_FAILED"), ("pod-b", "LOADED")}, 30, "pod-b's copy")


def test_peers_reach_a_pod_at_its_advertised_address(start_meshd, etcd, mmesh, tmp_path):
    """--advertise-addr is what the other pods dial: pod-a publishes a host name (the bound port added),
    and pod-b's requests for its model reach it there."""
    import json

    from test_meshctl import MESHCTL

    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "30s"]
    a = start_meshd(repo, *common, "--instance-id", "pod-a", "--advertise-addr", "localhost")
    b = start_meshd(repo, *common, "--instance-id", "pod-b")
    r = subprocess.run([MESHCTL, "--addr", b.grpc_addr, "-o", "json", "instances"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    endpoints = {i["instance_id"]: i["endpoint"] for i in json.loads(r.stdout)}
    port = a.grpc_addr.rsplit(":", 1)[1]
    assert endpoints == {"pod-a": f"localhost:{port}", "pod-b": b.grpc_addr}
    pb2, stub = mm(a, mmesh)
    stub.registerModel(pb2.RegisterModelRequest(modelId="m", modelInfo=pb2.ModelInfo(
        type="onnx", path=str(EXAMPLES / "iris-logreg"))))
    a.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))  # loads on pod-a
    wait_for(lambda: any(c.location == "pod-a" for c in mm(b, mmesh)[1].getModelStatus(
        pb2.GetStatusRequest(modelId="m")).modelCopyInfos), 30, "pod-b to see pod-a's copy")
    b.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))
    assert b.metrics()['densemesh_forwarded_requests_total{result="ok"}'] == 1
    assert b.metrics()["densemesh_models_loaded"] == 0


def test_the_management_api_token_guards_changes_not_inference(start_meshd, etcd, mmesh, tmp_path):
    """--admin-token-file: registrations and Admin calls need the token, inference does not, pods hand it
    to each other when one asks another to load, and meshctl sends it from --token-file."""
    import json

    from test_meshctl import MESHCTL

    token = tmp_path / "token"
    token.write_text("e2e-t0ken-42\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "30s", "--admin-token-file", str(token)]
    a = start_meshd(repo, *common, "--instance-id", "pod-a")
    b = start_meshd(repo, *common, "--instance-id", "pod-b", "--capacity", "1")  # holds nothing
    pb2, stub_b = mm(b, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    request = pb2.RegisterModelRequest(modelId="m", modelInfo=info)
    for metadata in ([], [("authorization", "Bearer wrong")]):
        with pytest.raises(grpc.RpcError) as refused:
            stub_b.registerModel(request, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "--admin-token-file" in refused.value.details() and "e2e-t0ken" not in refused.value.details()
    auth = [("authorization", "Bearer e2e-t0ken-42")]
    stub_b.registerModel(request, metadata=auth)
    # pod-b cannot hold it, so it asks pod-a to load it: that call carries the token too.
    stub_b.ensureLoaded(pb2.EnsureLoadedRequest(modelId="m", sync=True), metadata=auth)
    assert a.metrics()["densemesh_models_loaded"] == 1
    # Inference stays open, through either pod.
    for pod in (a, b):
        got = pod.stub.ModelInfer(raw_request("m", [("input", "FP32", X)]))
        assert [o.name for o in got.outputs] == ["label", "probabilities"]

    def meshctl(*args):
        return subprocess.run([MESHCTL, "--addr", b.grpc_addr, "-o", "json", *args], capture_output=True,
                              text=True, timeout=60)

    r = meshctl("instances")
    assert r.returncode != 0 and "UNAUTHENTICATED" in (r.stderr + r.stdout).upper(), r.stderr
    r = meshctl("--token-file", str(token), "instances")
    assert r.returncode == 0, r.stderr
    assert {i["instance_id"] for i in json.loads(r.stdout)} == {"pod-a", "pod-b"}
    for line in (a.log_path.read_text() + b.log_path.read_text()).splitlines():
        assert "e2e-t0ken" not in line, f"the token is in a log line: {line}"
