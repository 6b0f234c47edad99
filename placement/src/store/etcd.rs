//! `EtcdStore`: the [`Store`] on etcd v3. Revisions, compare-and-swap, leases and watches map one to
//! one onto etcd's own, so this is a thin translation. Errors are classified by their gRPC status code
//! (never by message text, which etcd and its client may reword): those that mean "etcd is not
//! reachable" become `StoreError::Unavailable`, so callers can tell an outage from a refusal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, Identity, PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp, WatchOptions,
};
use futures::stream::{self, BoxStream, StreamExt};
use tonic::Code;

use super::{
    Compare, KeyValue, LeaseId, MAX_TXN_OPS, Op, RangeResult, Result, Revision, Store, StoreError, Txn,
    TxnResult, WatchEvent,
};

/// How long one call to etcd may take before it counts as unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The fail point `name` (docs/faults.md), in builds with the `failpoints` feature: `return` fails the
/// call as an unreachable etcd does; `return(MS)` makes etcd answer MS milliseconds late, or, from
/// [`REQUEST_TIMEOUT`] on, not in time (the client's timeout, as with a real etcd that slow).
#[cfg(feature = "failpoints")]
async fn fail_point(name: &str) -> Result<()> {
    match fail::eval(name, |arg| arg.and_then(|a| a.parse::<u64>().ok())) {
        None => Ok(()),
        Some(Some(ms)) if Duration::from_millis(ms) < REQUEST_TIMEOUT => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        }
        Some(Some(_)) => {
            tokio::time::sleep(REQUEST_TIMEOUT).await;
            Err(StoreError::Unavailable(format!("etcd did not answer in time (fail point {name})")))
        }
        Some(None) => Err(StoreError::Unavailable(format!("etcd unreachable (fail point {name})"))),
    }
}

/// Evaluates a fail point; nothing at all without the `failpoints` feature.
macro_rules! fail_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail_point($name).await?;
    };
}

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

/// The client side of TLS to etcd: a directory laid out as a Kubernetes TLS secret mounts, `ca.crt`
/// (the CA that signed etcd's certificate) and, for etcd's `--client-cert-auth`, `tls.crt` and
/// `tls.key` (this client's certificate and key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub dir: PathBuf,
}

impl EtcdTls {
    /// The TLS settings the directory holds; a missing CA, or a certificate without its key, is an
    /// error naming the file.
    fn options(&self) -> Result<TlsOptions> {
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let path = self.dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::Rejected(format!("etcd TLS: cannot read {}: {e}", path.display()))),
            }
        };
        let missing = |name: &str, why: &str| {
            StoreError::Rejected(format!("etcd TLS: {} is missing: {why}", self.dir.join(name).display()))
        };
        let ca = read("ca.crt")?.ok_or_else(|| missing("ca.crt", "the CA that signed etcd's certificate"))?;
        let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        match (read("tls.crt")?, read("tls.key")?) {
            (Some(cert), Some(key)) => options = options.identity(Identity::from_pem(cert, key)),
            (None, None) => {}
            (Some(_), None) => return Err(missing("tls.key", "the key of tls.crt")),
            (None, Some(_)) => return Err(missing("tls.crt", "the certificate of tls.key")),
        }
        Ok(options)
    }

    /// The directory, for messages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl EtcdStore {
    /// Connects to etcd, e.g. `["http://127.0.0.1:2379"]`; with `tls`, over TLS (`https://` endpoints).
    pub async fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        match tls {
            Some(tls) => options = options.with_tls(tls.options()?),
            None => {
                if let Some(https) = endpoints.iter().find(|e| e.starts_with("https://")) {
                    return Err(StoreError::Rejected(format!(
                        "etcd endpoint {https} is https: give the CA (and client certificate) with --etcd-tls-dir"
                    )));
                }
            }
        }
        let client =
            Client::connect(endpoints, Some(options)).await.map_err(|e| store_error(e, About::Nothing))?;
        Ok(Self { client })
    }

    /// Drops history older than `revision` (watches from before it then get `Compacted`, and so does
    /// compacting at or below it again).
    pub async fn compact(&self, revision: Revision) -> Result<()> {
        self.client
            .clone()
            .compact(revision, None)
            .await
            .map_err(|e| store_error(e, About::Revision(revision)))?;
        Ok(())
    }
}

/// What an etcd error means to a caller, decided by its gRPC status code, or by the client's error
/// kind for errors that never got an answer from etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meaning {
    /// etcd could not be reached, did not answer in time, or is too busy now: an outage, worth
    /// retrying.
    Unavailable,
    /// `NotFound`: the only thing etcd's KV, lease and watch calls can fail to find is a lease.
    LeaseNotFound,
    /// `OutOfRange`: a revision etcd no longer keeps ("required revision has been compacted") or has
    /// not reached; for a lease, a TTL above etcd's maximum.
    OutOfRange,
    /// A refusal that retrying unchanged will not turn into a success.
    Rejected,
}

fn meaning(e: &etcd_client::Error) -> Meaning {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => match status.code() {
            // Unknown, Internal and Cancelled are what tonic makes of a connection torn down mid-call
            // (HTTP/2 resets); ResourceExhausted is etcd's "too many requests" or full-disk alarm.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal => Meaning::Unavailable,
            Code::NotFound => Meaning::LeaseNotFound,
            Code::OutOfRange => Meaning::OutOfRange,
            Code::Ok
            | Code::InvalidArgument
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::DataLoss
            | Code::Unauthenticated => Meaning::Rejected,
        },
        // No answer from etcd at all: the connection or the client's streams to it failed.
        E::TransportError(_)
        | E::IoError(_)
        | E::EndpointError(_)
        | E::WatchError(_)
        | E::LeaseKeepAliveError(_) => Meaning::Unavailable,
        // Malformed endpoints or arguments: a configuration or programming error.
        _ => Meaning::Rejected,
    }
}

/// What the failed call was about, so a classified error can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum About {
    Nothing,
    /// A call that wrote with this lease (the first, when a transaction names several).
    Lease(LeaseId),
    /// A call that needs history from this revision on.
    Revision(Revision),
}

/// An etcd error as a store error. `NotFound` only means a lost lease when the call named one, and
/// `OutOfRange` only means compacted history when it asked for a revision; otherwise (e.g. a lease
/// TTL etcd finds too long) they are refusals.
fn store_error(e: etcd_client::Error, about: About) -> StoreError {
    match (meaning(&e), about) {
        (Meaning::Unavailable, _) => StoreError::Unavailable(e.to_string()),
        (Meaning::LeaseNotFound, About::Lease(lease)) => StoreError::LeaseNotFound(lease),
        // etcd's answer does not say which revision it still keeps; at least the requested one is gone.
        (Meaning::OutOfRange, About::Revision(requested)) => {
            StoreError::Compacted { requested, oldest: requested }
        }
        (Meaning::LeaseNotFound | Meaning::OutOfRange | Meaning::Rejected, _) => {
            StoreError::Rejected(e.to_string())
        }
    }
}

fn lease_error(lease: LeaseId) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| store_error(e, About::Lease(lease))
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

fn txn_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l.0)))
        }
        Op::Delete { key } => TxnOp::delete(key, None),
        Op::DeletePrefix { prefix } => TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix())),
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn range(&self, prefix: &str) -> Result<RangeResult> {
        fail_point!("etcd.range");
        let response = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| store_error(e, About::Nothing))?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(RangeResult { kvs: response.kvs().iter().map(key_value).collect(), revision })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        fail_point!("etcd.txn");
        let ops = txn.compare.len() + txn.success.len().max(txn.failure.len());
        if ops > MAX_TXN_OPS {
            return Err(StoreError::TooManyOps(ops));
        }
        let about = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                Op::Put { lease, .. } => *lease,
                _ => None,
            })
            .map_or(About::Nothing, About::Lease);
        let compares: Vec<EtcdCompare> = txn
            .compare
            .into_iter()
            .map(|c| match c {
                Compare::ModRevision(key, revision) => {
                    EtcdCompare::mod_revision(key, CompareOp::Equal, revision)
                }
            })
            .collect();
        let request = EtcdTxn::new()
            .when(compares)
            .and_then(txn.success.into_iter().map(txn_op).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(txn_op).collect::<Vec<_>>());
        let response = self.client.clone().txn(request).await.map_err(|e| store_error(e, about))?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(TxnResult { succeeded: response.succeeded(), revision })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        fail_point!("etcd.grant_lease");
        let seconds = i64::try_from(ttl.as_secs_f64().ceil() as u64).unwrap_or(i64::MAX).max(1);
        let response = self
            .client
            .clone()
            .lease_grant(seconds, None)
            .await
            .map_err(|e| store_error(e, About::Nothing))?;
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        fail_point!("etcd.keep_alive");
        let (mut keeper, mut responses) = match self.client.clone().lease_keep_alive(lease.0).await {
            Ok(opened) => opened,
            // etcd-client opens the stream with one renewal and fails with this kind when etcd answers
            // it with a TTL of 0 (its only other cause, a full request channel, cannot happen on the
            // channel it has just created): the lease is gone.
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => return Err(StoreError::LeaseNotFound(lease)),
            Err(e) => return Err(lease_error(lease)(e)),
        };
        keeper.keep_alive().await.map_err(lease_error(lease))?;
        match responses.message().await.map_err(lease_error(lease))? {
            // etcd answers a keep-alive for an expired or unknown lease with a TTL of 0.
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        fail_point!("etcd.revoke_lease");
        self.client.clone().lease_revoke(lease.0).await.map_err(lease_error(lease))?;
        Ok(())
    }

    fn watch(&self, prefix: &str, after: Revision) -> BoxStream<'static, Result<WatchEvent>> {
        let (client, prefix) = (self.client.clone(), prefix.to_owned());
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1);
        stream::once(async move {
            let mut client = client;
            #[cfg(feature = "failpoints")]
            if let Err(e) = fail_point("etcd.watch").await {
                return stream::iter([Err(e)]).boxed();
            }
            match client.watch(prefix, Some(options)).await {
                Err(e) => stream::iter([Err(store_error(e, About::Revision(after)))]).boxed(),
                Ok(watch) => stream::unfold(Some(watch), move |state| async move {
                    let mut watch = state?;
                    match watch.message().await {
                        Ok(Some(response)) if response.canceled() => {
                            let error = if response.compact_revision() > 0 {
                                StoreError::Compacted {
                                    requested: after,
                                    oldest: response.compact_revision(),
                                }
                            } else {
                                StoreError::Unavailable(format!(
                                    "watch canceled: {}",
                                    response.cancel_reason()
                                ))
                            };
                            Some((vec![Err(error)], None))
                        }
                        // The connection broke before this answer got through: the watcher must
                        // watch again from what it has seen, and so gets these events then.
                        #[cfg(feature = "failpoints")]
                        Ok(Some(_))
                            if matches!(
                                fail::eval("etcd.watch", |a| a.and_then(|a| a.parse::<u64>().ok())),
                                Some(None)
                            ) =>
                        {
                            Some((
                                vec![Err(StoreError::Unavailable(
                                    "watch broken (fail point etcd.watch)".into(),
                                ))],
                                None,
                            ))
                        }
                        Ok(Some(response)) => {
                            let events = response
                                .events()
                                .iter()
                                .filter_map(|event| {
                                    let kv = event.kv()?;
                                    Some(Ok(match event.event_type() {
                                        EventType::Put => WatchEvent::Put(key_value(kv)),
                                        EventType::Delete => WatchEvent::Delete {
                                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                                            mod_revision: kv.mod_revision(),
                                        },
                                    }))
                                })
                                .collect();
                            Some((events, Some(watch)))
                        }
                        Ok(None) => {
                            Some((vec![Err(StoreError::Unavailable("watch stream closed".into()))], None))
                        }
                        Err(e) => Some((vec![Err(store_error(e, About::Revision(after)))], None)),
                    }
                })
                .flat_map(stream::iter)
                .boxed(),
            }
        })
        .flatten()
        .boxed()
    }
}

/// A real etcd for tests: Debian's `etcd-server` on free loopback ports with a temporary data dir,
/// stopped on drop. Fails loudly when etcd is not installed: a store suite that skips proves nothing.
#[cfg(test)]
pub(crate) mod harness {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::EtcdStore;
    use crate::store::Store;

    pub struct EtcdServer {
        child: Child,
        pub endpoint: String,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
    }

    impl EtcdServer {
        pub async fn start() -> Self {
            let (_, server) = Self::spawn(None);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(store) = EtcdStore::connect(std::slice::from_ref(&server.endpoint), None).await
                    && store.range("/").await.is_ok()
                {
                    return server;
                }
                assert!(Instant::now() < deadline, "etcd did not answer within 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        pub async fn store(&self) -> EtcdStore {
            EtcdStore::connect(std::slice::from_ref(&self.endpoint), None)
                .await
                .expect("connect to the test etcd")
        }
    }

    /// Runs `openssl` with `args` in `dir`.
    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed (scripts/setup.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A CA, a certificate for etcd on 127.0.0.1 and a client certificate, made in `dir` as
    /// `ca.crt`/`ca.key`, `server.crt`/`server.key` and `tls.crt`/`tls.key`.
    pub fn make_certificates(dir: &std::path::Path) {
        let key = |name: &str| openssl(dir, &["genrsa", "-out", name, "2048"]);
        key("ca.key");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=test-ca",
                "-days",
                "1",
                "-out",
                "ca.crt",
            ],
        );
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext file");
        for (name, subject, ext) in [("server", "/CN=etcd", "server.ext"), ("tls", "/CN=meshd", "client.ext")]
        {
            key(&format!("{name}.key"));
            openssl(
                dir,
                &[
                    "req",
                    "-new",
                    "-key",
                    &format!("{name}.key"),
                    "-subj",
                    subject,
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "1",
                    "-extfile",
                    ext,
                    "-out",
                    &format!("{name}.crt"),
                ],
            );
        }
    }

    impl EtcdServer {
        /// An etcd that takes only TLS connections with a client certificate signed by the CA in
        /// `certs` (see [`make_certificates`]). Waits until its port accepts connections.
        pub async fn start_tls(certs: &std::path::Path) -> Self {
            let (client, server) = Self::spawn(Some(certs));
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
                assert!(Instant::now() < deadline, "etcd did not listen within 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            server
        }

        /// etcd on two free loopback ports, with a data dir of its own; over TLS with the
        /// certificates in `certs` (see [`make_certificates`]). The client port, and the server.
        fn spawn(certs: Option<&std::path::Path>) -> (u16, Self) {
            let dir = tempfile::tempdir().expect("temp dir");
            let (client, peer) = (free_port(), free_port());
            let scheme = if certs.is_some() { "https" } else { "http" };
            let endpoint = format!("{scheme}://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log file");
            let mut command = Command::new("etcd");
            command
                .args(["--name", "test", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("test={peer_url}")]);
            if let Some(certs) = certs {
                let file = |name: &str| certs.join(name).display().to_string();
                command.args(["--cert-file", &file("server.crt"), "--key-file", &file("server.key")]).args([
                    "--trusted-ca-file",
                    &file("ca.crt"),
                    "--client-cert-auth",
                ]);
            }
            let child = command
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd must be installed (Debian's etcd-server; scripts/setup.sh installs it)");
            (client, Self { child, endpoint, _dir: dir })
        }
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::harness::EtcdServer;
    use super::*;
    use crate::store::conformance;

    /// TLS with a client certificate, as the chart's external etcd is reached: the mesh's store works
    /// through it; a pod without the client certificate, or without the CA, gets nowhere, and says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_etcd_that_requires_client_certificates_is_reached_with_the_tls_dir() {
        let certs = tempfile::tempdir().unwrap();
        super::harness::make_certificates(certs.path());
        let etcd = EtcdServer::start_tls(certs.path()).await;
        let endpoints = std::slice::from_ref(&etcd.endpoint);
        let tls = EtcdTls { dir: certs.path().to_owned() };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let store = loop {
            match EtcdStore::connect(endpoints, Some(&tls)).await {
                Ok(store) if store.range("/").await.is_ok() => break store,
                other => {
                    assert!(std::time::Instant::now() < deadline, "no TLS connection: {:?}", other.err());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        store.put("/tls/a", b"1".to_vec(), None).await.unwrap();
        assert_eq!(store.range("/tls/").await.unwrap().kvs.len(), 1);

        let refused = EtcdStore::connect(endpoints, None).await.err().expect("https without a CA");
        assert!(refused.to_string().contains("--etcd-tls-dir"), "{refused}");

        // The CA alone: etcd wants a client certificate, so nothing can be read.
        let ca_only = tempfile::tempdir().unwrap();
        std::fs::copy(certs.path().join("ca.crt"), ca_only.path().join("ca.crt")).unwrap();
        let no_cert = EtcdTls { dir: ca_only.path().to_owned() };
        let read = async { EtcdStore::connect(endpoints, Some(&no_cert)).await?.range("/").await };
        assert!(read.await.is_err(), "etcd --client-cert-auth let in a client without a certificate");

        std::fs::remove_file(ca_only.path().join("ca.crt")).unwrap();
        std::fs::copy(certs.path().join("tls.crt"), ca_only.path().join("tls.crt")).unwrap();
        let broken = EtcdStore::connect(endpoints, Some(&no_cert)).await.err().expect("no CA");
        assert!(broken.to_string().contains("ca.crt is missing"), "{broken}");
    }

    /// The conformance suite against a real etcd (one server for all of it: etcd takes a second to start).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_store_passes_the_conformance_suite() {
        let etcd = EtcdServer::start().await;
        let store = etcd.store().await;
        conformance::put_get_range(&store, "/c/range/").await;
        conformance::compare_and_swap(&store, "/c/cas/").await;
        conformance::transactions_are_atomic(&store, "/c/txn/").await;
        conformance::watches_resume_without_missing_or_repeating(&store, "/c/watch/").await;
        // etcd rounds TTLs below its minimum (about 1.5 s) up, so ask for 2 s.
        conformance::leases_expire_renew_and_revoke(&store, "/c/lease/", Duration::from_secs(2)).await;
        conformance::leader_election(std::sync::Arc::new(store.clone()), "/c/leader/").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_from_a_compacted_revision_says_so() {
        let etcd = EtcdServer::start().await;
        let store = etcd.store().await;
        let first = store.put("/k/a", b"1".to_vec(), None).await.unwrap();
        let last = store.put("/k/a", b"2".to_vec(), None).await.unwrap();
        store.compact(last).await.unwrap();
        match store.watch("/k/", first - 1).next().await {
            Some(Err(StoreError::Compacted { oldest, .. })) => assert_eq!(oldest, last),
            other => panic!("expected a compaction error, got {other:?}"),
        }
        let mut fresh = store.watch("/k/", last);
        store.put("/k/a", b"3".to_vec(), None).await.unwrap();
        assert!(matches!(fresh.next().await, Some(Ok(WatchEvent::Put(kv))) if kv.value == b"3"));
    }

    #[test]
    fn etcd_errors_are_classified_by_grpc_code_not_by_message() {
        use etcd_client::Error as E;
        let status = |code: Code, message: &str| E::GRpcStatus(tonic::Status::new(code, message));
        let lease = LeaseId(7);
        let cases = [
            // The messages say one thing and the codes another: the codes decide.
            (
                status(Code::Unavailable, "etcdserver: requested lease not found"),
                About::Lease(lease),
                "unavailable",
            ),
            (status(Code::NotFound, "something else entirely"), About::Lease(lease), "lease not found"),
            (status(Code::DeadlineExceeded, "context deadline exceeded"), About::Nothing, "unavailable"),
            (status(Code::ResourceExhausted, "etcdserver: too many requests"), About::Nothing, "unavailable"),
            (status(Code::Unknown, "h2 protocol error"), About::Nothing, "unavailable"),
            (
                status(Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
                About::Revision(5),
                "compacted",
            ),
            // OutOfRange about no revision (a lease TTL above etcd's maximum) is a refusal, and so is
            // NotFound about no lease.
            (status(Code::OutOfRange, "etcdserver: too large lease TTL"), About::Nothing, "rejected"),
            (status(Code::NotFound, "etcdserver: requested lease not found"), About::Nothing, "rejected"),
            (
                status(Code::InvalidArgument, "etcdserver: too many operations in txn request"),
                About::Nothing,
                "rejected",
            ),
            (status(Code::PermissionDenied, "unavailable"), About::Nothing, "rejected"),
            (
                status(Code::Unauthenticated, "etcdserver: invalid auth token"),
                About::Lease(lease),
                "rejected",
            ),
            // Errors that never got an answer from etcd.
            (E::IoError(std::io::ErrorKind::ConnectionRefused.into()), About::Nothing, "unavailable"),
            (E::WatchError("channel closed".into()), About::Revision(5), "unavailable"),
            (E::InvalidArgs("empty endpoints".into()), About::Nothing, "rejected"),
        ];
        for (error, about, expected) in cases {
            let described = format!("{error} about {about:?}");
            let got = match store_error(error, about) {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::LeaseNotFound(l) if l == lease => "lease not found",
                StoreError::Compacted { requested: 5, oldest: 5 } => "compacted",
                StoreError::Rejected(_) => "rejected",
                other => panic!("{described}: unexpected {other:?}"),
            };
            assert_eq!(got, expected, "{described}");
        }
    }

    /// etcd's real answers, through the classification: refusals, lost leases and compacted history
    /// each come out as themselves, none as an outage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_refusals_lost_leases_and_compactions_are_told_apart() {
        let etcd = EtcdServer::start().await;
        let store = etcd.store().await;
        // etcd answers a TTL above its maximum (9e9 s) with OutOfRange, which is no compaction.
        let err = store.grant_lease(Duration::from_secs(10_000_000_000)).await.unwrap_err();
        assert!(matches!(err, StoreError::Rejected(_)), "{err}");
        let gone = LeaseId(0x7fff_0000);
        let err = store.put("/e/k", b"x".to_vec(), Some(gone)).await.unwrap_err();
        assert_eq!(err, StoreError::LeaseNotFound(gone));
        assert_eq!(store.revoke_lease(gone).await.unwrap_err(), StoreError::LeaseNotFound(gone));
        assert_eq!(store.keep_alive(gone).await.unwrap_err(), StoreError::LeaseNotFound(gone));
        let last = store.put("/e/k", b"y".to_vec(), None).await.unwrap();
        store.compact(last).await.unwrap();
        let err = store.compact(last).await.unwrap_err();
        assert_eq!(err, StoreError::Compacted { requested: last, oldest: last });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_etcd_is_unavailable_not_a_hang() {
        let etcd = EtcdServer::start().await;
        let store = etcd.store().await;
        drop(etcd);
        let err = tokio::time::timeout(Duration::from_secs(30), store.range("/"))
            .await
            .expect("answers within its timeout")
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    }
}
