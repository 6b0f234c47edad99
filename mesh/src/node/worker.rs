//! Where inference runs: never for long on the async executor.
//!
//! A model whose inferences typically finish within `inline_below` (tiny models, tens of microseconds)
//! runs inline, which saves a thread hand-off that would cost more than the inference; anything slower
//! runs on the blocking pool, at most `concurrency` at once, with at most `max_queued` waiting beyond
//! that, so overload turns into RESOURCE_EXHAUSTED instead of unbounded memory. How long each model's
//! inferences waited for a worker is kept per model ([`QueueWaits`]): past a threshold, the model gets
//! a copy on another pod.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use densemesh_placement::ModelId;
use densemesh_placement::copies::QueueWait;
use densemesh_runtime_core::{InferRequest, Tensor};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::node::cache::Lease;
use crate::error::MeshError;
use crate::metrics as m;

/// Limits of the inference worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub concurrency: usize,
    pub max_queued: usize,
    pub inline_below: Duration,
}

/// Runs inferences; cloneable.
#[derive(Clone)]
pub struct Worker {
    config: WorkerConfig,
    infer_duration: metrics::Histogram,
    running: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    queue_waits: QueueWaits,
}

/// Per model, how long its inferences waited for a worker since the last [`take`](Self::take); shared
/// by every clone. Models that run inline never wait and are not recorded.
#[derive(Clone, Default)]
pub struct QueueWaits(Arc<Mutex<HashMap<ModelId, QueueWait>>>);

impl QueueWaits {
    fn record(&self, id: &ModelId, waited: Duration) {
        let mut waits = self.0.lock();
        match waits.get_mut(id) {
            Some(wait) => wait.record(waited),
            None => waits.entry(id.clone()).or_default().record(waited),
        }
    }

    /// The waits recorded since the last call, and a fresh start: each call covers one check interval,
    /// and a model that stopped being used (or was evicted) drops out.
    pub fn take(&self) -> HashMap<ModelId, QueueWait> {
        std::mem::take(&mut *self.0.lock())
    }
}

impl Worker {
    pub fn new(config: WorkerConfig) -> Self {
        let running = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let infer_duration = metrics::histogram!(m::INFER_DURATION);
        let queued = Arc::new(AtomicUsize::new(0));
        Self { config, infer_duration, running, queued, queue_waits: QueueWaits::default() }
    }

    /// How long each model's inferences waited for a worker, for adding copies of the ones that queue.
    pub fn queue_waits(&self) -> QueueWaits {
        self.queue_waits.clone()
    }

    /// Runs one inference on a leased model; the lease is held until it finishes.
    pub async fn infer(&self, lease: Lease, request: InferRequest) -> Result<Vec<Tensor>, MeshError> {
        if lease.typical_infer_time().is_some_and(|t| t < self.config.inline_below) {
            return run(&lease, request, &self.infer_duration);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.config.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(MeshError::Overloaded(format!(
                "{} inferences are already waiting (--max-queued-inferences); retry later",
                self.config.max_queued
            )));
        }
        let waited = Instant::now();
        let permit = self.running.clone().acquire_owned().await;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        let permit =
            permit.map_err(|_| MeshError::Overloaded("the inference worker is closed".to_owned()))?;
        let waited = waited.elapsed();
        metrics::histogram!(m::QUEUE_WAIT).record(waited.as_secs_f64());
        self.queue_waits.record(lease.id(), waited);
        let span = tracing::Span::current();
        let infer_duration = self.infer_duration.clone();
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let result = run(&lease, request, &infer_duration);
            drop(permit);
            result
        })
        .in_current_span()
        .await
        .map_err(|e| MeshError::Internal(format!("inference task failed: {e}")))?
    }
}

fn run(
    lease: &Lease,
    request: InferRequest,
    infer_duration: &metrics::Histogram,
) -> Result<Vec<Tensor>, MeshError> {
    let started = Instant::now();
    let result = lease.model().infer(request);
    let took = started.elapsed();
    lease.record_infer_time(took);
    infer_duration.record(took.as_secs_f64());
    result.map_err(|source| MeshError::Runtime { model_id: lease.id().clone(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_waits_are_kept_per_model_and_start_afresh_once_taken() {
        let waits = QueueWaits::default();
        let (a, b) = (ModelId::new("a").unwrap(), ModelId::new("b").unwrap());
        let shared = waits.clone();
        shared.record(&a, Duration::from_millis(30));
        shared.record(&a, Duration::from_millis(10));
        shared.record(&b, Duration::ZERO);
        let taken = waits.take();
        assert_eq!(taken[&a].mean(), Some(Duration::from_millis(20)));
        assert_eq!(taken[&a].samples, 2);
        assert_eq!(taken[&b].mean(), Some(Duration::ZERO));
        assert!(waits.take().is_empty(), "the next interval starts empty");
    }
}
