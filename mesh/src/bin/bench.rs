//! `densemesh-bench`: latency and throughput figures for meshd's targets, each run printed as a table
//! for a person and as one JSON line for scripts (`bench/run.sh` collects them). See bench/README.md.
//!
//! - `grpc`: closed-loop KServe V2 gRPC clients against any V2 server (meshd, MLServer);
//! - `inproc`: the same request through ONNX Runtime in this process, no network: the floor;
//! - `cold-load`: a model's load from disk against a session built from bytes already in memory;
//! - `pull`: an object pulled from storage into the disk cache against a `read()` of a local copy;
//! - `echo-server`: a bare tonic V2 server answering canned responses, the floor `grpc` is read against;
//! - `pair`: one request sent through a hop and straight to the server behind it, pair by pair;
//! - `relay`: a bare HTTP/2 relay in front of a server, the floor `pair` reads meshd's hop against.

// A binary's root resolves modules beside itself; these live in `bench/` so cargo does not take them
// for binaries of their own.
#[path = "bench/echo.rs"]
mod echo;
#[path = "bench/figures.rs"]
mod figures;
#[path = "bench/grpc.rs"]
mod grpc;
#[path = "bench/local.rs"]
mod local;
#[path = "bench/pair.rs"]
mod pair;
#[path = "bench/pull.rs"]
mod pull;
#[path = "bench/relay.rs"]
mod relay;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use densemesh_mesh::config::parse_duration;

use crate::figures::{Figures, RunInfo};
use crate::grpc::{Call, Connections, GrpcLoad};
use crate::local::LocalLoad;

#[derive(Parser)]
#[command(name = "densemesh-bench", about = "Benchmarks meshd, other V2 servers and in-process ONNX Runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Concurrent closed-loop KServe V2 gRPC clients against a server.
    Grpc(GrpcArgs),
    /// The same request through ONNX Runtime in this process, on threads, without the network.
    Inproc(InprocArgs),
    /// Load time of a model from disk against building the session from bytes already in memory.
    ColdLoad {
        /// The ONNX model to load.
        #[arg(long)]
        model_file: PathBuf,
        /// Loads of each kind; the median is reported.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// A bare tonic KServe V2 server whose ModelInfer answers, with no work, a response copied from a
    /// real server: the echo floor meshd's latencies are read against (bench/tail.py).
    EchoServer {
        /// Where to listen; port 0 lets the kernel choose (see --addr-file).
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: std::net::SocketAddr,
        /// The server whose ModelMetadata and ModelInfer answers for --model are copied at start.
        #[arg(long)]
        like: String,
        /// The model to answer for.
        #[arg(long)]
        model: String,
        /// Size given to dynamic (-1) dimensions of the request whose answer is copied.
        #[arg(long, default_value_t = 1)]
        batch: i64,
        /// Written once listening: {"grpc_addr": "..."}.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// What a hop adds: one client sends the same ModelInfer through the hop (`--via`) and to the
    /// server behind it (`--direct`), alternating, one call at a time.
    Pair {
        /// The hop's gRPC address (e.g. meshd's).
        #[arg(long)]
        via: String,
        /// The server behind it, called directly.
        #[arg(long)]
        direct: String,
        /// The model both serve under this name.
        #[arg(long)]
        model: String,
        /// An input as NAME:DATATYPE:D1xD2..., e.g. input-0:FP64:1x4 (repeat for each input).
        #[arg(long = "input", required = true, value_parser = pair::parse_input)]
        inputs: Vec<densemesh_runtime_core::TensorSpec>,
        /// Timed pairs.
        #[arg(long, default_value_t = 20_000)]
        pairs: usize,
        /// Pairs sent first and not timed.
        #[arg(long, default_value_t = 1_000)]
        warmup: usize,
        /// Blocks the pairs are cut into, each with its own added p50 (the spread is printed).
        #[arg(long, default_value_t = 10)]
        blocks: usize,
        /// A call unanswered after this ends the run.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// A name printed with the figures.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// A bare HTTP/2 relay passing every call whole to one server: the floor of a hop, with nothing
    /// of the mesh, that `pair` reads meshd against.
    Relay {
        /// Where to listen; port 0 lets the kernel choose (see --addr-file).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// The server every call is passed to, host:port.
        #[arg(long)]
        to: String,
        /// Written once listening: {"grpc_addr": "..."}.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Pull throughput from object storage into an empty disk cache, against read() of a local copy.
    Pull {
        /// The registered location: s3://bucket/key, http://..., or an object path with --key.
        #[arg(long)]
        location: String,
        /// ModelInfo.key: a storage key name or {"storage_key": ..., "bucket": ...}.
        #[arg(long)]
        key: Option<String>,
        /// The storage-config secret dir or file (as meshd's --storage-config).
        #[arg(long)]
        storage_config: Option<PathBuf>,
        /// A local copy of the same bytes, for the read() baseline.
        #[arg(long)]
        local_file: PathBuf,
        /// Pulls (each into a fresh cache); the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Range size in MiB: objects of at least twice this are fetched in parallel ranges.
        #[arg(long, default_value_t = 16)]
        range_mib: u64,
        /// Range requests in flight.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
}

#[derive(Args)]
struct GrpcArgs {
    /// The server's gRPC address, e.g. 127.0.0.1:8033.
    #[arg(long)]
    addr: String,
    /// The model to call (V2 `model_name`).
    #[arg(long)]
    model: String,
    /// One HTTP/2 connection shared by all clients, or one per client.
    #[arg(long, value_enum, default_value_t = Connections::Shared)]
    connections: Connections,
    /// The RPC to send; `server-live` measures the bare gRPC round trip.
    #[arg(long, value_enum, default_value_t = Call::ModelInfer)]
    call: Call,
    /// Threads of the client's runtime; 1 runs every client on one thread, which leaves the cores to
    /// the server on a small machine and has no cross-thread wake-ups.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// A request unanswered after this counts as an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Spread requests over the models named in this file (one per line, all with `--model`'s
    /// interface), by Zipf rank in the file's order.
    #[arg(long)]
    models_file: Option<PathBuf>,
    /// The Zipf exponent over `--models-file` (0: uniform).
    #[arg(long, default_value_t = 1.0, requires = "models_file")]
    zipf: f64,
    /// Ask every model of `--models-file` once, in order, then stop: the time to first-serve them
    /// all (`--duration` and `--warmup` do not apply).
    #[arg(long, requires = "models_file")]
    each_once: bool,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Args)]
struct InprocArgs {
    /// The ONNX model to run.
    #[arg(long)]
    model_file: PathBuf,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Clients (or threads) each sending the next request when the last is answered.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// How long to run before measuring; these latencies are discarded.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Size given to dynamic (-1) dimensions of the inputs.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// A name printed with the figures (e.g. meshd, mlserver).
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> anyhow::Result<()> {
    // Nothing here prints library logs; with no subscriber at all, every `tracing` call site in h2, hyper
    // and tonic was still asked whether it is enabled, on each call: a sixth of the relay's instructions.
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
    match Cli::parse().command {
        Command::Grpc(args) => grpc(args),
        Command::Inproc(args) => inproc(args),
        Command::ColdLoad { model_file, repeat } => {
            local::print_cold_load(&local::cold_load(&model_file, repeat)?);
            Ok(())
        }
        Command::EchoServer { addr, like, model, batch, addr_file } => {
            echo::run(&echo::EchoArgs { addr, like, model, batch, addr_file })
        }
        Command::Pair { via, direct, model, inputs, pairs, warmup, blocks, timeout, label } => {
            let args = pair::PairArgs { via, direct, model, inputs, pairs, warmup, blocks, timeout, label };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let figures = runtime.block_on(pair::run(&args))?;
            pair::print(&args, &figures);
            Ok(())
        }
        Command::Relay { listen, to, addr_file } => relay::run(&relay::RelayArgs { listen, to, addr_file }),
        Command::Pull { location, key, storage_config, local_file, repeat, range_mib, parallel } => {
            pull::run(&pull::PullArgs {
                location,
                key,
                storage_config,
                local_file,
                repeat,
                range_mib,
                parallel,
            })
        }
    }
}

fn grpc(args: GrpcArgs) -> anyhow::Result<()> {
    let spread = match &args.models_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read --models-file {}: {e}", path.display()))?;
            let models: std::sync::Arc<[String]> =
                text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
            if models.is_empty() {
                anyhow::bail!("--models-file {} names no model", path.display());
            }
            let order = if args.each_once {
                densemesh_loadgen::Order::EachOnce
            } else if args.zipf >= 0.0 && args.zipf.is_finite() {
                densemesh_loadgen::Order::Zipf(args.zipf)
            } else {
                anyhow::bail!("--zipf {} is not a finite exponent ≥ 0", args.zipf);
            };
            Some(densemesh_loadgen::Spread { models, order })
        }
    };
    let load = GrpcLoad {
        addr: args.addr.clone(),
        model: args.model.clone(),
        concurrency: args.load.concurrency.max(1),
        warmup: args.load.warmup,
        duration: args.load.duration,
        batch: args.load.batch,
        connections: args.connections,
        call: args.call,
        timeout: args.timeout,
        spread,
    };
    let runtime = match args.client_threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    let (histogram, errors, elapsed) = runtime.block_on(grpc::run(&load))?;
    let connections = match args.connections {
        Connections::Shared => "shared connection",
        Connections::PerClient => "connection per client",
    };
    let call = match args.call {
        Call::ModelInfer => String::new(),
        Call::ServerLive => "ServerLive, ".to_owned(),
    };
    let target = match &load.spread {
        None => format!("{} {}", args.addr, args.model),
        Some(s) => match s.order {
            densemesh_loadgen::Order::Zipf(e) => format!("{} {} models, Zipf {e}", args.addr, s.models.len()),
            densemesh_loadgen::Order::EachOnce => {
                format!("{} {} models, each once", args.addr, s.models.len())
            }
        },
    };
    // Each-once ends when every model was asked: its rate is over the time that took.
    let measured = if args.each_once { elapsed } else { load.duration };
    let info = RunInfo {
        kind: "grpc",
        label: args.load.label,
        target,
        concurrency: load.concurrency,
        batch: load.batch,
        transport: Some(format!("{call}{connections}, {} client thread(s)", args.client_threads.max(1))),
    };
    figures::print(&info, &Figures::new(&histogram, errors, measured));
    Ok(())
}

fn inproc(args: InprocArgs) -> anyhow::Result<()> {
    let load = LocalLoad {
        model_file: args.model_file.clone(),
        concurrency: args.load.concurrency.max(1),
        warmup: args.load.warmup,
        duration: args.load.duration,
        batch: args.load.batch,
    };
    let (histogram, errors) = local::inproc(&load)?;
    let info = RunInfo {
        kind: "inproc",
        label: args.load.label,
        target: args.model_file.display().to_string(),
        concurrency: load.concurrency,
        batch: load.batch,
        transport: None,
    };
    figures::print(&info, &Figures::new(&histogram, errors, load.duration));
    Ok(())
}
