//! The remote runtime against real MLServer processes, from the `.venv-mlserver` that `scripts/setup.sh`
//! makes. The models are trained by `make_models.py` in that venv, so the servers run them with the same
//! libraries that computed the expected answers. Missing MLServer fails these tests; they never skip.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use densemesh_runtime_core::{
    DataType, Error, InferRequest, LoadRequest, LoadedModel, Runtime, Tensor, TensorData,
};
use densemesh_runtime_remote::proto::RepositoryIndexRequest;
use densemesh_runtime_remote::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_runtime_remote::{Liveness, RemoteRuntime, RemoteRuntimeConfig};
use serde::Deserialize;

/// What the Python models answered (`make_models.py`).
#[derive(Deserialize)]
struct Expected {
    input: Vec<Vec<f64>>,
    sklearn_predict: Vec<i64>,
    sklearn_predict_proba: Vec<Vec<f64>>,
    xgboost_predict: Vec<f32>,
}

struct Models {
    dir: PathBuf,
    expected: Expected,
}

fn venv_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv-mlserver/bin");
    assert!(
        bin.join("mlserver").is_file() && bin.join("python").is_file(),
        "MLServer is missing from {}: run scripts/setup.sh to install it (tests/requirements-mlserver.txt)",
        bin.display()
    );
    bin
}

/// The test models, trained once per test binary.
fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("remote-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the models directory");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_models.py");
        let status = std::process::Command::new(venv_bin().join("python"))
            .arg(&script)
            .arg(&dir)
            .status()
            .expect("run make_models.py");
        assert!(status.success(), "make_models.py failed: {status}");
        let text = std::fs::read_to_string(dir.join("expected.json")).expect("read expected.json");
        Models { expected: serde_json::from_str(&text).expect("parse expected.json"), dir }
    })
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("densemesh_runtime_remote=info")
        .with_test_writer()
        .try_init();
}

/// A pool of MLServer processes with generous deadlines (tests run side by side on small machines) and
/// a short restart back-off.
fn start(processes: usize) -> (RemoteRuntime, tempfile::TempDir) {
    start_with(processes, |_| {})
}

fn start_with(
    processes: usize,
    adjust: impl FnOnce(&mut RemoteRuntimeConfig),
) -> (RemoteRuntime, tempfile::TempDir) {
    init_tracing();
    let repository = tempfile::tempdir().expect("tempdir");
    let mut config = RemoteRuntimeConfig::mlserver(venv_bin().join("mlserver").to_string_lossy(), processes);
    config.repository = Some(repository.path().to_owned());
    config.timeouts.startup = Duration::from_secs(180);
    config.timeouts.load = Duration::from_secs(120);
    config.restart_backoff = Duration::from_millis(100);
    adjust(&mut config);
    let runtime = RemoteRuntime::start(config).expect("MLServer pool starts");
    (runtime, repository)
}

/// Sends `signal` to a process with the `kill` command.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// An MLServer the test starts itself, killed when dropped.
struct External {
    child: std::process::Child,
    grpc_port: u16,
    repository: tempfile::TempDir,
}

impl External {
    fn start() -> Self {
        let port =
            || std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let (grpc_port, http_port, metrics_port) = (port(), port(), port());
        let repository = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new(venv_bin().join("mlserver"))
            .arg("start")
            .arg(repository.path())
            .env("MLSERVER_HOST", "127.0.0.1")
            .env("MLSERVER_GRPC_PORT", grpc_port.to_string())
            .env("MLSERVER_HTTP_PORT", http_port.to_string())
            .env("MLSERVER_METRICS_PORT", metrics_port.to_string())
            .env("MLSERVER_PARALLEL_WORKERS", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mlserver");
        Self { child, grpc_port, repository }
    }
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(runtime: &RemoteRuntime, model_id: &str, model_type: &str, file: &str) -> Box<dyn LoadedModel> {
    let request = LoadRequest::from_path(model_id, models().dir.join(file)).with_model_type(model_type);
    runtime.load(&request).unwrap_or_else(|e| panic!("load {model_id}: {e}"))
}

fn input_fp64() -> Tensor {
    let rows = &models().expected.input;
    let bytes: Vec<u8> = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    Tensor {
        name: "input-0".into(),
        datatype: DataType::Fp64,
        shape: vec![rows.len() as i64, rows[0].len() as i64],
        data: TensorData::Raw(Bytes::from(bytes)),
    }
}

fn input_fp32() -> Tensor {
    let rows = &models().expected.input;
    let bytes: Vec<u8> = rows.iter().flatten().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    Tensor { datatype: DataType::Fp32, data: TensorData::Raw(Bytes::from(bytes)), ..input_fp64() }
}

fn raw(tensor: &Tensor) -> &[u8] {
    match &tensor.data {
        TensorData::Raw(bytes) => bytes,
        TensorData::Strings(_) => panic!("{} is BYTES", tensor.name),
    }
}

fn values<const N: usize, T>(tensor: &Tensor, decode: fn([u8; N]) -> T) -> Vec<T> {
    raw(tensor).chunks_exact(N).map(|c| decode(c.try_into().expect("chunk"))).collect()
}

fn sklearn_predictions(model: &dyn LoadedModel) -> Result<Vec<i64>, Error> {
    let outputs = model.infer(InferRequest { inputs: vec![input_fp64()], outputs: vec![] })?;
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert_eq!(outputs[0].datatype, DataType::Int64);
    Ok(values(&outputs[0], i64::from_le_bytes))
}

/// Loaded models' names and states in a process's repository index.
fn index(endpoint: &str) -> Vec<(String, String)> {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    tokio.block_on(async {
        let mut client = GrpcInferenceServiceClient::connect(endpoint.to_owned()).await.expect("connect");
        let index =
            client.repository_index(RepositoryIndexRequest::default()).await.expect("index").into_inner();
        index.models.into_iter().map(|m| (m.name, m.state)).collect()
    })
}

/// What joblib itself says when it loads `file`: the message of the exception it raises.
fn python_error_loading(file: &Path) -> String {
    let output = std::process::Command::new(venv_bin().join("python"))
        .args([
            "-c",
            "import joblib, sys\ntry:\n    joblib.load(sys.argv[1])\nexcept Exception as e:\n    print(e)",
        ])
        .arg(file)
        .output()
        .expect("run python");
    let reason = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(!reason.is_empty(), "joblib loaded {}", file.display());
    reason
}

fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn answers_equal_the_python_models() {
    let (runtime, _repository) = start(2);
    let expected = &models().expected;
    let sklearn = load(&runtime, "iris-like", "sklearn", "sklearn.joblib");
    let xgboost = load(&runtime, "boosted", "xgboost", "xgboost.json");
    let spread: Vec<usize> = runtime.processes().iter().map(|p| p.models).collect();
    assert_eq!(spread, [1, 1], "each model goes to the least loaded process");
    assert!(
        sklearn.metadata().inputs.is_empty() && sklearn.metadata().outputs.is_empty(),
        "undeclared interface"
    );
    assert_eq!(sklearn.size_bytes(), 1_000_000, "a small file is charged the floor");

    assert_eq!(sklearn_predictions(sklearn.as_ref()).expect("infer"), expected.sklearn_predict);

    let outputs = sklearn
        .infer(InferRequest { inputs: vec![input_fp64()], outputs: vec!["predict_proba".into()] })
        .expect("infer predict_proba");
    assert_eq!(outputs[0].shape, [5, 2]);
    let proba = values(&outputs[0], f64::from_le_bytes);
    for (got, want) in proba.iter().zip(expected.sklearn_predict_proba.iter().flatten()) {
        assert!((got - want).abs() < 1e-9, "predict_proba {got} vs {want}");
    }

    // A batch larger than gRPC's default 4 MiB message, which maxMessageBytes (16 MiB) lets through
    // both ways.
    let rows = 150_000;
    let big: Vec<u8> = (0..rows * 4).flat_map(|i| ((i % 97) as f64 / 97.0).to_le_bytes()).collect();
    let big = Tensor { shape: vec![rows as i64, 4], data: TensorData::Raw(Bytes::from(big)), ..input_fp64() };
    let outputs =
        sklearn.infer(InferRequest { inputs: vec![big], outputs: vec![] }).expect("a 4.8 MB request");
    assert_eq!(outputs[0].shape, [rows as i64, 1]);

    // From a blocking thread of another tokio runtime, as the mesh calls it.
    let caller =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio");
    let xgboost: std::sync::Arc<dyn LoadedModel> = xgboost.into();
    let model = xgboost.clone();
    let outputs = caller
        .block_on(async move {
            tokio::task::spawn_blocking(move || {
                model.infer(InferRequest { inputs: vec![input_fp32()], outputs: vec![] })
            })
            .await
        })
        .expect("join")
        .expect("infer xgboost");
    let predictions = values(&outputs[0], f32::from_le_bytes);
    assert_eq!(predictions.len(), expected.xgboost_predict.len());
    for (got, want) in predictions.iter().zip(&expected.xgboost_predict) {
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "xgboost {got} vs {want}");
    }
}

#[test]
fn a_dropped_model_is_unloaded_from_the_server() {
    let (runtime, _repository) = start(1);
    let model = load(&runtime, "to-drop", "sklearn", "sklearn.joblib");
    let endpoint = runtime.processes()[0].endpoint.clone().expect("up");
    // MLServer 1.7 spells the state as its Python enum prints (`State.READY`); V2 says `READY`.
    let ready = |index: &[(String, String)]| {
        index
            .iter()
            .any(|(name, state)| name == "to-drop" && matches!(state.as_str(), "READY" | "State.READY"))
    };
    assert!(ready(&index(&endpoint)), "loaded: {:?}", index(&endpoint));
    drop(model);
    assert_eq!(runtime.processes()[0].models, 0, "the ledger forgets the model at once");
    eventually("MLServer unloads the dropped model", Duration::from_secs(30), || !ready(&index(&endpoint)));
    let settings = runtime.processes()[0].repository.join("to-drop");
    eventually("its settings leave the repository", Duration::from_secs(10), || !settings.exists());
}

#[test]
fn a_killed_server_loses_its_models_and_a_fresh_load_succeeds_after_the_restart() {
    let (runtime, _repository) = start(1);
    let model = load(&runtime, "victim", "sklearn", "sklearn.joblib");
    assert_eq!(sklearn_predictions(model.as_ref()).expect("infer"), models().expected.sklearn_predict);
    let pid = runtime.processes()[0].pid.expect("a pid");
    signal(pid, "-KILL");

    let asked = Instant::now();
    match sklearn_predictions(model.as_ref()) {
        Err(Error::Lost { model_id, reason }) => {
            assert_eq!(model_id, "victim");
            assert!(reason.contains("process 0"), "{reason}");
        }
        other => panic!("expected Error::Lost, got {other:?}"),
    }
    assert!(asked.elapsed() < Duration::from_secs(5), "lost promptly, not after {:?}", asked.elapsed());
    // Still lost, without a network call, however often it is asked.
    assert!(matches!(sklearn_predictions(model.as_ref()), Err(Error::Lost { .. })));
    drop(model);

    // The load waits for the restarted process.
    let again = load(&runtime, "victim", "sklearn", "sklearn.joblib");
    assert_eq!(
        sklearn_predictions(again.as_ref()).expect("infer after restart"),
        models().expected.sklearn_predict
    );
    let process = &runtime.processes()[0];
    assert_eq!(process.generation, 2, "restarted once");
    assert_ne!(process.pid, Some(pid));
    assert!(process.last_exit.is_none(), "{:?}", process.last_exit);
}

#[test]
fn a_model_the_server_cannot_load_fails_with_its_reason() {
    let (runtime, repository) = start(1);
    let broken = repository.path().join("broken.joblib");
    std::fs::write(&broken, b"this is not a pickle").expect("write");
    let request = LoadRequest::from_path("broken", &broken).with_model_type("sklearn");
    let Err(error) = runtime.load(&request) else { panic!("a garbage file loaded") };
    let message = error.to_string();
    assert!(matches!(error, Error::Load { ref model_id, .. } if model_id == "broken"), "{error:?}");
    assert!(message.contains("RepositoryModelLoad failed"), "{message}");
    let reason = python_error_loading(&broken);
    assert!(message.contains(&reason), "MLServer's reason ({reason:?}, what joblib says): {message}");
    assert_eq!(runtime.processes()[0].models, 0);
    assert!(!runtime.processes()[0].repository.join("broken").exists(), "its settings are removed");
    // A format the runtime does not serve is refused before any server sees it.
    let onnx = LoadRequest::from_path("an-onnx-model", &broken).with_model_type("onnx");
    let Err(error) = runtime.load(&onnx) else { panic!("loaded an onnx model into MLServer") };
    assert!(error.to_string().contains("not \"onnx\""), "{error}");
    // The process is fine: a good model loads next.
    let model = load(&runtime, "good", "sklearn", "sklearn.joblib");
    assert_eq!(sklearn_predictions(model.as_ref()).expect("infer"), models().expected.sklearn_predict);
}

#[test]
fn a_hung_server_fails_requests_at_their_deadline() {
    let (runtime, _repository) = start_with(1, |config| config.timeouts.infer = Duration::from_secs(2));
    let model = load(&runtime, "stalled", "sklearn", "sklearn.joblib");
    let pid = runtime.processes()[0].pid.expect("a pid");
    signal(pid, "-STOP");
    let asked = Instant::now();
    let result = sklearn_predictions(model.as_ref());
    let waited = asked.elapsed();
    signal(pid, "-CONT");
    match result {
        Err(Error::Inference(cause)) => {
            assert!(cause.to_string().contains("did not answer within 2s"), "{cause}")
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}, not at the 2 s deadline");
    // Resumed, it serves again.
    assert_eq!(sklearn_predictions(model.as_ref()).expect("infer"), models().expected.sklearn_predict);
}

#[test]
fn a_hung_server_is_killed_by_its_liveness_probe_and_restarted() {
    // Started from a thread that ends at once: the server must not die with the thread that asked for
    // it (the kernel's parent-death signal follows the forking thread).
    let (runtime, _repository) = std::thread::spawn(|| {
        start_with(1, |config| {
            config.liveness = Liveness {
                interval: Duration::from_millis(300),
                timeout: Duration::from_millis(300),
                failures: 3,
            }
        })
    })
    .join()
    .expect("the starting thread");
    let model = load(&runtime, "stuck", "sklearn", "sklearn.joblib");
    assert_eq!(sklearn_predictions(model.as_ref()).expect("infer"), models().expected.sklearn_predict);
    // Longer than the probe needs to condemn it: a live server is left alone.
    std::thread::sleep(Duration::from_secs(2));
    let pid = runtime.processes()[0].pid.expect("a pid");
    assert_eq!(runtime.processes()[0].generation, 1, "a healthy server is not restarted");

    signal(pid, "-STOP");
    // A call in flight on the stopped server ends when the probe kills it, well before its 30 s
    // deadline, and reports the model lost so the mesh loads it again.
    let asked = Instant::now();
    match sklearn_predictions(model.as_ref()) {
        Err(Error::Lost { model_id, reason }) => {
            assert_eq!(model_id, "stuck");
            assert!(reason.contains("failed 3 liveness probes in a row"), "{reason}");
        }
        other => panic!("expected Error::Lost, got {other:?}"),
    }
    assert!(asked.elapsed() < Duration::from_secs(10), "lost after {:?}", asked.elapsed());
    drop(model);

    let again = load(&runtime, "stuck", "sklearn", "sklearn.joblib");
    assert_eq!(
        sklearn_predictions(again.as_ref()).expect("infer after the restart"),
        models().expected.sklearn_predict
    );
    let process = &runtime.processes()[0];
    assert_eq!(process.generation, 2, "restarted once");
    assert_ne!(process.pid, Some(pid));
    let stopped = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stopped.is_empty()
            || stopped.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        "the hung server {pid} was killed: {stopped}"
    );
}

#[test]
fn an_endpoint_is_used_as_it_is_and_never_restarted() {
    init_tracing();
    let external = External::start();
    let mut config = RemoteRuntimeConfig::mlserver("unused", 1);
    config.command = None;
    // host:port without a scheme, as a ServingRuntime or an operator writes it.
    config.endpoint = Some(format!("127.0.0.1:{}", external.grpc_port));
    config.repository = Some(external.repository.path().to_owned());
    config.timeouts.startup = Duration::from_secs(180);
    config.timeouts.load = Duration::from_secs(120);
    let runtime = RemoteRuntime::start(config).expect("connects to the running MLServer");
    let process = &runtime.processes()[0];
    assert_eq!(process.pid, None, "not ours");
    assert_eq!(process.repository, external.repository.path(), "the server's own repository");

    let model = load(&runtime, "external", "sklearn", "sklearn.joblib");
    assert!(
        external.repository.path().join("external").join(densemesh_runtime_remote::SETTINGS_FILE).is_file()
    );
    assert_eq!(sklearn_predictions(model.as_ref()).expect("infer"), models().expected.sklearn_predict);

    // Shutting the runtime down leaves the server running.
    drop(model);
    drop(runtime);
    let endpoint = format!("http://127.0.0.1:{}", external.grpc_port);
    eventually("the unload reaches the server", Duration::from_secs(10), || {
        !index(&endpoint).iter().any(|(name, state)| name == "external" && state.ends_with("READY"))
    });
}
