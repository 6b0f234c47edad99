//! A capacity planner on the mesh's own decisions: replays a request trace through
//! [`crate::route::route`] and [`crate::eviction::victims`] for N pods of one capacity, in simulated
//! time (no sleeping, no I/O), and reports what the cluster would do.
//!
//! Each request arrives at a pod drawn at random (seeded; as a Service spreads clients), which asks
//! `route` with every pod's state as of that instant, exactly as meshd's placer does (meshd reads
//! peers from instance records a few seconds old: the simulator is the ideal of that), under GDSF
//! each pod's cheapest victims included, listed as the real cache lists them. Then:
//! - a copy here or on a peer serves it: a hit (forwarded when on a peer);
//! - a load here or on a peer: a miss; the pod makes room with `victims` under the chosen policy
//!   (evicting, raising its GDSF clock) and loads the model at once, charged the trace's size;
//! - a refusal (larger than any pod, anti-churn, no room because every model is pinned by the
//!   minimum residence): a miss that loads nothing.
//!
//! What it leaves out, on purpose: load durations do not hold a model in `Loading` (requests during
//! a load count as hits, as meshd's single flight makes them one load), requests are never in flight
//! at once (nothing is pinned by a lease), and copies are never added for load (no request rate).
//! Loads are charged exactly their size, where meshd predicts first and charges the measured size.

#[cfg(test)]
mod tests;
mod trace;

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;
pub use trace::{Request, SplitMix64, Synthetic, Trace, TraceError};

use crate::choose::LoadCandidate;
use crate::eviction::{self, Candidate, Clock, Policy, Rules, Victim};
use crate::route::{Copy, CopyOn, Goal, Refusal, Route, RouteInput, route};

/// The cluster to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub pods: usize,
    /// Each pod's `--capacity`.
    pub capacity_bytes: u64,
    pub policy: Policy,
    /// meshd's `--min-residence`.
    pub min_residence: Duration,
    /// meshd's `--anti-churn-age` (zero: off).
    pub anti_churn_age: Duration,
    /// Seeds the pod each request arrives at.
    pub seed: u64,
}

/// A cluster that cannot be simulated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("--pods must be at least 1")]
    NoPods,
    #[error("--capacity must be more than 0 bytes")]
    NoCapacity,
}

/// What the cluster did with the trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub pods: usize,
    pub capacity_bytes: u64,
    pub policy: String,
    pub requests: u64,
    /// Requests served by a model already loaded (here or on a peer).
    pub hits: u64,
    /// Hits on a peer plus loads on a peer: requests that took one hop.
    pub forwarded: u64,
    pub loads: u64,
    pub evictions: u64,
    /// Requests no pod could load a model for (see `refusals`).
    pub refused: u64,
    pub refusals: Refusals,
    pub hit_rate: f64,
    /// Bytes of the models of missed requests over bytes of the models of all requests: how much of
    /// what is asked must be loaded.
    pub byte_miss_ratio: f64,
    /// From the first request's time to the last's.
    pub duration_ms: u64,
    /// `None` when the trace spans no time.
    pub loads_per_second: Option<f64>,
    /// Placement records written to etcd: `Loading` then `Loaded` per load, a delete per eviction
    /// (instance records, republished every few seconds, are not counted).
    pub etcd_writes: u64,
    pub etcd_writes_per_second: Option<f64>,
    /// Each pod's highest charged bytes.
    pub peak_bytes_per_pod: Vec<u64>,
    /// Each pod's charged bytes, averaged over the trace's time.
    pub mean_bytes_per_pod: Vec<u64>,
    /// Copies loaded at the end, summed over pods (a model on two pods counts twice).
    pub copies_held: u64,
    /// Models loaded on more than one pod at the end.
    pub models_on_several_pods: u64,
    /// The 99th percentile of the time cold loads add to requests (0 for a hit), in ms; each load
    /// takes the trace's `load_ms`, else the eviction's estimate from its size.
    pub added_p99_ms: u64,
    /// The mean of the same, in ms.
    pub added_mean_ms: f64,
}

/// Refused requests by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Refusals {
    pub too_large: u64,
    pub would_evict_recent: u64,
    /// Every model on the chosen pod is younger than the minimum residence (or nothing fits).
    pub no_room: u64,
    pub no_pod: u64,
}

/// One loaded model on one pod.
struct Resident {
    model: u32,
    size_bytes: u64,
    loaded_ms: u64,
    last_used_ms: u64,
    uses: u64,
    reload_cost: Duration,
    clock_at_use: Clock,
}

impl Resident {
    fn priority(&self) -> f64 {
        eviction::gdsf_priority(self.clock_at_use, self.uses, self.reload_cost, self.size_bytes)
    }

    /// Its place in [`Pod::by_priority`]: GDSF's order, ties to the longer idle.
    fn priority_key(&self) -> (u64, u64, u32) {
        (eviction::ordered_bits(self.priority()), self.last_used_ms, self.model)
    }
}

struct Pod {
    used: u64,
    residents: Vec<Resident>,
    /// Where each model sits in `residents`, by model index.
    slot: Vec<Option<u32>>,
    /// (last use, model): the first is the pod's least recently used model, the LRU age it publishes.
    by_last_use: BTreeSet<(u64, u32)>,
    /// Under GDSF, residents in eviction order (see [`Resident::priority_key`]), for the victims
    /// the pod publishes; empty under LRU.
    by_priority: BTreeSet<(u64, u64, u32)>,
    gdsf: bool,
    clock: Clock,
    peak: u64,
    /// Byte-milliseconds charged so far, for the time-weighted mean.
    area: u128,
    since_ms: u64,
}

impl Pod {
    fn new(models: usize, start_ms: u64, policy: Policy) -> Self {
        Self {
            used: 0,
            residents: Vec::new(),
            slot: vec![None; models],
            by_last_use: BTreeSet::new(),
            by_priority: BTreeSet::new(),
            gdsf: policy == Policy::GreedyDualSizeFrequency,
            clock: Clock::default(),
            peak: 0,
            area: 0,
            since_ms: start_ms,
        }
    }

    /// Accounts the bytes held from the last change until `now_ms`.
    fn settle(&mut self, now_ms: u64) {
        self.area += u128::from(self.used) * u128::from(now_ms.saturating_sub(self.since_ms));
        self.since_ms = now_ms;
    }

    fn lru_age_seconds(&self, now_ms: u64) -> u64 {
        self.by_last_use.first().map_or(0, |(t, _)| now_ms.saturating_sub(*t) / 1000)
    }

    fn use_model(&mut self, model: u32, now_ms: u64) {
        let Some(i) = self.slot[model as usize] else { return };
        let r = &mut self.residents[i as usize];
        self.by_last_use.remove(&(r.last_used_ms, model));
        if self.gdsf {
            self.by_priority.remove(&r.priority_key());
        }
        r.last_used_ms = now_ms;
        r.uses += 1;
        r.clock_at_use = self.clock;
        self.by_last_use.insert((now_ms, model));
        if self.gdsf {
            self.by_priority.insert(r.priority_key());
        }
    }

    fn add(&mut self, resident: Resident) {
        self.slot[resident.model as usize] = Some(self.residents.len() as u32);
        self.by_last_use.insert((resident.last_used_ms, resident.model));
        if self.gdsf {
            self.by_priority.insert(resident.priority_key());
        }
        self.used += resident.size_bytes;
        self.peak = self.peak.max(self.used);
        self.residents.push(resident);
    }

    /// What the pod publishes under GDSF: its first [`eviction::PUBLISHED_VICTIMS`] victims, as
    /// [`eviction::cheapest`] lists them for the real cache (here read off the kept order).
    fn cheapest_victims(&self, now_ms: u64, rules: Rules, into: &mut Vec<Victim>) {
        into.clear();
        let evictable = self
            .by_priority
            .iter()
            .filter_map(|&(_, _, model)| self.slot[model as usize].map(|i| &self.residents[i as usize]))
            .filter(|r| Duration::from_millis(now_ms - r.loaded_ms) >= rules.min_residence)
            .take(eviction::PUBLISHED_VICTIMS);
        into.extend(evictable.map(|r| Victim { priority: r.priority(), size_bytes: r.size_bytes }));
    }

    fn remove(&mut self, model: u32) -> Option<u64> {
        let i = self.slot[model as usize].take()? as usize;
        let gone = self.residents.swap_remove(i);
        if let Some(moved) = self.residents.get(i) {
            self.slot[moved.model as usize] = Some(i as u32);
        }
        self.by_last_use.remove(&(gone.last_used_ms, model));
        if self.gdsf {
            self.by_priority.remove(&gone.priority_key());
        }
        self.used -= gone.size_bytes;
        Some(gone.size_bytes)
    }
}

/// Replays `trace` on `cluster`.
pub fn run(trace: &Trace, cluster: &Cluster) -> Result<Report, ClusterError> {
    if cluster.pods == 0 {
        return Err(ClusterError::NoPods);
    }
    if cluster.capacity_bytes == 0 {
        return Err(ClusterError::NoCapacity);
    }
    let requests = trace.requests();
    let start_ms = requests.first().map_or(0, |r| r.time_ms);
    let end_ms = requests.last().map_or(0, |r| r.time_ms);
    let models = trace.models().len();
    let names: Vec<String> = (0..cluster.pods).map(|i| format!("pod-{i}")).collect();
    let mut pods: Vec<Pod> = (0..cluster.pods).map(|_| Pod::new(models, start_ms, cluster.policy)).collect();
    let mut view: Vec<LoadCandidate> = names
        .iter()
        .map(|name| LoadCandidate {
            instance: name.clone(),
            capacity_bytes: cluster.capacity_bytes,
            used_bytes: 0,
            loading: 0,
            lru_age_seconds: 0,
            coldest_model: None,
            cheapest_victims: None,
            draining: false,
            offers_type: true,
            retry_after_ms: None,
            gpu: Default::default(),
        })
        .collect();
    // Pods holding each model (few: one, unless a model was loaded twice).
    let mut holders: Vec<Vec<u32>> = vec![Vec::new(); models];
    let rules = Rules { min_residence: cluster.min_residence };
    let mut rng = SplitMix64::new(cluster.seed);
    let mut copies: Vec<CopyOn> = Vec::new();
    let mut candidates: Vec<Candidate<u32>> = Vec::new();
    let mut added_ms: Vec<u64> = Vec::new();
    let mut report = Report {
        pods: cluster.pods,
        capacity_bytes: cluster.capacity_bytes,
        policy: cluster.policy.to_string(),
        requests: requests.len() as u64,
        hits: 0,
        forwarded: 0,
        loads: 0,
        evictions: 0,
        refused: 0,
        refusals: Refusals::default(),
        hit_rate: 0.0,
        byte_miss_ratio: 0.0,
        duration_ms: end_ms - start_ms,
        loads_per_second: None,
        etcd_writes: 0,
        etcd_writes_per_second: None,
        peak_bytes_per_pod: Vec::new(),
        mean_bytes_per_pod: Vec::new(),
        copies_held: 0,
        models_on_several_pods: 0,
        added_p99_ms: 0,
        added_mean_ms: 0.0,
    };
    let (mut bytes_asked, mut bytes_missed) = (0u128, 0u128);
    let pod_index = |name: &str| names.iter().position(|n| n == name);
    for request in requests {
        let now = request.time_ms;
        let model = request.model;
        let arrival = rng.below(cluster.pods);
        bytes_asked += u128::from(request.size_bytes);
        // Victims matter only to a load, so they are listed only for a model no pod holds.
        let may_load = holders[model as usize].is_empty();
        for (candidate, pod) in view.iter_mut().zip(&pods) {
            candidate.used_bytes = pod.used;
            candidate.lru_age_seconds = pod.lru_age_seconds(now);
            if pod.gdsf && may_load {
                pod.cheapest_victims(now, rules, candidate.cheapest_victims.get_or_insert_with(Vec::new));
            }
        }
        copies.clear();
        copies.extend(holders[model as usize].iter().map(|&p| CopyOn {
            instance: names[p as usize].clone(),
            copy: Copy::Loaded { in_flight: 0, failed_recently: false },
        }));
        let decision = route(&RouteInput {
            this: &names[arrival],
            goal: Goal::Serve,
            pods: &view,
            model_type: None,
            copies: &copies,
            exclude: &[],
            predicted_bytes: request.size_bytes,
            now_ms: now,
            anti_churn_age: cluster.anti_churn_age,
            gpu: None,
        });
        let (target, load) = match decision {
            Route::Here => (Some(arrival), false),
            Route::Copy(peer) | Route::WaitFor(peer) => (pod_index(&peer), false),
            Route::LoadHere => (Some(arrival), true),
            Route::LoadOn(peer) => (pod_index(&peer), true),
            Route::Refuse(refusal) => {
                match refusal {
                    Refusal::TooLarge { .. } => report.refusals.too_large += 1,
                    Refusal::WouldEvictRecent { .. } => report.refusals.would_evict_recent += 1,
                    Refusal::NoPod | Refusal::NoPodOffers { .. } | Refusal::NoGpu { .. } => {
                        report.refusals.no_pod += 1
                    }
                }
                (None, false)
            }
        };
        let Some(target) = target else {
            report.refused += 1;
            bytes_missed += u128::from(request.size_bytes);
            continue;
        };
        if target != arrival {
            report.forwarded += 1;
        }
        let pod = &mut pods[target];
        if !load {
            report.hits += 1;
            pod.use_model(model, now);
            continue;
        }
        bytes_missed += u128::from(request.size_bytes);
        let needed = (pod.used + request.size_bytes).saturating_sub(cluster.capacity_bytes);
        if needed > 0 {
            candidates.clear();
            candidates.extend(pod.residents.iter().map(|r| Candidate {
                id: r.model,
                size_bytes: r.size_bytes,
                in_flight: 0,
                resident_for: Duration::from_millis(now - r.loaded_ms),
                idle_for: Duration::from_millis(now - r.last_used_ms),
                uses: r.uses,
                reload_cost: r.reload_cost,
                clock_at_use: r.clock_at_use,
            }));
            match eviction::victims(&candidates, needed, cluster.policy, rules, pod.clock) {
                Ok(decided) => {
                    pod.settle(now);
                    pod.clock = decided.clock;
                    for victim in decided.victims {
                        pod.remove(victim);
                        holders[victim as usize].retain(|&p| p as usize != target);
                        report.evictions += 1;
                        report.etcd_writes += 1;
                    }
                }
                Err(_) => {
                    report.refused += 1;
                    report.refusals.no_room += 1;
                    continue;
                }
            }
        }
        pod.settle(now);
        let load_time = request.load_time();
        let clock = pod.clock;
        pod.add(Resident {
            model,
            size_bytes: request.size_bytes,
            loaded_ms: now,
            last_used_ms: now,
            uses: 1,
            reload_cost: load_time,
            clock_at_use: clock,
        });
        holders[model as usize].push(target as u32);
        report.loads += 1;
        report.etcd_writes += 2;
        added_ms.push(load_time.as_millis() as u64);
    }
    let seconds = report.duration_ms as f64 / 1000.0;
    let per_second = |n: u64| (report.duration_ms > 0).then(|| n as f64 / seconds);
    report.hit_rate = ratio(report.hits as u128, report.requests as u128);
    report.byte_miss_ratio = ratio(bytes_missed, bytes_asked);
    report.loads_per_second = per_second(report.loads);
    report.etcd_writes_per_second = per_second(report.etcd_writes);
    for pod in &mut pods {
        pod.settle(end_ms);
        report.peak_bytes_per_pod.push(pod.peak);
        let mean =
            if report.duration_ms > 0 { pod.area / u128::from(report.duration_ms) } else { pod.used.into() };
        report.mean_bytes_per_pod.push(u64::try_from(mean).unwrap_or(u64::MAX));
        report.copies_held += pod.residents.len() as u64;
    }
    report.models_on_several_pods = holders.iter().filter(|h| h.len() > 1).count() as u64;
    report.added_mean_ms = ratio(added_ms.iter().map(|&ms| u128::from(ms)).sum(), report.requests as u128);
    report.added_p99_ms = percentile_with_zeros(&mut added_ms, report.requests, 0.99);
    Ok(report)
}

fn ratio(part: u128, whole: u128) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// The `q` quantile (nearest rank) of `total` values: `nonzero` plus zeros for the rest.
fn percentile_with_zeros(nonzero: &mut [u64], total: u64, q: f64) -> u64 {
    if total == 0 {
        return 0;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let zeros = total - nonzero.len() as u64;
    if rank <= zeros {
        return 0;
    }
    nonzero.sort_unstable();
    nonzero[(rank - zeros - 1) as usize]
}
