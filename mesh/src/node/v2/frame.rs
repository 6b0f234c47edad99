//! What the request path reads of a `ModelInfer` call before deciding where it runs: the model it names,
//! straight from the gRPC frame, so a request served on another pod is passed on as the bytes it came
//! in as and never decoded here.

use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};

/// `ModelInferRequest.model_name`.
const MODEL_NAME_FIELD: u32 = 1;

/// The protobuf message of a body holding exactly one uncompressed gRPC message; `None` for anything
/// else (compressed, cut short, several messages), which the generated server then answers as it does.
pub fn message(body: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = body.split_first()?;
    let length = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let message = &rest[4..];
    (compressed == 0 && message.len() == length).then_some(message)
}

/// `message` as the body of a gRPC call: uncompressed, its length, its bytes (a graph's step for a
/// peer, which has no client's bytes to pass on).
pub fn encode(message: &impl prost::Message) -> Result<bytes::Bytes, crate::error::MeshError> {
    use bytes::BufMut;
    let length = u32::try_from(message.encoded_len()).map_err(|_| {
        crate::error::MeshError::InvalidArgument("a message over 4 GiB cannot be one gRPC message".to_owned())
    })?;
    let mut body = bytes::BytesMut::with_capacity(5 + length as usize);
    body.put_u8(0);
    body.put_u32(length);
    message
        .encode(&mut body)
        .map_err(|e| crate::error::MeshError::Internal(format!("cannot encode a message: {e}")))?;
    Ok(body.freeze())
}

/// The `model_name` of an encoded `ModelInferRequest` (empty when it is not set: proto3's default);
/// `None` when the bytes are not a well-formed message. Reads the field tags only: skipping the tensors
/// costs nothing, however large they are.
pub fn model_name(mut message: &[u8]) -> Option<&str> {
    let mut name: &[u8] = &[];
    while !message.is_empty() {
        let (tag, wire_type) = decode_key(&mut message).ok()?;
        if tag == MODEL_NAME_FIELD && wire_type == WireType::LengthDelimited {
            let length = usize::try_from(decode_varint(&mut message).ok()?).ok()?;
            // The last occurrence wins, as protobuf decoders merge.
            name = message.get(..length)?;
            message = &message[length..];
        } else {
            // Every other field is skipped as the generated decoder skips it, groups included (no
            // proto3 writer emits one, but the decoder accepts them), so both take the same messages.
            skip_field(wire_type, tag, &mut message, DecodeContext::default()).ok()?;
        }
    }
    std::str::from_utf8(name).ok()
}

#[cfg(test)]
mod tests {
    use densemesh_proto::inference::ModelInferRequest;
    use densemesh_proto::inference::model_infer_request::InferInputTensor;
    use prost::Message;

    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        body
    }

    #[test]
    fn reads_the_name_whatever_comes_around_it() {
        let request = ModelInferRequest {
            model_name: "iris-logreg".into(),
            model_version: "3".into(),
            id: "r-1".into(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![7; 100_000].into()],
            ..Default::default()
        };
        let body = framed(&request.encode_to_vec());
        assert_eq!(message(&body).and_then(model_name), Some("iris-logreg"));
        let unnamed = ModelInferRequest { id: "r".into(), ..Default::default() }.encode_to_vec();
        assert_eq!(model_name(&unnamed), Some(""), "unset is proto3's empty string");
        // Fields in any order, and a repeated field: the decoder keeps the last.
        let mut reordered = ModelInferRequest { id: "x".into(), ..Default::default() }.encode_to_vec();
        reordered
            .extend(ModelInferRequest { model_name: "first".into(), ..Default::default() }.encode_to_vec());
        reordered
            .extend(ModelInferRequest { model_name: "second".into(), ..Default::default() }.encode_to_vec());
        assert_eq!(model_name(&reordered), Some("second"));
        assert_eq!(ModelInferRequest::decode(reordered.as_slice()).unwrap().model_name, "second");
    }

    /// Found by fuzzing (fuzz/corpus/v2_request/crash-group): a group of an unknown field, which the
    /// generated decoder skips, made the frame reader call the message malformed, so the front
    /// refused a request the generated server takes.
    #[test]
    fn groups_are_skipped_as_the_generated_decoder_skips_them() {
        let named = ModelInferRequest { model_name: "m".into(), ..Default::default() }.encode_to_vec();
        // Field 13 as an empty group, and as a group holding a varint and a nested group.
        for group in [&[0x6b, 0x6c][..], &[0x6b, 0x08, 0x01, 0x73, 0x74, 0x6c][..]] {
            let message = [group, &named].concat();
            assert_eq!(ModelInferRequest::decode(message.as_slice()).unwrap().model_name, "m");
            assert_eq!(model_name(&message), Some("m"), "{group:?}");
        }
        // A group that never ends, or ends as another field's, is malformed for both.
        for bad in [&[0x6b, 0x08, 0x01][..], &[0x6b, 0x74][..]] {
            assert!(ModelInferRequest::decode(bad).is_err());
            assert_eq!(model_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn anything_but_one_plain_well_formed_message_is_left_to_the_generated_server() {
        let ok = ModelInferRequest { model_name: "m".into(), ..Default::default() }.encode_to_vec();
        let body = framed(&ok);
        let mut compressed = body.clone();
        compressed[0] = 1;
        let mut two = body.clone();
        two.extend_from_slice(&body);
        for (what, body) in [
            ("compressed", compressed),
            ("two messages", two),
            ("cut short", body[..body.len() - 1].to_vec()),
        ] {
            assert_eq!(message(&body), None, "{what}");
        }
        assert_eq!(message(&[]), None);
        assert_eq!(message(&[0, 0, 0]), None);
        // A length that runs past the end, a bad varint, a group, a name that is not UTF-8.
        for bad in [&[0x0a, 0x05, b'a'][..], &[0xff; 11][..], &[0x0b][..], &[0x0a, 0x02, 0xc3, 0x28][..]] {
            assert_eq!(model_name(bad), None, "{bad:?}");
        }
    }
}
