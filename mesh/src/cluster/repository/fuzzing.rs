//! The fuzz target for the repository scanner: whatever an operator (or a sync job) leaves in
//! `--model-repo`. See [`crate::fuzzing`].

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use densemesh_puller::MODEL_FILES;

use super::{repository_spec_path, resolve_repository_path, scan};

/// Entries made from one input at most; each costs a few system calls.
const MAX_ENTRIES: usize = 24;

/// Builds a directory from `data`, one entry per line, and scans it as the repository sync does.
/// A line is a kind byte then a path of `/`-separated names: `d` a directory, `l` a symlink to the
/// text after `>` (a relative path, which may climb back to the root with `..` but never above it,
/// so a link can loop or dangle but never leave the directory), anything else a file holding the
/// line. Every model the scan reports must be a directory entry of the root with a known format,
/// listed once, in order, reachable through its `repo:` path; no `repo:` path may leave the root; and
/// a second scan of the unchanged directory must report the same models and generations.
pub fn repository_layout(data: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir().join(format!(
        "densemesh-fuzz-repo-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&root).expect("a scratch directory");
    let spec_paths = build(&root, data);
    check(&root, &spec_paths);
    let _ = std::fs::remove_dir_all(&root);
}

/// Writes the entries; returns each line's path as a `repo:` spec path would name it.
fn build(root: &Path, data: &[u8]) -> Vec<String> {
    let mut spec_paths = Vec::new();
    for line in data.split(|b| *b == b'\n').take(MAX_ENTRIES) {
        let Some((&kind, rest)) = line.split_first() else { continue };
        let (path, target) = match rest.iter().position(|b| *b == b'>') {
            Some(at) if kind == b'l' => (&rest[..at], Some(&rest[at + 1..])),
            _ => (rest, None),
        };
        spec_paths.push(format!("repo:{}", String::from_utf8_lossy(path)));
        let parts = names(path);
        let Some((last, parents)) = parts.split_last() else { continue };
        let dir = parents.iter().fold(root.to_owned(), |dir, name| dir.join(name));
        // Creation fails where a file or a dangling link already stands in the way: the layout is
        // what could be made, which is all the scanner can see anyway.
        if std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        let entry = dir.join(last);
        let _ = match (kind, target) {
            (b'd', _) => std::fs::create_dir_all(&entry),
            (b'l', Some(target)) => {
                let climb = target.iter().take_while(|b| **b == b'.').count().min(2 * parents.len()) / 2;
                let mut link = PathBuf::new();
                for _ in 0..climb {
                    link.push("..");
                }
                link.extend(names(target));
                if link.as_os_str().is_empty() {
                    link.push(".");
                }
                std::os::unix::fs::symlink(link, &entry)
            }
            _ => std::fs::write(&entry, line),
        };
    }
    spec_paths
}

/// The plain names of a path: no empty name, `.`, `..`, or NUL, at most 4 deep and 64 bytes each.
fn names(path: &[u8]) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    path.split(|b| *b == b'/')
        .filter(|name| !name.is_empty() && *name != b"." && *name != b".." && !name.contains(&0))
        .take(4)
        .map(|name| std::ffi::OsStr::from_bytes(&name[..name.len().min(64)]).to_string_lossy().into_owned())
        .collect()
}

fn check(root: &Path, spec_paths: &[String]) {
    let found = scan(root).expect("a readable root scans");
    let ids: Vec<_> = found.models.iter().map(|(id, _, _)| id.clone()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids unsorted or repeated: {ids:?}");
    for (id, _, format) in &found.models {
        assert!(MODEL_FILES.iter().any(|(_, f)| f == format), "{id}: format {format:?}");
        assert!(std::fs::symlink_metadata(root.join(id.as_str())).is_ok(), "{id} is not in the root");
        let resolved =
            resolve_repository_path(root, &repository_spec_path(id)).expect("a repo: path resolves");
        assert_eq!(resolved, root.join(id.as_str()));
    }
    for spec_path in spec_paths {
        if let Ok(resolved) = resolve_repository_path(root, spec_path) {
            let rest = resolved.strip_prefix(root).expect("a repo: path stays under the root");
            assert!(
                rest.components().all(|c| matches!(c, Component::Normal(_))),
                "{spec_path} gave {resolved:?}"
            );
        }
    }
    let again = scan(root).expect("a readable root scans");
    assert_eq!(again.models, found.models, "a second scan of the same directory differs");
}
