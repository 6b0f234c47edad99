//! ServingRuntimes become meshd's runtime file (`--runtime-config`, the format of the mesh's
//! `config/runtime_file.rs`): the pod a runtime's Deployment runs holds meshd beside the runtime's own
//! containers, as modelmesh-serving's pods hold ModelMesh beside them, and the file tells meshd where
//! those containers listen and which formats they load.
//!
//! - `builtInAdapter.serverType: mlserver` is a KServe V2 server meshd drives itself through the
//!   model-repository extension (`kind: v2`): at `grpcDataEndpoint` (MLServer's 8001 by default), with
//!   its repository in a directory both containers mount (MLSERVER_MODELS_DIR, as modelmesh-serving sets
//!   it, else modelmesh-serving's `/models/_mlserver_models`; one outside `/models` gets a volume of its
//!   own).
//! - No built-in adapter and a `grpcEndpoint`: a runtime speaking ModelMesh's model-runtime SPI
//!   (`kind: spi`), inference at `grpcDataEndpoint` when it is set.
//! - Neither, and no container but meshd: the runtime is meshd's own in-process runtimes; no file.
//!
//! The runtime's containers get meshd's volume mounts at the same paths plus the shared `/models`, so a
//! model file meshd pulled is at the path the server is told to load.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::{Value, json};

use crate::crd::ServingRuntimeSpec;
use crate::runtime::MESHD_CONTAINER;

/// The key of the runtime file in its ConfigMap.
pub const RUNTIME_FILE_KEY: &str = "runtimes.yaml";
/// Where meshd's container mounts the ConfigMap.
pub const RUNTIME_FILE_DIR: &str = "/etc/densemesh/runtime-config";
/// The volume meshd and the runtime's containers share for the servers' model repositories.
pub const SHARED_MODELS_DIR: &str = "/models";
/// The pod annotation holding the file's digest, so pods restart when it changes (meshd reads it once).
pub const RUNTIME_FILE_DIGEST_ANNOTATION: &str = "densemesh.io/runtime-config-sha256";
/// modelmesh-serving's MLServer repository inside the shared volume.
const MLSERVER_DEFAULT_MODELS_DIR: &str = "/models/_mlserver_models";
/// MLServer's gRPC port when the runtime names none.
const MLSERVER_DEFAULT_GRPC_PORT: u16 = 8001;

/// The ConfigMap of a runtime's Deployment.
pub fn config_map_name(deployment: &str) -> String {
    format!("{deployment}-runtime-config")
}

/// Whether a ServingRuntime container is a server to run beside meshd: it has an image and is not
/// named `meshd`. One without an image only carries meshd's resources (the chart's default runtime).
pub fn is_runtime_container(container: &Container) -> bool {
    container.name != MESHD_CONTAINER && container.image.as_deref().is_some_and(|i| !i.trim().is_empty())
}

/// The runtime's own server containers (see [`is_runtime_container`]).
pub fn runtime_containers(spec: &ServingRuntimeSpec) -> impl Iterator<Item = &Container> {
    spec.containers.iter().filter(|c| is_runtime_container(c))
}

/// meshd's runtime file for the runtime `name`, or `None` when meshd's in-process runtimes serve it.
/// `Err` says what in the spec meshd cannot use.
pub fn render(name: &str, spec: &ServingRuntimeSpec) -> Result<Option<String>, String> {
    let server_type =
        spec.built_in_adapter.as_ref().and_then(|a| a.server_type.as_deref()).map(str::to_ascii_lowercase);
    let has_containers = runtime_containers(spec).next().is_some();
    if server_type.is_none() && spec.grpc_endpoint.is_none() && !has_containers {
        return Ok(None);
    }
    let formats: Vec<Value> = spec
        .supported_model_formats
        .iter()
        .map(|f| {
            let mut format = json!({ "name": f.name });
            if let Some(version) = &f.version {
                format["version"] = json!(version);
            }
            if let Some(auto_select) = f.auto_select {
                format["autoSelect"] = json!(auto_select);
            }
            format
        })
        .collect();
    if formats.is_empty() {
        return Err("it lists no supportedModelFormats".into());
    }
    let entry = match server_type.as_deref() {
        Some("mlserver") => {
            let endpoint = match &spec.grpc_data_endpoint {
                Some(endpoint) => tcp_endpoint("grpcDataEndpoint", endpoint)?,
                None => format!("127.0.0.1:{MLSERVER_DEFAULT_GRPC_PORT}"),
            };
            let repository = mlserver_repository(spec)?;
            let mut entry = json!({
                "kind": "v2",
                "name": name,
                "supportedModelFormats": formats,
                "endpoint": endpoint,
                "repository": repository,
            });
            let millis = spec.built_in_adapter.as_ref().and_then(|a| a.model_loading_timeout_millis);
            if let Some(millis) = millis {
                if millis <= 0 {
                    return Err(format!("builtInAdapter.modelLoadingTimeoutMillis {millis} is not positive"));
                }
                entry["timeouts"] = json!({ "load": format!("{millis}ms") });
            }
            entry
        }
        Some(other) => {
            return Err(format!(
                "builtInAdapter.serverType {other:?} is not supported: meshd drives mlserver directly, and other servers through an adapter that speaks the model-runtime SPI at grpcEndpoint"
            ));
        }
        None => {
            let endpoint = spec.grpc_endpoint.as_deref().ok_or(
                "it has containers but no grpcEndpoint (nor builtInAdapter.serverType), so meshd cannot reach them",
            )?;
            let mut entry = json!({
                "kind": "spi",
                "name": name,
                "supportedModelFormats": formats,
                "endpoint": spi_endpoint("grpcEndpoint", endpoint)?,
            });
            if let Some(data) = &spec.grpc_data_endpoint {
                entry["dataEndpoint"] = json!(spi_endpoint("grpcDataEndpoint", data)?);
            }
            entry
        }
    };
    let file = json!({ "runtimes": [entry] });
    let yaml = serde_yaml::to_string(&file).map_err(|e| format!("cannot write the runtime file: {e}"))?;
    Ok(Some(format!(
        "# Rendered by densemesh-controller from ServingRuntime {name}; edit the ServingRuntime instead.\n{yaml}"
    )))
}

/// The repository meshd writes model settings into and the MLServer of a `serverType: mlserver`
/// runtime reads: its containers' MLSERVER_MODELS_DIR, as modelmesh-serving sets it, else
/// modelmesh-serving's own; `Err` when it is not an absolute path.
pub fn mlserver_repository(spec: &ServingRuntimeSpec) -> Result<String, String> {
    let repository = runtime_containers(spec)
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "MLSERVER_MODELS_DIR")
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| MLSERVER_DEFAULT_MODELS_DIR.to_owned());
    let trimmed = repository.trim_end_matches('/');
    if !trimmed.starts_with('/') || trimmed.split('/').any(|part| part == "..") {
        return Err(format!("MLSERVER_MODELS_DIR {repository:?} is not an absolute path"));
    }
    Ok(trimmed.to_owned())
}

/// The repository of an mlserver runtime when it lies outside [`SHARED_MODELS_DIR`]: the pod then
/// shares a volume of its own at that path between meshd and the server.
pub fn repository_outside_shared_dir(spec: &ServingRuntimeSpec) -> Option<String> {
    let server_type = spec.built_in_adapter.as_ref().and_then(|a| a.server_type.as_deref())?;
    if !server_type.eq_ignore_ascii_case("mlserver") {
        return None;
    }
    let repository = mlserver_repository(spec).ok()?;
    (!std::path::Path::new(&repository).starts_with(SHARED_MODELS_DIR)).then_some(repository)
}

/// A TCP endpoint as the remote runtime takes it: `port:N` (modelmesh-serving's way of naming the pod's
/// own port) becomes `127.0.0.1:N`.
fn tcp_endpoint(field: &str, endpoint: &str) -> Result<String, String> {
    match endpoint.strip_prefix("port:") {
        Some(port) => {
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{field} {endpoint:?} is not port:<1-65535>"))?;
            Ok(format!("127.0.0.1:{port}"))
        }
        None if endpoint.starts_with("unix:") => {
            Err(format!("{field} {endpoint:?}: a V2 server is reached over TCP, not a unix socket"))
        }
        None if endpoint.trim().is_empty() => Err(format!("{field} is empty")),
        None => Ok(endpoint.to_owned()),
    }
}

/// An SPI endpoint: `port:N` and `unix://` pass as they are (the SPI runtime reads both).
fn spi_endpoint(field: &str, endpoint: &str) -> Result<String, String> {
    if endpoint.starts_with("unix:") {
        return Ok(endpoint.to_owned());
    }
    // Checked the same way, but left in the SPI config's own spelling.
    tcp_endpoint(field, endpoint)?;
    Ok(endpoint.to_owned())
}

/// The ConfigMap holding `file` for the Deployment `deployment`, owned by the runtime so it goes with
/// it.
pub fn config_map(deployment: &str, namespace: &str, file: &str, owner: OwnerReference) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(deployment)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/component".to_owned(),
                "runtime-config".to_owned(),
            )])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(RUNTIME_FILE_KEY.to_owned(), file.to_owned())])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
