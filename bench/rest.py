"""KServe V2 REST against gRPC on one meshd: the same model, the same inputs, the same closed-loop load,
from clients that do the same (little) work per request, and meshd's own CPU per request.

    .venv/bin/python bench/rest.py                        # release build, ~1 minute
    .venv/bin/python bench/rest.py --bin-dir target/debug --duration 3 --concurrency 1

Each client is a process of its own (no shared GIL) that sends its next request when the last is
answered: gRPC through grpcio with the ModelInferRequest serialized once, REST through http.client on a
kept-alive connection with the body built once, as JSON (`data`) or with the binary-data extension
(`binary_data_size`, outputs asked binary). Both clients check the answer's status and read it whole,
without decoding the tensors. Python clients cost more per request than meshd does, so req/s and
latency are the client's as much as the server's; "meshd CPU µs/req" (meshd's user+system CPU over the
run divided by the requests answered) is the server's cost alone. Prints a table and one JSON line.
"""
import argparse
import http.client
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the e2e tests' meshd launcher

from meshd import Meshd  # noqa: E402


def cpu_seconds(pid):
    """User plus system CPU seconds a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grpc_client(addr, model, x, start, stop, out):
    import grpc
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    body = request.SerializeToString()
    channel = grpc.insecure_channel(addr)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    out.put(closed_loop(lambda: call(body), start, stop))


def rest_client(addr, model, x, binary, start, stop, out):
    host, port = addr.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port))
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
        head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
        body, headers = head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                            "Content-Type": "application/octet-stream"}
    else:
        tensor["data"] = x.reshape(-1).tolist()
        body, headers = json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"}
    path = f"/v2/models/{model}/infer"

    def one():
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {answer[:200]!r}")

    out.put(closed_loop(one, start, stop))


def closed_loop(send, start, stop):
    """Latencies (µs) of the requests sent between `start` and `stop` (wall-clock seconds); the ones
    before `start` are the warm-up."""
    latencies, errors, first_error = [], 0, None
    while True:
        sent = time.time()
        if sent >= stop:
            break
        try:
            send()
        except Exception as e:  # counted, not fatal: the run goes on
            errors += 1
            first_error = first_error or str(e)[:300]
            continue
        if sent >= start:
            latencies.append((time.time() - sent) * 1e6)
    return latencies, errors, first_error


def run(kind, server, model, x, concurrency, warmup, duration):
    out = multiprocessing.Queue()
    start = time.time() + 1.0 + warmup  # 1 s for the clients to start and connect
    stop = start + duration
    procs = []
    for _ in range(concurrency):
        if kind == "grpc":
            args = (grpc_client, (server.grpc_addr, model, x, start, stop, out))
        else:
            args = (rest_client, (server.http_addr, model, x, kind == "rest-binary", start, stop, out))
        procs.append(multiprocessing.Process(target=args[0], args=args[1]))
    for p in procs:
        p.start()
    time.sleep(max(0.0, start - time.time()))
    cpu_before = cpu_seconds(server.proc.pid)
    results = [out.get(timeout=warmup + duration + 60) for _ in procs]
    cpu_used = cpu_seconds(server.proc.pid) - cpu_before
    for p in procs:
        p.join()
    latencies = np.array([v for r in results for v in r[0]])
    errors = sum(r[1] for r in results)
    first_error = next((r[2] for r in results if r[2]), None)
    requests = len(latencies)
    figures = {
        "requests": requests, "errors": errors, "first_error": first_error,
        "requests_per_second": requests / duration,
        "p50_us": float(np.percentile(latencies, 50)) if requests else None,
        "p99_us": float(np.percentile(latencies, 99)) if requests else None,
        # The clients stop at `stop`; meshd's CPU is read once they all answered, so this is per request.
        "meshd_cpu_us_per_request": cpu_used / max(requests, 1) * 1e6,
    }
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    parser.add_argument("--model", default="iris-logreg")
    parser.add_argument("--batch", type=int, default=1, help="rows of the model's [-1, 4] input")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    os.environ["MESHD_BIN"] = str(Path(args.bin_dir) / "meshd")
    x = np.random.default_rng(0).normal(5, 2, size=(args.batch, 4)).astype(np.float32)

    server = Meshd(REPO / "examples" / "models")
    results = []
    try:
        print(f"{'protocol':<12} {'c':>3} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8} {'meshd CPU µs/req':>17} {'errors':>7}")
        for c in [int(v) for v in args.concurrency.split(",")]:
            for kind in ("grpc", "rest-json", "rest-binary"):
                f = run(kind, server, args.model, x, c, args.warmup, args.duration)
                results.append({"protocol": kind, "concurrency": c, **f})
                p50 = f"{f['p50_us']:.0f}" if f["p50_us"] is not None else "-"
                p99 = f"{f['p99_us']:.0f}" if f["p99_us"] is not None else "-"
                print(f"{kind:<12} {c:>3} {f['requests_per_second']:>8.0f} {p50:>8} {p99:>8} "
                      f"{f['meshd_cpu_us_per_request']:>17.0f} {f['errors']:>7}", flush=True)
                if f["first_error"]:
                    print(f"  first error: {f['first_error']}", flush=True)
    finally:
        server.stop()
    print(json.dumps({"run": {"kind": "rest-vs-grpc", "model": args.model, "batch": args.batch,
                              "duration_s": args.duration}, "results": results}))


if __name__ == "__main__":
    main()
