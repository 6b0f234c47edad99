//! The live dashboard: `/dashboard` (one self-contained page, inline CSS and JS, for air-gapped
//! users) and `/api/v1/cluster`, the JSON it refreshes from every two seconds, usable on its own
//! (schema in docs/dashboard.md).
//!
//! The JSON is a pure function of snapshots ([`build`] over a [`Snapshot`]): the cluster view (every
//! pod's instance and placement records, vmodels), this pod's cache as of now, a ring of per-10 s
//! activity counters kept here ([`ActivityRing`]) and the placer's ring of recent decisions. Other
//! pods are shown as their records say; only this pod's own figures are live.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::gpu::DeviceRecord;
use densemesh_placement::status::{LoadState, Registration, model_state, vmodel_state};
use densemesh_placement::{ClusterView, InstanceRecord, ModelId, Placement, VModelSpec, Weighted};
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::cluster::placer::{Decision, DecisionLog};
use crate::node::cache::{CopyEvent, ModelCache, PlacementState, ResidentModel};

/// The page, served as is.
pub const PAGE: &str = include_str!("dashboard.html");

/// Width of one activity bucket.
pub const BUCKET: Duration = Duration::from_secs(10);
/// Buckets kept: the last six minutes.
pub const BUCKETS_KEPT: usize = 36;
/// Version of the JSON's shape; raised when a field changes meaning or goes away (new fields do not).
pub const SCHEMA_VERSION: u32 = 1;

/// Counters since start that the activity ring takes differences of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub loads: u64,
    pub load_failures: u64,
    pub evictions: u64,
    pub requests: u64,
}

/// What happened on this pod during one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub start_ms: u64,
    pub end_ms: u64,
    pub loads: u64,
    pub load_failures: u64,
    pub evictions: u64,
    pub requests: u64,
    /// The bucket still running (its figures so far).
    pub partial: bool,
}

/// A bounded ring of per-bucket differences of [`Totals`], sampled once a bucket.
#[derive(Debug, Clone)]
pub struct ActivityRing {
    buckets: VecDeque<Bucket>,
    capacity: usize,
    /// The totals and time of the last sample: the start of the running bucket.
    last: Option<(u64, Totals)>,
}

impl ActivityRing {
    /// A ring keeping `capacity` finished buckets (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { buckets: VecDeque::with_capacity(capacity), capacity, last: None }
    }

    /// Closes the running bucket at `at_ms` with `totals`; the first sample only starts one. Totals
    /// that went back (a counter reset) count as nothing happened, never as a huge figure.
    pub fn sample(&mut self, at_ms: u64, totals: Totals) {
        if let Some((start_ms, before)) = self.last {
            if self.buckets.len() == self.capacity {
                self.buckets.pop_front();
            }
            self.buckets.push_back(difference(start_ms, at_ms, before, totals, false));
        }
        self.last = Some((at_ms, totals));
    }

    /// The finished buckets, oldest first, then the running one as of `now_ms` and `totals`.
    pub fn buckets(&self, now_ms: u64, totals: Totals) -> Vec<Bucket> {
        let mut all: Vec<Bucket> = self.buckets.iter().copied().collect();
        if let Some((start_ms, before)) = self.last {
            all.push(difference(start_ms, now_ms.max(start_ms), before, totals, true));
        }
        all
    }
}

fn difference(start_ms: u64, end_ms: u64, before: Totals, after: Totals, partial: bool) -> Bucket {
    Bucket {
        start_ms,
        end_ms,
        loads: after.loads.saturating_sub(before.loads),
        load_failures: after.load_failures.saturating_sub(before.load_failures),
        evictions: after.evictions.saturating_sub(before.evictions),
        requests: after.requests.saturating_sub(before.requests),
        partial,
    }
}

/// A byte budget and what is used of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// The whole document `/api/v1/cluster` answers (see docs/dashboard.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterJson {
    pub schema_version: u32,
    pub generated_ms: u64,
    /// The pod that answered: the only one whose activity and idle times are known.
    pub this_instance: String,
    pub leader: Option<String>,
    pub models_registered: usize,
    pub instances: Vec<InstanceJson>,
    pub vmodels: Vec<VModelJson>,
    /// This pod's activity, oldest bucket first; the last one is still running.
    pub activity: ActivityJson,
    /// This pod's recent placement decisions, newest first.
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityJson {
    pub bucket_seconds: u64,
    pub buckets: Vec<Bucket>,
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceJson {
    pub id: String,
    pub endpoint: String,
    /// The pod that answered.
    pub this: bool,
    pub leader: bool,
    pub draining: bool,
    pub started_ms: u64,
    pub model_types: Vec<String>,
    pub memory: Tier,
    /// The disk cache of remote models; known for the answering pod only.
    pub disk_cache: Option<Tier>,
    /// Its GPUs, each a tier of its own, as its instance record lists them (docs/gpu.md); empty
    /// without any.
    pub gpus: Vec<DeviceRecord>,
    pub models_loaded: u64,
    pub loading: u64,
    pub lru_age_seconds: u64,
    pub coldest_model: Option<String>,
    pub requests_per_minute: u64,
    /// Its copies, by model id.
    pub models: Vec<ModelOnPod>,
}

/// One copy of a model on one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelOnPod {
    pub model_id: String,
    /// `loaded`, `loading` or `failed`.
    pub state: &'static str,
    pub size_bytes: u64,
    /// Since its record last changed state (ms since the epoch); `None` where the cache is the source.
    pub since_ms: Option<u64>,
    /// Seconds since a request last used it; known on the answering pod only.
    pub idle_seconds: Option<u64>,
    pub requests: Option<u64>,
    pub in_flight: Option<u64>,
    /// Why the last load failed.
    pub reason: Option<String>,
}

/// One vmodel and where its transition stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VModelJson {
    pub vmodel_id: String,
    pub owner: String,
    pub active: String,
    pub target: String,
    /// `steady` (target is active), `transitioning`, or `failing` (see `transition_error`).
    pub state: &'static str,
    pub transition_error: Option<String>,
    pub split: Vec<Weighted>,
    pub models: Vec<VModelMember>,
}

/// A model a vmodel refers to, as the whole mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VModelMember {
    pub model_id: String,
    /// `pending`, `standby`, `loading`, `loaded` or `failed_to_load`.
    pub state: &'static str,
    pub copies: u32,
    pub size_bytes: u64,
}

/// Everything [`build`] reads, as plain data.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: u64,
    pub this: String,
    pub leader: Option<String>,
    pub instances: Vec<(String, InstanceRecord)>,
    /// Registered models with their type.
    pub models: Vec<(ModelId, String)>,
    /// Each model's copies by instance id.
    pub copies: BTreeMap<ModelId, Vec<(String, Placement)>>,
    pub vmodels: Vec<(ModelId, VModelSpec)>,
    /// This pod's cache now (its instance record may be seconds old).
    pub local: PlacementState,
    pub resident: Vec<ResidentModel>,
    pub disk: Option<Tier>,
    /// This pod's GPUs now.
    pub gpus: Vec<DeviceRecord>,
    pub activity: Vec<Bucket>,
    pub decisions: Vec<Decision>,
}

/// The document for a snapshot.
pub fn build(s: &Snapshot) -> ClusterJson {
    let mut ids: Vec<&str> = s.instances.iter().map(|(id, _)| id.as_str()).collect();
    if !ids.contains(&s.this.as_str()) {
        // Standalone, or this pod's record not yet published: it is still a pod with models.
        ids.push(&s.this);
    }
    ids.sort_unstable();
    let records: HashMap<&str, &InstanceRecord> = s.instances.iter().map(|(i, r)| (i.as_str(), r)).collect();
    let instances = ids.into_iter().map(|id| instance(s, id, records.get(id).copied())).collect();
    ClusterJson {
        schema_version: SCHEMA_VERSION,
        generated_ms: s.now_ms,
        this_instance: s.this.clone(),
        leader: s.leader.clone(),
        models_registered: s.models.len(),
        instances,
        vmodels: s.vmodels.iter().map(|(id, spec)| vmodel(s, id, spec)).collect(),
        activity: ActivityJson { bucket_seconds: BUCKET.as_secs(), buckets: s.activity.clone() },
        decisions: s.decisions.clone(),
    }
}

fn instance(s: &Snapshot, id: &str, record: Option<&InstanceRecord>) -> InstanceJson {
    let this = id == s.this;
    let mut models: Vec<ModelOnPod> = s
        .copies
        .iter()
        .filter_map(|(model, copies)| copies.iter().find(|(i, _)| i == id).map(|(_, p)| (model, p)))
        // This pod's loaded copies come from its cache below, with idle times.
        .filter(|(_, p)| !(this && matches!(p, Placement::Loaded { .. })))
        .map(|(model, placement)| from_record(model, placement))
        .collect();
    if this {
        models.extend(s.resident.iter().map(|r| ModelOnPod {
            model_id: r.id.to_string(),
            state: "loaded",
            size_bytes: r.size_bytes,
            since_ms: None,
            idle_seconds: Some(r.idle_for.as_secs()),
            requests: Some(r.requests),
            in_flight: Some(r.in_flight as u64),
            reason: None,
        }));
    }
    models.sort_by(|a, b| a.model_id.cmp(&b.model_id));
    let (memory, models_loaded, loading, lru_age_seconds, coldest_model) = if this {
        let l = &s.local;
        let memory = Tier { capacity_bytes: l.capacity_bytes, used_bytes: l.used_bytes };
        (
            memory,
            l.models_loaded,
            l.loading,
            l.lru_age.as_secs(),
            l.coldest_model.as_ref().map(ModelId::to_string),
        )
    } else {
        let r = record.cloned().unwrap_or_else(empty_record);
        let coldest = (!r.coldest_model.is_empty()).then_some(r.coldest_model);
        let memory = Tier { capacity_bytes: r.capacity_bytes, used_bytes: r.used_bytes };
        (memory, r.models_loaded, r.loading, r.lru_age_seconds, coldest)
    };
    InstanceJson {
        id: id.to_owned(),
        endpoint: record.map(|r| r.endpoint.clone()).unwrap_or_default(),
        this,
        leader: s.leader.as_deref() == Some(id),
        draining: record.is_some_and(|r| r.draining),
        started_ms: record.map_or(0, |r| r.started_ms),
        model_types: record.map(|r| r.model_types.clone()).unwrap_or_default(),
        memory,
        disk_cache: if this { s.disk } else { None },
        gpus: if this { s.gpus.clone() } else { record.map(|r| r.devices.clone()).unwrap_or_default() },
        models_loaded,
        loading,
        lru_age_seconds,
        coldest_model,
        requests_per_minute: record.map_or(0, |r| r.requests_per_minute),
        models,
    }
}

fn empty_record() -> InstanceRecord {
    InstanceRecord {
        endpoint: String::new(),
        capacity_bytes: 0,
        used_bytes: 0,
        models_loaded: 0,
        loading: 0,
        lru_age_seconds: 0,
        coldest_model: String::new(),
        cheapest_victims: None,
        requests_per_minute: 0,
        draining: false,
        started_ms: 0,
        model_types: Vec::new(),
        peer_wire: 0,
        devices: Vec::new(),
    }
}

fn from_record(model: &ModelId, placement: &Placement) -> ModelOnPod {
    let (state, size_bytes, reason) = match placement {
        Placement::Loading { .. } => ("loading", 0, None),
        Placement::Loaded { size_bytes, .. } => ("loaded", *size_bytes, None),
        Placement::Failed { reason, .. } => ("failed", 0, Some(reason.clone())),
    };
    ModelOnPod {
        model_id: model.to_string(),
        state,
        size_bytes,
        since_ms: Some(placement.since_ms()),
        idle_seconds: None,
        requests: None,
        in_flight: None,
        reason,
    }
}

fn vmodel(s: &Snapshot, id: &ModelId, spec: &VModelSpec) -> VModelJson {
    let state = vmodel_state(id, spec, |model| {
        let registration = match s.models.iter().find(|(m, _)| m.as_str() == model) {
            None => Registration::Absent,
            Some((_, t)) if s.instances.iter().any(|(_, r)| r.offers(t)) => Registration::Placeable,
            Some(_) => Registration::NoPodOffersType,
        };
        let copies: Option<HashMap<String, Placement>> =
            ModelId::new(model).ok().and_then(|m| s.copies.get(&m)).map(|c| c.iter().cloned().collect());
        model_state(model, registration, copies.as_ref())
    });
    let phase = if spec.transition_error.is_some() {
        "failing"
    } else if spec.target.is_empty() || spec.target == spec.active {
        "steady"
    } else {
        "transitioning"
    };
    VModelJson {
        vmodel_id: id.to_string(),
        owner: state.owner,
        active: state.active,
        target: state.target,
        state: phase,
        transition_error: state.transition_error,
        split: state.split,
        models: state
            .models
            .into_iter()
            .map(|m| VModelMember {
                state: load_state_name(m.state),
                copies: m.total_copies,
                size_bytes: m.size_bytes,
                model_id: m.model_id,
            })
            .collect(),
    }
}

fn load_state_name(state: LoadState) -> &'static str {
    match state {
        LoadState::Pending => "pending",
        LoadState::Standby => "standby",
        LoadState::Loading => "loading",
        LoadState::Loaded => "loaded",
        LoadState::FailedToLoad => "failed_to_load",
    }
}

/// What the dashboard reads: shared handles, plus this pod's activity ring fed by a sampling task
/// that stops when the last clone drops.
#[derive(Clone)]
pub struct Dashboard {
    instance_id: String,
    view: ClusterView,
    cache: ModelCache,
    decisions: DecisionLog,
    puller: Arc<densemesh_puller::Puller>,
    activity: Arc<Mutex<Activity>>,
    _sampler: Arc<DropGuard>,
}

struct Activity {
    ring: ActivityRing,
    /// Loads counted from the cache's copy events (finished, by result).
    loads: u64,
    load_failures: u64,
}

impl Dashboard {
    /// Starts sampling this pod's activity; call within the node's runtime.
    pub fn start(
        instance_id: String,
        view: ClusterView,
        cache: ModelCache,
        decisions: DecisionLog,
        puller: Arc<densemesh_puller::Puller>,
    ) -> Self {
        let activity = Arc::new(Mutex::new(Activity {
            ring: ActivityRing::new(BUCKETS_KEPT),
            loads: 0,
            load_failures: 0,
        }));
        let stop = CancellationToken::new();
        let dashboard = Self {
            instance_id,
            view,
            cache,
            decisions,
            puller,
            activity,
            _sampler: Arc::new(stop.clone().drop_guard()),
        };
        // The task holds the handles it samples but not the guard, so it does not keep itself alive.
        let sampler = Sampler { cache: dashboard.cache.clone(), activity: dashboard.activity.clone() };
        tokio::spawn(sampler.run(stop).instrument(tracing::info_span!("dashboard sampler")));
        dashboard
    }

    /// The document as of now.
    pub fn snapshot(&self) -> ClusterJson {
        let (used_bytes, capacity_bytes) = self.puller.disk_usage();
        let now_ms = crate::cluster::instance::now_ms();
        let models: Vec<(ModelId, String)> =
            self.view.models().into_iter().map(|(id, spec)| (id, spec.model_type)).collect();
        let copies = models
            .iter()
            .filter_map(|(id, _)| {
                let copies = self.view.copies(id)?;
                Some((id.clone(), copies.iter().map(|(i, p)| (i.clone(), p.clone())).collect()))
            })
            .collect();
        let activity = {
            let activity = self.activity.lock();
            activity.ring.buckets(now_ms, totals(&self.cache, &activity))
        };
        build(&Snapshot {
            now_ms,
            this: self.instance_id.clone(),
            leader: self.view.leader(),
            instances: self.view.instances(),
            models,
            copies,
            vmodels: self.view.vmodels(),
            local: self.cache.placement_state(),
            resident: self.cache.resident(),
            disk: Some(Tier { capacity_bytes, used_bytes }),
            gpus: self.cache.gpu_tier().records(),
            activity,
            decisions: self.decisions.recent(),
        })
    }
}

fn totals(cache: &ModelCache, activity: &Activity) -> Totals {
    Totals {
        loads: activity.loads,
        load_failures: activity.load_failures,
        evictions: cache.evictions_total(),
        requests: crate::metrics::requests_served(),
    }
}

struct Sampler {
    cache: ModelCache,
    activity: Arc<Mutex<Activity>>,
}

impl Sampler {
    async fn run(self, stop: CancellationToken) {
        let mut events = self.cache.copy_events();
        let mut tick = tokio::time::interval(BUCKET);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let mut activity = self.activity.lock();
                    let totals = totals(&self.cache, &activity);
                    activity.ring.sample(crate::cluster::instance::now_ms(), totals);
                }
                event = events.recv() => match event {
                    Ok(CopyEvent::Loaded { .. }) => self.activity.lock().loads += 1,
                    Ok(CopyEvent::Failed { .. }) => self.activity.lock().load_failures += 1,
                    Ok(_) => {}
                    // Missed events only undercount loads; the ring goes on.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests;
