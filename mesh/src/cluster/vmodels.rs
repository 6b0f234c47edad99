//! vmodel transitions: a vmodel whose target differs from its active model gets the target loaded,
//! then switched to, so requests never see a gap. A target that fails to load leaves the active model
//! serving; the failure is written on the vmodel and retried after the cache's back-off.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::registry::Registry;
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, ModelId, VModelSpec};
use parking_lot::Mutex;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::node::cache::ModelCache;
use crate::error::CacheError;

/// Pause between attempts when the cache gives no back-off of its own.
const RETRY_FLOOR: Duration = Duration::from_millis(500);

/// Drives every transitioning vmodel until `stop`; one task per vmodel at a time.
pub async fn drive_transitions(
    registry: Registry,
    view: ClusterView,
    cache: ModelCache,
    stop: CancellationToken,
) {
    let driver = Driver { registry, view, cache, stop, driving: Arc::new(Mutex::new(HashSet::new())) };
    let mut changes = driver.view.subscribe();
    driver.scan();
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = driver.stop.cancelled() => return,
        };
        match change {
            Ok(ViewChange::VModel(id)) => driver.spawn_if_transitioning(id),
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => driver.scan(),
            Err(RecvError::Closed) => return,
        }
    }
}

#[derive(Clone)]
struct Driver {
    registry: Registry,
    view: ClusterView,
    cache: ModelCache,
    stop: CancellationToken,
    driving: Arc<Mutex<HashSet<ModelId>>>,
}

impl Driver {
    fn scan(&self) {
        for (id, _) in self.view.vmodels() {
            self.spawn_if_transitioning(id);
        }
    }

    fn spawn_if_transitioning(&self, id: ModelId) {
        let transitioning = self.view.vmodel(&id).is_some_and(|v| v.transitioning());
        if transitioning && self.driving.lock().insert(id.clone()) {
            let driver = self.clone();
            tokio::spawn(async move { driver.drive(id).await });
        }
    }

    async fn drive(self, id: ModelId) {
        let span = tracing::info_span!("vmodel transition", vmodel_id = %id);
        let _enter = span.enter();
        while !self.stop.is_cancelled() {
            let Some(v) = self.view.vmodel(&id).filter(VModelSpec::transitioning) else { break };
            let Ok(target) = ModelId::new(&v.target) else { break };
            match self.cache.acquire(&target).await {
                Ok(lease) => {
                    drop(lease);
                    if let Some(old) = self.switch(&id, &target).await {
                        tracing::info!(from = %old, to = %target, "vmodel switched");
                        delete_unreferenced(&self.registry, &self.view, &[old]).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(target = %target, error = %e, "vmodel target failed to load");
                    self.record_failure(&id, &target, e.to_string()).await;
                    let wait = match e {
                        CacheError::LoadFailed { retry_in, .. } => retry_in.max(RETRY_FLOOR),
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
        for _ in 0..8 {
            let (v, revision) = self.registry.vmodel(id).await.ok()??;
            if v.target != target.as_str() || !v.transitioning() {
                return None;
            }
            let next = VModelSpec { active: target.to_string(), transition_error: None, ..v.clone() };
            if let Ok(Some(r)) = self.registry.put_vmodel(id, &next, revision).await {
                self.view.caught_up(r).await;
                return Some(v.active);
            }
        }
        None
    }

    async fn record_failure(&self, id: &ModelId, target: &ModelId, reason: String) {
        for _ in 0..8 {
            let Ok(Some((v, revision))) = self.registry.vmodel(id).await else { return };
            if v.target != target.as_str() || v.transition_error.as_deref() == Some(reason.as_str()) {
                return;
            }
            let next = VModelSpec { transition_error: Some(reason.clone()), ..v };
            if let Ok(Some(r)) = self.registry.put_vmodel(id, &next, revision).await {
                self.view.caught_up(r).await;
                return;
            }
        }
    }
}

/// Unregisters auto-delete models that no vmodel refers to any more.
pub async fn delete_unreferenced(registry: &Registry, view: &ClusterView, candidates: &[String]) {
    let referenced: HashSet<String> =
        view.vmodels().into_iter().flat_map(|(_, v)| [v.active, v.target]).collect();
    for candidate in candidates {
        let Ok(id) = ModelId::new(candidate) else { continue };
        let auto = view.model(&id).is_some_and(|spec| spec.auto_delete);
        if auto && !referenced.contains(candidate) {
            match registry.unregister(&id).await {
                Ok(_) => tracing::info!(model_id = %id, "auto-deleted model no vmodel refers to"),
                Err(e) => tracing::warn!(model_id = %id, error = %e, "cannot auto-delete model"),
            }
        }
    }
}
