#!/usr/bin/env bash
# The issue's benchmarks in one go, on loopback only; prints a summary table at the end.
#   (a) meshd serving a tiny model (scikit-learn iris, as ONNX) over V2 gRPC, concurrency 1 and 8
#   (b) the same model through ONNX Runtime in process, no network: the floor
#   (c) MLServer serving the scikit-learn original over V2 gRPC, same load generator
#   (d) cold load of a ~100 MB ONNX model: from disk vs from bytes in memory, and first request to
#       a fresh meshd
# Usage: bench/run.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
out=bench/out
mkdir -p "$out"
log="$out/results.jsonl"
: > "$log"

scripts/setup.sh test
source scripts/env.sh
cargo build --release -p densemesh-mesh --bins
bench=target/release/densemesh-bench

# Assets: the tiny model, the ~100 MB model, MLServer's copy of the scikit-learn original.
rm -rf "$out/models" "$out/mlserver"
mkdir -p "$out/models" "$out/big"
cp -r examples/models/iris-logreg "$out/models/"
cp -r examples/sklearn "$out/mlserver"
[ -f "$out/big/dense-0/model.onnx" ] || python examples/generate_models.py --dense "$out/big" --count 1 --mb 100
if [ ! -x "$out/venv-mlserver/bin/mlserver" ]; then
    python3 -m venv "$out/venv-mlserver"
    "$out/venv-mlserver/bin/pip" install -q mlserver mlserver-sklearn
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start_meshd() { # repo -> sets grpc
    rm -f "$out/addr.json"
    target/release/meshd serve --model-repo "$1" --grpc-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
        --addr-file "$out/addr.json" --capacity 4GiB 2>>"$out/meshd.log" &
    pids+=($!)
    for _ in $(seq 1 300); do [ -f "$out/addr.json" ] && break; sleep 0.1; done
    grpc=$(python -c "import json;print(json.load(open('$out/addr.json'))['grpc_addr'])")
}

run() { "$@" | tee /dev/stderr | sed -n 's/^JSON //p' >> "$log"; }

echo "== (a) meshd, tiny model" >&2
start_meshd "$out/models"
run $bench grpc --addr "$grpc" --model iris-logreg --server-live-only --duration "${secs}s" --label "grpc-floor"
for c in 1 8; do
    run $bench grpc --addr "$grpc" --model iris-logreg --concurrency $c --duration "${secs}s" --label meshd
done
cleanup; pids=()

echo "== (b) in process" >&2
for c in 1 8; do
    run $bench inproc --model-file "$out/models/iris-logreg/model.onnx" --concurrency $c --duration "${secs}s" --label inproc
done

echo "== (c) MLServer, scikit-learn original" >&2
mls_grpc=$(python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
mls_http=$(python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
mls_metrics=$(python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
(cd "$out/mlserver" && MLSERVER_HOST=127.0.0.1 MLSERVER_GRPC_PORT=$mls_grpc MLSERVER_HTTP_PORT=$mls_http \
    MLSERVER_METRICS_PORT=$mls_metrics MLSERVER_PARALLEL_WORKERS=0 \
    ../venv-mlserver/bin/mlserver start . >>../mlserver.log 2>&1) &
pids+=($!)
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$mls_http/v2/models/iris-logreg/ready" >/dev/null && break
    sleep 0.2
done
for c in 1 8; do
    run $bench grpc --addr "127.0.0.1:$mls_grpc" --model iris-logreg --concurrency $c --duration "${secs}s" --label mlserver
done
cleanup; pids=()

echo "== (d) cold load, ~100 MB model" >&2
run $bench cold-load --model-file "$out/big/dense-0/model.onnx" --repeat 5
start_meshd "$out/big"
first=$(python - "$grpc" <<'PY'
import sys, time, numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
i = g.InferInput("x", [1, 256], "FP32"); i.set_data_from_numpy(np.ones((1, 256), np.float32))
t = time.perf_counter(); c.infer("dense-0", [i]); cold = time.perf_counter() - t
t = time.perf_counter(); c.infer("dense-0", [i]); hot = time.perf_counter() - t
print(f'{{"kind": "first-request", "cold_ms": {cold * 1000:.1f}, "hot_ms": {hot * 1000:.2f}}}')
PY
)
echo "$first" | tee -a "$log" >&2
cleanup; pids=()

python - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def get(label, c):
    return next(r["report"] for r in rows if r.get("label") == label and r.get("concurrency") == c)
print("\n== summary (this machine: 2 cores shared by client and server, loopback)")
print(f"{'':28}{'c=1 req/s':>12}{'p50 µs':>9}{'p99 µs':>9}{'c=8 req/s':>12}{'p50 µs':>9}{'p99 µs':>9}")
for label in ("meshd", "inproc", "mlserver"):
    a, b = get(label, 1), get(label, 8)
    print(f"{label:28}{a['requests_per_second']:>12.0f}{a['p50_us']:>9}{a['p99_us']:>9}"
          f"{b['requests_per_second']:>12.0f}{b['p50_us']:>9}{b['p99_us']:>9}")
floor = get("grpc-floor", 1)
print(f"{'bare gRPC round trip':28}{floor['requests_per_second']:>12.0f}{floor['p50_us']:>9}{floor['p99_us']:>9}")
m1, m8, i1, s1, s8 = get("meshd", 1), get("meshd", 8), get("inproc", 1), get("mlserver", 1), get("mlserver", 8)
print(f"\nmeshd / MLServer req/s: c=1 {m1['requests_per_second'] / s1['requests_per_second']:.1f}x, "
      f"c=8 {m8['requests_per_second'] / s8['requests_per_second']:.1f}x   (target >= 10x)")
print(f"p50 added over in-process ort (c=1): {m1['p50_us'] - i1['p50_us']} µs   (target <= 50 µs); "
      f"of which the bare gRPC round trip is {floor['p50_us']} µs, meshd's own work {m1['p50_us'] - floor['p50_us'] - i1['p50_us']} µs")
cold = next(r for r in rows if r["kind"] == "cold-load")
first = next(r for r in rows if r["kind"] == "first-request")
print(f"cold load {cold['bytes'] / 1e6:.0f} MB: from disk {cold['disk_ms']:.0f} ms "
      f"(page cache {'dropped' if cold['page_cache_dropped'] else 'warm'}), from memory {cold['memory_ms']:.0f} ms; "
      f"first request to a fresh meshd {first['cold_ms']:.0f} ms, then {first['hot_ms']:.2f} ms")
PY
