//! Pull throughput: an object from storage into an empty disk cache, against a plain `read()` of the
//! same bytes from a local file (warm page cache: the best a local disk can do), and the cost of
//! mapping the cached file pre-faulted (what a load from the disk cache pays before the runtime).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use densemesh_puller::{PullConfig, Puller};

pub struct PullArgs {
    pub location: String,
    pub key: Option<String>,
    pub storage_config: Option<PathBuf>,
    pub local_file: PathBuf,
    pub repeat: usize,
    /// Objects of at least twice this many MiB are fetched in ranges of this size (PullConfig).
    pub range_mib: u64,
    pub parallel: usize,
}

#[derive(Debug, serde::Serialize)]
struct PullFigures {
    location: String,
    bytes: u64,
    pull_mb_per_s: f64,
    pull_seconds: Vec<f64>,
    read_mb_per_s: f64,
    map_populate_mb_per_s: f64,
    pull_vs_read: f64,
}

pub fn run(args: &PullArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut pulls = Vec::new();
    let mut maps = Vec::new();
    let mut bytes = 0;
    for i in 0..args.repeat.max(1) {
        let dir = std::env::temp_dir().join(format!("densemesh-pull-bench-{}-{i}", std::process::id()));
        let mut config = PullConfig::new(dir.join("cache"), u64::MAX / 2);
        config.storage_config = args.storage_config.clone();
        config.range_bytes = args.range_mib << 20;
        config.parallel = args.parallel;
        let puller: Arc<Puller> = Puller::open(config)?;
        let started = Instant::now();
        let fetched = runtime.block_on(puller.fetch(&args.location, args.key.as_deref()))?;
        pulls.push(started.elapsed());
        anyhow::ensure!(fetched.source == "remote", "expected a download, got {}", fetched.source);
        bytes = fetched.model.file_bytes;
        // What a load from the disk cache costs before the runtime sees the bytes.
        let started = Instant::now();
        let mapped = fetched.map()?;
        maps.push(started.elapsed());
        std::hint::black_box(mapped.as_ref().map(|m| m.as_ref().len()));
        drop((mapped, fetched, puller));
        std::fs::remove_dir_all(&dir)?;
    }
    let read =
        median((0..args.repeat.max(1)).map(|_| time_read(&args.local_file)).collect::<Result<_, _>>()?);
    let map = median(maps);
    let rate = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    let pull = median(pulls.clone());
    let figures = PullFigures {
        location: args.location.clone(),
        bytes,
        pull_mb_per_s: rate(pull),
        pull_seconds: pulls.iter().map(Duration::as_secs_f64).collect(),
        read_mb_per_s: rate(read),
        map_populate_mb_per_s: rate(map),
        pull_vs_read: read.as_secs_f64() / pull.as_secs_f64(),
    };
    println!(
        "pull of {} ({:.1} MB), {} MiB ranges, {} in parallel, median of {}:",
        figures.location,
        bytes as f64 / 1e6,
        args.range_mib,
        args.parallel,
        pulls.len()
    );
    println!(
        "  pull into an empty disk cache   {:>9.1} MB/s  ({:.3} s)",
        figures.pull_mb_per_s,
        pull.as_secs_f64()
    );
    println!(
        "  read() of a local copy (warm)   {:>9.1} MB/s  ({:.3} s)",
        figures.read_mb_per_s,
        read.as_secs_f64()
    );
    println!(
        "  cached file, mmap + MAP_POPULATE {:>9.1} MB/s  ({:.3} s)",
        figures.map_populate_mb_per_s,
        map.as_secs_f64()
    );
    println!("  pull ÷ read() throughput        {:>9.3}", figures.pull_vs_read);
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One `read()` of the whole file into a buffer, as a runtime loading by path does.
fn time_read(path: &Path) -> std::io::Result<Duration> {
    let started = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let took = started.elapsed();
    std::hint::black_box(&buf);
    Ok(took)
}
