//! The fuzz target for storage configuration: the `storage-config` secret an operator mounts, and
//! the path and key a registration names in it. See docs/fuzzing.md; the AFL++ binary in `fuzz/`
//! and the corpus replay in this crate's tests call [`storage_config`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::location::{Location, resolve};
use crate::storage::StorageConfig;

/// Fields any storage document may hold a credential in, listed here independently of the
/// redaction's own list so that one dropped from it is caught.
const CREDENTIALS: &[&str] = &[
    "access_key_id",
    "secret_access_key",
    "session_token",
    "token",
    "private_key",
    "client_secret",
    "account_key",
    "connection_string",
    "sas_token",
    "headers",
];

/// `config`, NUL, a registration's path, NUL, its `ModelInfo.key` (absent without the second NUL).
/// The configuration is read as a file, as `--storage-config FILE` reads it. Nothing may panic; no
/// entry's `Debug` may show a credential; a remote location must name a bucket and an object path
/// that cannot climb out of it.
pub fn storage_config(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let config_text = parts.next().unwrap_or_default();
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let key = parts.next().map(|k| String::from_utf8_lossy(k).into_owned());

    static NEXT: AtomicU64 = AtomicU64::new(0);
    let file = std::env::temp_dir().join(format!(
        "densemesh-fuzz-storage-{}-{}.json",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&file, config_text).expect("a scratch file");
    let loaded = StorageConfig::load(&file);
    let _ = std::fs::remove_file(&file);
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            StorageConfig::default()
        }
    };
    for name in config.keys() {
        let entry = config.get(name).expect("a listed key");
        let shown = format!("{entry:?}");
        for field in CREDENTIALS {
            if entry.get(field).is_some() || entry.object(field).is_some() {
                assert!(
                    shown.contains(&format!("{field:?}: \"<redacted>\"")),
                    "{field} of {name} shows: {shown}"
                );
            }
        }
    }
    match resolve(&path, key.as_deref(), &config) {
        Ok(Location::Remote(remote)) => {
            assert!(!remote.bucket.is_empty());
            let object = remote.path.as_ref();
            assert!(!object.is_empty());
            assert!(
                object.split('/').all(|part| !part.is_empty() && part != "." && part != ".."),
                "{object:?}"
            );
            assert!(remote.uri().ends_with(object));
        }
        Ok(Location::Local(_)) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[cfg(test)]
mod tests {
    include!("../../fuzz/replay.rs");

    #[test]
    fn corpus_storage_config_replays() {
        replay("storage_config", super::storage_config);
    }
}
