"""Puller benchmark, on 127.0.0.1 against moto (a real S3-compatible server from PyPI):

1. pull throughput of a ~200 MB object from S3 into an empty disk cache, against a plain read() of
   the same bytes from a local file (`densemesh-bench pull`);
2. time from first request to first answer for a ~100 MB model: cold from S3 (pull + load), from the
   disk cache (evicted from memory, not from disk), and hot; with the bytes downloaded each time.

Usage: .venv/bin/python bench/pull.py [--mb 200] [--model-mb 100] [--repeat 3]
Needs `cargo build --release -p densemesh-mesh --bins` and `scripts/setup.sh test`. See bench/README.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
from boto3.s3.transfer import TransferConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402
from meshd import Meshd, raw_request, start_moto  # noqa: E402

OUT = REPO / "bench" / "out" / "pull"
SECRET = "bench-secret"


def storage_config(endpoint):
    """A storage-config secret directory with one key, `moto`."""
    d = Path(tempfile.mkdtemp(prefix="pull-bench-secret-"))
    (d / "moto").write_text(json.dumps({
        "type": "s3", "access_key_id": "bench", "secret_access_key": SECRET,
        "endpoint_url": endpoint, "region": "us-east-1", "default_bucket": "models",
    }))
    return d


def upload(client, path, key):
    # One PUT (no multipart), so the ETag is the MD5 and the pull verifies it: the slower case.
    client.upload_file(str(path), "models", key, Config=TransferConfig(multipart_threshold=1 << 40))


def throughput(args, client, secret, bench):
    blob = OUT / f"blob-{args.mb}MB.bin"
    if not blob.exists() or blob.stat().st_size != args.mb * 1_000_000:
        blob.write_bytes(os.urandom(args.mb * 1_000_000))
    upload(client, blob, "blob.bin")
    cmd = [str(bench), "pull", "--location", "blob.bin", "--key", json.dumps({"storage_key": "moto"}),
           "--storage-config", str(secret), "--local-file", str(blob), "--repeat", str(args.repeat)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def time_to_first_answer(args, client, secret):
    models = []
    for name, seed in (("a", 0), ("b", 1)):
        path = OUT / f"dense-{args.model_mb}MB-{name}" / "model.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            make_dense_model(path, mb=args.model_mb, seed=seed)
        upload(client, path, f"dense/{name}/model.onnx")
        models.append((name, path.stat().st_size))
    size = models[0][1]
    x = np.ones((1, 256), dtype=np.float32)
    os.environ.setdefault("MESHD_BIN", str(REPO / "target" / "release" / "meshd"))
    rows = []
    for run in range(args.repeat):
        repo = Path(tempfile.mkdtemp(prefix="pull-bench-repo-"))
        cache = Path(tempfile.mkdtemp(prefix="pull-bench-cache-"))
        # Room for one of the two models: loading b evicts a from memory, not from the disk cache.
        capacity = f"{int(size * 1.6) >> 20}MiB"
        server = Meshd(repo, "--storage-config", str(secret), "--cache-dir", str(cache), "--capacity", capacity)
        try:
            for name, _ in models:
                register(server, name)

            def predict(model):
                started = time.perf_counter()
                server.stub.ModelInfer(raw_request("ignored", [("x", "FP32", x)]), metadata=[("mm-model-id", model)])
                return time.perf_counter() - started

            def pulled():
                return server.metrics().get("densemesh_puller_bytes_total", 0)

            cold = predict("a")
            cold_bytes = pulled()
            predict("b")  # evicts a from memory
            before = pulled()
            disk = predict("a")
            disk_bytes = pulled() - before
            hot = sorted(predict("a") for _ in range(21))[10]
            rows.append((cold, disk, hot, cold_bytes, disk_bytes))
        finally:
            server.stop()
    med = lambda i: sorted(r[i] for r in rows)[len(rows) // 2]  # noqa: E731
    print(f"\nfirst request to first answer, {size / 1e6:.1f} MB model, median of {len(rows)} fresh meshd:")
    print(f"  cold from S3 (pull + load)       {med(0) * 1000:8.1f} ms   downloaded {med(3) / 1e6:.1f} MB")
    print(f"  from the disk cache (load only)  {med(1) * 1000:8.1f} ms   downloaded {med(4) / 1e6:.1f} MB")
    print(f"  hot (loaded, p50 of 21)          {med(2) * 1000:8.1f} ms")
    print(json.dumps({"model_bytes": size, "cold_s3_ms": med(0) * 1000, "disk_cache_ms": med(1) * 1000,
                      "hot_ms": med(2) * 1000, "disk_cache_downloaded_bytes": med(4)}))


def register(server, name):
    """Registers through meshctl, the way an operator would (modelmesh-serving's path + key form)."""
    meshctl = Path(os.environ["MESHD_BIN"]).with_name("meshctl")
    key = json.dumps({"storage_key": "moto", "bucket": "models"})
    subprocess.run([str(meshctl), "--addr", server.grpc_addr, "register", name,
                    "--path", f"dense/{name}/model.onnx", "--key", key],
                   check=True, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="size of the object pulled for throughput (MB)")
    parser.add_argument("--model-mb", type=int, default=100, help="size of the model for time to first answer")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    bench = REPO / "target" / "release" / "densemesh-bench"
    moto, endpoint = start_moto()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                              aws_secret_access_key=SECRET, region_name="us-east-1")
        client.create_bucket(Bucket="models")
        secret = storage_config(endpoint)
        throughput(args, client, secret, bench)
        time_to_first_answer(args, client, secret)
    finally:
        moto.kill()
        moto.wait()


if __name__ == "__main__":
    main()
