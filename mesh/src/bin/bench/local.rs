//! Runs without a server: the same request through ONNX Runtime in this process (the floor any server
//! adds its latency to), and the load time of a model from disk against from bytes already in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use densemesh_loadgen as loadgen;
use densemesh_runtime_core::{InferRequest, LoadRequest, LoadedModel, Runtime};
use densemesh_runtime_ort::{OrtConfig, OrtRuntime};
use hdrhistogram::Histogram;

use crate::figures::{self, Errors};

/// One in-process load run.
#[derive(Debug, Clone)]
pub struct LocalLoad {
    pub model_file: PathBuf,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub batch: i64,
}

/// Loads the model and runs `concurrency` threads calling `LoadedModel::infer` in a closed loop.
/// The threads share one loaded model, as a server's requests do; ONNX Runtime sessions run one
/// request at a time here (the session is behind a lock), so more threads than one queue on it.
pub fn inproc(load: &LocalLoad) -> anyhow::Result<(Histogram<u64>, Errors)> {
    let runtime = OrtRuntime::new(&OrtConfig::default()).context("starting onnxruntime")?;
    let model: Arc<dyn LoadedModel> = runtime
        .load(&LoadRequest::from_path("bench", load.model_file.clone()))
        .with_context(|| format!("loading {}", load.model_file.display()))?
        .into();
    let inputs = loadgen::synthetic_inputs(&model.metadata().inputs, load.batch);
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let stop = measure_from + load.duration;
    let threads: Vec<_> = (0..load.concurrency.max(1))
        .map(|_| {
            let (model, inputs) = (model.clone(), inputs.clone());
            std::thread::spawn(move || {
                let (mut h, mut errors) = (figures::histogram(), Errors::default());
                loop {
                    let sent = Instant::now();
                    if sent >= stop {
                        break;
                    }
                    // Cloning the inputs is part of a request's cost (a server gets them owned too).
                    let result = model.infer(InferRequest { inputs: inputs.clone(), outputs: vec![] });
                    let took = sent.elapsed();
                    let measuring = sent >= measure_from;
                    match result {
                        Ok(_) if measuring => figures::record(&mut h, took),
                        Ok(_) => {}
                        Err(e) => errors.record(measuring, || e.to_string()),
                    }
                }
                (h, errors)
            })
        })
        .collect();
    let (mut total, mut errors) = (figures::histogram(), Errors::default());
    for t in threads {
        let (h, e) = t.join().map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?;
        total.add(&h).context("merging histograms")?;
        errors.merge(e);
    }
    Ok((total, errors))
}

/// Median load times of one model file.
#[derive(Debug, serde::Serialize)]
pub struct ColdLoad {
    pub model_file: String,
    pub bytes: u64,
    pub repeat: usize,
    /// `OrtRuntime::load`: read the file, then build the session.
    pub disk_ms: f64,
    pub disk_min_ms: f64,
    pub disk_max_ms: f64,
    /// `OrtRuntime::load_from_memory` with the bytes read beforehand (not timed).
    pub memory_ms: f64,
    pub memory_min_ms: f64,
    pub memory_max_ms: f64,
    /// Whether the page cache was dropped before every load from disk (needs root); if not, "disk"
    /// means the page cache.
    pub page_cache_dropped: bool,
}

/// Drops the page cache when allowed, so "from disk" means the disk; says whether it could.
pub fn drop_page_cache() -> bool {
    // Dirty pages survive a drop; std has no sync(2), the command does it.
    let synced = std::process::Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

pub fn cold_load(model_file: &Path, repeat: usize) -> anyhow::Result<ColdLoad> {
    let runtime = OrtRuntime::new(&OrtConfig::default()).context("starting onnxruntime")?;
    let bytes =
        std::fs::metadata(model_file).with_context(|| format!("reading {}", model_file.display()))?.len();
    let (mut disk, mut memory) = (Vec::new(), Vec::new());
    let mut dropped = true;
    for _ in 0..repeat.max(1) {
        dropped &= drop_page_cache();
        let t = Instant::now();
        let model = runtime.load(&LoadRequest::from_path("from-disk", model_file))?;
        disk.push(t.elapsed());
        drop(model);

        let in_memory = std::fs::read(model_file)?;
        let t = Instant::now();
        let model = runtime.load_from_memory("from-memory", in_memory)?;
        memory.push(t.elapsed());
        drop(model);
    }
    let (disk_ms, disk_min_ms, disk_max_ms) = summary(&mut disk);
    let (memory_ms, memory_min_ms, memory_max_ms) = summary(&mut memory);
    Ok(ColdLoad {
        model_file: model_file.display().to_string(),
        bytes,
        repeat: disk.len(),
        disk_ms,
        disk_min_ms,
        disk_max_ms,
        memory_ms,
        memory_min_ms,
        memory_max_ms,
        page_cache_dropped: dropped,
    })
}

/// Median, min and max in milliseconds.
fn summary(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

pub fn print_cold_load(c: &ColdLoad) {
    let cache = if c.page_cache_dropped {
        "page cache dropped before each"
    } else {
        "page cache WARM: could not drop it"
    };
    println!(
        "{:<14}{:>10}{:>12}{:>12}{:>12}  {}",
        "cold-load", "MB", "median ms", "min ms", "max ms", c.model_file
    );
    println!(
        "{:<14}{:>10.1}{:>12.1}{:>12.1}{:>12.1}  ({cache})",
        "  from disk",
        c.bytes as f64 / 1e6,
        c.disk_ms,
        c.disk_min_ms,
        c.disk_max_ms
    );
    println!(
        "{:<14}{:>10.1}{:>12.1}{:>12.1}{:>12.1}  (bytes read beforehand)",
        "  from memory",
        c.bytes as f64 / 1e6,
        c.memory_ms,
        c.memory_min_ms,
        c.memory_max_ms
    );
    println!("{}", serde_json::json!({ "run": { "kind": "cold-load" }, "figures": c }));
}
