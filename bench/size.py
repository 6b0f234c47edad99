"""Size accounting benchmark: what meshd charges a model, and what a loaded model really costs.

1. charge: the same ~100 KB model (an MLP, 128→160→32) loaded `--repeat` times into one meshd while
   nothing else runs, then `--repeat` times more while `--clients` (8) closed-loop gRPC clients
   (`densemesh-bench grpc`) send requests to another model: the charged size of each load (the
   `densemesh_loaded_model_size_bytes` histogram's sum, read before and after each load) as min,
   median and max, and meshd's own resident-set growth per copy over the quiet loads;
2. per-model: `--models` (1,000) tiny MLPs (16→32→4, random weights, one file each) loaded into a
   fresh meshd by one inference each: meshd's resident-set growth per model, against
   onnxruntime-python creating one InferenceSession per model and running it once, in the same run,
   with default SessionOptions, with one intra-op thread, and with lean options.

Usage: .venv/bin/python bench/size.py [--repeat 10] [--models 1000] [--part charge|per-model|all]
Needs `cargo build --release -p densemesh-mesh --bins` (or `--bin-dir target/debug`) and the .venv.
Prints a table per part and one JSON line of all figures. See bench/README.md.
"""
import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
OUT = REPO / "bench" / "out" / "size"
KIB = 1024


def mlp(path, dims, seed):
    """An MLP dims[0] → … → dims[-1] (MatMul, Add, Relu; no Relu last), input x [N, dims[0]], output y."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        inits += [numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal((b,)).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]))
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="densemesh-bench")
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def repository(name, models):
    """A model repository under bench/out/size: {model_id: (dims, seed)}, written once."""
    repo = OUT / name
    stamp = repo / ".complete"
    if not stamp.exists():
        for model_id, (dims, seed) in models.items():
            mlp(repo / model_id / "model.onnx", dims, seed)
        stamp.write_text("")
    return repo


def dims_arg(text):
    return tuple(int(d) for d in text.split(","))


def resident(pid="self"):
    """(VmRSS, RssAnon) of a process in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * KIB
    return fields["VmRSS"], fields["RssAnon"]


def infer(server, model, width):
    from meshd import raw_request
    x = np.ones((1, width), np.float32)
    server.stub.ModelInfer(raw_request(model, [("x", "FP32", x)]), timeout=60)


def charged_sum(server):
    return server.metrics().get("densemesh_loaded_model_size_bytes_sum", 0.0)


def served(server):
    return server.metrics().get('densemesh_requests_total{method="ModelInfer",code="OK"}', 0.0)


def calibration_line(server):
    """meshd's 'onnxruntime ready' log line: the session costs it calibrated at start."""
    for line in server.log_path.read_text(errors="replace").splitlines():
        if "onnxruntime ready" in line:
            return line.split("onnxruntime ready", 1)[-1].strip()
    return "(not logged)"


def stats(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def start_meshd(bin_dir, repo):
    from meshd import Meshd
    os.environ["MESHD_BIN"] = str(bin_dir / "meshd")
    return Meshd(repo, "--capacity", "16GiB")


def part_charge(args):
    probe_dims, busy_dims = args.probe_dims, (16, 32, 4)
    ids = [f"probe-{i:03d}" for i in range(2 * args.repeat)]
    # The same model under every id (same seed): each load builds a session of the same bytes.
    repo = repository(f"charge-{'x'.join(map(str, probe_dims))}-{len(ids)}",
                      {**{i: (probe_dims, 0) for i in ids}, "busy": (busy_dims, 1)})
    file_bytes = (repo / ids[0] / "model.onnx").stat().st_size
    server = start_meshd(args.bin_dir, repo)
    hammer = None
    try:
        infer(server, "busy", busy_dims[0])

        def load(model_id):
            before = charged_sum(server)
            infer(server, model_id, probe_dims[0])
            return int(charged_sum(server) - before)

        rss_before = resident(server.proc.pid)
        alone = [load(i) for i in ids[:args.repeat]]
        rss_after = resident(server.proc.pid)

        cmd = [str(args.bin_dir / "densemesh-bench"), "grpc", "--addr", server.grpc_addr, "--model", "busy",
               "--concurrency", str(args.clients), "--duration", "1h", "--warmup", "0s"]
        hammer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_count = served(server)
        deadline = time.monotonic() + 30
        while served(server) < start_count + 200:
            if hammer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {args.clients} clients did not get going: {' '.join(cmd)}")
            time.sleep(0.05)
        count_from, time_from = served(server), time.monotonic()
        busy = [load(i) for i in ids[args.repeat:]]
        rate = (served(server) - count_from) / (time.monotonic() - time_from)
        calibration = calibration_line(server)
    finally:
        if hammer is not None:
            hammer.kill()
            hammer.wait()
        server.stop()

    real = (rss_after[1] - rss_before[1]) / args.repeat
    everything = alone + busy
    figures = {
        "model": f"MLP {'→'.join(map(str, probe_dims))}", "file_bytes": file_bytes, "repeat": args.repeat,
        "alone": stats(alone), "busy": stats(busy), "clients": args.clients, "busy_req_per_s": round(rate),
        "spread": max(everything) / min(everything) - 1,
        "busy_over_alone": statistics.median(busy) / statistics.median(alone),
        "meshd_anon_rss_growth_per_copy": real, "calibration": calibration,
    }
    print(f"\n## charged size: {figures['model']} ({file_bytes / KIB:.1f} KiB file), {args.repeat} loads each")
    print(f"{'':34s}{'min KiB':>10s}{'median':>10s}{'max':>10s}")
    for label, s in ((f"alone", figures["alone"]),
                     (f"{args.clients} clients on another model", figures["busy"])):
        print(f"{label:34s}{s['min'] / KIB:10.1f}{s['median'] / KIB:10.1f}{s['max'] / KIB:10.1f}")
    print(f"spread over all {len(everything)} loads: {figures['spread'] * 100:.1f}% (max ÷ min − 1); "
          f"median under load ÷ alone: {figures['busy_over_alone']:.3f}; "
          f"the clients sent {rate:.0f} req/s during the loads")
    print(f"meshd's anonymous RSS growth per copy over the quiet loads: {real / KIB:.1f} KiB "
          f"(charged ÷ that: {figures['alone']['median'] / real:.2f})")
    print(f"meshd calibrated at start: {calibration}")
    return figures


def python_sessions(mode, repo, count, width):
    """In this process: RSS growth per InferenceSession over `count` models (run once each)."""
    import onnxruntime as ort
    libc = ctypes.CDLL("libc.so.6")

    def settled():
        gc.collect()
        libc.malloc_trim(0)
        return resident()[0]

    def options():
        so = ort.SessionOptions()
        if mode in ("one-thread", "lean"):
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
        if mode == "lean":
            so.enable_cpu_mem_arena = False
            so.enable_mem_pattern = False
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return so

    x = np.ones((1, width), np.float32)
    paths = [str(repo / f"tiny-{i:04d}" / "model.onnx") for i in range(count)]
    warm = ort.InferenceSession(str(repo / "warm" / "model.onnx"), options(), providers=["CPUExecutionProvider"])
    warm.run(None, {"x": x})
    before = settled()
    sessions = [ort.InferenceSession(p, options(), providers=["CPUExecutionProvider"]) for p in paths]
    created = settled()
    for s in sessions:
        s.run(None, {"x": x})
    after = settled()
    return {"per_session_created": (created - before) / count, "per_session": (after - before) / count}


def part_per_model(args):
    dims = args.tiny_dims
    models = {f"tiny-{i:04d}": (dims, 1000 + i) for i in range(args.models)}
    repo = repository(f"tiny-{'x'.join(map(str, dims))}-{args.models}", {**models, "warm": (dims, 0)})
    server = start_meshd(args.bin_dir, repo)
    try:
        infer(server, "warm", dims[0])
        before, charged_before = resident(server.proc.pid), charged_sum(server)
        started = time.monotonic()
        for model_id in models:
            infer(server, model_id, dims[0])
        took = time.monotonic() - started
        after, charged_after = resident(server.proc.pid), charged_sum(server)
    finally:
        server.stop()
    meshd = {"rss_per_model": (after[0] - before[0]) / args.models,
             "anon_rss_per_model": (after[1] - before[1]) / args.models,
             "charged_per_model": (charged_after - charged_before) / args.models,
             "load_and_first_answer_ms": took / args.models * 1000}
    python = {}
    for mode in ("default", "one-thread", "lean"):
        out = subprocess.run([sys.executable, __file__, "--python-sessions", mode, str(repo), str(args.models),
                              str(dims[0])], check=True, capture_output=True, text=True).stdout
        python[mode] = json.loads(out.strip().splitlines()[-1])
    figures = {"model": f"MLP {'→'.join(map(str, dims))}", "models": args.models, "meshd": meshd,
               "python": python, "meshd_over_python_default": meshd["rss_per_model"] / python["default"]["per_session"]}
    print(f"\n## memory per loaded model: {args.models} × {figures['model']} "
          f"({(repo / 'warm' / 'model.onnx').stat().st_size / KIB:.1f} KiB files), one inference each")
    print(f"{'':70s}{'KiB per model':>14s}")
    print(f"{'meshd: RSS growth':70s}{meshd['rss_per_model'] / KIB:14.1f}")
    print(f"{'meshd: charged':70s}{meshd['charged_per_model'] / KIB:14.1f}")
    labels = {"default": "onnxruntime-python, default SessionOptions",
              "one-thread": "onnxruntime-python, default but 1 intra-op thread",
              "lean": "onnxruntime-python, lean (no arena/mem pattern, basic opt, 1 thread)"}
    for mode, label in labels.items():
        p = python[mode]
        print(f"{label:70s}{p['per_session'] / KIB:14.1f}   ({p['per_session_created'] / KIB:.1f} before the runs)")
    print(f"meshd ÷ onnxruntime-python default: {figures['meshd_over_python_default']:.2f} (target ≤ 1.25); "
          f"meshd loaded and answered each model in {meshd['load_and_first_answer_ms']:.1f} ms")
    return figures


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--python-sessions":
        mode, repo, count, width = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(python_sessions(mode, repo, count, width)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["charge", "per-model", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=10, help="loads alone, and loads under traffic")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients during the loads under traffic")
    parser.add_argument("--probe-dims", type=dims_arg, default=(128, 160, 32), help="the charged model's layers")
    parser.add_argument("--models", type=int, default=1000, help="tiny models for the per-model figure")
    parser.add_argument("--tiny-dims", type=dims_arg, default=(16, 32, 4), help="the tiny models' layers")
    parser.add_argument("--bin-dir", type=Path, default=REPO / "target" / "release",
                        help="where meshd and densemesh-bench are")
    args = parser.parse_args()
    wheel = sorted((REPO / ".venv").glob("lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*"))
    if wheel:
        os.environ.setdefault("ORT_DYLIB_PATH", str(wheel[-1]))
    print("$", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    figures = {"meshd": str(args.bin_dir / "meshd")}
    if args.part in ("charge", "all"):
        figures["charge"] = part_charge(args)
    if args.part in ("per-model", "all"):
        figures["per_model"] = part_per_model(args)
    print(json.dumps({"kind": "size", **figures}))


if __name__ == "__main__":
    main()
