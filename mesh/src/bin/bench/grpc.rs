//! `densemesh-bench grpc`: the mesh's closed-loop load generator (`densemesh_loadgen`) with
//! the benchmark's choices of connections and RPC, and its error accounting.

use std::time::Duration;

use densemesh_loadgen as loadgen;
use hdrhistogram::Histogram;

use crate::figures::Errors;

/// How the clients reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Connections {
    /// All clients multiplex one HTTP/2 connection.
    Shared,
    /// Each client has its own connection.
    PerClient,
}

/// Which RPC the clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Call {
    /// ModelInfer with a request built from the model's metadata.
    ModelInfer,
    /// ServerLive: no payload and no work, the bare gRPC round trip (client and server stacks).
    ServerLive,
}

/// One load run against a server.
#[derive(Debug, Clone)]
pub struct GrpcLoad {
    pub addr: String,
    pub model: String,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub batch: i64,
    pub connections: Connections,
    pub call: Call,
    /// A request still unanswered after this counts as an error (and the client moves on).
    pub timeout: Duration,
    /// Requests spread over many models (`--models-file`).
    pub spread: Option<loadgen::Spread>,
}

/// Runs the load through the mesh's one load generator; returns the latencies seen after the
/// warm-up, the errors, and how long it ran (each-once: the time to serve every model once).
pub async fn run(load: &GrpcLoad) -> anyhow::Result<(Histogram<u64>, Errors, Duration)> {
    let spec = loadgen::LoadSpec {
        addr: load.addr.clone(),
        model: load.model.clone(),
        concurrency: load.concurrency,
        warmup: load.warmup,
        duration: load.duration,
        batch: load.batch,
        connection_per_client: load.connections == Connections::PerClient,
        server_live_only: load.call == Call::ServerLive,
        timeout: load.timeout,
        tls: None,
        spread: load.spread.clone(),
    };
    let outcome = loadgen::measure(&spec).await?;
    let errors =
        Errors { measured: outcome.errors, warmup: outcome.warmup_errors, first: outcome.first_error };
    Ok((outcome.latencies, errors, outcome.elapsed))
}
