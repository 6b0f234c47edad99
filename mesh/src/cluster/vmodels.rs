//! vmodel transitions, a leader chore: a vmodel whose target differs from its active model gets the
//! target loaded once, where placement says, then switched to, so requests never see a gap. A target
//! that fails to load leaves the active model serving; the failure is written on the vmodel and retried
//! after a back-off. Auto-delete models that no vmodel refers to any more are unregistered.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::registry::Registry;
use densemesh_placement::route::{Goal, Refusal};
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, ModelId, VModelSpec};
use parking_lot::Mutex;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::instance::now_ms;
use crate::cluster::min_copies::first_back_off_end;
use crate::cluster::placer::{LastUsed, Placer};
use crate::error::{CacheError, MeshError, without_retry_times};

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
    let mut references = References::default();
    references.rebuild(&driver.view);
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = driver.stop.cancelled() => break,
        };
        let dropped = match change {
            Ok(ViewChange::VModel(id)) => {
                let refs = driver.view.vmodel(&id).map(|v| referred(&v)).unwrap_or_default();
                driver.spawn_if_transitioning(id.clone());
                references.set(id.as_str(), refs)
            }
            Ok(ViewChange::VModelRemoved(id)) => references.set(id.as_str(), Vec::new()),
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => {
                driver.scan();
                references.rebuild(&driver.view)
            }
            Err(RecvError::Closed) => break,
        };
        delete_unreferenced(&driver.registry, &driver.view, dropped).await;
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
                    self.record_failure(&id, &target, &e).await;
                    let wait = match e {
                        MeshError::Cache(CacheError::LoadFailed { retry_in, .. }) => {
                            retry_in.max(RETRY_FLOOR)
                        }
                        // The pods that failed it back off: try again when the first may load it.
                        MeshError::Refused { refusal: Refusal::NoPod, .. } => {
                            first_back_off_end(self.view.copies(&target).as_deref(), now_ms())
                                .map_or(RETRY_FLOOR * 4, |end| end.max(RETRY_FLOOR))
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

    /// Writes why the target failed on the vmodel, when that changes what it says (see
    /// [`transition_error_after`]): each write is a change every WatchVModels client is sent.
    async fn record_failure(&self, id: &ModelId, target: &ModelId, failure: &MeshError) {
        self.update(id, |v| {
            let error = transition_error_after(v.transition_error.as_deref(), failure)?;
            (v.target == target.as_str()).then(|| VModelSpec { transition_error: Some(error), ..v.clone() })
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

/// What a vmodel's `transition_error` becomes after an attempt to load its target failed with
/// `failure`; `None` to leave it as it is, so that only a failure that really differs is a change
/// (each one is sent to every WatchVModels client):
/// - the real failure stays while its pods back off from it: placement then refuses with "no pod may
///   load it now", which says nothing new, so that refusal is written only when nothing is recorded;
/// - a failed load is recorded as the model's, by its innermost reason: the same failure reads the
///   same whichever pod hit it (a peer's answer quotes its own error) and on every attempt (the times
///   to the next attempt are left out).
pub fn transition_error_after(current: Option<&str>, failure: &MeshError) -> Option<String> {
    if current.is_some() && matches!(failure, MeshError::Refused { refusal: Refusal::NoPod, .. }) {
        return None;
    }
    let text = without_retry_times(&failure.to_string());
    let reason = match failure {
        MeshError::Cache(CacheError::LoadFailed { model_id, .. }) => {
            let marker = format!("model {model_id} failed to load: ");
            match text.rfind(&marker) {
                Some(at) => format!("{marker}{}", &text[at + marker.len()..]),
                None => text,
            }
        }
        _ => text,
    };
    (current != Some(reason.as_str())).then_some(reason)
}

/// The models a vmodel refers to: active, target and split members.
fn referred(v: &VModelSpec) -> Vec<String> {
    let mut models: Vec<String> = [v.active.clone(), v.target.clone()]
        .into_iter()
        .chain(v.split.iter().map(|w| w.model.clone()))
        .collect();
    models.sort();
    models.dedup();
    models
}

/// Which models the vmodels refer to, kept up to date one vmodel at a time: a change costs what
/// that vmodel refers to, not a walk of every vmodel (10,000 vmodels registered at once made the
/// walk the leader's main cost).
#[derive(Default)]
struct References {
    by_vmodel: HashMap<String, Vec<String>>,
    count: HashMap<String, usize>,
}

impl References {
    /// Records what `vmodel` refers to now (nothing once it is gone); returns the models no vmodel
    /// refers to any more.
    fn set(&mut self, vmodel: &str, refs: Vec<String>) -> Vec<String> {
        let old = if refs.is_empty() {
            self.by_vmodel.remove(vmodel).unwrap_or_default()
        } else {
            self.by_vmodel.insert(vmodel.to_owned(), refs.clone()).unwrap_or_default()
        };
        for model in &refs {
            *self.count.entry(model.clone()).or_default() += 1;
        }
        let mut dropped = Vec::new();
        for model in old {
            if let Some(n) = self.count.get_mut(&model) {
                *n -= 1;
                if *n == 0 {
                    self.count.remove(&model);
                    dropped.push(model);
                }
            }
        }
        dropped
    }

    /// Starts over from every vmodel in the view (at start, and after missed changes); returns the
    /// models that were referred to before and are not now.
    fn rebuild(&mut self, view: &ClusterView) -> Vec<String> {
        let before: HashSet<String> = self.count.keys().cloned().collect();
        *self = References::default();
        for (id, v) in view.vmodels() {
            self.set(id.as_str(), referred(&v));
        }
        before.into_iter().filter(|m| !self.count.contains_key(m)).collect()
    }
}

/// Unregisters the auto-delete models among `dropped` (models a vmodel referred to and none refers
/// to now). Only models seen referenced go: a model registered for a vmodel that is about to be
/// written must not be deleted in between.
async fn delete_unreferenced(registry: &Registry, view: &ClusterView, dropped: Vec<String>) {
    for dropped in dropped {
        let Ok(id) = ModelId::new(&dropped) else { continue };
        if !view.model(&id).is_some_and(|spec| spec.auto_delete) {
            continue;
        }
        match registry.unregister(&id).await {
            Ok(_) => tracing::info!(model_id = %id, "auto-deleted model no vmodel refers to"),
            Err(e) => tracing::warn!(model_id = %id, error = %e, "cannot auto-delete model"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_model_is_dropped_when_the_last_vmodel_referring_to_it_lets_go() {
        let mut r = References::default();
        assert!(r.set("v1", strings(&["a"])).is_empty());
        assert!(r.set("v2", strings(&["a", "b"])).is_empty());
        assert_eq!(r.set("v1", strings(&["c"])), Vec::<String>::new(), "v2 still refers to a");
        assert_eq!(r.set("v2", strings(&["c"])), strings(&["a", "b"]));
        assert_eq!(r.set("v1", Vec::new()), Vec::<String>::new(), "v2 refers to c");
        assert_eq!(r.set("v2", Vec::new()), strings(&["c"]));
        assert!(r.set("gone", Vec::new()).is_empty(), "an unknown vmodel going drops nothing");
    }

    fn load_failed(reason: &str, retry_in: Duration) -> MeshError {
        let model_id = ModelId::new("v2").unwrap();
        MeshError::Cache(CacheError::LoadFailed { model_id, reason: reason.into(), retry_in })
    }

    fn no_pod() -> MeshError {
        MeshError::refused(&ModelId::new("v2").unwrap(), Refusal::NoPod)
    }

    /// The errors a vmodel shows over a sequence of failed attempts, each write one change.
    fn written(attempts: &[MeshError]) -> Vec<String> {
        let mut current: Option<String> = None;
        let mut writes = Vec::new();
        for failure in attempts {
            if let Some(next) = transition_error_after(current.as_deref(), failure) {
                writes.push(next.clone());
                current = Some(next);
            }
        }
        writes
    }

    #[test]
    fn the_real_failure_stays_through_its_back_off() {
        let s = Duration::from_secs(1);
        // Fail, back off (every pod refused), fail again with a longer back-off, back off again.
        let attempts = [
            load_failed("bad graph", 2 * s),
            no_pod(),
            no_pod(),
            load_failed("bad graph", 4 * s),
            no_pod(),
            load_failed("bad graph", 8 * s),
        ];
        assert_eq!(written(&attempts), ["model v2 failed to load: bad graph"], "written once, never flipped");
    }

    #[test]
    fn one_failure_reads_the_same_from_whichever_pod_hit_it() {
        let s = Duration::from_secs(1);
        let on_peer = |peer: &str, retry_in| {
            let peers_answer = load_failed("bad graph", retry_in).to_string();
            load_failed(&format!("{peer}: {peers_answer}"), Duration::ZERO)
        };
        let attempts = [
            on_peer("pod-1", 2 * s),
            load_failed("bad graph", 2 * s),
            no_pod(),
            on_peer("pod-2", 4 * s),
            on_peer("pod-1", 8 * s),
        ];
        assert_eq!(written(&attempts), ["model v2 failed to load: bad graph"]);
        let unreachable = load_failed("pod-1: connection refused", Duration::ZERO);
        assert_eq!(written(&[unreachable]), ["model v2 failed to load: pod-1: connection refused"]);
    }

    #[test]
    fn a_different_failure_replaces_it_and_a_refusal_is_written_only_first() {
        let s = Duration::from_secs(1);
        let attempts =
            [no_pod(), load_failed("bad graph", 2 * s), no_pod(), load_failed("no such file", 4 * s)];
        assert_eq!(
            written(&attempts),
            [
                "model v2 cannot be loaded: no pod may load it now (all are draining or backing off from a failed load of it)",
                "model v2 failed to load: bad graph",
                "model v2 failed to load: no such file",
            ]
        );
        let other = MeshError::refused(
            &ModelId::new("v2").unwrap(),
            Refusal::NoPodOffers { model_type: "onnx".into() },
        );
        assert!(
            transition_error_after(Some("model v2 failed to load: bad graph"), &other).is_some(),
            "a refusal for another reason is news"
        );
    }
}
