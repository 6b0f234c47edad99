//! One HTTP/2 connection to a runtime in another process, for the calls passed to it whole.
//!
//! Written on `h2` directly rather than a tonic `Channel` for the latency of a quiet pod. Through a
//! channel, a call crossed tower's buffer task, and hyper sent the request's headers and its message in
//! two writes (the body went through a task of its own, which waited for flow-control capacity), so the
//! runtime woke twice per call; on this kind of machine each wake-up is tens of microseconds, and the
//! mesh added over half a millisecond in front of MLServer. Here the caller's task queues the headers
//! and the message together, and the connection task writes them in one go.

use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::HeaderMap;
use http::uri::{Authority, PathAndQuery};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use crate::cluster::forward::{FRAME_HEADER, MODEL_INFER_PATH, RawAnswer};

/// The connection's windows: a message of up to `--max-message-size` flows without waiting on a
/// window update per 64 KiB (hyper's defaults for a client).
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A runtime's endpoint and its connection, made on first use and again after it breaks.
pub struct RuntimeConn {
    endpoint: Endpoint,
    /// The open connection and its number; `None` before the first call and after it broke.
    open: parking_lot::Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Held while dialling, so calls that find the connection broken dial once between them.
    dialling: tokio::sync::Mutex<u64>,
}

/// Where a runtime listens.
#[derive(Debug, Clone)]
enum Endpoint {
    /// Parsed once: it is dialled, and it is every call's `:authority`.
    Tcp {
        authority: Authority,
    },
    Unix {
        path: std::path::PathBuf,
    },
}

impl RuntimeConn {
    /// A connection to `endpoint`: `http://host:port`, `host:port`, or `unix:///path`. Nothing is dialled
    /// until the first call.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        let endpoint = if let Some(path) = endpoint.strip_prefix("unix://") {
            Endpoint::Unix { path: path.into() }
        } else {
            let authority = endpoint.strip_prefix("http://").unwrap_or(endpoint).trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') || endpoint.starts_with("https://") {
                return Err("an endpoint is host:port, http://host:port or unix:///path".to_owned());
            }
            Endpoint::Tcp { authority: authority.parse().map_err(|e: http::uri::InvalidUri| e.to_string())? }
        };
        Ok(Self { endpoint, open: parking_lot::Mutex::new(None), dialling: tokio::sync::Mutex::new(0) })
    }

    /// Calls `path` with the client's `headers` and the framed message `bytes`, reading the answer whole
    /// (at most a message of `max_message_size`). Any status but OK is an error, as `who` named it.
    pub async fn call(
        &self,
        path: &str,
        headers: HeaderMap,
        bytes: Bytes,
        max_message_size: usize,
        who: &str,
    ) -> Result<RawAnswer, tonic::Status> {
        let unavailable =
            |what: &str, e: &dyn std::fmt::Display| tonic::Status::unavailable(format!("{who} {what}: {e}"));
        let bad_path =
            |e: &dyn std::fmt::Display| tonic::Status::invalid_argument(format!("bad path {path}: {e}"));
        // Built from parts, the parsed authority shared: no URI is formatted and parsed again per call.
        let authority = match &self.endpoint {
            Endpoint::Tcp { authority } => authority.clone(),
            Endpoint::Unix { .. } => Authority::from_static("localhost"),
        };
        let path_and_query = if path == MODEL_INFER_PATH {
            PathAndQuery::from_static(MODEL_INFER_PATH)
        } else {
            PathAndQuery::try_from(path).map_err(|e| bad_path(&e))?
        };
        let uri = http::Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| bad_path(&e))?;
        let mut request = http::Request::post(uri).body(()).map_err(|e| bad_path(&e))?;
        *request.headers_mut() = headers;
        let mut sender = self.ready_sender().await.map_err(|e| unavailable("not ready", &e))?;
        // Headers and message are queued here, together, before the connection task writes either.
        let (response, mut body) =
            sender.send_request(request, false).map_err(|e| unavailable("failed the call", &e))?;
        body.send_data(bytes, true).map_err(|e| unavailable("failed the call", &e))?;
        let response = response.await.map_err(|e| unavailable("failed the call", &e))?;
        let (head, body) = response.into_parts();
        let (message, trailers) = read_whole(body, max_message_size + FRAME_HEADER)
            .await
            .map_err(|e| unavailable("broke off its answer", &e))?;
        crate::cluster::forward::judge(head, message, trailers, who)
    }

    /// The connection's sender once it can take a call: the open connection, or a new one if there is
    /// none or it broke.
    async fn ready_sender(&self) -> Result<SendRequest<Bytes>, String> {
        let open = self.open.lock().clone();
        let broken = match open {
            Some((number, sender)) => match sender.ready().await {
                Ok(ready) => return Ok(ready),
                Err(e) => {
                    tracing::debug!(error = %e, "runtime connection broke; dialling again");
                    Some(number)
                }
            },
            None => None,
        };
        let mut dialled = self.dialling.lock().await;
        let newer = {
            let mut open = self.open.lock();
            match open.as_ref() {
                // Another call dialled while this one waited.
                Some((number, sender)) if Some(*number) != broken => Some(sender.clone()),
                _ => {
                    *open = None;
                    None
                }
            }
        };
        let sender = match newer {
            Some(sender) => sender,
            None => {
                let sender = self.connect().await?;
                *dialled += 1;
                *self.open.lock() = Some((*dialled, sender.clone()));
                sender
            }
        };
        drop(dialled);
        sender.ready().await.map_err(|e| e.to_string())
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, String> {
        let dialled = tokio::time::timeout(CONNECT_TIMEOUT, async {
            match &self.endpoint {
                Endpoint::Tcp { authority } => {
                    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
                    stream.set_nodelay(true)?;
                    Ok::<Box<dyn Io>, std::io::Error>(Box::new(stream))
                }
                Endpoint::Unix { path } => {
                    let stream: Box<dyn Io> = Box::new(tokio::net::UnixStream::connect(path).await?);
                    Ok(stream)
                }
            }
        })
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(dialled)
            .await
            .map_err(|e| e.to_string())?;
        let span = tracing::debug_span!("runtime_connection", endpoint = ?self.endpoint);
        tokio::spawn(
            async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "runtime connection ended");
                }
            }
            .instrument(span),
        );
        Ok(sender)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A message and its trailers, read whole off an HTTP/2 stream (at most `limit` bytes), flow-control
/// capacity given back as each piece is read. Read here rather than through `http_body` adapters and a
/// collector: those copied the trailers once more per call, a visible part of the hop's instructions.
/// Also the body reader of `densemesh-bench relay`, so that floor reads bodies as meshd does.
pub async fn read_whole(
    mut body: h2::RecvStream,
    limit: usize,
) -> Result<(Bytes, Option<HeaderMap>), String> {
    // One DATA frame, the usual case, is kept as it came; once there is a second, all are joined.
    let mut message = Bytes::new();
    let mut joined = bytes::BytesMut::new();
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(data.len());
        if message.len() + joined.len() + data.len() > limit {
            return Err(format!("the message is over the limit of {limit} bytes"));
        }
        if message.is_empty() && joined.is_empty() {
            message = data;
        } else {
            joined.extend_from_slice(&std::mem::take(&mut message));
            joined.extend_from_slice(&data);
        }
    }
    if !joined.is_empty() {
        message = joined.freeze();
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    Ok((message, trailers))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `pieces` as separate DATA frames, then `trailers`, over a real in-memory HTTP/2 connection,
    /// and reads them on the other side with [`read_whole`] under `limit`.
    async fn sent_and_read(
        pieces: &[&'static [u8]],
        limit: usize,
    ) -> Result<(Bytes, Option<HeaderMap>), String> {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, _respond) = connection.accept().await.unwrap().unwrap();
            let read = read_whole(request.into_body(), limit).await;
            // Keep the connection driven until the client is done.
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            read
        });
        let (mut sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::post("http://localhost/p").body(()).unwrap();
        let (_response, mut body) = sender.send_request(request, false).unwrap();
        for piece in pieces {
            body.send_data(Bytes::from_static(piece), false).unwrap();
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        body.send_trailers(trailers).unwrap();
        server.await.unwrap()
    }

    #[tokio::test]
    async fn a_message_in_several_frames_is_read_whole_and_the_limit_counts_each_byte_once() {
        let (message, trailers) = sent_and_read(&[b"abc", b"", b"defg", b"h"], 8).await.unwrap();
        assert_eq!(&message[..], b"abcdefgh");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        let (message, _) = sent_and_read(&[b"", b"abc"], 3).await.unwrap();
        assert_eq!(&message[..], b"abc", "an empty first frame");
        let err = sent_and_read(&[b"abc", b"defg", b"hi"], 8).await.unwrap_err();
        assert!(err.contains("over the limit of 8 bytes"), "{err}");
    }
}
