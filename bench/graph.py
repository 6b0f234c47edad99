"""A three-step inference graph run inside meshd against the same three models called one after the
other by the client: p50, p99 and req/s of each, and what meshd adds per step beyond the step's own
inference.

    .venv/bin/python bench/graph.py                                  # release build, ~30 s
    .venv/bin/python bench/graph.py --bin-dir target/debug --duration 3

One meshd on a repository of three small ONNX models written by the e2e tests' generator
(tests/e2e/graph_models.py): scale (x*2+1) -> classify (a 4x3 linear layer) -> argmax, all loaded in
this pod. The graph is KServe's Sequence with `$response` data. The client is one grpcio caller in a
closed loop (the next request when the last is answered), with each request serialized once; the
"three round trips" client does what a caller without graphs must: call scale, decode its output into
the next request, call classify, the same again for argmax. A Python client costs more per call than
meshd does, so the round-trip figures carry three clients' costs; "added per step" is meshd's own
figure, from its metrics over the graph run: the mean time a step took
(densemesh_graph_step_duration_seconds) less the mean time the runtime spent on an inference
(densemesh_infer_duration_seconds). Prints a table and one JSON line.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the e2e tests' meshd launcher and model generator

from graph_models import CHAIN, by_hand, write_repository  # noqa: E402
from meshd import Meshd  # noqa: E402


def request(model, name, x):
    from tritonclient.grpc import service_pb2

    message = service_pb2.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return message


def closed_loop(call, seconds, warmup):
    """Calls `call` back to back for `warmup` then `seconds`; (latencies of the measured calls, wall time)."""
    end_warmup = time.perf_counter() + warmup
    while time.perf_counter() < end_warmup:
        call()
    latencies = []
    started = time.perf_counter()
    stop = started + seconds
    while (now := time.perf_counter()) < stop:
        call()
        latencies.append(time.perf_counter() - now)
    return np.array(latencies), time.perf_counter() - started


def metric(values, name, **labels):
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return values.get(key, 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per path")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    os.environ["MESHD_BIN"] = str(Path(args.bin_dir) / "meshd")

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    work = Path(__import__("tempfile").mkdtemp(prefix="bench-graph-"))
    server = Meshd(write_repository(work / "repo"), "--capacity", "256MiB")
    try:
        sys.path.insert(0, str(work))
        from grpc_tools import protoc

        proto_dir = REPO / "proto" / "proto" / "densemesh"
        assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={work}", f"--grpc_python_out={work}",
                            str(proto_dir / "admin.proto")]) == 0
        import admin_pb2
        import admin_pb2_grpc

        channel = grpc.insecure_channel(server.grpc_addr)
        admin_pb2_grpc.AdminStub(channel).SetGraph(admin_pb2.SetGraphRequest(name="chain", spec_json=json.dumps(CHAIN)))
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = np.random.default_rng(0).normal(size=(args.rows, 4)).astype(np.float32)
        want = by_hand(x)

        graph_body = request("chain", "x", x)

        def graph():
            answer = stub.ModelInfer(graph_body)
            return np.frombuffer(answer.raw_output_contents[0], dtype=np.int64)

        def three_trips():
            scaled = stub.ModelInfer(request("scale", "x", x))
            s = np.frombuffer(scaled.raw_output_contents[0], dtype=np.float32).reshape(x.shape)
            logits = stub.ModelInfer(request("classify", "input", s))
            l = np.frombuffer(logits.raw_output_contents[0], dtype=np.float32).reshape(args.rows, 3)
            answer = stub.ModelInfer(request("argmax", "logits", l))
            return np.frombuffer(answer.raw_output_contents[0], dtype=np.int64)

        assert np.array_equal(graph(), want.reshape(-1)) and np.array_equal(three_trips(), want.reshape(-1))

        rows = []
        for label, call in (("three client round trips", three_trips), ("graph in meshd", graph)):
            before = server.metrics()
            latencies, wall = closed_loop(call, args.duration, args.warmup)
            after = server.metrics()
            row = {"path": label, "requests": len(latencies), "req_s": len(latencies) / wall,
                   "p50_us": float(np.percentile(latencies, 50) * 1e6),
                   "p99_us": float(np.percentile(latencies, 99) * 1e6)}
            if label == "graph in meshd":
                steps = sum(metric(after, "densemesh_graph_step_duration_seconds_sum", graph="chain", step=s)
                            - metric(before, "densemesh_graph_step_duration_seconds_sum", graph="chain", step=s)
                            for s in ("scale", "classify", "argmax"))
                count = sum(metric(after, "densemesh_graph_step_duration_seconds_count", graph="chain", step=s)
                            - metric(before, "densemesh_graph_step_duration_seconds_count", graph="chain", step=s)
                            for s in ("scale", "classify", "argmax"))
                infer = (metric(after, "densemesh_infer_duration_seconds_sum")
                         - metric(before, "densemesh_infer_duration_seconds_sum"))
                infers = (metric(after, "densemesh_infer_duration_seconds_count")
                          - metric(before, "densemesh_infer_duration_seconds_count"))
                row["step_mean_us"] = steps / count * 1e6
                row["inference_mean_us"] = infer / infers * 1e6
                row["added_per_step_us"] = row["step_mean_us"] - row["inference_mean_us"]
            rows.append(row)
        print(f"{'path':<26} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8}")
        for r in rows:
            print(f"{r['path']:<26} {r['req_s']:>8.0f} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f}")
        g = rows[1]
        print(f"per step in meshd: {g['step_mean_us']:.0f} µs mean, of which the runtime's inference "
              f"{g['inference_mean_us']:.0f} µs: {g['added_per_step_us']:.0f} µs added per step")
        print(json.dumps({"bin_dir": args.bin_dir, "rows": args.rows, "results": rows}))
        channel.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
