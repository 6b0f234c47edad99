//! The trade-off behind `SessionPolicy`: lean against default session options on small, medium and
//! large MLPs, in KiB per loaded model, µs per inference (batch 1 and 64) and load ms.
//! `cargo bench -p densemesh-runtime-ort --bench profiles` (with `source scripts/env.sh`).
//!
//! Every (model, profile) pair runs in its own process (ONNX Runtime allows one environment per
//! process, and freed memory must not be reused by the next pair): this binary starts itself with
//! `--size NAME --profile lean|full` and prints one row each.

// The tiny evaluator's tests write MLPs byte by byte; the same writer makes these models.
#[path = "../../tiny/tests/common/mlp.rs"]
#[allow(dead_code)]
mod mlp;

use std::process::Command;
use std::time::Instant;

use densemesh_runtime_core::{InferRequest, LoadedModel};
use densemesh_runtime_ort::{OrtConfig, OrtRuntime, SessionPolicy};

/// (name, layer widths, copies loaded, requests timed per batch size)
const SIZES: [(&str, &[u64], usize, usize); 3] = [
    ("small", &[16, 32, 4], 1_000, 20_000),
    ("medium", &[128, 256, 256, 10], 100, 5_000),
    ("large", &[512, 1024, 1024, 10], 4, 400),
];

fn anonymous_resident_bytes() -> u64 {
    densemesh_runtime_ort::release_free_heap();
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux");
    let pages: Vec<u64> = statm.split_whitespace().map(|f| f.parse().expect("a number")).collect();
    (pages[1] - pages[2]) * 4096
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn measure(size: &str, lean: bool) {
    let (_, dims, copies, requests) = SIZES.iter().find(|s| s.0 == size).copied().expect("a known size");
    let policy = SessionPolicy { lean_below_bytes: if lean { u64::MAX } else { 0 } };
    let config = OrtConfig { intra_threads: 1, ..OrtConfig::default() };
    let runtime = OrtRuntime::with_policy(&config, policy).expect("onnxruntime starts");
    let files: Vec<Vec<u8>> = (0..copies as u64).map(|seed| mlp::mlp(dims, seed + 1)).collect();
    let file_kib = files[0].len() as f64 / 1024.0;
    let before = anonymous_resident_bytes();
    let started = Instant::now();
    let models: Vec<Box<dyn LoadedModel>> = files
        .into_iter()
        .enumerate()
        .map(|(i, f)| runtime.load_from_memory(&format!("m{i}"), f).expect("loads"))
        .collect();
    let load_ms = started.elapsed().as_secs_f64() * 1e3 / copies as f64;
    let loaded = anonymous_resident_bytes().saturating_sub(before);
    let width = dims[0] as usize;
    let mut us = Vec::new();
    for batch in [1, 64] {
        let x = mlp::input(batch, width, 7);
        for m in &models {
            m.infer(InferRequest { inputs: vec![x.clone()], outputs: vec![] }).expect("runs");
        }
        let started = Instant::now();
        for i in 0..requests {
            let out = models[i % copies].infer(InferRequest { inputs: vec![x.clone()], outputs: vec![] });
            std::hint::black_box(out.expect("runs"));
        }
        us.push(started.elapsed().as_secs_f64() * 1e6 / requests as f64);
    }
    let ran = anonymous_resident_bytes().saturating_sub(before);
    let kib = |b: u64| b as f64 / copies as f64 / 1024.0;
    println!(
        "| {size} {dims:?}, {file_kib:.0} KiB file, x{copies} | {} | {:.0} / {:.0} | {:.1} | {:.1} | {:.3} |",
        if lean { "lean" } else { "default" },
        kib(loaded),
        kib(ran),
        us[0],
        us[1],
        load_ms
    );
}

fn main() {
    if let (Some(size), Some(profile)) = (arg("--size"), arg("--profile")) {
        measure(&size, profile == "lean");
        return;
    }
    let me = std::env::current_exe().expect("this binary");
    println!(
        "| model | session options | KiB per model after load / after running | µs batch 1 | µs batch 64 | load ms |"
    );
    println!("|---|---|---|---|---|---|");
    for (size, ..) in SIZES {
        for profile in ["full", "lean"] {
            let status = Command::new(&me).args(["--size", size, "--profile", profile]).status();
            assert!(status.is_ok_and(|s| s.success()), "{size} {profile} failed");
        }
    }
}
