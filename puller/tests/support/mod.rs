//! Real servers for the puller's tests: moto (an S3-compatible server from PyPI, installed into
//! `.venv` by scripts/setup.sh), Python's http.server, and a fault-injecting proxy in front of either.
//! They fail loudly when missing: a pull suite that skips proves nothing.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn venv_bin(name: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned();
    let candidate = workspace.join(".venv/bin").join(name);
    if candidate.exists() { candidate } else { PathBuf::from(name) }
}

/// A child process killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr} within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// moto's S3 server on a free loopback port.
pub fn moto() -> Server {
    let port = free_port();
    let child = Command::new(venv_bin("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "moto_server must be installed (moto[server] from PyPI; scripts/setup.sh installs it into .venv)",
        );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "moto");
    Server { child, addr }
}

/// Python's http.server serving `dir`.
pub fn http_server(dir: &Path) -> Server {
    let port = free_port();
    let child = Command::new(venv_bin("python"))
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 must be installed");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "http.server");
    Server { child, addr }
}

/// A certificate authority and a server certificate it signed for `127.0.0.1`, made by the `openssl`
/// command in `dir`. A CA rather than one self-signed certificate, because webpki refuses a CA
/// certificate presented as the server's own.
pub struct TestCa {
    /// The CA certificate, PEM, as a storage key's `certificate` carries it.
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> Self {
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl must be installed");
            assert!(status.success(), "openssl {args:?} failed: {status}");
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=densemesh test CA"],
            ]
            .concat(),
        );
        openssl(
            &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]]
                .concat(),
        );
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
            .expect("write server.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("read ca.pem");
        Self { ca_pem, cert: dir.join("server.pem"), key: dir.join("server.key") }
    }
}

/// Python's http.server serving `dir` over TLS with `ca`'s server certificate.
pub fn https_server(dir: &Path, ca: &TestCa) -> Server {
    const SERVE: &str = "import functools, http.server, ssl, sys
directory, port, cert, key = sys.argv[1:]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
server = http.server.ThreadingHTTPServer(('127.0.0.1', int(port)), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()";
    let port = free_port();
    let child = Command::new(venv_bin("python"))
        .args(["-c", SERVE])
        .arg(dir)
        .arg(port.to_string())
        .args([&ca.cert, &ca.key])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 must be installed");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "https server");
    Server { child, addr }
}

/// One blocking HTTP/1.1 request; moto accepts unsigned requests, so this creates buckets and objects.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body)).expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let status = String::from_utf8_lossy(&response[..response.len().min(12)]).to_string();
    status.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Deterministic bytes that are not all alike, so a misplaced range shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect()
}

/// What the proxy does to GET responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Flips one byte in the middle of each body.
    Corrupt,
    /// Sends only this many body bytes, then drops the connection, for the next `times` GETs.
    Cut {
        after: usize,
        times: usize,
    },
    /// Waits this long before answering any request.
    Stall(Duration),
    /// Answers every request 403 AccessDenied.
    Forbidden,
}

/// A proxy that forwards each request on a fresh upstream connection and applies a [`Fault`],
/// counting HEADs and object GETs (not listings).
pub struct Proxy {
    pub addr: SocketAddr,
    pub gets: Arc<AtomicUsize>,
    pub heads: Arc<AtomicUsize>,
    fault: Arc<Mutex<Fault>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = Self {
            addr,
            gets: Arc::default(),
            heads: Arc::default(),
            fault: Arc::new(Mutex::new(Fault::None)),
        };
        let (gets, heads, fault) = (proxy.gets.clone(), proxy.heads.clone(), proxy.fault.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (gets, heads, fault) = (gets.clone(), heads.clone(), fault.clone());
                tokio::spawn(async move {
                    let _ = serve(client, upstream, &gets, &heads, &fault).await;
                });
            }
        });
        proxy
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock() = fault;
    }

    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
    gets: &AtomicUsize,
    heads: &AtomicUsize,
    fault: &Mutex<Fault>,
) -> std::io::Result<()> {
    loop {
        let Some(request) = read_head(&mut client).await? else { return Ok(()) };
        let text = String::from_utf8_lossy(&request).to_string();
        let method = text.split(' ').next().unwrap_or("").to_owned();
        let listing = text.lines().next().is_some_and(|l| l.contains("list-type="));
        match method.as_str() {
            "GET" if !listing => gets.fetch_add(1, Ordering::SeqCst),
            "HEAD" => heads.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
        let current = *fault.lock();
        if let Fault::Stall(d) = current {
            tokio::time::sleep(d).await;
        }
        if current == Fault::Forbidden {
            let body = "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
            let head = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            client.write_all(head.as_bytes()).await?;
            if method != "HEAD" {
                client.write_all(body.as_bytes()).await?;
            }
            return Ok(());
        }
        // Forward with the connection closed after the response, so the response ends at EOF.
        let mut forwarded = text.trim_end_matches("\r\n").to_owned();
        forwarded = forwarded
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        forwarded.push_str("\r\nConnection: close\r\n\r\n");
        let mut up = tokio::net::TcpStream::connect(upstream).await?;
        up.write_all(forwarded.as_bytes()).await?;
        let mut response = Vec::new();
        up.read_to_end(&mut response).await?;
        let split = find(&response, b"\r\n\r\n").map_or(response.len(), |i| i + 4);
        let (head, body) = response.split_at(split);
        let mut body = body.to_vec();
        let ok = head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.1 206");
        let mut cut = None;
        if method == "GET" && ok && !body.is_empty() {
            let mut f = fault.lock();
            match *f {
                Fault::Corrupt => {
                    let mid = body.len() / 2;
                    body[mid] ^= 0xff;
                }
                Fault::Cut { after, times } if times > 0 => {
                    cut = Some(after.min(body.len()));
                    *f = if times > 1 { Fault::Cut { after, times: times - 1 } } else { Fault::None };
                }
                _ => {}
            }
        }
        client.write_all(head).await?;
        match cut {
            Some(n) => {
                client.write_all(&body[..n]).await?;
                return Ok(()); // dropped mid-body
            }
            None => client.write_all(&body).await?,
        }
        if !String::from_utf8_lossy(head).to_ascii_lowercase().contains("connection: close") {
            continue;
        }
        return Ok(());
    }
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while find(&head, b"\r\n\r\n").is_none() {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    Ok(Some(head))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
