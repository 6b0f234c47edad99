//! The mesh's side of `placement::route`: it gathers what the decision reads (the cluster view's
//! shared snapshot, this pod's cache as of now, the size the model will take, requests in flight to
//! each peer) and does the I/O the answer asks for. Every caller that needs a model somewhere asks
//! here: the request path (through the forwarder), `ensureLoaded` and `registerModel{loadNow}`, vmodel
//! transitions and traffic splits, copies, and drain.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::choose::LoadCandidate;
use densemesh_placement::gpu::GpuRoom;
use densemesh_placement::route::{Copy, CopyOn, Goal, Refusal, Route, RouteInput, route};
use densemesh_placement::view::ViewChange;
use densemesh_placement::{ClusterView, ModelId, ModelSpec, Placement, Source};
use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;
use densemesh_proto::mmesh::model_status_info::ModelStatus;
use densemesh_proto::mmesh::{EnsureLoadedRequest, ModelStatusInfo};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::instance::now_ms;
use crate::cluster::peers::{MAX_ATTEMPTS, Peers, mark_forwarded, peer_failed};
use crate::error::{CacheError, MeshError};
use crate::node::cache::{CopyStatus, ModelCache, PlacementState};

mod decisions;
pub use decisions::{Decision, DecisionLog};

/// How long a sync load on a peer waits for the peer's placement record to reach this pod's view.
const PEER_RECORD_WAIT: Duration = Duration::from_secs(5);

/// What routing needs besides the cluster's state.
#[derive(Debug, Clone)]
pub struct PlacerConfig {
    /// A load never evicts a model used more recently than this (zero: off). `--anti-churn-age`.
    pub anti_churn_age: Duration,
    /// How long a caller that asked for a loaded copy (`sync`) waits for another pod's load.
    pub wait_limit: Duration,
    /// This pod's `--model-repo`, where repository models' files are (for their size).
    pub model_repo: PathBuf,
    /// The model types this pod offers (`--model-types`); it never holds a model of another type.
    pub model_types: Vec<String>,
    /// The management API's token (`--admin-token-file`), sent with the loads asked of peers: every
    /// pod of a mesh holds the same one.
    pub admin_token: Option<crate::api::auth::AdminToken>,
}

/// Asks placement and carries out its answer; cloning shares it.
#[derive(Clone)]
pub struct Placer {
    inner: Arc<Inner>,
}

struct Inner {
    instance_id: String,
    view: ClusterView,
    cache: ModelCache,
    peers: Peers,
    config: PlacerConfig,
    /// Loads started in the background (`ensureLoaded` without `sync`, copies), so none is orphaned.
    tasks: TaskTracker,
    /// Recent decisions that placed or refused a model, for the dashboard.
    decisions: DecisionLog,
}

/// Where a model was made to live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// On this pod.
    Here,
    /// On this peer (loaded, loading, or asked to load it).
    On(String),
}

/// When a model loaded ahead of use counts as last used, so it does not push out models in use.
#[derive(Debug, Clone, Copy)]
pub enum LastUsed {
    Now,
    /// ModelMesh's rule for models loaded ahead of use: as if last used an hour ago.
    AnHourAgo,
    /// Milliseconds since the epoch, as the API's `lastUsedTime` gives it.
    EpochMillis(u64),
}

impl LastUsed {
    /// `millis` as the API sends it (0: not given, so `default`).
    pub fn from_request(millis: u64, default: LastUsed) -> Self {
        if millis == 0 { default } else { LastUsed::EpochMillis(millis) }
    }

    fn epoch_millis(self) -> u64 {
        match self {
            LastUsed::Now => now_ms(),
            LastUsed::AnHourAgo => now_ms().saturating_sub(3_600_000),
            LastUsed::EpochMillis(ms) => ms,
        }
    }

    fn instant(self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let ago = Duration::from_millis(now_ms().saturating_sub(self.epoch_millis()));
        now.checked_sub(ago).unwrap_or(now)
    }
}

impl Placer {
    pub fn new(
        instance_id: String,
        view: ClusterView,
        cache: ModelCache,
        peers: Peers,
        config: PlacerConfig,
    ) -> Self {
        let inner = Inner {
            instance_id,
            view,
            cache,
            peers,
            config,
            tasks: TaskTracker::new(),
            decisions: DecisionLog::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    pub fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    pub fn view(&self) -> &ClusterView {
        &self.inner.view
    }

    /// The recent decisions that placed or refused a model (a bounded ring shared with the dashboard).
    pub fn decisions(&self) -> &DecisionLog {
        &self.inner.decisions
    }

    /// Whether this pod offers `id`'s type (a model that is not registered has no type it could
    /// refuse).
    pub fn offers(&self, id: &ModelId) -> bool {
        self.inner.view.model_type(id).is_none_or(|t| self.offers_type(&t))
    }

    /// Every model type some live pod offers, this one included, sorted: what a registration may name.
    pub fn offered_types(&self) -> std::collections::BTreeSet<String> {
        let mut offered: std::collections::BTreeSet<String> =
            self.inner.config.model_types.iter().cloned().collect();
        for record in self.inner.view.instances_snapshot().values() {
            offered.extend(record.model_types.iter().cloned());
        }
        offered
    }

    fn offers_type(&self, model_type: &str) -> bool {
        self.inner.config.model_types.iter().any(|t| t == model_type)
    }

    /// A live pod's gRPC endpoint.
    pub fn endpoint(&self, instance: &str) -> Option<String> {
        self.inner.view.instances_snapshot().get(instance).map(|r| r.endpoint.clone())
    }

    /// A live pod's gRPC endpoint, and whether it speaks the pod wire there.
    pub fn peer_address(&self, instance: &str) -> Option<(String, bool)> {
        let instances = self.inner.view.instances_snapshot();
        let record = instances.get(instance)?;
        Some((record.endpoint.clone(), record.peer_wire >= crate::cluster::wire::VERSION))
    }

    /// Where `id` goes for `goal`, never to a pod in `exclude`: `placement::route` over the cluster as
    /// this pod sees it now.
    pub fn route(&self, id: &ModelId, goal: Goal, exclude: &[&str]) -> Route {
        let this = self.inner.instance_id.as_str();
        let instances = self.inner.view.instances_snapshot();
        self.inner.peers.prune(&instances);
        let records = self.inner.view.copies(id);
        let own = |name: &str| records.as_ref().and_then(|r| r.get(name));
        let mut copies: Vec<CopyOn> = Vec::new();
        match self.inner.cache.status(id) {
            CopyStatus::Loaded { .. } => copies.push(CopyOn {
                instance: this.to_owned(),
                copy: Copy::Loaded { in_flight: 0, failed_recently: false },
            }),
            CopyStatus::Loading => copies.push(CopyOn { instance: this.to_owned(), copy: Copy::Loading }),
            CopyStatus::Failed { .. } | CopyStatus::NotLoaded => {}
        }
        // Most recent state change first (then by name): ties between equally busy copies go the same
        // way on every call.
        let mut others: Vec<(&String, &Placement)> =
            records.iter().flat_map(|r| r.iter()).filter(|(name, _)| *name != this).collect();
        others.sort_by(|a, b| b.1.since_ms().cmp(&a.1.since_ms()).then_with(|| a.0.cmp(b.0)));
        for (name, placement) in others {
            let endpoint = instances.get(name).map(|r| r.endpoint.as_str()).unwrap_or_default();
            let copy = match placement {
                Placement::Loaded { .. } => Copy::Loaded {
                    in_flight: self.inner.peers.in_flight(endpoint),
                    failed_recently: self.inner.peers.failed_recently(endpoint),
                },
                Placement::Loading { .. } => Copy::Loading,
                Placement::Failed { .. } => continue,
            };
            copies.push(CopyOn { instance: name.clone(), copy });
        }
        // The rule reads pods' loads and the model's size only when nobody holds the model (its step
        // 4); a request for a model with a live copy elsewhere, the forwarding hot path, skips reading
        // this pod's LRU and predicting the size.
        let live_elsewhere = |c: &CopyOn| {
            c.instance != this
                && !exclude.contains(&c.instance.as_str())
                && instances.get(&c.instance).is_some_and(|r| !r.draining)
        };
        let here = copies.iter().any(|c| c.instance == this);
        let placing = match goal {
            Goal::AddCopy => true,
            Goal::Serve | Goal::Ensure => !here && !copies.iter().any(live_elsewhere),
            Goal::HandOff => !copies.iter().any(live_elsewhere),
        };
        let mut local = if placing {
            self.inner.cache.placement_counts()
        } else {
            PlacementState { capacity_bytes: self.inner.cache.config().capacity_bytes, ..Default::default() }
        };
        let predicted_bytes = if placing { self.predicted_bytes(id, records.as_deref(), &local) } else { 0 };
        if placing && local.capacity_bytes.saturating_sub(local.used_bytes) < predicted_bytes {
            // No room here: the rule may read this pod's LRU (its coldest model, GDSF's victims), which
            // takes a walk of the loaded models. With room it never does, so a miss skips the walk.
            local = self.inner.cache.placement_state();
        }
        let model_type = self.inner.view.model_type(id);
        let model_type = model_type.as_deref();
        let mut pods: Vec<LoadCandidate> = Vec::with_capacity(instances.len() + 1);
        for (name, record) in instances.iter().filter(|(name, _)| *name != this) {
            pods.push(LoadCandidate::from_record(name, record, own(name), model_type));
        }
        // This pod as its cache says now (its record may be seconds old), draining and backing off
        // as its own records say, like every other pod.
        pods.push(LoadCandidate {
            instance: this.to_owned(),
            capacity_bytes: local.capacity_bytes,
            used_bytes: local.used_bytes,
            loading: local.loading,
            lru_age_seconds: local.lru_age.as_secs(),
            coldest_model: local.coldest_model.as_ref().map(ModelId::to_string),
            cheapest_victims: local.cheapest_victims.clone(),
            draining: instances.get(this).is_some_and(|r| r.draining),
            offers_type: model_type.is_none_or(|t| self.offers_type(t)),
            retry_after_ms: own(this).and_then(Placement::retry_after_ms),
            gpu: GpuRoom::of(&self.inner.cache.gpu_tier().records()),
        });
        let now_ms = now_ms();
        let answer = route(&RouteInput {
            this,
            goal,
            pods: &pods,
            copies: &copies,
            exclude,
            model_type,
            predicted_bytes,
            now_ms,
            anti_churn_age: self.inner.config.anti_churn_age,
            gpu: self.inner.view.model_gpu(id),
        });
        let asked =
            decisions::Asked { model_id: id.as_str(), goal, pods: &pods, predicted_bytes, at_ms: now_ms };
        if let Some(decision) = decisions::explain(&asked, &answer, this) {
            tracing::debug!(model_id = %id, outcome = decision.outcome, instance = ?decision.instance, reason = %decision.reason, "placement decision");
            self.inner.decisions.record(decision);
        }
        answer
    }

    /// What `id` will take in memory, best known first: the registration's size hint; a size some pod
    /// measured (among its placement `records`); the file's size times the factor this pod learned
    /// from past loads; the mean loaded model here (from `local`). 0 when nothing is known (a model no
    /// one has seen, in remote storage, on an empty pod).
    fn predicted_bytes(
        &self,
        id: &ModelId,
        records: Option<&HashMap<String, Placement>>,
        local: &PlacementState,
    ) -> u64 {
        let spec = self.inner.view.model(id);
        if let Some(hint) = spec.as_ref().and_then(|s| s.size_bytes) {
            return hint;
        }
        let measured = records.into_iter().flat_map(HashMap::values).filter_map(|p| match p {
            Placement::Loaded { size_bytes, .. } => Some(*size_bytes),
            _ => None,
        });
        if let Some(measured) = measured.max() {
            return measured;
        }
        let file_bytes = spec.and_then(|s| local_model_bytes(&s, &self.inner.config.model_repo));
        match (file_bytes, local.mean_model_bytes) {
            (Some(bytes), _) => (bytes as f64 * local.size_factor.unwrap_or(1.0)) as u64,
            (None, Some(mean)) => mean,
            (None, None) => 0,
        }
    }

    /// Makes sure a copy of `id` exists where placement says (`goal` is [`Goal::Ensure`],
    /// [`Goal::AddCopy`] or [`Goal::HandOff`]); with `sync`, waits until it is loaded. A peer that
    /// cannot be reached, or could not load it, is skipped for the next choice, up to `MAX_ATTEMPTS`
    /// pods; when placement then has no pod left, the last peer's failure is the answer (it says why,
    /// where "no pod may load it now" would not).
    pub async fn ensure(
        &self,
        id: &ModelId,
        goal: Goal,
        sync: bool,
        last_used: LastUsed,
    ) -> Result<Ensured, MeshError> {
        let mut failed: Vec<String> = Vec::new();
        let mut last_failure: Option<String> = None;
        loop {
            let exclude: Vec<&str> = failed.iter().map(String::as_str).collect();
            let decision = self.route(id, goal, &exclude);
            tracing::debug!(model_id = %id, ?goal, ?decision, "placement");
            let peer = match decision {
                Route::Here => {
                    if sync {
                        self.load_here(id, true, last_used).await?;
                    }
                    return Ok(Ensured::Here);
                }
                Route::LoadHere => {
                    self.load_here(id, sync, last_used).await?;
                    return Ok(Ensured::Here);
                }
                Route::Copy(peer) => return Ok(Ensured::On(peer)),
                Route::WaitFor(peer) => {
                    if sync {
                        self.wait_for_copy(id, &peer).await?;
                    }
                    return Ok(Ensured::On(peer));
                }
                Route::Refuse(Refusal::NoPod) if last_failure.is_some() => {
                    return Err(MeshError::Cache(CacheError::LoadFailed {
                        model_id: id.clone(),
                        reason: last_failure.unwrap_or_default().into(),
                        retry_in: Duration::ZERO,
                    }));
                }
                Route::Refuse(refusal) => return Err(MeshError::refused(id, refusal)),
                Route::LoadOn(peer) => peer,
            };
            match self.load_on(&peer, id, sync, last_used).await {
                Ok(()) => return Ok(Ensured::On(peer)),
                Err(PeerLoad::Unreachable(reason)) => {
                    tracing::warn!(model_id = %id, peer = %peer, %reason, "peer cannot be reached to load the model; asking placement again");
                    last_failure = Some(format!("{peer}: {reason}"));
                    failed.push(peer);
                    if failed.len() >= MAX_ATTEMPTS {
                        return Err(MeshError::Cache(CacheError::LoadFailed {
                            model_id: id.clone(),
                            reason: format!("no pod chosen to load it could be reached (last: {reason})")
                                .into(),
                            retry_in: Duration::ZERO,
                        }));
                    }
                }
                Err(PeerLoad::Failed(e)) => return Err(e),
            }
        }
    }

    /// Loads `id` on this pod (the caller decided, or the request was forwarded here to load it).
    pub async fn load_here(&self, id: &ModelId, sync: bool, last_used: LastUsed) -> Result<(), MeshError> {
        let (cache, model) = (self.inner.cache.clone(), id.clone());
        let load = async move {
            let lease = cache.acquire(&model).await?;
            cache.mark_last_used(&lease, last_used.instant());
            Ok::<(), CacheError>(())
        };
        if sync {
            return load.await.map_err(MeshError::from);
        }
        // The outcome shows in the model's status; a failure is remembered by the cache.
        let span = tracing::info_span!("load", model_id = %id);
        self.inner.tasks.spawn(
            async move {
                if let Err(e) = load.await {
                    tracing::warn!(error = %e, "background load failed");
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Asks `peer` to load `id` on itself (marked forwarded, so it loads without asking placement).
    async fn load_on(
        &self,
        peer: &str,
        id: &ModelId,
        sync: bool,
        last_used: LastUsed,
    ) -> Result<(), PeerLoad> {
        let (endpoint, wire) =
            self.peer_address(peer).ok_or_else(|| PeerLoad::Unreachable("it left the cluster".into()))?;
        let channel = self
            .inner
            .peers
            .channel(&endpoint, wire)
            .ok_or_else(|| PeerLoad::Unreachable(format!("bad endpoint {endpoint:?}")))?;
        let mut request = tonic::Request::new(EnsureLoadedRequest {
            model_id: id.to_string(),
            last_used_time: last_used.epoch_millis(),
            sync,
        });
        mark_forwarded(request.metadata_mut(), &self.inner.instance_id, &self.inner.view, id);
        if let Some(bearer) = self.inner.config.admin_token.as_ref().and_then(|t| t.bearer()) {
            request.metadata_mut().insert("authorization", bearer);
        }
        let _counted = channel.start_request();
        let answer = ModelMeshClient::new(channel.channel).ensure_loaded(request).await;
        let status = match answer {
            Ok(answer) => {
                self.inner.peers.answered(&endpoint);
                answer.into_inner()
            }
            Err(status) if peer_failed(&status) => {
                self.inner.peers.failed(&endpoint);
                return Err(PeerLoad::Unreachable(status.message().to_owned()));
            }
            Err(status) => return Err(PeerLoad::Failed(MeshError::Peer(status))),
        };
        tracing::info!(model_id = %id, peer = %peer, sync, "asked a peer to load the model");
        if sync && status.status != ModelStatus::Loaded as i32 {
            return Err(PeerLoad::Failed(peer_load_failed(id, peer, &status)));
        }
        if sync {
            self.seen_loaded(id, peer).await;
        }
        Ok(())
    }

    /// Waits, briefly, until this pod's view shows `peer`'s copy of `id` loaded: the peer answered
    /// once loaded, and a status read here right after must say so too.
    pub(crate) async fn seen_loaded(&self, id: &ModelId, peer: &str) {
        let view = &self.inner.view;
        // Subscribed before looking, so the record cannot arrive in between unnoticed.
        let mut changes = view.subscribe();
        let seen = async {
            while !matches!(
                view.copies(id).as_ref().and_then(|c| c.get(peer)),
                Some(Placement::Loaded { .. })
            ) {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = changes.recv().await {
                    return;
                }
            }
        };
        if tokio::time::timeout(PEER_RECORD_WAIT, seen).await.is_err() {
            tracing::debug!(model_id = %id, peer = %peer, "the peer's loaded copy is not in the view yet");
        }
    }

    /// Waits until `peer`'s copy of `id` is loaded (or fails, or the wait limit passes).
    async fn wait_for_copy(&self, id: &ModelId, peer: &str) -> Result<(), MeshError> {
        let view = &self.inner.view;
        let mut changes = view.subscribe();
        let settled = async {
            loop {
                match view.copies(id).as_ref().and_then(|c| c.get(peer)) {
                    Some(Placement::Loaded { .. }) => return Ok(()),
                    Some(Placement::Failed { reason, .. }) => {
                        return Err(format!("{peer} failed to load it: {reason}"));
                    }
                    None => return Err(format!("{peer} stopped loading it")),
                    Some(Placement::Loading { .. }) => {}
                }
                loop {
                    match changes.recv().await {
                        Ok(ViewChange::Placement(changed)) if &changed == id => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            return Err("the cluster view closed".to_owned());
                        }
                    }
                }
            }
        };
        let outcome = tokio::time::timeout(self.inner.config.wait_limit, settled)
            .await
            .unwrap_or_else(|_| Err(format!("{peer} did not finish loading it in time")));
        outcome.map_err(|reason| {
            MeshError::Cache(CacheError::LoadFailed {
                model_id: id.clone(),
                reason: reason.into(),
                retry_in: Duration::ZERO,
            })
        })
    }

    /// Waits for the loads started in the background; new ones are refused by the cache by then.
    pub async fn close(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Why a peer did not load a model.
enum PeerLoad {
    /// It could not be reached or is leaving: another pod may do.
    Unreachable(String),
    /// It answered: the model failed there (or the request was refused).
    Failed(MeshError),
}

fn peer_load_failed(id: &ModelId, peer: &str, status: &ModelStatusInfo) -> MeshError {
    let reason = if status.errors.is_empty() {
        format!(
            "{peer} answered {:?}",
            ModelStatus::try_from(status.status).unwrap_or(ModelStatus::NotLoaded)
        )
    } else {
        format!("{peer}: {}", status.errors.join("; "))
    };
    MeshError::Cache(CacheError::LoadFailed {
        model_id: id.clone(),
        reason: reason.into(),
        retry_in: Duration::ZERO,
    })
}

/// A local model's size on disk: its model file's (the one its load reads first: `model.onnx`,
/// `model.safetensors`, ...; the learned size factor scales it); `None` for a model in remote storage
/// or one that cannot be read. Stats alone, no directory listing: this runs on every first request,
/// and listing a model's directory is an open of it, which the repository's watch hears.
fn local_model_bytes(spec: &ModelSpec, model_repo: &Path) -> Option<u64> {
    let path = match spec.source {
        Source::Repository => {
            crate::cluster::repository::resolve_repository_path(model_repo, &spec.path).ok()?
        }
        Source::Api => {
            let path = spec.path.strip_prefix("file://").unwrap_or(&spec.path);
            if path.contains("://") {
                return None;
            }
            PathBuf::from(path)
        }
    };
    let model = densemesh_puller::resolve_path(&path).ok()??;
    Some(model.file_bytes).filter(|bytes| *bytes > 0)
}
