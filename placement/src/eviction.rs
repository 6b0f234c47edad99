//! What to evict from one pod's model cache to make room for a load.
//!
//! Rules every policy keeps: never a model with requests in flight (its lease is held), never a model
//! loaded more recently than the minimum residence (so a burst of loads cannot thrash), and evict just
//! enough: stop as soon as the freed bytes cover the need, so one load never empties a cache.

use std::time::Duration;

use crate::ModelId;

/// One resident model, as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: ModelId,
    /// Bytes its eviction would free (what capacity is charged for it).
    pub size_bytes: u64,
    /// Requests holding a lease on it right now.
    pub in_flight: usize,
    /// Time since its load finished.
    pub resident_for: Duration,
    /// Time since a request last used it.
    pub idle_for: Duration,
}

/// Limits every policy respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// A model younger than this is never evicted.
    pub min_residence: Duration,
}

/// Which models go first. A named, swappable choice; LRU is ModelMesh's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Longest idle first.
    #[default]
    LeastRecentlyUsed,
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

/// The models to evict, in order, to free at least `needed_bytes`; empty when nothing is needed.
pub fn victims(
    candidates: &[Candidate],
    needed_bytes: u64,
    policy: Policy,
    rules: Rules,
) -> Result<Vec<ModelId>, Shortfall> {
    if needed_bytes == 0 {
        return Ok(Vec::new());
    }
    let evictable = |c: &&Candidate| c.in_flight == 0 && c.resident_for >= rules.min_residence;
    let mut order: Vec<&Candidate> = candidates.iter().filter(evictable).collect();
    match policy {
        // Stable, so equally idle models keep the caller's (recency) order.
        Policy::LeastRecentlyUsed => order.sort_by_key(|c| std::cmp::Reverse(c.idle_for)),
    }
    let mut freed = 0u64;
    let mut chosen = Vec::new();
    for candidate in order {
        if freed >= needed_bytes {
            break;
        }
        freed = freed.saturating_add(candidate.size_bytes);
        chosen.push(candidate.id.clone());
    }
    if freed >= needed_bytes {
        Ok(chosen)
    } else {
        Err(Shortfall {
            needed_bytes,
            evictable_bytes: freed,
            pinned: candidates.iter().filter(|c| !evictable(c)).count(),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const RULES: Rules = Rules { min_residence: Duration::from_secs(5) };

    fn model(id: &str, size: u64, idle_s: u64) -> Candidate {
        Candidate {
            id: ModelId::new(id).unwrap(),
            size_bytes: size,
            in_flight: 0,
            resident_for: Duration::from_secs(600),
            idle_for: Duration::from_secs(idle_s),
        }
    }

    fn ids(v: &[ModelId]) -> Vec<&str> {
        v.iter().map(ModelId::as_str).collect()
    }

    #[test]
    fn evicts_coldest_first_and_stops_when_enough() {
        let c = [model("warm", 10, 1), model("cold", 10, 100), model("tepid", 10, 50)];
        let v = victims(&c, 15, Policy::LeastRecentlyUsed, RULES).unwrap();
        assert_eq!(ids(&v), ["cold", "tepid"]);
        let v = victims(&c, 10, Policy::LeastRecentlyUsed, RULES).unwrap();
        assert_eq!(ids(&v), ["cold"]);
        assert!(victims(&c, 0, Policy::LeastRecentlyUsed, RULES).unwrap().is_empty());
    }

    #[test]
    fn never_evicts_models_in_use_or_just_loaded() {
        let mut busy = model("busy", 100, 1000);
        busy.in_flight = 1;
        let mut fresh = model("fresh", 100, 999);
        fresh.resident_for = Duration::from_secs(1);
        let c = [busy, fresh, model("idle", 10, 1)];
        assert_eq!(ids(&victims(&c, 10, Policy::LeastRecentlyUsed, RULES).unwrap()), ["idle"]);
        assert_eq!(
            victims(&c, 50, Policy::LeastRecentlyUsed, RULES),
            Err(Shortfall { needed_bytes: 50, evictable_bytes: 10, pinned: 2 })
        );
    }

    proptest! {
        #[test]
        fn frees_enough_and_never_more_than_one_extra_model(
            sizes in proptest::collection::vec((1u64..1000, 0u64..100, 0usize..2), 0..20),
            needed in 0u64..5000,
        ) {
            let c: Vec<Candidate> = sizes.iter().enumerate().map(|(i, (size, idle, busy))| {
                let mut m = model(&format!("m{i}"), *size, *idle);
                m.in_flight = *busy;
                m
            }).collect();
            match victims(&c, needed, Policy::LeastRecentlyUsed, RULES) {
                Ok(v) => {
                    let chosen: Vec<&Candidate> = v.iter().map(|id| c.iter().find(|m| &m.id == id).unwrap()).collect();
                    let freed: u64 = chosen.iter().map(|m| m.size_bytes).sum();
                    prop_assert!(freed >= needed);
                    prop_assert!(chosen.iter().all(|m| m.in_flight == 0));
                    if let Some(last) = chosen.last() {
                        prop_assert!(freed - last.size_bytes < needed, "evicted more than enough");
                    }
                }
                Err(s) => {
                    let free: u64 = c.iter().filter(|m| m.in_flight == 0).map(|m| m.size_bytes).sum();
                    prop_assert!(free < needed);
                    prop_assert_eq!(s.evictable_bytes, free);
                }
            }
        }
    }
}
