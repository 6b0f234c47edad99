//! Tensors to and from the KServe V2 wire, for a runtime that is a V2 client of a server in another
//! process (a remote V2 server, a ModelMesh SPI runtime). The mesh's own server side lives in the
//! mesh; this is the other end, shared by every out-of-process runtime.
//!
//! Requests always go out as `raw_input_contents` (the V2 rule is all raw or none), so fixed-size
//! tensors pass as the `Bytes` they arrived in. Answers may come back raw or typed
//! (`InferTensorContents`), as V2 servers differ; both become the same [`Tensor`].

use bytes::{BufMut, Bytes, BytesMut};
use densemesh_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use densemesh_proto::inference::model_infer_response::InferOutputTensor;
use densemesh_proto::inference::model_metadata_response::TensorMetadata;
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};

use crate::{DataType, InferRequest, Tensor, TensorData, TensorSpec};

/// The V2 request for `model_name` (servers that route by it rather than by the `mm-model-id` header
/// need the model's id there). Fails when a tensor's data does not fit its datatype and shape, which
/// the mesh's validation should have caught already.
pub fn to_request(model_name: &str, request: InferRequest) -> Result<ModelInferRequest, String> {
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut raw = Vec::with_capacity(request.inputs.len());
    for tensor in request.inputs {
        let elements = element_count(&tensor.shape).map_err(|e| format!("input {}: {e}", tensor.name))?;
        let bytes = match (tensor.datatype.element_size(), tensor.data) {
            (Some(size), TensorData::Raw(bytes)) => {
                if Some(bytes.len()) != elements.checked_mul(size) {
                    return Err(format!(
                        "input {}: {} bytes do not hold {elements} {} elements",
                        tensor.name,
                        bytes.len(),
                        tensor.datatype
                    ));
                }
                bytes
            }
            (None, TensorData::Strings(items)) => {
                if items.len() != elements {
                    return Err(format!(
                        "input {}: {} strings for {elements} elements",
                        tensor.name,
                        items.len()
                    ));
                }
                encode_strings(&items)
            }
            (_, _) => {
                return Err(format!("input {}: data of the wrong kind for {}", tensor.name, tensor.datatype));
            }
        };
        inputs.push(InferInputTensor {
            name: tensor.name,
            datatype: tensor.datatype.as_str().to_owned(),
            shape: tensor.shape,
            ..Default::default()
        });
        raw.push(bytes);
    }
    let outputs = request
        .outputs
        .into_iter()
        .map(|name| InferRequestedOutputTensor { name, ..Default::default() })
        .collect();
    Ok(ModelInferRequest {
        model_name: model_name.to_owned(),
        inputs,
        outputs,
        raw_input_contents: raw,
        ..Default::default()
    })
}

/// The answer's tensors, whichever form each output's data came in; the error says which output is
/// malformed and how.
pub fn from_response(response: ModelInferResponse) -> Result<Vec<Tensor>, String> {
    let ModelInferResponse { outputs, raw_output_contents: raw, .. } = response;
    if !raw.is_empty() && raw.len() != outputs.len() {
        return Err(format!("the answer has {} outputs but {} raw output buffers", outputs.len(), raw.len()));
    }
    let mut raw = raw.into_iter();
    outputs
        .into_iter()
        .map(|output| {
            let name = output.name.clone();
            output_tensor(output, raw.next()).map_err(|e| format!("output {name}: {e}"))
        })
        .collect()
}

/// A declared interface, or `None` when the server declares something this side cannot represent:
/// the mesh then treats the model's tensors as undeclared and passes requests through.
pub fn tensor_specs(tensors: Vec<TensorMetadata>) -> Option<Vec<TensorSpec>> {
    tensors
        .into_iter()
        .map(|t| Some(TensorSpec { datatype: t.datatype.parse().ok()?, name: t.name, shape: t.shape }))
        .collect()
}

fn output_tensor(output: InferOutputTensor, raw: Option<Bytes>) -> Result<Tensor, String> {
    let datatype: DataType = output.datatype.parse().map_err(|e| format!("{e}"))?;
    let count = element_count(&output.shape)?;
    let data = match raw {
        Some(bytes) => raw_data(datatype, count, bytes)?,
        None => typed_data(datatype, count, output.contents.unwrap_or_default())?,
    };
    Ok(Tensor { name: output.name, datatype, shape: output.shape, data })
}

fn element_count(shape: &[i64]) -> Result<usize, String> {
    shape.iter().try_fold(1usize, |n, &d| {
        let d = usize::try_from(d).map_err(|_| format!("negative dimension in shape {shape:?}"))?;
        n.checked_mul(d).ok_or_else(|| format!("shape {shape:?} overflows"))
    })
}

fn raw_data(datatype: DataType, count: usize, bytes: Bytes) -> Result<TensorData, String> {
    match datatype.element_size() {
        Some(size) => {
            let want = count.checked_mul(size).ok_or("the tensor's size overflows")?;
            if bytes.len() != want {
                return Err(format!(
                    "{} raw bytes for {count} {datatype} elements ({want} bytes)",
                    bytes.len()
                ));
            }
            Ok(TensorData::Raw(bytes))
        }
        None => {
            let strings = decode_strings(bytes)?;
            if strings.len() != count {
                return Err(format!("{} strings for a shape of {count} elements", strings.len()));
            }
            Ok(TensorData::Strings(strings))
        }
    }
}

/// Typed contents as little-endian raw bytes; each V2 datatype reads from its one contents field.
/// Narrow integer types travel widened in `int_contents` / `uint_contents`; a value that does not fit
/// the datatype it is declared as is refused, not truncated.
fn typed_data(datatype: DataType, count: usize, contents: InferTensorContents) -> Result<TensorData, String> {
    fn pack<T: Copy, const N: usize>(
        values: &[T],
        count: usize,
        to_le: impl Fn(T) -> [u8; N],
    ) -> Result<Bytes, String> {
        if values.len() != count {
            return Err(format!("{} typed values for a shape of {count} elements", values.len()));
        }
        let mut out = BytesMut::with_capacity(count * N);
        for &v in values {
            out.put_slice(&to_le(v));
        }
        Ok(out.freeze())
    }
    fn narrow<W: Copy + std::fmt::Display, T: TryFrom<W>>(
        values: &[W],
        datatype: DataType,
    ) -> Result<Vec<T>, String> {
        values.iter().map(|&v| T::try_from(v).map_err(|_| format!("{v} does not fit {datatype}"))).collect()
    }
    let c = &contents;
    let raw = match datatype {
        DataType::Bool => pack(&c.bool_contents, count, |v| [u8::from(v)])?,
        DataType::Int8 => pack(&narrow::<i32, i8>(&c.int_contents, datatype)?, count, i8::to_le_bytes)?,
        DataType::Int16 => pack(&narrow::<i32, i16>(&c.int_contents, datatype)?, count, i16::to_le_bytes)?,
        DataType::Int32 => pack(&c.int_contents, count, i32::to_le_bytes)?,
        DataType::Int64 => pack(&c.int64_contents, count, i64::to_le_bytes)?,
        DataType::Uint8 => pack(&narrow::<u32, u8>(&c.uint_contents, datatype)?, count, u8::to_le_bytes)?,
        DataType::Uint16 => pack(&narrow::<u32, u16>(&c.uint_contents, datatype)?, count, u16::to_le_bytes)?,
        DataType::Uint32 => pack(&c.uint_contents, count, u32::to_le_bytes)?,
        DataType::Uint64 => pack(&c.uint64_contents, count, u64::to_le_bytes)?,
        DataType::Fp32 => pack(&c.fp32_contents, count, f32::to_le_bytes)?,
        DataType::Fp64 => pack(&c.fp64_contents, count, f64::to_le_bytes)?,
        DataType::Fp16 | DataType::Bf16 => {
            return Err(format!("{datatype} has no typed contents in V2; it must come raw"));
        }
        DataType::Bytes => {
            if contents.bytes_contents.len() != count {
                return Err(format!(
                    "{} strings for a shape of {count} elements",
                    contents.bytes_contents.len()
                ));
            }
            return Ok(TensorData::Strings(contents.bytes_contents));
        }
    };
    Ok(TensorData::Raw(raw))
}

/// V2 raw BYTES: each element a 4-byte little-endian length, then its bytes.
fn encode_strings(strings: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(strings.iter().map(|s| 4 + s.len()).sum());
    for s in strings {
        // An element over 4 GiB cannot be framed; the mesh's message limits stop one long before.
        out.put_u32_le(u32::try_from(s.len()).unwrap_or(u32::MAX));
        out.put_slice(s);
    }
    out.freeze()
}

/// The inverse of [`encode_strings`], slicing the buffer rather than copying it.
fn decode_strings(mut bytes: Bytes) -> Result<Vec<Bytes>, String> {
    let mut strings = Vec::new();
    while !bytes.is_empty() {
        let Some(header) = bytes.get(..4) else {
            return Err("raw BYTES end inside an element's length".into());
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if bytes.len() - 4 < len {
            return Err(format!("a raw BYTES element of {len} bytes runs past the buffer"));
        }
        let _ = bytes.split_to(4);
        strings.push(bytes.split_to(len));
    }
    Ok(strings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<InferTensorContents>,
    ) -> InferOutputTensor {
        InferOutputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    #[test]
    fn a_request_goes_out_raw_with_strings_length_prefixed() {
        let request = InferRequest {
            inputs: vec![
                Tensor {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![2],
                    data: TensorData::Raw(Bytes::from_static(&[0, 0, 128, 63, 0, 0, 0, 64])),
                },
                Tensor {
                    name: "s".into(),
                    datatype: DataType::Bytes,
                    shape: vec![2],
                    data: TensorData::Strings(vec![Bytes::from_static(b"ab"), Bytes::new()]),
                },
            ],
            outputs: vec!["y".into()],
        };
        let v2 = to_request("m1", request).expect("valid");
        assert_eq!(v2.model_name, "m1");
        assert_eq!(v2.inputs[1].datatype, "BYTES");
        assert_eq!(v2.outputs[0].name, "y");
        assert_eq!(&v2.raw_input_contents[1][..], &[2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        assert_eq!(
            decode_strings(v2.raw_input_contents[1].clone()),
            Ok(vec![Bytes::from_static(b"ab"), Bytes::new()])
        );
    }

    #[test]
    fn raw_and_typed_answers_read_the_same() {
        let raw = ModelInferResponse {
            outputs: vec![output("y", "INT16", vec![2], None), output("s", "BYTES", vec![1], None)],
            raw_output_contents: vec![
                Bytes::from_static(&[255, 255, 2, 0]),
                Bytes::from_static(&[1, 0, 0, 0, b'z']),
            ],
            ..Default::default()
        };
        let typed = ModelInferResponse {
            outputs: vec![
                output(
                    "y",
                    "INT16",
                    vec![2],
                    Some(InferTensorContents { int_contents: vec![-1, 2], ..Default::default() }),
                ),
                output(
                    "s",
                    "BYTES",
                    vec![1],
                    Some(InferTensorContents {
                        bytes_contents: vec![Bytes::from_static(b"z")],
                        ..Default::default()
                    }),
                ),
            ],
            ..Default::default()
        };
        let a = from_response(raw).expect("raw");
        assert_eq!(a, from_response(typed).expect("typed"));
        assert_eq!(a[1].data, TensorData::Strings(vec![Bytes::from_static(b"z")]));
    }

    #[test]
    fn malformed_answers_name_the_output_and_the_fault() {
        let table = [
            (
                output("y", "FP32", vec![2], None),
                Some(Bytes::from_static(&[0; 4])),
                "output y: 4 raw bytes for 2 FP32",
            ),
            (output("y", "FLOAT", vec![1], None), None, "output y: unknown datatype"),
            (output("y", "FP32", vec![-1], None), None, "negative dimension"),
            (output("y", "FP16", vec![1], None), None, "must come raw"),
            (output("y", "FP64", vec![3], None), None, "0 typed values for a shape of 3"),
            (output("y", "BYTES", vec![1], None), Some(Bytes::from_static(&[9, 0, 0, 0, 1])), "runs past"),
        ];
        for (out, raw, expected) in table {
            let response = ModelInferResponse {
                outputs: vec![out],
                raw_output_contents: raw.into_iter().collect(),
                ..Default::default()
            };
            let err = from_response(response).expect_err(expected);
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let mismatched = ModelInferResponse {
            outputs: vec![output("a", "BOOL", vec![1], None), output("b", "BOOL", vec![1], None)],
            raw_output_contents: vec![Bytes::from_static(&[1])],
            ..Default::default()
        };
        assert!(from_response(mismatched).expect_err("count").contains("2 outputs but 1 raw"));
    }

    // The remote V2 runtime's cases.

    fn fp32(name: &str, shape: Vec<i64>, values: &[f32]) -> Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor { name: name.into(), datatype: DataType::Fp32, shape, data: TensorData::Raw(bytes.into()) }
    }

    #[test]
    fn a_request_carries_every_input_raw_in_order() {
        let strings = Tensor {
            name: "s".into(),
            datatype: DataType::Bytes,
            shape: vec![2],
            data: TensorData::Strings(vec![Bytes::from_static(b"ab"), Bytes::new()]),
        };
        let request = InferRequest {
            inputs: vec![fp32("x", vec![1, 2], &[1.0, 2.0]), strings],
            outputs: vec!["y".into()],
        };
        let wire = to_request("m", request).expect("valid");
        assert_eq!(wire.model_name, "m");
        assert_eq!(wire.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["x", "s"]);
        assert_eq!(wire.inputs[0].datatype, "FP32");
        assert!(wire.inputs.iter().all(|i| i.contents.is_none()));
        assert_eq!(wire.raw_input_contents[0].len(), 8);
        assert_eq!(&wire.raw_input_contents[1][..], b"\x02\0\0\0ab\0\0\0\0");
        assert_eq!(wire.outputs[0].name, "y");
    }

    #[test]
    fn a_request_whose_bytes_do_not_match_the_shape_is_refused() {
        let err = to_request("m", InferRequest { inputs: vec![fp32("x", vec![3], &[1.0])], outputs: vec![] })
            .expect_err("4 bytes for 3 elements");
        assert!(err.contains("input x"), "{err}");
    }

    #[test]
    fn raw_answers_are_read_in_output_order() {
        let response = ModelInferResponse {
            outputs: vec![
                InferOutputTensor {
                    name: "a".into(),
                    datatype: "INT64".into(),
                    shape: vec![2],
                    ..Default::default()
                },
                InferOutputTensor {
                    name: "b".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![
                Bytes::from([7i64.to_le_bytes(), (-1i64).to_le_bytes()].concat()),
                Bytes::from_static(b"\x03\0\0\0yes"),
            ],
            ..Default::default()
        };
        let tensors = from_response(response).expect("valid");
        assert_eq!(
            tensors[0].data,
            TensorData::Raw(Bytes::from([7i64.to_le_bytes(), (-1i64).to_le_bytes()].concat()))
        );
        assert_eq!(tensors[1].data, TensorData::Strings(vec![Bytes::from_static(b"yes")]));
    }

    #[test]
    fn typed_answers_become_little_endian_bytes() {
        let output = |datatype: &str, contents: InferTensorContents| ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: "y".into(),
                datatype: datatype.into(),
                shape: vec![1, 2],
                contents: Some(contents),
                ..Default::default()
            }],
            ..Default::default()
        };
        let cases: Vec<(&str, InferTensorContents, Vec<u8>)> = vec![
            (
                "FP64",
                InferTensorContents { fp64_contents: vec![1.5, -2.0], ..Default::default() },
                [1.5f64.to_le_bytes(), (-2.0f64).to_le_bytes()].concat(),
            ),
            (
                "FP32",
                InferTensorContents { fp32_contents: vec![0.25, 4.0], ..Default::default() },
                [0.25f32.to_le_bytes(), 4.0f32.to_le_bytes()].concat(),
            ),
            (
                "INT64",
                InferTensorContents { int64_contents: vec![1, -1], ..Default::default() },
                [1i64.to_le_bytes(), (-1i64).to_le_bytes()].concat(),
            ),
            (
                "INT32",
                InferTensorContents { int_contents: vec![3, -3], ..Default::default() },
                [3i32.to_le_bytes(), (-3i32).to_le_bytes()].concat(),
            ),
            ("INT8", InferTensorContents { int_contents: vec![-2, 5], ..Default::default() }, vec![0xfe, 5]),
            (
                "UINT16",
                InferTensorContents { uint_contents: vec![258, 1], ..Default::default() },
                vec![2, 1, 1, 0],
            ),
            (
                "BOOL",
                InferTensorContents { bool_contents: vec![true, false], ..Default::default() },
                vec![1, 0],
            ),
        ];
        for (datatype, contents, expected) in cases {
            let tensors = from_response(output(datatype, contents)).expect(datatype);
            assert_eq!(tensors[0].data, TensorData::Raw(expected.into()), "{datatype}");
            assert_eq!(tensors[0].shape, [1, 2]);
        }
        let err = from_response(output(
            "INT8",
            InferTensorContents { int_contents: vec![300, 1], ..Default::default() },
        ))
        .expect_err("300 is no INT8");
        assert!(err.contains("300"), "{err}");
        let err = from_response(output(
            "FP32",
            InferTensorContents { fp32_contents: vec![1.0], ..Default::default() },
        ))
        .expect_err("one value for two elements");
        assert!(err.contains("output y"), "{err}");
    }

    #[test]
    fn truncated_raw_strings_are_an_error_not_a_panic() {
        for bytes in [&b"\x01\0"[..], b"\x05\0\0\0abc"] {
            assert!(decode_strings(Bytes::copy_from_slice(bytes)).is_err());
        }
    }

    #[test]
    fn an_interface_with_an_unknown_datatype_counts_as_undeclared() {
        let spec = |datatype: &str| TensorMetadata {
            name: "x".into(),
            datatype: datatype.into(),
            shape: vec![-1, 4],
        };
        assert_eq!(tensor_specs(vec![spec("FP32")]).map(|s| s.len()), Some(1));
        assert_eq!(tensor_specs(vec![spec("FP32"), spec("COMPLEX")]), None);
        assert_eq!(tensor_specs(vec![]), Some(vec![]));
    }
}
