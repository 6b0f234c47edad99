//! Cached model files handed to the runtime as memory maps: no copy into a heap buffer, and
//! pre-faulted (`MAP_POPULATE`), since demand-faulting a model 4 KiB at a time is many times slower
//! than one `read()`.

use std::path::Path;

/// A read-only, pre-faulted mapping of a cache file.
pub struct Mapped {
    map: memmap2::Mmap,
}

impl Mapped {
    /// Maps a file of the disk cache. Blocking: pre-faulting reads the whole file.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        // SAFETY: a mapping is undefined behaviour if the file changes underneath it. Cache files are
        // written under a temporary name, published by rename and never written again; eviction
        // unlinks them (the mapping keeps the inode alive) and waits for no pin to be held first.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file)? };
        Ok(Self { map })
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped").field("len", &self.map.len()).finish()
    }
}
