//! `ModelInfer` as a pod first sees it: the model the call names is read from its bytes, placement
//! says where it runs, and a call for another pod is passed on as the bytes it came in as. Every other
//! call, and every call served here, goes on to the generated server.
//!
//! Decoding a request only to encode it again for the peer, and the same for its answer, was most of
//! what a forwarded hop cost; here a hop is two copies of the bytes through HTTP/2 and nothing more.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::api::passthrough::RuntimeCalls;
use crate::api::service::{Decision, InferenceService, Resolved};
use crate::cluster::forward::{FRAME_HEADER, Forwarded, MODEL_INFER_PATH};
use crate::node::v2::frame;

/// Wraps the generated inference server (`inner`), deciding for it where `ModelInfer` calls run.
#[derive(Clone)]
pub struct Front<S> {
    inner: S,
    service: InferenceService,
    max_message_size: usize,
    /// Set when models may run in another process: `ModelInfer` for one of those passes to it as bytes.
    runtimes: Option<Arc<RuntimeCalls>>,
}

impl<S> Front<S> {
    pub fn new(inner: S, service: InferenceService, max_message_size: usize) -> Self {
        Self { inner, service, max_message_size, runtimes: None }
    }

    /// Passes `ModelInfer` for a model held here by a runtime in another process (one whose
    /// [`Passthrough`](densemesh_runtime_core::Passthrough) lists the call) to that runtime as the bytes
    /// it came in as, as ModelMesh does: decoding it only to encode it again for the runtime was most of
    /// what the mesh added in front of it.
    pub fn with_runtime_calls(mut self, runtimes: Arc<RuntimeCalls>) -> Self {
        self.runtimes = Some(runtimes);
        self
    }
}

impl<S: NamedService> NamedService for Front<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Front<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if request.uri().path() != MODEL_INFER_PATH || !self.service.routes(request.headers()) {
            return Box::pin(self.inner.call(request));
        }
        // The inner service was made ready for this call; the clone left behind readies itself.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (service, max, runtimes) = (self.service.clone(), self.max_message_size, self.runtimes.clone());
        Box::pin(async move { Ok(route(inner, service, runtimes, request, max).await) })
    }
}

/// A `ModelInfer` call: read whole, then passed on, answered here with an error, or served here.
async fn route<S>(
    mut inner: S,
    service: InferenceService,
    runtimes: Option<Arc<RuntimeCalls>>,
    request: Request<Body>,
    max: usize,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let bytes = match read_message(body, max).await {
        Ok(bytes) => bytes,
        Err(status) => return status.into_http(),
    };
    let Some(message) = frame::message(&bytes) else {
        // The generated server answers a compressed message (this server takes none) as gRPC says.
        if bytes.first() == Some(&1) {
            return serve_here(&mut inner, parts, bytes).await;
        }
        return Status::invalid_argument("ModelInfer takes exactly one uncompressed message").into_http();
    };
    let Some(name) = frame::model_name(message) else {
        return Status::invalid_argument("the request is not a well-formed ModelInferRequest").into_http();
    };
    if service.graph_named(|h| parts.headers.contains_key(h), name).is_some() {
        // A graph runs here, on the generated server's path (see `crate::api::graph`); each of its
        // steps is routed there as a call of its own would be.
        return serve_here(&mut inner, parts, bytes).await;
    }
    service.received(message.len());
    let metadata = MetadataMap::from_headers(std::mem::take(&mut parts.headers));
    let refuse = |status: Status| {
        service.failed(started, &status);
        status.into_http()
    };
    let Decision { id, peer } = match service.decide(&metadata, name) {
        Ok(decided) => decided,
        // Unknown here may be registered through another pod a moment ago: once this pod's view has
        // caught up with the store, the name is looked up again, as a graph too.
        Err(e) if e.code() == Code::NotFound && service.caught_up_with_store().await => {
            if service.graph_named(|h| metadata.contains_key(h), name).is_some() {
                parts.headers = metadata.into_headers();
                return serve_here(&mut inner, parts, bytes).await;
            }
            match service.decide(&metadata, name) {
                Ok(decided) => decided,
                Err(e) => return refuse(Status::from(e)),
            }
        }
        Err(e) => return refuse(Status::from(e)),
    };
    parts.headers = metadata.into_headers();
    if let Some((forwarder, peer)) = peer {
        match forwarder.forward(peer, &id, &parts.headers, bytes.clone()).await {
            Forwarded::Answered { answer, .. } => {
                service.served(started, answer.body.len().saturating_sub(FRAME_HEADER));
                return answer.into_response();
            }
            Forwarded::Refused(status) => return refuse(status),
            // No pod could serve it: load it here.
            Forwarded::ServeHere => {}
        }
    }
    if let Some(runtimes) = &runtimes
        && let Some(lease) = service.cache().lease_if_loaded(&id)
        && let Some(runtime) = lease.model().passthrough()
        && let Some(injection) = runtime.method(MODEL_INFER_PATH)
    {
        let slots = lease.model().call_slots();
        match runtimes
            .call(runtime, slots, &id, MODEL_INFER_PATH, parts.headers.clone(), bytes.clone(), injection)
            .await
        {
            Ok(answer) => {
                service.served(started, answer.body.len().saturating_sub(FRAME_HEADER));
                return answer.into_response();
            }
            // The runtime lost the model (its process restarted) or is down: the decoded path below
            // tells a lost model from a failed one and loads it again.
            Err(status) if matches!(status.code(), Code::NotFound | Code::Unavailable) => {
                tracing::debug!(model_id = %id, %status, "runtime did not take the call; serving it the long way");
            }
            Err(status) => return refuse(status),
        }
    }
    parts.extensions.insert(Resolved { id, started });
    serve_here(&mut inner, parts, bytes).await
}

/// A call's body read whole: one gRPC message of at most `max` bytes (`--max-message-size`), framed.
pub(crate) async fn read_message(body: Body, max: usize) -> Result<Bytes, Status> {
    match Limited::new(body, max + FRAME_HEADER).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Status::invalid_argument(format!(
            "request message is too large: over the limit of {max} bytes (raise --max-message-size or send less)"
        ))),
        Err(e) => Err(Status::cancelled(format!("the request broke off: {e}"))),
    }
}

/// Hands the call, rebuilt from its bytes, to the generated server.
async fn serve_here<S>(inner: &mut S, parts: http::request::Parts, bytes: Bytes) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let request = Request::from_parts(parts, Body::new(Full::new(bytes)));
    let response = async {
        std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
        inner.call(request).await
    };
    match response.await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use densemesh_proto::inference::ModelInferRequest;
    use prost::Message;

    use super::*;
    use crate::test_support::{TestPod, forwarded_metadata, inference_service};

    /// The generated server's stand-in: counts the calls it gets and the bytes of their bodies.
    #[derive(Clone, Default)]
    struct Server {
        calls: Arc<AtomicUsize>,
        bytes: Arc<AtomicUsize>,
    }

    impl Service<Request<Body>> for Server {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let (calls, bytes) = (self.calls.clone(), self.bytes.clone());
            Box::pin(async move {
                let body = request.into_body().collect().await.map(|c| c.to_bytes().len()).unwrap_or(0);
                calls.fetch_add(1, Ordering::SeqCst);
                bytes.fetch_add(body, Ordering::SeqCst);
                Ok(Status::ok("").into_http())
            })
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        body
    }

    fn call(path: &str, headers: http::HeaderMap, body: Vec<u8>) -> Request<Body> {
        let mut request = Request::new(Body::new(Full::new(Bytes::from(body))));
        *request.uri_mut() = http::Uri::try_from(path).unwrap();
        *request.headers_mut() = headers;
        request
    }

    fn code(response: &Response<Body>) -> Option<&str> {
        response.headers().get("grpc-status").and_then(|s| s.to_str().ok())
    }

    #[tokio::test]
    async fn a_body_that_is_not_one_well_formed_message_is_refused_before_anything_runs() {
        let pod = TestPod::start("a").await;
        let server = Server::default();
        let mut front = Front::new(server.clone(), inference_service(&pod), 1024);
        let one = framed(&ModelInferRequest { model_name: "m".into(), ..Default::default() }.encode_to_vec());
        let cases = [
            ("two messages", [one.clone(), one.clone()].concat(), "exactly one"),
            ("not protobuf", framed(&[0x0b]), "well-formed"),
            ("over the limit", framed(&vec![0; 2048]), "--max-message-size"),
        ];
        for (what, body, says) in cases {
            let response = front.call(call(MODEL_INFER_PATH, http::HeaderMap::new(), body)).await.unwrap();
            assert_eq!(code(&response), Some("3"), "{what}: INVALID_ARGUMENT");
            let message = response.headers().get("grpc-message").unwrap().to_str().unwrap();
            assert!(message.replace("%20", " ").contains(says), "{what}: {message}");
        }
        assert_eq!(server.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn other_calls_and_calls_forwarded_here_reach_the_server_untouched() {
        let pod = TestPod::start("a").await;
        let server = Server::default();
        let mut front = Front::new(server.clone(), inference_service(&pod), 1024);
        // Not a ModelInfer, and a ModelInfer another pod forwarded here: neither is read or refused.
        let garbage = vec![9; 40];
        let forwarded = forwarded_metadata("b", None).into_headers();
        for (path, headers) in [
            ("/inference.GRPCInferenceService/ModelMetadata", http::HeaderMap::new()),
            (MODEL_INFER_PATH, forwarded),
        ] {
            let response = front.call(call(path, headers, garbage.clone())).await.unwrap();
            assert_eq!(code(&response), Some("0"), "{path}");
        }
        assert_eq!(server.calls.load(Ordering::SeqCst), 2);
        assert_eq!(server.bytes.load(Ordering::SeqCst), 80);
    }
}
