//! Tensors inside the evaluator: a shape and elements in a plain vector of their type.

use bytes::Bytes;
use densemesh_runtime_core::{DataType, Tensor, TensorData};

use crate::error::TinyError;
use crate::heap::HeapSize;

/// Element types the evaluator computes with; every other datatype can only pass through `Identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F64,
    I64,
    I32,
    Str,
    /// Any other datatype, carried as raw little-endian bytes.
    Other(DataType),
}

impl Elem {
    /// From an ONNX `TensorProto.DataType` code.
    pub(crate) fn from_onnx(code: i32) -> Option<Elem> {
        Some(match code {
            1 => Elem::F32,
            11 => Elem::F64,
            7 => Elem::I64,
            6 => Elem::I32,
            8 => Elem::Str,
            9 => Elem::Other(DataType::Bool),
            2 => Elem::Other(DataType::Uint8),
            3 => Elem::Other(DataType::Int8),
            4 => Elem::Other(DataType::Uint16),
            5 => Elem::Other(DataType::Int16),
            10 => Elem::Other(DataType::Fp16),
            12 => Elem::Other(DataType::Uint32),
            13 => Elem::Other(DataType::Uint64),
            16 => Elem::Other(DataType::Bf16),
            _ => return None,
        })
    }

    pub(crate) fn datatype(self) -> DataType {
        match self {
            Elem::F32 => DataType::Fp32,
            Elem::F64 => DataType::Fp64,
            Elem::I64 => DataType::Int64,
            Elem::I32 => DataType::Int32,
            Elem::Str => DataType::Bytes,
            Elem::Other(d) => d,
        }
    }
}

/// A tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Str(Vec<Bytes>),
    Other(DataType, Bytes),
}

/// A tensor: row-major elements and their dimensions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Value {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Data,
}

impl HeapSize for Data {
    fn heap_bytes(&self) -> u64 {
        match self {
            Data::F32(v) => v.heap_bytes(),
            Data::F64(v) => v.heap_bytes(),
            Data::I64(v) => v.heap_bytes(),
            Data::I32(v) => v.heap_bytes(),
            Data::Str(v) => v.heap_bytes(),
            Data::Other(_, b) => b.heap_bytes(),
        }
    }
}

impl HeapSize for Value {
    fn heap_bytes(&self) -> u64 {
        self.shape.heap_bytes() + self.data.heap_bytes()
    }
}

impl Data {
    pub(crate) fn elem(&self) -> Elem {
        match self {
            Data::F32(_) => Elem::F32,
            Data::F64(_) => Elem::F64,
            Data::I64(_) => Elem::I64,
            Data::I32(_) => Elem::I32,
            Data::Str(_) => Elem::Str,
            Data::Other(d, _) => Elem::Other(*d),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::Str(v) => v.len(),
            Data::Other(d, b) => b.len() / d.element_size().unwrap_or(1),
        }
    }
}

impl Value {
    pub(crate) fn new(shape: Vec<usize>, data: Data) -> Value {
        Value { shape, data }
    }

    pub(crate) fn elem(&self) -> Elem {
        self.data.elem()
    }

    /// The elements as `f32`, converting other numeric types as ONNX Runtime's ML operators do.
    pub(crate) fn to_f32(&self) -> Result<std::borrow::Cow<'_, [f32]>, TinyError> {
        use std::borrow::Cow;
        Ok(match &self.data {
            Data::F32(v) => Cow::Borrowed(v),
            Data::F64(v) => Cow::Owned(v.iter().map(|x| *x as f32).collect()),
            Data::I64(v) => Cow::Owned(v.iter().map(|x| *x as f32).collect()),
            Data::I32(v) => Cow::Owned(v.iter().map(|x| *x as f32).collect()),
            other => {
                return Err(crate::error::eval(format!("expected a numeric tensor, got {:?}", other.elem())));
            }
        })
    }

    /// The elements as `i64`, for shape and axes inputs.
    pub(crate) fn to_i64(&self) -> Result<Vec<i64>, TinyError> {
        match &self.data {
            Data::I64(v) => Ok(v.clone()),
            Data::I32(v) => Ok(v.iter().map(|x| i64::from(*x)).collect()),
            other => Err(crate::error::eval(format!("expected an integer tensor, got {:?}", other.elem()))),
        }
    }

    /// A request tensor, checked to hold as many elements as its shape says.
    pub(crate) fn from_tensor(tensor: Tensor) -> Result<Value, TinyError> {
        let bad = |what: String| TinyError::InvalidInput(format!("input {}: {what}", tensor.name));
        let shape: Vec<usize> = tensor
            .shape
            .iter()
            .map(|d| usize::try_from(*d).map_err(|_| bad(format!("negative dimension {d}"))))
            .collect::<Result<_, _>>()?;
        let count = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .ok_or_else(|| bad("too many elements".into()))?;
        let data = match (tensor.datatype, &tensor.data) {
            (DataType::Bytes, TensorData::Strings(items)) => Data::Str(items.clone()),
            (datatype, TensorData::Raw(raw)) => {
                let size = datatype.element_size().ok_or_else(|| bad("BYTES must come as strings".into()))?;
                if raw.len() != count * size {
                    return Err(bad(format!("{} bytes for {count} elements of {datatype}", raw.len())));
                }
                match datatype {
                    DataType::Fp32 => Data::F32(
                        raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                    ),
                    DataType::Fp64 => {
                        Data::F64(raw.chunks_exact(8).map(|c| f64::from_le_bytes(eight(c))).collect())
                    }
                    DataType::Int64 => {
                        Data::I64(raw.chunks_exact(8).map(|c| i64::from_le_bytes(eight(c))).collect())
                    }
                    DataType::Int32 => Data::I32(
                        raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                    ),
                    other => Data::Other(other, raw.clone()),
                }
            }
            (datatype, TensorData::Strings(_)) => return Err(bad(format!("{datatype} given as strings"))),
        };
        if data.len() != count {
            return Err(bad(format!("{} elements for shape {:?}", data.len(), tensor.shape)));
        }
        Ok(Value { shape, data })
    }

    /// The response tensor named `name`.
    pub(crate) fn into_tensor(self, name: &str) -> Tensor {
        let shape = self.shape.iter().map(|d| *d as i64).collect();
        let (datatype, data) = match self.data {
            Data::F32(v) => (DataType::Fp32, raw(v.iter().flat_map(|x| x.to_le_bytes()))),
            Data::F64(v) => (DataType::Fp64, raw(v.iter().flat_map(|x| x.to_le_bytes()))),
            Data::I64(v) => (DataType::Int64, raw(v.iter().flat_map(|x| x.to_le_bytes()))),
            Data::I32(v) => (DataType::Int32, raw(v.iter().flat_map(|x| x.to_le_bytes()))),
            Data::Str(v) => (DataType::Bytes, TensorData::Strings(v)),
            Data::Other(d, b) => (d, TensorData::Raw(b)),
        };
        Tensor { name: name.to_owned(), datatype, shape, data }
    }
}

fn eight(c: &[u8]) -> [u8; 8] {
    [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]
}

fn raw(bytes: impl Iterator<Item = u8>) -> TensorData {
    TensorData::Raw(Bytes::from(bytes.collect::<Vec<u8>>()))
}

/// Number of elements of `shape`.
pub(crate) fn count(shape: &[usize]) -> usize {
    shape.iter().product()
}
