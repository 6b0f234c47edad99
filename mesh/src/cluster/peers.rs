//! Calls to other pods: what marks a call as forwarded, when a failed call means the peer failed (so
//! another may serve), and the connections: per peer endpoint, one lazily connected HTTP/2 channel,
//! shared by management calls and by forwarded inferences to pods that do not speak the pod wire, and
//! the pod wire ([`crate::cluster::wire`]) to pods that do; with the requests in flight to each peer
//! and when each last failed one (so the next requests try other copies first). Connections to pods
//! that left the cluster are dropped as soon as the view no longer lists them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use densemesh_placement::store::Revision;
use densemesh_placement::{ClusterView, InstanceRecord, ModelId};
use parking_lot::Mutex;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::wire::{PEER_ACK_TIMEOUT, WirePeer};

/// Marks a call that was already forwarded once: the pod receiving it serves it itself.
pub const FORWARDED_HEADER: &str = "densemesh-forwarded";
/// [`FORWARDED_HEADER`] parsed once, for the lookups on every call.
pub static FORWARDED: http::HeaderName = http::HeaderName::from_static(FORWARDED_HEADER);

/// On a forwarded call: the registry revision of the model's spec the forwarding pod acted on, so the
/// receiving pod, whose view may lag behind (a registration written through the forwarding pod
/// moments ago), waits for it rather than answer NOT_FOUND or load an older spec.
pub const FORWARDED_REVISION_HEADER: &str = "densemesh-registry-revision";

/// How long a pod receiving a forwarded call waits for its view to reach the forwarding pod's
/// revision. Views follow one etcd watch and lag by milliseconds; this only bounds a view that is
/// cut off from the registry.
pub const FORWARDED_VIEW_WAIT: Duration = Duration::from_secs(2);

/// Pods one request is sent to, the first included, before it is served here: a request never waits
/// on a long chain of dead pods whose leases have not run out yet.
pub const MAX_ATTEMPTS: usize = 3;

/// Marks an outgoing call for model `id` as forwarded by `from`: the peer serves it itself and never
/// forwards it again, and first waits until its view has `id`'s spec at least at the revision `view`
/// (the forwarding pod's) has it, when it has it at all.
pub fn mark_forwarded(metadata: &mut MetadataMap, from: &str, view: &ClusterView, id: &ModelId) {
    // The mark must be there whatever the instance id: without it a request could bounce.
    let from = from.parse().unwrap_or(tonic::metadata::MetadataValue::from_static("peer"));
    metadata.insert(FORWARDED_HEADER, from);
    if let Some(revision) = view.model_revision(id) {
        metadata.insert(FORWARDED_REVISION_HEADER, revision.into());
    }
}

/// The revision of the model's spec a forwarded call's sender acted on, if it says.
fn forwarded_revision(metadata: &MetadataMap) -> Option<Revision> {
    metadata.get(FORWARDED_REVISION_HEADER)?.to_str().ok()?.parse().ok()
}

/// On a call forwarded for model `id`: waits, at most `limit`, until `view` holds `id`'s spec at
/// least as new as the forwarding pod did. Returns at once for a call that was not forwarded or
/// names no revision, and when the view is there already (the usual case), so only a view that lags
/// behind the sender's is waited for. Whatever the view holds after is the answer: a model still
/// unknown is NOT_FOUND.
pub async fn catch_up_with_sender(view: &ClusterView, metadata: &MetadataMap, id: &ModelId, limit: Duration) {
    let Some(sent) = forwarded_revision(metadata).filter(|_| metadata.contains_key(FORWARDED_HEADER)) else {
        return;
    };
    if view.model_revision(id).is_some_and(|held| held >= sent) {
        return;
    }
    if tokio::time::timeout(limit, view.caught_up(sent)).await.is_err() {
        tracing::warn!(model_id = %id, revision = sent, waited = ?limit, "this pod's view did not reach the forwarding pod's revision in time");
    }
}

/// Whether a failed call means the peer could not serve the request (so another pod may), rather
/// than an answer about the model. tonic keeps the transport error (connection refused, reset when
/// the peer died mid-request, timed out) as the status's source; a status the peer sent has none.
/// UNAVAILABLE from the peer means it is shutting down or could not load the model.
pub fn peer_failed(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        )
}

/// How long a peer that failed a request is tried after every other copy: about a lease, after which a
/// dead pod's records are gone anyway.
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// One peer's connections and the requests in flight to it.
#[derive(Clone)]
pub struct PeerChannel {
    pub channel: Channel,
    /// The pod wire, when the peer's instance record says it speaks it.
    pub wire: Option<Arc<WirePeer>>,
    in_flight: Arc<AtomicUsize>,
}

impl PeerChannel {
    /// Counts a request to this peer for as long as the guard lives, even if the caller gives up.
    pub fn start_request(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }
}

/// A request in flight to a peer.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct State {
    channels: HashMap<String, PeerChannel>,
    failures: HashMap<String, Instant>,
    /// The instance snapshot the channels were last pruned against.
    pruned_for: Option<Arc<HashMap<String, InstanceRecord>>>,
}

/// The pool; cloning shares it.
#[derive(Clone)]
pub struct Peers {
    state: Arc<Mutex<State>>,
    timeout: Duration,
    max_message_size: usize,
    /// TLS to peers (`--tls-*` with a CA): channels and the wire both verify the peer and present
    /// this pod's certificate.
    tls: Option<crate::tls::PeerTls>,
    /// Whether forwarded calls may use the pod wire (`--peer-wire`).
    wire: bool,
}

impl Peers {
    /// A pool whose calls give up after `timeout`, for messages of at most `max_message_size`.
    pub fn new(timeout: Duration, max_message_size: usize) -> Self {
        Self { state: Arc::default(), timeout, max_message_size, tls: None, wire: true }
    }

    /// Whether to use the pod wire with peers that speak it (`--peer-wire`); HTTP/2 only when not.
    pub fn with_wire(mut self, wire: bool) -> Self {
        self.wire = wire;
        self
    }

    /// Calls peers over TLS with `tls`.
    pub fn with_tls(mut self, tls: Option<crate::tls::PeerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The connections to `endpoint`, made on first use, with the pod wire when `wire` (the peer's
    /// record says it speaks it); `None` when the endpoint is not an address.
    pub fn channel(&self, endpoint: &str, wire: bool) -> Option<PeerChannel> {
        let wire = wire && self.wire;
        let mut state = self.state.lock();
        // A pod restarted on the same address may speak the wire now, or no longer.
        if let Some(peer) = state.channels.get(endpoint).filter(|p| p.wire.is_some() == wire) {
            return Some(peer.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{endpoint}"))
            .ok()?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            // While calls are in flight, a peer that stops answering pings is dropped, failing them
            // over, instead of each waiting out its timeout (see `wire::PEER_ACK_TIMEOUT`).
            .http2_keep_alive_interval(PEER_ACK_TIMEOUT / 2)
            .keep_alive_timeout(PEER_ACK_TIMEOUT / 2)
            .timeout(self.timeout);
        let channel = match &self.tls {
            None => channel.connect_lazy(),
            Some(tls) => channel.connect_with_connector_lazy(tls_connector(
                endpoint,
                crate::tls::peer_server_name(endpoint)?,
                tls.h2.clone(),
            )),
        };
        let wire = wire.then(|| {
            let peer = WirePeer::new(endpoint, self.max_message_size, self.timeout);
            Arc::new(peer.with_tls(self.tls.as_ref().map(|t| t.wire.clone())))
        });
        let peer = PeerChannel { channel, wire, in_flight: Arc::default() };
        state.channels.insert(endpoint.to_owned(), peer.clone());
        Some(peer)
    }

    /// Requests in flight from this pod to `endpoint`.
    pub fn in_flight(&self, endpoint: &str) -> usize {
        self.state.lock().channels.get(endpoint).map_or(0, |p| p.in_flight.load(Ordering::Relaxed))
    }

    /// Whether `endpoint` failed a request moments ago.
    pub fn failed_recently(&self, endpoint: &str) -> bool {
        self.state.lock().failures.get(endpoint).is_some_and(|at| at.elapsed() < FAILURE_MEMORY)
    }

    /// Remembers that `endpoint` failed a request now.
    pub fn failed(&self, endpoint: &str) {
        let mut state = self.state.lock();
        state.failures.retain(|_, at| at.elapsed() < FAILURE_MEMORY);
        state.failures.insert(endpoint.to_owned(), Instant::now());
    }

    /// Forgets a failure: `endpoint` just answered.
    pub fn answered(&self, endpoint: &str) {
        let mut state = self.state.lock();
        if !state.failures.is_empty() {
            state.failures.remove(endpoint);
        }
    }

    /// Drops the channels of pods no longer in `instances`; cheap when the snapshot is the one seen last.
    pub fn prune(&self, instances: &Arc<HashMap<String, InstanceRecord>>) {
        let mut state = self.state.lock();
        if state.pruned_for.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, instances)) {
            return;
        }
        state.pruned_for = Some(instances.clone());
        let live: std::collections::HashSet<&str> = instances.values().map(|r| r.endpoint.as_str()).collect();
        let before = state.channels.len();
        state.channels.retain(|endpoint, _| live.contains(endpoint.as_str()));
        if state.channels.len() < before {
            tracing::debug!(dropped = before - state.channels.len(), "closed channels to pods that left");
        }
    }

    /// Endpoints with an open channel, for tests.
    #[cfg(test)]
    pub fn connected(&self) -> Vec<String> {
        let mut all: Vec<String> = self.state.lock().channels.keys().cloned().collect();
        all.sort();
        all
    }
}

/// Connects a channel to `endpoint` over TLS, checking its certificate names `name`.
fn tls_connector(
    endpoint: &str,
    name: rustls::pki_types::ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ 'static {
    let (endpoint, connector) = (endpoint.to_owned(), tokio_rustls::TlsConnector::from(config));
    tower::service_fn(move |_: http::Uri| {
        let (endpoint, name, connector) = (endpoint.clone(), name.clone(), connector.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&endpoint).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(connector.connect(name, tcp).await?))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::instance_record;

    #[tokio::test]
    async fn channels_to_pods_that_left_are_dropped() {
        let peers = Peers::new(Duration::from_secs(1), 1 << 20);
        assert!(peers.channel("127.0.0.1:1", false).is_some());
        assert!(peers.channel("127.0.0.1:2", true).is_some());
        let live = Arc::new(HashMap::from([("b".to_owned(), instance_record("127.0.0.1:2"))]));
        peers.prune(&live);
        assert_eq!(peers.connected(), ["127.0.0.1:2"]);
        assert!(peers.channel("not an address\n", false).is_none());
        // With the wire off, a peer that speaks it is still reached over HTTP/2 only.
        let off = Peers::new(Duration::from_secs(1), 1 << 20).with_wire(false);
        assert!(off.channel("127.0.0.1:2", true).is_some_and(|p| p.wire.is_none()));
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops_and_failures_are_remembered_briefly() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        let peers = Peers::new(Duration::from_secs(1), 1 << 20);
        let peer = peers.channel("127.0.0.1:3", false).unwrap();
        let counted = peer.start_request();
        assert_eq!(peers.in_flight("127.0.0.1:3"), 1);
        drop(counted);
        assert_eq!(peers.in_flight("127.0.0.1:3"), 0);
        peers.failed("127.0.0.1:3");
        assert!(peers.failed_recently("127.0.0.1:3"));
        peers.answered("127.0.0.1:3");
        assert!(!peers.failed_recently("127.0.0.1:3"));
    }

    #[tokio::test]
    async fn a_forwarded_call_carries_the_revision_of_the_spec_its_sender_acted_on() {
        use crate::test_support::TestPod;

        let sender = TestPod::start("b").await;
        let written = sender.register_after("m", Duration::ZERO).await;
        sender.view.caught_up(written).await;
        let (known, unknown) = (ModelId::new("m").unwrap(), ModelId::new("ghost").unwrap());
        let mut metadata = MetadataMap::new();
        mark_forwarded(&mut metadata, "b", &sender.view, &known);
        assert_eq!(metadata.get(FORWARDED_HEADER).unwrap(), "b");
        assert_eq!(forwarded_revision(&metadata), Some(written));
        let mut metadata = MetadataMap::new();
        mark_forwarded(&mut metadata, "b", &sender.view, &unknown);
        assert!(metadata.contains_key(FORWARDED_HEADER) && forwarded_revision(&metadata).is_none());

        // A receiver whose view never gets there (here: another registry) waits only so long.
        let receiver = TestPod::start("a").await;
        let mut metadata = MetadataMap::new();
        mark_forwarded(&mut metadata, "b", &sender.view, &known);
        let started = std::time::Instant::now();
        catch_up_with_sender(&receiver.view, &metadata, &known, Duration::from_millis(100)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(2), "{waited:?}");
        // The sender itself is there already: no wait.
        let started = std::time::Instant::now();
        catch_up_with_sender(&sender.view, &metadata, &known, Duration::from_secs(10)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn only_transport_failures_and_unavailable_peers_count_as_failed() {
        assert!(peer_failed(&tonic::Status::unavailable("shutting down")));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let transport = tonic::Status::from_error(Box::new(reset));
        assert_eq!(transport.code(), tonic::Code::Unknown, "tonic's code for a reset connection");
        assert!(peer_failed(&transport), "the transport error is kept as its source");
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::NotFound,
            tonic::Code::Internal,
            tonic::Code::ResourceExhausted,
        ] {
            assert!(!peer_failed(&tonic::Status::new(code, "the model says so")), "{code:?}");
        }
    }
}
