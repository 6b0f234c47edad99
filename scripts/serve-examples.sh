#!/usr/bin/env bash
# The main job: meshd on its embedded default, serving the example models in examples/models.
# Extra arguments go to `meshd serve` (e.g. --capacity 512MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh run
source scripts/env.sh
cargo build --release -p densemesh-mesh --bin meshd --bin meshctl
exec target/release/meshd serve --model-repo examples/models "$@"
