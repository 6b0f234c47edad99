//! `object_store` clients, one per (storage key, bucket), built from the storage configuration.
//!
//! Retries are ours (see `fetch`), so every client is built with `object_store`'s own retries off:
//! one policy, one set of metrics, and a resumed download continues where it stopped.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::location::Remote;
use crate::storage::{Backend, StorageEntry};
use crate::{Error, Result};

/// Builds the client for one remote location. `entry` is the storage key it names, if any.
pub(crate) fn build(
    remote: &Remote,
    entry: Option<&StorageEntry>,
    request_timeout: Duration,
) -> Result<Arc<dyn ObjectStore>> {
    install_crypto_provider();
    let field = |name: &str| entry.and_then(|e| e.get(name));
    let flag = |name: &str| field(name).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let invalid = |reason: String| Error::StorageConfig {
        key: entry.map_or_else(|| remote.uri(), |e| e.key.clone()),
        reason,
    };
    let mut options = ClientOptions::new()
        .with_timeout(request_timeout)
        .with_connect_timeout(request_timeout.min(Duration::from_secs(10)))
        .with_allow_http(true);
    if let Some(pem) = field("certificate") {
        let certificate = object_store::Certificate::from_pem(pem.as_bytes())
            .map_err(|_| invalid("\"certificate\" is not a PEM certificate".to_owned()))?;
        options = options.with_root_certificate(certificate);
    }
    let retry = RetryConfig { max_retries: 0, ..RetryConfig::default() };
    // Errors from the builders name the missing setting, not values; still, say only which backend.
    let built =
        |e: object_store::Error| invalid(format!("cannot build a {} client: {e}", remote.backend.name()));

    let store: Arc<dyn ObjectStore> = match remote.backend {
        Backend::S3 => {
            let mut b = if entry.is_some() { AmazonS3Builder::new() } else { AmazonS3Builder::from_env() };
            b = b
                .with_bucket_name(&remote.bucket)
                .with_region(field("region").unwrap_or_else(|| "us-east-1".into()));
            if let Some(endpoint) = field("endpoint_url").or_else(|| field("endpoint")) {
                b = b.with_endpoint(endpoint);
            }
            match (field("access_key_id"), field("secret_access_key")) {
                (Some(id), Some(secret)) => {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(token) = field("session_token") {
                        b = b.with_token(token);
                    }
                }
                (None, None) if entry.is_some() => b = b.with_skip_signature(true),
                (None, None) => {}
                _ => {
                    return Err(invalid("needs both access_key_id and secret_access_key, or neither".into()));
                }
            }
            if flag("virtual_host_style") || flag("virtual_hosted_style") {
                b = b.with_virtual_hosted_style_request(true);
            }
            Arc::new(b.with_client_options(options).with_retry(retry).build().map_err(built)?)
        }
        Backend::Gcs => {
            let mut b = if entry.is_some() {
                GoogleCloudStorageBuilder::new()
            } else {
                GoogleCloudStorageBuilder::from_env()
            };
            b = b.with_bucket_name(&remote.bucket);
            match (field("private_key"), field("client_email")) {
                (Some(private_key), Some(client_email)) => {
                    let mut key = serde_json::json!({
                        "type": "service_account",
                        "private_key": private_key,
                        "client_email": client_email,
                    });
                    if let Some(uri) = field("token_uri") {
                        key["token_uri"] = uri.into();
                    }
                    b = b.with_service_account_key(key.to_string());
                }
                (None, None) if entry.is_some() => b = b.with_skip_signature(true),
                (None, None) => {}
                _ => return Err(invalid("needs both private_key and client_email, or neither".into())),
            }
            if let Some(endpoint) = field("endpoint_url") {
                b = b.with_base_url(&endpoint);
            }
            Arc::new(b.with_client_options(options).with_retry(retry).build().map_err(built)?)
        }
        Backend::Azure => {
            let mut b = if entry.is_some() {
                MicrosoftAzureBuilder::new()
            } else {
                MicrosoftAzureBuilder::from_env()
            };
            b = b.with_container_name(&remote.bucket);
            let connection = field("connection_string").map(|s| parse_connection_string(&s));
            let setting = |name: &str, in_string: &str| {
                field(name).or_else(|| connection.as_ref().and_then(|c| c.get(in_string).cloned()))
            };
            if let Some(account) = setting("account_name", "AccountName") {
                b = b.with_account(account);
            }
            if let Some(key) = setting("account_key", "AccountKey") {
                b = b.with_access_key(key);
            } else if let (Some(id), Some(secret), Some(tenant)) =
                (field("client_id"), field("client_secret"), field("tenant_id"))
            {
                b = b.with_client_secret_authorization(id, secret, tenant);
            } else if entry.is_some() {
                b = b.with_skip_signature(true);
            }
            if let Some(endpoint) = setting("endpoint_url", "BlobEndpoint") {
                b = b.with_endpoint(endpoint);
            }
            Arc::new(b.with_client_options(options).with_retry(retry).build().map_err(built)?)
        }
        Backend::Http => {
            if let Some(headers) = entry.and_then(|e| e.object("headers")) {
                let mut map = http::HeaderMap::new();
                for (name, value) in headers {
                    let values: Vec<&str> = match value {
                        serde_json::Value::String(s) => vec![s.as_str()],
                        serde_json::Value::Array(all) => all.iter().filter_map(|v| v.as_str()).collect(),
                        _ => Vec::new(),
                    };
                    let name = http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| invalid(format!("header name {name:?} is not valid")))?;
                    for value in values {
                        let value = http::HeaderValue::from_str(value)
                            .map_err(|_| invalid(format!("header {name} has an invalid value")))?;
                        map.append(name.clone(), value);
                    }
                }
                options = options.with_default_headers(map);
            }
            Arc::new(
                HttpBuilder::new()
                    .with_url(&remote.bucket)
                    .with_client_options(options)
                    .with_retry(retry)
                    .build()
                    .map_err(built)?,
            )
        }
    };
    Ok(store)
}

/// Makes ring rustls's process-wide crypto provider unless one is already installed. object_store's
/// HTTP client is reqwest built with rustls but no provider (the `aws`/`gcp`/`azure`/`http` features
/// would compile aws-lc-rs, a second crypto library beside the workspace's ring), and reqwest takes
/// the process default when it builds a client, even for plain `http://`, panicking if there is none.
/// An already installed provider (meshd's own TLS may have set one) is kept: both are ring.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another thread's install leaves that provider in place, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// `AccountName=...;AccountKey=...;BlobEndpoint=...` into its parts.
fn parse_connection_string(s: &str) -> std::collections::HashMap<String, String> {
    s.split(';')
        .filter_map(|part| part.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::{Location, resolve};
    use crate::storage::StorageConfig;

    #[test]
    fn builds_a_client_for_every_backend_from_storage_config() {
        let config = StorageConfig::from_json(serde_json::json!({
            "s3": {"type": "s3", "endpoint_url": "http://127.0.0.1:9", "default_bucket": "b",
                   "access_key_id": "a", "secret_access_key": "s", "region": "us-south"},
            "gcs": {"type": "gcs", "bucket": "b"},
            "az": {"type": "azure", "connection_string": "AccountName=acct;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/acct", "container": "c"},
            "web": {"type": "http", "url": "http://127.0.0.1:9", "headers": {"Authorization": "Bearer t"}}
        }))
        .unwrap();
        for key in ["s3", "gcs", "az", "web"] {
            let Location::Remote(remote) = resolve("m/model.onnx", Some(key), &config).unwrap() else {
                panic!("{key} resolves to a remote location")
            };
            build(&remote, config.get(key), Duration::from_secs(1)).unwrap();
        }
    }

    #[test]
    fn half_given_credentials_are_an_error_that_names_the_key_not_the_secret() {
        let config = StorageConfig::from_json(serde_json::json!({
            "k": {"type": "s3", "default_bucket": "b", "access_key_id": "AKIAHALF"}
        }))
        .unwrap();
        let Location::Remote(remote) = resolve("m", Some("k"), &config).unwrap() else { unreachable!() };
        let error = build(&remote, config.get("k"), Duration::from_secs(1)).unwrap_err().to_string();
        assert!(error.contains("storage key k") && error.contains("secret_access_key"), "{error}");
        assert!(!error.contains("AKIAHALF"), "{error}");
    }
}
