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

cargo fmt --all --check
# clippy.toml's bans (std::env::set_var, std::sync::Mutex in async code) hold only if clippy runs.
cargo clippy --workspace --all-targets -- -D warnings
cargo build -p densemesh-mesh -p densemesh-controller --bins
cargo test --workspace --no-run
if ! wait "$setup_pid"; then
    cat "$setup_log" >&2
    echo "scripts/setup.sh test failed" >&2
    exit 1
fi
cat "$setup_log" >&2
# env.sh finds onnxruntime in .venv, which setup has just made.
source scripts/env.sh
cargo test --workspace
MESHD_BIN="$PWD/target/debug/meshd" python -m pytest tests/e2e -q -p no:cacheprovider
