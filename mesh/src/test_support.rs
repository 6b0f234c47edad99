//! Test doubles shared by the unit tests of several modules.

use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::registry::Registry;
use densemesh_placement::{ClusterView, InstanceRecord, MemoryStore, ModelId, ModelSpec, store};
use densemesh_proto::inference::*;
use densemesh_runtime_core::{LoadRequest, LoadedModel, Runtime};
use futures::FutureExt;

use crate::cluster::peers::Peers;
use crate::cluster::placer::{Placer, PlacerConfig};
use crate::error::CacheError;
use crate::node::cache::{CacheConfig, Locate, ModelCache};

/// A runtime that never loads: for tests where serving or loading on this pod is the outcome being
/// checked against, or where the model's files already fail to be found.
pub(crate) struct NoRuntime;

impl Runtime for NoRuntime {
    fn name(&self) -> &'static str {
        "none"
    }

    fn load(&self, _: &LoadRequest) -> densemesh_runtime_core::Result<Box<dyn LoadedModel>> {
        Err(densemesh_runtime_core::Error::RuntimeUnavailable("not in this test".into()))
    }
}

/// A loaded model that answers nothing: for tests of what routes loads, its metadata saying who
/// loaded it. It is charged one byte.
pub(crate) struct StubModel(pub densemesh_runtime_core::ModelMetadata);

impl LoadedModel for StubModel {
    fn metadata(&self) -> &densemesh_runtime_core::ModelMetadata {
        &self.0
    }

    fn size_bytes(&self) -> u64 {
        1
    }

    fn runtime(&self) -> &str {
        &self.0.platform
    }

    fn infer(
        &self,
        _: densemesh_runtime_core::InferRequest,
    ) -> densemesh_runtime_core::Result<Vec<densemesh_runtime_core::Tensor>> {
        Ok(Vec::new())
    }
}

/// A KServe V2 server that answers every ModelInfer with an empty response naming the model asked
/// for, and nothing else: for tests of what wraps the generated service.
#[derive(Clone, Default)]
pub(crate) struct AnswersInfer;

#[tonic::async_trait]
impl densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceService for AnswersInfer {
    async fn server_live(
        &self,
        _: tonic::Request<ServerLiveRequest>,
    ) -> Result<tonic::Response<ServerLiveResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: tonic::Request<ServerReadyRequest>,
    ) -> Result<tonic::Response<ServerReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        _: tonic::Request<ModelReadyRequest>,
    ) -> Result<tonic::Response<ModelReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ModelReadyResponse { ready: true }))
    }

    async fn server_metadata(
        &self,
        _: tonic::Request<ServerMetadataRequest>,
    ) -> Result<tonic::Response<ServerMetadataResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn model_metadata(
        &self,
        _: tonic::Request<ModelMetadataRequest>,
    ) -> Result<tonic::Response<ModelMetadataResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn model_infer(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
        let model_name = request.into_inner().model_name;
        Ok(tonic::Response::new(ModelInferResponse { model_name, ..Default::default() }))
    }
}

/// A live pod's instance record at `endpoint`: 1 GiB of capacity, one model loaded, nothing else going on.
pub(crate) fn instance_record(endpoint: &str) -> InstanceRecord {
    InstanceRecord {
        endpoint: endpoint.to_owned(),
        capacity_bytes: 1 << 30,
        used_bytes: 0,
        models_loaded: 1,
        loading: 0,
        lru_age_seconds: 0,
        coldest_model: String::new(),
        cheapest_victims: None,
        requests_per_minute: 0,
        draining: false,
        started_ms: 0,
        model_types: densemesh_placement::spec::legacy_model_types(),
        peer_wire: 0,
        devices: Vec::new(),
    }
}

/// Why a [`TestPod`]'s loads of registered models fail.
pub(crate) const NO_FILES: &str = "no model files in this test";

/// One pod on its own `MemoryStore` registry (prefix `t`): a view, a cache and a placer. As meshd's,
/// its cache finds models through the view (NOT_FOUND for one the view lacks); a registered model
/// then fails to load with [`NO_FILES`].
pub(crate) struct TestPod {
    pub registry: Registry,
    pub view: ClusterView,
    pub cache: ModelCache,
    pub placer: Placer,
}

impl TestPod {
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, Arc::new(MemoryStore::new())).await
    }

    /// A pod whose view follows the store only while the returned `held` is false.
    pub async fn start_lagging(name: &str) -> (Self, Arc<tokio::sync::watch::Sender<bool>>) {
        let store = store::held::HeldWatches::new(Arc::new(MemoryStore::new()));
        let held = store.held();
        (Self::start_on(name, Arc::new(store)).await, held)
    }

    async fn start_on(name: &str, store: Arc<dyn densemesh_placement::Store>) -> Self {
        let registry = Registry::new(store, "t");
        let view = ClusterView::start(registry.clone()).await.unwrap();
        let known = view.clone();
        let locate: Locate = Arc::new(move |id: ModelId| {
            let known = known.model(&id).is_some();
            async move {
                Err(if known {
                    CacheError::LoadFailed { model_id: id, reason: NO_FILES.into(), retry_in: Duration::ZERO }
                } else {
                    CacheError::NotFound(format!("model {id} not found").into())
                })
            }
            .boxed()
        });
        let cache = ModelCache::new(CacheConfig::default(), Arc::new(NoRuntime), locate);
        let config = PlacerConfig {
            anti_churn_age: Duration::ZERO,
            wait_limit: Duration::from_secs(5),
            model_repo: std::path::PathBuf::new(),
            model_types: densemesh_placement::spec::legacy_model_types(),
            admin_token: None,
        };
        let placer = Placer::new(
            name.into(),
            view.clone(),
            cache.clone(),
            Peers::new(Duration::from_secs(5), 1 << 20),
            config,
        );
        Self { registry, view, cache, placer }
    }

    /// The revision the registry's next write will have.
    pub async fn next_revision(&self) -> i64 {
        self.registry.store().range(self.registry.prefix()).await.unwrap().revision + 1
    }

    /// Registers an ONNX model at `/models/<id>` after `delay`, as a write through another pod whose
    /// record reaches this pod's view only then; the revision it was written at.
    pub async fn register_after(&self, id: &str, delay: Duration) -> i64 {
        tokio::time::sleep(delay).await;
        let spec = ModelSpec::api("onnx", format!("/models/{id}"));
        self.registry.register(&ModelId::new(id).unwrap(), &spec).await.unwrap().revision
    }
}

/// Metadata of a call forwarded by pod `from` for a model whose spec it saw at `revision`.
pub(crate) fn forwarded_metadata(from: &'static str, revision: Option<i64>) -> tonic::metadata::MetadataMap {
    use crate::cluster::peers::{FORWARDED_HEADER, FORWARDED_REVISION_HEADER};
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static(from));
    if let Some(revision) = revision {
        metadata.insert(FORWARDED_REVISION_HEADER, revision.into());
    }
    metadata
}

/// The inference service of a [`TestPod`], forwarding through its placer, one request at a time.
pub(crate) fn inference_service(pod: &TestPod) -> crate::api::service::InferenceService {
    let worker = crate::node::worker::Worker::new(crate::node::worker::WorkerConfig {
        concurrency: 1,
        max_queued: 8,
        inline_below: Duration::ZERO,
        inline_max_bytes: 0,
    });
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    crate::api::service::InferenceService::new(pod.cache.clone(), pod.view.clone(), worker, ready)
        .with_forwarder(crate::cluster::forward::Forwarder::new(pod.placer.clone(), 1 << 20))
}
