//! KServe V2 REST on `--http-addr`: health, metadata, readiness and inference over HTTP/JSON, with the
//! binary-data extension.
//!
//! Nothing here decides anything. Each call becomes the gRPC request the V2 service takes, routing
//! headers (`mm-vmodel-id`, `mm-model-id`, their `-bin` forms, the route key) carried over as gRPC
//! metadata; a call of an inference graph carries the request's other headers too, bounded, for its
//! Switch conditions ([`graph_metadata`]). Metadata and readiness call the service's handlers; an inference goes, framed as gRPC
//! bytes, through the same front that gRPC clients reach ([`crate::api::front`]), so one routing
//! decision, one forwarding path, one validation and one set of metrics serve both protocols. The
//! extra protobuf encode and decode this costs is small beside the JSON (see `bench/rest.py`).

pub mod codec;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;

use axum::Router;
use axum::body::Body as HttpBody;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{BufMut, Bytes, BytesMut};
use densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use densemesh_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest,
    ServerMetadataRequest, ServerReadyRequest,
};
use http_body_util::BodyExt;
use prost::Message;
use serde::Serialize;
use tonic::body::Body as GrpcBody;
use tonic::codegen::Service;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::api::service::InferenceService;
use crate::cluster::forward::{FRAME_HEADER, MODEL_INFER_PATH};
use crate::node::router::ROUTE_KEY_HEADER;
use crate::node::v2::frame;
use codec::HEADER_LENGTH;

/// What the REST handlers call: `front` takes `ModelInfer` as gRPC bytes, `service` the rest.
#[derive(Clone)]
pub struct Rest<F> {
    front: F,
    service: InferenceService,
    max_message_size: usize,
}

impl<F> Rest<F>
where
    F: Service<http::Request<GrpcBody>, Response = http::Response<GrpcBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    F::Future: Send + 'static,
{
    /// `front` is the inference front the gRPC server serves; bodies over `max_message_size` bytes
    /// are refused as gRPC refuses them.
    pub fn new(front: F, service: InferenceService, max_message_size: usize) -> Self {
        Self { front, service, max_message_size }
    }

    /// The routes, for [`serve`] and the tests.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v2", get(server_metadata))
            .route("/v2/health/live", get(live))
            .route("/v2/health/ready", get(ready))
            .route("/v2/models/{model}", get(model_metadata::<F>))
            .route("/v2/models/{model}/versions/{version}", get(model_metadata::<F>))
            .route("/v2/models/{model}/ready", get(model_ready::<F>))
            .route("/v2/models/{model}/versions/{version}/ready", get(model_ready::<F>))
            .route("/v2/models/{model}/infer", post(infer::<F>))
            .route("/v2/models/{model}/versions/{version}/infer", post(infer::<F>))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "no such KServe V2 REST endpoint") })
            .with_state(self)
    }

    /// Serves on an already bound listener (so port 0 works), over TLS with `tls` (the handshakes
    /// beside accepting), until `shutdown` resolves, then lets requests in flight finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        if let Some(tls) = tls {
            let listener = crate::tls::stream::TlsListener::new(listener, tls);
            return axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await;
        }
        // Small answers otherwise wait on Nagle's algorithm and the client's delayed ACK.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on a REST connection");
            }
        });
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await
    }
}

/// The HTTP status of a gRPC code, as KServe V2 REST servers answer.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// V2's error body, `{"error": "..."}`.
fn error(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

fn status_response(status: Status) -> Response {
    error(http_status(status.code()), status.message())
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot write JSON: {e}")).into_response(),
    }
}

/// The request's routing headers as gRPC metadata; nothing else crosses over (content type, length
/// and the binary-data header mean something else to gRPC).
fn routing_metadata(headers: &HeaderMap) -> MetadataMap {
    let mut routing = HeaderMap::new();
    for (name, value) in headers {
        if name.as_str().starts_with("mm-") || name.as_str() == ROUTE_KEY_HEADER {
            routing.append(name.clone(), value.clone());
        }
    }
    MetadataMap::from_headers(routing)
}

/// At most this many of a REST request's other headers reach a graph's Switch conditions.
const MAX_CONDITION_HEADERS: usize = 32;
/// A header longer than this (name and value) is left out of what a graph's conditions read.
const MAX_CONDITION_HEADER_BYTES: usize = 1024;
/// Headers that describe the HTTP exchange rather than the request (hop-by-hop, RFC 9110 §7.6.1; the
/// body's framing and encoding) or carry credentials: never passed to a graph, whose steps may be
/// forwarded to other pods with the headers the graph was called with.
const NOT_FOR_GRAPHS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "accept-encoding",
    "expect",
    "authorization",
    "cookie",
    HEADER_LENGTH,
];

/// For a call of a graph: the routing headers and, bounded, the request's other headers, so Switch
/// conditions on `headers.<name>` hold over REST as over gRPC. Left out: [`NOT_FOR_GRAPHS`], `grpc-*`
/// (gRPC's own: `grpc-timeout` would set a deadline), `*-bin` (binary in gRPC), values that are not
/// visible ASCII, any header over [`MAX_CONDITION_HEADER_BYTES`], and all beyond the first
/// [`MAX_CONDITION_HEADERS`].
fn graph_metadata(headers: &HeaderMap) -> MetadataMap {
    let mut carried = routing_metadata(headers).into_headers();
    let mut extra = 0;
    for (name, value) in headers {
        let n = name.as_str();
        let routing = n.starts_with("mm-") || n == ROUTE_KEY_HEADER;
        if routing
            || NOT_FOR_GRAPHS.contains(&n)
            || n.starts_with("grpc-")
            || n.ends_with("-bin")
            || n.len() + value.len() > MAX_CONDITION_HEADER_BYTES
            || !value.as_bytes().iter().all(|b| (0x20..0x7f).contains(b))
        {
            continue;
        }
        if extra == MAX_CONDITION_HEADERS {
            break;
        }
        carried.append(name.clone(), value.clone());
        extra += 1;
    }
    MetadataMap::from_headers(carried)
}

fn grpc_request<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    tonic::Request::from_parts(routing_metadata(headers), tonic::Extensions::default(), message)
}

/// `/v2/models/{model}` or `/v2/models/{model}/versions/{version}`.
#[derive(serde::Deserialize)]
struct ModelPath {
    model: String,
    #[serde(default)]
    version: String,
}

async fn server_metadata<F>(State(rest): State<Rest<F>>) -> Response
where
    F: Send + Sync + Clone + 'static,
{
    match rest.service.server_metadata(tonic::Request::new(ServerMetadataRequest {})).await {
        Ok(answer) => {
            let answer = answer.into_inner();
            json(
                StatusCode::OK,
                &serde_json::json!({ "name": answer.name, "version": answer.version, "extensions": answer.extensions }),
            )
        }
        Err(status) => status_response(status),
    }
}

async fn live<F>(State(rest): State<Rest<F>>) -> Response
where
    F: Send + Sync + Clone + 'static,
{
    match rest.service.server_live(tonic::Request::new(ServerLiveRequest {})).await {
        Ok(answer) => health("live", answer.into_inner().live),
        Err(status) => status_response(status),
    }
}

async fn ready<F>(State(rest): State<Rest<F>>) -> Response
where
    F: Send + Sync + Clone + 'static,
{
    match rest.service.server_ready(tonic::Request::new(ServerReadyRequest {})).await {
        Ok(answer) => health("ready", answer.into_inner().ready),
        Err(status) => status_response(status),
    }
}

/// V2 says the status code is the answer; the body is what kserve's own server sends.
fn health(what: &'static str, yes: bool) -> Response {
    let status = if yes { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &serde_json::json!({ what: yes }))
}

async fn model_metadata<F>(
    State(rest): State<Rest<F>>,
    Path(path): Path<ModelPath>,
    headers: HeaderMap,
) -> Response
where
    F: Send + Sync + Clone + 'static,
{
    let request = grpc_request(&headers, ModelMetadataRequest { name: path.model, version: path.version });
    match rest.service.model_metadata(request).await {
        Ok(answer) => {
            let answer = answer.into_inner();
            let tensors =
                |tensors: &[densemesh_proto::inference::model_metadata_response::TensorMetadata]| {
                    tensors
                    .iter()
                    .map(|t| serde_json::json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
                    .collect::<Vec<_>>()
                };
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "name": answer.name,
                    "versions": answer.versions,
                    "platform": answer.platform,
                    "inputs": tensors(&answer.inputs),
                    "outputs": tensors(&answer.outputs),
                }),
            )
        }
        Err(status) => status_response(status),
    }
}

async fn model_ready<F>(
    State(rest): State<Rest<F>>,
    Path(path): Path<ModelPath>,
    headers: HeaderMap,
) -> Response
where
    F: Send + Sync + Clone + 'static,
{
    let name = path.model.clone();
    let request = grpc_request(&headers, ModelReadyRequest { name: path.model, version: path.version });
    match rest.service.model_ready(request).await {
        Ok(answer) => {
            let ready = answer.into_inner().ready;
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            json(status, &serde_json::json!({ "name": name, "ready": ready }))
        }
        Err(status) => status_response(status),
    }
}

async fn infer<F>(State(rest): State<Rest<F>>, Path(path): Path<ModelPath>, request: Request) -> Response
where
    F: Service<http::Request<GrpcBody>, Response = http::Response<GrpcBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    F::Future: Send + 'static,
{
    match rest.infer(path, request).await {
        Ok(response) => response,
        Err(status) => status_response(status),
    }
}

impl<F> Rest<F>
where
    F: Service<http::Request<GrpcBody>, Response = http::Response<GrpcBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    F::Future: Send + 'static,
{
    async fn infer(&self, path: ModelPath, request: Request) -> Result<Response, Status> {
        let (parts, body) = request.into_parts();
        let json_length = match parts.headers.get(HEADER_LENGTH) {
            None => None,
            Some(value) => {
                Some(value.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or_else(|| {
                    Status::invalid_argument(format!("the {HEADER_LENGTH} header is not a byte count"))
                })?)
            }
        };
        if let Some(encoding) = parts.headers.get(header::CONTENT_ENCODING)
            && encoding.as_bytes() != b"identity"
        {
            return Err(Status::invalid_argument(format!(
                "content-encoding {} is not supported; send the body uncompressed",
                String::from_utf8_lossy(encoding.as_bytes())
            )));
        }
        let body = axum::body::to_bytes(HttpBody::new(body), self.max_message_size).await.map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                Status::invalid_argument(format!(
                    "request body is too large: over the limit of {} bytes (raise --max-message-size or send less)",
                    self.max_message_size
                ))
            } else {
                Status::cancelled(format!("the request broke off: {e}"))
            }
        })?;
        let call = codec::parse_infer(body, json_length).map_err(Status::from)?;
        // A graph's Switch conditions may read the request's headers; a model's call needs only the
        // routing ones.
        let metadata = match self.service.graph_named(|h| parts.headers.contains_key(h), &path.model) {
            Some(_) => graph_metadata(&parts.headers),
            None => routing_metadata(&parts.headers),
        };
        let mut message = call.request;
        message.model_name = path.model;
        message.model_version = path.version;
        let answer = self.model_infer(metadata, &message).await?;
        let rendered = codec::render_infer(&answer, &call.outputs).map_err(Status::from)?;
        let mut response = Response::new(axum::body::Body::from(rendered.body));
        let headers = response.headers_mut();
        match rendered.json_length {
            Some(length) => {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                headers.insert(HEADER_LENGTH, HeaderValue::from(length));
            }
            None => {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
        }
        Ok(response)
    }

    /// `ModelInfer` through the front, as a gRPC client's call arrives there, with `metadata`.
    async fn model_infer(
        &self,
        metadata: MetadataMap,
        message: &ModelInferRequest,
    ) -> Result<ModelInferResponse, Status> {
        let mut body = BytesMut::with_capacity(FRAME_HEADER + message.encoded_len());
        let length = u32::try_from(message.encoded_len()).map_err(|_| {
            Status::invalid_argument(format!(
                "request message is too large: over the limit of {} bytes (raise --max-message-size or send less)",
                self.max_message_size
            ))
        })?;
        body.put_u8(0);
        body.put_u32(length);
        message.encode(&mut body).map_err(|e| Status::internal(format!("cannot encode the request: {e}")))?;
        let mut request = http::Request::new(GrpcBody::new(http_body_util::Full::new(body.freeze())));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(MODEL_INFER_PATH);
        *request.headers_mut() = metadata.into_headers();
        request.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        request.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
        let mut front = self.front.clone();
        let response = async {
            std::future::poll_fn(|cx| front.poll_ready(cx)).await?;
            front.call(request).await
        };
        let response = match response.await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        grpc_answer(response).await
    }
}

/// A gRPC answer read back: the message, or the status it carries (in its headers when it is
/// trailers-only, else in its trailers).
async fn grpc_answer(response: http::Response<GrpcBody>) -> Result<ModelInferResponse, Status> {
    let (mut parts, body) = response.into_parts();
    let in_headers = status_of(&mut parts.headers);
    if let Some(status) = in_headers.as_ref().filter(|s| s.code() != Code::Ok) {
        return Err(status.clone());
    }
    let collected =
        body.collect().await.map_err(|e| Status::unavailable(format!("the answer broke off: {e}")))?;
    let mut trailers = collected.trailers().cloned().unwrap_or_default();
    let bytes: Bytes = collected.to_bytes();
    match status_of(&mut trailers).or(in_headers) {
        Some(status) if status.code() != Code::Ok => return Err(status),
        Some(_) => {}
        None => return Err(Status::internal("the inference answer ended without a gRPC status")),
    }
    let message = frame::message(&bytes)
        .ok_or_else(|| Status::internal("the inference answer is not one uncompressed gRPC message"))?;
    ModelInferResponse::decode(message)
        .map_err(|e| Status::internal(format!("the inference answer is not a ModelInferResponse: {e}")))
}

/// The gRPC status in `headers`, if there is one. Details are dropped first: tonic's parser panics
/// on malformed ones, and a peer's answer passes through here.
fn status_of(headers: &mut HeaderMap) -> Option<Status> {
    headers.remove("grpc-status-details-bin");
    Status::from_header_map(headers)
}
