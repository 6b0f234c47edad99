//! vmodel transitions, a leader chore: a vmodel whose target differs from its active model gets the
//! target loaded once, where placement says, then switched to, so requests never see a gap. A target
//! that fails to load leaves the active model serving; the failure is written on the vmodel and retried
//! after a back-off. Auto-delete models that no vmodel refers to any more are unregistered.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::registry::Registry;
use densemesh_placement::route::Goal;
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, ModelId, VModelSpec};
use parking_lot::Mutex;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::placer::{LastUsed, Placer};
use crate::error::{CacheError, MeshError};

/// Pause between attempts when the failure gives no back-off of its own.
const RETRY_FLOOR: Duration = Duration::from_millis(500);

/// Drives every transitioning vmodel, and auto-deletes unreferenced models, until `stop`; one task per
/// vmodel at a time, all owned here and awaited before returning.
pub async fn drive_transitions(registry: Registry, placer: Placer, stop: CancellationToken) {
    let view = placer.view().clone();
    let driver = Driver {
        registry,
        view,
        placer,
        stop,
        driving: Arc::new(Mutex::new(HashSet::new())),
        tasks: TaskTracker::new(),
    };
    let mut changes = driver.view.subscribe();
    driver.scan();
    let mut referenced = HashSet::new();
    delete_unreferenced(&driver.registry, &driver.view, &mut referenced).await;
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = driver.stop.cancelled() => break,
        };
        match change {
            Ok(ViewChange::VModel(id)) => {
                driver.spawn_if_transitioning(id);
                delete_unreferenced(&driver.registry, &driver.view, &mut referenced).await;
            }
            Ok(ViewChange::VModelRemoved(_)) => {
                delete_unreferenced(&driver.registry, &driver.view, &mut referenced).await
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                driver.scan();
                delete_unreferenced(&driver.registry, &driver.view, &mut referenced).await;
            }
            Err(RecvError::Closed) => break,
        }
    }
    driver.tasks.close();
    driver.tasks.wait().await;
}

#[derive(Clone)]
struct Driver {
    registry: Registry,
    view: ClusterView,
    placer: Placer,
    stop: CancellationToken,
    driving: Arc<Mutex<HashSet<ModelId>>>,
    tasks: TaskTracker,
}

impl Driver {
    fn scan(&self) {
        for (id, _) in self.view.vmodels() {
            self.spawn_if_transitioning(id);
        }
    }

    fn spawn_if_transitioning(&self, id: ModelId) {
        let transitioning = self.view.vmodel(&id).is_some_and(|v| v.transitioning());
        if transitioning && !self.stop.is_cancelled() && self.driving.lock().insert(id.clone()) {
            let driver = self.clone();
            let span = tracing::info_span!("vmodel transition", vmodel_id = %id);
            self.tasks.spawn(async move { driver.drive(id).await }.instrument(span));
        }
    }

    async fn drive(self, id: ModelId) {
        while !self.stop.is_cancelled() {
            let Some(v) = self.view.vmodel(&id).filter(VModelSpec::transitioning) else { break };
            let Ok(target) = ModelId::new(&v.target) else { break };
            match self.placer.ensure(&target, Goal::Ensure, true, LastUsed::Now).await {
                Ok(placed) => {
                    if let Some(old) = self.switch(&id, &target).await {
                        tracing::info!(from = %old, to = %target, on = ?placed, "vmodel switched");
                    }
                }
                Err(e) => {
                    tracing::warn!(target = %target, error = %e, "vmodel target failed to load");
                    self.record_failure(&id, &target, e.to_string()).await;
                    let wait = match e {
                        MeshError::Cache(CacheError::LoadFailed { retry_in, .. }) => {
                            retry_in.max(RETRY_FLOOR)
                        }
                        _ => RETRY_FLOOR * 4,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => break,
                    }
                }
            }
        }
        self.driving.lock().remove(&id);
        // A new target may have been set while this task was finishing.
        self.spawn_if_transitioning(id);
    }

    /// Makes `target` active if it is still the target; the model it replaced.
    async fn switch(&self, id: &ModelId, target: &ModelId) -> Option<String> {
        let old = self
            .update(id, |v| {
                (v.target == target.as_str() && v.transitioning()).then(|| VModelSpec {
                    active: target.to_string(),
                    transition_error: None,
                    ..v.clone()
                })
            })
            .await?;
        Some(old.active)
    }

    async fn record_failure(&self, id: &ModelId, target: &ModelId, reason: String) {
        self.update(id, |v| {
            (v.target == target.as_str() && v.transition_error.as_deref() != Some(reason.as_str()))
                .then(|| VModelSpec { transition_error: Some(reason.clone()), ..v.clone() })
        })
        .await;
    }

    /// Writes `change(current)` with compare-and-swap, retrying lost races; the spec it replaced, or
    /// `None` when `change` declined or the vmodel kept changing.
    async fn update(
        &self,
        id: &ModelId,
        change: impl Fn(&VModelSpec) -> Option<VModelSpec>,
    ) -> Option<VModelSpec> {
        for _ in 0..8 {
            let (current, revision) = self.registry.vmodel(id).await.ok()??;
            let next = change(&current)?;
            if let Ok(Some(r)) = self.registry.put_vmodel(id, &next, revision).await {
                self.view.caught_up(r).await;
                return Some(current);
            }
        }
        None
    }
}

/// Unregisters auto-delete models that a vmodel referred to (as active, target or in a split) when
/// last looked (`seen`) and none refers to now. Only models seen referenced go: a model registered for
/// a vmodel that is about to be written must not be deleted in between.
pub async fn delete_unreferenced(registry: &Registry, view: &ClusterView, seen: &mut HashSet<String>) {
    let referenced: HashSet<String> = view
        .vmodels()
        .into_iter()
        .flat_map(|(_, v)| {
            let split = v.split.iter().map(|w| w.model.clone()).collect::<Vec<_>>();
            [v.active, v.target].into_iter().chain(split)
        })
        .collect();
    for dropped in seen.difference(&referenced) {
        let Ok(id) = ModelId::new(dropped) else { continue };
        if !view.model(&id).is_some_and(|spec| spec.auto_delete) {
            continue;
        }
        match registry.unregister(&id).await {
            Ok(_) => tracing::info!(model_id = %id, "auto-deleted model no vmodel refers to"),
            Err(e) => tracing::warn!(model_id = %id, error = %e, "cannot auto-delete model"),
        }
    }
    *seen = referenced;
}
