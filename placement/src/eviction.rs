//! What to evict from one pod's model cache to make room for a load.
//!
//! Rules every policy keeps: never a model with requests in flight (its lease is held), never a model
//! loaded more recently than the minimum residence (so a burst of loads cannot thrash), and evict just
//! enough: stop as soon as the freed bytes cover the need, so one load never empties a cache.
//!
//! Two policies, chosen by name (`lru`, `gdsf`):
//! - **LRU**: the longest idle model goes first (ModelMesh's behaviour).
//! - **GDSF** (Greedy-Dual-Size-Frequency): each model has a priority `clock + uses² × reload cost ÷
//!   size` (frequency squared: see [`FREQUENCY_EXPONENT`]), set when it is last used, and the lowest goes first. A model that is cheap to load again
//!   per byte it frees, or rarely used, goes before a popular one that is slow to load. The cache's
//!   [`Clock`] rises to the priority of every model it evicts, so a model that was popular long ago
//!   but idle since sinks below models used now (aging), instead of holding its place forever as
//!   plain frequency counting would.
//!
//! A pod under GDSF also publishes its [`cheapest`] models to evict, so placement can send a load to
//! the pod where making room costs least ([`priority_to_free`]) rather than to the one with the
//! oldest LRU model: LRU age says nothing about what GDSF would evict.
//!
//! The node's cache and `meshctl simulate` call these same functions, so the simulator's figures are
//! the policy's, not a model of it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ModelId;

/// One resident model, as eviction sees it. `Id` is whatever names a model for the caller: the cache
/// uses [`ModelId`], the simulator a plain index (no string per candidate on a hot loop).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<Id = ModelId> {
    pub id: Id,
    /// Bytes its eviction would free (what capacity is charged for it).
    pub size_bytes: u64,
    /// Requests holding a lease on it right now.
    pub in_flight: usize,
    /// Time since its load finished.
    pub resident_for: Duration,
    /// Time since a request last used it.
    pub idle_for: Duration,
    /// Requests it served since it was loaded here (GDSF's frequency; LRU ignores it).
    pub uses: u64,
    /// What loading it again would cost, from [`reload_cost`] (GDSF; LRU ignores it).
    pub reload_cost: Duration,
    /// The cache's [`Clock`] when it was last used (GDSF; LRU ignores it).
    pub clock_at_use: Clock,
}

/// Limits every policy respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// A model younger than this is never evicted.
    pub min_residence: Duration,
}

impl Rules {
    /// Whether these rules let `candidate` go: no request is on it and it has been resident long enough.
    pub fn allow<Id>(&self, candidate: &Candidate<Id>) -> bool {
        candidate.in_flight == 0 && candidate.resident_for >= self.min_residence
    }
}

/// Which models go first. A named, swappable choice; LRU is ModelMesh's behaviour and the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Longest idle first (`lru`).
    #[default]
    LeastRecentlyUsed,
    /// Lowest `clock + uses² × reload cost ÷ size` first (`gdsf`).
    GreedyDualSizeFrequency,
}

impl Policy {
    /// Every policy, for help texts and sweeps.
    pub const ALL: [Policy; 2] = [Policy::LeastRecentlyUsed, Policy::GreedyDualSizeFrequency];

    /// The name operators write (`--eviction lru`).
    pub fn name(self) -> &'static str {
        match self {
            Policy::LeastRecentlyUsed => "lru",
            Policy::GreedyDualSizeFrequency => "gdsf",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name that is none of [`Policy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy {0:?}; use lru or gdsf")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// GDSF's aging clock for one cache: it starts at zero and rises to the priority of each model
/// evicted, so priorities set later start from where the evicted ones ended.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Clock(pub f64);

/// Estimated load time when nothing was measured: a fixed part (finding the files, building a
/// session) that every model pays, plus its bytes at a typical read-and-build rate. The fixed part
/// is what makes GDSF favour small models: with a cost strictly proportional to size, cost ÷ size is
/// the same for every model and GDSF degenerates to frequency counting. On the synthetic trace (one
/// cache of 10% of the bytes, frequency to the power 1) that gave a hit rate of 0.69 where this
/// estimate gave 0.72; the 20 MB at which the two parts are equal is the trace's median size.
pub const ESTIMATED_LOAD_OVERHEAD: Duration = Duration::from_millis(100);
/// The rate part of the estimate, bytes per second.
pub const ESTIMATED_LOAD_BYTES_PER_SECOND: u64 = 200_000_000;

/// What loading a model again costs: its measured (or declared) load time when known, else the
/// estimate from its size ([`ESTIMATED_LOAD_OVERHEAD`] plus its bytes at
/// [`ESTIMATED_LOAD_BYTES_PER_SECOND`]). A measured zero counts as unknown: no real load takes no
/// time, only a clock that did not move (paused test time) reads it.
pub fn reload_cost(load_time: Option<Duration>, size_bytes: u64) -> Duration {
    load_time.filter(|t| !t.is_zero()).unwrap_or_else(|| {
        ESTIMATED_LOAD_OVERHEAD
            + Duration::from_secs_f64(size_bytes as f64 / ESTIMATED_LOAD_BYTES_PER_SECOND as f64)
    })
}

/// How strongly GDSF weighs frequency: priorities grow with `uses` to this power. Squared, a model
/// used twice as often is worth keeping at four times the reload cost per byte. On the synthetic
/// Zipf trace (`meshctl simulate --generate`, 10% of the bytes) this beat the textbook 1 on both
/// counts: hit rate about +0.02 and byte-miss ratio about -0.02 (bench/README.md, capacity
/// simulator). The price is slower adaptation when popularity shifts; the clock still ages out a
/// model that stops being used.
pub const FREQUENCY_EXPONENT: i32 = 2;

/// A model's GDSF priority: `clock at its last use + uses^FREQUENCY_EXPONENT × reload cost (ms) ÷
/// size (MiB)`. The units only scale every priority alike; a size of zero counts as one byte.
pub fn gdsf_priority(clock_at_use: Clock, uses: u64, reload_cost: Duration, size_bytes: u64) -> f64 {
    let mib = size_bytes.max(1) as f64 / (1u64 << 20) as f64;
    let frequency = (uses.max(1) as f64).powi(FREQUENCY_EXPONENT);
    clock_at_use.0 + frequency * (reload_cost.as_secs_f64() * 1000.0) / mib
}

impl<Id> Candidate<Id> {
    /// Its GDSF priority ([`gdsf_priority`] of its fields).
    pub fn priority(&self) -> f64 {
        gdsf_priority(self.clock_at_use, self.uses, self.reload_cost, self.size_bytes)
    }
}

/// What to evict, and the clock once it is gone.
#[derive(Debug, Clone, PartialEq)]
pub struct Eviction<Id = ModelId> {
    /// The models to evict, in order.
    pub victims: Vec<Id>,
    /// The cache's clock after evicting them: the highest of the clock before and their priorities.
    pub clock: Clock,
}

/// Not enough can be evicted: what could be freed, against what was needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "only {evictable_bytes} bytes can be freed ({pinned} models are in use or too recently loaded) but {needed_bytes} are needed"
)]
pub struct Shortfall {
    pub needed_bytes: u64,
    pub evictable_bytes: u64,
    pub pinned: usize,
}

/// Orders `f64`s as integers, so priorities can sit in integer sort keys (`total_cmp`'s order).
pub(crate) fn ordered_bits(x: f64) -> u64 {
    let bits = x.to_bits();
    if bits >> 63 == 1 { !bits } else { bits | (1 << 63) }
}

/// The models to evict, in `policy`'s order, to free at least `needed_bytes` (none when nothing is
/// needed), and `clock` after them. Ties go to the longer idle model, then to the caller's order.
///
/// It selects with a heap rather than sorting every candidate: a load usually evicts one or two
/// models out of hundreds, and the simulator asks this once per miss.
pub fn victims<Id: Clone>(
    candidates: &[Candidate<Id>],
    needed_bytes: u64,
    policy: Policy,
    rules: Rules,
    clock: Clock,
) -> Result<Eviction<Id>, Shortfall> {
    if needed_bytes == 0 {
        return Ok(Eviction { victims: Vec::new(), clock });
    }
    let evictable = |c: &Candidate<Id>| rules.allow(c);
    let idle_key = |c: &Candidate<Id>| u64::MAX - u64::try_from(c.idle_for.as_nanos()).unwrap_or(u64::MAX);
    let keyed: Vec<Reverse<(u64, u64, usize)>> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| evictable(c))
        .map(|(i, c)| {
            let primary = match policy {
                Policy::LeastRecentlyUsed => idle_key(c),
                Policy::GreedyDualSizeFrequency => ordered_bits(c.priority()),
            };
            Reverse((primary, idle_key(c), i))
        })
        .collect();
    let evictable_count = keyed.len();
    let mut order = BinaryHeap::from(keyed);
    let mut freed = 0u64;
    let mut chosen = Vec::new();
    let mut clock = clock;
    while freed < needed_bytes {
        let Some(Reverse((_, _, i))) = order.pop() else { break };
        let candidate = &candidates[i];
        freed = freed.saturating_add(candidate.size_bytes);
        clock = Clock(clock.0.max(candidate.priority()));
        chosen.push(candidate.id.clone());
    }
    if freed >= needed_bytes {
        Ok(Eviction { victims: chosen, clock })
    } else {
        Err(Shortfall { needed_bytes, evictable_bytes: freed, pinned: candidates.len() - evictable_count })
    }
}

/// One of a pod's cheapest models to evict under GDSF, as its instance record publishes it: enough
/// for placement to tell what making room there would cost, without the models' names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Victim {
    /// Its GDSF priority: the pod's clock rises to it if it is evicted.
    pub priority: f64,
    pub size_bytes: u64,
}

// Equal when bit for bit equal, so records (which derive `Eq`) can hold victims.
impl PartialEq for Victim {
    fn eq(&self, other: &Self) -> bool {
        self.priority.to_bits() == other.priority.to_bits() && self.size_bytes == other.size_bytes
    }
}

impl Eq for Victim {}

/// How many victims a pod publishes: enough to make room for a large model even when the cheapest
/// victims are small (a load needing more ranks the pod after every pod whose victims cover it).
/// On the synthetic trace (`meshctl simulate --generate --capacity 10%`, 3 pods, trace seeds 1-3)
/// 32 chose as well as the whole list would; 16 lost up to 0.005 of hit rate.
pub const PUBLISHED_VICTIMS: usize = 32;

/// The first `limit` models GDSF would evict (lowest priority first, ties to the longer idle, as
/// [`victims`] orders them), skipping those the rules pin.
pub fn cheapest<Id>(candidates: &[Candidate<Id>], rules: Rules, limit: usize) -> Vec<Victim> {
    let evictable = |c: &&Candidate<Id>| rules.allow(c);
    let mut keyed: Vec<(u64, Reverse<Duration>, Victim)> = candidates
        .iter()
        .filter(evictable)
        .map(|c| {
            (
                ordered_bits(c.priority()),
                Reverse(c.idle_for),
                Victim { priority: c.priority(), size_bytes: c.size_bytes },
            )
        })
        .collect();
    let by_order = |a: &(u64, Reverse<Duration>, Victim), b: &(u64, Reverse<Duration>, Victim)| {
        (a.0, a.1).cmp(&(b.0, b.1))
    };
    if keyed.len() > limit && limit > 0 {
        keyed.select_nth_unstable_by(limit - 1, by_order);
    }
    keyed.truncate(limit);
    keyed.sort_unstable_by(by_order);
    keyed.into_iter().map(|(_, _, v)| v).collect()
}

/// What freeing `needed_bytes` on a pod costs under GDSF: the priority of the last of its cheapest
/// `victims` (in order) that evicting needs, which is where the pod's clock would rise to. `None`
/// when they do not add up to `needed_bytes`; nothing when nothing is needed.
pub fn priority_to_free(victims: &[Victim], needed_bytes: u64) -> Option<f64> {
    if needed_bytes == 0 {
        return Some(f64::NEG_INFINITY);
    }
    let mut freed = 0u64;
    victims.iter().find_map(|v| {
        freed = freed.saturating_add(v.size_bytes);
        (freed >= needed_bytes).then_some(v.priority)
    })
}

#[cfg(test)]
mod tests;
