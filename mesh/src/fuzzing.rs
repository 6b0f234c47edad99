//! Fuzz targets for what a pod reads from clients and peers: a V2 gRPC `ModelInfer` body with the
//! headers that name its model, a V2 REST body, the pod wire's frames
//! ([`crate::cluster::wire::fuzzing`]) and a model repository's layout
//! ([`crate::cluster::repository::fuzzing`]). Each target takes arbitrary bytes, must never panic,
//! and asserts what the rest of the pod relies on; the AFL++ binaries in `fuzz/` and the corpus
//! replay in this crate's tests call the same functions (docs/fuzzing.md).

use bytes::Bytes;
use densemesh_placement::ModelId;
use densemesh_proto::inference::ModelInferRequest;
use densemesh_runtime_core::{DataType, ModelMetadata, Tensor, TensorData, TensorSpec};
use http::{HeaderMap, HeaderValue};
use prost::Message;
use tonic::metadata::MetadataMap;

use crate::api::rest::codec;
use crate::error::MeshError;
use crate::node::{router, v2};

pub use crate::cluster::repository::fuzzing::repository_layout;
pub use crate::cluster::wire::fuzzing::wire_frame;

/// A gRPC `ModelInfer` call: `flags`, then (when a flag is set) a header value up to `\n`, sent as
/// `mm-model-id` (flag 1) and as `mm-model-id-bin` (flag 2), then the body, framed as gRPC frames it
/// or a bare message. The frame reader must agree with prost on the model name, the router must
/// only ever answer a valid id, and the decoder must either refuse the request as INVALID_ARGUMENT
/// or hand the runtime tensors whose bytes match their shapes, which then match the request's own
/// declared interface.
pub fn v2_request(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let (header, body) = if flags & 3 == 0 {
        (&[][..], rest)
    } else {
        let Some(end) = rest.iter().position(|b| *b == b'\n') else { return };
        (&rest[..end], &rest[end + 1..])
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(header) {
        if flags & 1 != 0 {
            headers.insert(router::MODEL_ID_HEADER, value.clone());
        }
        if flags & 2 != 0 {
            headers.insert("mm-model-id-bin", value);
        }
    }
    let metadata = MetadataMap::from_headers(headers);
    let message = v2::frame::message(body).unwrap_or(body);
    let Ok(request) = ModelInferRequest::decode(message) else { return };
    assert_eq!(
        v2::frame::model_name(message),
        Some(request.model_name.as_str()),
        "the frame reader and prost disagree on model_name"
    );
    let vmodels = |id: &ModelId| (id.as_str() == "vm").then(|| "vm-active".to_owned());
    match router::resolve(&metadata, &request.model_name, vmodels) {
        Ok(target) => assert_eq!(ModelId::new(target.model.as_str()).as_ref(), Ok(&target.model)),
        Err(e) => assert!(matches!(e, MeshError::InvalidArgument(_)), "{e:?}"),
    }
    let decoded = match v2::decode(request) {
        Ok(decoded) => decoded,
        Err(e) => {
            assert!(matches!(e, MeshError::InvalidArgument(_)), "{e:?}");
            return;
        }
    };
    for tensor in &decoded.request.inputs {
        check_tensor(tensor);
    }
    let own = ModelMetadata {
        platform: String::new(),
        inputs: decoded
            .request
            .inputs
            .iter()
            .map(|t| TensorSpec { name: t.name.clone(), datatype: t.datatype, shape: t.shape.clone() })
            .collect(),
        outputs: Vec::new(),
    };
    if let Err(e) = v2::check("m", &own, &decoded.request) {
        panic!("a request does not match its own interface: {e}");
    }
}

/// A tensor the decoders hand a runtime: dimensions ≥ 0 and exactly the bytes (or strings) its
/// shape and datatype need.
fn check_tensor(tensor: &Tensor) {
    assert!(tensor.shape.iter().all(|d| *d >= 0), "{:?}", tensor.shape);
    let count = tensor.shape.iter().map(|d| *d as u128).product::<u128>();
    match (&tensor.data, tensor.datatype.element_size()) {
        (TensorData::Raw(bytes), Some(size)) => assert_eq!(bytes.len() as u128, count * size as u128),
        (TensorData::Strings(items), None) => assert_eq!(items.len() as u128, count),
        (data, _) => panic!("{} holds {data:?}", tensor.datatype),
    }
}

/// A REST inference call: two bytes (little-endian) give the binary-data header's JSON length
/// (0xFFFF: no header), then the body. A body the codec accepts must decode as the gRPC path decodes
/// it when every input came as JSON under a distinct name, and integer, boolean and string outputs must come back as the
/// same elements when rendered as JSON and read again.
pub fn rest_request(data: &[u8]) {
    let Some((length, body)) = data.split_first_chunk::<2>() else { return };
    let json_length = match u16::from_le_bytes(*length) {
        u16::MAX => None,
        n => Some(usize::from(n)),
    };
    let call = match codec::parse_infer(Bytes::copy_from_slice(body), json_length) {
        Ok(call) => call,
        Err(e) => {
            assert!(matches!(e, MeshError::InvalidArgument(_)), "{e:?}");
            return;
        }
    };
    let request = call.request;
    assert_eq!(request.inputs.len(), request.raw_input_contents.len());
    let names: std::collections::HashSet<&str> = request.inputs.iter().map(|i| i.name.as_str()).collect();
    // Names are the V2 decoder's to check (empty, repeated), for REST as for gRPC.
    let all_json = json_length.is_none()
        && names.len() == request.inputs.len()
        && request.inputs.iter().all(|i| !i.name.is_empty());
    let decoded = match v2::decode(request) {
        Ok(decoded) => decoded,
        Err(e) => {
            assert!(!all_json, "the REST codec accepted JSON inputs the V2 decoder refuses: {e}");
            return;
        }
    };
    for tensor in &decoded.request.inputs {
        check_tensor(tensor);
    }
    if !all_json {
        return;
    }
    // The inputs as a model's outputs, rendered as JSON the way an answer is, then read back.
    let exact =
        |t: &Tensor| !matches!(t.datatype, DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64);
    let outputs: Vec<Tensor> = decoded.request.inputs.into_iter().filter(exact).collect();
    let response = v2::encode("m".to_owned(), String::new(), String::new(), outputs.clone(), true);
    let rendered = match codec::render_infer(&response, &codec::OutputForm::default()) {
        Ok(rendered) => rendered,
        // BYTES that are not UTF-8 cannot be JSON; the client is told to ask for binary data.
        Err(MeshError::InvalidArgument(_)) => return,
        Err(e) => panic!("rendering decoded inputs failed: {e}"),
    };
    assert_eq!(rendered.json_length, None);
    let again = read_back_as_request(&rendered.body);
    let again = v2::decode(again).expect("a rendered answer reads back");
    assert_eq!(again.request.inputs, outputs, "JSON changed the elements");
}

/// A REST answer's JSON as a request body (`outputs` become `inputs`), parsed by the codec.
fn read_back_as_request(body: &[u8]) -> ModelInferRequest {
    let mut json: serde_json::Value = serde_json::from_slice(body).expect("the answer is JSON");
    let outputs = json.get_mut("outputs").map(serde_json::Value::take).unwrap_or_default();
    let text = serde_json::json!({ "inputs": outputs }).to_string();
    codec::parse_infer(Bytes::from(text), None).expect("a rendered answer parses as a request").request
}

#[cfg(test)]
mod tests {
    include!("../../fuzz/replay.rs");

    #[test]
    fn corpus_v2_request_replays() {
        replay("v2_request", super::v2_request);
    }

    #[test]
    fn corpus_rest_request_replays() {
        replay("rest_request", super::rest_request);
    }

    #[test]
    fn corpus_wire_frame_replays() {
        replay("wire_frame", super::wire_frame);
    }

    #[test]
    fn corpus_repository_layout_replays() {
        replay("repository_layout", super::repository_layout);
    }
}
