"""meshd over TLS (--tls-cert/--tls-key, or --tls-dir laid out as a Kubernetes TLS secret): tritonclient
and REST over TLS; with mutual TLS, clients without a certificate or with one of another CA refused;
two pods forwarding to each other over mutual TLS on an etcd that requires client certificates; and a
certificate rotated under load with no request failing. Certificates are made with the openssl command
(scripts/setup.sh installs it), for 127.0.0.1 as an IP SAN."""
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from certs import issue, make_ca
from meshd import EXAMPLES, REPO, wait_for
from test_etcd import Etcd
from test_controller import s3  # noqa: F401  (moto's S3 with two models: a fixture)

X = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
FORWARDED_OK = 'densemesh_forwarded_requests_total{result="ok"}'


@pytest.fixture
def certs(tmp_path):
    """The mesh's CA `ca` with `server`, `client` and `server2` (a rotation's) certificates; `other`, a
    CA nobody trusts, with `stranger`."""
    directory = tmp_path / "certs"
    directory.mkdir()
    make_ca(directory, "ca")
    make_ca(directory, "other")
    for name in ("server", "client", "server2"):
        issue(directory, name, "ca")
    issue(directory, "stranger", "other")
    return directory


def secret(certs, target, name, with_ca=True):
    """A directory as Kubernetes mounts a TLS secret: files that are symlinks into `..data`, itself a
    symlink to a versioned directory, so an update swaps `..data` at once. Holds `name`'s pair as
    tls.crt/tls.key and the CA as ca.crt."""
    target.mkdir()
    write_secret_version(certs, target, name, with_ca)
    for file in ("tls.crt", "tls.key", *(("ca.crt",) if with_ca else ())):
        os.symlink(f"..data/{file}", target / file)
    return target


def write_secret_version(certs, target, name, with_ca=True):
    """Writes `name`'s pair as a new version of the secret at `target` and swaps `..data` to it."""
    version = target / f"..{name}-{time.monotonic_ns()}"
    version.mkdir()
    shutil.copy(certs / f"{name}.crt", version / "tls.crt")
    shutil.copy(certs / f"{name}.key", version / "tls.key")
    if with_ca:
        shutil.copy(certs / "ca.crt", version / "ca.crt")
    link = target / "..data_tmp"
    os.symlink(version.name, link)
    os.replace(link, target / "..data")


def triton(server, certs, identity="client", ca="ca"):
    """A tritonclient over TLS trusting `ca`, presenting `identity`'s certificate (None: none)."""
    pair = {} if identity is None else {
        "private_key": str(certs / f"{identity}.key"), "certificate_chain": str(certs / f"{identity}.crt")}
    return grpcclient.InferenceServerClient(server.grpc_addr, ssl=True, root_certificates=str(certs / f"{ca}.crt"),
                                            **pair)


def infer_iris(client, model="iris-logreg"):
    i = grpcclient.InferInput("input", list(X.shape), "FP32")
    i.set_data_from_numpy(X)
    return client.infer(model, [i]).as_numpy("label")


def answers_through(client, rounds, what):
    """Waits for `client`'s pod to answer iris's "iris" model (at first the pods have not found each other),
    then checks `rounds` more answers."""
    def answered():
        try:
            return infer_iris(client, "iris").tolist() == [0]
        except InferenceServerException:
            return False

    wait_for(answered, 60, what)
    for _ in range(rounds):
        assert infer_iris(client, "iris").tolist() == [0]


def https(server, certs, path, identity="client"):
    """GET on meshd's REST port over TLS: the status code, or the exception the handshake raised."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if identity:
        context.load_cert_chain(str(certs / f"{identity}.crt"), str(certs / f"{identity}.key"))
    try:
        with urllib.request.urlopen(f"https://{server.http_addr}{path}", context=context, timeout=10) as r:
            return r.status
    except (ssl.SSLError, ConnectionError, urllib.error.URLError) as e:
        return e


def served_certificate(server, certs):
    """The DER certificate a fresh TLS connection to meshd's gRPC port is served (mutual TLS: with the
    client's certificate)."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    context.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    context.set_alpn_protocols(["h2"])
    host, port = server.grpc_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.getpeercert(binary_form=True)


def der(certs, name):
    return ssl.PEM_cert_to_DER_cert((certs / f"{name}.crt").read_text())


def test_tritonclient_and_rest_over_tls(start_meshd, certs):
    server = start_meshd(EXAMPLES, "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"))
    client = triton(server, certs, identity=None)
    assert client.is_server_live() and client.is_server_ready()
    assert infer_iris(client).tolist() == [0]
    client.close()
    assert https(server, certs, "/v2/health/ready", identity=None) == 200
    # Plaintext to the TLS port gets nowhere.
    with grpc.insecure_channel(server.grpc_addr) as channel:
        from tritonclient.grpc import service_pb2, service_pb2_grpc
        with pytest.raises(grpc.RpcError) as refused:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_mutual_tls_refuses_clients_without_a_certificate_or_from_another_ca(start_meshd, certs, tmp_path):
    server = start_meshd(EXAMPLES, "--tls-dir", str(secret(certs, tmp_path / "tls", "server")))
    client = triton(server, certs)
    assert infer_iris(client).tolist() == [0]
    client.close()
    for identity in (None, "stranger"):
        refused = triton(server, certs, identity=identity)
        with pytest.raises(InferenceServerException):
            refused.is_server_live()
        refused.close()
    assert https(server, certs, "/v2/health/ready") == 200
    assert isinstance(https(server, certs, "/v2/health/ready", identity=None), Exception)
    assert isinstance(https(server, certs, "/v2/health/ready", identity="stranger"), Exception)
    # A client that does not trust the server's CA refuses it in turn.
    distrustful = triton(server, certs, identity="stranger", ca="other")
    with pytest.raises(InferenceServerException):
        distrustful.is_server_live()
    distrustful.close()

    # meshctl: --tls-ca and a client certificate; without the certificate it cannot reach meshd (exit 3).
    meshctl = os.environ.get("MESHCTL_BIN", str(REPO / "target" / "debug" / "meshctl"))
    tls_ca = ("--addr", server.grpc_addr, "--tls-ca", str(certs / "ca.crt"))
    pair = ("--tls-cert", str(certs / "client.crt"), "--tls-key", str(certs / "client.key"))
    listed = subprocess.run([meshctl, *tls_ca, *pair, "-o", "json", "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "iris-logreg" in listed.stdout, listed.stderr
    bare = subprocess.run([meshctl, *tls_ca, "list"], capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0, bare.stdout


def test_bad_certificate_files_stop_start_up_naming_the_file_and_flag(certs, tmp_path):
    binary = os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))

    def start(*args):
        return subprocess.run([binary, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
                               "--metrics-addr", "127.0.0.1:0", "--model-repo", str(EXAMPLES), *args],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "RUST_BACKTRACE": "0"})

    missing = tmp_path / "missing.key"
    failed = start("--tls-cert", str(certs / "server.crt"), "--tls-key", str(missing))
    assert failed.returncode != 0 and str(missing) in failed.stderr and "--tls-key" in failed.stderr, failed.stderr
    failed = start("--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "client.key"))
    assert failed.returncode != 0 and "does not go with" in failed.stderr, failed.stderr
    failed = start("--tls-dir", str(tmp_path))
    assert failed.returncode != 0 and "tls.crt" in failed.stderr and "--tls-dir" in failed.stderr, failed.stderr
    assert "panicked" not in failed.stderr


def test_two_pods_forward_over_mutual_tls_on_an_etcd_with_client_certificates(start_meshd, certs, tmp_path):
    # etcd's own certificate from the same CA (Etcd reads server.crt/key and ca.crt from one directory).
    etcd = Etcd(certs)
    try:
        repo = tmp_path / "repo"
        shutil.copytree(EXAMPLES / "iris-logreg", repo / "iris")
        tls = secret(certs, tmp_path / "tls", "server")
        common = ("--etcd", etcd.endpoint, "--etcd-tls-dir", str(tls), "--tls-dir", str(tls), "--lease-ttl", "3s")
        # pod-b offers no model type: every request it gets is forwarded to pod-a.
        b = start_meshd(repo, "--instance-id", "pod-b", "--model-types", "", *common)
        a = start_meshd(repo, "--instance-id", "pod-a", "--model-types", "onnx", *common)
        client = triton(b, certs)
        answers_through(client, 20, "pod-b to answer through pod-a")
        client.close()
        assert b.metrics().get(FORWARDED_OK, 0) >= 20, "pod-b forwarded the requests"
        assert a.metrics().get(FORWARDED_OK, 0) == 0
    finally:
        etcd.stop()
        etcd.dir.cleanup()


def test_pods_whose_certificates_name_a_service_forward_with_a_peer_name_and_serve_metrics_over_tls(
        start_meshd, certs, tmp_path):
    """As on Kubernetes: the pods' certificate names the service, not the pod IPs they are dialled at.
    --tls-peer-name verifies peers by that name; --metrics-tls serves the metrics port over TLS without
    asking a client certificate (the kubelet's probes present none)."""
    issue(certs, "pod", "ca", "DNS:meshd.test.svc")
    etcd = Etcd(certs)
    try:
        repo = tmp_path / "repo"
        shutil.copytree(EXAMPLES / "iris-logreg", repo / "iris")
        tls = secret(certs, tmp_path / "tls", "pod")
        common = ("--etcd", etcd.endpoint, "--etcd-tls-dir", str(tls), "--tls-dir", str(tls), "--lease-ttl", "3s",
                  "--tls-peer-name", "meshd.test.svc", "--metrics-tls", "true")
        b = start_meshd(repo, "--instance-id", "pod-b", "--model-types", "", *common)
        a = start_meshd(repo, "--instance-id", "pod-a", "--model-types", "onnx", *common)
        pair = {"private_key": str(certs / "client.key"), "certificate_chain": str(certs / "client.crt")}
        client = grpcclient.InferenceServerClient(
            b.grpc_addr, ssl=True, root_certificates=str(certs / "ca.crt"),
            channel_args=[("grpc.ssl_target_name_override", "meshd.test.svc")], **pair)
        answers_through(client, 10, "pod-b to answer through pod-a, verified as meshd.test.svc")
        client.close()

        # The metrics port: TLS with the pod's certificate, no client certificate needed; plain HTTP is
        # no longer answered.
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        context.check_hostname = False  # dialled by IP, as Prometheus and the kubelet dial pods
        with urllib.request.urlopen(f"https://{b.metrics_addr}/metrics", context=context, timeout=10) as r:
            text = r.read().decode()
        forwarded = [line for line in text.splitlines() if line.startswith(FORWARDED_OK)]
        assert forwarded and float(forwarded[0].rsplit(" ", 1)[1]) >= 10, forwarded
        with urllib.request.urlopen(f"https://{a.metrics_addr}/readyz", context=context, timeout=10) as r:
            assert r.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{a.metrics_addr}/metrics", timeout=10).read()
    finally:
        etcd.stop()
        etcd.dir.cleanup()


def test_a_certificate_rotated_under_load_fails_no_request(start_meshd, certs, tmp_path):
    tls = secret(certs, tmp_path / "tls", "server")
    server = start_meshd(EXAMPLES, "--tls-dir", str(tls), "--capacity", "256MiB")
    assert served_certificate(server, certs) == der(certs, "server")
    stop = threading.Event()
    stats = {"ok": 0, "failed": []}
    lock = threading.Lock()

    def load(fresh_connections):
        client = triton(server, certs)
        while not stop.is_set():
            if fresh_connections:  # a new handshake per request: some land mid-rotation
                client.close()
                client = triton(server, certs)
            try:
                assert infer_iris(client).tolist() == [0]
                with lock:
                    stats["ok"] += 1
            except Exception as e:  # noqa: BLE001  (every failure counts)
                with lock:
                    stats["failed"].append(repr(e))
        client.close()

    threads = [threading.Thread(target=load, args=(n % 2 == 1,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        write_secret_version(certs, tls, "server2")
        wait_for(lambda: served_certificate(server, certs) == der(certs, "server2"), 20,
                 "the rotated certificate to be served")
        before = stats["ok"]
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert stats["failed"] == [], stats["failed"][:5]
    assert stats["ok"] > before > 0, stats
    assert "tls certificate reloaded" in server.logs()


def test_the_controller_drives_a_meshd_that_requires_client_certificates(start_meshd, certs, tmp_path, s3):
    """densemesh-controller with --mesh-tls-dir against the API-server double (see test_controller.py):
    an InferenceService on moto's S3 becomes Ready through a meshd that takes only mutual TLS."""
    from test_controller import CONTROLLER_BIN, RUNTIME, Kube, isvc

    secrets, x, expected = s3
    repo = tmp_path / "repo"
    repo.mkdir()
    tls = secret(certs, tmp_path / "tls", "server")
    server = start_meshd(repo, "--tls-dir", str(tls), "--storage-config", str(secrets), "--capacity", "64MiB")
    kube = Kube(tmp_path)
    log = tmp_path / "controller.log"
    port = server.grpc_addr.rsplit(":", 1)[1]
    controller = subprocess.Popen(
        [CONTROLLER_BIN, "--mesh-endpoint", f"https://127.0.0.1:{port}", "--mesh-tls-dir", str(tls),
         "--public-grpc-url", f"grpc://{server.grpc_addr}", "--metrics-addr", "127.0.0.1:0", "--lease-duration", "3s"],
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig), "RUST_LOG": "info,kube=warn", "NO_COLOR": "1"},
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        kube.apply(RUNTIME, isvc("dense", "s3://models/dense/a/model.onnx"))

        def ready():
            status = (kube.get("inferenceservice", "dense") or {}).get("status", {})
            return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))

        try:
            wait_for(ready, 90, "the InferenceService to be Ready through the TLS mesh")
        except TimeoutError:
            raise AssertionError(log.read_text(errors="replace")[-4000:])
        client = triton(server, certs)
        i = grpcclient.InferInput("x", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("dense", [i]).as_numpy(client.get_model_metadata("dense").outputs[0].name),
                                   expected["a"], rtol=1e-5)
        client.close()
    finally:
        controller.terminate()
        controller.wait(10)
        kube.stop()
