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
}

impl VModelSpec {
    pub fn transitioning(&self) -> bool {
        self.active != self.target
    }
}
