//! Following every vmodel's status as the whole mesh sees it (`Admin.WatchVModels`): one upsert per
//! vmodel, a marker once that first round is out, then an upsert whenever a vmodel's status changes
//! and a deletion when it goes. The Kubernetes controller learns of load progress this way, never
//! from etcd.
//!
//! Driven by the cluster view's change notifications, never by polling. A placement or spec change
//! of a model reaches only the vmodels that refer to it, through an index kept from what was last
//! sent; changes are gathered for [`COALESCE`] before anything is sent, so a burst (a pod joining with
//! hundreds of copies) costs one computation per vmodel touched, not one per change. A status equal to
//! the one last sent is never sent again. When the notifications overflow (`Lagged`), every vmodel is
//! computed again and only the differences are sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use densemesh_placement::status::{Registration, VModelState, model_state, vmodel_state};
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, ModelId, VModelSpec};
use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long changes are gathered after the first one before the statuses they touch are sent.
pub const COALESCE: Duration = Duration::from_millis(50);

/// What the watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusEvent {
    /// A vmodel's status, new or changed.
    Upsert(VModelState),
    /// A vmodel was deleted (or no longer has the owner watched).
    Deleted { vmodel_id: ModelId, owner: String },
    /// The first round, one upsert per vmodel, is out.
    Synced,
}

/// One client's watch; dropping it ends it.
pub struct VModelWatch {
    view: ClusterView,
    /// Only vmodels of this owner; empty: every vmodel.
    owner: String,
    changes: broadcast::Receiver<ViewChange>,
    stop: CancellationToken,
    /// What was last sent per vmodel: the status a new one is compared with.
    sent: HashMap<ModelId, VModelState>,
    /// Model id to the sent vmodels that refer to it.
    referrers: HashMap<String, HashSet<ModelId>>,
    /// Types some live pod offers: a model of another type is pending.
    offered: HashSet<String>,
    dirty: HashSet<ModelId>,
    /// Every vmodel must be computed again (notifications were missed, or the offered types changed).
    all_dirty: bool,
    outbox: VecDeque<StatusEvent>,
    synced: bool,
}

impl VModelWatch {
    /// A watch of the vmodels of `owner` (empty: all) that ends when `stop` is cancelled.
    pub fn new(view: ClusterView, owner: String, stop: CancellationToken) -> Self {
        // Subscribed before the first round is read, so no change falls between the two.
        let changes = view.subscribe();
        Self {
            view,
            owner,
            changes,
            stop,
            sent: HashMap::new(),
            referrers: HashMap::new(),
            offered: HashSet::new(),
            dirty: HashSet::new(),
            all_dirty: false,
            outbox: VecDeque::new(),
            synced: false,
        }
    }

    /// The watch as a stream of events; it ends when `stop` is cancelled or the view closes.
    pub fn into_stream(self) -> impl Stream<Item = StatusEvent> + Send + 'static {
        futures::stream::unfold(self, |mut watch| async move { watch.next().await.map(|e| (e, watch)) })
    }

    /// The next event; `None` once the watch has ended.
    pub async fn next(&mut self) -> Option<StatusEvent> {
        loop {
            if let Some(event) = self.outbox.pop_front() {
                return Some(event);
            }
            if self.stop.is_cancelled() {
                return None;
            }
            if !self.synced {
                self.offered = offered_types(&self.view);
                for (id, _) in self.view.vmodels() {
                    self.refresh(id);
                }
                self.outbox.push_back(StatusEvent::Synced);
                self.synced = true;
                continue;
            }
            // The first change that touches a watched vmodel opens a window; what else arrives within
            // it is sent together.
            self.gather(None).await?;
            self.gather(Some(Instant::now() + COALESCE)).await?;
            self.flush();
        }
    }

    /// Applies changes until `until` passes, or (without a deadline) until something is dirty.
    /// `None` when the watch ends.
    async fn gather(&mut self, until: Option<Instant>) -> Option<()> {
        let deadline = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            if until.is_none() && (self.all_dirty || !self.dirty.is_empty()) {
                return Some(());
            }
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = &mut deadline => return Some(()),
                change = self.changes.recv() => match change {
                    Ok(change) => self.apply(change),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "vmodel watch fell behind the view; computing every vmodel again");
                        self.all_dirty = true;
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }

    fn apply(&mut self, change: ViewChange) {
        match change {
            ViewChange::VModel(id) | ViewChange::VModelRemoved(id) => {
                self.dirty.insert(id);
            }
            ViewChange::Model(model)
            | ViewChange::ModelReplaced(model)
            | ViewChange::ModelRemoved(model)
            | ViewChange::Placement(model) => {
                if let Some(vmodels) = self.referrers.get(model.as_str()) {
                    self.dirty.extend(vmodels.iter().cloned());
                }
            }
            ViewChange::Instance(_) | ViewChange::InstanceRemoved(_) => {
                // Pods republish often; only a change in the types offered at all moves a status.
                let offered = offered_types(&self.view);
                if offered != self.offered {
                    self.offered = offered;
                    self.all_dirty = true;
                }
            }
            ViewChange::Leader(_) => {}
        }
    }

    /// Computes every dirty vmodel's status and queues what changed.
    fn flush(&mut self) {
        let dirty: Vec<ModelId> = if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            let mut all: HashSet<ModelId> = self.sent.keys().cloned().collect();
            all.extend(self.view.vmodels().into_iter().map(|(id, _)| id));
            all.into_iter().collect()
        } else {
            self.dirty.drain().collect()
        };
        for id in dirty {
            self.refresh(id);
        }
    }

    /// Computes one vmodel's status and queues an event if it differs from the last one sent.
    fn refresh(&mut self, id: ModelId) {
        let watched = |v: &VModelSpec| self.owner.is_empty() || v.owner == self.owner;
        let current = self.view.vmodel(&id).filter(watched).map(|spec| self.state_of(&id, &spec));
        match current {
            Some(state) if self.sent.get(&id) == Some(&state) => {}
            Some(state) => {
                self.unindex(&id);
                for model in &state.models {
                    self.referrers.entry(model.model_id.clone()).or_default().insert(id.clone());
                }
                self.sent.insert(id, state.clone());
                self.outbox.push_back(StatusEvent::Upsert(state));
            }
            None => {
                if let Some(old) = self.unindex(&id) {
                    self.outbox.push_back(StatusEvent::Deleted { vmodel_id: id, owner: old.owner });
                }
            }
        }
    }

    /// Forgets what was sent for `id` and its entries in the index; what was sent, if anything.
    fn unindex(&mut self, id: &ModelId) -> Option<VModelState> {
        let old = self.sent.remove(id)?;
        for model in &old.models {
            if let Some(vmodels) = self.referrers.get_mut(&model.model_id) {
                vmodels.remove(id);
                if vmodels.is_empty() {
                    self.referrers.remove(&model.model_id);
                }
            }
        }
        Some(old)
    }

    fn state_of(&self, id: &ModelId, spec: &VModelSpec) -> VModelState {
        vmodel_state(id, spec, |model| {
            // Stored ids were validated when written; a bad one reads as not registered.
            let Ok(model_id) = ModelId::new(model) else {
                return model_state(model, Registration::Absent, None);
            };
            let registration = match self.view.model_type(&model_id) {
                None => Registration::Absent,
                Some(t) if self.offered.contains(&t) => Registration::Placeable,
                Some(_) => Registration::NoPodOffersType,
            };
            model_state(model, registration, self.view.copies(&model_id).as_deref())
        })
    }
}

/// Every model type some live pod offers.
fn offered_types(view: &ClusterView) -> HashSet<String> {
    view.instances_snapshot().values().flat_map(|r| r.model_types.iter().cloned()).collect()
}

#[cfg(test)]
mod tests;
