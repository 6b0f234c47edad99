//! Where a runtime listens, and the lazily connecting gRPC channel to it.
//!
//! A model server beside the mesh listens on loopback TCP or, as ModelMesh's sidecars often do, on a
//! unix socket; both become one tonic `Channel`. Channels connect lazily and reconnect on their own, so
//! a runtime that restarts is reached again without rebuilding anything here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A runtime's gRPC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEndpoint {
    /// `http://host:port`.
    Tcp(String),
    /// An absolute path to a unix socket.
    Unix(PathBuf),
}

impl RuntimeEndpoint {
    /// Reads `host:port`, `http://host:port`, `port:N` (loopback, as a ServingRuntime writes it) or
    /// `unix:///abs/path.sock`; the error says what was wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!("{text:?}: a unix socket path must be absolute (unix:///path/to.sock)"));
            }
            return Ok(Self::Unix(path));
        }
        if let Some(port) = text.strip_prefix("port:") {
            let port: u16 = port.parse().map_err(|_| format!("{text:?}: port:N takes a port number"))?;
            return Ok(Self::Tcp(format!("http://127.0.0.1:{port}")));
        }
        let authority = match text.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!("{text:?}: scheme {scheme} is not supported (http:// or unix://)"));
            }
            None => text,
        };
        let authority = authority.trim_end_matches('/');
        let uri: http::Uri = format!("http://{authority}")
            .parse()
            .map_err(|e| format!("{text:?}: not a host:port address: {e}"))?;
        if uri.port_u16().is_none() || uri.host().is_none_or(str::is_empty) || uri.path() != "/" {
            return Err(format!("{text:?}: expected host:port"));
        }
        Ok(Self::Tcp(format!("http://{authority}")))
    }

    /// A channel that connects on first use and reconnects after the runtime restarts.
    pub(crate) fn channel(&self, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
        match self {
            Self::Tcp(uri) => Ok(Endpoint::from_shared(uri.clone())?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .connect_lazy()),
            Self::Unix(path) => {
                let path = path.clone();
                // The URI is a placeholder: the connector ignores it and dials the socket.
                Ok(Endpoint::from_static("http://spi-runtime.invalid")
                    .connect_timeout(connect_timeout)
                    .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    })))
            }
        }
    }
}

/// `http://host:port` or `unix:///path`, the form [`Passthrough::endpoint`] and the mesh's passthrough
/// take.
///
/// [`Passthrough::endpoint`]: densemesh_runtime_core::Passthrough::endpoint
impl fmt::Display for RuntimeEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(uri) => f.write_str(uri),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_read_in_every_form_a_runtime_entry_uses() {
        let table = [
            ("127.0.0.1:8085", Ok("http://127.0.0.1:8085")),
            ("http://localhost:8085", Ok("http://localhost:8085")),
            ("http://localhost:8085/", Ok("http://localhost:8085")),
            ("port:8001", Ok("http://127.0.0.1:8001")),
            ("[::1]:9000", Ok("http://[::1]:9000")),
            ("unix:///tmp/mm/runtime.sock", Ok("unix:///tmp/mm/runtime.sock")),
            ("unix://relative.sock", Err("absolute")),
            ("https://host:443", Err("not supported")),
            ("port:http", Err("port number")),
            ("localhost", Err("host:port")),
            ("http://host:1/path", Err("host:port")),
        ];
        for (text, expected) in table {
            match (RuntimeEndpoint::parse(text), expected) {
                (Ok(endpoint), Ok(shown)) => assert_eq!(endpoint.to_string(), shown, "{text}"),
                (Err(reason), Err(part)) => assert!(reason.contains(part), "{text}: {reason}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }
}
