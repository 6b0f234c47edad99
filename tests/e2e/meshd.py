"""Starting and talking to a real meshd process for the end-to-end tests."""
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "models"


def wait_for(condition, timeout, what):
    """Polls `condition` until it returns a truthy value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port():
    """A loopback port free right now, for servers that cannot be told to pick their own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, what, timeout=30):
    """Waits until something accepts connections on 127.0.0.1:`port`."""
    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, timeout, what)


def start_moto():
    """moto's S3 server (from PyPI, in .venv) on a free port: (process, endpoint URL)."""
    port = free_port()
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, "moto to listen")
    except BaseException:
        proc.kill()
        raise
    return proc, f"http://127.0.0.1:{port}"


MOTO_SECRET = "moto-secret-key-do-not-log"


def moto_bucket(endpoint, bucket="models"):
    """A boto3 S3 client of the moto server at `endpoint`, with `bucket` created."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key=MOTO_SECRET, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return client


def upload_dense_models(client, work, names, mb):
    """Writes a dense ONNX model per name (seed = its position, `mb` MiB of weights) under `work` and
    uploads each to `models/dense/<name>/model.onnx`; the local paths by name."""
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from generate_models import make_dense_model

    paths = {}
    for i, name in enumerate(names):
        path = work / name / "model.onnx"
        path.parent.mkdir()
        make_dense_model(path, mb=mb, seed=i)
        client.upload_file(str(path), "models", f"dense/{name}/model.onnx")
        paths[name] = path
    return paths


def moto_storage_config(directory, endpoint, key="moto"):
    """The storage-config secret as Kubernetes mounts it (one file per storage key), with one key,
    `key`, for the moto server at `endpoint`; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / key).write_text(json.dumps({
        "type": "s3", "access_key_id": "testing", "secret_access_key": MOTO_SECRET,
        "endpoint_url": endpoint, "region": "us-east-1", "default_bucket": "models",
    }))
    return directory


class Meshd:
    """A meshd process on loopback ports chosen by the kernel, stopped by `stop()`."""

    running = []  # not yet stopped; conftest shows their logs when a test fails

    def __init__(self, model_repo, *args):
        binary = os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))
        self.model_repo = Path(model_repo)
        self.dir = tempfile.TemporaryDirectory(prefix="meshd-")
        addr_file = Path(self.dir.name) / "addr.json"
        self.log_path = Path(self.dir.name) / "meshd.log"
        self.log = open(self.log_path, "wb")
        cmd = [
            binary, "serve",
            "--grpc-addr", "127.0.0.1:0",
            "--http-addr", "127.0.0.1:0",
            "--metrics-addr", "127.0.0.1:0",
            "--model-repo", str(model_repo),
            "--addr-file", str(addr_file),
            # The tests register models from the examples and their temporary directories; tests of the
            # confinement itself give their own roots.
            *([] if "--local-model-roots" in args else ["--local-model-roots", f"{EXAMPLES},{tempfile.gettempdir()}"]),
            *args,
        ]
        env = {**os.environ, "NO_COLOR": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        Meshd.running.append(self)

        def started():
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {self.proc.returncode} while starting:\n{self.logs()}")
            return addr_file.exists() and json.loads(addr_file.read_text())

        try:
            addrs = wait_for(started, 60, "meshd to listen")
        except BaseException:
            self.stop()
            raise
        self.grpc_addr = addrs["grpc_addr"]
        self.http_addr = addrs["http_addr"]  # KServe V2 REST
        self.metrics_addr = addrs["metrics_addr"]
        self.channel = grpc.insecure_channel(
            self.grpc_addr,
            options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)],
        )
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def logs(self):
        if not self.log.closed:
            self.log.flush()
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))[-4000:]

    def metrics(self):
        """Prometheus text parsed to {name_with_labels: value}."""
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def http_status(self, path):
        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}{path}", timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def terminate(self, timeout=30):
        """SIGTERM, then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def describe(self):
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"meshd pid {self.proc.pid} ({state}) serving {self.model_repo}, last log lines:\n{self.logs()}"

    def stop(self):
        if self in Meshd.running:
            Meshd.running.remove(self)
        if hasattr(self, "channel"):
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.dir.cleanup()


def raw_request(model, inputs, outputs=(), headers_model=None):
    """A ModelInferRequest with raw contents; `inputs` is [(name, datatype, array)]."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, array in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(to_raw(datatype, array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def to_raw(datatype, array):
    if datatype == "BYTES":
        out = b""
        for item in array.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode()
            out += len(b).to_bytes(4, "little") + b
        return out
    return np.ascontiguousarray(array).tobytes()
