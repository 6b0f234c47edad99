//! A closed-loop load generator for KServe V2 servers: a fixed number of concurrent clients, each
//! sending its next request as soon as the last answer arrives, after a warm-up whose latencies are
//! discarded. The one generator behind `meshctl bench` and `densemesh-bench grpc`; works against any
//! V2 server (meshd, MLServer, Triton): the request is built from the server's own ModelMetadata.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::model_infer_request::InferInputTensor;
use densemesh_proto::inference::{ModelInferRequest, ModelMetadataRequest, ServerLiveRequest};
use densemesh_runtime_core::{DataType, Tensor, TensorData, TensorSpec};
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: String,
    pub model: String,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Size given to dynamic (-1) dimensions.
    pub batch: i64,
    /// One HTTP/2 connection per client instead of one shared by all.
    pub connection_per_client: bool,
    /// Send ServerLive instead of ModelInfer: the bare gRPC round trip, the transport's floor.
    pub server_live_only: bool,
    /// A request still unanswered after this counts as an error (and its client moves on).
    pub timeout: Duration,
    /// TLS to meshd (its `--tls-*`): the CA its certificate chains to and, for mutual TLS, a client
    /// certificate. `None`: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// What the clients saw: latencies after the warm-up, and the errors.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Microsecond latencies of the requests answered after the warm-up.
    pub latencies: Histogram<u64>,
    /// Errors answered after the warm-up.
    pub errors: u64,
    /// Errors answered during the warm-up (not in `errors`, still worth reporting).
    pub warmup_errors: u64,
    /// The first error message of the whole run, warm-up included.
    pub first_error: Option<String>,
}

/// Latency figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Report {
    /// Summarises a histogram of microsecond latencies.
    pub fn from_histogram(
        h: &Histogram<u64>,
        errors: u64,
        first_error: Option<String>,
        seconds: f64,
    ) -> Self {
        Self {
            requests: h.len(),
            errors,
            first_error,
            seconds,
            requests_per_second: h.len() as f64 / seconds,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

/// A new latency histogram: 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// Inputs of the declared shape and type, with deterministic varied values.
pub fn synthetic_inputs(specs: &[TensorSpec], batch: i64) -> Vec<Tensor> {
    specs
        .iter()
        .map(|spec| {
            let shape: Vec<i64> = spec.shape.iter().map(|d| if *d < 0 { batch } else { *d }).collect();
            let count = shape.iter().product::<i64>().max(0) as usize;
            let data = match spec.datatype.element_size() {
                Some(size) => TensorData::Raw(Bytes::from(
                    (0..count * size)
                        .map(|i| match spec.datatype {
                            DataType::Bool => (i % 2) as u8,
                            // Small positive values are valid for every numeric type, floats included.
                            DataType::Fp16 | DataType::Bf16 if i % 2 == 1 => 0x3c,
                            DataType::Fp32 if i % 4 == 3 => 0x3f,
                            DataType::Fp64 if i % 8 == 7 => 0x3f,
                            _ if i % size == 0 => (i % 7) as u8,
                            _ => 0,
                        })
                        .collect::<Vec<u8>>(),
                )),
                None => TensorData::Strings(vec![Bytes::from_static(b"densemesh"); count]),
            };
            Tensor { name: spec.name.clone(), datatype: spec.datatype, shape, data }
        })
        .collect()
}

/// Builds a V2 request with raw contents from tensors.
pub fn request(model: &str, inputs: &[Tensor]) -> ModelInferRequest {
    let mut request = ModelInferRequest { model_name: model.to_owned(), ..Default::default() };
    for t in inputs {
        request.inputs.push(InferInputTensor {
            name: t.name.clone(),
            datatype: t.datatype.as_str().to_owned(),
            shape: t.shape.clone(),
            ..Default::default()
        });
        request.raw_input_contents.push(match &t.data {
            TensorData::Raw(b) => b.clone(),
            TensorData::Strings(items) => {
                let mut out = Vec::new();
                for item in items {
                    out.extend_from_slice(&(item.len() as u32).to_le_bytes());
                    out.extend_from_slice(item);
                }
                Bytes::from(out)
            }
        });
    }
    request
}

/// Errors of the load generator itself (not of the requests it counts).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("cannot read the metadata of model {model}: {status}")]
    Metadata { model: String, status: tonic::Status },
    #[error("model {model} declares an input with unknown datatype {datatype:?}")]
    Datatype { model: String, datatype: String },
    #[error("model {model} declares no inputs")]
    NoInputs { model: String },
    #[error("a client task failed: {0}")]
    Client(String),
}

async fn connect(addr: &str, tls: Option<&tonic::transport::ClientTlsConfig>) -> Result<Channel, LoadError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("{scheme}://{addr}") };
    let failed = |source| LoadError::Connect { addr: addr.to_owned(), source };
    let mut endpoint = Endpoint::from_shared(uri).map_err(failed)?.tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).map_err(failed)?;
    }
    endpoint.connect().await.map_err(failed)
}

/// Runs the load and reports the latencies seen after the warm-up.
pub async fn run(spec: &LoadSpec) -> Result<Report, LoadError> {
    let outcome = measure(spec).await?;
    Ok(Report::from_histogram(
        &outcome.latencies,
        outcome.errors,
        outcome.first_error,
        spec.duration.as_secs_f64(),
    ))
}

/// Builds a ModelInfer request from the model's metadata: dynamic (-1) dimensions become `batch`.
async fn template(channel: Channel, spec: &LoadSpec) -> Result<ModelInferRequest, LoadError> {
    let metadata = GrpcInferenceServiceClient::new(channel)
        // An empty version is "the server's choice" in V2; MLServer rejects anything it does not know.
        .model_metadata(ModelMetadataRequest { name: spec.model.clone(), version: String::new() })
        .await
        .map_err(|status| LoadError::Metadata { model: spec.model.clone(), status })?
        .into_inner();
    let specs = metadata
        .inputs
        .iter()
        .map(|t| {
            Ok(TensorSpec {
                name: t.name.clone(),
                datatype: t.datatype.parse().map_err(|_| LoadError::Datatype {
                    model: spec.model.clone(),
                    datatype: t.datatype.clone(),
                })?,
                shape: t.shape.clone(),
            })
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    if specs.is_empty() {
        return Err(LoadError::NoInputs { model: spec.model.clone() });
    }
    Ok(request(&spec.model, &synthetic_inputs(&specs, spec.batch)))
}

/// Runs the load: `concurrency` closed-loop clients for the warm-up plus `duration`.
pub async fn measure(spec: &LoadSpec) -> Result<Outcome, LoadError> {
    let shared = connect(&spec.addr, spec.tls.as_ref()).await?;
    let template = if spec.server_live_only { None } else { Some(template(shared.clone(), spec).await?) };

    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let stop = measure_from + spec.duration;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..spec.concurrency.max(1) {
        let channel = if spec.connection_per_client {
            connect(&spec.addr, spec.tls.as_ref()).await?
        } else {
            shared.clone()
        };
        let template = template.clone();
        let timeout = spec.timeout;
        clients.spawn(async move {
            let mut client = GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let mut seen = Outcome { latencies: histogram(), errors: 0, warmup_errors: 0, first_error: None };
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
                let error = match result {
                    Ok(Ok(())) => {
                        if measuring {
                            seen.latencies.saturating_record((took.as_micros() as u64).max(1));
                        }
                        continue;
                    }
                    Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                    Err(_) => format!("no answer within {timeout:?}"),
                };
                if measuring {
                    seen.errors += 1;
                } else {
                    seen.warmup_errors += 1;
                }
                seen.first_error.get_or_insert(error);
            }
            seen
        });
    }
    let mut total = Outcome { latencies: histogram(), errors: 0, warmup_errors: 0, first_error: None };
    while let Some(joined) = clients.join_next().await {
        let seen = joined.map_err(|e| LoadError::Client(e.to_string()))?;
        // Same bounds on both sides: adding cannot fail.
        let _ = total.latencies.add(&seen.latencies);
        total.errors += seen.errors;
        total.warmup_errors += seen.warmup_errors;
        total.first_error = total.first_error.or(seen.first_error);
    }
    Ok(total)
}
