//! A closed-loop load generator for KServe V2 servers: a fixed number of concurrent clients, each
//! sending its next request as soon as the last answer arrives, after a warm-up whose latencies are
//! discarded. The one generator behind `meshctl bench` and `densemesh-bench grpc`; works against any
//! V2 server (meshd, MLServer, Triton): the request is built from the server's own ModelMetadata.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Requests spread over many models instead of all to `model`; `None`: all to `model`.
    pub spread: Option<Spread>,
}

/// Many models sharing `model`'s interface (its metadata builds the one request), each request
/// naming one of them: how density is measured, where what matters is how many distinct models a
/// server answers for, not one hot model.
#[derive(Debug, Clone)]
pub struct Spread {
    pub models: Arc<[String]>,
    pub order: Order,
}

/// Which model each request names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Order {
    /// Rank `k` (1-based, in `models`' order) with probability ∝ 1/k^s, as real traffic over many
    /// models goes: a few hot, a long cold tail. `s` = 0 is uniform.
    Zipf(f64),
    /// Every model once, in order, then the clients stop (no warm-up, no duration): the time to
    /// first-serve (load) them all.
    EachOnce,
}

/// Draws ranks by Zipf's law: a cumulative table searched by bisection, so a draw costs
/// O(log n) whatever the exponent (1,000,000 models: 8 MB of table, ~20 comparisons).
struct ZipfTable(Vec<f64>);

impl ZipfTable {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        Self(
            (1..=n)
                .map(|k| {
                    total += 1.0 / (k as f64).powf(s);
                    total
                })
                .collect(),
        )
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> usize {
        let total = self.0.last().copied().unwrap_or(0.0);
        let at = rng.f64() * total;
        self.0.partition_point(|c| *c <= at).min(self.0.len().saturating_sub(1))
    }
}

/// What names each client's next request.
enum Picker {
    One,
    Zipf { models: Arc<[String]>, table: Arc<ZipfTable>, rng: fastrand::Rng },
    EachOnce { models: Arc<[String]>, next: Arc<AtomicUsize> },
}

impl Picker {
    /// The next model, `None` when there is none left (each-once done); for `One`, `Some("")`
    /// (the template's own name stands).
    fn next(&mut self) -> Option<&str> {
        match self {
            Picker::One => Some(""),
            Picker::Zipf { models, table, rng } => Some(&models[table.draw(rng)]),
            Picker::EachOnce { models, next } => {
                models.get(next.fetch_add(1, Ordering::Relaxed)).map(|m| m.as_str())
            }
        }
    }
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
    /// From the first request to the last client's end (for each-once, the time to serve them all).
    pub elapsed: Duration,
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
    #[error("the spread of models is empty")]
    NoModels,
}

/// A channel to `addr` (`host:port` or a URI), with Nagle off; TLS when `tls` is given.
pub async fn connect(
    addr: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Channel, LoadError> {
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
    if spec.spread.as_ref().is_some_and(|s| s.models.is_empty()) {
        return Err(LoadError::NoModels);
    }
    let zipf = match &spec.spread {
        Some(Spread { models, order: Order::Zipf(s) }) => Some(Arc::new(ZipfTable::new(models.len(), *s))),
        _ => None,
    };
    let each_next = Arc::new(AtomicUsize::new(0));

    let start = Instant::now();
    // Each-once runs until every model was asked once: nothing to warm up, no clock to stop it.
    let each_once = matches!(&spec.spread, Some(Spread { order: Order::EachOnce, .. }));
    let measure_from = if each_once { start } else { start + spec.warmup };
    let stop =
        if each_once { start + Duration::from_secs(365 * 24 * 3600) } else { measure_from + spec.duration };
    let mut clients = tokio::task::JoinSet::new();
    for client_index in 0..spec.concurrency.max(1) {
        let mut picker = match (&spec.spread, &zipf) {
            (None, _) => Picker::One,
            (Some(Spread { models, order: Order::EachOnce }), _) => {
                Picker::EachOnce { models: models.clone(), next: each_next.clone() }
            }
            (Some(Spread { models, .. }), Some(table)) => Picker::Zipf {
                models: models.clone(),
                table: table.clone(),
                rng: fastrand::Rng::with_seed(0x5eed ^ client_index as u64),
            },
            (Some(_), None) => Picker::One,
        };
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
            let mut seen = Outcome {
                latencies: histogram(),
                errors: 0,
                warmup_errors: 0,
                first_error: None,
                elapsed: Duration::ZERO,
            };
            while let Some(model) = picker.next() {
                let mut request = template.clone();
                if let Some(request) = request.as_mut().filter(|_| !model.is_empty()) {
                    model.clone_into(&mut request.model_name);
                }
                let sent = Instant::now();
                if sent >= stop {
                    break;
                }
                let call = async {
                    match request {
                        Some(request) => client.model_infer(request).await.map(drop),
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
    let mut total = Outcome {
        latencies: histogram(),
        errors: 0,
        warmup_errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    while let Some(joined) = clients.join_next().await {
        let seen = joined.map_err(|e| LoadError::Client(e.to_string()))?;
        // Same bounds on both sides: adding cannot fail.
        let _ = total.latencies.add(&seen.latencies);
        total.errors += seen.errors;
        total.warmup_errors += seen.warmup_errors;
        total.first_error = total.first_error.or(seen.first_error);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_draws_follow_the_law_and_stay_in_range() {
        let n = 1000;
        let table = ZipfTable::new(n, 1.0);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = vec![0u32; n];
        let draws = 200_000;
        for _ in 0..draws {
            counts[table.draw(&mut rng)] += 1;
        }
        // P(rank 1) = 1/H(1000) = 0.1336; P(rank 2) is half of it; P(rank 10) a tenth.
        let share = |k: usize| f64::from(counts[k - 1]) / f64::from(draws);
        assert!((share(1) - 0.1336).abs() < 0.005, "{}", share(1));
        assert!((share(2) / share(1) - 0.5).abs() < 0.03, "{}", share(2) / share(1));
        assert!((share(10) / share(1) - 0.1).abs() < 0.02, "{}", share(10) / share(1));
        assert!(counts[n - 1] > 0, "the tail is drawn too");
        // Exponent 0 is uniform.
        let uniform = ZipfTable::new(4, 0.0);
        let mut seen = [0u32; 4];
        for _ in 0..40_000 {
            seen[uniform.draw(&mut rng)] += 1;
        }
        assert!(seen.iter().all(|c| (9_000..11_000).contains(c)), "{seen:?}");
    }

    #[test]
    fn each_once_names_every_model_exactly_once_across_clients() {
        let models: Arc<[String]> = (0..10).map(|i| format!("m{i}")).collect();
        let next = Arc::new(AtomicUsize::new(0));
        let mut a = Picker::EachOnce { models: models.clone(), next: next.clone() };
        let mut b = Picker::EachOnce { models: models.clone(), next };
        let mut named = Vec::new();
        loop {
            match (a.next().map(str::to_owned), b.next().map(str::to_owned)) {
                (None, None) => break,
                (x, y) => named.extend(x.into_iter().chain(y)),
            }
        }
        named.sort();
        let mut expected: Vec<String> = models.to_vec();
        expected.sort();
        assert_eq!(named, expected);
    }
}
