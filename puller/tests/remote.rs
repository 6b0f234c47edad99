//! Pulls against real servers: moto (S3), Python's http.server, local files, and faults injected by a
//! proxy in front of them.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use densemesh_puller::{Error, PullConfig, Puller};
use support::{Fault, Proxy, http, moto, pattern};

const KEY: &str = r#"{"storage_key": "moto", "bucket": "models"}"#;

/// A storage-config secret directory naming an S3 endpoint, as Kubernetes mounts it.
fn storage_config(dir: &Path, endpoint: std::net::SocketAddr) -> std::path::PathBuf {
    let secret = dir.join("storage-config");
    std::fs::create_dir_all(&secret).unwrap();
    let doc = serde_json::json!({
        "type": "s3", "access_key_id": "testing", "secret_access_key": "testing-secret",
        "endpoint_url": format!("http://{endpoint}"), "region": "us-east-1", "default_bucket": "models",
    });
    std::fs::write(secret.join("moto"), doc.to_string()).unwrap();
    secret
}

fn puller(
    dir: &Path,
    endpoint: std::net::SocketAddr,
    capacity: u64,
    tweak: impl FnOnce(&mut PullConfig),
) -> Arc<Puller> {
    let mut config = PullConfig::new(dir.join("cache"), capacity);
    config.storage_config = Some(storage_config(dir, endpoint));
    config.request_timeout = Duration::from_secs(5);
    tweak(&mut config);
    Puller::open(config).unwrap()
}

/// Creates the bucket (an unsigned request, which moto accepts) and uploads with a real S3 client.
async fn upload(server: &support::Server, key: &str, body: &[u8]) {
    let status = http(server.addr, "PUT", "/models", b"");
    assert!(status == 200 || status == 409, "create bucket: {status}");
    // This client is built outside the puller, so the provider the puller would install may not be
    // there yet: object_store's reqwest has rustls without one of its own (see backend.rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(format!("http://{}", server.addr))
        .with_allow_http(true)
        .with_bucket_name("models")
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing-secret")
        .build()
        .unwrap();
    object_store::ObjectStoreExt::put(&client, &key.into(), body.to_vec().into()).await.unwrap();
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("cache/entries")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_are_pulled_once_then_served_from_the_disk_cache_across_restarts() {
    let s3 = moto();
    let body = pattern(3 << 20, 1);
    upload(&s3, "onnx/m1/model.onnx", &body).await;
    upload(&s3, "dir/model.onnx", &pattern(1000, 2)).await;
    upload(&s3, "dir/weights/extra.bin", &pattern(500, 3)).await;
    let proxy = Proxy::start(s3.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let p = puller(dir.path(), proxy.addr, 100 << 20, |_| {});

    let first = p.fetch("onnx/m1/model.onnx", Some(KEY)).await.unwrap();
    assert_eq!(first.source, "remote");
    assert_eq!(std::fs::read(&first.model.path).unwrap(), body);
    assert_eq!(first.map().unwrap().expect("a single cached file is mapped").as_ref(), &body[..]);
    drop(first);
    let gets = proxy.gets();
    let again = p.fetch("s3://models/onnx/m1/model.onnx", Some("moto")).await.unwrap();
    assert_eq!(again.source, "disk-cache", "the same object by full URI is the same entry");
    assert_eq!(proxy.gets(), gets, "no second download");

    // A directory model: every file under the prefix, the model file found among them.
    let model_dir = p.fetch("dir", Some(KEY)).await.unwrap();
    assert!(model_dir.model.path.ends_with("data/model.onnx"), "{:?}", model_dir.model.path);
    let extra = model_dir.model.path.parent().unwrap().join("weights/extra.bin");
    assert_eq!(std::fs::read(extra).unwrap(), pattern(500, 3));
    assert!(model_dir.map().unwrap().is_none(), "a directory model is loaded by path");
    drop((again, model_dir));

    // A restart finds both entries on disk. (This puller asks the store on every pull, so the
    // replaced object below is seen at once rather than after --pull-revalidate-after.)
    drop(p);
    let p = puller(dir.path(), proxy.addr, 100 << 20, |c| c.revalidate_after = Duration::ZERO);
    let gets = proxy.gets();
    assert_eq!(p.fetch("onnx/m1/model.onnx", Some(KEY)).await.unwrap().source, "disk-cache");
    assert_eq!(p.fetch("dir", Some(KEY)).await.unwrap().source, "disk-cache");
    assert_eq!(proxy.gets(), gets);

    // A replaced object (new ETag) is a new entry, not the stale bytes.
    upload(&s3, "onnx/m1/model.onnx", &pattern(3 << 20, 9)).await;
    let replaced = p.fetch("onnx/m1/model.onnx", Some(KEY)).await.unwrap();
    assert_eq!(
        (replaced.source, std::fs::read(&replaced.model.path).unwrap()),
        ("remote", pattern(3 << 20, 9))
    );

    // The store down: the copy already pulled is served.
    drop(replaced);
    proxy.set(Fault::Stall(Duration::from_secs(60)));
    let offline = puller(dir.path(), proxy.addr, 100 << 20, |c| {
        c.request_timeout = Duration::from_millis(300);
        c.attempts = 2;
    });
    assert_eq!(offline.fetch("onnx/m1/model.onnx", Some(KEY)).await.unwrap().source, "disk-cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_object_download_it_once_per_pod() {
    let s3 = moto();
    upload(&s3, "shared/model.onnx", &pattern(2 << 20, 4)).await;
    let proxy = Proxy::start(s3.addr).await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pods =
        [puller(a.path(), proxy.addr, 100 << 20, |_| {}), puller(b.path(), proxy.addr, 100 << 20, |_| {})];
    let mut pulls = Vec::new();
    for pod in &pods {
        for _ in 0..8 {
            let pod = pod.clone();
            pulls.push(tokio::spawn(async move {
                let fetched = pod.fetch("shared/model.onnx", Some(KEY)).await.unwrap();
                std::fs::read(&fetched.model.path).unwrap()
            }));
        }
    }
    for pull in pulls {
        assert_eq!(pull.await.unwrap(), pattern(2 << 20, 4));
    }
    assert_eq!(proxy.gets(), 2, "one download per pod, however many asked at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_come_in_parallel_ranges_that_resume_after_the_server_dies_mid_download() {
    let s3 = moto();
    let body = pattern(6 << 20, 5);
    upload(&s3, "big/model.onnx", &body).await;
    let proxy = Proxy::start(s3.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let p = puller(dir.path(), proxy.addr, 100 << 20, |c| c.range_bytes = 1 << 20);
    // The first three responses stop after 100 KB, as when a server dies mid-transfer.
    proxy.set(Fault::Cut { after: 100_000, times: 3 });
    let fetched = p.fetch("big/model.onnx", Some(KEY)).await.unwrap();
    assert_eq!(std::fs::read(&fetched.model.path).unwrap(), body, "resumed ranges put every byte in place");
    assert_eq!(proxy.gets(), 6 + 3, "six 1 MiB ranges, three of them resumed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_missing_forbidden_slow_and_oversized_objects_fail_clearly_and_leave_nothing_behind() {
    let s3 = moto();
    upload(&s3, "m/model.onnx", &pattern(1 << 20, 6)).await;
    let proxy = Proxy::start(s3.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let p = puller(dir.path(), proxy.addr, 1536 << 10, |c| {
        c.request_timeout = Duration::from_millis(500);
        c.attempts = 2;
    });

    proxy.set(Fault::Corrupt);
    let error = p.fetch("m/model.onnx", Some(KEY)).await.err().unwrap();
    assert!(matches!(root(&error), Error::ChecksumMismatch { .. }), "{error}");
    assert!(error.to_string().contains("s3://models/m/model.onnx"), "{error}");

    proxy.set(Fault::None);
    let error = p.fetch("m/missing.onnx", Some(KEY)).await.err().unwrap();
    assert!(matches!(root(&error), Error::NoSuchKey { .. }), "{error}");

    proxy.set(Fault::Forbidden);
    let error = p.fetch("m/model.onnx", Some(KEY)).await.err().unwrap();
    assert!(matches!(root(&error), Error::AccessDenied { .. }), "{error}");
    assert!(!error.to_string().contains("testing-secret"), "{error}");

    proxy.set(Fault::Stall(Duration::from_secs(5)));
    let error = p.fetch("m/model.onnx", Some(KEY)).await.err().unwrap();
    assert!(matches!(root(&error), Error::TimedOut { attempts: 2, .. }), "{error}");
    assert!(error.to_string().contains("timed out"), "{error}");

    proxy.set(Fault::None);
    upload(&s3, "m/huge.onnx", &pattern(2 << 20, 7)).await;
    let error = p.fetch("m/huge.onnx", Some(KEY)).await.err().unwrap();
    assert!(matches!(root(&error), Error::DiskFull { .. }), "{error}");

    assert_eq!(entries(dir.path()), 0, "no failed pull left an entry");
    assert_eq!(std::fs::read_dir(dir.path().join("cache/tmp")).unwrap().count(), 0, "nor a temporary file");
    // With the faults gone the same pull succeeds: nothing bad was remembered.
    assert_eq!(p.fetch("m/model.onnx", Some(KEY)).await.unwrap().source, "remote");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_servers_and_local_files() {
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(site.path().join("models/a")).unwrap();
    std::fs::write(site.path().join("models/a/model.onnx"), pattern(300_000, 8)).unwrap();
    let web = support::http_server(site.path());
    let dir = tempfile::tempdir().unwrap();
    let p = Puller::open(PullConfig::new(dir.path().join("cache"), 10 << 20)).unwrap();

    let url = format!("http://{}/models/a/model.onnx", web.addr);
    let fetched = p.fetch(&url, None).await.unwrap();
    assert_eq!(
        (fetched.source, std::fs::read(&fetched.model.path).unwrap()),
        ("remote", pattern(300_000, 8))
    );
    assert_eq!(p.fetch(&url, None).await.unwrap().source, "disk-cache");
    let missing = p.fetch(&format!("http://{}/models/nope.onnx", web.addr), None).await.err().unwrap();
    assert!(matches!(root(&missing), Error::NoSuchKey { .. }), "{missing}");

    // Local paths and file:// URIs are used in place, never copied.
    let local = site.path().join("models/a");
    let fetched = p.fetch(local.to_str().unwrap(), None).await.unwrap();
    assert_eq!((fetched.source, fetched.model.path.clone()), ("local", local.join("model.onnx")));
    let fetched = p.fetch(&format!("file://{}", local.display()), None).await.unwrap();
    assert_eq!(fetched.source, "local");
    assert!(fetched.map().unwrap().is_none(), "local files are read, not mapped");
}

/// TLS through object_store's rustls on the ring provider the puller installs: a server whose CA the
/// storage key names is pulled from, the same server under a key without it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_servers_are_verified_against_the_storage_keys_certificate() {
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(site.path().join("models/a")).unwrap();
    std::fs::write(site.path().join("models/a/model.onnx"), pattern(200_000, 11)).unwrap();
    // Another object for the untrusted key, so the disk cache cannot answer for it.
    std::fs::create_dir_all(site.path().join("models/b")).unwrap();
    std::fs::write(site.path().join("models/b/model.onnx"), pattern(1000, 12)).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ca = support::TestCa::new(certs.path());
    let web = support::https_server(site.path(), &ca);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("storage-config");
    std::fs::create_dir_all(&secret).unwrap();
    let url = format!("https://{}/", web.addr);
    let trusted = serde_json::json!({"type": "http", "url": url, "certificate": ca.ca_pem});
    std::fs::write(secret.join("trusted"), trusted.to_string()).unwrap();
    std::fs::write(secret.join("untrusted"), serde_json::json!({"type": "http", "url": url}).to_string())
        .unwrap();
    let mut config = PullConfig::new(dir.path().join("cache"), 10 << 20);
    config.storage_config = Some(secret);
    config.request_timeout = Duration::from_secs(5);
    config.attempts = 1;
    let p = Puller::open(config).unwrap();

    let fetched = p.fetch("models/a/model.onnx", Some(r#"{"storage_key": "trusted"}"#)).await.unwrap();
    assert_eq!(
        (fetched.source, std::fs::read(&fetched.model.path).unwrap()),
        ("remote", pattern(200_000, 11))
    );
    let refused = p.fetch("models/b/model.onnx", Some(r#"{"storage_key": "untrusted"}"#)).await.err();
    let refused = refused.expect("a server signed by an unknown CA is refused");
    assert!(matches!(root(&refused), Error::Remote { .. }), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_storage_config_is_picked_up_and_a_broken_one_is_refused() {
    let s3 = moto();
    upload(&s3, "r/model.onnx", &pattern(1000, 10)).await;
    let dir = tempfile::tempdir().unwrap();
    // Registered against a key that does not exist yet: a clear error naming it.
    let p = puller(dir.path(), s3.addr, 10 << 20, |_| {});
    let key = r#"{"storage_key": "later", "bucket": "models"}"#;
    let error = p.fetch("r/model.onnx", Some(key)).await.err().unwrap().to_string();
    assert!(error.contains("storage key later") && error.contains("moto"), "{error}");

    let secret = dir.path().join("storage-config");
    let doc = std::fs::read_to_string(secret.join("moto")).unwrap();
    std::fs::write(secret.join("later"), &doc).unwrap();
    assert!(p.reload_storage_config().unwrap());
    assert_eq!(p.fetch("r/model.onnx", Some(key)).await.unwrap().source, "remote");

    std::fs::write(secret.join("broken"), "{\"secret_access_key\": \"hunter2\"").unwrap();
    let error = p.reload_storage_config().unwrap_err().to_string();
    assert!(error.contains("broken") && !error.contains("hunter2"), "{error}");
    assert!(!p.reload_storage_config().unwrap(), "reported once, then the old config stays");
    assert_eq!(p.fetch("r/model.onnx", Some(key)).await.unwrap().source, "disk-cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_keys_that_climb_out_of_their_prefix_never_write_outside_the_cache() {
    let s3 = moto();
    upload(&s3, "evil/model.onnx", &pattern(100, 11)).await;
    // S3 keys may hold `..`; a plain (unsigned) PUT puts one there, as a hostile bucket could.
    assert_eq!(http(s3.addr, "PUT", "/models/evil/..%2F..%2F..%2Fescaped.onnx", b"gotcha"), 200);
    let dir = tempfile::tempdir().unwrap();
    let p = puller(dir.path(), s3.addr, 10 << 20, |c| c.attempts = 1);
    let outcome = p.fetch("evil", Some(KEY)).await;
    let escaped: Vec<_> = walk(dir.path()).into_iter().filter(|f| f.ends_with("escaped.onnx")).collect();
    for file in &escaped {
        assert!(file.starts_with(dir.path().join("cache/entries")), "written outside an entry: {file:?}");
    }
    assert!(!dir.path().join("escaped.onnx").exists() && !dir.path().join("cache/escaped.onnx").exists());
    // object_store refuses the listing; the pull fails naming the object, and nothing was written.
    let error = outcome.err().expect("a prefix holding a climbing key is refused").to_string();
    assert!(error.contains("escaped.onnx") && error.contains("s3://models/evil"), "{error}");
    assert_eq!(entries(dir.path()), 0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

/// The error itself, through a coalesced pull's shared error.
fn root(e: &Error) -> &Error {
    match e {
        Error::Shared(inner) => root(inner),
        other => other,
    }
}

/// docs/faults.md, `puller.write`: the disk under the cache fills up mid-pull. The pull fails at once
/// (no retry can help) with the file and the cause named, leaves neither an entry nor a temporary file,
/// and charges nothing to the cache; once there is room the same pull succeeds.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_up_mid_pull_fails_that_pull_cleanly_and_the_next_succeeds() {
    let scenario = fail::FailScenario::setup();
    let s3 = moto();
    let body = pattern(3 << 20, 9);
    upload(&s3, "full/model.onnx", &body).await;
    let dir = tempfile::tempdir().unwrap();
    // Ranges of 1 MiB: the disk fills after the first range is written, mid-object.
    let p = puller(dir.path(), s3.addr, 16 << 20, |c| {
        c.range_bytes = 1 << 20;
        c.attempts = 3;
    });
    fail::cfg("puller.write", "1*off->return").unwrap();
    let error = p.fetch("full/model.onnx", Some(KEY)).await.err().expect("the disk is full");
    let message = error.to_string();
    assert!(matches!(root(&error), Error::Io { .. }), "{message}");
    assert!(message.contains("no space left on device") && message.contains("model.onnx"), "{message}");
    assert_eq!(entries(dir.path()), 0, "no entry for a pull the disk could not hold");
    assert_eq!(std::fs::read_dir(dir.path().join("cache/tmp")).unwrap().count(), 0, "nor a temporary file");
    assert_eq!(p.disk_usage().0, 0, "and nothing charged to the cache");

    fail::remove("puller.write");
    let pulled = p.fetch("full/model.onnx", Some(KEY)).await.expect("room again: the pull succeeds");
    assert_eq!(pulled.source, "remote");
    assert_eq!(std::fs::read(&pulled.model.path).unwrap(), body, "the whole object, not what came before");
    scenario.teardown();
}
