//! Listing and downloading objects: bounded parallel range requests, per-request timeouts, retries with
//! exponential back-off and jitter that resume where a broken download stopped, and verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use crate::location::Remote;
use crate::metric_names as m;
use crate::storage::Backend;
use crate::{Error, Result};

/// How pulls behave; see `PullConfig` for the user-facing knobs.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// Limit on one request, and on silence within a response body.
    pub request_timeout: Duration,
    pub attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Objects at least twice this size are fetched as ranges of this size, in parallel.
    pub range_bytes: u64,
    pub parallel: usize,
}

/// One object to download, and the file name it gets inside the cache entry.
#[derive(Debug, Clone)]
pub(crate) struct Object {
    pub location: ObjectPath,
    /// Path relative to the entry's data dir; checked to stay inside it.
    pub relative: PathBuf,
    pub size: u64,
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// What a failed attempt means for the next one.
enum Attempt {
    /// Retrying will not help (missing, forbidden).
    Fatal(Error),
    Retry {
        reason: String,
        timed_out: bool,
    },
}

fn classify(e: object_store::Error, uri: &str) -> Attempt {
    match e {
        object_store::Error::NotFound { .. } => Attempt::Fatal(Error::NoSuchKey { uri: uri.to_owned() }),
        object_store::Error::PermissionDenied { source, .. }
        | object_store::Error::Unauthenticated { source, .. } => {
            Attempt::Fatal(Error::AccessDenied { uri: uri.to_owned(), reason: source.to_string() })
        }
        other => {
            let timed_out = is_timeout(&other);
            Attempt::Retry { reason: other.to_string(), timed_out }
        }
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>()
            && http.kind() == object_store::client::HttpErrorKind::Timeout
        {
            return true;
        }
        next = e.source();
    }
    false
}

impl Policy {
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base_backoff.saturating_mul(1 << attempt.min(16)).min(self.max_backoff);
        // Jitter: pods retrying a shared store after an outage should not come back in step.
        exp.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// Counts failed attempts of one operation and decides whether to go again.
struct Retries<'a> {
    policy: &'a Policy,
    uri: &'a str,
    failed: u32,
}

impl<'a> Retries<'a> {
    fn new(policy: &'a Policy, uri: &'a str) -> Self {
        Self { policy, uri, failed: 0 }
    }

    /// After a failed attempt: sleeps the back-off and returns `Ok` to go again, or the final error.
    async fn failed(&mut self, attempt: Attempt) -> Result<()> {
        let (reason, timed_out) = match attempt {
            Attempt::Fatal(e) => return Err(e),
            Attempt::Retry { reason, timed_out } => (reason, timed_out),
        };
        self.failed += 1;
        let (uri, attempts) = (self.uri, self.policy.attempts);
        tracing::warn!(%uri, attempt = self.failed, of = attempts, %reason, "pull attempt failed");
        if self.failed >= attempts {
            return Err(if timed_out {
                Error::TimedOut { uri: uri.to_owned(), timeout: self.policy.request_timeout, attempts }
            } else {
                Error::Remote { uri: uri.to_owned(), attempts, reason }
            });
        }
        metrics::counter!(m::PULLER_RETRIES).increment(1);
        tokio::time::sleep(self.policy.backoff(self.failed - 1)).await;
        Ok(())
    }
}

/// What a location names: one object (HEAD), else every object under it as a directory (LIST).
pub(crate) async fn list(
    store: &Arc<dyn ObjectStore>,
    remote: &Remote,
    policy: &Policy,
) -> Result<Vec<Object>> {
    let uri = remote.uri();
    let timeout = policy.request_timeout;
    let mut retries = Retries::new(policy, &uri);
    let head = loop {
        let attempt = match tokio::time::timeout(timeout, store.head(&remote.path)).await {
            Err(_) => Attempt::Retry { reason: "HEAD timed out".into(), timed_out: true },
            Ok(Ok(meta)) => break Some(meta),
            Ok(Err(object_store::Error::NotFound { .. })) => break None,
            Ok(Err(e)) => classify(e, &uri),
        };
        retries.failed(attempt).await?;
    };
    if let Some(meta) = head {
        let name = remote.path.filename().unwrap_or("model").to_owned();
        return Ok(vec![Object {
            location: meta.location,
            relative: PathBuf::from(name),
            size: meta.size,
            e_tag: meta.e_tag,
            version: meta.version,
        }]);
    }
    // HTTP servers list only through WebDAV; a plain web server answers a missing file with 404 above.
    if remote.backend == Backend::Http {
        return Err(Error::NoSuchKey { uri });
    }
    let mut retries = Retries::new(policy, &uri);
    let metas = loop {
        let listing = store.list(Some(&remote.path)).try_collect::<Vec<_>>();
        let attempt = match tokio::time::timeout(timeout, listing).await {
            Err(_) => Attempt::Retry { reason: "LIST timed out".into(), timed_out: true },
            Ok(Ok(metas)) => break metas,
            Ok(Err(e)) => classify(e, &uri),
        };
        retries.failed(attempt).await?;
    };
    if metas.is_empty() {
        return Err(Error::NoSuchKey { uri });
    }
    let prefix: Vec<_> = remote.path.parts().collect();
    let mut objects = Vec::with_capacity(metas.len());
    for meta in metas {
        let parts: Vec<_> = meta.location.parts().collect();
        let Some(rest) = parts.strip_prefix(prefix.as_slice()) else { continue };
        let mut relative = PathBuf::new();
        for part in rest {
            let part = part.as_ref();
            // object_store already refuses these; the cache must not rely on it.
            if part.is_empty() || part == "." || part == ".." || part.contains('/') || part.contains('\0') {
                return Err(Error::UnsafePath { uri, name: meta.location.to_string() });
            }
            relative.push(part);
        }
        if relative.as_os_str().is_empty() {
            continue;
        }
        objects.push(Object {
            location: meta.location,
            relative,
            size: meta.size,
            e_tag: meta.e_tag,
            version: meta.version,
        });
    }
    objects.sort_by(|a, b| a.relative.cmp(&b.relative));
    Ok(objects)
}

/// Downloads every object into `dir` (created), verifying each; ranges of all objects share one
/// bound on parallel requests.
pub(crate) async fn download_all(
    store: &Arc<dyn ObjectStore>,
    remote: &Remote,
    objects: &[Object],
    dir: &Path,
    policy: &Policy,
) -> Result<()> {
    let mut parts = Vec::new();
    for (index, object) in objects.iter().enumerate() {
        let path = dir.join(&object.relative);
        let parent = path.parent().unwrap_or(dir);
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|source| Error::Io { path: parent.to_owned(), source })?;
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|source| Error::Io { path: path.clone(), source })?;
        file.set_len(object.size).await.map_err(|source| Error::Io { path: path.clone(), source })?;
        let ranged = object.size >= 2 * policy.range_bytes;
        let step = if ranged { policy.range_bytes } else { object.size.max(1) };
        let mut start = 0;
        while start < object.size {
            let end = (start + step).min(object.size);
            parts.push((index, path.clone(), start..end, !ranged));
            start = end;
        }
    }
    let uri_of = |o: &Object| format!("{}#{}", remote.uri(), o.relative.display());
    let hashes: Vec<(PathBuf, Option<String>)> = futures::stream::iter(parts)
        .map(|(index, path, range, whole)| {
            let object = &objects[index];
            let uri = uri_of(object);
            async move {
                let hash = fetch_range(store, object, &path, range, whole, &uri, policy).await?;
                Ok::<_, Error>((path, hash))
            }
        })
        .buffer_unordered(policy.parallel.max(1))
        .try_collect()
        .await?;

    for object in objects {
        let path = dir.join(&object.relative);
        let uri = uri_of(object);
        let actual = tokio::fs::metadata(&path)
            .await
            .map_err(|source| Error::Io { path: path.clone(), source })?
            .len();
        if actual != object.size {
            return Err(Error::SizeMismatch { uri, expected: object.size, actual });
        }
        let Some(expected) = (remote.backend == Backend::S3).then(|| md5_of_etag(object)).flatten() else {
            continue;
        };
        let inline = hashes.iter().find(|(p, _)| *p == path).and_then(|(_, h)| h.clone());
        let actual = match inline {
            Some(hash) => hash,
            None => {
                let file = path.clone();
                tokio::task::spawn_blocking(move || md5_file(&file))
                    .await
                    .map_err(|e| Error::Io { path: path.clone(), source: std::io::Error::other(e) })?
                    .map_err(|source| Error::Io { path: path.clone(), source })?
            }
        };
        if actual != expected {
            return Err(Error::ChecksumMismatch { uri, expected, actual });
        }
    }
    Ok(())
}

/// The MD5 an S3 ETag carries: only single-part uploads (32 hex digits, no `-N` part count).
fn md5_of_etag(object: &Object) -> Option<String> {
    let tag = object.e_tag.as_deref()?.trim_matches('"').to_ascii_lowercase();
    (tag.len() == 32 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(tag)
}

fn md5_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes gathered before one positional write: per-chunk writes (a few KiB each, every one a
/// blocking-pool round trip) cost more than the network on loopback.
const WRITE_BATCH: usize = 8 << 20;

/// Fetches one byte range into its place in `path`, resuming after a broken response. A `whole`
/// object is hashed on the way (returned), so verifying it costs no second read.
async fn fetch_range(
    store: &Arc<dyn ObjectStore>,
    object: &Object,
    path: &Path,
    range: std::ops::Range<u64>,
    whole: bool,
    uri: &str,
    policy: &Policy,
) -> Result<Option<String>> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    let file = Arc::new(std::fs::OpenOptions::new().write(true).open(path).map_err(io)?);
    let mut done = 0u64;
    let mut hasher = whole.then(Md5::new);
    let total = range.end - range.start;
    let mut retries = Retries::new(policy, uri);
    while done < total {
        let at = Target { file: &file, path, from: range.start + done, end: range.end };
        match fetch_once(store, object, at, &mut done, &mut hasher, uri, policy).await {
            Ok(()) if done >= total => break,
            Ok(()) => {
                let reason = format!("response ended after {done} of {total} bytes");
                retries.failed(Attempt::Retry { reason, timed_out: false }).await?;
            }
            Err(attempt) => retries.failed(attempt).await?,
        }
    }
    let synced = file.clone();
    tokio::task::spawn_blocking(move || synced.sync_data())
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)?;
    Ok(hasher.map(|h| hex(&h.finalize())))
}

/// Where one GET's bytes go.
#[derive(Clone, Copy)]
struct Target<'a> {
    file: &'a Arc<std::fs::File>,
    path: &'a Path,
    from: u64,
    end: u64,
}

/// One GET of `from..end`, written at `from` in batches; `done` and the hash advance only with bytes
/// on disk, so a resumed GET starts exactly where the file stops.
async fn fetch_once(
    store: &Arc<dyn ObjectStore>,
    object: &Object,
    at: Target<'_>,
    done: &mut u64,
    hasher: &mut Option<Md5>,
    uri: &str,
    policy: &Policy,
) -> Result<(), Attempt> {
    // A whole object from its start is a plain GET: some web servers ignore Range headers.
    let whole_object = at.from == 0 && at.end == object.size;
    let options = GetOptions {
        range: (!whole_object).then_some(GetRange::Bounded(at.from..at.end)),
        version: object.version.clone(),
        ..GetOptions::default()
    };
    let result =
        match tokio::time::timeout(policy.request_timeout, store.get_opts(&object.location, options)).await {
            Err(_) => return Err(Attempt::Retry { reason: "no response".into(), timed_out: true }),
            Ok(Err(e)) => return Err(classify(e, uri)),
            Ok(Ok(result)) => result,
        };
    let mut left = at.end - at.from;
    let mut offset = at.from;
    let mut batch = Vec::with_capacity(WRITE_BATCH.min(left as usize));
    // One batch is written (and hashed) while the next arrives.
    let mut writing: Option<Write> = None;
    let mut body = result.into_stream();
    let mut outcome = Ok(());
    while left > 0 {
        let chunk = match tokio::time::timeout(policy.request_timeout, body.next()).await {
            Err(_) => {
                outcome = Err(Attempt::Retry { reason: "response stalled".into(), timed_out: true });
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                outcome = Err(classify(e, uri));
                break;
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        let chunk = if chunk.len() as u64 > left { chunk.slice(..left as usize) } else { chunk };
        left -= chunk.len() as u64;
        batch.extend_from_slice(&chunk);
        if batch.len() >= WRITE_BATCH {
            if let Some(previous) = writing.take() {
                previous.finish(at, done, hasher).await?;
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH.min(left as usize)));
            let len = full.len() as u64;
            writing = Some(Write::start(at, full, offset, hasher.take()));
            offset += len;
        }
    }
    if let Some(previous) = writing.take() {
        previous.finish(at, done, hasher).await?;
    }
    // What arrived before a failure is kept: the retry resumes after it.
    if !batch.is_empty() {
        Write::start(at, batch, offset, hasher.take()).finish(at, done, hasher).await?;
    }
    outcome
}

/// A batch being hashed and written at its offset on the blocking pool; the hasher travels with it.
struct Write {
    task: tokio::task::JoinHandle<(std::io::Result<()>, Option<Md5>)>,
    len: u64,
}

impl Write {
    fn start(at: Target<'_>, batch: Vec<u8>, offset: u64, mut hashing: Option<Md5>) -> Self {
        use std::os::unix::fs::FileExt;
        let len = batch.len() as u64;
        let file = at.file.clone();
        let task = tokio::task::spawn_blocking(move || {
            // docs/faults.md: the disk under --cache-dir fills up mid-pull.
            #[cfg(feature = "failpoints")]
            if fail::eval("puller.write", |_| ()).is_some() {
                let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device");
                return (Err(full), hashing);
            }
            if let Some(h) = hashing.as_mut() {
                h.update(&batch);
            }
            (file.write_all_at(&batch, offset), hashing)
        });
        Self { task, len }
    }

    /// Waits for the write; only then do `done` and the hash count its bytes.
    async fn finish(self, at: Target<'_>, done: &mut u64, hasher: &mut Option<Md5>) -> Result<(), Attempt> {
        let io = |source| Attempt::Fatal(Error::Io { path: at.path.to_owned(), source });
        let (written, hashing) = self.task.await.map_err(|e| io(std::io::Error::other(e)))?;
        *hasher = hashing;
        written.map_err(io)?;
        *done += self.len;
        metrics::counter!(m::PULLER_BYTES).increment(self.len);
        Ok(())
    }
}
