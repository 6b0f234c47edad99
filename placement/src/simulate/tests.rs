//! The simulator on small hand-made traces with known answers, the trace reader's errors, and
//! properties: one pod of equal models is a textbook LRU; no pod ever holds more than its capacity.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::*;

fn trace(lines: &[(u64, &str, u64)]) -> Trace {
    let mut t = Trace::default();
    for (time, model, size) in lines {
        t.push(*time, model, *size, None).unwrap();
    }
    t
}

fn cluster(pods: usize, capacity: u64, policy: Policy) -> Cluster {
    Cluster {
        pods,
        capacity_bytes: capacity,
        policy,
        min_residence: Duration::ZERO,
        anti_churn_age: Duration::ZERO,
        seed: 7,
    }
}

/// Requests one second apart, each model of `size` bytes.
fn sequence(models: &str, size: u64) -> Trace {
    let names: Vec<String> = models.chars().map(String::from).collect();
    let lines: Vec<(u64, &str, u64)> =
        names.iter().enumerate().map(|(i, m)| (i as u64 * 1000, m.as_str(), size)).collect();
    trace(&lines)
}

#[test]
fn one_pod_lru_by_hand() {
    // Room for two: a b (loads) a (hit) c (evicts b) a (hit) b (evicts c, used before a).
    let r = run(&sequence("abacab", 10), &cluster(1, 20, Policy::LeastRecentlyUsed)).unwrap();
    assert_eq!((r.requests, r.hits, r.loads, r.evictions, r.refused), (6, 2, 4, 2, 0));
    assert_eq!(r.etcd_writes, 4 * 2 + 2, "Loading and Loaded per load, a delete per eviction");
    assert!((r.hit_rate - 2.0 / 6.0).abs() < 1e-12);
    assert!((r.byte_miss_ratio - 4.0 / 6.0).abs() < 1e-12);
    assert_eq!((r.forwarded, r.copies_held, r.peak_bytes_per_pod.as_slice()), (0, 2, &[20][..]));
    assert_eq!(r.loads_per_second, Some(4.0 / 5.0));
}

#[test]
fn gdsf_keeps_the_popular_model_lru_lets_go() {
    // a three times, then b and c: LRU evicts a (least recent) for c and loads it again; GDSF evicts b.
    let t = sequence("aaabca", 10);
    let lru = run(&t, &cluster(1, 20, Policy::LeastRecentlyUsed)).unwrap();
    let gdsf = run(&t, &cluster(1, 20, Policy::GreedyDualSizeFrequency)).unwrap();
    assert_eq!((lru.hits, lru.loads), (2, 4));
    assert_eq!((gdsf.hits, gdsf.loads), (3, 3));
}

#[test]
fn gdsf_lets_a_big_model_go_before_small_ones_lru_would_evict() {
    // Room for 90 bytes: three small models and a big one, used last; a fourth small one needs room.
    // LRU evicts the least recent small one and then misses on every small one in turn; GDSF evicts
    // the big one (it frees the most bytes per millisecond of reload) and keeps serving the small ones.
    let t = trace(&[
        (0, "s1", 10),
        (1, "s2", 10),
        (2, "s3", 10),
        (3, "big", 60),
        (4, "s4", 10),
        (5, "s1", 10),
        (6, "s2", 10),
        (7, "s3", 10),
    ]);
    let gdsf = run(&t, &cluster(1, 90, Policy::GreedyDualSizeFrequency)).unwrap();
    assert_eq!((gdsf.hits, gdsf.evictions), (3, 1));
    let lru = run(&t, &cluster(1, 90, Policy::LeastRecentlyUsed)).unwrap();
    assert_eq!(lru.hits, 0);
}

#[test]
fn pods_share_every_copy_through_forwarding() {
    // Room for everything: each model loads once, on some pod, and serves every other request.
    let t = sequence("abcabcabcaaab", 10);
    let r = run(&t, &cluster(3, 1000, Policy::LeastRecentlyUsed)).unwrap();
    assert_eq!((r.loads, r.hits, r.evictions), (3, 10, 0));
    assert_eq!((r.copies_held, r.models_on_several_pods), (3, 0));
    assert!(r.forwarded > 0, "requests arriving at pods without the model take a hop");
    // Least-used first: the three models land on three different pods.
    assert!(r.peak_bytes_per_pod.iter().all(|&b| b == 10), "{:?}", r.peak_bytes_per_pod);
}

#[test]
fn refusals_are_misses_that_load_nothing() {
    let t = trace(&[(0, "huge", 500), (1, "a", 10), (2, "huge", 500)]);
    let r = run(&t, &cluster(2, 100, Policy::LeastRecentlyUsed)).unwrap();
    assert_eq!((r.refused, r.refusals.too_large, r.loads, r.hits), (2, 2, 1, 0));
    assert!((r.byte_miss_ratio - 1.0).abs() < 1e-12);
    // Minimum residence: nothing may go yet, so there is no room.
    let young =
        Cluster { min_residence: Duration::from_secs(60), ..cluster(1, 10, Policy::LeastRecentlyUsed) };
    let r = run(&sequence("ab", 10), &young).unwrap();
    assert_eq!((r.loads, r.refused, r.refusals.no_room), (1, 1, 1));
    // Anti-churn: b would evict a, used a second ago.
    let churn =
        Cluster { anti_churn_age: Duration::from_secs(600), ..cluster(1, 10, Policy::LeastRecentlyUsed) };
    let r = run(&sequence("ab", 10), &churn).unwrap();
    assert_eq!((r.loads, r.refusals.would_evict_recent), (1, 1));
}

#[test]
fn memory_is_peak_and_time_weighted_mean() {
    // a (10 bytes) from 0 ms, b (10 more) from 500 ms, to 1000 ms: a mean of 15, a peak of 20.
    let t = trace(&[(0, "a", 10), (500, "b", 10), (1000, "a", 10)]);
    let r = run(&t, &cluster(1, 100, Policy::LeastRecentlyUsed)).unwrap();
    assert_eq!((r.peak_bytes_per_pod[0], r.mean_bytes_per_pod[0]), (20, 15));
}

#[test]
fn added_latency_is_the_loads_time_at_the_99th_percentile() {
    let mut t = Trace::default();
    t.push(0, "a", 10, Some(50)).unwrap();
    t.push(1, "b", 10, Some(70)).unwrap();
    for i in 0..98 {
        t.push(2 + i, if i % 2 == 0 { "a" } else { "b" }, 10, Some(50)).unwrap();
    }
    let r = run(&t, &cluster(1, 100, Policy::LeastRecentlyUsed)).unwrap();
    assert_eq!((r.requests, r.loads), (100, 2));
    // 98 requests add nothing; the 99th of 100 is the faster load.
    assert_eq!(r.added_p99_ms, 50);
    assert!((r.added_mean_ms - 1.2).abs() < 1e-12);
    // Without load_ms the estimate from the size is used.
    let r = run(&sequence("a", 200_000_000), &cluster(1, 1 << 30, Policy::LeastRecentlyUsed)).unwrap();
    assert_eq!(r.added_p99_ms, 1100);
}

#[test]
fn an_impossible_cluster_is_an_error() {
    let t = sequence("a", 1);
    assert_eq!(run(&t, &cluster(0, 10, Policy::LeastRecentlyUsed)), Err(ClusterError::NoPods));
    assert_eq!(run(&t, &cluster(1, 0, Policy::LeastRecentlyUsed)), Err(ClusterError::NoCapacity));
}

#[test]
fn traces_read_csv_and_json_lines_with_their_errors_naming_the_line() {
    let text = "# exported by cluster_hit_rate.py\ntime_ms,model_id,size_bytes,load_ms\n0,a,10\n\n5,b,20,30\n\
                {\"time_ms\": 7, \"model_id\": \"a\", \"size_bytes\": 10, \"load_ms\": 4}\n9,c,5,\n";
    let t = Trace::read(text.as_bytes()).unwrap();
    assert_eq!(t.models(), ["a", "b", "c"]);
    let loads: Vec<Option<u32>> = t.requests().iter().map(|r| r.load_ms).collect();
    assert_eq!(loads, [None, Some(30), Some(4), None]);
    assert_eq!(t.requests()[1], Request { time_ms: 5, model: 1, size_bytes: 20, load_ms: Some(30) });
    assert_eq!(t.model_bytes(), 35);
    let mut csv = Vec::new();
    t.write_csv(&mut csv).unwrap();
    assert_eq!(Trace::read(csv.as_slice()).unwrap(), t, "CSV written reads back the same");

    let error = |text: &str| Trace::read(text.as_bytes()).unwrap_err().to_string();
    assert!(error("0,a,10\n1,b,ten\n").starts_with("line 2: size_bytes \"ten\" is not a whole number"));
    assert!(error("0,a\n").starts_with("line 1: 2 fields"));
    assert!(error("0,a,1\n{\"time_ms\": 1}\n").starts_with("line 2: missing field"));
    assert!(error("0,a,1\n1,,1\n").starts_with("line 2: the model id is empty"));
    assert!(error("0,a,1\n1,b,1,soon\n").starts_with("line 2: load_ms \"soon\""));
    assert_eq!(
        error("5,a,1\n# later\n4,b,1\n"),
        "line 3: time 4 ms is before the previous request's 5 ms; sort the trace by time"
    );
    assert_eq!(error("# nothing\n"), "the trace has no requests");
    // A header is only skipped as the first line: later, it is a malformed line.
    assert!(error("0,a,1\ntime_ms,model_id,size_bytes\n").starts_with("line 2: time_ms"));
}

#[test]
fn the_synthetic_trace_follows_its_seed() {
    let spec = Synthetic { models: 200, requests: 20_000, ..Synthetic::default() };
    let t = spec.generate();
    assert_eq!(t, spec.generate(), "same seed, same trace");
    assert_ne!(t, Synthetic { seed: 2, ..spec.clone() }.generate());
    assert_eq!(t.requests().len(), 20_000);
    assert!(t.requests().windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    // Zipf 1.0 over 200 models: the first takes 1/H(200) ≈ 17% of requests, ten times the tenth's share.
    let count = |name: &str| {
        let i = t.models().iter().position(|m| m == name).unwrap() as u32;
        t.requests().iter().filter(|r| r.model == i).count() as f64
    };
    let share = count("m-0") / 20_000.0;
    assert!((0.15..0.19).contains(&share), "{share}");
    assert!((7.0..13.0).contains(&(count("m-0") / count("m-9"))));
    // Log-normal sizes around the median, the rate about 100 requests a second.
    let mut sizes: Vec<u64> = (0..t.models().len() as u32)
        .map(|m| t.requests().iter().find(|r| r.model == m).unwrap().size_bytes)
        .collect();
    sizes.sort_unstable();
    let median = sizes[sizes.len() / 2] as f64;
    assert!((14e6..28e6).contains(&median), "{median}");
    let seconds = t.requests().last().unwrap().time_ms as f64 / 1000.0;
    assert!((180.0..220.0).contains(&seconds), "{seconds}");
}

/// Textbook LRU over a sequence of equal models, `slots` of them fitting.
fn reference_lru(sequence: &[u8], slots: usize) -> u64 {
    let mut cache: VecDeque<u8> = VecDeque::new();
    let mut hits = 0;
    for &m in sequence {
        if let Some(i) = cache.iter().position(|&c| c == m) {
            hits += 1;
            cache.remove(i);
        } else if cache.len() == slots {
            cache.pop_front();
        }
        cache.push_back(m);
    }
    hits
}

proptest! {
    /// One pod of equal-sized models under LRU is exactly a textbook LRU cache.
    #[test]
    fn one_pod_of_equal_models_is_a_textbook_lru(
        sequence in proptest::collection::vec(0u8..12, 1..200), slots in 1usize..8,
    ) {
        let lines: Vec<(u64, String, u64)> =
            sequence.iter().enumerate().map(|(i, m)| (i as u64, format!("m{m}"), 10)).collect();
        let mut t = Trace::default();
        for (time, m, size) in &lines {
            t.push(*time, m, *size, None).unwrap();
        }
        let r = run(&t, &cluster(1, 10 * slots as u64, Policy::LeastRecentlyUsed)).unwrap();
        prop_assert_eq!(r.hits, reference_lru(&sequence, slots));
    }

    /// Whatever the trace, cluster and policy: every request is a hit, a load or a refusal; no pod
    /// holds more than its capacity; etcd sees two writes a load and one an eviction.
    #[test]
    fn the_books_balance_and_no_pod_overflows(
        requests in proptest::collection::vec((0u8..20, 1u64..60, 0u64..3000), 1..150),
        pods in 1usize..5,
        capacity in 1u64..200,
        gdsf in any::<bool>(),
        residence_s in prop_oneof![Just(0u64), 0u64..5],
    ) {
        let mut t = Trace::default();
        let mut time = 0;
        for (m, size, gap) in &requests {
            time += gap;
            t.push(time, &format!("m{m}"), *size, None).unwrap();
        }
        let policy = if gdsf { Policy::GreedyDualSizeFrequency } else { Policy::LeastRecentlyUsed };
        let c = Cluster { min_residence: Duration::from_secs(residence_s), ..cluster(pods, capacity, policy) };
        let r = run(&t, &c).unwrap();
        prop_assert_eq!(r.hits + r.loads + r.refused, r.requests);
        prop_assert!(r.peak_bytes_per_pod.iter().all(|&b| b <= capacity));
        prop_assert!(r.mean_bytes_per_pod.iter().all(|&b| b <= capacity));
        prop_assert_eq!(r.etcd_writes, 2 * r.loads + r.evictions);
        prop_assert_eq!(r.copies_held, r.loads - r.evictions);
        let refusals = r.refusals;
        prop_assert_eq!(refusals.too_large + refusals.would_evict_recent + refusals.no_room + refusals.no_pod, r.refused);
        prop_assert!((0.0..=1.0).contains(&r.hit_rate) && (0.0..=1.0).contains(&r.byte_miss_ratio));
    }
}
