#!/usr/bin/env bash
# The whole test suite: formatting, every crate's unit and integration tests, then the end-to-end
# tests that start meshd and drive it with real clients (tritonclient, the kserve SDK).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
source scripts/env.sh
export CARGO_TERM_COLOR=never

cargo fmt --all --check
# clippy.toml's bans (std::env::set_var, std::sync::Mutex in async code) hold only if clippy runs.
cargo clippy --workspace --all-targets -- -D warnings
cargo build -p densemesh-mesh -p densemesh-controller --bins
cargo test --workspace
MESHD_BIN="$PWD/target/debug/meshd" python -m pytest tests/e2e -q -p no:cacheprovider
