//! The model repository directory as a registration source: its models are registered at start
//! (source `repository`) and kept in step as files appear, change or vanish. A model registered
//! through the API is never touched, even when a directory of the same name appears or goes.
//!
//! In a cluster the repository is one shared source seen by every pod, often the same volume mounted
//! at different paths, copied at different times. So what a pass writes must depend on what the
//! models *are*, never on where or when this pod sees them; otherwise two pods rewrite each other's
//! registrations forever and every rewrite unloads the model everywhere. A repository-sourced
//! [`ModelSpec`] therefore holds:
//! - `path`: `repo:<model-id>`, the model's directory relative to the repository root. Each pod turns
//!   it into its own local path under its own `--model-repo` with [`resolve_repository_path`]. Specs
//!   written by earlier versions hold an absolute path; they still resolve when the path lies under
//!   the root, and the next pass rewrites them once to the relative form (reported as `migrated`).
//! - `generation`: a function of content alone, the first 8 bytes of a SHA-256 over the size and
//!   SHA-256 of each file [`LocalRepository::resolve`] points at. Hashing reads the whole file, so a
//!   digest is remembered per (path, size, mtime) and an unchanged file is read once per process.
//!
//! A pass that cannot read the repository root fails and changes nothing; a model whose files cannot
//! be read this time keeps its registration as it is. Only a model whose directory is really gone is
//! unregistered.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use densemesh_placement::registry::{Registry, RegistryError};
use densemesh_placement::{ClusterView, ModelId, ModelSpec, Source};
use densemesh_puller::LocalRepository;
use notify::{RecursiveMode, Watcher};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What one pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Newly registered models.
    pub registered: Vec<ModelId>,
    /// Models whose content changed.
    pub updated: Vec<ModelId>,
    /// Specs of an earlier version (an absolute path) rewritten to the relative form.
    pub migrated: Vec<ModelId>,
    /// Models whose directory is gone.
    pub unregistered: Vec<ModelId>,
}

/// How a repository-sourced spec's `path` starts: `repo:<model-id>`.
pub const REPOSITORY_PATH_PREFIX: &str = "repo:";

/// Files change in bursts (a copy, an unpack); one pass after they settle.
const SETTLE: Duration = Duration::from_millis(300);

/// A spec path that does not name a place inside the model repository.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model path {path:?} does not lie inside the model repository {}: {reason}", root.display())]
pub struct RepositoryPathError {
    /// The spec's path as registered.
    pub path: String,
    /// This pod's repository root (`--model-repo`).
    pub root: PathBuf,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Where a repository-sourced spec's `path` lies under this pod's repository `root`.
///
/// Accepts `repo:<relative path>` (what [`sync_once`] writes), joined to `root`, and, for specs
/// written by earlier versions, an absolute path lying under `root` (or under `root` with symlinks
/// resolved, which is how those versions wrote it), re-rooted at `root`. Refuses everything else: a
/// relative part that is empty or has `..`, `.`, or a root; an absolute path elsewhere; a bare
/// relative path; a URI. The check is on the text only: existence is the loader's business, and
/// symlinks inside the repository are the operator's to place. Pure for `repo:` paths; for an
/// absolute path not lexically under `root` it canonicalizes `root` (a few `stat` calls).
pub fn resolve_repository_path(root: &Path, spec_path: &str) -> Result<PathBuf, RepositoryPathError> {
    let refuse = |reason| RepositoryPathError { path: spec_path.to_owned(), root: root.to_owned(), reason };
    if let Some(relative) = spec_path.strip_prefix(REPOSITORY_PATH_PREFIX) {
        let relative = Path::new(relative);
        return if is_plain_relative(relative) {
            Ok(root.join(relative))
        } else {
            Err(refuse("the part after repo: must be a relative path without `.` or `..`"))
        };
    }
    let absolute = Path::new(spec_path);
    if !absolute.is_absolute() {
        return Err(refuse("expected repo:<model-id>, or an absolute path under the repository"));
    }
    let rest = match absolute.strip_prefix(root) {
        Ok(rest) => rest.to_owned(),
        Err(_) => std::fs::canonicalize(root)
            .ok()
            .and_then(|canonical| absolute.strip_prefix(canonical).ok().map(Path::to_owned))
            .ok_or_else(|| refuse("the absolute path is not under the repository"))?,
    };
    if is_plain_relative(&rest) {
        Ok(root.join(rest))
    } else {
        Err(refuse("the absolute path leaves the repository or names its root"))
    }
}

/// Non-empty, and only names: no `..`, `.`, root or prefix that could leave the directory.
fn is_plain_relative(path: &Path) -> bool {
    path.components().next().is_some() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// The spec path [`sync_once`] registers for a model: `repo:<model-id>`.
pub fn repository_spec_path(id: &ModelId) -> String {
    format!("{REPOSITORY_PATH_PREFIX}{id}")
}

/// One pass: the registry's repository-sourced models made to match the directory.
///
/// Two pods passing over copies of the same repository write the same specs, whatever their paths
/// and mtimes: after the first, the others change nothing.
pub async fn sync_once(
    registry: &Registry,
    view: &ClusterView,
    root: &Path,
) -> Result<SyncReport, RegistryError> {
    Ok(sync_pass(registry, view, root).await?.0)
}

/// [`sync_once`], also returning how many entries the repository's root holds (models or not), which
/// decides how [`watch`] watches it.
async fn sync_pass(
    registry: &Registry,
    view: &ClusterView,
    root: &Path,
) -> Result<(SyncReport, usize), RegistryError> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let scan_root = root.clone();
    let found = tokio::task::spawn_blocking(move || scan(&scan_root))
        .await
        .map_err(|e| RegistryError::Invalid(format!("repository scan failed: {e}")))?
        .map_err(|e| RegistryError::Invalid(format!("cannot read the model repository: {e}")))?;
    // Specs are compared with the view, not read from the store one by one: a million reads would
    // each copy and decode a record. The view is first brought up to the store's present, and every
    // write is a compare-and-swap at the revision the view showed, so a stale view loses a race (the
    // model is left for the next pass) and never overwrites anything.
    view.caught_up(registry.revision().await?).await;
    let mut report = SyncReport::default();
    for (id, generation, format) in &found.models {
        let spec = &repository_spec(id, *generation, format);
        // One model the registry refuses is that model's problem, not the repository's: the rest sync.
        let replace = |revision| async move {
            match registry.replace(id, spec, revision).await {
                Err(e @ (RegistryError::Invalid(_) | RegistryError::UnsupportedType(_))) => {
                    tracing::warn!(model_id = %id, error = %e, "cannot register a repository model; skipping it");
                    Ok(false)
                }
                other => other,
            }
        };
        match view.model_with_revision(id) {
            None => {
                if replace(0).await? {
                    report.registered.push(id.clone());
                }
            }
            Some((existing, revision)) if existing.source == Source::Repository && existing != *spec => {
                if replace(revision).await? {
                    if existing.path.starts_with(REPOSITORY_PATH_PREFIX) {
                        report.updated.push(id.clone());
                    } else {
                        report.migrated.push(id.clone());
                    }
                }
            }
            Some(_) => {}
        }
    }
    // Both lists are sorted by id (see [`scan`]).
    let present = |id: &ModelId| {
        found.models.binary_search_by(|(m, _, _)| m.cmp(id)).is_ok()
            || found.unreadable.binary_search(id).is_ok()
    };
    let gone = view.model_ids_where(|id, spec| spec.source == Source::Repository && !present(id));
    for id in gone {
        let Some((current, revision)) = registry.model(&id).await? else { continue };
        // Re-checked at its revision: the API may have taken the id over meanwhile.
        if current.source == Source::Repository
            && registry.store().compare_and_delete(&model_key(registry, &id), revision).await?.succeeded
        {
            report.unregistered.push(id);
        }
    }
    if let Ok(revision) = registry.revision().await {
        view.caught_up(revision).await;
    }
    Ok((report, found.entries))
}

/// The spec a repository model is registered with: nothing in it depends on this pod.
fn repository_spec(id: &ModelId, generation: u64, format: &str) -> ModelSpec {
    ModelSpec {
        model_type: format.to_owned(),
        path: repository_spec_path(id),
        key: None,
        source: Source::Repository,
        auto_delete: false,
        generation,
        size_bytes: None,
        min_copies: None,
        runtime: None,
        gpu: None,
    }
}

fn model_key(registry: &Registry, id: &ModelId) -> String {
    format!("{}{id}", registry.models_prefix())
}

/// What a scan found.
#[derive(Debug, Default)]
struct Scan {
    /// Models with the generation of their content and the format their main file's name implies,
    /// sorted by id.
    models: Vec<(ModelId, u64, String)>,
    /// Models there but unreadable this time, sorted: left as registered, neither written nor removed.
    unreadable: Vec<ModelId>,
    /// Entries in the root, models or not.
    entries: usize,
}

/// Models in the directory, each with a generation of its content; blocking.
///
/// The entries are looked at on a few threads at once: each costs a few system calls, which wait on
/// the disk when its metadata is not cached, and a million of them one after another take minutes.
fn scan(root: &Path) -> densemesh_puller::Result<Scan> {
    let repository = LocalRepository::new(root);
    let candidates = repository.candidates()?;
    // This root's digests of the last pass; what this pass keeps replaces them, so the files no
    // longer here are forgotten. Other repositories' are left alone.
    let remembered = DIGESTS.lock().remove(root).unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() * 2).clamp(2, 8);
    let chunk = candidates.len().div_ceil(threads).max(1);
    let parts: Vec<(Scan, Vec<Digested>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = candidates
            .chunks(chunk)
            .map(|ids| scope.spawn(|| scan_part(&repository, ids, &remembered)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    // Chunks of the sorted candidates, in order: the lists stay sorted.
    let mut found = Scan { entries: candidates.len(), ..Scan::default() };
    let mut kept = Vec::new();
    for (part, digests) in parts {
        found.models.extend(part.models);
        found.unreadable.extend(part.unreadable);
        kept.extend(digests);
    }
    DIGESTS.lock().insert(root.to_owned(), Digests::from(kept));
    Ok(found)
}

/// [`scan`] over some of the candidates; also the digests to remember.
fn scan_part(repository: &LocalRepository, ids: &[ModelId], remembered: &Digests) -> (Scan, Vec<Digested>) {
    let mut found = Scan::default();
    let mut digests = FileDigests::new(remembered);
    for id in ids {
        let (files, format) = match repository.resolve(id) {
            // A file whose name implies no format (a stamp, a README, an editor's swap file) is not a
            // model: registering it would only fail, and a failed registration must not stop the sync.
            Ok(local) if local.format.is_empty() => {
                if !id.as_str().starts_with('.') {
                    tracing::debug!(entry = %id, "skipping a repository entry whose name implies no model format");
                }
                continue;
            }
            Ok(local) => (vec![local.path], local.format),
            Err(densemesh_puller::Error::NotFound { .. }) => continue,
            Err(e) => {
                tracing::warn!(model_id = %id, error = %e, "cannot read a repository model; leaving its registration as it is");
                found.unreadable.push(id.clone());
                continue;
            }
        };
        match digests.generation(&files) {
            Ok(generation) => found.models.push((id.clone(), generation, format)),
            // Removed between the lookup and the read: gone.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(model_id = %id, error = %e, "cannot read a repository model; leaving its registration as it is");
                found.unreadable.push(id.clone());
            }
        }
    }
    (found, digests.kept)
}

/// A file's digest as last read, valid while its size and mtime are unchanged. 72 bytes: one is
/// kept per model file, and a repository may hold a million.
#[derive(Debug, Clone, Copy)]
struct Digested {
    /// [`path_key`] of the file.
    path: PathKey,
    bytes: u64,
    modified: SystemTime,
    digest: [u8; 32],
}

/// A file path as the first 16 bytes of its SHA-256: a quarter of what a `PathBuf` and its
/// allocation take, and no two paths of a repository share one.
type PathKey = [u8; 16];

fn path_key(path: &Path) -> PathKey {
    let mut key = PathKey::default();
    key.copy_from_slice(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..16]);
    key
}

/// One repository's remembered digests, sorted by path key: a sorted vector takes a third of what
/// a hash map of the same entries takes.
#[derive(Debug, Default)]
struct Digests(Vec<Digested>);

impl From<Vec<Digested>> for Digests {
    fn from(mut all: Vec<Digested>) -> Self {
        all.sort_unstable_by_key(|d| d.path);
        all.shrink_to_fit();
        Self(all)
    }
}

impl Digests {
    fn get(&self, path: &PathKey) -> Option<&Digested> {
        self.0.binary_search_by_key(path, |d| d.path).ok().map(|i| &self.0[i])
    }
}

/// Digests by repository root, so a pass reads only files that changed since the last one.
static DIGESTS: LazyLock<Mutex<HashMap<PathBuf, Digests>>> = LazyLock::new(Default::default);

/// A file modified this shortly before it was read may be written again within the same mtime tick
/// (coarse on some filesystems) without its stamp changing, so its digest is not remembered.
const RACY: Duration = Duration::from_secs(2);

/// Reads files' digests for one pass: from the last pass's when a file's size and mtime are those
/// seen then, else from the file.
struct FileDigests<'a> {
    remembered: &'a Digests,
    /// Digests to remember for the next pass: those of the files this pass looked at.
    kept: Vec<Digested>,
    /// One read buffer for the pass, not one per file.
    buffer: Vec<u8>,
}

impl<'a> FileDigests<'a> {
    fn new(remembered: &'a Digests) -> Self {
        Self { remembered, kept: Vec::new(), buffer: Vec::new() }
    }

    /// A model's generation: a digest of its files' sizes and contents, in order; blocking.
    fn generation(&mut self, files: &[PathBuf]) -> std::io::Result<u64> {
        let mut hasher = Sha256::new();
        for file in files {
            let (bytes, digest) = self.file_digest(file)?;
            hasher.update(bytes.to_le_bytes());
            hasher.update(digest);
        }
        let mut first = [0u8; 8];
        first.copy_from_slice(&hasher.finalize()[..8]);
        Ok(u64::from_be_bytes(first))
    }

    /// A file's size and SHA-256, remembered when its size and mtime are those last seen; blocking.
    fn file_digest(&mut self, path: &Path) -> std::io::Result<(u64, [u8; 32])> {
        let before = std::fs::metadata(path)?;
        let modified = before.modified()?;
        let key = path_key(path);
        if let Some(known) =
            self.remembered.get(&key).filter(|d| d.bytes == before.len() && d.modified == modified)
        {
            self.kept.push(*known);
            return Ok((known.bytes, known.digest));
        }
        let started = SystemTime::now();
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        if self.buffer.is_empty() {
            self.buffer = vec![0u8; 256 << 10];
        }
        let mut bytes = 0u64;
        loop {
            let n = match file.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&self.buffer[..n]);
            bytes += n as u64;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let after = file.metadata()?;
        // Remembered only if nothing moved while it was read and it has been still for a while.
        let settled = bytes == before.len()
            && after.len() == before.len()
            && after.modified().ok() == Some(modified)
            && started.duration_since(modified).is_ok_and(|still| still >= RACY);
        if settled {
            self.kept.push(Digested { path: key, bytes, modified, digest });
        }
        Ok((bytes, digest))
    }
}

/// How [`watch`] watches a repository, by its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    /// Above this many entries in its root, the repository is watched at the root alone. A
    /// recursive watch takes one inotify watch per directory, and the kernel allows a user a few
    /// hundred thousand (`fs.inotify.max_user_watches`, 8,192 on older kernels) for all their
    /// processes together: a million model directories cannot each have one.
    pub recursive_max_entries: usize,
    /// Watched at the root alone, the repository is also passed over this often: a change inside a
    /// model's directory (a new version, a file rewritten in place) raises no event at the root.
    /// Never more often than [`RESCAN_IDLE_RATIO`] times the last pass took, so that passes over a
    /// huge repository on a slow disk do not run back to back.
    pub rescan_every: Duration,
    /// And once this soon after a pass that an event at the root started, to catch the files of a
    /// directory that was still being copied into then.
    pub follow_up: Duration,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            recursive_max_entries: 10_000,
            rescan_every: Duration::from_secs(60),
            follow_up: Duration::from_secs(5),
        }
    }
}

/// Between two periodic passes the watcher waits at least this many times as long as the last pass
/// took: at most a tenth of a core goes to rescanning.
pub const RESCAN_IDLE_RATIO: u32 = 9;

/// The wait before the next periodic pass, after one that took `last_pass`.
fn rescan_wait(limits: &WatchLimits, last_pass: Duration) -> Duration {
    limits.rescan_every.max(last_pass.saturating_mul(RESCAN_IDLE_RATIO))
}

/// How the repository is being watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchMode {
    /// Every directory in it, one kernel watch each: any change raises an event.
    Recursive,
    /// Its root only, one kernel watch, plus a pass every [`WatchLimits::rescan_every`].
    RootAndRescan,
}

/// The mode for a root of `entries` entries, watched in mode `now`. A repository watched at its root
/// goes back to a recursive watch only below half the limit, so one near the limit does not switch
/// on every pass.
fn watch_mode(limits: &WatchLimits, entries: usize, now: WatchMode) -> WatchMode {
    let limit = match now {
        WatchMode::Recursive => limits.recursive_max_entries,
        WatchMode::RootAndRescan => limits.recursive_max_entries / 2,
    };
    if entries > limit { WatchMode::RootAndRescan } else { WatchMode::Recursive }
}

/// Whether an event may mean the repository changed. Reads never do: a pass opens every model
/// directory, and the kernel reports each open to the root's watch, so passes that counted them
/// started the next pass themselves, forever (over 100,000 models, half the CPU during traffic); a
/// model's load reads its directory too.
fn may_change(kind: &notify::EventKind) -> bool {
    !matches!(kind, notify::EventKind::Access(_))
}

/// A watcher on `root` in `mode`, sending a unit per event; a recursive watch the kernel refuses (too
/// many watches) falls back to the root alone, with the mode it got.
fn start_watcher(
    root: &Path,
    mode: WatchMode,
    events: &mpsc::UnboundedSender<()>,
) -> notify::Result<(notify::RecommendedWatcher, WatchMode)> {
    let open = |recursive| {
        let tx = events.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| may_change(&e.kind)) {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(root, recursive)?;
        Ok::<_, notify::Error>(watcher)
    };
    if mode == WatchMode::Recursive {
        match open(RecursiveMode::Recursive) {
            Ok(watcher) => return Ok((watcher, WatchMode::Recursive)),
            Err(e) => {
                tracing::warn!(repository = %root.display(), error = %e, "cannot watch every directory of the model repository; watching its root and passing over it periodically");
            }
        }
    }
    // The failed watcher is dropped: its descriptor, with every watch it had added, is closed.
    Ok((open(RecursiveMode::NonRecursive)?, WatchMode::RootAndRescan))
}

/// Keeps the registry in step with the directory until `stop`.
pub async fn watch(registry: Registry, view: ClusterView, root: PathBuf, stop: CancellationToken) {
    watch_with(registry, view, root, WatchLimits::default(), stop).await
}

/// [`watch`] with other limits.
pub async fn watch_with(
    registry: Registry,
    view: ClusterView,
    root: PathBuf,
    limits: WatchLimits,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let counted = root.clone();
    let entries =
        tokio::task::spawn_blocking(move || LocalRepository::new(counted).candidates().map(|c| c.len()))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
    let mut mode = watch_mode(&limits, entries, WatchMode::Recursive);
    let mut watcher = match start_watcher(&root, mode, &tx) {
        Ok((watcher, got)) => {
            mode = got;
            watcher
        }
        Err(e) => {
            tracing::warn!(repository = %root.display(), error = %e, "cannot watch the model repository; changes need a restart");
            return;
        }
    };
    tracing::info!(repository = %root.display(), entries, ?mode, "watching the model repository");
    catch_up_after_start(mode, &tx);
    let mut follow_up = false;
    let mut last_pass = Duration::ZERO;
    loop {
        let next_pass = async {
            match (mode, follow_up) {
                (WatchMode::Recursive, _) => std::future::pending().await,
                (WatchMode::RootAndRescan, true) => tokio::time::sleep(limits.follow_up).await,
                (WatchMode::RootAndRescan, false) => {
                    tokio::time::sleep(rescan_wait(&limits, last_pass)).await
                }
            }
        };
        let event = tokio::select! {
            event = rx.recv() => if event.is_none() { return } else { true },
            _ = next_pass => false,
            _ = stop.cancelled() => return,
        };
        if event {
            // Let the burst settle, then drain what queued meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = stop.cancelled() => return,
            }
        }
        while rx.try_recv().is_ok() {}
        follow_up = event && mode == WatchMode::RootAndRescan;
        let started = tokio::time::Instant::now();
        let pass = sync_pass(&registry, &view, &root).await;
        last_pass = started.elapsed();
        match pass {
            Ok((report, entries)) => {
                if report != SyncReport::default() {
                    tracing::info!(?report, "model repository changed");
                }
                let next = watch_mode(&limits, entries, mode);
                if next != mode {
                    drop(watcher);
                    match start_watcher(&root, next, &tx) {
                        Ok((started, got)) => (watcher, mode) = (started, got),
                        Err(e) => {
                            tracing::warn!(repository = %root.display(), error = %e, "cannot watch the model repository; changes need a restart");
                            return;
                        }
                    }
                    tracing::info!(repository = %root.display(), entries, ?mode, "watching the model repository another way");
                    catch_up_after_start(mode, &tx);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot sync the model repository"),
        }
    }
}

/// A directory made between the last pass and the watch's start raised no event, and a recursive watch
/// has no periodic pass to find it: one pass right after the watch starts does (a new leader's models
/// were otherwise missed until a restart, one time in five in the leader test). Watched at the root,
/// the periodic passes find it.
fn catch_up_after_start(mode: WatchMode, events: &mpsc::UnboundedSender<()>) {
    if mode == WatchMode::Recursive {
        let _ = events.send(());
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use densemesh_placement::store::{MemoryStore, Store};

    use super::*;

    /// One pod: its own registry handle and view on the shared store.
    struct Pod {
        registry: Registry,
        view: ClusterView,
    }

    async fn pod(store: &Arc<dyn Store>) -> Pod {
        let registry = Registry::new(store.clone(), "t");
        let view = ClusterView::start(registry.clone()).await.unwrap();
        Pod { registry, view }
    }

    impl Pod {
        async fn sync(&self, root: &Path) -> SyncReport {
            sync_once(&self.registry, &self.view, root).await.unwrap()
        }

        /// Every registered model with its spec and revision.
        async fn registrations(&self) -> Vec<(ModelId, ModelSpec, densemesh_placement::store::Revision)> {
            let mut all = Vec::new();
            for (id, _) in self.view.models() {
                if let Some((spec, revision)) = self.registry.model(&id).await.unwrap() {
                    all.push((id, spec, revision));
                }
            }
            all
        }
    }

    fn id(name: &str) -> ModelId {
        ModelId::new(name).unwrap()
    }

    fn ids(names: &[&str]) -> Vec<ModelId> {
        names.iter().map(|n| id(n)).collect()
    }

    /// Writes a file with `content`, stamped `age` in the past.
    fn write(path: &Path, content: &[u8], age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        set_age(path, age);
    }

    fn set_age(path: &Path, age: Duration) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    /// A flat model `a` and a versioned model `b` (version 3 wins), every file stamped `age` ago.
    fn repository(root: &Path, age: Duration) {
        write(&root.join("a/model.onnx"), b"model a", age);
        write(&root.join("b/1/model.onnx"), b"model b, old version", age);
        write(&root.join("b/3/model.onnx"), b"model b", age);
    }

    #[tokio::test]
    async fn stray_files_in_the_repository_are_skipped_and_the_models_still_sync() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        repository(root, Duration::ZERO);
        // A benchmark's stamp, a README, an editor's swap file: none implies a model format.
        for stray in [".complete", "README", "notes.md", ".a.swp"] {
            write(&root.join(stray), b"not a model", Duration::ZERO);
        }
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let pod = pod(&store).await;
        assert_eq!(pod.sync(root).await.registered, ids(&["a", "b"]));
        assert_eq!(pod.sync(root).await, SyncReport::default());
    }

    #[tokio::test]
    async fn copies_at_other_paths_and_times_write_the_registry_once() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (root_one, root_two) = (one.path().join("mounted/here"), two.path().join("there"));
        repository(&root_one, Duration::from_secs(3600));
        repository(&root_two, Duration::from_secs(60));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let (pod_one, pod_two) = (pod(&store).await, pod(&store).await);

        let first = pod_one.sync(&root_one).await;
        assert_eq!(first.registered, ids(&["a", "b"]));
        let written = pod_one.registrations().await;
        for (id, spec, _) in &written {
            assert_eq!(spec.path, format!("repo:{id}"));
        }
        for _ in 0..2 {
            assert_eq!(pod_two.sync(&root_two).await, SyncReport::default());
            assert_eq!(pod_one.sync(&root_one).await, SyncReport::default());
        }
        assert_eq!(pod_two.registrations().await, written, "no rewrite: same specs at the same revisions");

        // A real change: one update, seen alike by the pod whose copy catches up later.
        write(&root_two.join("a/model.onnx"), b"model A", Duration::ZERO);
        let changed = pod_two.sync(&root_two).await;
        assert_eq!(changed, SyncReport { updated: ids(&["a"]), ..SyncReport::default() });
        write(&root_one.join("a/model.onnx"), b"model A", Duration::from_secs(10));
        assert_eq!(pod_one.sync(&root_one).await, SyncReport::default());
        let after = pod_one.registrations().await;
        assert_ne!(after[0].1.generation, written[0].1.generation);
        assert_ne!(after[0].2, written[0].2);
        assert_eq!(after[1], written[1], "b untouched");
    }

    #[tokio::test]
    async fn a_model_deleted_from_the_directory_is_unregistered() {
        let dir = tempfile::tempdir().unwrap();
        repository(dir.path(), Duration::from_secs(60));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let pod = pod(&store).await;
        pod.sync(dir.path()).await;

        std::fs::remove_dir_all(dir.path().join("b")).unwrap();
        let report = pod.sync(dir.path()).await;
        assert_eq!(report, SyncReport { unregistered: ids(&["b"]), ..SyncReport::default() });
        assert_eq!(pod.registry.model(&id("b")).await.unwrap(), None);
        assert!(pod.registry.model(&id("a")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_unreadable_repository_unregisters_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        repository(&root, Duration::from_secs(60));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let pod = pod(&store).await;
        pod.sync(&root).await;
        let before = pod.registrations().await;

        // An unmounted volume looks like a missing directory: not an empty repository.
        std::fs::remove_dir_all(&root).unwrap();
        let err = sync_once(&pod.registry, &pod.view, &root).await.unwrap_err();
        assert!(err.to_string().contains("cannot read the model repository"), "{err}");
        assert_eq!(pod.registrations().await, before);
    }

    #[tokio::test]
    async fn an_api_registered_model_of_the_same_name_is_never_touched() {
        let dir = tempfile::tempdir().unwrap();
        repository(dir.path(), Duration::from_secs(60));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let pod = pod(&store).await;
        let api = ModelSpec {
            source: Source::Api,
            path: "/elsewhere/a".to_owned(),
            ..repository_spec(&id("a"), 0, "onnx")
        };
        let registered = pod.registry.register(&id("a"), &api).await.unwrap();

        assert_eq!(pod.sync(dir.path()).await.registered, ids(&["b"]));
        std::fs::remove_dir_all(dir.path().join("a")).unwrap();
        assert_eq!(pod.sync(dir.path()).await, SyncReport::default());
        assert_eq!(pod.registry.model(&id("a")).await.unwrap(), Some((api, registered.revision)));
    }

    #[tokio::test]
    async fn a_spec_of_the_previous_version_is_rewritten_once() {
        let dir = tempfile::tempdir().unwrap();
        repository(dir.path(), Duration::from_secs(60));
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let pod = pod(&store).await;
        let legacy_path = root.join("a").to_string_lossy().into_owned();
        let legacy = ModelSpec { path: legacy_path.clone(), ..repository_spec(&id("a"), 12345, "onnx") };
        pod.registry.replace(&id("a"), &legacy, 0).await.unwrap();
        assert_eq!(resolve_repository_path(dir.path(), &legacy_path).unwrap(), dir.path().join("a"));

        let report = pod.sync(dir.path()).await;
        assert_eq!(report.migrated, ids(&["a"]));
        assert_eq!(report.updated, Vec::<ModelId>::new());
        assert_eq!(pod.registry.model(&id("a")).await.unwrap().unwrap().0.path, "repo:a");
        assert_eq!(pod.sync(dir.path()).await, SyncReport::default());
    }

    #[test]
    fn repository_paths_resolve_inside_the_root_only() {
        let root = Path::new("/srv/models");
        for (path, resolved) in [
            ("repo:a", "/srv/models/a"),
            ("repo:a/3/model.onnx", "/srv/models/a/3/model.onnx"),
            ("repo:a:b.c-d", "/srv/models/a:b.c-d"),
            ("/srv/models/a", "/srv/models/a"),
            ("/srv/models/a/1/model.onnx", "/srv/models/a/1/model.onnx"),
        ] {
            assert_eq!(resolve_repository_path(root, path), Ok(PathBuf::from(resolved)), "{path}");
        }
        for path in [
            "repo:",
            "repo:..",
            "repo:../x",
            "repo:a/../../x",
            "repo:./a",
            "repo:/etc/passwd",
            "/etc/passwd",
            "/srv/models",
            "/srv/models/",
            "/srv/models/../x",
            "/srv/models/a/../../x",
            "/srv/models-other/a",
            "a",
            "models/a",
            "s3://bucket/a",
            "",
        ] {
            let err = resolve_repository_path(root, path).unwrap_err();
            assert_eq!((err.path.as_str(), err.root.as_path()), (path, root));
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_previous_version_path_resolves_through_a_symlinked_root() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let written = std::fs::canonicalize(&real).unwrap().join("a");
        let resolved = resolve_repository_path(&link, written.to_str().unwrap()).unwrap();
        assert_eq!(resolved, link.join("a"));
    }

    /// A pass over `files` alone with what `remembered` holds, then what the next pass remembers
    /// (these files' digests added to the others').
    fn digest_pass(remembered: &mut Digests, files: &[PathBuf]) -> u64 {
        let mut digests = FileDigests::new(remembered);
        let generation = digests.generation(files).unwrap();
        let keys: Vec<PathKey> = digests.kept.iter().map(|d| d.path).collect();
        let mut all = std::mem::take(&mut digests.kept);
        all.extend(remembered.0.iter().filter(|d| !keys.contains(&d.path)));
        *remembered = Digests::from(all);
        generation
    }

    #[test]
    fn generation_follows_content_and_skips_unchanged_files() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one/model.onnx"), dir.path().join("two/model.onnx"));
        write(&one, b"weights", Duration::from_secs(3600));
        write(&two, b"weights", Duration::from_secs(7200));
        let remembered = &mut Digests::default();
        let generation = digest_pass(remembered, std::slice::from_ref(&one));
        assert_eq!(digest_pass(remembered, std::slice::from_ref(&two)), generation);

        // Same size and mtime: remembered, not read again (proved by changing the bytes underneath).
        let stamp = std::fs::metadata(&one).unwrap().modified().unwrap();
        std::fs::write(&one, b"WEIGHTS").unwrap();
        std::fs::File::options().write(true).open(&one).unwrap().set_modified(stamp).unwrap();
        assert_eq!(digest_pass(remembered, std::slice::from_ref(&one)), generation);
        // A new mtime: read again.
        set_age(&one, Duration::from_secs(60));
        assert_ne!(digest_pass(remembered, std::slice::from_ref(&one)), generation);

        // A file modified just now is not remembered: a rewrite within its mtime tick is still seen.
        let fresh = dir.path().join("fresh/model.onnx");
        write(&fresh, b"weights", Duration::ZERO);
        assert_eq!(digest_pass(remembered, std::slice::from_ref(&fresh)), generation);
        let stamp = std::fs::metadata(&fresh).unwrap().modified().unwrap();
        std::fs::write(&fresh, b"WEIGHTS").unwrap();
        std::fs::File::options().write(true).open(&fresh).unwrap().set_modified(stamp).unwrap();
        assert_ne!(digest_pass(remembered, std::slice::from_ref(&fresh)), generation);
    }

    #[test]
    fn a_pass_remembers_only_the_files_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for name in ["a", "b", "c"] {
            write(&root.join(name).join("model.onnx"), name.as_bytes(), Duration::from_secs(60));
        }
        scan(&root).unwrap();
        assert_eq!(DIGESTS.lock().get(&root).map(|d| d.0.len()), Some(3));
        std::fs::remove_dir_all(root.join("b")).unwrap();
        let found = scan(&root).unwrap();
        assert_eq!(found.models.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>(), ids(&["a", "c"]));
        assert_eq!(found.entries, 2);
        let kept = DIGESTS.lock().get(&root).map(|d| d.0.iter().map(|d| d.path).collect::<Vec<_>>());
        let mut expected = vec![path_key(&root.join("a/model.onnx")), path_key(&root.join("c/model.onnx"))];
        expected.sort();
        assert_eq!(kept, Some(expected));
    }

    #[test]
    fn a_large_repository_is_watched_at_its_root() {
        let limits = WatchLimits { recursive_max_entries: 100, ..WatchLimits::default() };
        for (entries, now, expected) in [
            (0, WatchMode::Recursive, WatchMode::Recursive),
            (100, WatchMode::Recursive, WatchMode::Recursive),
            (101, WatchMode::Recursive, WatchMode::RootAndRescan),
            (1_000_000, WatchMode::Recursive, WatchMode::RootAndRescan),
            // Back to recursive only well below the limit.
            (100, WatchMode::RootAndRescan, WatchMode::RootAndRescan),
            (51, WatchMode::RootAndRescan, WatchMode::RootAndRescan),
            (50, WatchMode::RootAndRescan, WatchMode::Recursive),
        ] {
            assert_eq!(watch_mode(&limits, entries, now), expected, "{entries} entries, watched {now:?}");
        }
    }

    #[test]
    fn periodic_passes_leave_the_cpu_idle_nine_tenths_of_the_time() {
        let limits = WatchLimits { rescan_every: Duration::from_secs(60), ..WatchLimits::default() };
        assert_eq!(rescan_wait(&limits, Duration::ZERO), Duration::from_secs(60));
        assert_eq!(rescan_wait(&limits, Duration::from_secs(6)), Duration::from_secs(60));
        assert_eq!(rescan_wait(&limits, Duration::from_secs(20)), Duration::from_secs(180));
        assert_eq!(rescan_wait(&limits, Duration::MAX), Duration::MAX);
    }

    /// Waits up to 20 s for `done`, checking every 50 ms.
    async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_repository_watched_at_its_root_still_follows_every_kind_of_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        repository(&root, Duration::from_secs(60));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let pod = pod(&store).await;
        pod.sync(&root).await;
        // Two entries are over this limit: only the root is watched.
        let limits = WatchLimits {
            recursive_max_entries: 1,
            rescan_every: Duration::from_millis(500),
            follow_up: Duration::from_millis(200),
        };
        let stop = CancellationToken::new();
        let watching = tokio::spawn(watch_with(
            pod.registry.clone(),
            pod.view.clone(),
            root.clone(),
            limits,
            stop.clone(),
        ));

        // A new directory, filled after the event at the root: the follow-up pass finds its file.
        std::fs::create_dir(root.join("c")).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        write(&root.join("c/model.onnx"), b"model c", Duration::from_secs(60));
        eventually("c to be registered", async || pod.view.model(&id("c")).is_some()).await;

        // A file rewritten in place deep in a version directory: no event at the root, the rescan sees it.
        let before = pod.view.model(&id("b")).unwrap().generation;
        write(&root.join("b/3/model.onnx"), b"model b, rewritten", Duration::from_secs(30));
        eventually("b's new files to be seen", async || {
            pod.view.model(&id("b")).is_some_and(|s| s.generation != before)
        })
        .await;

        std::fs::remove_dir_all(root.join("a")).unwrap();
        eventually("a to be unregistered", async || pod.view.model(&id("a")).is_none()).await;
        stop.cancel();
        watching.await.unwrap();
    }

    #[test]
    fn reading_the_repository_is_no_change_to_it() {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
        assert!(!may_change(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!may_change(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(may_change(&EventKind::Create(CreateKind::Folder)));
        assert!(may_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(may_change(&EventKind::Any), "an event notify cannot classify may be a change");
    }
}
