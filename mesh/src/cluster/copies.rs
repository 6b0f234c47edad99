//! Extra copies that nobody uses are dropped: when several pods hold a model (two first requests
//! raced, or load once justified a copy), each pod drops its own copy once it has been idle for
//! `--copy-idle-period`, except the pods that `placement::copies::drop_idle_copy` says keep theirs
//! (one, or the model's minimum copies).
//! Checked every half period: this is a timer policy, like ModelMesh's janitor, not a poll for work.
//!
//! Busy copies get another: [`add_copies_by_load`] applies `placement::copies::add_copy` (request
//! rate or queue wait past a threshold) to this pod's copies every check interval.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use densemesh_placement::copies::{AddCopyThresholds, Copies, CopyLoad, add_copy, drop_idle_copy};
use densemesh_placement::route::Goal;
use densemesh_placement::{ClusterView, InstanceRecord, Placement};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::placer::{LastUsed, Placer};
use crate::node::cache::ModelCache;
use crate::node::worker::QueueWaits;

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
        // Alone, this pod's copies are the only ones: nothing to drop, and no need to copy out every
        // loaded model (a million of them, on one pod) to find that.
        if live.iter().all(|name| *name == instance_id) {
            continue;
        }
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
            // A model's minimum copies stay however idle (the leader would only load them again).
            let keep = view.model(&model.id).and_then(|spec| spec.min_copies).unwrap_or(1) as usize;
            if drop_idle_copy(&instance_id, &holders, model.idle_for, idle_period, keep) {
                tracing::info!(model_id = %model.id, copies = holders.len(), idle_s = model.idle_for.as_secs(), "dropping an idle extra copy");
                cache.unload(&model.id).await;
            }
        }
    }
}

/// When [`add_copies_by_load`] adds a copy, and how often it looks.
#[derive(Debug, Clone, Copy)]
pub struct AddCopiesConfig {
    pub thresholds: AddCopyThresholds,
    pub interval: Duration,
}

/// Adds copies of busy models: every `interval`, a model whose copy here served more requests a minute
/// than the rate threshold, or whose inferences waited longer for a worker than the queue-wait
/// threshold (this pod is its bottleneck), gets a copy on another pod (chosen by placement), so pods
/// without one forward across several copies. ModelMesh's starting points: 2,000 per minute, every 10 s.
#[tracing::instrument(name = "add_copies", skip_all, fields(instance_id = %placer.instance_id()))]
pub async fn add_copies_by_load(
    placer: Placer,
    cache: ModelCache,
    queue_waits: QueueWaits,
    config: AddCopiesConfig,
    stop: CancellationToken,
) {
    if !config.thresholds.any() {
        return;
    }
    let (view, instance_id) = (placer.view().clone(), placer.instance_id().to_owned());
    let tasks = TaskTracker::new();
    let interval = config.interval.max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let live: HashMap<String, InstanceRecord> =
            view.instances().into_iter().filter(|(_, r)| !r.draining).collect();
        let mut waits = queue_waits.take();
        let per_minute = |requests: u64| requests as f64 * 60.0 / interval.as_secs_f64();
        // Only the models a rule could pick are copied out of the cache (a rate past the threshold,
        // or queue waits to weigh), and none while this pod is the only live one: a copy needs
        // another pod. The counts still advance, so the next look's rates cover one interval.
        // A model first looked at now has no rate yet; its queue waits since it loaded count already.
        let alone = live.keys().all(|name| *name == instance_id);
        let rate_rule = config.thresholds.requests_per_minute;
        let busy = cache.requests_since_last_look(|id, requests| {
            !alone && ((rate_rule > 0.0 && per_minute(requests) > rate_rule) || waits.contains_key(id))
        });
        for (id, requests) in busy {
            let load = CopyLoad {
                requests_per_minute: per_minute(requests),
                queue_wait: waits.remove(&id).unwrap_or_default(),
            };
            let placements = view.placements(&id);
            let mut holders: Vec<&str> = placements
                .iter()
                .filter(|(name, p)| matches!(p, Placement::Loaded { .. }) && live.contains_key(name))
                .map(|(name, _)| name.as_str())
                .collect();
            if !holders.contains(&instance_id.as_str()) {
                holders.push(&instance_id);
            }
            let copies = Copies {
                holders: holders.len(),
                live_pods: live.len().max(holders.len()),
                loading_elsewhere: placements
                    .iter()
                    .any(|(name, p)| name != &instance_id && matches!(p, Placement::Loading { .. })),
            };
            let Some(reason) = add_copy(&load, &config.thresholds, &copies) else { continue };
            tracing::info!(
                model_id = %id,
                ?reason,
                rate_per_minute = load.requests_per_minute as u64,
                queue_wait_ms = load.queue_wait.mean().unwrap_or_default().as_millis() as u64,
                "adding a copy"
            );
            // Placement picks the pod (never one holding a copy); the load runs in the background, owned
            // by `tasks`, so a slow pod does not hold up the next check.
            let placer = placer.clone();
            tasks.spawn(
                async move {
                    match placer.ensure(&id, Goal::AddCopy, false, LastUsed::Now).await {
                        Ok(on) => tracing::info!(model_id = %id, ?on, "copy added"),
                        Err(e) => tracing::warn!(model_id = %id, error = %e, "could not add a copy"),
                    }
                }
                .in_current_span(),
            );
        }
    }
    tasks.close();
    tasks.wait().await;
}
