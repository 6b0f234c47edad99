//! `ClusterView`: an in-memory mirror of the registry, kept current by a watch, so the request path
//! reads memory and never the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::RwLock;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::ModelId;
use crate::election::leader_of;
use crate::graph::GraphSpec;
use crate::registry::{Registry, RegistryError, decode};
use crate::spec::{InstanceRecord, ModelSpec, Placement, VModelSpec};
use crate::store::{KeyValue, Revision, StoreError, WatchEvent};

/// What changed in the view, for components that react (unloading, vmodel transitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// Registered, or its spec changed in what places it (size, minimum copies, who registered it).
    Model(ModelId),
    /// Its spec changed what is loaded: another model, or the same one whose files changed
    /// ([`ModelSpec::reloads`]). Loaded copies must be replaced. Told by the view, which holds the
    /// previous spec anyway, so no follower keeps a second copy of every spec to compare.
    ModelReplaced(ModelId),
    ModelRemoved(ModelId),
    VModel(ModelId),
    VModelRemoved(ModelId),
    /// A pod joined or republished its record.
    Instance(String),
    InstanceRemoved(String),
    /// A copy of this model appeared, changed state or vanished.
    Placement(ModelId),
    /// Another instance leads now (`None`: nobody, until a campaign wins).
    Leader(Option<String>),
}

#[derive(Default)]
struct Mirror {
    models: HashMap<ModelId, (ModelSpec, Revision)>,
    vmodels: HashMap<ModelId, (VModelSpec, Revision)>,
    /// Inference graphs; shared, since every request for one reads it.
    graphs: HashMap<ModelId, Arc<GraphSpec>>,
    /// Replaced (copy on write), never mutated in place: readers hold a snapshot without a lock.
    instances: Arc<HashMap<String, InstanceRecord>>,
    /// Each model's copies by instance, copy on write like `instances`.
    placements: HashMap<ModelId, Arc<HashMap<String, Placement>>>,
    /// The instance id the `leader` key holds.
    leader: Option<String>,
}

/// The mirror; cloning shares it. The watch task stops when the last clone drops.
#[derive(Clone)]
pub struct ClusterView {
    mirror: Arc<RwLock<Mirror>>,
    applied: watch::Receiver<Revision>,
    changes: broadcast::Sender<ViewChange>,
    /// For [`Self::catch_up_with_store`].
    registry: Registry,
    /// When the last strong read started and the revision it found: callers that arrived before it
    /// started share it instead of each reading the store.
    strong_read: Arc<tokio::sync::Mutex<Option<(Instant, Revision)>>>,
    _watcher: Arc<DropGuard>,
}

impl ClusterView {
    /// Lists the registry, then follows its changes.
    pub async fn start(registry: Registry) -> Result<Self, RegistryError> {
        let mirror = Arc::new(RwLock::new(Mirror::default()));
        let (changes, _) = broadcast::channel(4096);
        let revision = relist(&registry, &mirror, &changes).await?;
        let (applied_tx, applied) = watch::channel(revision);
        let stop = CancellationToken::new();
        let follower = Follower {
            registry: registry.clone(),
            mirror: mirror.clone(),
            changes: changes.clone(),
            applied: applied_tx,
        };
        tokio::spawn(follower.run(revision, stop.clone()));
        Ok(Self {
            mirror,
            applied,
            changes,
            registry,
            strong_read: Arc::default(),
            _watcher: Arc::new(stop.drop_guard()),
        })
    }

    /// Brings the mirror up to the store's present, waiting at most `limit` for each of the read
    /// and the catching up: a strong read for a name this pod does not know, as ModelMesh's registry
    /// does on a miss (`getOrStrongIfAbsent`), since a registration made through another pod reaches
    /// this one's watch a moment later. Concurrent callers share one read of the store. `false` when
    /// the store did not answer or the mirror did not catch up in time.
    pub async fn catch_up_with_store(&self, limit: Duration) -> bool {
        let arrived = Instant::now();
        let read = async {
            let mut last = self.strong_read.lock().await;
            match *last {
                // Started after this call arrived: it saw every write made before.
                Some((at, revision)) if at >= arrived => Ok(revision),
                _ => {
                    let at = Instant::now();
                    let revision = self.registry.revision().await?;
                    *last = Some((at, revision));
                    Ok::<_, RegistryError>(revision)
                }
            }
        };
        let Ok(Ok(revision)) = tokio::time::timeout(limit, read).await else { return false };
        tokio::time::timeout(limit, self.caught_up(revision)).await.is_ok()
    }

    pub fn model(&self, id: &ModelId) -> Option<ModelSpec> {
        self.mirror.read().models.get(id).map(|(spec, _)| spec.clone())
    }

    /// A model's type (format), without copying the rest of its spec.
    pub fn model_type(&self, id: &ModelId) -> Option<String> {
        self.mirror.read().models.get(id).map(|(spec, _)| spec.model_type.clone())
    }

    /// What a model asks of GPUs, without copying its spec (placement reads it on every miss).
    pub fn model_gpu(&self, id: &ModelId) -> Option<crate::gpu::Gpu> {
        self.mirror.read().models.get(id).and_then(|(spec, _)| spec.gpu)
    }

    /// A model's spec with the revision it was written at.
    pub fn model_with_revision(&self, id: &ModelId) -> Option<(ModelSpec, Revision)> {
        self.mirror.read().models.get(id).cloned()
    }

    /// The revision a model's spec was written at, without copying the spec (`None`: not registered).
    pub fn model_revision(&self, id: &ModelId) -> Option<Revision> {
        self.mirror.read().models.get(id).map(|(_, revision)| *revision)
    }

    pub fn vmodel(&self, id: &ModelId) -> Option<VModelSpec> {
        self.mirror.read().vmodels.get(id).map(|(v, _)| v.clone())
    }

    pub fn vmodel_with_revision(&self, id: &ModelId) -> Option<(VModelSpec, Revision)> {
        self.mirror.read().vmodels.get(id).cloned()
    }

    /// An inference graph, shared with the mirror (replaced on change, never copied per request).
    pub fn graph(&self, id: &ModelId) -> Option<Arc<GraphSpec>> {
        self.mirror.read().graphs.get(id).cloned()
    }

    /// Whether a graph of this name exists, without cloning it.
    pub fn has_graph(&self, id: &ModelId) -> bool {
        self.mirror.read().graphs.contains_key(id)
    }

    /// Every inference graph, sorted by name.
    pub fn graphs(&self) -> Vec<(ModelId, Arc<GraphSpec>)> {
        let mut all: Vec<_> =
            self.mirror.read().graphs.iter().map(|(id, g)| (id.clone(), g.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Live pods by instance id.
    pub fn instances(&self) -> Vec<(String, InstanceRecord)> {
        let mut all: Vec<_> =
            self.mirror.read().instances.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Live pods by instance id, as a snapshot shared with the mirror (replaced on change, never
    /// copied per call): the request path reads it without cloning or sorting.
    pub fn instances_snapshot(&self) -> Arc<HashMap<String, InstanceRecord>> {
        self.mirror.read().instances.clone()
    }

    /// A model's copies by instance id, shared like [`Self::instances_snapshot`]; `None` when no pod
    /// has a record of it.
    pub fn copies(&self, id: &ModelId) -> Option<Arc<HashMap<String, Placement>>> {
        self.mirror.read().placements.get(id).cloned()
    }

    /// Copies of a model, by instance id, most recent state change first.
    pub fn placements(&self, id: &ModelId) -> Vec<(String, Placement)> {
        let mut all: Vec<_> = self
            .mirror
            .read()
            .placements
            .get(id)
            .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| b.1.since_ms().cmp(&a.1.since_ms()).then_with(|| a.0.cmp(&b.0)));
        all
    }

    /// The instance that leads the cluster, if any (see [`crate::election`]).
    pub fn leader(&self) -> Option<String> {
        self.mirror.read().leader.clone()
    }

    /// How many models are registered.
    pub fn model_count(&self) -> usize {
        self.mirror.read().models.len()
    }

    /// Every model, sorted by id.
    pub fn models(&self) -> Vec<(ModelId, ModelSpec)> {
        let mut all: Vec<_> =
            self.mirror.read().models.iter().map(|(id, (s, _))| (id.clone(), s.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The ids of the models `keep` selects, sorted, without copying any spec: what a pass over a
    /// million registered models needs, where [`Self::models`] would copy every spec.
    pub fn model_ids_where(&self, mut keep: impl FnMut(&ModelId, &ModelSpec) -> bool) -> Vec<ModelId> {
        let mut ids: Vec<ModelId> = self
            .mirror
            .read()
            .models
            .iter()
            .filter(|(id, (s, _))| keep(id, s))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Every vmodel, sorted by id.
    pub fn vmodels(&self) -> Vec<(ModelId, VModelSpec)> {
        let mut all: Vec<_> =
            self.mirror.read().vmodels.iter().map(|(id, (v, _))| (id.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ViewChange> {
        self.changes.subscribe()
    }

    /// Waits until the mirror reflects the store at least at `revision` (read-your-writes for an API
    /// call that just wrote).
    pub async fn caught_up(&self, revision: Revision) {
        let mut applied = self.applied.clone();
        // An error means the follower is gone, which only happens at shutdown.
        let _ = applied.wait_for(|r| *r >= revision).await;
    }
}

struct Follower {
    registry: Registry,
    mirror: Arc<RwLock<Mirror>>,
    changes: broadcast::Sender<ViewChange>,
    applied: watch::Sender<Revision>,
}

impl Follower {
    async fn run(self, mut revision: Revision, stop: CancellationToken) {
        let mut retry = Duration::from_millis(100);
        loop {
            let mut events = self.registry.store().watch(self.registry.prefix(), revision);
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    _ = stop.cancelled() => return,
                };
                match next {
                    Some(Ok(event)) => {
                        revision = revision.max(event.revision());
                        self.apply(event);
                        self.applied.send_replace(revision);
                        retry = Duration::from_millis(100);
                    }
                    Some(Err(StoreError::Compacted { .. })) => {
                        match relist(&self.registry, &self.mirror, &self.changes).await {
                            Ok(r) => {
                                revision = r;
                                self.applied.send_replace(r);
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot re-list the registry"),
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "registry watch failed; resuming");
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.cancelled() => return,
            }
            retry = (retry * 2).min(Duration::from_secs(5));
        }
    }

    fn apply(&self, event: WatchEvent) {
        let change = {
            let mut mirror = self.mirror.write();
            match event {
                WatchEvent::Put(kv) => put(&self.registry, &mut mirror, &kv),
                WatchEvent::Delete { key, .. } => remove(&self.registry, &mut mirror, &key),
            }
        };
        if let Some(change) = change {
            let _ = self.changes.send(change);
        }
    }
}

/// The records the view mirrors.
enum Record {
    Model(ModelId),
    VModel(ModelId),
    Graph(ModelId),
    Instance(String),
    Placement(ModelId, String),
    Leader,
}

/// Which record a key is, if it is one the view mirrors. Keys of other kinds (say, written by a newer
/// binary) are none of these and are skipped.
fn classify(registry: &Registry, key: &str) -> Option<Record> {
    if key == registry.leader_key() {
        return Some(Record::Leader);
    }
    if let Some(id) = key.strip_prefix(&registry.models_prefix()) {
        return ModelId::new(id).ok().map(Record::Model);
    }
    if let Some(id) = key.strip_prefix(&registry.vmodels_prefix()) {
        return ModelId::new(id).ok().map(Record::VModel);
    }
    if let Some(id) = key.strip_prefix(&registry.graphs_prefix()) {
        return ModelId::new(id).ok().map(Record::Graph);
    }
    if let Some(instance) = key.strip_prefix(&registry.instances_prefix()) {
        return Some(Record::Instance(instance.to_owned()));
    }
    let (model, instance) = registry.placement_of_key(key)?;
    Some(Record::Placement(model, instance.to_owned()))
}

fn put(registry: &Registry, mirror: &mut Mirror, kv: &KeyValue) -> Option<ViewChange> {
    let record = classify(registry, &kv.key)?;
    let decoded = match record {
        Record::Model(id) => decode::<ModelSpec>(&kv.key, &kv.value).map(|s| {
            let replaced = mirror.models.get(&id).is_some_and(|(old, _)| s.reloads(old));
            mirror.models.insert(id.clone(), (s, kv.mod_revision));
            Some(if replaced { ViewChange::ModelReplaced(id) } else { ViewChange::Model(id) })
        }),
        Record::VModel(id) => decode::<VModelSpec>(&kv.key, &kv.value).map(|v| {
            mirror.vmodels.insert(id.clone(), (v, kv.mod_revision));
            Some(ViewChange::VModel(id))
        }),
        // Nothing reacts to a graph changing: each request reads the graph it runs.
        Record::Graph(id) => decode::<GraphSpec>(&kv.key, &kv.value).map(|g| {
            mirror.graphs.insert(id, Arc::new(g));
            None
        }),
        Record::Instance(instance) => decode::<InstanceRecord>(&kv.key, &kv.value).map(|r| {
            Arc::make_mut(&mut mirror.instances).insert(instance.clone(), r);
            Some(ViewChange::Instance(instance))
        }),
        Record::Placement(id, instance) => decode::<Placement>(&kv.key, &kv.value).map(|p| {
            Arc::make_mut(mirror.placements.entry(id.clone()).or_default()).insert(instance, p);
            Some(ViewChange::Placement(id))
        }),
        Record::Leader => leader_of(kv).map(|leader| {
            // A campaign that re-binds the key to a new lease rewrites the same leader: no change.
            let changed = mirror.leader.as_ref() != Some(&leader);
            mirror.leader = Some(leader.clone());
            changed.then_some(ViewChange::Leader(Some(leader)))
        }),
    };
    decoded.map_err(|e| tracing::warn!(error = %e, "skipping unreadable record")).ok().flatten()
}

fn remove(registry: &Registry, mirror: &mut Mirror, key: &str) -> Option<ViewChange> {
    match classify(registry, key)? {
        Record::Model(id) => mirror.models.remove(&id).map(|_| ViewChange::ModelRemoved(id)),
        Record::VModel(id) => mirror.vmodels.remove(&id).map(|_| ViewChange::VModelRemoved(id)),
        Record::Graph(id) => {
            mirror.graphs.remove(&id);
            None
        }
        Record::Instance(instance) => {
            if !mirror.instances.contains_key(&instance) {
                return None;
            }
            Arc::make_mut(&mut mirror.instances).remove(&instance);
            Some(ViewChange::InstanceRemoved(instance))
        }
        Record::Placement(id, instance) => {
            let copies = mirror.placements.get_mut(&id)?;
            if !copies.contains_key(&instance) {
                return None;
            }
            let copies = Arc::make_mut(copies);
            copies.remove(&instance);
            if copies.is_empty() {
                mirror.placements.remove(&id);
            }
            Some(ViewChange::Placement(id))
        }
        Record::Leader => mirror.leader.take().map(|_| ViewChange::Leader(None)),
    }
}

/// Replaces the mirror with a fresh read; returns the revision it reflects.
async fn relist(
    registry: &Registry,
    mirror: &RwLock<Mirror>,
    changes: &broadcast::Sender<ViewChange>,
) -> Result<Revision, RegistryError> {
    let range = registry.store().range(registry.prefix()).await?;
    let mut fresh = Mirror::default();
    let mut announce = Vec::new();
    for kv in &range.kvs {
        // The leader is announced below, only if it differs from the one the old mirror had.
        if let Some(change) = put(registry, &mut fresh, kv)
            && !matches!(change, ViewChange::Leader(_))
        {
            announce.push(change);
        }
    }
    let old = std::mem::replace(&mut *mirror.write(), fresh);
    let current = mirror.read();
    // A spec that changed what is loaded while the watch was behind is told as replaced, as the
    // watch would have told it.
    for change in &mut announce {
        if let ViewChange::Model(id) = change
            && let (Some((old_spec, _)), Some((new_spec, _))) = (old.models.get(id), current.models.get(id))
            && new_spec.reloads(old_spec)
        {
            *change = ViewChange::ModelReplaced(id.clone());
        }
    }
    if old.leader != current.leader {
        announce.push(ViewChange::Leader(current.leader.clone()));
    }
    // Whatever vanished while the watch was behind is announced as if the watch had seen it go.
    announce.extend(
        old.instances
            .keys()
            .filter(|id| !current.instances.contains_key(*id))
            .cloned()
            .map(ViewChange::InstanceRemoved),
    );
    announce.extend(
        old.placements
            .keys()
            .filter(|id| !current.placements.contains_key(*id))
            .cloned()
            .map(ViewChange::Placement),
    );
    announce.extend(
        old.models
            .keys()
            .filter(|id| !current.models.contains_key(*id))
            .cloned()
            .map(ViewChange::ModelRemoved),
    );
    announce.extend(
        old.vmodels
            .keys()
            .filter(|id| !current.vmodels.contains_key(*id))
            .cloned()
            .map(ViewChange::VModelRemoved),
    );
    drop(current);
    for change in announce {
        let _ = changes.send(change);
    }
    Ok(range.revision)
}

#[cfg(test)]
mod tests;
