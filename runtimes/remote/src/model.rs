//! A model in a remote server: loaded through the repository extension, run with ModelInfer, unloaded
//! when the mesh drops it.
//!
//! Every call has a deadline, and a call for a model whose process has exited answers `Error::Lost`
//! without touching the network.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use densemesh_proto::inference::ModelMetadataRequest;
use densemesh_runtime_core::{
    CallSlots, Error, InferFuture, InferRequest, LoadRequest, LoadedModel, ModelMetadata, NoSlot,
    Passthrough, Result, Tensor,
};
use tokio::time::Instant;
use tonic::Code;
use tracing::Instrument;

use crate::bridge::Bridge;
use crate::pool::{Pool, Process, Up};
use crate::repository::{self, RepositoryClient};
use crate::{RemoteError, RemoteRuntimeConfig, metric_names};
use densemesh_runtime_core::v2;

/// Tells loads apart, so an unload that runs after the same model was loaded again leaves it alone.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
/// After a failed call, how long to wait for the supervisor to notice that the process died (it
/// reaps the child within milliseconds of its death; this only bounds a race).
const DEATH_NOTICE: Duration = Duration::from_secs(2);

/// A model loaded into one process of the pool.
pub(crate) struct RemoteModel {
    inner: Arc<Inner>,
    bridge: Bridge,
    /// Where the server takes this model's `ModelInfer` as the client sent it (the model id written into
    /// `model_name`, field 1), so the mesh can pass the call's bytes through instead of decoding them.
    passthrough: Passthrough,
}

struct Inner {
    pool: Arc<Pool>,
    process: Arc<Process>,
    model_id: String,
    generation: u64,
    token: u64,
    metadata: ModelMetadata,
    size_bytes: u64,
}

/// A load checked and measured before any process is involved.
pub(crate) struct Prepared {
    model_id: String,
    /// The model's format, the one the runtime serves when the request names none.
    format: String,
    /// The model's file or directory, absolute.
    path: PathBuf,
    /// What the model is charged.
    size_bytes: u64,
}

/// Checks `request` against the config and measures the model. Runs on the caller's blocking thread:
/// a model directory can hold many files, and the crate's runtime has one worker that every call's
/// network I/O shares.
pub(crate) fn prepare(config: &RemoteRuntimeConfig, request: &LoadRequest) -> Result<Prepared> {
    let model_id = request.model_id.clone();
    let format = match (request.model_type.as_str(), config.supported_model_formats.as_slice()) {
        ("", [only]) => only.name.clone(),
        (model_type, _) => model_type.to_owned(),
    };
    if !config.serves(&format) {
        let served: Vec<&str> = config.supported_model_formats.iter().map(|f| f.name.as_str()).collect();
        let why = format!("runtime {} serves {served:?}, not {format:?}", config.name);
        return Err(Error::Load { model_id, source: why.into() });
    }
    repository::check_model_id(&model_id)
        .map_err(|why| Error::Load { model_id: model_id.clone(), source: why.into() })?;
    let path = std::path::absolute(&request.path)
        .map_err(|source| Error::Io { path: request.path.clone(), source })?;
    let size_bytes =
        config.charge(disk_size(&path).map_err(|source| Error::Io { path: path.clone(), source })?);
    Ok(Prepared { model_id, format, path, size_bytes })
}

/// Loads a prepared model into the least loaded process.
pub(crate) async fn load(pool: Arc<Pool>, bridge: Bridge, prepared: Prepared) -> Result<RemoteModel> {
    let config = &pool.config;
    let Prepared { model_id, format, path, size_bytes } = prepared;
    let load_error = |e: RemoteError| e.into_load_error(&model_id);
    let deadline = Instant::now() + config.timeouts.load;
    let (process, generation, up, _reservation) =
        wait_for_process(&pool, size_bytes, deadline).await.map_err(load_error)?;
    let span = tracing::Span::current();
    span.record("process", process.index);
    let _serial = tokio::time::timeout_at(deadline, process.repository_lock.lock())
        .await
        .map_err(|_| {
            deadline_error(&pool, &process, "waiting for the process's previous load", config.timeouts.load)
        })
        .map_err(load_error)?;
    // The server's part of the load, without the wait for the process's previous one.
    let loading = Instant::now();
    let implementation = config.implementation(&format);
    let model_dir = repository::write_settings(&process.repository, &model_id, implementation, &path)
        .map_err(load_error)?;
    let client = RepositoryClient { pool: &pool, process: &process, channel: up.channel.clone() };
    let loaded = async {
        client.load(&model_id, deadline).await?;
        read_metadata(&pool, &process, &up, &model_id, deadline).await
    }
    .await;
    let metadata = match loaded {
        Ok(metadata) => metadata,
        Err(error) => {
            // Best effort: the server may hold a half-loaded model, and its settings must not be found by a
            // later scan of the repository.
            let _ = client.unload(&model_id).await;
            let _ = std::fs::remove_dir_all(&model_dir);
            if process.up_in(generation).is_none() {
                return Err(died_while_loading(&pool, &process, model_id));
            }
            return Err(load_error(error));
        }
    };
    let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
    {
        let mut ledger = process.ledger.lock();
        if process.up_in(generation).is_none() {
            // The process died after the load answered; the supervisor has already cleared its ledger.
            return Err(died_while_loading(&pool, &process, model_id));
        }
        ledger.models.insert(model_id.clone(), (token, size_bytes));
    }
    let took = loading.elapsed();
    metrics::histogram!(metric_names::LOAD_DURATION, "runtime" => config.name.clone()).record(took);
    tracing::info!(size_bytes, implementation, ?took, "loaded model into remote server");
    let passthrough = Passthrough {
        endpoint: up.endpoint.clone(),
        methods: vec![(MODEL_INFER_PATH.to_owned(), vec![1])],
        allow_any_method: false,
    };
    let inner = Inner {
        pool: pool.clone(),
        process: process.clone(),
        model_id,
        generation,
        token,
        metadata,
        size_bytes,
    };
    Ok(RemoteModel { inner: Arc::new(inner), bridge, passthrough })
}

/// A load whose process died under it fails rather than retrying elsewhere: the model itself may have
/// killed the server (out of memory, a crashing native library), and the mesh's failure back-off is the
/// right brake for that, not a second process lost to the same model.
fn died_while_loading(pool: &Pool, process: &Process, model_id: String) -> Error {
    let exit = process.state.borrow().last_exit.clone().unwrap_or_else(|| "stopped".into());
    let why = format!(
        "{} process {} went down while loading it ({exit}); the model may have crashed it",
        pool.config.name, process.index
    );
    Error::Load { model_id, source: why.into() }
}

/// The least loaded up process, waiting until the deadline for one to come up.
async fn wait_for_process(
    pool: &Arc<Pool>,
    bytes: u64,
    deadline: Instant,
) -> Result<(Arc<Process>, u64, Up, crate::pool::Reservation), RemoteError> {
    loop {
        // Registered before the check, so a process coming up in between still wakes this load.
        let changed = pool.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(chosen) = pool.least_loaded(bytes) {
            return Ok(chosen);
        }
        if pool.cancel.is_cancelled() {
            return Err(RemoteError::ShutDown { runtime: pool.config.name.clone() });
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Err(RemoteError::NoProcess {
                runtime: pool.config.name.clone(),
                timeout: pool.config.timeouts.load,
            });
        }
    }
}

async fn read_metadata(
    pool: &Pool,
    process: &Process,
    up: &Up,
    model_id: &str,
    deadline: Instant,
) -> Result<ModelMetadata, RemoteError> {
    let mut client = pool.inference_client(up.channel.clone());
    let request = ModelMetadataRequest { name: model_id.to_owned(), version: String::new() };
    let answer = tokio::time::timeout_at(deadline, client.model_metadata(request))
        .await
        .map_err(|_| deadline_error(pool, process, "ModelMetadata", pool.config.timeouts.load))?
        .map_err(|status| server_error(pool, process, "ModelMetadata", status))?
        .into_inner();
    // An interface the server does not declare (MLServer's sklearn models often have none) or that
    // this side cannot represent is reported as none; the mesh then passes requests through.
    let inputs = v2::tensor_specs(answer.inputs);
    let outputs = v2::tensor_specs(answer.outputs);
    let (inputs, outputs) = match (inputs, outputs) {
        (Some(inputs), Some(outputs)) => (inputs, outputs),
        _ => {
            tracing::warn!(
                "the server declares tensors of unknown datatypes; treating the interface as undeclared"
            );
            (Vec::new(), Vec::new())
        }
    };
    Ok(ModelMetadata { platform: answer.platform, inputs, outputs })
}

impl RemoteModel {
    /// One ModelInfer call, in its span.
    fn call(&self, request: InferRequest) -> impl Future<Output = Result<Vec<Tensor>>> + Send + 'static {
        let inner = self.inner.clone();
        let span = tracing::debug_span!("remote_infer", runtime = %inner.pool.config.name, model_id = %inner.model_id);
        Self::call_in(inner, request).instrument(span)
    }

    async fn call_in(inner: Arc<Inner>, request: InferRequest) -> Result<Vec<Tensor>> {
        let pool = &inner.pool;
        let process = &inner.process;
        let Some(up) = process.up_in(inner.generation) else {
            return Err(inner.lost());
        };
        let request = v2::to_request(&inner.model_id, request).map_err(|why| {
            RemoteError::Request(format!("model {}: {why}", inner.model_id)).into_infer_error()
        })?;
        let timeout = pool.config.timeouts.infer;
        let deadline = Instant::now() + timeout;
        let _slot = process.slots.enter().await.map_err(|no_slot| match no_slot {
            NoSlot::Full { .. } => Error::Overloaded(no_slot.into()),
            NoSlot::TimedOut { .. } => {
                deadline_error(pool, process, "waiting for a concurrency slot", timeout).into_infer_error()
            }
            NoSlot::Closed { .. } => {
                RemoteError::ShutDown { runtime: pool.config.name.clone() }.into_infer_error()
            }
        })?;
        let mut client = pool.inference_client(up.channel);
        let mut request = tonic::Request::new(request);
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        let answer = match tokio::time::timeout_at(deadline, client.model_infer(request)).await {
            Ok(Ok(answer)) => answer.into_inner(),
            // tonic enforces the same deadline and may notice first (CANCELLED, "Timeout expired").
            Ok(Err(status)) if Instant::now() < deadline => return Err(inner.classify_failure(status).await),
            Ok(Err(_)) | Err(_) => {
                // A dead process fails calls at once (the connection resets) rather than at their
                // deadline, so a call that ran out of time needs no grace to tell.
                if process.up_in(inner.generation).is_none() {
                    return Err(inner.lost());
                }
                return Err(deadline_error(pool, process, "ModelInfer", timeout).into_infer_error());
            }
        };
        v2::from_response(answer).map_err(|why| {
            let answer = RemoteError::Answer {
                runtime: pool.config.name.clone(),
                model_id: inner.model_id.clone(),
                why,
            };
            Error::Inference(answer.into())
        })
    }
}

impl Inner {
    fn lost(&self) -> Error {
        Error::Lost {
            model_id: self.model_id.clone(),
            reason: self.process.lost_reason(&self.pool.config.name, self.generation),
        }
    }

    /// Whether this model's process died (now, or within a short grace for the supervisor to notice).
    async fn died_meanwhile(&self) -> bool {
        let mut state = self.process.state.subscribe();
        let gone = state.wait_for(|s| s.generation != self.generation || s.up.is_none());
        tokio::time::timeout(DEATH_NOTICE, gone).await.is_ok()
    }

    /// An error answer from ModelInfer: the model is lost if the server no longer has it or the process
    /// died under the call; otherwise the server's verdict.
    async fn classify_failure(&self, status: tonic::Status) -> Error {
        match status.code() {
            Code::NotFound => Error::Lost {
                model_id: self.model_id.clone(),
                reason: format!(
                    "{} process {} no longer has it: {}",
                    self.pool.config.name,
                    self.process.index,
                    status.message()
                ),
            },
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
                if self.died_meanwhile().await =>
            {
                self.lost()
            }
            _ => server_error(&self.pool, &self.process, "ModelInfer", status).into_infer_error(),
        }
    }
}

impl LoadedModel for RemoteModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.inner.metadata
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    fn runtime(&self) -> &str {
        &self.inner.pool.config.name
    }

    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>> {
        self.bridge.run(self.call(request)).unwrap_or_else(|e| Err(e.into_infer_error()))
    }

    /// The same call, awaited on the caller's executor: it needs nothing of this crate's runtime but
    /// the channel, whose connection task lives there.
    fn infer_async(&self, request: InferRequest) -> std::result::Result<InferFuture, InferRequest> {
        Ok(Box::pin(self.call(request)))
    }

    fn passthrough(&self) -> Option<&Passthrough> {
        Some(&self.passthrough)
    }

    fn call_slots(&self) -> Option<&CallSlots> {
        Some(&self.inner.process.slots)
    }
}

/// The V2 inference call a passthrough carries.
const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

impl Drop for RemoteModel {
    /// Hands the unload to the runtime's own threads and returns at once: eviction runs on the mesh's
    /// hot path, and an unload waits on the server.
    fn drop(&mut self) {
        let inner = &self.inner;
        let ours = {
            let mut ledger = inner.process.ledger.lock();
            match ledger.models.get(&inner.model_id) {
                Some((token, _)) if *token == inner.token => ledger.models.remove(&inner.model_id).is_some(),
                _ => false,
            }
        };
        // A model of a dead generation is gone with its process; one whose entry belongs to a newer load
        // of the same id is not ours to unload.
        if !ours || inner.process.up_in(inner.generation).is_none() {
            return;
        }
        let inner = inner.clone();
        let span = tracing::info_span!("remote_unload", runtime = %inner.pool.config.name, model_id = %inner.model_id);
        self.bridge.spawn(
            async move {
                let _serial = inner.process.repository_lock.lock().await;
                if inner.process.ledger.lock().models.contains_key(&inner.model_id) {
                    // Loaded again into this process while this unload waited for its turn.
                    return;
                }
                let Some(up) = inner.process.up_in(inner.generation) else { return };
                let client =
                    RepositoryClient { pool: &inner.pool, process: &inner.process, channel: up.channel };
                let unloading = Instant::now();
                match client.unload(&inner.model_id).await {
                    Ok(()) => {
                        let took = unloading.elapsed();
                        let runtime = inner.pool.config.name.clone();
                        metrics::histogram!(metric_names::UNLOAD_DURATION, "runtime" => runtime).record(took);
                        tracing::info!(?took, "unloaded model from remote server")
                    }
                    Err(error) => tracing::warn!(%error, "remote server failed to unload the model"),
                }
                repository::remove_model_dir(&inner.process.repository, &inner.model_id);
            }
            .instrument(span),
        );
    }
}

pub(crate) fn server_error(
    pool: &Pool,
    process: &Process,
    rpc: &'static str,
    status: tonic::Status,
) -> RemoteError {
    RemoteError::Server { runtime: pool.config.name.clone(), process: process.index, rpc, status }
}

pub(crate) fn deadline_error(
    pool: &Pool,
    process: &Process,
    rpc: &'static str,
    timeout: Duration,
) -> RemoteError {
    RemoteError::Deadline { runtime: pool.config.name.clone(), process: process.index, rpc, timeout }
}

/// Bytes on disk of a model file, or of everything under a model directory.
fn disk_size(path: &Path) -> std::io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    let mut pending: Vec<PathBuf> = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}
