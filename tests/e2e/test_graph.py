"""Inference graphs (KServe InferenceGraph) run inside meshd, called with tritonclient like a model:
a sequence equal to its three models run by hand, an ensemble, a switch, a splitter, Hard and Soft
failures, registration refusals, a graph spanning two pods on etcd, and InferenceGraph YAML applied with
`meshctl apply -f`."""
import json
import math
import os
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from graph_models import CHAIN, by_hand, write_repository
from meshd import REPO, raw_request, wait_for
from test_etcd import HERE, Etcd, mm

MESHCTL = os.environ.get("MESHCTL_BIN", os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))
                         .replace("meshd", "meshctl"))
# Two rows the classifier puts in different classes (1 and 0).
X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -2.0, -1.0]], dtype=np.float32)


def admin(server, admin_api):
    pb2, pb2_grpc = admin_api
    return pb2, pb2_grpc.AdminStub(server.channel)


def set_graph(server, admin_api, name, spec):
    pb2, stub = admin(server, admin_api)
    return stub.SetGraph(pb2.SetGraphRequest(name=name, spec_json=json.dumps(spec)))


def infer(client, model, x=X, headers=None, outputs=None):
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], headers=headers, outputs=outputs)


def meshctl(server, *args):
    return subprocess.run([MESHCTL, "--addr", server.grpc_addr, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def server(start_meshd, tmp_path):
    return start_meshd(write_repository(tmp_path / "repo"), "--capacity", "256MiB")


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_addr)
    yield c
    c.close()


def test_a_three_step_sequence_answers_what_its_three_models_answer_by_hand(server, client, admin_api):
    set_graph(server, admin_api, "chain", CHAIN)
    assert not client.is_model_ready("chain"), "ready once every model it names is loaded"
    got = infer(client, "chain")
    assert client.is_model_ready("chain")
    # The three models called one by one, as a client without graphs would.
    scaled = infer(client, "scale").as_numpy("scaled")
    logits_in = grpcclient.InferInput("input", list(scaled.shape), "FP32")
    logits_in.set_data_from_numpy(scaled)
    logits = client.infer("classify", [logits_in]).as_numpy("logits")
    argmax_in = grpcclient.InferInput("logits", list(logits.shape), "FP32")
    argmax_in.set_data_from_numpy(logits)
    want = client.infer("argmax", [argmax_in]).as_numpy("class")
    assert got.get_response().model_name == "chain"
    assert np.array_equal(got.as_numpy("class"), want)
    assert np.array_equal(want, by_hand(X))

    # Typed contents in, typed contents out, the same answer (raw between the steps).
    typed = server.stub.ModelInfer(typed_request("chain", X))
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.int64_contents) == by_hand(X).reshape(-1).tolist()

    # REST calls the same front.
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape),
                                   "data": X.reshape(-1).tolist()}]}).encode()
    request = urllib.request.Request(f"http://{server.http_addr}/v2/models/chain/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        answer = json.loads(r.read())
    assert answer["outputs"][0]["data"] == by_hand(X).reshape(-1).tolist()

    metrics = server.metrics()
    for step in ("scale", "classify", "argmax"):
        assert metrics[f'densemesh_graph_step_duration_seconds_count{{graph="chain",step="{step}"}}'] == 3


def typed_request(model, x):
    from tritonclient.grpc import service_pb2
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return request


def test_an_ensemble_answers_every_steps_outputs_prefixed_by_step_name(server, client, admin_api):
    set_graph(server, admin_api, "both", {"nodes": {"root": {"routerType": "Ensemble", "steps": [
        {"name": "a", "serviceName": "scale"}, {"name": "b", "serviceName": "triple"}]}}})
    got = infer(client, "both")
    assert {o.name for o in got.get_response().outputs} == {"a.scaled", "b.scaled"}
    assert np.allclose(got.as_numpy("a.scaled"), X * 2 + 1)
    assert np.allclose(got.as_numpy("b.scaled"), X * 3)
    # The client may ask for some outputs only.
    only = infer(client, "both", outputs=[grpcclient.InferRequestedOutput("b.scaled")])
    assert [o.name for o in only.get_response().outputs] == ["b.scaled"]


def test_a_switch_runs_the_first_step_whose_condition_holds_for_a_tensor_value(server, client, admin_api):
    set_graph(server, admin_api, "switch", {"nodes": {"root": {"routerType": "Switch", "steps": [
        {"name": "big", "serviceName": "triple", "condition": 'inputs.#(name=="x").data.#(>100)'},
        {"name": "keyed", "serviceName": "scale", "condition": '[@this].#(headers.x-tier=="gold")'},
    ]}}})
    big = np.array([[1, 2, 3, 500]], dtype=np.float32)
    small = np.array([[1, 2, 3, 4]], dtype=np.float32)
    assert np.allclose(infer(client, "switch", big).as_numpy("scaled"), big * 3)
    assert np.allclose(infer(client, "switch", small, headers={"x-tier": "gold"}).as_numpy("scaled"), small * 2 + 1)
    # No condition holds: the request passes through unchanged, as KServe's router answers.
    assert np.array_equal(infer(client, "switch", small).as_numpy("x"), small)


def test_a_splitter_follows_its_weights_and_a_route_key_sticks(server, client, admin_api):
    set_graph(server, admin_api, "split", {"nodes": {"root": {"routerType": "Splitter", "steps": [
        {"name": "a", "serviceName": "scale", "weight": 70}, {"name": "b", "serviceName": "triple", "weight": 30}]}}})
    two = np.full((1, 4), 2.0, dtype=np.float32)  # step a answers 5 (2*2+1), step b 6 (2*3)
    n, p = 400, 0.7
    to_a = sum(float(infer(client, "split", two).as_numpy("scaled")[0, 0]) == 5.0 for _ in range(n))
    assert abs(to_a - n * p) <= 5 * math.sqrt(n * p * (1 - p)), f"{to_a} of {n} took the 70% step"
    keyed = {float(infer(client, "split", two, headers={"densemesh-route-key": "user-1"}).as_numpy("scaled")[0, 0])
             for _ in range(20)}
    assert len(keyed) == 1, "one route key, one step"


def test_a_hard_step_failure_fails_the_graph_with_its_code_and_a_soft_one_is_skipped(server, client, admin_api):
    steps = lambda dependency: {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"name": "scale", "serviceName": "scale"},
        {"name": "bad", "serviceName": "broken", "data": "$response", "dependency": dependency}]}}}
    set_graph(server, admin_api, "hard", steps("Hard"))
    set_graph(server, admin_api, "soft", steps("Soft"))
    with pytest.raises(InferenceServerException) as failed:
        infer(client, "hard")
    assert failed.value.status() == "StatusCode.UNAVAILABLE", failed.value
    assert "graph hard: step bad failed" in failed.value.message() and "failed to load" in failed.value.message()
    # Skipped: the graph answers the outputs the step would have taken.
    assert np.allclose(infer(client, "soft").as_numpy("scaled"), X * 2 + 1)
    errors = server.metrics()
    assert errors['densemesh_graph_step_errors_total{graph="hard",step="bad",code="UNAVAILABLE"}'] == 1
    assert errors['densemesh_graph_step_errors_total{graph="soft",step="bad",code="UNAVAILABLE"}'] == 1

    # A step whose input is not there: INVALID_ARGUMENT naming the step and the input.
    unmapped = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"serviceName": "scale"}, {"serviceName": "classify", "data": "$response", "dependency": "Hard"}]}}}
    set_graph(server, admin_api, "unmapped", unmapped)
    with pytest.raises(InferenceServerException) as missing:
        infer(client, "unmapped")
    assert missing.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "step classify" in missing.value.message() and "input" in missing.value.message(), missing.value


def test_registration_refuses_graphs_that_cannot_run_and_meshctl_manages_them(server, admin_api, mmesh, tmp_path):
    def refused(name, spec):
        with pytest.raises(grpc.RpcError) as e:
            set_graph(server, admin_api, name, spec)
        return e.value.code(), e.value.details()

    sequence = lambda *steps: {"nodes": {"root": {"routerType": "Sequence", "steps": list(steps)}}}
    assert refused("g", sequence({"serviceName": "ghost"})) == (
        grpc.StatusCode.INVALID_ARGUMENT, "graph g: node root step ghost: serviceName ghost is not a registered model or vmodel")
    code, message = refused("g", sequence({"nodeName": "root"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cycle: root -> root" in message
    code, message = refused("scale", sequence({"serviceName": "triple"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "taken by a model" in message
    # The other way round: a model or vmodel may not take a graph's name.
    set_graph(server, admin_api, "taken", sequence({"serviceName": "scale"}))
    pb2, stub = mm(server, mmesh)
    info = pb2.ModelInfo(type="onnx", path=str(server.model_repo / "scale"))
    for call in (lambda: stub.registerModel(pb2.RegisterModelRequest(modelId="taken", modelInfo=info)),
                 lambda: stub.setVModel(pb2.SetVModelRequest(vModelId="taken", targetModelId="scale"))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "taken by an inference graph" in e.value.details()
    assert "deleted" in meshctl(server, "graph", "delete", "taken").stdout
    switch = {"nodes": {"root": {"routerType": "Switch", "steps": [
        {"serviceName": "scale", "condition": 'instances.#(intent=="Open")#'}]}}}
    code, message = refused("g", switch)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and 'condition "instances.#(intent==\\"Open\\")#"' in message
    code, message = refused("g", {"nodes": {"root": {"routerType": "Parallel", "steps": []}}})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not an InferenceGraph spec" in message

    spec = tmp_path / "chain.json"
    spec.write_text(json.dumps(CHAIN))
    assert meshctl(server, "graph", "set", "-f", str(spec), "chain").returncode == 0
    listed = json.loads(meshctl(server, "-o", "json", "graph", "list").stdout)
    assert [g["name"] for g in listed] == ["chain"]
    assert listed[0]["spec"]["nodes"]["root"]["steps"][1]["inputMap"] == {"input": "scaled"}
    assert "root:Sequence[scale,classify,argmax]" in meshctl(server, "graph", "get", "chain").stdout
    assert "deleted" in meshctl(server, "graph", "delete", "chain").stdout
    gone = meshctl(server, "graph", "get", "chain")
    assert gone.returncode == 1 and "graph chain not found" in gone.stderr


def test_inference_graph_yaml_applies_with_meshctl(server, client, tmp_path):
    manifest = tmp_path / "graph.yaml"
    manifest.write_text("""
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: yaml-chain
spec:
  nodes:
    root:
      routerType: Sequence
      steps:
      - serviceName: scale
        name: scale
      - serviceName: classify
        name: classify
        data: $response
        inputMap: {input: scaled}
      - nodeName: pick
        name: pick
        data: $response
    pick:
      routerType: Sequence
      steps:
      - serviceName: argmax
        data: $response
        dependency: Hard
""")
    applied = meshctl(server, "apply", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    assert "inferencegraph/yaml-chain configured" in applied.stdout
    assert np.array_equal(infer(client, "yaml-chain").as_numpy("class"), by_hand(X))


def test_a_graph_spans_two_pods_each_step_one_hop(start_meshd, mmesh, tmp_path, admin_api):
    etcd = Etcd()
    try:
        repo = write_repository(tmp_path / "repo")
        common = ["--etcd", etcd.endpoint, "--lease-ttl", "30s", "--capacity", "256MiB"]
        a = start_meshd(repo, *common, "--instance-id", "pod-a")
        b = start_meshd(repo, *common, "--instance-id", "pod-b")
        pb2, stub_a = mm(a, mmesh)
        wait_for(lambda: all(pb2.ModelStatusInfo.ModelStatus.Name(stub_a.getModelStatus(
            pb2.GetStatusRequest(modelId=m)).status) != "NOT_FOUND" for m in ("scale", "classify", "argmax")),
            60, "the repository's models to be registered")
        # scale and argmax load on pod-a, classify on pod-b: each call marked as a peer marks a call it
        # forwards, so the pod asked serves it itself.
        a.stub.ModelInfer(raw_request("scale", [("x", "FP32", X)]), metadata=HERE)
        a.stub.ModelInfer(raw_request("argmax", [("logits", "FP32", np.zeros((1, 3), dtype=np.float32))]), metadata=HERE)
        b.stub.ModelInfer(raw_request("classify", [("input", "FP32", X)]), metadata=HERE)

        def a_sees_b_copy():
            s = stub_a.getModelStatus(pb2.GetStatusRequest(modelId="classify"))
            return {c.location for c in s.modelCopyInfos} == {"pod-b"}

        wait_for(a_sees_b_copy, 30, "pod-a to see pod-b's copy of classify")
        set_graph(a, admin_api, "chain", CHAIN)
        client = grpcclient.InferenceServerClient(a.grpc_addr)
        try:
            for _ in range(5):
                assert np.array_equal(infer(client, "chain").as_numpy("class"), by_hand(X))
        finally:
            client.close()
        metrics_a, metrics_b = a.metrics(), b.metrics()
        assert metrics_a['densemesh_forwarded_requests_total{result="ok"}'] == 5, "one hop per run, for classify"
        assert metrics_a["densemesh_models_loaded"] == 2, "no copy of classify on pod-a"
        assert metrics_b["densemesh_models_loaded"] == 1
        assert metrics_b['densemesh_requests_total{method="ModelInfer",code="OK"}'] == 1 + 5, "served once per run"
    finally:
        etcd.stop()
        etcd.dir.cleanup()


def rest_infer(server, model, x, headers=None):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()
    request = urllib.request.Request(f"http://{server.http_addr}/v2/models/{model}/infer", data=body,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as r:
        return {o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"]) for o in json.loads(r.read())["outputs"]}


def test_switch_conditions_read_rest_headers_as_they_read_grpc_metadata(server, admin_api):
    set_graph(server, admin_api, "tiered", {"nodes": {"root": {"routerType": "Switch", "steps": [
        {"name": "gold", "serviceName": "scale", "condition": '[@this].#(headers.x-tier=="gold")'},
        {"name": "secret", "serviceName": "triple", "condition": "headers.authorization"},
        {"name": "noted", "serviceName": "triple", "condition": "headers.x-note"},
    ]}}})
    small = np.array([[1, 2, 3, 4]], dtype=np.float32)
    gold = rest_infer(server, "tiered", small, {"X-Tier": "gold"})
    assert list(gold) == ["scaled"] and np.allclose(gold["scaled"], small * 2 + 1)
    noted = rest_infer(server, "tiered", small, {"X-Note": "n" * 500})
    assert list(noted) == ["scaled"] and np.allclose(noted["scaled"], small * 3)
    # None holds: the input passes through. Credentials never reach a graph, so the second
    # condition cannot hold over REST; nor does the third for a header past the size bound.
    for headers in ({"X-Tier": "silver"}, {"Authorization": "Bearer t"}, {"X-Note": "n" * 2000}):
        passed = rest_infer(server, "tiered", small, headers)
        assert list(passed) == ["x"] and np.array_equal(passed["x"], small), headers


def test_model_metadata_on_a_graph_names_what_its_request_needs_and_what_it_answers(server, client, admin_api):
    set_graph(server, admin_api, "chain", CHAIN)
    set_graph(server, admin_api, "both", {"nodes": {"root": {"routerType": "Ensemble", "steps": [
        {"name": "a", "serviceName": "scale"}, {"name": "b", "serviceName": "triple"}]}}})
    set_graph(server, admin_api, "renamed", {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"serviceName": "classify", "inputMap": {"input": "features"}},
        {"nodeName": "pick", "data": "$response"}]},
        "pick": {"routerType": "Switch", "steps": [
            {"name": "top", "serviceName": "argmax", "condition": "parameters.top"},
            {"name": "any", "serviceName": "argmax"}]}}})

    def tensors(ts):
        return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in ts]

    chain = client.get_model_metadata("chain", as_json=True)
    assert chain["name"] == "chain" and chain["platform"] == "densemesh_graph"
    # Only the first step reads the request; the answer is the last step's.
    assert tensors(chain["inputs"]) == [("x", "FP32", [-1, 4])]
    assert tensors(chain["outputs"]) == [("class", "INT64", [-1, 1])]
    both = client.get_model_metadata("both", as_json=True)
    assert tensors(both["inputs"]) == [("x", "FP32", [-1, 4])]
    assert tensors(both["outputs"]) == [("a.scaled", "FP32", [-1, 4]), ("b.scaled", "FP32", [-1, 4])]
    # inputMap read backwards: the request carries `features`; a node's outputs are the graph's.
    with urllib.request.urlopen(f"http://{server.http_addr}/v2/models/renamed", timeout=30) as r:
        renamed = json.loads(r.read())
    assert tensors(renamed["inputs"]) == [("features", "FP32", [-1, 4])]
    assert tensors(renamed["outputs"]) == [("class", "INT64", [-1, 1])]
    assert renamed["platform"] == "densemesh_graph"
    # Headers naming a model still reach the model.
    scale = server.stub.ModelMetadata(service_pb2().ModelMetadataRequest(name="chain"),
                                      metadata=[("mm-model-id", "scale")])
    assert [o.name for o in scale.outputs] == ["scaled"]


def service_pb2():
    from tritonclient.grpc import service_pb2 as pb2
    return pb2
