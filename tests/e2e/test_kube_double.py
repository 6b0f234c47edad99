"""The Kubernetes API-server double (tests/kube/apiserver_double.py) driven by the real kubectl 1.33 and by
raw HTTP the way kube-rs talks to it: what a controller and a user's kubectl rely on behaves as upstream."""
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshd import REPO

sys.path.insert(0, str(REPO / "tests" / "kube"))
from apiserver_double import (  # noqa: E402
    ApiServerDouble, compile_jsonpath, eval_jsonpath, human_duration, parse_label_selector)

GROUP, VERSION = "example.densemesh.io", "v1alpha1"
WIDGETS = f"/apis/{GROUP}/{VERSION}"

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [{
            "name": VERSION, "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                {"name": "URL", "type": "string", "jsonPath": ".status.url"},
                {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
        }],
    },
}


def find_kubectl():
    """The versioned kubectl 1.33 binary: the plain `kubectl` on PATH is the cloud SDK's wrapper."""
    candidates = [os.environ.get("DENSEMESH_KUBECTL"), shutil.which("kubectl.1.33")]
    wrapper = shutil.which("kubectl")
    if wrapper:
        candidates.append(str(Path(wrapper).resolve().parent / "kubectl.1.33"))
    candidates.append("/usr/lib/google-cloud-sdk/bin/kubectl.1.33")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("kubectl 1.33 not found: looked for kubectl.1.33 on PATH and next to the `kubectl` wrapper "
                "(the Google Cloud SDK's bin folder); set DENSEMESH_KUBECTL to its path")


class Cluster:
    """A double served on loopback with a kubeconfig and a kubectl cache of its own."""

    def __init__(self, tmp, **options):
        self.double = ApiServerDouble(**options).start()
        self.tmp = tmp
        self.kubeconfig = self.double.write_kubeconfig(tmp / "kubeconfig")
        self.kubectl_bin = find_kubectl()
        self.port = int(self.double.url.rsplit(":", 1)[1])

    def kubectl(self, *args, check=True, timeout=30):
        cmd = [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.tmp / "cache"), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"{' '.join(args)} failed: {done.stderr}{done.stdout}"
        return done

    def apply(self, obj, *args):
        path = self.tmp / f"apply-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(obj))
        return self.kubectl("apply", "--validate=false", "-f", str(path), *args)

    def request(self, method, path, body=None, content_type="application/json", accept="application/json"):
        """(status code, decoded JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": content_type, "Accept": accept})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def ok(self, method, path, body=None, content_type="application/json"):
        code, obj = self.request(method, path, body, content_type)
        assert 200 <= code < 300, f"{method} {path}: {code} {obj}"
        return obj

    def watch(self, path):
        return WatchStream(self.port, path)


class WatchStream:
    """A watch request read event by event, as a client library reads the chunked stream."""

    def __init__(self, port, path):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", path, headers={"Accept": "application/json"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()

    def next(self):
        line = self.response.readline()
        return json.loads(line) if line else None

    def until(self, condition, what):
        """Events read until `condition(event)` holds; fails if the stream ends first."""
        seen = []
        while True:
            event = self.next()
            assert event is not None, f"the watch ended before {what}; saw {seen}"
            seen.append(event)
            if condition(event):
                return seen

    def close(self):
        self.conn.close()


def widget(name, namespace="default", **spec):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec or {"size": 1}}


def widget_path(name=None, namespace="default", sub=None):
    path = f"{WIDGETS}/namespaces/{namespace}/widgets"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("kube-double"), bookmark_interval=0.2)
    c.apply(WIDGET_CRD)
    yield c
    c.double.stop()


@pytest.fixture
def namespace(cluster, request):
    """A namespace of this test's own."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:50].strip("-")
    cluster.ok("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    return name


def test_kubectl_applies_a_crd_then_a_resource_and_prints_its_columns(cluster, namespace):
    crd = cluster.ok("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{GROUP}")
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"

    cluster.apply(widget("w1", namespace, size=3))
    out = cluster.kubectl("get", "widgets", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "SIZE", "URL", "READY", "AGE"]
    assert out[1].split()[:2] == ["w1", "3"]

    cluster.ok("PATCH", widget_path("w1", namespace, "status"),
               {"status": {"url": "http://w1.example", "conditions": [{"type": "Ready", "status": "True"}]}},
               "application/merge-patch+json")
    row = cluster.kubectl("get", "wd", "w1", "-n", namespace).stdout.splitlines()[1].split()
    assert row[:4] == ["w1", "3", "http://w1.example", "True"]
    assert row[4].endswith("s")  # an age, as kubectl prints it

    resources = cluster.kubectl("api-resources", "--api-group", GROUP).stdout
    assert "widgets" in resources and "wd" in resources


def test_kubectl_patch_merge_and_json_bump_generation_only_for_spec(cluster, namespace):
    cluster.apply(widget("w", namespace, size=1))
    cluster.kubectl("patch", "widget", "w", "-n", namespace, "--type=merge", "-p", '{"spec":{"size":2}}')
    cluster.kubectl("patch", "widget", "w", "-n", namespace, "--type=json",
                    "-p", '[{"op":"add","path":"/spec/color","value":"red"}]')
    cluster.kubectl("patch", "widget", "w", "-n", namespace, "--type=merge",
                    "-p", '{"metadata":{"labels":{"tier":"gold"}}}')
    obj = cluster.ok("GET", widget_path("w", namespace))
    assert obj["spec"] == {"size": 2, "color": "red"}
    assert obj["metadata"]["labels"] == {"tier": "gold"}
    assert obj["metadata"]["generation"] == 3  # create, then two spec patches; the label patch is metadata


def test_status_subresource_isolates_status_from_spec(cluster, namespace):
    created = cluster.ok("POST", widget_path(namespace=namespace),
                         {**widget("s", namespace), "status": {"url": "set-on-create"}})
    assert "status" not in created  # the status subresource drops status on create

    after_status = cluster.ok("PATCH", widget_path("s", namespace, "status"),
                              {"spec": {"size": 99}, "metadata": {"labels": {"x": "y"}}, "status": {"url": "u1"}},
                              "application/merge-patch+json")
    assert after_status["status"] == {"url": "u1"}
    assert after_status["spec"] == {"size": 1} and "labels" not in after_status["metadata"]
    assert after_status["metadata"]["generation"] == 1

    put = {**after_status, "spec": {"size": 5}, "status": {"url": "ignored"}}
    after_put = cluster.ok("PUT", widget_path("s", namespace), put)
    assert after_put["spec"] == {"size": 5} and after_put["status"] == {"url": "u1"}
    assert after_put["metadata"]["generation"] == 2

    status_put = {**after_put, "status": {"url": "u2"}}
    assert cluster.ok("PUT", widget_path("s", namespace, "status"), status_put)["status"] == {"url": "u2"}
    assert cluster.ok("GET", widget_path("s", namespace, "status"))["spec"] == {"size": 5}


def test_kubectl_wait_sees_a_condition_set_through_status(cluster, namespace):
    cluster.apply(widget("slow", namespace))

    def become_ready():
        time.sleep(0.5)
        cluster.ok("PATCH", widget_path("slow", namespace, "status"),
                   {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Done"}]}},
                   "application/merge-patch+json")

    setter = threading.Thread(target=become_ready)
    setter.start()
    try:
        done = cluster.kubectl("wait", "--for=condition=Ready", "widget/slow", "-n", namespace, "--timeout=15s")
    finally:
        setter.join()
    assert "condition met" in done.stdout


def test_delete_waits_on_finalizers(cluster, namespace):
    obj = widget("held", namespace)
    obj["metadata"]["finalizers"] = ["example.densemesh.io/cleanup"]
    created = cluster.ok("POST", widget_path(namespace=namespace), obj)
    events = cluster.watch(widget_path(namespace=namespace) + f"?watch=1&resourceVersion="
                                                              f"{created['metadata']['resourceVersion']}")
    try:
        cluster.kubectl("delete", "widget", "held", "-n", namespace, "--wait=false")
        held = cluster.ok("GET", widget_path("held", namespace))
        assert held["metadata"]["deletionTimestamp"]

        cluster.ok("PATCH", widget_path("held", namespace),
                   [{"op": "test", "path": "/metadata/finalizers/0", "value": "example.densemesh.io/cleanup"},
                    {"op": "remove", "path": "/metadata/finalizers/0"}], "application/json-patch+json")
        code, _ = cluster.request("GET", widget_path("held", namespace))
        assert code == 404
        seen = events.until(lambda e: e["type"] == "DELETED", "the DELETED event")
        assert [e["type"] for e in seen] == ["MODIFIED", "DELETED"]
        assert seen[0]["object"]["metadata"]["deletionTimestamp"]
    finally:
        events.close()


def test_kubectl_delete_waits_until_the_object_is_gone(cluster, namespace):
    cluster.apply(widget("gone", namespace))
    cluster.kubectl("delete", "widget", "gone", "-n", namespace, "--timeout=10s")
    assert cluster.request("GET", widget_path("gone", namespace))[0] == 404


def test_stale_resource_version_is_a_conflict(cluster, namespace):
    first = cluster.ok("POST", widget_path(namespace=namespace), widget("c", namespace))
    cluster.ok("PUT", widget_path("c", namespace), {**first, "spec": {"size": 2}})

    code, status = cluster.request("PUT", widget_path("c", namespace), {**first, "spec": {"size": 3}})
    assert (code, status["kind"], status["reason"], status["code"]) == (409, "Status", "Conflict", 409)

    code, status = cluster.request("POST", widget_path(namespace=namespace), widget("c", namespace))
    assert (code, status["reason"]) == (409, "AlreadyExists")

    code, status = cluster.request("PUT", widget_path("c", namespace),
                                   {**widget("c", namespace), "spec": {"size": 4}})
    assert (code, status["reason"]) == (422, "Invalid")  # custom resources need a resourceVersion to update

    generated = cluster.ok("POST", widget_path(namespace=namespace),
                           {**widget("", namespace), "metadata": {"generateName": "gen-"}})
    assert generated["metadata"]["name"].startswith("gen-") and len(generated["metadata"]["name"]) == 9


def test_a_write_that_changes_nothing_bumps_nothing_and_sends_no_event(cluster, namespace):
    obj = cluster.ok("POST", widget_path(namespace=namespace), widget("same", namespace, size=7))
    rv = obj["metadata"]["resourceVersion"]

    assert cluster.ok("PUT", widget_path("same", namespace), obj)["metadata"]["resourceVersion"] == rv
    merged = cluster.ok("PATCH", widget_path("same", namespace), {"spec": {"size": 7}}, "application/merge-patch+json")
    assert merged["metadata"]["resourceVersion"] == rv
    status = cluster.ok("PATCH", widget_path("same", namespace, "status"), {"status": None},
                        "application/merge-patch+json")
    assert status["metadata"]["resourceVersion"] == rv
    cluster.apply(widget("same", namespace, size=7))
    cluster.apply(widget("same", namespace, size=7))  # the second apply has nothing to change
    applied_rv = cluster.ok("GET", widget_path("same", namespace))["metadata"]["resourceVersion"]

    # a later write elsewhere is the first thing a watch from applied_rv sees
    cluster.ok("POST", widget_path(namespace=namespace), widget("marker", namespace))
    events = cluster.watch(widget_path(namespace=namespace) + f"?watch=true&resourceVersion={applied_rv}")
    try:
        first = events.next()
    finally:
        events.close()
    assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "marker")


def test_json_patch_test_of_a_missing_path_against_null_succeeds(cluster, namespace):
    cluster.ok("POST", widget_path(namespace=namespace), widget("fin", namespace))
    # what kube-rs's finalizer helper sends when the object has no finalizers yet
    patched = cluster.ok("PATCH", widget_path("fin", namespace),
                         [{"op": "test", "path": "/metadata/finalizers", "value": None},
                          {"op": "add", "path": "/metadata/finalizers", "value": ["example.densemesh.io/f"]}],
                         "application/json-patch+json")
    assert patched["metadata"]["finalizers"] == ["example.densemesh.io/f"]

    code, status = cluster.request("PATCH", widget_path("fin", namespace),
                                   [{"op": "test", "path": "/metadata/finalizers", "value": None}],
                                   "application/json-patch+json")
    assert (code, status["reason"]) == (422, "Invalid")


def test_list_pages_with_limit_and_continue_and_selects_by_labels(cluster, namespace):
    for i in range(25):
        obj = widget(f"p{i:02}", namespace)
        obj["metadata"]["labels"] = {"parity": ["even", "odd"][i % 2], **({"tens": "yes"} if i >= 10 else {})}
        cluster.ok("POST", widget_path(namespace=namespace), obj)

    names, token, pages = [], "", 0
    while True:
        page = cluster.ok("GET", widget_path(namespace=namespace) + f"?limit=10&continue={token}")
        pages += 1
        names += [item["metadata"]["name"] for item in page["items"]]
        token = page["metadata"].get("continue", "")
        if not token:
            break
        assert page["metadata"]["remainingItemCount"] == 25 - len(names)
    assert pages == 3 and names == [f"p{i:02}" for i in range(25)]

    def select(selector):
        listed = cluster.ok("GET", widget_path(namespace=namespace) + f"?labelSelector={selector}")
        return {item["metadata"]["name"] for item in listed["items"]}

    assert select("parity%3Dodd,tens") == {f"p{i:02}" for i in range(11, 25, 2)}
    assert select("parity%20in%20(even),!tens") == {f"p{i:02}" for i in range(0, 10, 2)}
    assert select("parity!%3Deven,tens%20notin%20(yes)") == {f"p{i:02}" for i in range(1, 10, 2)}
    by_name = cluster.ok("GET", widget_path(namespace=namespace) + "?fieldSelector=metadata.name%3Dp03")
    assert [i["metadata"]["name"] for i in by_name["items"]] == ["p03"]
    everywhere = cluster.ok("GET", f"{WIDGETS}/widgets?labelSelector=tens")["items"]
    assert len(everywhere) == 15

    table = cluster.kubectl("get", "widgets", "-n", namespace, "--chunk-size=7", "-l", "parity=even").stdout
    assert len(table.splitlines()) == 1 + 13


def test_watch_resumes_from_a_resource_version_and_sends_bookmarks(cluster, namespace):
    start = cluster.ok("GET", widget_path(namespace=namespace))["metadata"]["resourceVersion"]
    a = cluster.ok("POST", widget_path(namespace=namespace), widget("a", namespace))
    cluster.ok("PUT", widget_path("a", namespace), {**a, "spec": {"size": 2}})
    cluster.ok("DELETE", widget_path("a", namespace))
    last = cluster.double.current_resource_version()

    events = cluster.watch(widget_path(namespace=namespace)
                           + f"?watch=1&resourceVersion={start}&allowWatchBookmarks=true&timeoutSeconds=5")
    try:
        seen = events.until(lambda e: e["type"] == "BOOKMARK", "a bookmark")
    finally:
        events.close()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in seen[:-1]] == [
        ("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert int(seen[-1]["object"]["metadata"]["resourceVersion"]) >= int(last)
    assert seen[-1]["object"]["kind"] == "Widget"

    initial = cluster.watch(widget_path(namespace=namespace) + "?watch=1&sendInitialEvents=true"
                            "&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan")
    try:
        cluster.ok("POST", widget_path(namespace=namespace), widget("b", namespace))
        seen = initial.until(lambda e: e["type"] == "ADDED", "the new object")
    finally:
        initial.close()
    end = seen[0]
    assert end["type"] == "BOOKMARK"
    assert end["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_too_old_resource_versions_are_gone(tmp_path):
    c = Cluster(tmp_path, history_limit=5)
    try:
        c.ok("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "first"}})
        c.ok("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "second"}})
        listed = c.ok("GET", "/api/v1/namespaces/default/configmaps?limit=1")
        for i in range(10):
            c.ok("PATCH", "/api/v1/namespaces/default/configmaps/first", {"data": {"i": str(i)}},
                 "application/merge-patch+json")

        events = c.watch("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion=1")
        try:
            error = events.next()
            assert events.next() is None  # the stream ends after the error
        finally:
            events.close()
        assert error["type"] == "ERROR" and error["object"]["code"] == 410

        code, status = c.request("GET", "/api/v1/namespaces/default/configmaps?limit=1&continue="
                                        + listed["metadata"]["continue"])
        assert (code, status["code"]) == (410, 410)
    finally:
        c.double.stop()


def test_lease_create_get_and_replace(cluster, namespace):
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"},
             "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15,
                      "renewTime": "2025-01-01T00:00:00.000000Z"}}
    created = cluster.ok("POST", leases, lease)
    got = cluster.ok("GET", f"{leases}/leader")
    assert got["spec"]["holderIdentity"] == "pod-a"

    taken = cluster.ok("PUT", f"{leases}/leader", {**got, "spec": {**got["spec"], "holderIdentity": "pod-b"}})
    assert int(taken["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    code, status = cluster.request("PUT", f"{leases}/leader", {**got, "spec": {**got["spec"], "holderIdentity": "c"}})
    assert (code, status["reason"]) == (409, "Conflict")
    assert cluster.kubectl("get", "leases", "-n", namespace).stdout.split()[-2:][0] == "pod-b"


def test_server_side_apply_is_refused_with_a_clear_message(cluster, namespace):
    cluster.ok("POST", widget_path(namespace=namespace), widget("ssa", namespace))
    code, status = cluster.request("PATCH", widget_path("ssa", namespace) + "?fieldManager=x",
                                   json.dumps(widget("ssa", namespace)), "application/apply-patch+yaml")
    assert (code, status["reason"]) == (415, "UnsupportedMediaType")
    assert "server-side apply" in status["message"]


def test_owner_references_and_namespace_deletion_collect_objects(cluster, namespace):
    owner = cluster.ok("POST", widget_path(namespace=namespace), widget("owner", namespace))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "name": "owner", "uid": owner["metadata"]["uid"]}
    cluster.ok("POST", f"/api/v1/namespaces/{namespace}/configmaps",
               {"metadata": {"name": "owned", "ownerReferences": [ref]}})
    cluster.ok("DELETE", widget_path("owner", namespace))
    assert cluster.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/owned")[0] == 404

    cluster.ok("POST", f"/api/v1/namespaces/{namespace}/configmaps", {"metadata": {"name": "left"}})
    cluster.kubectl("delete", "namespace", namespace, "--timeout=10s")
    assert cluster.request("GET", f"/api/v1/namespaces/{namespace}")[0] == 404
    assert cluster.ok("GET", f"/api/v1/namespaces/{namespace}/configmaps")["items"] == []


class DoubleProcess:
    """The double started as a script, the way other suites and developers run it."""

    def __init__(self, tmp, *args):
        self.kubeconfig = tmp / "kubeconfig"
        self.cache = tmp / "cache"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kube" / "apiserver_double.py"),
                                      "--port", "0", "--kubeconfig-out", str(self.kubeconfig), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.proc.kill()
            pytest.fail(f"the double did not start: {self.proc.stderr.read()}")

    def kubectl(self, *args):
        done = subprocess.run([find_kubectl(), "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache),
                               *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"kubectl {' '.join(args)} failed: {done.stderr}"
        return done

    def stop(self):
        self.proc.terminate()
        assert self.proc.wait(timeout=10) == 0, "the double should exit cleanly on SIGTERM"


def test_cli_preloads_crds_and_writes_a_kubeconfig(tmp_path):
    yaml_crd = tmp_path / "crds.yaml"
    yaml_crd.write_text("---\n" + json.dumps(WIDGET_CRD) + "\n---\n")  # JSON is YAML: one document of several
    double = DoubleProcess(tmp_path, "--crds", str(yaml_crd))
    try:
        assert f"server: {double.url}" in double.kubeconfig.read_text()
        assert "No resources found" in double.kubectl("get", "widgets", "-A").stderr
    finally:
        double.stop()


def test_the_projects_crds_and_examples_load(tmp_path):
    """charts/densemesh/crds through --crds, then `kubectl apply -f examples/k8s/`: every example is stored
    and `kubectl get` prints each CRD's printer columns."""
    import yaml

    crds_dir, examples = REPO / "charts" / "densemesh" / "crds", REPO / "examples" / "k8s"
    assert crds_dir.is_dir() and examples.is_dir(), "the chart's CRDs and examples/k8s are expected in the repo"
    double = DoubleProcess(tmp_path, "--crds", str(crds_dir))
    try:
        double.kubectl("apply", "--validate=false", "-f", str(examples))
        for path in sorted(examples.glob("*.yaml")):
            for doc in filter(None, yaml.safe_load_all(path.read_text())):
                double.kubectl("get", f"{doc['kind']}.{doc['apiVersion'].split('/')[0]}"
                               if "/" in doc["apiVersion"] else doc["kind"], doc["metadata"]["name"],
                               "-n", doc["metadata"].get("namespace", "default"))
        for path in sorted(crds_dir.glob("*.yaml")):
            for crd in filter(None, yaml.safe_load_all(path.read_text())):
                served = next(v for v in crd["spec"]["versions"] if v.get("served"))
                wanted = [c["name"].upper() for c in served.get("additionalPrinterColumns", [])
                          if not c.get("priority")]
                resource = f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"
                printed = double.kubectl("get", resource, "-A").stdout.splitlines()
                if printed:
                    assert printed[0].split()[2:] == " ".join(wanted).split(), f"{resource}: {printed[0]}"
    finally:
        double.stop()


def test_kubectl_generators_send_protobuf_that_the_double_decodes(cluster):
    cluster.kubectl("create", "namespace", "generated")
    cluster.kubectl("create", "configmap", "settings", "-n", "generated", "--from-literal=mode=fast")
    cluster.kubectl("create", "secret", "generic", "creds", "-n", "generated", "--from-literal=key=s3cr3t")
    assert cluster.ok("GET", "/api/v1/namespaces/generated/configmaps/settings")["data"] == {"mode": "fast"}
    secret = cluster.ok("GET", "/api/v1/namespaces/generated/secrets/creds")
    assert (secret["data"], secret["type"]) == ({"key": "czNjcjN0"}, "Opaque")

    refused = cluster.kubectl("create", "deployment", "web", "-n", "generated", "--image=nginx", check=False)
    assert refused.returncode != 0 and "send JSON" in refused.stderr


def test_both_event_apis_share_one_storage(cluster, namespace):
    cluster.ok("POST", f"/apis/events.k8s.io/v1/namespaces/{namespace}/events", {
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e1"},
        "eventTime": "2025-01-01T00:00:00.000000Z", "reportingController": "densemesh", "reportingInstance": "a",
        "action": "Reconcile", "reason": "Ready", "note": "all good", "type": "Normal",
        "regarding": {"kind": "Widget", "name": "w", "namespace": namespace}})
    core = cluster.ok("GET", f"/api/v1/namespaces/{namespace}/events/e1")
    assert (core["apiVersion"], core["message"], core["involvedObject"]["kind"]) == ("v1", "all good", "Widget")
    selected = cluster.ok("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.kind%3DWidget")
    assert [e["metadata"]["name"] for e in selected["items"]] == ["e1"]


@pytest.mark.parametrize("selector, labels, matches", [
    ("app=web", {"app": "web"}, True),
    ("app==web", {"app": "db"}, False),
    ("app!=web", {}, True),
    ("tier in (a, b),app", {"tier": "b", "app": "x"}, True),
    ("tier notin (a,b)", {"tier": "a"}, False),
    ("!canary", {"canary": ""}, False),
    ("example.com/role=x", {"example.com/role": "x"}, True),
])
def test_label_selectors(selector, labels, matches):
    assert parse_label_selector(selector)({"metadata": {"labels": labels}}) is matches


@pytest.mark.parametrize("path, expected", [
    (".status.url", ["u"]),
    ('.status.conditions[?(@.type=="Ready")].status', ["True"]),
    (".status.conditions[?(@.type!='Ready')].type", ["Loaded"]),
    (".status.conditions[*].type", ["Ready", "Loaded"]),
    (".status.conditions[1].status", ["False"]),
    ("{.spec['size']}", [3]),
    (".spec.missing", []),
])
def test_printer_column_jsonpath(path, expected):
    obj = {"spec": {"size": 3}, "status": {"url": "u", "conditions": [
        {"type": "Ready", "status": "True"}, {"type": "Loaded", "status": "False"}]}}
    assert eval_jsonpath(compile_jsonpath(path), obj) == expected


@pytest.mark.parametrize("seconds, shown", [
    (-5, "<invalid>"), (0, "0s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (3 * 3600 + 60, "3h1m"),
    (10 * 3600, "10h"), (50 * 3600, "2d2h"), (30 * 86400, "30d"), (800 * 86400, "2y70d"),
])
def test_ages_print_like_kubectl(seconds, shown):
    assert human_duration(seconds) == shown
