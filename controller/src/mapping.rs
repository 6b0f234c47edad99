//! From an InferenceService or Predictor to what the mesh must hold, the way modelmesh-serving maps
//! them: the object's name is the vmodel, each revision of its model spec is a concrete model
//! `<name>__isvc-<hash>` registered to be deleted with the vmodel. Pure, so the controller and
//! `meshctl apply` share it.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{
    FailureReason, InferenceService, ModelFormat, Predictor, SECRET_KEY_ANNOTATION,
    SERVING_RUNTIME_ANNOTATION, ServingRuntimeSpec, StorageSpec,
};

/// The vmodel owner modelmesh-serving uses for InferenceServices.
pub const ISVC_OWNER: &str = "isvc";
/// The vmodel owner modelmesh-serving uses for Predictors.
pub const PREDICTOR_OWNER: &str = "ksp";
/// The storage-config key a model without one is read with, as in modelmesh-serving.
pub const DEFAULT_STORAGE_KEY: &str = "default";
/// The older per-framework predictor forms, in the order they are looked for.
const FRAMEWORKS: &[&str] =
    &["onnx", "sklearn", "xgboost", "lightgbm", "pytorch", "tensorflow", "triton", "pmml", "paddle"];

/// One object's model, as the mesh's management API takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub vmodel_id: String,
    pub owner: &'static str,
    /// This revision's concrete model id.
    pub model_id: String,
    pub model_type: String,
    pub format: ModelFormat,
    /// The runtime the object names, if it names one.
    pub runtime: Option<String>,
    pub path: String,
    /// modelmesh-serving's key JSON, `{"storage_key": …, "bucket": …}`; empty for a bare URI.
    pub key: String,
    pub size_bytes: Option<u64>,
    pub min_copies: Option<u32>,
    /// What it asks of GPUs: `preferred` or `required` (a Predictor's `spec.gpu`).
    pub gpu: Option<String>,
    /// Percent of traffic for this revision while the last rolled-out one keeps the rest; `None`
    /// rolls it out fully.
    pub canary_percent: Option<u32>,
}

/// Why an object cannot be served as written; becomes `InvalidSpec` with this reason and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub reason: FailureReason,
    pub message: String,
}

fn invalid(message: impl Into<String>) -> SpecError {
    SpecError { reason: FailureReason::InvalidPredictorSpec, message: message.into() }
}

/// What an InferenceService asks of the mesh. `file://` storage is refused: on a cluster it would
/// let whoever may create an InferenceService read files of the meshd pods.
pub fn desired_for_isvc(isvc: &InferenceService) -> Result<Desired, SpecError> {
    desired_for_isvc_with(isvc, false)
}

/// As `desired_for_isvc`, with `file://` storage allowed where the manifests' author runs the mesh
/// (`meshctl apply` on a single box).
pub fn desired_for_isvc_with(isvc: &InferenceService, local_files: bool) -> Result<Desired, SpecError> {
    let name = isvc.metadata.name.as_deref().unwrap_or_default();
    let annotations = isvc.metadata.annotations.clone().unwrap_or_default();
    let predictor = &isvc.spec.predictor;
    let (field, model) = match &predictor.model {
        Some(model) => ("spec.predictor.model", model.clone()),
        None => {
            let Some((framework, body)) =
                FRAMEWORKS.iter().find_map(|f| predictor.frameworks.get(*f).map(|b| (*f, b)))
            else {
                return Err(invalid(format!(
                    "spec.predictor has no model: set spec.predictor.model (with modelFormat and \
                     storageUri or storage) or one of spec.predictor.{}",
                    FRAMEWORKS.join(", spec.predictor.")
                )));
            };
            let mut model: crate::crd::ModelSpec = serde_json::from_value(body.clone())
                .map_err(|e| invalid(format!("spec.predictor.{framework}: {e}")))?;
            model.model_format.get_or_insert_with(|| ModelFormat { name: framework.into(), version: None });
            ("spec.predictor", model)
        }
    };
    let Some(format) = model.model_format.clone().filter(|f| !f.name.trim().is_empty()) else {
        return Err(invalid(format!(
            "{field}.modelFormat.name is missing: say which format the model is in, e.g. onnx"
        )));
    };
    let secret_key = annotations.get(SECRET_KEY_ANNOTATION).cloned();
    let (path, key) = storage_location(
        field,
        model.storage_uri.as_deref(),
        model.storage.as_ref(),
        secret_key,
        local_files,
    )?;
    let size_bytes = match &model.size {
        Some(q) => Some(parse_quantity(&q.0).map_err(|e| invalid(format!("{field}.size {:?}: {e}", q.0)))?),
        None => None,
    };
    let canary_percent = match predictor.canary_traffic_percent {
        None | Some(100) => None,
        Some(p @ 0..=99) => Some(p as u32),
        Some(p) => {
            return Err(invalid(format!("spec.predictor.canaryTrafficPercent {p} is not within 0..100")));
        }
    };
    let min_copies = match predictor.min_copies {
        None => None,
        Some(n) if n >= 0 => Some(n as u32),
        Some(n) => return Err(invalid(format!("spec.predictor.minCopies {n} is negative"))),
    };
    let runtime = model.runtime.clone().or_else(|| annotations.get(SERVING_RUNTIME_ANNOTATION).cloned());
    Ok(Desired {
        model_id: revision_id(
            name,
            ISVC_OWNER,
            RevisionOf {
                format: &format,
                runtime: runtime.as_deref(),
                path: &path,
                key: &key,
                size_bytes,
                min_copies,
                gpu: None,
            },
        ),
        vmodel_id: name.to_owned(),
        owner: ISVC_OWNER,
        model_type: format.name.to_ascii_lowercase(),
        format,
        runtime,
        path,
        key,
        size_bytes,
        min_copies,
        gpu: None,
        canary_percent,
    })
}

/// What a (modelmesh-serving v1alpha1) Predictor asks of the mesh.
pub fn desired_for_predictor(predictor: &Predictor) -> Result<Desired, SpecError> {
    let name = predictor.metadata.name.as_deref().unwrap_or_default();
    let spec = &predictor.spec;
    if spec.model_type.name.trim().is_empty() {
        return Err(invalid("spec.modelType.name is missing: say which format the model is in, e.g. onnx"));
    }
    if spec.path.trim().is_empty() {
        return Err(invalid("spec.path is empty: give the model's path in its storage"));
    }
    let storage = spec.storage.clone().unwrap_or_default();
    let (path, key) = if let Some(pvc) = &storage.persistent_volume_claim {
        (pvc_path(&pvc.claim_name, &spec.path), String::new())
    } else if let Some(s3) = &storage.s3 {
        (spec.path.clone(), storage_key_json(&s3.secret_key, s3.bucket.as_deref()))
    } else {
        storage_location(
            "spec",
            None,
            Some(&StorageSpec { path: Some(spec.path.clone()), ..Default::default() }),
            None,
            false,
        )?
    };
    let runtime = spec.runtime.as_ref().map(|r| r.name.clone());
    let gpu = match spec.gpu.as_deref().map(|g| g.trim().to_ascii_lowercase()) {
        None => None,
        Some(g) if g.is_empty() => None,
        Some(g) if g == "required" || g == "preferred" => Some(g),
        Some(g) => return Err(invalid(format!("spec.gpu {g:?} is not required or preferred"))),
    };
    Ok(Desired {
        model_id: revision_id(
            name,
            PREDICTOR_OWNER,
            RevisionOf {
                format: &spec.model_type,
                runtime: runtime.as_deref(),
                path: &path,
                key: &key,
                size_bytes: None,
                min_copies: None,
                gpu: gpu.as_deref(),
            },
        ),
        vmodel_id: name.to_owned(),
        owner: PREDICTOR_OWNER,
        model_type: spec.model_type.name.to_ascii_lowercase(),
        format: spec.model_type.clone(),
        runtime,
        path,
        key,
        size_bytes: None,
        min_copies: None,
        gpu,
        canary_percent: None,
    })
}

/// Where the model is: `(path, key JSON)` as the mesh's puller reads them.
fn storage_location(
    field: &str,
    uri: Option<&str>,
    storage: Option<&StorageSpec>,
    secret_key: Option<String>,
    local_files: bool,
) -> Result<(String, String), SpecError> {
    let given = uri.or(storage.and_then(|s| s.path.as_deref())).unwrap_or_default();
    if given.split(['/', '\\']).any(|segment| segment == "..") {
        return Err(invalid(format!("{field}: storage path {given:?} has a `..` segment")));
    }
    let key_name = storage.and_then(|s| s.key.clone()).or(secret_key);
    let bucket =
        storage.and_then(|s| s.parameters.as_ref()).and_then(|p| p.get("bucket")).map(String::as_str);
    if let Some(uri) = uri.filter(|u| !u.trim().is_empty()) {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(invalid(format!(
                "{field}.storageUri {uri:?} has no scheme: use s3://, gs://, https:// or pvc://"
            )));
        };
        return match scheme {
            "pvc" => {
                let Some((claim, path)) =
                    rest.split_once('/').filter(|(c, p)| !c.is_empty() && !p.is_empty())
                else {
                    return Err(invalid(format!("{field}.storageUri {uri:?} must be pvc://CLAIM/PATH")));
                };
                Ok((pvc_path(claim, path), String::new()))
            }
            "file" if !local_files => Err(invalid(format!(
                "{field}.storageUri {uri:?}: file:// is not served from a cluster; use s3://, gs://, https:// or pvc://"
            ))),
            "s3" | "gs" | "http" | "https" | "file" => {
                let key = key_name.map(|k| storage_key_json(&k, bucket)).unwrap_or_default();
                Ok((uri.to_owned(), key))
            }
            other => Err(invalid(format!(
                "{field}.storageUri {uri:?}: scheme {other}:// is not supported; use s3://, gs://, https:// or pvc://"
            ))),
        };
    }
    match storage.and_then(|s| s.path.clone()).filter(|p| !p.trim().is_empty()) {
        Some(path) => {
            let key = key_name.unwrap_or_else(|| DEFAULT_STORAGE_KEY.to_owned());
            Ok((path, storage_key_json(&key, bucket)))
        }
        None => Err(invalid(format!(
            "{field} has no storage: set {field}.storageUri (s3://, gs://, https://, pvc://) or {field}.storage.path"
        ))),
    }
}

/// Where modelmesh-serving mounts a PersistentVolumeClaim in the serving pods.
fn pvc_path(claim: &str, path: &str) -> String {
    format!("/pvc_mounts/{claim}/{}", path.trim_start_matches('/'))
}

fn storage_key_json(key: &str, bucket: Option<&str>) -> String {
    #[derive(Serialize)]
    struct Key<'a> {
        storage_key: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        bucket: Option<&'a str>,
    }
    serde_json::to_string(&Key { storage_key: key, bucket }).expect("strings serialize")
}

/// What makes one revision differ from another.
struct RevisionOf<'a> {
    format: &'a ModelFormat,
    runtime: Option<&'a str>,
    path: &'a str,
    key: &'a str,
    size_bytes: Option<u64>,
    min_copies: Option<u32>,
    gpu: Option<&'a str>,
}

/// `<name>__<owner>-<10 hex>`: a new id for every spec that loads or is kept differently (the
/// placement hints included: the mesh learns them with a revision), the same id for a spec that
/// does not, so re-applying an unchanged object changes nothing in the mesh.
fn revision_id(name: &str, owner: &str, r: RevisionOf) -> String {
    let mut canonical = serde_json::json!({
        "format": r.format.name.to_ascii_lowercase(),
        "version": r.format.version,
        "runtime": r.runtime,
        "path": r.path,
        "key": r.key,
        "size": r.size_bytes,
        "min_copies": r.min_copies,
        "gpu": r.gpu,
    });
    // Fields not given leave no trace, so a field added later does not change every existing id.
    if let Some(fields) = canonical.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
    }
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{name}__{owner}-{hex}")
}

/// A Kubernetes quantity (`120Mi`, `1.5Gi`, `2G`, `1e6`, `4096`) in bytes.
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| "not a quantity like 120Mi or 4096".to_owned())?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| format!("exponent {e:?} is not a number"))?;
            10f64.powi(exp)
        }
        other => return Err(format!("unknown suffix {other:?}; use Ki, Mi, Gi, Ti, k, M, G or T")),
    };
    let bytes = (number * factor).ceil();
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err("too large".into());
    }
    Ok(bytes as u64)
}

/// A ServingRuntime or ClusterServingRuntime, as runtime selection sees it.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeInfo<'a> {
    pub name: &'a str,
    /// A ClusterServingRuntime rather than one in the object's namespace.
    pub cluster: bool,
    pub spec: &'a ServingRuntimeSpec,
}

/// The runtime that will serve `desired`, as modelmesh-serving picks it: the one the object names
/// (its namespace's ServingRuntime before a ClusterServingRuntime of that name), else the
/// auto-selectable runtime of the highest priority that supports its format.
pub fn choose_runtime<'a>(
    desired: &Desired,
    runtimes: &[RuntimeInfo<'a>],
) -> Result<RuntimeInfo<'a>, SpecError> {
    let format = &desired.format;
    let described = match &format.version {
        Some(v) => format!("{} (version {v})", format.name),
        None => format.name.clone(),
    };
    if let Some(name) = &desired.runtime {
        let Some(runtime) = runtimes.iter().filter(|r| r.name == name).min_by_key(|r| r.cluster) else {
            return Err(SpecError {
                reason: FailureReason::RuntimeNotRecognized,
                message: format!(
                    "runtime {name:?} does not exist: no ServingRuntime of that name in this namespace and no ClusterServingRuntime"
                ),
            });
        };
        if let Err(why) = usable(runtime.spec) {
            return Err(SpecError {
                reason: FailureReason::NoSupportingRuntime,
                message: format!("runtime {name:?} {why}"),
            });
        }
        if !supports(runtime.spec, format) {
            return Err(SpecError {
                reason: FailureReason::NoSupportingRuntime,
                message: format!("runtime {name:?} does not support model format {described}"),
            });
        }
        return Ok(*runtime);
    }
    runtimes
        .iter()
        .filter(|r| usable(r.spec).is_ok() && supports_auto(r.spec, format))
        .max_by(|a, b| {
            priority(a.spec, format)
                .cmp(&priority(b.spec, format))
                .then(b.cluster.cmp(&a.cluster))
                .then(b.name.cmp(a.name))
        })
        .copied()
        .ok_or_else(|| SpecError {
            reason: FailureReason::NoSupportingRuntime,
            message: format!(
                "no ServingRuntime supports model format {described} with autoSelect; add one, or name a runtime in spec.predictor.model.runtime"
            ),
        })
}

fn usable(spec: &ServingRuntimeSpec) -> Result<(), &'static str> {
    if spec.disabled == Some(true) {
        return Err("is disabled");
    }
    if spec.multi_model == Some(false) {
        return Err("is not a multi-model runtime (multiModel: false), which the mesh needs");
    }
    Ok(())
}

fn matching<'s>(
    spec: &'s ServingRuntimeSpec,
    format: &ModelFormat,
) -> impl Iterator<Item = &'s crate::crd::SupportedModelFormat> {
    spec.supported_model_formats.iter().filter(move |f| {
        f.name.eq_ignore_ascii_case(&format.name)
            && match (&format.version, &f.version) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    })
}

fn supports(spec: &ServingRuntimeSpec, format: &ModelFormat) -> bool {
    matching(spec, format).next().is_some()
}

fn supports_auto(spec: &ServingRuntimeSpec, format: &ModelFormat) -> bool {
    matching(spec, format).any(|f| f.auto_select == Some(true))
}

fn priority(spec: &ServingRuntimeSpec, format: &ModelFormat) -> i32 {
    matching(spec, format).filter_map(|f| f.priority).max().unwrap_or(0)
}

/// The formats a runtime's pods offer, as meshd's `--model-types` takes them.
pub fn offered_types(spec: &ServingRuntimeSpec) -> Vec<String> {
    let mut types: Vec<String> =
        spec.supported_model_formats.iter().map(|f| f.name.to_ascii_lowercase()).collect();
    types.sort();
    types.dedup();
    types
}

/// The objects' annotations as a map, for callers holding raw metadata.
pub fn is_model_mesh(annotations: Option<&BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(crate::crd::DEPLOYMENT_MODE_ANNOTATION))
        .is_some_and(|mode| mode.eq_ignore_ascii_case(crate::crd::MODEL_MESH_MODE))
}

#[cfg(test)]
mod tests;
