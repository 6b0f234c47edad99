"""Models in object storage: meshd pulls them from a real S3-compatible server (moto) into its disk
cache, registered the way modelmesh-serving registers them, and reloads evicted models from disk."""
import json
import subprocess
import sys

import boto3
import grpc
import numpy as np
import onnxruntime as ort
import pytest

from meshd import MOTO_SECRET, REPO, free_port, moto_bucket, moto_storage_config, raw_request, upload_dense_models, start_moto, wait_for, wait_listening

sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402

SECRET = MOTO_SECRET
KEY = json.dumps({"storage_key": "moto", "bucket": "models"})


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with two dense models uploaded, and their inputs and expected outputs."""
    proc, endpoint = start_moto()
    try:
        client = moto_bucket(endpoint)
        work = tmp_path_factory.mktemp("s3-models")
        expected = {}
        for i, (name, path) in enumerate(upload_dense_models(client, work, ["a", "b"], mb=8).items()):
            session = ort.InferenceSession(str(path))
            x = np.random.default_rng(i).standard_normal((1, 256)).astype(np.float32)
            expected[name] = (x, session.run(None, {"x": x})[0], path.stat().st_size)
        yield endpoint, expected
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def secret_dir(s3, tmp_path):
    """The storage-config secret as Kubernetes mounts it: one file per storage key."""
    endpoint, _ = s3
    return moto_storage_config(tmp_path / "storage-config", endpoint)


def start(start_meshd, tmp_path, secret_dir, cache_dir, *args):
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    # Room for one 8 MiB model: loading the other evicts it from memory (not from disk).
    return start_meshd(repo, "--storage-config", str(secret_dir), "--cache-dir", str(cache_dir),
                       "--capacity", "12MiB", "--load-retry-backoff", "1s", *args)


def predict(server, model, x):
    response = server.stub.ModelInfer(raw_request("ignored", [("x", "FP32", x)]), metadata=[("mm-model-id", model)])
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(x.shape[0], -1)


def pulled_bytes(server):
    return server.metrics().get("densemesh_puller_bytes_total", 0)


def test_s3_model_is_pulled_once_and_reloaded_from_the_disk_cache_after_eviction_and_restart(
        s3, secret_dir, start_meshd, mmesh, tmp_path):
    _, expected = s3
    pb2, pb2_grpc = mmesh
    cache_dir = tmp_path / "cache"
    # b's load evicts a, used moments ago: the anti-churn rule would refuse it, so it is off.
    server = start(start_meshd, tmp_path, secret_dir, cache_dir, "--anti-churn-age", "0")
    api = pb2_grpc.ModelMeshStub(server.channel)
    # modelmesh-serving's form (object path + storage key JSON) and a full URI with the key.
    api.registerModel(pb2.RegisterModelRequest(modelId="a", modelInfo=pb2.ModelInfo(
        type="onnx", path="dense/a/model.onnx", key=KEY)))
    api.registerModel(pb2.RegisterModelRequest(modelId="b", modelInfo=pb2.ModelInfo(
        type="onnx", path="s3://models/dense/b/model.onnx", key=json.dumps({"storage_key": "moto"}))))

    x, y, size_a = expected["a"]
    np.testing.assert_allclose(predict(server, "a", x), y, rtol=1e-5, atol=1e-5)
    assert pulled_bytes(server) == size_a
    xb, yb, size_b = expected["b"]
    np.testing.assert_allclose(predict(server, "b", xb), yb, rtol=1e-5, atol=1e-5)
    m = server.metrics()
    assert m["densemesh_cache_evictions_total"] >= 1, "b's load evicted a from memory"
    assert pulled_bytes(server) == size_a + size_b

    # a again: loaded from the disk cache, no second download.
    np.testing.assert_allclose(predict(server, "a", x), y, rtol=1e-5, atol=1e-5)
    m = server.metrics()
    assert pulled_bytes(server) == size_a + size_b, "no byte downloaded twice"
    assert m["densemesh_disk_cache_hits_total"] >= 1
    assert m["densemesh_disk_cache_misses_total"] == 2
    assert m['densemesh_model_loads_total{result="success"}'] == 3
    assert m["densemesh_disk_cache_used_bytes"] == size_a + size_b

    # A restart finds the disk cache as it was (index rebuilt from disk): no download at all.
    first_logs = server.logs()
    server.stop()
    again = start(start_meshd, tmp_path, secret_dir, cache_dir)
    again_api = pb2_grpc.ModelMeshStub(again.channel)
    again_api.registerModel(pb2.RegisterModelRequest(modelId="a", modelInfo=pb2.ModelInfo(
        type="onnx", path="dense/a/model.onnx", key=KEY)))
    np.testing.assert_allclose(predict(again, "a", x), y, rtol=1e-5, atol=1e-5)
    assert pulled_bytes(again) == 0
    assert again.metrics()["densemesh_disk_cache_hits_total"] == 1
    assert SECRET not in again.logs() and SECRET not in first_logs


def test_storage_failures_are_clear_load_failures_and_never_show_the_secret(
        s3, secret_dir, start_meshd, mmesh, tmp_path):
    pb2, pb2_grpc = mmesh
    server = start(start_meshd, tmp_path, secret_dir, tmp_path / "cache")
    api = pb2_grpc.ModelMeshStub(server.channel)
    cases = {
        "missing-object": ("dense/nope/model.onnx", KEY, "no such key: s3://models/dense/nope/model.onnx"),
        "unknown-key": ("dense/a/model.onnx", json.dumps({"storage_key": "elsewhere"}), "storage key elsewhere"),
        "escaping-path": ("dense/../../etc/passwd", KEY, ".. segment"),
    }
    for model, (path, key, reason) in cases.items():
        api.registerModel(pb2.RegisterModelRequest(modelId=model, modelInfo=pb2.ModelInfo(type="onnx", path=path, key=key)))
        with pytest.raises(grpc.RpcError) as e:
            predict(server, model, np.zeros((1, 256), dtype=np.float32))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, model
        assert reason in e.value.details(), e.value.details()
        status = api.getModelStatus(pb2.GetStatusRequest(modelId=model))
        assert pb2.ModelStatusInfo.ModelStatus.Name(status.status) == "LOADING_FAILED", model
        assert reason in status.errors[0] and SECRET not in status.errors[0], status.errors
    m = server.metrics()
    assert m['densemesh_model_loads_total{result="failure"}'] == 3
    assert SECRET not in server.logs()

    # Larger than the memory capacity (12 MiB): refused before any byte is downloaded.
    endpoint, _ = s3
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key=SECRET,
                 region_name="us-east-1").put_object(Bucket="models", Key="huge/model.onnx", Body=b"\0" * (16 << 20))
    api.registerModel(pb2.RegisterModelRequest(modelId="huge", modelInfo=pb2.ModelInfo(
        type="onnx", path="huge/model.onnx", key=KEY)))
    with pytest.raises(grpc.RpcError) as e:
        predict(server, "huge", np.zeros((1, 256), dtype=np.float32))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "16777216" in e.value.details() and "size in storage" in e.value.details(), e.value.details()
    assert server.metrics().get("densemesh_puller_bytes_total", 0) == 0

    # The storage config is re-read when the secret changes: the unknown key starts working.
    (secret_dir / "elsewhere").write_text((secret_dir / "moto").read_text())
    x, y, _ = s3[1]["a"]

    def loads():
        try:
            return (predict(server, "unknown-key", x),)
        except grpc.RpcError:
            return None  # the failure back-off (1 s) or the reload (every 2 s) has not passed yet

    np.testing.assert_allclose(wait_for(loads, 30, "the new storage key to be used")[0], y, rtol=1e-5, atol=1e-5)


# Azurite's well-known development account (public, documented by Microsoft for the emulator).
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    """Azurite (Microsoft's Azure Blob emulator, from npm; scripts/setup.sh installs it into .azurite)."""
    binary = REPO / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
    assert binary.exists(), "azurite must be installed: scripts/setup.sh test"
    port = free_port()
    data = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen([str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data),
                             "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, "azurite to listen", timeout=60)
        yield f"http://127.0.0.1:{port}/{AZURE_ACCOUNT}"
    finally:
        proc.kill()
        proc.wait()


def test_azure_blob_models_through_azurite(azurite, start_meshd, mmesh, tmp_path):
    from azure.storage.blob import BlobServiceClient

    endpoint = azurite
    connection = (f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
                  f"BlobEndpoint={endpoint};")
    service = BlobServiceClient.from_connection_string(connection)
    container = service.create_container("models")
    model = tmp_path / "model.onnx"
    make_dense_model(model, mb=2, seed=7)
    with open(model, "rb") as f:
        container.upload_blob("dense/az/model.onnx", f)
    x = np.random.default_rng(7).standard_normal((2, 256)).astype(np.float32)
    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0]

    secret = tmp_path / "storage-config"
    secret.mkdir()
    # One key by connection string (as the Azure SDKs take it), one by account name and key.
    (secret / "azconn").write_text(json.dumps({"type": "azure", "connection_string": connection, "container": "models"}))
    (secret / "azkey").write_text(json.dumps({"type": "azure", "account_name": AZURE_ACCOUNT, "account_key": AZURE_KEY,
                                               "endpoint_url": endpoint, "container": "models"}))
    repo = tmp_path / "repo"
    repo.mkdir()
    server = start_meshd(repo, "--storage-config", str(secret), "--cache-dir", str(tmp_path / "cache"))
    pb2, pb2_grpc = mmesh
    api = pb2_grpc.ModelMeshStub(server.channel)
    api.registerModel(pb2.RegisterModelRequest(modelId="by-key", modelInfo=pb2.ModelInfo(
        type="onnx", path="dense/az/model.onnx", key=json.dumps({"storage_key": "azconn"}))))
    api.registerModel(pb2.RegisterModelRequest(modelId="by-uri", modelInfo=pb2.ModelInfo(
        type="onnx", path="az://models/dense/az/model.onnx", key="azkey")))
    for model_id in ("by-key", "by-uri"):
        np.testing.assert_allclose(predict(server, model_id, x), y, rtol=1e-5, atol=1e-5)
    m = server.metrics()
    assert m["densemesh_puller_bytes_total"] == model.stat().st_size, "the second key's pull was a disk cache hit"
    assert m["densemesh_disk_cache_hits_total"] == 1
    assert AZURE_KEY not in server.logs()
