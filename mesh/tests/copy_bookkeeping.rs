//! What a loaded copy costs this pod beyond its model: the cache's entry and LRU node, its placement
//! record in the store, and that record's mirror in the cluster view. meshd charges it against the
//! capacity with every copy ([`COPY_BOOKKEEPING_BYTES`]), so that charges sum to what the process
//! holds; this counts it, allocation by allocation, with the pieces wired as meshd wires them.
//!
//! Its own test binary with one test: the counting allocator sees the whole process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use densemesh_mesh::cluster::instance::{self, InstanceConfig, RegistryHealth};
use densemesh_mesh::node::cache::{COPY_BOOKKEEPING_BYTES, CacheConfig, Locate, ModelCache};
use densemesh_placement::registry::Registry;
use densemesh_placement::{ClusterView, MemoryStore, ModelId, Placement, Store};
use densemesh_puller::{Fetched, LocalModel};
use densemesh_runtime_core::{InferRequest, LoadRequest, LoadedModel, ModelMetadata, Runtime, Tensor};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

/// Live heap bytes, each allocation rounded as glibc's malloc takes it (the request plus an 8-byte
/// header, in 16-byte steps, 32 at least), as the tiny runtime's own charges are.
static LIVE: AtomicI64 = AtomicI64::new(0);

fn chunk(size: usize) -> i64 {
    ((size as i64 + 8 + 15) & !15).max(32)
}

struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is kept beside.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(chunk(new_size) - chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A model that holds nothing but itself, charged exactly its own allocation.
struct Empty(ModelMetadata);

impl LoadedModel for Empty {
    fn metadata(&self) -> &ModelMetadata {
        &self.0
    }

    fn size_bytes(&self) -> u64 {
        chunk(std::mem::size_of::<Self>()) as u64
    }

    fn runtime(&self) -> &str {
        "empty"
    }

    fn infer(&self, _: InferRequest) -> densemesh_runtime_core::Result<Vec<Tensor>> {
        Ok(Vec::new())
    }
}

struct EmptyRuntime;

impl Runtime for EmptyRuntime {
    fn name(&self) -> &'static str {
        "empty"
    }

    fn load(&self, _: &LoadRequest) -> densemesh_runtime_core::Result<Box<dyn LoadedModel>> {
        Ok(Box::new(Empty(ModelMetadata {
            platform: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        })))
    }
}

fn id(n: usize) -> ModelId {
    ModelId::new(&format!("m{n:07}")).expect("a valid id")
}

/// Loads models `from..to`, then waits until the view mirrors a loaded placement for each.
async fn load(cache: &ModelCache, view: &ClusterView, from: usize, to: usize) {
    for n in from..to {
        drop(cache.acquire(&id(n)).await.expect("loads"));
    }
    let settled = tokio::time::timeout(Duration::from_secs(120), async {
        for n in from..to {
            while !view.placements(&id(n)).iter().any(|(_, p)| matches!(p, Placement::Loaded { .. })) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    settled.await.expect("every placement mirrored within 120 s");
    // Let the publisher's and the view's queues drain of anything transient.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copys_bookkeeping_is_what_meshd_charges_for_it() {
    // A short watch history: the history is a fixed cost of the store, not of a copy, and must be
    // full at both readings.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::with_history(1_000));
    let registry = Registry::new(store, "t");
    let view = ClusterView::start(registry.clone()).await.expect("view");
    let locate: Locate = Arc::new(|_: ModelId| {
        async { Ok(Fetched::local(LocalModel::new(PathBuf::from("/nowhere/model.onnx"), None, 0))) }.boxed()
    });
    let config = CacheConfig { capacity_bytes: 64 << 30, ..CacheConfig::default() };
    let cache = ModelCache::new(config, Arc::new(EmptyRuntime), locate);
    let stop = CancellationToken::new();
    let (_drain, drain_requests) = tokio::sync::mpsc::channel(1);
    let instance = InstanceConfig {
        id: "pod-0123456789abcdef".into(),
        endpoint: "127.0.0.1:1".into(),
        lease_ttl: Duration::from_secs(30),
        model_types: densemesh_placement::spec::legacy_model_types(),
        peer_wire: densemesh_mesh::cluster::wire::VERSION,
        health: RegistryHealth::new(Duration::from_secs(30)),
        lease: Arc::new(tokio::sync::watch::channel(None).0),
    };
    let publisher =
        tokio::spawn(instance::run(registry, cache.clone(), instance, drain_requests, stop.clone()));
    // Joined once its instance record shows; loads before that would not be published.
    while view.instances().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The cost of a copy is read between two counts, past the fixed costs (the store's history, the
    // first allocations of every map), over enough copies that table growth averages out.
    load(&cache, &view, 0, 4_000).await;
    let first = LIVE.load(Ordering::Relaxed);
    let (from, to) = (4_000, 20_000);
    load(&cache, &view, from, to).await;
    let grown = LIVE.load(Ordering::Relaxed) - first;
    let per_copy = grown as f64 / (to - from) as f64;
    let model = chunk(std::mem::size_of::<Empty>()) as f64;
    let bookkeeping = per_copy - model;
    eprintln!(
        "{per_copy:.0} bytes per copy: {model:.0} its model, {bookkeeping:.0} bookkeeping; charged {COPY_BOOKKEEPING_BYTES}"
    );
    let off = COPY_BOOKKEEPING_BYTES as f64 / bookkeeping - 1.0;
    assert!(
        off.abs() <= 0.2,
        "a copy's bookkeeping is {bookkeeping:.0} bytes, and meshd charges {COPY_BOOKKEEPING_BYTES} ({:+.0}%)",
        off * 100.0
    );
    stop.cancel();
    publisher.await.expect("publisher");
}
