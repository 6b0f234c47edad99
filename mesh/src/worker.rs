//! Where inference runs: never for long on the async executor.
//!
//! A model whose inferences typically finish within `inline_below` (tiny models, tens of microseconds)
//! runs inline, which saves a thread hand-off that would cost more than the inference; anything slower
//! runs on the blocking pool, at most `concurrency` at once, with at most `max_queued` waiting beyond
//! that, so overload turns into RESOURCE_EXHAUSTED instead of unbounded memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use densemesh_runtime_core::{InferRequest, Tensor};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::cache::Lease;
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
}

impl Worker {
    pub fn new(config: WorkerConfig) -> Self {
        let running = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let infer_duration = metrics::histogram!(m::INFER_DURATION);
        Self { config, infer_duration, running, queued: Arc::new(AtomicUsize::new(0)) }
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
        metrics::histogram!(m::QUEUE_WAIT).record(waited.elapsed().as_secs_f64());
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
