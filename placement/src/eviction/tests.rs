//! Eviction as tables of cases per policy, then properties over arbitrary caches.

use proptest::prelude::*;

use super::*;

const RULES: Rules = Rules { min_residence: Duration::from_secs(5) };
const LRU: Policy = Policy::LeastRecentlyUsed;
const GDSF: Policy = Policy::GreedyDualSizeFrequency;
const MIB: u64 = 1 << 20;

/// An idle, long-resident model used once, costing 100 ms to load again, last used at clock zero.
fn model(id: &str, size: u64, idle_s: u64) -> Candidate {
    Candidate {
        id: ModelId::new(id).unwrap(),
        size_bytes: size,
        in_flight: 0,
        resident_for: Duration::from_secs(600),
        idle_for: Duration::from_secs(idle_s),
        uses: 1,
        reload_cost: Duration::from_millis(100),
        clock_at_use: Clock(0.0),
    }
}

fn ids(v: &Eviction) -> Vec<&str> {
    v.victims.iter().map(ModelId::as_str).collect()
}

fn evict(c: &[Candidate], needed: u64, policy: Policy) -> Result<Eviction, Shortfall> {
    victims(c, needed, policy, RULES, Clock(0.0))
}

#[test]
fn lru_evicts_coldest_first_and_stops_when_enough() {
    let c = [model("warm", 10, 1), model("cold", 10, 100), model("tepid", 10, 50)];
    assert_eq!(ids(&evict(&c, 15, LRU).unwrap()), ["cold", "tepid"]);
    assert_eq!(ids(&evict(&c, 10, LRU).unwrap()), ["cold"]);
    assert!(evict(&c, 0, LRU).unwrap().victims.is_empty());
    // Equally idle: the caller's order.
    let c = [model("a", 10, 5), model("b", 10, 5)];
    assert_eq!(ids(&evict(&c, 10, LRU).unwrap()), ["a"]);
}

#[test]
fn never_evicts_models_in_use_or_just_loaded() {
    for policy in Policy::ALL {
        let mut busy = model("busy", 100, 1000);
        busy.in_flight = 1;
        let mut fresh = model("fresh", 100, 999);
        fresh.resident_for = Duration::from_secs(1);
        let c = [busy, fresh, model("idle", 10, 1)];
        assert_eq!(ids(&evict(&c, 10, policy).unwrap()), ["idle"], "{policy}");
        assert_eq!(
            evict(&c, 50, policy),
            Err(Shortfall { needed_bytes: 50, evictable_bytes: 10, pinned: 2 }),
            "{policy}"
        );
    }
}

#[test]
fn gdsf_keeps_what_is_used_often_slow_to_load_or_small() {
    let base = |id: &str| model(id, 10 * MIB, 1);
    let popular = Candidate { uses: 20, ..base("popular") };
    let slow = Candidate { reload_cost: Duration::from_secs(5), ..base("slow") };
    let small = Candidate { size_bytes: MIB, ..base("small") };
    let plain = base("plain");
    let c = [popular, slow, small, plain];
    // Each of the three beats the plain one on one count; the plain one goes first, even though it
    // is the most recently used of all (LRU would take another).
    let c: Vec<Candidate> = c
        .into_iter()
        .enumerate()
        .map(|(i, m)| Candidate { idle_for: Duration::from_secs(10 - i as u64), ..m })
        .collect();
    assert_eq!(ids(&evict(&c, 1, GDSF).unwrap()), ["plain"]);
    assert_eq!(ids(&evict(&c, 1, LRU).unwrap()), ["popular"]);
    // The priorities, lowest first: plain 10, small 100, slow 500, popular 20² × 10 = 4,000 (ms per MiB).
    assert_eq!(ids(&evict(&c, 21 * MIB, GDSF).unwrap()), ["plain", "small", "slow"]);
}

#[test]
fn gdsf_clock_rises_to_each_victim_and_ages_out_old_favourites() {
    // Used 5 times long ago (clock 0 then): priority 5² × 100 ms ÷ 1 MiB = 2,500.
    let old = Candidate { uses: 5, ..model("old-favourite", MIB, 3600) };
    // Used once since the clock reached 6,000: priority 6,100.
    let new = Candidate { clock_at_use: Clock(6_000.0), ..model("new", MIB, 1) };
    let c = [new, old];
    let e = victims(&c, 1, GDSF, RULES, Clock(6_000.0)).unwrap();
    assert_eq!(ids(&e), ["old-favourite"]);
    assert_eq!(e.clock, Clock(6_000.0), "the clock never goes back");
    let e = victims(&c, 2 * MIB, GDSF, RULES, Clock(6_000.0)).unwrap();
    assert_eq!(ids(&e), ["old-favourite", "new"]);
    assert_eq!(e.clock, Clock(6_100.0), "it rises to the highest victim's priority");
    // Nothing needed: nothing evicted and the clock stays.
    assert_eq!(
        victims(&c, 0, GDSF, RULES, Clock(7.0)).unwrap(),
        Eviction { victims: vec![], clock: Clock(7.0) }
    );
}

#[test]
fn a_pod_publishes_its_cheapest_victims_and_what_freeing_bytes_costs() {
    // Priorities (ms per MiB): plain 10, small 100, slow 500; the pinned one would be cheapest.
    let pinned = Candidate { in_flight: 1, size_bytes: 10 * MIB, ..model("pinned", 10 * MIB, 99) };
    let slow = Candidate { reload_cost: Duration::from_secs(5), ..model("slow", 10 * MIB, 1) };
    let c = [slow, model("small", MIB, 1), pinned, model("plain", 10 * MIB, 1)];
    let published = cheapest(&c, RULES, 8);
    let prices: Vec<(f64, u64)> = published.iter().map(|v| (v.priority, v.size_bytes)).collect();
    assert_eq!(prices, [(10.0, 10 * MIB), (100.0, MIB), (500.0, 10 * MIB)], "in order, none pinned");
    assert_eq!(cheapest(&c, RULES, 2).len(), 2, "only the first `limit`");
    for (needed, cost) in [
        (1, Some(10.0)),
        (10 * MIB, Some(10.0)),
        (10 * MIB + 1, Some(100.0)),
        (11 * MIB + 1, Some(500.0)),
        (21 * MIB, Some(500.0)),
        (21 * MIB + 1, None),
    ] {
        assert_eq!(priority_to_free(&published, needed), cost, "needing {needed}");
    }
    assert_eq!(priority_to_free(&[], 1), None);
    assert_eq!(priority_to_free(&[], 0), Some(f64::NEG_INFINITY), "nothing needed costs nothing");
}

#[test]
fn reload_cost_is_measured_else_estimated_from_size() {
    assert_eq!(reload_cost(Some(Duration::from_millis(7)), 1 << 40), Duration::from_millis(7));
    assert_eq!(reload_cost(None, 0), ESTIMATED_LOAD_OVERHEAD);
    assert_eq!(reload_cost(Some(Duration::ZERO), 0), ESTIMATED_LOAD_OVERHEAD, "a clock that stood still");
    assert_eq!(reload_cost(None, 200_000_000), ESTIMATED_LOAD_OVERHEAD + Duration::from_secs(1));
    assert!(reload_cost(None, 30 * MIB) > reload_cost(None, 20 * MIB));
}

#[test]
fn policies_by_name() {
    for policy in Policy::ALL {
        assert_eq!(policy.name().parse::<Policy>(), Ok(policy));
        assert_eq!(policy.to_string(), policy.name());
    }
    assert_eq!(" GDSF ".parse::<Policy>(), Ok(GDSF));
    assert_eq!(Policy::default(), LRU);
    let unknown = "lfu".parse::<Policy>().unwrap_err();
    assert_eq!(unknown.to_string(), "unknown eviction policy \"lfu\"; use lru or gdsf");
}

#[test]
fn ordered_bits_keeps_the_order_of_floats() {
    let xs = [-1e9, -1.0, -0.0, 0.0, 1e-300, 1.0, 2.5, 1e300, f64::INFINITY];
    for pair in xs.windows(2) {
        assert!(ordered_bits(pair[0]) <= ordered_bits(pair[1]), "{pair:?}");
    }
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![Just(LRU), Just(GDSF)]
}

/// Caches of up to 20 models of mixed sizes, idle times, uses, costs and clocks, some in use and some
/// younger than the minimum residence.
fn arb_cache() -> impl Strategy<Value = Vec<Candidate<usize>>> {
    proptest::collection::vec(
        (1u64..1000, 0u64..100, 0usize..2, 0u64..20, 0u64..10, 1u64..2000, 0u64..1000),
        0..20,
    )
    .prop_map(|models| {
        models
            .into_iter()
            .enumerate()
            .map(|(i, (size, idle, busy, resident, uses, cost_ms, clock))| Candidate {
                id: i,
                size_bytes: size,
                in_flight: busy,
                resident_for: Duration::from_secs(resident),
                idle_for: Duration::from_secs(idle),
                uses,
                reload_cost: Duration::from_millis(cost_ms),
                clock_at_use: Clock(clock as f64),
            })
            .collect()
    })
}

proptest! {
    /// Whatever the policy: enough is freed, and no more than the last victim's worth extra; only
    /// evictable models go; a shortfall says exactly what could be freed and what is pinned.
    #[test]
    fn frees_enough_never_more_than_one_extra_model_and_only_evictable_ones(
        c in arb_cache(), needed in 0u64..5000, policy in arb_policy(),
    ) {
        let evictable = |m: &Candidate<usize>| m.in_flight == 0 && m.resident_for >= RULES.min_residence;
        match victims(&c, needed, policy, RULES, Clock(0.0)) {
            Ok(e) => {
                let chosen: Vec<&Candidate<usize>> = e.victims.iter().map(|i| &c[*i]).collect();
                let freed: u64 = chosen.iter().map(|m| m.size_bytes).sum();
                prop_assert!(freed >= needed);
                prop_assert!(chosen.iter().all(|m| evictable(m)));
                let mut seen = std::collections::HashSet::new();
                prop_assert!(e.victims.iter().all(|i| seen.insert(*i)), "a model chosen twice");
                if let Some(last) = chosen.last() {
                    prop_assert!(freed - last.size_bytes < needed, "evicted more than enough");
                }
            }
            Err(s) => {
                let free: u64 = c.iter().filter(|m| evictable(m)).map(|m| m.size_bytes).sum();
                prop_assert!(free < needed);
                prop_assert_eq!(s.evictable_bytes, free);
                prop_assert_eq!(s.pinned, c.iter().filter(|m| !evictable(m)).count());
            }
        }
    }

    /// The victims are the front of the policy's order: no model left behind ranks before one chosen
    /// (LRU: idle longer; GDSF: lower priority).
    #[test]
    fn victims_come_first_in_the_policys_order(
        c in arb_cache(), needed in 1u64..5000, policy in arb_policy(),
    ) {
        let evictable = |m: &Candidate<usize>| m.in_flight == 0 && m.resident_for >= RULES.min_residence;
        if let Ok(e) = victims(&c, needed, policy, RULES, Clock(0.0)) {
            let kept = c.iter().filter(|m| evictable(m) && !e.victims.contains(&m.id));
            for k in kept {
                for v in e.victims.iter().map(|i| &c[*i]) {
                    match policy {
                        Policy::LeastRecentlyUsed => prop_assert!(v.idle_for >= k.idle_for),
                        Policy::GreedyDualSizeFrequency => prop_assert!(v.priority() <= k.priority()),
                    }
                }
            }
        }
    }

    /// What a pod publishes is the front of GDSF's own order, and freeing bytes costs the priority
    /// that evicting them raises the clock to.
    #[test]
    fn published_victims_are_what_gdsf_would_evict(
        c in arb_cache(), needed in 1u64..5000, limit in 0usize..25,
    ) {
        let published = cheapest(&c, RULES, limit);
        let evictable: Vec<&Candidate<usize>> =
            c.iter().filter(|m| m.in_flight == 0 && m.resident_for >= RULES.min_residence).collect();
        prop_assert_eq!(published.len(), evictable.len().min(limit));
        let free: u64 = evictable.iter().map(|m| m.size_bytes).sum();
        if free > 0 {
            // Freeing everything evictable lists GDSF's whole order.
            let all = victims(&c, free, GDSF, RULES, Clock(0.0)).unwrap();
            let order: Vec<f64> = all.victims.iter().map(|i| c[*i].priority()).collect();
            let front: Vec<f64> = published.iter().map(|v| v.priority).collect();
            prop_assert_eq!(&order[..front.len()], &front[..]);
        }
        if let Some(cost) = priority_to_free(&published, needed) {
            prop_assert_eq!(Clock(cost), victims(&c, needed, GDSF, RULES, Clock(0.0)).unwrap().clock);
        }
    }

    /// The clock never falls, rises to at least every victim's priority, and to no more than the
    /// highest of them.
    #[test]
    fn the_clock_rises_to_the_victims_priorities(
        c in arb_cache(), needed in 0u64..5000, start in 0u64..3000, policy in arb_policy(),
    ) {
        let start = Clock(start as f64);
        if let Ok(e) = victims(&c, needed, policy, RULES, start) {
            prop_assert!(e.clock >= start);
            let highest = e.victims.iter().map(|i| c[*i].priority()).fold(start.0, f64::max);
            prop_assert_eq!(e.clock, Clock(highest));
        }
    }

    /// A use only raises a model's GDSF priority: more uses, a later clock, a slower reload or a
    /// smaller size never make it more evictable.
    #[test]
    fn gdsf_priority_grows_with_uses_clock_and_cost_and_falls_with_size(
        clock in 0u64..10_000, uses in 0u64..1000, cost_ms in 0u64..100_000, size in 1u64..(1 << 34),
    ) {
        let p = |clock: u64, uses: u64, cost_ms: u64, size: u64| {
            gdsf_priority(Clock(clock as f64), uses, Duration::from_millis(cost_ms), size)
        };
        let now = p(clock, uses, cost_ms, size);
        prop_assert!(now >= clock as f64);
        prop_assert!(p(clock + 1, uses, cost_ms, size) >= now);
        prop_assert!(p(clock, uses + 1, cost_ms, size) >= now);
        prop_assert!(p(clock, uses, cost_ms + 1, size) >= now);
        prop_assert!(p(clock, uses, cost_ms, size + 1) <= now);
    }
}
