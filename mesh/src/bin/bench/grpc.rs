//! Closed-loop KServe V2 gRPC clients: a fixed number of clients, each sending its next request as
//! soon as the last answer arrives, after a warm-up whose latencies are discarded. Works against any
//! V2 server (meshd, MLServer, Triton): the request is built from the server's own ModelMetadata.

use std::time::{Duration, Instant};

use anyhow::Context;
use densemesh_mesh::loadgen;
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::{ModelInferRequest, ModelMetadataRequest, ServerLiveRequest};
use densemesh_runtime_core::TensorSpec;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use crate::figures::{self, Errors};

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
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    Endpoint::from_shared(uri.clone())
        .with_context(|| format!("{addr} is not a valid address"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri}"))
}

/// Asks the server for the model's inputs and builds a request with data of that shape: dynamic
/// (-1) dimensions become `batch`.
async fn template(channel: Channel, load: &GrpcLoad) -> anyhow::Result<ModelInferRequest> {
    let metadata = GrpcInferenceServiceClient::new(channel)
        // An empty version is "the server's choice" in V2; MLServer rejects anything it does not know.
        .model_metadata(ModelMetadataRequest { name: load.model.clone(), version: String::new() })
        .await
        .with_context(|| format!("cannot read the metadata of model {}", load.model))?
        .into_inner();
    let specs = metadata
        .inputs
        .iter()
        .map(|t| {
            let datatype = t.datatype.parse().map_err(|_| {
                anyhow::anyhow!(
                    "model {} declares input {} with unknown datatype {:?}",
                    load.model,
                    t.name,
                    t.datatype
                )
            })?;
            Ok(TensorSpec { name: t.name.clone(), datatype, shape: t.shape.clone() })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!specs.is_empty(), "model {} declares no inputs", load.model);
    Ok(loadgen::request(&load.model, &loadgen::synthetic_inputs(&specs, load.batch)))
}

/// Runs the load; returns the latencies seen after the warm-up and the errors.
pub async fn run(load: &GrpcLoad) -> anyhow::Result<(Histogram<u64>, Errors)> {
    let shared = connect(&load.addr).await?;
    let template = match load.call {
        Call::ModelInfer => Some(template(shared.clone(), load).await?),
        Call::ServerLive => None,
    };
    let mut channels = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency.max(1) {
        channels.push(match load.connections {
            Connections::Shared => shared.clone(),
            Connections::PerClient => connect(&load.addr).await?,
        });
    }

    let start = Instant::now();
    let measure_from = start + load.warmup;
    let stop = measure_from + load.duration;
    let mut clients = tokio::task::JoinSet::new();
    for channel in channels {
        let template = template.clone();
        let timeout = load.timeout;
        clients.spawn(async move {
            let mut client = GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let (mut h, mut errors) = (figures::histogram(), Errors::default());
            loop {
                let sent = Instant::now();
                if sent >= stop {
                    break;
                }
                let call = async {
                    match &template {
                        Some(request) => client.model_infer(request.clone()).await.map(drop),
                        None => client.server_live(ServerLiveRequest {}).await.map(drop),
                    }
                };
                let result = tokio::time::timeout(timeout, call).await;
                let took = sent.elapsed();
                let measuring = sent >= measure_from;
                match result {
                    Ok(Ok(())) if measuring => figures::record(&mut h, took),
                    Ok(Ok(())) => {}
                    Ok(Err(status)) => {
                        errors.record(measuring, || format!("{:?}: {}", status.code(), status.message()))
                    }
                    Err(_) => errors.record(measuring, || format!("no answer within {timeout:?}")),
                }
            }
            (h, errors)
        });
    }
    let (mut total, mut errors) = (figures::histogram(), Errors::default());
    while let Some(joined) = clients.join_next().await {
        let (h, e) = joined.context("a client task failed")?;
        total.add(&h).context("merging histograms")?;
        errors.merge(e);
    }
    Ok((total, errors))
}
