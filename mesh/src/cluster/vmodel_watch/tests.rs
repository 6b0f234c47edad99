//! The watch against a real cluster view on the in-memory store, on paused time: records are written
//! as pods and registration write them, and the events are read as a client reads them.

use std::sync::Arc;

use densemesh_placement::registry::{Registry, encode};
use densemesh_placement::status::LoadState;
use densemesh_placement::{InstanceRecord, MemoryStore, ModelSpec, Placement, Store};

use super::*;
use crate::test_support::instance_record;

struct Mesh {
    registry: Registry,
    view: ClusterView,
}

impl Mesh {
    async fn new() -> Self {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let registry = Registry::new(store, "t");
        let view = ClusterView::start(registry.clone()).await.unwrap();
        Self { registry, view }
    }

    fn watch(&self, owner: &str) -> VModelWatch {
        VModelWatch::new(self.view.clone(), owner.into(), CancellationToken::new())
    }

    /// Writes a record and waits until the view reflects it.
    async fn put(&self, key: String, value: Vec<u8>) {
        let revision = self.registry.store().put(&key, value, None).await.unwrap();
        self.view.caught_up(revision).await;
    }

    async fn pod(&self, instance: &str, types: &[&str]) {
        let record = InstanceRecord {
            model_types: types.iter().map(|t| (*t).to_owned()).collect(),
            peer_wire: 0,
            ..instance_record("127.0.0.1:1")
        };
        self.put(self.registry.instance_key(instance), encode(&record)).await;
    }

    async fn register(&self, model: &str) {
        let spec = ModelSpec::api("onnx", format!("/models/{model}"));
        let registered = self.registry.register(&id(model), &spec).await.unwrap();
        self.view.caught_up(registered.revision).await;
    }

    async fn vmodel(&self, vmodel: &str, active: &str, target: &str, owner: &str) {
        let spec = VModelSpec {
            active: active.into(),
            target: target.into(),
            owner: owner.into(),
            transition_error: None,
            split: vec![],
        };
        self.put(format!("{}{vmodel}", self.registry.vmodels_prefix()), encode(&spec)).await;
    }

    async fn delete_vmodel(&self, vmodel: &str) {
        let key = format!("{}{vmodel}", self.registry.vmodels_prefix());
        let revision = self.registry.store().delete(&key).await.unwrap();
        self.view.caught_up(revision).await;
    }

    async fn place(&self, model: &str, instance: &str, placement: Placement) {
        self.put(self.registry.placement_key(&id(model), instance), encode(&placement)).await;
    }
}

fn id(s: &str) -> ModelId {
    ModelId::new(s).unwrap()
}

/// The next event, which must come.
async fn next(watch: &mut VModelWatch) -> StatusEvent {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event within 10 s")
        .expect("the watch goes on")
}

/// The next upsert's vmodel id and each of its models' state.
async fn next_upsert(watch: &mut VModelWatch) -> (String, Vec<(String, LoadState)>) {
    match next(watch).await {
        StatusEvent::Upsert(s) => {
            (s.vmodel_id.to_string(), s.models.into_iter().map(|m| (m.model_id, m.state)).collect())
        }
        other => panic!("expected an upsert, got {other:?}"),
    }
}

/// Nothing is sent for a while (paused time: the wait costs nothing).
async fn quiet(watch: &mut VModelWatch) {
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
    assert!(event.is_err(), "expected nothing, got {event:?}");
}

fn states(models: &[(&str, LoadState)]) -> Vec<(String, LoadState)> {
    models.iter().map(|(m, s)| ((*m).to_owned(), *s)).collect()
}

#[tokio::test(start_paused = true)]
async fn a_first_round_then_synced_then_each_change_once() {
    let mesh = Mesh::new().await;
    mesh.pod("a", &["onnx"]).await;
    for m in ["m1", "m2", "other"] {
        mesh.register(m).await;
    }
    mesh.vmodel("v", "m1", "m1", "isvc").await;
    mesh.vmodel("w", "other", "other", "ksp").await;
    let mut watch = mesh.watch("isvc");
    assert_eq!(next_upsert(&mut watch).await, ("v".into(), states(&[("m1", LoadState::Standby)])));
    assert_eq!(next(&mut watch).await, StatusEvent::Synced);

    mesh.place("m1", "a", Placement::Loading { since_ms: 1 }).await;
    assert_eq!(next_upsert(&mut watch).await.1, states(&[("m1", LoadState::Loading)]));
    mesh.place("m1", "a", Placement::Loaded { since_ms: 2, size_bytes: 77, runtime: String::new() }).await;
    match next(&mut watch).await {
        StatusEvent::Upsert(s) => {
            let m1 = &s.models[0];
            assert_eq!((m1.state, m1.total_copies, m1.size_bytes), (LoadState::Loaded, 1, 77));
        }
        other => panic!("{other:?}"),
    }
    // A model no watched vmodel refers to, a status that did not change (a pod republishing its
    // copy), a vmodel of another owner: nothing to send.
    mesh.place("m2", "a", Placement::Loading { since_ms: 3 }).await;
    mesh.place("m1", "a", Placement::Loaded { since_ms: 4, size_bytes: 77, runtime: String::new() }).await;
    mesh.vmodel("w", "other", "m2", "ksp").await;
    quiet(&mut watch).await;

    // The target moves to m2: m2's copies now reach v.
    mesh.vmodel("v", "m1", "m2", "isvc").await;
    assert_eq!(
        next_upsert(&mut watch).await.1,
        states(&[("m1", LoadState::Loaded), ("m2", LoadState::Loading)])
    );
    mesh.place(
        "m2",
        "a",
        Placement::Failed { since_ms: 5, reason: "no such file".into(), retry_after_ms: 9 },
    )
    .await;
    match next(&mut watch).await {
        StatusEvent::Upsert(s) => {
            let m2 = &s.models[1];
            assert_eq!((m2.state, m2.failed_copies), (LoadState::FailedToLoad, 1));
            let failure = m2.last_failure.as_ref().unwrap();
            assert_eq!(
                (failure.message.as_str(), failure.instance.as_str(), failure.at_ms),
                ("no such file", "a", 5)
            );
        }
        other => panic!("{other:?}"),
    }
    mesh.delete_vmodel("v").await;
    assert_eq!(next(&mut watch).await, StatusEvent::Deleted { vmodel_id: id("v"), owner: "isvc".into() });
    // Once gone, its models' changes reach no one.
    mesh.place("m1", "a", Placement::Loading { since_ms: 6 }).await;
    quiet(&mut watch).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_sent_as_one_status() {
    let mesh = Mesh::new().await;
    mesh.pod("a", &["onnx"]).await;
    mesh.register("m").await;
    mesh.vmodel("v", "m", "m", "").await;
    let mut watch = mesh.watch("");
    next_upsert(&mut watch).await;
    assert_eq!(next(&mut watch).await, StatusEvent::Synced);
    // Loading then loaded on two pods, before the watch looks: one status, the last.
    for pod in ["a", "b"] {
        mesh.place("m", pod, Placement::Loading { since_ms: 1 }).await;
        mesh.place("m", pod, Placement::Loaded { since_ms: 2, size_bytes: 5, runtime: String::new() }).await;
    }
    match next(&mut watch).await {
        StatusEvent::Upsert(s) => {
            assert_eq!((s.models[0].state, s.models[0].total_copies), (LoadState::Loaded, 2))
        }
        other => panic!("{other:?}"),
    }
    quiet(&mut watch).await;
}

#[tokio::test(start_paused = true)]
async fn a_watch_that_falls_behind_sends_only_what_differs() {
    let mesh = Mesh::new().await;
    mesh.pod("a", &["onnx"]).await;
    for m in ["m", "n", "busy"] {
        mesh.register(m).await;
    }
    mesh.vmodel("v", "m", "m", "").await;
    mesh.vmodel("u", "n", "n", "").await;
    let mut watch = mesh.watch("");
    next_upsert(&mut watch).await;
    next_upsert(&mut watch).await;
    assert_eq!(next(&mut watch).await, StatusEvent::Synced);
    // More changes than the view's notification buffer holds, while the watch does not read.
    for i in 0..5_000 {
        mesh.place("busy", &format!("pod-{i}"), Placement::Loading { since_ms: i }).await;
    }
    mesh.place("m", "a", Placement::Loading { since_ms: 1 }).await;
    assert_eq!(next_upsert(&mut watch).await, ("v".into(), states(&[("m", LoadState::Loading)])));
    quiet(&mut watch).await;
}

#[tokio::test(start_paused = true)]
async fn owners_and_offered_types_move_a_vmodel_in_and_out() {
    let mesh = Mesh::new().await;
    mesh.register("m").await;
    mesh.vmodel("v", "m", "m", "isvc").await;
    let mut watch = mesh.watch("isvc");
    // No pod offers onnx yet: the model waits for one.
    assert_eq!(next_upsert(&mut watch).await.1, states(&[("m", LoadState::Pending)]));
    assert_eq!(next(&mut watch).await, StatusEvent::Synced);
    mesh.pod("b", &[]).await;
    quiet(&mut watch).await;
    mesh.pod("a", &["onnx"]).await;
    assert_eq!(next_upsert(&mut watch).await.1, states(&[("m", LoadState::Standby)]));
    // Another owner takes the vmodel: gone from this watch; and back.
    mesh.vmodel("v", "m", "m", "ksp").await;
    assert_eq!(next(&mut watch).await, StatusEvent::Deleted { vmodel_id: id("v"), owner: "isvc".into() });
    mesh.vmodel("v", "m", "m", "isvc").await;
    assert_eq!(next_upsert(&mut watch).await.0, "v");
    // An unregistered model is pending.
    mesh.registry.unregister(&id("m")).await.unwrap();
    assert_eq!(next_upsert(&mut watch).await.1, states(&[("m", LoadState::Pending)]));
}

#[tokio::test(start_paused = true)]
async fn the_watch_ends_when_stopped() {
    let mesh = Mesh::new().await;
    let stop = CancellationToken::new();
    let mut watch = VModelWatch::new(mesh.view.clone(), String::new(), stop.clone());
    assert_eq!(next(&mut watch).await, StatusEvent::Synced, "an empty mesh syncs at once");
    let waiting = tokio::spawn(async move { watch.next().await });
    stop.cancel();
    assert_eq!(waiting.await.unwrap(), None);
}
