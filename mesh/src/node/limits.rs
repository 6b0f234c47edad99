//! Oversized requests answered as INVALID_ARGUMENT naming the limit.
//!
//! tonic refuses a message over `--max-message-size` before any handler sees it, with OUT_OF_RANGE and
//! a message that names no flag. Clients of this protocol expect INVALID_ARGUMENT for a request they
//! must change, so this wrapper rewrites that one status on its way out.

use std::task::{Context, Poll};

use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

const TONIC_TOO_LARGE: &str = "decoded message length too large";

/// Wraps a generated gRPC server.
#[derive(Debug, Clone)]
pub struct OversizeIsInvalid<S> {
    inner: S,
}

impl<S> OversizeIsInvalid<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for OversizeIsInvalid<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<Request<B>> for OversizeIsInvalid<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite(&mut response);
            Ok(response)
        })
    }
}

fn rewrite<R>(response: &mut Response<R>) {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|s| s.as_bytes() == b"11");
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
    // tonic percent-encodes the message; its spaces arrive as %20.
    let message = message.replace("%20", " ");
    if !out_of_range || !message.contains(TONIC_TOO_LARGE) {
        return;
    }
    let detail = message.split_once("found ").map_or("", |(_, rest)| rest).replace(':', "");
    let text = format!("request message is too large: {detail} (raise --max-message-size or send less)");
    let encoded: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '%' || c == ' ' {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32)
            }
        })
        .collect();
    headers.insert("grpc-status", HeaderValue::from_static("3"));
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", value);
    }
}

#[cfg(test)]
mod tests {
    use densemesh_proto::inference::ModelInferRequest;
    use densemesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;

    use super::*;
    use crate::test_support::AnswersInfer;

    /// Pins the rewrite to the tonic in use: a real server refusing a real oversized request answers
    /// INVALID_ARGUMENT naming the flag. A tonic whose refusal reads differently fails here, not in
    /// front of users.
    #[tokio::test]
    async fn tonics_own_refusal_of_an_oversized_request_becomes_invalid_argument() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = GrpcInferenceServiceServer::new(AnswersInfer).max_decoding_message_size(1024);
        let server = tonic::transport::Server::builder()
            .add_service(OversizeIsInvalid::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let server = tokio::spawn(server);
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();

        let small = ModelInferRequest { model_name: "m".into(), ..Default::default() };
        assert_eq!(client.model_infer(small).await.unwrap().into_inner().model_name, "m");
        let big = ModelInferRequest { model_name: "m".into(), id: "x".repeat(4096), ..Default::default() };
        let refused = client.model_infer(big).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("--max-message-size"), "{}", refused.message());
        server.abort();
    }

    #[test]
    fn rewrites_only_tonics_size_refusal() {
        let refused = || {
            Response::builder()
                .header("grpc-status", "11")
                .header(
                    "grpc-message",
                    "Error,%20decoded%20message%20length%20too%20large:%20found%20100%20bytes,%20the%20limit%20is:%2010%20bytes",
                )
                .body(())
                .unwrap()
        };
        let mut r = refused();
        rewrite(&mut r);
        assert_eq!(r.headers()["grpc-status"], "3");
        let message = r.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("100 bytes") && message.contains("--max-message-size"), "{message}");

        let mut other =
            Response::builder().header("grpc-status", "11").header("grpc-message", "x").body(()).unwrap();
        rewrite(&mut other);
        assert_eq!(other.headers()["grpc-status"], "11");
    }
}
