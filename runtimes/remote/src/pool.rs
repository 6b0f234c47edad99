//! The pool of server processes: each one started on free loopback ports with its own model repository,
//! watched until it exits, and started again with back-off.
//!
//! A process's life is counted in generations. A model remembers the generation it was loaded into; once
//! the process has exited, that generation is over, and every call for the model answers `Error::Lost`
//! at once instead of waiting on a server that no longer holds it.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::{ServerLiveRequest, ServerReadyRequest};
use densemesh_runtime_core::CallSlots;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::config::{RemoteRuntimeConfig, Substitutions};
use crate::spawner::{self, Spawner};
use crate::{RemoteError, metric_names};

/// Lines of a process's output kept to explain why it failed to start.
const LOG_TAIL_LINES: usize = 40;
/// Between two ServerReady probes: a process that is starting has no way to tell us it is ready, so
/// this is the one place that polls.
const READY_PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A process that stayed up this long is healthy again: its next restart waits the initial back-off.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// What every process and model shares: the config, the pool, and the owner of the background tasks.
pub(crate) struct Pool {
    pub(crate) config: RemoteRuntimeConfig,
    pub(crate) processes: Vec<Arc<Process>>,
    /// Woken whenever a process comes up or goes down, for loads waiting for a process to be up.
    pub(crate) changed: Notify,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// Removed on shutdown: the repository directory this runtime made for itself.
    pub(crate) owned_root: Mutex<Option<tempfile::TempDir>>,
    /// Starts the processes, from a thread that lives as long as the pool (see `spawner`).
    pub(crate) spawner: Spawner,
}

/// One server of the pool.
pub(crate) struct Process {
    pub(crate) index: usize,
    /// Its model repository: `<repository>/<model-id>/model-settings.json`.
    pub(crate) repository: PathBuf,
    pub(crate) state: watch::Sender<ProcessState>,
    /// Inference requests in flight (`concurrency`) and waiting (`maxQueued`), through the mesh's
    /// passthrough or decoded.
    pub(crate) slots: CallSlots,
    /// Loads and unloads of this process, one at a time (ModelMesh's adapters load one model at a
    /// time per server too), so an unload that runs late never removes a model loaded again since.
    pub(crate) repository_lock: tokio::sync::Mutex<()>,
    /// The models it holds in this generation, and bytes promised to loads in progress.
    pub(crate) ledger: Mutex<Ledger>,
}

/// A process's state as models and loads see it.
#[derive(Clone, Default)]
pub(crate) struct ProcessState {
    /// Incremented each time the process is started.
    pub(crate) generation: u64,
    /// Set while the process answers; `None` while it starts, after it exited, and after shutdown.
    pub(crate) up: Option<Up>,
    /// How the last generation ended.
    pub(crate) last_exit: Option<String>,
}

/// A running, ready process.
#[derive(Clone)]
pub(crate) struct Up {
    pub(crate) pid: Option<u32>,
    pub(crate) endpoint: String,
    pub(crate) channel: Channel,
}

/// The models a process holds, for choosing the least loaded one and for unloading only what is ours.
#[derive(Default)]
pub(crate) struct Ledger {
    /// Model id → (the load's token, the bytes it is charged).
    pub(crate) models: HashMap<String, (u64, u64)>,
    /// Bytes of loads chosen for this process and not finished yet.
    pub(crate) reserved: u64,
}

impl Ledger {
    pub(crate) fn charged(&self) -> u64 {
        self.models.values().map(|(_, bytes)| bytes).sum::<u64>() + self.reserved
    }
}

impl Process {
    /// The process as it is now, if it is still in `generation` and up.
    pub(crate) fn up_in(&self, generation: u64) -> Option<Up> {
        let state = self.state.borrow();
        if state.generation == generation { state.up.clone() } else { None }
    }

    /// Why a model of `generation` is gone, for `Error::Lost`.
    pub(crate) fn lost_reason(&self, runtime: &str, generation: u64) -> String {
        let state = self.state.borrow();
        match (&state.last_exit, state.generation == generation) {
            (Some(exit), _) => format!("{runtime} process {} {exit}; restarting it", self.index),
            (None, false) => format!("{runtime} process {} was restarted", self.index),
            (None, true) => format!("{runtime} process {} is not up", self.index),
        }
    }
}

impl Pool {
    /// The up process with the fewest bytes charged (fewest models on ties, then the lowest index), with
    /// `bytes` reserved on it until the returned guard is dropped.
    pub(crate) fn least_loaded(self: &Arc<Self>, bytes: u64) -> Option<(Arc<Process>, u64, Up, Reservation)> {
        // One lock at a time, so a choice can be stale by a concurrent load's reservation at worst: that
        // load is then balanced against a slightly wrong figure, which the next one corrects.
        let (process, generation, up) = self
            .processes
            .iter()
            .filter_map(|p| {
                // The state's guard is released before the ledger is locked: a load holds the ledger
                // while it reads the state, and the two must never wait on each other.
                let (generation, up) = {
                    let state = p.state.borrow();
                    (state.generation, state.up.clone()?)
                };
                let ledger = p.ledger.lock();
                Some(((ledger.charged(), ledger.models.len(), p.index), (p, generation, up)))
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, chosen)| chosen)?;
        process.ledger.lock().reserved += bytes;
        let reservation = Reservation { process: process.clone(), bytes };
        Some((process.clone(), generation, up, reservation))
    }
}

impl Pool {
    /// A V2 inference client on `channel` that takes messages up to `maxMessageBytes`.
    pub(crate) fn inference_client(&self, channel: Channel) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes)
    }
}

/// Bytes promised to a load in progress on a process, given back when the load ends either way.
pub(crate) struct Reservation {
    process: Arc<Process>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut ledger = self.process.ledger.lock();
        ledger.reserved = ledger.reserved.saturating_sub(self.bytes);
    }
}

/// Starts the supervisor of every process; the receivers report each one's first start.
pub(crate) fn spawn_supervisors(pool: &Arc<Pool>) -> Vec<oneshot::Receiver<Result<(), RemoteError>>> {
    pool.processes
        .iter()
        .map(|process| {
            let (first, started) = oneshot::channel();
            let span =
                tracing::info_span!("remote_process", runtime = %pool.config.name, process = process.index);
            let task = match pool.config.endpoint.clone() {
                Some(endpoint) => tokio_util::either::Either::Left(watch_endpoint(
                    pool.clone(),
                    process.clone(),
                    endpoint,
                    first,
                )),
                None => tokio_util::either::Either::Right(supervise(pool.clone(), process.clone(), first)),
            };
            pool.tasks.spawn(task.instrument(span));
            started
        })
        .collect()
}

/// An external server: connected once and marked up when ready. It is not ours to restart; if it
/// restarts on its own, its answers for models it no longer has (NOT_FOUND) report them lost.
async fn watch_endpoint(
    pool: Arc<Pool>,
    process: Arc<Process>,
    endpoint: String,
    first: oneshot::Sender<Result<(), RemoteError>>,
) {
    let result = async {
        let channel = channel(&pool.config, &endpoint)?;
        let deadline = Instant::now() + pool.config.timeouts.startup;
        while !probe_ready(&channel).await {
            if Instant::now() >= deadline {
                return Err(RemoteError::NotReady {
                    runtime: pool.config.name.clone(),
                    process: process.index,
                    timeout: pool.config.timeouts.startup,
                });
            }
            tokio::time::sleep(READY_PROBE_INTERVAL).await;
        }
        process.state.send_modify(|s| {
            s.generation += 1;
            s.up = Some(Up { pid: None, endpoint: endpoint.clone(), channel });
        });
        pool.changed.notify_waiters();
        tracing::info!(%endpoint, "remote server ready");
        Ok(())
    }
    .await;
    let _ = first.send(result);
}

/// Runs one process for as long as the runtime lives: start, wait until it exits, start again.
async fn supervise(pool: Arc<Pool>, process: Arc<Process>, first: oneshot::Sender<Result<(), RemoteError>>) {
    let config = &pool.config;
    let mut first = Some(first);
    let mut backoff = config.restart_backoff;
    loop {
        let started = Instant::now();
        let exit = match run_once(&pool, &process, &mut first).await {
            Ok(Some(exit)) => exit,
            Ok(None) => break,
            Err(error) => {
                if let Some(first) = first.take() {
                    // The first start failing is a configuration problem: `RemoteRuntime::start` reports
                    // it and gives up rather than retrying a command that cannot work.
                    let _ = first.send(Err(error));
                    break;
                }
                tracing::warn!(%error, "remote process failed to start");
                format!("failed to start: {error}")
            }
        };
        process.state.send_modify(|s| {
            s.up = None;
            s.last_exit = Some(exit);
        });
        process.ledger.lock().models.clear();
        pool.changed.notify_waiters();
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = config.restart_backoff;
        }
        tracing::info!(?backoff, "restarting remote process");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = pool.cancel.cancelled() => break,
        }
        metrics::counter!(metric_names::RESTARTS, "runtime" => config.name.clone()).increment(1);
        backoff = (backoff * 2).min(config.max_restart_backoff);
    }
    process.state.send_modify(|s| s.up = None);
    pool.changed.notify_waiters();
}

/// One generation of the process: `Ok(Some(how it exited))`, `Ok(None)` when the runtime shut it down,
/// `Err` when it never became ready.
async fn run_once(
    pool: &Arc<Pool>,
    process: &Arc<Process>,
    first: &mut Option<oneshot::Sender<Result<(), RemoteError>>>,
) -> Result<Option<String>, RemoteError> {
    let config = &pool.config;
    let runtime = &config.name;
    let mut generation = 0;
    process.state.send_modify(|s| {
        s.generation += 1;
        s.up = None;
        generation = s.generation;
    });
    // Models of the last generation died with it; their settings would only confuse a server that
    // scans its repository.
    reset_dir(&process.repository)?;
    let [grpc_port, http_port, metrics_port] = free_ports()?;
    let subs = Substitutions {
        grpc_port,
        http_port,
        metrics_port,
        repository: process.repository.clone(),
        max_message_bytes: config.max_message_bytes,
    };
    let mut child = spawn(pool, &subs).await?;
    let pid = child.id();
    tracing::info!(generation, pid, grpc_port, "started remote process");
    let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL_LINES)));
    let mut forwarders = Vec::new();
    if let Some(out) = child.stdout.take() {
        forwarders.push(pool.tasks.spawn(forward_output(out, log.clone()).in_current_span()));
    }
    if let Some(err) = child.stderr.take() {
        forwarders.push(pool.tasks.spawn(forward_output(err, log.clone()).in_current_span()));
    }
    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    let channel = channel(config, &endpoint)?;

    let ready = async {
        while !probe_ready(&channel).await {
            tokio::time::sleep(READY_PROBE_INTERVAL).await;
        }
    };
    tokio::select! {
        () = ready => {}
        status = child.wait() => {
            if let Some(pid) = pid {
                spawner::kill_group(pid);
            }
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            // Its last words may still be in the pipes; they close when the process (and any child
            // holding them) is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), futures_join(forwarders)).await;
            let log = log.lock().iter().cloned().collect::<Vec<_>>().join("\n");
            return Err(RemoteError::ExitedEarly { runtime: runtime.clone(), process: process.index, status, log });
        }
        () = tokio::time::sleep(config.timeouts.startup) => {
            stop(&mut child).await;
            return Err(RemoteError::NotReady { runtime: runtime.clone(), process: process.index, timeout: config.timeouts.startup });
        }
        () = pool.cancel.cancelled() => {
            stop(&mut child).await;
            return Ok(None);
        }
    }
    process.state.send_modify(|s| {
        s.up = Some(Up { pid, endpoint: endpoint.clone(), channel: channel.clone() });
        s.last_exit = None;
    });
    pool.changed.notify_waiters();
    tracing::info!(generation, pid, %endpoint, "remote process ready");
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    }

    tokio::select! {
        status = child.wait() => {
            // Workers it forked may outlive it; they go with its group.
            if let Some(pid) = pid {
                spawner::kill_group(pid);
            }
            let exit = match status {
                Ok(status) => format!("(pid {}) exited: {status}", pid.unwrap_or_default()),
                Err(e) => format!("(pid {}) could not be waited for: {e}", pid.unwrap_or_default()),
            };
            let tail: Vec<String> = log.lock().iter().rev().take(5).rev().cloned().collect();
            tracing::warn!(generation, %exit, last_output = %tail.join("\n"), "remote process exited");
            Ok(Some(exit))
        }
        hung = until_hung(pool, process, &channel) => {
            let exit = format!("(pid {}) {hung}; killed it", pid.unwrap_or_default());
            tracing::warn!(generation, %exit, "remote process hung");
            stop(&mut child).await;
            Ok(Some(exit))
        }
        () = pool.cancel.cancelled() => {
            stop(&mut child).await;
            Ok(None)
        }
    }
}

/// Probes a ready process's liveness until it fails `liveness.failures` probes in a row, then says
/// how. Never returns while the process answers.
///
/// A probe that fails while the process loads or unloads a model is not counted: MLServer with no
/// parallel workers answers nothing while it imports a framework and reads a model, and a load has a
/// deadline of its own (`timeouts.load`) that catches a server hung in it.
async fn until_hung(pool: &Pool, process: &Process, channel: &Channel) -> String {
    let liveness = &pool.config.liveness;
    let mut ticks = tokio::time::interval_at(Instant::now() + liveness.interval, liveness.interval);
    // A probe that ran late (the runtime's one thread was busy) is not followed by a burst of them.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = 0;
    loop {
        ticks.tick().await;
        let Err(why) = probe_live(channel, liveness.timeout).await else {
            failed = 0;
            continue;
        };
        if process.repository_lock.try_lock().is_err() {
            tracing::debug!(%why, "liveness probe failed during a load; not counted");
            continue;
        }
        failed += 1;
        metrics::counter!(metric_names::PROBE_FAILURES, "runtime" => pool.config.name.clone()).increment(1);
        tracing::warn!(failed, of = liveness.failures, %why, "remote process failed its liveness probe");
        if failed >= liveness.failures {
            return format!("failed {failed} liveness probes in a row ({why})");
        }
    }
}

/// One V2 ServerLive call with a deadline: `Err` says why it failed.
async fn probe_live(channel: &Channel, timeout: Duration) -> Result<(), String> {
    let mut client = GrpcInferenceServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(ServerLiveRequest {});
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.server_live(request)).await {
        Err(_) => Err(format!("ServerLive did not answer within {timeout:?}")),
        Ok(Err(status)) => Err(format!("ServerLive failed: {} ({:?})", status.message(), status.code())),
        Ok(Ok(answer)) if !answer.get_ref().live => Err("ServerLive answered live: false".to_owned()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Starts one server process from the config's command with this generation's substitutions.
async fn spawn(pool: &Pool, subs: &Substitutions) -> Result<Child, RemoteError> {
    let config = &pool.config;
    // `validate` refused an empty command, and `start` validates before anything spawns.
    let argv = config.command.as_deref().unwrap_or_default();
    let program = argv.first().map(|p| subs.apply(p)).unwrap_or_default();
    let mut command = Command::new(&program);
    command
        .args(argv.iter().skip(1).map(|a| subs.apply(a)))
        .envs(config.env.iter().map(|(k, v)| (k, subs.apply(v))));
    pool.spawner.spawn(command).await.map_err(|source| RemoteError::Spawn {
        runtime: config.name.clone(),
        program,
        source,
    })
}

/// Kills a process and reaps it. SIGKILL rather than a polite SIGTERM: the server holds nothing that
/// is not reloaded from disk, and the pool never waits on a process that ignores signals.
async fn stop(child: &mut Child) {
    // The whole group, while the server is not reaped yet and its group id cannot name another's.
    if let Some(pid) = child.id() {
        spawner::kill_group(pid);
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Whether the server answers ServerReady with `ready: true` within a second.
async fn probe_ready(channel: &Channel) -> bool {
    let mut client = GrpcInferenceServiceClient::new(channel.clone());
    let probe = client.server_ready(ServerReadyRequest {});
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Ok(r)) if r.get_ref().ready)
}

fn channel(config: &RemoteRuntimeConfig, endpoint: &str) -> Result<Channel, RemoteError> {
    let invalid = |source| RemoteError::Endpoint {
        runtime: config.name.clone(),
        endpoint: endpoint.to_owned(),
        source,
    };
    // `host:port` as a ServingRuntime or an operator writes it means plain gRPC over TCP.
    let uri = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    let endpoint = Endpoint::from_shared(uri).map_err(invalid)?;
    Ok(endpoint.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true).connect_lazy())
}

/// Three distinct free loopback ports. The listeners are held until all three are picked, so they
/// differ; another program could still take one before the server binds it, which the server's start
/// failing and the pool's restart (on new ports) absorbs.
fn free_ports() -> Result<[u16; 3], RemoteError> {
    let bind = || {
        TcpListener::bind("127.0.0.1:0").and_then(|l| Ok((l.local_addr()?.port(), l))).map_err(|source| {
            RemoteError::Repository {
                what: "cannot bind a loopback port",
                path: PathBuf::from("127.0.0.1:0"),
                source,
            }
        })
    };
    let (a, _la) = bind()?;
    let (b, _lb) = bind()?;
    let (c, _lc) = bind()?;
    Ok([a, b, c])
}

/// Empties (or creates) a process's repository directory.
pub(crate) fn reset_dir(dir: &std::path::Path) -> Result<(), RemoteError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(RemoteError::Repository {
                what: "cannot empty the repository",
                path: dir.into(),
                source,
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| RemoteError::Repository {
        what: "cannot create the repository",
        path: dir.into(),
        source,
    })
}

/// Sends a process's output to the log (at debug: a server logs every load) and keeps its last lines.
async fn forward_output(stream: impl AsyncRead + Unpin, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(target: "densemesh_runtime_remote::server", "{line}");
        let mut tail = tail.lock();
        if tail.len() == LOG_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// Waits for every task in `tasks`.
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}
