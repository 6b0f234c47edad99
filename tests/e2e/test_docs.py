"""The metric docs and the Grafana dashboard against what meshd really serves."""
import json
import re

from meshd import EXAMPLES, REPO, raw_request

import numpy as np

DOCS = REPO / "docs"
HISTOGRAM_PARTS = re.compile(r"_(bucket|sum|count)$")


def documented():
    return set(re.findall(r"^\| `(densemesh_[a-z_]+)`", (DOCS / "metrics.md").read_text(), re.M))


def test_the_grafana_dashboard_queries_only_documented_metrics_that_meshd_serves(start_meshd):
    dashboard = json.loads((DOCS / "grafana" / "densemesh.json").read_text())
    assert dashboard["panels"] and dashboard["uid"] == "densemesh"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Balanced brackets: a typo here is a panel that shows nothing.
            expr = target["expr"]
            for open_, close in ("()", "{}", "[]"):
                assert expr.count(open_) == expr.count(close), expr
            queried |= {HISTOGRAM_PARTS.sub("", m) for m in re.findall(r"densemesh_[a-z_]+", expr)}
    assert queried <= documented(), queried - documented()

    server = start_meshd(EXAMPLES, "--metrics-per-model", "5")
    server.stub.ModelInfer(raw_request("iris-logreg", [("input", "FP32", np.ones((1, 4), dtype=np.float32))]))
    served = {HISTOGRAM_PARTS.sub("", k.split("{")[0]) for k in server.metrics()}
    # Cluster-only and puller metrics appear once there is something to count; the rest must be there.
    needs_more = {"densemesh_forwarded_requests_total", "densemesh_registry_up", "densemesh_leader",
                  "densemesh_disk_cache_used_bytes", "densemesh_disk_cache_capacity_bytes",
                  "densemesh_cache_evictions_total", "densemesh_cache_miss_wait_seconds"}
    missing = queried - served - needs_more
    assert not missing, f"the dashboard queries metrics meshd does not serve: {missing}"
