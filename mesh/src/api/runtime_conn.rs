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
    /// The `:authority` of every call: the endpoint's host:port, or `localhost` on a unix socket.
    authority: Authority,
    /// The open connection and its number; `None` before the first call and after it broke.
    open: parking_lot::Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Held while dialling, so calls that find the connection broken dial once between them.
    dialling: tokio::sync::Mutex<u64>,
}

/// Where a runtime listens.
#[derive(Debug, Clone)]
enum Endpoint {
    Tcp { authority: String },
    Unix { path: std::path::PathBuf },
}

impl RuntimeConn {
    /// A connection to `endpoint`: `http://host:port`, `host:port`, or `unix:///path`. Nothing is dialled
    /// until the first call.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        let (endpoint, authority) = if let Some(path) = endpoint.strip_prefix("unix://") {
            (Endpoint::Unix { path: path.into() }, Authority::from_static("localhost"))
        } else {
            let authority = endpoint.strip_prefix("http://").unwrap_or(endpoint).trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') || endpoint.starts_with("https://") {
                return Err("an endpoint is host:port, http://host:port or unix:///path".to_owned());
            }
            let parsed = authority.parse::<Authority>().map_err(|e| e.to_string())?;
            (Endpoint::Tcp { authority: authority.to_owned() }, parsed)
        };
        Ok(Self {
            endpoint,
            authority,
            open: parking_lot::Mutex::new(None),
            dialling: tokio::sync::Mutex::new(0),
        })
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
        let path_and_query = if path == MODEL_INFER_PATH {
            PathAndQuery::from_static(MODEL_INFER_PATH)
        } else {
            PathAndQuery::try_from(path).map_err(|e| bad_path(&e))?
        };
        let uri = http::Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(self.authority.clone())
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
        let (message, trailers) = read_answer(body, max_message_size + FRAME_HEADER)
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

/// An answer's message and trailers, read whole (at most `limit` bytes), flow-control capacity given
/// back as each piece is read. Read here rather than through `http_body` adapters and a collector: those
/// copied the trailers once more per call, a visible part of the hop's instructions.
async fn read_answer(mut body: h2::RecvStream, limit: usize) -> Result<(Bytes, Option<HeaderMap>), String> {
    let mut message = Bytes::new();
    let mut more: Option<bytes::BytesMut> = None;
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(data.len());
        let read = message.len() + more.as_ref().map_or(0, |m| m.len());
        if read + data.len() > limit {
            return Err(format!("the answer is over the limit of {limit} bytes"));
        }
        // One DATA frame, the usual case, is kept as it came; more are joined.
        match (&mut more, message.is_empty()) {
            (None, true) => message = data,
            (None, false) => {
                let mut joined = bytes::BytesMut::with_capacity(read + data.len());
                joined.extend_from_slice(&message);
                joined.extend_from_slice(&data);
                more = Some(joined);
            }
            (Some(joined), _) => joined.extend_from_slice(&data),
        }
    }
    if let Some(joined) = more {
        message = joined.freeze();
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    Ok((message, trailers))
}
