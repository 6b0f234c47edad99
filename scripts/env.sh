# Sourced by the scripts: points meshd and the tests at the project's virtualenv and its onnxruntime.
export PATH="$PWD/.venv/bin:$PATH"
ORT_DYLIB_PATH="$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | sort | tail -n1)"
export ORT_DYLIB_PATH
# The kserve SDK's own interpreter, for the end-to-end test that drives meshd with it.
if [ -x "$PWD/.venv-kserve/bin/python" ]; then export KSERVE_PYTHON="$PWD/.venv-kserve/bin/python"; fi
