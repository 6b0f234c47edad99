//! Decoding and validation: every malformed request is refused with a message naming the problem.

use bytes::Bytes;
use densemesh_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest};
use densemesh_runtime_core::{DataType, ModelMetadata, TensorData, TensorSpec};

use super::*;

fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn raw_request(inputs: Vec<(InferInputTensor, Vec<u8>)>) -> ModelInferRequest {
    let (inputs, raw): (Vec<_>, Vec<_>) = inputs.into_iter().map(|(i, b)| (i, Bytes::from(b))).unzip();
    ModelInferRequest { model_name: "m".into(), inputs, raw_input_contents: raw, ..Default::default() }
}

fn metadata() -> ModelMetadata {
    let spec = |name: &str, datatype, shape: &[i64]| TensorSpec {
        name: name.into(),
        datatype,
        shape: shape.to_vec(),
    };
    ModelMetadata {
        platform: "test".into(),
        inputs: vec![spec("x", DataType::Fp32, &[-1, 2]), spec("ids", DataType::Int64, &[3])],
        outputs: vec![spec("y", DataType::Fp32, &[-1])],
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn valid() -> ModelInferRequest {
    raw_request(vec![
        (input("x", "FP32", &[1, 2]), f32s(&[1.0, 2.0])),
        (input("ids", "INT64", &[3]), [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect()),
    ])
}

/// Decodes and checks; the error message on failure.
fn verdict(request: ModelInferRequest) -> Result<Decoded, String> {
    let decoded = decode(request).map_err(|e| e.to_string())?;
    check("m", &metadata(), &decoded.request).map_err(|e| e.to_string())?;
    Ok(decoded)
}

#[test]
fn a_valid_raw_request_passes_without_copying() {
    let request = valid();
    let original = request.raw_input_contents[0].as_ptr();
    let decoded = verdict(request).unwrap();
    assert!(decoded.raw);
    match &decoded.request.inputs[0].data {
        TensorData::Raw(bytes) => assert_eq!(bytes.as_ptr(), original, "raw contents move, not copy"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn malformed_requests_name_the_input_and_the_problem() {
    let with = |f: &dyn Fn(&mut ModelInferRequest)| {
        let mut r = valid();
        f(&mut r);
        r
    };
    let cases: Vec<(&str, ModelInferRequest, &[&str])> = vec![
        (
            "unknown datatype",
            with(&|r| r.inputs[0].datatype = "FLOAT".into()),
            &["input x", "unknown datatype"],
        ),
        ("wrong datatype", with(&|r| r.inputs[0].datatype = "INT32".into()), &["input x", "INT32", "FP32"]),
        (
            "raw length",
            with(&|r| r.raw_input_contents[0] = Bytes::from(f32s(&[1.0]))),
            &["input x", "4 bytes", "needs 8"],
        ),
        ("negative dim", with(&|r| r.inputs[0].shape = vec![-1, 2]), &["input x", "negative"]),
        (
            "overflowing shape",
            with(&|r| r.inputs[0].shape = vec![i64::MAX, i64::MAX]),
            &["input x", "more elements"],
        ),
        ("wrong rank", with(&|r| r.inputs[1].shape = vec![1, 3]), &["input ids", "shape"]),
        (
            "wrong fixed dim",
            with(&|r| {
                r.inputs[1].shape = vec![2];
                r.raw_input_contents[1] = Bytes::from(vec![0u8; 16]);
            }),
            &["input ids", "[3]"],
        ),
        ("unknown input", with(&|r| r.inputs[1].name = "idz".into()), &["no input named \"idz\"", "ids"]),
        (
            "missing input",
            with(&|r| {
                r.inputs.pop();
                r.raw_input_contents.pop();
            }),
            &["input ids", "missing"],
        ),
        (
            "duplicate input",
            with(&|r| {
                r.inputs[1] = r.inputs[0].clone();
                r.raw_input_contents[1] = r.raw_input_contents[0].clone();
            }),
            &["input x", "more than once"],
        ),
        (
            "raw count",
            with(&|r| {
                r.raw_input_contents.pop();
            }),
            &["raw_input_contents has 1 entries", "2 inputs"],
        ),
        (
            "raw and typed",
            with(&|r| {
                r.inputs[0].contents =
                    Some(InferTensorContents { fp32_contents: vec![1.0, 2.0], ..Default::default() })
            }),
            &["input x", "both"],
        ),
        (
            "unknown output",
            with(&|r| {
                r.outputs = vec![InferRequestedOutputTensor { name: "z".into(), ..Default::default() }]
            }),
            &["no output named \"z\"", "y"],
        ),
        (
            "duplicate output",
            with(&|r| {
                let y = InferRequestedOutputTensor { name: "y".into(), ..Default::default() };
                r.outputs = vec![y.clone(), y];
            }),
            &["output y", "more than once"],
        ),
        ("empty name", with(&|r| r.inputs[0].name = String::new()), &["empty name"]),
    ];
    for (what, request, needles) in cases {
        let err = verdict(request).err().unwrap_or_else(|| panic!("{what}: accepted"));
        for needle in needles {
            assert!(err.contains(needle), "{what}: {err:?} lacks {needle:?}");
        }
    }
}

#[test]
fn typed_contents_are_checked_and_converted() {
    let typed = |datatype: &str, shape: &[i64], contents: InferTensorContents| ModelInferRequest {
        inputs: vec![InferInputTensor { contents: Some(contents), ..input("t", datatype, shape) }],
        ..Default::default()
    };
    let decoded = decode(typed(
        "INT16",
        &[2],
        InferTensorContents { int_contents: vec![-2, 300], ..Default::default() },
    ))
    .unwrap();
    assert!(!decoded.raw);
    assert_eq!(decoded.request.inputs[0].data, TensorData::Raw(Bytes::from(vec![0xfe, 0xff, 0x2c, 0x01])));

    let bad = [
        (
            "INT8",
            InferTensorContents { int_contents: vec![1, 300], ..Default::default() },
            "element 1 is 300",
        ),
        (
            "UINT8",
            InferTensorContents { uint_contents: vec![1, 256], ..Default::default() },
            "does not fit UINT8",
        ),
        ("FP32", InferTensorContents { fp32_contents: vec![1.0], ..Default::default() }, "has 1 elements"),
        (
            "FP32",
            InferTensorContents { fp64_contents: vec![1.0, 2.0], ..Default::default() },
            "not fp64_contents",
        ),
        ("FP16", InferTensorContents::default(), "raw_input_contents"),
    ];
    for (datatype, contents, needle) in bad {
        let err = decode(typed(datatype, &[2], contents)).unwrap_err().to_string();
        assert!(err.contains("input t") && err.contains(needle), "{datatype}: {err}");
    }
}

#[test]
fn raw_bytes_elements_are_length_prefixed() {
    let mut raw = Vec::new();
    for s in [&b"hi"[..], b"", b"there"] {
        raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
        raw.extend_from_slice(s);
    }
    let ok = decode(raw_request(vec![(input("s", "BYTES", &[3]), raw.clone())])).unwrap();
    assert_eq!(
        ok.request.inputs[0].data,
        TensorData::Strings(vec![Bytes::from_static(b"hi"), Bytes::new(), Bytes::from_static(b"there")])
    );
    let count = decode(raw_request(vec![(input("s", "BYTES", &[2]), raw.clone())])).unwrap_err().to_string();
    assert!(count.contains("3 elements") && count.contains("needs 2"), "{count}");
    let truncated = decode(raw_request(vec![(input("s", "BYTES", &[3]), raw[..raw.len() - 1].to_vec())]))
        .unwrap_err()
        .to_string();
    assert!(truncated.contains("claims 5 bytes"), "{truncated}");
    let prefix = decode(raw_request(vec![(input("s", "BYTES", &[1]), vec![1, 0])])).unwrap_err().to_string();
    assert!(prefix.contains("length prefix"), "{prefix}");
}

#[test]
fn responses_round_trip_raw_and_typed() {
    use densemesh_runtime_core::Tensor;
    let outputs = || {
        vec![
            Tensor {
                name: "i".into(),
                datatype: DataType::Int8,
                shape: vec![2],
                data: TensorData::Raw(Bytes::from(vec![0xff, 0x01])),
            },
            Tensor {
                name: "s".into(),
                datatype: DataType::Bytes,
                shape: vec![1],
                data: TensorData::Strings(vec![Bytes::from_static(b"ok")]),
            },
        ]
    };
    let typed = encode("m".into(), "1".into(), "r".into(), outputs(), false);
    assert!(typed.raw_output_contents.is_empty());
    assert_eq!(typed.outputs[0].contents.as_ref().unwrap().int_contents, vec![-1, 1]);
    assert_eq!(typed.outputs[1].contents.as_ref().unwrap().bytes_contents, vec![Bytes::from_static(b"ok")]);
    let raw = encode("m".into(), "1".into(), "r".into(), outputs(), true);
    assert_eq!(raw.raw_output_contents[0], Bytes::from(vec![0xff, 0x01]));
    assert_eq!(raw.raw_output_contents[1], Bytes::from(vec![2, 0, 0, 0, b'o', b'k']));
    assert_eq!((raw.id.as_str(), raw.model_version.as_str()), ("r", "1"));

    let half = vec![Tensor {
        name: "h".into(),
        datatype: DataType::Fp16,
        shape: vec![1],
        data: TensorData::Raw(Bytes::from(vec![0, 0x3c])),
    }];
    let forced = encode("m".into(), String::new(), String::new(), half, false);
    assert_eq!(forced.raw_output_contents.len(), 1, "FP16 has no typed field, so the response is raw");
}

#[test]
fn a_model_that_declares_no_interface_leaves_the_checks_to_its_runtime() {
    let undeclared = ModelMetadata { platform: "mlserver".into(), inputs: vec![], outputs: vec![] };
    let mut request = decode(valid()).unwrap().request;
    request.outputs = vec!["anything".into()];
    assert!(check("m", &undeclared, &request).is_ok());
    // Declared outputs are still checked when the inputs are not declared.
    let outputs_only = ModelMetadata { outputs: metadata().outputs, ..undeclared };
    let err = check("m", &outputs_only, &request).unwrap_err().to_string();
    assert!(err.contains("no output named \"anything\""), "{err}");
}
