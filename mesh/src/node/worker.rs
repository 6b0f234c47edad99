//! Where inference runs: never for long on the async executor.
//!
//! A model whose inferences typically finish within `inline_below` (tiny models, tens of microseconds)
//! runs inline when the request is small (at most `inline_max_bytes` of input tensors), which saves a
//! thread hand-off that would cost more than the inference; anything slower or larger runs on the
//! blocking pool. Every inference, inline or not, holds one of `concurrency` slots while it runs, and at
//! most `max_queued` wait for a slot beyond those, so overload turns into RESOURCE_EXHAUSTED instead of
//! unbounded memory. How long each model's inferences waited for a slot is kept per model
//! ([`QueueWaits`]): past a threshold, the model gets a copy on another pod.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use densemesh_placement::ModelId;
use densemesh_placement::copies::QueueWait;
use densemesh_runtime_core::{InferRequest, LoadedModel, Tensor, TensorData};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tracing::Instrument;

use crate::error::MeshError;
use crate::metrics as m;
use crate::node::cache::Lease;
use crate::node::gpu::GpuTier;

/// Limits of the inference worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Inferences running at once, inline ones included (`--infer-threads`).
    pub concurrency: usize,
    /// Inferences that may wait for a free slot before requests are refused (`--max-queued-inferences`).
    pub max_queued: usize,
    /// Models whose inferences typically take less run inline, skipping a thread hand-off
    /// (`--inline-infer-below`).
    pub inline_below: Duration,
    /// Requests with more input tensor bytes than this never run inline, however fast their model
    /// usually is: the typical time was measured on typical requests, and a large one could hold the
    /// async thread far longer (`--inline-infer-max-bytes`).
    pub inline_max_bytes: u64,
}

/// Runs inferences; cloneable.
#[derive(Clone)]
pub struct Worker {
    config: WorkerConfig,
    infer_duration: metrics::Histogram,
    /// One permit per inference running, inline or on the blocking pool.
    running: Arc<Semaphore>,
    /// Inferences waiting for a permit.
    queued: Arc<AtomicUsize>,
    queue_waits: QueueWaits,
    /// Puts models onto GPUs before their calls (empty on a pod without any).
    gpu: GpuTier,
}

/// Per model, how long its inferences waited for a worker since the last [`take`](Self::take); shared
/// by every clone. Inferences that run inline never wait and are not recorded.
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
    /// A worker with its own slots and queue; clones share them.
    pub fn new(config: WorkerConfig) -> Self {
        let running = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let infer_duration = metrics::histogram!(m::INFER_DURATION);
        let queued = Arc::new(AtomicUsize::new(0));
        Self {
            config,
            infer_duration,
            running,
            queued,
            queue_waits: QueueWaits::default(),
            gpu: GpuTier::none(),
        }
    }

    /// The same worker, placing models on `gpu`'s devices before their calls.
    pub fn with_gpu_tier(mut self, gpu: GpuTier) -> Self {
        self.gpu = gpu;
        self
    }

    /// How long each model's inferences waited for a worker, for adding copies of the ones that queue.
    pub fn queue_waits(&self) -> QueueWaits {
        self.queue_waits.clone()
    }

    /// Runs one inference on a leased model; the lease is held until it finishes.
    pub async fn infer(&self, lease: Lease, request: InferRequest) -> Result<Vec<Tensor>, MeshError> {
        // A model served by another process is awaited right here. It takes no slot: it uses no CPU in
        // this process, and its runtime's own slots bound its calls.
        let request = match lease.model().infer_async(request) {
            Ok(call) => {
                let started = Instant::now();
                let result = call.await;
                return finish(&lease, started, result, &self.infer_duration);
            }
            Err(request) => request,
        };
        // A model that must be put on a GPU first runs on the blocking pool: the copy blocks.
        let placing = self.gpu.before_call(&lease);
        let inline = !placing && self.runs_inline(&lease, &request);
        let permit = match self.running.clone().try_acquire_owned() {
            Ok(permit) => {
                if !inline {
                    self.record_wait(lease.id(), Duration::ZERO);
                }
                permit
            }
            // Inline or not, an inference that finds every slot taken waits its turn in the queue.
            Err(TryAcquireError::NoPermits) => self.wait_for_slot(lease.id()).await?,
            Err(TryAcquireError::Closed) => return Err(closed()),
        };
        // An inline inference that waited for its slot still runs inline: on the blocking pool it would
        // hold the slot while its thread waits for a core, so the next fast inference found no slot
        // either, and one slow moment kept a chain of them off the executor (2% of a tiny model's
        // inferences at c=16 on 2 cores, each a thread hand-off).
        if inline {
            let result = run(&lease, request, &self.infer_duration);
            drop(permit);
            return result;
        }
        let span = tracing::Span::current();
        let infer_duration = self.infer_duration.clone();
        let gpu = placing.then(|| self.gpu.clone());
        tokio::task::spawn_blocking(move || {
            // Entered only inside this synchronous closure, never across an await.
            let _enter = span.enter();
            if let Some(gpu) = gpu {
                gpu.place(&lease)?;
            }
            let result = run(&lease, request, &infer_duration);
            drop(permit);
            result
        })
        .in_current_span()
        .await
        .map_err(|e| MeshError::Internal(format!("inference task failed: {e}")))?
    }

    /// Whether an inference is cheap enough to run on the async thread: a model that is typically fast,
    /// and a request no larger than the ones that made it look fast.
    fn runs_inline(&self, lease: &Lease, request: &InferRequest) -> bool {
        lease.typical_infer_time().is_some_and(|t| t < self.config.inline_below)
            && input_bytes(request) <= self.config.inline_max_bytes
    }

    /// Waits in the bounded queue for a slot; refused at once when the queue is full.
    async fn wait_for_slot(&self, id: &ModelId) -> Result<OwnedSemaphorePermit, MeshError> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.config.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(MeshError::Overloaded(format!(
                "{} inferences are already waiting (--max-queued-inferences); retry later",
                self.config.max_queued
            )));
        }
        // Leaves the queue however the wait ends: a client that goes away drops this future mid-wait.
        let _waiting = LeaveQueue(&self.queued);
        let waited = Instant::now();
        let permit = self.running.clone().acquire_owned().await.map_err(|_| closed())?;
        self.record_wait(id, waited.elapsed());
        Ok(permit)
    }

    fn record_wait(&self, id: &ModelId, waited: Duration) {
        metrics::histogram!(m::QUEUE_WAIT).record(waited.as_secs_f64());
        self.queue_waits.record(id, waited);
    }
}

/// Takes an inference off the queue count when dropped.
struct LeaveQueue<'a>(&'a AtomicUsize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn closed() -> MeshError {
    MeshError::Overloaded("the inference worker is closed".to_owned())
}

/// Bytes of a request's input tensors, the measure of its size that decides inline runs.
fn input_bytes(request: &InferRequest) -> u64 {
    request
        .inputs
        .iter()
        .map(|input| match &input.data {
            TensorData::Raw(bytes) => bytes.len() as u64,
            TensorData::Strings(elements) => elements.iter().map(|e| e.len() as u64).sum(),
        })
        .sum()
}

fn run(
    lease: &Lease,
    request: InferRequest,
    infer_duration: &metrics::Histogram,
) -> Result<Vec<Tensor>, MeshError> {
    let started = Instant::now();
    let result = lease.model().infer(request);
    finish(lease, started, result, infer_duration)
}

/// The most a model may hold for [`probe_infer_time`] to try it: past this an inference is rarely
/// fast enough to run inline anyway, and the probe would only lengthen the load.
pub(crate) const PROBE_MAX_MODEL_BYTES: u64 = 1 << 20;
/// The most elements a probe's input may have (its dynamic dimensions are 1).
const PROBE_MAX_ELEMENTS: usize = 4096;

/// How long one inference on a batch of one all-zero input takes, run right after a small model loads
/// (on the load's blocking thread): a model with no time yet never runs inline, so without it a tiny
/// model's first request paid a round trip through the blocking pool on top of its load. `None` when
/// the model cannot be probed: it runs in another process, takes strings, declares no inputs, has a
/// large fixed shape, or fails (or panics) on zeros.
pub(crate) fn probe_infer_time(model: &dyn LoadedModel) -> Option<Duration> {
    if model.passthrough().is_some() || model.size_bytes() > PROBE_MAX_MODEL_BYTES {
        return None;
    }
    let specs = &model.metadata().inputs;
    if specs.is_empty() {
        return None;
    }
    let mut inputs = Vec::with_capacity(specs.len());
    for spec in specs {
        let size = spec.datatype.element_size()?;
        let shape: Vec<i64> = spec.shape.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))?;
        if elements > PROBE_MAX_ELEMENTS {
            return None;
        }
        let data = TensorData::Raw(bytes::Bytes::from(vec![0u8; elements * size]));
        inputs.push(Tensor { name: spec.name.clone(), datatype: spec.datatype, shape, data });
    }
    let started = Instant::now();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.infer(InferRequest { inputs, outputs: Vec::new() })
    }));
    let took = started.elapsed();
    matches!(ran, Ok(Ok(_))).then_some(took)
}

/// Records an inference's time for the model and the histogram, and types its error.
fn finish(
    lease: &Lease,
    started: Instant,
    result: densemesh_runtime_core::Result<Vec<Tensor>>,
    infer_duration: &metrics::Histogram,
) -> Result<Vec<Tensor>, MeshError> {
    let took = started.elapsed();
    lease.record_infer_time(took);
    infer_duration.record(took.as_secs_f64());
    result.map_err(|source| MeshError::Runtime { model_id: lease.id().clone(), source })
}

#[cfg(test)]
mod tests {
    use std::thread::ThreadId;

    use bytes::Bytes;
    use densemesh_runtime_core::{DataType, LoadedModel, ModelMetadata};
    use parking_lot::Condvar;
    use tokio::sync::Notify;

    use super::*;

    /// What a [`ProbeModel`] saw: where each inference ran and how many worker slots were free then.
    #[derive(Default)]
    struct Probe {
        slots: std::sync::OnceLock<Arc<Semaphore>>,
        seen: Mutex<Vec<Seen>>,
        /// An inference whose first input is named `hold` waits here until the test opens it.
        open: Mutex<bool>,
        opened: Condvar,
        held: Notify,
    }

    #[derive(Debug, Clone, Copy)]
    struct Seen {
        thread: ThreadId,
        free_slots: usize,
    }

    impl Probe {
        fn release(&self) {
            *self.open.lock() = true;
            self.opened.notify_all();
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().clone()
        }
    }

    /// Releases held inferences when dropped, so a failing test ends instead of waiting on them.
    struct ReleaseOnDrop(Arc<Probe>);

    impl Drop for ReleaseOnDrop {
        fn drop(&mut self) {
            self.0.release();
        }
    }

    /// A model double that echoes its inputs and reports to its [`Probe`]; a `remote` one is served
    /// "elsewhere": its inference is a future, and a blocking `infer` is a bug.
    struct ProbeModel {
        probe: Arc<Probe>,
        metadata: ModelMetadata,
        remote: bool,
    }

    impl LoadedModel for ProbeModel {
        fn metadata(&self) -> &ModelMetadata {
            &self.metadata
        }

        fn size_bytes(&self) -> u64 {
            1
        }

        fn runtime(&self) -> &str {
            "probe"
        }

        fn infer(&self, request: InferRequest) -> densemesh_runtime_core::Result<Vec<Tensor>> {
            assert!(
                !self.remote,
                "a model with an async inference is awaited, never called on a blocking thread"
            );
            let free_slots = self.probe.slots.get().expect("the probe knows its worker").available_permits();
            self.probe.seen.lock().push(Seen { thread: std::thread::current().id(), free_slots });
            if request.inputs.first().is_some_and(|input| input.name == "hold") {
                self.probe.held.notify_one();
                let mut open = self.probe.open.lock();
                while !*open {
                    self.probe.opened.wait(&mut open);
                }
            }
            Ok(request.inputs)
        }

        fn infer_async(
            &self,
            request: InferRequest,
        ) -> Result<densemesh_runtime_core::InferFuture, InferRequest> {
            if !self.remote {
                return Err(request);
            }
            let probe = self.probe.clone();
            Ok(Box::pin(async move {
                let free_slots = probe.slots.get().expect("the probe knows its worker").available_permits();
                probe.seen.lock().push(Seen { thread: std::thread::current().id(), free_slots });
                tokio::task::yield_now().await;
                Ok(request.inputs)
            }))
        }
    }

    fn worker(concurrency: usize, max_queued: usize, probe: &Arc<Probe>) -> Worker {
        let worker = Worker::new(WorkerConfig {
            concurrency,
            max_queued,
            inline_below: Duration::from_millis(1),
            inline_max_bytes: 1024,
        });
        probe.slots.set(worker.running.clone()).expect("one worker per probe");
        worker
    }

    /// A lease on a model that counts as fast (typically well under `inline_below`) or not yet timed.
    fn lease(id: &str, probe: &Arc<Probe>, fast: bool) -> Lease {
        let metadata = ModelMetadata { platform: "probe".into(), inputs: vec![], outputs: vec![] };
        let model = ProbeModel { probe: probe.clone(), metadata, remote: false };
        let lease = Lease::detached(ModelId::new(id).unwrap(), Box::new(model));
        if fast {
            lease.record_infer_time(Duration::from_micros(1));
        }
        lease
    }

    /// Starts a slow model's inference, and returns once it holds its slot (until the probe opens).
    async fn holding_a_slot(
        worker: &Worker,
        probe: &Arc<Probe>,
    ) -> tokio::task::JoinHandle<Result<Vec<Tensor>, MeshError>> {
        let held = probe.held.notified();
        let slow = {
            let worker = worker.clone();
            let lease = lease("slow", probe, false);
            tokio::spawn(async move { worker.infer(lease, request("hold", 16)).await })
        };
        held.await;
        slow
    }

    fn request(name: &str, bytes: usize) -> InferRequest {
        let input = Tensor {
            name: name.to_owned(),
            datatype: DataType::Uint8,
            shape: vec![bytes as i64],
            data: TensorData::Raw(Bytes::from(vec![0u8; bytes])),
        };
        InferRequest { inputs: vec![input], outputs: vec![] }
    }

    #[tokio::test]
    async fn a_small_request_on_a_fast_model_runs_inline_and_holds_a_slot() {
        let probe = Arc::new(Probe::default());
        let worker = worker(2, 4, &probe);
        worker.infer(lease("fast", &probe, true), request("x", 16)).await.unwrap();
        let seen = probe.seen();
        assert_eq!(seen[0].thread, std::thread::current().id(), "ran on the async thread");
        assert_eq!(seen[0].free_slots, 1, "an inline inference counts against --infer-threads");
        assert_eq!(worker.running.available_permits(), 2, "and gives its slot back");
    }

    #[tokio::test]
    async fn a_large_request_on_a_fast_model_runs_on_the_blocking_pool() {
        let probe = Arc::new(Probe::default());
        let worker = worker(2, 4, &probe);
        worker.infer(lease("fast", &probe, true), request("x", 4096)).await.unwrap();
        let seen = probe.seen();
        assert_ne!(seen[0].thread, std::thread::current().id(), "4 KiB > --inline-infer-max-bytes");
        assert_eq!(seen[0].free_slots, 1);
        // As fast a model with a small request runs inline: the size decided.
        worker.infer(lease("fast", &probe, true), request("x", 1024)).await.unwrap();
        assert_eq!(probe.seen()[1].thread, std::thread::current().id());
    }

    #[tokio::test]
    async fn inline_inferences_wait_their_turn_and_are_refused_when_the_queue_is_full() {
        let probe = Arc::new(Probe::default());
        let worker = worker(1, 1, &probe);
        let _release = ReleaseOnDrop(probe.clone());
        let test_thread = std::thread::current().id();
        // A slow model's inference takes the only slot and holds it.
        let slow = holding_a_slot(&worker, &probe).await;
        assert_eq!(worker.running.available_permits(), 0);

        // A fast, small request finds no slot: it queues instead of running inline beside the other.
        let queued = {
            let worker = worker.clone();
            let lease = lease("fast", &probe, true);
            tokio::spawn(async move { worker.infer(lease, request("x", 16)).await })
        };
        while worker.queued.load(Ordering::Acquire) == 0 && !queued.is_finished() {
            tokio::task::yield_now().await;
        }
        assert!(!queued.is_finished(), "it waits for the slot instead of running inline");
        assert_eq!(probe.seen().len(), 1, "the queued inference has not run");

        // With the queue full, the next one is refused at once, fast model or not.
        let refused = worker.infer(lease("fast", &probe, true), request("x", 16)).await;
        assert!(matches!(refused, Err(MeshError::Overloaded(_))), "{refused:?}");
        assert_eq!(probe.seen().len(), 1, "the refused inference did not run");

        probe.release();
        slow.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
        let seen = probe.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].thread, test_thread, "after waiting it still runs inline");
        assert_eq!(seen[1].free_slots, 0, "the slow one's slot was handed over, not shared");
        assert_eq!(worker.running.available_permits(), 1);
        assert_eq!(worker.queue_waits().take()[&ModelId::new("fast").unwrap()].samples, 1);
    }

    #[tokio::test]
    async fn a_queued_inference_whose_client_went_away_leaves_the_queue() {
        let probe = Arc::new(Probe::default());
        let worker = worker(1, 1, &probe);
        let _release = ReleaseOnDrop(probe.clone());
        let slow = holding_a_slot(&worker, &probe).await;
        // The server drops a request's future when its client disconnects, mid-wait here.
        let gone = {
            let worker = worker.clone();
            let lease = lease("fast", &probe, true);
            tokio::spawn(async move { worker.infer(lease, request("x", 16)).await })
        };
        while worker.queued.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(worker.queued.load(Ordering::Acquire), 0, "its place in the queue is free again");

        probe.release();
        slow.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_remote_model_is_awaited_on_the_async_thread_without_a_slot() {
        let probe = Arc::new(Probe::default());
        let worker = worker(1, 0, &probe);
        let _release = ReleaseOnDrop(probe.clone());
        // The only slot is taken by a slow local inference, and nothing may queue.
        let slow = holding_a_slot(&worker, &probe).await;
        assert_eq!(worker.running.available_permits(), 0);

        let metadata = ModelMetadata { platform: "remote".into(), inputs: vec![], outputs: vec![] };
        let model = ProbeModel { probe: probe.clone(), metadata, remote: true };
        let remote = Lease::detached(ModelId::new("remote").unwrap(), Box::new(model));
        // Large, and never timed: a local model would go to the blocking pool, or be refused here.
        let entry = remote.entry().clone();
        let answer = worker.infer(remote, request("x", 1 << 20)).await.unwrap();
        assert_eq!(answer[0].shape, vec![1 << 20], "the call's answer comes back");
        let seen = probe.seen();
        assert_eq!(seen[1].thread, std::thread::current().id(), "awaited on the request's own thread");
        assert_eq!(seen[1].free_slots, 0, "beside the local inference that holds the only slot");
        assert!(entry.typical_infer_time().is_some(), "its time is recorded like any inference's");

        probe.release();
        slow.await.unwrap().unwrap();
    }

    /// A model of one input `x` that answers (or fails, or panics) and keeps the requests it saw.
    struct ShapedModel {
        metadata: ModelMetadata,
        behaviour: &'static str,
        seen: Mutex<Vec<InferRequest>>,
    }

    impl ShapedModel {
        fn new(datatype: DataType, shape: Vec<i64>, behaviour: &'static str) -> Self {
            let x = densemesh_runtime_core::TensorSpec { name: "x".into(), datatype, shape };
            let metadata = ModelMetadata { platform: "shaped".into(), inputs: vec![x], outputs: vec![] };
            Self { metadata, behaviour, seen: Mutex::default() }
        }
    }

    impl LoadedModel for ShapedModel {
        fn metadata(&self) -> &ModelMetadata {
            &self.metadata
        }

        fn size_bytes(&self) -> u64 {
            3_000
        }

        fn runtime(&self) -> &str {
            "shaped"
        }

        fn infer(&self, request: InferRequest) -> densemesh_runtime_core::Result<Vec<Tensor>> {
            self.seen.lock().push(request.clone());
            match self.behaviour {
                "fail" => Err(densemesh_runtime_core::Error::Inference("no zeros here".into())),
                "panic" => panic!("index out of range"),
                _ => Ok(request.inputs),
            }
        }
    }

    #[test]
    fn a_small_model_is_probed_with_a_batch_of_one_zero_row() {
        let model = ShapedModel::new(DataType::Fp32, vec![-1, 4], "answer");
        assert!(probe_infer_time(&model).is_some());
        let seen = model.seen.lock();
        assert_eq!(seen.len(), 1);
        let x = &seen[0].inputs[0];
        assert_eq!((x.name.as_str(), x.datatype, x.shape.clone()), ("x", DataType::Fp32, vec![1, 4]));
        assert!(matches!(&x.data, TensorData::Raw(b) if b.len() == 16 && b.iter().all(|&v| v == 0)));
    }

    #[test]
    fn a_model_that_cannot_take_zeros_or_strings_or_is_large_is_not_probed() {
        for behaviour in ["fail", "panic"] {
            let model = ShapedModel::new(DataType::Fp32, vec![-1, 4], behaviour);
            assert_eq!(probe_infer_time(&model), None, "{behaviour}");
            assert_eq!(model.seen.lock().len(), 1, "{behaviour}: tried once");
        }
        for (datatype, shape) in [(DataType::Bytes, vec![-1]), (DataType::Fp32, vec![1, 3, 224, 224])] {
            let model = ShapedModel::new(datatype, shape.clone(), "answer");
            assert_eq!(probe_infer_time(&model), None, "{datatype:?} {shape:?}");
            assert!(model.seen.lock().is_empty(), "{datatype:?} {shape:?}: never run");
        }
    }

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
