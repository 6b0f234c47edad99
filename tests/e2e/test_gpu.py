"""The GPU tier's contract on a pod without GPUs, as CI machines are: a model that requires a GPU is
registered but never served on the CPU (UNAVAILABLE, saying why), one that prefers a GPU is served on
the CPU, a bad ask is refused by name, and the pod publishes no devices. The GPU itself is checked by
scripts/device-check.sh on a machine that has one."""
import json
import os
import subprocess

import numpy as np

from meshd import EXAMPLES, REPO, wait_for
from test_meshctl import meshctl, ok_json


def test_a_pod_without_gpus_refuses_models_that_require_one_and_serves_those_that_prefer_one(start_meshd):
    server = start_meshd(EXAMPLES)
    assert "no GPU tier" in server.logs(), server.logs()

    iris = str(EXAMPLES / "iris-logreg")
    ok_json(server, "register", "iris-gpu", "--path", iris, "--gpu", "required")
    ok_json(server, "register", "iris-either", "--path", iris, "--gpu", "preferred")
    listed = {m["model_id"]: m["gpu"] for m in ok_json(server, "list")}
    assert (listed["iris-gpu"], listed["iris-either"], listed["iris-logreg"]) == ("required", "preferred", "")

    x = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    request = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": x}]})
    refused = meshctl(server, "predict", "iris-gpu", "--input", request)
    assert refused.returncode == 1, refused
    assert "UNAVAILABLE" in refused.stderr.upper() or "Unavailable" in refused.stderr, refused.stderr
    assert "requires a GPU" in refused.stderr and "no live pod has one" in refused.stderr, refused.stderr

    served = ok_json(server, "predict", "iris-either", "--input", request)
    plain = ok_json(server, "predict", "iris-logreg", "--input", request)
    assert served["outputs"] == plain["outputs"]
    assert np.array(served["outputs"][0]["data"]).size == 2
    # A new ask on a registered model replaces its copy: the CPU copy serving it goes, and the model
    # is placed anew, which a pod without a GPU refuses.
    ok_json(server, "register", "iris-either", "--path", iris, "--gpu", "required")
    assert {m["model_id"]: m["gpu"] for m in ok_json(server, "list")}["iris-either"] == "required"
    def refused_now():
        r = meshctl(server, "predict", "iris-either", "--input", request)
        return r.returncode == 1 and "requires a GPU" in r.stderr
    wait_for(refused_now, 30, "the copy placed under the old ask to go")

    bad = meshctl(server, "register", "iris-bad", "--path", iris, "--gpu", "sometimes")
    assert bad.returncode != 0 and "modelInfo.gpu" in bad.stderr and "preferred or required" in bad.stderr, bad.stderr
    assert "iris-bad" not in {m["model_id"] for m in ok_json(server, "list")}, "a refused registration loses nothing"

    (me,) = ok_json(server, "instances")
    assert me["devices"] == []
    table = meshctl(server, "instances")
    assert table.returncode == 0 and "GPUS" in table.stdout.splitlines()[0], table.stdout
    assert table.stdout.splitlines()[1].rstrip().endswith("-"), table.stdout
    metrics = server.metrics()
    assert not [k for k in metrics if 'tier="gpu' in k], "no device series on a pod without GPUs"


def test_a_bad_gpu_capacity_stops_meshd_naming_the_flag():
    meshd = os.environ.get("MESHD_BIN", str(REPO / "target" / "debug" / "meshd"))
    for bad in ["lots", "0=", "90%,80%"]:
        r = subprocess.run([meshd, "serve", "--model-repo", str(EXAMPLES), "--gpu-capacity", bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--gpu-capacity" in r.stderr, (bad, r.returncode, r.stderr)
