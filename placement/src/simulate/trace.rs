//! Request traces for the simulator: read from CSV or JSON lines, or generated from a seed.
//!
//! One request per line, `time_ms,model_id,size_bytes[,load_ms]` or
//! `{"time_ms": …, "model_id": …, "size_bytes": …, "load_ms": …}` (`load_ms` optional in both): when
//! it came, which model, the bytes that model is charged once loaded, and how long its load takes if
//! known (measured or declared; else the eviction's estimate from its size). Lines may mix the two
//! forms; blank lines and lines starting with `#` are skipped, and so is a CSV header as the first
//! line. Times must not go back: a trace is a log, and a simulator that sorted it silently would
//! hide a broken export.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

use serde::Deserialize;

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub time_ms: u64,
    /// Index into [`Trace::models`].
    pub model: u32,
    /// What the model is charged once loaded (a request that loads it charges this).
    pub size_bytes: u64,
    /// Its load time, when the trace knows it.
    pub load_ms: Option<u32>,
}

impl Request {
    /// How long loading the model for this request takes: the trace's figure, else the eviction's
    /// estimate from its size (the same one GDSF ranks by).
    pub fn load_time(&self) -> Duration {
        crate::eviction::reload_cost(self.load_ms.map(|ms| Duration::from_millis(ms.into())), self.size_bytes)
    }
}

/// Requests in time order, with model names interned to indices (the simulator's hot loop never
/// touches a string).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    models: Vec<String>,
    index: HashMap<String, u32>,
    requests: Vec<Request>,
}

/// Why a trace cannot be read; each variant names the line (1-based).
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read the trace at line {line}: {source}")]
    Read { line: usize, source: std::io::Error },
    #[error(
        "line {line}: {reason}; expected time_ms,model_id,size_bytes[,load_ms] or a JSON object with those fields"
    )]
    Malformed { line: usize, reason: String },
    #[error(
        "line {line}: time {time_ms} ms is before the previous request's {previous_ms} ms; sort the trace by time"
    )]
    OutOfOrder { line: usize, time_ms: u64, previous_ms: u64 },
    #[error("the trace has no requests")]
    Empty,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    time_ms: u64,
    model_id: String,
    size_bytes: u64,
    #[serde(default)]
    load_ms: Option<u32>,
}

impl Trace {
    /// Reads a whole trace (see the module documentation for the format).
    pub fn read(input: impl BufRead) -> Result<Self, TraceError> {
        let mut trace = Trace::default();
        let mut first_data_line = true;
        for (n, line) in input.lines().enumerate() {
            let line_no = n + 1;
            let line = line.map_err(|source| TraceError::Read { line: line_no, source })?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = |reason: String| TraceError::Malformed { line: line_no, reason };
            let parsed = if line.starts_with('{') {
                let j: JsonLine = serde_json::from_str(line).map_err(|e| malformed(e.to_string()))?;
                (j.time_ms, j.model_id, j.size_bytes, j.load_ms)
            } else {
                let fields: Vec<&str> = line.split(',').map(str::trim).collect();
                let is_header = fields.first().is_some_and(|f| f.parse::<u64>().is_err());
                if first_data_line && is_header {
                    first_data_line = false;
                    continue;
                }
                if !(3..=4).contains(&fields.len()) {
                    return Err(malformed(format!("{} fields", fields.len())));
                }
                let number = |name: &str, s: &str| {
                    s.parse::<u64>().map_err(|_| malformed(format!("{name} {s:?} is not a whole number")))
                };
                let load_ms = match fields.get(3) {
                    None | Some(&"") => None,
                    Some(s) => Some(
                        s.parse::<u32>()
                            .map_err(|_| malformed(format!("load_ms {s:?} is not a whole number")))?,
                    ),
                };
                (
                    number("time_ms", fields[0])?,
                    fields[1].to_owned(),
                    number("size_bytes", fields[2])?,
                    load_ms,
                )
            };
            first_data_line = false;
            let (time_ms, model_id, size_bytes, load_ms) = parsed;
            if model_id.is_empty() {
                return Err(malformed("the model id is empty".into()));
            }
            trace
                .push(time_ms, &model_id, size_bytes, load_ms)
                .map_err(|previous_ms| TraceError::OutOfOrder { line: line_no, time_ms, previous_ms })?;
        }
        if trace.requests.is_empty() {
            return Err(TraceError::Empty);
        }
        Ok(trace)
    }

    /// Appends a request; `Err(previous time)` when it is earlier than the last one.
    pub fn push(
        &mut self,
        time_ms: u64,
        model_id: &str,
        size_bytes: u64,
        load_ms: Option<u32>,
    ) -> Result<(), u64> {
        if let Some(last) = self.requests.last()
            && time_ms < last.time_ms
        {
            return Err(last.time_ms);
        }
        let model = match self.index.get(model_id) {
            Some(&i) => i,
            None => {
                let i = u32::try_from(self.models.len()).map_err(|_| time_ms)?;
                self.models.push(model_id.to_owned());
                self.index.insert(model_id.to_owned(), i);
                i
            }
        };
        self.requests.push(Request { time_ms, model, size_bytes, load_ms });
        Ok(())
    }

    /// Model names, by index.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// Requests in time order.
    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    /// Bytes of every model the trace names, each once (at its last size): what "capacity at 10% of
    /// all bytes" is a share of.
    pub fn model_bytes(&self) -> u64 {
        let mut size = vec![0u64; self.models.len()];
        for r in &self.requests {
            size[r.model as usize] = r.size_bytes;
        }
        size.iter().sum()
    }

    /// The trace as CSV, the form [`Trace::read`] reads back.
    pub fn write_csv(&self, mut out: impl std::io::Write) -> std::io::Result<()> {
        writeln!(out, "time_ms,model_id,size_bytes,load_ms")?;
        for r in &self.requests {
            let load = r.load_ms.map(|ms| ms.to_string()).unwrap_or_default();
            writeln!(out, "{},{},{},{load}", r.time_ms, self.models[r.model as usize], r.size_bytes)?;
        }
        Ok(())
    }
}

/// A synthetic trace's shape: many models of log-normal sizes, requested with Zipf popularity at a
/// steady rate (Poisson arrivals). Everything follows from `seed`.
#[derive(Debug, Clone, PartialEq)]
pub struct Synthetic {
    pub models: u32,
    pub requests: u64,
    /// The median model size; sizes are log-normal around it.
    pub median_bytes: u64,
    /// The spread of ln(size).
    pub sigma: f64,
    /// Zipf exponent of popularity (1.0: the k-th most popular model is asked 1/k as often as the first).
    pub zipf: f64,
    /// Mean requests per second.
    pub rate: f64,
    pub seed: u64,
}

impl Default for Synthetic {
    fn default() -> Self {
        Self {
            models: 2_000,
            requests: 200_000,
            median_bytes: 20_000_000,
            sigma: 1.0,
            zipf: 1.0,
            rate: 100.0,
            seed: 1,
        }
    }
}

/// A small, seeded generator (SplitMix64): the same seed gives the same trace and the same pod for
/// every request on every platform and version, which a library RNG does not promise.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

impl Synthetic {
    /// The trace. Popularity rank and size are drawn independently, so the popular models are of
    /// every size; models are named `m-<rank>` (m-0 the most popular).
    pub fn generate(&self) -> Trace {
        let mut rng = SplitMix64::new(self.seed);
        let models = self.models.max(1);
        let sizes: Vec<u64> = (0..models)
            .map(|_| ((self.median_bytes as f64).ln() + self.sigma * rng.normal()).exp().max(1.0) as u64)
            .collect();
        let mut cumulative = Vec::with_capacity(models as usize);
        let mut total = 0.0;
        for k in 1..=models {
            total += 1.0 / f64::from(k).powf(self.zipf);
            cumulative.push(total);
        }
        let mut trace = Trace::default();
        let names: Vec<String> = (0..models).map(|k| format!("m-{k}")).collect();
        let mut time_s = 0.0;
        for _ in 0..self.requests {
            time_s += -(1.0 - rng.unit()).ln() / self.rate.max(f64::MIN_POSITIVE);
            let draw = rng.unit() * total;
            let k = cumulative.partition_point(|c| *c <= draw).min(models as usize - 1);
            // Times only grow, so the push cannot fail.
            let _ = trace.push((time_s * 1000.0) as u64, &names[k], sizes[k], None);
        }
        trace
    }
}
