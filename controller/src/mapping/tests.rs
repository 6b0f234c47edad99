use super::*;
use crate::crd::{InferenceService, SupportedModelFormat};

fn isvc(yaml: &str) -> InferenceService {
    serde_yaml::from_str(yaml).unwrap()
}

const ONNX: &str = r#"
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: mnist
  annotations: {serving.kserve.io/deploymentMode: ModelMesh}
spec:
  predictor:
    model:
      modelFormat: {name: onnx}
      storage: {key: localMinIO, path: onnx/mnist.onnx}
"#;

#[test]
fn storage_key_and_path_become_modelmesh_servings_key_json() {
    let d = desired_for_isvc(&isvc(ONNX)).unwrap();
    assert_eq!(d.vmodel_id, "mnist");
    assert_eq!(d.owner, "isvc");
    assert_eq!(d.model_type, "onnx");
    assert_eq!(d.path, "onnx/mnist.onnx");
    assert_eq!(d.key, r#"{"storage_key":"localMinIO"}"#);
    assert!(d.model_id.starts_with("mnist__isvc-"), "{}", d.model_id);
    assert_eq!(d.model_id.len(), "mnist__isvc-".len() + 10);
}

#[test]
fn the_same_spec_is_the_same_revision_and_a_change_is_a_new_one() {
    let a = desired_for_isvc(&isvc(ONNX)).unwrap();
    let b = desired_for_isvc(&isvc(ONNX)).unwrap();
    assert_eq!(a.model_id, b.model_id);
    let moved = desired_for_isvc(&isvc(&ONNX.replace("onnx/mnist.onnx", "onnx/mnist-v2.onnx"))).unwrap();
    assert_ne!(a.model_id, moved.model_id);
    // The canary percent does not change what loads, so not the revision either.
    let canary =
        desired_for_isvc(&isvc(&ONNX.replace("    model:", "    canaryTrafficPercent: 10\n    model:")))
            .unwrap();
    assert_eq!(a.model_id, canary.model_id);
    assert_eq!(canary.canary_percent, Some(10));
}

#[test]
fn storage_uri_with_the_secret_key_annotation() {
    let d = desired_for_isvc(&isvc(
        r#"
metadata:
  name: m
  annotations: {serving.kserve.io/secretKey: myStorage}
spec:
  predictor:
    model:
      modelFormat: {name: ONNX, version: "1"}
      storageUri: s3://bucket/path/model.onnx
"#,
    ))
    .unwrap();
    assert_eq!(d.path, "s3://bucket/path/model.onnx");
    assert_eq!(d.key, r#"{"storage_key":"myStorage"}"#);
    assert_eq!(d.model_type, "onnx");
}

#[test]
fn a_path_without_a_key_uses_the_default_key_and_the_bucket_parameter() {
    let d = desired_for_isvc(&isvc(
        r#"
metadata: {name: m}
spec:
  predictor:
    model:
      modelFormat: {name: onnx}
      storage: {path: a/b.onnx, parameters: {bucket: other}}
"#,
    ))
    .unwrap();
    assert_eq!(d.key, r#"{"storage_key":"default","bucket":"other"}"#);
}

#[test]
fn pvc_uris_point_into_the_pods_mounts() {
    let d = desired_for_isvc(&isvc(
        r#"
metadata: {name: m}
spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: "pvc://models/mnist/model.onnx"}}}
"#,
    ))
    .unwrap();
    assert_eq!(d.path, "/pvc_mounts/models/mnist/model.onnx");
    assert_eq!(d.key, "");
}

#[test]
fn the_per_framework_form_names_the_format() {
    let d = desired_for_isvc(&isvc(
        r#"
metadata: {name: m}
spec: {predictor: {sklearn: {storageUri: "s3://b/model.joblib"}}}
"#,
    ))
    .unwrap();
    assert_eq!(d.model_type, "sklearn");
}

#[test]
fn size_hints_and_min_copies_are_read() {
    let d = desired_for_isvc(&isvc(
        r#"
metadata: {name: m}
spec: {predictor: {minCopies: 2, model: {modelFormat: {name: onnx}, storageUri: "s3://b/m", size: 120Mi}}}
"#,
    ))
    .unwrap();
    assert_eq!(d.size_bytes, Some(120 << 20));
    assert_eq!(d.min_copies, Some(2));
}

#[test]
fn bad_specs_say_what_to_fix() {
    let cases = [
        ("spec: {predictor: {}}", "spec.predictor has no model"),
        ("spec: {predictor: {model: {storageUri: \"s3://b/m\"}}}", "modelFormat.name is missing"),
        ("spec: {predictor: {model: {modelFormat: {name: onnx}}}}", "has no storage"),
        (
            "spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: \"ftp://x/y\"}}}",
            "scheme ftp://",
        ),
        ("spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: \"nowhere\"}}}", "has no scheme"),
        (
            "spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: \"pvc://claim\"}}}",
            "pvc://CLAIM/PATH",
        ),
        (
            "spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: \"pvc://c/../../etc/passwd\"}}}",
            "`..` segment",
        ),
        (
            "spec: {predictor: {model: {modelFormat: {name: onnx}, storage: {path: \"a/../../b\"}}}}",
            "`..` segment",
        ),
        (
            "spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: \"file:///etc/passwd\"}}}",
            "file:// is not served",
        ),
        (
            "spec: {predictor: {model: {modelFormat: {name: onnx}, storageUri: \"s3://b/m\", size: lots}}}",
            "size",
        ),
        (
            "spec: {predictor: {canaryTrafficPercent: 150, model: {modelFormat: {name: onnx}, storageUri: \"s3://b/m\"}}}",
            "canaryTrafficPercent 150",
        ),
    ];
    for (spec, wanted) in cases {
        let err = desired_for_isvc(&isvc(&format!("metadata: {{name: m}}\n{spec}"))).unwrap_err();
        assert_eq!(err.reason, FailureReason::InvalidPredictorSpec, "{spec}");
        assert!(err.message.contains(wanted), "{spec}: {}", err.message);
    }
}

#[test]
fn predictors_map_like_modelmesh_serving() {
    let p: Predictor = serde_yaml::from_str(
        r#"
apiVersion: serving.kserve.io/v1alpha1
kind: Predictor
metadata: {name: example-mnist-predictor}
spec:
  modelType: {name: onnx}
  path: onnx/mnist.onnx
  storage: {s3: {secretKey: localMinIO, bucket: models}}
"#,
    )
    .unwrap();
    let d = desired_for_predictor(&p).unwrap();
    assert_eq!(d.owner, "ksp");
    assert!(d.model_id.starts_with("example-mnist-predictor__ksp-"));
    assert_eq!(d.key, r#"{"storage_key":"localMinIO","bucket":"models"}"#);
    assert_eq!(d.gpu, None);
}

#[test]
fn a_predictors_gpu_ask_reaches_the_mesh_and_is_a_revision_of_its_own() {
    let predictor = |gpu: &str| -> Predictor {
        serde_yaml::from_str(&format!(
            "apiVersion: serving.kserve.io/v1alpha1\nkind: Predictor\nmetadata: {{name: p}}\n\
             spec: {{modelType: {{name: huggingface}}, path: m, storage: {{s3: {{secretKey: k}}}}{gpu}}}"
        ))
        .unwrap()
    };
    let plain = desired_for_predictor(&predictor("")).unwrap();
    let required = desired_for_predictor(&predictor(", gpu: Required")).unwrap();
    assert_eq!(required.gpu.as_deref(), Some("required"));
    assert_ne!(required.model_id, plain.model_id, "the mesh learns the ask with a new revision");
    let preferred = desired_for_predictor(&predictor(", gpu: preferred")).unwrap();
    assert_eq!(preferred.gpu.as_deref(), Some("preferred"));
    let err = desired_for_predictor(&predictor(", gpu: always")).unwrap_err();
    assert_eq!(err.reason, FailureReason::InvalidPredictorSpec);
    assert!(
        err.message.contains("spec.gpu") && err.message.contains("required or preferred"),
        "{}",
        err.message
    );
}

#[test]
fn quantities() {
    assert_eq!(parse_quantity("4096"), Ok(4096));
    assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
    assert_eq!(parse_quantity("2k"), Ok(2000));
    assert_eq!(parse_quantity("1e6"), Ok(1_000_000));
    assert!(parse_quantity("12Zi").unwrap_err().contains("Zi"));
    assert!(parse_quantity("").is_err());
}

fn runtime(formats: &[(&str, Option<&str>, bool, i32)]) -> ServingRuntimeSpec {
    ServingRuntimeSpec {
        supported_model_formats: formats
            .iter()
            .map(|(name, version, auto, priority)| SupportedModelFormat {
                name: (*name).into(),
                version: version.map(Into::into),
                auto_select: Some(*auto),
                priority: Some(*priority),
            })
            .collect(),
        multi_model: Some(true),
        ..Default::default()
    }
}

#[test]
fn runtime_selection() {
    let onnx_low = runtime(&[("onnx", None, true, 1)]);
    let onnx_high = runtime(&[("onnx", Some("1"), true, 5)]);
    let sklearn_manual = runtime(&[("sklearn", None, false, 0)]);
    let mut disabled = runtime(&[("onnx", None, true, 9)]);
    disabled.disabled = Some(true);
    let runtimes = [
        RuntimeInfo { name: "low", cluster: false, spec: &onnx_low },
        RuntimeInfo { name: "high", cluster: true, spec: &onnx_high },
        RuntimeInfo { name: "sk", cluster: false, spec: &sklearn_manual },
        RuntimeInfo { name: "off", cluster: false, spec: &disabled },
    ];
    let mut d = desired_for_isvc(&isvc(ONNX)).unwrap();
    assert_eq!(choose_runtime(&d, &runtimes).unwrap().name, "high");
    d.format.version = Some("2".into());
    assert_eq!(choose_runtime(&d, &runtimes).unwrap().name, "low", "only `low` takes any version");

    d.format = ModelFormat { name: "sklearn".into(), version: None };
    let err = choose_runtime(&d, &runtimes).unwrap_err();
    assert_eq!(err.reason, FailureReason::NoSupportingRuntime, "sk does not auto-select");
    d.runtime = Some("sk".into());
    assert_eq!(choose_runtime(&d, &runtimes).unwrap().name, "sk");

    d.runtime = Some("nope".into());
    let err = choose_runtime(&d, &runtimes).unwrap_err();
    assert_eq!(err.reason, FailureReason::RuntimeNotRecognized);
    assert!(err.message.contains("\"nope\" does not exist"), "{}", err.message);

    d.runtime = Some("off".into());
    d.format.name = "onnx".into();
    let err = choose_runtime(&d, &runtimes).unwrap_err();
    assert_eq!(err.reason, FailureReason::NoSupportingRuntime);
    assert!(err.message.contains("disabled"), "{}", err.message);

    d.runtime = Some("low".into());
    d.format.name = "xgboost".into();
    let err = choose_runtime(&d, &runtimes).unwrap_err();
    assert!(err.message.contains("does not support model format xgboost"), "{}", err.message);
}

#[test]
fn only_model_mesh_mode_objects_are_ours() {
    let mut a = BTreeMap::new();
    assert!(!is_model_mesh(None));
    assert!(!is_model_mesh(Some(&a)));
    a.insert(crate::crd::DEPLOYMENT_MODE_ANNOTATION.to_owned(), "Serverless".to_owned());
    assert!(!is_model_mesh(Some(&a)));
    a.insert(crate::crd::DEPLOYMENT_MODE_ANNOTATION.to_owned(), "ModelMesh".to_owned());
    assert!(is_model_mesh(Some(&a)));
}
