use super::*;
use crate::spec::api_spec as spec;
use crate::store::{MemoryStore, Store};

#[tokio::test]
async fn the_view_follows_registrations_and_reads_its_writes() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let registry = Registry::new(store.clone(), "dm");
    let before = ModelId::new("before").unwrap();
    registry.register(&before, &spec("/b")).await.unwrap();
    let view = ClusterView::start(registry.clone()).await.unwrap();
    assert_eq!(view.model(&before).unwrap().path, "/b");
    let mut changes = view.subscribe();

    let after = ModelId::new("after").unwrap();
    let r = registry.register(&after, &spec("/a")).await.unwrap().revision;
    view.caught_up(r).await;
    assert_eq!(view.model(&after).unwrap().path, "/a");
    assert_eq!(changes.recv().await.unwrap(), ViewChange::Model(after.clone()));

    registry.unregister(&before).await.unwrap();
    assert_eq!(changes.recv().await.unwrap(), ViewChange::ModelRemoved(before.clone()));
    assert!(view.model(&before).is_none());
    // Records outside the mirrored kinds, or unreadable ones, are skipped, not fatal.
    store.put("/dm/models/bad", b"not json".to_vec(), None).await.unwrap();
    store.put("/dm/leaderboard", b"pod-x".to_vec(), None).await.unwrap();
    store.put("/dm/leader/x", b"pod-x".to_vec(), None).await.unwrap();
    let r = store.put("/dm/placements/x/y", b"{}".to_vec(), None).await.unwrap();
    view.caught_up(r).await;
    assert_eq!(view.models().len(), 1);
    assert_eq!(view.leader(), None, "only the leader key itself names the leader");
}

#[tokio::test]
async fn a_spec_change_that_reloads_is_told_apart_from_one_that_places() {
    let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
    let view = ClusterView::start(registry.clone()).await.unwrap();
    let mut changes = view.subscribe();
    let m = ModelId::new("m").unwrap();
    let r = registry.register(&m, &spec("/m")).await.unwrap().revision;
    assert_eq!(changes.recv().await.unwrap(), ViewChange::Model(m.clone()), "registered");

    let hinted = ModelSpec { min_copies: Some(2), size_bytes: Some(10), ..spec("/m") };
    assert!(registry.replace(&m, &hinted, r).await.unwrap());
    assert_eq!(changes.recv().await.unwrap(), ViewChange::Model(m.clone()), "placement hints only");

    let (_, r) = registry.model(&m).await.unwrap().unwrap();
    let new_files = ModelSpec { generation: 7, ..hinted.clone() };
    assert!(registry.replace(&m, &new_files, r).await.unwrap());
    assert_eq!(changes.recv().await.unwrap(), ViewChange::ModelReplaced(m.clone()), "new files");

    let (_, r) = registry.model(&m).await.unwrap().unwrap();
    let on_gpu = ModelSpec { gpu: Some(crate::gpu::Gpu::Preferred), ..new_files.clone() };
    assert!(registry.replace(&m, &on_gpu, r).await.unwrap());
    assert_eq!(changes.recv().await.unwrap(), ViewChange::ModelReplaced(m.clone()), "a new GPU ask");

    let (_, r) = registry.model(&m).await.unwrap().unwrap();
    assert!(registry.replace(&m, &ModelSpec { path: "/elsewhere".into(), ..new_files }, r).await.unwrap());
    assert_eq!(changes.recv().await.unwrap(), ViewChange::ModelReplaced(m.clone()), "another path");

    assert_eq!(view.model_ids_where(|_, s| s.path == "/elsewhere"), vec![m.clone()]);
    assert_eq!(view.model_ids_where(|_, s| s.path == "/m"), Vec::<ModelId>::new());
}

#[tokio::test]
async fn the_view_mirrors_graphs_shared_not_copied() {
    let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
    let view = ClusterView::start(registry.clone()).await.unwrap();
    let g = ModelId::new("g").unwrap();
    let spec: GraphSpec =
        serde_json::from_str(r#"{"nodes":{"root":{"routerType":"Sequence","steps":[{"serviceName":"m"}]}}}"#)
            .unwrap();
    let written = registry.put_graph(&g, &spec, 0).await.unwrap().unwrap();
    view.caught_up(written).await;
    assert!(view.has_graph(&g));
    let (one, two) = (view.graph(&g).unwrap(), view.graph(&g).unwrap());
    assert!(Arc::ptr_eq(&one, &two), "every request shares the mirror's copy");
    assert_eq!(*one, spec);
    assert_eq!(view.graphs().len(), 1);
    assert!(view.model(&g).is_none() && view.vmodel(&g).is_none(), "graphs have their own id space");
    assert!(registry.delete_graph(&g, written).await.unwrap());
    let after = registry.store().put("/dm/other", Vec::new(), None).await.unwrap();
    view.caught_up(after).await;
    assert!(!view.has_graph(&g));
}

#[cfg(feature = "etcd")]
mod after_compaction {
    use std::time::Duration;

    use async_trait::async_trait;
    use futures::stream::{self, BoxStream};

    use super::*;
    use crate::election::campaign;
    use crate::store::etcd::harness::EtcdServer;
    use crate::store::{EtcdStore, LeaseId, RangeResult, Txn, TxnResult};

    /// etcd behind a link whose watches can be cut: a cut ends every open watch with `Unavailable`, and
    /// watches opened during it wait for the link to heal, as a client reconnecting would.
    #[derive(Clone)]
    struct CuttableWatches {
        etcd: EtcdStore,
        cut: Arc<watch::Sender<bool>>,
    }

    #[async_trait]
    impl Store for CuttableWatches {
        async fn range(&self, prefix: &str) -> crate::store::Result<RangeResult> {
            self.etcd.range(prefix).await
        }

        async fn txn(&self, txn: Txn) -> crate::store::Result<TxnResult> {
            self.etcd.txn(txn).await
        }

        async fn grant_lease(&self, ttl: Duration) -> crate::store::Result<LeaseId> {
            self.etcd.grant_lease(ttl).await
        }

        async fn keep_alive(&self, lease: LeaseId) -> crate::store::Result<()> {
            self.etcd.keep_alive(lease).await
        }

        async fn revoke_lease(&self, lease: LeaseId) -> crate::store::Result<()> {
            self.etcd.revoke_lease(lease).await
        }

        fn watch(
            &self,
            prefix: &str,
            after: Revision,
        ) -> BoxStream<'static, crate::store::Result<WatchEvent>> {
            let (etcd, prefix, mut cut) = (self.etcd.clone(), prefix.to_owned(), self.cut.subscribe());
            stream::once(async move {
                let _ = cut.wait_for(|cut| !cut).await;
                let events = etcd.watch(&prefix, after);
                stream::unfold(Some((events, cut)), |state| async move {
                    let (mut events, mut cut) = state?;
                    let next = tokio::select! {
                        // The cut first: nothing written after it may arrive through this watch.
                        biased;
                        _ = cut.wait_for(|cut| *cut) => None,
                        event = events.next() => Some(event),
                    };
                    match next {
                        None => Some((Err(StoreError::Unavailable("link to etcd cut".into())), None)),
                        Some(event) => event.map(|event| (event, Some((events, cut)))),
                    }
                })
            })
            .flatten()
            .boxed()
        }
    }

    /// A pod's instance record, as JSON (the fields every version writes).
    fn record(endpoint: &str) -> Vec<u8> {
        let json = serde_json::json!({
            "endpoint": endpoint, "capacity_bytes": 1, "used_bytes": 0, "models_loaded": 0, "loading": 0,
            "lru_age_seconds": 0, "started_ms": 0,
        });
        serde_json::to_vec(&json).unwrap_or_default()
    }

    /// While the view's watch is cut, the registry changes and etcd compacts past the view's revision:
    /// resuming the watch is refused, so the view lists again, converges on etcd's contents and
    /// announces what changed, removals included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_view_lists_again_after_a_compaction_and_converges() {
        let server = EtcdServer::start().await;
        let etcd = server.store().await;
        let cut = Arc::new(watch::channel(false).0);
        let store: Arc<dyn Store> = Arc::new(CuttableWatches { etcd: etcd.clone(), cut: cut.clone() });
        let registry = Registry::new(store.clone(), "dm");
        let (a, b, c) = (ModelId::new("a").unwrap(), ModelId::new("b").unwrap(), ModelId::new("c").unwrap());
        registry.register(&a, &spec("/a")).await.unwrap();
        registry.register(&b, &spec("/b")).await.unwrap();
        let pod1 = store.grant_lease(Duration::from_secs(600)).await.unwrap();
        let copy = crate::registry::encode(&Placement::Loading { since_ms: 1 });
        store.put(&registry.placement_key(&a, "pod-1"), copy, Some(pod1)).await.unwrap();
        store.put(&registry.instance_key("pod-1"), record("pod-1:8033"), Some(pod1)).await.unwrap();
        assert!(campaign(&registry, "pod-1", pod1).await.unwrap());
        let seen = store.range(registry.prefix()).await.unwrap().revision;
        let view = ClusterView::start(registry.clone()).await.unwrap();
        assert_eq!((view.model_count(), view.leader().as_deref()), (2, Some("pod-1")));
        assert_eq!((view.placements(&a).len(), view.instances().len()), (1, 1));
        let mut changes = view.subscribe();

        cut.send_replace(true);
        // pod-1 dies (its instance, copy and leadership go with its lease), pod-2 takes over, and the
        // models change; then etcd compacts everything the view has not seen.
        store.revoke_lease(pod1).await.unwrap();
        let pod2 = store.grant_lease(Duration::from_secs(600)).await.unwrap();
        assert!(campaign(&registry, "pod-2", pod2).await.unwrap());
        registry.unregister(&a).await.unwrap();
        let mut changed_b = spec("/b");
        changed_b.auto_delete = true;
        let (_, b_revision) = registry.model(&b).await.unwrap().unwrap();
        assert!(registry.replace(&b, &changed_b, b_revision).await.unwrap());
        let last = registry.register(&c, &spec("/c")).await.unwrap().revision;
        etcd.compact(last).await.unwrap();
        assert!(
            matches!(etcd.watch("/dm/", seen).next().await, Some(Err(StoreError::Compacted { .. }))),
            "the view's revision is compacted away"
        );
        cut.send_replace(false);

        tokio::time::timeout(Duration::from_secs(30), view.caught_up(last))
            .await
            .expect("the view catches up");
        let models: Vec<_> =
            view.models().into_iter().map(|(id, spec)| (id.to_string(), spec.path)).collect();
        assert_eq!(models, [("b".to_owned(), "/b".to_owned()), ("c".to_owned(), "/c".to_owned())]);
        assert!(view.model(&b).unwrap().auto_delete);
        assert!(view.instances().is_empty());
        assert!(view.placements(&a).is_empty());
        assert_eq!(view.leader().as_deref(), Some("pod-2"));

        let mut announced = Vec::new();
        while let Ok(change) = changes.try_recv() {
            announced.push(change);
        }
        for expected in [
            ViewChange::ModelRemoved(a.clone()),
            ViewChange::Model(b.clone()),
            ViewChange::Model(c.clone()),
            ViewChange::InstanceRemoved("pod-1".into()),
            ViewChange::Placement(a.clone()),
            ViewChange::Leader(Some("pod-2".into())),
        ] {
            assert!(announced.contains(&expected), "{expected:?} not announced in {announced:?}");
        }
        store.revoke_lease(pod2).await.unwrap();
    }
}

/// A memory store whose watches deliver nothing while `held` is true (a pod whose watch lags), which
/// counts the range reads it answers and can make each take 100 ms (`slow`).
#[derive(Clone)]
struct LaggingWatches {
    store: crate::store::held::HeldWatches,
    held: Arc<watch::Sender<bool>>,
    ranges: Arc<std::sync::atomic::AtomicUsize>,
    slow: Arc<std::sync::atomic::AtomicBool>,
}

impl LaggingWatches {
    fn new() -> Self {
        let store = crate::store::held::HeldWatches::new(Arc::new(MemoryStore::new()));
        let held = store.held();
        Self { store, held, ranges: Arc::default(), slow: Arc::default() }
    }
}

#[async_trait::async_trait]
impl Store for LaggingWatches {
    async fn range(&self, prefix: &str) -> crate::store::Result<crate::store::RangeResult> {
        self.ranges.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.slow.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.store.range(prefix).await
    }

    async fn txn(&self, txn: crate::store::Txn) -> crate::store::Result<crate::store::TxnResult> {
        self.store.txn(txn).await
    }

    async fn grant_lease(&self, ttl: Duration) -> crate::store::Result<crate::store::LeaseId> {
        self.store.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: crate::store::LeaseId) -> crate::store::Result<()> {
        self.store.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: crate::store::LeaseId) -> crate::store::Result<()> {
        self.store.revoke_lease(lease).await
    }

    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> futures::stream::BoxStream<'static, crate::store::Result<WatchEvent>> {
        self.store.watch(prefix, after)
    }
}

#[tokio::test]
async fn a_strong_read_finds_a_registration_the_watch_has_not_brought_yet() {
    let store = LaggingWatches::new();
    let registry = Registry::new(Arc::new(store.clone()), "dm");
    let view = ClusterView::start(registry.clone()).await.unwrap();
    // Registered through another pod while this pod's watch lags behind.
    store.held.send_replace(true);
    let late = ModelId::new("late").unwrap();
    registry.register(&late, &spec("/late")).await.unwrap();
    tokio::task::yield_now().await;
    assert!(view.model(&late).is_none(), "the watch has not brought it");

    // A watch that stays behind past the limit: the strong read gives up, and says so.
    assert!(!view.catch_up_with_store(Duration::from_millis(100)).await);
    assert!(view.model(&late).is_none());

    // A watch a moment behind: the strong read waits for it to reach the store's present.
    let held = store.held.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        held.send_replace(false);
    });
    assert!(view.catch_up_with_store(Duration::from_secs(5)).await);
    assert_eq!(view.model(&late).unwrap().path, "/late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_strong_reads_share_a_read_of_the_store() {
    let store = LaggingWatches::new();
    let view = ClusterView::start(Registry::new(Arc::new(store.clone()), "dm")).await.unwrap();
    store.slow.store(true, std::sync::atomic::Ordering::Relaxed);
    let before = store.ranges.load(std::sync::atomic::Ordering::Relaxed);
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let view = view.clone();
            tokio::spawn(async move { view.catch_up_with_store(Duration::from_secs(5)).await })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap(), "nothing lags: every call catches up");
    }
    let reads = store.ranges.load(std::sync::atomic::Ordering::Relaxed) - before;
    // Each read serves every call that arrived before it started: the first read, then one for all
    // that arrived during its 100 ms.
    assert!((1..=3).contains(&reads), "{reads} reads for 64 concurrent calls");
}

/// docs/faults.md, `etcd.watch`: the connection under the view's watch breaks as a change arrives (the
/// change is lost with it). The view watches again from the last revision it applied, so it still
/// gets that change, and applies it once.
#[cfg(all(feature = "etcd", feature = "failpoints"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_broken_as_a_change_arrives_loses_nothing() {
    use crate::store::etcd::harness::EtcdServer;

    let scenario = fail::FailScenario::setup();
    let etcd = EtcdServer::start().await;
    let store: Arc<dyn Store> = Arc::new(etcd.store().await);
    let registry = Registry::new(store, "dm");
    let view = ClusterView::start(registry.clone()).await.unwrap();
    let mut changes = view.subscribe();
    fail::cfg("etcd.watch", "1*return").unwrap();
    let lost = ModelId::new("lost-with-the-connection").unwrap();
    let revision = registry.register(&lost, &spec("/l")).await.unwrap().revision;
    tokio::time::timeout(std::time::Duration::from_secs(10), view.caught_up(revision))
        .await
        .expect("the view watches again and catches up");
    assert_eq!(view.model(&lost).unwrap().path, "/l");
    assert_eq!(changes.recv().await.unwrap(), ViewChange::Model(lost.clone()));
    let next = ModelId::new("after").unwrap();
    let revision = registry.register(&next, &spec("/n")).await.unwrap().revision;
    view.caught_up(revision).await;
    assert_eq!(changes.recv().await.unwrap(), ViewChange::Model(next), "the lost change came once");
    scenario.teardown();
}
