//! Fault injection (docs/faults.md): whole pods on a real etcd with real ONNX models, each test
//! turning on named fail points and checking that the pod degrades as documented and heals. Built
//! only with the `failpoints` feature:
//! `cargo test -p densemesh-mesh --features failpoints --lib fault_tests`.
//!
//! ONNX Runtime allows one environment per process and every pod makes one, so each test runs alone
//! in a child process of the test binary ([`in_child`]), its pod in that process where the fail
//! points reach it; a second pod runs in a process of its own ([`Pod::spawn`]), out of their reach.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use densemesh_placement::Store;
use densemesh_placement::store::EtcdStore;
use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::model_infer_request::InferInputTensor;
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;
use densemesh_proto::mmesh::model_status_info::ModelStatus;
use densemesh_proto::mmesh::{GetStatusRequest, ModelStatusInfo};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{Cli, Command as MeshCommand};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/models");
const PREFIX: &str = "faults";

/// What the pods of this process have logged (tracing, every level from info), for tests that must
/// show something was logged.
fn logs() -> Arc<parking_lot::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<parking_lot::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = logs.clone();
        let writer = move || LogWriter(sink.clone());
        let filter = tracing_subscriber::EnvFilter::new("info,densemesh_mesh=debug");
        let _ =
            tracing_subscriber::fmt().with_ansi(false).with_env_filter(filter).with_writer(writer).try_init();
        logs
    })
    .clone()
}

struct LogWriter(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts a test's logs afresh (tests run one at a time, under their `FailScenario`).
fn fresh_logs() {
    logs().lock().clear();
}

fn logged(text: &str) -> bool {
    String::from_utf8_lossy(&logs().lock()).contains(text)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Debian's etcd on free loopback ports with its own data dir, stopped on drop. Fails loudly when
/// etcd is not installed.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "faults", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("faults={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (Debian's etcd-server; scripts/setup.sh installs it)");
        let etcd = Self { child, endpoint, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(store) = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), None).await
                && store.range("/").await.is_ok()
            {
                return etcd;
            }
            assert!(Instant::now() < deadline, "etcd did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many keys etcd holds under `/faults/<what>/`, asked through etcd's JSON gateway over
    /// plain HTTP, as an operator's tool would: not through `EtcdStore`, whose fail points the test
    /// turns on.
    async fn count(&self, what: &str) -> usize {
        let prefix = format!("/{PREFIX}/{what}/");
        let end = format!("/{PREFIX}/{what}0"); // '0' follows '/'
        let body = format!(
            r#"{{"key":"{}","range_end":"{}","count_only":true}}"#,
            base64(prefix.as_bytes()),
            base64(end.as_bytes())
        );
        let host = self.endpoint.trim_start_matches("http://").to_owned();
        let request = format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let response = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(&host)?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok::<_, std::io::Error>(response)
        })
        .await
        .unwrap()
        .expect("etcd's gateway answers");
        let json = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        let answer: serde_json::Value = serde_json::from_str(json).expect("a JSON answer");
        // int64 fields come as strings, and an absent count is 0.
        answer["count"].as_str().map_or(0, |n| n.parse().expect("a count"))
    }
}

/// Standard base64, for etcd's gateway.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A model repository holding the iris example under each of `names`.
fn repository(names: &[&str]) -> tempfile::TempDir {
    let repo = tempfile::tempdir().expect("temp dir");
    for name in names {
        std::fs::create_dir_all(repo.path().join(name)).unwrap();
        std::fs::copy(
            Path::new(EXAMPLES).join("iris-logreg/model.onnx"),
            repo.path().join(name).join("model.onnx"),
        )
        .expect("examples/models/iris-logreg/model.onnx");
    }
    repo
}

/// Set in a child process of this test binary: the JSON [`PodArgs`] of the pod it serves
/// ([`pod_process`]).
const POD_ENV: &str = "DENSEMESH_FAULT_TEST_POD";
/// Set in a child process of this test binary that runs one fault test ([`in_child`]).
const CHILD_ENV: &str = "DENSEMESH_FAULT_TEST_CHILD";

/// ONNX Runtime allows one environment per process and every pod makes one, so each test runs in a
/// process of its own: in the parent (`cargo test`) this runs the test `name` alone in a child
/// process of this binary, one test at a time, and returns false; in that child it returns true, and
/// the test goes on.
fn in_child(name: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock();
    let status = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", &format!("fault_tests::{name}"), "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .status()
        .expect("run the test in a child process");
    assert!(status.success(), "fault_tests::{name} failed in its child process (its output is above)");
    false
}

/// What a pod is started with.
#[derive(serde::Serialize, serde::Deserialize)]
struct PodArgs {
    etcd: String,
    repo: std::path::PathBuf,
    id: String,
    flags: Vec<String>,
    /// Where it writes its addresses (`addr.json`) and keeps its disk cache.
    dir: std::path::PathBuf,
}

impl PodArgs {
    fn config(&self) -> crate::ServeConfig {
        let path = |p: &Path| p.display().to_string();
        let mut args: Vec<String> =
            ["meshd", "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]
                .into_iter()
                .chain(["--metrics-addr", "127.0.0.1:0", "--etcd", &self.etcd, "--etcd-prefix", PREFIX])
                .chain(["--instance-id", &self.id])
                .map(str::to_owned)
                .collect();
        args.extend(["--model-repo".into(), path(&self.repo)]);
        args.extend(["--addr-file".into(), path(&self.dir.join("addr.json"))]);
        args.extend(["--cache-dir".into(), path(&self.dir.join("cache"))]);
        args.extend(self.flags.iter().cloned());
        let MeshCommand::Serve(serve) = Cli::try_parse_from(args).expect("flags").command;
        serve.into_config().expect("config")
    }
}

/// Not a test: the body of a pod process that a fault test starts ([`Pod::spawn`]), serving until it
/// is killed. Ignored, so a plain `cargo test` never runs it; without its arguments it does nothing.
#[ignore = "a pod process started by the fault tests"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_process() {
    let Some(args) = std::env::var_os(POD_ENV) else { return };
    let args: PodArgs = serde_json::from_str(&args.to_string_lossy()).expect("pod arguments");
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    crate::run(args.config(), metrics, std::future::pending()).await.expect("the pod serves");
}

/// How a [`Pod`] runs.
enum Running {
    /// In this process, until the token is cancelled.
    Here { stop: CancellationToken, served: tokio::task::JoinHandle<Result<(), crate::ServeError>> },
    /// In a child process, until it is killed.
    Child(KillOnDrop),
}

/// One meshd on loopback ports the kernel picks: in this process (where fail points reach it), or
/// in a child process (a second pod: see [`in_child`]).
struct Pod {
    running: Running,
    infer: GrpcInferenceServiceClient<Channel>,
    mesh: ModelMeshClient<Channel>,
    _dir: tempfile::TempDir,
}

impl Pod {
    fn args(etcd: &Etcd, repo: &Path, id: &str, flags: &[&str], dir: &Path) -> PodArgs {
        PodArgs {
            etcd: etcd.endpoint.clone(),
            repo: repo.to_owned(),
            id: id.to_owned(),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            dir: dir.to_owned(),
        }
    }

    /// A pod in this process.
    async fn start(etcd: &Etcd, repo: &Path, id: &str, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Self::args(etcd, repo, id, flags, dir.path()).config();
        let stop = CancellationToken::new();
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        let served = tokio::spawn(crate::run(config, metrics, stop.clone().cancelled_owned()));
        Self::connect(Running::Here { stop, served }, dir, id).await
    }

    /// A pod in a child process: fail points set here do not reach it.
    async fn spawn(etcd: &Etcd, repo: &Path, id: &str, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let args = serde_json::to_string(&Self::args(etcd, repo, id, flags, dir.path())).unwrap();
        let child = Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--exact", "fault_tests::pod_process", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(POD_ENV, args)
            .env_remove(CHILD_ENV)
            .stdout(Stdio::null())
            .spawn()
            .expect("start a pod process");
        Self::connect(Running::Child(KillOnDrop(child)), dir, id).await
    }

    async fn connect(mut running: Running, dir: tempfile::TempDir, id: &str) -> Self {
        let addr_file = dir.path().join("addr.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        let grpc_addr = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && let Ok(addrs) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(addr) = addrs["grpc_addr"].as_str()
            {
                break addr.to_owned();
            }
            match &mut running {
                Running::Here { served, .. } if served.is_finished() => {
                    panic!("pod {id} stopped while starting: {:?}", served.await)
                }
                Running::Child(KillOnDrop(child)) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("pod {id}'s process ended while starting: {status}");
                    }
                }
                Running::Here { .. } => {}
            }
            assert!(Instant::now() < deadline, "pod {id} did not listen within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let channel = Channel::from_shared(format!("http://{grpc_addr}")).unwrap().connect_lazy();
        Self {
            running,
            infer: GrpcInferenceServiceClient::new(channel.clone()),
            mesh: ModelMeshClient::new(channel),
            _dir: dir,
        }
    }

    async fn infer(&self, model: &str) -> Result<ModelInferResponse, tonic::Status> {
        self.infer.clone().model_infer(iris_request(model)).await.map(tonic::Response::into_inner)
    }

    async fn status(&self, model: &str) -> ModelStatusInfo {
        let request = GetStatusRequest { model_id: model.to_owned() };
        self.mesh.clone().get_model_status(request).await.expect("getModelStatus").into_inner()
    }

    /// Waits until the registry (through the leader's repository sync) knows `model`.
    async fn registered(&self, model: &str) {
        eventually(Duration::from_secs(30), "the model to be registered", move || async move {
            self.status(model).await.status != ModelStatus::NotFound as i32
        })
        .await;
    }

    async fn stop(self) {
        match self.running {
            Running::Here { stop, served } => {
                stop.cancel();
                let stopped = tokio::time::timeout(Duration::from_secs(30), served).await;
                stopped.expect("the pod stops").expect("the pod's task").expect("the pod stops cleanly");
            }
            Running::Child(child) => drop(child),
        }
    }
}

/// A pod process, killed when its test ends, passed or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iris_request(model: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_owned(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![2, 4],
            contents: Some(InferTensorContents {
                fp32_contents: vec![5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What an answer says, without who said it (`model_version`, `id`): two pods serving one model
/// must say exactly this.
fn answer(response: &ModelInferResponse) -> (String, Vec<u8>) {
    (format!("{:?}", response.outputs), response.raw_output_contents.concat())
}

/// Waits, polling, until `condition` holds.
async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const ETCD_POINTS: [&str; 6] =
    ["etcd.range", "etcd.txn", "etcd.grant_lease", "etcd.keep_alive", "etcd.revoke_lease", "etcd.watch"];

/// etcd slow, then unreachable past the lease TTL and the outage grace, then back: loaded models
/// serve throughout, writes wait (slow) or fail UNAVAILABLE (down), new loads are refused with the
/// reason once the grace is over, and when etcd answers again the pod rejoins and republishes its
/// copies, and new loads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_slow_then_down_keeps_loaded_models_serving_and_the_pod_rejoins() {
    if !in_child("etcd_slow_then_down_keeps_loaded_models_serving_and_the_pod_rejoins") {
        return;
    }
    let scenario = fail::FailScenario::setup();
    fresh_logs();
    let etcd = Etcd::start().await;
    let etcd = &etcd;
    let repo = repository(&["warm", "cold"]);
    let flags = ["--lease-ttl", "3s", "--registry-outage-grace", "2s"];
    let pod = Pod::start(etcd, repo.path(), "pod-a", &flags).await;
    pod.registered("cold").await;
    let reference = answer(&pod.infer("warm").await.expect("warm loads"));
    eventually(Duration::from_secs(10), "the copy's placement record", move || async move {
        etcd.count("placements/warm").await == 1
    })
    .await;

    // Slow: every etcd call answers 1.5 s late. Inference never waits on etcd.
    for point in ETCD_POINTS {
        fail::cfg(point, "return(1500)").unwrap();
    }
    let started = Instant::now();
    assert_eq!(answer(&pod.infer("warm").await.expect("served while etcd is slow")), reference);
    assert!(started.elapsed() < Duration::from_secs(1), "inference waited on etcd: {:?}", started.elapsed());

    // Down, past the lease TTL (etcd itself drops the lease and the pod's records with it).
    for point in ETCD_POINTS {
        fail::cfg(point, "return").unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        answer(&pod.infer("warm").await.expect("a loaded model serves through the outage")),
        reference
    );
    let refused = pod.infer("cold").await.expect_err("no new load while the registry is down past its grace");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("registry (etcd) has not answered"), "{}", refused.message());
    assert_eq!(etcd.count("placements/warm").await, 0, "the lease ran out in etcd");

    // Back: the pod rejoins with a new lease, republishes its copy, and loads again.
    for point in ETCD_POINTS {
        fail::remove(point);
    }
    eventually(Duration::from_secs(15), "the pod to republish its copy", move || async move {
        etcd.count("placements/warm").await == 1 && etcd.count("instances").await == 1
    })
    .await;
    let p = &pod;
    eventually(Duration::from_secs(15), "new loads once etcd answers", move || async move {
        p.infer("cold").await.is_ok()
    })
    .await;
    assert_eq!(answer(&pod.infer("cold").await.unwrap()), reference, "the same model under another name");
    assert!(logged("rejoining") || logged("joined the registry"), "the rejoin is logged");
    pod.stop().await;
    scenario.teardown();
}

/// A runtime whose load panics: the process survives, the model is LOADING_FAILED with the panic as
/// the reason, the panic is logged, other models keep serving, and the model loads once the back-off
/// has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runtime_load_that_panics_fails_that_load_only() {
    if !in_child("a_runtime_load_that_panics_fails_that_load_only") {
        return;
    }
    let scenario = fail::FailScenario::setup();
    fresh_logs();
    let etcd = Etcd::start().await;
    let etcd = &etcd;
    let repo = repository(&["steady", "fragile"]);
    let pod = Pod::start(etcd, repo.path(), "pod-a", &["--load-retry-backoff", "1s"]).await;
    pod.registered("fragile").await;
    let reference = answer(&pod.infer("steady").await.expect("loads"));

    fail::cfg("runtime.load", "1*panic(the runtime fell over)").unwrap();
    let failed = pod.infer("fragile").await.expect_err("its load panicked");
    assert!(failed.message().contains("panicked"), "{failed:?}");
    let status = pod.status("fragile").await;
    assert_eq!(status.status, ModelStatus::LoadingFailed as i32, "{status:?}");
    assert!(status.errors.iter().any(|e| e.contains("the runtime fell over")), "{status:?}");
    assert!(logged("the runtime fell over"), "the panic is logged");
    assert_eq!(answer(&pod.infer("steady").await.expect("the pod still serves")), reference);

    let p = &pod;
    eventually(Duration::from_secs(10), "a load after the back-off", move || async move {
        p.infer("fragile").await.is_ok()
    })
    .await;
    assert_eq!(pod.status("fragile").await.status, ModelStatus::Loaded as i32);
    pod.stop().await;
    scenario.teardown();
}

/// A load slower than --load-timeout: the request hears so at the deadline (the model is
/// LOADING_FAILED, the flag named), the pod keeps serving, and the model loads on a later try.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_slower_than_the_load_timeout_fails_at_the_deadline_and_loads_later() {
    if !in_child("a_load_slower_than_the_load_timeout_fails_at_the_deadline_and_loads_later") {
        return;
    }
    let scenario = fail::FailScenario::setup();
    fresh_logs();
    let etcd = Etcd::start().await;
    let etcd = &etcd;
    let repo = repository(&["steady", "slow"]);
    // A quick load runs on the async thread, where nothing can interrupt it: the deadline guards loads
    // on the blocking pool, which a stalled runtime's are.
    let flags = ["--load-timeout", "1s", "--load-retry-backoff", "1s", "--inline-load-max-bytes", "0"];
    let pod = Pod::start(etcd, repo.path(), "pod-a", &flags).await;
    pod.registered("slow").await;
    let reference = answer(&pod.infer("steady").await.expect("loads"));

    fail::cfg("runtime.load", "1*sleep(4000)").unwrap();
    let started = Instant::now();
    let failed = pod.infer("slow").await.expect_err("slower than --load-timeout");
    assert!(started.elapsed() < Duration::from_secs(3), "answered at the deadline, {:?}", started.elapsed());
    assert!(failed.message().contains("--load-timeout"), "{failed:?}");
    let status = pod.status("slow").await;
    assert_eq!(status.status, ModelStatus::LoadingFailed as i32, "{status:?}");
    assert_eq!(answer(&pod.infer("steady").await.expect("serving goes on")), reference);

    let p = &pod;
    eventually(Duration::from_secs(15), "the model to load on a later try", move || async move {
        p.infer("slow").await.is_ok()
    })
    .await;
    assert_eq!(answer(&pod.infer("slow").await.unwrap()), reference);
    pod.stop().await;
    scenario.teardown();
}

/// A peer that resets the connection while its answer is on the way: the request is served anyway
/// (by another copy, or here) with the same answer, never a broken one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_resets_mid_answer_costs_a_retry_not_a_wrong_answer() {
    if !in_child("a_peer_that_resets_mid_answer_costs_a_retry_not_a_wrong_answer") {
        return;
    }
    let scenario = fail::FailScenario::setup();
    fresh_logs();
    let etcd = Etcd::start().await;
    let etcd = &etcd;
    let repo = repository(&["shared"]);
    // pod-a holds the model, in a process of its own; pod-b, here, forwards to it and has its
    // connection reset.
    let a = Pod::spawn(etcd, repo.path(), "pod-a", &[]).await;
    let b = Pod::start(etcd, repo.path(), "pod-b", &[]).await;
    a.registered("shared").await;
    b.registered("shared").await;
    let reference = answer(&a.infer("shared").await.expect("loads on pod-a"));
    let pb = &b;
    eventually(Duration::from_secs(10), "pod-b to see pod-a's copy", move || async move {
        pb.status("shared").await.model_copy_infos.iter().any(|c| c.location == "pod-a")
    })
    .await;
    assert_eq!(answer(&b.infer("shared").await.expect("forwarded to pod-a")), reference);

    fail::cfg("wire.answer_reset", "1*return").unwrap();
    assert_eq!(answer(&b.infer("shared").await.expect("served despite the reset")), reference);
    assert!(logged("connection reset by peer"), "the reset reached the forwarding pod");
    for _ in 0..5 {
        assert_eq!(answer(&b.infer("shared").await.expect("and after it")), reference);
    }
    b.stop().await;
    a.stop().await;
    scenario.teardown();
}

/// The wall clock stepped an hour forward during a short etcd blip, then an hour back: the blip is
/// not taken for an hour-long outage (new loads go on within the grace), and the lease, kept by etcd
/// on its own clock and renewed on the monotonic one, is never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clock_jump_neither_refuses_loads_nor_loses_the_lease() {
    if !in_child("a_clock_jump_neither_refuses_loads_nor_loses_the_lease") {
        return;
    }
    let scenario = fail::FailScenario::setup();
    fresh_logs();
    let etcd = Etcd::start().await;
    let etcd = &etcd;
    let repo = repository(&["first", "second", "third"]);
    let flags = ["--lease-ttl", "6s", "--registry-outage-grace", "30s"];
    let pod = Pod::start(etcd, repo.path(), "pod-a", &flags).await;
    pod.registered("third").await;
    let reference = answer(&pod.infer("first").await.expect("loads"));
    assert_eq!(etcd.count("instances").await, 1);

    // A heartbeat fails (the blip begins), then the clock jumps an hour ahead.
    fail::cfg("etcd.keep_alive", "return").unwrap();
    eventually(Duration::from_secs(5), "a failed heartbeat", move || async move { logged("cannot renew") })
        .await;
    fail::cfg("clock.jump", "return(3600)").unwrap();
    assert_eq!(
        answer(&pod.infer("second").await.expect("a blip seconds long is within the grace")),
        reference
    );
    fail::remove("etcd.keep_alive");

    // And an hour back: the lease lives on, renewed every TTL/3 by the monotonic clock.
    fail::cfg("clock.jump", "return(-3600)").unwrap();
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert_eq!(etcd.count("instances").await, 1, "the instance record outlived the jumps");
    assert!(!logged("rejoining"), "and its lease too: the pod never had to rejoin");
    assert_eq!(etcd.count("placements/second").await, 1, "and so did the copies' records");
    assert_eq!(answer(&pod.infer("third").await.expect("loads")), reference);
    fail::remove("clock.jump");
    pod.stop().await;
    scenario.teardown();
}
