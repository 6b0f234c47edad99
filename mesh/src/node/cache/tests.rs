//! Cache behaviour against a small, real `Runtime` whose model files say how to behave: `size=N`
//! (bytes the loaded model reports), `fail=REASON`, `gate` (the load waits until the test opens it).
//!
//! Timing runs on paused tokio time: sleeps and back-offs pass at once, in order. A runtime load blocked
//! on the gate runs on the blocking pool, which keeps paused time from advancing on its own, so a test
//! that needs a deadline to pass while a load is blocked moves the clock itself.

use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::ModelId;
use densemesh_puller::LocalRepository;
use densemesh_runtime_core::{
    Error, InferRequest, LoadRequest, LoadedModel, ModelMetadata, Result, Runtime, Tensor,
};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use super::*;

#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock();
        while !*open {
            self.opened.wait(&mut open);
        }
    }

    fn open(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }
}

struct ScriptedRuntime {
    /// Runtime loads begun so far, watched by tests that wait for a load to reach the runtime.
    loads: watch::Sender<usize>,
    gate: Gate,
    /// The thread each load ran on.
    load_threads: Mutex<Vec<std::thread::ThreadId>>,
    /// Times the cache asked for free memory to be given back.
    reclaims: std::sync::atomic::AtomicUsize,
}

impl Default for ScriptedRuntime {
    fn default() -> Self {
        Self {
            loads: watch::channel(0).0,
            gate: Gate::default(),
            load_threads: Mutex::default(),
            reclaims: Default::default(),
        }
    }
}

struct ScriptedModel {
    metadata: ModelMetadata,
    size: u64,
}

impl Runtime for ScriptedRuntime {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn reclaim_memory(&self) {
        self.reclaims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A model whose script has a `quick` line loads at once.
    fn try_load_quick(&self, request: &LoadRequest) -> Option<Result<Box<dyn LoadedModel>>> {
        let script = std::fs::read_to_string(&request.path).ok()?;
        script.lines().any(|line| line == "quick").then(|| self.load(request))
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        self.loads.send_modify(|n| *n += 1);
        self.load_threads.lock().push(std::thread::current().id());
        let script = std::fs::read_to_string(&request.path)
            .map_err(|source| Error::Io { path: request.path.clone(), source })?;
        let mut size = 0;
        for line in script.lines() {
            match line.split_once('=') {
                Some(("size", n)) => size = n.parse().expect("size"),
                Some(("fail", reason)) => {
                    return Err(Error::Load { model_id: request.model_id.clone(), source: reason.into() });
                }
                _ if line == "gate" => self.gate.wait(),
                _ => {}
            }
        }
        let metadata = ModelMetadata { platform: "scripted".into(), inputs: vec![], outputs: vec![] };
        Ok(Box::new(ScriptedModel { metadata, size }))
    }
}

impl LoadedModel for ScriptedModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn runtime(&self) -> &str {
        "scripted"
    }

    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>> {
        Ok(request.inputs)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    runtime: Arc<ScriptedRuntime>,
    cache: ModelCache,
}

fn fixture(capacity: u64, tweak: impl FnOnce(&mut CacheConfig)) -> Fixture {
    fixture_evicting(capacity, Policy::default(), tweak)
}

fn fixture_evicting(capacity: u64, policy: Policy, tweak: impl FnOnce(&mut CacheConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let runtime = Arc::new(ScriptedRuntime::default());
    let mut config = CacheConfig {
        capacity_bytes: capacity,
        max_concurrent_loads: 4,
        load_timeout: Duration::from_secs(10),
        retry_backoff: Duration::from_millis(300),
        max_retry_backoff: Duration::from_secs(5),
        min_residence: Duration::ZERO,
        // The scripted sizes are the charges these tests add up.
        copy_bookkeeping_bytes: 0,
        inline_load_max_bytes: 64 << 10,
    };
    tweak(&mut config);
    let cache = ModelCache::new(config, runtime.clone(), locate_in(LocalRepository::new(&root)))
        .with_eviction_policy(policy);
    Fixture { _dir: dir, root, runtime, cache }
}

/// A failing test still opens the gate, so no runtime load stays blocked and the test ends.
impl Drop for Fixture {
    fn drop(&mut self) {
        self.runtime.gate.open();
    }
}

impl Fixture {
    /// Writes a model whose file is tiny (so the size prediction is small) and whose loaded size is `size`.
    fn model(&self, id: &str, script: &str) -> ModelId {
        std::fs::create_dir_all(self.root.join(id)).unwrap();
        std::fs::write(self.root.join(id).join("model.onnx"), script).unwrap();
        ModelId::new(id).unwrap()
    }

    fn sized(&self, id: &str, size: u64) -> ModelId {
        self.model(id, &format!("size={size}"))
    }

    fn resident(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.cache.resident().into_iter().map(|m| m.id.to_string()).collect();
        ids.sort();
        ids
    }

    fn loads(&self) -> usize {
        *self.runtime.loads.borrow()
    }

    /// Waits until `n` loads have reached the runtime (and any gated one among them is blocked there).
    async fn loads_begun(&self, n: usize) {
        let mut loads = self.runtime.loads.subscribe();
        loads.wait_for(|begun| *begun >= n).await.expect("the runtime lives as long as the fixture");
    }

    /// Bytes set aside by loads in progress, including ones given up on whose runtime call still runs.
    fn reserved_bytes(&self) -> u64 {
        self.cache.inner.state.lock().reserved_bytes
    }

    /// Load slots (`max_concurrent_loads`) free now.
    fn free_load_slots(&self) -> usize {
        self.cache.inner.load_permits.available_permits()
    }
}

#[tokio::test(start_paused = true)]
async fn a_hit_needs_no_second_load() {
    let f = fixture(1000, |_| {});
    let a = f.sized("a", 100);
    drop(f.cache.acquire(&a).await.unwrap());
    drop(f.cache.acquire(&a).await.unwrap());
    assert_eq!(f.loads(), 1);
    assert_eq!(f.cache.used_bytes(), 100);
    assert!(f.cache.is_loaded(&a));
}

#[tokio::test(start_paused = true)]
async fn a_small_model_its_runtime_loads_at_once_loads_on_the_async_thread() {
    let f = fixture(1000, |_| {});
    let here = std::thread::current().id();
    let quick = f.model("quick", "quick\nsize=100");
    let slow = f.sized("slow", 100);
    drop(f.cache.acquire(&quick).await.unwrap());
    drop(f.cache.acquire(&slow).await.unwrap());
    let threads = f.runtime.load_threads.lock().clone();
    assert_eq!(threads[0], here, "a quick load skips the blocking pool");
    assert_ne!(threads[1], here, "any other load runs on the blocking pool");
    assert_eq!(f.cache.used_bytes(), 200, "both charged alike");

    // Nor does it wait for a task of its own: the request that asks has it within one poll.
    let other = f.model("other", "quick\nsize=100");
    let lease = f.cache.acquire(&other).now_or_never().expect("loaded within the asking poll");
    drop(lease.unwrap());

    // Above --inline-load-max-bytes even a quick load goes to the blocking pool.
    let f = fixture(1000, |c| c.inline_load_max_bytes = 4);
    let quick = f.model("quick", "quick\nsize=100");
    drop(f.cache.acquire(&quick).await.unwrap());
    assert_ne!(f.runtime.load_threads.lock()[0], here);
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_share_one_load() {
    let f = fixture(1000, |_| {});
    let a = f.model("a", "gate\nsize=100");
    let waiters: Vec<_> = (0..16)
        .map(|_| {
            let (cache, a) = (f.cache.clone(), a.clone());
            tokio::spawn(async move { cache.acquire(&a).await.map(|lease| lease.size_bytes()) })
        })
        .collect();
    // Every waiter is parked on the one gated load until the gate opens.
    f.loads_begun(1).await;
    f.runtime.gate.open();
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap(), 100);
    }
    assert_eq!(f.loads(), 1);
}

#[tokio::test(start_paused = true)]
async fn evicts_least_recently_used_first_and_only_enough() {
    let f = fixture(400, |_| {});
    // Paused time stands still: each use is a millisecond after the last, so "least recent" is defined.
    let use_once = |id: ModelId| {
        let cache = f.cache.clone();
        async move {
            drop(cache.acquire(&id).await.unwrap());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
    };
    let ids: Vec<ModelId> = ["a", "b", "c", "d"].iter().map(|id| f.sized(id, 100)).collect();
    for id in &ids {
        use_once(id.clone()).await;
    }
    // Touch a, so b is now the coldest.
    use_once(ids[0].clone()).await;
    use_once(f.sized("e", 100)).await;
    assert_eq!(f.resident(), ["a", "c", "d", "e"]);
    // 150 bytes need two evictions (c then d), not three.
    use_once(f.sized("big", 150)).await;
    assert_eq!(f.resident(), ["a", "big", "e"]);
    assert_eq!(f.cache.used_bytes(), 350);
}

#[tokio::test(start_paused = true)]
async fn gdsf_keeps_a_popular_model_lru_would_evict_until_the_clock_ages_it_out() {
    let f = fixture_evicting(400, Policy::GreedyDualSizeFrequency, |_| {});
    assert_eq!(f.cache.eviction_policy(), Policy::GreedyDualSizeFrequency);
    let use_once = |id: ModelId| {
        let cache = f.cache.clone();
        async move {
            drop(cache.acquire(&id).await.unwrap());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
    };
    // a is used five times, then b, c and d once each: a is the least recently used.
    let a = f.sized("a", 100);
    for _ in 0..5 {
        use_once(a.clone()).await;
    }
    for id in ["b", "c", "d"] {
        use_once(f.sized(id, 100)).await;
    }
    // Equal sizes and reload costs: the models used once go first, the longest idle of them first.
    use_once(f.sized("e", 100)).await;
    assert_eq!(f.resident(), ["a", "c", "d", "e"]);
    use_once(f.sized("f", 100)).await;
    assert_eq!(f.resident(), ["a", "d", "e", "f"]);
    // Each eviction raises the clock, and models used since start from it: idle, a's five old uses
    // are eventually worth less than one recent one, and it goes.
    let mut survived = 0;
    for n in 0..200 {
        if !f.cache.is_loaded(&a) {
            break;
        }
        survived = n;
        use_once(f.sized(&format!("new-{n}"), 100)).await;
    }
    assert!(!f.cache.is_loaded(&a), "never aged out");
    assert!(survived >= 3, "evicted after only {survived} more loads");
    assert_eq!(f.cache.used_bytes(), 400);
}

#[tokio::test(start_paused = true)]
async fn a_model_in_use_is_never_evicted_and_loads_wait_for_room() {
    let f = fixture(200, |_| {});
    let (a, b, c) = (f.sized("a", 100), f.sized("b", 100), f.sized("c", 100));
    let lease_a = f.cache.acquire(&a).await.unwrap();
    let lease_b = f.cache.acquire(&b).await.unwrap();
    // Both residents are leased: c's load must wait, not evict them and not overrun the capacity.
    let pending = {
        let (cache, c) = (f.cache.clone(), c.clone());
        tokio::spawn(async move { cache.acquire(&c).await.map(|l| l.id().to_string()) })
    };
    // Paused time passes only once every task is idle: by then c's load is parked waiting for room.
    // Most of its --load-timeout (10s) goes by without it taking any.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(!pending.is_finished(), "the load must wait while every resident model is leased");
    assert_eq!(f.resident(), ["a", "b"]);
    assert!(f.cache.used_bytes() <= 200);
    drop(lease_b);
    assert_eq!(pending.await.unwrap().unwrap(), "c");
    assert_eq!(f.resident(), ["a", "c"], "only the released model may go, even though a is colder");
    drop(lease_a);
}

#[tokio::test(start_paused = true)]
async fn a_model_larger_than_the_capacity_is_refused_with_both_sizes() {
    let f = fixture(500, |_| {});
    let huge = f.sized("huge", 1000);
    let err = f.cache.acquire(&huge).await.err().unwrap();
    let message = err.to_string();
    assert!(matches!(err, CacheError::TooLarge { .. }), "{message}");
    assert!(message.contains("1000") && message.contains("500"), "{message}");
    assert_eq!(f.cache.used_bytes(), 0, "a refused load gives its reservation back");
    // Remembered: the next request is answered without loading again.
    assert!(matches!(f.cache.acquire(&huge).await, Err(CacheError::TooLarge { .. })));
    assert_eq!(f.loads(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_load_is_reported_and_retried_only_after_its_backoff() {
    let f = fixture(500, |c| c.retry_backoff = Duration::from_millis(200));
    let bad = f.model("bad", "fail=not an onnx model");
    for _ in 0..3 {
        match f.cache.acquire(&bad).await {
            Err(CacheError::LoadFailed { reason, retry_in, .. }) => {
                assert!(reason.contains("not an onnx model"), "{reason}");
                assert!(retry_in <= Duration::from_millis(200));
            }
            other => panic!("expected a load failure, got {:?}", other.map(|l| l.id().to_string())),
        }
    }
    assert_eq!(f.loads(), 1, "requests inside the back-off do not load again");
    tokio::time::sleep(Duration::from_millis(199)).await;
    assert!(f.cache.acquire(&bad).await.is_err());
    assert_eq!(f.loads(), 1, "still inside the back-off");
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(f.cache.acquire(&bad).await.is_err());
    assert_eq!(f.loads(), 2, "after the back-off the next request tries again");
    // The second consecutive failure doubles the back-off.
    match f.cache.acquire(&bad).await {
        Err(CacheError::LoadFailed { retry_in, .. }) => assert!(retry_in > Duration::from_millis(200)),
        _ => panic!("expected a load failure"),
    }
    // Fixed on disk: after the back-off (doubled: 400ms) it loads.
    f.sized("bad", 10);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(f.cache.acquire(&bad).await.unwrap().size_bytes(), 10);
    assert_eq!(f.cache.used_bytes(), 10);
}

#[tokio::test(start_paused = true)]
async fn unknown_models_are_not_found_and_not_remembered() {
    let f = fixture(500, |_| {});
    let ghost = ModelId::new("ghost").unwrap();
    assert!(matches!(f.cache.acquire(&ghost).await, Err(CacheError::NotFound(_))));
    f.sized("ghost", 5);
    assert!(f.cache.acquire(&ghost).await.is_ok(), "a model dropped into the repository is found at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_never_overruns_the_capacity() {
    let f = fixture(300, |c| c.max_concurrent_loads = 2);
    let ids: Vec<ModelId> = (0..8).map(|i| f.sized(&format!("m{i}"), 100)).collect();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (cache, ids) = (f.cache.clone(), ids.clone());
            tokio::spawn(async move {
                for i in 0..40 {
                    let id = &ids[(t * 7 + i * 3) % ids.len()];
                    let lease = cache.acquire(id).await.expect("every acquire succeeds");
                    assert!(cache.used_bytes() <= 300, "used {} > capacity", cache.used_bytes());
                    tokio::task::yield_now().await;
                    drop(lease);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let resident: u64 = f.cache.resident().iter().map(|m| m.size_bytes).sum();
    assert_eq!(resident, f.cache.used_bytes());
    assert!(resident <= 300);
}

#[tokio::test(start_paused = true)]
async fn shutdown_unloads_everything_and_refuses_new_loads() {
    let f = fixture(500, |_| {});
    let a = f.sized("a", 100);
    drop(f.cache.acquire(&a).await.unwrap());
    f.cache.shutdown().await;
    assert!(f.resident().is_empty());
    assert_eq!(f.cache.used_bytes(), 0);
    let b = f.sized("b", 100);
    assert!(matches!(f.cache.acquire(&b).await, Err(CacheError::ShuttingDown)));
}

#[tokio::test(start_paused = true)]
async fn loads_that_outgrow_their_predictions_together_do_not_wait_on_each_other() {
    // Files of ~100 bytes predict ~100 bytes each; both measure 250, so neither fits while the other's
    // reservation stands. Before the fix each waited for the other until --load-timeout (on paused
    // time, the deadline passes as soon as both wait, and both fail).
    let f = fixture(300, |c| c.load_timeout = Duration::from_secs(5));
    let padding = "#".repeat(90);
    let ids: Vec<ModelId> =
        ["a", "b"].iter().map(|id| f.model(id, &format!("{padding}\ngate\nsize=250"))).collect();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (cache, id) = (f.cache.clone(), id.clone());
            tokio::spawn(async move { cache.acquire(&id).await.map(|l| l.size_bytes()) })
        })
        .collect();
    f.loads_begun(2).await;
    f.runtime.gate.open();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 250);
    }
    // Once both settled, the capacity holds again (the older model went to make room).
    assert!(f.cache.used_bytes() <= 300, "used {}", f.cache.used_bytes());
}

#[tokio::test(start_paused = true)]
async fn status_follows_loads_failures_and_unloads() {
    let f = fixture(500, |c| c.retry_backoff = Duration::from_secs(30));
    let (a, bad) = (f.sized("a", 100), f.model("bad", "fail=broken"));
    assert_eq!(f.cache.status(&a), CopyStatus::NotLoaded);
    drop(f.cache.acquire(&a).await.unwrap());
    assert_eq!(f.cache.status(&a), CopyStatus::Loaded { size_bytes: 100 });
    assert!(f.cache.acquire(&bad).await.is_err());
    assert!(matches!(f.cache.status(&bad), CopyStatus::Failed { reason } if reason.contains("broken")));

    let lease = f.cache.acquire(&a).await.unwrap();
    f.cache.unload(&a).await;
    assert_eq!(f.cache.status(&a), CopyStatus::NotLoaded);
    assert_eq!(f.cache.used_bytes(), 0);
    assert_eq!(lease.size_bytes(), 100, "a request holding a lease finishes on the unloaded model");
    drop(lease);
    // Unloading forgets the failure: a fixed model loads at once, without waiting out the back-off.
    f.sized("bad", 10);
    f.cache.unload(&bad).await;
    assert!(f.cache.acquire(&bad).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_model_marked_as_used_long_ago_is_evicted_first() {
    let f = fixture(200, |_| {});
    let (a, b, c) = (f.sized("a", 100), f.sized("b", 100), f.sized("c", 100));
    drop(f.cache.acquire(&b).await.unwrap());
    // Loaded after b, but ahead of any request: counts as used an hour ago.
    let preloaded = f.cache.acquire(&a).await.unwrap();
    f.cache.mark_last_used(&preloaded, tokio::time::Instant::now() - Duration::from_secs(3600));
    drop(preloaded);
    drop(f.cache.acquire(&c).await.unwrap());
    assert_eq!(f.resident(), ["b", "c"]);
}

#[tokio::test(start_paused = true)]
async fn lru_eviction_reads_only_the_least_recently_used_end() {
    let f = fixture(10_000, |_| {});
    let ids: Vec<ModelId> = (0..50).map(|i| f.sized(&format!("m{i:02}"), 100)).collect();
    let mut held = Vec::new();
    for id in &ids {
        let lease = f.cache.acquire(id).await.unwrap();
        // m03 stays held by a request.
        if id.as_str() == "m03" {
            held.push(lease);
        }
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    // m00 used again: m01 and m02 are now the least recently used.
    drop(f.cache.acquire(&ids[0]).await.unwrap());
    let rules = f.cache.inner.rules();
    let walked = |needed| {
        let state = f.cache.inner.state.lock();
        let now = Instant::now();
        state
            .least_recently_used(now, needed, rules)
            .into_iter()
            .map(|c| c.id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(walked(150), ["m01", "m02"], "two models cover 150 bytes; nothing further is read");
    assert_eq!(walked(250), ["m01", "m02", "m03", "m04"], "a model in use is passed over, not counted");
    assert_eq!(walked(0), Vec::<String>::new());
    assert_eq!(walked(u64::MAX).len(), 50, "short of room, every model is read, for the shortfall's figures");
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn gdsf_evicts_what_a_walk_of_every_model_would() {
    // Room for 40 of these; 700 more loads, each one eviction, most of them from the cheapest few.
    let f = fixture_evicting(40 * 100, Policy::GreedyDualSizeFrequency, |_| {});
    // A small LCG: uneven enough, and the same every run.
    let mut state_ = 11u64;
    let mut next = move |bound: usize| {
        state_ = state_.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state_ >> 33) as usize % bound.max(1)
    };
    let mut loaded: Vec<ModelId> = Vec::new();
    let rules = f.cache.inner.rules();
    for n in 0..740 {
        // Earlier models are used again, unevenly, each use at its own instant (no ties in idle time).
        for _ in 0..next(4) {
            if let Some(id) = loaded.get(next(loaded.len())).cloned()
                && let Some(lease) = f.cache.lease_if_loaded(&id)
            {
                drop(lease);
                tokio::time::advance(Duration::from_millis(1)).await;
            }
        }
        let id = f.sized(&format!("m{n:03}"), 100);
        let expected: Vec<ModelId> = {
            let state = f.cache.inner.state.lock();
            let candidates = state.candidates(Instant::now());
            eviction::victims(
                &candidates,
                (state.used_bytes + 100).saturating_sub(40 * 100),
                Policy::GreedyDualSizeFrequency,
                rules,
                state.clock,
            )
            .unwrap()
            .victims
        };
        drop(f.cache.acquire(&id).await.unwrap());
        tokio::time::advance(Duration::from_millis(1)).await;
        for victim in &expected {
            assert!(!f.cache.is_loaded(victim), "load {n}: {victim} should have been evicted");
        }
        assert_eq!(f.cache.resident().len(), (n + 1).min(40), "load {n}: only the expected evictions");
        loaded.push(id);
    }
    let walks_avoided = f.cache.inner.state.lock().cheapest.is_some();
    assert!(walks_avoided, "the cheapest few were kept");
}

#[tokio::test(start_paused = true)]
async fn a_model_loaded_again_counts_once_among_gdsfs_cheapest() {
    let f = fixture_evicting(300, Policy::GreedyDualSizeFrequency, |_| {});
    let (a, b, c) = (f.sized("a", 100), f.sized("b", 100), f.sized("c", 100));
    // a is popular, so the cheapest few kept at the first eviction reach up to its priority.
    for _ in 0..10 {
        drop(f.cache.acquire(&a).await.unwrap());
    }
    drop(f.cache.acquire(&b).await.unwrap());
    tokio::time::advance(Duration::from_millis(1)).await;
    drop(f.cache.acquire(&c).await.unwrap());
    tokio::time::advance(Duration::from_millis(1)).await;
    let d = f.sized("d", 100);
    for _ in 0..3 {
        drop(f.cache.acquire(&d).await.unwrap());
    }
    assert_eq!(f.resident(), ["a", "c", "d"], "b, as cheap as c and idle longer, went first");
    // c leaves and comes back: it is listed among the cheapest twice, the cheapest of all now.
    f.cache.unload(&c).await;
    drop(f.cache.acquire(&c).await.unwrap());
    // 200 bytes of room: c and d go (c listed twice is still one model's bytes), a stays.
    let big = f.sized("big", 200);
    drop(f.cache.acquire(&big).await.unwrap());
    assert_eq!(f.resident(), ["a", "big"]);
    assert_eq!(f.cache.used_bytes(), 300);
    let state = f.cache.inner.state.lock();
    let few = state.cheapest.as_ref().expect("kept since the first eviction");
    assert_eq!(few.ids.iter().filter(|id| id.as_str() == "c").count(), 2, "the case this test is for");
}

#[tokio::test(start_paused = true)]
async fn free_memory_is_given_back_per_16_mib_of_models_dropped_not_per_model() {
    let f = fixture(1 << 30, |_| {});
    let reclaims = || f.runtime.reclaims.load(std::sync::atomic::Ordering::Relaxed);
    let small: Vec<ModelId> = (0..100).map(|i| f.sized(&format!("s{i:02}"), 100 << 10)).collect();
    for id in &small {
        drop(f.cache.acquire(id).await.unwrap());
    }
    for id in &small[..100] {
        f.cache.unload(id).await;
    }
    // 100 models of 100 KiB: 9.8 MiB dropped, below the 16 MiB that a heap walk waits for.
    assert_eq!(reclaims(), 0);
    let big = f.sized("big", 20 << 20);
    drop(f.cache.acquire(&big).await.unwrap());
    f.cache.unload(&big).await;
    assert_eq!(reclaims(), 1, "a model of 16 MiB or more is given back as it goes");
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_load_slot_does_not_count_against_the_load_timeout() {
    let f = fixture(1000, |c| {
        c.max_concurrent_loads = 1;
        c.load_timeout = Duration::from_secs(10);
    });
    let slow = f.model("slow", "gate\nsize=100");
    let queued = f.model("queued", "size=100");
    let first = {
        let (cache, slow) = (f.cache.clone(), slow.clone());
        tokio::spawn(async move { cache.acquire(&slow).await.map(|l| l.size_bytes()) })
    };
    f.loads_begun(1).await;
    let second = {
        let (cache, queued) = (f.cache.clone(), queued.clone());
        tokio::spawn(async move { cache.acquire(&queued).await.map(|l| l.size_bytes()) })
    };
    // The slow load times out at 10s but holds its slot until the runtime returns, at 15s.
    tokio::time::advance(Duration::from_secs(15)).await;
    assert!(first.await.unwrap().is_err(), "the slow load itself timed out");
    assert!(!second.is_finished(), "the queued load waits for the slot, past 10s, without failing");
    f.runtime.gate.open();
    assert_eq!(second.await.unwrap().expect("queued, then loaded within its own timeout"), 100);
}

#[tokio::test(start_paused = true)]
async fn a_load_past_its_timeout_keeps_its_slot_and_bytes_until_the_runtime_returns() {
    let f = fixture(1000, |c| {
        c.max_concurrent_loads = 1;
        c.load_timeout = Duration::from_secs(10);
    });
    let slow = f.model("slow", &format!("{}\ngate\nsize=100", "#".repeat(90)));
    let pending = {
        let (cache, slow) = (f.cache.clone(), slow.clone());
        tokio::spawn(async move { cache.acquire(&slow).await.map(|l| l.size_bytes()) })
    };
    f.loads_begun(1).await;
    let reserved = f.reserved_bytes();
    assert!(reserved >= 90, "the load reserved its predicted size, {reserved} bytes");

    // The blocked runtime call keeps paused time still; the test moves it past the deadline.
    tokio::time::advance(Duration::from_secs(11)).await;
    let err = pending.await.unwrap().expect_err("the caller hears of the timeout at the deadline");
    assert!(err.to_string().contains("--load-timeout"), "{err}");

    // The runtime is still loading: the limits count it until it returns.
    assert_eq!(f.free_load_slots(), 0, "the timed-out load still holds its slot");
    assert_eq!(f.reserved_bytes(), reserved, "and its reserved bytes");
    assert_eq!(f.cache.used_bytes(), reserved);

    // Another load waits for that slot, and gets it once the runtime returns.
    let other = f.sized("other", 50);
    let waiting = {
        let (cache, other) = (f.cache.clone(), other.clone());
        tokio::spawn(async move { cache.acquire(&other).await.map(|l| l.size_bytes()) })
    };
    tokio::task::yield_now().await;
    assert_eq!(f.loads(), 1, "no second load runs beside the one past its deadline");
    f.runtime.gate.open();
    assert_eq!(waiting.await.unwrap().unwrap(), 50);
    assert_eq!(f.loads(), 2);
    assert_eq!(f.reserved_bytes(), 0, "the abandoned load's bytes went back once it returned");
    assert_eq!(f.cache.used_bytes(), 50, "and what it loaded was freed, not kept");
    assert_eq!(f.free_load_slots(), 1);
    assert_eq!(f.resident(), ["other"]);
}

#[tokio::test(start_paused = true)]
async fn a_lost_copy_is_dropped_once_and_a_newer_copy_is_left_alone() {
    let f = fixture(1000, |_| {});
    let a = f.sized("a", 100);
    let lease = f.cache.acquire(&a).await.unwrap();
    let lost = lease.copy();
    drop(lease);
    f.cache.drop_lost(&a, &lost).await;
    assert!(!f.cache.is_loaded(&a));
    assert_eq!(f.cache.used_bytes(), 0, "its bytes are given back");

    // A second request that saw the same loss after the model was loaded again drops nothing.
    drop(f.cache.acquire(&a).await.unwrap());
    assert_eq!(f.loads(), 2);
    f.cache.drop_lost(&a, &lost).await;
    assert!(f.cache.is_loaded(&a));
    assert_eq!(f.cache.used_bytes(), 100);
}

/// Above `EXACT_WALK_BELOW` loaded models, placement's view of the cache comes from a walk at most
/// `WALK_REUSE` old (the hint other pods read is older still), so a miss costs no walk of them all.
#[tokio::test(start_paused = true)]
async fn placement_reads_a_walk_at_most_a_second_old_once_many_models_are_loaded() {
    let f = fixture(1 << 30, |_| {});
    let ids: Vec<ModelId> = (0..EXACT_WALK_BELOW).map(|i| f.sized(&format!("m{i:05}"), 10)).collect();
    for id in &ids {
        drop(f.cache.acquire(id).await.unwrap());
        tokio::time::advance(Duration::from_micros(10)).await;
    }
    let state = f.cache.placement_state();
    assert_eq!((state.models_loaded, state.mean_model_bytes), (EXACT_WALK_BELOW as u64, Some(10)));
    assert_eq!(state.coldest_model.as_ref(), Some(&ids[0]));
    // m00000 used again: the walk of a moment ago still names it, its idle time counted to now.
    drop(f.cache.acquire(&ids[0]).await.unwrap());
    tokio::time::advance(Duration::from_millis(500)).await;
    let stale = f.cache.placement_state();
    assert_eq!(stale.coldest_model.as_ref(), Some(&ids[0]));
    assert!(stale.lru_age >= state.lru_age + Duration::from_millis(500), "{stale:?}");
    // A second on, a new walk: m00001 is the coldest.
    tokio::time::advance(WALK_REUSE).await;
    assert_eq!(f.cache.placement_state().coldest_model.as_ref(), Some(&ids[1]));
    // A walk whose coldest model has gone is not reused.
    f.cache.unload(&ids[1]).await;
    assert_eq!(f.cache.placement_state().coldest_model.as_ref(), Some(&ids[2]));
}
