//! ServingRuntimes become Deployments of `meshd` pods: the chart's pod template plus the runtime's
//! formats, resources, replicas and scheduling. A runtime no model needs is scaled to zero after a
//! grace period and back up when a model arrives.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{EnvVar, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::ServingRuntimeSpec;
use crate::mapping::offered_types;

/// Names the runtime a meshd pod belongs to, as modelmesh-serving labels its pods.
pub const RUNTIME_LABEL: &str = "serving.kserve.io/servingRuntime";
/// Whether the pod's runtime is a ServingRuntime or a ClusterServingRuntime.
pub const RUNTIME_KIND_LABEL: &str = "densemesh.io/runtime-kind";
/// When the runtime was last seen unneeded, so the grace period survives controller restarts.
pub const UNNEEDED_SINCE_ANNOTATION: &str = "densemesh.io/unneeded-since";
/// The container of the pod template that runs meshd.
pub const MESHD_CONTAINER: &str = "meshd";

/// How many pods a runtime should run, and since when it has been unneeded.
pub fn replicas(
    wanted: Option<i32>,
    needed: bool,
    unneeded_since: Option<Timestamp>,
    now: Timestamp,
    grace: Duration,
) -> (i32, Option<Timestamp>) {
    let wanted = wanted.unwrap_or(1).max(0);
    if needed {
        return (wanted, None);
    }
    let since = unneeded_since.unwrap_or(now);
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    let expired = since.checked_add(grace).is_ok_and(|end| end <= now);
    (if expired { 0 } else { wanted }, Some(since))
}

/// The Deployment name of a runtime's pods.
pub fn deployment_name(runtime: &str, cluster: bool) -> String {
    if cluster { format!("densemesh-cluster-{runtime}") } else { format!("densemesh-{runtime}") }
}

/// The runtime's Deployment: the chart's pod template with the runtime's model types, resources
/// and scheduling, and its label on every pod (so the Deployment selects only its own pods, while
/// the template's labels put them all behind the mesh's one Service).
#[allow(clippy::too_many_arguments)]
pub fn deployment(
    runtime: &str,
    cluster: bool,
    namespace: &str,
    spec: &ServingRuntimeSpec,
    template: &PodTemplateSpec,
    replicas: i32,
    unneeded_since: Option<Timestamp>,
    owner: OwnerReference,
) -> Result<Deployment, String> {
    let mut pod = template.clone();
    let labels =
        pod.metadata.get_or_insert_with(ObjectMeta::default).labels.get_or_insert_with(BTreeMap::new);
    labels.insert(RUNTIME_LABEL.to_owned(), runtime.to_owned());
    labels.insert(RUNTIME_KIND_LABEL.to_owned(), if cluster { "cluster" } else { "namespaced" }.to_owned());
    // The kind is in the selector too: a ServingRuntime and a ClusterServingRuntime of one name
    // may both have pods in a namespace, and each Deployment must select only its own.
    let selector: BTreeMap<String, String> = [
        (RUNTIME_LABEL.to_owned(), runtime.to_owned()),
        (RUNTIME_KIND_LABEL.to_owned(), if cluster { "cluster" } else { "namespaced" }.to_owned()),
        ("app.kubernetes.io/component".to_owned(), "meshd".to_owned()),
    ]
    .into();
    let pod_spec = pod.spec.as_mut().ok_or("the meshd pod template has no spec")?;
    let meshd = pod_spec
        .containers
        .iter_mut()
        .find(|c| c.name == MESHD_CONTAINER)
        .ok_or("the meshd pod template has no container named meshd")?;
    let env = meshd.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != "DENSEMESH_MODEL_TYPES");
    env.push(EnvVar {
        name: "DENSEMESH_MODEL_TYPES".into(),
        value: Some(offered_types(spec).join(",")),
        value_from: None,
    });
    if let Some(resources) =
        spec.resources.clone().or_else(|| spec.containers.first().and_then(|c| c.resources.clone()))
    {
        meshd.resources = Some(resources);
    }
    if let Some(node_selector) = &spec.node_selector {
        pod_spec.node_selector = Some(node_selector.clone());
    }
    if let Some(tolerations) = &spec.tolerations {
        pod_spec.tolerations = Some(tolerations.clone());
    }
    let annotations =
        unneeded_since.map(|t| BTreeMap::from([(UNNEEDED_SINCE_ANNOTATION.to_owned(), t.to_string())]));
    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(runtime, cluster)),
            namespace: Some(namespace.to_owned()),
            labels: Some(selector.clone()),
            annotations,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector { match_labels: Some(selector), match_expressions: None },
            template: pod,
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, ResourceRequirements, Toleration};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;
    use crate::crd::SupportedModelFormat;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn scale_to_zero_after_the_grace_period_and_back() {
        let grace = Duration::from_secs(300);
        assert_eq!(replicas(Some(3), true, Some(at(0)), at(1000), grace), (3, None));
        assert_eq!(replicas(Some(3), false, None, at(1000), grace), (3, Some(at(1000))), "grace starts");
        assert_eq!(replicas(Some(3), false, Some(at(1000)), at(1299), grace), (3, Some(at(1000))));
        assert_eq!(
            replicas(Some(3), false, Some(at(1000)), at(1300), grace),
            (0, Some(at(1000))),
            "grace over"
        );
        assert_eq!(replicas(None, true, Some(at(1000)), at(5000), grace), (1, None), "a model arrives");
    }

    fn template() -> PodTemplateSpec {
        serde_yaml::from_str(
            r#"
metadata: {labels: {app.kubernetes.io/name: densemesh, app.kubernetes.io/component: meshd}}
spec:
  containers:
    - name: meshd
      image: densemesh/meshd:0.1.0
      env: [{name: DENSEMESH_MODEL_TYPES, value: stale}, {name: DENSEMESH_CAPACITY, value: "60%"}]
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_runtime_becomes_its_deployment() {
        let spec = ServingRuntimeSpec {
            supported_model_formats: vec![
                SupportedModelFormat { name: "ONNX".into(), ..Default::default() },
                SupportedModelFormat { name: "onnx".into(), version: Some("1".into()), ..Default::default() },
            ],
            containers: vec![Container {
                name: "runtime".into(),
                resources: Some(ResourceRequirements {
                    limits: Some([("memory".to_owned(), Quantity("2Gi".into()))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            node_selector: Some([("pool".to_owned(), "cpu".to_owned())].into()),
            tolerations: Some(vec![Toleration { key: Some("dedicated".into()), ..Default::default() }]),
            ..Default::default()
        };
        let d = deployment("onnx-rt", false, "ns", &spec, &template(), 2, None, OwnerReference::default())
            .unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("densemesh-onnx-rt"));
        let spec_out = d.spec.unwrap();
        assert_eq!(spec_out.replicas, Some(2));
        let labels = spec_out.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels[RUNTIME_LABEL], "onnx-rt");
        assert_eq!(labels["app.kubernetes.io/name"], "densemesh", "the template's labels stay");
        for (k, v) in spec_out.selector.match_labels.unwrap() {
            assert_eq!(labels[&k], v, "the selector selects the template");
        }
        let pod = spec_out.template.spec.unwrap();
        let meshd = &pod.containers[0];
        let env: BTreeMap<_, _> =
            meshd.env.iter().flatten().map(|e| (e.name.as_str(), e.value.clone().unwrap())).collect();
        assert_eq!(env["DENSEMESH_MODEL_TYPES"], "onnx");
        assert_eq!(env["DENSEMESH_CAPACITY"], "60%");
        assert_eq!(meshd.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0, "2Gi");
        assert_eq!(pod.node_selector.unwrap()["pool"], "cpu");
        assert_eq!(pod.tolerations.unwrap().len(), 1);
    }

    #[test]
    fn a_template_without_meshd_is_an_error_not_a_crash() {
        let mut t = template();
        t.spec.as_mut().unwrap().containers[0].name = "other".into();
        let err = deployment(
            "r",
            false,
            "ns",
            &ServingRuntimeSpec::default(),
            &t,
            1,
            None,
            OwnerReference::default(),
        )
        .unwrap_err();
        assert!(err.contains("no container named meshd"), "{err}");
    }
}
