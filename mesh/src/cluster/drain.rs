//! Leaving without a cold start for anyone: on SIGTERM a pod marks itself draining, then has each
//! recently used model that no other pod holds loaded on another pod, before it stops serving.

use std::collections::HashMap;
use std::time::Duration;

use densemesh_placement::choose::{LoadCandidate, choose_load_target};
use densemesh_placement::{ClusterView, InstanceRecord, Placement};
use densemesh_proto::mmesh::EnsureLoadedRequest;
use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;
use tokio::time::Instant;

use crate::node::cache::ModelCache;
use crate::cluster::instance::now_ms;

/// Models used within this window are handed off; colder ones just go.
pub const RECENT: Duration = Duration::from_secs(600);

/// Loads this pod's recently used, otherwise unheld models on other pods, within `deadline`.
pub async fn hand_off(view: &ClusterView, cache: &ModelCache, this: &str, deadline: Instant) {
    let instances: HashMap<String, InstanceRecord> =
        view.instances().into_iter().filter(|(name, r)| name != this && !r.draining).collect();
    if instances.is_empty() {
        return;
    }
    let mut models = cache.resident();
    models.sort_by_key(|m| m.idle_for);
    let mut planned: HashMap<String, u64> = HashMap::new();
    for model in models.into_iter().filter(|m| m.idle_for < RECENT) {
        if Instant::now() >= deadline {
            tracing::warn!("drain deadline reached; remaining models are not handed off");
            return;
        }
        let placements = view.placements(&model.id);
        let held_elsewhere = placements
            .iter()
            .any(|(name, p)| instances.contains_key(name) && matches!(p, Placement::Loaded { .. }));
        if held_elsewhere {
            continue;
        }
        let candidates: Vec<LoadCandidate> = instances
            .iter()
            .map(|(name, r)| LoadCandidate {
                used_bytes: r.used_bytes + planned.get(name).copied().unwrap_or(0),
                ..LoadCandidate::from_record(name, r, &placements)
            })
            .collect();
        let Some(target) = choose_load_target(&candidates, this, model.size_bytes, now_ms()) else {
            continue;
        };
        let Some(record) = instances.get(target) else { continue };
        *planned.entry(target.to_owned()).or_default() += model.size_bytes;
        let request =
            EnsureLoadedRequest { model_id: model.id.to_string(), sync: true, ..Default::default() };
        let answer = async {
            let mut client = ModelMeshClient::connect(format!("http://{}", record.endpoint)).await.ok()?;
            client.ensure_loaded(request).await.ok()
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Some(_)) => tracing::info!(model_id = %model.id, to = %target, "handed off before leaving"),
            _ => tracing::warn!(model_id = %model.id, to = %target, "could not hand the model off"),
        }
    }
}
