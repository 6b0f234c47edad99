//! `densemesh-controller`: reconciles InferenceServices and Predictors into the mesh's management
//! API; `densemesh-controller crds` prints the CRDs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use densemesh_controller::lease::LeaderLease;
use densemesh_controller::mesh::{Bearer, GrpcMesh};
use densemesh_controller::operator::{self, Settings};
use densemesh_controller::reconcile::Urls;
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about = "Reconciles InferenceServices and Predictors into a densemesh mesh")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The mesh's gRPC endpoint (any meshd pod, or their Service).
    #[arg(long, env = "DENSEMESH_MESH_ENDPOINT", default_value = "http://127.0.0.1:8033")]
    mesh_endpoint: String,
    /// A file holding the mesh's management API token (meshd's --admin-token-file), sent with every
    /// call; read again when it changes.
    #[arg(long, env = "DENSEMESH_MESH_TOKEN_FILE")]
    mesh_token_file: Option<std::path::PathBuf>,
    /// TLS to meshd (its --tls-*), with an https:// --mesh-endpoint: a directory with `ca.crt` and,
    /// where meshd asks for client certificates, `tls.crt` and `tls.key` (a mounted TLS secret).
    #[arg(long, env = "DENSEMESH_MESH_TLS_DIR")]
    mesh_tls_dir: Option<std::path::PathBuf>,
    /// What InferenceService status shows as the gRPC URL clients infer at.
    #[arg(long, env = "DENSEMESH_PUBLIC_GRPC_URL", default_value = "grpc://127.0.0.1:8033")]
    public_grpc_url: String,
    /// What InferenceService status shows as the REST URL.
    #[arg(long, env = "DENSEMESH_PUBLIC_REST_URL", default_value = "http://127.0.0.1:8008")]
    public_rest_url: String,
    /// Watch only this namespace; all namespaces when empty.
    #[arg(long, env = "DENSEMESH_NAMESPACE", default_value = "")]
    namespace: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "DENSEMESH_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "DENSEMESH_LEASE_NAME", default_value = "densemesh-controller")]
    lease_name: String,
    /// How long the lease lasts unrenewed before another replica takes over.
    #[arg(long, env = "DENSEMESH_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// This replica's name in the lease; the pod name (HOSTNAME) by default.
    #[arg(long, env = "DENSEMESH_IDENTITY")]
    identity: Option<String>,
    /// How long an object's reconcile waits for further mesh events, so a burst of them is one
    /// status write.
    #[arg(long, env = "DENSEMESH_STATUS_DEBOUNCE", default_value = "200ms", value_parser = humantime::parse_duration)]
    status_debounce: Duration,
    /// The meshd PodTemplateSpec (YAML) every ServingRuntime becomes a Deployment of; without it
    /// runtimes only decide which formats are served, and meshd pods run by other means.
    #[arg(long, env = "DENSEMESH_MESHD_POD_TEMPLATE")]
    meshd_pod_template: Option<std::path::PathBuf>,
    /// How long a runtime no model uses keeps its pods before it is scaled to zero.
    #[arg(long, env = "DENSEMESH_SCALE_TO_ZERO_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    scale_to_zero_grace: Duration,
    /// Reconciles of one kind that run at once. Unbounded, thousands of objects arriving together
    /// would open as many API connections.
    #[arg(long, env = "DENSEMESH_CONCURRENCY", default_value_t = 32)]
    concurrency: u16,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "DENSEMESH_METRICS_ADDR", default_value = "127.0.0.1:2113")]
    metrics_addr: SocketAddr,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what the Helm chart ships).
    Crds,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crds) = cli.command {
        print!("{}", densemesh_controller::crd::crds_yaml());
        return Ok(());
    }
    // Several crates pull in rustls with different crypto backends; pick one before any TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(cli.metrics_addr)
        .install()
        .with_context(|| format!("serving metrics on {}", cli.metrics_addr))?;

    // Read before taking the lease: a bad template is a startup error, not a leader that fails.
    let pod_template = match &cli.meshd_pod_template {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the meshd pod template {}", path.display()))?;
            Some(
                serde_yaml::from_str(&text)
                    .with_context(|| format!("{} is not a PodTemplateSpec", path.display()))?,
            )
        }
        None => None,
    };
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API server configured (in-cluster or KUBECONFIG)")?;
    let bearer = cli.mesh_token_file.as_deref().map(Bearer::from_file).unwrap_or_default();
    let tls = cli.mesh_tls_dir.map(|dir| densemesh_controller::mesh::MeshTls { dir });
    let mesh = GrpcMesh::new(&cli.mesh_endpoint, bearer, tls.as_ref())?;
    let identity = match cli.identity {
        Some(id) => id,
        None => std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("densemesh-controller-{}", std::process::id())),
    };
    let lease = LeaderLease::new(
        client.clone(),
        &cli.lease_namespace,
        &cli.lease_name,
        &identity,
        cli.lease_duration,
    );
    lease.acquire().await;
    metrics::gauge!("densemesh_controller_leader").set(1.0);
    info!(identity, "leading");
    let settings = Settings {
        urls: Urls { grpc: cli.public_grpc_url, rest: cli.public_rest_url },
        namespace: Some(cli.namespace).filter(|n| !n.is_empty()),
        debounce: cli.status_debounce,
        concurrency: cli.concurrency,
        pod_template,
        runtime_namespace: cli.lease_namespace.clone(),
        scale_to_zero_grace: cli.scale_to_zero_grace,
    };
    tokio::select! {
        result = operator::run(client, mesh, settings) => result,
        () = lease.keep() => anyhow::bail!("lost the leader lease {}; stopping so that only the new leader acts", cli.lease_name),
    }
}
