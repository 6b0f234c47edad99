//! `densemesh-bench pair`: what a hop adds in front of a server (meshd passing calls to MLServer), read
//! from one client that sends the same request to both, pair by pair. Drift of the host (and on a
//! 2-core machine it drifts by more than the hop costs) hits both calls of a pair alike, and the
//! order within a pair alternates, so neither side gets the other's warm caches for free.

use std::time::{Duration, Instant};

use densemesh_loadgen as loadgen;
use densemesh_proto::inference::ModelInferRequest;
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_runtime_core::TensorSpec;
use tonic::transport::Channel;

/// One paired run.
#[derive(Debug, Clone)]
pub struct PairArgs {
    /// The path through the hop (e.g. meshd).
    pub via: String,
    /// The server the hop calls, called directly.
    pub direct: String,
    pub model: String,
    /// The request's inputs; their values are the load generator's synthetic ones.
    pub inputs: Vec<TensorSpec>,
    pub pairs: usize,
    pub warmup: usize,
    /// Blocks the pairs are cut into, each summarised on its own: how steady the figure is.
    pub blocks: usize,
    pub timeout: Duration,
    pub label: String,
}

/// Parses `NAME:DATATYPE:D1xD2...` (e.g. `input-0:FP64:1x4`), the form of `--input`.
pub fn parse_input(text: &str) -> Result<TensorSpec, String> {
    let mut parts = text.rsplitn(3, ':');
    let (Some(dims), Some(datatype), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("--input {text:?} is not NAME:DATATYPE:D1xD2..."));
    };
    let datatype =
        datatype.parse().map_err(|_| format!("--input {text:?}: unknown datatype {datatype:?}"))?;
    let shape = dims
        .split('x')
        .map(|d| match d.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(n),
            _ => Err(format!("--input {text:?}: dimension {d:?} is not a size")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if name.is_empty() {
        return Err(format!("--input {text:?} has no name"));
    }
    Ok(TensorSpec { name: name.to_owned(), datatype, shape })
}

/// What the pairs say, in microseconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PairFigures {
    pub pairs: usize,
    pub via_p50_us: f64,
    pub direct_p50_us: f64,
    pub via_p90_us: f64,
    pub direct_p90_us: f64,
    /// The difference of the two p50s: the figure a goal on "added p50" reads.
    pub added_p50_us: f64,
    /// The median of the per-pair differences: the same question, less exposed to drift.
    pub added_median_of_pairs_us: f64,
    /// `added_p50_us` of each block, lowest and highest.
    pub added_p50_blocks_us: (f64, f64),
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = q * (sorted.len() - 1) as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (at - low as f64)
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v
}

fn added_p50(via: &[f64], direct: &[f64]) -> f64 {
    quantile(&sorted(via.iter().copied()), 0.5) - quantile(&sorted(direct.iter().copied()), 0.5)
}

impl PairFigures {
    /// `via[i]` and `direct[i]` are the latencies of pair `i`.
    pub fn new(via: &[f64], direct: &[f64], blocks: usize) -> Self {
        let n = via.len().min(direct.len());
        let (via, direct) = (&via[..n], &direct[..n]);
        let (v, d) = (sorted(via.iter().copied()), sorted(direct.iter().copied()));
        let differences = sorted(via.iter().zip(direct).map(|(a, b)| a - b));
        let size = n.div_ceil(blocks.max(1)).max(1);
        let per_block: Vec<f64> =
            via.chunks(size).zip(direct.chunks(size)).map(|(a, b)| added_p50(a, b)).collect();
        let low = per_block.iter().copied().fold(f64::INFINITY, f64::min);
        let high = per_block.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let round = |x: f64| (x * 10.0).round() / 10.0;
        Self {
            pairs: n,
            via_p50_us: round(quantile(&v, 0.5)),
            direct_p50_us: round(quantile(&d, 0.5)),
            via_p90_us: round(quantile(&v, 0.9)),
            direct_p90_us: round(quantile(&d, 0.9)),
            added_p50_us: round(quantile(&v, 0.5) - quantile(&d, 0.5)),
            added_median_of_pairs_us: round(quantile(&differences, 0.5)),
            added_p50_blocks_us: (round(low), round(high)),
        }
    }
}

async fn connect(addr: &str) -> anyhow::Result<GrpcInferenceServiceClient<Channel>> {
    Ok(GrpcInferenceServiceClient::new(loadgen::connect(addr, None).await?))
}

async fn call(
    client: &mut GrpcInferenceServiceClient<Channel>,
    request: &ModelInferRequest,
    timeout: Duration,
    side: &str,
) -> anyhow::Result<f64> {
    let sent = Instant::now();
    match tokio::time::timeout(timeout, client.model_infer(request.clone())).await {
        Ok(Ok(_)) => Ok(sent.elapsed().as_nanos() as f64 / 1000.0),
        Ok(Err(status)) => anyhow::bail!("{side}: {:?}: {}", status.code(), status.message()),
        Err(_) => anyhow::bail!("{side}: no answer within {timeout:?}"),
    }
}

/// Runs the pairs on the calling thread's runtime; any failed call ends the run with its error (a
/// hop that fails is not one to measure).
pub async fn run(args: &PairArgs) -> anyhow::Result<PairFigures> {
    let request = loadgen::request(&args.model, &loadgen::synthetic_inputs(&args.inputs, 1));
    let (mut via, mut direct) = (connect(&args.via).await?, connect(&args.direct).await?);
    let (mut via_us, mut direct_us) = (Vec::with_capacity(args.pairs), Vec::with_capacity(args.pairs));
    for i in 0..args.warmup + args.pairs {
        let (a, b) = if i % 2 == 0 {
            let a = call(&mut via, &request, args.timeout, "via").await?;
            (a, call(&mut direct, &request, args.timeout, "direct").await?)
        } else {
            let b = call(&mut direct, &request, args.timeout, "direct").await?;
            (call(&mut via, &request, args.timeout, "via").await?, b)
        };
        if i >= args.warmup {
            via_us.push(a);
            direct_us.push(b);
        }
    }
    Ok(PairFigures::new(&via_us, &direct_us, args.blocks))
}

/// Prints the figures for a person, then as one JSON line.
pub fn print(args: &PairArgs, f: &PairFigures) {
    println!(
        "{:<12}{:>8}{:>12}{:>12}{:>12}{:>12}{:>16}{:>18}",
        "label",
        "pairs",
        "via p50",
        "direct p50",
        "added p50",
        "pair median",
        "blocks' added",
        "via p90 / direct"
    );
    println!(
        "{:<12}{:>8}{:>12.1}{:>12.1}{:>12.1}{:>12.1}{:>16}{:>18}",
        args.label,
        f.pairs,
        f.via_p50_us,
        f.direct_p50_us,
        f.added_p50_us,
        f.added_median_of_pairs_us,
        format!("{:.0}..{:.0}", f.added_p50_blocks_us.0, f.added_p50_blocks_us.1),
        format!("{:.0} / {:.0}", f.via_p90_us, f.direct_p90_us),
    );
    let run = serde_json::json!({
        "kind": "pair", "label": args.label, "via": args.via, "direct": args.direct, "model": args.model,
    });
    println!("{}", serde_json::json!({ "run": run, "figures": f }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_parse_with_their_shape_and_bad_ones_say_why() {
        let spec = parse_input("input-0:FP64:1x4").unwrap();
        assert_eq!((spec.name.as_str(), spec.datatype.as_str(), spec.shape), ("input-0", "FP64", vec![1, 4]));
        // A name may hold colons; the datatype and dimensions are the last two fields.
        assert_eq!(parse_input("a:b:INT32:3").unwrap().name, "a:b");
        assert!(parse_input("x:FP99:1").unwrap_err().contains("unknown datatype"));
        assert!(parse_input("x:FP32:1x-2").unwrap_err().contains("\"-2\""));
        assert!(parse_input("FP32:1").unwrap_err().contains("NAME:DATATYPE"));
    }

    #[test]
    fn the_pairs_give_the_added_time_and_drift_cancels_in_their_median() {
        // The host slows down half way (every call +500 µs); the hop costs 100 µs throughout.
        let direct: Vec<f64> =
            (0..1000).map(|i| 1000.0 + if i < 500 { 0.0 } else { 500.0 } + (i % 7) as f64).collect();
        let via: Vec<f64> = direct.iter().map(|d| d + 100.0).collect();
        let f = PairFigures::new(&via, &direct, 4);
        assert_eq!(f.pairs, 1000);
        assert_eq!(f.added_median_of_pairs_us, 100.0);
        assert_eq!(f.added_p50_us, 100.0);
        assert_eq!(f.added_p50_blocks_us, (100.0, 100.0));
        assert!(f.via_p50_us > f.direct_p50_us);
        // Unequal lengths use the pairs both have.
        assert_eq!(PairFigures::new(&via[..10], &direct, 2).pairs, 10);
    }

    #[test]
    fn quantiles_interpolate() {
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        assert_eq!(quantile(&[5.0], 0.9), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
