//! A loaded model in the cache, and the leases requests hold on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use densemesh_placement::ModelId;
use densemesh_placement::eviction::Clock;
use densemesh_placement::gpu::Gpu;
use densemesh_runtime_core::{LoadedModel, ModelMetadata};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// An inference time counts at most this many times the typical one in the moving average.
const OUTLIER_FACTOR: u32 = 4;
/// `Entry::requests_looked` of a copy the copy rules have not looked at yet.
const NOT_LOOKED: u64 = u64::MAX;

/// A model in memory. Dropped (and its memory freed) when the cache lets go of it and no lease holds it.
pub struct Entry {
    id: ModelId,
    model: Box<dyn LoadedModel>,
    version: Option<u64>,
    size_bytes: u64,
    loaded_at: Instant,
    /// How long the runtime took to load it: what evicting it would cost to undo (GDSF's reload cost).
    load_time: Duration,
    last_used: Mutex<Instant>,
    /// The cache's GDSF clock at its last use (an `f64`'s bits): its priority's base.
    clock_at_use: AtomicU64,
    in_flight: AtomicUsize,
    /// Requests served since load, for the request rate that decides copies.
    requests: AtomicU64,
    /// `requests` when the copy rules last looked ([`NOT_LOOKED`] before the first look).
    requests_looked: AtomicU64,
    /// Moving average of recent inference times (`None` before the first), to decide whether a request
    /// may run inline on the async executor.
    typical_infer_time: Mutex<Option<Duration>>,
    room_freed: Arc<Notify>,
    /// What its registration asks of GPUs, as it was when the model loaded: a change of the ask
    /// replaces the copy (`ModelSpec::reloads`), so it never goes stale.
    gpu_ask: Option<Gpu>,
}

impl Entry {
    /// `size_bytes`: the charge, the model's own size and its copy's bookkeeping.
    pub(super) fn new(
        id: ModelId,
        model: Box<dyn LoadedModel>,
        size_bytes: u64,
        version: Option<u64>,
        load_time: Duration,
        room_freed: Arc<Notify>,
    ) -> Self {
        let now = Instant::now();
        Self {
            id,
            size_bytes,
            model,
            version,
            loaded_at: now,
            load_time,
            last_used: Mutex::new(now),
            clock_at_use: AtomicU64::new(0f64.to_bits()),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            requests_looked: AtomicU64::new(NOT_LOOKED),
            typical_infer_time: Mutex::new(None),
            room_freed,
            gpu_ask: None,
        }
    }

    /// The same entry for a model whose registration asks `gpu` of GPUs.
    pub(super) fn asking_gpu(mut self, gpu: Option<Gpu>) -> Self {
        self.gpu_ask = gpu;
        self
    }

    /// What its registration asks of GPUs (the GPU tier reads it before every call).
    pub fn gpu_ask(&self) -> Option<Gpu> {
        self.gpu_ask
    }

    /// Which model this is, for errors, logs and per-model accounting.
    pub fn id(&self) -> &ModelId {
        &self.id
    }

    /// The runtime's model, to run inferences on while a lease holds it.
    pub fn model(&self) -> &dyn LoadedModel {
        &*self.model
    }

    /// The model's inputs and outputs, to validate requests before they reach the runtime.
    pub fn metadata(&self) -> &ModelMetadata {
        self.model.metadata()
    }

    /// The repository version directory it was loaded from, if versioned.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// The runtime that loaded the model ([`LoadedModel::runtime`]).
    pub fn runtime(&self) -> &str {
        self.model.runtime()
    }

    /// The measured size this model is charged against the capacity.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub(super) fn loaded_at(&self) -> Instant {
        self.loaded_at
    }

    pub(super) fn last_used(&self) -> Instant {
        *self.last_used.lock()
    }

    pub(super) fn load_time(&self) -> Duration {
        self.load_time
    }

    pub(super) fn clock_at_use(&self) -> Clock {
        Clock(f64::from_bits(self.clock_at_use.load(Ordering::Relaxed)))
    }

    /// Requests served since the model was loaded here.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests served since the previous call; 0 on the first, when the interval is unknown.
    pub(super) fn requests_since_last_look(&self) -> u64 {
        let now = self.requests();
        match self.requests_looked.swap(now, Ordering::Relaxed) {
            NOT_LOOKED => 0,
            before => now.saturating_sub(before),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Moving average of recent inference times; `None` before the first inference.
    pub fn typical_infer_time(&self) -> Option<Duration> {
        *self.typical_infer_time.lock()
    }

    /// Folds one inference time into the moving average (weight 1/8), a time over
    /// [`OUTLIER_FACTOR`] times the average counting as that much.
    ///
    /// A thread the OS preempts mid-inference measures its time off the CPU too: on a busy machine a
    /// 20 µs inference now and then takes milliseconds. Folded whole, one such outlier lifted a tiny
    /// model's average past `--inline-infer-below` for the next dozen requests, which then took the
    /// blocking pool (a thread hand-off, a thread that must be scheduled, a worker slot held while it
    /// waits for a core) and queued the requests behind them: the latency tail. Clamped, an isolated
    /// outlier raises the average by 3/8 at most, while a model that really got slower still crosses
    /// a threshold within a few requests (the average grows by up to 11/8 per request: five to
    /// cross 100 µs from 20 µs).
    pub fn record_infer_time(&self, took: Duration) {
        let mut typical = self.typical_infer_time.lock();
        *typical = Some(match *typical {
            None => took,
            // At least 1 µs, so an average that measured zero can still grow.
            Some(old) => old - old / 8 + took.min(old.max(Duration::from_micros(1)) * OUTLIER_FACTOR) / 8,
        });
    }
}

/// A request's hold on a loaded model: while any lease exists the model is never evicted.
pub struct Lease {
    entry: Arc<Entry>,
}

/// Which copy a lease was on, without keeping it alive: a caller that finds the copy broken drops
/// that copy, not a newer one loaded meanwhile.
#[derive(Debug, Clone)]
pub struct HeldCopy(std::sync::Weak<Entry>);

impl HeldCopy {
    pub(super) fn is(&self, entry: &Arc<Entry>) -> bool {
        std::ptr::eq(self.0.as_ptr(), Arc::as_ptr(entry))
    }
}

impl Lease {
    /// The copy this lease is on.
    pub fn copy(&self) -> HeldCopy {
        HeldCopy(Arc::downgrade(&self.entry))
    }

    /// A use of `entry` at the cache's GDSF `clock` (read under the cache's lock, like eviction).
    pub(super) fn new(entry: Arc<Entry>, clock: Clock) -> Self {
        entry.in_flight.fetch_add(1, Ordering::AcqRel);
        entry.requests.fetch_add(1, Ordering::Relaxed);
        entry.clock_at_use.store(clock.0.to_bits(), Ordering::Relaxed);
        *entry.last_used.lock() = Instant::now();
        Self { entry }
    }

    /// The leased model as a shared handle, for callers that need the `Arc` rather than `Deref`.
    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    /// Sets the model's last use; [`super::ModelCache::mark_last_used`] keeps the cache's order with it.
    pub(super) fn set_last_used(&self, at: Instant) {
        *self.entry.last_used.lock() = at;
    }
}

#[cfg(test)]
impl Lease {
    /// A lease on a model held by no cache, for tests of what runs on leased models (the worker).
    pub(crate) fn detached(id: ModelId, model: Box<dyn LoadedModel>) -> Self {
        let size = model.size_bytes();
        let entry = Entry::new(id, model, size, None, Duration::ZERO, Arc::new(Notify::new()));
        Self::new(Arc::new(entry), Clock::default())
    }

    /// A lease on a model held by no cache whose registration asks `gpu` of GPUs.
    pub(crate) fn detached_asking(id: ModelId, model: Box<dyn LoadedModel>, gpu: Option<Gpu>) -> Self {
        let size = model.size_bytes();
        let entry =
            Entry::new(id, model, size, None, Duration::ZERO, Arc::new(Notify::new())).asking_gpu(gpu);
        Self::new(Arc::new(entry), Clock::default())
    }

    /// Another lease on the model of `entry`, as a new request takes one.
    pub(crate) fn detached_from(entry: Arc<Entry>) -> Self {
        Self::new(entry, Clock::default())
    }
}

impl std::ops::Deref for Lease {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.entry.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.entry.room_freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing(ModelMetadata);

    impl LoadedModel for Nothing {
        fn metadata(&self) -> &ModelMetadata {
            &self.0
        }

        fn size_bytes(&self) -> u64 {
            1
        }

        fn runtime(&self) -> &str {
            "nothing"
        }

        fn infer(
            &self,
            _: densemesh_runtime_core::InferRequest,
        ) -> densemesh_runtime_core::Result<Vec<densemesh_runtime_core::Tensor>> {
            Ok(vec![])
        }
    }

    fn fresh_entry() -> Entry {
        let metadata = ModelMetadata { platform: "test".into(), inputs: vec![], outputs: vec![] };
        let id = ModelId::new("m").unwrap();
        Entry::new(id, Box::new(Nothing(metadata)), 0, None, Duration::ZERO, Arc::new(Notify::new()))
    }

    const FAST: Duration = Duration::from_micros(20);
    const THRESHOLD: Duration = Duration::from_micros(100);

    #[test]
    fn a_fast_model_preempted_now_and_then_stays_typically_fast() {
        let entry = fresh_entry();
        entry.record_infer_time(FAST);
        // Four inferences in a row each held off the CPU for a 4 ms time slice, then one in ten.
        for _ in 0..4 {
            entry.record_infer_time(Duration::from_millis(4));
            assert!(entry.typical_infer_time().unwrap() < THRESHOLD, "{:?}", entry.typical_infer_time());
        }
        for i in 0..100 {
            entry.record_infer_time(if i % 10 == 9 { Duration::from_millis(4) } else { FAST });
            assert!(entry.typical_infer_time().unwrap() < THRESHOLD, "{i}: {:?}", entry.typical_infer_time());
        }
    }

    #[test]
    fn a_model_that_got_slow_is_typically_slow_within_a_few_inferences() {
        let entry = fresh_entry();
        for _ in 0..20 {
            entry.record_infer_time(FAST);
        }
        let slow_after = (1..)
            .find(|_| {
                entry.record_infer_time(Duration::from_millis(2));
                entry.typical_infer_time().unwrap() >= THRESHOLD
            })
            .unwrap();
        assert!(slow_after <= 6, "{slow_after} inferences");
        // And the first inference, whatever it took, is the average until others come.
        let first = fresh_entry();
        first.record_infer_time(Duration::from_millis(2));
        assert_eq!(first.typical_infer_time(), Some(Duration::from_millis(2)));
        // An average that measured zero still grows.
        let zero = fresh_entry();
        zero.record_infer_time(Duration::ZERO);
        zero.record_infer_time(Duration::from_millis(2));
        assert!(zero.typical_infer_time().unwrap() > Duration::ZERO);
    }
}
