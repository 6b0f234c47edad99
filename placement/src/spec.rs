//! What registration writes: model specs and vmodels, stored as JSON under the store prefix.

use serde::{Deserialize, Serialize};

/// What a pod offered before instance records listed their model types: ONNX, then the only runtime.
pub const LEGACY_MODEL_TYPES: &[&str] = &["onnx"];

/// Whether `name` can be a model format: modelmesh-serving's format names (`onnx`, `sklearn`,
/// `huggingface`, a custom runtime's own) are short lower-case words. Which formats are served is up
/// to the pods (their runtimes), not to the registry.
pub fn is_format_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Who registered a model: the repository watcher never unregisters what the API registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Api,
    Repository,
}

/// Where a model lives and how to load it. Written by registration only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Stored records accept fields they do not know: during a rolling upgrade, pods on the older binary
// must still read specs that newer registrants write (as `InstanceRecord` and `Placement` do).
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
    /// What the model is expected to take in memory once loaded, when the registrant knows: placement
    /// uses it before any pod has measured the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Copies the leader keeps loaded at least, each on its own pod (as far as live pods offering the
    /// model's type go); `None` when the registrant did not ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_copies: Option<u32>,
    /// The runtime that must load it, by name, where the pod has a choice for its type (`tiny` or
    /// `onnxruntime` for ONNX); `None`: the pod chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// What it asks of GPUs (the Predictor's `gpu`): `None` when it asks nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::gpu::Gpu>,
}

impl ModelSpec {
    /// Whether two specs describe the same model (who registered it and when aside). A different
    /// GPU ask is the same model placed anew ([`Self::reloads`]).
    pub fn same_model(&self, other: &ModelSpec) -> bool {
        self.model_type == other.model_type
            && self.path == other.path
            && self.key == other.key
            && self.runtime == other.runtime
    }

    /// Whether copies loaded from `old` must be replaced to serve this spec: another model, the same
    /// one whose files changed, or a new GPU ask. Placement hints (size, minimum copies) and who
    /// registered it do not touch what is loaded.
    pub fn reloads(&self, old: &ModelSpec) -> bool {
        // A new GPU ask too: copies placed by the old one (on a pod without a GPU, say) must go, so
        // placement places the model again.
        !self.same_model(old) || self.generation != old.generation || self.gpu != old.gpu
    }

    /// Whether the placement hints a registration may change on a registered model differ (the GPU
    /// ask among them, which also [reloads](Self::reloads) its copies).
    pub fn same_hints(&self, other: &ModelSpec) -> bool {
        self.size_bytes == other.size_bytes && self.min_copies == other.min_copies && self.gpu == other.gpu
    }
}

impl ModelSpec {
    /// A model registered through the API: `model_type` at `path`, with nothing else set.
    pub fn api(model_type: impl Into<String>, path: impl Into<String>) -> ModelSpec {
        ModelSpec {
            model_type: model_type.into(),
            path: path.into(),
            key: None,
            source: Source::Api,
            auto_delete: false,
            generation: 0,
            size_bytes: None,
            min_copies: None,
            runtime: None,
            gpu: None,
        }
    }
}

/// An API-registered ONNX spec at `path`, for tests.
#[cfg(test)]
pub(crate) fn api_spec(path: &str) -> ModelSpec {
    ModelSpec::api("onnx", path)
}

/// An alias whose requests go to `active`; `target` is what it is moving to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are accepted, as in `ModelSpec`: a newer writer may add some.
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
// Unknown fields are accepted, as in `ModelSpec`.
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

/// The split point of a request key (see [`choose`]): FNV-1a 64 of its bytes.
///
/// The hash is fixed by this function, not by the toolchain (`std`'s `DefaultHasher` may change between
/// Rust releases), so a key lands on the same model on every pod, across restarts and upgrades.
pub fn split_point_of_key(key: &[u8]) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    key.iter().fold(FNV_OFFSET_BASIS, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(FNV_PRIME))
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
    fn split_points_of_keys_are_fnv1a_64_and_never_change() {
        // The published FNV-1a 64 test vectors, and one route key: changing any of these moves every
        // sticky key of every traffic split.
        assert_eq!(split_point_of_key(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(split_point_of_key(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(split_point_of_key(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(split_point_of_key(b"user-1"), 0xf84b_a2aa_754a_4bd4);
    }

    #[test]
    fn specs_written_by_a_newer_binary_still_read() {
        let model: ModelSpec = serde_json::from_str(
            r#"{"model_type":"onnx","path":"/m","source":"api","auto_delete":true,"future":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!((model.path.as_str(), model.auto_delete), ("/m", true));
        let vmodel: VModelSpec = serde_json::from_str(
            r#"{"active":"a","target":"b","canary":true,"split":[{"model":"a","weight":9,"zone":"z"}]}"#,
        )
        .unwrap();
        assert_eq!((vmodel.active.as_str(), vmodel.target.as_str()), ("a", "b"));
        assert_eq!(vmodel.split, [Weighted { model: "a".into(), weight: 9 }]);
    }

    #[test]
    fn placement_hints_are_optional_on_the_wire_and_never_reload_a_model() {
        let plain = api_spec("/m");
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("size_bytes") && !json.contains("min_copies"), "{json}");
        let hinted = ModelSpec { size_bytes: Some(7), min_copies: Some(2), ..plain.clone() };
        let json = serde_json::to_string(&hinted).unwrap();
        assert!(json.contains(r#""min_copies":2"#), "{json}");
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), hinted);

        assert!(!hinted.reloads(&plain) && !hinted.same_hints(&plain));
        let on_gpu = ModelSpec { gpu: Some(crate::gpu::Gpu::Required), ..plain.clone() };
        let json = serde_json::to_string(&on_gpu).unwrap();
        assert!(json.contains(r#""gpu":"required""#), "{json}");
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), on_gpu);
        assert!(on_gpu.reloads(&plain), "a new GPU ask places the model anew");
        assert!(ModelSpec { generation: 1, ..plain.clone() }.reloads(&plain), "new files");
        assert!(api_spec("/other").reloads(&plain), "another model");
    }

    #[test]
    fn an_instance_record_without_model_types_offers_what_pods_offered_then() {
        let old: InstanceRecord = serde_json::from_str(
            r#"{"endpoint":"e","capacity_bytes":1,"used_bytes":0,"models_loaded":0,"loading":0,"lru_age_seconds":0,"started_ms":0}"#,
        )
        .unwrap();
        assert_eq!(old.model_types, legacy_model_types());
        assert!(LEGACY_MODEL_TYPES.iter().all(|t| old.offers(t)));
        // One that offers nothing says so, and reads back the same: `[]` is not the absent field.
        let none = InstanceRecord { model_types: Vec::new(), ..old.clone() };
        let json = serde_json::to_string(&none).unwrap();
        assert!(json.contains(r#""model_types":[]"#), "{json}");
        let read: InstanceRecord = serde_json::from_str(&json).unwrap();
        assert!(!read.offers("onnx"));
        assert_eq!(read, none);
    }

    #[test]
    fn an_instance_record_says_which_pod_wire_it_speaks_and_old_ones_speak_none() {
        let old: InstanceRecord = serde_json::from_str(
            r#"{"endpoint":"e","capacity_bytes":1,"used_bytes":0,"models_loaded":0,"loading":0,"lru_age_seconds":0,"started_ms":0}"#,
        )
        .unwrap();
        assert_eq!(old.peer_wire, 0);
        assert!(
            !serde_json::to_string(&old).unwrap().contains("peer_wire"),
            "old pods' readers see nothing new"
        );
        let new = InstanceRecord { peer_wire: 1, ..old };
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""peer_wire":1"#), "{json}");
        assert_eq!(serde_json::from_str::<InstanceRecord>(&json).unwrap(), new);
    }

    #[test]
    fn an_instance_record_carries_its_cheapest_victims_and_old_ones_have_none() {
        let old: InstanceRecord = serde_json::from_str(
            r#"{"endpoint":"e","capacity_bytes":1,"used_bytes":0,"models_loaded":0,"loading":0,"lru_age_seconds":0,"started_ms":0}"#,
        )
        .unwrap();
        assert_eq!(old.cheapest_victims, None);
        assert!(!serde_json::to_string(&old).unwrap().contains("cheapest_victims"), "absent under LRU");
        let victims = vec![crate::eviction::Victim { priority: 12.5, size_bytes: 7 }];
        let gdsf = InstanceRecord { cheapest_victims: Some(victims), ..old };
        let read: InstanceRecord = serde_json::from_str(&serde_json::to_string(&gdsf).unwrap()).unwrap();
        assert_eq!(read, gdsf);
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
        assert_eq!(
            Placement::Loaded { since_ms: 1, size_bytes: 2, runtime: String::new() }.retry_after_ms(),
            None
        );
        assert_eq!(Placement::Loading { since_ms: 1 }.retry_after_ms(), None);

        // Written by a newer pod with a field this binary does not know: still readable.
        let newer: Placement =
            serde_json::from_str(r#"{"state":"loaded","since_ms":1,"size_bytes":2,"device":"gpu0"}"#)
                .unwrap();
        assert_eq!(newer, Placement::Loaded { since_ms: 1, size_bytes: 2, runtime: String::new() });
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
    /// That least recently used model, the first a load here would evict (empty when none is loaded),
    /// so a refusal under the anti-churn rule can name it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub coldest_model: String,
    /// Under GDSF eviction, its cheapest models to evict ([`crate::eviction::cheapest`]), so
    /// placement can load where room costs least; absent under LRU and from older pods, which
    /// placement then ranks by LRU age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cheapest_victims: Option<Vec<crate::eviction::Victim>>,
    /// Requests it served per minute, over the last heartbeat period.
    #[serde(default)]
    pub requests_per_minute: u64,
    /// Leaving: takes no new loads.
    #[serde(default)]
    pub draining: bool,
    pub started_ms: u64,
    /// Model formats it loads (`--model-types`, ModelMesh's type constraints): placement sends it only
    /// models of these types. A record written before the field existed offers what that pod's build
    /// did ([`LEGACY_MODEL_TYPES`]); an empty list offers none.
    #[serde(default = "legacy_model_types")]
    pub model_types: Vec<String>,
    /// The version of densemesh's pod-to-pod wire it accepts on its gRPC port, for forwarded
    /// requests; 0 (pods from before it, which leave it out): HTTP/2 only.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub peer_wire: u32,
    /// Its GPUs, each with its capacity and use (`--gpu-capacity`); empty without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<crate::gpu::DeviceRecord>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl InstanceRecord {
    /// Whether the pod loads models of `model_type`.
    pub fn offers(&self, model_type: &str) -> bool {
        self.model_types.iter().any(|t| t == model_type)
    }
}

/// [`LEGACY_MODEL_TYPES`], owned: what an instance record without `model_types` offers.
pub fn legacy_model_types() -> Vec<String> {
    LEGACY_MODEL_TYPES.iter().map(|t| (*t).to_owned()).collect()
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
        /// The runtime that loaded it (`tiny`, `onnxruntime`, a configured runtime's name); empty in
        /// records written before this field existed.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        runtime: String,
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
