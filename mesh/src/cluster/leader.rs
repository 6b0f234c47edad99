//! The leader: one pod at a time does the cluster-wide chores, so each happens once and not on every
//! pod. Election is on the registry's `leader` key, bound to this pod's lease (shared by the instance
//! publisher), so a dead leader's key vanishes with its lease and another pod takes over within the
//! lease TTL. A pod campaigns whenever its view shows the key vacant and it holds a lease.
//!
//! The chores, run only while this pod leads and stopped the moment it does not:
//! - vmodel transitions and auto-delete ([`crate::cluster::vmodels`]);
//! - syncing the shared `--model-repo` into the registry ([`crate::cluster::repository`]);
//! - keeping the minimum copies of models registered with one ([`crate::cluster::min_copies`]);
//! - pruning failed placement records whose back-off ended long ago, or whose model is gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::election;
use densemesh_placement::registry::Registry;
use densemesh_placement::store::LeaseId;
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, Placement};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::instance::now_ms;
use crate::cluster::placer::Placer;
use crate::metrics as m;

/// A failed placement record is pruned this long after its back-off ended: by then the pod that
/// failed would load the model again anyway, and the record only makes placement rank it last.
const PRUNE_FAILED_AFTER: Duration = Duration::from_secs(600);

/// How often the leader looks for failed records to prune.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What the chores need.
#[derive(Clone)]
pub struct Chores {
    pub registry: Registry,
    pub placer: Placer,
    /// The shared model repository to sync into the registry.
    pub model_repo: PathBuf,
    /// Set once this pod, leading, has synced the repository into the registry (start-up waits on it).
    pub synced: Arc<watch::Sender<bool>>,
}

/// Campaigns and runs the chores while leading, until `stop`; then stops them and resigns, so another
/// pod takes over at once instead of after the lease TTL.
pub async fn run(chores: Chores, mut lease: watch::Receiver<Option<LeaseId>>, stop: CancellationToken) {
    let view = chores.placer.view().clone();
    let this = chores.placer.instance_id().to_owned();
    let mut changes = view.subscribe();
    let mut leading: Option<(CancellationToken, TaskTracker)> = None;
    metrics::gauge!(m::LEADER).set(0.0);
    loop {
        let held = *lease.borrow_and_update();
        if view.leader().is_none()
            && let Some(lease) = held
        {
            match election::campaign(&chores.registry, &this, lease).await {
                Ok(true) => tracing::info!(instance_id = %this, "won the leader election"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot campaign for leadership"),
            }
        }
        let leads = held.is_some() && view.leader().as_deref() == Some(this.as_str());
        match (leads, leading.is_some()) {
            (true, false) => {
                tracing::info!(instance_id = %this, "leading: starting the cluster-wide chores");
                metrics::gauge!(m::LEADER).set(1.0);
                leading = Some(start(&chores, &stop));
            }
            (false, true) => {
                tracing::info!(instance_id = %this, "no longer leading: stopping the cluster-wide chores");
                metrics::gauge!(m::LEADER).set(0.0);
                if let Some((token, tasks)) = leading.take() {
                    halt(token, tasks).await;
                }
            }
            _ => {}
        }
        tokio::select! {
            change = changes.recv() => match change {
                Ok(ViewChange::Leader(_)) | Err(RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                Err(RecvError::Closed) => break,
            },
            changed = lease.changed() => if changed.is_err() { break },
            _ = stop.cancelled() => break,
        }
    }
    if let Some((token, tasks)) = leading.take() {
        halt(token, tasks).await;
        metrics::gauge!(m::LEADER).set(0.0);
        match election::resign(&chores.registry, &this).await {
            Ok(true) => tracing::info!(instance_id = %this, "resigned the leadership"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot resign the leadership; it ends with the lease"),
        }
    }
}

/// Starts the chores under a child of `stop`.
fn start(chores: &Chores, stop: &CancellationToken) -> (CancellationToken, TaskTracker) {
    let token = stop.child_token();
    let tasks = TaskTracker::new();
    let view = chores.placer.view().clone();
    tasks.spawn(
        crate::cluster::vmodels::drive_transitions(
            chores.registry.clone(),
            chores.placer.clone(),
            token.clone(),
        )
        .instrument(tracing::info_span!("vmodel transitions")),
    );
    let (registry, root, sync_stop) = (chores.registry.clone(), chores.model_repo.clone(), token.clone());
    let synced = chores.synced.clone();
    tasks.spawn(
        async move {
            match crate::cluster::repository::sync_once(&registry, &view, &root).await {
                Ok(report) => tracing::info!(?report, "model repository synced"),
                Err(e) => tracing::warn!(error = %e, "cannot sync the model repository"),
            }
            synced.send_replace(true);
            crate::cluster::repository::watch(registry, view, root, sync_stop).await;
        }
        .instrument(tracing::info_span!("repository sync")),
    );
    tasks.spawn(
        crate::cluster::min_copies::keep_min_copies(chores.placer.clone(), token.clone())
            .instrument(tracing::info_span!("min copies")),
    );
    tasks.spawn(
        prune_failed(chores.registry.clone(), chores.placer.view().clone(), token.clone())
            .instrument(tracing::info_span!("prune failed records")),
    );
    tasks.close();
    (token, tasks)
}

async fn halt(token: CancellationToken, tasks: TaskTracker) {
    token.cancel();
    tasks.wait().await;
}

/// Every [`PRUNE_EVERY`], deletes failed placement records that are stale (see [`stale_failure`]),
/// each with compare-and-delete on the revision read, so a record its pod rewrote meanwhile stays.
async fn prune_failed(registry: Registry, view: ClusterView, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Ok(range) = registry.store().range(&registry.placements_prefix()).await else { continue };
        let mut pruned = 0;
        for kv in range.kvs {
            let Some((model, _)) = registry.placement_of_key(&kv.key) else { continue };
            let Ok(placement) = serde_json::from_slice::<Placement>(&kv.value) else { continue };
            if !stale_failure(&placement, view.model(&model).is_some(), now_ms()) {
                continue;
            }
            if let Ok(done) = registry.store().compare_and_delete(&kv.key, kv.mod_revision).await
                && done.succeeded
            {
                pruned += 1;
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "pruned stale failed placement records");
        }
    }
}

/// Whether a placement record is a failure to prune: its model is no longer registered, or its
/// back-off ended more than [`PRUNE_FAILED_AFTER`] before `now_ms`.
fn stale_failure(placement: &Placement, registered: bool, now_ms: u64) -> bool {
    match placement.retry_after_ms() {
        None => false,
        Some(_) if !registered => true,
        Some(end) => now_ms.saturating_sub(end) > PRUNE_FAILED_AFTER.as_millis() as u64,
    }
}

/// Waits until the registry reflects the model repository: this pod leads and has synced it, or
/// another pod leads (and synced it when it won). A pod that served before then would answer
/// NOT_FOUND for the repository's models. Gives up after `limit`, saying so.
pub async fn repository_registered(
    view: &ClusterView,
    this: &str,
    synced: &watch::Sender<bool>,
    limit: Duration,
) {
    let mut changes = view.subscribe();
    let mut done = synced.subscribe();
    let settled = async {
        loop {
            if *done.borrow_and_update() || view.leader().is_some_and(|leader| leader != this) {
                return;
            }
            tokio::select! {
                _ = changes.recv() => {}
                _ = done.changed() => {}
            }
        }
    };
    if tokio::time::timeout(limit, settled).await.is_err() {
        tracing::warn!(waited = ?limit, "no leader has synced the model repository yet; serving anyway");
    }
}

#[cfg(test)]
mod tests;
