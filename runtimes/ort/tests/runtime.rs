//! The ONNX Runtime runtime against the real library from the pip wheel.

use std::sync::OnceLock;

use bytes::Bytes;
use densemesh_runtime_core::{DataType, Error, InferRequest, LoadRequest, Runtime, Tensor, TensorData};
use densemesh_runtime_ort::{OrtConfig, OrtRuntime};

/// ONNX Runtime allows one environment per process, so the tests share one runtime.
fn runtime() -> &'static OrtRuntime {
    static RUNTIME: OnceLock<OrtRuntime> = OnceLock::new();
    RUNTIME.get_or_init(|| OrtRuntime::new(&OrtConfig::default()).expect("onnxruntime must be installed"))
}

const RELU: &[u8] = include_bytes!("../src/warmup.onnx");

fn write_model(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn floats(v: &[f32]) -> TensorData {
    TensorData::Raw(Bytes::from(v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>()))
}

#[test]
fn loads_reports_metadata_and_infers() {
    let (_dir, path) = write_model(RELU);
    let model = runtime().load(&LoadRequest::from_path("relu", path)).unwrap();
    let meta = model.metadata();
    assert_eq!(meta.platform, "onnxruntime_onnx");
    assert_eq!((meta.inputs[0].name.as_str(), meta.inputs[0].datatype), ("x", DataType::Fp32));
    assert_eq!(meta.outputs[0].shape, vec![1]);
    assert!(model.size_bytes() >= RELU.len() as u64);

    let input = Tensor { name: "x".into(), datatype: DataType::Fp32, shape: vec![1], data: floats(&[-3.0]) };
    let out = model.infer(InferRequest { inputs: vec![input.clone()], outputs: vec![] }).unwrap();
    assert_eq!(out[0].data, floats(&[0.0]));
    let input = Tensor { data: floats(&[2.5]), ..input };
    let out = model.infer(InferRequest { inputs: vec![input], outputs: vec!["y".into()] }).unwrap();
    assert_eq!((out[0].name.as_str(), &out[0].data), ("y", &floats(&[2.5])));
}

#[test]
fn loading_from_memory_matches_loading_from_disk() {
    let model = runtime().load_from_memory("relu", RELU.to_vec()).unwrap();
    assert_eq!(model.metadata().inputs[0].name, "x");
}

#[test]
fn a_corrupt_file_is_a_load_error_naming_the_model() {
    let (_dir, path) = write_model(b"this is not a protobuf");
    let err = runtime().load(&LoadRequest::from_path("broken", path)).err().unwrap();
    assert!(matches!(err, Error::Load { ref model_id, .. } if model_id == "broken"), "{err}");
    let missing = runtime().load(&LoadRequest::from_path("gone", "/nonexistent/model.onnx")).err().unwrap();
    assert!(matches!(missing, Error::Io { .. }), "{missing}");
}

#[test]
fn a_load_failure_keeps_the_onnxruntime_error_as_its_source() {
    let (_dir, path) = write_model(b"this is not a protobuf");
    let err = runtime().load(&LoadRequest::from_path("broken", path)).err().unwrap();
    let source = std::error::Error::source(&err).expect("a load failure has a source");
    let cause = source.downcast_ref::<ort::Error>().expect("the source is onnxruntime's own error");
    assert_eq!(err.to_string(), format!("cannot load model broken: {cause}"));
}

/// The test set-up installs PyPI's CPU `onnxruntime`, whose library has no CUDA provider: the runtime
/// must say so from the library itself, not assume either way.
#[test]
fn the_cuda_provider_is_detected_from_the_library() {
    // Both wheels install the package `onnxruntime`; the GPU one's metadata is onnxruntime_gpu's.
    let library = runtime().library_path();
    let site_packages = library.ancestors().find(|d| d.file_name().is_some_and(|n| n == "site-packages"));
    let gpu_wheel = site_packages.is_some_and(|dir| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("onnxruntime_gpu-"))
    });
    assert_eq!(runtime().cuda_provider(), gpu_wheel, "{}", library.display());
}
