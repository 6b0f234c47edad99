#!/usr/bin/env bash
# meshd's benchmarks in one go, on 127.0.0.1 only, ending with a summary against the targets:
#   (a) meshd serving a tiny model (scikit-learn iris logistic regression, as ONNX), c=1 and c=8,
#       and ServerLive at c=1: the bare gRPC round trip on this machine
#   (b) the same model through ONNX Runtime in process, no network (the floor), c=1 and c=8
#   (c) MLServer serving the scikit-learn original, same load generator, c=1 and c=8
#   (d) a ~100 MB ONNX model: load from disk vs from bytes in memory, and the first request to a
#       fresh meshd (load included)
# Every figure is also a JSON line in bench/out/results.jsonl. See bench/README.md.
# Usage: bench/run.sh [seconds measured per run, default 10]   (each run adds a 2 s warm-up)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
out=bench/out
results="$out/results.jsonl"
export RUST_LIB_BACKTRACE=0 # an error's message is enough here

step() { printf '\n== %s\n' "$*"; }

step "build"
scripts/setup.sh test
source scripts/env.sh
cargo build --release -p densemesh-mesh --bins
bench=target/release/densemesh-bench

step "assets in $out"
mkdir -p "$out"
: > "$results"
rm -rf "$out/models" "$out/mlserver"
mkdir -p "$out/models"
cp -r examples/models/iris-logreg "$out/models/"
cp -r examples/sklearn "$out/mlserver"
big_dir="$out/big"
big="$big_dir/dense-0/model.onnx"
[ -f "$big" ] || python examples/generate_models.py --dense "$big_dir" --count 1 --mb 100
venv="$out/venv-mlserver"
if [ ! -x "$venv/bin/mlserver" ]; then
    echo "installing MLServer into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q mlserver mlserver-sklearn
fi

# Every server started here is stopped on exit, however the script ends.
pids=()
alive() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]; }
stop_servers() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 150); do alive "$p" || break; sleep 0.1; done
        alive "$p" && { echo "pid $p still running 15 s after SIGTERM; killing it" >&2; kill -KILL "$p"; }
        wait "$p" 2>/dev/null || true
    done
    pids=()
}
trap stop_servers EXIT
trap 'exit 130' INT TERM

free_port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# Starts meshd on a model repository; sets $grpc once it listens.
start_meshd() {
    local addr_file="$out/meshd-addr.json"
    rm -f "$addr_file"
    target/release/meshd serve --model-repo "$1" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
        --metrics-addr 127.0.0.1:0 \
        --capacity 2GiB --addr-file "$addr_file" 2>>"$out/meshd.log" &
    pids+=($!)
    local pid=$!
    for _ in $(seq 1 300); do
        [ -s "$addr_file" ] && break
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$out/meshd.log" >&2; echo "meshd exited" >&2; exit 1; }
        sleep 0.1
    done
    grpc=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['grpc_addr'])" "$addr_file")
}

# Runs a densemesh-bench step: its table goes to the terminal, its JSON line to the results too.
measure() {
    local printed
    printed=$("$bench" "$@")
    printf '%s\n' "$printed"
    grep '^{' <<<"$printed" >> "$results"
}
load=(--duration "${secs}s" --warmup 2s)

step "(a) meshd, tiny model"
: > "$out/meshd.log"
start_meshd "$out/models"
# ServerLive right after the c=1 run, so both see the same machine (their difference is meshd's work).
measure grpc --addr "$grpc" --model iris-logreg --concurrency 1 "${load[@]}" --label meshd
measure grpc --addr "$grpc" --model iris-logreg --call server-live "${load[@]}" --label grpc-floor
measure grpc --addr "$grpc" --model iris-logreg --concurrency 8 "${load[@]}" --label meshd
stop_servers

step "(b) ONNX Runtime in process, same model"
for c in 1 8; do
    measure inproc --model-file "$out/models/iris-logreg/model.onnx" --concurrency "$c" "${load[@]}" --label inproc
done

step "(c) MLServer, scikit-learn original"
mls_grpc=$(free_port) mls_http=$(free_port) mls_metrics=$(free_port)
(
    cd "$out/mlserver"
    export MLSERVER_HOST=127.0.0.1 MLSERVER_GRPC_PORT=$mls_grpc MLSERVER_HTTP_PORT=$mls_http \
        MLSERVER_METRICS_PORT=$mls_metrics MLSERVER_PARALLEL_WORKERS=0
    exec ../venv-mlserver/bin/mlserver start . >../mlserver.log 2>&1
) &
pids+=($!)
python bench/v2_client.py wait-ready "127.0.0.1:$mls_grpc" iris-logreg --timeout 120 \
    || { tail -n 30 "$out/mlserver.log" >&2; exit 1; }
for c in 1 8; do
    measure grpc --addr "127.0.0.1:$mls_grpc" --model iris-logreg --concurrency "$c" "${load[@]}" --label mlserver
done
stop_servers

step "(d) cold load, $(du -m "$big" | cut -f1) MB model"
measure cold-load --model-file "$big" --repeat 5
start_meshd "$big_dir"
first=$(python bench/v2_client.py first-request "$grpc" dense-0 --model-file "$big")
printf '%s\n' "$first"
printf '%s\n' "$first" >> "$results"
stop_servers

python bench/summary.py "$results"
