//! Serving a request on another pod: where `placement::route` says (a loaded copy, a copy being
//! loaded, or the pod chosen to load it).
//!
//! One hop at most: a forwarded request carries `densemesh-forwarded`, and a pod that sees it serves
//! locally, loading if it must. A peer that fails the request (unreachable, killed mid-request,
//! shutting down, unable to load the model) is not the end: placement is asked again without the pods
//! that failed it (each attempt still one hop), up to [`MAX_ATTEMPTS`] pods, and only then is it served
//! here. A peer's own answer for the model (INVALID_ARGUMENT, NOT_FOUND, a runtime error) is final:
//! another copy would say the same.
//!
//! An inference request is passed on as the bytes it came in as, and the peer's answer comes back the
//! same way: decoding and re-encoding both was most of what a hop cost. The bytes are shared by every
//! attempt, so a retry copies nothing.

use std::future::Future;

use bytes::Bytes;
use densemesh_placement::ModelId;
use densemesh_placement::route::{Goal, Route};
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::{ModelMetadataRequest, ModelMetadataResponse};
use http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::cluster::peers::{PeerChannel, mark_forwarded, peer_failed};
use crate::cluster::placer::Placer;
use crate::error::MeshError;
use crate::metrics as m;

pub use crate::cluster::peers::{FORWARDED_HEADER, MAX_ATTEMPTS};

/// The one call passed on as bytes.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A gRPC message's frame header: the compressed flag and the length.
pub const FRAME_HEADER: usize = 5;

/// A peer's answer to a call passed on, read whole.
#[derive(Debug)]
pub struct RawAnswer {
    head: http::response::Parts,
    /// The framed message.
    pub body: Bytes,
    trailers: Option<HeaderMap>,
}

impl RawAnswer {
    /// The answer for the client, as the peer gave it.
    pub fn into_response(self) -> http::Response<Body> {
        let trailers = std::future::ready(self.trailers.map(Ok));
        http::Response::from_parts(self.head, Body::new(Full::new(self.body).with_trailers(trailers)))
    }
}

/// Headers naming what a call is for that must not reach the peer: it serves the model this pod
/// resolved, named in `mm-model-id`, and never resolves a vmodel a second time.
const RESOLVED_HERE: [&str; 3] = ["mm-vmodel-id", "mm-vmodel-id-bin", "mm-model-id-bin"];

/// Where a request goes, as the request path needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Serve it here, loading the model if it must.
    Here,
    /// Send it to this peer.
    Peer(String),
}

/// Routing between pods over the shared peer connections.
#[derive(Clone)]
pub struct Forwarder {
    placer: Placer,
    max_message_size: usize,
}

impl Forwarder {
    pub fn new(placer: Placer, max_message_size: usize) -> Self {
        Self { placer, max_message_size }
    }

    /// Whether this request was forwarded to us (then it is served here, never forwarded again).
    pub fn was_forwarded(metadata: &MetadataMap) -> bool {
        metadata.contains_key(FORWARDED_HEADER)
    }

    /// Where a request for `id` goes now (placement's answer for [`Goal::Serve`]).
    pub fn route(&self, id: &ModelId) -> Result<Destination, MeshError> {
        destination(id, self.placer.route(id, Goal::Serve, &[]))
    }

    /// Whether a live pod other than this one holds a loaded copy.
    pub fn loaded_elsewhere(&self, id: &ModelId) -> bool {
        matches!(self.placer.route(id, Goal::HandOff, &[]), Route::Copy(_))
    }

    /// Marks a call for a peer as forwarded and names the model by id (the peer must not resolve a
    /// vmodel a second time).
    fn mark(&self, id: &ModelId, metadata: &mut MetadataMap) {
        mark_forwarded(metadata, self.placer.instance_id(), self.placer.view(), id);
        if let Ok(model) = id.as_str().parse() {
            metadata.insert(crate::node::router::MODEL_ID_HEADER, model);
        }
    }

    /// A message for a peer, marked.
    fn outgoing<T>(&self, id: &ModelId, message: T) -> tonic::Request<T> {
        let mut outgoing = tonic::Request::new(message);
        self.mark(id, outgoing.metadata_mut());
        outgoing
    }

    /// The client's headers for a peer: as they came, less the ones that named what this pod
    /// resolved, marked.
    fn peer_headers(&self, id: &ModelId, headers: &HeaderMap) -> HeaderMap {
        let mut headers = headers.clone();
        for name in RESOLVED_HERE {
            headers.remove(name);
        }
        let mut metadata = MetadataMap::from_headers(headers);
        self.mark(id, &mut metadata);
        metadata.into_headers()
    }

    /// A call for a peer over HTTP/2: the client's body, with [`Forwarder::peer_headers`].
    fn raw_request(&self, id: &ModelId, path: &str, headers: &HeaderMap, body: Bytes) -> http::Request<Body> {
        let mut request = http::Request::new(Body::new(Full::new(body)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() =
            http::Uri::try_from(path).unwrap_or_else(|_| http::Uri::from_static(MODEL_INFER_PATH));
        *request.headers_mut() = self.peer_headers(id, headers);
        request
    }

    /// Calls `first`, then, while peers fail, where placement says next, up to [`MAX_ATTEMPTS`] pods.
    async fn with_failover<T, F, Fut>(&self, id: &ModelId, first: String, call: F) -> Forwarded<T>
    where
        F: Fn(PeerChannel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let peers = self.placer.peers();
        let mut failed: Vec<String> = Vec::new();
        let mut next = Some(first);
        while let Some(peer) = next.take() {
            let attempt = failed.len() + 1;
            let span = tracing::debug_span!("forward", peer = %peer, model_id = %id, attempt);
            let (endpoint, wire) = self.placer.peer_address(&peer).unwrap_or_default();
            let result = match peers.channel(&endpoint, wire) {
                Some(channel) => {
                    let _counted = channel.start_request();
                    call(channel).instrument(span).await
                }
                None => Err(tonic::Status::unavailable(format!("no usable endpoint for peer {peer}"))),
            };
            let status = match result {
                Err(status) if peer_failed(&status) => status,
                answered => {
                    peers.answered(&endpoint);
                    return match answered {
                        Ok(answer) => Forwarded::Answered { answer, retried: !failed.is_empty() },
                        Err(status) => Forwarded::Refused(status),
                    };
                }
            };
            peers.failed(&endpoint);
            failed.push(peer);
            let then = if failed.len() < MAX_ATTEMPTS {
                let exclude: Vec<&str> = failed.iter().map(String::as_str).collect();
                match destination(id, self.placer.route(id, Goal::Serve, &exclude)) {
                    Ok(Destination::Peer(p)) => {
                        next = Some(p);
                        "trying the next pod placement names"
                    }
                    Ok(Destination::Here) => "serving here",
                    Err(e) => {
                        tracing::warn!(model_id = %id, code = ?status.code(), error = %status.message(), "peer could not serve; placement has no other pod");
                        return Forwarded::Refused(tonic::Status::from(e));
                    }
                }
            } else if self.placer.offers(id) {
                "serving here"
            } else {
                tracing::warn!(model_id = %id, code = ?status.code(), error = %status.message(), "peer could not serve; this pod does not offer the model's type");
                return Forwarded::Refused(tonic::Status::unavailable(format!(
                    "model {id}: the {MAX_ATTEMPTS} pods tried could not serve it (last: {}), and this pod does not offer its type (--model-types)",
                    status.message()
                )));
            };
            tracing::warn!(
                peer = %failed[failed.len() - 1],
                model_id = %id,
                code = ?status.code(),
                error = %status.message(),
                next = next.as_deref(),
                "peer could not serve; {then}"
            );
        }
        Forwarded::ServeHere
    }

    /// Asks `peer` (or, if it fails, the next pod) for a model's metadata, so reading it does not load
    /// a second copy here. `None`: ask this pod.
    pub async fn metadata(&self, peer: String, id: &ModelId) -> Option<ModelMetadataResponse> {
        let request = ModelMetadataRequest { name: id.to_string(), version: String::new() };
        let max = self.max_message_size;
        let answer = self
            .with_failover(id, peer, |channel| {
                let outgoing = self.outgoing(id, request.clone());
                let mut client =
                    GrpcInferenceServiceClient::new(channel.channel).max_decoding_message_size(max);
                async move { client.model_metadata(outgoing).await.map(tonic::Response::into_inner) }
            })
            .await;
        match answer {
            Forwarded::Answered { answer, .. } => Some(answer),
            Forwarded::Refused(_) | Forwarded::ServeHere => None,
        }
    }

    /// Passes `ModelInfer` (the client's `headers` and `body`, one gRPC message) to `peer` for model
    /// `id`, and on while peers fail; counted in `densemesh_forwarded_requests_total` by how it ended.
    /// On [`Forwarded::ServeHere`] the caller still has the bytes to serve it with.
    pub async fn forward(
        &self,
        peer: String,
        id: &ModelId,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Forwarded<RawAnswer> {
        self.forward_call(peer, id, MODEL_INFER_PATH, headers, body).await
    }

    /// [`Forwarder::forward`] for a call of any method (`path`, a valid `/package.Service/Method`): a
    /// runtime's own method passed through by model id.
    pub async fn forward_call(
        &self,
        peer: String,
        id: &ModelId,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Forwarded<RawAnswer> {
        let max = self.max_message_size;
        let forwarded = self
            .with_failover(id, peer, |channel| {
                let body = body.clone();
                async move {
                    match channel.wire {
                        // The pod wire carries ModelInfer, the call that must be cheap; the rest go over HTTP/2.
                        Some(wire) if path == MODEL_INFER_PATH => {
                            let answer = wire.call(path, &self.peer_headers(id, headers), body).await?;
                            let (mut head, ()) = http::Response::new(()).into_parts();
                            head.status = answer.status;
                            head.headers = answer.headers;
                            head.version = http::Version::HTTP_2;
                            judge(head, answer.body, answer.trailers, "peer")
                        }
                        _ => {
                            pass_on(channel.channel, self.raw_request(id, path, headers, body), max, "peer")
                                .await
                        }
                    }
                }
            })
            .await;
        let result = match &forwarded {
            Forwarded::Answered { retried: false, .. } => "ok",
            Forwarded::Answered { retried: true, .. } => "retried",
            Forwarded::Refused(_) => "error",
            Forwarded::ServeHere => "fallback",
        };
        metrics::counter!(m::FORWARDED_REQUESTS, "result" => result).increment(1);
        forwarded
    }
}

/// Placement's answer as a destination for a request.
fn destination(id: &ModelId, route: Route) -> Result<Destination, MeshError> {
    match route {
        Route::Here | Route::LoadHere => Ok(Destination::Here),
        Route::Copy(peer) | Route::WaitFor(peer) | Route::LoadOn(peer) => Ok(Destination::Peer(peer)),
        Route::Refuse(refusal) => Err(MeshError::refused(id, refusal)),
    }
}

/// How forwarding a request ended.
#[derive(Debug)]
pub enum Forwarded<T> {
    /// A peer answered; `retried` when an earlier one had failed.
    Answered { answer: T, retried: bool },
    /// A peer answered with an error of the request or the model (another copy would say the same),
    /// or placement had nowhere else to send it; it goes back to the client as it is.
    Refused(tonic::Status),
    /// No peer could serve it: serve it here.
    ServeHere,
}

/// One call on a peer's channel (or a runtime's: `who` names which, for the errors), its answer read
/// whole (at most a message of `max_message_size`): a peer that fails part way through is a failed
/// peer, to be retried elsewhere, not half an answer for the client. Any status but OK is an error, for
/// the failover to judge.
pub(crate) async fn pass_on(
    mut channel: Channel,
    request: http::Request<Body>,
    max_message_size: usize,
    who: &str,
) -> Result<RawAnswer, tonic::Status> {
    let unavailable =
        |what: &str, e: &dyn std::fmt::Display| tonic::Status::unavailable(format!("{who} {what}: {e}"));
    // Not ready means the connection could not be made: the peer failed, as a transport error.
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.map_err(|e| unavailable("not ready", &e))?;
    let response = channel.call(request).await.map_err(|e| unavailable("failed the call", &e))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, max_message_size + FRAME_HEADER)
        .collect()
        .await
        .map_err(|e| unavailable("broke off its answer", &e))?;
    let trailers = body.trailers().cloned();
    judge(parts, body.to_bytes(), trailers, who)
}

/// An answer read whole, judged by its gRPC status: OK is the answer, any other status an error for
/// the failover to judge.
pub(crate) fn judge(
    head: http::response::Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
    who: &str,
) -> Result<RawAnswer, tonic::Status> {
    if head.status != http::StatusCode::OK {
        return Err(tonic::Status::unavailable(format!("{who} answered HTTP {}", head.status)));
    }
    // A failure comes back trailers-only (in the headers); a success ends with OK in the trailers.
    let status = match head.headers.get(&GRPC_STATUS) {
        Some(_) => grpc_status(&head.headers),
        None => trailers.as_ref().and_then(grpc_status),
    };
    match status {
        Some(status) if status.code() == tonic::Code::Ok => Ok(RawAnswer { head, body, trailers }),
        Some(status) => Err(status),
        None => Err(tonic::Status::unavailable(format!("{who} answered with no grpc-status"))),
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The status in these headers or trailers. Details are dropped: tonic panics on details that are not
/// base64, and this pod's peers send none.
fn grpc_status(headers: &HeaderMap) -> Option<tonic::Status> {
    if headers.get(&GRPC_STATUS)?.as_bytes() == b"0" {
        return Some(tonic::Status::ok(""));
    }
    let mut headers = headers.clone();
    headers.remove("grpc-status-details-bin");
    tonic::Status::from_header_map(&headers)
}

#[cfg(test)]
mod tests {
    //! The forwarder against peers that answer, refuse, say UNAVAILABLE, refuse connections, or die
    //! once the request reached them; pods and copies come from a real `ClusterView` on `MemoryStore`.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use densemesh_placement::{ClusterView, Placement};

    use densemesh_placement::registry::{Registry, encode};
    use densemesh_placement::{MemoryStore, Store};
    use densemesh_proto::inference::grpc_inference_service_server::{
        GrpcInferenceService, GrpcInferenceServiceServer,
    };
    use densemesh_proto::inference::*;
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::{Code, Request, Response, Status};

    use super::*;
    use crate::cluster::peers::Peers;
    use crate::cluster::placer::PlacerConfig;
    use crate::error::CacheError;
    use crate::node::cache::{CacheConfig, ModelCache};
    use crate::test_support::{NoRuntime, instance_record};

    /// A peer that answers every ModelInfer the same way, counting the calls and any not marked as
    /// forwarded for model "m" by id (or still naming a vmodel).
    #[derive(Clone)]
    struct FakePeer {
        name: &'static str,
        answer: Result<(), Code>,
        calls: Arc<AtomicUsize>,
        unmarked: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl GrpcInferenceService for FakePeer {
        async fn server_live(
            &self,
            _: Request<ServerLiveRequest>,
        ) -> Result<Response<ServerLiveResponse>, Status> {
            Err(Status::unimplemented("fake peer"))
        }

        async fn server_ready(
            &self,
            _: Request<ServerReadyRequest>,
        ) -> Result<Response<ServerReadyResponse>, Status> {
            Err(Status::unimplemented("fake peer"))
        }

        async fn model_ready(
            &self,
            _: Request<ModelReadyRequest>,
        ) -> Result<Response<ModelReadyResponse>, Status> {
            Err(Status::unimplemented("fake peer"))
        }

        async fn server_metadata(
            &self,
            _: Request<ServerMetadataRequest>,
        ) -> Result<Response<ServerMetadataResponse>, Status> {
            Err(Status::unimplemented("fake peer"))
        }

        async fn model_metadata(
            &self,
            _: Request<ModelMetadataRequest>,
        ) -> Result<Response<ModelMetadataResponse>, Status> {
            Err(Status::unimplemented("fake peer"))
        }

        async fn model_infer(
            &self,
            request: Request<ModelInferRequest>,
        ) -> Result<Response<ModelInferResponse>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let metadata = request.metadata();
            let by_id = metadata.get("mm-model-id").is_some_and(|id| id == "m");
            if !Forwarder::was_forwarded(metadata) || !by_id || metadata.contains_key("mm-vmodel-id") {
                self.unmarked.fetch_add(1, Ordering::SeqCst);
            }
            match self.answer {
                Ok(()) => Ok(Response::new(ModelInferResponse {
                    model_name: self.name.to_owned(),
                    ..Default::default()
                })),
                Err(code) => Err(Status::new(code, format!("{} says no", self.name))),
            }
        }
    }

    impl FakePeer {
        fn new(name: &'static str, answer: Result<(), Code>) -> Self {
            Self { name, answer, calls: Arc::default(), unmarked: Arc::default() }
        }

        /// Serves gRPC and the pod wire on one port, as meshd does.
        async fn serve(&self) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = listener.local_addr().unwrap().to_string();
            let service = GrpcInferenceServiceServer::new(self.clone());
            let wire = crate::cluster::wire::WireServer::new(
                service.clone(),
                1 << 20,
                tokio_util::sync::CancellationToken::new(),
                tokio_util::task::TaskTracker::new(),
            );
            let server = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(crate::cluster::wire::incoming(listener, wire));
            tokio::spawn(server);
            endpoint
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    /// An address nothing listens on: connections are refused, as to a pod killed outright.
    fn refusing_endpoint() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    /// A peer that accepts the connection, reads until the request carrying `marker` has arrived, then
    /// closes it without an answer: a pod that dies mid-request. `reached` says the request got there.
    async fn dies_mid_request(marker: &'static [u8]) -> (String, Arc<AtomicBool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let reached = Arc::new(AtomicBool::new(false));
        let flag = reached.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut first = [0u8; 1];
                let _ = socket.peek(&mut first).await;
                if first[0] == crate::cluster::wire::MAGIC[0] {
                    // The pod wire's handshake.
                    let mut magic = [0u8; 8];
                    let _ = socket.read_exact(&mut magic).await;
                    let _ = socket.write_all(&magic).await;
                } else {
                    // An empty SETTINGS frame: the server's half of the HTTP/2 handshake.
                    let _ = socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                }
                let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
                while let Ok(n @ 1..) = socket.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(marker.len()).any(|w| w == marker) {
                        flag.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            }
        });
        (endpoint, reached)
    }

    /// A forwarder on pod "me" whose view has `copies` (instance, endpoint) each holding a loaded copy
    /// of model "m", the first listed being the most recently loaded (so tried first on a tie); the
    /// peers speak the pod wire when `wire`, and are reached over HTTP/2 otherwise.
    async fn forwarder_with_copies(copies: &[(&str, &str)], wire: bool) -> Forwarder {
        let records: Vec<(&str, Option<&str>, Placement)> = copies
            .iter()
            .enumerate()
            .map(|(i, (instance, endpoint))| {
                (
                    *instance,
                    Some(*endpoint),
                    Placement::Loaded { since_ms: 1000 - i as u64, size_bytes: 1, runtime: String::new() },
                )
            })
            .collect();
        forwarder_with_records(&records, wire).await
    }

    /// A forwarder on pod "me" whose view has, for model "m", a placement record per
    /// (instance, endpoint, record), and an instance record for each one with an endpoint.
    async fn forwarder_with_records(records: &[(&str, Option<&str>, Placement)], wire: bool) -> Forwarder {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let registry = Registry::new(store.clone(), "t");
        let model = ModelId::new("m").unwrap();
        for (instance, endpoint, copy) in records {
            if let Some(endpoint) = endpoint {
                let mut record = instance_record(endpoint);
                record.peer_wire = if wire { crate::cluster::wire::VERSION } else { 0 };
                store.put(&registry.instance_key(instance), encode(&record), None).await.unwrap();
            }
            store.put(&registry.placement_key(&model, instance), encode(copy), None).await.unwrap();
        }
        let view = ClusterView::start(registry).await.unwrap();
        let locate: crate::node::cache::Locate = Arc::new(|id: ModelId| {
            async move { Err(CacheError::NotFound(format!("model {id} not found").into())) }.boxed()
        });
        let cache = ModelCache::new(CacheConfig::default(), Arc::new(NoRuntime), locate);
        let config = PlacerConfig {
            anti_churn_age: Duration::ZERO,
            wait_limit: Duration::from_secs(10),
            model_repo: std::path::PathBuf::new(),
            model_types: densemesh_placement::spec::legacy_model_types(),
            admin_token: None,
        };
        let placer =
            Placer::new("me".into(), view, cache, Peers::new(Duration::from_secs(10), 1 << 20), config);
        Forwarder::new(placer, 1 << 20)
    }

    #[tokio::test]
    async fn a_pod_that_failed_the_model_gets_it_again_only_once_its_back_off_ends() {
        let now = crate::cluster::instance::now_ms();
        let failed = |retry_after_ms: u64| Placement::Failed {
            since_ms: now - 10,
            reason: "bad".into(),
            retry_after_ms,
        };
        let model = ModelId::new("m").unwrap();
        let hour = 3_600_000;
        // This pod is backing off too, so only the peer's back-off decides.
        let route = |peer_retry_after_ms: u64| async move {
            let forwarder = forwarder_with_records(
                &[
                    ("me", None, failed(now + hour)),
                    ("peer", Some("127.0.0.1:1"), failed(peer_retry_after_ms)),
                ],
                false,
            )
            .await;
            forwarder.route(&ModelId::new("m").unwrap()).map_err(|e| Status::from(e).code())
        };
        assert_eq!(route(now + hour).await, Err(Code::Unavailable), "nobody may load it now");
        assert_eq!(route(now - 1).await, Ok(Destination::Peer("peer".into())), "the peer's back-off is over");
        // A peer whose back-off is over still comes after this pod when this pod never failed it.
        let forwarder =
            forwarder_with_records(&[("peer", Some("127.0.0.1:1"), failed(now - 1))], false).await;
        assert_eq!(forwarder.route(&model).ok(), Some(Destination::Here));
    }

    /// Forwards a request for "m" as a client sent it (a vmodel header included, which must not reach
    /// the peer), the peer's answer decoded.
    async fn forward(forwarder: &Forwarder, request_id: &str) -> Forwarded<ModelInferResponse> {
        let model = ModelId::new("m").unwrap();
        let Ok(Destination::Peer(first)) = forwarder.route(&model) else { panic!("a copy to forward to") };
        let request =
            ModelInferRequest { model_name: "m".into(), id: request_id.into(), ..Default::default() };
        let message = prost::Message::encode_to_vec(&request);
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        headers.insert("te", "trailers".parse().unwrap());
        headers.insert("mm-vmodel-id", "the-vmodel".parse().unwrap());
        match forwarder.forward(first, &model, &headers, body.into()).await {
            Forwarded::Answered { answer, retried } => {
                let answer =
                    prost::Message::decode(&answer.body[FRAME_HEADER..]).expect("a ModelInferResponse");
                Forwarded::Answered { answer, retried }
            }
            Forwarded::Refused(status) => Forwarded::Refused(status),
            Forwarded::ServeHere => Forwarded::ServeHere,
        }
    }

    #[tokio::test]
    async fn a_failed_peer_hands_the_request_to_the_next_copy() {
        for wire in [false, true] {
            a_failed_peer_hands_the_request_to_the_next_copy_over(wire).await;
        }
    }

    async fn a_failed_peer_hands_the_request_to_the_next_copy_over(wire: bool) {
        let (dying, reached) = dies_mid_request(b"request-7f3a").await;
        let good = FakePeer::new("good", Ok(()));
        let good_endpoint = good.serve().await;
        let forwarder = forwarder_with_copies(
            &[("dying", &dying), ("dead", &refusing_endpoint()), ("good", &good_endpoint)],
            wire,
        )
        .await;
        match forward(&forwarder, "request-7f3a").await {
            Forwarded::Answered { answer, retried } => {
                assert_eq!(answer.model_name, "good");
                assert!(retried);
            }
            other => panic!("expected an answer from the third copy, got {other:?}"),
        }
        assert!(reached.load(Ordering::SeqCst), "the first peer died after the request reached it");
        assert_eq!(good.calls(), 1);
        assert_eq!(good.unmarked.load(Ordering::SeqCst), 0, "a retry is still marked as forwarded");
        assert_eq!(forwarder.placer.peers().in_flight(&good_endpoint), 0);
        let reached_by = forwarder.placer.peers().channel(&good_endpoint, wire).unwrap();
        assert_eq!(
            reached_by.wire.is_some_and(|w| w.connected()),
            wire,
            "over the pod wire when the peer speaks it"
        );
        // The pods that just failed are tried after the copy that answered, not first again.
        assert!(matches!(forward(&forwarder, "next").await, Forwarded::Answered { retried: false, .. }));
        assert_eq!(good.calls(), 2);
    }

    #[tokio::test]
    async fn a_peers_own_error_is_the_answer_and_no_other_copy_is_asked() {
        for wire in [false, true] {
            a_peers_own_error_is_the_answer_over(wire).await;
        }
    }

    async fn a_peers_own_error_is_the_answer_over(wire: bool) {
        let refuses = FakePeer::new("refuses", Err(Code::InvalidArgument));
        let good = FakePeer::new("good", Ok(()));
        let forwarder = forwarder_with_copies(
            &[("refuses", &refuses.serve().await), ("good", &good.serve().await)],
            wire,
        )
        .await;
        match forward(&forwarder, "r").await {
            Forwarded::Refused(status) => assert_eq!(status.code(), Code::InvalidArgument),
            other => panic!("expected the peer's INVALID_ARGUMENT, got {other:?}"),
        }
        assert_eq!((refuses.calls(), good.calls()), (1, 0));
    }

    #[tokio::test]
    async fn unavailable_peers_are_each_tried_once_up_to_the_limit_then_it_is_served_here() {
        for wire in [false, true] {
            unavailable_peers_are_each_tried_once_over(wire).await;
        }
    }

    async fn unavailable_peers_are_each_tried_once_over(wire: bool) {
        let peers: Vec<FakePeer> =
            ["u1", "u2", "u3", "u4"].into_iter().map(|n| FakePeer::new(n, Err(Code::Unavailable))).collect();
        let mut copies = Vec::new();
        for peer in &peers {
            copies.push((peer.name, peer.serve().await));
        }
        let copies: Vec<(&str, &str)> = copies.iter().map(|(n, e)| (*n, e.as_str())).collect();
        let forwarder = forwarder_with_copies(&copies, wire).await;
        match forward(&forwarder, "r").await {
            Forwarded::ServeHere => {}
            other => panic!("expected to serve it here, got {other:?}"),
        }
        let calls: Vec<usize> = peers.iter().map(FakePeer::calls).collect();
        assert_eq!(calls, [1, 1, 1, 0], "least busy first (ties in view order), never one twice");
        assert_eq!(MAX_ATTEMPTS, 3);
    }
}
