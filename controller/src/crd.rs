//! The custom resources, shaped like KServe's and modelmesh-serving's so their YAML applies unchanged.
//!
//! Only the fields densemesh reads are typed. The predictor and the runtime keep every other field
//! (`x-kubernetes-preserve-unknown-fields`), so a manifest written for KServe (containers, logger,
//! batcher, …) is stored as written instead of being pruned or rejected.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The annotation that puts an InferenceService in densemesh's hands; without it (KServe's own
/// serverless or raw modes) the object is left alone.
pub const DEPLOYMENT_MODE_ANNOTATION: &str = "serving.kserve.io/deploymentMode";
pub const MODEL_MESH_MODE: &str = "ModelMesh";
/// Names the storage-config key, as modelmesh-serving reads it.
pub const SECRET_KEY_ANNOTATION: &str = "serving.kserve.io/secretKey";
/// Names the runtime, as modelmesh-serving reads it.
pub const SERVING_RUNTIME_ANNOTATION: &str = "serving.kserve.io/servingRuntime";

/// A model served under a stable name; each edit of its predictor is a new revision the mesh moves
/// to without a gap.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serving.kserve.io",
    version = "v1beta1",
    kind = "InferenceService",
    plural = "inferenceservices",
    shortname = "isvc",
    category = "kserve",
    namespaced,
    status = "InferenceServiceStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.modelStatus.states.activeModelState"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.modelStatus.states.targetModelState"}"#,
    printcolumn = r#"{"name":"Copies","type":"integer","priority":1,"jsonPath":".status.modelStatus.copies.totalCopies"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct InferenceServiceSpec {
    pub predictor: PredictorSpec,
}

/// `spec.predictor`: either the current `model` form or the older per-framework form
/// (`predictor.onnx`, `predictor.sklearn`, …), both of which modelmesh-serving accepts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct PredictorSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// Percent of traffic the newest revision gets while the last rolled-out one keeps the rest;
    /// absent (or 100) rolls the newest out fully, 0 rolls back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub canary_traffic_percent: Option<i64>,
    /// Copies of the model the mesh keeps loaded at least (densemesh; modelmesh-serving#393).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_copies: Option<i32>,
    /// The older per-framework forms; the first one present is used when `model` is absent.
    #[serde(flatten)]
    #[schemars(skip)]
    pub frameworks: BTreeMap<String, serde_json::Value>,
}

/// `spec.predictor.model` (and the body of each per-framework form).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ModelSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_format: Option<ModelFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// `s3://bucket/path`, `gs://…`, `https://…` or `pvc://claim/path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// Bytes the model takes once loaded, when known (densemesh; modelmesh-serving#392): placement
    /// uses it before any pod has measured the model. A quantity such as `120Mi` or a byte count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ModelFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `storage{key, path, schemaPath, parameters}`: a key of the `storage-config` secret and a path in it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_path: Option<String>,
    /// Overrides of the key's settings; `bucket` is the one the mesh reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
}

/// What `kubectl get isvc` and clients read back: KServe's status with modelmesh-serving's
/// `modelStatus`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, ComponentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_status: Option<ModelStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Addressable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `status.components.predictor`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The newest revision (concrete model id) the spec asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_created_revision: Option<String>,
    /// The newest revision that took all traffic once; a canary splits against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_rolledout_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_rolledout_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTarget {
    #[serde(default)]
    pub revision_name: String,
    #[serde(default)]
    pub percent: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_revision: Option<bool>,
}

/// modelmesh-serving's `status.modelStatus`. Every status type here reads whatever KServe itself
/// writes (fields left out, values this crate does not know): the controller lists InferenceServices
/// of every mode, and one it cannot read would stop it for all.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    #[serde(default)]
    pub transition_status: TransitionStatus,
    #[serde(default)]
    pub states: ModelRevisionStates,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copies: Option<ModelCopies>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_info: Option<FailureInfo>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TransitionStatus {
    #[default]
    UpToDate,
    InProgress,
    BlockedByFailedLoad,
    InvalidSpec,
    /// A value some other writer used.
    #[serde(other)]
    Unknown,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRevisionStates {
    #[serde(default)]
    pub active_model_state: ModelState,
    /// Empty unless a transition to a new revision is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_model_state: Option<ModelState>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ModelState {
    #[default]
    Pending,
    Standby,
    Loading,
    Loaded,
    FailedToLoad,
    #[serde(other)]
    Unknown,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelCopies {
    #[serde(default)]
    pub failed_copies: i64,
    #[serde(default)]
    pub total_copies: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureInfo {
    #[serde(default)]
    pub reason: FailureReason,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision_name: Option<String>,
    /// The pod the failure happened on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// modelmesh-serving's failure reasons.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailureReason {
    #[default]
    ModelLoadFailed,
    RuntimeUnhealthy,
    NoSupportingRuntime,
    RuntimeNotRecognized,
    RuntimeDisabled,
    InvalidPredictorSpec,
    #[serde(other)]
    Unknown,
}

/// modelmesh-serving's older, flatter form of one model.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serving.kserve.io",
    version = "v1alpha1",
    kind = "Predictor",
    plural = "predictors",
    category = "kserve",
    namespaced,
    status = "PredictorStatus",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.modelType.name"}"#,
    printcolumn = r#"{"name":"Available","type":"boolean","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.activeModelState"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetModelState"}"#,
    printcolumn = r#"{"name":"Transition","type":"string","jsonPath":".status.transitionStatus"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct PredictorCrdSpec {
    pub model_type: ModelFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeRef>,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<PredictorStorage>,
    /// `required` or `preferred`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RuntimeRef {
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PredictorStorage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcStorage>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    pub secret_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcStorage {
    pub claim_name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PredictorStatus {
    #[serde(default)]
    pub available: bool,
    #[serde(default)]
    pub active_model_state: ModelState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_model_state: Option<ModelState>,
    #[serde(default)]
    pub transition_status: TransitionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_info: Option<FailureInfo>,
    #[serde(default)]
    pub total_copies: i64,
    #[serde(default)]
    pub failed_copies: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_endpoint: Option<String>,
}

/// A kind of `meshd` pod: the model formats it offers and how many pods of it run. The
/// cluster-scoped twin, ClusterServingRuntime, has the same spec.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serving.kserve.io",
    version = "v1alpha1",
    kind = "ServingRuntime",
    plural = "servingruntimes",
    category = "kserve",
    namespaced,
    printcolumn = r#"{"name":"Disabled","type":"boolean","jsonPath":".spec.disabled"}"#,
    printcolumn = r#"{"name":"ModelType","type":"string","jsonPath":".spec.supportedModelFormats[*].name"}"#,
    printcolumn = r#"{"name":"Containers","type":"string","jsonPath":".spec.containers[*].name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ServingRuntimeSpec {
    #[serde(default)]
    pub supported_model_formats: Vec<SupportedModelFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_model: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocol_versions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Resources of the meshd container (densemesh; when absent, those of the first container without an
    /// image: containers with one are the runtime's servers, run beside meshd with their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the runtime's containers serve ModelMesh's model-runtime SPI (`port:8085`), as in
    /// modelmesh-serving; meshd reaches it on the pod's loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_endpoint: Option<String>,
    /// Where they serve inference (`port:8001`), when not at `grpcEndpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_data_endpoint: Option<String>,
    /// modelmesh-serving's built-in adapter: the server type (`mlserver`) meshd talks to directly,
    /// through the V2 model-repository extension, instead of through an adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_in_adapter: Option<BuiltInAdapter>,
}

/// The part of modelmesh-serving's `builtInAdapter` densemesh reads; other fields (the adapter's own
/// ports, memory buffer, env) are for an adapter densemesh does not run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct BuiltInAdapter {
    /// `mlserver` (or `triton`, `ovms`, `torchserve`, which densemesh does not drive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_type: Option<String>,
    /// How long one model's load may take (the remote runtime's `timeouts.load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_loading_timeout_millis: Option<i64>,
}

/// ClusterServingRuntime: a ServingRuntime every namespace may use.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serving.kserve.io",
    version = "v1alpha1",
    kind = "ClusterServingRuntime",
    plural = "clusterservingruntimes",
    category = "kserve",
    printcolumn = r#"{"name":"Disabled","type":"boolean","jsonPath":".spec.disabled"}"#,
    printcolumn = r#"{"name":"ModelType","type":"string","jsonPath":".spec.supportedModelFormats[*].name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct ClusterServingRuntimeSpec(pub ServingRuntimeSpec);

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SupportedModelFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_select: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

/// KServe's inference graph: models chained, ensembled, switched or split, run by meshd where the
/// models are (docs/graphs.md). The spec is passed to the mesh as written; the mesh checks it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serving.kserve.io",
    version = "v1alpha1",
    kind = "InferenceGraph",
    plural = "inferencegraphs",
    shortname = "ig",
    category = "kserve",
    namespaced,
    status = "InferenceGraphStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct InferenceGraphSpec {
    /// The graph's nodes by name; it starts at `root`.
    #[serde(default)]
    pub nodes: BTreeMap<String, InferenceRouter>,
    /// KServe's other fields (`resources`, `affinity`, `timeout`, replicas), kept as written: the
    /// graph runs in meshd, not in a router pod they would size.
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// One node of a graph: how its steps run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct InferenceRouter {
    /// `Sequence`, `Switch`, `Ensemble` or `Splitter`; the mesh refuses any other.
    #[serde(default)]
    pub router_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<InferenceStep>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// One step: a model (`serviceName`, an InferenceService) or another node (`nodeName`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct InferenceStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// KServe's call-any-URL step; the mesh refuses it (a step runs on a model of the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_url: Option<String>,
    /// `$request` (the default) or `$response`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Switch steps: a GJSON condition on the request (the subset docs/graphs.md lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Splitter steps: the step's share of 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i64>,
    /// `Soft` (the default: a failure skips the step) or `Hard` (a failure fails the graph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency: Option<String>,
    /// densemesh's extension: the model's inputs named from the tensors the step receives,
    /// `{input: tensor}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input_map: BTreeMap<String, String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// What `kubectl get ig` shows: where to call the graph and whether it answers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceGraphStatus {
    /// The graph's KServe V2 REST inference URL (the graph's name is the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Every CRD as one multi-document YAML stream: what the Helm chart ships in `crds/`.
pub fn crds_yaml() -> String {
    let crds = [
        InferenceService::crd(),
        Predictor::crd(),
        ServingRuntime::crd(),
        ClusterServingRuntime::crd(),
        InferenceGraph::crd(),
    ];
    let mut out =
        String::from("# Generated by `densemesh-controller crds` from controller/src/crd.rs; do not edit.\n");
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD always serializes"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_crds_are_the_generated_ones() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/densemesh/crds/serving.kserve.io.yaml");
        let shipped = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            shipped == crds_yaml(),
            "{path} differs from the CRDs generated from controller/src/crd.rs; regenerate it with \
             `cargo run -p densemesh-controller -- crds > charts/densemesh/crds/serving.kserve.io.yaml`"
        );
    }

    #[test]
    fn modelmesh_serving_isvc_yaml_parses() {
        let yaml = r#"
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: example-onnx-mnist
  annotations:
    serving.kserve.io/deploymentMode: ModelMesh
spec:
  predictor:
    model:
      modelFormat:
        name: onnx
      storage:
        key: localMinIO
        path: onnx/mnist.onnx
"#;
        let isvc: InferenceService = serde_yaml::from_str(yaml).unwrap();
        let model = isvc.spec.predictor.model.unwrap();
        assert_eq!(model.model_format.unwrap().name, "onnx");
        assert_eq!(model.storage.unwrap().path.as_deref(), Some("onnx/mnist.onnx"));
    }

    #[test]
    fn a_status_kserve_wrote_is_read_not_refused() {
        let isvc: InferenceService = serde_json::from_value(serde_json::json!({
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "serverless"},
            "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}}}},
            "status": {
                "url": "http://serverless.default.example.com",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "modelStatus": {"transitionStatus": "", "copies": {"failedCopies": 0},
                                "lastFailureInfo": {"reason": "RuntimeDisabled"},
                                "states": {"activeModelState": "", "targetModelState": "SomethingNew"}},
                "components": {"predictor": {"latestCreatedRevision": "serverless-predictor-00001",
                                             "traffic": [{"latestRevision": true, "percent": 100}]}}
            }
        }))
        .unwrap();
        let status = isvc.status.unwrap().model_status.unwrap();
        assert_eq!(status.transition_status, TransitionStatus::Unknown);
        assert_eq!(status.states.target_model_state, Some(ModelState::Unknown));
        assert_eq!(status.last_failure_info.unwrap().reason, FailureReason::RuntimeDisabled);
    }

    #[test]
    fn a_kserve_inference_graph_keeps_every_field_it_was_written_with() {
        let yaml = r#"
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata: {name: chain, namespace: ml}
spec:
  resources: {requests: {cpu: 100m}}
  nodes:
    root:
      routerType: Sequence
      steps:
        - {serviceName: scale}
        - {name: cls, serviceName: classify, data: $response, dependency: Hard, inputMap: {input: scaled}}
        - {nodeName: pick, data: $response, someNewField: 3}
    pick:
      routerType: Switch
      steps: [{serviceName: argmax, condition: 'parameters.tier', weight: 100}]
"#;
        let graph: InferenceGraph = serde_yaml::from_str(yaml).unwrap();
        let written: serde_json::Value =
            serde_yaml::from_str::<serde_json::Value>(yaml).unwrap()["spec"].clone();
        assert_eq!(
            serde_json::to_value(&graph.spec).unwrap(),
            written,
            "the spec goes to the mesh as written"
        );
        assert_eq!(graph.spec.nodes["root"].steps[1].input_map["input"], "scaled");
    }

    #[test]
    fn the_older_per_framework_form_is_kept() {
        let yaml = r#"
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata: {name: m}
spec:
  predictor:
    sklearn:
      storageUri: s3://bucket/model.joblib
"#;
        let isvc: InferenceService = serde_yaml::from_str(yaml).unwrap();
        assert!(isvc.spec.predictor.model.is_none());
        assert_eq!(isvc.spec.predictor.frameworks["sklearn"]["storageUri"], "s3://bucket/model.joblib");
    }
}
