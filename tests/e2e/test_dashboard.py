"""meshd's live dashboard on a two-pod mesh on etcd: /api/v1/cluster answers the documented fields
(docs/dashboard.md), and /dashboard, rendered by a real headless browser (Debian's chromium), names
both pods and the models loaded on them. The screenshot is kept as a test artefact in
target/test-artifacts/dashboard.png (git-ignored)."""
import json
import shutil
import subprocess
import urllib.request

import numpy as np

from meshd import EXAMPLES, REPO, raw_request, wait_for
from test_etcd import etcd, mm  # noqa: F401  (etcd: the fixture, for the test below)

IRIS_X = np.ones((1, 4), dtype=np.float32)
ARTIFACTS = REPO / "target" / "test-artifacts"


def cluster(pod):
    with urllib.request.urlopen(f"http://{pod.metrics_addr}/api/v1/cluster", timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.load(r)


def loaded_models(doc):
    return {m["model_id"] for p in doc["instances"] for m in p["models"] if m["state"] == "loaded"}


def chromium(*args, timeout=120):
    binary = shutil.which("chromium")
    assert binary, "chromium must be installed (Debian's chromium; scripts/setup.sh test installs it)"
    return subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_the_dashboard_shows_both_pods_and_their_models(start_meshd, etcd, mmesh, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    repo.mkdir()
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3s"]
    pods = {name: start_meshd(repo, *common, "--instance-id", name) for name in ("pod-a", "pod-b")}
    pb2, stub = mm(pods["pod-a"], mmesh)
    for model, example in (("iris", "iris-logreg"), ("mlp", "mlp-regressor")):
        info = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / example))
        stub.registerModel(pb2.RegisterModelRequest(modelId=model, modelInfo=info, loadNow=True, sync=True))
    stub.setVModel(pb2.SetVModelRequest(vModelId="v", targetModelId="iris"))
    response = pods["pod-a"].stub.ModelInfer(raw_request("ignored", [("input", "FP32", IRIS_X)]),
                                             metadata=[("mm-vmodel-id", "v")])
    assert response.outputs[0].name == "label"

    # The JSON on its own: both pods, both models loaded, the vmodel, this pod's activity and decisions.
    def complete():
        doc = cluster(pods["pod-a"])
        return ({p["id"] for p in doc["instances"]} == {"pod-a", "pod-b"}
                and loaded_models(doc) >= {"iris", "mlp"} and doc["vmodels"])

    wait_for(complete, 30, "pod-a's /api/v1/cluster to show both pods and both models loaded")
    doc = cluster(pods["pod-a"])
    assert doc["schema_version"] == 1 and doc["this_instance"] == "pod-a"
    assert doc["models_registered"] == 2
    this = next(p for p in doc["instances"] if p["this"])
    assert this["id"] == "pod-a" and this["endpoint"]
    for pod in doc["instances"]:
        assert pod["memory"]["capacity_bytes"] > 0 and pod["memory"]["used_bytes"] >= 0
        for key in ("leader", "draining", "models_loaded", "loading", "lru_age_seconds", "requests_per_minute",
                    "model_types", "disk_cache", "started_ms"):
            assert key in pod, key
        for m in pod["models"]:
            assert set(m) >= {"model_id", "state", "size_bytes", "since_ms", "idle_seconds", "requests"}
            if m["state"] == "loaded":
                assert m["size_bytes"] > 0
    assert [p for p in doc["instances"] if p["leader"]] or doc["leader"] is None
    vmodel = doc["vmodels"][0]
    assert (vmodel["vmodel_id"], vmodel["active"], vmodel["target"], vmodel["state"]) == ("v", "iris", "iris", "steady")
    assert vmodel["models"][0]["state"] == "loaded"
    assert doc["activity"]["bucket_seconds"] == 10
    running = doc["activity"]["buckets"][-1]
    assert running["partial"] and running["requests"] >= 1 and running["loads"] >= 0
    assert doc["decisions"], "pod-a placed two models and recorded why"
    for d in doc["decisions"]:
        assert d["model_id"] in ("iris", "mlp") and d["outcome"] in ("load_here", "load_on")
        assert d["instance"] in ("pod-a", "pod-b") and d["reason"] and d["goal"] in ("ensure", "serve")

    # The page in a real browser: it fetched the JSON and rendered it.
    url = f"http://{pods['pod-a'].metrics_addr}/dashboard"
    dom = chromium(f"--user-data-dir={tmp_path / 'chromium-dom'}", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    body = page[page.index("<body"):page.index("<script")]  # what was rendered, not the script's source
    for text in ('data-instance="pod-a"', 'data-instance="pod-b"', "<td>iris</td>", "<td>mlp</td>", "this pod",
                 '<span id="status" class="status">updated '):
        assert text in body, f"{text!r} not in the rendered dashboard:\n{body[-3000:]}"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    taken = chromium(f"--user-data-dir={tmp_path / 'chromium-shot'}", f"--screenshot={shot}",
                     "--window-size=1280,900", url)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
