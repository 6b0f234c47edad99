//! Minimum copies, a leader chore: every model registered with `minCopies` keeps at least that many
//! copies loaded, each on its own pod, as far as live pods offering its type go (the pure rule is
//! `placement::copies::copies_short`). Each missing copy is placed by `placement::route` with
//! [`Goal::AddCopy`], one at a time per model, so a model is never loaded twice on one pod.
//!
//! The chore reacts to the view: a registration that sets or raises the minimum, a copy that vanished
//! (evicted for room, or its pod died) or failed, a pod that joined or left. A model whose remaining
//! pods are all backing off from a failed load of it is tried again when the first back-off ends;
//! one placement refuses for another reason (no room without evicting a recently used model, no pod
//! offering its type) waits for the next change of the cluster.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::copies::{MinCopies, copies_short};
use densemesh_placement::route::{Goal, Refusal};
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, ModelId, Placement};
use parking_lot::Mutex;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::instance::now_ms;
use crate::cluster::placer::{Ensured, LastUsed, Placer};
use crate::error::MeshError;

/// Pause after a failure that gives no back-off of its own (a peer that could not be reached).
const RETRY_FLOOR: Duration = Duration::from_secs(2);

/// Keeps every model's minimum copies until `stop`; one task per model short of copies at a time, all
/// owned here and awaited before returning.
pub async fn keep_min_copies(placer: Placer, stop: CancellationToken) {
    let view = placer.view().clone();
    let keeper = Keeper {
        placer,
        view: view.clone(),
        stop,
        driving: Arc::default(),
        refusals: Arc::default(),
        tasks: TaskTracker::new(),
    };
    let mut changes = view.subscribe();
    let mut minimums = with_minimum(&view);
    keeper.check_all(&minimums);
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = keeper.stop.cancelled() => break,
        };
        match change {
            Ok(ViewChange::Model(id) | ViewChange::ModelReplaced(id)) => {
                if view.model(&id).is_some_and(|spec| spec.min_copies.is_some()) {
                    minimums.insert(id.clone());
                    keeper.check(id);
                } else {
                    minimums.remove(&id);
                }
            }
            Ok(ViewChange::ModelRemoved(id)) => {
                minimums.remove(&id);
            }
            Ok(ViewChange::Placement(id)) if minimums.contains(&id) => keeper.check(id),
            Ok(ViewChange::Instance(_) | ViewChange::InstanceRemoved(_)) => keeper.check_all(&minimums),
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                minimums = with_minimum(&view);
                keeper.check_all(&minimums);
            }
            Err(RecvError::Closed) => break,
        }
    }
    keeper.tasks.close();
    keeper.tasks.wait().await;
}

/// The registered models that have a minimum number of copies.
fn with_minimum(view: &ClusterView) -> HashSet<ModelId> {
    view.model_ids_where(|_, spec| spec.min_copies.is_some()).into_iter().collect()
}

/// How many copies `id` lacks now, as the view shows the cluster.
fn missing(view: &ClusterView, id: &ModelId) -> usize {
    let Some(spec) = view.model(id) else { return 0 };
    let Some(min_copies) = spec.min_copies else { return 0 };
    let copies = view.copies(id);
    let model = MinCopies { min_copies, model_type: &spec.model_type, copies: copies.as_deref() };
    copies_short(&model, &view.instances_snapshot())
}

/// When the first back-off of a failed copy of the model ends after `now_ms`, as a wait from now.
pub(crate) fn first_back_off_end(
    copies: Option<&HashMap<String, Placement>>,
    now_ms: u64,
) -> Option<Duration> {
    copies?
        .values()
        .filter_map(Placement::retry_after_ms)
        .filter(|end| *end > now_ms)
        .min()
        .map(|end| Duration::from_millis(end - now_ms))
}

#[derive(Clone)]
struct Keeper {
    placer: Placer,
    view: ClusterView,
    stop: CancellationToken,
    /// Models a task is adding copies of.
    driving: Arc<Mutex<HashSet<ModelId>>>,
    /// The last refusal reported for each model, so one that stands is logged once, not per change.
    refusals: Arc<Mutex<HashMap<ModelId, String>>>,
    tasks: TaskTracker,
}

impl Keeper {
    fn check_all(&self, minimums: &HashSet<ModelId>) {
        for id in minimums {
            self.check(id.clone());
        }
    }

    /// Starts adding copies of `id` if it lacks some and no task does so already.
    fn check(&self, id: ModelId) {
        if self.stop.is_cancelled() || missing(&self.view, &id) == 0 {
            return;
        }
        if self.driving.lock().insert(id.clone()) {
            let keeper = self.clone();
            let span = tracing::info_span!("adding copies", model_id = %id);
            self.tasks.spawn(async move { keeper.add_copies(id).await }.instrument(span));
        }
    }

    /// Adds copies of `id`, one at a time, until it has its minimum or placement refuses.
    async fn add_copies(self, id: ModelId) {
        let settled = loop {
            if self.stop.is_cancelled() {
                break false;
            }
            let lacking = missing(&self.view, &id);
            if lacking == 0 {
                self.refusals.lock().remove(&id);
                break true;
            }
            tracing::info!(missing = lacking, "adding a copy to keep the model's minimum copies");
            let wait = match self.placer.ensure(&id, Goal::AddCopy, true, LastUsed::Now).await {
                Ok(placed) => {
                    let on = match &placed {
                        Ensured::Here => self.placer.instance_id().to_owned(),
                        Ensured::On(peer) => peer.clone(),
                    };
                    // Counted from the view next time round: wait until it shows the new copy.
                    self.placer.seen_loaded(&id, &on).await;
                    tracing::info!(on = %on, "copy added for the model's minimum copies");
                    continue;
                }
                // Every pod without a copy is backing off from a failed load: try when one may again.
                Err(e @ MeshError::Refused { refusal: Refusal::NoPod, .. }) => {
                    match first_back_off_end(self.view.copies(&id).as_deref(), now_ms()) {
                        Some(wait) => {
                            self.report(&id, &e);
                            wait + Duration::from_millis(50)
                        }
                        None => {
                            self.report(&id, &e);
                            break false;
                        }
                    }
                }
                // Placement's other refusals stand until the cluster changes.
                Err(e @ MeshError::Refused { .. }) => {
                    self.report(&id, &e);
                    break false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not add a copy for the model's minimum copies");
                    RETRY_FLOOR
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.cancelled() => break false,
            }
        };
        self.driving.lock().remove(&id);
        // A change seen while this task was finishing was not acted on: look once more.
        if settled {
            self.check(id);
        }
    }

    /// Logs why placement refused a copy, once per distinct reason.
    fn report(&self, id: &ModelId, refused: &MeshError) {
        let reason = refused.to_string();
        let mut refusals = self.refusals.lock();
        if refusals.get(id) != Some(&reason) {
            tracing::warn!(reason = %reason, "the model's minimum copies cannot be met now");
            refusals.insert(id.clone(), reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_copy_is_tried_again_when_the_first_back_off_ends() {
        let failed = |retry_after_ms| Placement::Failed { since_ms: 0, reason: "bad".into(), retry_after_ms };
        let copies: HashMap<String, Placement> = [
            ("a".to_owned(), failed(5_000)),
            ("b".to_owned(), failed(3_000)),
            ("c".to_owned(), failed(500)),
            ("d".to_owned(), Placement::Loaded { since_ms: 0, size_bytes: 1, runtime: String::new() }),
        ]
        .into();
        assert_eq!(first_back_off_end(Some(&copies), 1_000), Some(Duration::from_millis(2_000)));
        assert_eq!(first_back_off_end(Some(&copies), 6_000), None, "every back-off is over");
        assert_eq!(first_back_off_end(None, 0), None);
    }
}
