//! Per-model request metrics with bounded cardinality (`--metrics-per-model K`). A label per model
//! would give a mesh of a million models a million series; here only the K models with the most
//! requests lately get their own `model` label and every other request counts under `other`. The
//! ranking is redone every [`RERANK_EVERY`] from decayed counts, so it follows traffic as it moves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

/// How often the top K is recomputed.
pub const RERANK_EVERY: Duration = Duration::from_secs(10);

/// The label of every model outside the top K.
pub const OTHER: &str = "other";

/// Requests served, per model label and gRPC code.
pub const MODEL_REQUESTS: &str = "densemesh_model_requests_total";
/// Time to answer, per model label (requests answered OK).
pub const MODEL_REQUEST_DURATION: &str = "densemesh_model_request_duration_seconds";

/// Which models have a label of their own; cloning shares it.
#[derive(Clone)]
pub struct ModelLabels {
    inner: Arc<Inner>,
}

struct Inner {
    k: usize,
    /// Requests per model since the last ranking, plus half of what each had before it.
    counts: Mutex<(Instant, HashMap<String, f64>)>,
    top: RwLock<std::collections::HashSet<String>>,
}

impl ModelLabels {
    /// Labels for the top `k` models (`k` > 0).
    pub fn new(k: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                k,
                counts: Mutex::new((Instant::now(), HashMap::new())),
                top: RwLock::new(Default::default()),
            }),
        }
    }

    /// Counts a request for `model` and returns the label it is recorded under.
    pub fn label(&self, model: &str) -> String {
        self.count(model, Instant::now());
        if self.inner.top.read().contains(model) { model.to_owned() } else { OTHER.to_owned() }
    }

    fn count(&self, model: &str, now: Instant) {
        let mut counts = self.inner.counts.lock();
        *counts.1.entry(model.to_owned()).or_default() += 1.0;
        if now.duration_since(counts.0) < RERANK_EVERY {
            return;
        }
        counts.0 = now;
        let top = rank(&counts.1, self.inner.k);
        // Decay, and forget models that faded out, so the map stays as small as recent traffic.
        counts.1.retain(|_, c| {
            *c /= 2.0;
            *c >= 0.5
        });
        *self.inner.top.write() = top;
    }
}

/// The `k` models with the highest counts (ties by name, so the choice is stable).
fn rank(counts: &HashMap<String, f64>, k: usize) -> std::collections::HashSet<String> {
    let mut all: Vec<(&String, f64)> = counts.iter().map(|(m, c)| (m, *c)).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    all.into_iter().take(k).map(|(m, _)| m.clone()).collect()
}

/// Records one request served here for `model` (its label chosen by `labels`), answered with `code`.
pub fn record(labels: &ModelLabels, model: &str, code: &'static str, seconds: f64) {
    let label = labels.label(model);
    metrics::counter!(MODEL_REQUESTS, "model" => label.clone(), "code" => code).increment(1);
    if code == "OK" {
        metrics::histogram!(MODEL_REQUEST_DURATION, "model" => label).record(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_busiest_k_models_get_a_label_and_the_ranking_follows_traffic() {
        let labels = ModelLabels::new(2);
        let start = Instant::now();
        // Before the first ranking every model is `other`.
        assert_eq!(labels.label("a"), OTHER);
        for (model, n) in [("a", 50), ("b", 30), ("c", 10)] {
            for _ in 0..n {
                labels.count(model, start);
            }
        }
        labels.count("c", start + RERANK_EVERY);
        let top = labels.inner.top.read().clone();
        assert_eq!(top, ["a", "b"].iter().map(|s| s.to_string()).collect());
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("c"), OTHER);
        // Traffic moves to c: after the next ranking c has a label and b has lost its own.
        for _ in 0..200 {
            labels.count("c", start + RERANK_EVERY + Duration::from_secs(1));
        }
        labels.count("c", start + RERANK_EVERY * 2 + Duration::from_secs(1));
        let top = labels.inner.top.read().clone();
        assert!(top.contains("c") && top.contains("a") && !top.contains("b"), "{top:?}");
    }

    #[test]
    fn the_counts_forget_models_no_longer_used() {
        let labels = ModelLabels::new(1);
        let start = Instant::now();
        for i in 0..1000 {
            labels.count(&format!("m{i}"), start);
        }
        for round in 1..=3 {
            labels.count("busy", start + RERANK_EVERY * round);
        }
        let remembered = labels.inner.counts.lock().1.len();
        assert!(remembered <= 2, "{remembered} models still counted");
    }
}
