//! The management API's optional bearer token (`--admin-token-file`). `registerModel`, `setVModel` and
//! the Admin service change what the mesh serves, so where a token file is given they answer only calls
//! that carry `authorization: Bearer <token>`; inference stays open. The file is read again when it
//! changes, so a token is rotated without a restart. The token never appears in a log or an answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the admin token file {path} (--admin-token-file): {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the admin token file {0} (--admin-token-file) is empty")]
    Empty(PathBuf),
    #[error(
        "the admin token in {0} (--admin-token-file) has characters a header cannot carry: use printable ASCII without spaces"
    )]
    NotPrintable(PathBuf),
}

/// The token in force, re-read from its file when the file's modification time changes.
#[derive(Clone)]
pub struct AdminToken {
    path: Arc<PathBuf>,
    current: Arc<Mutex<(Option<SystemTime>, Vec<u8>)>>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken").field("path", &self.path).finish_non_exhaustive()
    }
}

impl AdminToken {
    /// Reads the token (surrounding whitespace, a trailing newline included, is not part of it).
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let (modified, token) = read(path)?;
        Ok(Self { path: Arc::new(path.to_owned()), current: Arc::new(Mutex::new((modified, token))) })
    }

    /// The token now: re-read if the file changed. A file that became unreadable or empty keeps the
    /// last good token in force (a half-written rotation must not open the API), and says so.
    fn token(&self) -> Vec<u8> {
        let modified = std::fs::metadata(&*self.path).and_then(|m| m.modified()).ok();
        let mut current = self.current.lock();
        if modified.is_some() && modified != current.0 {
            match read(&self.path) {
                Ok(fresh) => {
                    tracing::info!(path = %self.path.display(), "admin token file changed: the new token is in force");
                    *current = fresh;
                }
                Err(e) => tracing::warn!(error = %e, "keeping the previous admin token"),
            }
        }
        current.1.clone()
    }

    /// The `authorization` value that carries the token now, for calls this pod makes to its peers.
    pub fn bearer(&self) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
        let token = String::from_utf8(self.token()).ok()?;
        format!("Bearer {token}").parse().ok()
    }

    /// `Ok` for a call carrying this token; UNAUTHENTICATED, naming what is missing, otherwise.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(given) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "this call needs the management API token: send `authorization: Bearer <token>` (meshd --admin-token-file)",
            ));
        };
        let given = given.as_bytes();
        let token = self.token();
        let bearer = given.len() > 7 && given[..7].eq_ignore_ascii_case(b"bearer ");
        if bearer && constant_time_eq(given[7..].trim_ascii(), &token) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "the management API token sent is not the one meshd holds (--admin-token-file)",
            ))
        }
    }
}

fn read(path: &Path) -> Result<(Option<SystemTime>, Vec<u8>), TokenError> {
    let error = |source| TokenError::Read { path: path.to_owned(), source };
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).map_err(error)?;
    let bytes = std::fs::read(path).map_err(error)?;
    let token = bytes.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_owned()));
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable(path.to_owned()));
    }
    Ok((Some(modified), token))
}

/// Equality whose time does not depend on where the first difference is (only on the lengths).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    fn call(authorization: Option<&str>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Some(value) = authorization {
            metadata.insert("authorization", value.parse().unwrap());
        }
        metadata
    }

    #[test]
    fn only_the_token_in_the_file_opens_the_api_and_no_answer_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t-t0ken\n").unwrap();
        let token = AdminToken::open(&path).unwrap();
        assert!(token.check(&call(Some("Bearer s3cr3t-t0ken"))).is_ok());
        assert!(token.check(&call(Some("bearer s3cr3t-t0ken"))).is_ok(), "the scheme is case-insensitive");
        for wrong in
            [None, Some("Bearer nope"), Some("s3cr3t-t0ken"), Some("Basic s3cr3t-t0ken"), Some("Bearer ")]
        {
            let status = token.check(&call(wrong)).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{wrong:?}");
            assert!(status.message().contains("--admin-token-file"), "{status:?}");
            assert!(!status.message().contains("s3cr3t"), "the answer shows the token: {status:?}");
        }
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_rotated_token_takes_over_and_a_broken_rotation_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first").unwrap();
        let token = AdminToken::open(&path).unwrap();
        // Modification times can be coarse: make sure the rewrite is seen as a change.
        let later = |p: &Path| {
            let file = std::fs::File::options().write(true).open(p).unwrap();
            file.set_modified(SystemTime::now() + Duration::from_secs(5)).unwrap();
        };
        std::fs::write(&path, "second").unwrap();
        later(&path);
        assert!(token.check(&call(Some("Bearer second"))).is_ok());
        assert!(token.check(&call(Some("Bearer first"))).is_err());
        std::fs::write(&path, "  \n").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(10)).unwrap();
        assert!(token.check(&call(Some("Bearer second"))).is_ok(), "an emptied file does not open the API");
        assert!(token.check(&call(None)).is_err());
    }

    #[test]
    fn a_missing_or_empty_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(AdminToken::open(&dir.path().join("none")), Err(TokenError::Read { .. })));
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        assert!(matches!(AdminToken::open(&dir.path().join("empty")), Err(TokenError::Empty(_))));
        std::fs::write(dir.path().join("spaced"), "two words").unwrap();
        assert!(matches!(AdminToken::open(&dir.path().join("spaced")), Err(TokenError::NotPrintable(_))));
    }
}
