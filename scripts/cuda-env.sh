# Sourced before building or checking with candle's CUDA kernels (--features densemesh-mesh/cuda-kernels):
# puts the nvcc that `scripts/setup.sh cuda` installs into .venv-cuda on the PATH, where candle's kernel
# build and cudarc's (which reads the CUDA version from it) look. No GPU is needed to build.
#   CUDA_COMPUTE_CAP: the GPUs' compute capability the kernels are built for (90: H100 and H200).
_densemesh_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="$(ls -d "$_densemesh_root"/.venv-cuda/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n1)"
if [ -z "$CUDA_HOME" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cuda-env.sh: no nvcc in .venv-cuda; run scripts/setup.sh cuda" >&2
    return 1
fi
export CUDA_HOME CUDA_ROOT="$CUDA_HOME" CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# candle-kernels' build runs this many nvcc at once (default: every core).
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
unset _densemesh_root
