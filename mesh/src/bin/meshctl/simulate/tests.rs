//! The front's own logic: capacities and sweeps as operators write them, and a replay end to end.

use super::*;

const GIB: u64 = 1 << 30;

#[test]
fn capacities_sizes_shares_and_ranges() {
    assert_eq!(parse_capacity("4GiB"), Ok(CapacitySpec::One(Amount::Bytes(4 * GIB))));
    assert_eq!(parse_capacity("10%"), Ok(CapacitySpec::One(Amount::Percent(10.0))));
    assert_eq!(
        parse_capacity("1GiB..16GiB"),
        Ok(CapacitySpec::Sweep(Amount::Bytes(GIB), Amount::Bytes(16 * GIB)))
    );
    assert_eq!(
        parse_capacity("5%..20%"),
        Ok(CapacitySpec::Sweep(Amount::Percent(5.0), Amount::Percent(20.0)))
    );
    for bad in ["16GiB..1GiB", "1GiB..20%", "lots", "0%", "-5%", "1GiB.."] {
        assert!(parse_capacity(bad).is_err(), "{bad}");
    }
}

#[test]
fn trace_seeds_one_or_a_range() {
    assert_eq!(parse_seeds("7"), Ok(Seeds { first: 7, last: 7 }));
    assert_eq!(parse_seeds("1..20"), Ok(Seeds { first: 1, last: 20 }));
    for bad in ["20..1", "x", "1..", "-1", "0..5000"] {
        assert!(parse_seeds(bad).is_err(), "{bad}");
    }
}

#[test]
fn seeds_of_a_range_give_the_mean_and_spread_of_each_run() {
    let spec = |seed| Synthetic { models: 50, requests: 2_000, seed, ..Synthetic::default() };
    let mut runs = Vec::new();
    for seed in 1..=3 {
        let trace = spec(seed).generate();
        let clusters: Vec<Cluster> = Policy::ALL
            .into_iter()
            .map(|policy| Cluster {
                pods: 1,
                capacity_bytes: trace.model_bytes() / 10,
                policy,
                min_residence: Duration::ZERO,
                anti_churn_age: Duration::ZERO,
                seed: 0,
            })
            .collect();
        let bytes = trace.model_bytes();
        runs.push((seed, bytes, run_all(&trace, &clusters).unwrap()));
    }
    let summary = over_seeds(&runs);
    assert_eq!(summary.len(), Policy::ALL.len());
    for (i, o) in summary.iter().enumerate() {
        let hits: Vec<f64> = runs.iter().map(|(_, _, r)| r[i].hit_rate).collect();
        let misses: Vec<f64> = runs.iter().map(|(_, _, r)| r[i].byte_miss_ratio).collect();
        assert_eq!(o.seeds, 3);
        assert_eq!(o.policy, runs[0].2[i].policy);
        assert!((o.hit_rate_mean - hits.iter().sum::<f64>() / 3.0).abs() < 1e-12);
        assert!((o.byte_miss_mean - misses.iter().sum::<f64>() / 3.0).abs() < 1e-12);
        assert_eq!(o.hit_rate_min, hits.iter().copied().fold(f64::INFINITY, f64::min));
        assert_eq!(o.byte_miss_max, misses.iter().copied().fold(0.0, f64::max));
        assert!((o.cluster_percent - 10.0).abs() < 0.1, "{}", o.cluster_percent);
        assert!(o.hit_rate_min <= o.hit_rate_mean && o.hit_rate_mean <= o.hit_rate_max);
    }
    assert!(over_seeds(&[]).is_empty());
}

#[test]
fn sweeps_by_step_or_points() {
    let range = parse_capacity("1GiB..4GiB").unwrap();
    let gib = |n: &[u64]| n.iter().map(|n| Amount::Bytes(n * GIB)).collect::<Vec<_>>();
    assert_eq!(amounts(range, Some(Amount::Bytes(GIB)), None).unwrap(), gib(&[1, 2, 3, 4]));
    assert_eq!(
        amounts(range, Some(Amount::Bytes(2 * GIB)), None).unwrap(),
        gib(&[1, 3]),
        "never past the end"
    );
    assert_eq!(amounts(range, None, Some(4)).unwrap(), gib(&[1, 2, 3, 4]));
    assert_eq!(amounts(range, None, None).unwrap().len(), DEFAULT_POINTS);
    assert!(amounts(range, Some(Amount::Percent(1.0)), None).is_err(), "a % step for a size range");
    assert!(amounts(range, None, Some(1)).is_err());
    let shares = parse_capacity("5%..15%").unwrap();
    assert_eq!(
        amounts(shares, Some(Amount::Percent(5.0)), None).unwrap(),
        [5.0, 10.0, 15.0].map(Amount::Percent)
    );
    assert_eq!(amounts(CapacitySpec::One(Amount::Bytes(7)), None, None).unwrap(), [Amount::Bytes(7)]);
    // A share is of the trace's bytes, for the whole cluster.
    assert_eq!(per_pod_bytes(Amount::Percent(10.0), 3_000, 3), 100);
    assert_eq!(per_pod_bytes(Amount::Bytes(5), 3_000, 3), 5);
}

#[test]
fn a_trace_file_replays_for_each_capacity_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.csv");
    std::fs::write(&path, "time_ms,model_id,size_bytes\n0,a,10\n1000,b,10\n2000,a,10\n3000,c,10\n").unwrap();
    let trace = Trace::read(std::io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
    let clusters: Vec<Cluster> = [10, 100]
        .into_iter()
        .flat_map(|capacity| {
            Policy::ALL.into_iter().map(move |policy| Cluster {
                pods: 1,
                capacity_bytes: capacity,
                policy,
                min_residence: Duration::ZERO,
                anti_churn_age: Duration::ZERO,
                seed: 0,
            })
        })
        .collect();
    let reports = run_all(&trace, &clusters).unwrap();
    let hits: Vec<u64> = reports.iter().map(|r| r.hits).collect();
    assert_eq!(hits, [0, 0, 1, 1], "room for one model: no hits; for all: a's second request");
    let capacities: Vec<u64> = reports.iter().map(|r| r.capacity_bytes).collect();
    assert_eq!(capacities, [10, 10, 100, 100], "in the order asked");
    let text = table(&trace, trace.model_bytes(), &reports, Duration::ZERO);
    assert!(text.contains("gdsf") && text.lines().count() == 6, "{text}");
}
