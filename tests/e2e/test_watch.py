"""Admin.WatchVModels against a real meshd, read the way the Kubernetes controller reads it: every
vmodel once, SYNCED, then each change of status as loads progress, fail and vmodels go; on the embedded
store and on etcd."""
import queue
import sys
import threading

import grpc
import pytest

from meshd import EXAMPLES, REPO
from test_etcd import Etcd, mm

sys.path.insert(0, str(REPO / "examples"))
from generate_models import make_dense_model  # noqa: E402


class Watch:
    """One WatchVModels stream, read on a thread into a queue; `seen` keeps every event in order."""

    def __init__(self, server, admin_api, owner=""):
        pb2, pb2_grpc = admin_api
        self.pb2 = pb2
        self.call = pb2_grpc.AdminStub(server.channel).WatchVModels(pb2.WatchVModelsRequest(owner=owner))
        self.events = queue.Queue()
        self.seen = []
        self.ended = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as e:
            self.ended = e
        self.events.put(None)

    def kind(self, event):
        return self.pb2.VModelEvent.Kind.Name(event.kind)

    def next(self, timeout=30):
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no watch event within {timeout}s; seen so far: {self.seen}") from None
        assert event is not None, f"the watch ended ({self.ended}); seen: {self.seen}"
        self.seen.append(event)
        return event

    def until(self, predicate, timeout, what):
        """Reads events until one satisfies `predicate`; returns it."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; seen: {self.seen}")
            event = self.next(timeout=left)
            if predicate(event):
                return event

    def first_round(self):
        """The UPSERTs of the first round, by vmodel id, once SYNCED arrives."""
        upserts = {}
        while True:
            event = self.next()
            if self.kind(event) == "SYNCED":
                return upserts
            assert self.kind(event) == "UPSERT", event
            upserts[event.vmodel.vmodel_id] = event.vmodel

    def close(self):
        self.call.cancel()


def model(vmodel, model_id):
    return next(m for m in vmodel.models if m.model_id == model_id)


def state(admin_api, m):
    return admin_api[0].ModelState.State.Name(m.state)


@pytest.fixture(params=["embedded", "etcd"])
def store_args(request):
    if request.param == "embedded":
        yield []
        return
    etcd = Etcd()
    try:
        yield ["--etcd", etcd.endpoint]
    finally:
        etcd.stop()
        etcd.dir.cleanup()


def test_a_vmodel_transition_as_the_controller_sees_it(start_meshd, store_args, mmesh, admin_api, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    # Large enough that its load outlasts the watch's coalescing window, so LOADING is seen.
    make_dense_model(tmp_path / "churn-v2" / "model.onnx", 96, seed=1)
    server = start_meshd(repo, "--instance-id", "pod-w", *store_args)
    pb2, stub = mm(server, mmesh)
    iris = pb2.ModelInfo(type="onnx", path=str(EXAMPLES / "iris-logreg"))
    stub.setVModel(pb2.SetVModelRequest(vModelId="churn", targetModelId="churn-v1", owner="isvc", modelInfo=iris,
                                        loadNow=True, sync=True))
    stub.setVModel(pb2.SetVModelRequest(vModelId="other", targetModelId="other-m", owner="ksp", modelInfo=iris))

    watch = Watch(server, admin_api, owner="isvc")
    first = watch.first_round()
    assert set(first) == {"churn"}, "the owner filter keeps out ksp's vmodel"
    churn = first["churn"]
    assert (churn.owner, churn.active_model_id, churn.target_model_id) == ("isvc", "churn-v1", "churn-v1")
    v1 = model(churn, "churn-v1")
    assert (state(admin_api, v1), v1.total_copies, v1.failed_copies) == ("LOADED", 1, 0)
    assert v1.size_bytes > 0

    # A new target, registered by setVModel and loaded before the switch.
    v2_info = pb2.ModelInfo(type="onnx", path=str(tmp_path / "churn-v2"))
    stub.setVModel(pb2.SetVModelRequest(vModelId="churn", targetModelId="churn-v2", owner="isvc", modelInfo=v2_info,
                                        autoDeleteTargetModel=True, loadNow=True))
    switched = watch.until(lambda e: e.vmodel.active_model_id == "churn-v2", 120, "churn to switch to churn-v2")
    v2_states = [state(admin_api, model(e.vmodel, "churn-v2")) for e in watch.seen
                 if watch.kind(e) == "UPSERT" and any(m.model_id == "churn-v2" for m in e.vmodel.models)]
    assert "LOADING" in v2_states and v2_states.index("LOADING") < v2_states.index("LOADED"), v2_states
    assert state(admin_api, model(switched.vmodel, "churn-v2")) == "LOADED"

    # A target that cannot load: FAILED_TO_LOAD with the reason, the active model still serving.
    missing = tmp_path / "nowhere" / "churn-v3.onnx"
    stub.setVModel(pb2.SetVModelRequest(vModelId="churn", targetModelId="churn-v3", owner="isvc",
                                        modelInfo=pb2.ModelInfo(type="onnx", path=str(missing)),
                                        autoDeleteTargetModel=True, loadNow=True))
    failed = watch.until(lambda e: any(m.model_id == "churn-v3" and state(admin_api, m) == "FAILED_TO_LOAD"
                                       for m in e.vmodel.models), 60, "churn-v3 to fail")
    v3 = model(failed.vmodel, "churn-v3")
    assert str(missing) in v3.last_failure_message, v3.last_failure_message
    assert (v3.last_failure_instance, v3.failed_copies, v3.total_copies) == ("pod-w", 1, 0)
    assert v3.last_failure_ms > 0
    assert failed.vmodel.active_model_id == "churn-v2"
    assert state(admin_api, model(failed.vmodel, "churn-v2")) == "LOADED"
    watch.until(lambda e: e.vmodel.transition_error, 60, "the transition error on the vmodel")

    stub.deleteVModel(pb2.DeleteVModelRequest(vModelId="churn", owner="isvc"))
    gone = watch.until(lambda e: watch.kind(e) == "DELETED", 30, "churn's deletion")
    assert (gone.vmodel.vmodel_id, gone.vmodel.owner) == ("churn", "isvc")

    # Never the same status twice in a row, never another owner's vmodel.
    upserts = [e.vmodel for e in watch.seen if watch.kind(e) == "UPSERT"]
    assert all(a != b for a, b in zip(upserts, upserts[1:])), "a status was sent twice in a row"
    assert all(e.vmodel.vmodel_id != "other" for e in watch.seen)
    watch.close()

    everything = Watch(server, admin_api)
    assert set(everything.first_round()) == {"other"}
    everything.close()


def test_a_watch_ends_when_meshd_stops(start_meshd, admin_api, tmp_path):
    server = start_meshd(tmp_path, "--shutdown-grace", "20s")
    watch = Watch(server, admin_api)
    assert watch.first_round() == {}
    # An open watch must not hold up the shutdown for the whole grace period.
    assert server.terminate(timeout=15) == 0
    assert watch.events.get(timeout=10) is None
