//! `densemesh-bench relay`: the floor of an HTTP/2 hop. A bare relay on the `h2` crate meshd's own
//! runtime connection uses: each call read whole from its client and passed whole, headers and message,
//! to one server over one connection, its answer passed back the same way. It has nothing of the mesh
//! (no routing, no placement, no leases, no metrics), so `pair --via` the relay against `pair --via`
//! meshd, on the same server in the same minutes, splits what meshd adds into what any HTTP/2 hop costs
//! on the host and what is meshd's own (bench/runtimes.py).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use densemesh_mesh::api::read_whole;
use h2::RecvStream;
use h2::client::SendRequest;
use h2::server::SendResponse;
use tokio::net::{TcpListener, TcpStream};

/// A message larger than this is refused: the relay reads each call whole, as meshd does (with its reader).
const MAX_BODY: usize = 64 << 20;
/// meshd's windows towards a runtime (`runtime_conn`), so neither side waits on window updates.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;

/// What `relay` was asked to do.
#[derive(Debug, Clone)]
pub struct RelayArgs {
    /// Where to listen; port 0 lets the kernel choose (see `addr_file`).
    pub listen: SocketAddr,
    /// The server every call is passed to, host:port.
    pub to: String,
    /// Written once listening: `{"grpc_addr": "..."}`, as meshd's `--addr-file`.
    pub addr_file: Option<PathBuf>,
}

/// The connection to the server, dialled on first use and again after it breaks.
struct Upstream {
    to: String,
    open: tokio::sync::Mutex<Option<SendRequest<Bytes>>>,
}

impl Upstream {
    async fn sender(&self) -> Result<SendRequest<Bytes>, String> {
        let open = self.open.lock().await.clone();
        if let Some(sender) = open {
            match sender.ready().await {
                Ok(ready) => return Ok(ready),
                Err(e) => eprintln!("relay: the connection to {} broke ({e}); dialling again", self.to),
            }
        }
        let mut open = self.open.lock().await;
        // Another call may have dialled while this one found the connection broken.
        if let Some(sender) = open.clone()
            && let Ok(ready) = sender.ready().await
        {
            return Ok(ready);
        }
        let tcp = TcpStream::connect(&self.to).await.map_err(|e| format!("cannot reach {}: {e}", self.to))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {}: {e}", self.to))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("relay: upstream connection ended: {e}");
            }
        });
        *open = Some(sender.clone());
        sender.ready().await.map_err(|e| e.to_string())
    }
}

/// Listens and relays until killed.
pub fn run(args: &RelayArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener =
            TcpListener::bind(args.listen).await.with_context(|| format!("bind {}", args.listen))?;
        let addr = listener.local_addr()?;
        if let Some(path) = &args.addr_file {
            std::fs::write(path, serde_json::json!({ "grpc_addr": addr.to_string() }).to_string())
                .with_context(|| format!("write --addr-file {}", path.display()))?;
        }
        println!("relay listening on {addr}, passing calls to {}", args.to);
        let upstream = Arc::new(Upstream { to: args.to.clone(), open: tokio::sync::Mutex::new(None) });
        loop {
            let (socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(socket, upstream).await {
                    eprintln!("relay: client connection ended: {e}");
                }
            });
        }
    })
}

async fn serve(socket: TcpStream, upstream: Arc<Upstream>) -> Result<(), h2::Error> {
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(socket)
        .await?;
    while let Some(accepted) = connection.accept().await {
        let (request, respond) = accepted?;
        tokio::spawn(relay_call(upstream.clone(), request, respond));
    }
    Ok(())
}

/// One call, passed on; a failure is answered as a gRPC status naming it.
async fn relay_call(
    upstream: Arc<Upstream>,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if let Err(message) = pass(&upstream, request, &mut respond).await {
        let mut response = http::Response::new(());
        let headers = response.headers_mut();
        headers.insert("content-type", http::HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        if let Ok(value) = http::HeaderValue::from_str(&message.replace(['\r', '\n'], " ")) {
            headers.insert("grpc-message", value);
        }
        // The client may be gone; nothing is left to tell it then.
        let _ = respond.send_response(response, true);
    }
}

async fn pass(
    upstream: &Upstream,
    request: http::Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
) -> Result<(), String> {
    let (parts, body) = request.into_parts();
    let (message, _) = read_whole(body, MAX_BODY).await.map_err(|e| format!("the client: {e}"))?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut onward = http::Request::post(format!("http://{}{path}", upstream.to))
        .body(())
        .map_err(|e| format!("bad path {path}: {e}"))?;
    *onward.headers_mut() = parts.headers;
    let mut sender = upstream.sender().await?;
    // Headers and message queued together: the connection task writes them in one go.
    let (answer, mut send) = sender.send_request(onward, false).map_err(|e| format!("call failed: {e}"))?;
    send.send_data(message, true).map_err(|e| format!("call failed: {e}"))?;
    let answer = answer.await.map_err(|e| format!("call failed: {e}"))?;
    let (head, body) = answer.into_parts();
    let (message, trailers) = read_whole(body, MAX_BODY).await.map_err(|e| format!("the server: {e}"))?;
    let mut back = http::Response::new(());
    *back.status_mut() = head.status;
    *back.headers_mut() = head.headers;
    let end_now = message.is_empty() && trailers.is_none();
    let mut stream = respond.send_response(back, end_now).map_err(|e| format!("answer failed: {e}"))?;
    if end_now {
        return Ok(());
    }
    stream.send_data(message, trailers.is_none()).map_err(|e| format!("answer failed: {e}"))?;
    if let Some(trailers) = trailers {
        stream.send_trailers(trailers).map_err(|e| format!("answer failed: {e}"))?;
    }
    Ok(())
}
