"""Controller benchmark: `--objects` (10,000) InferenceServices applied at once to the Kubernetes
API-server double (tests/kube/apiserver_double.py — a stand-in, not kube-apiserver), reconciled by
densemesh-controller into one meshd that pulls their models from S3 (moto) and loads every one.

Prints, with one JSON line of all figures:
- seconds from the first create until every object's Ready condition is True (watched, not polled);
- API writes per object by the controller (POST/PUT/PATCH/DELETE counted by the double, excluding the
  benchmark's own creates), by resource and subresource;
- the controller's resident set (VmRSS, and its peak VmHWM) once all are Ready;
- the CPU seconds each process used, which says where the time went on a machine they all share.

The objects point at `--distinct` (100) different tiny ONNX MLPs (16→32→4), round robin: each object is
its own model in the mesh (its own revision id, its own loaded copy), as per-customer models are.

Usage: .venv/bin/python bench/controller.py [--objects 10000] [--distinct 100] [--bin-dir target/release]
Needs `cargo build --release -p densemesh-mesh -p densemesh-controller --bins` (or --bin-dir
target/debug) and the .venv. See bench/README.md.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "bench"))
from meshd import Meshd, free_port, moto_bucket, moto_storage_config, start_moto  # noqa: E402
from size import mlp  # noqa: E402

AGENT = "densemesh-bench"


class Api:
    """One keep-alive HTTP/1.1 connection per thread to the double."""

    def __init__(self, url):
        self.host, self.port = urlsplit(url).hostname, urlsplit(url).port
        self.local = threading.local()

    def request(self, method, path, body=None):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", "User-Agent": f"{AGENT}/1"})
        response = conn.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None


def isvc(i, distinct):
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": f"customer-{i:05d}", "namespace": "default", "annotations": {
            "serving.kserve.io/deploymentMode": "ModelMesh", "serving.kserve.io/secretKey": "moto"}},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"},
                                         "storageUri": f"s3://models/mlp/{i % distinct}/model.onnx"}}},
    }


def watch_ready(url, resource_version, total, done, ready_at):
    """Follows isvc events from `resource_version`, recording when each object first became Ready."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    conn.request("GET", "/apis/serving.kserve.io/v1beta1/inferenceservices?watch=1&allowWatchBookmarks=true"
                        f"&resourceVersion={resource_version}&timeoutSeconds=600",
                 headers={"User-Agent": f"{AGENT}/1"})
    response = conn.getresponse()
    while len(ready_at) < total:
        line = response.readline()
        if not line:
            break
        event = json.loads(line)
        obj = event.get("object", {})
        if event.get("type") not in ("ADDED", "MODIFIED"):
            continue
        name = obj.get("metadata", {}).get("name")
        conditions = obj.get("status", {}).get("conditions", [])
        if name not in ready_at and any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            ready_at[name] = time.monotonic()
    done.set()


def cpu_seconds(pid):
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=100)
    parser.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    parser.add_argument("--concurrency", type=int, default=32, help="the controller's --concurrency")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    bins = Path(args.bin_dir)
    os.environ["MESHD_BIN"] = str(bins / "meshd")

    work = Path(tempfile.mkdtemp(prefix="bench-controller-"))
    moto, endpoint = start_moto()
    procs = []
    try:
        s3 = moto_bucket(endpoint)
        for i in range(args.distinct):
            path = work / "models" / str(i) / "model.onnx"
            path.parent.mkdir(parents=True)
            mlp(path, [16, 32, 4], seed=i)
            s3.upload_file(str(path), "models", f"mlp/{i}/model.onnx")
        secrets = moto_storage_config(work / "storage-config", endpoint)
        repo = work / "repo"
        repo.mkdir()
        meshd = Meshd(repo, "--storage-config", str(secrets), "--cache-dir", str(work / "cache"),
                      "--capacity", "8GiB", "--anti-churn-age", "0")
        procs.append(meshd)

        kubeconfig = work / "kubeconfig"
        double = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "kube" / "apiserver_double.py"), "--port", "0",
             "--kubeconfig-out", str(kubeconfig), "--crds", str(REPO / "charts/densemesh/crds/serving.kserve.io.yaml"),
             "--history", str(max(100_000, args.objects * 8))],
            stdout=subprocess.PIPE, text=True)
        url = double.stdout.readline().strip()
        api = Api(url)
        controller_log = open(work / "controller.log", "wb")
        controller = subprocess.Popen(
            [str(bins / "densemesh-controller"), "--mesh-endpoint", f"http://{meshd.grpc_addr}",
             "--public-grpc-url", f"grpc://{meshd.grpc_addr}", "--metrics-addr", f"127.0.0.1:{free_port()}",
             "--concurrency", str(args.concurrency)],
            env={**os.environ, "KUBECONFIG": str(kubeconfig), "RUST_LOG": "warn", "NO_COLOR": "1"},
            stdout=controller_log, stderr=subprocess.STDOUT)
        api.request("POST", "/apis/serving.kserve.io/v1alpha1/namespaces/default/servingruntimes", {
            "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
            "metadata": {"name": "onnx", "namespace": "default"},
            "spec": {"supportedModelFormats": [{"name": "onnx", "autoSelect": True}], "multiModel": True}})
        rv = api.request("GET", "/apis/serving.kserve.io/v1beta1/inferenceservices?limit=1")["metadata"]["resourceVersion"]
        ready_at, done = {}, threading.Event()
        threading.Thread(target=watch_ready, args=(url, rv, args.objects, done, ready_at), daemon=True).start()
        time.sleep(0.5)  # the controller's watches are open; the benchmark's watch too

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: api.request(
                "POST", "/apis/serving.kserve.io/v1beta1/namespaces/default/inferenceservices", isvc(i, args.distinct)),
                range(args.objects)))
        created = time.monotonic() - start
        print(f"created {args.objects} InferenceServices in {created:.1f} s", flush=True)
        finished = done.wait(args.timeout)
        elapsed = (max(ready_at.values()) - start) if ready_at else float("nan")
        if not finished:
            print(f"only {len(ready_at)} of {args.objects} Ready after {args.timeout} s; controller log tail:\n"
                  f"{(work / 'controller.log').read_text()[-3000:]}", flush=True)
        time.sleep(2)  # let trailing status writes land before counting
        rss, hwm = rss_kib(controller.pid)
        cpu = {name: round(cpu_seconds(pid), 1) for name, pid in
               [("controller", controller.pid), ("apiserver_double", double.pid), ("meshd", meshd.proc.pid),
                ("moto", moto.pid), ("benchmark", os.getpid())]}
        counts = api.request("GET", "/debug/requests")["requests"]
        writes = {}
        for c in counts:
            if c["method"] in ("POST", "PUT", "PATCH", "DELETE") and c["agent"] != AGENT:
                key = f'{c["method"]} {c["resource"]}{"/" + c["subresource"] if c["subresource"] else ""}'
                writes[key] = writes.get(key, 0) + c["count"]
        isvc_writes = sum(n for k, n in writes.items() if "inferenceservices" in k)
        figures = {
            "objects": args.objects,
            "ready": len(ready_at),
            "create_seconds": round(created, 1),
            "all_ready_seconds": round(elapsed, 1),
            "writes_per_object": round(isvc_writes / args.objects, 2),
            "writes": writes,
            "controller_rss_mib": round(rss / 1024, 1),
            "controller_peak_rss_mib": round(hwm / 1024, 1),
            "cpu_seconds": cpu,
            "bin_dir": str(bins),
        }
        print(f"{figures['ready']}/{args.objects} Ready in {figures['all_ready_seconds']} s after the first create")
        print(f"controller API writes per InferenceService: {figures['writes_per_object']} ({writes})")
        print(f"controller RSS: {figures['controller_rss_mib']} MiB (peak {figures['controller_peak_rss_mib']} MiB)")
        print(f"CPU seconds by process (2 cores in all): {cpu}")
        print(json.dumps(figures))
        controller.terminate()
        controller.wait(10)
        double.terminate()
        double.wait(10)
    finally:
        for p in procs:
            p.stop()
        moto.kill()
        moto.wait()


if __name__ == "__main__":
    main()
