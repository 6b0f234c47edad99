//! `densemesh-bench echo-server`: the echo floor. A bare tonic server of `inference.GRPCInferenceService`
//! written as a new user would write one (default tokio runtime, default `Server::builder()`), whose
//! `ModelInfer` does no work: it answers a canned response. Against it, `densemesh-bench grpc` measures
//! what the gRPC stacks, the loopback and the scheduler cost at a given concurrency, so meshd's figures
//! can be read against the floor of the same run (`bench/tail.py`).
//!
//! The canned answers are copied once, at start, from a real server (`--like`): its ModelMetadata for
//! the model and its ModelInfer answer to the request `grpc` sends. The echo's answers then have the
//! same output names, shapes, datatypes and sizes as the real ones, whatever the model.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use densemesh_proto::inference::*;
use densemesh_runtime_core::TensorSpec;
use tonic::{Request, Response, Status};

/// What `echo-server` was asked to serve.
#[derive(Debug, Clone)]
pub struct EchoArgs {
    /// Where to listen; port 0 lets the kernel choose (see `addr_file`).
    pub addr: SocketAddr,
    /// The server whose answers are copied.
    pub like: String,
    pub model: String,
    /// Size of dynamic dimensions in the request whose answer is copied (as `grpc --batch`).
    pub batch: i64,
    /// Written once listening: `{"grpc_addr": "..."}`, as meshd's `--addr-file`.
    pub addr_file: Option<PathBuf>,
}

/// The canned answers.
#[derive(Clone)]
struct Echo {
    metadata: ModelMetadataResponse,
    answer: ModelInferResponse,
}

#[tonic::async_trait]
impl GrpcInferenceService for Echo {
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
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse { ready: request.get_ref().name == self.metadata.name }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "densemesh-bench echo".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.known(&request.get_ref().name)?;
        Ok(Response::new(self.metadata.clone()))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.known(&request.get_ref().model_name)?;
        Ok(Response::new(self.answer.clone()))
    }
}

impl Echo {
    fn known(&self, name: &str) -> Result<(), Status> {
        if name == self.metadata.name {
            return Ok(());
        }
        Err(Status::not_found(format!(
            "the echo server answers for model {} only, not {name:?}",
            self.metadata.name
        )))
    }
}

/// Copies the answers from `--like`, then serves them until killed.
pub fn run(args: &EchoArgs) -> anyhow::Result<()> {
    // What `#[tokio::main]` builds: a multi-threaded runtime with one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: &EchoArgs) -> anyhow::Result<()> {
    let echo = copy_answers(&args.like, &args.model, args.batch).await?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {} (--addr)", args.addr))?;
    let bound = listener.local_addr()?;
    if let Some(path) = &args.addr_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::json!({ "grpc_addr": bound.to_string() }).to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write {} (--addr-file)", path.display()))?;
    }
    println!("echo server for model {} on {bound}, answers copied from {}", args.model, args.like);
    tonic::transport::Server::builder()
        .add_service(GrpcInferenceServiceServer::new(echo))
        // TCP_NODELAY as `Server::serve(addr)` sets it (a listener of our own, for port 0, comes
        // without): without it small answers wait on Nagle's algorithm and delayed ACKs, 40 ms.
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .context("echo server failed")
}

/// The model's metadata and one real answer from the server at `like`, to the request `grpc` sends.
async fn copy_answers(like: &str, model: &str, batch: i64) -> anyhow::Result<Echo> {
    let uri = if like.contains("://") { like.to_owned() } else { format!("http://{like}") };
    let mut client = GrpcInferenceServiceClient::connect(uri)
        .await
        .with_context(|| format!("cannot connect to {like} (--like)"))?
        .max_decoding_message_size(usize::MAX);
    let metadata = client
        .model_metadata(ModelMetadataRequest { name: model.to_owned(), version: String::new() })
        .await
        .with_context(|| format!("cannot read the metadata of model {model} from {like}"))?
        .into_inner();
    let specs = metadata
        .inputs
        .iter()
        .map(|t| {
            let datatype = t.datatype.parse().map_err(|_| {
                anyhow::anyhow!("model {model} declares an input with unknown datatype {:?}", t.datatype)
            })?;
            Ok(TensorSpec { name: t.name.clone(), datatype, shape: t.shape.clone() })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = densemesh_loadgen::request(model, &densemesh_loadgen::synthetic_inputs(&specs, batch));
    let answer = client
        .model_infer(request)
        .await
        .with_context(|| format!("model {model} on {like} did not answer the benchmark's request"))?
        .into_inner();
    Ok(Echo { metadata, answer })
}
