#!/usr/bin/env bash
# The GPU tier's check on a machine with a GPU (docs/gpu.md), in two halves:
#
#   scripts/device-check.sh build   here, no GPU needed: builds meshd's GPU build (--features
#                                   cuda-kernels, release with LTO, stripped: 29 MB) into target/device/meshd,
#                                   and target/device/meshd.gz (11 MB) to carry: the device tool carries 64 MiB
#   scripts/device-check.sh run     on the GPU machine, from the repository root, with
#                                   target/device/meshd.gz carried there: the checks below; figures on
#                                   stdout and in $OUT/device-check.json (target/device/out without $OUT)
#
# What `run` verifies, each printed as PASS or FAIL with its figure:
#   1. meshd finds the GPU and gives it its --gpu-capacity (densemesh_capacity_bytes{tier="gpu0"});
#   2. a small random BERT (transformers, generated there: the machine has no network) served by meshd
#      from the GPU matches PyTorch on the same GPU: cosine >= 0.9999 on every sentence;
#   3. promotion bandwidth (weights over densemesh_gpu_promotion_duration_seconds) against a plain
#      pinned host-to-device copy of the same bytes in the same run: goal >= 70%;
#   4. GPU against CPU latency (p50) at batch 1 and 32: the same model on a second meshd whose GPU tier
#      has no room (--gpu-capacity 0);
#   5. the GPU tier filled past its capacity (6 models, room for 2): every answer still right, and
#      promotions and demotions both counted.
# The device's state decides some of it, and the script says so rather than guess: the GPU build links
# the CUDA 13 libraries (cuBLAS, cuRAND, the runtime) and needs an NVIDIA driver >= 580. Where they are
# missing it stops with BLOCKED and what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"
device_dir=target/device

build() {
    scripts/setup.sh build
    scripts/setup.sh cuda
    # shellcheck source=scripts/cuda-env.sh
    source scripts/cuda-env.sh
    # Linking needs the libraries the GPU build links (they are not carried: the device has its own)
    # and libcuda.so, which only a driver installs: a stub of the driver's entry points stands in, for
    # the linker alone, and is never shipped.
    .venv-cuda/bin/python -m pip install -q nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.88
    local link="$device_dir/link/lib"
    rm -rf "$device_dir/link" && mkdir -p "$link"
    for lib in cudart cublas cublasLt curand nvrtc; do
        local found
        found="$(ls "$CUDA_HOME"/lib/lib$lib.so.* | head -n1)"
        ln -s "$(realpath "$found")" "$link/lib$lib.so"
    done
    # The driver's entry points as cudarc declares them, from wherever cargo keeps its source.
    local bindings
    bindings="$(cargo metadata --format-version 1 --features densemesh-mesh/cuda-kernels \
        | python3 -c 'import json,sys,os; p=[p for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"][0]; print(os.path.join(os.path.dirname(p["manifest_path"]),"src/driver/sys/mod.rs"))')"
    grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$bindings" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
        | sed 's/.*/void &(void) {}/' >"$device_dir/link/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$device_dir/link/libcuda_stub.c"
    export CUDA_ROOT="$PWD/$device_dir/link"
    export RUSTFLAGS="-L native=$PWD/$link"
    CARGO_TARGET_DIR="$device_dir/build" cargo build --release -p densemesh-mesh --bin meshd \
        --features densemesh-mesh/cuda-kernels
    cp "$device_dir/build/release/meshd" "$device_dir/meshd"
    strip "$device_dir/meshd"
    gzip -6 -c "$device_dir/meshd" >"$device_dir/meshd.gz"
    ls -l "$device_dir/meshd" "$device_dir/meshd.gz"
    echo "device-check: carry $device_dir/meshd.gz (with this repository) to the GPU machine, then run: scripts/device-check.sh run"
}

run() {
    local out="${OUT:-$device_dir/out}"
    mkdir -p "$out"
    local meshd="$device_dir/meshd"
    if [ ! -x "$meshd" ] && [ -e "$meshd.gz" ]; then
        gunzip -c "$meshd.gz" >"$meshd" && chmod +x "$meshd"
    fi
    [ -x "$meshd" ] || { echo "device-check: no $meshd; run scripts/device-check.sh build first" >&2; exit 2; }
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "BLOCKED: no NVIDIA GPU or driver here (nvidia-smi lists none)" | tee "$out/blocked"
        exit 3
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/nvidia-smi.csv"
    local driver
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1 | cut -d. -f1)"
    if [ "$driver" -lt 580 ]; then
        echo "BLOCKED: driver $driver is older than 580, which CUDA 13 (the GPU build's toolkit) needs" | tee "$out/blocked"
        exit 3
    fi
    # The CUDA 13 libraries: wherever pip or a toolkit put them.
    local dirs
    dirs="$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages(), "/usr/local/cuda/lib64", "/usr/local/cuda-13.0/lib64"]
found = set()
for r in roots:
    for pattern in ("nvidia/cu13/lib", "nvidia/*/lib", ""):
        for d in glob.glob(os.path.join(r, pattern)):
            if glob.glob(os.path.join(d, "lib*.so.13")) or glob.glob(os.path.join(d, "libcurand.so.10")):
                found.add(d)
print(":".join(sorted(found)))
PY
)"
    export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ldd "$meshd" | grep -q "not found"; then
        echo "BLOCKED: the GPU build's libraries are missing here:" | tee "$out/blocked"
        ldd "$meshd" | grep "not found" | tee -a "$out/blocked"
        exit 3
    fi
    MESHD="$meshd" OUT="$out" python3 scripts/device_check.py
}

case "$what" in
    build) build ;;
    run) run ;;
    *) echo "usage: scripts/device-check.sh build|run" >&2; exit 2 ;;
esac
