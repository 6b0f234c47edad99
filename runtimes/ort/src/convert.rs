//! Tensors between densemesh's byte buffers and ONNX Runtime values.

use bytes::Bytes;
use densemesh_runtime_core::{Cause, Context, DataType, Error, Result, Tensor, TensorData};
use half::{bf16, f16};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

/// The V2 datatype for an ONNX element type; `None` for types V2 cannot carry (complex, fp8, …).
pub(crate) fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

fn invalid(name: &str, e: impl Into<Cause>) -> Error {
    Error::InvalidInput(Context::new(format!("input {name}"), e).into())
}

/// Builds an ONNX Runtime value; one copy of the elements (ONNX Runtime needs its own aligned buffer).
pub(crate) fn to_value(tensor: Tensor) -> Result<DynValue> {
    let Tensor { name, datatype, shape, data } = tensor;
    let raw = |data: &TensorData| match data {
        TensorData::Raw(bytes) => Ok(bytes.clone()),
        TensorData::Strings(_) => Err(invalid(&name, format!("{datatype} data given as strings"))),
    };
    macro_rules! pod {
        ($t:ty) => {{
            let elements: Vec<$t> = bytemuck::pod_collect_to_vec(&raw(&data)?);
            OrtTensor::from_array((shape.clone(), elements)).map(|t| t.into_dyn())
        }};
    }
    let value = match datatype {
        DataType::Bool => {
            let elements: Vec<bool> = raw(&data)?.iter().map(|b| *b != 0).collect();
            OrtTensor::from_array((shape.clone(), elements)).map(|t| t.into_dyn())
        }
        DataType::Uint8 => pod!(u8),
        DataType::Uint16 => pod!(u16),
        DataType::Uint32 => pod!(u32),
        DataType::Uint64 => pod!(u64),
        DataType::Int8 => pod!(i8),
        DataType::Int16 => pod!(i16),
        DataType::Int32 => pod!(i32),
        DataType::Int64 => pod!(i64),
        DataType::Fp16 => pod!(f16),
        DataType::Bf16 => pod!(bf16),
        DataType::Fp32 => pod!(f32),
        DataType::Fp64 => pod!(f64),
        DataType::Bytes => {
            let TensorData::Strings(items) = &data else {
                return Err(invalid(&name, "BYTES data given as fixed-size raw elements"));
            };
            let strings = items
                .iter()
                .enumerate()
                .map(|(i, b)| match std::str::from_utf8(b) {
                    Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
                    _ => Err(invalid(
                        &name,
                        format!("element {i} is not UTF-8 text without NUL bytes, as ONNX strings must be"),
                    )),
                })
                .collect::<Result<Vec<String>>>()?;
            OrtTensor::from_string_array((shape.clone(), strings.as_slice())).map(|t| t.into_dyn())
        }
    };
    value.map_err(|e| invalid(&name, e))
}

/// Copies an ONNX Runtime output into a densemesh tensor.
pub(crate) fn from_value(name: &str, value: &DynValue) -> Result<Tensor> {
    let failed = |e: Cause| Error::Inference(Context::new(format!("output {name}"), e).into());
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(failed(format!("is a {:?}, not a tensor", value.dtype()).into()));
    };
    let datatype =
        datatype_of(*ty).ok_or_else(|| failed(format!("element type {ty:?} has no V2 datatype").into()))?;
    macro_rules! pod {
        ($t:ty) => {{
            let (shape, elements) = value.try_extract_tensor::<$t>().map_err(|e| failed(e.into()))?;
            (shape.to_vec(), TensorData::Raw(Bytes::copy_from_slice(bytemuck::cast_slice(elements))))
        }};
    }
    let (shape, data) = match datatype {
        DataType::Bool => {
            let (shape, elements) = value.try_extract_tensor::<bool>().map_err(|e| failed(e.into()))?;
            (
                shape.to_vec(),
                TensorData::Raw(elements.iter().map(|b| u8::from(*b)).collect::<Vec<u8>>().into()),
            )
        }
        DataType::Uint8 => pod!(u8),
        DataType::Uint16 => pod!(u16),
        DataType::Uint32 => pod!(u32),
        DataType::Uint64 => pod!(u64),
        DataType::Int8 => pod!(i8),
        DataType::Int16 => pod!(i16),
        DataType::Int32 => pod!(i32),
        DataType::Int64 => pod!(i64),
        DataType::Fp16 => pod!(f16),
        DataType::Bf16 => pod!(bf16),
        DataType::Fp32 => pod!(f32),
        DataType::Fp64 => pod!(f64),
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(|e| failed(e.into()))?;
            (shape.to_vec(), TensorData::Strings(strings.into_iter().map(Bytes::from).collect()))
        }
    };
    Ok(Tensor { name: name.to_owned(), datatype, shape, data })
}
