//! TLS against real handshakes: bad files refused at start-up with the file and flag named, mutual
//! TLS refusing clients without a certificate or from another CA, peers verified by IP address or by
//! `--tls-peer-name`, the metrics port asking no client certificate, and a rotated certificate served
//! to new connections while open ones carry on.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::test_certs::TestCerts;
use super::*;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain(certs: &TestCerts, name: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(certs.path(&format!("{name}.crt"))).unwrap().map(Result::unwrap).collect()
}

/// A client trusting the CA `ca`, presenting `identity`'s certificate if given.
fn client(certs: &TestCerts, ca: &str, identity: Option<&str>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in chain(certs, ca) {
        roots.add(cert).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let key = PrivateKeyDer::from_pem_file(certs.path(&format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain(certs, name), key).unwrap()
        }
    };
    // A resumed session shows the certificate of the session it resumes: every handshake here is full.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Echoes every connection's bytes back over TLS with `config`; the address.
async fn echo_server(config: Arc<ServerConfig>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Client = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects and checks one echo round trip; `Err` where the handshake or the round trip fails (in
/// TLS 1.3 the server refuses a client certificate after the client thinks it is done).
async fn round_trip(addr: &str, config: Arc<ClientConfig>) -> Result<Client, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = peer_server_name(addr).unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
    echo(&mut tls).await?;
    Ok(tls)
}

async fn echo(tls: &mut Client) -> Result<(), String> {
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut got = [0u8; 4];
    tls.read_exact(&mut got).await.map_err(|e| e.to_string())?;
    if &got != b"ping" {
        return Err(format!("echoed {got:?}"));
    }
    Ok(())
}

fn served_certificate(tls: &Client) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn bad_files_are_errors_naming_the_file_and_the_flag() {
    let certs = TestCerts::new();
    certs.ca("ca").issue("a", "ca").issue("b", "ca");
    std::fs::write(certs.path("junk.pem"), "not a certificate\n").unwrap();
    let open = |files: TlsFiles| Tls::open(files).unwrap_err().to_string();

    let missing = open(TlsFiles::from_flags(certs.path("nope.crt"), certs.path("a.key"), None));
    assert!(missing.contains("nope.crt") && missing.contains("--tls-cert/--tls-key"), "{missing}");
    let junk = open(TlsFiles::from_flags(certs.path("junk.pem"), certs.path("a.key"), None));
    assert!(junk.contains("junk.pem") && junk.contains("no PEM certificate"), "{junk}");
    let no_key = open(TlsFiles::from_flags(certs.path("a.crt"), certs.path("a.crt"), None));
    assert!(no_key.contains("a.crt") && no_key.contains("private key"), "{no_key}");
    let mismatch = open(TlsFiles::from_flags(certs.path("a.crt"), certs.path("b.key"), None));
    assert!(mismatch.contains("b.key") && mismatch.contains("does not go with"), "{mismatch}");
    let bad_ca = open(certs.files("a", Some("junk")));
    assert!(bad_ca.contains("junk.crt") && bad_ca.contains("--tls-client-ca"), "{bad_ca}");

    // The secret's layout: a missing key is named with --tls-dir; ca.crt turns mutual TLS on.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(certs.path("a.crt"), dir.path().join("tls.crt")).unwrap();
    let in_dir = open(TlsFiles::from_dir(dir.path()));
    assert!(in_dir.contains("tls.key") && in_dir.contains("--tls-dir"), "{in_dir}");
    std::fs::copy(certs.path("a.key"), dir.path().join("tls.key")).unwrap();
    assert!(!Tls::open(TlsFiles::from_dir(dir.path())).unwrap().files().mutual());
    std::fs::copy(certs.path("ca.crt"), dir.path().join("ca.crt")).unwrap();
    let tls = Tls::open(TlsFiles::from_dir(dir.path())).unwrap();
    assert!(tls.files().mutual() && tls.peer_client().unwrap().is_some());
}

#[test]
fn peers_are_verified_by_the_host_of_their_endpoint() {
    let cases = [
        ("127.0.0.1:8033", Some("127.0.0.1")),
        ("[fd00::1]:8033", Some("fd00::1")),
        ("meshd-0.meshd.ns.svc:8033", Some("meshd-0.meshd.ns.svc")),
        ("no-port", None),
        (":8033", None),
    ];
    for (endpoint, want) in cases {
        let got = peer_server_name(endpoint).map(|n| n.to_str().into_owned());
        assert_eq!(got.as_deref(), want, "{endpoint}");
    }
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_or_from_another_ca() {
    let certs = TestCerts::new();
    certs.ca("ca").issue("server", "ca").issue("client", "ca").ca("other").issue("stranger", "other");
    let tls = Tls::open(certs.files("server", Some("ca"))).unwrap();
    let addr = echo_server(tls.server_config(&[]).unwrap()).await;

    round_trip(&addr, client(&certs, "ca", Some("client"))).await.expect("a client of the CA is served");
    assert!(round_trip(&addr, client(&certs, "ca", None)).await.is_err(), "no client certificate");
    assert!(round_trip(&addr, client(&certs, "ca", Some("stranger"))).await.is_err(), "another CA's");
    // And the client side: a server whose certificate the CA did not sign is refused.
    assert!(round_trip(&addr, client(&certs, "other", Some("stranger"))).await.is_err());
    // Without a client CA, clients need no certificate.
    let plain = Tls::open(certs.files("server", None)).unwrap();
    let addr = echo_server(plain.server_config(&[]).unwrap()).await;
    round_trip(&addr, client(&certs, "ca", None)).await.expect("server-only TLS");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_while_open_ones_carry_on() {
    let certs = TestCerts::new();
    certs.ca("ca").issue("old", "ca").issue("new", "ca").issue("client", "ca");
    let live = TestCerts::new();
    let copy = |from: &str, to: &str| std::fs::copy(certs.path(from), live.path(to)).unwrap();
    copy("old.crt", "tls.crt");
    copy("old.key", "tls.key");
    copy("ca.crt", "ca.crt");
    let tls = Tls::open(TlsFiles::from_dir(live.path("").as_path())).unwrap();
    let addr = echo_server(tls.server_config(&[]).unwrap()).await;
    let config = client(&certs, "ca", Some("client"));

    let mut open = round_trip(&addr, config.clone()).await.unwrap();
    let old = chain(&certs, "old")[0].to_vec();
    assert_eq!(served_certificate(&open), old);
    assert!(!tls.reload().unwrap(), "nothing changed");

    // Half a rotation (the new certificate, the old key) is refused and the old pair kept.
    copy("new.crt", "tls.crt");
    let half = tls.reload().unwrap_err().to_string();
    assert!(half.contains("does not go with"), "{half}");
    assert_eq!(served_certificate(&round_trip(&addr, config.clone()).await.unwrap()), old);

    copy("new.key", "tls.key");
    assert!(tls.reload().unwrap());
    let fresh = round_trip(&addr, config.clone()).await.unwrap();
    assert_eq!(served_certificate(&fresh), chain(&certs, "new")[0].to_vec());
    echo(&mut open).await.expect("the connection opened before the rotation still works");
}

/// One TLS round trip from a peer's side: `peer`'s client config, dialling `addr` by its IP.
async fn peer_round_trip(addr: &str, peer: &Tls) -> Result<Client, String> {
    let config = peer.peer_client().unwrap().expect("mutual TLS").wire;
    round_trip(addr, config).await
}

#[tokio::test]
async fn with_a_peer_name_peers_are_verified_by_it_wherever_they_are_dialled() {
    let certs = TestCerts::new();
    // Certificates as a Kubernetes issuer makes them: for the service's name, no pod IP in them.
    certs.ca("ca").issue_for("pod", "ca", "DNS:meshd-peers.ns.svc").issue_for(
        "other",
        "ca",
        "DNS:elsewhere.ns.svc",
    );
    let server = Tls::open(certs.files("pod", Some("ca"))).unwrap();
    let addr = echo_server(server.server_config(&[]).unwrap()).await;

    // By the dialled IP (the default), the certificate does not hold the name: refused.
    let by_ip = Tls::open(certs.files("pod", Some("ca"))).unwrap();
    let refused = peer_round_trip(&addr, &by_ip).await.unwrap_err();
    assert!(refused.contains("certificate") || refused.contains("Certificate"), "{refused}");

    let named = |name: &str| {
        let files = certs.files("pod", Some("ca")).with_peer_name(Some(parse_peer_name(name).unwrap()));
        Tls::open(files).unwrap()
    };
    peer_round_trip(&addr, &named("meshd-peers.ns.svc")).await.expect("the certificate holds the peer name");
    assert!(peer_round_trip(&addr, &named("elsewhere.ns.svc")).await.is_err(), "another name");

    // A certificate of the same CA for another name is refused by a pod expecting the peer name.
    let other = Tls::open(certs.files("other", Some("ca"))).unwrap();
    let other_addr = echo_server(other.server_config(&[]).unwrap()).await;
    assert!(peer_round_trip(&other_addr, &named("meshd-peers.ns.svc")).await.is_err());
}

#[test]
fn peer_names_are_dns_names_or_ip_addresses() {
    assert_eq!(parse_peer_name("meshd.ns.svc").unwrap().to_str(), "meshd.ns.svc");
    assert_eq!(parse_peer_name("10.0.0.7").unwrap().to_str(), "10.0.0.7");
    let bad = parse_peer_name("not a name").unwrap_err();
    assert!(bad.contains("not a name") && bad.contains("DNS name"), "{bad}");
}

#[tokio::test]
async fn the_metrics_port_asks_no_client_certificate_even_with_mutual_tls() {
    let certs = TestCerts::new();
    certs.ca("ca").issue("server", "ca");
    let tls = Tls::open(certs.files("server", Some("ca"))).unwrap();
    let addr = echo_server(tls.metrics_config().unwrap()).await;
    round_trip(&addr, client(&certs, "ca", None)).await.expect("a probe without a certificate is served");
}
