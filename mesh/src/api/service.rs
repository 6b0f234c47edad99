//! The KServe V2 gRPC service: resolves the model, leases it from the cache, validates, runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use densemesh_proto::inference::*;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use densemesh_placement::route::Refusal;
use densemesh_placement::{ClusterView, ModelId};
use densemesh_runtime_core::Error as RuntimeError;

use crate::cluster::forward::{Destination, Forwarded, Forwarder};
use crate::cluster::peers;
use crate::error::MeshError;
use crate::metrics as m;
use crate::node::cache::{CopyStatus, ModelCache};
use crate::node::v2::frame;
use crate::node::worker::Worker;
use crate::node::{router, v2};
use densemesh_placement::graph::GraphSpec;
use prost::Message;

/// State shared by every request.
#[derive(Clone)]
pub struct InferenceService {
    cache: ModelCache,
    view: ClusterView,
    forwarder: Option<Forwarder>,
    worker: Worker,
    /// False once shutdown began, so load balancers stop sending.
    ready: Arc<AtomicBool>,
    hot: HotMetrics,
    /// Per-model metrics (`--metrics-per-model`), when on.
    per_model: Option<crate::metrics::per_model::ModelLabels>,
}

/// Handles registered once for what every successful request records, so the hot path skips the
/// registry lookup (a hash of name and labels per call).
#[derive(Clone)]
struct HotMetrics {
    request_size: metrics::Histogram,
    response_size: metrics::Histogram,
    ok_duration: metrics::Histogram,
    ok_count: metrics::Counter,
}

const OK_LABELS: [(&str, &str); 2] = [("method", "ModelInfer"), ("code", "OK")];

/// How long a request for a name this pod does not know waits, twice at most, for a strong read of
/// the registry and for the view to reach it, before it is answered NOT_FOUND.
const STRONG_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

impl InferenceService {
    pub fn new(cache: ModelCache, view: ClusterView, worker: Worker, ready: Arc<AtomicBool>) -> Self {
        let hot = HotMetrics {
            request_size: metrics::histogram!(m::REQUEST_SIZE),
            response_size: metrics::histogram!(m::RESPONSE_SIZE),
            ok_duration: metrics::histogram!(m::REQUEST_DURATION, &OK_LABELS),
            ok_count: metrics::counter!(m::REQUESTS, &OK_LABELS),
        };
        Self { cache, view, forwarder: None, worker, ready, hot, per_model: None }
    }

    /// Records requests served here per model as well, under the labels these give.
    pub fn with_model_labels(mut self, labels: crate::metrics::per_model::ModelLabels) -> Self {
        self.per_model = Some(labels);
        self
    }

    /// Serves requests for models held (or best loaded) elsewhere on that pod.
    pub fn with_forwarder(mut self, forwarder: Forwarder) -> Self {
        self.forwarder = Some(forwarder);
        self
    }

    /// The model a request runs on, through vmodels (and their traffic splits).
    fn target(&self, metadata: &tonic::metadata::MetadataMap, name: &str) -> Result<ModelId, MeshError> {
        // The split point only for a vmodel: most calls name a model.
        router::resolve(metadata, name, |v| {
            self.view.vmodel(v).map(|s| s.route(router::split_point(metadata)).to_owned())
        })
        .map(|t| t.model)
    }

    /// Where a request for `id` is served, as placement says, with the forwarder to use for a peer;
    /// `None` when it is served here without asking (a forwarded request, or no forwarder).
    fn destination(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        id: &ModelId,
    ) -> Result<Option<(&Forwarder, Destination)>, MeshError> {
        let Some(forwarder) = self.forwarder.as_ref().filter(|_| !Forwarder::was_forwarded(metadata)) else {
            return Ok(None);
        };
        match forwarder.route(id) {
            Ok(destination) => Ok(Some((forwarder, destination))),
            // Nobody may load it because this pod's own load failed: the cache answers with that
            // failure, which says more than the refusal.
            Err(MeshError::Refused { refusal: Refusal::NoPod, .. })
                if matches!(self.cache.status(id), CopyStatus::Failed { .. }) =>
            {
                Ok(None)
            }
            Err(refused) => Err(refused),
        }
    }

    /// Brings this pod's view up to the store's present: for a name it does not know, which may have
    /// been registered through another pod a moment ago (ModelMesh reads its registry strongly on a
    /// miss too). `false` when that could not be done within [`STRONG_READ_LIMIT`].
    pub(crate) async fn caught_up_with_store(&self) -> bool {
        self.view.catch_up_with_store(STRONG_READ_LIMIT).await
    }

    /// A lease on `id` here, loading it if need be. A model this pod's view does not know may have
    /// been registered through another pod a moment ago: the registry is read once, and the load
    /// tried again, before the request hears NOT_FOUND (the front does the same for names it cannot
    /// resolve, but a model's id resolves to itself, known or not, and is found missing only here).
    async fn acquire(&self, id: &ModelId) -> Result<crate::node::cache::Lease, MeshError> {
        match self.cache.acquire(id).await {
            Err(crate::CacheError::NotFound(_)) if self.caught_up_with_store().await => {
                Ok(self.cache.acquire(id).await?)
            }
            acquired => Ok(acquired?),
        }
    }

    /// A request forwarded here for a model this pod does not hold is served from the spec the
    /// forwarding pod acted on: this pod's view may not have that registration yet.
    async fn catch_up_with_sender(&self, metadata: &tonic::metadata::MetadataMap, id: &ModelId) {
        peers::catch_up_with_sender(&self.view, metadata, id, peers::FORWARDED_VIEW_WAIT).await;
    }

    /// The inference graph a `ModelInfer` call runs: the graph `model_name` names, unless the call's
    /// headers name the model or vmodel (`has_header` answers whether one is present).
    pub(crate) fn graph_named(
        &self,
        has_header: impl Fn(&str) -> bool,
        model_name: &str,
    ) -> Option<(ModelId, Arc<GraphSpec>)> {
        // The view first: most names are no graph's, and then no header needs looking up.
        let id = ModelId::new(model_name).ok()?;
        let graph = self.view.graph(&id)?;
        if router::names_target(has_header) {
            return None;
        }
        Some((id, graph))
    }

    /// One step of a graph: a `ModelInfer` for the model (or vmodel) `request` names, taking the path a
    /// client's call for it takes through the front: served here when placement says so (loading the
    /// model if it must), else passed to the peer as bytes, one hop.
    pub(crate) async fn infer_step(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        request: ModelInferRequest,
    ) -> Result<ModelInferResponse, Status> {
        let started = Instant::now();
        let Decision { id, peer } = self.decide(metadata, &request.model_name)?;
        if let Some((forwarder, peer)) = peer {
            let body = frame::encode(&request)?;
            let mut headers = metadata.clone().into_headers();
            headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            match forwarder.forward(peer, &id, &headers, body).await {
                Forwarded::Answered { answer, .. } => {
                    let message = frame::message(&answer.body).ok_or_else(|| {
                        Status::internal("a peer's answer is not one uncompressed gRPC message")
                    })?;
                    return ModelInferResponse::decode(message).map_err(|e| {
                        Status::internal(format!("a peer's answer is not a ModelInferResponse: {e}"))
                    });
                }
                Forwarded::Refused(status) => return Err(status),
                Forwarded::ServeHere => {}
            }
        }
        Ok(self.infer(metadata, Some(id), request, started).await?)
    }

    /// Ready when a request would be answered without a load: a copy here or on a live peer.
    fn ready_without_load(&self, id: &ModelId) -> bool {
        self.cache.is_loaded(id) || self.forwarder.as_ref().is_some_and(|f| f.loaded_elsewhere(id))
    }

    /// The pod's model cache.
    pub(crate) fn cache(&self) -> &ModelCache {
        &self.cache
    }

    /// A lease on `id` here, loading it if need be: for a call the front or the passthrough decided to
    /// serve here.
    pub(crate) async fn lease(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        id: &ModelId,
    ) -> Result<crate::node::cache::Lease, MeshError> {
        if let Some(lease) = self.cache.lease_if_loaded(id) {
            return Ok(lease);
        }
        self.catch_up_with_sender(metadata, id).await;
        self.acquire(id).await
    }

    /// Whether `ModelInfer` calls with these headers are routed by placement (the front does that, see
    /// [`crate::api::front`]): not when this pod runs alone, nor for a call forwarded here.
    pub(crate) fn routes(&self, headers: &http::HeaderMap) -> bool {
        self.forwarder.is_some() && !headers.contains_key(&peers::FORWARDED)
    }

    /// Where a `ModelInfer` call for `model_name` runs: the model it resolves to, and the peer to pass
    /// it to, if not here. A model loaded here is served here without asking where else it is.
    pub(crate) fn decide(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        model_name: &str,
    ) -> Result<Decision<'_>, MeshError> {
        let id = self.target(metadata, model_name)?;
        if self.cache.is_loaded(&id) {
            return Ok(Decision { id, peer: None });
        }
        match self.destination(metadata, &id)? {
            Some((forwarder, Destination::Peer(peer))) => Ok(Decision { id, peer: Some((forwarder, peer)) }),
            _ => Ok(Decision { id, peer: None }),
        }
    }

    /// Serves a request here: for `resolved` when the front decided so, otherwise for the model the
    /// request names (a call forwarded here, or a pod that runs alone).
    async fn infer(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        resolved: Option<ModelId>,
        request: ModelInferRequest,
        started: Instant,
    ) -> Result<ModelInferResponse, MeshError> {
        let id = match resolved {
            Some(id) => id,
            None => self.target(metadata, &request.model_name)?,
        };
        let local = self.cache.lease_if_loaded(&id);
        if local.is_none() {
            self.catch_up_with_sender(metadata, &id).await;
        }
        let (model_name, requested_version, request_id) =
            (request.model_name.clone(), request.model_version.clone(), request.id.clone());
        let span = tracing::debug_span!("infer", model_id = %id, request_id = %request_id);
        let served: Result<ModelInferResponse, MeshError> = async {
            let decoded = v2::decode(request)?;
            let lease = match local {
                Some(lease) => lease,
                None => self.acquire(&id).await?,
            };
            v2::check(id.as_str(), lease.metadata(), &decoded.request)?;
            let version = lease.version().map_or(requested_version, |v| v.to_string());
            let copy = lease.copy();
            // Only a model in another process can be lost under a call (its process restarted); a copy
            // of the request is kept for the one retry then, its tensors sharing their `Bytes`.
            let retry = lease.model().passthrough().is_some().then(|| decoded.request.clone());
            let outputs = match self.worker.infer(lease, decoded.request).await {
                Err(MeshError::Runtime { source: RuntimeError::Lost { reason, .. }, .. })
                    if let Some(request) = retry =>
                {
                    // The runtime's process died and came back without the model: load it again and
                    // answer, once. A second loss is an error like any other.
                    tracing::warn!(%reason, "model lost by its runtime; loading it again");
                    self.cache.drop_lost(&id, &copy).await;
                    let lease = self.cache.acquire(&id).await?;
                    self.worker.infer(lease, request).await?
                }
                outputs => outputs?,
            };
            let name = if model_name.is_empty() { id.to_string() } else { model_name };
            Ok(v2::encode(name, version, request_id, outputs, decoded.raw))
        }
        .instrument(span)
        .await;
        if let Some(labels) = &self.per_model {
            let code = match &served {
                Ok(_) => "OK",
                Err(e) => code_label(e.code()),
            };
            crate::metrics::per_model::record(labels, id.as_str(), code, started.elapsed().as_secs_f64());
        }
        served
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.ready.load(Ordering::Acquire) }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let metadata = request.metadata();
        // A graph is ready when every model it names is.
        if let Some((_, graph)) = self.graph_named(|h| metadata.contains_key(h), &request.get_ref().name) {
            let ready = densemesh_placement::graph::service_names(&graph)
                .into_iter()
                .all(|name| self.target(metadata, name).is_ok_and(|id| self.ready_without_load(&id)));
            return Ok(Response::new(ModelReadyResponse { ready }));
        }
        let id = self.target(metadata, &request.get_ref().name)?;
        Ok(Response::new(ModelReadyResponse { ready: self.ready_without_load(&id) }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "densemesh".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: Vec::new(),
        }))
    }

    /// Loads the model if needed: its interface is only known once a runtime has opened it. A graph's
    /// name answers the graph's interface, read off its models ([`crate::api::graph::metadata`]).
    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let metadata = request.metadata();
        if let Some((name, graph)) = self.graph_named(|h| metadata.contains_key(h), &request.get_ref().name) {
            return crate::api::graph::metadata::describe(self, name.as_str(), &graph)
                .await
                .map(Response::new);
        }
        let id = self.target(request.metadata(), &request.get_ref().name)?;
        if !self.cache.is_loaded(&id) {
            self.catch_up_with_sender(request.metadata(), &id).await;
        }
        if let Some((forwarder, Destination::Peer(peer))) = self.destination(request.metadata(), &id)?
            && let Some(mut answer) = forwarder.metadata(peer, &id).await
        {
            answer.name = id.to_string();
            return Ok(Response::new(answer));
        }
        let lease = self.acquire(&id).await?;
        let metadata = lease.metadata();
        Ok(Response::new(ModelMetadataResponse {
            name: id.to_string(),
            versions: lease.version().map(|v| vec![v.to_string()]).unwrap_or_default(),
            platform: metadata.platform.clone(),
            inputs: metadata.inputs.iter().map(v2::tensor_metadata).collect(),
            outputs: metadata.outputs.iter().map(v2::tensor_metadata).collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let resolved = extensions.get::<Resolved>();
        let started = resolved.map_or_else(Instant::now, |r| r.started);
        if resolved.is_none() {
            self.received(prost::Message::encoded_len(&request));
        }
        let graph = match resolved {
            None => self.graph_named(|h| metadata.contains_key(h), &request.model_name),
            Some(_) => None,
        };
        let answered = match graph {
            Some((name, spec)) => crate::api::graph::run(self, &name, &spec, &metadata, request)
                .await
                .map_err(|e| e.into_status()),
            None => self
                .infer(&metadata, resolved.map(|r| r.id.clone()), request, started)
                .await
                .map_err(Status::from),
        };
        match answered {
            Ok(response) => {
                self.served(started, prost::Message::encoded_len(&response));
                Ok(Response::new(response))
            }
            Err(status) => {
                self.failed(started, &status);
                Err(status)
            }
        }
    }
}

/// Where a `ModelInfer` call runs: on a peer, through the forwarder, or (`peer` empty) here.
pub(crate) struct Decision<'a> {
    pub id: ModelId,
    pub peer: Option<(&'a Forwarder, String)>,
}

/// What the front decided for a `ModelInfer` call it hands on to be served here: the model, and when
/// the call began (so its duration counts the front's part too).
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub id: ModelId,
    pub started: Instant,
}

impl InferenceService {
    /// Counts a `ModelInfer` call whose message arrived (its size without the frame).
    pub(crate) fn received(&self, request_size: usize) {
        m::count_request();
        self.hot.request_size.record(request_size as f64);
    }

    /// Records a `ModelInfer` call answered OK (the size of the message, without its frame).
    pub(crate) fn served(&self, started: Instant, response_size: usize) {
        self.hot.response_size.record(response_size as f64);
        self.hot.ok_duration.record(started.elapsed().as_secs_f64());
        self.hot.ok_count.increment(1);
    }

    /// Records a `ModelInfer` call answered with an error.
    pub(crate) fn failed(&self, started: Instant, status: &Status) {
        tracing::debug!(code = ?status.code(), message = status.message(), "request failed");
        let labels = [("method", "ModelInfer"), ("code", code_label(status.code()))];
        metrics::histogram!(m::REQUEST_DURATION, &labels).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::REQUESTS, &labels).increment(1);
    }
}

/// gRPC's canonical code names, as metric labels without a per-request allocation.
pub(crate) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    //! A request forwarded to a pod whose view lags behind the forwarding pod's.

    use std::time::{Duration, Instant};

    use super::*;
    use crate::test_support::{NO_FILES, TestPod, forwarded_metadata, inference_service as service};

    fn request(model: &str, metadata: tonic::metadata::MetadataMap) -> Request<ModelInferRequest> {
        let message = ModelInferRequest { model_name: model.into(), ..Default::default() };
        Request::from_parts(metadata, tonic::Extensions::default(), message)
    }

    #[tokio::test]
    async fn a_forwarded_request_waits_for_the_registration_its_sender_acted_on() {
        let pod = TestPod::start("a").await;
        let service = service(&pod);
        let next = pod.next_revision().await;
        let infer = service.model_infer(request("m", forwarded_metadata("b", Some(next))));
        // The registration, written through pod b, reaches this pod's view after the request does.
        let (answer, written) = tokio::join!(infer, pod.register_after("m", Duration::from_millis(300)));
        assert_eq!(written, next);
        let status = answer.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "served from the spec, not NOT_FOUND: {status:?}");
        assert!(status.message().contains(NO_FILES), "{status:?}");
    }

    #[tokio::test]
    async fn a_model_registered_through_another_pod_is_found_before_this_pods_watch_brings_it() {
        let (pod, held) = TestPod::start_lagging("a").await;
        let service = service(&pod);
        held.send_replace(true);
        pod.register_after("m", Duration::ZERO).await;
        assert!(pod.view.model(&ModelId::new("m").unwrap()).is_none(), "the watch has not brought it");
        // The watch catches up a moment later, while the request reads the registry.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            held.send_replace(false);
        });
        let status =
            service.model_infer(request("m", tonic::metadata::MetadataMap::new())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "loaded from its spec, not NOT_FOUND: {status:?}");
        assert!(status.message().contains(NO_FILES), "{status:?}");
    }

    #[tokio::test]
    async fn an_unknown_model_is_not_found_at_once_when_the_view_is_not_behind() {
        let pod = TestPod::start("a").await;
        let service = service(&pod);
        let written = pod.register_after("other", Duration::ZERO).await;
        pod.view.caught_up(written).await;
        for metadata in [forwarded_metadata("b", Some(written)), forwarded_metadata("b", None)] {
            let started = Instant::now();
            let status = service.model_infer(request("ghost", metadata)).await.unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert!(started.elapsed() < Duration::from_secs(1), "no wait: {:?}", started.elapsed());
        }
    }
}
