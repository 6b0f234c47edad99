//! Extra copies that nobody uses are dropped: when several pods hold a model (two first requests
//! raced, or load once justified a copy), each pod drops its own copy once it has been idle for
//! `--copy-idle-period`, except the pod that `placement::copies::drop_idle_copy` says keeps it.
//! Checked every half period: this is a timer policy, like ModelMesh's janitor, not a poll for work.

use std::collections::HashSet;
use std::time::Duration;

use densemesh_placement::copies::drop_idle_copy;
use densemesh_placement::{ClusterView, Placement};
use tokio_util::sync::CancellationToken;

use crate::cache::ModelCache;

/// Drops this pod's idle extra copies until `stop`.
pub async fn drop_idle_copies(
    view: ClusterView,
    cache: ModelCache,
    instance_id: String,
    idle_period: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval((idle_period / 2).max(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let live: HashSet<String> =
            view.instances().into_iter().filter(|(_, r)| !r.draining).map(|(name, _)| name).collect();
        for model in cache.resident() {
            if model.in_flight > 0 || model.idle_for < idle_period {
                continue;
            }
            let mut holders: Vec<String> = view
                .placements(&model.id)
                .into_iter()
                .filter(|(name, p)| matches!(p, Placement::Loaded { .. }) && live.contains(name))
                .map(|(name, _)| name)
                .collect();
            if !holders.contains(&instance_id) {
                holders.push(instance_id.clone());
            }
            let holders: Vec<&str> = holders.iter().map(String::as_str).collect();
            if drop_idle_copy(&instance_id, &holders, model.idle_for, idle_period) {
                tracing::info!(model_id = %model.id, copies = holders.len(), idle_s = model.idle_for.as_secs(), "dropping an idle extra copy");
                cache.unload(&model.id).await;
            }
        }
    }
}

/// Adds copies of busy models: every `interval`, a model whose copy here served more than
/// `threshold_per_minute` requests gets a copy on another pod (chosen by placement), so pods without
/// one forward across several copies. ModelMesh's starting points: 2,000 per minute, every 10 s.
pub async fn add_copies_by_load(
    view: ClusterView,
    cache: ModelCache,
    instance_id: String,
    threshold_per_minute: f64,
    interval: Duration,
    stop: CancellationToken,
) {
    use std::collections::HashMap;

    use densemesh_placement::choose::{LoadCandidate, choose_load_target};
    use densemesh_placement::copies::add_copy;
    use densemesh_proto::mmesh::EnsureLoadedRequest;
    use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;

    if threshold_per_minute <= 0.0 {
        return;
    }
    let mut seen: HashMap<densemesh_placement::ModelId, u64> = HashMap::new();
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let live: HashMap<String, densemesh_placement::InstanceRecord> =
            view.instances().into_iter().filter(|(_, r)| !r.draining).collect();
        let resident = cache.resident();
        seen.retain(|id, _| resident.iter().any(|m| &m.id == id));
        for model in resident {
            let Some(before) = seen.insert(model.id.clone(), model.requests) else { continue };
            let rate = model.requests.saturating_sub(before) as f64 * 60.0 / interval.as_secs_f64();
            let placements = view.placements(&model.id);
            let mut holders: Vec<&str> = placements
                .iter()
                .filter(|(name, p)| matches!(p, Placement::Loaded { .. }) && live.contains_key(name))
                .map(|(name, _)| name.as_str())
                .collect();
            if !holders.contains(&instance_id.as_str()) {
                holders.push(&instance_id);
            }
            let loading_elsewhere = placements
                .iter()
                .any(|(name, p)| name != &instance_id && matches!(p, Placement::Loading { .. }));
            let pods = live.len().max(holders.len());
            if !add_copy(rate, threshold_per_minute, holders.len(), pods, loading_elsewhere) {
                continue;
            }
            let candidates: Vec<LoadCandidate> = live
                .iter()
                .filter(|(name, _)| !holders.contains(&name.as_str()))
                .map(|(name, r)| LoadCandidate {
                    failed_recently: placements
                        .iter()
                        .any(|(n, p)| n == name && matches!(p, Placement::Failed { .. })),
                    ..LoadCandidate::from_record(name, r)
                })
                .collect();
            let Some(target) = choose_load_target(&candidates, &instance_id, model.size_bytes) else {
                continue;
            };
            let Some(endpoint) = live.get(target).map(|r| r.endpoint.clone()) else { continue };
            tracing::info!(model_id = %model.id, rate_per_minute = rate as u64, to = %target, "adding a copy");
            let request =
                EnsureLoadedRequest { model_id: model.id.to_string(), sync: false, ..Default::default() };
            tokio::spawn(async move {
                match ModelMeshClient::connect(format!("http://{endpoint}")).await {
                    Ok(mut client) => {
                        if let Err(e) = client.ensure_loaded(request).await {
                            tracing::warn!(error = %e.message(), "could not add a copy");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not reach the pod for a new copy"),
                }
            });
        }
    }
}
