//! Request decoding: what a request says about itself, checked without the model.

use std::collections::HashSet;

use bytes::Bytes;
use densemesh_proto::inference::model_infer_request::InferInputTensor;
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest};
use densemesh_runtime_core::{DataType, InferRequest, Tensor, TensorData};

use super::{Decoded, invalid};
use crate::error::MeshError;

/// Turns a V2 request into runtime tensors, taking ownership so raw buffers move instead of copying.
pub fn decode(request: ModelInferRequest) -> Result<Decoded, MeshError> {
    let ModelInferRequest { inputs, outputs, raw_input_contents, .. } = request;
    let raw = !raw_input_contents.is_empty();
    if raw && raw_input_contents.len() != inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries but the request has {} inputs; send one per input, in order",
            raw_input_contents.len(),
            inputs.len()
        )));
    }
    let mut seen = HashSet::with_capacity(inputs.len());
    let mut raw_contents = raw_input_contents.into_iter();
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        if input.name.is_empty() {
            return Err(invalid("an input has an empty name".to_owned()));
        }
        if !seen.insert(input.name.clone()) {
            return Err(invalid(format!("input {} appears more than once", input.name)));
        }
        tensors.push(decode_input(input, raw_contents.next())?);
    }
    let mut wanted = HashSet::with_capacity(outputs.len());
    let mut output_names = Vec::with_capacity(outputs.len());
    for output in outputs {
        if !wanted.insert(output.name.clone()) {
            return Err(invalid(format!("output {} is requested more than once", output.name)));
        }
        output_names.push(output.name);
    }
    Ok(Decoded { request: InferRequest { inputs: tensors, outputs: output_names }, raw })
}

fn decode_input(input: InferInputTensor, raw: Option<Bytes>) -> Result<Tensor, MeshError> {
    let InferInputTensor { name, datatype, shape, contents, .. } = input;
    let datatype: DataType = datatype.parse().map_err(|e| invalid(format!("input {name}: {e}")))?;
    if let Some(dim) = shape.iter().find(|d| **d < 0) {
        return Err(invalid(format!("input {name}: shape {shape:?} has the negative dimension {dim}")));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |acc, d| usize::try_from(*d).ok().and_then(|d| acc.checked_mul(d)))
        .ok_or_else(|| invalid(format!("input {name}: shape {shape:?} has more elements than can exist")))?;
    let data = match raw {
        Some(bytes) => {
            if contents.as_ref().is_some_and(has_elements) {
                return Err(invalid(format!(
                    "input {name} has both contents and raw_input_contents; send one or the other"
                )));
            }
            decode_raw(&name, datatype, &shape, count, bytes)?
        }
        None => decode_typed(&name, datatype, count, contents.unwrap_or_default())?,
    };
    Ok(Tensor { name, datatype, shape, data })
}

fn has_elements(c: &InferTensorContents) -> bool {
    !(c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty())
}

fn decode_raw(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    count: usize,
    bytes: Bytes,
) -> Result<TensorData, MeshError> {
    let Some(size) = datatype.element_size() else {
        return decode_raw_strings(name, count, bytes).map(TensorData::Strings);
    };
    let expected = count.checked_mul(size);
    if expected != Some(bytes.len()) {
        return Err(invalid(format!(
            "input {name}: raw contents are {} bytes but shape {shape:?} of {datatype} needs {} bytes",
            bytes.len(),
            expected.map_or_else(|| "more".to_owned(), |e| e.to_string())
        )));
    }
    Ok(TensorData::Raw(bytes))
}

/// BYTES in raw form: each element is a 4-byte little-endian length, then that many bytes.
fn decode_raw_strings(name: &str, count: usize, bytes: Bytes) -> Result<Vec<Bytes>, MeshError> {
    let mut items = Vec::with_capacity(count.min(bytes.len() / 4));
    let mut offset = 0usize;
    while offset < bytes.len() {
        let Some(prefix) = bytes.get(offset..offset + 4) else {
            return Err(invalid(format!(
                "input {name}: raw BYTES contents end inside the length prefix of element {}",
                items.len()
            )));
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let start = offset + 4;
        let end = start.checked_add(len).filter(|e| *e <= bytes.len()).ok_or_else(|| {
            invalid(format!(
                "input {name}: raw BYTES element {} claims {len} bytes but only {} remain",
                items.len(),
                bytes.len() - start
            ))
        })?;
        items.push(bytes.slice(start..end));
        offset = end;
    }
    if items.len() != count {
        return Err(invalid(format!(
            "input {name}: raw BYTES contents hold {} elements but the shape needs {count}",
            items.len()
        )));
    }
    Ok(items)
}

fn decode_typed(
    name: &str,
    datatype: DataType,
    count: usize,
    c: InferTensorContents,
) -> Result<TensorData, MeshError> {
    let field = typed_field(datatype).ok_or_else(|| {
        invalid(format!(
            "input {name}: {datatype} has no typed contents field in the V2 protocol; send it in raw_input_contents"
        ))
    })?;
    let lengths = [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ];
    if let Some((other, _)) = lengths.iter().find(|(f, n)| *f != field && *n > 0) {
        return Err(invalid(format!("input {name}: datatype {datatype} goes in {field}, not {other}")));
    }
    let given = lengths.iter().find(|(f, _)| *f == field).map_or(0, |(_, n)| *n);
    if given != count {
        return Err(invalid(format!(
            "input {name}: {field} has {given} elements but the shape needs {count}"
        )));
    }
    let narrow_err = |i: usize, v: i128| {
        invalid(format!("input {name}: element {i} is {v}, which does not fit {datatype}"))
    };
    macro_rules! narrow {
        ($src:expr, $t:ty) => {{
            let mut out = Vec::with_capacity(count * std::mem::size_of::<$t>());
            for (i, v) in $src.iter().enumerate() {
                let n = <$t>::try_from(*v).map_err(|_| narrow_err(i, i128::from(*v)))?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            TensorData::Raw(out.into())
        }};
    }
    macro_rules! le {
        ($src:expr) => {{ TensorData::Raw($src.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()) }};
    }
    Ok(match datatype {
        DataType::Bool => {
            TensorData::Raw(c.bool_contents.iter().map(|b| u8::from(*b)).collect::<Vec<u8>>().into())
        }
        DataType::Int8 => narrow!(c.int_contents, i8),
        DataType::Int16 => narrow!(c.int_contents, i16),
        DataType::Int32 => le!(c.int_contents),
        DataType::Int64 => le!(c.int64_contents),
        DataType::Uint8 => narrow!(c.uint_contents, u8),
        DataType::Uint16 => narrow!(c.uint_contents, u16),
        DataType::Uint32 => le!(c.uint_contents),
        DataType::Uint64 => le!(c.uint64_contents),
        DataType::Fp32 => le!(c.fp32_contents),
        DataType::Fp64 => le!(c.fp64_contents),
        DataType::Bytes => TensorData::Strings(c.bytes_contents),
        DataType::Fp16 | DataType::Bf16 => unreachable!("no typed field, rejected above"),
    })
}

/// The typed contents field that carries a datatype; `None` for FP16 and BF16, which only travel raw.
pub(super) fn typed_field(datatype: DataType) -> Option<&'static str> {
    Some(match datatype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 | DataType::Bf16 => return None,
    })
}
