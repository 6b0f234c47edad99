//! Storage configuration in modelmesh-serving's `storage-config` secret format: one JSON document per
//! storage key, naming the backend (`type`) and how to reach it.
//!
//! Read from a directory (a mounted Kubernetes secret: one file per key, Kubernetes' own `..data`
//! bookkeeping entries skipped) or from one JSON file mapping keys to documents. Secrets stay inside
//! [`StorageEntry`]: its `Debug` and every error name keys and fields, never values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The backends a storage key can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    S3,
    Gcs,
    Azure,
    Http,
}

impl Backend {
    fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "s3" | "minio" => Some(Self::S3),
            "gcs" | "gs" | "google" => Some(Self::Gcs),
            "azure" | "az" | "azblob" => Some(Self::Azure),
            "http" | "https" => Some(Self::Http),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::S3 => "s3",
            Self::Gcs => "gcs",
            Self::Azure => "azure",
            Self::Http => "http",
        }
    }
}

/// Fields whose values are credentials: never logged, never in an error, never returned.
const SECRET_FIELDS: &[&str] = &[
    "access_key_id",
    "secret_access_key",
    "session_token",
    "token",
    "private_key",
    "private_key_id",
    "client_secret",
    "account_key",
    "connection_string",
    "sas_token",
    "client_key",
    "headers",
    "service_account",
    "base64_service_account",
];

/// One storage key's document.
#[derive(Clone, PartialEq)]
pub struct StorageEntry {
    pub key: String,
    pub backend: Backend,
    fields: Map<String, Value>,
}

impl StorageEntry {
    fn parse(key: &str, document: Value) -> Result<Self> {
        let invalid = |reason: String| Error::StorageConfig { key: key.to_owned(), reason };
        let Value::Object(fields) = document else {
            return Err(invalid("must be a JSON object".to_owned()));
        };
        let kind = fields
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("has no \"type\" (s3, gcs, azure or http)".to_owned()))?;
        let backend = Backend::parse(kind)
            .ok_or_else(|| invalid(format!("has unsupported type {kind:?} (s3, gcs, azure or http)")))?;
        Ok(Self { key: key.to_owned(), backend, fields })
    }

    /// A string field; numbers and booleans are accepted as written (JSON from hand-made secrets).
    pub fn get(&self, field: &str) -> Option<String> {
        match self.fields.get(field)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// An object field (HTTP headers).
    pub fn object(&self, field: &str) -> Option<&Map<String, Value>> {
        self.fields.get(field).and_then(Value::as_object)
    }

    /// The bucket (or Azure container) used when a registration names none.
    pub fn default_bucket(&self) -> Option<String> {
        ["bucket", "default_bucket", "container"].iter().find_map(|f| self.get(f))
    }
}

impl std::fmt::Debug for StorageEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .fields
            .iter()
            .map(|(k, v)| {
                let value = if SECRET_FIELDS.contains(&k.as_str()) {
                    "<redacted>"
                } else {
                    v.as_str().unwrap_or("…")
                };
                (k.as_str(), value)
            })
            .collect();
        f.debug_struct("StorageEntry").field("key", &self.key).field("fields", &shown).finish()
    }
}

/// Every storage key, as last read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageConfig {
    entries: BTreeMap<String, StorageEntry>,
}

impl StorageConfig {
    /// Reads a directory (one file per key) or a file (a JSON object of keys). Blocking.
    pub fn load(path: &Path) -> Result<Self> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mut entries = BTreeMap::new();
        if meta.is_dir() {
            for (key, file) in key_files(path)? {
                let text =
                    std::fs::read_to_string(&file).map_err(|source| Error::Io { path: file, source })?;
                let document = serde_json::from_str(&text).map_err(|e| Error::StorageConfig {
                    key: key.clone(),
                    reason: format!("is not valid JSON ({})", where_in(&e)),
                })?;
                entries.insert(key.clone(), StorageEntry::parse(&key, document)?);
            }
        } else {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let all: Map<String, Value> = serde_json::from_str(&text).map_err(|e| Error::StorageConfig {
                key: path.display().to_string(),
                reason: format!("is not a JSON object of storage keys ({})", where_in(&e)),
            })?;
            for (key, value) in all {
                // A secret's values are JSON documents in strings; a hand-written file may inline them.
                let document = match value {
                    Value::String(text) => serde_json::from_str(&text).map_err(|e| Error::StorageConfig {
                        key: key.clone(),
                        reason: format!("is not valid JSON ({})", where_in(&e)),
                    })?,
                    other => other,
                };
                entries.insert(key.clone(), StorageEntry::parse(&key, document)?);
            }
        }
        Ok(Self { entries })
    }

    pub fn get(&self, key: &str) -> Option<&StorageEntry> {
        self.entries.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    #[cfg(test)]
    pub(crate) fn from_json(all: Value) -> Result<Self> {
        let Value::Object(all) = all else { panic!("test config must be an object") };
        let entries = all
            .into_iter()
            .map(|(k, v)| StorageEntry::parse(&k, v).map(|e| (k, e)))
            .collect::<Result<_>>()?;
        Ok(Self { entries })
    }
}

/// Where a JSON error is, without serde's message: that can quote the (secret) value it choked on.
fn where_in(e: &serde_json::Error) -> String {
    format!("line {} column {}", e.line(), e.column())
}

/// The files of a mounted secret: regular files (following symlinks), skipping dot-files such as
/// Kubernetes' `..data` and `..2024_01_01…` directories.
fn key_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

/// What changes when the configuration changes: names, sizes and modification times of its files.
/// Cheap enough to poll; catches Kubernetes' symlink swap, which inotify on the directory can miss.
pub fn fingerprint(path: &Path) -> Option<Vec<(String, u64, SystemTime)>> {
    let stamp = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
    };
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        let files = key_files(path).ok()?;
        Some(files.into_iter().filter_map(|(k, p)| stamp(&p).map(|(len, t)| (k, len, t))).collect())
    } else {
        stamp(path).map(|(len, t)| vec![(String::new(), len, t)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn s3_doc() -> String {
        format!(
            r#"{{"type":"s3","access_key_id":"AKIAEXAMPLE","secret_access_key":"{SECRET}","endpoint_url":"http://127.0.0.1:9000","default_bucket":"models","region":"us-south"}}"#
        )
    }

    #[test]
    fn reads_a_mounted_secret_directory_and_skips_kubernetes_bookkeeping() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("localMinIO"), s3_doc()).unwrap();
        std::fs::write(dir.path().join("web"), r#"{"type":"http","url":"http://127.0.0.1:1"}"#).unwrap();
        std::fs::create_dir(dir.path().join("..2026_11_29")).unwrap();
        std::fs::write(dir.path().join("..data"), "not json").unwrap();
        let config = StorageConfig::load(dir.path()).unwrap();
        assert_eq!(config.keys().collect::<Vec<_>>(), ["localMinIO", "web"]);
        let s3 = config.get("localMinIO").unwrap();
        assert_eq!(s3.backend, Backend::S3);
        assert_eq!(s3.default_bucket().as_deref(), Some("models"));
        assert_eq!(s3.get("secret_access_key").as_deref(), Some(SECRET));
    }

    #[test]
    fn reads_one_file_of_keys_with_documents_inline_or_in_strings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("storage.json");
        let body = serde_json::json!({ "a": s3_doc(), "b": {"type": "gcs", "bucket": "g"} });
        std::fs::write(&file, body.to_string()).unwrap();
        let config = StorageConfig::load(&file).unwrap();
        assert_eq!(config.get("a").unwrap().backend, Backend::S3);
        assert_eq!(config.get("b").unwrap().default_bucket().as_deref(), Some("g"));
    }

    #[test]
    fn secrets_never_appear_in_debug_output_or_errors() {
        let config = StorageConfig::from_json(serde_json::json!({
            "k": serde_json::from_str::<Value>(&s3_doc()).unwrap()
        }))
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains(SECRET) && !shown.contains("AKIAEXAMPLE"), "{shown}");
        assert!(shown.contains("endpoint_url"), "{shown}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("broken"), format!("{{\"secret_access_key\": \"{SECRET}\",")).unwrap();
        let error = StorageConfig::load(dir.path()).unwrap_err().to_string();
        assert!(!error.contains(SECRET), "{error}");
        assert!(error.contains("broken"), "{error}");
    }

    #[test]
    fn rejects_a_document_without_a_known_type() {
        let error =
            StorageConfig::from_json(serde_json::json!({"k": {"type": "ftp"}})).unwrap_err().to_string();
        assert!(error.contains("\"ftp\""), "{error}");
        let error =
            StorageConfig::from_json(serde_json::json!({"k": {"bucket": "b"}})).unwrap_err().to_string();
        assert!(error.contains("no \"type\""), "{error}");
    }

    #[test]
    fn fingerprint_changes_when_a_key_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), s3_doc()).unwrap();
        let before = fingerprint(dir.path()).unwrap();
        std::fs::write(dir.path().join("k2"), s3_doc()).unwrap();
        assert_ne!(before, fingerprint(dir.path()).unwrap());
    }
}
