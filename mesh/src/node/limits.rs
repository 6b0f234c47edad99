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
    use super::*;

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
