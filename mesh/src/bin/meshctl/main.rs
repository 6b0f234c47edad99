//! `meshctl`: operate a densemesh cluster from a shell or a script.
//!
//! Exit codes: 0 done; 1 the server refused or the operation failed (the message says why); 2 bad
//! usage; 3 the server could not be reached.

mod apply;
mod graph;
mod predict;
mod simulate;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use densemesh_controller::mesh::{Authorized, Bearer};
use densemesh_loadgen::{self as loadgen, LoadSpec};
use densemesh_mesh::config::parse_duration;
use densemesh_proto::admin::admin_client::AdminClient;
use densemesh_proto::admin::{
    ListInstancesRequest, ListModelsRequest, ListVModelsRequest, SetVModelSplitRequest, WeightedModel,
};
use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;
use densemesh_proto::mmesh::model_status_info::ModelStatus;
use densemesh_proto::mmesh::v_model_status_info::VModelStatus;
use densemesh_proto::mmesh::*;
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Operate densemesh: register models and vmodels, see what is loaded, try a model, measure it.
#[derive(Parser)]
#[command(name = "meshctl", version)]
struct Cli {
    /// meshd's gRPC address.
    #[arg(long, global = true, env = "DENSEMESH_ADDR", default_value = "127.0.0.1:8033")]
    addr: String,
    /// A file holding the management API's token, where meshd has --admin-token-file.
    #[arg(long, global = true, env = "DENSEMESH_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// TLS to meshd (where it has --tls-cert or --tls-dir): the CA (PEM) its certificate chains to.
    #[arg(long, global = true, env = "DENSEMESH_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// The client certificate (PEM) to present, where meshd asks for one (--tls-client-ca).
    #[arg(long, global = true, env = "DENSEMESH_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "DENSEMESH_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Sizes in tables as raw byte counts instead of `90 KiB` (JSON always has bytes).
    #[arg(long, global = true)]
    bytes: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Register a model.
    Register {
        model_id: String,
        /// Storage path (a model file or directory).
        #[arg(long)]
        path: String,
        /// Model format (modelmesh-serving's names).
        #[arg(long = "type", default_value = "onnx")]
        model_type: String,
        /// Storage key (JSON, as modelmesh-serving passes it).
        #[arg(long)]
        key: Option<String>,
        /// Force the runtime that loads it, where the pod has a choice for the type (onnx: `tiny` or
        /// `onnxruntime`); by default the pod chooses by model size.
        #[arg(long)]
        runtime: Option<String>,
        /// What it asks of GPUs: `preferred` (placed where a device has room, else served on CPU) or
        /// `required` (never served on CPU).
        #[arg(long)]
        gpu: Option<String>,
        /// Load it now and wait for the load.
        #[arg(long)]
        load: bool,
    },
    /// Unregister a model (a no-op for unknown ids).
    Unregister { model_id: String },
    /// List registered models and their status on the node.
    List,
    /// List the mesh's live pods: capacity, use, request rate.
    Instances,
    /// A model's status.
    Status { model_id: String },
    /// Load a model and wait until it is loaded (or failed).
    Load { model_id: String },
    /// Manage vmodels (aliases with gapless switches and traffic splits).
    Vmodel {
        #[command(subcommand)]
        command: VModelCommand,
    },
    /// Manage inference graphs (KServe InferenceGraph: Sequence, Switch, Ensemble, Splitter), called by
    /// model_name like a model.
    Graph {
        #[command(subcommand)]
        command: graph::GraphCommand,
    },
    /// Run one inference: V2 JSON in (`{"inputs": [{"name", "datatype", "shape", "data"}]}`), JSON out.
    Predict {
        /// Model id (or vmodel id, with --vmodel).
        model: String,
        #[arg(long)]
        vmodel: bool,
        /// The request as JSON, @FILE, or - for standard input.
        #[arg(long, short, default_value = "-")]
        input: String,
    },
    /// Register the InferenceServices, Predictors and InferenceGraphs of Kubernetes manifests
    /// (modelmesh-serving's and KServe's YAML, unchanged) straight with the mesh, as the controller
    /// would: FILE or a folder of them.
    Apply {
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
        /// Wait until every applied object's model is ready (or failed), up to this long.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
    },
    /// A live view of the mesh, refreshed: its pods, then the models serving the most requests on the
    /// answering pod.
    Top {
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Models shown.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Stop after this many refreshes (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
    },
    /// Print a shell completion script: `meshctl completions bash > /etc/bash_completion.d/meshctl`.
    Completions { shell: clap_complete::Shell },
    /// Plan capacity offline: replay a request trace through placement and eviction for N simulated
    /// pods (no meshd needed), at one capacity or a sweep.
    Simulate(simulate::SimulateArgs),
    /// Measure a model with concurrent clients (req/s, latency percentiles).
    Bench {
        model: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        warmup: Duration,
        #[arg(long, default_value_t = 1)]
        batch: i64,
    },
}

#[derive(Subcommand)]
enum VModelCommand {
    /// Create a vmodel or point it at a new target; the switch happens once the target is loaded.
    Set {
        vmodel_id: String,
        #[arg(long)]
        target: String,
        /// Register the target with this path first.
        #[arg(long)]
        path: Option<String>,
        #[arg(long = "type", default_value = "onnx")]
        model_type: String,
        #[arg(long, default_value = "")]
        owner: String,
        /// Switch at once, loaded or not.
        #[arg(long)]
        force: bool,
        /// Return without waiting for the switch.
        #[arg(long)]
        no_wait: bool,
    },
    /// Split a vmodel's traffic by weight: MODEL=WEIGHT ... (none: back to its active model).
    Split {
        vmodel_id: String,
        weights: Vec<String>,
    },
    Get {
        vmodel_id: String,
    },
    Delete {
        vmodel_id: String,
    },
    List,
}

/// A failure, and the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code =
            if s.code() == tonic::Code::Unavailable && s.message().contains("transport") { 3 } else { 1 };
        Failure { code, message: format!("{:?}: {}", s.code(), s.message()) }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure { code: 1, message: message.into() }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("meshctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The TLS client config of `--tls-ca`, `--tls-cert` and `--tls-key`; `None` without `--tls-ca`.
fn tls_config(cli: &Cli) -> Result<Option<ClientTlsConfig>, Failure> {
    let Some(ca) = &cli.tls_ca else { return Ok(None) };
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).map_err(|e| Failure {
            code: 2,
            message: format!("cannot read {} ({flag}): {e}", path.display()),
        })
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "--tls-ca")?));
    if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
        config = config.identity(Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?));
    }
    Ok(Some(config))
}

async fn connect(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, Failure> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("{scheme}://{addr}") };
    let usage = |e: &dyn std::fmt::Display| Failure { code: 2, message: format!("--addr {addr}: {e}") };
    let mut endpoint = Channel::from_shared(uri).map_err(|e| usage(&e))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| usage(&e))?;
    }
    endpoint.connect().await.map_err(|e| Failure {
        code: 3,
        message: format!("cannot reach meshd at {addr}: {e}; is it running? (--addr or DENSEMESH_ADDR)"),
    })
}

fn status_name(s: &ModelStatusInfo) -> &'static str {
    ModelStatus::try_from(s.status).map_or("UNKNOWN", |s| s.as_str_name())
}

fn print(output: Output, value: &Value, table: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Table => println!("{}", table()),
    }
}

fn model_json(id: &str, s: &ModelStatusInfo) -> Value {
    json!({ "model_id": id, "status": status_name(s), "errors": s.errors,
            "copies": s.model_copy_infos.iter().map(|c| json!({"location": c.location, "time_ms": c.time})).collect::<Vec<_>>() })
}

fn show_model(output: Output, id: &str, s: &ModelStatusInfo) -> Result<(), Failure> {
    print(output, &model_json(id, s), || {
        let mut line = format!("{id}\t{}", status_name(s));
        for e in &s.errors {
            line.push_str(&format!("\n  error: {e}"));
        }
        line
    });
    match ModelStatus::try_from(s.status) {
        Ok(ModelStatus::LoadingFailed) => Err(fail(format!("model {id} failed to load"))),
        Ok(ModelStatus::NotFound) => {
            Err(fail(format!("model {id} is not registered; see `meshctl register --help`")))
        }
        _ => Ok(()),
    }
}

/// Polls the model's status behind a spinner until it is loaded or failed.
async fn wait_loaded(client: &mut ModelMeshClient<Authorized>, id: &str) -> Result<ModelStatusInfo, Failure> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {id}"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    // ensureLoaded with sync blocks until the load ends; the spinner shows it is not hung.
    let status = client
        .ensure_loaded(EnsureLoadedRequest { model_id: id.to_owned(), sync: true, ..Default::default() })
        .await;
    spinner.finish_and_clear();
    Ok(status?.into_inner())
}

fn vmodel_json(s: &VModelStatusInfo) -> Value {
    let state = VModelStatus::try_from(s.status).map_or("UNKNOWN", |v| v.as_str_name());
    let errors: Vec<&String> = s.target_model_status.iter().flat_map(|t| &t.errors).collect();
    json!({ "status": state, "active_model_id": s.active_model_id, "target_model_id": s.target_model_id,
            "owner": s.owner, "errors": errors })
}

/// `meshctl simulate`: offline, nothing to connect to.
fn simulate(args: &simulate::SimulateArgs, out: Output) -> Result<(), Failure> {
    simulate::run(args, out).map_err(|e| fail(format!("{e:#}")))
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let channel = match &cli.command {
        Command::Simulate(args) => return simulate(args, cli.output),
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics on a closed pipe (`| head`), a write here does not.
            let mut script = Vec::new();
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "meshctl",
                &mut script,
            );
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            return Ok(());
        }
        _ => connect(&cli.addr, tls_config(cli)?).await?,
    };
    let size =
        |bytes: u64| if cli.bytes { bytes.to_string() } else { densemesh_mesh::bytesize::human(bytes) };
    let bearer = cli.token_file.as_deref().map(Bearer::from_file).unwrap_or_default();
    let mut mm = ModelMeshClient::with_interceptor(channel.clone(), bearer.clone());
    let mut admin = AdminClient::with_interceptor(channel.clone(), bearer.clone());
    let out = cli.output;
    match &cli.command {
        Command::Register { model_id, path, model_type, key, runtime, gpu, load } => {
            let info = ModelInfo {
                r#type: model_type.clone(),
                path: path.clone(),
                key: key.clone().unwrap_or_default(),
                runtime: runtime.clone().unwrap_or_default(),
                gpu: gpu.clone().unwrap_or_default(),
                ..Default::default()
            };
            let mut s = mm
                .register_model(RegisterModelRequest {
                    model_id: model_id.clone(),
                    model_info: Some(info),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if *load {
                s = wait_loaded(&mut mm, model_id).await?;
            }
            show_model(out, model_id, &s)
        }
        Command::Unregister { model_id } => {
            mm.unregister_model(UnregisterModelRequest { model_id: model_id.clone() }).await?;
            print(out, &json!({ "model_id": model_id, "unregistered": true }), || {
                format!("{model_id}\tunregistered")
            });
            Ok(())
        }
        Command::Status { model_id } => {
            let s = mm.get_model_status(GetStatusRequest { model_id: model_id.clone() }).await?.into_inner();
            show_model(out, model_id, &s)
        }
        Command::Load { model_id } => {
            let s = wait_loaded(&mut mm, model_id).await?;
            show_model(out, model_id, &s)
        }
        Command::List => {
            let models = admin.list_models(ListModelsRequest {}).await?.into_inner().models;
            let value = json!(
                models
                    .iter()
                    .map(|m| json!({"model_id": m.model_id, "type": m.r#type, "path": m.path,
                "source": m.source, "status": m.status, "size_bytes": m.size_bytes, "error": m.error,
                "runtime": m.runtime, "forced_runtime": m.forced_runtime, "gpu": m.gpu}))
                    .collect::<Vec<_>>()
            );
            print(out, &value, || {
                let mut t = String::from("MODEL\tTYPE\tSOURCE\tSTATUS\tSIZE\tRUNTIME\tPATH");
                for m in &models {
                    // The runtime holding the copy; a forced one not loaded yet shows as `tiny!`.
                    let runtime = match (m.runtime.as_str(), m.forced_runtime.as_str()) {
                        ("", "") => "-".to_owned(),
                        ("", forced) => format!("{forced}!"),
                        (runtime, _) => runtime.to_owned(),
                    };
                    t.push_str(&format!(
                        "\n{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        m.model_id,
                        m.r#type,
                        m.source,
                        m.status,
                        size(m.size_bytes),
                        runtime,
                        m.path
                    ));
                }
                t
            });
            Ok(())
        }
        Command::Instances => {
            let instances = admin.list_instances(ListInstancesRequest {}).await?.into_inner().instances;
            let value = json!(instances.iter().map(|i| json!({"instance_id": i.instance_id, "endpoint": i.endpoint,
                "capacity_bytes": i.capacity_bytes, "used_bytes": i.used_bytes, "models_loaded": i.models_loaded,
                "loading": i.loading, "lru_age_seconds": i.lru_age_seconds,
                "requests_per_minute": i.requests_per_minute, "draining": i.draining,
                "devices": i.devices.iter().map(|d| json!({"name": d.name, "kind": d.kind,
                    "total_bytes": d.total_bytes, "capacity_bytes": d.capacity_bytes,
                    "used_bytes": d.used_bytes, "models": d.models})).collect::<Vec<_>>()})).collect::<Vec<_>>());
            print(out, &value, || {
                let mut t = String::from(
                    "INSTANCE\tENDPOINT\tUSED/CAPACITY\tMODELS\tREQ/MIN\tLRU AGE\tDRAINING\tGPUS (USED/CAPACITY, MODELS)",
                );
                for i in &instances {
                    let gpus = if i.devices.is_empty() {
                        "-".to_owned()
                    } else {
                        i.devices
                            .iter()
                            .map(|d| {
                                format!(
                                    "{} {}/{} ({})",
                                    d.name,
                                    size(d.used_bytes),
                                    size(d.capacity_bytes),
                                    d.models
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    t.push_str(&format!(
                        "\n{}\t{}\t{}/{}\t{}\t{}\t{}s\t{}\t{gpus}",
                        i.instance_id,
                        i.endpoint,
                        size(i.used_bytes),
                        size(i.capacity_bytes),
                        i.models_loaded,
                        i.requests_per_minute,
                        i.lru_age_seconds,
                        i.draining
                    ));
                }
                t
            });
            Ok(())
        }
        Command::Vmodel { command } => vmodel(out, &mut mm, &mut admin, command).await,
        Command::Graph { command } => graph::run(out, &mut admin, command).await,
        Command::Apply { file, wait } => apply::run(channel, bearer, out, file, *wait).await,
        Command::Simulate(args) => simulate(args, out),
        Command::Completions { .. } => Ok(()),
        Command::Top { interval, limit, iterations } => {
            top(&mut admin, out, &size, *interval, *limit, *iterations).await
        }
        Command::Predict { model, vmodel, input } => {
            let request = predict::read_request(input).map_err(|message| Failure { code: 2, message })?;
            let response = predict::run(channel, model, *vmodel, &request).await?;
            println!("{}", serde_json::to_string_pretty(&response).unwrap_or_default());
            Ok(())
        }
        Command::Bench { model, concurrency, duration, warmup, batch } => {
            let spec = LoadSpec {
                addr: cli.addr.clone(),
                model: model.clone(),
                concurrency: *concurrency,
                warmup: *warmup,
                duration: *duration,
                batch: *batch,
                connection_per_client: false,
                server_live_only: false,
                timeout: Duration::from_secs(30),
                tls: tls_config(cli)?,
                spread: None,
            };
            let spinner = indicatif::ProgressBar::new_spinner();
            spinner.set_message(format!(
                "{} clients on {model} for {duration:?} (+{warmup:?} warm-up)",
                concurrency
            ));
            spinner.enable_steady_tick(Duration::from_millis(100));
            let report = loadgen::run(&spec).await.map_err(|e| fail(e.to_string()))?;
            spinner.finish_and_clear();
            let value = serde_json::to_value(&report).unwrap_or_default();
            print(out, &value, || {
                format!(
                    "{model}\t{:.0} req/s\tp50 {} µs\tp90 {} µs\tp99 {} µs\tmax {} µs\terrors {}",
                    report.requests_per_second,
                    report.p50_us,
                    report.p90_us,
                    report.p99_us,
                    report.max_us,
                    report.errors
                )
            });
            if report.errors > 0 {
                return Err(fail(format!(
                    "{} requests failed; first: {}",
                    report.errors,
                    report.first_error.unwrap_or_default()
                )));
            }
            Ok(())
        }
    }
}

async fn vmodel(
    out: Output,
    mm: &mut ModelMeshClient<Authorized>,
    admin: &mut AdminClient<Authorized>,
    command: &VModelCommand,
) -> Result<(), Failure> {
    let show = |s: &VModelStatusInfo, id: &str| {
        print(out, &vmodel_json(s), || {
            let v = vmodel_json(s);
            let mut line = format!(
                "{id}\t{}\tactive={}\ttarget={}",
                v["status"].as_str().unwrap_or(""),
                s.active_model_id,
                s.target_model_id
            );
            for e in s.target_model_status.iter().flat_map(|t| &t.errors) {
                line.push_str(&format!("\n  target error: {e}"));
            }
            line
        })
    };
    match command {
        VModelCommand::Set { vmodel_id, target, path, model_type, owner, force, no_wait } => {
            let info = path.as_ref().map(|p| ModelInfo {
                r#type: model_type.clone(),
                path: p.clone(),
                key: String::new(),
                ..Default::default()
            });
            let spinner = indicatif::ProgressBar::new_spinner();
            if !no_wait {
                spinner.set_message(format!("switching {vmodel_id} to {target}"));
                spinner.enable_steady_tick(Duration::from_millis(100));
            }
            let s = mm
                .set_v_model(SetVModelRequest {
                    v_model_id: vmodel_id.clone(),
                    target_model_id: target.clone(),
                    owner: owner.clone(),
                    model_info: info,
                    force: *force,
                    load_now: true,
                    sync: !no_wait,
                    ..Default::default()
                })
                .await;
            spinner.finish_and_clear();
            let s = s?.into_inner();
            show(&s, vmodel_id);
            if s.status == VModelStatus::TransitionFailed as i32 {
                return Err(fail(format!(
                    "vmodel {vmodel_id} could not switch to {target}; it keeps serving {}",
                    s.active_model_id
                )));
            }
            Ok(())
        }
        VModelCommand::Split { vmodel_id, weights } => {
            let split = weights
                .iter()
                .map(|w| {
                    let (model, weight) = w
                        .split_once('=')
                        .ok_or_else(|| Failure { code: 2, message: format!("{w:?}: write MODEL=WEIGHT") })?;
                    let weight = weight.parse().map_err(|_| Failure {
                        code: 2,
                        message: format!("{w:?}: the weight must be a whole number"),
                    })?;
                    Ok(WeightedModel { model_id: model.to_owned(), weight })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            let r = admin
                .set_v_model_split(SetVModelSplitRequest { vmodel_id: vmodel_id.clone(), split })
                .await?
                .into_inner();
            let value = json!({ "vmodel_id": r.vmodel_id, "split": r.split.iter().map(|w| json!({"model_id": w.model_id, "weight": w.weight})).collect::<Vec<_>>() });
            print(out, &value, || {
                let parts: Vec<String> =
                    r.split.iter().map(|w| format!("{}={}", w.model_id, w.weight)).collect();
                format!(
                    "{}\tsplit {}",
                    r.vmodel_id,
                    if parts.is_empty() { "off".to_owned() } else { parts.join(" ") }
                )
            });
            Ok(())
        }
        VModelCommand::Get { vmodel_id } => {
            let s = mm
                .get_v_model_status(GetVModelStatusRequest {
                    v_model_id: vmodel_id.clone(),
                    owner: String::new(),
                })
                .await?
                .into_inner();
            show(&s, vmodel_id);
            if s.status == VModelStatus::NotFound as i32 {
                return Err(fail(format!("vmodel {vmodel_id} not found")));
            }
            Ok(())
        }
        VModelCommand::Delete { vmodel_id } => {
            mm.delete_v_model(DeleteVModelRequest { v_model_id: vmodel_id.clone(), owner: String::new() })
                .await?;
            print(out, &json!({ "vmodel_id": vmodel_id, "deleted": true }), || {
                format!("{vmodel_id}\tdeleted")
            });
            Ok(())
        }
        VModelCommand::List => {
            let vmodels = admin.list_v_models(ListVModelsRequest {}).await?.into_inner().vmodels;
            let value = json!(vmodels.iter().map(|v| json!({"vmodel_id": v.vmodel_id, "active_model_id": v.active_model_id,
                "target_model_id": v.target_model_id, "owner": v.owner, "transition_error": v.transition_error,
                "split": v.split.iter().map(|w| json!({"model_id": w.model_id, "weight": w.weight})).collect::<Vec<_>>()})).collect::<Vec<_>>());
            print(out, &value, || {
                let mut t = String::from("VMODEL\tACTIVE\tTARGET\tSPLIT");
                for v in &vmodels {
                    let split: Vec<String> =
                        v.split.iter().map(|w| format!("{}={}", w.model_id, w.weight)).collect();
                    t.push_str(&format!(
                        "\n{}\t{}\t{}\t{}",
                        v.vmodel_id,
                        v.active_model_id,
                        v.target_model_id,
                        split.join(",")
                    ));
                }
                t
            });
            Ok(())
        }
    }
}

/// `meshctl top`: pods, then the answering pod's busiest models by requests per second over the last
/// interval, redrawn in place on a terminal (appended otherwise, and one JSON document per refresh
/// with `-o json`).
async fn top(
    admin: &mut AdminClient<Authorized>,
    out: Output,
    size: &dyn Fn(u64) -> String,
    interval: Duration,
    limit: usize,
    iterations: u64,
) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let redraw = out == Output::Table && std::io::stdout().is_terminal();
    let mut before: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut then = std::time::Instant::now();
    let mut round = 0u64;
    loop {
        let instances = admin.list_instances(ListInstancesRequest {}).await?.into_inner().instances;
        let models = admin.list_models(ListModelsRequest {}).await?.into_inner().models;
        let seconds = then.elapsed().as_secs_f64().max(1e-3);
        then = std::time::Instant::now();
        let mut hot: Vec<(f64, &densemesh_proto::admin::ModelSummary)> = models
            .iter()
            .filter(|m| m.status == "LOADED")
            .map(|m| {
                // The first round has nothing to compare with: 0, and the order is by requests served.
                let rate = match before.get(&m.model_id) {
                    Some(&was) => m.requests.saturating_sub(was) as f64 / seconds,
                    None => 0.0,
                };
                (rate, m)
            })
            .collect();
        hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.requests.cmp(&a.1.requests)));
        hot.truncate(limit);
        if out == Output::Json {
            let value = json!({
                "instances": instances.iter().map(|i| json!({"instance_id": i.instance_id,
                    "used_bytes": i.used_bytes, "capacity_bytes": i.capacity_bytes, "models_loaded": i.models_loaded,
                    "loading": i.loading, "requests_per_minute": i.requests_per_minute})).collect::<Vec<_>>(),
                "models": hot.iter().map(|(rate, m)| json!({"model_id": m.model_id, "requests_per_second": rate,
                    "requests": m.requests, "idle_seconds": m.idle_seconds, "size_bytes": m.size_bytes}))
                    .collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string(&value).unwrap_or_default());
        } else {
            let mut t = String::new();
            if redraw {
                t.push_str("\x1b[H\x1b[2J");
            }
            t.push_str("INSTANCE\tUSED/CAPACITY\tMODELS\tLOADING\tREQ/MIN\n");
            for i in &instances {
                t.push_str(&format!(
                    "{}\t{}/{}\t{}\t{}\t{}\n",
                    i.instance_id,
                    size(i.used_bytes),
                    size(i.capacity_bytes),
                    i.models_loaded,
                    i.loading,
                    i.requests_per_minute
                ));
            }
            t.push_str("\nMODEL\tREQ/S\tREQUESTS\tIDLE\tSIZE\n");
            for (rate, m) in &hot {
                t.push_str(&format!(
                    "{}\t{rate:.1}\t{}\t{}s\t{}\n",
                    m.model_id,
                    m.requests,
                    m.idle_seconds,
                    size(m.size_bytes)
                ));
            }
            println!("{t}");
        }
        before = models.iter().map(|m| (m.model_id.clone(), m.requests)).collect();
        round += 1;
        if iterations > 0 && round >= iterations {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}
