//! A loaded model in the cache, and the leases requests hold on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use densemesh_placement::ModelId;
use densemesh_placement::eviction::Clock;
use densemesh_runtime_core::{LoadedModel, ModelMetadata};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

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
    /// Moving average of recent inference times (`None` before the first), to decide whether a request
    /// may run inline on the async executor.
    typical_infer_time: Mutex<Option<Duration>>,
    room_freed: Arc<Notify>,
}

impl Entry {
    pub(super) fn new(
        id: ModelId,
        model: Box<dyn LoadedModel>,
        version: Option<u64>,
        load_time: Duration,
        room_freed: Arc<Notify>,
    ) -> Self {
        let now = Instant::now();
        Self {
            id,
            size_bytes: model.size_bytes(),
            model,
            version,
            loaded_at: now,
            load_time,
            last_used: Mutex::new(now),
            clock_at_use: AtomicU64::new(0f64.to_bits()),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            typical_infer_time: Mutex::new(None),
            room_freed,
        }
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

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Moving average of recent inference times; `None` before the first inference.
    pub fn typical_infer_time(&self) -> Option<Duration> {
        *self.typical_infer_time.lock()
    }

    /// Folds one inference time into the moving average (weight 1/8).
    pub fn record_infer_time(&self, took: Duration) {
        let mut typical = self.typical_infer_time.lock();
        *typical = Some(match *typical {
            None => took,
            Some(old) => old - old / 8 + took / 8,
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

    /// Counts the model as last used at `at` (eviction picks the longest idle), for loads made ahead of
    /// any request or with a caller-given last-use time.
    pub fn mark_last_used(&self, at: Instant) {
        *self.entry.last_used.lock() = at;
    }
}

#[cfg(test)]
impl Lease {
    /// A lease on a model held by no cache, for tests of what runs on leased models (the worker).
    pub(crate) fn detached(id: ModelId, model: Box<dyn LoadedModel>) -> Self {
        let entry = Entry::new(id, model, None, Duration::ZERO, Arc::new(Notify::new()));
        Self::new(Arc::new(entry), Clock::default())
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
