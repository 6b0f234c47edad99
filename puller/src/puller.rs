//! The puller: a model's registered location in, a local file out, through the disk cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use object_store::ObjectStore;
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::disk::{DiskCache, Manifest, ManifestFile, Pin};
use crate::fetch::{self, Object, Policy};
use crate::location::{Location, Remote};
use crate::map::Mapped;
use crate::metric_names as m;
use crate::repository::{LocalModel, resolve_path};
use crate::storage::{self, StorageConfig};
use crate::{Error, Result};

/// Settings of a [`Puller`].
#[derive(Debug, Clone)]
pub struct PullConfig {
    pub cache_dir: PathBuf,
    /// Byte budget of the disk cache.
    pub disk_capacity: u64,
    /// A storage-config secret (a directory of keys) or file; `None` for none.
    pub storage_config: Option<PathBuf>,
    /// Limit on each request, and on silence within a response.
    pub request_timeout: Duration,
    /// Tries per request before the pull fails.
    pub attempts: u32,
    /// Objects of at least twice this size are fetched in ranges of this size.
    pub range_bytes: u64,
    /// Requests in flight for one pull.
    pub parallel: usize,
    /// Larger objects are refused before any download: no such model could ever be loaded (the
    /// mesh sets its memory capacity here).
    pub max_object_bytes: Option<u64>,
    /// A location found unchanged in the store this recently is served from the disk cache without
    /// asking the store again: a burst of models sharing one artifact (per-customer copies of a base
    /// model) costs the store one HEAD, not one each. Zero asks every time.
    pub revalidate_after: Duration,
    /// Local paths are served only from inside these directories (after `..` and symlinks); `None`
    /// serves any path the process can read.
    pub local_roots: Option<Vec<PathBuf>>,
}

impl PullConfig {
    pub fn new(cache_dir: impl Into<PathBuf>, disk_capacity: u64) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            disk_capacity,
            storage_config: None,
            request_timeout: Duration::from_secs(30),
            attempts: 4,
            range_bytes: 16 << 20,
            parallel: 8,
            max_object_bytes: None,
            revalidate_after: Duration::from_secs(10),
            local_roots: None,
        }
    }
}

/// A model's files on local disk, ready to load. Holds the cache entry (if any) until dropped, so it
/// cannot be evicted mid-load.
pub struct Fetched {
    pub model: LocalModel,
    pin: Option<Pin>,
    /// Where the bytes came from: `local`, `disk-cache` or `remote`.
    pub source: &'static str,
}

impl Fetched {
    /// A model used in place (a local path), not through the cache.
    pub fn local(model: LocalModel) -> Self {
        Self { model, pin: None, source: "local" }
    }

    /// The model's bytes, mapped and pre-faulted, when it is a single cached file (a local file may
    /// change under a mapping; a directory model is loaded by path). Blocking.
    pub fn map(&self) -> Result<Option<Mapped>> {
        match &self.pin {
            Some(pin) if pin.single_file && pin.bytes > 0 => Mapped::open(&pin.main)
                .map(Some)
                .map_err(|source| Error::Io { path: pin.main.clone(), source }),
            _ => Ok(None),
        }
    }
}

type Outcome = Option<Result<(), Arc<Error>>>;
/// A storage config and the fingerprint of the files it was read from.
type Loaded = (Arc<StorageConfig>, Option<Vec<(String, u64, SystemTime)>>);
/// Clients are per (backend, storage key, bucket).
type StoreKey = (crate::Backend, Option<String>, String);

/// Pulls models into the disk cache. Share one per process.
pub struct Puller {
    config: PullConfig,
    roots: Option<crate::confine::Roots>,
    policy: Policy,
    cache: DiskCache,
    storage: RwLock<Loaded>,
    /// Built clients by (backend, storage key, bucket); cleared when the storage config changes.
    stores: Mutex<HashMap<StoreKey, Arc<dyn ObjectStore>>>,
    /// When each location was last found in the store, and the cache entry it was found as.
    validated: Mutex<HashMap<String, (Instant, String)>>,
    /// Downloads in progress, by entry digest: a second pull of the same object waits for the first.
    /// An entry is removed only by its download's [`Flight`], however that download ends.
    inflight: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
    /// The download tasks, which outlive the pulls that started them (see [`Puller::shutdown`]).
    downloads: TaskTracker,
    /// Cancels the downloads in progress at shutdown.
    stop: CancellationToken,
}

impl Puller {
    /// Opens the disk cache (rebuilding its index) and reads the storage config. Blocking.
    pub fn open(config: PullConfig) -> Result<Arc<Self>> {
        let cache = DiskCache::open(&config.cache_dir, config.disk_capacity)?;
        let storage = match &config.storage_config {
            Some(path) => (Arc::new(StorageConfig::load(path)?), storage::fingerprint(path)),
            None => (Arc::new(StorageConfig::default()), None),
        };
        let policy = Policy {
            request_timeout: config.request_timeout,
            attempts: config.attempts.max(1),
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            range_bytes: config.range_bytes.max(1 << 20),
            parallel: config.parallel.max(1),
        };
        let roots = config.local_roots.as_deref().map(crate::confine::Roots::new);
        Ok(Arc::new(Self {
            config,
            roots,
            policy,
            cache,
            storage: RwLock::new(storage),
            stores: Mutex::default(),
            validated: Mutex::default(),
            inflight: Mutex::default(),
            downloads: TaskTracker::new(),
            stop: CancellationToken::new(),
        }))
    }

    /// Cancels the downloads in progress and waits for their tasks to end, so none is cut off by the
    /// runtime going away. Their pulls, and any pull started afterwards, fail with
    /// [`Error::Abandoned`]; the disk cache keeps what was published.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.downloads.close();
        self.downloads.wait().await;
    }

    /// Re-reads the storage config if its files changed; `Ok(true)` when it did. On an error the
    /// previous configuration stays in force. Blocking.
    pub fn reload_storage_config(&self) -> Result<bool> {
        let Some(path) = &self.config.storage_config else { return Ok(false) };
        let now = storage::fingerprint(path);
        if now == self.storage.read().1 {
            return Ok(false);
        }
        // Remembered even when broken, so one bad edit is reported once, not on every check.
        let config = match StorageConfig::load(path) {
            Ok(config) => config,
            Err(e) => {
                self.storage.write().1 = now;
                return Err(e);
            }
        };
        let keys: Vec<&str> = config.keys().collect();
        tracing::info!(keys = ?keys, "storage config reloaded");
        *self.storage.write() = (Arc::new(config), now);
        self.stores.lock().clear();
        Ok(true)
    }

    /// Where a registration's path and key point.
    pub fn locate(&self, path: &str, key: Option<&str>) -> Result<Location> {
        crate::location::resolve(path, key, &self.storage.read().0)
    }

    /// Refuses a registration whose location is a local path outside the local roots, before it is
    /// written (the check [`Puller::fetch`] makes again when loading). Other problems of a location
    /// (an unknown storage key, which a secret may yet add) are left to the load to report.
    pub fn check_local(&self, path: &str, key: Option<&str>) -> Result<()> {
        match self.locate(path, key) {
            Ok(Location::Local(local)) => self.confine(&local).map(drop),
            _ => Ok(()),
        }
    }

    /// Where a local path really is, if that is inside the roots.
    fn confine(&self, path: &Path) -> Result<PathBuf> {
        let Some(roots) = &self.roots else { return Ok(path.to_owned()) };
        roots
            .confine(path)
            .ok_or_else(|| Error::OutsideRoots { path: path.display().to_string(), roots: roots.shown() })
    }

    /// Makes a registered model's files local: in place for local paths, else through the cache.
    pub async fn fetch(self: &Arc<Self>, path: &str, key: Option<&str>) -> Result<Fetched> {
        match self.locate(path, key)? {
            Location::Local(path) => {
                let path = self.confine(&path)?;
                // A stat or three of a local path, done here: on the blocking pool the round trip (two
                // thread wake-ups, ~100 µs on a quiet VM) cost far more than the lookup, and it is on
                // the path of every model's first request.
                let model = resolve_path(&path)?
                    .ok_or_else(|| Error::NoModelFile { uri: path.display().to_string() })?;
                Ok(Fetched::local(model))
            }
            Location::Remote(remote) => {
                let span = tracing::info_span!("pull", uri = %remote.uri());
                self.fetch_remote(remote).instrument(span).await
            }
        }
    }

    async fn fetch_remote(self: &Arc<Self>, remote: Remote) -> Result<Fetched> {
        let started = Instant::now();
        let uri = remote.uri();
        if let Some(pin) = self.recently_validated(&uri) {
            metrics::counter!(m::DISK_CACHE_HITS).increment(1);
            return self.fetched(pin, "disk-cache");
        }
        let store = self.store_for(&remote)?;
        let objects = match fetch::list(&store, &remote, &self.policy).await {
            Ok(objects) => objects,
            // The object may be gone or the store down; a copy pulled earlier is still the model that
            // was registered (registrations are immutable: a new version is a new model id).
            Err(e @ (Error::TimedOut { .. } | Error::Remote { .. })) => match self.cache.lookup_uri(&uri) {
                Some(pin) => {
                    tracing::warn!(error = %e, "store unreachable; serving the disk cache's copy");
                    metrics::counter!(m::DISK_CACHE_HITS).increment(1);
                    return self.fetched(pin, "disk-cache");
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        if let Some(limit) = self.config.max_object_bytes.filter(|limit| bytes > *limit) {
            return Err(Error::TooLarge { uri, bytes, limit });
        }
        let digest = identity(&uri, &objects);
        // Bounded: a pull published by another task can be evicted before this one pins it.
        for _ in 0..3 {
            if let Some(pin) = self.cache.lookup(&digest) {
                metrics::counter!(m::DISK_CACHE_HITS).increment(1);
                self.validated(&uri, &digest);
                return self.fetched(pin, "disk-cache");
            }
            let waiting = {
                let mut inflight = self.inflight.lock();
                match inflight.get(&digest) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(digest.clone(), rx.clone());
                        let flight = Flight {
                            puller: self.clone(),
                            digest: digest.clone(),
                            uri: uri.clone(),
                            done: tx,
                            outcome: None,
                        };
                        let (remote, objects, store) = (remote.clone(), objects.clone(), store.clone());
                        let stop = self.stop.clone();
                        self.downloads.spawn(
                            async move {
                                let download =
                                    flight.puller.download(&store, &remote, &objects, &flight.digest);
                                let outcome = tokio::select! {
                                    outcome = download => outcome,
                                    // Dropping the flight unfinished tells its waiters why.
                                    () = stop.cancelled() => return,
                                };
                                if let Err(e) = &outcome {
                                    tracing::warn!(uri = %flight.uri, error = %e, "pull failed");
                                }
                                flight.land(outcome);
                            }
                            .in_current_span(),
                        );
                        metrics::counter!(m::DISK_CACHE_MISSES).increment(1);
                        rx
                    }
                }
            };
            let mut waiting = waiting;
            // A flight always sends an outcome before it drops its sender, so this error is a safety net.
            let outcome = waiting
                .wait_for(Option::is_some)
                .await
                .map_err(|_| Error::Abandoned {
                    uri: uri.clone(),
                    why: "its download ended without an outcome",
                })?
                .clone();
            if let Some(Err(e)) = outcome {
                return Err(Error::Shared(e));
            }
            if let Some(pin) = self.cache.lookup(&digest) {
                metrics::histogram!(m::PULLER_DURATION).record(started.elapsed().as_secs_f64());
                self.validated(&uri, &digest);
                return self.fetched(pin, "remote");
            }
        }
        Err(Error::DiskFull {
            uri,
            needed: objects.iter().map(|o| o.size).sum(),
            free: 0,
            capacity: self.config.disk_capacity,
        })
    }

    /// One pull, start to publish; runs in its own task so a caller giving up does not waste it.
    async fn download(
        &self,
        store: &Arc<dyn ObjectStore>,
        remote: &Remote,
        objects: &[Object],
        digest: &str,
    ) -> Result<()> {
        let uri = remote.uri();
        // Another process sharing the dir may have published it.
        let cache = self.cache.clone();
        let adopt_digest = digest.to_owned();
        if tokio::task::spawn_blocking(move || cache.adopt(&adopt_digest)).await.ok().flatten().is_some() {
            return Ok(());
        }
        let main = main_file(remote, objects)?;
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        // Evicting deletes files: on the blocking pool.
        let (cache, reserving) = (self.cache.clone(), uri.clone());
        let reservation =
            tokio::task::spawn_blocking(move || cache.reserve(&reserving, bytes)).await.map_err(|e| {
                Error::Io { path: self.config.cache_dir.clone(), source: std::io::Error::other(e) }
            })??;
        let scratch = self.cache.scratch(digest);
        let started = Instant::now();
        let result =
            fetch::download_all(store, remote, objects, &DiskCache::data_dir(&scratch), &self.policy).await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            metrics::counter!(m::PULLS, "result" => "failure").increment(1);
            return Err(e);
        }
        let took = started.elapsed();
        metrics::counter!(m::PULLS, "result" => "success").increment(1);
        tracing::info!(
            bytes,
            files = objects.len(),
            took_ms = took.as_millis() as u64,
            mb_per_s = bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9),
            "pulled"
        );
        let manifest = Manifest {
            uri,
            main,
            files: objects
                .iter()
                .map(|o| ManifestFile { name: o.relative.clone(), size: o.size, e_tag: o.e_tag.clone() })
                .collect(),
        };
        let cache = self.cache.clone();
        let digest = digest.to_owned();
        tokio::task::spawn_blocking(move || cache.publish(reservation, &digest, &scratch, manifest).map(drop))
            .await
            .map_err(|e| Error::Io {
                path: self.config.cache_dir.clone(),
                source: std::io::Error::other(e),
            })?
    }

    /// The cache entry of a location found in the store within `revalidate_after`, pinned.
    fn recently_validated(&self, uri: &str) -> Option<Pin> {
        let window = self.config.revalidate_after;
        let digest = {
            let validated = self.validated.lock();
            let (_, digest) = validated.get(uri).filter(|(at, _)| at.elapsed() < window)?;
            digest.clone()
        };
        self.cache.lookup(&digest)
    }

    /// Remembers that `uri` was just found in the store as the cache entry `digest`.
    fn validated(&self, uri: &str, digest: &str) {
        if self.config.revalidate_after.is_zero() {
            return;
        }
        let mut validated = self.validated.lock();
        // Bounded by the locations pulled within one window, however many there were before.
        if validated.len() >= 4096 {
            let window = self.config.revalidate_after;
            validated.retain(|_, (at, _)| at.elapsed() < window);
        }
        validated.insert(uri.to_owned(), (Instant::now(), digest.to_owned()));
    }

    fn fetched(&self, pin: Pin, source: &'static str) -> Result<Fetched> {
        let file_bytes = std::fs::metadata(&pin.main).map(|m| m.len()).unwrap_or(pin.bytes);
        Ok(Fetched { model: LocalModel::new(pin.main.clone(), None, file_bytes), pin: Some(pin), source })
    }

    fn store_for(&self, remote: &Remote) -> Result<Arc<dyn ObjectStore>> {
        let key = (remote.backend, remote.storage_key.clone(), remote.bucket.clone());
        if let Some(store) = self.stores.lock().get(&key) {
            return Ok(store.clone());
        }
        let config = self.storage.read().0.clone();
        let entry = remote.storage_key.as_deref().and_then(|k| config.get(k));
        let store = crate::backend::build(remote, entry, self.config.request_timeout)?;
        self.stores.lock().insert(key, store.clone());
        Ok(store)
    }

    /// The disk cache's bytes in use (downloads in progress included) and its budget.
    pub fn disk_usage(&self) -> (u64, u64) {
        self.cache.usage()
    }

    /// The cache directory, for diagnostics.
    pub fn cache_dir(&self) -> &Path {
        &self.config.cache_dir
    }
}

/// One download's entry in [`Puller::inflight`]. However the download's task ends (an outcome, a panic,
/// a cancellation), dropping this removes the entry and gives its waiters an outcome, so a failed
/// download never leaves its object waiting on a dead channel: the next pull starts a new one.
struct Flight {
    puller: Arc<Puller>,
    digest: String,
    uri: String,
    done: watch::Sender<Outcome>,
    /// Set by [`Flight::land`]; still `None` when dropped means the download never finished.
    outcome: Option<Result<(), Arc<Error>>>,
}

impl Flight {
    /// Ends the flight with the download's outcome.
    fn land(mut self, outcome: Result<()>) {
        self.outcome = Some(outcome.map_err(Arc::new));
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Removed before waiters wake: a waiter that pulls again must not find this finished download.
        // Only this flight removes its entry, and none is inserted while it is there, so it is ours.
        self.puller.inflight.lock().remove(&self.digest);
        let outcome = self.outcome.take().unwrap_or_else(|| {
            let why = if std::thread::panicking() {
                tracing::error!(uri = %self.uri, "download panicked; its pulls fail, the next one starts again");
                "its download panicked (a bug); pulling it again starts a new download"
            } else {
                "the puller is shutting down"
            };
            Err(Arc::new(Error::Abandoned { uri: self.uri.clone(), why }))
        });
        self.done.send_replace(Some(outcome));
    }
}

/// The model file of a pull: the object itself, or in a directory model the first of
/// [`MODEL_FILES`](crate::repository::MODEL_FILES) there (directly, else in the highest numeric version
/// dir), else its only `.onnx` file.
fn main_file(remote: &Remote, objects: &[Object]) -> Result<PathBuf> {
    let no_model = || Error::NoModelFile { uri: remote.uri() };
    if let [only] = objects
        && only.location == remote.path
    {
        return Ok(only.relative.clone());
    }
    let names: Vec<&Path> = objects.iter().map(|o| o.relative.as_path()).collect();
    for (file, _) in crate::repository::MODEL_FILES {
        if names.contains(&Path::new(file)) {
            return Ok(file.into());
        }
    }
    for (file, _) in crate::repository::MODEL_FILES {
        let versioned = names
            .iter()
            .filter_map(|n| {
                let mut parts = n.iter();
                let version: u64 = parts.next()?.to_str()?.parse().ok()?;
                (parts.next()? == *file && parts.next().is_none()).then_some((version, *n))
            })
            .max_by_key(|(v, _)| *v);
        if let Some((_, name)) = versioned {
            return Ok(name.to_owned());
        }
    }
    let onnx: Vec<&&Path> = names.iter().filter(|n| n.extension().is_some_and(|e| e == "onnx")).collect();
    match onnx.as_slice() {
        [only] => Ok(only.to_path_buf()),
        _ => Err(no_model()),
    }
}

/// The cache's key for a pull: its URI and every object's size and version (ETag or version id), so
/// a replaced object is a new entry.
fn identity(uri: &str, objects: &[Object]) -> String {
    let mut h = Sha256::new();
    h.update(uri.as_bytes());
    for o in objects {
        h.update(b"\n");
        h.update(o.relative.to_string_lossy().as_bytes());
        h.update(format!(
            "\t{}\t{}\t{}",
            o.size,
            o.e_tag.as_deref().unwrap_or(""),
            o.version.as_deref().unwrap_or("")
        ));
    }
    fetch::hex(&h.finalize()[..16])
}

#[cfg(test)]
mod tests;
