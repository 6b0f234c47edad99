//! Serving a request on another pod: where the model already is, or where placement says to load it.
//!
//! One hop at most: a forwarded request carries `densemesh-forwarded`, and a pod that sees it serves
//! locally, loading if it must. If the peer cannot be reached the request is served here instead.
//! Tensors travel as the same `Bytes` they arrived in; only the message framing is written again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use densemesh_placement::choose::{LoadCandidate, choose_load_target};
use densemesh_placement::{ClusterView, ModelId, Placement};
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
};
use parking_lot::Mutex;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use crate::cache::{CopyStatus, ModelCache};
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
        Self { instance_id, view, cache, peers: Arc::default(), timeout, max_message_size }
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
        let instances: HashMap<String, densemesh_placement::InstanceRecord> =
            self.view.instances().into_iter().collect();
        let live = |name: &str| instances.get(name).filter(|r| !r.draining);
        let placements = self.view.placements(id);
        // A loaded copy elsewhere: the one we have the fewest requests in flight to.
        let loaded = placements
            .iter()
            .filter(|(name, p)| name != &self.instance_id && matches!(p, Placement::Loaded { .. }))
            .filter_map(|(name, _)| {
                live(name).map(|r| Peer { instance: name.clone(), endpoint: r.endpoint.clone() })
            })
            .min_by_key(|peer| self.in_flight(&peer.endpoint));
        if loaded.is_some() {
            return loaded;
        }
        // Loading elsewhere already: wait for that copy rather than load a second.
        if let Some((name, _)) = placements
            .iter()
            .find(|(name, p)| name != &self.instance_id && matches!(p, Placement::Loading { .. }))
        {
            return live(name).map(|r| Peer { instance: name.clone(), endpoint: r.endpoint.clone() });
        }
        let failed: Vec<&str> = placements
            .iter()
            .filter(|(_, p)| matches!(p, Placement::Failed { .. }))
            .map(|(name, _)| name.as_str())
            .collect();
        let mut candidates: Vec<LoadCandidate> = instances
            .iter()
            .filter(|(name, _)| *name != &self.instance_id)
            .map(|(name, r)| LoadCandidate {
                failed_recently: failed.contains(&name.as_str()),
                ..LoadCandidate::from_record(name, r)
            })
            .collect();
        candidates.push(LoadCandidate {
            instance: self.instance_id.clone(),
            capacity_bytes: self.cache.config().capacity_bytes,
            used_bytes: self.cache.used_bytes(),
            loading: 0,
            lru_age_seconds: self.cache.lru_age().as_secs(),
            draining: false,
            failed_recently: false,
        });
        let target = choose_load_target(&candidates, &self.instance_id, 1)?;
        if target == self.instance_id {
            return None;
        }
        instances.get(target).map(|r| Peer { instance: target.to_owned(), endpoint: r.endpoint.clone() })
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
        let instances: HashMap<String, densemesh_placement::InstanceRecord> =
            self.view.instances().into_iter().collect();
        self.view.placements(id).iter().any(|(name, p)| {
            name != &self.instance_id
                && matches!(p, Placement::Loaded { .. })
                && instances.get(name).is_some_and(|r| !r.draining)
        })
    }

    /// Asks `peer` for a model's metadata, so reading it does not load a second copy here.
    pub async fn metadata(&self, peer: &Peer, id: &ModelId) -> Option<ModelMetadataResponse> {
        let (mut client, _) = self.client(&peer.endpoint)?;
        let mut outgoing =
            tonic::Request::new(ModelMetadataRequest { name: id.to_string(), version: String::new() });
        if let (Ok(from), Ok(model)) = (self.instance_id.parse(), id.as_str().parse()) {
            outgoing.metadata_mut().insert(FORWARDED_HEADER, from);
            outgoing.metadata_mut().insert(crate::router::MODEL_ID_HEADER, model);
        }
        client.model_metadata(outgoing).await.ok().map(tonic::Response::into_inner)
    }

    /// Sends the request to `peer` for model `id`. `Err` carries the status when the peer could not
    /// serve it for reasons of its own (unreachable, shutting down): the caller then serves it here.
    pub async fn forward(
        &self,
        peer: &Peer,
        id: &ModelId,
        request: ModelInferRequest,
    ) -> Result<ModelInferResponse, Option<tonic::Status>> {
        let (mut client, in_flight) = self.client(&peer.endpoint).ok_or(None)?;
        let mut outgoing = tonic::Request::new(request);
        let md = outgoing.metadata_mut();
        if let (Ok(from), Ok(model)) = (self.instance_id.parse(), id.as_str().parse()) {
            md.insert(FORWARDED_HEADER, from);
            md.insert(crate::router::MODEL_ID_HEADER, model);
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let result = client.model_infer(outgoing).await;
        in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(response) => {
                metrics::counter!(m::FORWARDED_REQUESTS, "result" => "ok").increment(1);
                Ok(response.into_inner())
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ) =>
            {
                metrics::counter!(m::FORWARDED_REQUESTS, "result" => "fallback").increment(1);
                tracing::warn!(peer = %peer.instance, model_id = %id, error = %status.message(), "peer could not serve; serving here");
                Err(None)
            }
            Err(status) => {
                metrics::counter!(m::FORWARDED_REQUESTS, "result" => "error").increment(1);
                Err(Some(status))
            }
        }
    }
}
