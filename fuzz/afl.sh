#!/usr/bin/env bash
# Builds the AFL++ fuzz targets, or runs one (docs/fuzzing.md).
#   fuzz/afl.sh build
#   fuzz/afl.sh run TARGET SECONDS [afl-fuzz options]   findings in fuzz/out/TARGET
# Needs cargo-afl (`cargo install cargo-afl`, which builds AFL++ from its bundled source).
set -euo pipefail
cd "$(dirname "$0")"
# Where cargo-afl built AFL++ for this rustc.
afl_dir="$(ls -d "${XDG_DATA_HOME:-$HOME/.local/share}"/afl.rs/rustc-"$(rustc -V | awk '{print $2}')"-*/afl.rs-* 2>/dev/null | tail -n1)"
[ -d "$afl_dir" ] || { echo "AFL++ for this rustc not found: run cargo install cargo-afl" >&2; exit 1; }
export AFL_RUNTIME="$afl_dir/afl-llvm/afl-compiler-rt.o"
case "${1:-}" in
    build)
        # The project's lock file, so the dependencies resolve (and are reused) exactly as it builds them.
        cp ../Cargo.lock Cargo.lock
        RUSTC_WRAPPER="$PWD/rustc-afl.sh" cargo build --bins
        ;;
    run)
        target="${2:?TARGET}" seconds="${3:?SECONDS}"
        shift 3
        bin="${CARGO_TARGET_DIR:-target}/debug/fuzz_$target"
        mkdir -p out
        RUST_BACKTRACE=0 AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1 \
            "$afl_dir/afl/bin/afl-fuzz" -V "$seconds" -i "corpus/$target" -o "out/$target" "$@" -- "$bin"
        ;;
    *)
        echo "usage: $0 build | run TARGET SECONDS [afl-fuzz options]" >&2
        exit 2
        ;;
esac
