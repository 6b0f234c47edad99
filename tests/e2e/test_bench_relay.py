"""`densemesh-bench relay`, the bare HTTP/2 hop that bench/runtimes.py reads meshd's hop against: it must
pass calls through unchanged, or its figures say nothing about meshd's."""
import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc

from meshd import REPO, free_port, raw_request, wait_for

BENCH = Path(os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))).with_name("densemesh-bench")


@contextmanager
def started_relay(to):
    """A relay in front of `to`, and its address."""
    with tempfile.TemporaryDirectory(prefix="relay-") as work:
        addr_file = Path(work) / "addr.json"
        proc = subprocess.Popen([str(BENCH), "relay", "--to", to, "--addr-file", str(addr_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def listening():
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return json.loads(addr_file.read_text())["grpc_addr"]
            except (FileNotFoundError, json.JSONDecodeError):
                return None

        try:
            yield proc, wait_for(listening, 30, "the relay to listen")
        finally:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def relay(examples_server):
    with started_relay(examples_server.grpc_addr) as (_, addr):
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(addr, options=options) as channel:
            yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_the_relay_answers_as_the_server_behind_it_does(relay, examples_server):
    direct = examples_server.stub
    small = raw_request("iris-logreg", [("input", "FP32", np.ones((1, 4), dtype=np.float32))])
    # Large enough to cross many DATA frames and window updates each way.
    rows = np.random.default_rng(7).random((20_000, 4), dtype=np.float32)
    large = raw_request("iris-logreg", [("input", "FP32", rows)])
    for request in (small, large):
        assert relay.ModelInfer(request, timeout=30) == direct.ModelInfer(request, timeout=30)
    # An error status, with its message, comes back as the server gave it.
    unknown = raw_request("no-such-model", [("input", "FP32", np.ones((1, 4), dtype=np.float32))])
    with pytest.raises(grpc.RpcError) as through_relay:
        relay.ModelInfer(unknown, timeout=30)
    with pytest.raises(grpc.RpcError) as straight:
        direct.ModelInfer(unknown, timeout=30)
    assert through_relay.value.code() == straight.value.code() == grpc.StatusCode.NOT_FOUND
    assert through_relay.value.details() == straight.value.details()


def test_a_relay_whose_server_is_gone_answers_unavailable_naming_it():
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    with started_relay(gone) as (proc, addr), grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = raw_request("iris-logreg", [("input", "FP32", np.ones((1, 4), dtype=np.float32))])
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert gone in e.value.details(), e.value.details()
        assert proc.poll() is None, "the relay keeps running"
