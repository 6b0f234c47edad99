"""What a forwarded hop adds: the same model served from the pod that holds it, and through a second pod
that forwards every request to it, measured by the mesh's own load generator (meshctl bench).

    .venv/bin/python bench/forward_hop.py                    # release build, ~1 minute
    .venv/bin/python bench/forward_hop.py --bin-dir target/debug --duration 5s

A real etcd and two meshd pods on 127.0.0.1 (ports chosen by the kernel). The model is loaded on pod A
only (ensureLoaded marked as forwarded, so A loads it itself), pod B is given no room for it, so every
request B gets crosses one hop to A. Prints req/s and p50/p90/p99 for each path and concurrency, and the
p50 the hop adds. Needs target/release/meshd and meshctl (cargo build --release -p densemesh-mesh --bins)
and the project's .venv (scripts/setup.sh test).
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # reuse the e2e tests' meshd and etcd launchers

from meshd import Meshd, wait_for  # noqa: E402
from test_etcd import Etcd  # noqa: E402


def mmesh_stubs():
    """ModelMesh's Python stubs, generated from the project's proto as a ModelMesh user would."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="mmesh-stubs-")
    proto_dir = REPO / "proto" / "proto" / "modelmesh"
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(proto_dir / "model-mesh.proto")])
    assert rc == 0, "grpcio-tools could not compile model-mesh.proto"
    sys.path.insert(0, out)
    return importlib.import_module("model_mesh_pb2"), importlib.import_module("model_mesh_pb2_grpc")


def cpu_seconds(pid):
    """User plus system CPU seconds a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(meshctl, addr, model, concurrency, duration, warmup):
    out = subprocess.run(
        [meshctl, "--addr", addr, "-o", "json", "bench", model, "--concurrency", str(concurrency),
         "--duration", duration, "--warmup", warmup],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    parser.add_argument("--model", default="iris-logreg")
    parser.add_argument("--duration", default="10s")
    parser.add_argument("--warmup", default="2s")
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    bin_dir = Path(args.bin_dir)
    meshctl = str(bin_dir / "meshctl")
    os.environ["MESHD_BIN"] = str(bin_dir / "meshd")
    model_mesh_pb2, model_mesh_pb2_grpc = mmesh_stubs()

    etcd = Etcd()
    pods = []
    try:
        common = ["--etcd", etcd.endpoint, "--lease-ttl", "5s", "--copy-add-rate", "0", "--copy-add-queue-wait", "0"]
        a = Meshd(REPO / "examples" / "models", *common, "--instance-id", "pod-a")
        pods.append(a)
        # B can hold nothing, so placement always sends B's requests to A's copy.
        b = Meshd(REPO / "examples" / "models", *common, "--instance-id", "pod-b", "--capacity", "1")
        pods.append(b)
        stub = model_mesh_pb2_grpc.ModelMeshStub(grpc.insecure_channel(a.grpc_addr))
        wait_for(lambda: stub.getModelStatus(model_mesh_pb2.GetStatusRequest(modelId=args.model)).status
                 != model_mesh_pb2.ModelStatusInfo.NOT_FOUND, 30, "the repository registered")
        stub.ensureLoaded(model_mesh_pb2.EnsureLoadedRequest(modelId=args.model, sync=True),
                          metadata=[("densemesh-forwarded", "bench")])
        # CPU per request: what each pod spent over the whole call; it says which process a hop's time
        # goes to.
        print(f"{'path':<10} {'c':>3} {'req/s':>9} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} "
              f"{'A cpu µs':>9} {'B cpu µs':>9}")
        p50 = {}
        for c in [int(x) for x in args.concurrency.split(",")]:
            for name, pod in (("local", a), ("forwarded", b)):
                before, started = [cpu_seconds(p.proc.pid) for p in (a, b)], time.monotonic()
                r = bench(meshctl, pod.grpc_addr, args.model, c, args.duration, args.warmup)
                wall = time.monotonic() - started
                used = [cpu_seconds(p.proc.pid) - t for p, t in zip((a, b), before)]
                # The warm-up ran at the measured rate too, so the requests of the whole call are about
                # req/s times its wall time.
                per = [f"{u / max(r['requests_per_second'] * wall, 1) * 1e6:>9.0f}" for u in used]
                p50[(name, c)] = r["p50_us"]
                print(f"{name:<10} {c:>3} {r['requests_per_second']:>9.0f} {r['p50_us']:>8} {r['p90_us']:>8} "
                      f"{r['p99_us']:>8} {' '.join(per)}", flush=True)
        for c in [int(x) for x in args.concurrency.split(",")]:
            print(f"c={c}: the hop adds {p50[('forwarded', c)] - p50[('local', c)]} µs at p50")
    finally:
        for pod in pods:
            pod.stop()
        etcd.stop()


if __name__ == "__main__":
    main()
