//! A tiny model's `size_bytes` is what it holds: thousands of distinct models loaded together grow the
//! process's anonymous resident set by their summed charges, within 10%.
//!
//! Its own test binary with one test, as it reads the whole process's memory.

mod common;

use common::mlp::mlp;
use densemesh_runtime_core::LoadedModel;
use densemesh_runtime_tiny::{TinyModel, TinyRuntime};

/// Anonymous resident bytes (heap, not mapped files) after handing free heap pages back.
fn anonymous_resident_bytes() -> u64 {
    densemesh_runtime_ort::release_free_heap();
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux");
    let pages: Vec<u64> = statm.split_whitespace().map(|f| f.parse().expect("a number")).collect();
    (pages[1] - pages[2]) * 4096
}

/// (charged per model, measured growth per model) for `count` distinct models of `dims`.
fn charged_and_grown(dims: &[u64], count: u64) -> (f64, f64) {
    let runtime = TinyRuntime::default();
    // Every file made before the first reading, so only what the models keep is measured.
    let files: Vec<Vec<u8>> = (0..count).map(|seed| mlp(dims, seed + 1)).collect();
    let before = anonymous_resident_bytes();
    let models: Vec<TinyModel> = files.iter().map(|f| runtime.load_bytes(f).expect("loads")).collect();
    let grown = anonymous_resident_bytes().saturating_sub(before);
    let charged: u64 = models.iter().map(|m| m.size_bytes()).sum();
    drop(models);
    (charged as f64 / count as f64, grown as f64 / count as f64)
}

#[test]
fn charges_sum_to_the_resident_growth_within_ten_percent() {
    for (dims, count) in
        [(&[16u64, 32, 4][..], 20_000), (&[64, 128, 10][..], 2_000), (&[8, 4, 2][..], 20_000)]
    {
        let (charged, grown) = charged_and_grown(dims, count);
        let off = charged / grown - 1.0;
        eprintln!(
            "{dims:?} x{count}: charged {charged:.0} B, grew {grown:.0} B per model ({:+.1}%)",
            off * 100.0
        );
        assert!(
            off.abs() <= 0.10,
            "{dims:?}: charged {charged:.0} bytes per model, the process grew {grown:.0}"
        );
    }
}
