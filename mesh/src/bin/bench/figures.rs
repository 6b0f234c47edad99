//! The figures of one run: what a latency histogram and an error count say, printed for a person as a
//! table row and for scripts as one JSON line.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Requests slower than this are counted apart: on loopback they are outliers worth a look.
const SLOW: Duration = Duration::from_millis(10);

/// Errors seen by the clients: counted, with the first message kept.
#[derive(Debug, Default)]
pub struct Errors {
    /// Errors answered inside the measured window.
    pub measured: u64,
    /// Errors answered during the warm-up (not counted in `measured`, but reported).
    pub warmup: u64,
    /// The first error message of the whole run, warm-up included.
    pub first: Option<String>,
}

impl Errors {
    pub fn record(&mut self, measuring: bool, message: impl FnOnce() -> String) {
        if measuring {
            self.measured += 1;
        } else {
            self.warmup += 1;
        }
        if self.first.is_none() {
            self.first = Some(message());
        }
    }

    pub fn merge(&mut self, other: Errors) {
        self.measured += other.measured;
        self.warmup += other.warmup;
        self.first = self.first.take().or(other.first);
    }
}

/// A new latency histogram in microseconds, with the load generator's bounds.
pub fn histogram() -> Histogram<u64> {
    densemesh_loadgen::histogram()
}

/// Records one latency in microseconds (at least 1, at most the histogram's bound).
pub fn record(h: &mut Histogram<u64>, took: Duration) {
    h.saturating_record((took.as_micros() as u64).max(1));
}

/// Latency and throughput of one run, after the warm-up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    pub warmup_errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Requests that took longer than 10 ms.
    pub over_10ms: u64,
}

impl Figures {
    pub fn new(h: &Histogram<u64>, errors: Errors, measured: Duration) -> Self {
        let seconds = measured.as_secs_f64();
        let slow_from = SLOW.as_micros() as u64;
        let over_10ms =
            h.iter_recorded().filter(|v| v.value_iterated_to() > slow_from).map(|v| v.count_at_value()).sum();
        Self {
            requests: h.len(),
            errors: errors.measured,
            warmup_errors: errors.warmup,
            first_error: errors.first,
            seconds,
            requests_per_second: h.len() as f64 / seconds,
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            over_10ms,
        }
    }
}

/// What a run was, printed beside its figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunInfo {
    /// `grpc` or `inproc`.
    pub kind: &'static str,
    /// Free text from `--label` (e.g. `meshd`, `mlserver`).
    pub label: String,
    pub target: String,
    pub concurrency: usize,
    pub batch: i64,
    /// How the clients reach the server (gRPC only), e.g. `shared connection, 1 client thread(s)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// Prints the table (header and one row), the first error if any, then the JSON line.
pub fn print(info: &RunInfo, f: &Figures) {
    println!(
        "{:<8}{:<12}{:>4}{:>11}{:>9}{:>9}{:>9}{:>9}{:>10}{:>8}{:>8}  target",
        "kind", "label", "c", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9", "max µs", ">10ms", "errors"
    );
    let transport = info.transport.as_deref().map(|t| format!(" ({t})")).unwrap_or_default();
    println!(
        "{:<8}{:<12}{:>4}{:>11.0}{:>9}{:>9}{:>9}{:>9}{:>10}{:>8}{:>8}  {}{transport}",
        info.kind,
        info.label,
        info.concurrency,
        f.requests_per_second,
        f.p50_us,
        f.p90_us,
        f.p99_us,
        f.p999_us,
        f.max_us,
        f.over_10ms,
        f.errors,
        info.target,
    );
    if let Some(e) = &f.first_error {
        println!("first error ({} measured, {} in warm-up): {e}", f.errors, f.warmup_errors);
    }
    println!("{}", serde_json::json!({ "run": info, "figures": f }));
}
