//! `meshctl apply -f FILE_OR_DIR`: InferenceServices and Predictors reconciled straight against a
//! mesh, through the controller's own mapping and plan, so a single box registers models from the
//! same manifests a Kubernetes cluster takes; InferenceGraphs registered after them (see
//! [`crate::graph`]), since a graph may only name models that exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use densemesh_controller::manifests::{self, Manifest};
use densemesh_controller::mesh::{Bearer, GrpcMesh, MeshApi};
use densemesh_controller::reconcile::{self, Rollout};
use densemesh_proto::admin::admin_client::AdminClient;
use densemesh_proto::admin::model_state::State;
use densemesh_proto::admin::v_model_event::Kind;
use densemesh_proto::admin::{ListInstancesRequest, VModelState};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{Failure, Output, fail, print};

/// The manifest files under `path`: the file itself, or a folder's `.yaml`, `.yml` and `.json` files
/// (recursively, in name order).
fn files(path: &Path) -> Result<Vec<PathBuf>, Failure> {
    let usage = |e: std::io::Error| Failure { code: 2, message: format!("-f {}: {e}", path.display()) };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(usage)?;
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(path).map_err(usage)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            out.extend(files(&entry)?);
        } else if entry.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json") {
            out.push(entry);
        }
    }
    Ok(out)
}

/// The mesh's vmodels as its watch reports them, and the watch to go on reading.
async fn vmodels(
    mesh: &GrpcMesh,
) -> Result<
    (
        HashMap<String, VModelState>,
        impl futures::Stream<Item = Result<densemesh_proto::admin::VModelEvent, tonic::Status>>,
    ),
    Failure,
> {
    let mut stream = mesh.watch("").await.map_err(|e| fail(e.to_string()))?;
    let mut states = HashMap::new();
    while let Some(event) = stream.next().await {
        let event = event?;
        match event.kind() {
            Kind::Synced => return Ok((states, stream)),
            Kind::Upsert | Kind::Deleted => {
                if let Some(v) = event.vmodel {
                    states.insert(v.vmodel_id.clone(), v);
                }
            }
        }
    }
    Err(fail("the mesh's vmodel watch ended before its first round"))
}

/// A vmodel and the revision an apply pointed it at.
type Waited = (String, String);

fn settled(v: &VModelState) -> Option<Result<(), String>> {
    let state = |id: &str| v.models.iter().find(|m| m.model_id == id);
    let active = state(&v.active_model_id)?;
    if v.target_model_id != v.active_model_id {
        let target = state(&v.target_model_id)?;
        return (target.state() == State::FailedToLoad)
            .then(|| Err(format!("{} failed to load: {}", target.model_id, target.last_failure_message)));
    }
    match active.state() {
        // Standby (registered, loaded nowhere) is where a new revision starts, not where it ends.
        State::Loaded => Some(Ok(())),
        State::FailedToLoad => {
            Some(Err(format!("{} failed to load: {}", active.model_id, active.last_failure_message)))
        }
        State::Pending | State::Standby | State::Loading => None,
    }
}

pub async fn run(
    channel: Channel,
    bearer: Bearer,
    out: Output,
    path: &Path,
    wait: Option<Duration>,
) -> Result<(), Failure> {
    let mut docs = Vec::new();
    let mut graphs = Vec::new();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Failure { code: 2, message: format!("{}: {e}", file.display()) })?;
        graphs.extend(
            crate::graph::manifests(&text, &file.display().to_string())
                .map_err(|message| Failure { code: 2, message })?,
        );
        docs.extend(
            manifests::parse(&text, &file.display().to_string())
                .map_err(|message| Failure { code: 2, message })?,
        );
    }
    let instances = AdminClient::with_interceptor(channel.clone(), bearer.clone())
        .list_instances(ListInstancesRequest {})
        .await?
        .into_inner();
    let mut offered: Vec<String> = instances.instances.iter().flat_map(|i| i.model_types.clone()).collect();
    offered.sort();
    offered.dedup();
    let (channel_for_graphs, bearer_for_graphs) = (channel.clone(), bearer.clone());
    let mesh = GrpcMesh::from_channel(channel, bearer);
    let (mut states, mut stream) = vmodels(&mesh).await?;

    // (object, what happened, its vmodel and revision when applying it changed the mesh)
    let mut results: Vec<(String, String, Option<Waited>)> = Vec::new();
    let mut failed = false;
    for doc in &docs {
        let desired = match doc {
            // Registered below, once the models they name are.
            Manifest::Ignored { kind, .. } if kind == "InferenceGraph" => continue,
            Manifest::Ignored { why, .. } => {
                results.push((doc.describe(), format!("skipped: {why}"), None));
                continue;
            }
            _ => doc.desired(Some(&offered)),
        };
        let (outcome, vmodel) = match desired {
            None => continue,
            Some(Err(err)) => {
                failed = true;
                (format!("invalid ({:?}): {}", err.reason, err.message), None)
            }
            Some(Ok(desired)) => {
                let current = states.get(&desired.vmodel_id);
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let calls = reconcile::plan(&desired, current, &Rollout::of_mesh(current), now_ms);
                let mut outcome =
                    if calls.is_empty() { "unchanged".to_owned() } else { "configured".to_owned() };
                for call in &calls {
                    if let Err(err) = mesh.call(call).await {
                        failed = true;
                        outcome = format!("refused: {err}");
                        break;
                    }
                }
                // An unchanged object has nothing to wait for.
                let waited = (!calls.is_empty()).then_some((desired.vmodel_id, desired.model_id));
                (outcome, waited)
            }
        };
        results.push((doc.describe(), outcome, vmodel));
    }
    let mut admin = AdminClient::with_interceptor(channel_for_graphs, bearer_for_graphs);
    for graph in &graphs {
        let outcome = match crate::graph::set(&mut admin, &graph.name, &graph.spec).await {
            Ok(_) => "configured".to_owned(),
            Err(err) => {
                failed = true;
                format!("refused: {}", err.message)
            }
        };
        results.push((format!("inferencegraph/{}", graph.name), outcome, None));
    }
    let mut settled_states: HashMap<String, Result<(), String>> = HashMap::new();
    if let Some(timeout) = wait {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for (id, revision) in results.iter().filter_map(|(_, _, id)| id.as_ref()) {
                // Only the applied revision counts: the vmodel's previous one may be loaded already.
                let current =
                    states.get(id).filter(|v| [&v.target_model_id, &v.active_model_id].contains(&revision));
                if let Some(state) = current.and_then(settled) {
                    settled_states.insert(id.clone(), state);
                }
            }
            let pending: Vec<&str> = results
                .iter()
                .filter(|(_, _, id)| id.as_ref().is_some_and(|(id, _)| !settled_states.contains_key(id)))
                .map(|(what, _, _)| what.as_str())
                .collect();
            if pending.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(event))) => {
                    let deleted = event.kind() == Kind::Deleted;
                    if let Some(v) = event.vmodel {
                        if deleted {
                            states.remove(&v.vmodel_id);
                        } else {
                            states.insert(v.vmodel_id.clone(), v);
                        }
                    }
                }
                Ok(Some(Err(status))) => return Err(status.into()),
                Ok(None) => return Err(fail("the mesh's vmodel watch ended")),
                Err(_) => {
                    return Err(fail(format!(
                        "timed out after {timeout:?} waiting for {}",
                        pending.join(", ")
                    )));
                }
            }
        }
    }
    let rows: Vec<Value> = results
        .iter()
        .map(|(what, outcome, id)| {
            let mut row = json!({ "object": what, "result": outcome });
            match id.as_ref().and_then(|(id, _)| settled_states.get(id)) {
                Some(Ok(())) => row["state"] = Value::from("ready"),
                Some(Err(why)) => {
                    failed = true;
                    row["state"] = Value::from(why.clone());
                }
                None => {}
            }
            row
        })
        .collect();
    print(out, &Value::from(rows.clone()), || {
        rows.iter()
            .map(|r| {
                let state =
                    r.get("state").and_then(Value::as_str).map(|s| format!(" ({s})")).unwrap_or_default();
                format!(
                    "{} {}{state}",
                    r["object"].as_str().unwrap_or_default(),
                    r["result"].as_str().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    if failed { Err(fail("some objects were not applied or did not load; see above")) } else { Ok(()) }
}
