//! Where a registered model's bytes live, from its `ModelInfo.path` and `ModelInfo.key`.
//!
//! modelmesh-serving registers `path` as the object path inside a storage key's bucket and `key` as
//! `{"storage_key": "...", "bucket": "..."}`; a path may also be a full URI (`s3://bucket/key`,
//! `gs://`, `az://`, `http(s)://`, `file://`), or a plain local path when no storage key is named.

use std::path::PathBuf;

use object_store::path::Path as ObjectPath;
use serde::Deserialize;

use crate::storage::{Backend, StorageConfig};
use crate::{Error, Result};

/// The storage key a model names in `ModelInfo.key`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StorageRef {
    #[serde(default, alias = "storageKey")]
    pub storage_key: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
}

impl StorageRef {
    /// Parses `ModelInfo.key`: empty, a JSON object, or (as a convenience) a bare storage key name.
    pub fn parse(key: Option<&str>) -> Result<Self> {
        let Some(key) = key.map(str::trim).filter(|k| !k.is_empty()) else { return Ok(Self::default()) };
        if key.starts_with('{') {
            let parsed: Self = serde_json::from_str(key).map_err(|e| Error::InvalidLocation {
                reason: format!(
                    "modelInfo.key is not a JSON object like {{\"storage_key\": \"...\", \"bucket\": \"...\"}} (line {} column {})",
                    e.line(),
                    e.column()
                ),
            })?;
            Ok(Self {
                storage_key: parsed.storage_key.filter(|k| !k.is_empty()),
                bucket: parsed.bucket.filter(|b| !b.is_empty()),
            })
        } else {
            Ok(Self { storage_key: Some(key.to_owned()), bucket: None })
        }
    }
}

/// A model's source, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// On this machine already: used in place, never copied into the cache.
    Local(PathBuf),
    Remote(Remote),
}

/// An object (or a prefix of objects: a directory model) in a store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Remote {
    pub backend: Backend,
    /// The storage-config key whose credentials reach it; none for anonymous or environment access.
    pub storage_key: Option<String>,
    /// Bucket (S3, GCS), container (Azure) or `scheme://host[:port]` (HTTP).
    pub bucket: String,
    /// The object path, or the prefix of a directory model; never empty, never `..`.
    pub path: ObjectPath,
}

impl Remote {
    /// The canonical URI: the cache's identity for this object, safe to log (no credentials).
    pub fn uri(&self) -> String {
        match self.backend {
            Backend::S3 => format!("s3://{}/{}", self.bucket, self.path),
            Backend::Gcs => format!("gs://{}/{}", self.bucket, self.path),
            Backend::Azure => format!("az://{}/{}", self.bucket, self.path),
            Backend::Http => format!("{}/{}", self.bucket, self.path),
        }
    }
}

/// Resolves a registration's path and key against the storage configuration.
pub fn resolve(path: &str, key: Option<&str>, config: &StorageConfig) -> Result<Location> {
    let storage = StorageRef::parse(key)?;
    let entry = match &storage.storage_key {
        Some(name) => Some(config.get(name).ok_or_else(|| Error::UnknownStorageKey {
            key: name.clone(),
            known: config.keys().map(str::to_owned).collect(),
        })?),
        None => None,
    };
    let path = path.trim();
    if path.is_empty() {
        return Err(Error::InvalidLocation { reason: "modelInfo.path is empty".to_owned() });
    }

    if let Some((scheme, rest)) = path.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "file" {
            return Ok(Location::Local(PathBuf::from(rest)));
        }
        let backend = match scheme.as_str() {
            "s3" | "s3a" => Backend::S3,
            "gs" | "gcs" => Backend::Gcs,
            "az" | "azure" | "abfs" | "abfss" => Backend::Azure,
            "http" | "https" => Backend::Http,
            other => {
                return Err(Error::InvalidLocation {
                    reason: format!("unsupported URI scheme {other}:// (s3, gs, az, http, https or file)"),
                });
            }
        };
        let (bucket, object) = match backend {
            Backend::Http => {
                let (host, object) = rest.split_once('/').unwrap_or((rest, ""));
                (format!("{scheme}://{host}"), object)
            }
            _ => {
                let (bucket, object) = rest.split_once('/').unwrap_or((rest, ""));
                (bucket.to_owned(), object)
            }
        };
        if bucket.is_empty() || bucket.ends_with("://") {
            return Err(Error::InvalidLocation { reason: format!("{path} names no bucket or host") });
        }
        // Credentials: the named key, else a key called "default" for this backend, else the environment.
        let storage_key = match entry {
            Some(entry) if entry.backend != backend => {
                return Err(Error::InvalidLocation {
                    reason: format!(
                        "{scheme}:// path with storage key {} of type {}",
                        entry.key,
                        entry.backend.name()
                    ),
                });
            }
            Some(entry) => Some(entry.key.clone()),
            None => config.get("default").filter(|d| d.backend == backend).map(|d| d.key.clone()),
        };
        return Ok(Location::Remote(Remote { backend, storage_key, bucket, path: object_path(object)? }));
    }

    let Some(entry) = entry else { return Ok(Location::Local(PathBuf::from(path))) };
    let bucket = match entry.backend {
        Backend::Http => entry.get("url").map(|u| u.trim_end_matches('/').to_owned()),
        _ => storage.bucket.clone().or_else(|| entry.default_bucket()),
    }
    .ok_or_else(|| Error::InvalidLocation {
        reason: format!(
            "storage key {} names no {} and modelInfo.key gives no \"bucket\"",
            entry.key,
            if entry.backend == Backend::Http { "url" } else { "default_bucket" }
        ),
    })?;
    Ok(Location::Remote(Remote {
        backend: entry.backend,
        storage_key: Some(entry.key.clone()),
        bucket,
        path: object_path(path)?,
    }))
}

/// An object path that cannot climb out of its bucket, nor out of the cache dir once mirrored there.
fn object_path(raw: &str) -> Result<ObjectPath> {
    let trimmed = raw.trim_matches('/');
    let invalid = |why: &str| Error::InvalidLocation { reason: format!("object path {raw:?} {why}") };
    if trimmed.is_empty() {
        return Err(invalid("is empty"));
    }
    if trimmed.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(invalid("has an empty, . or .. segment"));
    }
    ObjectPath::parse(trimmed).map_err(|_| invalid("is not a valid object path"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config() -> StorageConfig {
        StorageConfig::from_json(json!({
            "localMinIO": {"type": "s3", "endpoint_url": "http://127.0.0.1:9000", "default_bucket": "models",
                           "access_key_id": "a", "secret_access_key": "b"},
            "web": {"type": "http", "url": "http://127.0.0.1:8080/base/"},
            "default": {"type": "gcs", "bucket": "g"}
        }))
        .unwrap()
    }

    fn remote(location: Location) -> Remote {
        match location {
            Location::Remote(r) => r,
            other => panic!("expected a remote location, got {other:?}"),
        }
    }

    #[test]
    fn modelmesh_serving_style_path_and_storage_key() {
        let key = r#"{"storage_key": "localMinIO", "bucket": "other"}"#;
        let r = remote(resolve("sklearn/mnist.joblib", Some(key), &config()).unwrap());
        assert_eq!(r.uri(), "s3://other/sklearn/mnist.joblib");
        assert_eq!(r.storage_key.as_deref(), Some("localMinIO"));
        let r = remote(resolve("onnx/m", Some(r#"{"storage_key":"localMinIO"}"#), &config()).unwrap());
        assert_eq!(r.uri(), "s3://models/onnx/m", "the key's default_bucket");
        let r = remote(resolve("x/model.onnx", Some("web"), &config()).unwrap());
        assert_eq!(r.uri(), "http://127.0.0.1:8080/base/x/model.onnx");
    }

    #[test]
    fn full_uris_with_and_without_a_key() {
        let r = remote(resolve("s3://b/dir/m.onnx", Some("localMinIO"), &config()).unwrap());
        assert_eq!((r.bucket.as_str(), r.path.as_ref()), ("b", "dir/m.onnx"));
        let r = remote(resolve("gs://b/m", None, &config()).unwrap());
        assert_eq!(r.storage_key.as_deref(), Some("default"), "the default key of the same backend");
        let r = remote(resolve("s3://b/m", None, &config()).unwrap());
        assert_eq!(r.storage_key, None, "the default key is gcs: credentials from the environment");
        let r = remote(resolve("https://host:8443/a/b.onnx", None, &config()).unwrap());
        assert_eq!(r.uri(), "https://host:8443/a/b.onnx");
        assert_eq!(
            resolve("file:///m/x.onnx", None, &config()).unwrap(),
            Location::Local("/m/x.onnx".into())
        );
        assert_eq!(resolve("/m/x.onnx", None, &config()).unwrap(), Location::Local("/m/x.onnx".into()));
    }

    #[test]
    fn bad_locations_are_clear_errors() {
        let cases = [
            ("s3://b/../../etc/passwd", None, ".. segment"),
            ("models/../x", Some("localMinIO"), ".. segment"),
            ("s3://b/", None, "is empty"),
            ("ftp://h/x", None, "unsupported URI scheme ftp://"),
            ("x", Some("nope"), "storage key nope"),
            ("x", Some("{not json"), "modelInfo.key is not a JSON object"),
            ("gs://b/x", Some("localMinIO"), "of type s3"),
        ];
        for (path, key, expected) in cases {
            let error = resolve(path, key, &config()).unwrap_err().to_string();
            assert!(error.contains(expected), "{path} {key:?}: {error}");
        }
    }
}
