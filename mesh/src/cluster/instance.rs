//! This pod in the registry: its instance record and its placement records, all under one lease, so a
//! pod that dies takes its records with it once the lease runs out, and one that leaves (SIGTERM)
//! revokes the lease and is gone at once.
//!
//! The lease is renewed every third of its TTL; the instance record is republished then when it has
//! changed materially, and at least every `REPUBLISH` (never per request). Placement records follow
//! the cache's copy events as they happen.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use densemesh_placement::gpu::DeviceRecord;
use densemesh_placement::registry::{Registry, encode};
use densemesh_placement::store::LeaseId;
use densemesh_placement::{InstanceRecord, Placement, StoreError};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::node::cache::{CopyEvent, CopyStatus, ModelCache};

/// Republish an unchanged instance record this often, so readers can tell stale from quiet.
const REPUBLISH: Duration = Duration::from_secs(40);

/// Who this pod is.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    pub id: String,
    pub endpoint: String,
    pub lease_ttl: Duration,
    /// The model types this pod offers, published in its record for placement.
    pub model_types: Vec<String>,
    /// The pod wire version it publishes ([`crate::cluster::wire::VERSION`]; 0: HTTP/2 only).
    pub peer_wire: u32,
    /// Told when the registry stops answering the heartbeat, and when it answers again.
    pub health: RegistryHealth,
    /// Where this pod's current lease is shared (the leader election binds its key to it).
    pub lease: Arc<tokio::sync::watch::Sender<Option<LeaseId>>>,
}

/// Whether the registry answers this pod's heartbeats. Loaded models keep serving through an outage
/// whatever its length; new loads go on from the in-memory view through a short one (a restart of
/// etcd), and are refused with UNAVAILABLE once it has lasted past `grace`: by then the view may be
/// stale (models unregistered or placed elsewhere), and loads cannot be published.
#[derive(Debug, Clone)]
pub struct RegistryHealth {
    /// [`monotonic_ms`] of the first failed heartbeat of the current outage; 0 while healthy. Not the
    /// wall clock: a clock stepped forward mid-outage must not make a blip look long (docs/faults.md).
    failing_since_ms: Arc<AtomicU64>,
    grace: Duration,
}

impl RegistryHealth {
    pub fn new(grace: Duration) -> Self {
        Self { failing_since_ms: Arc::default(), grace }
    }

    fn failed(&self, at_ms: u64) {
        metrics::gauge!(crate::metrics::REGISTRY_UP).set(0.0);
        let _ = self.failing_since_ms.compare_exchange(0, at_ms.max(1), Ordering::AcqRel, Ordering::Acquire);
    }

    fn answered(&self) {
        metrics::gauge!(crate::metrics::REGISTRY_UP).set(1.0);
        if self.failing_since_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("the registry answers again");
        }
    }

    /// Why a new load must be refused at `now_ms` ([`monotonic_ms`]), if it must.
    pub fn refusal(&self, now_ms: u64) -> Option<String> {
        let since = self.failing_since_ms.load(Ordering::Acquire);
        let down_for = Duration::from_millis(now_ms.saturating_sub(since));
        (since != 0 && down_for > self.grace).then(|| {
            format!(
                "the registry (etcd) has not answered for {}s (--registry-outage-grace {}s); new loads are refused until it does, loaded models keep serving",
                down_for.as_secs(),
                self.grace.as_secs()
            )
        })
    }
}

/// Wall-clock milliseconds since the epoch: the clock placement records' times are on.
pub(crate) fn now_ms() -> u64 {
    let now = SystemTime::now();
    // docs/faults.md: `clock.jump` `return(SECONDS)` steps this pod's wall clock (negative: back).
    #[cfg(feature = "failpoints")]
    let now = match fail::eval("clock.jump", |s| s.and_then(|s| s.parse::<i64>().ok())).flatten() {
        Some(s) if s >= 0 => now + Duration::from_secs(s.unsigned_abs()),
        Some(s) => now - Duration::from_secs(s.unsigned_abs()),
        None => now,
    };
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on this process's monotonic clock (never 0): for durations measured within this pod,
/// which the wall clock's steps (NTP, a suspended VM) must not stretch or shrink.
pub(crate) fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

/// `t` in milliseconds since the epoch, rounded up: other pods must not see a back-off end before
/// this pod's own cache lets the model load again.
fn epoch_ms_rounded_up(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos().div_ceil(1_000_000) as u64)
}

struct Publisher {
    registry: Registry,
    cache: ModelCache,
    config: InstanceConfig,
    started_ms: u64,
    lease: Option<LeaseId>,
    published: Option<(InstanceRecord, tokio::time::Instant)>,
    draining: bool,
    /// Requests counted at the last heartbeat, and when: the rate is their difference over time.
    last_count: Option<(u64, tokio::time::Instant)>,
    rate_per_minute: u64,
}

/// Asks the publisher to mark this pod draining; answered once the record says so.
pub type DrainRequest = tokio::sync::oneshot::Sender<()>;

/// Keeps this pod's records until `stop`, then revokes its lease. A request on `drain` republishes
/// the instance record as draining (no new loads come here) and answers when it is written.
pub async fn run(
    registry: Registry,
    cache: ModelCache,
    config: InstanceConfig,
    mut drain: tokio::sync::mpsc::Receiver<DrainRequest>,
    stop: CancellationToken,
) {
    let mut events = cache.copy_events();
    let heartbeat = (config.lease_ttl / 3).max(Duration::from_millis(200));
    let mut p = Publisher {
        registry,
        cache,
        config,
        started_ms: now_ms(),
        lease: None,
        published: None,
        draining: false,
        last_count: None,
        rate_per_minute: 0,
    };
    p.heartbeat().await;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => p.placement(event).await,
                // Missed events: the next heartbeat republishes every copy from the cache.
                Err(RecvError::Lagged(_)) => p.lease = None,
                Err(RecvError::Closed) => break,
            },
            _ = tick.tick() => p.heartbeat().await,
            Some(done) = drain.recv() => {
                p.draining = true;
                p.heartbeat().await;
                let _ = done.send(());
            }
            _ = stop.cancelled() => break,
        }
        p.config.lease.send_if_modified(|shared| {
            let changed = *shared != p.lease;
            *shared = p.lease;
            changed
        });
    }
    p.config.lease.send_replace(None);
    if let Some(lease) = p.lease {
        match p.registry.store().revoke_lease(lease).await {
            Ok(()) => tracing::info!(instance_id = %p.config.id, "left the registry"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot revoke this pod's lease; its records expire with it")
            }
        }
    }
}

/// Whether a device's use moved by more than 1% of its capacity, or its models changed in number.
fn gpu_moved(old: &[DeviceRecord], new: &[DeviceRecord]) -> bool {
    old.len() != new.len()
        || old.iter().zip(new).any(|(o, n)| {
            o.models != n.models || o.used_bytes.abs_diff(n.used_bytes) > n.capacity_bytes / 100
        })
}

impl Publisher {
    fn record(&self) -> InstanceRecord {
        let state = self.cache.placement_state();
        InstanceRecord {
            endpoint: self.config.endpoint.clone(),
            capacity_bytes: state.capacity_bytes,
            used_bytes: state.used_bytes,
            models_loaded: state.models_loaded,
            loading: state.loading,
            lru_age_seconds: state.lru_age.as_secs(),
            coldest_model: state.coldest_model.map(|id| id.to_string()).unwrap_or_default(),
            cheapest_victims: state.cheapest_victims,
            requests_per_minute: self.rate_per_minute,
            draining: self.draining,
            started_ms: self.started_ms,
            model_types: self.config.model_types.clone(),
            peer_wire: self.config.peer_wire,
            devices: self.cache.gpu_tier().records(),
        }
    }

    /// Whether a record differs enough from the last published one to write it again.
    fn material_change(old: &InstanceRecord, new: &InstanceRecord) -> bool {
        let used_moved = old.used_bytes.abs_diff(new.used_bytes) > new.capacity_bytes / 100;
        used_moved
            || old.models_loaded != new.models_loaded
            || old.loading != new.loading
            || old.draining != new.draining
            || old.endpoint != new.endpoint
            || old.coldest_model != new.coldest_model
            || gpu_moved(&old.devices, &new.devices)
            || old.lru_age_seconds.abs_diff(new.lru_age_seconds) > 60
            || old.requests_per_minute.abs_diff(new.requests_per_minute)
                > new.requests_per_minute.max(100) / 5
    }

    async fn heartbeat(&mut self) {
        let store = self.registry.store().clone();
        // An outage counts from the heartbeat that found it, not from when that heartbeat gave up:
        // across a silent partition a call hangs until the etcd client's timeout (10 s).
        let began_ms = monotonic_ms();
        if let Some(lease) = self.lease {
            match store.keep_alive(lease).await {
                Ok(()) => self.config.health.answered(),
                Err(StoreError::LeaseNotFound(_)) => {
                    self.config.health.answered();
                    tracing::warn!(instance_id = %self.config.id, "lease expired (store unreachable too long?); rejoining");
                    self.lease = None;
                }
                Err(e) => {
                    self.config.health.failed(began_ms);
                    tracing::warn!(error = %e, "cannot renew this pod's lease");
                    return;
                }
            }
        }
        if self.lease.is_none() {
            match store.grant_lease(self.config.lease_ttl).await {
                Ok(lease) => {
                    self.config.health.answered();
                    self.lease = Some(lease);
                    self.published = None;
                    self.republish_copies().await;
                    tracing::info!(instance_id = %self.config.id, endpoint = %self.config.endpoint, "joined the registry");
                }
                Err(e) => {
                    self.config.health.failed(began_ms);
                    tracing::warn!(error = %e, "cannot join the registry; retrying");
                    return;
                }
            }
        }
        let now = tokio::time::Instant::now();
        let count = crate::metrics::requests_served();
        if let Some((before, at)) = self.last_count {
            let minutes = now.duration_since(at).as_secs_f64() / 60.0;
            if minutes > 0.0 {
                self.rate_per_minute = (count.saturating_sub(before) as f64 / minutes) as u64;
            }
        }
        self.last_count = Some((count, now));
        let record = self.record();
        let due = match &self.published {
            None => true,
            Some((old, at)) => Self::material_change(old, &record) || at.elapsed() >= REPUBLISH,
        };
        if due {
            let key = self.registry.instance_key(&self.config.id);
            match store.put(&key, encode(&record), self.lease).await {
                Ok(_) => self.published = Some((record, tokio::time::Instant::now())),
                Err(e) => tracing::warn!(error = %e, "cannot publish this pod's instance record"),
            }
        }
    }

    /// Writes a placement record for every copy the cache holds (after joining or missing events).
    async fn republish_copies(&mut self) {
        for model in self.cache.resident() {
            if let CopyStatus::Loaded { size_bytes } = self.cache.status(&model.id) {
                let runtime = self.cache.runtime_of(&model.id).unwrap_or_default();
                self.placement(CopyEvent::Loaded { id: model.id, size_bytes, runtime }).await;
            }
        }
    }

    async fn placement(&mut self, event: CopyEvent) {
        let Some(lease) = self.lease else { return };
        let store = self.registry.store().clone();
        let since_ms = now_ms();
        let (id, record) = match event {
            CopyEvent::Loading(id) => (id, Some(Placement::Loading { since_ms })),
            CopyEvent::Loaded { id, size_bytes, runtime } => {
                (id, Some(Placement::Loaded { since_ms, size_bytes, runtime }))
            }
            CopyEvent::Failed { id, reason, retry_at } => {
                let retry_after_ms = epoch_ms_rounded_up(retry_at);
                (id, Some(Placement::Failed { since_ms, reason, retry_after_ms }))
            }
            CopyEvent::Gone(id) => (id, None),
        };
        let key = self.registry.placement_key(&id, &self.config.id);
        let written = match record {
            Some(r) => store.put(&key, encode(&r), Some(lease)).await.map(|_| ()),
            None => store.delete(&key).await.map(|_| ()),
        };
        if let Err(e) = written {
            tracing::warn!(model_id = %id, error = %e, "cannot publish a placement record");
            if matches!(e, StoreError::LeaseNotFound(_)) {
                self.lease = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use densemesh_placement::view::ViewChange;
    use densemesh_placement::{ClusterView, MemoryStore, ModelId, Store};
    use futures::FutureExt;

    use super::*;
    use crate::error::CacheError;
    use crate::node::cache::{CacheConfig, Locate};
    use crate::test_support::NoRuntime;

    /// Waits for the next change `want` accepts: a notification, not a poll.
    async fn next_change(
        changes: &mut tokio::sync::broadcast::Receiver<ViewChange>,
        want: impl Fn(&ViewChange) -> bool,
    ) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !want(&changes.recv().await.unwrap()) {}
        });
        waited.await.expect("the change within 10 s");
    }

    #[tokio::test]
    async fn a_failed_load_is_published_with_the_end_of_its_back_off() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let registry = Registry::new(store, "t");
        let view = ClusterView::start(registry.clone()).await.unwrap();
        let mut changes = view.subscribe();
        let locate: Locate = Arc::new(|id: ModelId| {
            async move {
                Err(CacheError::LoadFailed {
                    model_id: id,
                    reason: "storage says no".into(),
                    retry_in: Duration::ZERO,
                })
            }
            .boxed()
        });
        let backoff = Duration::from_secs(30);
        let config = CacheConfig { retry_backoff: backoff, max_retry_backoff: backoff, ..Default::default() };
        let cache = ModelCache::new(config, Arc::new(NoRuntime), locate);
        let stop = CancellationToken::new();
        let (_drain, drain_requests) = tokio::sync::mpsc::channel(1);
        let instance = InstanceConfig {
            id: "pod-a".into(),
            endpoint: "127.0.0.1:1".into(),
            lease_ttl: Duration::from_secs(30),
            model_types: densemesh_placement::spec::legacy_model_types(),
            peer_wire: crate::cluster::wire::VERSION,
            health: RegistryHealth::new(Duration::from_secs(30)),
            lease: Arc::new(tokio::sync::watch::channel(None).0),
        };
        let publisher = tokio::spawn(run(registry, cache.clone(), instance, drain_requests, stop.clone()));
        // Joined (so listening to the cache's events) once its instance record shows.
        next_change(&mut changes, |c| matches!(c, ViewChange::Instance(i) if i == "pod-a")).await;

        let model = ModelId::new("m").unwrap();
        let before = now_ms();
        assert!(matches!(cache.acquire(&model).await, Err(CacheError::LoadFailed { .. })));
        let after = now_ms();
        let failed = loop {
            next_change(&mut changes, |c| matches!(c, ViewChange::Placement(_))).await;
            if let Some((_, p @ Placement::Failed { .. })) = view.placements(&model).into_iter().next() {
                break p;
            }
        };
        let Placement::Failed { since_ms, reason, retry_after_ms } = failed else { unreachable!() };
        assert!(reason.contains("storage says no"), "{reason}");
        let backoff_ms = backoff.as_millis() as u64;
        assert!(
            (before + backoff_ms..=after + backoff_ms + 1).contains(&retry_after_ms),
            "the back-off ends {retry_after_ms}, the load failed between {before} and {after}"
        );
        assert!(since_ms >= before && since_ms < retry_after_ms);
        stop.cancel();
        publisher.await.unwrap();
    }

    #[test]
    fn back_off_ends_round_up_to_the_millisecond() {
        let at = |nanos: u64| UNIX_EPOCH + Duration::from_nanos(nanos);
        assert_eq!(epoch_ms_rounded_up(at(5_000_000)), 5);
        assert_eq!(epoch_ms_rounded_up(at(5_000_001)), 6);
        assert_eq!(epoch_ms_rounded_up(UNIX_EPOCH), 0);
    }

    #[test]
    fn new_loads_are_refused_only_once_an_outage_outlasts_its_grace() {
        let health = RegistryHealth::new(Duration::from_secs(30));
        assert_eq!(health.refusal(1_000_000), None, "healthy");
        health.failed(1_000_000);
        health.failed(1_020_000); // later failures of the same outage do not move its start
        assert_eq!(health.refusal(1_030_000), None, "30 s down: still within the grace");
        let reason = health.refusal(1_031_000).expect("31 s down: refused");
        assert!(reason.contains("31s") && reason.contains("--registry-outage-grace 30s"), "{reason}");
        health.answered();
        assert_eq!(health.refusal(1_100_000), None, "back: loads again");
    }
}
