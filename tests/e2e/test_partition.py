"""Network partitions (docs/faults.md): each pod in a network namespace of its own, on a bridge with etcd
and the test client, and links cut with blackhole routes inside a pod's namespace: a pod cut from
etcd, and two pods cut from each other. Every answer given during and after a cut must be the right
one (an error, UNAVAILABLE, is allowed; a wrong answer never), and the mesh must heal once the link
is back.

Making namespaces needs root (CAP_NET_ADMIN) and `ip`; where they cannot be made the tests say so and
skip, and the fail-point tests (`cargo test -p densemesh-mesh --features failpoints --lib
fault_tests`) cover a pod cut from etcd."""
import base64
import json
import os
import urllib.request
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc

from meshd import EXAMPLES, REPO, raw_request, wait_for

X = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
COLD = 60  # models loaded one by one until a pod cut from etcd refuses new loads
OK_ERRORS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def ip(*args, netns=None):
    cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def namespaces_work():
    """None when network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"dmprobe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed (needs root): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class Net:
    """A bridge in this namespace holding the client's address (.1) and etcd's (.254), and one
    namespace per pod (.2, .3, ...) joined to it by a veth pair."""

    def __init__(self):
        tag = uuid.uuid4().hex[:5]
        self.tag = tag
        self.subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
        self.bridge = f"dmbr{tag}"
        self.namespaces = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        self.client_ip, self.etcd_ip = f"{self.subnet}.1", f"{self.subnet}.254"

    def pod_namespace(self, index):
        ns = f"dm{self.tag}p{index}"
        host_end, pod_end = f"dm{self.tag}h{index}", f"dm{self.tag}v{index}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        ip("link", "set", pod_end, "netns", ns)
        ip("link", "set", host_end, "master", self.bridge)
        ip("link", "set", host_end, "up")
        address = f"{self.subnet}.{index + 2}"
        ip("addr", "add", f"{address}/24", "dev", pod_end, netns=ns)
        ip("link", "set", pod_end, "up", netns=ns)
        ip("link", "set", "lo", "up", netns=ns)
        return ns, address

    def cut(self, ns, address):
        """Packets from `ns` to `address` go nowhere (and so does every answer to `address`)."""
        ip("route", "add", "blackhole", f"{address}/32", netns=ns)

    def heal(self, ns, address):
        ip("route", "del", "blackhole", f"{address}/32", netns=ns)

    def close(self):
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class NsEtcd:
    def __init__(self, address):
        self.dir = tempfile.TemporaryDirectory(prefix="etcd-")
        self.endpoint = f"http://{address}:2379"
        peer = f"http://127.0.0.1:{_free_port()}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "p", "--data-dir", str(Path(self.dir.name) / "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"p={peer}"],
            stdout=subprocess.DEVNULL, stderr=open(Path(self.dir.name) / "etcd.log", "ab"))
        import socket

        def listening():
            with socket.socket() as s:
                return s.connect_ex((address, 2379)) == 0

        wait_for(listening, 30, "etcd to listen")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.dir.cleanup()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NsPod:
    """meshd inside a namespace, its gRPC port on the namespace's address."""

    def __init__(self, ns, address, etcd, repo, instance_id, *flags):
        self.dir = tempfile.TemporaryDirectory(prefix="meshd-")
        addr_file = Path(self.dir.name) / "addr.json"
        self.log_path = Path(self.dir.name) / "meshd.log"
        binary = os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, binary, "serve", "--grpc-addr", f"{address}:8033",
             "--http-addr", "127.0.0.1:0", "--metrics-addr", f"{address}:2112", "--model-repo", str(repo),
             "--addr-file", str(addr_file), "--etcd", etcd.endpoint, "--instance-id", instance_id,
             "--cache-dir", str(Path(self.dir.name) / "cache"), *flags],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})

        def started():
            assert self.proc.poll() is None, f"meshd exited:\n{self.logs()}"
            return addr_file.exists() and addr_file.read_text()

        wait_for(started, 60, "meshd to listen")
        self.address = address
        self.channel = grpc.insecure_channel(f"{address}:8033")
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def infer(self, model, timeout=20):
        response = self.stub.ModelInfer(raw_request(model, [("input", "FP32", X)]), timeout=timeout)
        return [o.name for o in response.outputs], list(response.raw_output_contents)

    def metric(self, name):
        """The sum of a metric's series, from the pod's /metrics."""
        with urllib.request.urlopen(f"http://{self.address}:2112/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return sum(float(line.rpartition(" ")[2]) for line in lines
                   if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "))

    def logs(self):
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()


@pytest.fixture
def mesh(tmp_path):
    why = namespaces_work()
    if why:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    net = Net()
    etcd = NsEtcd(net.etcd_ip)
    repo = tmp_path / "repo"
    for name in ["m1", "m2", "m3", *(f"c{i}" for i in range(COLD))]:
        (repo / name).mkdir(parents=True)
        shutil.copy(EXAMPLES / "iris-logreg" / "model.onnx", repo / name / "model.onnx")
    pods = []

    def start(index, *flags):
        ns, address = net.pod_namespace(index)
        pod = NsPod(ns, address, etcd, repo, f"pod-{index}", *flags)
        pod.ns, pod.address = ns, address
        pods.append(pod)
        return pod

    try:
        yield net, etcd, start
    finally:
        for pod in pods:
            pod.stop()
        etcd.stop()
        net.close()


def answer_or_allowed_error(pod, model, reference):
    """The pod's answer, which must be `reference`; None for an allowed error (UNAVAILABLE)."""
    try:
        got = pod.infer(model)
    except grpc.RpcError as e:
        assert e.code() in OK_ERRORS, f"{e.code()}: {e.details()}"
        return None
    assert got == reference, "a wrong answer during a partition"
    return got


def wait_answer(pod, model, reference, timeout, what):
    errors = []

    def answered():
        try:
            return answer_or_allowed_error(pod, model, reference)
        except AssertionError:
            raise
        finally:
            pass

    try:
        wait_for(answered, timeout, what)
    except TimeoutError as e:
        try:
            pod.infer(model)
        except grpc.RpcError as last:
            errors.append(f"{last.code()}: {last.details()}")
        raise TimeoutError(f"{e}; last error: {errors}; its log:\n{pod.logs()}") from None


def etcd_keys(etcd, prefix):
    """Keys under `prefix`, through etcd's JSON gateway (Debian's etcd-server has no etcdctl)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    b64 = lambda s: base64.b64encode(s.encode()).decode()
    body = json.dumps({"key": b64(prefix), "range_end": b64(end), "keys_only": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{etcd.endpoint}/v3/kv/range", data=body), timeout=10) as r:
        return sorted(base64.b64decode(kv["key"]).decode() for kv in json.load(r).get("kvs", []))


def first_answer(pod, model):
    """Waits until `pod` serves `model` (registered by the leader's repository sync); its answer."""
    answers = []

    def served():
        try:
            answers.append(pod.infer(model))
            return True
        except grpc.RpcError as e:
            assert e.code() in OK_ERRORS | {grpc.StatusCode.NOT_FOUND}, e.details()
            return False

    wait_for(served, 60, f"{model} to be registered and served")
    return answers[-1]


def test_a_pod_cut_from_etcd_serves_right_answers_and_rejoins(mesh):
    net, etcd, start = mesh
    flags = ("--lease-ttl", "3s", "--registry-outage-grace", "2s")
    a, b = start(0, *flags), start(1, *flags)
    reference = first_answer(a, "m1")
    wait_for(lambda: etcd_keys(etcd, "/densemesh/placements/m1/") == ["/densemesh/placements/m1/pod-0"], 30,
             "pod-0's copy of m1 in etcd")

    net.cut(a.ns, net.etcd_ip)
    cut_at = time.monotonic()
    # Through the cut, pod-0 serves what it holds; a model it does not hold is forwarded to pod-1
    # (still in its view) or refused UNAVAILABLE with the reason, never answered wrongly.
    cold = iter(f"c{i}" for i in range(COLD))
    refusals = 0
    while time.monotonic() - cut_at < 15:
        assert a.infer("m1") == reference, "a loaded model serves through the cut"
        try:
            assert a.infer(next(cold)) == reference
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            assert "registry (etcd) has not answered" in e.details(), e.details()
            refusals += 1
        answer_or_allowed_error(b, "m1", reference)
        time.sleep(0.5)
    # etcd ended pod-0's lease: its records are gone, and pod-1 serves m1 itself.
    assert etcd_keys(etcd, "/densemesh/instances/") == ["/densemesh/instances/pod-1"]
    wait_answer(b, "m1", reference, 30, "pod-1 to serve m1")

    net.heal(a.ns, net.etcd_ip)
    wait_for(lambda: "/densemesh/instances/pod-0" in etcd_keys(etcd, "/densemesh/instances/"), 30,
             "pod-0 to rejoin")
    wait_for(lambda: "/densemesh/placements/m1/pod-0" in etcd_keys(etcd, "/densemesh/placements/m1/"), 30,
             "pod-0 to republish its copy of m1")
    for pod in (a, b):
        for model in ("m1", "m2", "m3"):
            wait_answer(pod, model, reference, 60, f"{model} after the cut healed")
    print(f"pod-0 cut from etcd: {refusals} new loads refused, the rest forwarded to pod-1")


def test_pods_cut_from_each_other_answer_right_and_heal(mesh):
    net, etcd, start = mesh
    a, b = start(0), start(1)
    reference = first_answer(a, "m1")
    # pod-1 forwards to pod-0's copy.
    wait_answer(b, "m1", reference, 30, "pod-1 to answer m1")
    assert b.metric("densemesh_forwarded_requests_total") >= 1, "pod-1 forwarded m1 to pod-0"
    assert b.metric("densemesh_models_loaded") == 0, "pod-1 holds no copy of its own"

    net.cut(a.ns, b.address)
    net.cut(b.ns, a.address)
    started = time.monotonic()
    wait_answer(b, "m1", reference, 60, "pod-1 to serve m1 without pod-0")
    cut_took = time.monotonic() - started
    assert b.metric("densemesh_models_loaded") == 1, "pod-1 serves m1 from a copy of its own"
    for _ in range(5):
        assert answer_or_allowed_error(a, "m1", reference) == reference
        answer_or_allowed_error(b, "m1", reference)
    wait_answer(b, "m2", reference, 60, "pod-1 to load another model while cut off")

    net.heal(a.ns, b.address)
    net.heal(b.ns, a.address)
    for pod in (a, b):
        for model in ("m1", "m2", "m3"):
            wait_answer(pod, model, reference, 60, f"{model} after the cut healed")
    print(f"first right answer from pod-1 after the cut: {cut_took:.1f}s")
