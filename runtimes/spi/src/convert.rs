//! Tensors to and from KServe V2 messages, at the edge where the crate talks to the runtime.
//!
//! Requests always go out as `raw_input_contents` (the V2 rule is all raw or none), so fixed-size
//! tensors pass as the `Bytes` they arrived in. Answers may come back raw or typed
//! (`InferTensorContents`), as V2 servers differ; both become the same [`Tensor`].

use bytes::{BufMut, Bytes, BytesMut};
use densemesh_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use densemesh_proto::inference::model_infer_response::InferOutputTensor;
use densemesh_proto::inference::model_metadata_response::TensorMetadata;
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use densemesh_runtime_core::{DataType, InferRequest, Tensor, TensorData, TensorSpec};

/// A V2 request for `model_id`. `model_name` carries the id too, for V2 servers that route by it
/// rather than by the `mm-model-id` header (ModelMesh injects it there through the idInjectionPath
/// its adapters declare for ModelInfer).
pub(crate) fn infer_request(model_id: &str, request: InferRequest) -> ModelInferRequest {
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut raw = Vec::with_capacity(request.inputs.len());
    for tensor in request.inputs {
        inputs.push(InferInputTensor {
            name: tensor.name,
            datatype: tensor.datatype.as_str().to_owned(),
            shape: tensor.shape,
            parameters: Default::default(),
            contents: None,
        });
        raw.push(match tensor.data {
            TensorData::Raw(bytes) => bytes,
            TensorData::Strings(strings) => encode_strings(&strings),
        });
    }
    ModelInferRequest {
        model_name: model_id.to_owned(),
        inputs,
        outputs: request
            .outputs
            .into_iter()
            .map(|name| InferRequestedOutputTensor { name, parameters: Default::default() })
            .collect(),
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// The answer's tensors; the error says which output is malformed and how.
pub(crate) fn infer_response(response: ModelInferResponse) -> Result<Vec<Tensor>, String> {
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
    let c = &contents;
    // Narrow integer types travel widened in int_contents / uint_contents; `as` restores the width
    // the datatype names, as V2 servers widened them.
    let raw = match datatype {
        DataType::Bool => pack(&c.bool_contents, count, |v| [u8::from(v)])?,
        DataType::Int8 => pack(&c.int_contents, count, |v| (v as i8).to_le_bytes())?,
        DataType::Int16 => pack(&c.int_contents, count, |v| (v as i16).to_le_bytes())?,
        DataType::Int32 => pack(&c.int_contents, count, i32::to_le_bytes)?,
        DataType::Int64 => pack(&c.int64_contents, count, i64::to_le_bytes)?,
        DataType::Uint8 => pack(&c.uint_contents, count, |v| (v as u8).to_le_bytes())?,
        DataType::Uint16 => pack(&c.uint_contents, count, |v| (v as u16).to_le_bytes())?,
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

/// A V2 tensor declaration; `None` when its datatype is not one the mesh knows.
pub(crate) fn tensor_spec(meta: TensorMetadata) -> Option<TensorSpec> {
    let datatype = meta.datatype.parse().ok()?;
    Some(TensorSpec { name: meta.name, datatype, shape: meta.shape })
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
        let v2 = infer_request("m1", request);
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
        let a = infer_response(raw).expect("raw");
        assert_eq!(a, infer_response(typed).expect("typed"));
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
            let err = infer_response(response).expect_err(expected);
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let mismatched = ModelInferResponse {
            outputs: vec![output("a", "BOOL", vec![1], None), output("b", "BOOL", vec![1], None)],
            raw_output_contents: vec![Bytes::from_static(&[1])],
            ..Default::default()
        };
        assert!(infer_response(mismatched).expect_err("count").contains("2 outputs but 1 raw"));
    }
}
