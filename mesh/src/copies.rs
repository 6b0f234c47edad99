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
