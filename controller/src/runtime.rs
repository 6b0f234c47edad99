//! ServingRuntimes become Deployments of `meshd` pods: the chart's pod template plus the runtime's
//! formats, resources, replicas and scheduling, and a runtime's own server containers beside meshd with
//! the runtime file that tells meshd how to reach them (`runtime_config`). A runtime no model needs is
//! scaled to zero after a grace period and back up when a model arrives.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EmptyDirVolumeSource, EnvVar, PodTemplateSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

use crate::crd::ServingRuntimeSpec;
use crate::mapping::offered_types;
use crate::runtime_config;

/// Names the runtime a meshd pod belongs to, as modelmesh-serving labels its pods.
pub const RUNTIME_LABEL: &str = "serving.kserve.io/servingRuntime";
/// Whether the pod's runtime is a ServingRuntime or a ClusterServingRuntime.
pub const RUNTIME_KIND_LABEL: &str = "densemesh.io/runtime-kind";
/// When the runtime was last seen unneeded, so the grace period survives controller restarts.
pub const UNNEEDED_SINCE_ANNOTATION: &str = "densemesh.io/unneeded-since";
/// The container of the pod template that runs meshd.
pub const MESHD_CONTAINER: &str = "meshd";

/// Puts the runtime's containers in the pod beside meshd, and gives meshd the runtime file (mounted
/// from its ConfigMap, see `runtime_config`) that says how to reach them.
fn with_runtime_containers(
    pod: &mut PodTemplateSpec,
    spec: &ServingRuntimeSpec,
    deployment: &str,
    file: &str,
) -> Result<(), String> {
    const CONFIG_VOLUME: &str = "densemesh-runtime-config";
    const MODELS_VOLUME: &str = "densemesh-models";
    const REPOSITORY_VOLUME: &str = "densemesh-repository";
    let repository = runtime_config::repository_outside_shared_dir(spec);
    let digest = Sha256::digest(file.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
    pod.metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(runtime_config::RUNTIME_FILE_DIGEST_ANNOTATION.to_owned(), digest);
    let pod_spec = pod.spec.as_mut().ok_or("the meshd pod template has no spec")?;
    let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
    let ours = [CONFIG_VOLUME, MODELS_VOLUME, REPOSITORY_VOLUME];
    if let Some(taken) = volumes.iter().find(|v| ours.contains(&v.name.as_str())) {
        return Err(format!("the meshd pod template already has a volume named {}", taken.name));
    }
    volumes.push(Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: runtime_config::config_map_name(deployment),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: MODELS_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    if repository.is_some() {
        volumes.push(Volume {
            name: REPOSITORY_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    }
    let meshd = pod_spec
        .containers
        .iter_mut()
        .find(|c| c.name == MESHD_CONTAINER)
        .ok_or("the meshd pod template has no container named meshd")?;
    // The runtime's containers see meshd's files (its model cache) at the same paths, so the path meshd
    // asks a server to load is one the server can open.
    let mut added = vec![VolumeMount {
        name: MODELS_VOLUME.into(),
        mount_path: runtime_config::SHARED_MODELS_DIR.into(),
        ..Default::default()
    }];
    if let Some(repository) = repository {
        added.push(VolumeMount {
            name: REPOSITORY_VOLUME.into(),
            mount_path: repository,
            ..Default::default()
        });
    }
    let mut shared = meshd.volume_mounts.clone().unwrap_or_default();
    shared.extend(added.iter().cloned());
    let mounts = meshd.volume_mounts.get_or_insert_with(Vec::new);
    mounts.push(VolumeMount {
        name: CONFIG_VOLUME.into(),
        mount_path: runtime_config::RUNTIME_FILE_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    });
    mounts.extend(added);
    let env = meshd.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != "DENSEMESH_RUNTIME_CONFIG");
    env.push(EnvVar {
        name: "DENSEMESH_RUNTIME_CONFIG".into(),
        value: Some(format!("{}/{}", runtime_config::RUNTIME_FILE_DIR, runtime_config::RUNTIME_FILE_KEY)),
        value_from: None,
    });
    for container in runtime_config::runtime_containers(spec) {
        if pod_spec.containers.iter().any(|c| c.name == container.name) {
            return Err(format!(
                "runtime container {:?} has the name of a container of the meshd pod template",
                container.name
            ));
        }
        let mut container = container.clone();
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        for mount in &shared {
            if !mounts.iter().any(|m| m.mount_path == mount.mount_path) {
                mounts.push(mount.clone());
            }
        }
        pod_spec.containers.push(container);
    }
    Ok(())
}

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
    // A container with an image is the runtime's own server and keeps its resources; one without (the
    // chart's `meshd`) only carries meshd's.
    let carrier = spec.containers.iter().find(|c| !runtime_config::is_runtime_container(c));
    if let Some(resources) = spec.resources.clone().or_else(|| carrier.and_then(|c| c.resources.clone())) {
        meshd.resources = Some(resources);
    }
    if let Some(file) = runtime_config::render(runtime, spec)? {
        with_runtime_containers(&mut pod, spec, &deployment_name(runtime, cluster), &file)?;
    }
    let pod_spec = pod.spec.as_mut().ok_or("the meshd pod template has no spec")?;
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
    use sha2::{Digest, Sha256};

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
    fn a_runtime_with_its_own_server_runs_it_beside_meshd_with_the_runtime_file() {
        let spec: ServingRuntimeSpec = serde_yaml::from_str(
            r#"
supportedModelFormats: [{name: sklearn}]
grpcDataEndpoint: "port:8001"
builtInAdapter: {serverType: mlserver}
containers:
  - name: mlserver
    image: seldonio/mlserver:1.7.1
    resources: {limits: {memory: 4Gi}}
    env: [{name: MLSERVER_MODELS_DIR, value: /models/_mlserver_models}]
"#,
        )
        .unwrap();
        let mut t = template();
        t.spec.as_mut().unwrap().containers[0].volume_mounts = Some(vec![VolumeMount {
            name: "cache".into(),
            mount_path: "/var/cache/densemesh".into(),
            ..Default::default()
        }]);
        let d = deployment("ml", false, "ns", &spec, &t, 1, None, OwnerReference::default()).unwrap();
        let pod = d.spec.unwrap().template;
        let digest = &pod.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
            [runtime_config::RUNTIME_FILE_DIGEST_ANNOTATION];
        let file = runtime_config::render("ml", &spec).unwrap().unwrap();
        let want: String = Sha256::digest(file.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, &want, "a changed file changes the pods, which read it once");
        let pod = pod.spec.unwrap();
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["meshd", "mlserver"]);
        let (meshd, server) = (&pod.containers[0], &pod.containers[1]);
        let env: BTreeMap<_, _> =
            meshd.env.iter().flatten().map(|e| (e.name.as_str(), e.value.clone().unwrap())).collect();
        assert_eq!(env["DENSEMESH_RUNTIME_CONFIG"], "/etc/densemesh/runtime-config/runtimes.yaml");
        assert_eq!(env["DENSEMESH_MODEL_TYPES"], "sklearn");
        assert!(meshd.resources.is_none(), "the server's resources stay the server's");
        assert_eq!(server.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0, "4Gi");
        let mounts = |c: &Container| -> Vec<(String, String)> {
            c.volume_mounts.iter().flatten().map(|m| (m.name.clone(), m.mount_path.clone())).collect()
        };
        assert_eq!(
            mounts(meshd),
            [
                ("cache".into(), "/var/cache/densemesh".into()),
                ("densemesh-runtime-config".into(), "/etc/densemesh/runtime-config".into()),
                ("densemesh-models".into(), "/models".into()),
            ]
        );
        assert_eq!(
            mounts(server),
            [("cache".into(), "/var/cache/densemesh".into()), ("densemesh-models".into(), "/models".into())],
            "the server opens the files meshd pulled at the paths meshd gives it"
        );
        let volumes = pod.volumes.unwrap();
        assert_eq!(
            volumes[0].config_map.as_ref().unwrap().name,
            runtime_config::config_map_name("densemesh-ml")
        );
        assert!(volumes[1].empty_dir.is_some());

        // A repository outside /models gets a volume of its own, at its path in both containers.
        let mut elsewhere = spec.clone();
        elsewhere.containers[0].env.as_mut().unwrap()[0].value = Some("/srv/repo".into());
        let d = deployment("ml", false, "ns", &elsewhere, &template(), 1, None, OwnerReference::default())
            .unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        for container in &pod.containers {
            assert!(
                mounts(container).contains(&("densemesh-repository".into(), "/srv/repo".into())),
                "{}: {:?}",
                container.name,
                mounts(container)
            );
        }
        assert!(
            pod.volumes.unwrap().iter().any(|v| v.name == "densemesh-repository" && v.empty_dir.is_some())
        );

        // A runtime container named like a template container is refused, not merged.
        let mut clash = spec.clone();
        clash.containers[0].name = "meshd".into();
        clash.containers.push(Container {
            name: "meshd-2".into(),
            image: Some("x".into()),
            ..Default::default()
        });
        let mut t2 = template();
        t2.spec.as_mut().unwrap().containers.push(Container { name: "meshd-2".into(), ..Default::default() });
        let err = deployment("ml", false, "ns", &clash, &t2, 1, None, OwnerReference::default()).unwrap_err();
        assert!(err.contains("\"meshd-2\""), "{err}");
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
