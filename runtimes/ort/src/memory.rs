//! What a loaded model costs in memory: the resident-set growth while its session is built.
//!
//! Plain RSS growth misleads both ways: pages freed earlier are reused without growing the RSS (one
//! model measured 0 bytes) and pages freed during the build stay resident (the next measured three
//! times its weights). Returning free heap pages to the kernel before each reading (`malloc_trim`)
//! makes the difference the memory the session kept. `mallinfo2` was tried too: it counts glibc's main
//! arena only, and sessions are built on worker threads that allocate from others.

/// Resident set size in bytes after giving free heap pages back to the kernel.
pub fn settled_resident_bytes() -> Option<u64> {
    release_free_heap();
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// Returns free heap pages to the kernel, so memory freed by an unloaded model leaves the process.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a plain integer, walks glibc's arenas under their own locks and
        // only releases pages no allocation uses; it is safe to call from any thread at any time.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

fn page_size() -> u64 {
    4096
}
