//! What the evaluator refuses at load (so the caller falls back to ONNX Runtime) and what a bad
//! request gets: typed errors that name the operator, opset or input, never a panic.

mod common;

use std::error::Error as _;

use common::mlp::{input, mlp, single_node};
use densemesh_runtime_core::{DataType, Error, InferRequest, LoadRequest, LoadedModel, Runtime};
use densemesh_runtime_tiny::{TinyConfig, TinyError, TinyRuntime};

fn refusal(bytes: &[u8]) -> TinyError {
    match TinyRuntime::default().load_bytes(bytes) {
        Ok(_) => panic!("the model loaded"),
        Err(e) => e,
    }
}

#[test]
fn unsupported_operators_domains_and_opsets_are_refused_by_name_for_onnx_runtime() {
    for (model, expected) in [
        (single_node("Conv", "", 17), "operator Conv"),
        (single_node("Relu", "", 22), "opset 22"),
        (single_node("Relu", "", 6), "opset 6"),
        (single_node("Relu", "com.microsoft", 1), "domain \"com.microsoft\""),
        (single_node("ZipMap", "ai.onnx.ml", 1), "zipmap"),
        (single_node("TreeEnsembleRegressor", "ai.onnx.ml", 5), "opset 5"),
    ] {
        let e = refusal(&model);
        assert!(matches!(e, TinyError::Unsupported(_)), "{e:?}");
        assert!(e.to_string().contains(expected), "{e} should name {expected}");
        assert!(e.wants_fallback());
    }
    assert!(TinyRuntime::default().load_bytes(&single_node("Relu", "", 17)).is_ok());
}

#[test]
fn malformed_and_oversized_files_are_typed_errors() {
    let e = refusal(b"\x0a\xff\xff\xff\xff\x0fnot protobuf");
    assert!(matches!(e, TinyError::Decode(_)), "{e:?}");
    let model = mlp(&[16, 32, 4], 1);
    let small = TinyRuntime::new(TinyConfig { max_file_bytes: 1_000 });
    let e = small.load_bytes(&model).err().expect("too large");
    assert!(matches!(e, TinyError::TooLarge { limit: 1_000, .. }), "{e:?}");
    let truncated = &model[..model.len() - 5];
    assert!(matches!(refusal(truncated), TinyError::Decode(_)));
}

#[test]
fn the_runtime_trait_keeps_the_typed_error_as_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, single_node("Conv", "", 17)).unwrap();
    let err = TinyRuntime::default().load(&LoadRequest::from_path("m1", &path)).err().expect("refused");
    assert!(matches!(err, Error::Load { ref model_id, .. } if model_id == "m1"), "{err}");
    let source = err.source().and_then(|s| s.downcast_ref::<TinyError>()).expect("a TinyError source");
    assert!(source.wants_fallback());
}

#[test]
fn bad_requests_are_invalid_input_naming_the_input() {
    let model = TinyRuntime::default().load_bytes(&mlp(&[16, 32, 4], 3)).unwrap();
    let cases = [
        (input(2, 15, 1), "shape"),
        (densemesh_runtime_core::Tensor { datatype: DataType::Fp64, ..input(1, 16, 1) }, "FP64"),
        (densemesh_runtime_core::Tensor { name: "q".into(), ..input(1, 16, 1) }, "input x is missing"),
        (densemesh_runtime_core::Tensor { shape: vec![2, 16], ..input(1, 16, 1) }, "bytes for 32 elements"),
    ];
    for (tensor, expected) in cases {
        let err = model.infer(InferRequest { inputs: vec![tensor], outputs: vec![] }).expect_err("refused");
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains(expected), "{err} should say {expected}");
    }
    let err = model.infer(InferRequest { inputs: vec![input(1, 16, 1)], outputs: vec!["nope".into()] }).err();
    assert!(err.is_some_and(|e| e.to_string().contains("no output named nope")));
    let out = model.infer(InferRequest { inputs: vec![input(3, 16, 1)], outputs: vec![] }).unwrap();
    assert_eq!((out[0].name.as_str(), out[0].shape.as_slice()), ("y", &[3i64, 4][..]));
}
