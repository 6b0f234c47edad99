//! The disk tier: pulled objects under a byte budget, least recently used evicted first.
//!
//! Layout under the cache dir: `entries/<digest>/manifest.json` plus `entries/<digest>/data/…` (the
//! object, or a directory model's files), and `tmp/` for downloads in progress and entries being
//! deleted. An entry is written whole under `tmp/`, then renamed into `entries/`, so an entry that
//! exists is complete; `tmp/` is emptied at start-up, which is how a half-written download left by a
//! crash disappears. The index is rebuilt from the manifests, their modification times giving the LRU
//! order (touched on every use).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::metric_names as m;
use crate::{Error, Result};

const MANIFEST: &str = "manifest.json";
const DATA: &str = "data";

/// What an entry holds; written last, inside the entry, before it is published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub uri: String,
    /// The model file, relative to the data dir.
    pub main: PathBuf,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ManifestFile {
    pub name: PathBuf,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
}

impl Manifest {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

struct Meta {
    uri: String,
    main: PathBuf,
    bytes: u64,
    files: usize,
    last_used: u64,
    pins: usize,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Meta>,
    /// The newest entry of each URI: what is served when the store cannot be reached.
    by_uri: HashMap<String, String>,
    used: u64,
    reserved: u64,
    tick: u64,
}

impl State {
    /// Takes a published entry into the index as just used; a no-op when it is there already (two
    /// processes sharing the dir published the same entry).
    fn index(&mut self, digest: &str, manifest: Manifest) {
        if self.entries.contains_key(digest) {
            return;
        }
        self.tick += 1;
        self.used += manifest.bytes();
        self.by_uri.insert(manifest.uri.clone(), digest.to_owned());
        let meta = Meta {
            bytes: manifest.bytes(),
            files: manifest.files.len(),
            uri: manifest.uri,
            main: manifest.main,
            last_used: self.tick,
            pins: 0,
        };
        self.entries.insert(digest.to_owned(), meta);
    }
}

struct Inner {
    root: PathBuf,
    capacity: u64,
    state: Mutex<State>,
}

/// The disk cache; cheap to clone.
#[derive(Clone)]
pub(crate) struct DiskCache {
    inner: Arc<Inner>,
}

/// A use of one entry: while held, the entry is not evicted.
pub(crate) struct Pin {
    inner: Arc<Inner>,
    digest: String,
    /// The model file.
    pub main: PathBuf,
    pub bytes: u64,
    /// One file, so the runtime can take its bytes; a directory model is loaded by path.
    pub single_file: bool,
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(meta) = self.inner.state.lock().entries.get_mut(&self.digest) {
            meta.pins -= 1;
        }
    }
}

/// Bytes set aside for a download; returned on drop unless published.
pub(crate) struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({} bytes)", self.bytes)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut state = self.inner.state.lock();
            state.reserved -= self.bytes;
            self.inner.publish_gauges(&state);
        }
    }
}

impl DiskCache {
    /// Opens (creating) the cache dir and rebuilds the index from it. Blocking.
    pub fn open(root: &Path, capacity: u64) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let (entries_dir, tmp) = (root.join("entries"), root.join("tmp"));
        std::fs::create_dir_all(&entries_dir).map_err(io(&entries_dir))?;
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        // Half-written downloads and half-deleted entries from before a crash; not the downloads of
        // another live process that shares the dir (scratch names carry the pid).
        for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name.split('.').nth(1).and_then(|pid| pid.parse::<u32>().ok());
            let live = owner
                .is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists());
            if !live {
                let path = entry.path();
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }

        let mut found: Vec<(SystemTime, String, Manifest)> = Vec::new();
        for entry in std::fs::read_dir(&entries_dir).map_err(io(&entries_dir))?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            match read_entry(&path) {
                Some((manifest, modified)) => found.push((modified, name, manifest)),
                None => {
                    tracing::warn!(path = %path.display(), "removing an incomplete disk cache entry");
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
        }
        found.sort_by_key(|(modified, ..)| *modified);
        let cache =
            Self { inner: Arc::new(Inner { root: root.to_owned(), capacity, state: Mutex::default() }) };
        let victims = {
            let mut state = cache.inner.state.lock();
            for (_, digest, manifest) in found {
                state.index(&digest, manifest);
            }
            // The budget may have shrunk since the last run.
            let victims = cache.inner.evict_for(&mut state, 0).unwrap_or_default();
            tracing::info!(entries = state.entries.len(), used_bytes = state.used, capacity, root = %root.display(), "disk cache opened");
            cache.inner.publish_gauges(&state);
            victims
        };
        cache.inner.delete(victims);
        metrics::gauge!(m::DISK_CACHE_CAPACITY_BYTES).set(capacity as f64);
        Ok(cache)
    }

    /// A pinned entry, touched as just used; `None` when absent (or deleted under us by another
    /// process sharing the dir, in which case it is forgotten).
    pub fn lookup(&self, digest: &str) -> Option<Pin> {
        let dir = self.inner.entry_dir(digest);
        let mut state = self.inner.state.lock();
        state.tick += 1;
        let tick = state.tick;
        let meta = state.entries.get_mut(digest)?;
        let main = dir.join(DATA).join(&meta.main);
        if !main.exists() {
            let bytes = meta.bytes;
            state.entries.remove(digest);
            state.used -= bytes;
            self.inner.publish_gauges(&state);
            return None;
        }
        meta.last_used = tick;
        meta.pins += 1;
        let pin = Pin {
            inner: self.inner.clone(),
            digest: digest.to_owned(),
            main,
            bytes: meta.bytes,
            single_file: meta.files == 1,
        };
        drop(state);
        touch(&dir.join(MANIFEST));
        Some(pin)
    }

    /// The newest entry pulled from `uri`, whatever its version: used only when the store is unreachable.
    pub fn lookup_uri(&self, uri: &str) -> Option<Pin> {
        let digest = self.inner.state.lock().by_uri.get(uri).cloned()?;
        self.lookup(&digest)
    }

    /// An entry another process published into the same dir, taken into the index. Blocking (reads
    /// the manifest).
    pub fn adopt(&self, digest: &str) -> Option<Pin> {
        let (manifest, _) = read_entry(&self.inner.entry_dir(digest))?;
        {
            let mut state = self.inner.state.lock();
            state.index(digest, manifest);
            self.inner.publish_gauges(&state);
        }
        self.lookup(digest)
    }

    /// Sets aside `bytes` for a download of `uri`, evicting unpinned entries, least recently used
    /// first. Fails at once when they cannot be freed: waiting could deadlock on the pins of loads
    /// that wait for this very download.
    pub fn reserve(&self, uri: &str, bytes: u64) -> Result<Reservation> {
        let victims = {
            let mut state = self.inner.state.lock();
            let victims = self.inner.evict_for(&mut state, bytes).ok_or_else(|| {
                let pinned: u64 = state.entries.values().filter(|m| m.pins > 0).map(|m| m.bytes).sum();
                Error::DiskFull {
                    uri: uri.to_owned(),
                    needed: bytes,
                    free: self.inner.capacity.saturating_sub(pinned + state.reserved),
                    capacity: self.inner.capacity,
                }
            })?;
            state.reserved += bytes;
            self.inner.publish_gauges(&state);
            victims
        };
        self.inner.delete(victims);
        Ok(Reservation { inner: self.inner.clone(), bytes })
    }

    /// A fresh directory under `tmp/` for one download.
    pub fn scratch(&self, digest: &str) -> PathBuf {
        self.inner.root.join("tmp").join(format!("{digest}.{}.{:08x}", std::process::id(), fastrand::u32(..)))
    }

    pub fn data_dir(scratch: &Path) -> PathBuf {
        scratch.join(DATA)
    }

    /// Publishes a finished download (its files under `data_dir(scratch)`): manifest, then rename.
    /// Blocking. When another process published the same entry first, theirs is kept.
    pub fn publish(
        &self,
        mut reservation: Reservation,
        digest: &str,
        scratch: &Path,
        manifest: Manifest,
    ) -> Result<Pin> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let manifest_path = scratch.join(MANIFEST);
        let body = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::Io { path: manifest_path.clone(), source: std::io::Error::other(e) })?;
        write_synced(&manifest_path, &body).map_err(io(&manifest_path))?;
        let target = self.inner.entry_dir(digest);
        match std::fs::rename(scratch, &target) {
            Ok(()) => sync_dir(&self.inner.root.join("entries")),
            // Already there (another process sharing the dir, or a crash after the rename): keep it.
            Err(_) if target.join(MANIFEST).exists() => {
                let _ = std::fs::remove_dir_all(scratch);
            }
            Err(source) => return Err(Error::Io { path: target, source }),
        }
        {
            let mut state = self.inner.state.lock();
            state.reserved -= std::mem::take(&mut reservation.bytes);
            state.index(digest, manifest);
            self.inner.publish_gauges(&state);
        }
        self.lookup(digest).ok_or_else(|| Error::Io {
            path: target,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "entry vanished right after publishing",
            ),
        })
    }

    #[cfg(test)]
    pub fn used_bytes(&self) -> u64 {
        self.inner.state.lock().used
    }

    /// Bytes in use (published entries and downloads in progress, as the used-bytes gauge counts
    /// them) and the budget.
    pub fn usage(&self) -> (u64, u64) {
        let state = self.inner.state.lock();
        (state.used + state.reserved, self.inner.capacity)
    }

    #[cfg(test)]
    pub fn digests(&self) -> Vec<String> {
        let mut all: Vec<String> = self.inner.state.lock().entries.keys().cloned().collect();
        all.sort();
        all
    }
}

impl Inner {
    fn entry_dir(&self, digest: &str) -> PathBuf {
        self.root.join("entries").join(digest)
    }

    /// Picks victims so that `bytes` more fit, and takes them out of the index; `None` when even
    /// evicting every unpinned entry would not make room (nothing is taken out then).
    fn evict_for(&self, state: &mut State, bytes: u64) -> Option<Vec<PathBuf>> {
        let fits = |used: u64| used + state.reserved + bytes <= self.capacity;
        if fits(state.used) {
            return Some(Vec::new());
        }
        let mut candidates: Vec<(&String, &Meta)> =
            state.entries.iter().filter(|(_, m)| m.pins == 0).collect();
        candidates.sort_by_key(|(_, m)| m.last_used);
        let mut used = state.used;
        let mut chosen = Vec::new();
        for (digest, meta) in candidates {
            if fits(used) {
                break;
            }
            used -= meta.bytes;
            chosen.push(digest.clone());
        }
        if !fits(used) {
            return None;
        }
        let mut dirs = Vec::with_capacity(chosen.len());
        for digest in chosen {
            if let Some(meta) = state.entries.remove(&digest) {
                state.used -= meta.bytes;
                if state.by_uri.get(&meta.uri) == Some(&digest) {
                    state.by_uri.remove(&meta.uri);
                }
                tracing::info!(uri = %meta.uri, bytes = meta.bytes, "evicted from the disk cache");
                metrics::counter!(m::DISK_CACHE_EVICTIONS).increment(1);
                dirs.push(self.entry_dir(&digest));
            }
        }
        Some(dirs)
    }

    /// Deletes evicted entries: renamed into `tmp/` first, so a crash mid-delete leaves nothing that
    /// looks like an entry.
    fn delete(&self, dirs: Vec<PathBuf>) {
        for dir in dirs {
            let trash = self.root.join("tmp").join(format!("evicted-{:016x}", fastrand::u64(..)));
            let doomed = if std::fs::rename(&dir, &trash).is_ok() { trash } else { dir };
            if let Err(e) = std::fs::remove_dir_all(&doomed)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %doomed.display(), error = %e, "cannot delete an evicted disk cache entry");
            }
        }
    }

    fn publish_gauges(&self, state: &State) {
        metrics::gauge!(m::DISK_CACHE_USED_BYTES).set((state.used + state.reserved) as f64);
    }
}

/// A complete entry's manifest and its last use, or `None` when the entry is incomplete or damaged
/// (a file missing or of the wrong size).
fn read_entry(dir: &Path) -> Option<(Manifest, SystemTime)> {
    let manifest_path = dir.join(MANIFEST);
    let meta = std::fs::metadata(&manifest_path).ok()?;
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(&manifest_path).ok()?).ok()?;
    let data = dir.join(DATA);
    for file in &manifest.files {
        if !is_relative_inside(&file.name)
            || std::fs::metadata(data.join(&file.name)).ok()?.len() != file.size
        {
            return None;
        }
    }
    is_relative_inside(&manifest.main).then_some(())?;
    Some((manifest, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
}

/// True when joining `path` to a directory stays inside it.
pub(crate) fn is_relative_inside(path: &Path) -> bool {
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

fn write_synced(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(body)?;
    file.sync_all()
}

/// Makes a rename durable; best effort (not every filesystem supports syncing a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cache: &DiskCache, digest: &str, uri: &str, bytes: usize) -> Result<Pin> {
        let reservation = cache.reserve(uri, bytes as u64)?;
        let scratch = cache.scratch(digest);
        let data = DiskCache::data_dir(&scratch);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("model.onnx"), vec![7u8; bytes]).unwrap();
        let manifest = Manifest {
            uri: uri.to_owned(),
            main: "model.onnx".into(),
            files: vec![ManifestFile { name: "model.onnx".into(), size: bytes as u64, e_tag: None }],
        };
        cache.publish(reservation, digest, &scratch, manifest)
    }

    #[test]
    fn evicts_least_recently_used_unpinned_entries_to_fit_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 300).unwrap();
        drop(put(&cache, "a", "s3://b/a", 100).unwrap());
        drop(put(&cache, "b", "s3://b/b", 100).unwrap());
        let held = put(&cache, "c", "s3://b/c", 100).unwrap();
        drop(cache.lookup("a").unwrap()); // a is now more recent than b
        drop(put(&cache, "d", "s3://b/d", 100).unwrap());
        assert_eq!(cache.digests(), ["a", "c", "d"], "b was the least recently used");
        assert!(!dir.path().join("entries/b").exists());
        // c is pinned: making room for 250 would need it, so the reservation fails and evicts nothing.
        let error = cache.reserve("s3://b/e", 250).unwrap_err().to_string();
        assert!(error.contains("disk cache full") && error.contains("s3://b/e"), "{error}");
        assert_eq!(cache.digests(), ["a", "c", "d"]);
        drop(held);
        cache.reserve("s3://b/e", 250).unwrap();
        assert_eq!(cache.used_bytes(), 0, "everything unpinned was evicted for the 250-byte download");
    }

    #[test]
    fn a_restart_rebuilds_the_index_and_drops_half_written_downloads() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = DiskCache::open(dir.path(), 1000).unwrap();
            drop(put(&cache, "old", "s3://b/old", 10).unwrap());
            drop(put(&cache, "new", "s3://b/new", 20).unwrap());
            // A crash mid-download leaves a scratch dir; a crash mid-publish a manifest-less entry.
            std::fs::create_dir_all(DiskCache::data_dir(&cache.scratch("x"))).unwrap();
            // Another live process's download in a shared dir (pid 1 always runs) is left alone.
            std::fs::create_dir_all(dir.path().join("tmp/y.1.0000abcd/data")).unwrap();
            std::fs::create_dir_all(dir.path().join("entries/torn/data")).unwrap();
            // A truncated file in a published entry (disk trouble) is not served either.
            std::fs::create_dir_all(dir.path().join("entries/cut/data")).unwrap();
            std::fs::write(dir.path().join("entries/cut/data/model.onnx"), b"abc").unwrap();
            let manifest =
                r#"{"uri":"s3://b/cut","main":"model.onnx","files":[{"name":"model.onnx","size":10}]}"#;
            std::fs::write(dir.path().join("entries/cut/manifest.json"), manifest).unwrap();
        }
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        assert_eq!(cache.digests(), ["new", "old"]);
        assert_eq!(cache.used_bytes(), 30);
        let left: Vec<_> =
            std::fs::read_dir(dir.path().join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["y.1.0000abcd"]);
        assert!(!dir.path().join("entries/torn").exists() && !dir.path().join("entries/cut").exists());
        assert_eq!(std::fs::read(&cache.lookup_uri("s3://b/new").unwrap().main).unwrap(), vec![7u8; 20]);
        // A smaller budget after the restart evicts the least recently used.
        drop(cache);
        let cache = DiskCache::open(dir.path(), 25).unwrap();
        assert_eq!(cache.digests(), ["new"]);
    }

    #[test]
    fn manifests_cannot_point_outside_the_entry() {
        assert!(is_relative_inside(Path::new("a/b.onnx")));
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(!is_relative_inside(Path::new(bad)), "{bad}");
        }
    }
}
