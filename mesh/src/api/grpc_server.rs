//! The gRPC port's HTTP/2 server: `h2` directly, with tonic's routes behind it.
//!
//! tonic's own server runs every call through hyper's server, hyper-util's protocol-sniffing connection,
//! and a stack of boxed layers made per connection (connect info, a timeout, error recovery, a clone of
//! the boxed service per call). Under callgrind that was about a tenth of the instructions of a call
//! meshd passes to a runtime, on a hop whose goal is a bare relay's cost (bench/README, "Runtimes").
//! Here each stream is handed to the service as it comes off the connection, and its answer is written
//! back on the stream: one DATA frame and the trailers with no wait for flow-control capacity, which a
//! message within the window never needs, and later messages of a stream only once the ones before them
//! fit the client's window, so a client that stops reading holds at most one message here.
//!
//! What tonic's server did that callers rely on is kept: `grpc-timeout` ends a call with CANCELLED
//! ("Timeout expired"), a stream the client resets drops its call, and shutdown lets calls in flight
//! finish (GOAWAY, then the connection closes once its streams are done).

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response};
use http_body::{Body as _, Frame};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::tls::stream::GrpcIo;

/// hyper's defaults for a server, which tonic's server kept: windows of 1 MiB, headers of at most
/// 16 KiB, at most 400 KiB queued per stream beyond what the client's window lets out.
const WINDOW: u32 = 1 << 20;
const MAX_HEADER_LIST: u32 = 16 << 10;
const MAX_SEND_BUFFER: usize = 400 << 10;
/// Streams a client may open and reset before the server accepts them (a rapid-reset flood).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// How long a connection still in its handshake when shutdown begins may take to finish it.
const HANDSHAKE_AT_SHUTDOWN: Duration = Duration::from_secs(1);
/// Headers HTTP/2 forbids in an answer (h2 refuses to send one): the connection-specific ones, and `te`,
/// which belongs in a request only. Removed, as hyper's server did, so an answer carrying one is still sent.
const FORBIDDEN_IN_ANSWER: [http::HeaderName; 6] = [
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::TE,
];
/// Parsed once: a header looked up by a string is parsed into a name on every call.
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Serves every connection `incoming` yields with `service` until `stop`, then lets each connection
/// finish the calls it has (see the module's doc) and returns once all are closed.
pub async fn serve<S, I>(incoming: I, service: S, stop: CancellationToken)
where
    I: Stream<Item = io::Result<GrpcIo>>,
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let connections = TaskTracker::new();
    {
        // Dropped before the drain: connections accepted but not yet handed over close at once, so their
        // clients try elsewhere rather than wait out the drain.
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let io = tokio::select! {
                () = stop.cancelled() => break,
                io = incoming.next() => match io {
                    Some(Ok(io)) => io,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "grpc: a connection failed before it was served");
                        continue;
                    }
                    None => break,
                },
            };
            connections.spawn(connection(io, service.clone(), stop.clone()));
        }
    }
    connections.close();
    connections.wait().await;
}

/// One client connection: its streams are accepted (which also drives the connection's I/O) and each
/// served on a task of its own.
async fn connection<S>(io: GrpcIo, service: S, stop: CancellationToken)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    let mut handshake = std::pin::pin!(handshake);
    let shaken = tokio::select! {
        shaken = &mut handshake => shaken,
        // A client mid-handshake at shutdown may have a call on its way: a moment more lets it end with
        // GOAWAY and that call served, not a closed connection; a silent one is dropped.
        () = stop.cancelled() => match tokio::time::timeout(HANDSHAKE_AT_SHUTDOWN, handshake).await {
            Ok(shaken) => shaken,
            Err(_) => return,
        },
    };
    let mut connection = match shaken {
        Ok(connection) => connection,
        Err(e) => {
            tracing::debug!(error = %e, "grpc: HTTP/2 handshake failed");
            return;
        }
    };
    // Made once: a `select!` over fresh futures would build and move them on every wake-up.
    let mut stopped = std::pin::pin!(stop.cancelled());
    let mut closing = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    // Boxed, so the task moves a pointer, not the call's whole state, as it starts and
                    // ends (two copies of a few KiB per call otherwise).
                    tokio::spawn(Box::pin(call(service.clone(), request, respond)));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "grpc: connection ended with an error");
                    break;
                }
                None => break,
            },
            () = &mut stopped, if !closing => {
                closing = true;
                connection.graceful_shutdown();
            }
        }
    }
}

/// One stream: the service's answer to it, written back, unless the client resets the stream first.
async fn call<S>(service: S, request: Request<RecvStream>, mut respond: SendResponse<Bytes>)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let timeout = grpc_timeout(request.headers());
    let request = request.map(|body| Body::new(Incoming { body, data_done: false }));
    let answered = async {
        let Ok(response) = service.oneshot(request).await;
        response
    };
    let answered = async {
        match timeout {
            None => answered.await,
            Some(timeout) => tokio::time::timeout(timeout, answered)
                .await
                .unwrap_or_else(|_| Status::cancelled("Timeout expired").into_http()),
        }
    };
    let response = tokio::select! {
        // A reset stream wants no answer: dropping the call's future stops its work.
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
        response = answered => response,
    };
    if let Err(e) = answer(&mut respond, response).await {
        tracing::debug!(error = %e, "grpc: could not write an answer");
        respond.send_reset(Reason::INTERNAL_ERROR);
    }
}

/// Writes `response` on its stream; the body's frames as they come, its trailers last.
async fn answer(respond: &mut SendResponse<Bytes>, response: Response<Body>) -> Result<(), h2::Error> {
    let (mut parts, mut body) = response.into_parts();
    // A look over the answer's few names first: removing by name hashes each one, on every call.
    if parts.headers.keys().any(|name| FORBIDDEN_IN_ANSWER.contains(name)) {
        for name in &FORBIDDEN_IN_ANSWER {
            parts.headers.remove(name);
        }
    }
    if body.is_end_stream() {
        respond.send_response(Response::from_parts(parts, ()), true)?;
        return Ok(());
    }
    let mut send = respond.send_response(Response::from_parts(parts, ()), false)?;
    let mut sent_data = false;
    loop {
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reset) = send.poll_reset(cx) {
                return Poll::Ready(Err(reset));
            }
            Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match frame {
            // The client reset the stream; dropping the body ends whatever produced it.
            Err(_) => return Ok(()),
            Ok(None) => return send.send_data(Bytes::new(), true),
            Ok(Some(Err(status))) => {
                tracing::debug!(%status, "grpc: an answer's body failed");
                send.send_reset(Reason::INTERNAL_ERROR);
                return Ok(());
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() && !body.is_end_stream() {
                    continue;
                }
                if sent_data {
                    fits_window(&mut send).await?;
                }
                sent_data = true;
                let end = body.is_end_stream();
                send.send_data(data, end)?;
                if end {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return send.send_trailers(trailers);
                }
            }
        }
    }
}

/// Waits until everything queued on `send` fits the client's window, so that a stream's messages queue
/// one at a time here, however slowly its client reads.
async fn fits_window(send: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
    send.reserve_capacity(1);
    while send.capacity() == 0 {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(Reason::CANCEL)),
        }
    }
    Ok(())
}

/// A request's body as the service reads it: the client's DATA frames, the window given back as each
/// is read, then its trailers.
struct Incoming {
    body: RecvStream,
    data_done: bool,
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.body.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only once the stream is gone, which the next poll reports.
                    let _ = self.body.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.body.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

/// The call's deadline from `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit, H M S m u n).
/// A value that is not one is ignored, as tonic's server did.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
