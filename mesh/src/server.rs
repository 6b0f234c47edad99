//! Start-up and shutdown of one `meshd` node: runtime, cache, gRPC, REST and admin servers.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use densemesh_placement::registry::Registry;
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, MemoryStore, Source, Store};
use densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use densemesh_proto::mmesh::model_mesh_server::ModelMeshServer;
use densemesh_puller::Puller;
use densemesh_runtime_core::Runtime;
use densemesh_runtime_ort::{OrtConfig, OrtRuntime};
use futures::FutureExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::http::AdminServer;
use crate::api::management::Management;
use crate::api::service::InferenceService;
use crate::cluster::placer::{Placer, PlacerConfig};
use crate::cluster::repository::resolve_repository_path;
use crate::config::runtime_file::RuntimeEntry;
use crate::error::CacheError;
use crate::metrics as m;
use crate::node::cache::{CacheConfig, Locate, ModelCache};
use crate::node::gpu::GpuTier;
use crate::node::runtimes::Runtimes;
use crate::node::worker::{Worker, WorkerConfig};
use densemesh_runtime_gpu::Discovery;

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub grpc_addr: SocketAddr,
    /// KServe V2 REST (`--http-addr`).
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub model_repo: PathBuf,
    pub cache: CacheConfig,
    pub worker: WorkerConfig,
    pub max_message_size: usize,
    pub ort: OrtConfig,
    /// The candle runtime (Hugging Face sentence-embedding models).
    pub candle: densemesh_runtime_candle::CandleConfig,
    /// The tiny evaluator for small ONNX models (`--tiny-max-bytes`); `None`: ONNX Runtime for all.
    pub tiny: Option<densemesh_runtime_tiny::TinyConfig>,
    /// `--runtime-config`: the runtimes besides the built-in ones.
    pub runtime_config: Option<PathBuf>,
    pub shutdown_grace: Duration,
    pub addr_file: Option<PathBuf>,
    /// This node's name in status answers (and, in cluster mode, in placement records).
    pub instance_id: String,
    /// etcd endpoints; empty for the embedded in-memory store.
    pub etcd: Vec<String>,
    /// TLS to etcd (`--etcd-tls-dir`).
    pub etcd_tls: Option<densemesh_placement::store::EtcdTls>,
    /// The endpoint published for peers, if not the bound gRPC address (`--advertise-addr`).
    pub advertise_addr: Option<String>,
    /// Whether this pod publishes and uses the pod wire (`--peer-wire`).
    pub peer_wire: bool,
    /// The management API's token file (`--admin-token-file`).
    pub admin_token_file: Option<PathBuf>,
    /// TLS on the gRPC and REST ports and to peers (`--tls-cert`/`--tls-key`/`--tls-client-ca` or
    /// `--tls-dir`); `None`: plaintext.
    pub tls: Option<crate::tls::TlsFiles>,
    /// The metrics port over TLS too (`--metrics-tls`), with `tls`'s certificate.
    pub metrics_tls: bool,
    /// Which loaded model a load evicts first (`--eviction`).
    pub eviction: densemesh_placement::eviction::Policy,
    /// What models may take of each GPU (`--gpu-capacity`).
    pub gpu_capacity: crate::node::gpu::GpuCapacity,
    /// Per-model metrics for this many models, 0 for none (`--metrics-per-model`).
    pub metrics_per_model: usize,
    /// Key prefix of the mesh's records.
    pub store_prefix: String,
    /// TTL of this pod's lease on its instance and placement records.
    pub lease_ttl: Duration,
    /// Idle time after which an extra copy (another pod holds one too) is dropped.
    pub copy_idle_period: Duration,
    /// Requests per minute on one copy above which another copy is added (0: never).
    pub copy_add_rate: f64,
    /// Mean worker-queue wait of one copy above which another copy is added (zero: never).
    pub copy_add_queue_wait: Duration,
    /// How often request rates and queue waits are checked.
    pub copy_check_interval: Duration,
    /// The puller: disk cache and storage credentials.
    pub pull: densemesh_puller::PullConfig,
    /// How long the registry may be unreachable before new loads are refused.
    pub registry_outage_grace: Duration,
    /// A load never evicts a model used more recently than this (zero: off).
    pub anti_churn_age: Duration,
    /// The model types this pod loads (`--model-types`); placement sends it no others. `None`: every
    /// format its runtimes load.
    pub model_types: Option<Vec<String>>,
}

/// Why the node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Bind { addr: SocketAddr, flag: &'static str, source: std::io::Error },
    #[error(transparent)]
    AdminToken(#[from] crate::api::auth::TokenError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("--advertise-addr {0:?} is not a host, an IP address or host:port")]
    Advertise(String),
    #[error("model repository {0} is not a directory (--model-repo)")]
    NoRepository(PathBuf),
    #[error(transparent)]
    Runtime(#[from] densemesh_runtime_core::Error),
    #[error("{0}")]
    Runtimes(String),
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error("cannot write {path} (--addr-file): {source}")]
    AddrFile { path: PathBuf, source: std::io::Error },
    #[error("cannot start the admin server: {0}")]
    Admin(std::io::Error),
    #[error("rest server failed (--http-addr): {0}")]
    Rest(std::io::Error),
    #[error("registry: {0}")]
    Registry(#[from] densemesh_placement::RegistryError),
    #[error("cannot reach etcd at {0} (--etcd): {1}")]
    Etcd(String, densemesh_placement::StoreError),
    #[error("cannot open the disk cache or storage config (--cache-dir, --storage-config): {0}")]
    Puller(#[from] densemesh_puller::Error),
    #[error("--gpu-capacity names device {0}, and this machine's CUDA devices are {1}")]
    GpuDevice(usize, String),
}

/// The gRPC services meshd serves, as reflection lists them.
const SERVED_SERVICES: &[&str] = &[
    "inference.GRPCInferenceService",
    "mmesh.ModelMesh",
    "densemesh.v1.Admin",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Installs the process-wide Prometheus recorder; call once.
pub fn install_metrics() -> Result<PrometheusHandle, ServeError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), m::LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".to_owned()), m::SIZE_BUCKETS))
        .map_err(|e| ServeError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| ServeError::Metrics(e.to_string()))?;
    m::describe();
    Ok(handle)
}

/// Runs the node until `shutdown` resolves, then drains in-flight requests (up to the grace period),
/// unloads every model and returns.
pub async fn run(
    config: ServeConfig,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if !config.model_repo.is_dir() {
        return Err(ServeError::NoRepository(config.model_repo));
    }
    // Read before anything starts, so a bad certificate stops start-up with the file and flag named.
    let tls = config.tls.clone().map(crate::tls::Tls::open).transpose()?;
    if let Some(tls) = &tls
        && !config.etcd.is_empty()
        && !tls.files().mutual()
    {
        return Err(crate::tls::TlsError::Config(
            "in a cluster (--etcd) TLS needs a CA (--tls-client-ca, or ca.crt in --tls-dir): pods verify each other's certificates against it and present their own"
                .to_owned(),
        )
        .into());
    }
    let (runtimes, model_types, pools) = start_runtimes(&config).await?;
    let offered_runtimes = runtimes.clone();
    let runtime: Arc<dyn Runtime> = Arc::new(runtimes);
    let store: Arc<dyn Store> = if config.etcd.is_empty() {
        Arc::new(MemoryStore::new())
    } else {
        let store = densemesh_placement::store::EtcdStore::connect(&config.etcd, config.etcd_tls.as_ref())
            .await
            .map_err(|e| ServeError::Etcd(config.etcd.join(","), e))?;
        tracing::info!(endpoints = %config.etcd.join(","), prefix = %config.store_prefix, "registry on etcd");
        Arc::new(store)
    };
    let registry = Registry::new(store, &config.store_prefix);
    let view = ClusterView::start(registry.clone()).await?;
    if config.etcd.is_empty() {
        // Alone on the embedded store, this pod's repository is the registry: register it before
        // serving. In a cluster the leader syncs the shared repository (see `cluster::leader`).
        let report = crate::cluster::repository::sync_once(&registry, &view, &config.model_repo).await?;
        tracing::info!(models = report.registered.len(), "model repository registered");
    }
    let pull = config.pull.clone();
    let puller = tokio::task::spawn_blocking(move || Puller::open(pull))
        .await
        .map_err(|e| ServeError::Metrics(format!("puller: {e}")))??;
    let health = crate::cluster::instance::RegistryHealth::new(config.registry_outage_grace);
    let locate = locate_registered(view.clone(), puller.clone(), config.model_repo.clone());
    let gpu = start_gpu_tier(&config).await?;
    let mut cache = ModelCache::new(config.cache.clone(), runtime, locate)
        .with_eviction_policy(config.eviction)
        .with_gpu_tier(gpu.clone());
    if !config.etcd.is_empty() {
        let health = health.clone();
        cache =
            cache.with_load_gate(Arc::new(move || health.refusal(crate::cluster::instance::monotonic_ms())));
    }
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(
        reload_storage_config(puller.clone(), background.clone())
            .instrument(tracing::info_span!("storage config reload")),
    );
    tasks.spawn(
        unload_on_change(view.clone(), cache.clone(), background.clone())
            .instrument(tracing::info_span!("unload on change")),
    );
    let ready = Arc::new(AtomicBool::new(false));

    let grpc = tokio::net::TcpListener::bind(config.grpc_addr).await.map_err(|source| ServeError::Bind {
        addr: config.grpc_addr,
        flag: "--grpc-addr",
        source,
    })?;
    let rest_listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServeError::Bind { addr: config.http_addr, flag: "--http-addr", source })?;
    let http_addr = rest_listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.http_addr,
        flag: "--http-addr",
        source,
    })?;
    let admin_listener = std::net::TcpListener::bind(config.metrics_addr)
        .map_err(|source| ServeError::Bind { addr: config.metrics_addr, flag: "--metrics-addr", source })?;
    let grpc_addr = grpc.local_addr().map_err(|source| ServeError::Bind {
        addr: config.grpc_addr,
        flag: "--grpc-addr",
        source,
    })?;
    let metrics_addr = admin_listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.metrics_addr,
        flag: "--metrics-addr",
        source,
    })?;
    let peers = crate::cluster::peers::Peers::new(
        config.cache.load_timeout + Duration::from_secs(5),
        config.max_message_size,
    )
    .with_tls(tls.as_ref().map(crate::tls::Tls::peer_client).transpose()?.flatten())
    .with_wire(config.peer_wire);
    let token = config.admin_token_file.as_deref().map(crate::api::auth::AdminToken::open).transpose()?;
    let placer = Placer::new(
        config.instance_id.clone(),
        view.clone(),
        cache.clone(),
        peers,
        PlacerConfig {
            anti_churn_age: config.anti_churn_age,
            wait_limit: config.cache.load_timeout + Duration::from_secs(5),
            model_repo: config.model_repo.clone(),
            model_types: model_types.clone(),
            admin_token: token.clone(),
        },
    );
    // The admin server starts once the placer exists: the dashboard shows its decisions.
    let dashboard = crate::api::dashboard::Dashboard::start(
        config.instance_id.clone(),
        view.clone(),
        cache.clone(),
        placer.decisions().clone(),
        puller.clone(),
    );
    let (scraped, managed, runtime) = (cache.clone(), view.clone(), tokio::runtime::Handle::current());
    let metrics_tls = match &tls {
        Some(tls) if config.metrics_tls => Some(tls.metrics_config()?),
        _ => None,
    };
    let _admin = AdminServer::start(
        admin_listener,
        metrics_tls,
        metrics,
        ready.clone(),
        Arc::new(move || {
            scraped.refresh_gauges();
            metrics::gauge!(m::MODELS_MANAGED).set(managed.model_count() as f64);
            metrics::gauge!(m::TASKS_ALIVE).set(runtime.metrics().num_alive_tasks() as f64);
        }),
        dashboard,
    )
    .map_err(ServeError::Admin)?;

    let forwarder = crate::cluster::forward::Forwarder::new(placer.clone(), config.max_message_size);
    let worker = Worker::new(config.worker.clone()).with_gpu_tier(gpu);
    let queue_waits = worker.queue_waits();
    let mut service =
        InferenceService::new(cache.clone(), view.clone(), worker, ready.clone()).with_forwarder(forwarder);
    if config.metrics_per_model > 0 {
        service =
            service.with_model_labels(crate::metrics::per_model::ModelLabels::new(config.metrics_per_model));
    }
    let management = Management::new(registry.clone(), view.clone(), cache.clone(), placer.clone())
        .with_puller(puller.clone())
        .with_runtimes(offered_runtimes);
    let inference = GrpcInferenceServiceServer::new(service.clone())
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    let runtime_calls = crate::api::passthrough::RuntimeCalls::new(config.max_message_size);
    let inference = crate::api::front::Front::new(
        crate::node::limits::OversizeIsInvalid::new(inference),
        service.clone(),
        config.max_message_size,
    )
    .with_runtime_calls(runtime_calls.clone());
    // REST calls the very front gRPC clients reach: one routing decision for both protocols.
    let rest = crate::api::rest::Rest::new(inference.clone(), service.clone(), config.max_message_size);
    let passthrough = crate::api::passthrough::PassthroughLayer::new(
        service,
        SERVED_SERVICES,
        runtime_calls,
        inference.clone(),
    );
    // Reflection lists the services served here; the descriptor set also holds the runtime SPI, which
    // meshd calls on runtimes and never serves.
    let served = |builder: tonic_reflection::server::Builder<'static>| {
        SERVED_SERVICES.iter().fold(
            builder.register_encoded_file_descriptor_set(densemesh_proto::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(*name),
        )
    };
    let reflection = served(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| ServeError::Metrics(format!("reflection: {e}")))?;
    let reflection_alpha = served(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| ServeError::Metrics(format!("reflection: {e}")))?;

    let authorized = move |request: tonic::Request<()>| match &token {
        Some(token) => token.check(request.metadata()).map(|()| request),
        None => Ok(request),
    };
    let stop = CancellationToken::new();
    // Forwarded ModelInfer calls from peers that speak the pod wire reach the same front as gRPC's.
    let (stop_wire, wire_tasks) = (stop.clone(), TaskTracker::new());
    let grpc_tls = tls.as_ref().map(|t| t.server_config(&[crate::tls::ALPN_H2])).transpose()?;
    let rest_tls = tls.as_ref().map(|t| t.server_config(&[crate::tls::ALPN_HTTP1])).transpose()?;
    if let Some(tls) = &tls {
        tasks
            .spawn(reload_tls(tls.clone(), background.clone()).instrument(tracing::info_span!("tls reload")));
    }
    let wire = crate::cluster::wire::WireServer::new(
        inference.clone(),
        config.max_message_size,
        stop.clone(),
        wire_tasks.clone(),
    )
    .with_tls(grpc_tls);
    let routes = tonic::service::Routes::new(inference)
        .add_service(ModelMeshServer::with_interceptor(management, authorized.clone()))
        .add_service(densemesh_proto::admin::admin_server::AdminServer::with_interceptor(
            crate::api::admin_service::AdminService::new(
                registry.clone(),
                cache.clone(),
                placer.clone(),
                stop.clone(),
            ),
            authorized,
        ))
        .add_service(reflection)
        .add_service(reflection_alpha)
        .prepare();
    // Our own listener (bound before anything starts, so port 0 works), shared with the pod wire:
    // `wire::incoming` sets TCP_NODELAY on every connection (or small responses wait on Nagle's
    // algorithm and the peer's delayed ACK, tens of milliseconds per call) and keeps the pod wire's
    // connections for itself.
    let server = crate::api::grpc_server::serve(
        crate::cluster::wire::incoming(grpc, wire),
        tower_layer::Layer::layer(&passthrough, routes),
        stop.clone(),
    );
    let rest = rest.serve(rest_listener, rest_tls, stop.clone().cancelled_owned());
    let wire_drained = async move {
        stop_wire.cancelled().await;
        wire_tasks.close();
        wire_tasks.wait().await;
    };
    let server = async move {
        tokio::try_join!(
            server.map(Ok::<(), ServeError>),
            rest.map(|r| r.map_err(ServeError::Rest)),
            wire_drained.map(Ok::<(), ServeError>)
        )
        .map(|_| ())
    };

    let endpoint = advertised_endpoint(config.advertise_addr.as_deref(), grpc_addr)?;
    if !config.etcd.is_empty() && config.advertise_addr.is_none() && grpc_addr.ip().is_unspecified() {
        tracing::warn!(%grpc_addr, "listening on every address but advertising {endpoint}: other pods cannot reach that; set --advertise-addr");
    }
    let (lease_tx, lease_rx) = tokio::sync::watch::channel(None);
    let instance = crate::cluster::instance::InstanceConfig {
        id: config.instance_id.clone(),
        endpoint: endpoint.clone(),
        lease_ttl: config.lease_ttl,
        model_types: model_types.clone(),
        peer_wire: if config.peer_wire { crate::cluster::wire::VERSION } else { 0 },
        health,
        lease: Arc::new(lease_tx),
    };
    let (drain_tx, drain_rx) = tokio::sync::mpsc::channel(1);
    tasks.spawn(
        crate::cluster::instance::run(
            registry.clone(),
            cache.clone(),
            instance,
            drain_rx,
            background.clone(),
        )
        .instrument(tracing::info_span!("instance", instance_id = %config.instance_id)),
    );
    let synced = Arc::new(tokio::sync::watch::channel(false).0);
    let chores = crate::cluster::leader::Chores {
        registry: registry.clone(),
        placer: placer.clone(),
        model_repo: config.model_repo.clone(),
        synced: synced.clone(),
    };
    tasks.spawn(
        crate::cluster::leader::run(chores, lease_rx, background.clone())
            .instrument(tracing::info_span!("leader", instance_id = %config.instance_id)),
    );
    tasks.spawn(crate::cluster::copies::add_copies_by_load(
        placer.clone(),
        cache.clone(),
        queue_waits,
        crate::cluster::copies::AddCopiesConfig {
            thresholds: densemesh_placement::copies::AddCopyThresholds {
                requests_per_minute: config.copy_add_rate,
                queue_wait: config.copy_add_queue_wait,
            },
            interval: config.copy_check_interval,
        },
        background.clone(),
    ));
    tasks.spawn(
        crate::cluster::copies::drop_idle_copies(
            view.clone(),
            cache.clone(),
            config.instance_id.clone(),
            config.copy_idle_period,
            background.clone(),
        )
        .instrument(tracing::info_span!("drop idle copies")),
    );

    if !config.etcd.is_empty() {
        let limit = config.lease_ttl * 2 + Duration::from_secs(5);
        crate::cluster::leader::repository_registered(&view, &config.instance_id, &synced, limit).await;
    }
    if let Some(path) = &config.addr_file {
        write_addr_file(path, grpc_addr, http_addr, metrics_addr)
            .map_err(|source| ServeError::AddrFile { path: path.clone(), source })?;
    }
    ready.store(true, Ordering::Release);
    tracing::info!(%grpc_addr, advertised = %endpoint, %http_addr, %metrics_addr, repository = %config.model_repo.display(),
        capacity_bytes = config.cache.capacity_bytes, model_types = %model_types.join(","), "meshd serving");

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = shutdown => {
            // Still serving while others take over: marked draining (no new loads come here), then
            // recently used models are loaded on other pods, then in-flight requests drain.
            let hand_off = async {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                if drain_tx.send(done_tx).await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
                }
                let deadline = tokio::time::Instant::now() + config.shutdown_grace / 2;
                crate::cluster::drain::hand_off(&placer, &cache, deadline).await;
            };
            // The server keeps accepting and answering while the hand-off runs.
            tokio::select! {
                result = &mut server => result?,
                () = hand_off => {}
            }
            tracing::info!("shutting down: draining in-flight requests");
            ready.store(false, Ordering::Release);
            stop.cancel();
            match tokio::time::timeout(config.shutdown_grace, &mut server).await {
                Ok(result) => result?,
                Err(_) => tracing::warn!(grace = ?config.shutdown_grace, "requests still running after the grace period; stopping anyway"),
            }
        }
    }
    background.cancel();
    tasks.close();
    tasks.wait().await;
    placer.close().await;
    cache.shutdown().await;
    pools.shutdown().await;
    puller.shutdown().await;
    tracing::info!("meshd stopped");
    Ok(())
}

/// Finds the GPUs and gives each its share of `--gpu-capacity`; says once at start what it found, or
/// why there is no GPU tier.
async fn start_gpu_tier(config: &ServeConfig) -> Result<GpuTier, ServeError> {
    let discovery = tokio::task::spawn_blocking(densemesh_runtime_gpu::discover)
        .await
        .map_err(|e| ServeError::Runtimes(format!("GPU discovery failed: {e}")))?;
    let devices = match discovery {
        Discovery::Unavailable(why) => {
            tracing::info!(reason = %why, "no GPU tier: models run on the host");
            Vec::new()
        }
        Discovery::Devices(devices) if devices.is_empty() => {
            tracing::info!("no GPU tier: the CUDA driver lists no devices");
            devices
        }
        Discovery::Devices(devices) => {
            if let Some(&unknown) = config.gpu_capacity.unknown_devices(&devices).first() {
                let present = devices.iter().map(|d| d.ordinal.to_string()).collect::<Vec<_>>().join(", ");
                return Err(ServeError::GpuDevice(unknown, present));
            }
            devices
        }
    };
    for d in &devices {
        tracing::info!(
            tier = %format!("gpu{}", d.ordinal),
            device = %d.name,
            total_bytes = d.total_bytes,
            free_bytes = d.free_bytes,
            capacity_bytes = config.gpu_capacity.bytes_of(d.ordinal, d.total_bytes),
            "GPU tier"
        );
    }
    Ok(GpuTier::new(&devices, &config.gpu_capacity))
}

/// Models are found through their registered spec: a model of the shared repository under this pod's
/// own `--model-repo`, a local file or model directory, or an object store location pulled into the
/// disk cache.
fn locate_registered(view: ClusterView, puller: Arc<Puller>, model_repo: PathBuf) -> Locate {
    Arc::new(move |id| {
        let (view, puller, model_repo) = (view.clone(), puller.clone(), model_repo.clone());
        async move {
            let spec = view
                .model(&id)
                .ok_or_else(|| CacheError::NotFound(format!("model {id} not found").into()))?;
            let failed = |reason: String| CacheError::LoadFailed {
                model_id: id.clone(),
                reason: reason.into(),
                retry_in: Duration::ZERO,
            };
            let path = match spec.source {
                Source::Repository => resolve_repository_path(&model_repo, &spec.path)
                    .map_err(|e| failed(e.to_string()))?
                    .to_string_lossy()
                    .into_owned(),
                Source::Api => spec.path.clone(),
            };
            let mut fetched = puller.fetch(&path, spec.key.as_deref()).await.map_err(|e| match e {
                densemesh_puller::Error::TooLarge { bytes, limit, .. } => CacheError::TooLarge {
                    model_id: id.clone(),
                    needed_bytes: bytes,
                    capacity_bytes: limit,
                    how: "its size in storage",
                },
                other => failed(other.to_string()),
            })?;
            // The registered type picks the runtime, whatever the file is called.
            fetched.model.format = spec.model_type;
            fetched.model.runtime = spec.runtime;
            fetched.model.gpu = spec.gpu;
            Ok(fetched)
        }
        .boxed()
    })
}

/// Re-reads the storage config when its files change (a Kubernetes secret update swaps a symlink,
/// which polling sees reliably). A broken new version is reported and the old one kept.
async fn reload_storage_config(puller: Arc<Puller>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let reloading = puller.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || reloading.reload_storage_config()).await {
            tracing::error!(error = %e, "storage config not reloaded; keeping the previous one");
        }
    }
}

/// Re-reads the TLS files when they change (a Kubernetes secret update swaps a symlink, which
/// polling sees reliably): new connections get the new certificate, open ones keep theirs. A broken
/// new version (a key that does not match yet, half a rotation) is reported and the old one kept.
async fn reload_tls(tls: crate::tls::Tls, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let reloading = tls.clone();
        match tokio::task::spawn_blocking(move || reloading.reload()).await {
            Ok(Ok(true)) => tracing::info!("tls certificate reloaded"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "tls certificate not reloaded; keeping the previous one")
            }
            _ => {}
        }
    }
}

/// Unloads a model when it is unregistered or its spec changes what is loaded (another path, new
/// files), so the next request loads the new one. A change of placement hints alone (size, minimum
/// copies) leaves the copies serving. The view tells the two apart ([`ViewChange::ModelReplaced`]),
/// so this task keeps nothing per registered model.
async fn unload_on_change(view: ClusterView, cache: ModelCache, stop: CancellationToken) {
    let mut changes = view.subscribe();
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = stop.cancelled() => return,
        };
        match change {
            Ok(ViewChange::ModelReplaced(id) | ViewChange::ModelRemoved(id)) => cache.unload(&id).await,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "model changes came faster than they were followed; some loaded copies may be older than their spec until unloaded"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Writes the bound addresses atomically (temp file, then rename), so a reader never sees half a file.
fn write_addr_file(
    path: &std::path::Path,
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
) -> std::io::Result<()> {
    let body = serde_json::json!({
        "grpc_addr": grpc.to_string(),
        "http_addr": http.to_string(),
        "metrics_addr": metrics.to_string(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body.to_string())?;
    std::fs::rename(&tmp, path)
}

/// The runtime process pools this pod started: stopped (their processes killed and reaped) when it
/// stops, after the cache has unloaded every model, and also when dropped, as on a failed start.
struct RuntimePools(Vec<Arc<densemesh_runtime_remote::RemoteRuntime>>);

impl RuntimePools {
    async fn shutdown(&self) {
        let pools = self.0.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || pools.iter().for_each(|p| p.shutdown())).await {
            tracing::error!(error = %e, "stopping the runtime processes failed");
        }
    }
}

/// The pod's runtimes, and the model types it offers: `--model-types` where given (each must be a
/// format a runtime here loads), else every such format.
async fn start_runtimes(config: &ServeConfig) -> Result<(Runtimes, Vec<String>, RuntimePools), ServeError> {
    let mut pools = Vec::new();
    let ort_config = config.ort.clone();
    let ort = tokio::task::spawn_blocking(move || OrtRuntime::new(&ort_config))
        .await
        .map_err(|e| densemesh_runtime_core::Error::RuntimeUnavailable(e.into()))??;
    let mut runtimes = Runtimes::new();
    let tiny = config.tiny.map(densemesh_runtime_tiny::TinyRuntime::new);
    let onnx = crate::node::onnx::OnnxRuntimes::new(tiny, Arc::new(ort));
    runtimes.add(&["onnx"], Arc::new(onnx)).map_err(ServeError::Runtimes)?;
    let candle = densemesh_runtime_candle::CandleRuntime::new(&config.candle)?;
    runtimes.add(&["huggingface"], Arc::new(candle)).map_err(ServeError::Runtimes)?;
    if let Some(path) = &config.runtime_config {
        let file = crate::config::runtime_file::read(path).map_err(ServeError::Runtimes)?;
        for entry in file.runtimes {
            let formats = entry.formats();
            let name = entry.name().to_owned();
            let runtime: Arc<dyn Runtime> = match entry {
                RuntimeEntry::V2(v2) => {
                    let started = tokio::task::spawn_blocking(move || {
                        densemesh_runtime_remote::RemoteRuntime::start(v2)
                    })
                    .await
                    .map_err(|e| ServeError::Runtimes(format!("runtime {name:?}: {e}")))??;
                    let started = Arc::new(started);
                    pools.push(started.clone());
                    started
                }
                RuntimeEntry::Spi(spi) => {
                    let started =
                        tokio::task::spawn_blocking(move || densemesh_runtime_spi::SpiRuntime::connect(spi))
                            .await
                            .map_err(|e| ServeError::Runtimes(format!("runtime {name:?}: {e}")))?;
                    Arc::new(started.map_err(|e| ServeError::Runtimes(format!("runtime {name:?}: {e}")))?)
                }
            };
            tracing::info!(runtime = %name, formats = %formats.join(","), "runtime ready");
            runtimes.add(&formats, runtime).map_err(ServeError::Runtimes)?;
        }
    }
    let formats = runtimes.formats();
    let model_types = match &config.model_types {
        None => formats,
        Some(wanted) => {
            if let Some(unknown) = wanted.iter().find(|t| !formats.contains(t)) {
                return Err(ServeError::Runtimes(format!(
                    "--model-types names {unknown:?}, which no runtime here loads; they load {}",
                    formats.join(", ")
                )));
            }
            wanted.clone()
        }
    };
    Ok((runtimes, model_types, RuntimePools(pools)))
}

/// The endpoint published for peers: `--advertise-addr` (a host or bare IP takes the bound port, and
/// an IPv6 address its brackets), else the bound address.
fn advertised_endpoint(advertise: Option<&str>, bound: SocketAddr) -> Result<String, ServeError> {
    let Some(given) = advertise.map(str::trim) else { return Ok(bound.to_string()) };
    let invalid = || ServeError::Advertise(given.to_owned());
    if let Ok(ip) = given.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, bound.port()).to_string());
    }
    if given.parse::<SocketAddr>().is_ok() {
        return Ok(given.to_owned());
    }
    let host_ok = |host: &str| {
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    match given.rsplit_once(':') {
        Some((host, port)) if host_ok(host) && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(given.to_owned())
        }
        None if host_ok(given) => Ok(format!("{given}:{}", bound.port())),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod advertise_tests {
    use super::*;

    #[test]
    fn the_advertised_endpoint_takes_the_bound_port_unless_it_names_one() {
        let bound: SocketAddr = "0.0.0.0:8033".parse().unwrap();
        let cases = [
            (None, Some("0.0.0.0:8033")),
            (Some("10.1.2.3"), Some("10.1.2.3:8033")),
            (Some(" 10.1.2.3 "), Some("10.1.2.3:8033")),
            (Some("fd00::1"), Some("[fd00::1]:8033")),
            (Some("[fd00::1]:9000"), Some("[fd00::1]:9000")),
            (Some("meshd-0.meshd.ns.svc"), Some("meshd-0.meshd.ns.svc:8033")),
            (Some("meshd-0.meshd:9000"), Some("meshd-0.meshd:9000")),
            (Some("host:0"), None),
            (Some("host:port"), None),
            (Some("http://host:1"), None),
            (Some("a b"), None),
        ];
        for (given, want) in cases {
            let got = advertised_endpoint(given, bound).ok();
            assert_eq!(got.as_deref(), want, "{given:?}");
        }
    }
}
