//! Resident memory of this process, to measure what a loaded model really costs.

/// Resident set size in bytes, from `/proc/self/statm`; `None` where that is unavailable.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// Linux's page size on every platform densemesh targets (x86-64, aarch64 with 4 KiB pages).
fn page_size() -> u64 {
    4096
}
