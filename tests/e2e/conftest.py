"""Fixtures: meshd processes serving the example models or a test's own repository."""
import pytest
import tritonclient.grpc as grpcclient

from meshd import EXAMPLES, Meshd


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the logs of every meshd still running (its exit code, any panic)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in list(Meshd.running):
            report.sections.append((f"meshd {server.proc.pid}", server.describe()))


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


def _stubs(tmp_path_factory, folder, proto):
    """Python stubs generated with grpcio-tools from one of the project's protos, the way a user's
    client is built: (messages module, service module)."""
    import importlib
    import sys

    from grpc_tools import protoc

    from meshd import REPO

    out = tmp_path_factory.mktemp(f"{folder}_stubs")
    proto_dir = REPO / "proto" / "proto" / folder
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(proto_dir / proto)])
    assert rc == 0, f"grpcio-tools could not compile {proto}"
    sys.path.insert(0, str(out))
    module = proto.removesuffix(".proto").replace("-", "_")
    return importlib.import_module(f"{module}_pb2"), importlib.import_module(f"{module}_pb2_grpc")


@pytest.fixture(scope="session")
def mmesh(tmp_path_factory):
    """Python stubs for mmesh.ModelMesh."""
    return _stubs(tmp_path_factory, "modelmesh", "model-mesh.proto")


@pytest.fixture(scope="session")
def admin_api(tmp_path_factory):
    """Python stubs for densemesh.v1.Admin."""
    return _stubs(tmp_path_factory, "densemesh", "admin.proto")
