//! KiB per loaded model, µs per inference and load ms for ONNX Runtime sessions with default options,
//! lean ONNX Runtime sessions and the tiny evaluator, on 2,000 distinct tiny MLPs (16→32→4), in the
//! form of issue 15's table. `cargo bench -p densemesh-runtime-tiny --bench density [-- --models N]`
//! (with `source scripts/env.sh` for onnxruntime).
//!
//! Each option runs in its own process (ONNX Runtime allows one environment per process, and one
//! option's freed memory must not be reused by the next): this binary starts itself once per option
//! with `--option NAME` and prints the rows. Memory is the anonymous resident set after handing free
//! heap back, before and after loading every model, and again after each has run once (ONNX
//! Runtime's arena grows on the first run). A second part times candle-core's matmul on the same
//! shapes against the evaluator's loop, which is why the evaluator does not use it.

#[path = "../tests/common/mlp.rs"]
#[allow(dead_code)]
mod mlp;

use std::process::Command;
use std::time::Instant;

use densemesh_runtime_core::{InferRequest, LoadedModel, Runtime};
use densemesh_runtime_ort::{OrtConfig, OrtRuntime, SessionPolicy};
use densemesh_runtime_tiny::TinyRuntime;

const DIMS: [u64; 3] = [16, 32, 4];
const REQUESTS: usize = 50_000;

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

/// Loads `count` models with `runtime`, runs each once, then times requests over all of them.
fn measure(name: &str, runtime: &dyn Runtime, count: usize) {
    let files: Vec<Vec<u8>> = (0..count as u64).map(|seed| mlp::mlp(&DIMS, seed + 1)).collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let paths: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let path = dir.path().join(format!("m{i}.onnx"));
            std::fs::write(&path, f).expect("written");
            path
        })
        .collect();
    drop(files);
    let before = anonymous_resident_bytes();
    let started = Instant::now();
    let models: Vec<Box<dyn LoadedModel>> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let request = densemesh_runtime_core::LoadRequest::from_path(format!("m{i}"), p);
            runtime.load(&request).expect("loads")
        })
        .collect();
    let load_ms = started.elapsed().as_secs_f64() * 1e3 / count as f64;
    let loaded = anonymous_resident_bytes().saturating_sub(before);
    let x = mlp::input(1, DIMS[0] as usize, 7);
    for m in &models {
        m.infer(InferRequest { inputs: vec![x.clone()], outputs: vec![] }).expect("runs");
    }
    let ran = anonymous_resident_bytes().saturating_sub(before);
    let started = Instant::now();
    for i in 0..REQUESTS {
        let out = models[i % count].infer(InferRequest { inputs: vec![x.clone()], outputs: vec![] });
        std::hint::black_box(out.expect("runs"));
    }
    let us = started.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64;
    let charged = models.iter().map(|m| m.size_bytes()).sum::<u64>() as f64 / count as f64 / 1024.0;
    let kib = |b: u64| b as f64 / count as f64 / 1024.0;
    println!(
        "| {name} | {:.1} after load, {:.1} after the first run | {us:.1} | {load_ms:.3} | {charged:.1} |",
        kib(loaded),
        kib(ran)
    );
}

/// µs per 1×16 · 16×32 product: candle-core's `matmul` against a plain loop like the evaluator's.
fn matmul_speed() {
    use candle_core::{Device, Tensor};
    let (k, n) = (16usize, 32usize);
    let a: Vec<f32> = (0..k).map(|i| i as f32 * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let weights = Tensor::from_vec(b.clone(), (k, n), &Device::Cpu).expect("a tensor");
    let rounds = 20_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let x = Tensor::from_slice(&a, (1, k), &Device::Cpu).expect("a tensor");
        let y = x.matmul(&weights).expect("matmul").to_vec2::<f32>().expect("values");
        std::hint::black_box(y);
    }
    let candle = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut out = vec![0f32; n];
        for p in 0..k {
            for (o, w) in out.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *o += a[p] * w;
            }
        }
        std::hint::black_box(out);
    }
    let plain = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    println!(
        "1x16 . 16x32 matmul: candle-core {candle:.2} us (RAYON_NUM_THREADS={threads}), plain loop {plain:.3} us"
    );
}

fn main() {
    let count: usize = arg("--models").and_then(|n| n.parse().ok()).unwrap_or(2_000);
    match arg("--option").as_deref() {
        Some("ort-default" | "ort-lean") => {
            let lean = arg("--option").as_deref() == Some("ort-lean");
            let policy = SessionPolicy { lean_below_bytes: if lean { u64::MAX } else { 0 } };
            let config = OrtConfig { intra_threads: 1, ..OrtConfig::default() };
            let runtime = OrtRuntime::with_policy(&config, policy).expect("onnxruntime starts");
            let name = if lean {
                "ORT, CPU arena off, memory pattern off, basic optimisation (1 thread)"
            } else {
                "ORT session, defaults (1 thread)"
            };
            measure(name, &runtime, count);
        }
        Some("tiny") => measure("tiny evaluator (densemesh-runtime-tiny)", &TinyRuntime::default(), count),
        Some("matmul") => matmul_speed(),
        Some(other) => panic!("unknown option {other}"),
        None => {
            let me = std::env::current_exe().expect("this binary");
            println!(
                "{count} distinct {DIMS:?} MLPs, one process per option, {REQUESTS} requests of batch 1\n"
            );
            println!(
                "| option | KiB per loaded model | µs per inference | load ms per model | KiB charged |"
            );
            println!("|---|---|---|---|---|");
            for option in ["ort-default", "ort-lean", "tiny"] {
                let status =
                    Command::new(&me).args(["--option", option, "--models", &count.to_string()]).status();
                assert!(status.is_ok_and(|s| s.success()), "{option} failed");
            }
            println!();
            for threads in [Some("1"), None] {
                let mut child = Command::new(&me);
                child.args(["--option", "matmul"]);
                match threads {
                    Some(t) => child.env("RAYON_NUM_THREADS", t),
                    None => child.env_remove("RAYON_NUM_THREADS"),
                };
                assert!(child.status().is_ok_and(|s| s.success()), "matmul failed");
            }
        }
    }
}
