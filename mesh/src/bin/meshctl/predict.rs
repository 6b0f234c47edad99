//! `meshctl predict`: V2 JSON (the REST protocol's shape) in, V2 JSON out, over gRPC.

use std::io::Read;

use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use densemesh_proto::inference::model_infer_request::InferInputTensor;
use densemesh_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::Failure;

/// The request JSON from the argument, `@FILE`, or `-` (standard input).
pub fn read_request(input: &str) -> Result<Value, String> {
    let text = match input {
        "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            s
        }
        path if path.starts_with('@') => {
            std::fs::read_to_string(&path[1..]).map_err(|e| format!("cannot read {}: {e}", &path[1..]))?
        }
        json => json.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| {
        format!("the request is not JSON ({e}); expected {{\"inputs\": [{{\"name\", \"datatype\", \"shape\", \"data\"}}]}}")
    })
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other.clone()),
    }
}

fn contents(name: &str, datatype: &str, data: &[Value]) -> Result<InferTensorContents, String> {
    let mut c = InferTensorContents::default();
    let bad = |i: usize| format!("input {name}: element {i} is not a valid {datatype} value");
    let num = |i: usize, v: &Value| v.as_f64().ok_or_else(|| bad(i));
    let int = |i: usize, v: &Value| v.as_i64().ok_or_else(|| bad(i));
    let uint = |i: usize, v: &Value| v.as_u64().ok_or_else(|| bad(i));
    for (i, v) in data.iter().enumerate() {
        match datatype {
            "BOOL" => c.bool_contents.push(v.as_bool().ok_or_else(|| bad(i))?),
            "INT8" | "INT16" | "INT32" => c.int_contents.push(i32::try_from(int(i, v)?).map_err(|_| bad(i))?),
            "INT64" => c.int64_contents.push(int(i, v)?),
            "UINT8" | "UINT16" | "UINT32" => {
                c.uint_contents.push(u32::try_from(uint(i, v)?).map_err(|_| bad(i))?)
            }
            "UINT64" => c.uint64_contents.push(uint(i, v)?),
            "FP32" => c.fp32_contents.push(num(i, v)? as f32),
            "FP64" => c.fp64_contents.push(num(i, v)?),
            "BYTES" => c.bytes_contents.push(v.as_str().ok_or_else(|| bad(i))?.as_bytes().to_vec().into()),
            other => {
                return Err(format!(
                    "input {name}: meshctl predict cannot send {other} (no JSON form); use a client library"
                ));
            }
        }
    }
    Ok(c)
}

fn build(model: &str, request: &Value) -> Result<ModelInferRequest, String> {
    let inputs = request["inputs"].as_array().ok_or("the request needs an \"inputs\" array")?;
    let mut out = ModelInferRequest { model_name: model.to_owned(), ..Default::default() };
    for input in inputs {
        let name = input["name"].as_str().ok_or("every input needs a \"name\"")?;
        let datatype =
            input["datatype"].as_str().ok_or_else(|| format!("input {name} needs a \"datatype\""))?;
        let shape: Vec<i64> = input["shape"]
            .as_array()
            .ok_or_else(|| format!("input {name} needs a \"shape\""))?
            .iter()
            .map(|d| d.as_i64().ok_or_else(|| format!("input {name}: shape holds a non-integer")))
            .collect::<Result<_, _>>()?;
        let mut data = Vec::new();
        flatten(&input["data"], &mut data);
        out.inputs.push(InferInputTensor {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape,
            contents: Some(contents(name, datatype, &data)?),
            ..Default::default()
        });
    }
    Ok(out)
}

fn to_json(response: &ModelInferResponse) -> Value {
    let outputs: Vec<Value> = response
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let data = match (&o.contents, response.raw_output_contents.get(i)) {
                (_, Some(raw)) => raw_values(&o.datatype, raw),
                (Some(c), None) => typed_values(c),
                (None, None) => Value::Array(vec![]),
            };
            json!({ "name": o.name, "datatype": o.datatype, "shape": o.shape, "data": data })
        })
        .collect();
    json!({ "model_name": response.model_name, "model_version": response.model_version, "outputs": outputs })
}

fn typed_values(c: &InferTensorContents) -> Value {
    let strings =
        || c.bytes_contents.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>();
    if !c.bool_contents.is_empty() {
        json!(c.bool_contents)
    } else if !c.int_contents.is_empty() {
        json!(c.int_contents)
    } else if !c.int64_contents.is_empty() {
        json!(c.int64_contents)
    } else if !c.uint_contents.is_empty() {
        json!(c.uint_contents)
    } else if !c.uint64_contents.is_empty() {
        json!(c.uint64_contents)
    } else if !c.fp32_contents.is_empty() {
        json!(c.fp32_contents)
    } else if !c.fp64_contents.is_empty() {
        json!(c.fp64_contents)
    } else {
        json!(strings())
    }
}

/// Raw little-endian output (the server sends FP16 raw even to typed requests) as JSON numbers.
fn raw_values(datatype: &str, raw: &[u8]) -> Value {
    macro_rules! le {
        ($t:ty) => {
            json!(
                raw.chunks_exact(std::mem::size_of::<$t>())
                    .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect::<Vec<$t>>()
            )
        };
    }
    match datatype {
        "BOOL" => json!(raw.iter().map(|b| *b != 0).collect::<Vec<_>>()),
        "INT8" => le!(i8),
        "INT16" => le!(i16),
        "INT32" => le!(i32),
        "INT64" => le!(i64),
        "UINT8" => le!(u8),
        "UINT16" => le!(u16),
        "UINT32" => le!(u32),
        "UINT64" => le!(u64),
        "FP32" => le!(f32),
        "FP64" => le!(f64),
        "FP16" => json!(
            raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect::<Vec<_>>()
        ),
        _ => json!(raw.len()),
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f32::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 if frac == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        _ => sign * (1.0 + frac / 1024.0) * 2f32.powi(exp - 15),
    }
}

/// Sends one request, routed by `mm-model-id` or `mm-vmodel-id`.
pub async fn run(channel: Channel, model: &str, vmodel: bool, request: &Value) -> Result<Value, Failure> {
    let body = build(model, request).map_err(|message| Failure { code: 2, message })?;
    let mut request = tonic::Request::new(body);
    let header = if vmodel { "mm-vmodel-id" } else { "mm-model-id" };
    let value = model
        .parse()
        .map_err(|_| Failure { code: 2, message: format!("{model:?} cannot be sent as a header") })?;
    request.metadata_mut().insert(header, value);
    let response = GrpcInferenceServiceClient::new(channel).model_infer(request).await?.into_inner();
    Ok(to_json(&response))
}
