//! TLS on meshd's listeners and on its calls to other pods, with rustls (ring, the provider
//! etcd-client's TLS already compiles in).
//!
//! One [`Tls`] holds this pod's certificate and key and, for mutual TLS, the CA that signs client
//! certificates. Every listener's config and the peer client's config resolve the certificate and
//! verify against the CA through it at each handshake, so [`Tls::reload`] swapping them in takes
//! effect on the next connection while open ones carry on with the keys they agreed.
//!
//! Peers present this pod's own certificate as their client certificate and verify each other's
//! server certificate against the same CA, by the host of the endpoint they dial (an IP address is
//! checked against the certificate's IP SANs), or by one name for every peer (`--tls-peer-name`):
//! on Kubernetes pod IPs change with every restart, and certificates name services, not pods.

pub mod stream;
#[cfg(test)]
pub(crate) mod test_certs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

/// ALPN for gRPC: HTTP/2, which gRPC clients insist on.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for the REST port, which speaks HTTP/1.1 only.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why TLS could not be set up; every variant names the file and the flag it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path} ({flag}): {source}")]
    Read { path: PathBuf, flag: &'static str, source: std::io::Error },
    #[error("{path} ({flag}) holds no PEM certificate")]
    NoCertificate { path: PathBuf, flag: &'static str },
    #[error("{path} ({flag}) is not a PEM certificate file: {reason}")]
    BadCertificate { path: PathBuf, flag: &'static str, reason: String },
    #[error("{path} ({flag}) holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { path: PathBuf, flag: &'static str, reason: String },
    #[error("the key {key} does not go with the certificate {cert} ({flag}): {reason}")]
    Mismatch { cert: PathBuf, key: PathBuf, flag: &'static str, reason: String },
    #[error("the CA file {path} ({flag}) cannot verify certificates: {reason}")]
    BadCa { path: PathBuf, flag: &'static str, reason: String },
    #[error("{0}")]
    Config(String),
}

/// Where the certificate, its key and (for mutual TLS) the client CA are read from, and which flag
/// named them, for the errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must chain to; `None`: clients are not asked for one.
    pub client_ca: Option<PathBuf>,
    /// `--tls-dir` or `--tls-cert/--tls-key`, as the errors say.
    flag: &'static str,
    ca_flag: &'static str,
    /// The name every peer's certificate must hold (`--tls-peer-name`); `None`: the host each peer
    /// is dialled at.
    peer_name: Option<ServerName<'static>>,
}

impl TlsFiles {
    /// From `--tls-cert`, `--tls-key` and `--tls-client-ca`.
    pub fn from_flags(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> Self {
        Self {
            cert,
            key,
            client_ca,
            flag: "--tls-cert/--tls-key",
            ca_flag: "--tls-client-ca",
            peer_name: None,
        }
    }

    /// From a directory laid out as a Kubernetes TLS secret (modelmesh-serving's): `tls.crt`,
    /// `tls.key`, and `ca.crt`, which turns mutual TLS on when it is there at start-up.
    pub fn from_dir(dir: &Path) -> Self {
        let ca = dir.join("ca.crt");
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: ca.exists().then_some(ca),
            flag: "--tls-dir",
            ca_flag: "--tls-dir",
            peer_name: None,
        }
    }

    /// Peers' certificates must hold `name` (a DNS name or an IP address) wherever they are dialled.
    pub fn with_peer_name(mut self, name: Option<ServerName<'static>>) -> Self {
        self.peer_name = name;
        self
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }
}

/// What the files held when last read, parsed.
struct Loaded {
    key: Arc<CertifiedKey>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    server_verifier: Option<Arc<WebPkiServerVerifier>>,
    /// The files' bytes, to tell whether they changed.
    seen: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").field("mutual", &self.client_verifier.is_some()).finish_non_exhaustive()
    }
}

fn read(path: &Path, flag: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), flag, source })
}

fn certificates(
    bytes: &[u8],
    path: &Path,
    flag: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate { path: path.to_owned(), flag, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned(), flag });
    }
    Ok(certs)
}

/// Reads and checks every file: a key that does not match its certificate, or a CA that verifies
/// nothing, is refused here rather than at the first handshake.
fn load(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Loaded, TlsError> {
    let (cert_bytes, key_bytes) = (read(&files.cert, files.flag)?, read(&files.key, files.flag)?);
    let chain = certificates(&cert_bytes, &files.cert, files.flag)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::BadKey {
        path: files.key.clone(),
        flag: files.flag,
        reason: e.to_string(),
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        flag: files.flag,
        reason: e.to_string(),
    })?;
    let mut seen = vec![cert_bytes, key_bytes];
    let (mut client_verifier, mut server_verifier) = (None, None);
    if let Some(path) = &files.client_ca {
        let bytes = read(path, files.ca_flag)?;
        let bad = |reason: String| TlsError::BadCa { path: path.clone(), flag: files.ca_flag, reason };
        let mut roots = RootCertStore::empty();
        for cert in certificates(&bytes, path, files.ca_flag)? {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        client_verifier = Some(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| bad(e.to_string()))?,
        );
        server_verifier = Some(
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| bad(e.to_string()))?,
        );
        seen.push(bytes);
    }
    Ok(Loaded { key: Arc::new(key), client_verifier, server_verifier, seen })
}

/// This pod's certificate and CA, as last loaded; every config below reads them at each handshake.
#[derive(Debug)]
struct Current {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    loaded: RwLock<Loaded>,
}

/// TLS for one meshd: the listeners' configs, the peer client's, and the reload of the files.
#[derive(Debug, Clone)]
pub struct Tls {
    current: Arc<Current>,
}

impl Tls {
    /// Reads the files; any problem is an error naming the file and flag.
    pub fn open(files: TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load(&files, &provider)?;
        Ok(Self { current: Arc::new(Current { files, provider, loaded: RwLock::new(loaded) }) })
    }

    /// The files this was opened with.
    pub fn files(&self) -> &TlsFiles {
        &self.current.files
    }

    /// Reads the files again and, when they changed and are valid together, serves the new
    /// certificate (and trusts the new CA) from the next handshake on. `Ok(false)`: unchanged. An
    /// error leaves the previous ones in use (a secret half rewritten is read again next time).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = &self.current.files;
        let mut seen = vec![read(&files.cert, files.flag)?, read(&files.key, files.flag)?];
        if let Some(ca) = &files.client_ca {
            seen.push(read(ca, files.ca_flag)?);
        }
        if seen == self.current.loaded.read().seen {
            return Ok(false);
        }
        let loaded = load(files, &self.current.provider)?;
        *self.current.loaded.write() = loaded;
        Ok(true)
    }

    /// A server config for a listener speaking `alpn` ([`ALPN_H2`] for gRPC and the pod wire,
    /// [`ALPN_HTTP1`] for REST), asking clients for a certificate when mutual TLS is on.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        self.listener_config(alpn, self.current.files.mutual())
    }

    /// The metrics port's config (`--metrics-tls`): this pod's certificate, HTTP/1.1, and never a
    /// client certificate asked for, since the kubelet's HTTPS probes present none.
    pub fn metrics_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.listener_config(&[ALPN_HTTP1], false)
    }

    fn listener_config(&self, alpn: &[&[u8]], mutual: bool) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(self.current.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(format!("tls: {e}")))?;
        let builder = if mutual {
            builder.with_client_cert_verifier(Arc::new(ClientCa(self.current.clone())))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(Arc::new(OwnKey(self.current.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The configs for calls to peers: their certificates verified against the CA, this pod's own
    /// presented as client certificate. `None` without a CA, which peers need to trust each other.
    pub fn peer_client(&self) -> Result<Option<PeerTls>, TlsError> {
        if !self.current.files.mutual() {
            return Ok(None);
        }
        let config = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, TlsError> {
            let mut config = ClientConfig::builder_with_provider(self.current.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(format!("tls: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PeerCa(self.current.clone())))
                .with_client_cert_resolver(Arc::new(OwnKey(self.current.clone())));
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(Some(PeerTls { h2: config(&[ALPN_H2])?, wire: config(&[])? }))
    }
}

/// The client side of calls to peers: HTTP/2 channels (ALPN h2) and the pod wire (no ALPN).
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub h2: Arc<ClientConfig>,
    pub wire: Arc<ClientConfig>,
}

/// The name a peer is dialled by (SNI): the host of its `host:port` endpoint, an IP address or a
/// DNS name. Its certificate must hold it, unless `--tls-peer-name` names another. `None` when the
/// endpoint has neither.
pub fn peer_server_name(endpoint: &str) -> Option<ServerName<'static>> {
    let (host, _port) = endpoint.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
}

/// Hands out this pod's current certificate, as server and as client.
#[derive(Debug)]
struct OwnKey(Arc<Current>);

impl ResolvesServerCert for OwnKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.loaded.read().key.clone())
    }
}

impl ResolvesClientCert for OwnKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.loaded.read().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates against the current client CA.
#[derive(Debug)]
struct ClientCa(Arc<Current>);

impl ClientCa {
    fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.0
            .loaded
            .read()
            .client_verifier
            .clone()
            .ok_or_else(|| rustls::Error::General("no client CA loaded".to_owned()))
    }
}

impl ClientCertVerifier for ClientCa {
    /// No hints: they would borrow from a CA that a reload may replace, and clients send their one
    /// certificate anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()?.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies peers' server certificates against the current CA.
#[derive(Debug)]
struct PeerCa(Arc<Current>);

impl PeerCa {
    fn verifier(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.0
            .loaded
            .read()
            .server_verifier
            .clone()
            .ok_or_else(|| rustls::Error::General("no CA loaded to verify peers with".to_owned()))
    }
}

impl ServerCertVerifier for PeerCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.0.files.peer_name.as_ref().unwrap_or(server_name);
        self.verifier()?.verify_server_cert(end_entity, intermediates, name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Parses `--tls-peer-name`: a DNS name or an IP address a certificate can hold.
pub fn parse_peer_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.trim().to_owned())
        .map_err(|_| format!("{name:?} is neither a DNS name nor an IP address a certificate can name"))
}

#[cfg(test)]
mod tests;
