use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use super::*;
use crate::api::read_whole;

type Handler = Arc<dyn Fn(Request<Body>) -> BoxFuture<'static, Response<Body>> + Send + Sync>;

/// A service answering every call with `handler`.
#[derive(Clone)]
struct Fixed(Handler);

impl Service<Request<Body>> for Fixed {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let answered = (self.0)(request);
        Box::pin(async move { Ok(answered.await) })
    }
}

/// `service` served on a loopback port: the address, the stop token and the server's task.
async fn served<S>(service: S) -> (String, CancellationToken, tokio::task::JoinHandle<()>)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = TcpListenerStream::new(listener).map(|accepted| accepted.map(GrpcIo::Plain));
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(incoming, service, stop.clone()));
    (addr, stop, server)
}

/// A raw HTTP/2 client to `addr` whose windows are `window` bytes, so a test decides when it reads.
async fn client(addr: &str, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window.max(65_535))
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.ready().await.unwrap()
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Sends `request` with one empty message: the answer to come, and the request's stream (to reset it).
fn send(
    client: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
) -> (h2::client::ResponseFuture, SendStream<Bytes>) {
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    (response, body)
}

fn grpc_ok(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
    response
}

/// A body of `frames`, each `size` bytes, then OK trailers; `made` counts the frames produced so far.
fn counted_body(frames: usize, size: usize, made: Arc<AtomicUsize>) -> Body {
    let stream = futures::stream::iter(0..=frames).map(move |i| {
        if i == frames {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            return Ok::<_, Status>(Frame::trailers(trailers));
        }
        made.fetch_add(1, Ordering::SeqCst);
        Ok(Frame::data(Bytes::from(vec![u8::try_from(i % 251).unwrap(); size])))
    });
    Body::new(http_body_util::StreamBody::new(stream))
}

/// Bidirectional streaming through a generated client and server (reflection): several requests on one
/// stream, each answered in turn, the stream closed by the client.
#[tokio::test]
async fn a_real_client_streams_both_ways_through_the_server() {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(densemesh_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .unwrap();
    let (addr, stop, server) = served(tonic::service::Routes::new(reflection).prepare()).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let asks = [
        MessageRequest::FileContainingSymbol("inference.GRPCInferenceService".to_owned()),
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("mmesh.ModelMesh".to_owned()),
    ]
    .map(|ask| ServerReflectionRequest { host: String::new(), message_request: Some(ask) });
    let mut answers = client.server_reflection_info(futures::stream::iter(asks)).await.unwrap().into_inner();
    let mut kinds = Vec::new();
    while let Some(answer) = answers.message().await.unwrap() {
        kinds.push(match answer.message_response.unwrap() {
            MessageResponse::FileDescriptorResponse(files) => {
                format!("files:{}", !files.file_descriptor_proto.is_empty())
            }
            MessageResponse::ListServicesResponse(list) => format!("services:{}", !list.service.is_empty()),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(kinds, ["files:true", "services:true", "files:true"]);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
}

/// A path no service serves gets UNIMPLEMENTED from tonic's routes, as before.
#[tokio::test]
async fn an_unknown_method_is_unimplemented() {
    let reflection = tonic_reflection::server::Builder::configure().build_v1().unwrap();
    let (addr, _stop, _server) = served(tonic::service::Routes::new(reflection).prepare()).await;
    let mut client = client(&addr, 65_535).await;
    let (response, _body) = send(&mut client, grpc_request("/no.Such/Method"));
    // tonic's routes answer with headers alone (a trailers-only answer).
    let response = response.await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "12");
    assert!(response.body().is_end_stream());
}

/// A client that resets its stream drops the call's future: the work it was waiting on stops.
#[tokio::test]
async fn a_reset_stream_drops_its_call() {
    let dropped = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let (d, s) = (dropped.clone(), started.clone());
    let service = Fixed(Arc::new(move |_| {
        struct Dropped(Arc<Notify>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.notify_one();
            }
        }
        let guard = Dropped(d.clone());
        let started = s.clone();
        Box::pin(async move {
            let _guard = guard;
            started.notify_one();
            std::future::pending::<Response<Body>>().await
        })
    }));
    let (addr, _stop, _server) = served(service).await;
    let mut client = client(&addr, 65_535).await;
    let (_response, mut body) = send(&mut client, grpc_request("/a.B/C"));
    tokio::time::timeout(Duration::from_secs(10), started.notified()).await.unwrap();
    body.send_reset(Reason::CANCEL);
    tokio::time::timeout(Duration::from_secs(10), dropped.notified())
        .await
        .expect("the call was not dropped");
}

/// `grpc-timeout` ends a call that takes longer with CANCELLED, "Timeout expired", as tonic's server did.
#[tokio::test]
async fn grpc_timeout_cancels_a_slow_call() {
    let service = Fixed(Arc::new(|_| Box::pin(std::future::pending::<Response<Body>>())));
    let (addr, _stop, _server) = served(service).await;
    let mut client = client(&addr, 65_535).await;
    let mut request = grpc_request("/a.B/C");
    request.headers_mut().insert("grpc-timeout", http::HeaderValue::from_static("50m"));
    let (response, _body) = send(&mut client, request);
    let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
    assert_eq!(response.headers()["grpc-status"], "1");
    assert_eq!(response.headers()["grpc-message"], "Timeout%20expired");
}

#[test]
fn grpc_timeout_reads_every_unit_and_ignores_what_is_not_one() {
    let parsed = |value: &'static str| {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", http::HeaderValue::from_static(value));
        grpc_timeout(&headers)
    };
    assert_eq!(parsed("2H"), Some(Duration::from_secs(7200)));
    assert_eq!(parsed("3M"), Some(Duration::from_secs(180)));
    assert_eq!(parsed("4S"), Some(Duration::from_secs(4)));
    assert_eq!(parsed("5m"), Some(Duration::from_millis(5)));
    assert_eq!(parsed("6u"), Some(Duration::from_micros(6)));
    assert_eq!(parsed("99999999n"), Some(Duration::from_nanos(99_999_999)));
    for bad in ["", "S", "1", "123456789S", "1x", "-1S", "1.5S", "１S"] {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", http::HeaderValue::from_str(bad).unwrap());
        assert_eq!(grpc_timeout(&headers), None, "{bad:?}");
    }
    assert_eq!(grpc_timeout(&HeaderMap::new()), None);
}

/// A client that reads nothing holds back a streamed answer: the server queues a message at a time, not
/// the whole stream. Once the client reads, every byte arrives, in order, with the trailers.
#[tokio::test]
async fn a_client_that_does_not_read_holds_back_a_stream() {
    const FRAMES: usize = 64;
    const SIZE: usize = 64 << 10;
    let made = Arc::new(AtomicUsize::new(0));
    let m = made.clone();
    let service = Fixed(Arc::new(move |_| {
        let body = counted_body(FRAMES, SIZE, m.clone());
        Box::pin(async move { grpc_ok(body) })
    }));
    let (addr, _stop, _server) = served(service).await;
    let mut client = client(&addr, 65_535).await;
    let (response, _body) = send(&mut client, grpc_request("/a.B/C"));
    let response = response.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = made.load(Ordering::SeqCst);
    assert!(held <= 3, "{held} of {FRAMES} messages made while the client read nothing");
    let (message, trailers) = read_whole(response.into_body(), FRAMES * SIZE).await.unwrap();
    assert_eq!(message.len(), FRAMES * SIZE);
    for (i, chunk) in message.chunks(SIZE).enumerate() {
        assert!(chunk.iter().all(|&b| usize::from(b) == i % 251), "message {i}");
    }
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
}

/// Shutdown lets a call in flight finish, then the server returns.
#[tokio::test]
async fn shutdown_finishes_calls_in_flight() {
    let [release, started] = [(); 2].map(|()| Arc::new(Notify::new()));
    let gates = (release.clone(), started.clone());
    let service = Fixed(Arc::new(move |_| {
        let (release, started) = gates.clone();
        Box::pin(async move {
            started.notify_one();
            release.notified().await;
            let made = Arc::new(AtomicUsize::new(0));
            grpc_ok(counted_body(1, 10, made))
        })
    }));
    let (addr, stop, server) = served(service).await;
    let mut client = client(&addr, 65_535).await;
    let (response, _body) = send(&mut client, grpc_request("/a.B/C"));
    tokio::time::timeout(Duration::from_secs(10), started.notified()).await.unwrap();
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!server.is_finished(), "the server returned with a call in flight");
    release.notify_one();
    let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
    let (message, trailers) = read_whole(response.into_body(), 1 << 20).await.unwrap();
    assert_eq!(message.len(), 10);
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("the server did not return").unwrap();
}

/// A request body far beyond the 1 MiB windows, sent in frames as a client-streaming call would: the
/// window is given back as the service reads, so all of it arrives.
#[tokio::test]
async fn a_request_beyond_the_window_arrives_whole() {
    const FRAME: usize = 64 << 10;
    const FRAMES: usize = 48;
    let service = Fixed(Arc::new(|request: Request<Body>| {
        Box::pin(async move {
            let body = http_body_util::BodyExt::collect(request.into_body()).await.unwrap().to_bytes();
            let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
            let mut answer = grpc_ok(Body::empty());
            answer.headers_mut().insert("x-len", body.len().into());
            answer.headers_mut().insert("x-sum", sum.into());
            answer
        })
    }));
    let (addr, _stop, _server) = served(service).await;
    let mut client = client(&addr, 65_535).await;
    let (response, mut body) = client.send_request(grpc_request("/a.B/C"), false).unwrap();
    let mut sum = 0u64;
    let sent = async {
        for i in 0..FRAMES {
            let frame = vec![u8::try_from(i).unwrap(); FRAME];
            sum += u64::try_from(i * FRAME).unwrap();
            body.reserve_capacity(FRAME);
            while body.capacity() < FRAME {
                poll_fn(|cx| body.poll_capacity(cx)).await.unwrap().unwrap();
            }
            body.send_data(Bytes::from(frame), i + 1 == FRAMES).unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), sent).await.expect("the server's window stayed shut");
    let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
    assert_eq!(response.headers()["x-len"], (FRAMES * FRAME).to_string());
    assert_eq!(response.headers()["x-sum"], sum.to_string());
}

/// An answer carrying headers HTTP/2 forbids (connection-specific ones, `te`) is sent without them, not
/// refused.
#[tokio::test]
async fn connection_headers_are_left_out_of_an_answer() {
    let service = Fixed(Arc::new(|_| {
        Box::pin(async move {
            let mut answer = grpc_ok(Body::empty());
            let headers = answer.headers_mut();
            headers.insert("connection", http::HeaderValue::from_static("keep-alive"));
            headers.insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
            headers.insert("te", http::HeaderValue::from_static("trailers"));
            headers.insert("grpc-status", http::HeaderValue::from_static("0"));
            answer
        })
    }));
    let (addr, _stop, _server) = served(service).await;
    let mut client = client(&addr, 65_535).await;
    let (response, _body) = send(&mut client, grpc_request("/a.B/C"));
    let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
    assert_eq!(response.headers()["grpc-status"], "0");
    for name in ["connection", "keep-alive", "te"] {
        assert!(!response.headers().contains_key(name), "{name}");
    }
}
