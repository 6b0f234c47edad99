//! Throughput, latency and load time of all-MiniLM-L6-v2 on the candle runtime, in-process.
//!
//! Prints requests per second and the median latency for batches of 1 and 32 sentences, sent one
//! request at a time and then from 4 threads at once (the mesh runs requests concurrently on blocking
//! threads, which share the runtime's one pool), and the time of a cold load next to the time of only
//! reading the safetensors file, both with the file in the page cache, so the difference is what
//! building the model costs. Run with `cargo bench -p densemesh-runtime-candle --bench embed`.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use densemesh_runtime_candle::{CandleConfig, CandleRuntime, INPUT_NAME};
use densemesh_runtime_core::{DataType, InferRequest, LoadRequest, LoadedModel, Runtime, Tensor, TensorData};

/// How long each measurement runs, after a warm-up of a tenth of that.
const RUN: Duration = Duration::from_secs(4);

const SENTENCES: [&str; 8] = [
    "The weather is lovely today and we should go for a walk in the park.",
    "It's so sunny outside!",
    "He drove to the stadium to watch the match with his friends.",
    "Sentence embeddings map text to vectors that capture its meaning.",
    "A man is eating a piece of bread at the kitchen table.",
    "The stock market fell sharply on Monday after the announcement.",
    "Two men pushed carts through the woods.",
    "She sells sea shells by the sea shore.",
];

fn request(batch: usize) -> InferRequest {
    let strings = (0..batch).map(|i| Bytes::from_static(SENTENCES[i % SENTENCES.len()].as_bytes())).collect();
    let text = Tensor {
        name: INPUT_NAME.to_owned(),
        datatype: DataType::Bytes,
        shape: vec![batch as i64],
        data: TensorData::Strings(strings),
    };
    InferRequest { inputs: vec![text], outputs: vec![] }
}

/// Runs `batch`-sentence requests from `clients` threads for [`RUN`]; returns (requests/s, p50).
fn measure(model: &dyn LoadedModel, batch: usize, clients: usize) -> (f64, Duration) {
    let request = request(batch);
    let warm_up = Instant::now();
    while warm_up.elapsed() < RUN / 10 {
        model.infer(request.clone()).expect("inference");
    }
    let start = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let mut latencies = Vec::new();
                    while start.elapsed() < RUN {
                        let t = Instant::now();
                        model.infer(request.clone()).expect("inference");
                        latencies.push(t.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a client thread")).collect()
    });
    let elapsed = start.elapsed();
    latencies.sort();
    (latencies.len() as f64 / elapsed.as_secs_f64(), latencies[latencies.len() / 2])
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.models/all-minilm-l6-v2");
    let weights = dir.join("model.safetensors");
    assert!(weights.is_file(), "{} is missing: run scripts/setup.sh", weights.display());
    let runtime = CandleRuntime::new(&CandleConfig::default()).expect("the candle runtime starts");
    let request = LoadRequest::from_path("all-minilm-l6-v2", &weights);

    // Read once first so both timings below see the file in the page cache.
    let bytes = std::fs::read(&weights).expect("the weights are readable").len();
    let reads = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(std::fs::read(&weights).expect("the weights are readable"));
            t.elapsed()
        })
        .collect();
    let loads = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(runtime.load(&request).expect("the model loads"));
            t.elapsed()
        })
        .collect();
    let model = runtime.load(&request).expect("the model loads");
    println!(
        "all-MiniLM-L6-v2 on candle, {} pool threads; weights {:.1} MB, charged {:.1} MB",
        runtime.threads(),
        bytes as f64 / 1e6,
        model.size_bytes() as f64 / 1e6
    );
    println!("cold load: {:>8.1} ms (median of 5)", median(loads).as_secs_f64() * 1e3);
    println!("read file: {:>8.1} ms (median of 5, page cache warm)", median(reads).as_secs_f64() * 1e3);
    for clients in [1, 4] {
        for batch in [1, 32] {
            let (rate, p50) = measure(model.as_ref(), batch, clients);
            println!(
                "batch {batch:>2}, {clients} client(s): {rate:>8.1} req/s ({:>8.1} sentences/s), p50 {:>7.2} ms",
                rate * batch as f64,
                p50.as_secs_f64() * 1e3
            );
        }
    }
}
