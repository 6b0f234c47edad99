//! ModelCache: the models this pod holds in memory, under a byte capacity.
//!
//! A request [`acquire`](ModelCache::acquire)s a [`Lease`] on its model. On a miss the cache starts one
//! load task per model (single flight: every request for a loading model awaits the same outcome),
//! limited to `max_concurrent_loads` at a time. A load reserves its predicted size first, evicting the
//! least recently used models that no lease holds, and waits for room when every candidate is in use
//! rather than overrun the capacity. Once loaded the charge becomes the measured size. A failed load
//! is remembered, and requests get its reason at once until its back-off passes.
//!
//! The state lives behind one `parking_lot` mutex that is never held across an `.await`; the decision
//! of what to evict is `densemesh_placement::eviction::victims`, a pure function, under the policy
//! [`ModelCache::with_eviction_policy`] chose (LRU unless told otherwise; `meshctl simulate` runs the
//! same function over traces).

mod entry;
mod load;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::ModelId;
use densemesh_placement::eviction::{self, Candidate, Clock, Policy, Rules, Victim};
use densemesh_puller::Fetched;
use densemesh_runtime_core::Runtime;
use futures::FutureExt;
use futures::future::BoxFuture;
use lru::LruCache;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use entry::{Entry, HeldCopy, Lease};

use crate::error::CacheError;
use crate::metrics as m;

/// Limits and timings of the cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bytes of loaded models this pod may hold.
    pub capacity_bytes: u64,
    /// Loads running at once; more wait their turn.
    pub max_concurrent_loads: usize,
    /// Longest a load may take, waiting for room included.
    pub load_timeout: Duration,
    /// Wait after a failed load before the next attempt; doubles per consecutive failure.
    pub retry_backoff: Duration,
    /// Cap on the doubled back-off.
    pub max_retry_backoff: Duration,
    /// A model loaded more recently than this is never evicted.
    pub min_residence: Duration,
    /// Charged with every copy beside its model's own size: see [`COPY_BOOKKEEPING_BYTES`].
    pub copy_bookkeeping_bytes: u64,
    /// Model files up to this size whose runtime can load them at once
    /// ([`Runtime::try_load_quick`](densemesh_runtime_core::Runtime::try_load_quick)) load on the async
    /// thread, skipping the blocking pool's round trip; 0 sends every load to the blocking pool.
    pub inline_load_max_bytes: u64,
}

/// What a loaded copy costs the pod beyond its model: the cache's entry and LRU node, the placement
/// record in the store and its mirror in the cluster view. Charged with each copy so that the charges
/// sum to what the process holds; with a million 5 KiB models it is a fifth of the memory.
/// `mesh/tests/copy_bookkeeping.rs` counts it.
pub const COPY_BOOKKEEPING_BYTES: u64 = 1_400;

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 2 << 30,
            max_concurrent_loads: 2,
            load_timeout: Duration::from_secs(60),
            retry_backoff: Duration::from_secs(2),
            max_retry_backoff: Duration::from_secs(60),
            min_residence: Duration::ZERO,
            copy_bookkeeping_bytes: COPY_BOOKKEEPING_BYTES,
            inline_load_max_bytes: 64 << 10,
        }
    }
}

/// One model in the cache, for status listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidentModel {
    pub id: ModelId,
    pub size_bytes: u64,
    pub in_flight: usize,
    /// Time since a request last used it.
    pub idle_for: Duration,
    /// Requests served since it was loaded here.
    pub requests: u64,
}

/// This pod's cache as placement reads it (see [`ModelCache::placement_state`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlacementState {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub loading: u64,
    pub models_loaded: u64,
    pub lru_age: Duration,
    pub coldest_model: Option<ModelId>,
    /// Under GDSF, the models a load here would evict first ([`eviction::cheapest`]); `None` under
    /// LRU, where placement goes by `lru_age`.
    pub cheapest_victims: Option<Vec<Victim>>,
    /// Loaded size over file size, learned from past loads.
    pub size_factor: Option<f64>,
    /// The mean loaded model's size: a prior for a model nothing is known about.
    pub mean_model_bytes: Option<u64>,
}

/// Makes a model's files local (pulling them if need be). `CacheError::NotFound` for an unknown
/// model; anything else that fails is a load failure.
pub type Locate = Arc<dyn Fn(ModelId) -> BoxFuture<'static, Result<Fetched, CacheError>> + Send + Sync>;

/// Locates models in a repository directory, by id, on the calling thread (a few `stat`s), as meshd's
/// puller resolves local paths: the cache's tests run on it.
#[cfg(test)]
pub(crate) fn locate_in(repository: densemesh_puller::LocalRepository) -> Locate {
    Arc::new(move |id| {
        let found = repository.resolve(&id).map(Fetched::local).map_err(|e| match e {
            densemesh_puller::Error::NotFound { .. } => {
                CacheError::NotFound(format!("model {id} not found").into())
            }
            other => CacheError::LoadFailed {
                model_id: id.clone(),
                reason: other.to_string().into(),
                retry_in: Duration::ZERO,
            },
        });
        std::future::ready(found).boxed()
    })
}

/// Asked before a new load starts: `Some(reason)` refuses it (cluster mode, registry unreachable).
pub type LoadGate = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Where one model stands in this pod's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyStatus {
    NotLoaded,
    Loading,
    Loaded {
        size_bytes: u64,
    },
    /// The last load failed and its back-off has not ended.
    Failed {
        reason: String,
    },
}

/// A change of this pod's copy of a model, for publishing placement records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyEvent {
    Loading(ModelId),
    Loaded {
        id: ModelId,
        size_bytes: u64,
        runtime: String,
    },
    Failed {
        id: ModelId,
        reason: String,
        /// When the back-off ends and this pod will try again (wall clock, so other pods can read it).
        retry_at: std::time::SystemTime,
    },
    /// Evicted, unloaded, or a load that ended without a copy.
    Gone(ModelId),
}

/// A cloneable handle to the cache; all clones share one state.
#[derive(Clone)]
pub struct ModelCache {
    inner: Arc<Inner>,
}

struct Inner {
    config: CacheConfig,
    runtime: Arc<dyn Runtime>,
    locate: Locate,
    load_gate: Option<LoadGate>,
    /// What goes first when room is needed.
    eviction: Policy,
    /// The GPUs the worker places models on before their calls.
    gpu: crate::node::gpu::GpuTier,
    state: Mutex<State>,
    /// Shared so a load given up on at its deadline can keep its slot until the runtime returns.
    load_permits: Arc<Semaphore>,
    /// Signalled whenever bytes may have become free: a lease dropped, a model left, a load gave up.
    room_freed: Arc<Notify>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    copies: tokio::sync::broadcast::Sender<CopyEvent>,
    /// Bytes of models dropped since the runtime last gave free memory back ([`RECLAIM_AFTER_BYTES`]).
    unreclaimed_bytes: std::sync::atomic::AtomicU64,
}

/// Models dropped add up to this many bytes before the runtime gives free memory back to the kernel.
/// That is `malloc_trim`, which walks the whole heap: with 83,000 tiny models loaded it took most of
/// the CPU of evicting one, and a pod evicting thousands of them a second did little else. A model of
/// this size or more is still given back as it goes; below it, what lingers is reused by the next load.
const RECLAIM_AFTER_BYTES: u64 = 16 << 20;

type LoadOutcome = Result<Arc<Entry>, CacheError>;

struct State {
    /// Unbounded by count: capacity is enforced in bytes by `make_room`. In order of use, which LRU
    /// eviction reads from the least recent end (see [`ModelCache::mark_last_used`]).
    resident: LruCache<ModelId, Arc<Entry>>,
    loading: HashMap<ModelId, watch::Receiver<Option<LoadOutcome>>>,
    failures: HashMap<ModelId, Failure>,
    /// Bytes charged to resident models plus reservations of loads in progress.
    used_bytes: u64,
    /// The part of `used_bytes` that is reservations of loads in progress (predictions, not yet real).
    reserved_bytes: u64,
    /// Learned ratio of measured size to file size, to predict a load's size before it runs.
    size_factor: Option<f64>,
    /// GDSF's aging clock: every use stamps its model with it, every eviction raises it.
    clock: Clock,
    /// Models evicted for room since start, for the dashboard (the Prometheus counter is write-only).
    evictions: u64,
    /// The last walk of the loaded models for placement, reused for a while above
    /// [`EXACT_WALK_BELOW`] models.
    placement_walk: Option<PlacementWalk>,
    /// GDSF's cheapest models as of the last walk of them all ([`CheapestFew`]).
    cheapest: Option<CheapestFew>,
}

/// Up to this many loaded models, every placement decision walks them all (for the coldest and, under
/// GDSF, the cheapest victims); above it, a walk is reused for [`WALK_REUSE`]. A miss asks on every
/// placement, and a walk of 100,000 models under the cache's lock on each first request made loads go
/// at tens a second; placement reads these as hints that other pods see seconds old anyway, and they
/// matter only once no pod has room.
const EXACT_WALK_BELOW: usize = 10_000;

const WALK_REUSE: Duration = Duration::from_secs(1);
/// A walk is reused for at least this many times what it took, so walks hold the lock at most 1% of
/// the time: over a million models one takes tens of milliseconds, and once a second slowed every
/// load and request behind it.
const WALK_REUSE_PER_WALK_TIME: u32 = 100;

/// What a walk of the loaded models found: the coldest (and when it was last used), the cheapest
/// victims under GDSF, when the walk ran and how long it is reused.
struct PlacementWalk {
    coldest: Option<(ModelId, Instant)>,
    victims: Option<Vec<Victim>>,
    at: Instant,
    reuse_for: Duration,
}

/// The models with the lowest GDSF priorities, kept from a walk of every loaded model so that an
/// eviction need not walk them all again: at 1,000,000 loaded that walk held the cache's lock for a
/// sizeable part of a second on every load that needed room.
///
/// It stays exact: every loaded model whose priority is at most `threshold` is in `ids`. That holds at
/// the walk; a model's priority only rises (its uses and the clock at its last use only grow); and a
/// model loaded since joins when its priority is at most the threshold. So while the models here that
/// are still at most the threshold cover what is needed, they are the cheapest ones anywhere.
struct CheapestFew {
    ids: Vec<ModelId>,
    threshold: f64,
}

/// How many models a walk keeps as the cheapest; a walk happens about once per this many evictions.
const CHEAPEST_FEW: usize = 512;

impl CheapestFew {
    /// The `CHEAPEST_FEW` lowest priorities among `candidates` (all of them, whatever the rules: one in
    /// use now may be free at the next eviction).
    fn from_walk(candidates: &[Candidate]) -> Self {
        let mut keyed: Vec<(f64, &ModelId)> = candidates.iter().map(|c| (c.priority(), &c.id)).collect();
        if keyed.len() > CHEAPEST_FEW {
            keyed.select_nth_unstable_by(CHEAPEST_FEW - 1, |a, b| a.0.total_cmp(&b.0));
            keyed.truncate(CHEAPEST_FEW);
        }
        let threshold = keyed.iter().map(|(p, _)| *p).fold(f64::NEG_INFINITY, f64::max);
        Self { ids: keyed.into_iter().map(|(_, id)| id.clone()).collect(), threshold }
    }
}

impl State {
    /// The least recently used loaded model and how long it has been idle.
    fn coldest(&self, now: Instant) -> Option<(Duration, &ModelId)> {
        self.resident
            .iter()
            .map(|(id, e)| (now.saturating_duration_since(e.last_used()), id))
            .max_by_key(|(idle, _)| *idle)
    }

    /// Every resident model as eviction sees it at `now`.
    fn candidates(&self, now: Instant) -> Vec<Candidate> {
        self.resident.iter().map(|(id, e)| candidate(id, e, now)).collect()
    }

    /// The least recently used models as eviction sees them, only as many as it takes for the ones
    /// `rules` let go to add up to `needed` bytes (all of them when they do not): the candidates of an
    /// LRU eviction. The list holds them in order of use, so this is a walk of a few models, where
    /// [`Self::candidates`] walks every loaded one: with 1,000,000 loaded, a load that needed room
    /// spent a sizeable part of a second under the cache's lock building them.
    fn least_recently_used(&self, now: Instant, needed: u64, rules: Rules) -> Vec<Candidate> {
        let mut freed = 0u64;
        let mut out = Vec::new();
        for (id, e) in self.resident.iter().rev() {
            if freed >= needed {
                break;
            }
            let c = candidate(id, e, now);
            if rules.allow(&c) {
                freed = freed.saturating_add(c.size_bytes);
            }
            out.push(c);
        }
        out
    }

    /// GDSF's victims for `needed` bytes: from the cheapest few when they suffice, otherwise from a
    /// walk of every loaded model, which keeps the cheapest few for the evictions after it.
    fn gdsf_victims(
        &mut self,
        now: Instant,
        needed: u64,
        rules: Rules,
    ) -> Result<eviction::Eviction, eviction::Shortfall> {
        if let Some(few) = &self.cheapest {
            // A model unloaded and loaded again since the walk is listed twice; it is one candidate.
            let mut seen = std::collections::HashSet::with_capacity(few.ids.len());
            let candidates: Vec<Candidate> = few
                .ids
                .iter()
                .filter(|id| seen.insert(*id))
                .filter_map(|id| self.resident.peek(id).map(|e| candidate(id, e, now)))
                .filter(|c| c.priority() <= few.threshold)
                .collect();
            if let Ok(decided) =
                eviction::victims(&candidates, needed, Policy::GreedyDualSizeFrequency, rules, self.clock)
            {
                return Ok(decided);
            }
        }
        let candidates = self.candidates(now);
        self.cheapest = Some(CheapestFew::from_walk(&candidates));
        eviction::victims(&candidates, needed, Policy::GreedyDualSizeFrequency, rules, self.clock)
    }

    /// Adds a model that has just joined to the cheapest few if it is one of them (see [`CheapestFew`]).
    fn joined(&mut self, id: &ModelId, entry: &Entry, now: Instant) {
        if let Some(few) = &mut self.cheapest {
            if candidate(id, entry, now).priority() <= few.threshold {
                few.ids.push(id.clone());
            }
            // Evicted models leave their ids behind; a list grown this long is walked afresh instead.
            if few.ids.len() > 4 * CHEAPEST_FEW {
                self.cheapest = None;
            }
        }
    }
}

fn candidate(id: &ModelId, e: &Entry, now: Instant) -> Candidate {
    Candidate {
        id: id.clone(),
        size_bytes: e.size_bytes(),
        in_flight: e.in_flight(),
        resident_for: now.saturating_duration_since(e.loaded_at()),
        idle_for: now.saturating_duration_since(e.last_used()),
        uses: e.requests(),
        reload_cost: eviction::reload_cost(Some(e.load_time()), e.size_bytes()),
        clock_at_use: e.clock_at_use(),
    }
}

struct Failure {
    /// What requests get until `retry_at`.
    error: CacheError,
    consecutive: u32,
    retry_at: Instant,
}

impl ModelCache {
    pub fn new(config: CacheConfig, runtime: Arc<dyn Runtime>, locate: Locate) -> Self {
        metrics::gauge!(m::CAPACITY_BYTES).set(config.capacity_bytes as f64);
        metrics::gauge!(m::USED_BYTES).set(0.0);
        metrics::gauge!(m::MODELS_LOADED).set(0.0);
        let load_permits = Arc::new(Semaphore::new(config.max_concurrent_loads.max(1)));
        let inner = Inner {
            config,
            runtime,
            locate,
            load_gate: None,
            eviction: Policy::default(),
            gpu: crate::node::gpu::GpuTier::none(),
            state: Mutex::new(State {
                resident: LruCache::unbounded(),
                loading: HashMap::new(),
                failures: HashMap::new(),
                used_bytes: 0,
                reserved_bytes: 0,
                size_factor: None,
                clock: Clock::default(),
                evictions: 0,
                placement_walk: None,
                cheapest: None,
            }),
            load_permits,
            room_freed: Arc::new(Notify::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            copies: tokio::sync::broadcast::channel(4096).0,
            unreclaimed_bytes: std::sync::atomic::AtomicU64::new(0),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Adds a check before every new load.
    ///
    /// # Panics
    /// If the cache was cloned already: a gate that only some clones saw would be a silent hole.
    pub fn with_load_gate(mut self, gate: LoadGate) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_load_gate is called before the cache is cloned")
            .load_gate = Some(gate);
        self
    }

    /// Chooses what is evicted first (`--eviction`); LRU when never called.
    ///
    /// A builder rather than a `CacheConfig` field for now: `CacheConfig` is built field by field
    /// in `config.rs`, which adds the flag and moves this into the config in one change.
    ///
    /// # Panics
    /// If the cache was cloned already, like [`Self::with_load_gate`].
    pub fn with_eviction_policy(mut self, policy: Policy) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_eviction_policy is called before the cache is cloned")
            .eviction = policy;
        self
    }

    /// Gives the cache's models a GPU tier (`--gpu-capacity`), which the worker places them on and the
    /// instance record publishes; none when never called.
    ///
    /// # Panics
    /// If the cache was cloned already, like [`Self::with_load_gate`].
    pub fn with_gpu_tier(mut self, gpu: crate::node::gpu::GpuTier) -> Self {
        Arc::get_mut(&mut self.inner).expect("with_gpu_tier is called before the cache is cloned").gpu = gpu;
        self
    }

    /// The GPU tier beside the cache (empty on a pod without GPUs).
    pub fn gpu_tier(&self) -> &crate::node::gpu::GpuTier {
        &self.inner.gpu
    }

    /// The eviction policy in force.
    pub fn eviction_policy(&self) -> Policy {
        self.inner.eviction
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// A lease on a loaded model, loading it first if needed. The model stays in memory at least as
    /// long as the lease is held.
    pub async fn acquire(&self, id: &ModelId) -> Result<Lease, CacheError> {
        let (mut outcome, load) = {
            let mut state = self.inner.state.lock();
            let clock = state.clock;
            if let Some(entry) = state.resident.get(id) {
                return Ok(Lease::new(entry.clone(), clock));
            }
            if self.inner.shutdown.is_cancelled() {
                return Err(CacheError::ShuttingDown);
            }
            if let Some(failure) = state.failures.get(id) {
                let now = Instant::now();
                if now < failure.retry_at {
                    return Err(failure.error.clone().with_retry_in(failure.retry_at - now));
                }
            }
            match state.loading.get(id) {
                Some(outcome) => (outcome.clone(), None),
                None => {
                    if let Some(reason) = self.inner.load_gate.as_ref().and_then(|gate| gate()) {
                        return Err(CacheError::RegistryUnreachable {
                            model_id: id.clone(),
                            reason: reason.into(),
                        });
                    }
                    self.start_load(&mut state, id)
                }
            }
        };
        let waited = Instant::now();
        if let Some(load) = load {
            self.run_here_or_spawn(load).await;
        }
        let result = match outcome.wait_for(Option::is_some).await {
            Ok(done) => done.clone().unwrap_or(Err(CacheError::ShuttingDown)),
            // The load task ended without an outcome: only cancellation at shutdown does that.
            Err(_) => Err(CacheError::ShuttingDown),
        };
        metrics::histogram!(m::CACHE_MISS_WAIT).record(waited.elapsed().as_secs_f64());
        let entry = result?;
        // Take the lease under the lock, so eviction (which checks leases under it too) sees it. If the
        // model was evicted in the instant since it loaded, the lease still keeps it alive for this
        // request.
        let state = self.inner.state.lock();
        Ok(Lease::new(entry, state.clock))
    }

    /// Counts `lease`'s model as last used at `at` rather than now: a load made ahead of any request, or
    /// a copy that carries its last use from another pod. LRU evicts in the order of use, which a use
    /// keeps by moving a model to the most recent end: a model marked as used before every other moves
    /// to the least recent end; one marked later stays where its load put it, which errs on keeping it.
    pub fn mark_last_used(&self, lease: &Lease, at: Instant) {
        let mut state = self.inner.state.lock();
        lease.set_last_used(at);
        let id = lease.entry().id();
        let this_copy = state.resident.peek(id).is_some_and(|e| Arc::ptr_eq(e, lease.entry()));
        let first = state.resident.peek_lru().is_none_or(|(_, e)| at <= e.last_used());
        if this_copy && first {
            state.resident.demote(id);
        }
    }

    /// A lease on the model if it is loaded here now; never starts a load. The request path's first
    /// question: a hit costs one lock and nothing else.
    pub fn lease_if_loaded(&self, id: &ModelId) -> Option<Lease> {
        let mut state = self.inner.state.lock();
        let clock = state.clock;
        state.resident.get(id).map(|entry| Lease::new(entry.clone(), clock))
    }

    /// Whether a model is loaded here now; never starts a load.
    pub fn is_loaded(&self, id: &ModelId) -> bool {
        self.inner.state.lock().resident.contains(id)
    }

    /// Where a model stands here; never starts a load.
    pub fn status(&self, id: &ModelId) -> CopyStatus {
        let state = self.inner.state.lock();
        if let Some(entry) = state.resident.peek(id) {
            return CopyStatus::Loaded { size_bytes: entry.size_bytes() };
        }
        if state.loading.contains_key(id) {
            return CopyStatus::Loading;
        }
        match state.failures.get(id) {
            Some(f) if f.retry_at > Instant::now() => CopyStatus::Failed { reason: f.error.to_string() },
            _ => CopyStatus::NotLoaded,
        }
    }

    /// The runtime holding the model here (`None`: not loaded here). Apart from [`status`](Self::status),
    /// which routing asks on every request and which needs no name.
    pub fn runtime_of(&self, id: &ModelId) -> Option<String> {
        self.inner.state.lock().resident.peek(id).map(|entry| entry.runtime().to_owned())
    }

    /// Drops a model from the cache (unregistered, or its files changed); requests holding a lease
    /// finish on it first. Also forgets a remembered failure, so a fixed model loads at once.
    pub async fn unload(&self, id: &ModelId) {
        self.remove(id, None).await;
    }

    /// Drops `copy` of a model because its runtime lost it ([`Error::Lost`]: a remote runtime's process
    /// restarted), unless a newer copy has replaced it already; the next acquire loads it again.
    ///
    /// [`Error::Lost`]: densemesh_runtime_core::Error::Lost
    pub async fn drop_lost(&self, id: &ModelId, copy: &HeldCopy) {
        self.remove(id, Some(copy)).await;
    }

    async fn remove(&self, id: &ModelId, only: Option<&HeldCopy>) {
        let evicted = {
            let mut state = self.inner.state.lock();
            if let Some(copy) = only
                && !state.resident.peek(id).is_some_and(|entry| copy.is(entry))
            {
                return;
            }
            state.failures.remove(id);
            let evicted = state.resident.pop(id);
            if let Some(entry) = &evicted {
                state.used_bytes -= entry.size_bytes();
            }
            self.inner.publish(&state);
            evicted
        };
        if let Some(entry) = evicted {
            self.inner.emit(CopyEvent::Gone(id.clone()));
            tracing::info!(model_id = %id, "unloading model");
            self.inner.retire(vec![entry]).await;
        }
    }

    /// Loaded models, most recently used first.
    pub fn resident(&self) -> Vec<ResidentModel> {
        let state = self.inner.state.lock();
        state
            .resident
            .iter()
            .map(|(id, e)| ResidentModel {
                id: id.clone(),
                size_bytes: e.size_bytes(),
                in_flight: e.in_flight(),
                idle_for: e.last_used().elapsed(),
                requests: e.requests(),
            })
            .collect()
    }

    /// Requests each loaded model served since the previous call, for the models `keep` accepts
    /// (given the id and that count); a model's first call counts 0, its interval being unknown.
    /// One walk under the lock that allocates only for what is kept: the copy rules look every few
    /// seconds, and copying out a million loaded models each time cost more than serving them.
    pub fn requests_since_last_look(
        &self,
        mut keep: impl FnMut(&ModelId, u64) -> bool,
    ) -> Vec<(ModelId, u64)> {
        let state = self.inner.state.lock();
        state
            .resident
            .iter()
            .filter_map(|(id, e)| {
                let requests = e.requests_since_last_look();
                keep(id, requests).then(|| (id.clone(), requests))
            })
            .collect()
    }

    /// [`Self::placement_state`] without what takes a walk of the loaded models (the LRU model and
    /// its age, GDSF's victims): what placement reads while this pod has room, in constant time.
    pub fn placement_counts(&self) -> PlacementState {
        self.inner.placement_counts(&self.inner.state.lock())
    }

    /// This pod as placement sees it, read under one lock: what is charged, loads in progress, and the
    /// least recently used model (the first a load here would evict) with its idle time.
    pub fn placement_state(&self) -> PlacementState {
        let mut guard = self.inner.state.lock();
        let state = &mut *guard;
        let now = Instant::now();
        let reuse = state.resident.len() >= EXACT_WALK_BELOW
            && state.placement_walk.as_ref().is_some_and(|w| {
                now.saturating_duration_since(w.at) < w.reuse_for
                    && w.coldest.as_ref().is_none_or(|(id, _)| state.resident.contains(id))
            });
        if !reuse {
            let coldest =
                state.coldest(now).map(|(idle, id)| (id.clone(), now.checked_sub(idle).unwrap_or(now)));
            let victims = (self.inner.eviction == Policy::GreedyDualSizeFrequency).then(|| {
                let candidates = state.candidates(now);
                eviction::cheapest(&candidates, self.inner.rules(), eviction::PUBLISHED_VICTIMS)
            });
            let reuse_for = WALK_REUSE.max(now.elapsed() * WALK_REUSE_PER_WALK_TIME);
            state.placement_walk = Some(PlacementWalk { coldest, victims, at: now, reuse_for });
        }
        let walk = state.placement_walk.as_ref();
        let coldest = walk.and_then(|w| w.coldest.as_ref());
        PlacementState {
            lru_age: coldest.map(|(_, used)| now.saturating_duration_since(*used)).unwrap_or_default(),
            coldest_model: coldest.map(|(id, _)| id.clone()),
            cheapest_victims: walk.and_then(|w| w.victims.clone()),
            ..self.inner.placement_counts(state)
        }
    }

    /// Changes of this pod's copies from now on.
    pub fn copy_events(&self) -> tokio::sync::broadcast::Receiver<CopyEvent> {
        self.inner.copies.subscribe()
    }

    /// Refreshes the gauges that age with time (LRU age), so a scrape reads current values.
    pub fn refresh_gauges(&self) {
        self.inner.gpu.refresh_gauges();
        // The LRU age as placement reads it: above EXACT_WALK_BELOW models, from a recent walk rather
        // than a walk of them all on every scrape.
        let placement = self.placement_state();
        let lru_idle = (placement.models_loaded > 0).then_some(placement.lru_age);
        let state = self.inner.state.lock();
        self.inner.publish(&state);
        self.inner.publish_aging(&state, lru_idle);
    }

    /// Models evicted for room since the cache started.
    pub fn evictions_total(&self) -> u64 {
        self.inner.state.lock().evictions
    }

    /// Bytes charged now (loaded models and loads in progress).
    pub fn used_bytes(&self) -> u64 {
        self.inner.state.lock().used_bytes
    }

    /// Refuses new loads, waits for loads in progress, and unloads every model. Call after in-flight
    /// requests have drained.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let evicted: Vec<Arc<Entry>> = {
            let mut state = self.inner.state.lock();
            let mut all = Vec::with_capacity(state.resident.len());
            while let Some((id, entry)) = state.resident.pop_lru() {
                state.used_bytes -= entry.size_bytes();
                self.inner.emit(CopyEvent::Gone(id));
                all.push(entry);
            }
            self.inner.publish(&state);
            all
        };
        let count = evicted.len();
        self.inner.retire(evicted).await;
        tracing::info!(models = count, "model cache unloaded");
    }

    /// Registers a load of `id` and returns its outcome's receiver with the load itself, which the
    /// caller starts once it has let go of the lock ([`Self::run_here_or_spawn`]).
    fn start_load(
        &self,
        state: &mut State,
        id: &ModelId,
    ) -> (watch::Receiver<Option<LoadOutcome>>, Option<BoxFuture<'static, ()>>) {
        let (tx, rx) = watch::channel(None);
        state.loading.insert(id.clone(), rx.clone());
        self.inner.emit(CopyEvent::Loading(id.clone()));
        metrics::gauge!(m::LOADING_MODELS).set(state.loading.len() as f64);
        let inner = self.inner.clone();
        let id = id.clone();
        let span = tracing::info_span!("load", model_id = %id);
        let load = tracing::Instrument::instrument(async move { inner.run_load(id, tx).await }, span);
        (rx, Some(self.inner.tasks.track_future(load).boxed()))
    }

    /// Runs a load on the caller's task as far as it goes without waiting, and hands it to a task of
    /// its own only if it has to wait (a pull, the blocking pool, room, a load slot).
    ///
    /// A small model's load usually finishes in that first step (`--inline-load-max-bytes`). Spawning
    /// it instead woke the other worker thread, which then often took the load or the answer over:
    /// about 40 µs of a first request's 150 µs of server time on the 2-core machine of bench/README.
    /// Once spawned, the load outlives the request that started it, as before: the first step runs in
    /// the same poll as `start_load`, so no cancellation falls between them.
    async fn run_here_or_spawn(&self, mut load: BoxFuture<'static, ()>) {
        if std::future::poll_fn(|cx| std::task::Poll::Ready(load.as_mut().poll(cx))).await.is_pending() {
            // Whatever the first step waits on re-registers the spawned task's waker when next polled.
            tokio::spawn(load);
        }
    }
}

impl Inner {
    fn rules(&self) -> Rules {
        Rules { min_residence: self.config.min_residence }
    }

    /// Frees at least `extra` bytes of headroom by evicting, treating the capacity as `allowance` bytes
    /// larger; the evicted entries are returned so the caller drops them outside the lock.
    fn make_room(
        &self,
        state: &mut State,
        extra: u64,
        allowance: u64,
    ) -> Result<Vec<Arc<Entry>>, eviction::Shortfall> {
        let needed = (state.used_bytes + extra).saturating_sub(self.config.capacity_bytes + allowance);
        if needed == 0 {
            return Ok(Vec::new());
        }
        let now = Instant::now();
        let decided = match self.eviction {
            Policy::LeastRecentlyUsed => {
                let candidates = state.least_recently_used(now, needed, self.rules());
                eviction::victims(&candidates, needed, self.eviction, self.rules(), state.clock)?
            }
            Policy::GreedyDualSizeFrequency => state.gdsf_victims(now, needed, self.rules())?,
        };
        state.clock = decided.clock;
        let mut evicted = Vec::with_capacity(decided.victims.len());
        for id in decided.victims {
            if let Some(entry) = state.resident.pop(&id) {
                state.used_bytes -= entry.size_bytes();
                let idle = now.saturating_duration_since(entry.last_used());
                tracing::info!(model_id = %id, size_bytes = entry.size_bytes(), idle_s = idle.as_secs(), "evicting model");
                metrics::counter!(m::CACHE_EVICTIONS).increment(1);
                state.evictions += 1;
                self.emit(CopyEvent::Gone(id.clone()));
                metrics::histogram!(m::AGE_AT_EVICTION).record(idle.as_secs_f64());
                evicted.push(entry);
            }
        }
        Ok(evicted)
    }

    /// Evicts what it can, without waiting, to bring the cache back under its capacity after loads
    /// whose measured sizes outgrew their predictions.
    fn trim(&self, state: &mut State) -> Vec<Arc<Entry>> {
        match self.make_room(state, 0, 0) {
            Ok(evicted) => evicted,
            Err(shortfall) if shortfall.evictable_bytes > 0 => {
                let partial = state.used_bytes - shortfall.evictable_bytes;
                let allowance = partial.saturating_sub(self.config.capacity_bytes);
                self.make_room(state, 0, allowance).unwrap_or_default()
            }
            Err(_) => Vec::new(),
        }
    }

    /// When the earliest model now protected by the minimum residence becomes evictable.
    fn next_residence_expiry(&self, state: &State) -> Option<Instant> {
        state
            .resident
            .iter()
            .map(|(_, e)| e.loaded_at() + self.config.min_residence)
            .filter(|t| *t > Instant::now())
            .min()
    }

    /// Drops models off the async threads: freeing a large session can take milliseconds.
    async fn retire(&self, entries: Vec<Arc<Entry>>) {
        if entries.is_empty() {
            return;
        }
        let count = entries.len() as u64;
        let started = Instant::now();
        let runtime = self.runtime.clone();
        let bytes: u64 = entries.iter().map(|e| e.size_bytes()).sum();
        let unreclaimed = &self.unreclaimed_bytes;
        let reclaim =
            unreclaimed.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes >= RECLAIM_AFTER_BYTES;
        if reclaim {
            unreclaimed.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = tokio::task::spawn_blocking(move || {
            drop(entries);
            if reclaim {
                runtime.reclaim_memory();
            }
        })
        .await;
        metrics::counter!(m::MODEL_UNLOADS).increment(count);
        metrics::histogram!(m::UNLOAD_DURATION).record(started.elapsed().as_secs_f64());
        self.room_freed.notify_waiters();
    }

    fn emit(&self, event: CopyEvent) {
        // Nobody listening (no placement publisher) is fine.
        let _ = self.copies.send(event);
    }

    /// Publishes the gauges that follow the state, in constant time: it runs under the state lock
    /// on every load and eviction.
    fn publish(&self, state: &State) {
        metrics::gauge!(m::USED_BYTES).set(state.used_bytes as f64);
        metrics::gauge!(m::MODELS_LOADED).set(state.resident.len() as f64);
        let bps = (state.used_bytes as f64 * 10_000.0 / self.config.capacity_bytes.max(1) as f64).round();
        metrics::gauge!(m::USED_BPS).set(bps);
    }

    /// What placement reads of this pod that needs no walk of its models.
    fn placement_counts(&self, state: &State) -> PlacementState {
        let resident = state.resident.len() as u64;
        PlacementState {
            capacity_bytes: self.config.capacity_bytes,
            used_bytes: state.used_bytes,
            loading: state.loading.len() as u64,
            models_loaded: resident,
            size_factor: state.size_factor,
            // Charged bytes less load reservations is what the loaded models hold: no walk.
            mean_model_bytes: (resident > 0)
                .then(|| state.used_bytes.saturating_sub(state.reserved_bytes) / resident),
            ..PlacementState::default()
        }
    }

    /// Publishes the gauges that age with time (failures in back-off, and the LRU model's idle time
    /// `lru_idle`, read from placement's walk): once per scrape, not per load, which with thousands
    /// of models made every load as slow as a walk of them all.
    fn publish_aging(&self, state: &State, lru_idle: Option<Duration>) {
        let now = Instant::now();
        let failing = state.failures.values().filter(|f| f.retry_at > now).count();
        metrics::gauge!(m::MODELS_WITH_FAILURE).set(failing as f64);
        let age = lru_idle.unwrap_or_default();
        metrics::gauge!(m::LRU_AGE).set(age.as_secs_f64());
        let last_used = std::time::SystemTime::now()
            .checked_sub(age)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(m::LRU_LAST_USED).set(if lru_idle.is_some() { last_used } else { 0.0 });
    }
}
