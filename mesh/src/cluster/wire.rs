//! The pod wire: how one pod passes a `ModelInfer` call to another, leaner than HTTP/2.
//!
//! A forwarded hop through tonic cost a tower buffer task, an HTTP/2 client connection task and
//! HPACK on this pod, and an HTTP/2 server connection and stream task on the peer: about twice what
//! the hop's own work costs. Here a call is one length-prefixed frame written straight from the
//! calling task, answered by one frame that the connection's reader hands back through a oneshot.
//!
//! It shares the gRPC port: a connection whose first byte is [`MAGIC`]'s is the wire, anything else
//! goes on to the gRPC server ([`incoming`]). A pod says in its instance record that it speaks the
//! wire ([`VERSION`]); a pod that does not is reached over HTTP/2 as before.
//!
//! Framing (integers big-endian): after the 8-byte [`MAGIC`] each way, every frame is
//! `u32 length | u64 call id | head | body`, the length counting what follows it. A call's head is
//! its path and headers; an answer's is the HTTP status, headers and trailers. Headers are
//! `u16 count`, then `u16 name length | name | u32 value length | value` each. The body is the gRPC
//! message as it was framed on HTTP/2, so neither side decodes the request.
//!
//! A frame over the limit (`--max-message-size` plus [`HEAD_ALLOWANCE`]) is skipped, not read, and
//! that call alone fails; a frame that cannot be decoded ends the connection, and its calls fail as a
//! failed peer's do (UNAVAILABLE), to be retried on another pod.
//!
//! With TLS (`--tls-*`) the TLS handshake comes first and the first decrypted byte is sniffed. A TLS
//! stream encrypts into its own buffers and cannot be written without waiting, so there every frame
//! goes through the connection's flush task; on plain TCP the sending task writes as above.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::cluster::forward::{FRAME_HEADER, MODEL_INFER_PATH};
use crate::tls::stream::{GrpcIo, Replayed};

/// The first bytes of a wire connection, each way. The first byte is neither HTTP/2's preface (`P`)
/// nor a TLS handshake (0x16), so one byte tells a wire connection from a gRPC one.
pub const MAGIC: [u8; 8] = [0xD3, b'D', b'M', b'W', b'I', b'R', b'E', b'1'];

/// The wire version a pod publishes in its instance record; 0 (older pods) means HTTP/2 only.
pub const VERSION: u32 = 1;

/// Room in a frame for its path and headers beyond the gRPC message.
pub const HEAD_ALLOWANCE: usize = 64 * 1024;

/// How long a new connection may take to connect and say it is the wire.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long what this pod sent a peer may go unacknowledged before the connection counts as dead.
/// A peer cut off silently (a partition, a node gone) never resets the connection, and a call waits
/// for its answer as long as a load may take there (`--load-timeout` + 5 s): without this limit every
/// call to that peer would wait that long before failing over (docs/faults.md, partitions).
pub const PEER_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an accepted connection may stay silent before it is handed to the gRPC server, which
/// has its own rules for idle clients.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunks written in one system call at most.
const MAX_SLICES: usize = 64;

/// A TLS stream the wire runs on, client or server side.
pub trait TlsIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> TlsIo for T {}

/// The connection a wire runs on: plain TCP, whose halves are written without waiting, or TLS.
enum WireStream {
    Tcp(TcpStream),
    Tls(Box<dyn TlsIo>),
}

impl WireStream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.write_all(bytes).await,
            Self::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    async fn read_exact(&mut self, bytes: &mut [u8]) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.read_exact(bytes).await.map(drop),
            Self::Tls(s) => s.read_exact(bytes).await.map(drop),
        }
    }

    fn split(self) -> (ReadSide, WriteSide) {
        match self {
            Self::Tcp(s) => {
                let (read, write) = s.into_split();
                (ReadSide::Tcp(read), WriteSide::Tcp(write))
            }
            Self::Tls(s) => {
                let (read, write) = tokio::io::split(s);
                (ReadSide::Tls(read), WriteSide::Tls(tokio::sync::Mutex::new(write)))
            }
        }
    }
}

enum ReadSide {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<Box<dyn TlsIo>>),
}

impl ReadSide {
    async fn read_buf(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        match self {
            Self::Tcp(half) => half.read_buf(buffer).await,
            Self::Tls(half) => half.read_buf(buffer).await,
        }
    }
}

enum WriteSide {
    Tcp(OwnedWriteHalf),
    /// Written only by the flush task; the lock is never contended.
    Tls(tokio::sync::Mutex<WriteHalf<Box<dyn TlsIo>>>),
}

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// A call as the wire carries it.
#[derive(Debug)]
struct Call {
    id: u64,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// An answer as the wire carries it: an HTTP response read whole.
#[derive(Debug)]
pub struct Answer {
    id: u64,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub trailers: Option<HeaderMap>,
    pub body: Bytes,
}

fn put_headers(head: &mut BytesMut, headers: &HeaderMap) -> Result<(), &'static str> {
    let count = u16::try_from(headers.len()).map_err(|_| "more than 65535 headers")?;
    head.put_u16(count);
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        head.put_u16(u16::try_from(name.len()).map_err(|_| "a header name over 65535 bytes")?);
        head.put_slice(name);
        head.put_u32(u32::try_from(value.len()).map_err(|_| "a header value over 4 GiB")?);
        head.put_slice(value.as_bytes());
    }
    Ok(())
}

fn take(frame: &mut Bytes, n: usize) -> Result<Bytes, FrameError> {
    if frame.remaining() < n {
        return Err(FrameError::Malformed("cut short"));
    }
    Ok(frame.split_to(n))
}

fn get_u16(frame: &mut Bytes) -> Result<u16, FrameError> {
    if frame.remaining() < 2 {
        return Err(FrameError::Malformed("cut short"));
    }
    Ok(frame.get_u16())
}

fn get_u32(frame: &mut Bytes) -> Result<u32, FrameError> {
    if frame.remaining() < 4 {
        return Err(FrameError::Malformed("cut short"));
    }
    Ok(frame.get_u32())
}

fn get_u64(frame: &mut Bytes) -> Result<u64, FrameError> {
    if frame.remaining() < 8 {
        return Err(FrameError::Malformed("cut short"));
    }
    Ok(frame.get_u64())
}

fn get_headers(frame: &mut Bytes) -> Result<HeaderMap, FrameError> {
    let count = get_u16(frame)? as usize;
    // The count is the peer's word: a map holds at most 32768 names, and `with_capacity` or `append`
    // past that panics, so the count only sizes a small first allocation and every append is checked.
    let mut headers = HeaderMap::with_capacity(count.min(64));
    for _ in 0..count {
        let len = get_u16(frame)? as usize;
        let name = HeaderName::from_bytes(&take(frame, len)?)
            .map_err(|_| FrameError::Malformed("a header name that is not one"))?;
        let len = get_u32(frame)? as usize;
        let value = HeaderValue::from_maybe_shared(take(frame, len)?)
            .map_err(|_| FrameError::Malformed("a header value that is not one"))?;
        headers
            .try_append(name, value)
            .map_err(|_| FrameError::Malformed("more headers than a map holds"))?;
    }
    Ok(headers)
}

/// A frame's length field and id, with `head` after them, and `body`: the chunks to write.
fn frame(id: u64, head: BytesMut, body: Bytes) -> Result<[Bytes; 2], &'static str> {
    let length = u32::try_from(8 + head.len() + body.len()).map_err(|_| "a frame over 4 GiB")?;
    let mut start = BytesMut::with_capacity(12 + head.len());
    start.put_u32(length);
    start.put_u64(id);
    start.extend_from_slice(&head);
    Ok([start.freeze(), body])
}

fn encode_call(id: u64, path: &str, headers: &HeaderMap, body: Bytes) -> Result<[Bytes; 2], &'static str> {
    let mut head = BytesMut::with_capacity(256);
    head.put_u16(u16::try_from(path.len()).map_err(|_| "a path over 65535 bytes")?);
    head.put_slice(path.as_bytes());
    put_headers(&mut head, headers)?;
    frame(id, head, body)
}

fn decode_call(mut frame: Bytes) -> Result<Call, FrameError> {
    let id = get_u64(&mut frame)?;
    let len = get_u16(&mut frame)? as usize;
    let path = String::from_utf8(take(&mut frame, len)?.to_vec())
        .map_err(|_| FrameError::Malformed("a path that is not UTF-8"))?;
    let headers = get_headers(&mut frame)?;
    Ok(Call { id, path, headers, body: frame })
}

fn encode_answer(answer: Answer) -> Result<[Bytes; 2], &'static str> {
    let mut head = BytesMut::with_capacity(128);
    head.put_u16(answer.status.as_u16());
    put_headers(&mut head, &answer.headers)?;
    match &answer.trailers {
        Some(trailers) => {
            head.put_u8(1);
            put_headers(&mut head, trailers)?;
        }
        None => head.put_u8(0),
    }
    frame(answer.id, head, answer.body)
}

fn decode_answer(mut frame: Bytes) -> Result<Answer, FrameError> {
    let id = get_u64(&mut frame)?;
    let status = StatusCode::from_u16(get_u16(&mut frame)?)
        .map_err(|_| FrameError::Malformed("an HTTP status that is not one"))?;
    let headers = get_headers(&mut frame)?;
    let trailers = match take(&mut frame, 1)?[0] {
        0 => None,
        1 => Some(get_headers(&mut frame)?),
        _ => return Err(FrameError::Malformed("a trailers flag that is neither 0 nor 1")),
    };
    Ok(Answer { id, status, headers, trailers, body: frame })
}

/// An answer carrying only an error status, as gRPC sends one (trailers-only).
fn status_answer(id: u64, status: &Status) -> Answer {
    let (head, ()) = status.clone().into_http::<()>().into_parts();
    Answer { id, status: head.status, headers: head.headers, trailers: None, body: Bytes::new() }
}

/// What the reader found next.
enum Frame {
    /// A whole frame, after its length field.
    Whole(Bytes),
    /// A frame over the limit, skipped: only its id was read.
    TooLarge { id: u64, length: usize },
}

/// Reads frames off one connection.
struct FrameReader {
    half: ReadSide,
    buffer: BytesMut,
    limit: usize,
}

impl FrameReader {
    fn new(half: ReadSide, limit: usize) -> Self {
        Self { half, buffer: BytesMut::with_capacity(16 * 1024), limit }
    }

    /// Reads until `n` bytes are buffered. `Ok(false)`: the peer closed the connection before any.
    async fn fill(&mut self, n: usize) -> Result<bool, FrameError> {
        while self.buffer.len() < n {
            self.buffer.reserve(n - self.buffer.len());
            if self.half.read_buf(&mut self.buffer).await? == 0 {
                if self.buffer.is_empty() {
                    return Ok(false);
                }
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
        Ok(true)
    }

    /// The next frame; `None` when the peer closed the connection between frames.
    async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        if !self.fill(4).await? {
            return Ok(None);
        }
        let length =
            u32::from_be_bytes([self.buffer[0], self.buffer[1], self.buffer[2], self.buffer[3]]) as usize;
        if length < 8 {
            return Err(FrameError::Malformed("a frame shorter than its id"));
        }
        if length > self.limit {
            self.fill(12).await?;
            self.buffer.advance(4);
            let id = self.buffer.get_u64();
            let mut left = length - 8;
            while left > 0 {
                if self.buffer.is_empty() && self.half.read_buf(&mut self.buffer).await? == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
                let n = left.min(self.buffer.len());
                self.buffer.advance(n);
                left -= n;
            }
            return Ok(Some(Frame::TooLarge { id, length }));
        }
        self.fill(4 + length).await?;
        self.buffer.advance(4);
        Ok(Some(Frame::Whole(self.buffer.split_to(length).freeze())))
    }
}

/// The writing side of one connection. A frame is written by the task that sends it when nothing
/// is queued before it (no hand-off to another task, the usual case); what the socket does not take
/// at once is queued, in order, for a flush task. Writing never waits while a frame is half
/// written, so a caller that gives up cannot leave half a frame on the connection.
struct Writer {
    half: WriteSide,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Bytes>,
    /// A flush task owns the queue: new frames go behind what it has to write.
    flushing: bool,
    /// Why the connection cannot be written to any more.
    broken: Option<String>,
}

impl Writer {
    fn new(half: WriteSide) -> Arc<Self> {
        Arc::new(Self { half, queue: Mutex::default() })
    }

    /// Sends one frame's chunks, in order after every frame sent before.
    fn send(self: &Arc<Self>, chunks: [Bytes; 2]) -> Result<(), String> {
        let mut queue = self.queue.lock();
        if let Some(reason) = &queue.broken {
            return Err(reason.clone());
        }
        queue.chunks.extend(chunks.into_iter().filter(|c| !c.is_empty()));
        if queue.flushing {
            return Ok(());
        }
        let WriteSide::Tcp(half) = &self.half else {
            queue.flushing = true;
            let writer = self.clone();
            tokio::spawn(async move { writer.flush().await }.in_current_span());
            return Ok(());
        };
        match write_some(half, &mut queue.chunks) {
            Ok(()) if queue.chunks.is_empty() => Ok(()),
            Ok(()) => {
                queue.flushing = true;
                let writer = self.clone();
                tokio::spawn(async move { writer.flush().await }.in_current_span());
                Ok(())
            }
            Err(e) => {
                let reason = format!("writing failed: {e}");
                queue.chunks.clear();
                queue.broken = Some(reason.clone());
                Err(reason)
            }
        }
    }

    /// Writes the queue out as the socket takes it, then gives the queue back to senders.
    async fn flush(self: Arc<Self>) {
        let half = match &self.half {
            WriteSide::Tcp(half) => half,
            WriteSide::Tls(half) => return self.flush_tls(half).await,
        };
        loop {
            if let Err(e) = half.writable().await {
                self.break_off(format!("writing failed: {e}"));
                return;
            }
            let mut queue = self.queue.lock();
            match write_some(half, &mut queue.chunks) {
                Ok(()) if queue.chunks.is_empty() => {
                    queue.flushing = false;
                    return;
                }
                Ok(()) => {}
                Err(e) => {
                    queue.chunks.clear();
                    queue.broken = Some(format!("writing failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Writes what is queued through TLS, waiting as it must, until the queue is empty.
    async fn flush_tls(&self, half: &tokio::sync::Mutex<WriteHalf<Box<dyn TlsIo>>>) {
        let mut half = half.lock().await;
        loop {
            let mut chunks = {
                let mut queue = self.queue.lock();
                if queue.chunks.is_empty() || queue.broken.is_some() {
                    queue.flushing = false;
                    return;
                }
                std::mem::take(&mut queue.chunks)
            };
            let written = async {
                while !chunks.is_empty() {
                    let slices: Vec<IoSlice<'_>> =
                        chunks.iter().take(MAX_SLICES).map(|c| IoSlice::new(c)).collect();
                    let written = half.write_vectored(&slices).await?;
                    if written == 0 {
                        return Err(io::Error::from(io::ErrorKind::WriteZero));
                    }
                    consume(&mut chunks, written);
                }
                half.flush().await
            };
            if let Err(e) = written.await {
                self.break_off(format!("writing failed: {e}"));
                return;
            }
        }
    }

    fn break_off(&self, reason: String) {
        let mut queue = self.queue.lock();
        queue.chunks.clear();
        queue.broken = Some(reason);
    }

    fn is_broken(&self) -> bool {
        self.queue.lock().broken.is_some()
    }
}

/// Writes what the socket takes now, without waiting, dropping the bytes written from `chunks`.
fn write_some(half: &OwnedWriteHalf, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !chunks.is_empty() {
        let slices: Vec<IoSlice<'_>> = chunks.iter().take(MAX_SLICES).map(|c| IoSlice::new(c)).collect();
        let written = match half.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        consume(chunks, written);
    }
    Ok(())
}

/// Drops the first `written` bytes from `chunks`.
fn consume(chunks: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let Some(first) = chunks.front_mut() else { break };
        if written >= first.len() {
            written -= first.len();
            chunks.pop_front();
        } else {
            first.advance(written);
            written = 0;
        }
    }
}

/// Calls waiting for their answers on one connection.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Result<Answer, String>>>,
    /// Why no more answers will come.
    closed: Option<String>,
}

/// One open connection to a peer.
struct Connection {
    writer: Arc<Writer>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    /// Stops the reader when the last user lets the connection go.
    _reader: DropGuard,
}

impl Connection {
    async fn open(endpoint: &str, limit: usize, tls: Option<&Arc<rustls::ClientConfig>>) -> io::Result<Self> {
        let handshake = async {
            let tcp = TcpStream::connect(endpoint).await?;
            tcp.set_nodelay(true)?;
            socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(PEER_ACK_TIMEOUT))?;
            let mut stream = match tls {
                None => WireStream::Tcp(tcp),
                Some(config) => {
                    let name = crate::tls::peer_server_name(endpoint).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "the endpoint names no host to verify")
                    })?;
                    let connector = tokio_rustls::TlsConnector::from(config.clone());
                    WireStream::Tls(Box::new(connector.connect(name, tcp).await?))
                }
            };
            stream.write_all(&MAGIC).await?;
            let mut ack = [0u8; MAGIC.len()];
            stream.read_exact(&mut ack).await?;
            if ack != MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the peer does not speak the pod wire",
                ));
            }
            Ok(stream)
        };
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the handshake timed out"))??;
        let (read, write) = stream.split();
        let pending = Arc::new(Mutex::new(Pending::default()));
        let stop = CancellationToken::new();
        let reader =
            read_answers(FrameReader::new(read, limit + FRAME_HEADER + HEAD_ALLOWANCE), pending.clone());
        let until = stop.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = until.cancelled() => {}
                    () = reader => {}
                }
            }
            .instrument(tracing::debug_span!("pod wire", peer = %endpoint)),
        );
        Ok(Self {
            writer: Writer::new(write),
            pending,
            next_id: AtomicU64::new(0),
            _reader: stop.drop_guard(),
        })
    }

    fn is_open(&self) -> bool {
        self.pending.lock().closed.is_none() && !self.writer.is_broken()
    }

    async fn call(&self, path: &str, headers: &HeaderMap, body: Bytes) -> Result<Answer, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame =
            encode_call(id, path, headers, body).map_err(|e| format!("the call cannot be sent: {e}"))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock();
            if let Some(reason) = &pending.closed {
                return Err(reason.clone());
            }
            pending.waiting.insert(id, tx);
        }
        // A caller that gives up stops waiting; its answer, if it comes, is dropped.
        let _forget = Forget { pending: &self.pending, id };
        self.writer.send(frame)?;
        rx.await.unwrap_or_else(|_| Err("the connection closed".to_owned()))
    }
}

/// Removes a call from the waiting list when its caller stops waiting.
struct Forget<'a> {
    pending: &'a Mutex<Pending>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.pending.lock().waiting.remove(&self.id);
    }
}

/// Hands each answer to its caller until the connection ends, then fails the calls still waiting.
async fn read_answers(mut reader: FrameReader, pending: Arc<Mutex<Pending>>) {
    let reason = loop {
        match reader.next().await {
            // docs/faults.md: the peer resets the connection while this answer is on its way.
            #[cfg(feature = "failpoints")]
            Ok(Some(Frame::Whole(_))) if fail::eval("wire.answer_reset", |_| ()).is_some() => {
                break "reading failed: connection reset by peer (fail point wire.answer_reset)".to_owned();
            }
            Ok(Some(Frame::Whole(frame))) => match decode_answer(frame) {
                Ok(answer) => {
                    if let Some(tx) = pending.lock().waiting.remove(&answer.id) {
                        let _ = tx.send(Ok(answer));
                    }
                }
                Err(e) => break e.to_string(),
            },
            Ok(Some(Frame::TooLarge { id, length })) => {
                if let Some(tx) = pending.lock().waiting.remove(&id) {
                    let _ = tx.send(Err(format!(
                        "its answer ({length} bytes) is over this pod's limit (--max-message-size)"
                    )));
                }
            }
            Ok(None) => break "the peer closed the connection".to_owned(),
            Err(e) => break format!("reading failed: {e}"),
        }
    };
    tracing::debug!(reason = %reason, "pod wire connection ended");
    let mut pending = pending.lock();
    for (_, tx) in pending.waiting.drain() {
        let _ = tx.send(Err(reason.clone()));
    }
    pending.closed = Some(reason);
}

/// The wire to one peer: one connection, opened on first use and again after it fails.
pub struct WirePeer {
    endpoint: String,
    limit: usize,
    timeout: Duration,
    /// TLS to the peer (`--tls-*`), verified against the mesh's CA.
    tls: Option<Arc<rustls::ClientConfig>>,
    current: Mutex<Option<Arc<Connection>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl WirePeer {
    /// The wire to the pod at `endpoint`, for messages of at most `max_message_size` each way, whose
    /// calls give up after `timeout`.
    pub fn new(endpoint: &str, max_message_size: usize, timeout: Duration) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            limit: max_message_size,
            timeout,
            tls: None,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Connects over TLS with `config` (no ALPN: the first byte says it is the wire).
    pub fn with_tls(mut self, config: Option<Arc<rustls::ClientConfig>>) -> Self {
        self.tls = config;
        self
    }

    fn open_connection(&self) -> Option<Arc<Connection>> {
        self.current.lock().as_ref().filter(|c| c.is_open()).cloned()
    }

    /// Whether a connection is open, for tests.
    #[cfg(test)]
    pub fn connected(&self) -> bool {
        self.open_connection().is_some()
    }

    async fn connection(&self) -> Result<Arc<Connection>, String> {
        if let Some(open) = self.open_connection() {
            return Ok(open);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(open) = self.open_connection() {
            return Ok(open);
        }
        let connection = Arc::new(
            Connection::open(&self.endpoint, self.limit, self.tls.as_ref())
                .await
                .map_err(|e| format!("cannot connect: {e}"))?,
        );
        tracing::info!(peer = %self.endpoint, "pod wire connected");
        *self.current.lock() = Some(connection.clone());
        Ok(connection)
    }

    /// One call, answered within the timeout. Any failure of the connection or the peer is
    /// UNAVAILABLE (DEADLINE_EXCEEDED for the timeout), so the forwarder tries another pod.
    pub async fn call(&self, path: &str, headers: &HeaderMap, body: Bytes) -> Result<Answer, Status> {
        let timeout = self.timeout;
        let call = async {
            let connection = self.connection().await?;
            connection.call(path, headers, body).await
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(reason)) => {
                Err(Status::unavailable(format!("peer {} (pod wire): {reason}", self.endpoint)))
            }
            Err(_) => Err(Status::deadline_exceeded(format!(
                "peer {} (pod wire) did not answer within {timeout:?}",
                self.endpoint
            ))),
        }
    }
}

/// Serves wire connections with `service` (the gRPC front's `ModelInfer`).
#[derive(Clone)]
pub struct WireServer<S> {
    service: S,
    limit: usize,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// TLS on the port (`--tls-*`): every connection, gRPC's and the wire's, does the handshake first.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl<S> WireServer<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Serves until `stop`; `tasks` owns every task it starts, so shutdown can wait for them.
    pub fn new(service: S, max_message_size: usize, stop: CancellationToken, tasks: TaskTracker) -> Self {
        Self { service, limit: max_message_size, stop, tasks, tls: None }
    }

    /// Takes only TLS connections, with `config` (ALPN h2 for gRPC clients).
    pub fn with_tls(mut self, config: Option<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = config.map(tokio_rustls::TlsAcceptor::from);
        self
    }

    /// Serves one connection whose first byte was [`MAGIC`]'s: reads calls until the peer closes it
    /// or the server stops, each served in a task of its own; the connection closes once the last
    /// answer is written.
    async fn serve(self, mut stream: WireStream) {
        let mut magic = [0u8; MAGIC.len()];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut magic)).await {
            Ok(Ok(_)) if magic == MAGIC => {}
            _ => {
                tracing::debug!("closed a connection that began like the pod wire but is not");
                return;
            }
        }
        if stream.write_all(&MAGIC).await.is_err() {
            return;
        }
        let (read, write) = stream.split();
        let writer = Writer::new(write);
        let mut reader = FrameReader::new(read, self.limit + FRAME_HEADER + HEAD_ALLOWANCE);
        loop {
            let next = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                next = reader.next() => next,
            };
            match next {
                Ok(Some(Frame::Whole(frame))) => match decode_call(frame) {
                    Ok(call) => {
                        let (service, writer, limit) = (self.service.clone(), writer.clone(), self.limit);
                        self.tasks.spawn(
                            async move {
                                let answer = answer(service, call, limit).await;
                                send_answer(&writer, answer);
                            }
                            .in_current_span(),
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "closing a pod wire connection that sent a malformed call");
                        break;
                    }
                },
                Ok(Some(Frame::TooLarge { id, length })) => {
                    let limit = self.limit;
                    let refusal = Status::invalid_argument(format!(
                        "request message is too large: {length} bytes, over the limit of {limit} bytes (raise --max-message-size or send less)"
                    ));
                    send_answer(&writer, status_answer(id, &refusal));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "pod wire connection ended");
                    break;
                }
            }
        }
    }
}

fn send_answer(writer: &Arc<Writer>, answer: Answer) {
    let id = answer.id;
    let frame = encode_answer(answer).or_else(|e| {
        encode_answer(status_answer(id, &Status::internal(format!("the answer cannot be sent: {e}"))))
    });
    if let Ok(frame) = frame
        && let Err(reason) = writer.send(frame)
    {
        tracing::debug!(%reason, "could not send an answer over the pod wire");
    }
}

/// Serves one call through `service`, the answer read whole (at most a message of `limit`).
async fn answer<S>(service: S, call: Call, limit: usize) -> Answer
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let id = call.id;
    if call.path != MODEL_INFER_PATH {
        let path = call.path;
        return status_answer(
            id,
            &Status::unimplemented(format!("the pod wire carries only ModelInfer, not {path}")),
        );
    }
    let mut request = Request::new(Body::new(Full::new(call.body)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(MODEL_INFER_PATH);
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = call.headers;
    let response = match service.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (head, body) = response.into_parts();
    match Limited::new(body, limit + FRAME_HEADER).collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            Answer { id, status: head.status, headers: head.headers, trailers, body: collected.to_bytes() }
        }
        Err(e) => status_answer(id, &Status::internal(format!("the answer could not be read: {e}"))),
    }
}

/// The gRPC server's connections from `listener`: each accepted connection's first byte (after the
/// TLS handshake, with TLS) says whether it is the pod wire, served by `wire`, or gRPC, passed on in
/// the stream returned.
pub fn incoming<S>(listener: TcpListener, wire: WireServer<S>) -> ReceiverStream<io::Result<GrpcIo>>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let tasks = wire.tasks.clone();
    tasks.spawn(
        async move {
            loop {
                let accepted = tokio::select! {
                    () = wire.stop.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment rather than spin.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let (tx, wire) = (tx.clone(), wire.clone());
                wire.tasks.clone().spawn(async move {
                    if let Some(acceptor) = wire.tls.clone() {
                        return sniff_tls(stream, acceptor, wire, tx).await;
                    }
                    let mut first = [0u8; 1];
                    let peeked = tokio::time::timeout(SNIFF_TIMEOUT, stream.peek(&mut first)).await;
                    if matches!(peeked, Ok(Ok(1))) && first[0] == MAGIC[0] {
                        wire.serve(WireStream::Tcp(stream)).await;
                    } else {
                        let _ = tx.send(Ok(GrpcIo::Plain(stream))).await;
                    }
                });
            }
        }
        .instrument(tracing::info_span!("accept")),
    );
    ReceiverStream::new(rx)
}

/// One TLS connection: the handshake, then its first decrypted byte (read, and put back for whoever
/// serves it) says whether it is the pod wire or gRPC. A failed handshake (no client certificate, an
/// unknown CA, not TLS at all) closes the connection.
async fn sniff_tls<S>(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    wire: WireServer<S>,
    tx: mpsc::Sender<io::Result<GrpcIo>>,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let peer = stream.peer_addr().ok();
    let mut tls =
        match tokio::time::timeout(crate::tls::stream::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(?peer, error = %e, "grpc: tls handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(?peer, "grpc: tls handshake timed out");
                return;
            }
        };
    let mut first = [0u8; 1];
    let head = match tokio::time::timeout(SNIFF_TIMEOUT, tls.read(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return,
        Ok(Ok(_)) => Some(first[0]),
        // Silent so far: gRPC's server has its own rules for idle clients.
        Err(_) => None,
    };
    let stream = Replayed::new(head, tls);
    if head == Some(MAGIC[0]) {
        wire.serve(WireStream::Tls(Box::new(stream))).await;
    } else {
        let _ = tx.send(Ok(GrpcIo::Tls(Box::new(stream)))).await;
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(test)]
mod tests;
