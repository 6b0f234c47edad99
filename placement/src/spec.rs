//! What registration writes: model specs and vmodels, stored as JSON under the store prefix.

use serde::{Deserialize, Serialize};

/// Model formats with a runtime in this build, by modelmesh-serving's format names.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["onnx"];

/// Who registered a model: the repository watcher never unregisters what the API registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Api,
    Repository,
}

/// Where a model lives and how to load it. Written by registration only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model format, e.g. `onnx`; selects the runtime.
    pub model_type: String,
    /// Storage path or URI (a local file or directory for now).
    pub path: String,
    /// Storage key, as modelmesh-serving passes it (JSON with `storage_key`, `bucket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub source: Source,
    /// Unregister once no vmodel refers to it.
    #[serde(default)]
    pub auto_delete: bool,
    /// Bumped when the repository sees the model's files change, so loaded copies are replaced.
    #[serde(default)]
    pub generation: u64,
}

impl ModelSpec {
    /// Whether two specs describe the same model (who registered it and when aside).
    pub fn same_model(&self, other: &ModelSpec) -> bool {
        self.model_type == other.model_type && self.path == other.path && self.key == other.key
    }
}

/// An API-registered ONNX spec at `path`, for tests.
#[cfg(test)]
pub(crate) fn api_spec(path: &str) -> ModelSpec {
    ModelSpec {
        model_type: "onnx".into(),
        path: path.into(),
        key: None,
        source: Source::Api,
        auto_delete: false,
        generation: 0,
    }
}

/// An alias whose requests go to `active`; `target` is what it is moving to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VModelSpec {
    pub active: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// Why the last attempt to load the target failed, while it is failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transition_error: Option<String>,
    /// When set, traffic is split across these models by weight instead of all going to `active`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<Weighted>,
}

/// A model's share of a vmodel's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    pub model: String,
    pub weight: u32,
}

/// The model of a split that serves the request at `point` (any number; a request key's hash makes the
/// choice sticky): each model owns a share of `0..total weight` proportional to its weight. `None`
/// when the split is empty or weighs nothing.
pub fn choose(split: &[Weighted], point: u64) -> Option<&str> {
    let total: u64 = split.iter().map(|w| u64::from(w.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut at = point % total;
    for w in split {
        let weight = u64::from(w.weight);
        if at < weight {
            return Some(&w.model);
        }
        at -= weight;
    }
    None
}

impl VModelSpec {
    pub fn transitioning(&self) -> bool {
        self.active != self.target
    }

    /// The model to serve a request at `point` (see [`choose`]).
    pub fn route(&self, point: u64) -> &str {
        choose(&self.split, point).unwrap_or(&self.active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(weights: &[(&str, u32)]) -> Vec<Weighted> {
        weights.iter().map(|(m, w)| Weighted { model: (*m).into(), weight: *w }).collect()
    }

    #[test]
    fn shares_follow_weights_exactly_over_one_cycle() {
        let s = split(&[("a", 90), ("b", 10), ("zero", 0)]);
        let mut counts = std::collections::HashMap::new();
        for point in 0..100 {
            *counts.entry(choose(&s, point).unwrap()).or_insert(0) += 1;
        }
        assert_eq!((counts["a"], counts["b"], counts.get("zero")), (90, 10, None));
        assert_eq!(choose(&s, 12_345), choose(&s, 12_345), "the same key always lands on the same model");
        assert_eq!(choose(&split(&[("a", 0)]), 7), None);
        assert_eq!(choose(&[], 7), None);
    }

    #[test]
    fn a_failed_record_carries_its_back_off_and_old_records_still_read() {
        let failed = Placement::Failed { since_ms: 10, reason: "bad".into(), retry_after_ms: 2_010 };
        let json = serde_json::to_string(&failed).unwrap();
        assert!(json.contains("\"retry_after_ms\":2010"), "{json}");
        assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), failed);
        assert_eq!(failed.retry_after_ms(), Some(2_010));

        // Written before the field existed: readable, and its back-off counts as over.
        let old: Placement =
            serde_json::from_str(r#"{"state":"failed","since_ms":10,"reason":"bad"}"#).unwrap();
        assert_eq!(old.retry_after_ms(), Some(0));
        assert_eq!(Placement::Loaded { since_ms: 1, size_bytes: 2 }.retry_after_ms(), None);
        assert_eq!(Placement::Loading { since_ms: 1 }.retry_after_ms(), None);

        // Written by a newer pod with a field this binary does not know: still readable.
        let newer: Placement =
            serde_json::from_str(r#"{"state":"loaded","since_ms":1,"size_bytes":2,"device":"gpu0"}"#)
                .unwrap();
        assert_eq!(newer, Placement::Loaded { since_ms: 1, size_bytes: 2 });
    }
}

/// A pod, as it publishes itself under its lease: gone when the pod is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Pod-written records accept fields they do not know: during a rolling upgrade, pods on the older
// binary must still read what newer pods write.
pub struct InstanceRecord {
    /// Address other pods and clients reach its gRPC port at.
    pub endpoint: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub models_loaded: u64,
    pub loading: u64,
    /// Seconds since its least recently used model was used (its "LRU age").
    pub lru_age_seconds: u64,
    /// Requests it served per minute, over the last heartbeat period.
    #[serde(default)]
    pub requests_per_minute: u64,
    /// Leaving: takes no new loads.
    #[serde(default)]
    pub draining: bool,
    pub started_ms: u64,
}

/// One copy of a model on one pod; written by that pod under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are accepted, as in `InstanceRecord`: newer pods may add some.
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Placement {
    Loading {
        since_ms: u64,
    },
    Loaded {
        since_ms: u64,
        size_bytes: u64,
    },
    /// The pod's last load of the model failed. The record stays after the back-off ends (until the
    /// pod loads the model again or leaves), so placement reads `retry_after_ms`, not the state alone.
    Failed {
        since_ms: u64,
        reason: String,
        /// When the pod's back-off ends and it will try the model again, in milliseconds since the
        /// epoch on its own clock. Records written before this field existed read as 0: over, so an
        /// old record never keeps a pod from the model.
        #[serde(default)]
        retry_after_ms: u64,
    },
}

impl Placement {
    pub fn since_ms(&self) -> u64 {
        match self {
            Placement::Loading { since_ms }
            | Placement::Loaded { since_ms, .. }
            | Placement::Failed { since_ms, .. } => *since_ms,
        }
    }

    /// When the back-off of a failed load ends (ms since the epoch); `None` unless the last load
    /// failed. The end may be in the past: the pod failed the model once but will try it again.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Placement::Failed { retry_after_ms, .. } => Some(*retry_after_ms),
            Placement::Loading { .. } | Placement::Loaded { .. } => None,
        }
    }
}
