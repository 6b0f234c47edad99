"""Runtimes other than ONNX Runtime, through meshd as a client sees them: a Hugging Face sentence-embedding
model on candle (found in a repository by its model.safetensors), scikit-learn, XGBoost and LightGBM
models on a pool of real MLServer processes (restarted when they die or hang, and gone when meshd is
killed), and a runtime written for ModelMesh's model-runtime SPI."""
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from meshd import REPO

MINILM = REPO / ".models" / "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm_repo(tmp_path_factory):
    assert (MINILM / "model.safetensors").is_file(), f"{MINILM} is missing: run scripts/setup.sh"
    repo = tmp_path_factory.mktemp("hf-repo")
    # The repository layout: DIR/<model-id>/model.safetensors with its siblings; linked, not copied.
    (repo / "minilm").symlink_to(MINILM, target_is_directory=True)
    return repo


def embed(server, sentences, model="minilm"):
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    try:
        text = grpcclient.InferInput("text", [len(sentences)], "BYTES")
        text.set_data_from_numpy(np.array([s.encode() for s in sentences], dtype=np.object_))
        return client.infer(model, [text]).as_numpy("embedding")
    finally:
        client.close()


def test_a_sentence_transformer_in_the_repository_is_served_by_candle(start_meshd, minilm_repo):
    server = start_meshd(minilm_repo, "--local-model-roots", f"{minilm_repo},{MINILM}")
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    vectors = embed(server, sentences)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5), "normalized, as modules.json says"
    similarity = vectors @ vectors.T
    # The figures sentence-transformers publishes for this model and these sentences.
    assert abs(similarity[0, 1] - 0.6660) < 1e-4 and abs(similarity[0, 2] - 0.1046) < 1e-4
    assert abs(similarity[1, 2] - 0.1411) < 1e-4, similarity
    # Batches give each sentence the embedding it has alone: padding never leaks into the pooling.
    alone = embed(server, [sentences[2]])
    assert np.allclose(alone[0], vectors[2], atol=1e-5)

    client = grpcclient.InferenceServerClient(server.grpc_addr)
    metadata = client.get_model_metadata("minilm")
    assert metadata.platform == "huggingface_candle"
    assert [(i.name, i.datatype) for i in metadata.inputs] == [("text", "BYTES")]
    # A tensor that is not text is refused naming the input.
    wrong = grpcclient.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(Exception) as e:
        client.infer("minilm", [wrong])
    assert "text" in str(e.value) and "BYTES" in str(e.value), e.value
    client.close()


def test_the_repository_registers_a_safetensors_model_as_huggingface(start_meshd, minilm_repo, mmesh):
    pb2, pb2_grpc = mmesh
    server = start_meshd(minilm_repo, "--local-model-roots", f"{minilm_repo},{MINILM}")
    stub = pb2_grpc.ModelMeshStub(server.channel)
    status = stub.getModelStatus(pb2.GetStatusRequest(modelId="minilm"), timeout=10)
    assert pb2.ModelStatusInfo.ModelStatus.Name(status.status) == "NOT_LOADED"
    # And one registered through the API by its directory, with its type.
    info = pb2.ModelInfo(type="huggingface", path=str(MINILM))
    stub.registerModel(pb2.RegisterModelRequest(modelId="minilm-api", modelInfo=info, loadNow=True, sync=True),
                       timeout=120)
    assert embed(server, ["hello"], model="minilm-api").shape == (1, 384)


@pytest.fixture
def spi_runtime(tmp_path):
    """The test SPI runtime of runtimes/spi on a unix socket: (endpoint, process)."""
    import json
    import subprocess
    import sys

    socket = tmp_path / "runtime.sock"
    script = REPO / "runtimes" / "spi" / "tests" / "spi_runtime.py"
    proc = subprocess.Popen([sys.executable, str(script), "--listen", f"unix://{socket}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "listening", first
        yield first["endpoint"], proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def echo_stubs(tmp_path_factory):
    import importlib
    import sys

    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("echo_stubs")
    folder = REPO / "runtimes" / "spi" / "tests"
    assert protoc.main(["protoc", f"-I{folder}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(folder / "echo.proto")]) == 0
    sys.path.insert(0, str(out))
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")


def test_a_modelmesh_spi_runtime_serves_v2_and_its_own_methods_through_meshd(
        start_meshd, tmp_path, spi_runtime, mmesh, echo_stubs):
    endpoint, _ = spi_runtime
    config = tmp_path / "runtimes.yaml"
    config.write_text(f"runtimes:\n  - kind: spi\n    name: test-spi\n    supportedModelFormats: [custom]\n"
                      f"    endpoint: {endpoint}\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    server = start_meshd(repo, "--runtime-config", str(config))
    model = tmp_path / "doubler" / "model.json"
    model.parent.mkdir()
    model.write_text('{"factor": 2.0, "load_size": 300000}')

    pb2, pb2_grpc = mmesh
    stub = pb2_grpc.ModelMeshStub(server.channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.registerModel(pb2.RegisterModelRequest(modelId="x", modelInfo=pb2.ModelInfo(type="tensorflow", path=str(model))))
    assert "offered: custom, huggingface, onnx" in e.value.details(), e.value.details()
    stub.registerModel(pb2.RegisterModelRequest(modelId="doubler", modelInfo=pb2.ModelInfo(type="custom", path=str(model))))

    # KServe V2 through the runtime trait: the mesh validates nothing it was not told, the runtime answers.
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    x = grpcclient.InferInput("x", [3], "FP32")
    x.set_data_from_numpy(np.array([1.0, 2.5, -4.0], dtype=np.float32))
    answer = client.infer("doubler", [x])
    assert answer.as_numpy("y").tolist() == [2.0, 5.0, -8.0]
    status = stub.getModelStatus(pb2.GetStatusRequest(modelId="doubler"))
    assert pb2.ModelStatusInfo.ModelStatus.Name(status.status) == "LOADED"
    client.close()

    # The runtime's own method, passed through by mm-model-id, with the id written where it asked.
    echo_pb2, echo_grpc = echo_stubs
    say = echo_grpc.EchoStub(server.channel).Say
    request = echo_pb2.SayRequest(text="hi", target=echo_pb2.Target(model_id="what the client wrote"))
    reply = say(request, metadata=[("mm-model-id", "doubler")], timeout=30)
    assert (reply.model_id, reply.text, reply.header_model_id) == ("doubler", "hi", "doubler")
    # A vmodel name resolves to its model first.
    stub.setVModel(pb2.SetVModelRequest(vModelId="doubling", targetModelId="doubler"))
    reply = say(request, metadata=[("mm-vmodel-id", "doubling")], timeout=30)
    assert reply.model_id == "doubler"
    assert server.metrics().get('densemesh_passthrough_requests_total{result="ok"}') == 2


MLSERVER = REPO / ".venv-mlserver" / "bin"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A scikit-learn and an XGBoost model trained in MLServer's venv, with their Python answers."""
    import json
    import subprocess

    assert (MLSERVER / "mlserver").is_file(), f"{MLSERVER / 'mlserver'} is missing: run scripts/setup.sh"
    out = tmp_path_factory.mktemp("trained")
    subprocess.run([str(MLSERVER / "python"), str(REPO / "runtimes" / "remote" / "tests" / "make_models.py"), str(out)],
                   check=True, timeout=300)
    return out, json.loads((out / "expected.json").read_text())


def mlserver_config(path, processes=1, workers=0, **fields):
    """A runtime file with one MLServer pool of `workers` parallel inference workers per process; `fields`
    are more fields of its entry (e.g. liveness)."""
    import json

    env = {"MLSERVER_HOST": "127.0.0.1", "MLSERVER_GRPC_PORT": "{grpc_port}", "MLSERVER_HTTP_PORT": "{http_port}",
           "MLSERVER_METRICS_PORT": "{metrics_port}", "MLSERVER_PARALLEL_WORKERS": str(workers),
           "MLSERVER_LOAD_MODELS_AT_STARTUP": "false",
           # Where its workers share metrics; by default `.metrics` in the working directory, the repository.
           "MLSERVER_METRICS_DIR": str(path.parent / "mlserver-metrics")}
    entry = {"kind": "v2", "name": "mlserver", "supportedModelFormats": ["sklearn", "xgboost", "lightgbm"],
             "command": [str(MLSERVER / "mlserver"), "start", "{repository}"], "env": env, "processes": processes,
             **fields}
    path.write_text(json.dumps({"runtimes": [entry]}))  # JSON is YAML
    return path


def infer_fp(server, model, rows, datatype="FP64", output=None):
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    try:
        x = grpcclient.InferInput("input-0", list(rows.shape), datatype)
        x.set_data_from_numpy(rows)
        outputs = [grpcclient.InferRequestedOutput(output)] if output else None
        answer = client.infer(model, [x], outputs=outputs)
        return answer.as_numpy(output or answer.get_response().outputs[0].name)
    finally:
        client.close()


def mesh_with_mlserver(start_meshd, tmp_path, models, mmesh, *args, workers=0, **fields):
    """meshd on an empty repository with a pool of one MLServer (`fields` added to its runtime entry):
    (the server, a ModelMesh stub)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    config = mlserver_config(tmp_path / "runtimes.json", workers=workers, **fields)
    server = start_meshd(repo, "--runtime-config", str(config), "--local-model-roots", str(models), *args)
    return server, mmesh[1].ModelMeshStub(server.channel)


def test_mlserver_serves_scikit_learn_and_xgboost_models_registered_through_the_api(
        start_meshd, tmp_path, trained, mmesh):
    models, expected = trained
    # Room for one remote model at a time (each is charged at least 1 MB): the second load evicts the
    # first, which is unloaded from MLServer, and loading it again answers the same.
    server, stub = mesh_with_mlserver(start_meshd, tmp_path, models, mmesh, "--capacity", "1500KB")
    pb2, _ = mmesh
    for model_id, kind, file in [("iris-sk", "sklearn", "sklearn.joblib"), ("boost", "xgboost", "xgboost.json")]:
        stub.registerModel(pb2.RegisterModelRequest(modelId=model_id, modelInfo=pb2.ModelInfo(type=kind, path=str(models / file))))

    query = np.array(expected["input"], dtype=np.float64)
    for _ in range(2):
        assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]
        proba = infer_fp(server, "iris-sk", query, output="predict_proba")
        assert np.allclose(proba, expected["sklearn_predict_proba"], atol=1e-9)
        boosted = infer_fp(server, "boost", query.astype(np.float32), datatype="FP32")
        assert np.allclose(boosted.reshape(-1), expected["xgboost_predict"], atol=1e-5)
    assert server.metrics().get("densemesh_cache_evictions_total", 0) >= 3, "each switch evicted the other"

    # A file MLServer cannot load fails with MLServer's own reason.
    broken = models / "broken.joblib"
    broken.write_bytes(b"this is not a pickle")
    stub.registerModel(pb2.RegisterModelRequest(modelId="broken", modelInfo=pb2.ModelInfo(type="sklearn", path=str(broken))))
    with pytest.raises(Exception) as e:
        infer_fp(server, "broken", query)
    assert "broken" in str(e.value), e.value
    status = stub.getModelStatus(pb2.GetStatusRequest(modelId="broken"))
    assert pb2.ModelStatusInfo.ModelStatus.Name(status.status) == "LOADING_FAILED"
    assert any("pickle" in err.lower() or "load" in err.lower() for err in status.errors), status.errors


def test_a_killed_mlserver_is_restarted_and_its_models_reload_on_the_next_request(
        start_meshd, tmp_path, trained, mmesh):
    import os
    import signal
    import subprocess

    models, expected = trained
    server, stub = mesh_with_mlserver(start_meshd, tmp_path, models, mmesh)
    pb2, _ = mmesh
    stub.registerModel(pb2.RegisterModelRequest(modelId="iris-sk", modelInfo=pb2.ModelInfo(type="sklearn", path=str(models / "sklearn.joblib"))))
    query = np.array(expected["input"], dtype=np.float64)
    assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]

    children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "meshd started no MLServer process"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    # The next request hears the model was lost, waits for the restarted server, and is answered.
    assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]


def mlserver_pids(server):
    """The pids of the MLServer processes meshd started (its children)."""
    import subprocess

    children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "meshd started no MLServer process"
    return [int(pid) for pid in children]


def alive(pid):
    """Whether `pid` runs: a zombie (killed, waiting for whoever adopted it to reap it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_a_lightgbm_model_answers_as_the_python_model_does(start_meshd, tmp_path, trained, mmesh):
    models, expected = trained
    server, stub = mesh_with_mlserver(start_meshd, tmp_path, models, mmesh)
    pb2, _ = mmesh
    # LightGBM's own text format, as Booster.save_model writes it.
    path = models / "lightgbm" / "model.txt"
    stub.registerModel(pb2.RegisterModelRequest(modelId="gbm", modelInfo=pb2.ModelInfo(type="lightgbm", path=str(path))))
    query = np.array(expected["input"], dtype=np.float64)
    answer = infer_fp(server, "gbm", query)
    assert np.allclose(answer.reshape(-1), expected["lightgbm_predict"], rtol=0, atol=1e-12), answer
    assert 0 < min(expected["lightgbm_predict"]) < 0.5 < max(expected["lightgbm_predict"]) < 1, \
        "the queries fall on both sides of the boundary, so the comparison means something"


def test_a_sigkilled_meshd_takes_its_mlserver_processes_along(start_meshd, tmp_path, trained, mmesh):
    import signal
    import subprocess

    from meshd import wait_for

    models, _ = trained
    # With a parallel inference worker, so MLServer has processes of its own (the worker and
    # multiprocessing's resource tracker) in its process group.
    server, _ = mesh_with_mlserver(start_meshd, tmp_path, models, mmesh, workers=1)
    [mlserver] = mlserver_pids(server)

    def group():
        # It leads a process group of its own, so the group's id is its pid.
        listed = subprocess.run(["pgrep", "-g", str(mlserver)], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in listed]

    members = wait_for(lambda: len(group()) >= 3 and group(), 30, "MLServer's worker and resource tracker")
    assert mlserver in members and all(alive(pid) for pid in members), members
    # SIGKILL: meshd runs no shutdown, no destructor; the kernel's parent-death signal must do it.
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in members), 10, f"MLServer's processes {members} to die with meshd")


def test_a_hung_mlserver_is_restarted_and_its_model_answers_again(start_meshd, tmp_path, trained, mmesh):
    import os
    import signal
    import time

    models, expected = trained
    liveness = {"interval": "500ms", "timeout": "500ms", "failures": 3}
    server, stub = mesh_with_mlserver(start_meshd, tmp_path, models, mmesh, liveness=liveness)
    pb2, _ = mmesh
    stub.registerModel(pb2.RegisterModelRequest(modelId="iris-sk", modelInfo=pb2.ModelInfo(type="sklearn", path=str(models / "sklearn.joblib"))))
    query = np.array(expected["input"], dtype=np.float64)
    assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]
    restarts = 'densemesh_runtime_restarts_total{runtime="mlserver"}'
    assert server.metrics().get(restarts, 0) == 0, "a healthy server is not restarted"

    [hung] = mlserver_pids(server)
    # Alive but unresponsive: stopped, it holds its port and its connections and answers nothing.
    os.kill(hung, signal.SIGSTOP)
    asked = time.monotonic()
    # The request in flight ends when the probe kills the server; the model is lost, loaded again into
    # the restarted server, and the request is answered, well before the 30 s inference deadline.
    assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]
    assert time.monotonic() - asked < 25
    assert not alive(hung), f"the hung server {hung} was killed"
    metrics = server.metrics()
    assert metrics.get(restarts) == 1, {k: v for k, v in metrics.items() if "runtime" in k}
    assert metrics.get('densemesh_runtime_probe_failures_total{runtime="mlserver"}', 0) >= 3
    assert metrics.get('densemesh_runtime_load_duration_seconds_count{runtime="mlserver"}') == 2, \
        "one load before the hang, one after"


def test_requests_beyond_a_pools_concurrency_and_queue_are_refused_and_the_rest_answered(
        start_meshd, tmp_path, trained, mmesh):
    import json
    import os
    import signal
    import time
    import urllib.error
    import urllib.request

    from meshd import raw_request, wait_for

    models, expected = trained
    # The probe that would restart the stopped server comes too late to matter here.
    liveness = {"interval": "120s", "timeout": "2s", "failures": 3}
    server, stub = mesh_with_mlserver(start_meshd, tmp_path, models, mmesh, liveness=liveness,
                                      concurrency=2, maxQueued=2)
    pb2, _ = mmesh
    stub.registerModel(pb2.RegisterModelRequest(modelId="iris-sk", modelInfo=pb2.ModelInfo(type="sklearn", path=str(models / "sklearn.joblib"))))
    query = np.array(expected["input"], dtype=np.float64)
    assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]

    [pid] = mlserver_pids(server)
    request = raw_request("iris-sk", [("input-0", "FP64", query)])
    # A server that takes its time: stopped, it answers nothing until it is continued.
    os.kill(pid, signal.SIGSTOP)
    try:
        calls = [server.stub.ModelInfer.future(request, timeout=60) for _ in range(6)]
        # 2 run, 2 wait for a slot, and whichever 2 come last are refused at once.
        wait_for(lambda: sum(c.done() for c in calls) >= 2, 20, "the calls beyond the queue to be refused")
        refused = [c for c in calls if c.done()]
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
            details = call.details()
            assert "model iris-sk" in details and "runtime mlserver process 0" in details, details
            assert "2 calls running and 2 waiting" in details and "maxQueued" in details, details
        # The decoded path (REST) shares the same slots and queue.
        body = json.dumps({"inputs": [{"name": "input-0", "shape": list(query.shape), "datatype": "FP64",
                                       "data": query.reshape(-1).tolist()}]}).encode()
        rest = urllib.request.Request(f"http://{server.http_addr}/v2/models/iris-sk/infer", data=body,
                                      headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(rest, timeout=20)
        assert e.value.code == 429
        message = e.value.read().decode()
        assert "iris-sk" in message and "runtime mlserver process 0" in message, message
        time.sleep(0.5)
        assert sum(c.done() for c in calls) == 2, "the admitted calls wait for the stopped server"
    finally:
        os.kill(pid, signal.SIGCONT)
    answered = [c for c in calls if c not in refused]
    for call in answered:
        answer = call.result(timeout=60)
        dtype = {"INT64": np.int64, "INT32": np.int32, "FP64": np.float64}[answer.outputs[0].datatype]
        assert np.frombuffer(answer.raw_output_contents[0], dtype=dtype).tolist() == expected["sklearn_predict"]
    assert server.metrics().get('densemesh_requests_total{method="ModelInfer",code="RESOURCE_EXHAUSTED"}', 0) >= 2
    # With the slots free again, the next call is answered.
    assert infer_fp(server, "iris-sk", query).reshape(-1).tolist() == expected["sklearn_predict"]
