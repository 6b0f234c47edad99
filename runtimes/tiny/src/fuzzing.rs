//! The fuzz target for the evaluator: a model file anyone who can register a model can hand it.
//! Decoding must refuse what it cannot run with an error, never a panic (the loader catches one, but a
//! caught panic is still a bug here), and a model it accepts must answer a request shaped as its
//! metadata says, or refuse it with an error. The AFL++ binary in `fuzz/` and the corpus replay in
//! this crate's tests call [`onnx_model`] (docs/fuzzing.md).

use bytes::Bytes;
use densemesh_runtime_core::{DataType, InferRequest, LoadedModel, Tensor, TensorData};

use crate::{TinyConfig, TinyError, TinyRuntime};

/// Requests larger than this are not built: the target is about decoding and evaluation, not about
/// a model that asks for a large input, which the cache's byte budget and the request size limit bound.
const MAX_INPUT_ELEMENTS: usize = 4096;

/// Loads `data` as a `ModelProto`, then runs one request made from the model's declared inputs.
pub fn onnx_model(data: &[u8]) {
    let runtime = TinyRuntime::new(TinyConfig::default());
    let model = match runtime.load_bytes(data) {
        Ok(model) => model,
        Err(TinyError::Panicked(message)) => panic!("decoding panicked (caught by the loader): {message}"),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(model.size_bytes() > 0);
    let mut inputs = Vec::new();
    for spec in &model.metadata().inputs {
        // Variable dimensions get 2, so a broadcast or a reduction has more than one element to see.
        let shape: Vec<i64> = spec.shape.iter().map(|d| if *d < 0 { 2 } else { *d }).collect();
        let Some(count) = shape.iter().try_fold(1usize, |n, d| n.checked_mul(usize::try_from(*d).ok()?))
        else {
            return;
        };
        if count > MAX_INPUT_ELEMENTS {
            return;
        }
        inputs.push(Tensor {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape,
            data: elements(spec.datatype, count),
        });
    }
    match model.evaluate(InferRequest { inputs, outputs: Vec::new() }) {
        Ok(outputs) => assert_eq!(outputs.len(), model.metadata().outputs.len()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// `count` small, varied elements of `datatype`.
fn elements(datatype: DataType, count: usize) -> TensorData {
    if datatype == DataType::Bytes {
        return TensorData::Strings((0..count).map(|i| Bytes::from(format!("s{}", i % 3))).collect());
    }
    let mut out = Vec::new();
    for i in 0..count {
        let small = (i % 5) as i8 - 2;
        match datatype {
            DataType::Bool => out.push(u8::from(i % 2 == 1)),
            DataType::Int8 => out.extend_from_slice(&small.to_le_bytes()),
            DataType::Uint8 => out.push(small.unsigned_abs()),
            DataType::Int16 => out.extend_from_slice(&i16::from(small).to_le_bytes()),
            DataType::Uint16 => out.extend_from_slice(&u16::from(small.unsigned_abs()).to_le_bytes()),
            DataType::Int32 => out.extend_from_slice(&i32::from(small).to_le_bytes()),
            DataType::Uint32 => out.extend_from_slice(&u32::from(small.unsigned_abs()).to_le_bytes()),
            DataType::Int64 => out.extend_from_slice(&i64::from(small).to_le_bytes()),
            DataType::Uint64 => out.extend_from_slice(&u64::from(small.unsigned_abs()).to_le_bytes()),
            DataType::Fp16 => out.extend_from_slice(&half_bits(small).to_le_bytes()),
            DataType::Bf16 => {
                out.extend_from_slice(&((f32::from(small) * 0.5).to_bits() >> 16).to_le_bytes()[..2])
            }
            DataType::Fp32 => out.extend_from_slice(&(f32::from(small) * 0.5).to_le_bytes()),
            DataType::Fp64 => out.extend_from_slice(&(f64::from(small) * 0.5).to_le_bytes()),
            DataType::Bytes => unreachable!("strings are built above"),
        }
    }
    TensorData::Raw(out.into())
}

/// IEEE half bits of `small` / 2 for the few `small` [`elements`] writes (-2 to 2), exactly.
fn half_bits(small: i8) -> u16 {
    match small {
        -2 => 0xBC00,
        -1 => 0xB800,
        1 => 0x3800,
        2 => 0x3C00,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    include!("../../../fuzz/replay.rs");

    #[test]
    fn corpus_tiny_onnx_replays() {
        replay("tiny_onnx", super::onnx_model);
    }
}
