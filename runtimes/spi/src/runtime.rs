//! [`SpiRuntime`]: one model server driven through `mmesh.ModelRuntime`, behind the `Runtime` seam.
//!
//! Start-up asks `runtimeStatus` until the server says READY, as ModelMesh does, and keeps what it
//! reported (capacity, concurrency, loading timeout, the methods it serves). A load is `loadModel`
//! followed, when the answer carries no size, by `modelSize`; inference goes to the server's KServe V2
//! `ModelInfer` with the model id in the `mm-model-id` header (see [`crate::model`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use densemesh_proto::inference::ModelMetadataRequest;
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::mmesh::model_runtime_client::ModelRuntimeClient;
use densemesh_proto::mmesh::runtime_status_response::Status as RuntimeState;
use densemesh_proto::mmesh::{
    LoadModelRequest, ModelSizeRequest, PredictModelSizeRequest, RuntimeStatusRequest, RuntimeStatusResponse,
    UnloadModelRequest,
};
use densemesh_runtime_core::{Error, LoadRequest, LoadedModel, ModelMetadata, Passthrough, Result, Runtime};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::bridge::{Bridge, Cancelled};
use crate::call::{Failure, outgoing, within};
use crate::model::SpiModel;
use crate::{RuntimeEndpoint, SpiError, SpiRuntimeConfig};
use densemesh_runtime_core::v2;

/// The least a model is charged, in bytes, whatever the runtime and the disk say: a model held by
/// another process costs at least its bookkeeping there, and capacity accounting must never see 0.
pub const MIN_MODEL_SIZE_BYTES: u64 = 4096;

/// `loadModel`'s deadline when neither the config nor the runtime names one (ModelMesh's default).
const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(90);

/// The longest pause between two `runtimeStatus` calls at start-up.
const MAX_STATUS_BACKOFF: Duration = Duration::from_secs(1);

/// What the runtime reported at start-up (`runtimeStatus`), for the mesh to size its cache and loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// Memory the runtime offers for models, in bytes (0: it did not say).
    pub capacity_bytes: u64,
    /// Loads it takes at once (0: it did not say).
    pub max_loading_concurrency: u32,
    /// How long one load may take, as the runtime sees it.
    pub model_loading_timeout: Option<Duration>,
    /// The size to assume for a model before it is loaded (0: none).
    pub default_model_size_bytes: u64,
    /// The runtime's version string.
    pub runtime_version: String,
    /// The runtime's version as a number, for comparisons.
    pub numeric_runtime_version: u64,
    /// The inference methods it serves (`/package.Service/Method`, sorted), each with the path of field
    /// numbers to the request's string field that takes the model id.
    pub methods: Vec<(String, Vec<u32>)>,
    /// Any method may be called; also set when it listed none (ModelMesh reads an empty list so).
    pub allow_any_method: bool,
    /// The mesh should bound each model's concurrent requests by `loadModel`'s `maxConcurrency`.
    pub limit_model_concurrency: bool,
}

impl From<RuntimeStatusResponse> for RuntimeInfo {
    fn from(status: RuntimeStatusResponse) -> Self {
        let mut methods: Vec<(String, Vec<u32>)> = status
            .method_infos
            .into_iter()
            .map(|(name, info)| (method_path(&name), info.id_injection_path))
            .collect();
        methods.sort();
        Self {
            capacity_bytes: status.capacity_in_bytes,
            max_loading_concurrency: status.max_loading_concurrency,
            model_loading_timeout: (status.model_loading_timeout_ms > 0)
                .then(|| Duration::from_millis(status.model_loading_timeout_ms.into())),
            default_model_size_bytes: status.default_model_size_in_bytes,
            runtime_version: status.runtime_version,
            numeric_runtime_version: status.numeric_runtime_version,
            allow_any_method: status.allow_any_method || methods.is_empty(),
            methods,
            limit_model_concurrency: status.limit_model_concurrency,
        }
    }
}

/// ModelMesh keys methods as `package.Service/Method`; gRPC paths, and the mesh, write `/package.Service/Method`.
fn method_path(name: &str) -> String {
    if name.starts_with('/') { name.to_owned() } else { format!("/{name}") }
}

/// A model server reached through the model-runtime SPI. Cheap to share: models hold a handle on it,
/// so its connections and threads live until the last model is dropped.
pub struct SpiRuntime {
    shared: Arc<Shared>,
}

/// What the runtime and its models share.
pub(crate) struct Shared {
    pub(crate) config: SpiRuntimeConfig,
    pub(crate) info: RuntimeInfo,
    pub(crate) passthrough: Passthrough,
    pub(crate) spi: ModelRuntimeClient<Channel>,
    pub(crate) inference: GrpcInferenceServiceClient<Channel>,
    /// Cleared when the runtime answers V2 ModelMetadata with UNIMPLEMENTED, so later loads skip it.
    speaks_v2: AtomicBool,
    /// Last, so the clients' connections close before the threads that drive them stop.
    pub(crate) bridge: Bridge,
}

impl SpiRuntime {
    /// Connects to the runtime and waits, up to `timeouts.startup`, for `runtimeStatus` to answer READY
    /// (retrying while it is unreachable or STARTING). Blocking; call it from a blocking thread.
    pub fn connect(config: SpiRuntimeConfig) -> Result<Self, SpiError> {
        config.validate()?;
        let spi_endpoint = config.spi_endpoint()?;
        let data_endpoint = config.inference_endpoint()?;
        let bridge = Bridge::new(&config.name)
            .map_err(|source| SpiError::Threads { runtime: config.name.clone(), source })?;
        let invalid = |field: &'static str, e: tonic::transport::Error| SpiError::InvalidConfig {
            runtime: config.name.clone(),
            field,
            reason: e.to_string(),
        };
        let (spi_channel, data_channel) = {
            // Lazy channels spawn their connection task on the runtime that is current.
            let _runtime = bridge.enter();
            let spi_channel =
                spi_endpoint.channel(config.timeouts.connect).map_err(|e| invalid("endpoint", e))?;
            let data_channel = if data_endpoint == spi_endpoint {
                spi_channel.clone()
            } else {
                data_endpoint.channel(config.timeouts.connect).map_err(|e| invalid("dataEndpoint", e))?
            };
            (spi_channel, data_channel)
        };
        let limit = config.max_message_bytes;
        let spi = ModelRuntimeClient::new(spi_channel).max_decoding_message_size(limit);
        let inference = GrpcInferenceServiceClient::new(data_channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);

        let span = tracing::info_span!("spi_startup", runtime = %config.name, endpoint = %spi_endpoint);
        let _entered = span.enter();
        let status = bridge
            .run(wait_ready(spi.clone(), config.timeouts.startup, config.timeouts.call))
            .map_err(|Cancelled| startup_error(&config, &spi_endpoint, Startup::Cancelled))?
            .map_err(|failure| startup_error(&config, &spi_endpoint, failure))?;
        let info = RuntimeInfo::from(status);
        tracing::info!(
            capacity_bytes = info.capacity_bytes,
            max_loading_concurrency = info.max_loading_concurrency,
            methods = ?info.methods,
            allow_any_method = info.allow_any_method,
            version = %info.runtime_version,
            "spi runtime ready"
        );
        let passthrough = Passthrough {
            endpoint: data_endpoint.to_string(),
            methods: info.methods.clone(),
            allow_any_method: info.allow_any_method,
        };
        let shared =
            Shared { config, info, passthrough, spi, inference, speaks_v2: AtomicBool::new(true), bridge };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &SpiRuntimeConfig {
        &self.shared.config
    }

    /// What the runtime reported at start-up.
    pub fn info(&self) -> &RuntimeInfo {
        &self.shared.info
    }

    /// Where the runtime takes inference calls of its own methods; every model it loads reports the same.
    pub fn passthrough(&self) -> &Passthrough {
        &self.shared.passthrough
    }

    /// The runtime's own size estimate before loading (`predictModelSize`), or its default model size;
    /// `None` when it offers neither.
    pub fn predict_size(&self, request: &LoadRequest) -> Result<Option<u64>, SpiError> {
        let shared = &self.shared;
        let model_id = request.model_id.clone();
        let message = PredictModelSizeRequest {
            model_id: request.model_id.clone(),
            model_type: request.model_type.clone(),
            model_path: request.path.to_string_lossy().into_owned(),
            model_key: String::new(),
        };
        let timeout = shared.config.timeouts.call;
        let mut client = shared.spi.clone();
        let answer =
            shared
                .bridge
                .run(async move {
                    within(timeout, client.predict_model_size(outgoing(message, timeout, None))).await
                })
                .map_err(|Cancelled| shared.cancelled("predictModelSize", &model_id))?;
        let predicted = match answer {
            Ok(answer) => answer.size_in_bytes,
            Err(Failure::Status(status)) if status.code() == Code::Unimplemented => 0,
            Err(failure) => return Err(shared.failed("predictModelSize", &model_id, failure)),
        };
        let fallback = shared.info.default_model_size_bytes;
        Ok([predicted, fallback].into_iter().find(|&n| n > 0))
    }
}

impl Runtime for SpiRuntime {
    fn name(&self) -> &'static str {
        "modelmesh-spi"
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        let shared = &self.shared;
        let model_id = request.model_id.as_str();
        let span = tracing::info_span!("spi_load", model_id, runtime = %shared.config.name);
        let _entered = span.enter();
        let load_error =
            |source: SpiError| Error::Load { model_id: model_id.to_owned(), source: source.into() };

        let model_path = request.path.to_str().ok_or_else(|| Error::Load {
            model_id: model_id.to_owned(),
            source: format!("model path {} is not UTF-8", request.path.display()).into(),
        })?;
        let disk_bytes = size_on_disk(&request.path);
        let message = LoadModelRequest {
            model_id: model_id.to_owned(),
            model_type: request.model_type.clone(),
            model_path: model_path.to_owned(),
            model_key: model_key(&request.model_type, disk_bytes),
        };
        let timeout = self.load_timeout();
        let mut client = shared.spi.clone();
        let loaded = shared
            .bridge
            .run(async move { within(timeout, client.load_model(outgoing(message, timeout, None))).await })
            .map_err(|Cancelled| load_error(shared.cancelled("loadModel", model_id)))?;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(failure) => {
                // ModelMesh unloads a failed or abandoned load too, so the runtime frees what it holds.
                shared.unload_in_background(model_id);
                return Err(load_error(shared.failed("loadModel", model_id, failure)));
            }
        };

        let reported =
            if loaded.size_in_bytes > 0 { loaded.size_in_bytes } else { self.model_size(model_id) };
        let size_bytes = [reported, disk_bytes, shared.info.default_model_size_bytes]
            .into_iter()
            .find(|&n| n > 0)
            .unwrap_or(0)
            .max(MIN_MODEL_SIZE_BYTES);
        let metadata = self.metadata(model_id);
        let slots = (shared.info.limit_model_concurrency && loaded.max_concurrency > 0)
            .then(|| Arc::new(Semaphore::new(loaded.max_concurrency as usize)));
        tracing::info!(
            size_bytes,
            reported_bytes = reported,
            max_concurrency = loaded.max_concurrency,
            declared_inputs = metadata.inputs.len(),
            "model loaded"
        );
        Ok(Box::new(SpiModel::new(model_id.to_owned(), shared.clone(), metadata, size_bytes, slots)))
    }
}

impl SpiRuntime {
    fn load_timeout(&self) -> Duration {
        let shared = &self.shared;
        shared.config.timeouts.load.or(shared.info.model_loading_timeout).unwrap_or(DEFAULT_LOAD_TIMEOUT)
    }

    /// `modelSize`, or 0 when the runtime does not implement it or fails to answer (the caller falls back).
    fn model_size(&self, model_id: &str) -> u64 {
        let shared = &self.shared;
        let timeout = shared.config.timeouts.call;
        let message = ModelSizeRequest { model_id: model_id.to_owned() };
        let mut client = shared.spi.clone();
        match shared
            .bridge
            .run(async move { within(timeout, client.model_size(outgoing(message, timeout, None))).await })
        {
            Ok(Ok(answer)) => answer.size_in_bytes,
            Ok(Err(Failure::Status(status))) if status.code() == Code::Unimplemented => 0,
            Ok(Err(failure)) => {
                tracing::warn!(error = %shared.failed("modelSize", model_id, failure), "using the size on disk");
                0
            }
            Err(Cancelled) => 0,
        }
    }

    /// The model's V2 interface, or an empty one (undeclared) when the runtime does not speak V2 or
    /// does not describe the model.
    fn metadata(&self, model_id: &str) -> ModelMetadata {
        let shared = &self.shared;
        let undeclared = ModelMetadata { platform: String::new(), inputs: Vec::new(), outputs: Vec::new() };
        if !shared.speaks_v2.load(Ordering::Relaxed) {
            return undeclared;
        }
        let timeout = shared.config.timeouts.call;
        let message = ModelMetadataRequest { name: model_id.to_owned(), version: String::new() };
        let mut client = shared.inference.clone();
        let id = model_id.to_owned();
        let answer = match shared.bridge.run(async move {
            within(timeout, client.model_metadata(outgoing(message, timeout, Some(&id)))).await
        }) {
            Ok(Ok(answer)) => answer,
            Ok(Err(Failure::Status(status))) if status.code() == Code::Unimplemented => {
                tracing::info!("runtime does not serve V2 ModelMetadata; its models declare no tensors");
                shared.speaks_v2.store(false, Ordering::Relaxed);
                return undeclared;
            }
            Ok(Err(failure)) => {
                let error = shared.failed("ModelMetadata", model_id, failure);
                tracing::warn!(%error, "the model declares no tensors");
                return undeclared;
            }
            Err(Cancelled) => return undeclared,
        };
        let inputs = v2::tensor_specs(answer.inputs);
        let outputs = v2::tensor_specs(answer.outputs);
        match (inputs, outputs) {
            (Some(inputs), Some(outputs)) => ModelMetadata { platform: answer.platform, inputs, outputs },
            _ => {
                tracing::warn!("the runtime declares a datatype outside V2's; the model declares no tensors");
                undeclared
            }
        }
    }
}

impl Shared {
    /// Sends `unloadModel` without waiting for it (a model's `Drop`, a failed load); NOT_FOUND counts as
    /// done, as in ModelMesh.
    pub(crate) fn unload_in_background(&self, model_id: &str) {
        let timeout = self.config.timeouts.call;
        let message = UnloadModelRequest { model_id: model_id.to_owned() };
        let mut client = self.spi.clone();
        let span = tracing::info_span!("spi_unload", model_id, runtime = %self.config.name);
        self.bridge.spawn_background(tracing::Instrument::instrument(
            async move {
                match within(timeout, client.unload_model(outgoing(message, timeout, None))).await {
                    Ok(_) => tracing::debug!("model unloaded"),
                    Err(Failure::Status(status)) if status.code() == Code::NotFound => {
                        tracing::debug!("the runtime no longer held the model")
                    }
                    Err(Failure::Status(status)) => {
                        tracing::warn!(code = ?status.code(), message = status.message(), "unloadModel failed")
                    }
                    Err(Failure::Timeout(after)) => tracing::warn!(?after, "unloadModel timed out"),
                }
            },
            span,
        ));
    }

    /// The error for a call that failed.
    pub(crate) fn failed(&self, call: &'static str, model_id: &str, failure: Failure) -> SpiError {
        let runtime = self.config.name.clone();
        let model_id = model_id.to_owned();
        match failure {
            Failure::Status(status) => SpiError::Call { runtime, call, model_id, status },
            Failure::Timeout(after) => SpiError::Timeout { runtime, call, model_id, after },
        }
    }

    /// The error for a call cut short by the client shutting down.
    pub(crate) fn cancelled(&self, call: &'static str, model_id: &str) -> SpiError {
        SpiError::Cancelled { runtime: self.config.name.clone(), call, model_id: model_id.to_owned() }
    }
}

/// Why start-up failed, before the runtime's name is attached.
enum Startup {
    NotReady { waited: Duration, last: String },
    Failing(String),
    NotAnSpiRuntime(Status),
    Cancelled,
}

fn startup_error(config: &SpiRuntimeConfig, endpoint: &RuntimeEndpoint, failure: Startup) -> SpiError {
    let runtime = config.name.clone();
    let endpoint = endpoint.to_string();
    match failure {
        Startup::NotReady { waited, last } => SpiError::NotReady { runtime, endpoint, waited, last },
        Startup::Failing(status) => SpiError::Failing { runtime, endpoint, status },
        Startup::NotAnSpiRuntime(status) => SpiError::NotAnSpiRuntime { runtime, endpoint, status },
        Startup::Cancelled => SpiError::NotReady {
            runtime,
            endpoint,
            waited: Duration::ZERO,
            last: "the client shut down".into(),
        },
    }
}

/// Asks `runtimeStatus` until READY. The SPI offers no notification of readiness, so this polls, with
/// a pause growing to [`MAX_STATUS_BACKOFF`], as ModelMesh does.
async fn wait_ready(
    mut client: ModelRuntimeClient<Channel>,
    startup: Duration,
    call: Duration,
) -> Result<RuntimeStatusResponse, Startup> {
    let started = tokio::time::Instant::now();
    let deadline = started + startup;
    let mut pause = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let timeout = call.min(left).max(Duration::from_millis(1));
        let last =
            match within(timeout, client.runtime_status(outgoing(RuntimeStatusRequest {}, timeout, None)))
                .await
            {
                Ok(status) => match RuntimeState::try_from(status.status) {
                    Ok(RuntimeState::Ready) => return Ok(status),
                    Ok(RuntimeState::Starting) => "STARTING".to_owned(),
                    Ok(RuntimeState::Failing) => return Err(Startup::Failing("FAILING".into())),
                    Err(_) => return Err(Startup::Failing(format!("unknown ({})", status.status))),
                },
                Err(Failure::Status(status)) if status.code() == Code::Unimplemented => {
                    return Err(Startup::NotAnSpiRuntime(status));
                }
                Err(Failure::Status(status)) => format!("{:?}: {}", status.code(), status.message()),
                Err(Failure::Timeout(after)) => format!("no answer within {after:?}"),
            };
        tracing::debug!(%last, "runtime not ready yet");
        let now = tokio::time::Instant::now();
        if now + pause >= deadline {
            return Err(Startup::NotReady { waited: now - started, last });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_STATUS_BACKOFF);
    }
}

/// The bytes under `path`: a file's length, or the sum over a directory's files; 0 when unreadable.
fn size_on_disk(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    let mut total = 0u64;
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            // DirEntry::metadata does not follow links: a link out of the model's directory is not its size.
            match entry.metadata() {
                Ok(m) if m.is_dir() => pending.push(entry.path()),
                Ok(m) => total = total.saturating_add(m.len()),
                Err(_) => {}
            }
        }
    }
    total
}

/// The `modelKey` sent with `loadModel`: the JSON ModelMesh's serving layer writes there, with the parts
/// densemesh knows (the format, the size on disk); storage fields are absent because the mesh has
/// already pulled the model to `modelPath`.
fn model_key(model_type: &str, disk_bytes: u64) -> String {
    let mut key = serde_json::Map::new();
    if !model_type.is_empty() {
        key.insert("model_type".into(), serde_json::json!({ "name": model_type }));
    }
    if disk_bytes > 0 {
        key.insert("disk_size_bytes".into(), disk_bytes.into());
    }
    serde_json::Value::Object(key).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use densemesh_proto::mmesh::runtime_status_response::MethodInfo;

    use super::*;

    #[test]
    fn runtime_status_becomes_info_with_method_paths_normalised() {
        let status = RuntimeStatusResponse {
            status: RuntimeState::Ready as i32,
            capacity_in_bytes: 1 << 30,
            max_loading_concurrency: 2,
            model_loading_timeout_ms: 1500,
            method_infos: HashMap::from([
                ("echo.Echo/Say".to_owned(), MethodInfo { id_injection_path: vec![2, 1] }),
                (
                    "/inference.GRPCInferenceService/ModelInfer".to_owned(),
                    MethodInfo { id_injection_path: vec![1] },
                ),
            ]),
            ..Default::default()
        };
        let info = RuntimeInfo::from(status);
        assert_eq!(info.capacity_bytes, 1 << 30);
        assert_eq!(info.model_loading_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            info.methods,
            vec![
                ("/echo.Echo/Say".to_owned(), vec![2, 1]),
                ("/inference.GRPCInferenceService/ModelInfer".to_owned(), vec![1]),
            ]
        );
        assert!(!info.allow_any_method);
        let silent = RuntimeInfo::from(RuntimeStatusResponse::default());
        assert!(silent.allow_any_method, "no methodInfos allows any method, as in ModelMesh");
        assert_eq!(silent.model_loading_timeout, None);
    }

    #[test]
    fn the_model_key_carries_what_the_mesh_knows() {
        assert_eq!(model_key("sklearn", 12), r#"{"disk_size_bytes":12,"model_type":{"name":"sklearn"}}"#);
        assert_eq!(model_key("", 0), "{}");
    }

    #[test]
    fn size_on_disk_sums_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), [0u8; 10]).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub").join("b"), [0u8; 5]).expect("write");
        assert_eq!(size_on_disk(dir.path()), 15);
        assert_eq!(size_on_disk(&dir.path().join("a")), 10);
        assert_eq!(size_on_disk(&dir.path().join("missing")), 0);
    }
}
