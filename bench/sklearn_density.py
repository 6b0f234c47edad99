"""MLServer against meshd on the same tiny scikit-learn models: memory per model, req/s and p50, one run.

Issue 15's side-by-side. `--models` (1,000) distinct LogisticRegression models (4 features, 3 classes,
each fitted on its own random data) are written twice: the joblib file with a model-settings.json for
MLServer (`mlserver-sklearn`, `parallel_workers: 0`, as ModelMesh runs it), and the skl2onnx ONNX file
for meshd (on its embedded default, which puts such models on the tiny evaluator). Then, one server
process at a time:
- RSS with one model loaded (a repository of one) and with all of them loaded (MLServer loads its
  repository at start; meshd loads each on its first request): per model = the difference over N - 1;
- Zipf (exponent 1.0) traffic over all N from `--clients` (16) closed-loop gRPC clients
  (`densemesh-bench grpc --models-file`, the same request, FP32 [1, 4]): req/s and p50.
Both answer the same rows; the first model's answers are checked against the Python model.

Usage: .venv/bin/python bench/sklearn_density.py [--models 1000] [--meshd target/release/meshd]
       [--bench target/release/densemesh-bench] [--duration 20s]
Needs the .venv (scikit-learn, skl2onnx) and .venv-mlserver that scripts/setup.sh makes.
Prints a table and one JSON line. See bench/README.md.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import joblib
import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from meshd import free_port, wait_for  # noqa: E402
from registry_density import rss_bytes  # noqa: E402  (bench/ is the script's directory)
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

MLSERVER = REPO / ".venv-mlserver" / "bin" / "mlserver"
KIB = 1024


def make_models(root: Path, n: int):
    """`n` fitted models as joblib + settings (mlserver/<name>/) and ONNX (onnx/<name>/model.onnx)."""
    for kind in ("mlserver", "onnx"):
        (root / kind).mkdir(parents=True)
    (root / "mlserver" / "settings.json").write_text(json.dumps({"parallel_workers": 0}))
    rng = np.random.default_rng(3)
    for i in range(n):
        name = f"m{i:04d}"
        x = rng.normal(size=(150, 4)).astype(np.float32)
        y = np.argmax(x @ rng.normal(size=(4, 3)), axis=1)
        clf = LogisticRegression(max_iter=500, random_state=0).fit(x, y)
        d = root / "mlserver" / name
        d.mkdir()
        joblib.dump(clf, d / "model.joblib")
        (d / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib"},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        }))
        onx = to_onnx(clf, initial_types=[("input", FloatTensorType([None, 4]))],
                      options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
        (root / "onnx" / name).mkdir()
        (root / "onnx" / name / "model.onnx").write_bytes(onx.SerializeToString())


def only_first(root: Path, kind: str, work: Path) -> Path:
    """A repository holding only the first model, for the one-model baseline."""
    one = work / f"{kind}-one"
    one.mkdir()
    shutil.copytree(root / kind / "m0000", one / "m0000")
    if (root / kind / "settings.json").exists():
        shutil.copy(root / kind / "settings.json", one / "settings.json")
    return one


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_mlserver(repository: Path, work: Path, label: str):
    port = free_port()
    env = {**os.environ, "MLSERVER_HOST": "127.0.0.1", "MLSERVER_GRPC_PORT": str(port),
           "MLSERVER_HTTP_PORT": str(free_port()), "MLSERVER_METRICS_PORT": str(free_port()),
           "MLSERVER_PARALLEL_WORKERS": "0"}
    log = open(work / f"mlserver-{label}.log", "wb")
    proc = subprocess.Popen([str(MLSERVER), "start", str(repository)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=repository, start_new_session=True)
    return proc, f"127.0.0.1:{port}"


def start_meshd(meshd: str, repository: Path, work: Path, label: str):
    addr_file = work / f"meshd-{label}.addr"
    log = open(work / f"meshd-{label}.log", "wb")
    proc = subprocess.Popen(
        [meshd, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--metrics-addr",
         "127.0.0.1:0", "--model-repo", str(repository), "--addr-file", str(addr_file),
         "--cache-dir", str(work / f"cache-{label}")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: addr_file.exists() or proc.poll() is not None, 300, "meshd to start")
    if proc.poll() is not None:
        raise RuntimeError(f"meshd exited: see {work}/meshd-{label}.log")
    return proc, json.loads(addr_file.read_text())["grpc_addr"]


def ready_models(addr: str, names, deadline_s: float):
    """Waits until every model answers ModelReady (MLServer loads its repository in the background)."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(addr))
    end = time.monotonic() + deadline_s
    pending = list(names)
    while pending and time.monotonic() < end:
        try:
            if stub.ModelReady(service_pb2.ModelReadyRequest(name=pending[-1]), timeout=5).ready:
                pending.pop()
                continue
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    if pending:
        raise RuntimeError(f"{len(pending)} models not ready at {addr} within {deadline_s} s")
    return stub


def answer(stub, name, rows):
    request = service_pb2.ModelInferRequest(model_name=name)
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype(np.float32).tobytes())
    response = stub.ModelInfer(request, timeout=30)
    return {o.name: np.frombuffer(raw, dtype=np.int64 if o.datatype == "INT64" else np.float32)
            for o, raw in zip(response.outputs, response.raw_output_contents)}


def bench(binary: str, addr: str, names: Path, args, label: str, extra=()) -> dict:
    out = subprocess.run([binary, "grpc", "--addr", addr, "--model", "m0000", "--models-file", str(names),
                          "--concurrency", str(args.clients), *extra, "--label", label],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"densemesh-bench against {label} failed: {out.stderr[-2000:]}")
    return next(json.loads(line)["figures"] for line in reversed(out.stdout.splitlines()) if line.startswith("{"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--meshd", default=str(REPO / "target/release/meshd"))
    parser.add_argument("--bench", default=str(REPO / "target/release/densemesh-bench"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", default="20s")
    parser.add_argument("--warmup", default="3s")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="densemesh-sklearn-density-"))
    root = work / "models"
    started = time.monotonic()
    make_models(root, args.models)
    print(f"{args.models} models fitted and written in {time.monotonic() - started:.0f} s", flush=True)
    names = work / "models.txt"
    all_names = [f"m{i:04d}" for i in range(args.models)]
    names.write_text("\n".join(all_names) + "\n")
    rows = np.random.default_rng(5).normal(size=(1, 4)).astype(np.float32)
    want = joblib.load(root / "mlserver" / "m0000" / "model.joblib")
    traffic = ["--zipf", "1.0", "--duration", args.duration, "--warmup", args.warmup]
    results = {}
    try:
        # MLServer: one model, then all (it loads its repository at start).
        proc, addr = start_mlserver(only_first(root, "mlserver", work), work, "one")
        try:
            ready_models(addr, ["m0000"], 180)
            time.sleep(2)
            one = rss_bytes(proc.pid)
        finally:
            stop(proc)
        proc, addr = start_mlserver(root / "mlserver", work, "all")
        try:
            stub = ready_models(addr, all_names, 900)
            time.sleep(2)
            full = rss_bytes(proc.pid)
            got = answer(stub, "m0000", rows)
            assert list(got["predict"]) == list(want.predict(rows)), got
            figures = bench(args.bench, addr, names, args, "mlserver", traffic)
            results["mlserver"] = (one, full, figures, rss_bytes(proc.pid))
        finally:
            stop(proc)
        # meshd: the same, loading on first requests.
        proc, addr = start_meshd(args.meshd, only_first(root, "onnx", work), work, "one")
        try:
            stub = ready_models(addr, [], 1)
            answer(stub, "m0000", rows)
            time.sleep(2)
            one = rss_bytes(proc.pid)
        finally:
            stop(proc)
        proc, addr = start_meshd(args.meshd, root / "onnx", work, "all")
        try:
            load = bench(args.bench, addr, names, args, "meshd-load", ["--each-once", "--timeout", "60s"])
            assert load["errors"] == 0, load
            stub = ready_models(addr, all_names, 60)
            time.sleep(2)
            full = rss_bytes(proc.pid)
            got = answer(stub, "m0000", rows)
            assert list(got["label"]) == list(want.predict(rows)), got
            np.testing.assert_allclose(got["probabilities"], want.predict_proba(rows)[0], rtol=1e-5, atol=1e-6)
            figures = bench(args.bench, addr, names, args, "meshd", traffic)
            results["meshd"] = (one, full, figures, rss_bytes(proc.pid))
        finally:
            stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.models
    out = {"bench": "sklearn-density", "models": n, "clients": args.clients}
    print(f"{'':<10}{'RSS, 1 model':>14}{f'RSS, {n:,}':>14}{'KiB/model':>11}{'req/s':>10}{'p50 µs':>9}"
          f"{'p99 µs':>9}{'errors':>8}")
    for server, (one, full, f, after) in results.items():
        per_model = (full - one) / (n - 1) / KIB
        print(f"{server:<10}{one / 2**20:>12.1f}MB{full / 2**20:>12.1f}MB{per_model:>11.1f}"
              f"{f['requests_per_second']:>10,.0f}{f['p50_us']:>9}{f['p99_us']:>9}{f['errors']:>8}")
        out[server] = {"rss_one_mib": round(one / 2**20, 1), "rss_all_mib": round(full / 2**20, 1),
                       "kib_per_model": round(per_model, 1), "rps": round(f["requests_per_second"]),
                       "p50_us": f["p50_us"], "p99_us": f["p99_us"], "errors": f["errors"],
                       "rss_after_traffic_mib": round(after / 2**20, 1)}
    m, s = out["meshd"], out["mlserver"]
    print(f"meshd ÷ MLServer: memory per model {m['kib_per_model'] / s['kib_per_model']:.2f}×, "
          f"req/s {m['rps'] / s['rps']:.1f}×, p50 {m['p50_us'] / s['p50_us']:.2f}×")
    print(json.dumps(out))
    return 0 if m["errors"] == 0 and s["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
