//! `meshd` command line: every flag also reads `DENSEMESH_<FLAG>` from the environment.

mod memory;
pub mod runtime_file;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bytesize::{ByteSize, Capacity};
use crate::node::cache::CacheConfig;
use crate::node::worker::WorkerConfig;
use crate::server::ServeConfig;
use memory::{MemoryLimit, MemorySources};

/// densemesh node: serves many models over KServe V2 gRPC, paging them in and out of memory.
#[derive(Debug, Parser)]
#[command(name = "meshd", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve models over gRPC.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the gRPC server (KServe V2 inference, reflection).
    #[arg(long, env = "DENSEMESH_GRPC_ADDR", default_value = "127.0.0.1:8033")]
    pub grpc_addr: SocketAddr,
    /// Address of the KServe V2 REST server (HTTP/JSON inference, binary-data extension); the same
    /// routing and validation as gRPC.
    #[arg(long, env = "DENSEMESH_HTTP_ADDR", default_value = "127.0.0.1:8008")]
    pub http_addr: SocketAddr,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "DENSEMESH_METRICS_ADDR", default_value = "127.0.0.1:2112")]
    pub metrics_addr: SocketAddr,
    /// Model repository: DIR/<model-id>/model.onnx or DIR/<model-id>/<version>/model.onnx.
    #[arg(long, env = "DENSEMESH_MODEL_REPO", default_value = "examples/models")]
    pub model_repo: PathBuf,
    /// Memory for loaded models: a size (2GiB, 512MiB, a byte count) or a share of the container's
    /// memory limit (60%; of the machine's memory when the container has no limit).
    #[arg(long, env = "DENSEMESH_CAPACITY", default_value = "2GiB")]
    pub capacity: Capacity,
    /// Model types this pod loads, comma-separated (ModelMesh's type constraints): placement sends it
    /// only models of these types, and requests for others are forwarded to a pod that loads them.
    /// Empty: none. Default: every format a runtime here loads (built in, and --runtime-config's).
    #[arg(long, env = "DENSEMESH_MODEL_TYPES", value_delimiter = ',', value_parser = parse_model_type)]
    pub model_types: Option<Vec<String>>,
    /// Model loads that may run at once.
    #[arg(long, env = "DENSEMESH_MAX_CONCURRENT_LOADS", default_value_t = 2)]
    pub max_concurrent_loads: usize,
    /// Longest a load may take, waiting for room included (e.g. 60s, 2m).
    #[arg(long, env = "DENSEMESH_LOAD_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub load_timeout: Duration,
    /// Wait after a failed load before trying again; doubles per consecutive failure.
    #[arg(long, env = "DENSEMESH_LOAD_RETRY_BACKOFF", default_value = "2s", value_parser = parse_duration)]
    pub load_retry_backoff: Duration,
    /// Cap on the doubled retry back-off.
    #[arg(long, env = "DENSEMESH_MAX_LOAD_RETRY_BACKOFF", default_value = "60s", value_parser = parse_duration)]
    pub max_load_retry_backoff: Duration,
    /// A model loaded more recently than this is never evicted (guards against thrashing).
    #[arg(long, env = "DENSEMESH_MIN_RESIDENCE", default_value = "0s", value_parser = parse_duration)]
    pub min_residence: Duration,
    /// Largest gRPC message accepted or sent, and largest REST request body.
    #[arg(long, env = "DENSEMESH_MAX_MESSAGE_SIZE", default_value = "64MiB")]
    pub max_message_size: ByteSize,
    /// Inferences running at once on worker threads; 0 means one per core.
    #[arg(long, env = "DENSEMESH_INFER_THREADS", default_value_t = 0)]
    pub infer_threads: usize,
    /// Inferences that may wait for a worker before requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DENSEMESH_MAX_QUEUED_INFERENCES", default_value_t = 1024)]
    pub max_queued_inferences: usize,
    /// Models whose inferences typically take less than this run inline, skipping a thread hand-off.
    #[arg(long, env = "DENSEMESH_INLINE_INFER_BELOW", default_value = "100us", value_parser = parse_duration)]
    pub inline_infer_below: Duration,
    /// Requests with more input tensor bytes than this never run inline, however fast their model
    /// usually is (e.g. 64KiB).
    #[arg(long, env = "DENSEMESH_INLINE_INFER_MAX_BYTES", default_value = "64KiB")]
    pub inline_infer_max_bytes: ByteSize,
    /// Model files up to this size whose runtime loads them in microseconds (the tiny evaluator) load
    /// on the request's thread, skipping the blocking pool; 0 sends every load there, under
    /// --load-timeout.
    #[arg(long, env = "DENSEMESH_INLINE_LOAD_MAX_BYTES", default_value = "64KiB")]
    pub inline_load_max_bytes: ByteSize,
    /// Threads in ONNX Runtime's shared intra-op pool; 0 means one per core.
    #[arg(long, env = "DENSEMESH_ORT_THREADS", default_value_t = 0)]
    pub ort_threads: usize,
    /// ONNX models up to this file size whose operators the tiny evaluator implements (MLPs and
    /// scikit-learn's linear, scaler and tree models as skl2onnx writes them) are held by it, in about
    /// their weights' size, instead of an ONNX Runtime session (50-130 KiB each); anything else loads
    /// in ONNX Runtime. 0: ONNX Runtime loads every ONNX model not forced onto the evaluator
    /// (`ModelInfo.runtime`). Past ~1 MiB a model's weights dwarf a session's fixed cost, and a
    /// session's optimised kernels are worth their memory.
    #[arg(long, env = "DENSEMESH_TINY_MAX_BYTES", default_value = "1MiB")]
    pub tiny_max_bytes: ByteSize,
    /// Runtimes besides the built-in ones, in a YAML or JSON file: remote KServe V2 servers (MLServer,
    /// Triton) and runtimes speaking ModelMesh's model-runtime SPI, each with the formats it loads.
    #[arg(long, env = "DENSEMESH_RUNTIME_CONFIG")]
    pub runtime_config: Option<PathBuf>,
    /// Threads candle's sentence-embedding models (format `huggingface`) share; 0 means one per core.
    #[arg(long, env = "DENSEMESH_CANDLE_THREADS", default_value_t = 0)]
    pub candle_threads: usize,
    /// Path of libonnxruntime.so; by default ORT_DYLIB_PATH, then the pip onnxruntime package.
    #[arg(long, env = "DENSEMESH_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// How long SIGTERM waits for in-flight requests before giving up on them.
    #[arg(long, env = "DENSEMESH_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Write the bound addresses here as JSON once listening (useful with port 0).
    #[arg(long, env = "DENSEMESH_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// etcd endpoints (comma-separated), e.g. http://127.0.0.1:2379; without it the embedded
    /// in-memory store is used and registrations last as long as the process.
    #[arg(long, env = "DENSEMESH_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of this mesh's records in etcd.
    #[arg(long, env = "DENSEMESH_ETCD_PREFIX", default_value = "densemesh")]
    pub etcd_prefix: String,
    /// TLS to etcd: a directory with `ca.crt` (the CA of etcd's certificate) and, where etcd asks for
    /// client certificates, `tls.crt` and `tls.key`; the layout of a mounted Kubernetes TLS secret.
    #[arg(long, env = "DENSEMESH_ETCD_TLS_DIR")]
    pub etcd_tls_dir: Option<PathBuf>,
    /// Where the other pods reach this pod's gRPC port, published as its endpoint: a host (the port is
    /// the one --grpc-addr bound; an IPv6 address may be bare) or host:port. Default: the bound
    /// address itself, which the other pods must then be able to reach.
    #[arg(long, env = "DENSEMESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Forwarded requests between pods ride the pod wire, a lean framing on the gRPC port, where both
    /// pods speak it. false: HTTP/2 only, both ways (this pod neither publishes nor uses the wire),
    /// for a network path that parses the gRPC port as HTTP/2, such as a service-mesh sidecar.
    #[arg(long, env = "DENSEMESH_PEER_WIRE", default_value_t = true, action = clap::ArgAction::Set)]
    pub peer_wire: bool,
    /// A file holding the management API's token: registerModel, setVModel and the Admin service then
    /// answer only calls with `authorization: Bearer <token>` (UNAUTHENTICATED otherwise); inference
    /// stays open. Re-read when it changes.
    #[arg(long, env = "DENSEMESH_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// TLS on the gRPC and REST ports and on calls to other pods: this pod's certificate (PEM, the
    /// chain after it). Re-read when it changes; open connections are kept.
    #[arg(long, env = "DENSEMESH_TLS_CERT", requires = "tls_key", conflicts_with = "tls_dir")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "DENSEMESH_TLS_KEY", requires = "tls_cert", conflicts_with = "tls_dir")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by this CA (PEM). Pods also verify each
    /// other against it, so a cluster (--etcd) with TLS needs it.
    #[arg(long, env = "DENSEMESH_TLS_CLIENT_CA", requires = "tls_cert", conflicts_with = "tls_dir")]
    pub tls_client_ca: Option<PathBuf>,
    /// TLS from a directory laid out as a Kubernetes TLS secret (as modelmesh-serving mounts it):
    /// `tls.crt`, `tls.key`, and `ca.crt`, which turns mutual TLS on when present at start-up.
    #[arg(long, env = "DENSEMESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The name (DNS or IP) every peer's certificate must hold, wherever the peer is dialled. Without
    /// it a peer's certificate must name the address the peer advertises: on Kubernetes that is a
    /// pod IP, which changes, so the chart sets this to the name its certificate is issued for.
    #[arg(long, env = "DENSEMESH_TLS_PEER_NAME", value_parser = crate::tls::parse_peer_name)]
    pub tls_peer_name: Option<rustls::pki_types::ServerName<'static>>,
    /// Serve the metrics port (metrics, health, dashboard) over TLS too, with the same certificate.
    /// It never asks for a client certificate: the kubelet's HTTPS probes present none.
    #[arg(long, env = "DENSEMESH_METRICS_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_tls: bool,
    /// Directories, besides the model repository and the disk cache, that local model paths (and
    /// file:// URIs) may be inside, after `..` and symlinks are resolved; a registration outside all of
    /// them is refused with INVALID_ARGUMENT, the same whether or not the path exists.
    #[arg(long, env = "DENSEMESH_LOCAL_MODEL_ROOTS", value_delimiter = ',')]
    pub local_model_roots: Vec<PathBuf>,
    /// Which loaded model a load evicts first: `lru` (longest idle) or `gdsf` (Greedy-Dual-Size-Frequency:
    /// the lowest uses × reload cost ÷ size, aged, so a cheap, large, rarely used model goes before a
    /// small, costly, busy one). GDSF is the default: on bench/cluster_hit_rate.py's 3 pods it hit 79.4%
    /// against LRU's 74.0%. `meshctl simulate --eviction lru,gdsf` compares them on a trace.
    #[arg(long, env = "DENSEMESH_EVICTION", default_value = "gdsf")]
    pub eviction: densemesh_placement::eviction::Policy,
    /// GPU memory models may take on each device: a size (20GiB) or a share of the device's memory
    /// (90%), for every device, then `N=` entries for device N alone (80%,1=10GiB). Used by a build
    /// with the cuda feature on a machine with GPUs; elsewhere meshd says once that it has no GPU tier.
    #[arg(long, env = "DENSEMESH_GPU_CAPACITY", default_value = "90%")]
    pub gpu_capacity: crate::node::gpu::GpuCapacity,
    /// Adds per-model request metrics (`densemesh_model_requests_total`, `…_duration_seconds`) with a
    /// `model` label for the K models served most lately here, every other one counted as `other`, so
    /// the series stay bounded however many models there are. 0: off.
    #[arg(long, env = "DENSEMESH_METRICS_PER_MODEL", default_value_t = 0)]
    pub metrics_per_model: usize,
    /// TTL of this pod's lease in the registry: after a crash, its records vanish this long after its
    /// last heartbeat (renewed every third of it).
    #[arg(long, env = "DENSEMESH_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// ModelMesh's anti-churn rule: a load never evicts a model used more recently than this; it goes
    /// to a pod that can take it without, or is refused with RESOURCE_EXHAUSTED naming the model it
    /// would evict (0: off, pages freely).
    #[arg(long, env = "DENSEMESH_ANTI_CHURN_AGE", default_value = "10m", value_parser = parse_duration)]
    pub anti_churn_age: Duration,
    /// A copy idle this long is dropped when other pods hold the same model (never the last copy).
    #[arg(long, env = "DENSEMESH_COPY_IDLE_PERIOD", default_value = "5m", value_parser = parse_duration)]
    pub copy_idle_period: Duration,
    /// Requests per minute on one copy above which a copy is added on another pod (0: never).
    #[arg(long, env = "DENSEMESH_COPY_ADD_RATE", default_value_t = 2000.0)]
    pub copy_add_rate: f64,
    /// Mean time a copy's inferences wait for a worker thread, over one check interval, above which a
    /// copy is added on another pod (0: never).
    #[arg(long, env = "DENSEMESH_COPY_ADD_QUEUE_WAIT", default_value = "50ms", value_parser = parse_duration)]
    pub copy_add_queue_wait: Duration,
    /// How often request rates and queue waits are checked for adding copies.
    #[arg(long, env = "DENSEMESH_COPY_CHECK_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub copy_check_interval: Duration,
    /// This node's name in status answers; defaults to the host name.
    #[arg(long, env = "DENSEMESH_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// How long an etcd outage may last before new loads are refused with UNAVAILABLE; until then
    /// they go on from the in-memory view (loaded models are served however long it lasts).
    #[arg(long, env = "DENSEMESH_REGISTRY_OUTAGE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub registry_outage_grace: Duration,
    /// Disk cache of models pulled from object storage; defaults to densemesh-cache-<instance id>
    /// in the system's temporary directory. Survives restarts (its index is rebuilt at start).
    #[arg(long, env = "DENSEMESH_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Byte budget of the disk cache; least recently used models are deleted past it.
    #[arg(long, env = "DENSEMESH_DISK_CAPACITY", default_value = "10GiB")]
    pub disk_capacity: ByteSize,
    /// Storage credentials in modelmesh-serving's storage-config format: a directory with one JSON
    /// file per storage key (a mounted secret) or one JSON file of keys. Re-read when it changes.
    #[arg(long, env = "DENSEMESH_STORAGE_CONFIG")]
    pub storage_config: Option<PathBuf>,
    /// Limit on each storage request, and on a response that stops sending; retried with back-off.
    #[arg(long, env = "DENSEMESH_PULL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub pull_timeout: Duration,
    /// A storage location found unchanged this recently is served from the disk cache without asking
    /// the store again (models sharing one artifact then cost one request per window); 0s asks on
    /// every load.
    #[arg(long, env = "DENSEMESH_PULL_REVALIDATE_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub pull_revalidate_after: Duration,
}

/// Flags that cannot be turned into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag} needs TLS: give --tls-cert and --tls-key, or --tls-dir")]
    NeedsTls { flag: &'static str },
    #[error(
        "cannot tell how much memory --capacity {share} is a share of: {source}; give a size instead (e.g. 2GiB)"
    )]
    Memory { share: Capacity, source: std::io::Error },
}

impl ServeArgs {
    /// The server configuration these flags describe, on this machine (a `--capacity` share is of its
    /// memory limit).
    pub fn into_config(self) -> Result<ServeConfig, ConfigError> {
        self.into_config_with(&MemorySources::system())
    }

    /// [`Self::into_config`] with the memory limit read from `memory`.
    fn into_config_with(self, memory: &MemorySources) -> Result<ServeConfig, ConfigError> {
        let capacity_bytes = match self.capacity {
            Capacity::Bytes(size) => size.0,
            share @ Capacity::ShareOfMemory(_) => {
                let limit = memory.limit().map_err(|source| ConfigError::Memory { share, source })?;
                let bytes = share.bytes_of(limit.bytes());
                match limit {
                    MemoryLimit::Cgroup(of) => tracing::info!(capacity = %share, of, capacity_bytes = bytes,
                        "capacity is a share of the container's memory limit"),
                    MemoryLimit::Physical(of) => {
                        tracing::info!(capacity = %share, of, capacity_bytes = bytes,
                        "the container has no memory limit: capacity is a share of the machine's memory")
                    }
                }
                bytes
            }
        };
        let tls = match (self.tls_dir, self.tls_cert, self.tls_key) {
            (Some(dir), _, _) => Some(crate::tls::TlsFiles::from_dir(&dir)),
            (None, Some(cert), Some(key)) => {
                Some(crate::tls::TlsFiles::from_flags(cert, key, self.tls_client_ca))
            }
            _ => None,
        };
        if tls.is_none() {
            if self.tls_peer_name.is_some() {
                return Err(ConfigError::NeedsTls { flag: "--tls-peer-name" });
            }
            if self.metrics_tls {
                return Err(ConfigError::NeedsTls { flag: "--metrics-tls" });
            }
        }
        let tls = tls.map(|files| files.with_peer_name(self.tls_peer_name));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let instance_id = self.instance_id.unwrap_or_else(default_instance_id);
        let cache_dir = self
            .cache_dir
            .unwrap_or_else(|| std::env::temp_dir().join(format!("densemesh-cache-{instance_id}")));
        // The repository and the cache always count: their models are there by definition.
        let mut local_roots = vec![self.model_repo.clone(), cache_dir.clone()];
        local_roots.extend(self.local_model_roots.into_iter().filter(|r| !r.as_os_str().is_empty()));
        let mut pull = densemesh_puller::PullConfig::new(cache_dir, self.disk_capacity.0);
        pull.local_roots = Some(local_roots);
        pull.storage_config = self.storage_config;
        pull.request_timeout = self.pull_timeout;
        pull.revalidate_after = self.pull_revalidate_after;
        pull.max_object_bytes = Some(capacity_bytes);
        Ok(ServeConfig {
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            metrics_addr: self.metrics_addr,
            model_repo: self.model_repo,
            cache: CacheConfig {
                capacity_bytes,
                max_concurrent_loads: self.max_concurrent_loads.max(1),
                load_timeout: self.load_timeout,
                retry_backoff: self.load_retry_backoff,
                max_retry_backoff: self.max_load_retry_backoff,
                min_residence: self.min_residence,
                copy_bookkeeping_bytes: crate::node::cache::COPY_BOOKKEEPING_BYTES,
                inline_load_max_bytes: self.inline_load_max_bytes.0,
            },
            worker: WorkerConfig {
                concurrency: if self.infer_threads == 0 { cores } else { self.infer_threads },
                max_queued: self.max_queued_inferences,
                inline_below: self.inline_infer_below,
                inline_max_bytes: self.inline_infer_max_bytes.0,
            },
            max_message_size: usize::try_from(self.max_message_size.0).unwrap_or(usize::MAX),
            ort: densemesh_runtime_ort::OrtConfig {
                library_path: self.ort_library,
                intra_threads: self.ort_threads,
            },
            candle: densemesh_runtime_candle::CandleConfig { threads: self.candle_threads },
            tiny: (self.tiny_max_bytes.0 > 0)
                .then_some(densemesh_runtime_tiny::TinyConfig { max_file_bytes: self.tiny_max_bytes.0 }),
            runtime_config: self.runtime_config,
            shutdown_grace: self.shutdown_grace,
            addr_file: self.addr_file,
            instance_id,
            pull,
            registry_outage_grace: self.registry_outage_grace,
            anti_churn_age: self.anti_churn_age,
            etcd: self.etcd,
            etcd_tls: self.etcd_tls_dir.map(|dir| densemesh_placement::store::EtcdTls { dir }),
            advertise_addr: self.advertise_addr.filter(|a| !a.trim().is_empty()),
            peer_wire: self.peer_wire,
            admin_token_file: self.admin_token_file,
            tls,
            metrics_tls: self.metrics_tls,
            eviction: self.eviction,
            gpu_capacity: self.gpu_capacity,
            metrics_per_model: self.metrics_per_model,
            lease_ttl: self.lease_ttl,
            copy_idle_period: self.copy_idle_period,
            copy_add_rate: self.copy_add_rate,
            copy_add_queue_wait: self.copy_add_queue_wait,
            copy_check_interval: self.copy_check_interval,
            store_prefix: self.etcd_prefix,
            model_types: self.model_types.map(|types| types.into_iter().filter(|t| !t.is_empty()).collect()),
        })
    }
}

/// One of `--model-types`: a format name (empty values are skipped, so an empty flag offers none).
/// Whether a runtime here loads it is checked when the runtimes are up.
fn parse_model_type(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || densemesh_placement::spec::is_format_name(s) {
        return Ok(s.to_owned());
    }
    Err(format!("{s:?} is not a model format name (lower-case, e.g. onnx, huggingface, sklearn)"))
}

/// The host name (a pod's name in Kubernetes), else `meshd`.
fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "meshd".to_owned())
}

/// Parses `500ms`, `30s`, `2m`, `1h`, `100us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 =
        number.parse().map_err(|_| format!("{s:?} is not a duration; write e.g. 500ms, 30s or 2m"))?;
    let d = match unit.trim() {
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown unit {other:?} in {s:?}; use us, ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn flags_parse_with_documented_names() {
        let cli = Cli::try_parse_from([
            "meshd",
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--capacity",
            "64MiB",
            "--load-timeout",
            "5s",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command;
        let config = args.into_config().unwrap();
        assert_eq!(config.cache.capacity_bytes, 64 << 20);
        assert_eq!(config.cache.load_timeout, Duration::from_secs(5));
        assert_eq!(config.copy_add_queue_wait, Duration::from_millis(50));
        assert_eq!(config.anti_churn_age, Duration::from_secs(600), "ModelMesh's default");
        assert_eq!(config.worker.inline_max_bytes, 64 << 10);
        let Command::Serve(args) =
            Cli::try_parse_from(["meshd", "serve", "--copy-add-queue-wait", "0"]).unwrap().command;
        assert_eq!(args.into_config().unwrap().copy_add_queue_wait, Duration::ZERO, "0 turns the rule off");
        let bad = Cli::try_parse_from(["meshd", "serve", "--capacity", "lots"]).unwrap_err().to_string();
        assert!(bad.contains("--capacity"), "{bad}");
    }

    fn serve_args(flags: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["meshd", "serve"].iter().chain(flags))?;
        let Command::Serve(args) = cli.command;
        Ok(args)
    }

    #[test]
    fn model_types_default_to_what_the_runtimes_load_and_bad_names_are_refused() {
        let types = |flags: &[&str]| serve_args(flags).unwrap().into_config().unwrap().model_types;
        assert_eq!(types(&[]), None, "the runtimes' formats, known once they are up");
        assert_eq!(types(&["--model-types", "onnx"]), Some(vec!["onnx".to_owned()]));
        assert_eq!(
            types(&["--model-types", "onnx, sklearn"]),
            Some(vec!["onnx".to_owned(), "sklearn".to_owned()])
        );
        assert_eq!(types(&["--model-types", ""]), Some(vec![]), "empty offers none");
        let bad = serve_args(&["--model-types", "onnx,Py Torch"]).unwrap_err().to_string();
        assert!(
            bad.contains("--model-types") && bad.contains("\"Py Torch\" is not a model format name"),
            "{bad}"
        );
    }

    #[test]
    fn tls_peer_name_and_metrics_tls_need_tls_and_bad_names_are_refused() {
        for flags in [&["--tls-peer-name", "meshd.ns.svc"][..], &["--metrics-tls", "true"]] {
            let e = serve_args(flags).unwrap().into_config().unwrap_err().to_string();
            assert!(e.contains(flags[0]) && e.contains("--tls-dir"), "{e}");
        }
        let config =
            serve_args(&["--tls-dir", "/tls", "--tls-peer-name", "meshd.ns.svc", "--metrics-tls", "true"])
                .unwrap()
                .into_config()
                .unwrap();
        assert!(config.metrics_tls);
        let tls = config.tls.expect("--tls-dir");
        assert_eq!(
            tls,
            crate::tls::TlsFiles::from_dir(std::path::Path::new("/tls"))
                .with_peer_name(Some(crate::tls::parse_peer_name("meshd.ns.svc").unwrap()))
        );
        let bad =
            serve_args(&["--tls-dir", "/tls", "--tls-peer-name", "no such name!"]).unwrap_err().to_string();
        assert!(bad.contains("--tls-peer-name") && bad.contains("DNS name"), "{bad}");
    }

    #[test]
    fn a_capacity_share_is_of_the_containers_memory_limit() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemorySources {
            cgroup_v2_max: dir.path().join("memory.max"),
            cgroup_v1_limit: dir.path().join("memory.limit_in_bytes"),
            meminfo: dir.path().join("meminfo"),
        };
        std::fs::write(&memory.meminfo, "MemTotal: 8388608 kB\n").unwrap();
        let capacity = |flag: &str| {
            let config = serve_args(&["--capacity", flag]).unwrap().into_config_with(&memory).unwrap();
            (config.cache.capacity_bytes, config.pull.max_object_bytes)
        };
        std::fs::write(&memory.cgroup_v2_max, "4294967296\n").unwrap();
        assert_eq!(capacity("50%"), (2 << 30, Some(2 << 30)), "half of the 4 GiB limit");
        std::fs::write(&memory.cgroup_v2_max, "max\n").unwrap();
        assert_eq!(capacity("25%").0, 2 << 30, "no limit: a quarter of the machine's 8 GiB");
        assert_eq!(capacity("1GiB").0, 1 << 30);
        std::fs::remove_file(&memory.meminfo).unwrap();
        let e =
            serve_args(&["--capacity", "60%"]).unwrap().into_config_with(&memory).unwrap_err().to_string();
        assert!(e.contains("--capacity 60%") && e.contains("give a size instead"), "{e}");
        let bad = serve_args(&["--capacity", "120%"]).unwrap_err().to_string();
        assert!(bad.contains("--capacity") && bad.contains("from 1% to 100%"), "{bad}");
    }
}
