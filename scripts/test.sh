#!/usr/bin/env bash
# The whole test suite: formatting, every crate's unit and integration tests, then the end-to-end
# tests that start meshd and drive it with real clients (tritonclient, the kserve SDK).
set -euo pipefail
cd "$(dirname "$0")/.."
# What compiling needs first; the rest (Python environments, etcd, helm, the test models: mostly
# downloads) installs while the compiler runs, and the tests wait for it.
scripts/setup.sh build
setup_log="$(mktemp)"
scripts/setup.sh test >"$setup_log" 2>&1 &
setup_pid=$!
trap 'kill "$setup_pid" 2>/dev/null || true; rm -f "$setup_log"' EXIT
export CARGO_TERM_COLOR=never
# A fresh machine compiles everything once: incremental compilation's bookkeeping only slows that down
# (and fills the disk); cargo and rustc called directly keep it for edit-compile loops.
export CARGO_INCREMENTAL=0

cargo fmt --all --check
# One compilation lints, builds and serves the tests. clippy-driver wraps rustc for the workspace's own
# crates, as `cargo clippy --workspace --all-targets -- -D warnings` does (same lints, same clippy.toml
# bans on std::env::set_var and std::sync::Mutex in async code), but keeps code generation, so the
# dependencies compile once instead of once for clippy's check pass and again for the build. Building
# the binaries with the test targets, in one command, also keeps one feature set (tokio's test-util
# comes with the dev-dependencies): a separate `cargo build --bins` compiled tokio and all that sits on it
# twice. `cargo test` below keeps the wrapper, so it finds everything built.
export RUSTC_WORKSPACE_WRAPPER=clippy-driver
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
cargo build --workspace --all-targets
# The fault-injection tests need the fail points compiled in (docs/faults.md): the library tests of the
# crates that have them, once more with the feature; --workspace keeps every dependency's features.
FAULTS=(--workspace --features densemesh-mesh/failpoints --lib --test remote)
cargo test "${FAULTS[@]}" --no-run
if ! wait "$setup_pid"; then
    cat "$setup_log" >&2
    echo "scripts/setup.sh test failed" >&2
    exit 1
fi
cat "$setup_log" >&2
# env.sh finds onnxruntime in .venv, which setup has just made.
source scripts/env.sh
cargo test --workspace
cargo test "${FAULTS[@]}" -- fault_tests:: disk_that_fills a_watch_broken
MESHD_BIN="$PWD/target/debug/meshd" python -m pytest tests/e2e -q -p no:cacheprovider
# The GPU builds (docs/gpu.md), which no GPU is needed to compile. The `cuda` build's device discovery,
# linted and tested: with no CUDA driver here it must say so, not panic. Then the GPU build's candle and
# discovery crates linted as it compiles them, candle's CUDA kernels included (nvcc from .venv-cuda,
# which setup installed): a change that breaks the GPU build fails here, not on a GPU machine.
cargo test -p densemesh-runtime-gpu --features cuda
(
    source scripts/cuda-env.sh
    cargo check -p densemesh-runtime-candle -p densemesh-runtime-gpu --all-targets \
        --features densemesh-runtime-candle/cuda,densemesh-runtime-gpu/cuda-linked
)
