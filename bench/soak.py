"""Soak: mixed load on 3 meshd pods sharing a real etcd, with churn, watching each pod's RSS, open file
descriptors and async tasks over time (issue 14's soak; not part of CI).

    .venv/bin/python bench/soak.py                                   # 30 minutes, release build
    .venv/bin/python bench/soak.py --duration 4m --restart-every 90s --bin-dir target/debug   # a quick look

What runs, all on 127.0.0.1:
  - a real etcd (Debian's, as the e2e tests start it) and pods a, b and c sharing it, each with a capacity
    that holds about a sixth of the models, so loads and evictions never stop;
  - --clients threads sending Zipf traffic over --models distinct dense ONNX models (each its own
    weights) to random live pods with tritonclient, every answer checked against ONNX Runtime here;
  - churn: every --churn-every a transient model is registered, called once and unregistered; the vmodel
    `soak-v` flips between two models (each call through it must answer as one of the two);
  - a pod restart every --restart-every, b and c in turn (SIGTERM, wait, start again with the same
    instance id); pod a is never restarted, so its series covers the whole run.

Every --sample-every it records, per pod: RSS (/proc/PID/status VmRSS), open descriptors (/proc/PID/fd)
and `densemesh_tasks_alive`. It writes bench/out/soak/series.csv and prints, for pod a and for every
incarnation of b and c that outlived the warm-up, the spread ((max - min) / mean) of each series after
--warmup: the goal is <= 5%. Errors are counted by gRPC code and split into those that hit a pod while it
was being restarted (documented: UNAVAILABLE while it drains) and any other (there should be none). A
wrong answer is always a failure.
"""
import argparse
import csv
import os
import random
import shutil
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "soak"
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "examples"))

import grpc  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from generate_models import make_dense_model  # noqa: E402

HIDDEN = 64


def duration(text):
    units = {"s": 1, "m": 60, "h": 3600}
    if text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=duration, default=30 * 60)
    p.add_argument("--warmup", type=duration, default=5 * 60, help="left out of the spreads")
    p.add_argument("--models", type=int, default=48)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--restart-every", type=duration, default=5 * 60)
    p.add_argument("--churn-every", type=duration, default=5)
    p.add_argument("--flip-every", type=duration, default=20)
    p.add_argument("--sample-every", type=duration, default=15)
    p.add_argument("--capacity", default="6MiB", help="each pod's --capacity")
    p.add_argument("--anti-churn-age", default="0s",
                   help="each pod's --anti-churn-age: 0s lets every load evict; with ModelMesh's 10m (or even 5s)"
                        " a full mesh whose models are all in use refuses loads (RESOURCE_EXHAUSTED, by design)")
    p.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    return p.parse_args()


def mmesh_stubs():
    """Python stubs for mmesh.ModelMesh, generated from the project's proto as a user would."""
    from grpc_tools import protoc

    out = OUT / "stubs"
    out.mkdir(parents=True, exist_ok=True)
    proto_dir = REPO / "proto" / "proto" / "modelmesh"
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(proto_dir / "model-mesh.proto")])
    assert rc == 0, "grpcio-tools could not compile model-mesh.proto"
    sys.path.insert(0, str(out))
    import model_mesh_pb2
    import model_mesh_pb2_grpc
    return model_mesh_pb2, model_mesh_pb2_grpc


def make_models(count):
    """`count` distinct dense models (seeded: the same bytes every run) and each one's answer to X."""
    directory = OUT / "models"
    directory.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(7).standard_normal((1, HIDDEN)).astype(np.float32)
    paths, expected = [], []
    for i in range(count):
        path = directory / f"m{i}.onnx"
        if not path.exists():
            make_dense_model(path, mb=0.25, seed=1000 + i, hidden=HIDDEN, out=8)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        expected.append(session.run(None, {session.get_inputs()[0].name: x})[0])
        paths.append(path)
    return paths, expected, x


class Pod:
    """One meshd (tests/e2e/meshd.py's launcher), restartable with the same instance id."""

    def __init__(self, name, repo, args):
        self.name, self.repo, self.args = name, repo, args
        self.incarnation = 0
        self.server = None
        self.restarting = False
        self.start()

    def start(self):
        from meshd import Meshd

        self.server = Meshd(self.repo, "--instance-id", self.name, *self.args)
        self.incarnation += 1
        self.restarting = False

    def restart(self):
        self.restarting = True
        time.sleep(1)  # let clients move off it
        code = self.server.terminate(timeout=60)
        self.server.stop()
        print(f"  restarted pod-{self.name} (exit {code})", flush=True)
        self.start()

    def sample(self):
        pid = self.server.proc.pid
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        tasks = self.metric("densemesh_tasks_alive")
        loaded = self.metric("densemesh_models_loaded")
        return rss, fds, tasks, loaded

    def metric(self, name):
        with urllib.request.urlopen(f"http://{self.server.metrics_addr}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return float("nan")


def main():
    args = parse()
    binary = Path(args.bin_dir) / "meshd"
    if not binary.exists():
        sys.exit(f"{binary} is missing: cargo build --release -p densemesh-mesh --bins (or --bin-dir)")
    os.environ["MESHD_BIN"] = str(binary)
    from test_etcd import Etcd

    pb2, pb2_grpc = mmesh_stubs()
    paths, expected, x = make_models(args.models)
    repo = OUT / "empty-repo"
    repo.mkdir(parents=True, exist_ok=True)
    etcd = Etcd()
    pods = {}
    stop = threading.Event()
    counts = Counter()
    lock = threading.Lock()
    wrong = []
    try:
        common = ("--etcd", etcd.endpoint, "--lease-ttl", "3s", "--capacity", args.capacity,
                  "--local-model-roots", str(OUT), "--shutdown-grace", "5s",
                  "--anti-churn-age", args.anti_churn_age)
        for name in ("a", "b", "c"):
            pods[name] = Pod(name, repo, common)
        admin = pb2_grpc.ModelMeshStub(grpc.insecure_channel(pods["a"].server.grpc_addr))
        info = lambda path: pb2.ModelInfo(type="onnx", path=str(path))  # noqa: E731
        for i, path in enumerate(paths):
            admin.registerModel(pb2.RegisterModelRequest(modelId=f"m{i}", modelInfo=info(path)))
        admin.setVModel(pb2.SetVModelRequest(vModelId="soak-v", targetModelId="m0"))
        print(f"{args.models} models registered on 3 pods; soaking for {args.duration:.0f}s", flush=True)

        weights = 1.0 / np.arange(1, args.models + 1) ** args.zipf
        weights /= weights.sum()

        def check(got, want, what):
            if got is None or got.shape != want.shape or not np.allclose(got, want, atol=1e-4):
                with lock:
                    wrong.append(what)

        def live_pod(rng):
            candidates = [p for p in pods.values() if not p.restarting]
            return rng.choice(candidates)

        def call(pod, model, rng, vmodel=False):
            client = grpcclient.InferenceServerClient(pod.server.grpc_addr)
            try:
                i = grpcclient.InferInput("x", [1, HIDDEN], "FP32")
                i.set_data_from_numpy(x)
                headers = {"mm-vmodel-id": model} if vmodel else None
                return client.infer(model, [i], headers=headers).as_numpy("y")
            finally:
                client.close()

        def client_loop(seed):
            rng = random.Random(seed)
            channels = {}
            while not stop.is_set():
                pod = live_pod(rng)
                key = (pod.name, pod.incarnation)
                if key not in channels:
                    channels[key] = grpcclient.InferenceServerClient(pod.server.grpc_addr)
                client = channels[key]
                via_vmodel = rng.random() < 0.1
                model = "soak-v" if via_vmodel else f"m{rng.choices(range(args.models), weights)[0]}"
                inp = grpcclient.InferInput("x", [1, HIDDEN], "FP32")
                inp.set_data_from_numpy(x)
                try:
                    headers = {"mm-vmodel-id": "soak-v"} if via_vmodel else None
                    got = client.infer(model, [inp], headers=headers, client_timeout=60).as_numpy("y")
                    if via_vmodel:
                        if not (np.allclose(got, expected[0], atol=1e-4) or np.allclose(got, expected[1], atol=1e-4)):
                            with lock:
                                wrong.append("soak-v")
                    else:
                        check(got, expected[int(model[1:])], model)
                    with lock:
                        counts["ok"] += 1
                except InferenceServerException as e:
                    # Documented: UNAVAILABLE from a pod draining for its restart, and RESOURCE_EXHAUSTED
                    # when every pod is full of models used within --anti-churn-age.
                    if pod.restarting:
                        kind = "restarting"
                    elif e.status() == "StatusCode.RESOURCE_EXHAUSTED":
                        kind = "anti-churn"
                    else:
                        kind = "other"
                    with lock:
                        counts[f"{kind}:{e.status()}"] += 1
                        if kind == "other" and counts[f"{kind}:{e.status()}"] <= 5:
                            print(f"  error from pod-{pod.name} on {model}: {e}", flush=True)
                    time.sleep(0.05)

        def churn_loop():
            rng = random.Random(99)
            k = 0
            while not stop.wait(args.churn_every):
                k += 1
                i = rng.randrange(args.models)
                mid = f"churn-{k}"
                try:
                    # Pod a's one admin channel (a is never restarted): a channel per call left its
                    # connections open until collected, and pod a's descriptors moved with them.
                    stub = admin
                    stub.registerModel(pb2.RegisterModelRequest(modelId=mid, modelInfo=info(paths[i])))
                    got = call(live_pod(rng), mid, rng)
                    check(got, expected[i], mid)
                    stub.unregisterModel(pb2.UnregisterModelRequest(modelId=mid))
                    with lock:
                        counts["churned"] += 1
                except (grpc.RpcError, InferenceServerException) as e:
                    with lock:
                        counts["churn-error"] += 1
                        print(f"  churn {mid}: {e}", flush=True)

        def flip_loop():
            target = 0
            while not stop.wait(args.flip_every):
                target = 1 - target
                try:
                    stub = admin
                    stub.setVModel(pb2.SetVModelRequest(vModelId="soak-v", targetModelId=f"m{target}"))
                    with lock:
                        counts["flips"] += 1
                except grpc.RpcError as e:
                    with lock:
                        counts["flip-error"] += 1
                        print(f"  flip: {e}", flush=True)

        threads = [threading.Thread(target=client_loop, args=(s,), daemon=True) for s in range(args.clients)]
        threads += [threading.Thread(target=churn_loop, daemon=True), threading.Thread(target=flip_loop, daemon=True)]
        for t in threads:
            t.start()

        rows = []
        start = time.monotonic()
        next_restart = start + args.restart_every
        to_restart = ["b", "c"]
        while (now := time.monotonic()) - start < args.duration:
            for pod in pods.values():
                if pod.restarting:
                    continue
                try:
                    rss, fds, tasks, loaded = pod.sample()
                except (OSError, StopIteration):
                    continue
                rows.append({"t": round(now - start, 1), "pod": pod.name, "incarnation": pod.incarnation,
                             "rss_kib": rss, "fds": fds, "tasks": tasks, "loaded": loaded})
            with lock:
                print(f"  t={now - start:6.0f}s " + " ".join(
                    f"{r['pod']}: {r['rss_kib'] / 1024:.1f} MiB {r['fds']} fds {r['tasks']:.0f} tasks"
                    for r in rows[-len(pods):]) + f" | {dict(counts)}", flush=True)
            if now >= next_restart and now - start + 60 < args.duration:
                name = to_restart[0]
                to_restart.reverse()
                pods[name].restart()
                next_restart = time.monotonic() + args.restart_every
            time.sleep(max(0.0, args.sample_every - (time.monotonic() - now)))
        stop.set()
        for t in threads:
            t.join(timeout=90)

        OUT.mkdir(parents=True, exist_ok=True)
        with open(OUT / "series.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        report(rows, args.warmup, counts, wrong)
        sys.exit(1 if wrong or any(k.startswith("other:") for k in counts) else 0)
    finally:
        stop.set()
        for pod in pods.values():
            if pod.server:
                pod.server.stop()
        etcd.stop()
        etcd.dir.cleanup()
        shutil.rmtree(OUT / "stubs", ignore_errors=True)


def spread(values):
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / len(values)
    return min(values), max(values), (max(values) - min(values)) / mean if mean else 0.0


def report(rows, warmup, counts, wrong):
    print(f"\nseries: {OUT / 'series.csv'}; after a {warmup:.0f}s warm-up: spread = (max - min) / mean (goal <= 5%);"
          " tasks vary with requests in flight, so their figure is the growth from the first third of the"
          " samples to the last (mean)")
    print(f"{'pod':>6} {'incarnation':>11} {'samples':>7} {'RSS MiB min-max':>17} {'spread':>7} "
          f"{'fds':>9} {'spread':>7} {'tasks':>9} {'growth':>7}")
    for key in sorted({(r["pod"], r["incarnation"]) for r in rows}):
        series = [r for r in rows if (r["pod"], r["incarnation"]) == key]
        first = series[0]["t"]
        series = [r for r in series if r["t"] - first >= warmup]
        if len(series) < 3:
            continue
        rss = spread([r["rss_kib"] / 1024 for r in series])
        fds = spread([r["fds"] for r in series])
        tasks = spread([r["tasks"] for r in series])
        third = max(1, len(series) // 3)
        early = sum(r["tasks"] for r in series[:third]) / third
        late = sum(r["tasks"] for r in series[-third:]) / third
        tasks = (tasks[0], tasks[1], (late - early) / early if early else 0.0)
        print(f"{key[0]:>6} {key[1]:>11} {len(series):>7} {rss[0]:>8.1f}-{rss[1]:<8.1f} {rss[2]:>6.1%} "
              f"{fds[0]:>4.0f}-{fds[1]:<4.0f} {fds[2]:>6.1%} {tasks[0]:>4.0f}-{tasks[1]:<4.0f} {tasks[2]:>6.1%}")
    print(f"requests and churn: {dict(counts)}")
    print(f"wrong answers: {len(wrong)} {wrong[:5]}")


if __name__ == "__main__":
    main()
