//! Serving a request on another pod: where the model already is, or where placement says to load it.
//!
//! One hop at most: a forwarded request carries `densemesh-forwarded`, and a pod that sees it serves
//! locally, loading if it must. A peer that fails the request (unreachable, killed mid-request,
//! shutting down, unable to load the model) is not the end: the request goes on to the least busy
//! other pod holding a loaded copy (each attempt still one hop), and only when none is left is it
//! served here. A peer's own answer for the model (INVALID_ARGUMENT, NOT_FOUND, a runtime error) is
//! final: another copy would say the same. Tensors travel as the same `Bytes` they arrived in; only
//! the message framing is written again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use densemesh_placement::choose::{
    CopyHolder, LoadCandidate, choose_copy, choose_load_target, retry_after_ms,
};
use densemesh_placement::{ClusterView, InstanceRecord, ModelId, Placement};
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
};
use parking_lot::Mutex;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::node::cache::{CopyStatus, ModelCache};
use crate::metrics as m;

/// Marks a request that was already forwarded once.
pub const FORWARDED_HEADER: &str = "densemesh-forwarded";

/// A pooled client to one peer and the requests in flight to it.
type PeerClient = (GrpcInferenceServiceClient<Channel>, Arc<AtomicUsize>);

/// A peer pod to forward to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub instance: String,
    pub endpoint: String,
}

/// Routing between pods, and the pooled connections to them.
#[derive(Clone)]
pub struct Forwarder {
    instance_id: String,
    view: ClusterView,
    cache: ModelCache,
    peers: Arc<Mutex<HashMap<String, PeerClient>>>,
    /// When each peer (by endpoint) last failed a request, so the next requests try other copies first.
    failures: Arc<Mutex<HashMap<String, Instant>>>,
    timeout: Duration,
    max_message_size: usize,
}

impl Forwarder {
    pub fn new(
        instance_id: String,
        view: ClusterView,
        cache: ModelCache,
        timeout: Duration,
        max_message_size: usize,
    ) -> Self {
        Self {
            instance_id,
            view,
            cache,
            peers: Arc::default(),
            failures: Arc::default(),
            timeout,
            max_message_size,
        }
    }

    /// Whether this request was forwarded to us (then it is served here, never forwarded again).
    pub fn was_forwarded(metadata: &MetadataMap) -> bool {
        metadata.contains_key(FORWARDED_HEADER)
    }

    /// The peer that should serve `id`, or `None` to serve it here.
    pub fn route(&self, id: &ModelId) -> Option<Peer> {
        if !matches!(self.cache.status(id), CopyStatus::NotLoaded | CopyStatus::Failed { .. }) {
            return None;
        }
        let instances: HashMap<String, InstanceRecord> = self.view.instances().into_iter().collect();
        let live = |name: &str| instances.get(name).filter(|r| !r.draining);
        let placements = self.view.placements(id);
        // A loaded copy elsewhere: the one we have the fewest requests in flight to.
        if let Some(peer) = self.loaded_copy(&instances, &placements, &[]) {
            return Some(peer);
        }
        // Loading elsewhere already: wait for that copy rather than load a second.
        if let Some((name, _)) = placements
            .iter()
            .find(|(name, p)| name != &self.instance_id && matches!(p, Placement::Loading { .. }))
        {
            return live(name).map(|r| Peer { instance: name.clone(), endpoint: r.endpoint.clone() });
        }
        let mut candidates: Vec<LoadCandidate> = instances
            .iter()
            .filter(|(name, _)| *name != &self.instance_id)
            .map(|(name, r)| LoadCandidate::from_record(name, r, &placements))
            .collect();
        // This pod as its cache says now, but backing off as its own record says, like every other
        // pod: while it would only answer with its remembered failure, a pod that may load goes first.
        candidates.push(LoadCandidate {
            instance: self.instance_id.clone(),
            capacity_bytes: self.cache.config().capacity_bytes,
            used_bytes: self.cache.used_bytes(),
            loading: 0,
            lru_age_seconds: self.cache.lru_age().as_secs(),
            draining: false,
            retry_after_ms: retry_after_ms(&placements, &self.instance_id),
        });
        let target = choose_load_target(&candidates, &self.instance_id, 1, crate::cluster::instance::now_ms())?;
        if target == self.instance_id {
            return None;
        }
        instances.get(target).map(|r| Peer { instance: target.to_owned(), endpoint: r.endpoint.clone() })
    }

    /// The least busy live pod other than this one holding a loaded copy, never one in `failed`.
    fn loaded_copy(
        &self,
        instances: &HashMap<String, InstanceRecord>,
        placements: &[(String, Placement)],
        failed: &[&str],
    ) -> Option<Peer> {
        let holders: Vec<CopyHolder> = placements
            .iter()
            .filter(|(name, p)| name != &self.instance_id && matches!(p, Placement::Loaded { .. }))
            .filter_map(|(name, _)| {
                let record = instances.get(name).filter(|r| !r.draining)?;
                Some(CopyHolder {
                    instance: name.clone(),
                    in_flight: self.in_flight(&record.endpoint),
                    failed_recently: self.failed_recently(&record.endpoint),
                })
            })
            .collect();
        let chosen = choose_copy(&holders, failed)?;
        instances.get(chosen).map(|r| Peer { instance: chosen.to_owned(), endpoint: r.endpoint.clone() })
    }

    /// Another copy for a request that `failed` pods could not serve, as the view says now.
    fn next_copy(&self, id: &ModelId, failed: &[String]) -> Option<Peer> {
        let instances: HashMap<String, InstanceRecord> = self.view.instances().into_iter().collect();
        let failed: Vec<&str> = failed.iter().map(String::as_str).collect();
        self.loaded_copy(&instances, &self.view.placements(id), &failed)
    }

    fn failed_recently(&self, endpoint: &str) -> bool {
        self.failures.lock().get(endpoint).is_some_and(|at| at.elapsed() < FAILURE_MEMORY)
    }

    fn in_flight(&self, endpoint: &str) -> usize {
        self.peers.lock().get(endpoint).map_or(0, |(_, n)| n.load(Ordering::Relaxed))
    }

    fn client(&self, endpoint: &str) -> Option<PeerClient> {
        let mut peers = self.peers.lock();
        if let Some((client, n)) = peers.get(endpoint) {
            return Some((client.clone(), n.clone()));
        }
        let channel = Endpoint::from_shared(format!("http://{endpoint}"))
            .ok()?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .timeout(self.timeout)
            .connect_lazy();
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size);
        let counter = Arc::new(AtomicUsize::new(0));
        peers.insert(endpoint.to_owned(), (client.clone(), counter.clone()));
        Some((client, counter))
    }

    /// Whether a live pod other than this one holds a loaded copy.
    pub fn loaded_elsewhere(&self, id: &ModelId) -> bool {
        let instances: HashMap<String, InstanceRecord> = self.view.instances().into_iter().collect();
        self.view.placements(id).iter().any(|(name, p)| {
            name != &self.instance_id
                && matches!(p, Placement::Loaded { .. })
                && instances.get(name).is_some_and(|r| !r.draining)
        })
    }

    /// A message for a peer, marked as forwarded (so it is never forwarded again) and naming the model
    /// by id (the peer must not resolve a vmodel a second time).
    fn outgoing<T>(&self, id: &ModelId, message: T) -> tonic::Request<T> {
        let mut outgoing = tonic::Request::new(message);
        // The mark must be there whatever the instance id: without it a request could bounce.
        let from = self.instance_id.parse().unwrap_or(tonic::metadata::MetadataValue::from_static("peer"));
        outgoing.metadata_mut().insert(FORWARDED_HEADER, from);
        if let Ok(model) = id.as_str().parse() {
            outgoing.metadata_mut().insert(crate::node::router::MODEL_ID_HEADER, model);
        }
        outgoing
    }

    /// Calls `first`, then, while peers fail, the next copy, up to [`MAX_ATTEMPTS`] pods in all.
    async fn with_failover<T, F, Fut>(&self, id: &ModelId, first: Peer, call: F) -> Forwarded<T>
    where
        F: Fn(GrpcInferenceServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut failed: Vec<String> = Vec::new();
        let mut next = Some(first);
        while let Some(peer) = next.take() {
            let attempt = failed.len() + 1;
            let span = tracing::debug_span!("forward", peer = %peer.instance, model_id = %id, attempt);
            let result = match self.client(&peer.endpoint) {
                Some((client, in_flight)) => {
                    let _counted = InFlight::start(in_flight);
                    call(client).instrument(span).await
                }
                None => Err(tonic::Status::unavailable(format!("bad peer endpoint {:?}", peer.endpoint))),
            };
            let status = match result {
                Err(status) if peer_failed(&status) => status,
                answered => {
                    self.failures.lock().remove(&peer.endpoint);
                    return match answered {
                        Ok(answer) => {
                            Forwarded::Answered { answer: answer.into_inner(), retried: !failed.is_empty() }
                        }
                        Err(status) => Forwarded::Refused(status),
                    };
                }
            };
            {
                let mut failures = self.failures.lock();
                failures.retain(|_, at| at.elapsed() < FAILURE_MEMORY);
                failures.insert(peer.endpoint, Instant::now());
            }
            failed.push(peer.instance);
            if failed.len() < MAX_ATTEMPTS {
                next = self.next_copy(id, &failed);
            }
            let then = next.as_ref().map_or("serving here", |_| "trying another copy");
            tracing::warn!(
                peer = %failed[failed.len() - 1],
                model_id = %id,
                code = ?status.code(),
                error = %status.message(),
                next = next.as_ref().map(|p| p.instance.as_str()),
                "peer could not serve; {then}"
            );
        }
        Forwarded::ServeHere
    }

    /// Asks `peer` (or, if it fails, another copy) for a model's metadata, so reading it does not load
    /// a second copy here. `None`: ask this pod.
    pub async fn metadata(&self, peer: Peer, id: &ModelId) -> Option<ModelMetadataResponse> {
        let request = ModelMetadataRequest { name: id.to_string(), version: String::new() };
        let answer = self
            .with_failover(id, peer, |mut client| {
                let outgoing = self.outgoing(id, request.clone());
                async move { client.model_metadata(outgoing).await }
            })
            .await;
        match answer {
            Forwarded::Answered { answer, .. } => Some(answer),
            Forwarded::Refused(_) | Forwarded::ServeHere => None,
        }
    }

    /// Sends the request to `peer` for model `id`, and on to other copies while peers fail; counted in
    /// `densemesh_forwarded_requests_total` by how it ended.
    pub async fn forward(
        &self,
        peer: Peer,
        id: &ModelId,
        request: &ModelInferRequest,
    ) -> Forwarded<ModelInferResponse> {
        let forwarded = self
            .with_failover(id, peer, |mut client| {
                // Cloning shares the tensors' `Bytes`; the original stays for the next attempt.
                let outgoing = self.outgoing(id, request.clone());
                async move { client.model_infer(outgoing).await }
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

/// How long a peer that failed a request is tried after every other copy: about a lease, after which a
/// dead pod's records are gone anyway.
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// Pods one request is sent to, the first included, before it is served here: a request never waits
/// on a long chain of dead pods whose leases have not run out yet.
pub const MAX_ATTEMPTS: usize = 3;

/// How forwarding a request ended.
#[derive(Debug)]
pub enum Forwarded<T> {
    /// A peer answered; `retried` when an earlier one had failed.
    Answered { answer: T, retried: bool },
    /// A peer answered with an error of the request or the model, which goes back to the client as
    /// it is: another copy would say the same.
    Refused(tonic::Status),
    /// No peer could serve it: serve it here.
    ServeHere,
}

/// Whether a failed call means the peer could not serve the request (so another copy may), rather
/// than an answer about the model. tonic keeps the transport error (connection refused, reset when
/// the peer died mid-request, timed out) as the status's source; a status the peer sent has none.
/// UNAVAILABLE from the peer means it is shutting down or could not load the model.
fn peer_failed(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        )
}

/// Counts a request in flight to a peer for as long as it is, even if the caller gives up on it.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    //! The forwarder against peers that answer, refuse, say UNAVAILABLE, refuse connections, or die
    //! once the request reached them; pods and copies come from a real `ClusterView` on `MemoryStore`.

    use std::sync::atomic::AtomicBool;

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
    use crate::node::cache::CacheConfig;
    use crate::error::CacheError;
    use crate::test_support::NoRuntime;

    /// A peer that answers every ModelInfer the same way, counting the calls and any not marked as
    /// forwarded.
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
            if !Forwarder::was_forwarded(request.metadata()) {
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

        async fn serve(&self) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = listener.local_addr().unwrap().to_string();
            let server = tonic::transport::Server::builder()
                .add_service(GrpcInferenceServiceServer::new(self.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
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
                // An empty SETTINGS frame: the server's half of the HTTP/2 handshake.
                let _ = socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
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
    /// of model "m", the first listed being the most recently loaded (so tried first on a tie).
    async fn forwarder_with_copies(copies: &[(&str, &str)]) -> Forwarder {
        let records: Vec<(&str, Option<&str>, Placement)> = copies
            .iter()
            .enumerate()
            .map(|(i, (instance, endpoint))| {
                (*instance, Some(*endpoint), Placement::Loaded { since_ms: 1000 - i as u64, size_bytes: 1 })
            })
            .collect();
        forwarder_with_records(&records).await
    }

    /// A forwarder on pod "me" whose view has, for model "m", a placement record per
    /// (instance, endpoint, record), and an instance record for each one with an endpoint.
    async fn forwarder_with_records(records: &[(&str, Option<&str>, Placement)]) -> Forwarder {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let registry = Registry::new(store.clone(), "t");
        let model = ModelId::new("m").unwrap();
        for (instance, endpoint, copy) in records {
            if let Some(endpoint) = endpoint {
                let record = InstanceRecord {
                    endpoint: (*endpoint).to_owned(),
                    capacity_bytes: 1 << 30,
                    used_bytes: 0,
                    models_loaded: 1,
                    loading: 0,
                    lru_age_seconds: 0,
                    requests_per_minute: 0,
                    draining: false,
                    started_ms: 0,
                };
                store.put(&registry.instance_key(instance), encode(&record), None).await.unwrap();
            }
            store.put(&registry.placement_key(&model, instance), encode(copy), None).await.unwrap();
        }
        let view = ClusterView::start(registry).await.unwrap();
        let locate: crate::node::cache::Locate = Arc::new(|id: ModelId| {
            async move { Err(CacheError::NotFound(format!("model {id} not found").into())) }.boxed()
        });
        let cache = ModelCache::new(CacheConfig::default(), Arc::new(NoRuntime), locate);
        Forwarder::new("me".into(), view, cache, Duration::from_secs(10), 1 << 20)
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
            let forwarder = forwarder_with_records(&[
                ("me", None, failed(now + hour)),
                ("peer", Some("127.0.0.1:1"), failed(peer_retry_after_ms)),
            ])
            .await;
            forwarder.route(&ModelId::new("m").unwrap()).map(|p| p.instance)
        };
        assert_eq!(route(now + hour).await, None, "nobody may load it: served here, with the failure");
        assert_eq!(route(now - 1).await.as_deref(), Some("peer"), "the peer's back-off is over");
        // A peer whose back-off is over still comes after this pod when this pod never failed it.
        let forwarder = forwarder_with_records(&[("peer", Some("127.0.0.1:1"), failed(now - 1))]).await;
        assert_eq!(forwarder.route(&model), None);
    }

    async fn forward(forwarder: &Forwarder, request_id: &str) -> Forwarded<ModelInferResponse> {
        let model = ModelId::new("m").unwrap();
        let first = forwarder.route(&model).expect("a copy to forward to");
        let request =
            ModelInferRequest { model_name: "m".into(), id: request_id.into(), ..Default::default() };
        forwarder.forward(first, &model, &request).await
    }

    #[tokio::test]
    async fn a_failed_peer_hands_the_request_to_the_next_copy() {
        let (dying, reached) = dies_mid_request(b"request-7f3a").await;
        let good = FakePeer::new("good", Ok(()));
        let good_endpoint = good.serve().await;
        let forwarder = forwarder_with_copies(&[
            ("dying", &dying),
            ("dead", &refusing_endpoint()),
            ("good", &good_endpoint),
        ])
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
        assert_eq!(forwarder.in_flight(&good_endpoint), 0);
        // The pods that just failed are tried after the copy that answered, not first again.
        assert!(matches!(forward(&forwarder, "next").await, Forwarded::Answered { retried: false, .. }));
        assert_eq!(good.calls(), 2);
    }

    #[tokio::test]
    async fn a_peers_own_error_is_the_answer_and_no_other_copy_is_asked() {
        let refuses = FakePeer::new("refuses", Err(Code::InvalidArgument));
        let good = FakePeer::new("good", Ok(()));
        let forwarder =
            forwarder_with_copies(&[("refuses", &refuses.serve().await), ("good", &good.serve().await)])
                .await;
        match forward(&forwarder, "r").await {
            Forwarded::Refused(status) => assert_eq!(status.code(), Code::InvalidArgument),
            other => panic!("expected the peer's INVALID_ARGUMENT, got {other:?}"),
        }
        assert_eq!((refuses.calls(), good.calls()), (1, 0));
    }

    #[tokio::test]
    async fn unavailable_peers_are_each_tried_once_up_to_the_limit_then_it_is_served_here() {
        let peers: Vec<FakePeer> =
            ["u1", "u2", "u3", "u4"].into_iter().map(|n| FakePeer::new(n, Err(Code::Unavailable))).collect();
        let mut copies = Vec::new();
        for peer in &peers {
            copies.push((peer.name, peer.serve().await));
        }
        let copies: Vec<(&str, &str)> = copies.iter().map(|(n, e)| (*n, e.as_str())).collect();
        let forwarder = forwarder_with_copies(&copies).await;
        assert!(matches!(forward(&forwarder, "r").await, Forwarded::ServeHere));
        let calls: Vec<usize> = peers.iter().map(FakePeer::calls).collect();
        assert_eq!(calls, [1, 1, 1, 0], "least busy first (ties in view order), never one twice");
        assert_eq!(MAX_ATTEMPTS, 3);
    }

    #[test]
    fn only_transport_failures_and_unavailable_peers_count_as_failed() {
        assert!(peer_failed(&Status::unavailable("shutting down")));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let transport = Status::from_error(Box::new(reset));
        assert_eq!(transport.code(), Code::Unknown, "tonic's code for a reset connection");
        assert!(peer_failed(&transport), "the transport error is kept as its source");
        for code in [Code::InvalidArgument, Code::NotFound, Code::Internal, Code::ResourceExhausted] {
            assert!(!peer_failed(&Status::new(code, "the model says so")), "{code:?}");
        }
    }
}
