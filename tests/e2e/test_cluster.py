"""Three pods on real etcd under a Zipf workload while pods are killed, restarted and drained and etcd
itself goes away for 20 s: no wrong answer, and no request that fails twice in a row."""
import random
import sys
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort

from meshd import REPO, raw_request
from test_etcd import Etcd, mm

sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402

MODELS = 300
FILES = 3


def test_a_cluster_under_load_survives_kills_drains_and_an_etcd_outage(start_meshd, mmesh, tmp_path):
    etcd = Etcd()
    try:
        run_scenario(start_meshd, mmesh, tmp_path, etcd)
    finally:
        etcd.stop()
        etcd.dir.cleanup()


def run_scenario(start_meshd, mmesh, tmp_path, etcd):
    repo = tmp_path / "repo"
    repo.mkdir()
    x = np.random.default_rng(0).normal(size=(1, 256)).astype(np.float32)
    want = []
    for f in range(FILES):
        path = tmp_path / f"file-{f}" / "model.onnx"
        make_dense_model(path, 0.1, seed=f)
        want.append(ort.InferenceSession(str(path)).run(None, {"x": x})[0].tobytes())
    args = lambda name: (repo, "--etcd", etcd.endpoint, "--instance-id", name, "--lease-ttl", "3s",
                         "--capacity", "4MiB", "--shutdown-grace", "10s")
    pods = {name: start_meshd(*args(name)) for name in ("pod-0", "pod-1", "pod-2")}
    pb2, stub = mm(pods["pod-0"], mmesh)
    for i in range(MODELS):
        info = pb2.ModelInfo(type="onnx", path=str(tmp_path / f"file-{i % FILES}"))
        stub.registerModel(pb2.RegisterModelRequest(modelId=f"m-{i:03d}", modelInfo=info))

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
                    if r.raw_output_contents[0] != want[i % FILES]:
                        stats["wrong"].append(f"m-{i:03d} from {server.proc.pid}")
                    with lock:
                        stats["ok"] += 1
                        stats["retried"] += attempt
                    break
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
            else:
                stats["failed"].append((f"m-{i:03d}", errors))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    with lock:
        killed = live.pop("pod-1")
    killed.proc.kill()
    killed.proc.wait()
    time.sleep(3)
    restarted = start_meshd(*args("pod-1"))
    with lock:
        live["pod-1"] = restarted
    time.sleep(3)
    with lock:
        drained = live.pop("pod-2")
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
    print(f"cluster scenario: {stats['ok']} answers, {stats['retried']} after one retry")
