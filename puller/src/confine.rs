//! Local model paths confined to a set of roots. Whoever can call the management API can name a
//! local path; without a bound that is any file the process can read, and the answers would tell the
//! caller which paths exist. A path is judged after `..` and symlinks are resolved, and one outside
//! every root is refused the same way whether or not it exists.

use std::path::{Component, Path, PathBuf};

/// The roots, each with its symlinks resolved where it exists (a root is compared as the real place
/// it names).
#[derive(Debug, Clone)]
pub(crate) struct Roots(Vec<PathBuf>);

impl Roots {
    pub fn new(roots: &[PathBuf]) -> Self {
        Self(roots.iter().map(|r| real(r)).collect())
    }

    /// Where `path` really is, if that is inside a root; `None` otherwise.
    pub fn confine(&self, path: &Path) -> Option<PathBuf> {
        let lexical = lexical(path);
        // Every first request of a repository model comes here: a path under a root as written, with
        // no symlink below the root, is where it says, which one `lstat` per component below the root
        // shows. Resolving it from `/` took a `readlink` per component and a `stat`.
        if let Some(plain) = self.0.iter().find_map(|root| plain_below(root, &lexical)) {
            return Some(plain);
        }
        let real = resolve(lexical);
        self.0.iter().any(|root| real.starts_with(root)).then_some(real)
    }

    /// The roots, for messages.
    pub fn shown(&self) -> String {
        self.0.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// `path` made absolute, with `.` and `..` applied and the symlinks of its longest existing prefix
/// resolved (the rest cannot be a symlink: it does not exist).
fn real(path: &Path) -> PathBuf {
    resolve(lexical(path))
}

/// `path` made absolute, with `.` and `..` applied as names (no symlink is looked at).
fn lexical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut lexical = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            other => lexical.push(other),
        }
    }
    lexical
}

/// `lexical` itself when it lies under `root` (a real path) with no symlink among the components
/// below it; `None` when it does not, or when that takes more than `lstat`s to tell.
fn plain_below(root: &Path, lexical: &Path) -> Option<PathBuf> {
    let rest = lexical.strip_prefix(root).ok()?;
    let mut at = root.to_path_buf();
    for part in rest.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => return None,
            Ok(_) => {}
            // Nothing below a missing name exists, so nothing there is a symlink.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(_) => return None,
        }
    }
    Some(lexical.to_owned())
}

/// `lexical` with the symlinks of its longest existing prefix resolved.
fn resolve(lexical: PathBuf) -> PathBuf {
    let mut existing = lexical.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(resolved) = existing.canonicalize() {
            // What follows may hold `..` again only as a name that did not exist: none is left.
            return rest.iter().rev().fold(resolved, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_judged_where_they_really_lead() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let (root, outside) = (base.join("models"), base.join("secret"));
        std::fs::create_dir_all(root.join("m")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("key"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("m"), base.join("link-in")).unwrap();
        let roots = Roots::new(std::slice::from_ref(&root));

        assert_eq!(
            roots.confine(&root.join("m/model.onnx")),
            Some(root.join("m/model.onnx")),
            "not there yet"
        );
        assert_eq!(roots.confine(&root.join("m/../m/./x")), Some(root.join("m/x")));
        assert_eq!(roots.confine(&base.join("link-in/x")), Some(root.join("m/x")), "a link into a root");
        // A link inside a root is followed, not taken at its word, even where it stays inside.
        std::os::unix::fs::symlink(root.join("m"), root.join("alias")).unwrap();
        assert_eq!(roots.confine(&root.join("alias/x")), Some(root.join("m/x")));
        // A file named as a directory is not found anywhere; the answer is the same either way.
        std::fs::write(root.join("m/model.onnx"), "x").unwrap();
        assert_eq!(roots.confine(&root.join("m/model.onnx/x")), Some(root.join("m/model.onnx/x")));
        for refused in [
            outside.join("key"),
            outside.join("missing"),
            root.join("../secret/key"),
            root.join("escape/key"),
            root.join("escape/missing"),
            root.join("m/../../secret"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("/"),
        ] {
            assert_eq!(roots.confine(&refused), None, "{}", refused.display());
        }
        // A root given through a symlink is the place it names.
        let via_link = Roots::new(&[base.join("link-in")]);
        assert_eq!(via_link.confine(&root.join("m/x")), Some(root.join("m/x")));
    }
}
