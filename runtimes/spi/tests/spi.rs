//! The SPI runtime against a real model server speaking ModelMesh's SPI (`tests/spi_runtime.py`, Python
//! grpcio): start-up, load and inference, sizes, refusals, unload on drop, a runtime that dies or
//! stalls, a unix socket, and what the mesh is told for passthrough.

mod harness;

use std::time::{Duration, Instant};

use bytes::Bytes;
use densemesh_runtime_core::{
    DataType, Error, InferRequest, LoadRequest, LoadedModel, Runtime, Tensor, TensorData,
};
use densemesh_runtime_spi::{MIN_MODEL_SIZE_BYTES, MODEL_ID_HEADER, SpiError, SpiRuntime, SpiRuntimeConfig};
use harness::{SpiServer, init_tracing, model_file};
use serde_json::json;

const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn x(values: &[f32]) -> InferRequest {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    InferRequest {
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![values.len() as i64],
            data: TensorData::Raw(Bytes::from(raw)),
        }],
        outputs: vec![],
    }
}

fn floats(tensor: &Tensor) -> Vec<f32> {
    let TensorData::Raw(raw) = &tensor.data else { panic!("{} is not raw", tensor.name) };
    raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn output<'a>(outputs: &'a [Tensor], name: &str) -> &'a Tensor {
    outputs.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no output {name} in {outputs:?}"))
}

fn load(runtime: &SpiRuntime, id: &str, path: &std::path::Path) -> Box<dyn LoadedModel> {
    runtime.load(&LoadRequest::from_path(id, path).with_model_type("multiplier")).expect("load")
}

#[test]
fn startup_waits_through_starting_and_keeps_the_runtime_status() -> anyhow::Result<()> {
    init_tracing();
    let server = SpiServer::start(
        "127.0.0.1:0",
        &[
            "--startup-delay",
            "1.5",
            "--capacity",
            "123456789",
            "--max-loading-concurrency",
            "3",
            "--loading-timeout-ms",
            "4000",
        ],
    )?;
    let runtime = SpiRuntime::connect(server.config())?;
    let info = runtime.info();
    assert_eq!(info.capacity_bytes, 123_456_789);
    assert_eq!(info.max_loading_concurrency, 3);
    assert_eq!(info.model_loading_timeout, Some(Duration::from_millis(4000)));
    assert_eq!(info.default_model_size_bytes, 1 << 20);
    assert_eq!(info.runtime_version, "spi-test-0.1");
    assert!(!info.allow_any_method);
    Ok(())
}

#[test]
fn startup_gives_up_in_time_when_nothing_listens() {
    let unused =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
    let mut config = SpiRuntimeConfig::new("nobody", unused.to_string(), &["multiplier"]);
    config.timeouts.startup = Duration::from_millis(800);
    let started = Instant::now();
    let Err(error) = SpiRuntime::connect(config) else { panic!("connected to nothing") };
    assert!(matches!(error, SpiError::NotReady { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(&format!("http://{unused}")) && message.contains("timeouts.startup"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "gave up after {:?}", started.elapsed());
}

#[test]
fn a_failing_runtime_fails_startup_at_once() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &["--failing"])?;
    let started = Instant::now();
    let Err(error) = SpiRuntime::connect(server.config()) else { panic!("a FAILING runtime started") };
    assert!(matches!(&error, SpiError::Failing { status, .. } if status == "FAILING"), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    Ok(())
}

#[test]
fn load_and_infer_answer_right_with_raw_and_typed_outputs() -> anyhow::Result<()> {
    init_tracing();
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let doubler = load(&runtime, "double", &model_file(dir.path(), "double", json!({"factor": 2.0})));
    let tripler = load(
        &runtime,
        "triple",
        &model_file(dir.path(), "triple", json!({"factor": 3.0, "typed_output": true})),
    );

    let load_event = server.wait_for("load", Some("double"), EVENT_TIMEOUT).expect("load event");
    assert_eq!(load_event["model_type"], "multiplier");
    assert!(load_event["model_path"].as_str().is_some_and(|p| p.ends_with("double.json")), "{load_event}");

    let meta = doubler.metadata();
    assert_eq!(meta.platform, "spi_test_multiplier");
    assert_eq!(meta.inputs.len(), 1);
    assert_eq!((meta.inputs[0].name.as_str(), meta.inputs[0].datatype), ("x", DataType::Fp32));
    assert_eq!(meta.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["y", "id"]);

    for (model, id, factor) in [(&doubler, "double", 2.0), (&tripler, "triple", 3.0)] {
        let outputs = model.infer(x(&[1.0, 2.5, -4.0]))?;
        let y = output(&outputs, "y");
        assert_eq!((y.datatype, y.shape.as_slice()), (DataType::Fp32, &[3][..]));
        assert_eq!(floats(y), vec![factor, 2.5 * factor, -4.0 * factor], "{id}");
        assert_eq!(
            output(&outputs, "id").data,
            TensorData::Strings(vec![Bytes::from(id.to_owned())]),
            "{id}"
        );
    }
    let only_y = doubler.infer(InferRequest { outputs: vec!["y".into()], ..x(&[1.0]) })?;
    assert_eq!(only_y.len(), 1);
    let infer_event = server.wait_for("infer", Some("double"), EVENT_TIMEOUT).expect("infer event");
    assert_eq!(infer_event["model_name"], "double", "model_name carries the id too");
    Ok(())
}

#[test]
fn size_comes_from_load_model_then_model_size_then_the_file() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let from_load = model_file(dir.path(), "a", json!({"load_size": 5_000_000, "model_size": 1}));
    let from_size = model_file(dir.path(), "b", json!({"model_size": 7_000_000, "predict_size": 6_000_000}));
    let from_file = model_file(dir.path(), "c", json!({"factor": 1.0, "padding": "x".repeat(10_000)}));
    assert_eq!(load(&runtime, "a", &from_load).size_bytes(), 5_000_000);
    assert_eq!(load(&runtime, "b", &from_size).size_bytes(), 7_000_000);
    let file_bytes = std::fs::metadata(&from_file)?.len();
    assert_eq!(load(&runtime, "c", &from_file).size_bytes(), file_bytes);
    let tiny = model_file(dir.path(), "d", json!({}));
    assert_eq!(load(&runtime, "d", &tiny).size_bytes(), MIN_MODEL_SIZE_BYTES, "never below the floor");

    let predicted = runtime.predict_size(&LoadRequest::from_path("b", &from_size))?;
    assert_eq!(predicted, Some(6_000_000));
    let fallback = runtime.predict_size(&LoadRequest::from_path("a", &from_load))?;
    assert_eq!(fallback, Some(1 << 20), "the runtime's default model size when it cannot predict");
    Ok(())
}

#[test]
fn a_refused_load_is_a_load_error_with_the_runtimes_message() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let bad = model_file(dir.path(), "bad", json!({"refuse": "weights are corrupt at byte 12"}));
    let Err(error) = runtime.load(&LoadRequest::from_path("bad", &bad)) else {
        panic!("loaded a refused model")
    };
    assert!(matches!(&error, Error::Load { model_id, .. } if model_id == "bad"), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("weights are corrupt at byte 12") && message.contains("FailedPrecondition"),
        "{message}"
    );
    assert!(server.wait_for("unload", Some("bad"), EVENT_TIMEOUT).is_some(), "a failed load is cleaned up");

    let missing = dir.path().join("missing.json");
    let Err(error) = runtime.load(&LoadRequest::from_path("missing", &missing)) else {
        panic!("loaded nothing")
    };
    assert!(error.to_string().contains("cannot read model file"), "{error}");
    Ok(())
}

#[test]
fn a_load_past_its_deadline_fails_instead_of_hanging() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let mut config = server.config();
    config.timeouts.load = Some(Duration::from_millis(500));
    let runtime = SpiRuntime::connect(config)?;
    let dir = tempfile::tempdir()?;
    let slow = model_file(dir.path(), "slow", json!({"load_delay_s": 5}));
    let started = Instant::now();
    let Err(error) = runtime.load(&LoadRequest::from_path("slow", &slow)) else { panic!("loaded in time") };
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(matches!(error, Error::Load { .. }), "{error:?}");
    Ok(())
}

#[test]
fn dropping_a_model_unloads_it() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let model = load(&runtime, "m", &model_file(dir.path(), "m", json!({"factor": 2.0})));
    assert!(server.events("unload").is_empty());
    drop(model);
    let unload = server.wait_for("unload", Some("m"), EVENT_TIMEOUT).expect("unloadModel after drop");
    assert_eq!(unload["known"], true, "{unload}");
    Ok(())
}

#[test]
fn a_restarted_runtime_makes_infer_report_the_model_lost() -> anyhow::Result<()> {
    init_tracing();
    let mut server = SpiServer::start("127.0.0.1:0", &[])?;
    let port = server.port();
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let model = load(&runtime, "m", &model_file(dir.path(), "m", json!({"factor": 2.0})));
    model.infer(x(&[1.0]))?;

    server.kill();
    let started = Instant::now();
    let Err(dead) = model.infer(x(&[1.0])) else { panic!("a dead runtime answered") };
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}: {dead}", started.elapsed());
    assert!(matches!(dead, Error::Inference(_)), "{dead:?}");

    let mut restarted = SpiServer::start(&format!("127.0.0.1:{port}"), &[])?;
    let Err(lost) = model.infer(x(&[1.0])) else { panic!("a restarted runtime still held the model") };
    assert!(matches!(&lost, Error::Lost { model_id, .. } if model_id == "m"), "{lost:?}");

    // With no call in between, the first call after a restart already reports the loss.
    let again = load(&runtime, "m2", &model_file(dir.path(), "m2", json!({"factor": 2.0})));
    again.infer(x(&[1.0]))?;
    restarted.kill();
    let _third = SpiServer::start(&format!("127.0.0.1:{port}"), &[])?;
    let Err(lost) = again.infer(x(&[1.0])) else { panic!("a restarted runtime still held the model") };
    assert!(matches!(&lost, Error::Lost { model_id, .. } if model_id == "m2"), "{lost:?}");
    Ok(())
}

#[test]
fn a_stalled_runtime_fails_infer_at_its_deadline() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let mut config = server.config();
    config.timeouts.infer = Duration::from_millis(700);
    let runtime = SpiRuntime::connect(config)?;
    let dir = tempfile::tempdir()?;
    let model = load(&runtime, "m", &model_file(dir.path(), "m", json!({"factor": 2.0})));
    server.signal("-STOP");
    let started = Instant::now();
    let answer = model.infer(x(&[1.0]));
    let waited = started.elapsed();
    server.signal("-CONT");
    let Err(error) = answer else { panic!("a stopped runtime answered") };
    assert!(error.to_string().contains("timed out after 700ms"), "{error}");
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
    Ok(())
}

#[test]
fn a_model_gets_no_more_concurrent_calls_than_the_runtime_allows() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &["--limit-model-concurrency"])?;
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let spec = json!({"factor": 1.0, "max_concurrency": 1, "infer_delay_s": 0.2});
    let model = load(&runtime, "one", &model_file(dir.path(), "one", spec));
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..3).map(|_| scope.spawn(|| model.infer(x(&[1.0])).map(|_| ()))).collect();
        calls.into_iter().try_for_each(|call| call.join().expect("no panic"))
    })?;
    let infers = server.events("infer");
    assert_eq!(infers.len(), 3);
    assert!(infers.iter().all(|e| e["in_flight"] == 1), "{infers:?}");
    Ok(())
}

#[test]
fn a_runtime_on_a_unix_socket_loads_and_infers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("runtime.sock");
    let server = SpiServer::start(&format!("unix://{}", socket.display()), &[])?;
    assert_eq!(server.endpoint, format!("unix://{}", socket.display()));
    let runtime = SpiRuntime::connect(server.config())?;
    let model = load(&runtime, "u", &model_file(dir.path(), "u", json!({"factor": 4.0})));
    assert_eq!(floats(output(&model.infer(x(&[0.5]))?, "y")), vec![2.0]);
    assert_eq!(model.passthrough().map(|p| p.endpoint.as_str()), Some(server.endpoint.as_str()));
    Ok(())
}

#[test]
fn passthrough_reports_the_endpoint_and_the_declared_methods() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let model = load(&runtime, "p", &model_file(dir.path(), "p", json!({})));
    let passthrough = model.passthrough().expect("an SPI model passes calls through");
    assert_eq!(passthrough, runtime.passthrough());
    assert_eq!(passthrough.endpoint, server.endpoint);
    assert!(!passthrough.allow_any_method);
    assert_eq!(
        passthrough.methods,
        vec![
            ("/echo.Echo/Say".to_owned(), vec![2, 1]),
            ("/inference.GRPCInferenceService/ModelInfer".to_owned(), vec![1]),
            ("/inference.GRPCInferenceService/ModelMetadata".to_owned(), vec![1]),
        ]
    );
    assert_eq!(passthrough.method("/echo.Echo/Say"), Some(&[2, 1][..]));
    assert_eq!(passthrough.method("/echo.Echo/Shout"), None);
    Ok(())
}

#[test]
fn the_runtimes_own_method_answers_for_the_model_a_call_names() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let reply = echo::say(&server.endpoint, "injected-id", "header-id", "hello")?;
    assert_eq!(reply.model_id, "injected-id");
    assert_eq!(reply.header_model_id, "header-id");
    assert_eq!(reply.text, "hello");
    Ok(())
}

#[test]
fn a_runtime_without_v2_gives_its_models_no_declared_tensors() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &["--no-v2"])?;
    let runtime = SpiRuntime::connect(server.config())?;
    let dir = tempfile::tempdir()?;
    let model = load(&runtime, "n", &model_file(dir.path(), "n", json!({})));
    assert!(model.metadata().inputs.is_empty() && model.metadata().outputs.is_empty());
    assert_eq!(runtime.passthrough().methods, vec![("/echo.Echo/Say".to_owned(), vec![2, 1])]);
    let Err(error) = model.infer(x(&[1.0])) else { panic!("a runtime without V2 answered ModelInfer") };
    assert!(matches!(error, Error::Inference(_)), "{error:?}");
    Ok(())
}

#[test]
fn calls_from_a_spawn_blocking_thread_do_not_deadlock() -> anyhow::Result<()> {
    let server = SpiServer::start("127.0.0.1:0", &[])?;
    let config = server.config();
    let dir = tempfile::tempdir()?;
    let path = model_file(dir.path(), "b", json!({"factor": 5.0}));
    // A single-threaded caller runtime is the worst case: nothing else could drive a nested block_on.
    let caller = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let y = caller.block_on(async move {
        let work = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f32>> {
            let runtime = SpiRuntime::connect(config)?;
            let model = load(&runtime, "b", &path);
            Ok(floats(output(&model.infer(x(&[2.0]))?, "y")))
        });
        tokio::time::timeout(Duration::from_secs(30), work).await
    })???;
    assert_eq!(y, vec![10.0]);
    Ok(())
}

/// A hand-written client of the test runtime's `echo.Echo/Say` (tests/echo.proto), as the mesh's
/// passthrough would call it: the model id injected at field path [2, 1] and in the header.
mod echo {
    use super::MODEL_ID_HEADER;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Target {
        #[prost(string, tag = "1")]
        pub model_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayRequest {
        #[prost(string, tag = "1")]
        pub text: String,
        #[prost(message, optional, tag = "2")]
        pub target: Option<Target>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayReply {
        #[prost(string, tag = "1")]
        pub model_id: String,
        #[prost(string, tag = "2")]
        pub text: String,
        #[prost(string, tag = "3")]
        pub header_model_id: String,
    }

    pub fn say(endpoint: &str, injected: &str, header: &str, text: &str) -> anyhow::Result<SayReply> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?.connect().await?;
            let mut client = tonic::client::Grpc::new(channel);
            client.ready().await?;
            let message =
                SayRequest { text: text.into(), target: Some(Target { model_id: injected.into() }) };
            let mut request = tonic::Request::new(message);
            request.metadata_mut().insert(MODEL_ID_HEADER, header.parse()?);
            let path = http::uri::PathAndQuery::from_static("/echo.Echo/Say");
            let codec = tonic_prost::ProstCodec::<SayRequest, SayReply>::default();
            Ok(client.unary(request, path, codec).await?.into_inner())
        })
    }
}
