//! The tensors flowing through a graph, and their V2 messages at each step.
//!
//! Between steps tensors stay runtime [`Tensor`]s whose elements are one `Bytes` buffer: a step's
//! request carries them as raw contents and its answer's raw contents become the next step's tensors,
//! so fixed-size elements are never copied or converted between steps. Only the graph's own answer is
//! written typed, when the client sent typed contents.

use std::collections::HashMap;

use densemesh_proto::inference::model_infer_request::InferInputTensor;
use densemesh_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter};
use densemesh_runtime_core::{DataType, Tensor, TensorData};
use serde_json::{Map, Value, json};
use tonic::metadata::{KeyAndValueRef, MetadataMap};

use crate::error::MeshError;
use crate::node::v2;

/// The request for one step: `tensors` as raw contents, under the graph request's id and parameters.
pub fn step_request(
    model: &str,
    id: &str,
    parameters: &HashMap<String, InferParameter>,
    tensors: Vec<Tensor>,
) -> ModelInferRequest {
    let mut request = ModelInferRequest {
        model_name: model.to_owned(),
        id: id.to_owned(),
        parameters: parameters.clone(),
        inputs: Vec::with_capacity(tensors.len()),
        raw_input_contents: Vec::with_capacity(tensors.len()),
        ..Default::default()
    };
    for Tensor { name, datatype, shape, data } in tensors {
        request.inputs.push(InferInputTensor {
            name,
            datatype: datatype.as_str().to_owned(),
            shape,
            ..Default::default()
        });
        request.raw_input_contents.push(v2::raw_bytes(data));
    }
    request
}

/// A step's answer as tensors, checked as a request's inputs are (datatypes, shapes, lengths).
pub fn answer_tensors(answer: ModelInferResponse) -> Result<Vec<Tensor>, MeshError> {
    let ModelInferResponse { outputs, raw_output_contents, .. } = answer;
    let as_request = ModelInferRequest {
        inputs: outputs
            .into_iter()
            .map(|o| InferInputTensor {
                name: o.name,
                datatype: o.datatype,
                shape: o.shape,
                parameters: o.parameters,
                contents: o.contents,
            })
            .collect(),
        raw_input_contents: raw_output_contents,
        ..Default::default()
    };
    Ok(v2::decode(as_request)?.request.inputs)
}

/// The V2 JSON view of a request that Switch conditions read (see
/// [`densemesh_placement::graph::condition`]): its id, parameters, ASCII headers and inputs with their
/// elements as JSON numbers, booleans or strings.
pub fn json_view(
    id: &str,
    parameters: &HashMap<String, InferParameter>,
    headers: &MetadataMap,
    inputs: &[Tensor],
) -> Value {
    let parameters: Map<String, Value> =
        parameters.iter().filter_map(|(k, p)| Some((k.clone(), parameter(p)?))).collect();
    let mut header_map = Map::new();
    for entry in headers.iter() {
        if let KeyAndValueRef::Ascii(key, value) = entry
            && let Ok(value) = value.to_str()
        {
            header_map.insert(key.as_str().to_owned(), Value::from(value));
        }
    }
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|t| json!({"name": t.name, "datatype": t.datatype.as_str(), "shape": t.shape, "data": elements(t)}))
        .collect();
    json!({"id": id, "parameters": parameters, "headers": header_map, "inputs": inputs})
}

fn parameter(p: &InferParameter) -> Option<Value> {
    use infer_parameter::ParameterChoice as C;
    Some(match p.parameter_choice.as_ref()? {
        C::BoolParam(b) => Value::from(*b),
        C::Int64Param(i) => Value::from(*i),
        C::StringParam(s) => Value::from(s.as_str()),
        C::DoubleParam(d) => Value::from(*d),
        C::Uint64Param(u) => Value::from(*u),
    })
}

/// A tensor's elements as JSON values, row-major.
fn elements(tensor: &Tensor) -> Value {
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).filter_map(|c| c.try_into().ok())
    }
    let bytes = match &tensor.data {
        TensorData::Strings(items) => {
            return items.iter().map(|b| Value::from(String::from_utf8_lossy(b).into_owned())).collect();
        }
        TensorData::Raw(bytes) => bytes.as_ref(),
    };
    match tensor.datatype {
        DataType::Bool => bytes.iter().map(|b| Value::from(*b != 0)).collect(),
        DataType::Uint8 => bytes.iter().map(|b| Value::from(*b)).collect(),
        DataType::Int8 => bytes.iter().map(|b| Value::from(*b as i8)).collect(),
        DataType::Uint16 => chunks::<2>(bytes).map(|c| Value::from(u16::from_le_bytes(c))).collect(),
        DataType::Int16 => chunks::<2>(bytes).map(|c| Value::from(i16::from_le_bytes(c))).collect(),
        DataType::Uint32 => chunks::<4>(bytes).map(|c| Value::from(u32::from_le_bytes(c))).collect(),
        DataType::Int32 => chunks::<4>(bytes).map(|c| Value::from(i32::from_le_bytes(c))).collect(),
        DataType::Uint64 => chunks::<8>(bytes).map(|c| Value::from(u64::from_le_bytes(c))).collect(),
        DataType::Int64 => chunks::<8>(bytes).map(|c| Value::from(i64::from_le_bytes(c))).collect(),
        DataType::Fp16 => {
            chunks::<2>(bytes).map(|c| Value::from(f64::from(half::f16::from_le_bytes(c)))).collect()
        }
        DataType::Bf16 => {
            chunks::<2>(bytes).map(|c| Value::from(f64::from(half::bf16::from_le_bytes(c)))).collect()
        }
        DataType::Fp32 => chunks::<4>(bytes).map(|c| Value::from(f64::from(f32::from_le_bytes(c)))).collect(),
        DataType::Fp64 => chunks::<8>(bytes).map(|c| Value::from(f64::from_le_bytes(c))).collect(),
        // Strings are answered above; raw BYTES never reach a decoded tensor.
        DataType::Bytes => Value::Array(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn tensor(name: &str, datatype: DataType, shape: Vec<i64>, bytes: Vec<u8>) -> Tensor {
        Tensor { name: name.into(), datatype, shape, data: TensorData::Raw(Bytes::from(bytes)) }
    }

    #[test]
    fn a_step_answer_becomes_the_next_request_without_copying_elements() {
        let x = tensor("x", DataType::Fp32, vec![2], [1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat());
        let TensorData::Raw(original) = &x.data else { unreachable!() };
        let pointer = original.as_ptr();
        let request = step_request("m", "r1", &HashMap::new(), vec![x.clone()]);
        assert_eq!(request.raw_input_contents[0].as_ptr(), pointer, "the same buffer, not a copy");
        let answer = ModelInferResponse {
            outputs: vec![densemesh_proto::inference::model_infer_response::InferOutputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2],
                ..Default::default()
            }],
            raw_output_contents: request.raw_input_contents.clone(),
            ..Default::default()
        };
        let back = answer_tensors(answer).unwrap();
        assert_eq!(back, vec![x]);
        let TensorData::Raw(bytes) = &back[0].data else { unreachable!() };
        assert_eq!(bytes.as_ptr(), pointer);
    }

    #[test]
    fn a_malformed_answer_is_an_error_not_a_tensor() {
        let answer = ModelInferResponse {
            outputs: vec![densemesh_proto::inference::model_infer_response::InferOutputTensor {
                name: "y".into(),
                datatype: "FP32".into(),
                shape: vec![3],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from_static(&[0; 4])],
            ..Default::default()
        };
        let err = answer_tensors(answer).unwrap_err().to_string();
        assert!(err.contains('y'), "{err}");
    }

    #[test]
    fn the_json_view_holds_parameters_headers_and_elements() {
        let mut parameters = HashMap::new();
        parameters.insert(
            "tier".to_owned(),
            InferParameter {
                parameter_choice: Some(infer_parameter::ParameterChoice::StringParam("gold".into())),
            },
        );
        let mut headers = MetadataMap::new();
        headers.insert("x-user", "u1".parse().unwrap());
        let inputs = [
            tensor("f", DataType::Fp32, vec![1], 0.75f32.to_le_bytes().to_vec()),
            tensor("i", DataType::Int64, vec![2], [3i64.to_le_bytes(), (-1i64).to_le_bytes()].concat()),
            tensor("b", DataType::Bool, vec![1], vec![1]),
            tensor("h", DataType::Fp16, vec![1], half::f16::from_f32(0.5).to_le_bytes().to_vec()),
            Tensor {
                name: "s".into(),
                datatype: DataType::Bytes,
                shape: vec![1],
                data: TensorData::Strings(vec![Bytes::from_static(b"hi")]),
            },
        ];
        let view = json_view("r1", &parameters, &headers, &inputs);
        assert_eq!(view["parameters"]["tier"], "gold");
        assert_eq!(view["headers"]["x-user"], "u1");
        assert_eq!(view["inputs"][0]["data"], json!([0.75]));
        assert_eq!(view["inputs"][1]["data"], json!([3, -1]));
        assert_eq!(view["inputs"][2]["data"], json!([true]));
        assert_eq!(view["inputs"][3]["data"], json!([0.5]));
        assert_eq!(view["inputs"][4]["data"], json!(["hi"]));
        assert_eq!(view["id"], "r1");
    }
}
