#!/usr/bin/env bash
# RUSTC_WRAPPER for the AFL++ build (fuzz/afl.sh): instruments this project's crates and the fuzz
# targets only, and links the targets with AFL++'s runtime. `cargo afl build` instruments every crate
# through RUSTFLAGS, which changes every dependency's hash: a cold build of ~480 crates. Left
# uninstrumented, the dependencies keep the hashes of an ordinary `cargo build`, so their compiled
# copies are reused; the fuzzer then sees coverage of our code (prost and serde_json calls included),
# which is what the targets are about.
set -euo pipefail
rustc="$1"
shift
crate=""
kind=""
previous=""
for arg in "$@"; do
    case "$previous" in
        --crate-name) crate="$arg" ;;
        --crate-type) kind="$arg" ;;
    esac
    previous="$arg"
done
# The project's crates are named densemesh_*; the fuzz targets are the binaries of densemesh-fuzz,
# built with `--crate-type bin` from fuzz/targets/.
case "$crate" in
    densemesh_* | fuzz_*) ;;
    *) exec "$rustc" "$@" ;;
esac
instrument=(
    -C passes=sancov-module
    -C llvm-args=-sanitizer-coverage-level=3
    -C llvm-args=-sanitizer-coverage-trace-pc-guard
    -C llvm-args=-sanitizer-coverage-prune-blocks=0
    -C llvm-args=-sanitizer-coverage-trace-compares
    --cfg fuzzing
)
if [ "$kind" = bin ]; then
    # Stripped of debug info: eight targets of ~90 MB each otherwise (a panic still names its line).
    instrument+=(-C "link-arg=${AFL_RUNTIME:?set by fuzz/afl.sh: the path of afl-compiler-rt.o}" -C strip=debuginfo)
fi
exec "$rustc" "$@" "${instrument[@]}"
