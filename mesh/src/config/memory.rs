//! The memory a `--capacity` share is of: the container's memory limit (cgroup v2 `memory.max`, else
//! cgroup v1 `memory.limit_in_bytes`), or the machine's memory when the container has no limit.
//!
//! A limit written as `max`, or one at least the machine's memory (cgroup v1 writes a number near
//! 2^63 for "no limit"), is no limit.

use std::path::{Path, PathBuf};

/// Where the figures are read (the real paths in [`MemorySources::system`]; temporary files in tests).
#[derive(Debug, Clone)]
pub struct MemorySources {
    pub cgroup_v2_max: PathBuf,
    pub cgroup_v1_limit: PathBuf,
    pub meminfo: PathBuf,
}

/// The memory a share is of, and where the figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// The container's cgroup limit.
    Cgroup(u64),
    /// No cgroup limit: the machine's memory.
    Physical(u64),
}

impl MemoryLimit {
    pub fn bytes(self) -> u64 {
        match self {
            MemoryLimit::Cgroup(bytes) | MemoryLimit::Physical(bytes) => bytes,
        }
    }
}

impl MemorySources {
    /// This machine's.
    pub fn system() -> Self {
        Self {
            cgroup_v2_max: "/sys/fs/cgroup/memory.max".into(),
            cgroup_v1_limit: "/sys/fs/cgroup/memory/memory.limit_in_bytes".into(),
            meminfo: "/proc/meminfo".into(),
        }
    }

    /// The container's limit if it has one below the machine's memory, else the machine's memory.
    pub fn limit(&self) -> std::io::Result<MemoryLimit> {
        let physical = physical_memory(&std::fs::read_to_string(&self.meminfo)?).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no MemTotal line in {}", self.meminfo.display()),
            )
        })?;
        let cgroup =
            [&self.cgroup_v2_max, &self.cgroup_v1_limit].into_iter().find_map(|path| read_limit(path));
        Ok(match cgroup.flatten() {
            Some(limit) if limit < physical => MemoryLimit::Cgroup(limit),
            _ => MemoryLimit::Physical(physical),
        })
    }
}

/// A cgroup limit file: `None` when it cannot be read (that cgroup version is not mounted),
/// `Some(None)` when it says there is no limit.
fn read_limit(path: &Path) -> Option<Option<u64>> {
    std::fs::read_to_string(path).ok().map(|text| cgroup_limit(&text))
}

/// A cgroup limit file's content: bytes, or `None` for `max` or anything unreadable.
fn cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn physical_memory(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       16384 kB\nMemFree:        1024 kB\n";

    fn sources(dir: &Path, v2: Option<&str>, v1: Option<&str>) -> MemorySources {
        let write = |name: &str, text: Option<&str>| {
            let path = dir.join(name);
            if let Some(text) = text {
                std::fs::write(&path, text).unwrap();
            }
            path
        };
        MemorySources {
            cgroup_v2_max: write("memory.max", v2),
            cgroup_v1_limit: write("memory.limit_in_bytes", v1),
            meminfo: write("meminfo", Some(MEMINFO)),
        }
    }

    #[test]
    fn the_limit_is_the_cgroups_when_it_has_one_else_the_machines_memory() {
        let physical = 16384 * 1024;
        let cases = [
            ("v2 limit", Some("8192\n"), None, MemoryLimit::Cgroup(8192)),
            ("v2 without a limit", Some("max\n"), None, MemoryLimit::Physical(physical)),
            ("v1 limit", None, Some("4096\n"), MemoryLimit::Cgroup(4096)),
            ("v1's no-limit figure", None, Some("9223372036854771712\n"), MemoryLimit::Physical(physical)),
            (
                "a limit above the machine's memory",
                Some("99999999999"),
                None,
                MemoryLimit::Physical(physical),
            ),
            ("v2 first", Some("1000"), Some("2000"), MemoryLimit::Cgroup(1000)),
            ("no cgroup at all", None, None, MemoryLimit::Physical(physical)),
        ];
        for (case, v2, v1, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(sources(dir.path(), v2, v1).limit().unwrap(), want, "{case}");
        }
    }

    #[test]
    fn an_unreadable_machine_memory_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sources(dir.path(), Some("max"), None);
        std::fs::write(&s.meminfo, "MemFree: 1 kB\n").unwrap();
        let e = s.limit().unwrap_err().to_string();
        assert!(e.contains("MemTotal") && e.contains("meminfo"), "{e}");
        s.meminfo = dir.path().join("absent");
        assert!(s.limit().is_err());
    }

    #[test]
    fn meminfo_and_limit_files_parse() {
        assert_eq!(physical_memory(MEMINFO), Some(16384 * 1024));
        assert_eq!(physical_memory("MemTotal: 12 MB\n"), None);
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit(" 123\n"), Some(123));
    }
}
