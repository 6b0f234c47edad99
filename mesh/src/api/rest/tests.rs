//! The JSON and binary translation, both ways, and the REST surface over a stand-in front.

use bytes::Bytes;
use densemesh_proto::inference::model_infer_response::InferOutputTensor;
use densemesh_proto::inference::{InferTensorContents, ModelInferResponse};
use densemesh_runtime_core::DataType;
use serde_json::{Value, json};

use super::codec::{OutputForm, parse_infer, render_infer};
use super::*;
use crate::error::MeshError;

fn parse(body: Value) -> Result<codec::InferCall, String> {
    parse_infer(Bytes::from(body.to_string()), None).map_err(|e| e.to_string())
}

/// The raw bytes the JSON `data` of one input becomes.
fn raw_of(datatype: &str, shape: Value, data: Value) -> Result<Vec<u8>, String> {
    let call = parse(json!({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}))?;
    assert_eq!(call.request.inputs[0].datatype, datatype);
    Ok(call.request.raw_input_contents[0].to_vec())
}

fn le<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|v| to(*v)).collect()
}

#[test]
fn every_datatype_reads_from_json_numbers_booleans_and_strings() {
    let cases: Vec<(&str, Value, Vec<u8>)> = vec![
        ("BOOL", json!([true, false, true]), vec![1, 0, 1]),
        ("UINT8", json!([0, 7, 255]), vec![0, 7, 255]),
        ("UINT16", json!([0, 65535, 1]), le(&[0u16, 65535, 1], u16::to_le_bytes)),
        ("UINT32", json!([4294967295u64, 0, 1]), le(&[u32::MAX, 0, 1], u32::to_le_bytes)),
        ("UINT64", json!([u64::MAX, 0, 1]), le(&[u64::MAX, 0, 1], u64::to_le_bytes)),
        ("INT8", json!([-128, 127, 0]), le(&[-128i8, 127, 0], i8::to_le_bytes)),
        ("INT16", json!([-32768, 5, 0]), le(&[-32768i16, 5, 0], i16::to_le_bytes)),
        ("INT32", json!([i32::MIN, i32::MAX, 0]), le(&[i32::MIN, i32::MAX, 0], i32::to_le_bytes)),
        ("INT64", json!([i64::MIN, i64::MAX, 0]), le(&[i64::MIN, i64::MAX, 0], i64::to_le_bytes)),
        (
            "FP16",
            json!([0.5, -2, 65504.0]),
            le(
                &[half::f16::from_f32(0.5), half::f16::from_f32(-2.0), half::f16::MAX],
                half::f16::to_le_bytes,
            ),
        ),
        (
            "BF16",
            json!([1.5, 3, -0.25]),
            le(
                &[half::bf16::from_f32(1.5), half::bf16::from_f32(3.0), half::bf16::from_f32(-0.25)],
                half::bf16::to_le_bytes,
            ),
        ),
        ("FP32", json!([0.1, 2, -3.5]), le(&[0.1f32, 2.0, -3.5], f32::to_le_bytes)),
        ("FP64", json!([0.1, 1e300, -7]), le(&[0.1f64, 1e300, -7.0], f64::to_le_bytes)),
    ];
    for (datatype, data, want) in cases {
        assert_eq!(raw_of(datatype, json!([3]), data).unwrap(), want, "{datatype}");
    }
    let strings = raw_of("BYTES", json!([3]), json!(["hello", "wörld", ""])).unwrap();
    let mut want = Vec::new();
    for s in ["hello", "wörld", ""] {
        want.extend_from_slice(&(s.len() as u32).to_le_bytes());
        want.extend_from_slice(s.as_bytes());
    }
    assert_eq!(strings, want, "BYTES: each element's length, then its bytes, as gRPC's raw form");
}

#[test]
fn nested_arrays_are_read_row_major_and_the_count_must_match_the_shape() {
    let flat = raw_of("INT32", json!([2, 3]), json!([1, 2, 3, 4, 5, 6])).unwrap();
    let nested = raw_of("INT32", json!([2, 3]), json!([[1, 2, 3], [4, 5, 6]])).unwrap();
    assert_eq!(flat, nested);
    assert_eq!(raw_of("FP32", json!([0, 4]), json!([])).unwrap(), Vec::<u8>::new(), "an empty tensor");
    let e = raw_of("INT32", json!([2, 3]), json!([1, 2, 3, 4, 5])).unwrap_err();
    assert!(e.contains("input x") && e.contains("5 elements") && e.contains("needs 6"), "{e}");
    let e = raw_of("INT32", json!([2]), json!([1, 2, 3])).unwrap_err();
    assert!(e.contains("input x") && e.contains("more elements than the shape's 2"), "{e}");
}

#[test]
fn elements_that_do_not_fit_their_datatype_are_refused_by_index() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("INT8", json!([1, 128]), &["element 1", "128", "does not fit INT8"]),
        ("UINT8", json!([-1]), &["element 0", "-1", "does not fit UINT8"]),
        ("UINT64", json!([-5]), &["element 0", "does not fit UINT64"]),
        ("INT32", json!([1.5]), &["element 0", "1.5", "not an integer"]),
        ("INT64", json!(["7"]), &["element 0", "\"7\"", "not an integer"]),
        ("BOOL", json!([1]), &["element 0", "not true or false"]),
        ("FP32", json!([true]), &["element 0", "not a number"]),
        ("FP32", json!([1e39]), &["element 0", "does not fit FP32"]),
        ("FP16", json!([70000]), &["element 0", "does not fit FP16"]),
        ("BYTES", json!([3]), &["element 0", "not a string"]),
        ("FP64", json!([null]), &["element 0 is null"]),
        ("FP64", json!([{"a": 1}]), &["element 0 is an object"]),
    ];
    for (datatype, data, says) in cases {
        let count = 1 + usize::from(datatype == "INT8");
        let e = raw_of(datatype, json!([count]), data).unwrap_err();
        assert!(e.starts_with("input x: "), "{datatype}: {e}");
        for s in says {
            assert!(e.contains(s), "{datatype}: {e:?} does not say {s:?}");
        }
    }
}

#[test]
fn malformed_requests_are_invalid_arguments_that_name_the_problem() {
    let input = |extra: Value| {
        let mut i = json!({"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]});
        if let (Some(i), Value::Object(extra)) = (i.as_object_mut(), extra) {
            i.extend(extra);
        }
        json!({"inputs": [i]})
    };
    let cases: Vec<(&str, Result<Bytes, String>, &[&str])> = vec![
        ("not JSON", Ok(Bytes::from_static(b"{\"inputs\": [")), &["not a V2 inference request"]),
        ("not UTF-8", Ok(Bytes::from_static(b"\xff\xfe")), &["not UTF-8"]),
        ("no inputs field", Err(json!({"outputs": []}).to_string()), &["missing field `inputs`"]),
        ("unknown datatype", Err(input(json!({"datatype": "FLOAT"})).to_string()), &["input x", "FLOAT"]),
        ("negative dim", Err(input(json!({"shape": [-1]})).to_string()), &["input x", "negative"]),
        (
            "overflowing shape",
            Err(input(json!({"shape": [i64::MAX, i64::MAX]})).to_string()),
            &["input x", "more elements"],
        ),
        (
            "no data",
            Err(json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}).to_string()),
            &["input x has no data"],
        ),
        (
            "binary size without binary data",
            Err(input(json!({"data": null, "parameters": {"binary_data_size": 8}})).to_string()),
            &["input x", "binary_data_size is 8", "only 0 bytes"],
        ),
        (
            "both data and binary",
            Err(input(json!({"parameters": {"binary_data_size": 8}})).to_string()),
            &["input x", "both data and binary_data_size"],
        ),
        (
            "binary size not a number",
            Err(input(json!({"data": null, "parameters": {"binary_data_size": "8"}})).to_string()),
            &["input x", "not a byte count"],
        ),
        (
            "shared memory",
            Err(input(json!({"parameters": {"shared_memory_region": "r"}})).to_string()),
            &["input x", "shared-memory"],
        ),
        (
            "classification",
            Err(json!({"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]})
                .to_string()),
            &["output y", "classification"],
        ),
        (
            "binary_data_output not a flag",
            Err(json!({"inputs": [], "parameters": {"binary_data_output": 1}}).to_string()),
            &["binary_data_output", "not true or false"],
        ),
    ];
    for (what, body, says) in cases {
        let body = body.unwrap_or_else(Bytes::from);
        let e = parse_infer(body, None).unwrap_err();
        assert!(matches!(e, MeshError::InvalidArgument(_)), "{what}: {e:?}");
        assert_eq!(Status::from(MeshError::InvalidArgument(e.to_string())).code(), Code::InvalidArgument);
        let e = e.to_string();
        for s in says {
            assert!(e.contains(s), "{what}: {e:?} does not say {s:?}");
        }
    }
}

/// JSON, then the binary sections, as tritonclient sends them.
fn binary_body(json: Value, sections: &[&[u8]]) -> (Bytes, usize) {
    let mut body = json.to_string().into_bytes();
    let length = body.len();
    for s in sections {
        body.extend_from_slice(s);
    }
    (Bytes::from(body), length)
}

#[test]
fn binary_inputs_are_sliced_from_the_body_in_order_and_mix_with_json_ones() {
    let floats = le(&[1.0f32, 2.0], f32::to_le_bytes);
    let (body, length) = binary_body(
        json!({
            "id": "r-7",
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
                {"name": "b", "datatype": "INT64", "shape": [1], "data": [9]},
                {"name": "c", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}],
            "parameters": {"binary_data_output": false, "sequence_id": 3},
        }),
        &[&floats, &[4, 5, 6]],
    );
    let call = parse_infer(body, Some(length)).unwrap();
    let r = &call.request;
    assert_eq!(r.id, "r-7");
    assert_eq!(r.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(r.raw_input_contents[0].to_vec(), floats);
    assert_eq!(r.raw_input_contents[1].to_vec(), 9i64.to_le_bytes());
    assert_eq!(r.raw_input_contents[2].to_vec(), [4, 5, 6]);
    assert_eq!(r.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["y", "z"]);
    assert!(call.outputs.is_binary("y") && !call.outputs.is_binary("z") && !call.outputs.is_binary("w"));

    let (body, length) = binary_body(
        json!({"inputs": [{"name": "a", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1}}]}),
        &[&[1, 2]],
    );
    let e = parse_infer(body.clone(), Some(length)).unwrap_err().to_string();
    assert!(e.contains("1 bytes of binary data follow the JSON that no input claims"), "{e}");
    let e = parse_infer(body.clone(), Some(body.len() + 1)).unwrap_err().to_string();
    assert!(e.contains(HEADER_LENGTH) && e.contains("the body is"), "{e}");
    let e = parse_infer(body, Some(3)).unwrap_err().to_string();
    assert!(e.contains("not a V2 inference request"), "JSON cut by a wrong length: {e}");
}

#[test]
fn binary_data_output_is_the_default_that_a_named_output_overrides() {
    let form = |body: Value| parse(body).unwrap().outputs;
    let all = form(json!({"inputs": [], "parameters": {"binary_data_output": true}}));
    assert!(all.is_binary("anything"));
    let mixed = form(json!({"inputs": [], "parameters": {"binary_data_output": true},
        "outputs": [{"name": "y", "parameters": {"binary_data": false}}, {"name": "z"}]}));
    assert!(!mixed.is_binary("y") && mixed.is_binary("z"));
    assert_eq!(form(json!({"inputs": []})), OutputForm::default());
    assert!(!OutputForm::default().is_binary("y"), "JSON unless asked");
}

fn output(name: &str, datatype: DataType, shape: &[i64]) -> InferOutputTensor {
    InferOutputTensor {
        name: name.into(),
        datatype: datatype.as_str().into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn response(outputs: Vec<(InferOutputTensor, Vec<u8>)>) -> ModelInferResponse {
    let (outputs, raw): (Vec<_>, Vec<_>) = outputs.into_iter().map(|(o, b)| (o, Bytes::from(b))).unzip();
    ModelInferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        id: "r-1".into(),
        outputs,
        raw_output_contents: raw,
        ..Default::default()
    }
}

fn rendered_json(response: &ModelInferResponse, form: &OutputForm) -> Value {
    let rendered = render_infer(response, form).unwrap();
    assert_eq!(rendered.json_length, None);
    serde_json::from_slice(&rendered.body).unwrap()
}

#[test]
fn every_datatype_renders_as_json_numbers_booleans_and_strings() {
    let strings: Vec<u8> = ["hi", "wörld"]
        .iter()
        .flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes()))
        .collect();
    let cases: Vec<(DataType, Vec<u8>, Value)> = vec![
        (DataType::Bool, vec![1, 0], json!([true, false])),
        (DataType::Uint8, vec![0, 255], json!([0, 255])),
        (DataType::Uint16, le(&[1u16, 65535], u16::to_le_bytes), json!([1, 65535])),
        (DataType::Uint32, le(&[1u32, u32::MAX], u32::to_le_bytes), json!([1, u32::MAX])),
        (DataType::Uint64, le(&[1u64, u64::MAX], u64::to_le_bytes), json!([1, u64::MAX])),
        (DataType::Int8, le(&[-128i8, 127], i8::to_le_bytes), json!([-128, 127])),
        (DataType::Int16, le(&[-32768i16, 1], i16::to_le_bytes), json!([-32768, 1])),
        (DataType::Int32, le(&[i32::MIN, 1], i32::to_le_bytes), json!([i32::MIN, 1])),
        (DataType::Int64, le(&[i64::MIN, i64::MAX], i64::to_le_bytes), json!([i64::MIN, i64::MAX])),
        (
            DataType::Fp16,
            le(&[half::f16::from_f32(0.5), half::f16::from_f32(-3.0)], half::f16::to_le_bytes),
            json!([0.5, -3.0]),
        ),
        (
            DataType::Bf16,
            le(&[half::bf16::from_f32(2.5), half::bf16::from_f32(-1.0)], half::bf16::to_le_bytes),
            json!([2.5, -1.0]),
        ),
        (DataType::Fp32, le(&[0.1f32, -2.0], f32::to_le_bytes), json!([0.1, -2.0])),
        (DataType::Fp64, le(&[0.1f64, 1e300], f64::to_le_bytes), json!([0.1, 1e300])),
        (DataType::Bytes, strings, json!(["hi", "wörld"])),
    ];
    for (datatype, bytes, want) in cases {
        let answer = response(vec![(output("y", datatype, &[2]), bytes)]);
        let got = rendered_json(&answer, &OutputForm::default());
        assert_eq!(got["outputs"][0]["data"], want, "{datatype}");
        assert_eq!(got["outputs"][0]["datatype"], datatype.as_str());
        assert_eq!(got["outputs"][0]["shape"], json!([2]));
        assert_eq!(
            (&got["model_name"], &got["model_version"], &got["id"]),
            (&json!("m"), &json!("1"), &json!("r-1"))
        );
    }
}

#[test]
fn what_json_parses_it_renders_back_unchanged() {
    for (datatype, data) in [
        ("FP16", json!([0.5, -2.0, 1024.0])),
        ("BF16", json!([1.5, 3.0, -0.25])),
        ("FP32", json!([0.1, 2.0, -3.5])),
        ("INT64", json!([i64::MIN, 0, i64::MAX])),
        ("UINT64", json!([u64::MAX, 0, 1])),
        ("BOOL", json!([true, false, true])),
        ("BYTES", json!(["a", "", "ü"])),
    ] {
        let raw = raw_of(datatype, json!([3]), data.clone()).unwrap();
        let datatype: DataType = datatype.parse().unwrap();
        let answer = response(vec![(output("y", datatype, &[3]), raw)]);
        assert_eq!(rendered_json(&answer, &OutputForm::default())["outputs"][0]["data"], data, "{datatype}");
    }
}

#[test]
fn binary_outputs_follow_the_json_and_say_their_size() {
    let a = le(&[1.0f32, 2.0], f32::to_le_bytes);
    let b = vec![7u8, 8, 9];
    let answer = response(vec![
        (output("a", DataType::Fp32, &[2]), a.clone()),
        (output("b", DataType::Uint8, &[3]), b.clone()),
        (output("c", DataType::Int8, &[1]), vec![0xff]),
    ]);
    let form = parse(json!({"inputs": [], "parameters": {"binary_data_output": true},
        "outputs": [{"name": "a"}, {"name": "c", "parameters": {"binary_data": false}}, {"name": "b"}]}))
    .unwrap()
    .outputs;
    let rendered = render_infer(&answer, &form).unwrap();
    let length = rendered.json_length.expect("binary data follows");
    let json: Value = serde_json::from_slice(&rendered.body[..length]).unwrap();
    assert_eq!(json["outputs"][0]["parameters"], json!({"binary_data_size": 8}));
    assert_eq!(json["outputs"][0].get("data"), None);
    assert_eq!(json["outputs"][1]["parameters"], json!({"binary_data_size": 3}));
    assert_eq!(json["outputs"][2]["data"], json!([-1]));
    assert_eq!(&rendered.body[length..], [a, b].concat().as_slice(), "in the order of the outputs");
}

#[test]
fn typed_contents_render_like_raw_ones_and_bad_answers_do_not_panic() {
    let typed = ModelInferResponse {
        outputs: vec![InferOutputTensor {
            contents: Some(InferTensorContents { int_contents: vec![-3, 4], ..Default::default() }),
            ..output("y", DataType::Int16, &[2])
        }],
        ..Default::default()
    };
    assert_eq!(rendered_json(&typed, &OutputForm::default())["outputs"][0]["data"], json!([-3, 4]));

    let not_utf8 = response(vec![(output("s", DataType::Bytes, &[1]), vec![2, 0, 0, 0, 0xc3, 0x28])]);
    let e = render_infer(&not_utf8, &OutputForm::default()).unwrap_err();
    assert!(
        matches!(&e, MeshError::InvalidArgument(m) if m.contains("output s") && m.contains("binary_data")),
        "{e}"
    );
    let binary = parse(json!({"inputs": [], "parameters": {"binary_data_output": true}})).unwrap().outputs;
    assert!(render_infer(&not_utf8, &binary).is_ok(), "binary carries any bytes");

    let cut = response(vec![(output("s", DataType::Bytes, &[1]), vec![9, 0, 0, 0, b'a'])]);
    assert!(matches!(render_infer(&cut, &OutputForm::default()), Err(MeshError::Internal(_))));
    let mut odd = response(vec![(output("y", DataType::Fp32, &[1]), vec![0; 4])]);
    odd.raw_output_contents.push(Bytes::new());
    assert!(matches!(render_infer(&odd, &OutputForm::default()), Err(MeshError::Internal(_))));
    let short = response(vec![(output("y", DataType::Fp64, &[2]), vec![0; 5])]);
    assert!(render_infer(&short, &OutputForm::default()).is_ok(), "a ragged buffer is cut, not a panic");
}

#[test]
fn grpc_codes_become_the_http_statuses_v2_clients_expect() {
    for (code, status) in [
        (Code::InvalidArgument, 400),
        (Code::NotFound, 404),
        (Code::Unavailable, 503),
        (Code::ResourceExhausted, 429),
        (Code::Internal, 500),
        (Code::Unknown, 500),
    ] {
        assert_eq!(http_status(code).as_u16(), status, "{code:?}");
    }
}

/// The REST surface over a stand-in front: what reaches the front, and what the client gets back.
mod surface {
    use std::sync::Arc;

    use densemesh_proto::inference::ModelInferRequest;
    use densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
    use parking_lot::Mutex;
    use tonic::codegen::BoxFuture;

    use super::*;
    use crate::test_support::{AnswersInfer, TestPod, inference_service};

    /// A generated V2 server around [`AnswersInfer`] (it echoes the model name), or a fixed refusal,
    /// recording the request it was handed.
    #[derive(Clone)]
    struct Front {
        refuse: Option<Code>,
        seen: Arc<Mutex<Option<(http::request::Parts, Bytes)>>>,
    }

    impl Service<http::Request<GrpcBody>> for Front {
        type Response = http::Response<GrpcBody>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<GrpcBody>) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                *this.seen.lock() = Some((parts.clone(), bytes.clone()));
                if let Some(code) = this.refuse {
                    return Ok(Status::new(code, "refused by the front").into_http());
                }
                let request =
                    http::Request::from_parts(parts, GrpcBody::new(http_body_util::Full::new(bytes)));
                let mut server = GrpcInferenceServiceServer::new(AnswersInfer);
                server.call(request).await
            })
        }
    }

    async fn send(front: &Front, request: http::Request<HttpBody>) -> (StatusCode, HeaderMap, Bytes) {
        let pod = TestPod::start("a").await;
        let mut router = Rest::new(front.clone(), inference_service(&pod), 1 << 20).router();
        let response = match router.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    fn post(path: &str, body: &str, headers: &[(&str, &str)]) -> http::Request<HttpBody> {
        let mut request = http::Request::post(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(HttpBody::from(body.to_owned())).unwrap()
    }

    const BODY: &str =
        r#"{"id": "q", "inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": [1, -1]}]}"#;

    #[tokio::test]
    async fn an_infer_reaches_the_front_as_a_grpc_call_with_only_the_routing_headers() {
        let front = Front { refuse: None, seen: Arc::default() };
        let headers = [
            ("mm-vmodel-id", "v"),
            ("mm-model-id-bin", "bQ=="),
            (ROUTE_KEY_HEADER, "user-1"),
            ("authorization", "secret"),
            ("content-type", "application/json"),
        ];
        let (status, response_headers, body) =
            send(&front, post("/v2/models/m/versions/3/infer", BODY, &headers)).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(response_headers[header::CONTENT_TYPE], "application/json");
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["model_name"], "m", "the echo of the path's model");

        let (parts, bytes) = front.seen.lock().take().unwrap();
        assert_eq!(parts.uri.path(), MODEL_INFER_PATH);
        assert_eq!(parts.headers[header::CONTENT_TYPE], "application/grpc");
        let mut forwarded: Vec<_> = parts.headers.keys().map(|k| k.as_str()).collect();
        forwarded.sort_unstable();
        assert_eq!(forwarded, ["content-type", ROUTE_KEY_HEADER, "mm-model-id-bin", "mm-vmodel-id", "te"]);
        let message = ModelInferRequest::decode(frame::message(&bytes).unwrap()).unwrap();
        assert_eq!(
            (message.model_name.as_str(), message.model_version.as_str(), message.id.as_str()),
            ("m", "3", "q")
        );
        assert_eq!(message.raw_input_contents[0].to_vec(), [1, 0xff]);
    }

    #[tokio::test]
    async fn refusals_are_v2_error_bodies_and_nothing_malformed_reaches_the_front() {
        for (code, status) in [
            (Code::NotFound, StatusCode::NOT_FOUND),
            (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (Code::InvalidArgument, StatusCode::BAD_REQUEST),
        ] {
            let front = Front { refuse: Some(code), seen: Arc::default() };
            let (got, headers, body) = send(&front, post("/v2/models/m/infer", BODY, &[])).await;
            assert_eq!(got, status, "{code:?}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                serde_json::from_slice::<Value>(&body).unwrap(),
                json!({"error": "refused by the front"})
            );
        }
        let front = Front { refuse: None, seen: Arc::default() };
        for (body, headers, says) in [
            ("{", &[][..], "not a V2 inference request"),
            (BODY, &[(HEADER_LENGTH, "many")][..], "not a byte count"),
            (BODY, &[("content-encoding", "gzip")][..], "content-encoding gzip"),
            (
                &*format!(r#"{{"inputs": [], "pad": "{}"}}"#, "x".repeat(1 << 20)),
                &[][..],
                "--max-message-size",
            ),
        ] {
            let (status, _, answer) = send(&front, post("/v2/models/m/infer", body, headers)).await;
            let answer: Value = serde_json::from_slice(&answer).unwrap();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            assert!(answer["error"].as_str().unwrap().contains(says), "{answer}");
        }
        assert!(front.seen.lock().is_none(), "refused before the front");
    }
}

#[test]
fn a_graph_call_carries_the_request_headers_its_conditions_may_read_bounded() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("x-tier", "gold"),
        ("mm-vmodel-id", "v"),
        ("densemesh-route-key", "k"),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
        ("authorization", "Bearer secret"),
        ("cookie", "session=1"),
        ("grpc-timeout", "1S"),
        ("x-trace-bin", "AAAA"),
        ("inference-header-content-length", "12"),
    ] {
        headers.insert(http::HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    headers.insert("x-huge", HeaderValue::from_str(&"a".repeat(MAX_CONDITION_HEADER_BYTES)).unwrap());
    headers.insert("x-latin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    let carried = graph_metadata(&headers).into_headers();
    let mut names: Vec<&str> = carried.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["densemesh-route-key", "mm-vmodel-id", "x-tier"]);
    assert_eq!(carried["x-tier"], "gold");
    // A model's call carries the routing headers only.
    let routing = routing_metadata(&headers).into_headers();
    assert!(routing.get("x-tier").is_none() && routing.get("mm-vmodel-id").is_some());

    let mut many = HeaderMap::new();
    for i in 0..MAX_CONDITION_HEADERS + 10 {
        many.insert(http::HeaderName::try_from(format!("x-h{i}")).unwrap(), HeaderValue::from_static("1"));
    }
    assert_eq!(graph_metadata(&many).into_headers().len(), MAX_CONDITION_HEADERS);
}
