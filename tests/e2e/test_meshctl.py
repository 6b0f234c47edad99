"""meshctl end to end against a running meshd: what a person or a script does with it."""
import json
import os
import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from meshd import EXAMPLES, REPO

MESHCTL = os.environ.get("MESHCTL_BIN", str(REPO / "target" / "debug" / "meshctl"))


def meshctl(server, *args, stdin=None):
    return subprocess.run([MESHCTL, "--addr", server.grpc_addr, *args], input=stdin, capture_output=True, text=True, timeout=120)


def ok_json(server, *args, stdin=None):
    r = meshctl(server, "-o", "json", *args, stdin=stdin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def server(start_meshd):
    return start_meshd(EXAMPLES, "--load-retry-backoff", "1s")


def test_register_list_load_predict_unregister(server, tmp_path):
    listed = ok_json(server, "list")
    assert {m["model_id"] for m in listed} == {"dtypes", "iris-logreg", "mlp-regressor", "multi-input"}
    assert all(m["source"] == "repository" and m["status"] == "NOT_LOADED" for m in listed)

    status = ok_json(server, "register", "mlp2", "--path", str(EXAMPLES / "mlp-regressor"), "--load")
    assert status["status"] == "LOADED"
    assert ok_json(server, "status", "mlp2")["copies"][0]["location"]

    x = [[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0]]
    request = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": x}]})
    out = ok_json(server, "predict", "mlp2", "--input", request)
    want = ort.InferenceSession(str(EXAMPLES / "mlp-regressor" / "model.onnx")).run(None, {"input": np.array(x, np.float32)})[0]
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(want.shape), want, rtol=1e-5)
    via_stdin = ok_json(server, "predict", "mlp2", stdin=request)
    assert via_stdin["outputs"][0]["data"] == out["outputs"][0]["data"]

    table = meshctl(server, "list")
    assert table.returncode == 0 and "mlp2" in table.stdout and "LOADED" in table.stdout
    assert ok_json(server, "unregister", "mlp2")["unregistered"]
    missing = meshctl(server, "status", "mlp2")
    assert missing.returncode == 1 and "not registered" in missing.stderr


def test_vmodels_from_the_command_line(server, tmp_path):
    assert ok_json(server, "vmodel", "set", "v", "--target", "iris-logreg")["status"] == "DEFINED"
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    failed = meshctl(server, "vmodel", "set", "v", "--target", "bad", "--path", str(tmp_path / "bad.onnx"))
    assert failed.returncode == 1 and "keeps serving iris-logreg" in failed.stderr
    got = ok_json(server, "vmodel", "get", "v")
    assert (got["status"], got["active_model_id"], got["target_model_id"]) == ("TRANSITION_FAILED", "iris-logreg", "bad")
    assert got["errors"], got
    ok_json(server, "vmodel", "set", "v", "--target", "iris-logreg")
    split = ok_json(server, "vmodel", "split", "v", "iris-logreg=3", "multi-input=1")
    assert [(w["model_id"], w["weight"]) for w in split["split"]] == [("iris-logreg", 3), ("multi-input", 1)]
    assert ok_json(server, "vmodel", "list")[0]["split"][1]["model_id"] == "multi-input"
    assert ok_json(server, "vmodel", "delete", "v")["deleted"]
    assert meshctl(server, "vmodel", "get", "v").returncode == 1


def test_bench_and_exit_codes(server):
    report = ok_json(server, "bench", "iris-logreg", "--concurrency", "2", "--duration", "1s", "--warmup", "200ms")
    assert report["requests"] > 0 and report["errors"] == 0 and report["p50_us"] > 0
    assert meshctl(server, "predict", "iris-logreg", "--input", "not json").returncode == 2
    assert meshctl(server, "register").returncode == 2, "clap's usage error"
    unreachable = subprocess.run([MESHCTL, "--addr", "127.0.0.1:1", "list"], capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 3 and "cannot reach meshd" in unreachable.stderr


def test_meshctl_for_people_live_use_sizes_top_and_completions(server):
    from meshd import raw_request

    assert ok_json(server, "load", "iris-logreg")["status"] == "LOADED"
    # The answering pod's own line is its use now, not its last published record.
    (me,) = ok_json(server, "instances")
    assert me["models_loaded"] == 1 and me["used_bytes"] > 0, me
    table = meshctl(server, "instances").stdout
    assert "KiB" in table or "MiB" in table, table
    raw = meshctl(server, "--bytes", "instances").stdout
    assert f"{me['used_bytes']}/{me['capacity_bytes']}" in raw, raw

    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    for _ in range(5):
        server.stub.ModelInfer(raw_request("iris-logreg", [("input", "FP32", x)]))
    rounds = [json.loads(line) for line in meshctl(server, "-o", "json", "top", "--iterations", "2", "--interval",
                                                     "100ms").stdout.splitlines()]
    assert len(rounds) == 2
    (model,) = rounds[-1]["models"]
    assert model["model_id"] == "iris-logreg" and model["requests"] >= 5 and model["size_bytes"] > 0, model
    assert [i["models_loaded"] for i in rounds[-1]["instances"]] == [1]

    for shell in ("bash", "zsh", "fish"):
        script = subprocess.run([MESHCTL, "completions", shell], capture_output=True, text=True, timeout=30)
        assert script.returncode == 0 and "instances" in script.stdout and "simulate" in script.stdout, shell


def test_per_model_metrics_label_only_the_busiest_models(start_meshd):
    """--metrics-per-model 1: the busiest model lately gets its own label, every other counts as other."""
    import time

    from meshd import raw_request

    server = start_meshd(EXAMPLES, "--metrics-per-model", "1")
    iris = [("input", "FP32", np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))]
    mlp = [("input", "FP32", np.zeros((1, 8), dtype=np.float32))]
    for model, inputs, n in (("iris-logreg", iris, 20), ("mlp-regressor", mlp, 2)):
        for _ in range(n):
            server.stub.ModelInfer(raw_request(model, inputs))
    time.sleep(10.5)  # the ranking is redone every 10 s
    server.stub.ModelInfer(raw_request("iris-logreg", iris))
    server.stub.ModelInfer(raw_request("mlp-regressor", mlp))
    metrics = server.metrics()
    assert metrics['densemesh_model_requests_total{model="iris-logreg",code="OK"}'] == 1
    assert metrics['densemesh_model_requests_total{model="other",code="OK"}'] == 23
    assert not [k for k in metrics if 'model="mlp-regressor"' in k], "only the top 1 has a label"


def test_each_models_runtime_is_shown_and_a_registration_can_force_one(server):
    """By default small graphs go to the tiny evaluator and the rest to ONNX Runtime; getModelStatus
    (its errors field, as ModelMesh's status has nothing else) and `meshctl list` say which holds each
    copy, and a registration may force either."""
    x = [[5.1, 3.5, 1.4, 0.2]]
    request = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": x}]})
    by_default = ok_json(server, "predict", "iris-logreg", "--input", request)
    status = ok_json(server, "status", "iris-logreg")
    assert status["status"] == "LOADED"
    location = status["copies"][0]["location"]
    assert status["errors"] == [f"{location}: served by tiny"], status

    # Forced onto ONNX Runtime: the same answers, another runtime, and the list says so.
    forced = ok_json(server, "register", "iris-ort", "--path", str(EXAMPLES / "iris-logreg"),
                     "--runtime", "onnxruntime", "--load")
    assert forced["status"] == "LOADED" and forced["errors"] == [f"{location}: served by onnxruntime"], forced
    on_ort = ok_json(server, "predict", "iris-ort", "--input", request)["outputs"]
    assert [o["name"] for o in on_ort] == [o["name"] for o in by_default["outputs"]]
    for got, want in zip(on_ort, by_default["outputs"]):
        np.testing.assert_allclose(got["data"], want["data"], rtol=1e-5, atol=1e-6)
    listed = {m["model_id"]: m for m in ok_json(server, "list")}
    assert (listed["iris-logreg"]["runtime"], listed["iris-logreg"]["forced_runtime"]) == ("tiny", "")
    assert (listed["iris-ort"]["runtime"], listed["iris-ort"]["forced_runtime"]) == ("onnxruntime", "onnxruntime")
    table = meshctl(server, "list").stdout.splitlines()
    assert table[0].split("\t")[5] == "RUNTIME"
    assert [line.split("\t")[5] for line in table if line.startswith("iris-ort\t")] == ["onnxruntime"]

    # Forced onto the evaluator, a model it lacks operators for fails with its reason, no fallback.
    failed = meshctl(server, "register", "multi-tiny", "--path", str(EXAMPLES / "multi-input"),
                     "--runtime", "tiny", "--load")
    assert failed.returncode == 1 and "asks for the tiny evaluator" in failed.stdout + failed.stderr, failed
    # A runtime the pod does not have for the type is refused before anything is written.
    unknown = meshctl(server, "register", "iris-x", "--path", str(EXAMPLES / "iris-logreg"), "--runtime", "tract")
    assert unknown.returncode != 0 and '"tract"' in unknown.stderr and "tiny, onnxruntime" in unknown.stderr
    assert "iris-x" not in {m["model_id"] for m in ok_json(server, "list")}
