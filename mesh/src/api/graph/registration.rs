//! Registering inference graphs through the Admin API: the spec read as KServe writes it, checked by
//! [`validate`] against what the registry holds now (not this pod's view, which may lag), then written
//! with compare-and-swap like a vmodel.

use std::collections::HashMap;

use densemesh_placement::graph::{GraphError, GraphSpec, Known, service_names, validate};
use densemesh_placement::registry::Registry;
use densemesh_placement::{ClusterView, ModelId};
use densemesh_proto::admin::{DeleteGraphResponse, GraphInfo, ListGraphsResponse, SetGraphRequest};
use tonic::Status;

use crate::error::registry_status;

/// How many times a graph write retries after losing a compare-and-swap race.
const CAS_ATTEMPTS: usize = 8;

fn graph_id(name: &str) -> Result<ModelId, Status> {
    ModelId::new(name).map_err(|e| Status::invalid_argument(format!("graph name: {e}")))
}

fn info(id: &ModelId, spec: &GraphSpec) -> GraphInfo {
    // Plain structs of strings, numbers and maps always serialize.
    GraphInfo { name: id.to_string(), spec_json: serde_json::to_string(spec).unwrap_or_default() }
}

/// What each name the graph uses (its own and its steps' models) is in the registry now.
async fn known_names(
    registry: &Registry,
    id: &ModelId,
    spec: &GraphSpec,
) -> Result<HashMap<String, Known>, Status> {
    let mut known = HashMap::new();
    for name in service_names(spec).into_iter().chain([id.as_str()]) {
        // A name that is not an id names nothing: validation says the step's model is unknown.
        let Ok(name_id) = ModelId::new(name) else { continue };
        if registry.vmodel(&name_id).await.map_err(registry_status)?.is_some() {
            known.insert(name.to_owned(), Known::VModel);
        } else if registry.model(&name_id).await.map_err(registry_status)?.is_some() {
            known.insert(name.to_owned(), Known::Model);
        }
    }
    Ok(known)
}

/// Registers or replaces a graph; answers it as stored.
pub(crate) async fn set(
    registry: &Registry,
    view: &ClusterView,
    request: SetGraphRequest,
) -> Result<GraphInfo, Status> {
    let id = graph_id(&request.name)?;
    let spec: GraphSpec = serde_json::from_str(&request.spec_json).map_err(|e| {
        Status::invalid_argument(format!("graph {id}: the spec is not an InferenceGraph spec: {e}"))
    })?;
    let known = known_names(registry, &id, &spec).await?;
    validate(&id, &spec, &known).map_err(|e| match e {
        GraphError::NameTaken { .. } => Status::already_exists(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    })?;
    for _ in 0..CAS_ATTEMPTS {
        let revision = registry.graph(&id).await.map_err(registry_status)?.map_or(0, |(_, r)| r);
        if let Some(written) = registry.put_graph(&id, &spec, revision).await.map_err(registry_status)? {
            // The next call through this pod runs the graph just written.
            view.caught_up(written).await;
            tracing::info!(graph = %id, "inference graph set");
            return Ok(info(&id, &spec));
        }
    }
    Err(Status::aborted(format!("graph {id} kept changing while being set; retry")))
}

/// A graph as stored.
pub(crate) async fn get(registry: &Registry, name: &str) -> Result<GraphInfo, Status> {
    let id = graph_id(name)?;
    match registry.graph(&id).await.map_err(registry_status)? {
        Some((spec, _)) => Ok(info(&id, &spec)),
        None => Err(Status::not_found(format!("graph {id} not found"))),
    }
}

/// Deletes a graph; `deleted` is false when there was none.
pub(crate) async fn delete(registry: &Registry, name: &str) -> Result<DeleteGraphResponse, Status> {
    let id = graph_id(name)?;
    for _ in 0..CAS_ATTEMPTS {
        let Some((_, revision)) = registry.graph(&id).await.map_err(registry_status)? else {
            return Ok(DeleteGraphResponse { deleted: false });
        };
        if registry.delete_graph(&id, revision).await.map_err(registry_status)? {
            tracing::info!(graph = %id, "inference graph deleted");
            return Ok(DeleteGraphResponse { deleted: true });
        }
    }
    Err(Status::aborted(format!("graph {id} kept changing while being deleted; retry")))
}

/// Every graph, by name.
pub(crate) fn list(view: &ClusterView) -> ListGraphsResponse {
    ListGraphsResponse { graphs: view.graphs().iter().map(|(id, spec)| info(id, spec)).collect() }
}
