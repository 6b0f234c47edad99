//! `meshctl simulate`: a capacity planner. It replays a request trace (a file, or one generated from
//! a seed) through `densemesh_placement::simulate`, which runs placement's `route` and the eviction
//! policy meshd runs, for N pods of a capacity, or for each capacity of a sweep; no meshd is needed.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use densemesh_mesh::bytesize::ByteSize;
use densemesh_mesh::config::parse_duration;
use densemesh_placement::eviction::Policy;
use densemesh_placement::simulate::{self, Cluster, Report, Synthetic, Trace};
use serde_json::json;

use crate::{Output, print};

/// Replay a request trace on N simulated pods: hit rate, byte-miss ratio, loads, memory, etcd writes.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// The trace: lines of `time_ms,model_id,size_bytes[,load_ms]` (CSV) or JSON objects with those
    /// fields, in time order; `-` for standard input.
    #[arg(required_unless_present = "generate")]
    trace: Option<PathBuf>,
    /// Replay a synthetic trace instead: --models models of log-normal sizes around --median-size,
    /// requested with Zipf --zipf popularity at --rate requests/s, from --trace-seed.
    #[arg(long, conflicts_with = "trace")]
    generate: bool,
    /// Pods in the cluster.
    #[arg(long, default_value_t = 3)]
    pods: usize,
    /// Each pod's capacity: a size (4GiB), or a share of all the trace's model bytes held by the whole
    /// cluster (10%: each of 3 pods gets a third of 10%); a range (1GiB..16GiB, 5%..20%) sweeps it.
    #[arg(long, value_parser = parse_capacity)]
    capacity: CapacitySpec,
    /// The step of a sweep (a size, or a share with %); default: --points capacities.
    #[arg(long, value_parser = parse_amount, conflicts_with = "points")]
    step: Option<Amount>,
    /// How many capacities a sweep tries, evenly spaced, both ends included.
    #[arg(long)]
    points: Option<usize>,
    /// Eviction policy: lru, gdsf, or both (lru,gdsf) side by side.
    #[arg(long, value_delimiter = ',', default_value = "lru")]
    eviction: Vec<Policy>,
    /// meshd's --min-residence.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    min_residence: Duration,
    /// meshd's --anti-churn-age (meshd's default is 10m; 0 turns it off).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    anti_churn_age: Duration,
    /// Seeds the pod each request arrives at.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --generate: how many models.
    #[arg(long, default_value_t = 2_000, requires = "generate")]
    models: u32,
    /// With --generate: how many requests.
    #[arg(long, default_value_t = 200_000, requires = "generate")]
    requests: u64,
    /// With --generate: the median model size.
    #[arg(long, default_value = "20MB", requires = "generate")]
    median_size: ByteSize,
    /// With --generate: the spread of ln(size).
    #[arg(long, default_value_t = 1.0, requires = "generate")]
    sigma: f64,
    /// With --generate: the Zipf exponent of popularity.
    #[arg(long, default_value_t = 1.0, requires = "generate")]
    zipf: f64,
    /// With --generate: mean requests per second.
    #[arg(long, default_value_t = 100.0, requires = "generate")]
    rate: f64,
    /// With --generate: the generator's seed, or a range of seeds (1..20): each seed's trace is
    /// replayed, then the mean and spread of each (capacity, policy) over them, since the sizes drawn
    /// for the few most popular models move the byte-miss ratio by several points from seed to seed.
    #[arg(long, default_value = "1", requires = "generate", value_parser = parse_seeds)]
    trace_seed: Seeds,
    /// Also write the trace replayed to this file, as CSV (to keep a generated one).
    #[arg(long)]
    write_trace: Option<PathBuf>,
}

/// A size, or a share (percent) of the trace's model bytes for the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Bytes(u64),
    Percent(f64),
}

/// `--capacity`: one amount, or a range to sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CapacitySpec {
    One(Amount),
    Sweep(Amount, Amount),
}

fn parse_amount(s: &str) -> Result<Amount, String> {
    let s = s.trim();
    match s.strip_suffix('%') {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(p) if p > 0.0 && p.is_finite() => Ok(Amount::Percent(p)),
            _ => Err(format!("{s:?}: a share is a positive percentage, e.g. 10%")),
        },
        None => s.parse::<ByteSize>().map(|b| Amount::Bytes(b.0)),
    }
}

fn parse_capacity(s: &str) -> Result<CapacitySpec, String> {
    let Some((low, high)) = s.split_once("..") else { return parse_amount(s).map(CapacitySpec::One) };
    let (low, high) = (parse_amount(low)?, parse_amount(high)?);
    match (low, high) {
        (Amount::Bytes(a), Amount::Bytes(b)) if a <= b => Ok(CapacitySpec::Sweep(low, high)),
        (Amount::Percent(a), Amount::Percent(b)) if a <= b => Ok(CapacitySpec::Sweep(low, high)),
        _ => Err(format!(
            "{s:?}: a range goes from low to high, both sizes or both shares (1GiB..16GiB, 5%..20%)"
        )),
    }
}

/// `--trace-seed`: one seed or an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seeds {
    first: u64,
    last: u64,
}

/// Seeds one `--trace-seed` range may name: each is a whole replay.
const MAX_SEEDS: u64 = 1_000;

fn parse_seeds(s: &str) -> Result<Seeds, String> {
    let number = |n: &str| {
        n.trim()
            .parse::<u64>()
            .map_err(|_| format!("{s:?}: a seed is a whole number, or a range such as 1..20"))
    };
    let (first, last) = match s.split_once("..") {
        Some((a, b)) => (number(a)?, number(b)?),
        None => {
            let n = number(s)?;
            (n, n)
        }
    };
    if first > last {
        return Err(format!("{s:?}: a range of seeds goes from low to high"));
    }
    if last - first >= MAX_SEEDS {
        return Err(format!("{s:?}: at most {MAX_SEEDS} seeds at once"));
    }
    Ok(Seeds { first, last })
}

/// Default number of capacities in a sweep given neither --step nor --points.
const DEFAULT_POINTS: usize = 8;

/// The amounts a `--capacity` (with `--step` or `--points`) names, low to high.
fn amounts(spec: CapacitySpec, step: Option<Amount>, points: Option<usize>) -> anyhow::Result<Vec<Amount>> {
    let (low, high) = match spec {
        CapacitySpec::One(a) => return Ok(vec![a]),
        CapacitySpec::Sweep(low, high) => (low, high),
    };
    let value = |a: Amount| match a {
        Amount::Bytes(b) => b as f64,
        Amount::Percent(p) => p,
    };
    let like_low = |x: f64| match low {
        Amount::Bytes(_) => Amount::Bytes(x.round() as u64),
        Amount::Percent(_) => Amount::Percent(x),
    };
    let (a, b) = (value(low), value(high));
    let xs: Vec<f64> = match step {
        Some(step) => {
            if std::mem::discriminant(&step) != std::mem::discriminant(&low) {
                anyhow::bail!("--step must be of the range's kind (a size for sizes, a % for shares)");
            }
            let step = value(step);
            anyhow::ensure!(step > 0.0, "--step must be more than 0");
            let n = ((b - a) / step + 1e-9).floor() as usize + 1;
            anyhow::ensure!(n <= 10_000, "--step gives {n} capacities; take a larger step");
            (0..n).map(|i| a + step * i as f64).collect()
        }
        None => {
            let n = points.unwrap_or(DEFAULT_POINTS);
            anyhow::ensure!((2..=10_000).contains(&n), "--points must be 2 to 10000");
            (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
        }
    };
    Ok(xs.into_iter().map(like_low).collect())
}

/// One pod's bytes for `amount`: a share is of the trace's model bytes, for the whole cluster.
fn per_pod_bytes(amount: Amount, model_bytes: u64, pods: usize) -> u64 {
    match amount {
        Amount::Bytes(b) => b,
        Amount::Percent(p) => (model_bytes as f64 * p / 100.0 / pods.max(1) as f64) as u64,
    }
}

fn read_trace(args: &SimulateArgs, trace_seed: u64) -> anyhow::Result<Trace> {
    if args.generate {
        let spec = Synthetic {
            models: args.models,
            requests: args.requests,
            median_bytes: args.median_size.0,
            sigma: args.sigma,
            zipf: args.zipf,
            rate: args.rate,
            seed: trace_seed,
        };
        return Ok(spec.generate());
    }
    let path = args.trace.as_ref().context("name a trace file or use --generate")?;
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open the trace {}", path.display()))?;
        Box::new(std::io::BufReader::with_capacity(1 << 20, file))
    };
    Trace::read(reader).with_context(|| format!("trace {}", path.display()))
}

/// Runs every (capacity, policy) pair, on as many threads as there are cores: each run is
/// independent and single-threaded.
fn run_all(trace: &Trace, clusters: &[Cluster]) -> anyhow::Result<Vec<Report>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(clusters.len()).max(1);
    let chunk = clusters.len().div_ceil(threads);
    let results: Vec<Result<Report, simulate::ClusterError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = clusters
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|c| simulate::run(trace, c)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    anyhow::ensure!(results.len() == clusters.len(), "a simulation thread panicked");
    Ok(results.into_iter().collect::<Result<_, _>>()?)
}

/// `meshctl simulate`.
pub fn run(args: &SimulateArgs, out: Output) -> anyhow::Result<()> {
    let seeds = args.trace_seed;
    if seeds.first != seeds.last {
        return run_seeds(args, seeds, out);
    }
    let started = Instant::now();
    let trace = read_trace(args, seeds.first)?;
    let read_took = started.elapsed();
    if let Some(path) = &args.write_trace {
        let file =
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = std::io::BufWriter::new(file);
        trace
            .write_csv(&mut writer)
            .and_then(|()| std::io::Write::flush(&mut writer))
            .with_context(|| format!("cannot write the trace to {}", path.display()))?;
    }
    let model_bytes = trace.model_bytes();
    let clusters = clusters(args, model_bytes)?;
    let simulated = Instant::now();
    let reports = run_all(&trace, &clusters)?;
    let simulate_took = simulated.elapsed();
    let requests = trace.requests();
    let summary = json!({
        "requests": requests.len(),
        "models": trace.models().len(),
        "model_bytes": model_bytes,
        "duration_ms": requests.last().map_or(0, |r| r.time_ms) - requests.first().map_or(0, |r| r.time_ms),
        "read_seconds": read_took.as_secs_f64(),
        "simulate_seconds": simulate_took.as_secs_f64(),
    });
    print(out, &json!({ "trace": summary, "runs": reports }), || {
        table(&trace, model_bytes, &reports, simulate_took)
    });
    Ok(())
}

/// Every (capacity, policy) pair `args` asks for, for a trace of `model_bytes`.
fn clusters(args: &SimulateArgs, model_bytes: u64) -> anyhow::Result<Vec<Cluster>> {
    let mut clusters = Vec::new();
    for amount in amounts(args.capacity, args.step, args.points)? {
        for &policy in &args.eviction {
            clusters.push(Cluster {
                pods: args.pods,
                capacity_bytes: per_pod_bytes(amount, model_bytes, args.pods),
                policy,
                min_residence: args.min_residence,
                anti_churn_age: args.anti_churn_age,
                seed: args.seed,
            });
        }
    }
    Ok(clusters)
}

/// One (capacity, policy) pair over every seed of a range.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct OverSeeds {
    /// The share of each trace's model bytes the cluster holds, in percent.
    cluster_percent: f64,
    policy: String,
    seeds: usize,
    hit_rate_mean: f64,
    hit_rate_min: f64,
    hit_rate_max: f64,
    byte_miss_mean: f64,
    byte_miss_min: f64,
    byte_miss_max: f64,
}

/// The mean and spread of each run of `runs` (one list per seed, the same pairs in the same order).
fn over_seeds(runs: &[(u64, u64, Vec<Report>)]) -> Vec<OverSeeds> {
    let Some((_, _, first)) = runs.first() else { return Vec::new() };
    (0..first.len())
        .map(|i| {
            let reports: Vec<(&Report, u64)> = runs.iter().map(|(_, bytes, r)| (&r[i], *bytes)).collect();
            let spread = |f: fn(&Report) -> f64| {
                let values: Vec<f64> = reports.iter().map(|(r, _)| f(r)).collect();
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                (
                    mean,
                    values.iter().copied().fold(f64::INFINITY, f64::min),
                    values.iter().copied().fold(0.0, f64::max),
                )
            };
            let (hit_rate_mean, hit_rate_min, hit_rate_max) = spread(|r| r.hit_rate);
            let (byte_miss_mean, byte_miss_min, byte_miss_max) = spread(|r| r.byte_miss_ratio);
            let (report, bytes) = reports[0];
            OverSeeds {
                cluster_percent: 100.0 * (report.capacity_bytes as f64 * report.pods as f64)
                    / bytes.max(1) as f64,
                policy: report.policy.clone(),
                seeds: reports.len(),
                hit_rate_mean,
                hit_rate_min,
                hit_rate_max,
                byte_miss_mean,
                byte_miss_min,
                byte_miss_max,
            }
        })
        .collect()
}

/// `meshctl simulate --generate --trace-seed A..B`: each seed's trace replayed, then the mean and
/// spread over the seeds.
fn run_seeds(args: &SimulateArgs, seeds: Seeds, out: Output) -> anyhow::Result<()> {
    anyhow::ensure!(args.write_trace.is_none(), "--write-trace takes one --trace-seed, not a range");
    let started = Instant::now();
    let mut runs = Vec::new();
    for seed in seeds.first..=seeds.last {
        let trace = read_trace(args, seed)?;
        let model_bytes = trace.model_bytes();
        let reports = run_all(&trace, &clusters(args, model_bytes)?)?;
        runs.push((seed, model_bytes, reports));
    }
    let took = started.elapsed();
    let summary = over_seeds(&runs);
    let per_seed: Vec<_> = runs
        .iter()
        .map(|(seed, bytes, reports)| json!({ "trace_seed": seed, "model_bytes": bytes, "runs": reports }))
        .collect();
    print(out, &json!({ "seeds": per_seed, "over_seeds": summary }), || {
        let mut t = format!(
            "{} traces (--trace-seed {}..{}) in {:.2} s\nSEED\tPODS\tCLUSTER %\tEVICTION\tHIT RATE\tBYTE MISS",
            runs.len(),
            seeds.first,
            seeds.last,
            took.as_secs_f64()
        );
        for (seed, bytes, reports) in &runs {
            for r in reports {
                let percent = 100.0 * (r.capacity_bytes as f64 * r.pods as f64) / (*bytes).max(1) as f64;
                t.push_str(&format!(
                    "\n{seed}\t{}\t{percent:.1}%\t{}\t{:.3}\t{:.3}",
                    r.pods, r.policy, r.hit_rate, r.byte_miss_ratio
                ));
            }
        }
        t.push_str("\nOVER SEEDS\tCLUSTER %\tEVICTION\tHIT RATE MEAN [MIN-MAX]\tBYTE MISS MEAN [MIN-MAX]");
        for o in &summary {
            t.push_str(&format!(
                "\n{} seeds\t{:.1}%\t{}\t{:.3} [{:.3}-{:.3}]\t{:.3} [{:.3}-{:.3}]",
                o.seeds,
                o.cluster_percent,
                o.policy,
                o.hit_rate_mean,
                o.hit_rate_min,
                o.hit_rate_max,
                o.byte_miss_mean,
                o.byte_miss_min,
                o.byte_miss_max
            ));
        }
        t
    });
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

fn table(trace: &Trace, model_bytes: u64, reports: &[Report], took: Duration) -> String {
    let mut t = format!(
        "trace: {} requests, {} models, {:.2} GiB of models; {} runs in {:.2} s\n",
        trace.requests().len(),
        trace.models().len(),
        model_bytes as f64 / GIB,
        reports.len(),
        took.as_secs_f64()
    );
    t.push_str(
        "PODS\tCAPACITY/POD\tCLUSTER %\tEVICTION\tHIT RATE\tBYTE MISS\tLOADS/S\tEVICTIONS\tREFUSED\tETCD WRITES/S\tPEAK/POD\tMEAN/POD\tCOPIES\tP99 ADDED",
    );
    for r in reports {
        let per_second = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}"));
        let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64 / MIB;
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / MIB;
        t.push_str(&format!(
            "\n{}\t{:.0} MiB\t{:.1}%\t{}\t{:.3}\t{:.3}\t{}\t{}\t{}\t{}\t{:.0} MiB\t{:.0} MiB\t{}\t{} ms",
            r.pods,
            r.capacity_bytes as f64 / MIB,
            100.0 * (r.capacity_bytes as f64 * r.pods as f64) / model_bytes.max(1) as f64,
            r.policy,
            r.hit_rate,
            r.byte_miss_ratio,
            per_second(r.loads_per_second),
            r.evictions,
            r.refused,
            per_second(r.etcd_writes_per_second),
            max(&r.peak_bytes_per_pod),
            mean(&r.mean_bytes_per_pod),
            r.copies_held,
            r.added_p99_ms,
        ));
    }
    t
}

#[cfg(test)]
mod tests;
