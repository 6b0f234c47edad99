//! `densemesh-bench`: latency and throughput figures for the targets, printed as a table and
//! as one JSON line per run (for scripts). See bench/README.md.
//!
//! - `grpc`: closed-loop V2 clients against any server (meshd, MLServer);
//! - `inproc`: the same request run through ONNX Runtime in this process, no network: the floor;
//! - `cold-load`: a model's load from disk against a session built from bytes already in memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use densemesh_mesh::config::parse_duration;
use densemesh_mesh::loadgen::{self, LoadSpec, Report};
use densemesh_runtime_core::{InferRequest, LoadRequest, Runtime};
use densemesh_runtime_ort::{OrtConfig, OrtRuntime};

#[derive(Parser)]
#[command(name = "densemesh-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Concurrent KServe V2 gRPC clients against a server.
    Grpc {
        /// Server address, e.g. 127.0.0.1:8033.
        #[arg(long)]
        addr: String,
        #[arg(long)]
        model: String,
        /// One HTTP/2 connection per client instead of one shared connection.
        #[arg(long)]
        connection_per_client: bool,
        /// Send ServerLive instead of ModelInfer: the bare gRPC round trip on this machine.
        #[arg(long)]
        server_live_only: bool,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The same request through ONNX Runtime in process, on threads, without the network.
    Inproc {
        #[arg(long)]
        model_file: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Load time of a model from disk against building the session from bytes already in memory.
    ColdLoad {
        #[arg(long)]
        model_file: PathBuf,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

#[derive(Args, Clone)]
struct LoadArgs {
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Size of dynamic (-1) dimensions.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// A label printed with the figures.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Grpc { addr, model, connection_per_client, server_live_only, load } => {
            let spec = LoadSpec {
                addr,
                model,
                concurrency: load.concurrency,
                warmup: load.warmup,
                duration: load.duration,
                batch: load.batch,
                connection_per_client,
                server_live_only,
            };
            // One client needs no second thread; cross-thread wake-ups would add client-side latency
            // that is not the server's.
            let runtime = if spec.concurrency <= 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                tokio::runtime::Builder::new_multi_thread().enable_all().build()?
            };
            let report = runtime.block_on(loadgen::run(&spec))?;
            print_report("grpc", &load, &report);
        }
        Command::Inproc { model_file, load } => {
            let report = inproc(&model_file, &load)?;
            print_report("inproc", &load, &report);
        }
        Command::ColdLoad { model_file, repeat } => cold_load(&model_file, repeat)?,
    }
    Ok(())
}

fn print_report(kind: &str, load: &LoadArgs, r: &Report) {
    println!(
        "{kind:7} {:24} c={:<3} {:>10.0} req/s  p50 {:>6} µs  p90 {:>6} µs  p99 {:>6} µs  max {:>7} µs  errors {}",
        load.label, load.concurrency, r.requests_per_second, r.p50_us, r.p90_us, r.p99_us, r.max_us, r.errors
    );
    if let Some(e) = &r.first_error {
        println!("        first error: {e}");
    }
    let json = serde_json::json!({ "kind": kind, "label": load.label, "concurrency": load.concurrency, "report": r });
    println!("JSON {json}");
}

fn inproc(model_file: &std::path::Path, load: &LoadArgs) -> anyhow::Result<Report> {
    let runtime = OrtRuntime::new(&OrtConfig::default())?;
    let model: Arc<dyn densemesh_runtime_core::LoadedModel> = runtime
        .load(&LoadRequest { model_id: "bench".into(), path: model_file.to_owned() })
        .context("loading the model")?
        .into();
    let inputs = loadgen::synthetic_inputs(&model.metadata().inputs, load.batch);
    let start = Instant::now();
    let (measure_from, stop) = (start + load.warmup, start + load.warmup + load.duration);
    let threads: Vec<_> = (0..load.concurrency.max(1))
        .map(|_| {
            let (model, inputs) = (model.clone(), inputs.clone());
            std::thread::spawn(move || {
                let mut h = loadgen::histogram();
                let mut errors = 0;
                loop {
                    let sent = Instant::now();
                    if sent >= stop {
                        break;
                    }
                    let result = model.infer(InferRequest { inputs: inputs.clone(), outputs: vec![] });
                    if sent < measure_from {
                        continue;
                    }
                    match result {
                        Ok(_) => {
                            let _ = h.record(sent.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (h, errors)
            })
        })
        .collect();
    let mut total = loadgen::histogram();
    let mut errors = 0;
    for t in threads {
        let (h, e) = t.join().map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?;
        total.add(&h)?;
        errors += e;
    }
    Ok(Report::from_histogram(&total, errors, None, load.duration.as_secs_f64()))
}

/// Drops the page cache when allowed (root), so "from disk" means the disk; says which it measured.
fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn cold_load(model_file: &std::path::Path, repeat: usize) -> anyhow::Result<()> {
    let runtime = OrtRuntime::new(&OrtConfig::default())?;
    let bytes = std::fs::metadata(model_file)?.len();
    let (mut disk, mut memory) = (Vec::new(), Vec::new());
    let mut cold = true;
    for _ in 0..repeat.max(1) {
        cold &= drop_page_cache();
        let t = Instant::now();
        let model = runtime.load(&LoadRequest { model_id: "cold".into(), path: model_file.to_owned() })?;
        disk.push(t.elapsed());
        drop(model);

        let in_memory = std::fs::read(model_file)?;
        let t = Instant::now();
        let model = runtime.load_from_memory("warm", in_memory)?;
        memory.push(t.elapsed());
        drop(model);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    let (disk_ms, memory_ms) = (median(&mut disk), median(&mut memory));
    let page_cache = if cold { "dropped before each load" } else { "warm (could not drop it)" };
    println!(
        "cold-load {:.1} MB: from disk {disk_ms:.1} ms (page cache {page_cache}), from memory {memory_ms:.1} ms, ratio {:.2}",
        bytes as f64 / 1e6,
        disk_ms / memory_ms
    );
    let json = serde_json::json!({ "kind": "cold-load", "bytes": bytes, "disk_ms": disk_ms, "memory_ms": memory_ms, "page_cache_dropped": cold });
    println!("JSON {json}");
    Ok(())
}
