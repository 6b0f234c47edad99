//! Election and failover on a real `MemoryStore` registry: two pods, each with its own view, cache and
//! placer; the chores follow the leadership.

use std::sync::Arc;

use densemesh_placement::{MemoryStore, ModelId, Store};
use futures::FutureExt;

use super::*;
use crate::cluster::peers::Peers;
use crate::cluster::placer::PlacerConfig;
use crate::error::CacheError;
use crate::node::cache::{CacheConfig, Locate, ModelCache};
use crate::test_support::NoRuntime;

struct Pod {
    view: ClusterView,
    lease: LeaseId,
    /// Shares the lease, as the instance publisher does; dropping it ends the election loop.
    _leases: watch::Sender<Option<LeaseId>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn pod(registry: &Registry, name: &str, repo: &std::path::Path) -> Pod {
    let view = ClusterView::start(registry.clone()).await.unwrap();
    let locate: Locate = Arc::new(|id: ModelId| {
        async move { Err(CacheError::NotFound(format!("model {id} not found").into())) }.boxed()
    });
    let cache = ModelCache::new(CacheConfig::default(), Arc::new(NoRuntime), locate);
    let config = PlacerConfig {
        anti_churn_age: Duration::ZERO,
        wait_limit: Duration::from_secs(5),
        model_repo: repo.to_owned(),
        model_types: densemesh_placement::spec::legacy_model_types(),
        admin_token: None,
    };
    let placer =
        Placer::new(name.into(), view.clone(), cache, Peers::new(Duration::from_secs(5), 1 << 20), config);
    let lease = registry.store().grant_lease(Duration::from_secs(60)).await.unwrap();
    let (shared, leases) = watch::channel(Some(lease));
    let stop = CancellationToken::new();
    let synced = Arc::new(watch::channel(false).0);
    let chores = Chores { registry: registry.clone(), placer, model_repo: repo.to_owned(), synced };
    let task = tokio::spawn(run(chores, leases, stop.clone()));
    Pod { view, lease, _leases: shared, stop, task }
}

/// Waits until `done` holds, re-checking on every change of `view`: a notification, not a poll.
async fn until(view: &ClusterView, what: &str, done: impl Fn() -> bool) {
    let mut changes = view.subscribe();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            let _ = changes.recv().await;
        }
    });
    waited.await.unwrap_or_else(|_| panic!("{what} within 10 s"));
}

#[tokio::test]
async fn one_pod_leads_and_another_takes_over_the_chores_when_its_lease_ends() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let registry = Registry::new(store.clone(), "t");
    let repo = tempfile::tempdir().unwrap();
    let a = pod(&registry, "a", repo.path()).await;
    let b = pod(&registry, "b", repo.path()).await;
    until(&a.view, "a leader", || a.view.leader().is_some()).await;
    let first = a.view.leader().unwrap();
    until(&b.view, "b sees the same leader", || b.view.leader().as_deref() == Some(first.as_str())).await;

    // The leader dies: its lease ends, the key vanishes with it, the other pod wins.
    let (dead, survivor) = if first == "a" { (a, b) } else { (b, a) };
    store.revoke_lease(dead.lease).await.unwrap();
    let other = if first == "a" { "b" } else { "a" };
    until(&survivor.view, "the other pod leading", || survivor.view.leader().as_deref() == Some(other)).await;

    // Its chores run: a model directory added to the shared repository gets registered.
    let dir = repo.path().join("added");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), b"not really onnx; registration does not open it").unwrap();
    let added = ModelId::new("added").unwrap();
    until(&survivor.view, "the new leader registering the added model", || {
        survivor.view.model(&added).is_some()
    })
    .await;

    // A leader that stops resigns: the key is free at once, not after its lease.
    survivor.stop.cancel();
    survivor.task.await.unwrap();
    assert_eq!(election::leader(&registry).await.unwrap(), None);
    dead.stop.cancel();
    dead.task.await.unwrap();
}

#[test]
fn failed_records_are_stale_once_long_past_their_back_off_or_when_their_model_is_gone() {
    let failed = |retry_after_ms| Placement::Failed { since_ms: 0, reason: "bad".into(), retry_after_ms };
    let after = PRUNE_FAILED_AFTER.as_millis() as u64;
    let now = 10 * after;
    assert!(!stale_failure(&failed(now), true, now), "backing off");
    assert!(!stale_failure(&failed(now - after), true, now), "just over");
    assert!(stale_failure(&failed(now - after - 1), true, now), "long over");
    assert!(stale_failure(&failed(now + after), false, now), "model unregistered");
    assert!(!stale_failure(
        &Placement::Loaded { since_ms: 0, size_bytes: 1, runtime: String::new() },
        false,
        now
    ));
    assert!(!stale_failure(&Placement::Loading { since_ms: 0 }, false, now));
}
