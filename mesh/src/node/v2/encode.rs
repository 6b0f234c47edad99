//! Response encoding: runtime tensors to V2 outputs, raw or typed as the client asked.

use bytes::{BufMut, Bytes, BytesMut};
use densemesh_proto::inference::model_infer_response::InferOutputTensor;
use densemesh_proto::inference::model_metadata_response::TensorMetadata;
use densemesh_proto::inference::{InferTensorContents, ModelInferResponse};
use densemesh_runtime_core::{DataType, Tensor, TensorData, TensorSpec};

/// Builds the response. Outputs go in `raw_output_contents` when the client sent raw inputs, else in
/// typed `contents`; FP16/BF16 have no typed field, so a response holding one is raw throughout.
pub fn encode(
    model_name: String,
    model_version: String,
    id: String,
    outputs: Vec<Tensor>,
    raw: bool,
) -> ModelInferResponse {
    let raw = raw || outputs.iter().any(|t| super::decode::typed_field(t.datatype).is_none());
    let mut response = ModelInferResponse {
        model_name,
        model_version,
        id,
        outputs: Vec::with_capacity(outputs.len()),
        ..Default::default()
    };
    for tensor in outputs {
        let Tensor { name, datatype, shape, data } = tensor;
        let contents = if raw {
            response.raw_output_contents.push(raw_bytes(data));
            None
        } else {
            Some(typed_contents(datatype, data))
        };
        response.outputs.push(InferOutputTensor {
            name,
            datatype: datatype.as_str().to_owned(),
            shape,
            contents,
            ..Default::default()
        });
    }
    response
}

/// V2 metadata for a declared input or output.
pub fn tensor_metadata(spec: &TensorSpec) -> TensorMetadata {
    TensorMetadata {
        name: spec.name.clone(),
        datatype: spec.datatype.as_str().to_owned(),
        shape: spec.shape.clone(),
    }
}

/// A tensor's elements as V2 raw contents (BYTES elements each behind a 4-byte length); fixed-size
/// elements are the buffer they already are.
pub fn raw_bytes(data: TensorData) -> Bytes {
    match data {
        TensorData::Raw(bytes) => bytes,
        TensorData::Strings(items) => {
            let mut out = BytesMut::with_capacity(items.iter().map(|b| b.len() + 4).sum());
            for item in items {
                // An element over 4 GiB cannot be a V2 BYTES element; the runtime cannot produce one.
                out.put_u32_le(u32::try_from(item.len()).unwrap_or(u32::MAX));
                out.put_slice(&item);
            }
            out.freeze()
        }
    }
}

fn typed_contents(datatype: DataType, data: TensorData) -> InferTensorContents {
    let mut c = InferTensorContents::default();
    let bytes = match data {
        TensorData::Strings(items) => {
            c.bytes_contents = items;
            return c;
        }
        TensorData::Raw(bytes) => bytes,
    };
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    match datatype {
        DataType::Bool => c.bool_contents = bytes.iter().map(|b| *b != 0).collect(),
        DataType::Int8 => c.int_contents = bytes.iter().map(|b| i32::from(*b as i8)).collect(),
        DataType::Int16 => {
            c.int_contents = chunks(&bytes).map(|a| i32::from(i16::from_le_bytes(a))).collect()
        }
        DataType::Int32 => c.int_contents = chunks(&bytes).map(i32::from_le_bytes).collect(),
        DataType::Int64 => c.int64_contents = chunks(&bytes).map(i64::from_le_bytes).collect(),
        DataType::Uint8 => c.uint_contents = bytes.iter().map(|b| u32::from(*b)).collect(),
        DataType::Uint16 => {
            c.uint_contents = chunks(&bytes).map(|a| u32::from(u16::from_le_bytes(a))).collect()
        }
        DataType::Uint32 => c.uint_contents = chunks(&bytes).map(u32::from_le_bytes).collect(),
        DataType::Uint64 => c.uint64_contents = chunks(&bytes).map(u64::from_le_bytes).collect(),
        DataType::Fp32 => c.fp32_contents = chunks(&bytes).map(f32::from_le_bytes).collect(),
        DataType::Fp64 => c.fp64_contents = chunks(&bytes).map(f64::from_le_bytes).collect(),
        // Callers switch to raw for these; kept total so no datatype can panic here.
        DataType::Fp16 | DataType::Bf16 | DataType::Bytes => {}
    }
    c
}
