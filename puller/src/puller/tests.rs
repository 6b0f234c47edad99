//! Coalesced downloads when a download does not end normally: it panics, or the puller shuts down.
//! The store is object_store's `InMemory` behind a wrapper that injects the fault into object GETs,
//! registered as the client for its bucket.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use tokio::sync::Notify;

use super::*;
use crate::Backend;

const URI: &str = "s3://models/m/model.onnx";

/// What a faulty GET does.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Panics, as a bug inside a download would.
    Panic,
    /// Never answers (the per-request timeout is far longer than the test).
    Hang,
}

/// `InMemory`, except that the first `faults` object GETs (not HEADs) fail with `fault`.
#[derive(Debug)]
struct FaultyGets {
    inner: InMemory,
    fault: Fault,
    faults: AtomicUsize,
    gets: AtomicUsize,
    heads: AtomicUsize,
    /// Signalled when a GET starts.
    get_started: Notify,
}

impl FaultyGets {
    async fn with_model(fault: Fault, faults: usize, body: &[u8]) -> Arc<Self> {
        let store = Arc::new(Self {
            inner: InMemory::new(),
            fault,
            faults: AtomicUsize::new(faults),
            gets: AtomicUsize::new(0),
            heads: AtomicUsize::new(0),
            get_started: Notify::new(),
        });
        store.inner.put(&ObjectPath::from("m/model.onnx"), body.to_vec().into()).await.unwrap();
        store
    }
}

impl fmt::Display for FaultyGets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyGets({:?})", self.fault)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyGets {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> object_store::Result<GetResult> {
        if options.head {
            self.heads.fetch_add(1, Ordering::SeqCst);
        } else {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.get_started.notify_one();
            let faulty = self.faults.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if faulty.is_ok() {
                match self.fault {
                    Fault::Panic => panic!("injected panic in GET {location}"),
                    Fault::Hang => std::future::pending::<()>().await,
                }
            }
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A puller whose client for `s3://models` is `store`.
fn puller(dir: &Path, store: Arc<FaultyGets>) -> Arc<Puller> {
    puller_with(PullConfig::new(dir.join("cache"), 1 << 20), store)
}

fn puller_with(config: PullConfig, store: Arc<FaultyGets>) -> Arc<Puller> {
    let puller = Puller::open(config).unwrap();
    puller.stores.lock().insert((Backend::S3, None, "models".to_owned()), store);
    puller
}

/// The failure a pull shares with the download it waited on.
fn abandoned(e: &Error) -> Option<(&str, &str)> {
    match e {
        Error::Shared(shared) => match &**shared {
            Error::Abandoned { uri, why } => Some((uri.as_str(), *why)),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn a_download_that_panics_fails_its_pull_by_name_and_the_next_pull_downloads_again() {
    let body = b"onnx bytes".repeat(100);
    let store = FaultyGets::with_model(Fault::Panic, 1, &body).await;
    let dir = tempfile::tempdir().unwrap();
    let p = puller(dir.path(), store.clone());

    let err = p.fetch(URI, None).await.err().expect("the download panicked");
    let (uri, why) = abandoned(&err).unwrap_or_else(|| panic!("not an abandoned download: {err}"));
    assert_eq!(uri, URI);
    assert!(why.contains("panicked"), "{err}");
    assert!(err.to_string().contains(URI), "{err}");
    assert!(p.inflight.lock().is_empty(), "the panicked download left its entry behind");

    let fetched = p.fetch(URI, None).await.expect("a fresh download");
    assert_eq!(fetched.source, "remote");
    assert_eq!(std::fs::read(&fetched.model.path).unwrap(), body);
    assert_eq!(store.gets.load(Ordering::SeqCst), 2, "one panicked GET, then one new download");
}

#[tokio::test]
async fn shutdown_cancels_a_download_in_progress_and_waits_for_its_task() {
    let store = FaultyGets::with_model(Fault::Hang, 1, b"model").await;
    let dir = tempfile::tempdir().unwrap();
    let p = puller(dir.path(), store.clone());

    let get_started = store.get_started.notified();
    let pulling = tokio::spawn({
        let p = p.clone();
        async move { p.fetch(URI, None).await.map(|f| f.source) }
    });
    get_started.await;
    p.shutdown().await;
    assert!(p.downloads.is_empty(), "shutdown returned with a download task still running");

    let err = pulling.await.unwrap().expect_err("the download was cancelled");
    let (uri, why) = abandoned(&err).unwrap_or_else(|| panic!("not an abandoned download: {err}"));
    assert_eq!((uri, why), (URI, "the puller is shutting down"));
    assert!(p.inflight.lock().is_empty());
}

#[tokio::test]
async fn a_location_found_moments_ago_is_served_without_asking_the_store_again() {
    let store = FaultyGets::with_model(Fault::Panic, 0, b"first").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = PullConfig::new(dir.path().join("cache"), 1 << 20);
    config.revalidate_after = Duration::from_millis(300);
    let p = puller_with(config, store.clone());
    let read = |f: &Fetched| std::fs::read(&f.model.path).unwrap();

    assert_eq!(read(&p.fetch(URI, None).await.unwrap()), b"first");
    let again = p.fetch(URI, None).await.unwrap();
    assert_eq!((again.source, read(&again).as_slice()), ("disk-cache", &b"first"[..]));
    assert_eq!(store.heads.load(Ordering::SeqCst), 1, "the second pull, within the window, asked nothing");

    // Once the window is over the store is asked again, and a changed object is pulled anew.
    store.inner.put(&ObjectPath::from("m/model.onnx"), b"second".to_vec().into()).await.unwrap();
    assert_eq!(read(&p.fetch(URI, None).await.unwrap()), b"first", "still within the window");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let changed = p.fetch(URI, None).await.unwrap();
    assert_eq!((changed.source, read(&changed).as_slice()), ("remote", &b"second"[..]));
    assert_eq!(store.heads.load(Ordering::SeqCst), 2);
    assert_eq!(store.gets.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn with_no_window_every_pull_asks_the_store() {
    let store = FaultyGets::with_model(Fault::Panic, 0, b"model").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = PullConfig::new(dir.path().join("cache"), 1 << 20);
    config.revalidate_after = Duration::ZERO;
    let p = puller_with(config, store.clone());
    for _ in 0..3 {
        p.fetch(URI, None).await.unwrap();
    }
    assert_eq!((store.heads.load(Ordering::SeqCst), store.gets.load(Ordering::SeqCst)), (3, 1));
}

fn directory_of(names: &[&str]) -> (Remote, Vec<crate::fetch::Object>) {
    let remote = Remote {
        backend: Backend::S3,
        storage_key: None,
        bucket: "models".into(),
        path: ObjectPath::from("dir"),
    };
    let objects = names
        .iter()
        .map(|n| crate::fetch::Object {
            location: ObjectPath::from(format!("dir/{n}")),
            relative: n.into(),
            size: 1,
            e_tag: None,
            version: None,
        })
        .collect();
    (remote, objects)
}

#[test]
fn a_directory_model_of_any_known_format_has_its_main_file_found() {
    let main = |names: &[&str]| {
        let (remote, objects) = directory_of(names);
        main_file(&remote, &objects).map(|p| p.to_string_lossy().into_owned())
    };
    let hugging_face = ["config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"];
    assert_eq!(main(&hugging_face).unwrap(), "model.safetensors");
    assert_eq!(main(&["model-settings.json", "model.joblib"]).unwrap(), "model.joblib");
    assert_eq!(main(&["1/model.bst", "4/model.bst", "12/model.bst"]).unwrap(), "12/model.bst");
    assert_eq!(main(&["model.joblib", "model.onnx"]).unwrap(), "model.onnx");
    assert_eq!(main(&["README.md", "classifier.onnx"]).unwrap(), "classifier.onnx");
    assert!(matches!(main(&["README.md", "weights.bin"]), Err(Error::NoModelFile { .. })));
}
