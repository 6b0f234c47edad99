// The corpus replay every crate's `fuzzing` tests share, brought in with `include!` (a test helper
// of four crates that have no crate in common).

/// Runs `target` on every file of `fuzz/corpus/{dir}`: the seeds, what the fuzzer kept, and the
/// inputs of crashes it found (named `crash-*`), so `cargo test` replays them all.
fn replay(dir: &str, target: fn(&[u8])) {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = manifest
        .ancestors()
        .map(|up| up.join("fuzz/corpus"))
        .find(|corpus| corpus.is_dir())
        .unwrap_or_else(|| panic!("no fuzz/corpus above {}", manifest.display()))
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", corpus.display());
    for file in files {
        let data = std::fs::read(&file).expect("a corpus file");
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            panic!("{} fails", file.display());
        }
    }
}
