//! [`RemoteRuntime`]: the pool behind the runtime seam, with its own tokio runtime, started by
//! [`RemoteRuntime::start`] and stopped by [`RemoteRuntime::shutdown`] or drop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use densemesh_runtime_core::{CallSlots, Error, LoadRequest, LoadedModel, Result, Runtime};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::bridge::Bridge;
use crate::pool::{self, Ledger, Pool, Process};
use crate::spawner::Spawner;
use crate::{RemoteError, RemoteRuntimeConfig, model};

/// How long shutdown waits for the processes to be killed and reaped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A pool of KServe V2 servers behind the [`Runtime`] seam.
pub struct RemoteRuntime {
    /// The configured name, leaked once per runtime because [`Runtime::name`] returns `&'static str`;
    /// a process creates its runtimes once, at start-up.
    name: &'static str,
    pool: Arc<Pool>,
    bridge: Bridge,
    tokio: Option<tokio::runtime::Runtime>,
}

/// One process of the pool as it is now, for logs, the admin API and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its index in the pool.
    pub index: usize,
    /// Its operating-system process id while it runs (none for an `endpoint`).
    pub pid: Option<u32>,
    /// Its gRPC address while it is up.
    pub endpoint: Option<String>,
    /// How many times it was started (1 for the first start).
    pub generation: u64,
    /// Models loaded into it.
    pub models: usize,
    /// Bytes charged for them, loads in progress included.
    pub charged_bytes: u64,
    /// Its own model repository.
    pub repository: PathBuf,
    /// How its last generation ended, if one did.
    pub last_exit: Option<String>,
}

impl RemoteRuntime {
    /// Starts every process of the pool (or connects to the `endpoint`) and returns once all of them
    /// answer ServerReady; fails if one cannot start or is not ready within `timeouts.startup`, since a
    /// runtime that cannot start is an operator's problem to see at once. Blocks the calling thread
    /// (call it before the mesh's executor starts, or from a blocking thread).
    pub fn start(config: RemoteRuntimeConfig) -> Result<Self> {
        let unavailable = |e: RemoteError| Error::RuntimeUnavailable(e.into());
        config.validate().map_err(unavailable)?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            // Only I/O runs here: RPCs and process supervision. Inference runs in the servers.
            .worker_threads(1)
            .thread_name(format!("remote-{}", config.name))
            .enable_all()
            .build()
            .map_err(|source| {
                unavailable(RemoteError::Repository {
                    what: "cannot start the tokio runtime for",
                    path: config.name.clone().into(),
                    source,
                })
            })?;
        let (root, owned_root) = match &config.repository {
            Some(repository) => (repository.clone(), None),
            None => {
                // Unique per runtime, so two runtimes of one name in a process never share processes'
                // directories.
                let owned = tempfile::Builder::new()
                    .prefix(&format!("densemesh-{}-", config.name))
                    .tempdir()
                    .map_err(|source| {
                        unavailable(RemoteError::Repository {
                            what: "cannot create a repository in",
                            path: std::env::temp_dir(),
                            source,
                        })
                    })?;
                (owned.path().to_owned(), Some(owned))
            }
        };
        let processes = (0..config.processes)
            .map(|index| {
                // An endpoint's repository is the server's own; a pool gives each process a directory.
                let repository = match config.endpoint {
                    Some(_) => root.clone(),
                    None => root.join(format!("{}-{index}", config.name)),
                };
                Arc::new(Process {
                    index,
                    repository,
                    state: watch::channel(Default::default()).0,
                    slots: CallSlots::new(
                        format!("runtime {} process {index}", config.name),
                        config.concurrency,
                        config.max_queued,
                        config.timeouts.infer,
                    ),
                    repository_lock: tokio::sync::Mutex::new(()),
                    ledger: Mutex::new(Ledger::default()),
                })
            })
            .collect();
        let spawner = Spawner::start(&config.name, tokio.handle().clone()).map_err(|source| {
            unavailable(RemoteError::Repository {
                what: "cannot start the spawning thread for",
                path: config.name.clone().into(),
                source,
            })
        })?;
        let name: &'static str = Box::leak(config.name.clone().into_boxed_str());
        let tasks = TaskTracker::new();
        let pool = Arc::new(Pool {
            config,
            processes,
            changed: Notify::new(),
            cancel: CancellationToken::new(),
            tasks: tasks.clone(),
            owned_root: Mutex::new(owned_root),
            spawner,
        });
        let bridge = Bridge { handle: tokio.handle().clone(), runtime: name.to_owned(), tasks };
        let runtime = Self { name, pool: pool.clone(), bridge, tokio: Some(tokio) };
        let span = tracing::info_span!("remote_start", runtime = name);
        let started = runtime
            .bridge
            .run(
                async move {
                    let mut result = Ok(());
                    for started in pool::spawn_supervisors(&pool) {
                        let outcome = started.await.unwrap_or_else(|_| {
                            Err(RemoteError::ShutDown { runtime: pool.config.name.clone() })
                        });
                        if result.is_ok() {
                            result = outcome;
                        }
                    }
                    result
                }
                .instrument(span),
            )
            .and_then(|started| started);
        if let Err(error) = started {
            runtime.shutdown();
            return Err(unavailable(error));
        }
        tracing::info!(runtime = name, processes = runtime.pool.processes.len(), "remote runtime ready");
        Ok(runtime)
    }

    /// Kills the pool's processes and waits (a few seconds at most) until they are reaped; models still
    /// held answer `Error::Lost` afterwards. Idempotent; drop calls it too.
    pub fn shutdown(&self) {
        if self.pool.cancel.is_cancelled() {
            return;
        }
        self.pool.cancel.cancel();
        let tasks = self.pool.tasks.clone();
        let _ = self.bridge.run(async move {
            tasks.close();
            if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
                tracing::warn!("remote runtime tasks still running after {SHUTDOWN_GRACE:?}; leaving them");
            }
        });
        // An endpoint is not ours to stop, but this runtime no longer serves through it either.
        for process in &self.pool.processes {
            process.state.send_modify(|s| s.up = None);
            process.slots.close();
        }
        if let Some(root) = self.pool.owned_root.lock().take() {
            let path = root.path().to_owned();
            if let Err(error) = root.close() {
                tracing::warn!(%error, root = %path.display(), "cannot remove the remote runtime's repository");
            }
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &RemoteRuntimeConfig {
        &self.pool.config
    }

    /// Whether it serves models of `model_type`.
    pub fn serves(&self, model_type: &str) -> bool {
        self.pool.config.serves(model_type)
    }

    /// Every process of the pool as it is now.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        self.pool
            .processes
            .iter()
            .map(|p| {
                let state = p.state.borrow().clone();
                let ledger = p.ledger.lock();
                ProcessInfo {
                    index: p.index,
                    pid: state.up.as_ref().and_then(|up| up.pid),
                    endpoint: state.up.as_ref().map(|up| up.endpoint.clone()),
                    generation: state.generation,
                    models: ledger.models.len(),
                    charged_bytes: ledger.charged(),
                    repository: p.repository.clone(),
                    last_exit: state.last_exit,
                }
            })
            .collect()
    }
}

impl Runtime for RemoteRuntime {
    fn name(&self) -> &'static str {
        self.name
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        let span = tracing::info_span!(
            "remote_load",
            runtime = self.name,
            model_id = %request.model_id,
            model_type = %request.model_type,
            process = tracing::field::Empty,
        );
        let prepared = span.in_scope(|| model::prepare(&self.pool.config, request))?;
        let work = model::load(self.pool.clone(), self.bridge.clone(), prepared).instrument(span);
        match self.bridge.run(work) {
            Ok(loaded) => Ok(Box::new(loaded?)),
            Err(error) => Err(error.into_load_error(&request.model_id)),
        }
    }
}

impl Drop for RemoteRuntime {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(tokio) = self.tokio.take() {
            // Never blocks, so dropping the runtime is safe from any thread, async ones included.
            tokio.shutdown_background();
        }
    }
}
