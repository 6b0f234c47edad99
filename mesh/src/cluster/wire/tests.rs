//! The pod wire against a real listener: calls and answers matched by id under concurrency, frames
//! too large each way, malformed and truncated input, a peer that dies mid-call, callers that give up,
//! and gRPC connections passed through untouched.

use std::future::ready;
use std::sync::atomic::AtomicUsize;

use futures::StreamExt;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::cluster::peers::peer_failed;

const LIMIT: usize = 8 << 20;

/// A gRPC-shaped echo: answers the body it got, with OK in the trailers; `x-fail` answers NOT_FOUND
/// trailers-only, `x-sleep-ms` waits first, `x-big` answers `x-big` bytes.
fn echo(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request<Body>| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let (head, body) = request.into_parts();
            let header =
                |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if let Some(ms) = header("x-sleep-ms") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if head.headers.contains_key("x-fail") {
                return Ok::<_, Infallible>(Status::not_found("no model m here").into_http());
            }
            let mut body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            if let Some(n) = header("x-big") {
                body = Bytes::from(vec![7u8; n as usize]);
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let body = Full::new(body).with_trailers(ready(Some(Ok(trailers))));
            let mut response = Response::new(Body::new(body));
            response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
            Ok(response)
        }
    })
}

/// A listener whose wire connections an echo serves and whose other connections come out of the
/// returned stream; the calls the echo got, and the token that stops it.
async fn serve_echo(limit: usize) -> Served {
    serve_echo_tls(limit, None).await
}

type Served = (String, ReceiverStream<io::Result<GrpcIo>>, Arc<AtomicUsize>, CancellationToken, TaskTracker);

/// [`serve_echo`], over TLS with `tls`.
async fn serve_echo_tls(limit: usize, tls: Option<Arc<rustls::ServerConfig>>) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    let calls = Arc::new(AtomicUsize::new(0));
    let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
    let server = WireServer::new(echo(calls.clone()), limit, stop.clone(), tasks.clone()).with_tls(tls);
    (endpoint, incoming(listener, server), calls, stop, tasks)
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    for (name, value) in pairs {
        headers.append(*name, value.parse().unwrap());
    }
    headers
}

fn grpc_status(answer: &Answer) -> Option<&str> {
    answer
        .headers
        .get("grpc-status")
        .or_else(|| answer.trailers.as_ref()?.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
}

#[test]
fn calls_and_answers_read_back_as_written_and_every_truncation_is_an_error() {
    let mut with_duplicates = headers(&[("mm-model-id", "m"), ("x-k", "a"), ("x-k", "b")]);
    with_duplicates.insert("x-bin", HeaderValue::from_bytes(b"\xfe\x80").unwrap());
    let [start, body] =
        encode_call(7, MODEL_INFER_PATH, &with_duplicates, Bytes::from_static(b"hello")).unwrap();
    let whole = [start, body].concat();
    let call = decode_call(Bytes::copy_from_slice(&whole[4..])).unwrap();
    assert_eq!((call.id, call.path.as_str(), &call.body[..]), (7, MODEL_INFER_PATH, &b"hello"[..]));
    assert_eq!(call.headers, with_duplicates);
    assert_eq!(u32::from_be_bytes(whole[..4].try_into().unwrap()) as usize, whole.len() - 4);

    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    for trailers in [None, Some(trailers)] {
        let answer = Answer {
            id: u64::MAX,
            status: StatusCode::OK,
            headers: headers(&[]),
            trailers: trailers.clone(),
            body: Bytes::from_static(b"world"),
        };
        let whole = encode_answer(answer).unwrap().concat();
        let read = decode_answer(Bytes::copy_from_slice(&whole[4..])).unwrap();
        assert_eq!((read.id, read.status, &read.body[..]), (u64::MAX, StatusCode::OK, &b"world"[..]));
        assert_eq!((read.headers, read.trailers), (headers(&[]), trailers));
    }
    // Cut anywhere inside its head, a frame is an error, never a panic (the body is what is left, so
    // a frame cut inside it reads as a shorter body: the length field is what guards it).
    let whole = encode_call(1, MODEL_INFER_PATH, &with_duplicates, Bytes::new()).unwrap().concat();
    for cut in 4..whole.len() {
        assert!(decode_call(Bytes::copy_from_slice(&whole[4..cut])).is_err(), "cut at {cut}");
    }
    let bad_name = [&0u64.to_be_bytes()[..], &[0, 1, b'/', 0, 1, 0, 1, b' '], &[0, 0, 0, 0]].concat();
    assert!(matches!(decode_call(Bytes::from(bad_name)), Err(FrameError::Malformed(_))));
}

/// Found by fuzzing (fuzz/corpus/wire_frame/crash-*): a header count is the peer's word, and a map
/// asked for more room than it holds, or given more names than it holds, panicked the connection's
/// reader. Both are a malformed frame now.
#[test]
fn header_counts_past_what_a_map_holds_are_malformed_frames_not_panics() {
    // 65535 headers announced, none there: refused for being cut short, without allocating for them.
    let announced = [&1u64.to_be_bytes()[..], &[0, 1, b'/'], &[0xff, 0xff]].concat();
    assert!(matches!(decode_call(Bytes::from(announced)), Err(FrameError::Malformed("cut short"))));
    let announced = [&1u64.to_be_bytes()[..], &200u16.to_be_bytes(), &[0xff, 0xff]].concat();
    assert!(matches!(decode_answer(Bytes::from(announced)), Err(FrameError::Malformed("cut short"))));
    // 40000 distinct names, each there: more than a map holds.
    let mut frame = [&1u64.to_be_bytes()[..], &[0, 1, b'/'], &40_000u16.to_be_bytes()].concat();
    for i in 0..40_000u32 {
        let name = format!("h{i}");
        frame.extend_from_slice(&(name.len() as u16).to_be_bytes());
        frame.extend_from_slice(name.as_bytes());
        frame.extend_from_slice(&0u32.to_be_bytes());
    }
    let refused = decode_call(Bytes::from(frame));
    assert!(matches!(refused, Err(FrameError::Malformed("more headers than a map holds"))), "{refused:?}");
}

/// `calls` concurrent calls on `peer`, every `big_every`-th of 3 MiB, each body distinct: each must
/// come back as its own call's answer.
async fn each_gets_its_own_answer(peer: Arc<WirePeer>, calls: u32, big_every: u32) {
    let mut running = Vec::new();
    for i in 0..calls {
        let peer = peer.clone();
        running.push(tokio::spawn(async move {
            let size = if i % big_every == 0 { 3 << 20 } else { 64 };
            let mut body = vec![i as u8; size];
            body[..4].copy_from_slice(&i.to_be_bytes());
            let body = Bytes::from(body);
            let answer = peer.call(MODEL_INFER_PATH, &headers(&[]), body.clone()).await.unwrap();
            assert_eq!(grpc_status(&answer), Some("0"));
            assert!(answer.body == body, "call {i} got another call's answer");
        }));
    }
    for call in running {
        call.await.unwrap();
    }
}

#[tokio::test]
async fn concurrent_calls_on_one_connection_each_get_their_own_answer() {
    let (endpoint, _grpc, calls, _stop, _tasks) = serve_echo(LIMIT).await;
    let peer = Arc::new(WirePeer::new(&endpoint, LIMIT, Duration::from_secs(10)));
    // Some bodies big enough that the socket cannot take them at once: the flush task's path.
    each_gets_its_own_answer(peer, 200, 20).await;
    assert_eq!(calls.load(Ordering::SeqCst), 200);
}

#[tokio::test]
async fn a_services_error_comes_back_as_its_status() {
    let (endpoint, _grpc, _calls, _stop, _tasks) = serve_echo(LIMIT).await;
    let peer = WirePeer::new(&endpoint, LIMIT, Duration::from_secs(10));
    let answer = peer.call(MODEL_INFER_PATH, &headers(&[("x-fail", "1")]), Bytes::new()).await.unwrap();
    assert_eq!(grpc_status(&answer), Some("5"));
    assert!(answer.trailers.is_none(), "trailers-only, as gRPC sends an error");
    let answer =
        peer.call("/inference.GRPCInferenceService/ModelMetadata", &headers(&[]), Bytes::new()).await;
    assert_eq!(grpc_status(&answer.unwrap()), Some("12"), "UNIMPLEMENTED: only ModelInfer rides the wire");
}

#[tokio::test]
async fn frames_over_the_limit_fail_only_their_own_call() {
    let (endpoint, _grpc, calls, _stop, _tasks) = serve_echo(1000).await;
    let peer = WirePeer::new(&endpoint, LIMIT, Duration::from_secs(10));
    // A call over the server's limit: refused as gRPC refuses it, and the connection goes on.
    let big = Bytes::from(vec![1u8; 1000 + FRAME_HEADER + HEAD_ALLOWANCE + 1]);
    let answer = peer.call(MODEL_INFER_PATH, &headers(&[]), big).await.unwrap();
    assert_eq!(grpc_status(&answer), Some("3"));
    let message = answer.headers.get("grpc-message").unwrap().to_str().unwrap().replace("%20", " ");
    assert!(message.contains("--max-message-size"), "{message}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never reached the service");
    let answer = peer.call(MODEL_INFER_PATH, &headers(&[]), Bytes::from_static(b"ok")).await.unwrap();
    assert_eq!(&answer.body[..], b"ok");

    // An answer over this pod's limit: that call is a failed peer's, and the next one is answered.
    let (endpoint, _grpc, _calls, _stop, _tasks) = serve_echo(LIMIT).await;
    let small = WirePeer::new(&endpoint, 100, Duration::from_secs(10));
    let status =
        small.call(MODEL_INFER_PATH, &headers(&[("x-big", "200000")]), Bytes::new()).await.unwrap_err();
    assert!(peer_failed(&status) && status.message().contains("over this pod's limit"), "{status:?}");
    let answer = small.call(MODEL_INFER_PATH, &headers(&[]), Bytes::from_static(b"ok")).await.unwrap();
    assert_eq!(&answer.body[..], b"ok");
}

#[tokio::test]
async fn a_caller_that_gives_up_leaves_the_connection_usable() {
    let (endpoint, _grpc, _calls, _stop, _tasks) = serve_echo(LIMIT).await;
    let peer = WirePeer::new(&endpoint, LIMIT, Duration::from_millis(100));
    let status =
        peer.call(MODEL_INFER_PATH, &headers(&[("x-sleep-ms", "400")]), Bytes::new()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(peer_failed(&status));
    // Its late answer arrives on the same connection and is dropped; the next call gets its own.
    let answer = peer.call(MODEL_INFER_PATH, &headers(&[]), Bytes::from_static(b"next")).await.unwrap();
    assert_eq!(&answer.body[..], b"next");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let answer = peer.call(MODEL_INFER_PATH, &headers(&[]), Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(&answer.body[..], b"after");
    assert!(peer.current.lock().as_ref().unwrap().pending.lock().waiting.is_empty(), "nothing left waiting");
}

/// A pod that takes the handshake and the call, then dies without an answer.
async fn dies_mid_call() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    let reached = Arc::new(AtomicUsize::new(0));
    let counted = reached.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut magic = [0u8; 8];
            socket.read_exact(&mut magic).await.unwrap();
            socket.write_all(&MAGIC).await.unwrap();
            let mut length = [0u8; 4];
            socket.read_exact(&mut length).await.unwrap();
            let mut rest = vec![0u8; u32::from_be_bytes(length) as usize];
            socket.read_exact(&mut rest).await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    (endpoint, reached)
}

#[tokio::test]
async fn a_peer_that_dies_mid_call_or_is_not_there_is_a_failed_peer() {
    let (endpoint, reached) = dies_mid_call().await;
    let peer = WirePeer::new(&endpoint, LIMIT, Duration::from_secs(10));
    let status = peer.call(MODEL_INFER_PATH, &headers(&[]), Bytes::from_static(b"x")).await.unwrap_err();
    assert!(peer_failed(&status), "{status:?}");
    assert!(status.message().contains(&endpoint), "names the peer: {status:?}");
    assert_eq!(reached.load(Ordering::SeqCst), 1);
    // The next call connects again.
    let _ = peer.call(MODEL_INFER_PATH, &headers(&[]), Bytes::from_static(b"y")).await.unwrap_err();
    assert_eq!(reached.load(Ordering::SeqCst), 2);

    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let status = WirePeer::new(&nobody, LIMIT, Duration::from_secs(10))
        .call(MODEL_INFER_PATH, &headers(&[]), Bytes::new())
        .await
        .unwrap_err();
    assert!(peer_failed(&status) && status.message().contains("cannot connect"), "{status:?}");
}

#[tokio::test]
async fn a_server_that_does_not_speak_the_wire_fails_the_handshake() {
    // An HTTP/2 server answers the magic with its own preface, or closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
        }
    });
    let status = WirePeer::new(&endpoint, LIMIT, Duration::from_secs(10))
        .call(MODEL_INFER_PATH, &headers(&[]), Bytes::new())
        .await
        .unwrap_err();
    assert!(peer_failed(&status) && status.message().contains("does not speak the pod wire"), "{status:?}");
}

#[tokio::test]
async fn grpc_connections_pass_through_with_their_first_bytes_and_bad_wire_ones_are_closed() {
    let (endpoint, mut grpc, calls, _stop, _tasks) = serve_echo(LIMIT).await;
    let mut client = TcpStream::connect(&endpoint).await.unwrap();
    client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let mut server_side = grpc.next().await.unwrap().unwrap();
    let mut preface = [0u8; 24];
    server_side.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "peeked, not consumed");

    // A connection that starts like the wire but is not: closed, nothing served.
    let mut bad = TcpStream::connect(&endpoint).await.unwrap();
    bad.write_all(&[MAGIC[0], b'x', b'x', b'x', b'x', b'x', b'x', b'x']).await.unwrap();
    let mut buffer = [0u8; 8];
    assert_eq!(bad.read(&mut buffer).await.unwrap(), 0, "closed without an answer");
    // A wire connection that then sends garbage: closed.
    let mut garbage = TcpStream::connect(&endpoint).await.unwrap();
    garbage.write_all(&MAGIC).await.unwrap();
    garbage.read_exact(&mut buffer).await.unwrap();
    garbage.write_all(&[0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 1, 0xFF, 0xFF, 0, 0]).await.unwrap();
    assert_eq!(garbage.read(&mut buffer).await.unwrap(), 0, "closed on a malformed call");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_stopping_server_answers_the_calls_it_has_and_closes() {
    let (endpoint, _grpc, _calls, stop, tasks) = serve_echo(LIMIT).await;
    let peer = Arc::new(WirePeer::new(&endpoint, LIMIT, Duration::from_secs(10)));
    let slow = {
        let peer = peer.clone();
        tokio::spawn(async move {
            peer.call(MODEL_INFER_PATH, &headers(&[("x-sleep-ms", "300")]), Bytes::from_static(b"slow")).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    tasks.close();
    let answer = slow.await.unwrap().unwrap();
    assert_eq!(&answer.body[..], b"slow", "the call in flight is answered");
    tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.expect("every task ends");
    let status = peer.call(MODEL_INFER_PATH, &headers(&[]), Bytes::new()).await.unwrap_err();
    assert!(peer_failed(&status), "{status:?}");
}

mod tls {
    //! The wire and gRPC over mutual TLS on one port, as meshd serves them with `--tls-*`.

    use super::*;
    use crate::tls::test_certs::TestCerts;
    use crate::tls::{ALPN_H2, PeerTls, Tls};

    fn pod(certs: &TestCerts, name: &str, ca: &str) -> Tls {
        Tls::open(certs.files(name, Some(ca))).unwrap()
    }

    fn peer_client(tls: &Tls) -> PeerTls {
        tls.peer_client().unwrap().unwrap()
    }

    fn certs() -> TestCerts {
        let certs = TestCerts::new();
        certs.ca("ca").issue("a", "ca").issue("b", "ca").ca("other").issue("stranger", "other");
        certs
    }

    #[tokio::test]
    async fn wire_calls_over_mutual_tls_are_answered_and_plaintext_or_strangers_are_refused() {
        let certs = certs();
        let config = pod(&certs, "a", "ca").server_config(&[ALPN_H2]).unwrap();
        let (endpoint, _grpc, calls, _stop, _tasks) = serve_echo_tls(LIMIT, Some(config)).await;
        let client = peer_client(&pod(&certs, "b", "ca"));
        let peer =
            Arc::new(WirePeer::new(&endpoint, LIMIT, Duration::from_secs(10)).with_tls(Some(client.wire)));
        // Some bodies bigger than a TLS record and the socket's buffer.
        each_gets_its_own_answer(peer.clone(), 50, 10).await;
        assert_eq!(calls.load(Ordering::SeqCst), 50);

        let refused = |peer: WirePeer| async move {
            let status = peer.call(MODEL_INFER_PATH, &headers(&[]), Bytes::new()).await.unwrap_err();
            assert!(peer_failed(&status), "{status:?}");
        };
        // Plaintext to a TLS port: no answer, the handshake times out or the connection closes.
        refused(WirePeer::new(&endpoint, LIMIT, Duration::from_secs(3))).await;
        // A client certificate of another CA, and (the client's side) a server outside its CA.
        let stranger = Tls::open(TlsFilesFor::stranger_trusting_ca(&certs)).unwrap();
        refused(
            WirePeer::new(&endpoint, LIMIT, Duration::from_secs(3))
                .with_tls(Some(peer_client(&stranger).wire)),
        )
        .await;
        let outsider = peer_client(&pod(&certs, "stranger", "other"));
        refused(WirePeer::new(&endpoint, LIMIT, Duration::from_secs(3)).with_tls(Some(outsider.wire))).await;
        assert_eq!(calls.load(Ordering::SeqCst), 50, "nothing refused reached the service");
    }

    /// Files whose certificate is another CA's while the CA trusted for servers is the mesh's.
    struct TlsFilesFor;

    impl TlsFilesFor {
        fn stranger_trusting_ca(certs: &TestCerts) -> crate::tls::TlsFiles {
            crate::tls::TlsFiles::from_flags(
                certs.path("stranger.crt"),
                certs.path("stranger.key"),
                Some(certs.path("ca.crt")),
            )
        }
    }

    /// The echo, named so tonic's server routes to it.
    #[derive(Clone)]
    struct Named<S>(S);

    impl<S> tonic::server::NamedService for Named<S> {
        const NAME: &'static str = "test.Echo";
    }

    impl<S: Service<Request<Body>>> Service<Request<Body>> for Named<S> {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, request: Request<Body>) -> S::Future {
            self.0.call(request)
        }
    }

    #[tokio::test]
    async fn grpc_over_tls_reaches_tonic_through_the_sniff_and_peer_channels_verify_the_ip() {
        let certs = certs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let calls = Arc::new(AtomicUsize::new(0));
        let config = pod(&certs, "a", "ca").server_config(&[ALPN_H2]).unwrap();
        let wire = WireServer::new(echo(calls.clone()), LIMIT, CancellationToken::new(), TaskTracker::new())
            .with_tls(Some(config));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Named(echo(calls.clone())))
                .serve_with_incoming(incoming(listener, wire)),
        );
        let call = |peers: crate::cluster::peers::Peers| {
            let endpoint = endpoint.clone();
            async move {
                let mut channel = peers.channel(&endpoint, false).unwrap().channel;
                let mut request =
                    Request::new(Body::new(Full::new(Bytes::from_static(b"\0\0\0\0\x05hello"))));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = format!("http://{endpoint}/test.Echo/Call").parse().unwrap();
                request.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
                request.headers_mut().insert("te", HeaderValue::from_static("trailers"));
                let response = channel.ready().await.map_err(|e| e.to_string())?.call(request).await;
                let collected = response.map_err(|e| e.to_string())?.into_body().collect().await;
                let collected = collected.map_err(|e| e.to_string())?;
                let status = collected.trailers().and_then(|t| t.get("grpc-status")).cloned();
                Ok::<_, String>((collected.to_bytes(), status))
            }
        };
        let peers = |tls: Option<PeerTls>| {
            crate::cluster::peers::Peers::new(Duration::from_secs(5), LIMIT).with_tls(tls)
        };
        let (body, status) = call(peers(Some(peer_client(&pod(&certs, "b", "ca"))))).await.unwrap();
        assert_eq!(
            (&body[..], status.as_ref().map(|s| s.as_bytes())),
            (&b"\0\0\0\0\x05hello"[..], Some(&b"0"[..]))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A pod of another CA, and plaintext, get nothing through.
        assert!(call(peers(Some(peer_client(&pod(&certs, "stranger", "other"))))).await.is_err());
        assert!(call(peers(None)).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
