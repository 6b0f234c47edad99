"""Fixtures: meshd processes serving the example models or a test's own repository."""
import pytest
import tritonclient.grpc as grpcclient

from meshd import EXAMPLES, Meshd


@pytest.fixture(scope="module")
def examples_server():
    server = Meshd(EXAMPLES, "--capacity", "256MiB")
    yield server
    server.stop()


@pytest.fixture
def client(examples_server):
    c = grpcclient.InferenceServerClient(examples_server.grpc_addr)
    yield c
    c.close()


@pytest.fixture
def start_meshd():
    """Starts meshd processes for one test; all are stopped at its end."""
    servers = []

    def start(repo, *args):
        server = Meshd(repo, *args)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()
