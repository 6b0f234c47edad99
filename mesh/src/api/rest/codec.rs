//! KServe V2 REST bodies to and from the gRPC messages the inference service already takes.
//!
//! A REST request becomes a `ModelInferRequest` whose every input travels raw (`raw_input_contents`),
//! whether the client sent it as JSON or with the binary-data extension: the service then answers raw
//! too, and one path here turns each output into JSON or binary as the client asked. Tensor checks
//! against the model (names, datatypes, shapes) stay in [`crate::node::v2`], run for REST as for gRPC;
//! only what JSON alone can get wrong (an element that is not a number, does not fit its datatype, or
//! the count of elements) is caught here, with messages in the codec's words.
//!
//! JSON `data` is read straight from the body into little-endian bytes, never through a
//! `serde_json::Value` per element, which would take ~30 times the body's size for a large tensor.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use densemesh_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use densemesh_runtime_core::DataType;
use half::{bf16, f16};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::MeshError;

/// The binary-data extension's header: how many bytes of the body are JSON; binary tensors follow.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

type Parameters = Map<String, Value>;

fn invalid(message: String) -> MeshError {
    MeshError::InvalidArgument(message)
}

/// How the client wants each output: binary after the JSON, or as JSON `data`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputForm {
    /// The request's `binary_data_output` parameter: the form of outputs not asked for by name.
    binary_by_default: bool,
    /// Outputs asked for by name, with their `binary_data` parameter when they set it.
    named: Vec<(String, Option<bool>)>,
}

impl OutputForm {
    /// Whether `output` goes back as binary data.
    pub fn is_binary(&self, output: &str) -> bool {
        self.named
            .iter()
            .find(|(name, _)| name == output)
            .and_then(|(_, binary)| *binary)
            .unwrap_or(self.binary_by_default)
    }
}

/// A REST inference request, translated.
#[derive(Debug)]
pub struct InferCall {
    /// Every input raw; `model_name` and `model_version` are left for the caller (they are in the path).
    pub request: ModelInferRequest,
    /// How the answer's outputs go back, read from the request's `binary_data` parameters.
    pub outputs: OutputForm,
}

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutputJson>>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RequestedOutputJson {
    name: String,
    #[serde(default)]
    parameters: Option<Parameters>,
}

/// A boolean parameter; absent or null is `None`.
fn flag(parameters: Option<&Parameters>, key: &str, owner: &str) -> Result<Option<bool>, MeshError> {
    match parameters.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(format!("{owner}: parameter {key} is {other}, not true or false"))),
    }
}

/// A byte count parameter; absent or null is `None`.
fn size(parameters: Option<&Parameters>, key: &str, owner: &str) -> Result<Option<usize>, MeshError> {
    match parameters.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| invalid(format!("{owner}: parameter {key} is {v}, not a byte count"))),
    }
}

/// Refuses what this server does not do, rather than answering as if it had not been asked.
fn refuse_unsupported(parameters: Option<&Parameters>, owner: &str) -> Result<(), MeshError> {
    let Some(parameters) = parameters else { return Ok(()) };
    if parameters.get("shared_memory_region").is_some_and(|v| !v.is_null()) {
        return Err(invalid(format!("{owner}: the shared-memory extension is not supported; send the data")));
    }
    if parameters.get("classification").is_some_and(|v| !v.is_null() && v.as_u64() != Some(0)) {
        return Err(invalid(format!("{owner}: the classification extension is not supported")));
    }
    Ok(())
}

/// Reads a REST inference body: JSON, followed by binary tensors when `json_length` (the
/// [`HEADER_LENGTH`] header) says where the JSON ends.
pub fn parse_infer(body: Bytes, json_length: Option<usize>) -> Result<InferCall, MeshError> {
    let (json, mut binary) = match json_length {
        Some(n) if n > body.len() => {
            return Err(invalid(format!(
                "the {HEADER_LENGTH} header says {n} bytes of JSON but the body is {} bytes",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body, Bytes::new()),
    };
    let text =
        std::str::from_utf8(&json).map_err(|e| invalid(format!("the request's JSON is not UTF-8: {e}")))?;
    let parsed: RequestJson<'_> = serde_json::from_str(text)
        .map_err(|e| invalid(format!("the body is not a V2 inference request: {e}")))?;
    let mut request = ModelInferRequest {
        id: parsed.id.unwrap_or_default(),
        inputs: Vec::with_capacity(parsed.inputs.len()),
        raw_input_contents: Vec::with_capacity(parsed.inputs.len()),
        ..Default::default()
    };
    for input in parsed.inputs {
        let owner = format!("input {}", input.name);
        let datatype: DataType = input.datatype.parse().map_err(|e| invalid(format!("{owner}: {e}")))?;
        let count = element_count(&input.name, &input.shape)?;
        refuse_unsupported(input.parameters.as_ref(), &owner)?;
        let binary_size = size(input.parameters.as_ref(), "binary_data_size", &owner)?;
        let raw = match (input.data, binary_size) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "{owner} has both data and binary_data_size; send one or the other"
                )));
            }
            (None, Some(n)) if n > binary.len() => {
                return Err(invalid(format!(
                    "{owner}: binary_data_size is {n} but only {} bytes of binary data remain after the JSON \
                     (the {HEADER_LENGTH} header says where the JSON ends)",
                    binary.len()
                )));
            }
            (None, Some(n)) => binary.split_to(n),
            (Some(data), None) => elements_from_json(&input.name, datatype, count, data)?,
            (None, None) => {
                return Err(invalid(format!("{owner} has no data: send data or binary_data_size")));
            }
        };
        request.inputs.push(InferInputTensor {
            name: input.name,
            datatype: datatype.as_str().to_owned(),
            shape: input.shape,
            ..Default::default()
        });
        request.raw_input_contents.push(raw);
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes of binary data follow the JSON that no input claims with binary_data_size",
            binary.len()
        )));
    }
    let binary_by_default =
        flag(parsed.parameters.as_ref(), "binary_data_output", "the request")?.unwrap_or(false);
    let mut named = Vec::new();
    for output in parsed.outputs.unwrap_or_default() {
        let owner = format!("output {}", output.name);
        refuse_unsupported(output.parameters.as_ref(), &owner)?;
        let binary = flag(output.parameters.as_ref(), "binary_data", &owner)?;
        request.outputs.push(InferRequestedOutputTensor { name: output.name.clone(), ..Default::default() });
        named.push((output.name, binary));
    }
    Ok(InferCall { request, outputs: OutputForm { binary_by_default, named } })
}

/// Elements in a shape, with the same refusals as the gRPC codec's.
fn element_count(name: &str, shape: &[i64]) -> Result<usize, MeshError> {
    if let Some(dim) = shape.iter().find(|d| **d < 0) {
        return Err(invalid(format!("input {name}: shape {shape:?} has the negative dimension {dim}")));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, d| usize::try_from(*d).ok().and_then(|d| acc.checked_mul(d)))
        .ok_or_else(|| invalid(format!("input {name}: shape {shape:?} has more elements than can exist")))
}

/// JSON `data` (flat or nested arrays, row-major) as the raw form of `datatype`: little-endian
/// elements, or for BYTES each element's 4-byte little-endian length, then its bytes.
fn elements_from_json(
    name: &str,
    datatype: DataType,
    count: usize,
    data: &RawValue,
) -> Result<Bytes, MeshError> {
    let text = data.get();
    // Never trust the shape for an allocation: a JSON element takes at least two characters.
    let most = (text.len() / 2 + 1).saturating_mul(datatype.element_size().unwrap_or(2).max(2));
    let mut sink = Sink {
        datatype,
        expected: count,
        seen: 0,
        out: Vec::with_capacity(most.min(count.saturating_mul(8))),
        problem: None,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = Elements(&mut sink).deserialize(&mut deserializer).and_then(|()| deserializer.end());
    if let Some(problem) = sink.problem {
        return Err(invalid(format!("input {name}: {problem}")));
    }
    parsed.map_err(|e| invalid(format!("input {name}: data is not an array of {datatype} elements: {e}")))?;
    if sink.seen != count {
        return Err(invalid(format!(
            "input {name}: data has {} elements but the shape needs {count}",
            sink.seen
        )));
    }
    Ok(sink.out.into())
}

/// One JSON scalar, as it was written.
#[derive(Debug, Clone, Copy)]
enum Scalar<'s> {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(&'s str),
}

impl fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Uint(u) => write!(f, "{u}"),
            Scalar::Float(x) => write!(f, "{x:?}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// Where a tensor's elements are written as they are read. A problem is kept here in the codec's own
/// words; serde's error then only stops the walk.
struct Sink {
    datatype: DataType,
    expected: usize,
    seen: usize,
    out: Vec<u8>,
    problem: Option<String>,
}

impl Sink {
    fn put<E: de::Error>(&mut self, value: Scalar<'_>) -> Result<(), E> {
        if self.seen == self.expected {
            return self.fail(format!("data has more elements than the shape's {}", self.expected));
        }
        match self.encode(value) {
            Ok(()) => {
                self.seen += 1;
                Ok(())
            }
            Err(problem) => self.fail(format!("element {} {problem}", self.seen)),
        }
    }

    fn fail<E: de::Error>(&mut self, problem: String) -> Result<(), E> {
        self.problem = Some(problem);
        Err(E::custom("stopped"))
    }

    /// Appends one element; the error completes "element N …".
    fn encode(&mut self, value: Scalar<'_>) -> Result<(), String> {
        let datatype = self.datatype;
        let integer = || match value {
            Scalar::Int(i) => Ok(i128::from(i)),
            Scalar::Uint(u) => Ok(i128::from(u)),
            other => Err(format!("is {other}, not an integer ({datatype})")),
        };
        let float = || match value {
            Scalar::Int(i) => Ok(i as f64),
            Scalar::Uint(u) => Ok(u as f64),
            Scalar::Float(x) => Ok(x),
            other => Err(format!("is {other}, not a number ({datatype})")),
        };
        let too_big = |v: &dyn fmt::Display| format!("is {v}, which does not fit {datatype}");
        macro_rules! int {
            ($t:ty) => {{
                let v = integer()?;
                let n = <$t>::try_from(v).map_err(|_| too_big(&v))?;
                self.out.extend_from_slice(&n.to_le_bytes());
            }};
        }
        macro_rules! finite {
            ($x:expr, $narrow:expr) => {{
                let wide: f64 = $x;
                let narrow = $narrow(wide);
                if wide.is_finite() && narrow.is_infinite() {
                    return Err(too_big(&wide));
                }
                self.out.extend_from_slice(&narrow.to_le_bytes());
            }};
        }
        match datatype {
            DataType::Bool => match value {
                Scalar::Bool(b) => self.out.push(u8::from(b)),
                other => return Err(format!("is {other}, not true or false (BOOL)")),
            },
            DataType::Int8 => int!(i8),
            DataType::Int16 => int!(i16),
            DataType::Int32 => int!(i32),
            DataType::Int64 => int!(i64),
            DataType::Uint8 => int!(u8),
            DataType::Uint16 => int!(u16),
            DataType::Uint32 => int!(u32),
            DataType::Uint64 => int!(u64),
            DataType::Fp16 => finite!(float()?, f16::from_f64),
            DataType::Bf16 => finite!(float()?, bf16::from_f64),
            DataType::Fp32 => finite!(float()?, |x: f64| x as f32),
            DataType::Fp64 => self.out.extend_from_slice(&float()?.to_le_bytes()),
            DataType::Bytes => match value {
                Scalar::Str(s) => {
                    let len = u32::try_from(s.len())
                        .map_err(|_| format!("is {} bytes long, over 4 GiB", s.len()))?;
                    self.out.extend_from_slice(&len.to_le_bytes());
                    self.out.extend_from_slice(s.as_bytes());
                }
                other => return Err(format!("is {other}, not a string (BYTES)")),
            },
        }
        Ok(())
    }
}

/// Walks nested arrays, handing each scalar to the sink.
struct Elements<'s>(&'s mut Sink);

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of tensor elements")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.put(Scalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.put(Scalar::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.put(Scalar::Uint(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.put(Scalar::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.put(Scalar::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        let at = self.0.seen;
        self.0.fail(format!("element {at} is null"))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        let at = self.0.seen;
        self.0.fail(format!("element {at} is an object"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Elements(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// A REST inference answer: the body, and where its JSON ends when binary outputs follow it.
#[derive(Debug)]
pub struct Rendered {
    /// The JSON, then any binary outputs in the order of the JSON's outputs.
    pub body: Bytes,
    /// `Some` when binary data follows the JSON: the value of the [`HEADER_LENGTH`] header.
    pub json_length: Option<usize>,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// An output's elements as JSON: numbers (FP16 and BF16 widened; NaN and infinities, which JSON cannot
/// carry, are written `null`: ask for binary data to keep them), booleans, or UTF-8 strings.
enum JsonData<'a> {
    Fixed { datatype: DataType, bytes: &'a [u8] },
    Strings(Vec<&'a str>),
}

/// The gRPC answer as the REST body the client asked for.
pub fn render_infer(response: &ModelInferResponse, form: &OutputForm) -> Result<Rendered, MeshError> {
    let internal = |what: String| MeshError::Internal(format!("the inference answer is malformed: {what}"));
    let raw = &response.raw_output_contents;
    if !raw.is_empty() && raw.len() != response.outputs.len() {
        return Err(internal(format!("{} raw contents for {} outputs", raw.len(), response.outputs.len())));
    }
    let mut contents = Vec::with_capacity(response.outputs.len());
    for (i, output) in response.outputs.iter().enumerate() {
        let datatype: DataType =
            output.datatype.parse().map_err(|e| internal(format!("output {}: {e}", output.name)))?;
        let bytes = match raw.get(i) {
            Some(bytes) => bytes.clone(),
            None => typed_to_raw(datatype, output.contents.as_ref()),
        };
        contents.push((datatype, bytes));
    }
    let mut outputs = Vec::with_capacity(contents.len());
    let mut binary = Vec::new();
    for (output, (datatype, bytes)) in response.outputs.iter().zip(&contents) {
        let (parameters, data) = if form.is_binary(&output.name) {
            binary.push(bytes.clone());
            (Some(BinarySize { binary_data_size: bytes.len() }), None)
        } else if *datatype == DataType::Bytes {
            (None, Some(JsonData::Strings(utf8_elements(&output.name, bytes)?)))
        } else {
            (None, Some(JsonData::Fixed { datatype: *datatype, bytes }))
        };
        outputs.push(OutputJson {
            name: &output.name,
            datatype: datatype.as_str(),
            shape: &output.shape,
            parameters,
            data,
        });
    }
    let json = ResponseJson {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: &response.id,
        outputs,
    };
    let mut body = serde_json::to_vec(&json)
        .map_err(|e| MeshError::Internal(format!("cannot write the answer's JSON: {e}")))?;
    if binary.is_empty() {
        return Ok(Rendered { body: body.into(), json_length: None });
    }
    let json_length = body.len();
    body.reserve(binary.iter().map(Bytes::len).sum());
    for bytes in binary {
        body.extend_from_slice(&bytes);
    }
    Ok(Rendered { body: body.into(), json_length: Some(json_length) })
}

/// BYTES elements of an output for JSON, which carries only text.
fn utf8_elements<'a>(name: &str, mut bytes: &'a [u8]) -> Result<Vec<&'a str>, MeshError> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .map(|(len, rest)| (u32::from_le_bytes(*len) as usize, rest))
            .filter(|(len, rest)| *len <= rest.len())
            .ok_or_else(|| MeshError::Internal(format!("output {name}: BYTES contents are cut short")))?;
        let item = std::str::from_utf8(&rest[..len]).map_err(|_| {
            invalid(format!(
                "output {name}: element {} is not UTF-8, which JSON cannot carry; ask for it with binary_data",
                items.len()
            ))
        })?;
        items.push(item);
        bytes = &rest[len..];
    }
    Ok(items)
}

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (datatype, bytes) = match self {
            JsonData::Strings(items) => return serializer.collect_seq(items),
            JsonData::Fixed { datatype, bytes } => (*datatype, *bytes),
        };
        let size = datatype.element_size().unwrap_or(1).max(1);
        let mut seq = serializer.serialize_seq(Some(bytes.len() / size))?;
        macro_rules! each {
            ($n:literal, |$a:ident| $value:expr) => {
                for chunk in bytes.chunks_exact($n) {
                    let mut $a = [0u8; $n];
                    $a.copy_from_slice(chunk);
                    seq.serialize_element(&$value)?;
                }
            };
        }
        match datatype {
            DataType::Bool => each!(1, |a| a[0] != 0),
            DataType::Int8 => each!(1, |a| i8::from_le_bytes(a)),
            DataType::Uint8 => each!(1, |a| a[0]),
            DataType::Int16 => each!(2, |a| i16::from_le_bytes(a)),
            DataType::Uint16 => each!(2, |a| u16::from_le_bytes(a)),
            DataType::Fp16 => each!(2, |a| f16::from_le_bytes(a).to_f32()),
            DataType::Bf16 => each!(2, |a| bf16::from_le_bytes(a).to_f32()),
            DataType::Int32 => each!(4, |a| i32::from_le_bytes(a)),
            DataType::Uint32 => each!(4, |a| u32::from_le_bytes(a)),
            DataType::Fp32 => each!(4, |a| f32::from_le_bytes(a)),
            DataType::Int64 => each!(8, |a| i64::from_le_bytes(a)),
            DataType::Uint64 => each!(8, |a| u64::from_le_bytes(a)),
            DataType::Fp64 => each!(8, |a| f64::from_le_bytes(a)),
            // Taken apart into strings before this; kept total so no datatype can panic here.
            DataType::Bytes => {}
        }
        seq.end()
    }
}

/// Typed `contents` (the service answers typed only for a request without inputs) in raw form.
fn typed_to_raw(datatype: DataType, contents: Option<&InferTensorContents>) -> Bytes {
    let Some(c) = contents else { return Bytes::new() };
    let mut out = BytesMut::new();
    match datatype {
        DataType::Bool => c.bool_contents.iter().for_each(|b| out.put_u8(u8::from(*b))),
        DataType::Int8 => c.int_contents.iter().for_each(|v| out.put_i8(*v as i8)),
        DataType::Int16 => c.int_contents.iter().for_each(|v| out.put_i16_le(*v as i16)),
        DataType::Int32 => c.int_contents.iter().for_each(|v| out.put_i32_le(*v)),
        DataType::Int64 => c.int64_contents.iter().for_each(|v| out.put_i64_le(*v)),
        DataType::Uint8 => c.uint_contents.iter().for_each(|v| out.put_u8(*v as u8)),
        DataType::Uint16 => c.uint_contents.iter().for_each(|v| out.put_u16_le(*v as u16)),
        DataType::Uint32 => c.uint_contents.iter().for_each(|v| out.put_u32_le(*v)),
        DataType::Uint64 => c.uint64_contents.iter().for_each(|v| out.put_u64_le(*v)),
        DataType::Fp32 => c.fp32_contents.iter().for_each(|v| out.put_f32_le(*v)),
        DataType::Fp64 => c.fp64_contents.iter().for_each(|v| out.put_f64_le(*v)),
        DataType::Bytes => c.bytes_contents.iter().for_each(|item| {
            out.put_u32_le(u32::try_from(item.len()).unwrap_or(u32::MAX));
            out.put_slice(item);
        }),
        // No typed field carries these: the service answers them raw.
        DataType::Fp16 | DataType::Bf16 => {}
    }
    out.freeze()
}
