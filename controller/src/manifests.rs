//! The same YAML without Kubernetes: manifests read from files and mapped to the mesh by the
//! controller's own functions, for `meshctl apply -f`.

use serde::Deserialize;

use crate::crd::{FailureReason, InferenceService, Predictor};
use crate::mapping::{self, Desired, SpecError};

/// One document of a manifest file.
#[derive(Debug, Clone)]
pub enum Manifest {
    InferenceService(Box<InferenceService>),
    Predictor(Box<Predictor>),
    /// A kind the mesh has nothing to do with here (a ServingRuntime, a Secret, …), or an
    /// InferenceService for KServe's other modes.
    Ignored {
        kind: String,
        name: String,
        why: String,
    },
}

impl Manifest {
    /// `kind/name`, as kubectl prints it.
    pub fn describe(&self) -> String {
        let (kind, name) = match self {
            Manifest::InferenceService(o) => {
                ("inferenceservice", o.metadata.name.clone().unwrap_or_default())
            }
            Manifest::Predictor(o) => ("predictor", o.metadata.name.clone().unwrap_or_default()),
            Manifest::Ignored { kind, name, .. } => return format!("{}/{name}", kind.to_ascii_lowercase()),
        };
        format!("{kind}/{name}")
    }

    /// What the object asks of a mesh whose pods offer `offered` model types (`None`: unknown, no
    /// check); `None` for an ignored document.
    pub fn desired(&self, offered: Option<&[String]>) -> Option<Result<Desired, SpecError>> {
        let desired = match self {
            Manifest::InferenceService(o) => mapping::desired_for_isvc_with(o, true),
            Manifest::Predictor(o) => mapping::desired_for_predictor(o),
            Manifest::Ignored { .. } => return None,
        };
        Some(desired.and_then(|d| match offered {
            Some(types) if !types.contains(&d.model_type) => Err(SpecError {
                reason: FailureReason::NoSupportingRuntime,
                message: format!(
                    "no pod of this mesh offers model type {} (it offers {}; see meshd --model-types)",
                    d.model_type,
                    if types.is_empty() { "none".to_owned() } else { types.join(", ") }
                ),
            }),
            _ => Ok(d),
        }))
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "apiVersion")]
    api_version: String,
    #[serde(default)]
    metadata: Option<HeadMeta>,
}

#[derive(Deserialize)]
struct HeadMeta {
    #[serde(default)]
    name: String,
}

/// Every document of a YAML (or JSON) stream; `source` names the file in errors.
pub fn parse(text: &str, source: &str) -> Result<Vec<Manifest>, String> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| format!("{source}: document {}: not YAML: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let at = |e: serde_yaml::Error| format!("{source}: document {}: {e}", i + 1);
        let head: Head = serde_yaml::from_value(value.clone()).map_err(at)?;
        let name = head.metadata.map(|m| m.name).unwrap_or_default();
        if name.is_empty() && matches!(head.kind.as_str(), "InferenceService" | "Predictor") {
            return Err(format!("{source}: document {}: {} has no metadata.name", i + 1, head.kind));
        }
        let group = head.api_version.split('/').next().unwrap_or_default();
        out.push(match (group, head.kind.as_str()) {
            ("serving.kserve.io", "InferenceService") => {
                let isvc: InferenceService = serde_yaml::from_value(value).map_err(at)?;
                if mapping::is_model_mesh(isvc.metadata.annotations.as_ref()) {
                    Manifest::InferenceService(Box::new(isvc))
                } else {
                    Manifest::Ignored {
                        kind: head.kind,
                        name,
                        why: "not in ModelMesh mode (annotation serving.kserve.io/deploymentMode: ModelMesh)"
                            .into(),
                    }
                }
            }
            ("serving.kserve.io", "Predictor") => {
                Manifest::Predictor(Box::new(serde_yaml::from_value(value).map_err(at)?))
            }
            (_, "ServingRuntime" | "ClusterServingRuntime") => Manifest::Ignored {
                kind: head.kind,
                name,
                why: "without Kubernetes the mesh's pods are the runtime (meshd --model-types)".into(),
            },
            _ => Manifest::Ignored { kind: head.kind, name, why: "not a kind meshctl applies".into() },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
apiVersion: serving.kserve.io/v1alpha1
kind: ServingRuntime
metadata: {name: rt}
spec: {supportedModelFormats: [{name: onnx}]}
---
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: a
  annotations: {serving.kserve.io/deploymentMode: ModelMesh}
spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: "s3://b/a"}}}
---
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata: {name: serverless}
spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: "s3://b/a"}}}
---
apiVersion: serving.kserve.io/v1alpha1
kind: Predictor
metadata: {name: p}
spec: {modelType: {name: sklearn}, path: m.joblib}
"#;

    #[test]
    fn a_manifest_file_maps_like_the_controller_maps_it() {
        let docs = parse(FILE, "f.yaml").unwrap();
        let described: Vec<String> = docs.iter().map(Manifest::describe).collect();
        assert_eq!(
            described,
            ["servingruntime/rt", "inferenceservice/a", "inferenceservice/serverless", "predictor/p"]
        );
        assert!(matches!(&docs[2], Manifest::Ignored { why, .. } if why.contains("ModelMesh")));
        let offered = vec!["onnx".to_owned()];
        assert!(docs[0].desired(Some(&offered)).is_none());
        let a = docs[1].desired(Some(&offered)).unwrap().unwrap();
        assert_eq!(a.vmodel_id, "a");
        let p = docs[3].desired(Some(&offered)).unwrap().unwrap_err();
        assert_eq!(p.reason, FailureReason::NoSupportingRuntime);
        assert!(p.message.contains("model type sklearn"), "{}", p.message);
        assert!(docs[3].desired(None).unwrap().is_ok(), "no check when the offer is unknown");
    }

    #[test]
    fn bad_documents_name_the_file_and_document() {
        let err =
            parse("kind: InferenceService\napiVersion: serving.kserve.io/v1beta1\nmetadata: {}\n", "x.yaml")
                .unwrap_err();
        assert!(err.contains("x.yaml: document 1") && err.contains("metadata.name"), "{err}");
        let err = parse("a: [", "y.yaml").unwrap_err();
        assert!(err.starts_with("y.yaml: document 1"), "{err}");
    }
}
