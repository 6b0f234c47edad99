"""Loaded density: N distinct tiny models all loaded in one meshd, then Zipf traffic over all of them.

Issue 15's benchmark. Steps, one meshd on the embedded store:
1. makes `--count` distinct 16→32→4 MLPs (`<root>/m<NNNNNNN>/model.onnx`, about 3 KB each, each with its
   own random weights, so nothing can be shared between them); a later run with the same `--root` and
   `--count` reuses them;
2. starts meshd on that repository and waits until every model is registered; its resident set then is
   the baseline (registered, none loaded);
3. asks the first `--one-at-a-time` models (1,000) once each from one client, one request at a time:
   the server's own time per first request, load included, with nothing queued before it (the
   `densemesh_request_duration_seconds` sum over its count) and the client's p50;
   then asks every other model once, `--clients` (32) at a time (`densemesh-bench grpc --each-once`):
   the time to load them all one request each, and the server time per request again, which now
   includes the wait behind the other clients' loads;
4. checks that all are loaded at once (`densemesh_models_loaded`, no eviction) and reads the resident
   set: KiB per loaded model all-in (RSS over N) and on top of registration;
5. runs `--duration` of Zipf (exponent 1.0) traffic over all N from `--clients` closed-loop clients on
   one client thread: req/s, p50, p99, errors.

The client runs on the same 2 cores as meshd, so req/s is what both leave each other.
Usage: python3 bench/density.py --count 100000 [--meshd target/release/meshd]
       [--bench target/release/densemesh-bench] [--root /dev/shm/densemesh-density] [--keep]
Needs numpy and onnx (the project's .venv). Prints a table and one JSON line. See bench/README.md.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from registry_density import reusable, rss_bytes, stamp  # noqa: E402  (bench/ is the script's directory)

REPO = Path(__file__).resolve().parents[1]
KIB = 1024
DIMS = (16, 32, 4)


def template_model():
    """A 16→32→4 MLP whose weights are one float block each; returns (bytes, [(offset, length)])."""
    rng = np.random.default_rng(12345)
    weights = []
    for i, (a, b) in enumerate(zip(DIMS, DIMS[1:])):
        weights.append(numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"w{i}"))
        weights.append(numpy_helper.from_array(rng.standard_normal(b).astype(np.float32), f"b{i}"))
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Add", ["h0", "b0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIMS[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DIMS[-1]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    spans = []
    for w in weights:
        raw = w.raw_data
        at = data.find(raw)
        if at < 0 or data.find(raw, at + 1) >= 0:
            raise RuntimeError(f"cannot locate weight {w.name} in the serialized template")
        spans.append((at, len(raw)))
    return data, spans


def make_repository(root: Path, count: int):
    """`count` model directories with distinct weights; reuses a complete earlier one."""
    if reusable(root, count):
        return 0.0
    data, spans = template_model()
    floats = sum(length for _, length in spans) // 4
    rng = np.random.default_rng(1)
    start = time.monotonic()
    batch = 4096
    for first in range(0, count, batch):
        n = min(batch, count - first)
        # Weights in [-1, 1): distinct per model, the same scale as the template's.
        block = (rng.random((n, floats), dtype=np.float32) * 2 - 1).tobytes()
        width = floats * 4
        for j in range(n):
            model = bytearray(data)
            mine = block[j * width:(j + 1) * width]
            pos = 0
            for at, length in spans:
                model[at:at + length] = mine[pos:pos + length]
                pos += length
            d = root / f"m{first + j:07d}"
            d.mkdir()
            with open(d / "model.onnx", "wb") as f:
                f.write(model)
    stamp(root, count)
    return time.monotonic() - start


def metrics(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=60) as answer:
        return answer.read().decode()


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of every sample of `name` whose labels contain `labels`."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def wait_registered(metrics_addr: str, count: int, proc, deadline_s: float):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"meshd exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{metrics_addr}/api/v1/cluster", timeout=60) as answer:
                if int(json.load(answer)["models_registered"]) >= count:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not all {count} models registered within {deadline_s} s")


def run_bench(bench: str, args: list, log: Path) -> dict:
    out = subprocess.run([bench, "grpc", *args], capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"densemesh-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["figures"]
    raise RuntimeError(f"densemesh-bench printed no JSON line: {out.stdout[-2000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--meshd", default=str(REPO / "target/release/meshd"))
    parser.add_argument("--bench", default=str(REPO / "target/release/densemesh-bench"))
    parser.add_argument("--root", default="/dev/shm/densemesh-density")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--one-at-a-time", type=int, default=1_000,
                        help="models first asked one request at a time, for the unqueued first-request time")
    parser.add_argument("--duration", default="30s")
    parser.add_argument("--warmup", default="5s")
    parser.add_argument("--capacity", default="20GiB")
    parser.add_argument("--meshd-arg", action="append", default=[], help="more meshd flags (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the model directories")
    args = parser.parse_args()

    root = Path(args.root)
    made_s = make_repository(root, args.count)
    print(f"repository: {args.count} models under {root} ({made_s:.0f} s to make)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="densemesh-density-"))
    names = work / "models.txt"
    names.write_text("".join(f"m{i:07d}\n" for i in range(args.count)))
    alone = min(args.one_at_a_time, args.count - 1)
    first_names, rest_names = work / "first.txt", work / "rest.txt"
    first_names.write_text("".join(f"m{i:07d}\n" for i in range(alone)))
    rest_names.write_text("".join(f"m{i:07d}\n" for i in range(alone, args.count)))

    addr_file = work / "meshd.addr"
    log = open(work / "meshd.log", "w")
    started = time.monotonic()
    proc = subprocess.Popen(
        [args.meshd, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
         "--metrics-addr", "127.0.0.1:0", "--model-repo", str(root), "--addr-file", str(addr_file),
         "--cache-dir", str(work / "cache"), "--capacity", args.capacity, *args.meshd_arg],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        while not addr_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {proc.returncode}; see {work / 'meshd.log'}")
            if time.monotonic() - started > 600:
                raise RuntimeError("meshd did not start within 600 s")
            time.sleep(0.2)
        addrs = json.loads(addr_file.read_text())
        grpc, metrics_addr = addrs["grpc_addr"], addrs["metrics_addr"]
        wait_registered(metrics_addr, args.count, proc, 600)
        registered_s = time.monotonic() - started
        time.sleep(3)
        rss_registered = rss_bytes(proc.pid)
        print(f"registered in {registered_s:.1f} s, RSS {rss_registered / 2**20:.0f} MiB", flush=True)

        def served_and_server_s(before: str, after: str):
            served = metric(after, "densemesh_request_duration_seconds_count") - metric(
                before, "densemesh_request_duration_seconds_count")
            server_s = metric(after, "densemesh_request_duration_seconds_sum") - metric(
                before, "densemesh_request_duration_seconds_sum")
            return served, server_s

        before = metrics(metrics_addr)
        single = run_bench(args.bench, [
            "--addr", grpc, "--model", "m0000000", "--models-file", str(first_names), "--each-once",
            "--concurrency", "1", "--timeout", "120s", "--label", "first-one-at-a-time",
        ], work / "first-one-at-a-time.log")
        after = metrics(metrics_addr)
        single_served, single_server_s = served_and_server_s(before, after)
        before = after
        load = run_bench(args.bench, [
            "--addr", grpc, "--model", "m0000000", "--models-file", str(rest_names), "--each-once",
            "--concurrency", str(args.clients), "--timeout", "120s", "--label", "load-all",
        ], work / "load-all.txt")
        after = metrics(metrics_addr)
        served, server_s = served_and_server_s(before, after)
        load_seconds = load["seconds"] + single["seconds"]
        load_errors = load["errors"] + single["errors"]
        loaded = metric(after, "densemesh_models_loaded")
        charged = metric(after, "densemesh_used_bytes")
        evictions = metric(after, "densemesh_cache_evictions_total")
        time.sleep(3)
        rss_loaded = rss_bytes(proc.pid)
        print(f"loaded {loaded:.0f} in {load_seconds:.1f} s, RSS {rss_loaded / 2**20:.0f} MiB", flush=True)

        traffic = run_bench(args.bench, [
            "--addr", grpc, "--model", "m0000000", "--models-file", str(names), "--zipf", "1.0",
            "--concurrency", str(args.clients), "--duration", args.duration, "--warmup", args.warmup,
            "--timeout", "30s", "--label", "zipf",
        ], work / "zipf.txt")
        final = metrics(metrics_addr)
        charged_after = metric(final, "densemesh_used_bytes")
        time.sleep(3)
        rss_after = rss_bytes(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    n = args.count
    figures = {
        "bench": "density",
        "models": n,
        "registered_s": round(registered_s, 1),
        "rss_registered_mib": round(rss_registered / 2**20, 1),
        "load_all_s": round(load_seconds, 1),
        "load_all_errors": load_errors,
        "loads_per_s_concurrent": round(served / load["seconds"]) if load["seconds"] else None,
        "first_request_alone_server_ms": round(single_server_s / single_served * 1000, 3) if single_served else None,
        "first_request_alone_client_p50_us": single["p50_us"],
        "first_request_server_ms": round(server_s / served * 1000, 3) if served else None,
        "first_request_client_p50_us": load["p50_us"],
        "models_loaded": int(loaded),
        "evictions": int(evictions),
        "rss_loaded_mib": round(rss_loaded / 2**20, 1),
        "kib_per_model_all_in": round(rss_loaded / n / KIB, 2),
        "kib_per_model_loaded": round((rss_loaded - rss_registered) / n / KIB, 2),
        "charged_mib": round(charged / 2**20, 1),
        "charged_vs_rss_growth": round(charged / max(1, rss_loaded - rss_registered) - 1, 3),
        "charged_vs_rss_growth_after_traffic": round(charged_after / max(1, rss_after - rss_registered) - 1, 3),
        "zipf_rps": round(traffic["requests_per_second"]),
        "zipf_p50_us": traffic["p50_us"],
        "zipf_p99_us": traffic["p99_us"],
        "zipf_errors": traffic["errors"],
        "zipf_first_error": traffic.get("first_error"),
        "models_loaded_after": int(metric(final, "densemesh_models_loaded")),
        "evictions_after": int(metric(final, "densemesh_cache_evictions_total")),
        "rss_after_traffic_mib": round(rss_after / 2**20, 1),
    }
    rows = [
        ("models", f"{n:,}"),
        ("registered (start → all registered)", f"{registered_s:.1f} s, RSS {rss_registered / 2**20:,.0f} MiB"),
        ("load all, one request each", f"{load_seconds:.1f} s ({n / load_seconds:,.0f} loads/s; "
                                       f"{figures['loads_per_s_concurrent']:,} loads/s from {args.clients} clients), "
                                       f"{load_errors} errors"),
        (f"first request alone (first {alone:,}): server time",
         f"{figures['first_request_alone_server_ms']} ms, client p50 {single['p50_us']} µs"),
        (f"first request among {args.clients} clients: server time",
         f"{figures['first_request_server_ms']} ms (waits included)"),
        ("loaded at once / evictions", f"{int(loaded):,} / {int(evictions)}"),
        ("RSS all loaded", f"{rss_loaded / 2**20:,.0f} MiB = {figures['kib_per_model_all_in']} KiB per model all-in"
                           f" ({figures['kib_per_model_loaded']} KiB on top of registration)"),
        ("charged (densemesh_used_bytes) vs RSS growth", f"{charged / 2**20:,.0f} MiB, "
                                                         f"{figures['charged_vs_rss_growth']:+.1%}"),
        (f"Zipf 1.0, {args.clients} clients", f"{traffic['requests_per_second']:,.0f} req/s, "
                                              f"p50 {traffic['p50_us']} µs, p99 {traffic['p99_us']} µs, "
                                              f"{traffic['errors']} errors"),
        ("after traffic: loaded / evictions / RSS", f"{figures['models_loaded_after']:,} / "
                                                    f"{figures['evictions_after']} / {rss_after / 2**20:,.0f} MiB"),
        ("after traffic: charged vs RSS growth", f"{charged_after / 2**20:,.0f} MiB, "
                                                 f"{figures['charged_vs_rss_growth_after_traffic']:+.1%}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(figures))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if load_errors == 0 and traffic["errors"] == 0 and int(loaded) >= n else 1


if __name__ == "__main__":
    sys.exit(main())
