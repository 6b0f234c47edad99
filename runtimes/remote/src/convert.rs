//! Tensors to and from the V2 wire, for a server this crate is the client of.
//!
//! Requests go out as `raw_input_contents` (the tensors' bytes move without a per-element copy); a
//! server may answer in either form, raw bytes or typed `contents`, so both are read back.

use bytes::{BufMut, Bytes, BytesMut};
use densemesh_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use densemesh_proto::inference::model_infer_response::InferOutputTensor;
use densemesh_proto::inference::model_metadata_response::TensorMetadata;
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use densemesh_runtime_core::{DataType, InferRequest, Tensor, TensorData, TensorSpec};

/// The V2 request for `model_name`. Fails when a tensor's data does not fit its datatype and shape,
/// which the mesh's validation should have caught already.
pub(crate) fn to_request(model_name: &str, request: InferRequest) -> Result<ModelInferRequest, String> {
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut raw = Vec::with_capacity(request.inputs.len());
    for tensor in request.inputs {
        let elements =
            element_count(&tensor.shape).ok_or_else(|| format!("input {}: invalid shape", tensor.name))?;
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

/// The tensors of a V2 answer, whichever form each output's data came in.
pub(crate) fn from_response(response: ModelInferResponse) -> Result<Vec<Tensor>, String> {
    let mut raw = response.raw_output_contents.into_iter();
    let uses_raw = raw.len() > 0;
    response
        .outputs
        .into_iter()
        .map(|output| {
            let bytes = if uses_raw {
                Some(raw.next().ok_or_else(|| format!("output {} has no raw contents", output.name))?)
            } else {
                None
            };
            output_tensor(output, bytes).map_err(|why| format!("output {why}"))
        })
        .collect()
}

fn output_tensor(output: InferOutputTensor, raw: Option<Bytes>) -> Result<Tensor, String> {
    let name = output.name;
    let datatype: DataType = output.datatype.parse().map_err(|e| format!("{name}: {e}"))?;
    let elements =
        element_count(&output.shape).ok_or_else(|| format!("{name}: invalid shape {:?}", output.shape))?;
    let data = match raw {
        Some(bytes) => raw_data(datatype, bytes, elements),
        None => typed_data(datatype, output.contents.unwrap_or_default(), elements),
    }
    .map_err(|why| format!("{name}: {why}"))?;
    Ok(Tensor { name, datatype, shape: output.shape, data })
}

fn raw_data(datatype: DataType, bytes: Bytes, elements: usize) -> Result<TensorData, String> {
    match datatype.element_size() {
        Some(size) if Some(bytes.len()) == elements.checked_mul(size) => Ok(TensorData::Raw(bytes)),
        Some(_) => Err(format!("{} raw bytes do not hold {elements} {datatype} elements", bytes.len())),
        None => {
            let items = decode_strings(bytes)?;
            if items.len() != elements {
                return Err(format!("{} strings for {elements} elements", items.len()));
            }
            Ok(TensorData::Strings(items))
        }
    }
}

fn typed_data(
    datatype: DataType,
    contents: InferTensorContents,
    elements: usize,
) -> Result<TensorData, String> {
    fn pack<T: Copy>(
        values: &[T],
        elements: usize,
        put: impl Fn(&mut BytesMut, T),
    ) -> Result<TensorData, String> {
        if values.len() != elements {
            return Err(format!("{} values for {elements} elements", values.len()));
        }
        let mut out = BytesMut::with_capacity(std::mem::size_of_val(values));
        for &value in values {
            put(&mut out, value);
        }
        Ok(TensorData::Raw(out.freeze()))
    }
    fn narrow<T: TryFrom<i64>>(value: i64, datatype: DataType) -> Result<T, String> {
        T::try_from(value).map_err(|_| format!("{value} does not fit {datatype}"))
    }
    let c = &contents;
    match datatype {
        DataType::Bool => pack(&c.bool_contents, elements, |o, v| o.put_u8(u8::from(v))),
        DataType::Uint8 => pack(&checked(&c.uint_contents, datatype)?, elements, |o, v: u8| o.put_u8(v)),
        DataType::Uint16 => {
            pack(&checked(&c.uint_contents, datatype)?, elements, |o, v: u16| o.put_u16_le(v))
        }
        DataType::Uint32 => pack(&c.uint_contents, elements, |o, v| o.put_u32_le(v)),
        DataType::Uint64 => pack(&c.uint64_contents, elements, |o, v| o.put_u64_le(v)),
        DataType::Int8 => {
            let values: Vec<i8> =
                c.int_contents.iter().map(|&v| narrow(i64::from(v), datatype)).collect::<Result<_, _>>()?;
            pack(&values, elements, |o, v| o.put_i8(v))
        }
        DataType::Int16 => {
            let values: Vec<i16> =
                c.int_contents.iter().map(|&v| narrow(i64::from(v), datatype)).collect::<Result<_, _>>()?;
            pack(&values, elements, |o, v| o.put_i16_le(v))
        }
        DataType::Int32 => pack(&c.int_contents, elements, |o, v| o.put_i32_le(v)),
        DataType::Int64 => pack(&c.int64_contents, elements, |o, v| o.put_i64_le(v)),
        DataType::Fp32 => pack(&c.fp32_contents, elements, |o, v| o.put_f32_le(v)),
        DataType::Fp64 => pack(&c.fp64_contents, elements, |o, v| o.put_f64_le(v)),
        DataType::Fp16 | DataType::Bf16 => {
            Err(format!("{datatype} has no typed contents in V2; it must come raw"))
        }
        DataType::Bytes => {
            if c.bytes_contents.len() != elements {
                return Err(format!("{} strings for {elements} elements", c.bytes_contents.len()));
            }
            Ok(TensorData::Strings(contents.bytes_contents))
        }
    }
}

/// Unsigned typed contents narrowed to `T`, refusing values that do not fit.
fn checked<T: TryFrom<u32>>(values: &[u32], datatype: DataType) -> Result<Vec<T>, String> {
    values.iter().map(|&v| T::try_from(v).map_err(|_| format!("{v} does not fit {datatype}"))).collect()
}

/// A declared interface, or `None` when the server declares none or something this side cannot
/// represent: the mesh then treats the model's tensors as undeclared and passes requests through.
pub(crate) fn tensor_specs(tensors: Vec<TensorMetadata>) -> Option<Vec<TensorSpec>> {
    tensors
        .into_iter()
        .map(|t| Some(TensorSpec { datatype: t.datatype.parse().ok()?, name: t.name, shape: t.shape }))
        .collect()
}

/// The number of elements of a concrete shape; `None` for a negative dimension or an overflow.
fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

/// V2's raw BYTES form: each element a 4-byte little-endian length, then its bytes.
fn encode_strings(items: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(items.iter().map(|i| 4 + i.len()).sum());
    for item in items {
        // The mesh caps a request far below 4 GiB, so a length always fits.
        out.put_u32_le(u32::try_from(item.len()).unwrap_or(u32::MAX));
        out.put_slice(item);
    }
    out.freeze()
}

fn decode_strings(mut bytes: Bytes) -> Result<Vec<Bytes>, String> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let Some(prefix) = bytes.get(..4) else { return Err("a truncated BYTES length prefix".into()) };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if bytes.len() - 4 < len {
            return Err(format!("a BYTES element of {len} bytes with {} left", bytes.len() - 4));
        }
        let _ = bytes.split_to(4);
        items.push(bytes.split_to(len));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

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
