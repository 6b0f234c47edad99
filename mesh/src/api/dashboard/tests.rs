use std::time::Duration;

use densemesh_placement::spec::legacy_model_types;

use super::*;

fn id(s: &str) -> ModelId {
    ModelId::new(s).expect("valid model id")
}

fn record(endpoint: &str, capacity: u64, used: u64) -> InstanceRecord {
    InstanceRecord {
        endpoint: endpoint.into(),
        capacity_bytes: capacity,
        used_bytes: used,
        models_loaded: 1,
        loading: 0,
        lru_age_seconds: 90,
        coldest_model: "b1".into(),
        cheapest_victims: None,
        requests_per_minute: 42,
        draining: false,
        started_ms: 5,
        model_types: legacy_model_types(),
        peer_wire: 0,
        devices: Vec::new(),
    }
}

fn two_pods() -> Snapshot {
    let mut copies = BTreeMap::new();
    copies.insert(
        id("a1"),
        vec![(
            "pod-a".to_owned(),
            Placement::Loaded { since_ms: 10, size_bytes: 300, runtime: String::new() },
        )],
    );
    copies.insert(
        id("b1"),
        vec![
            ("pod-b".to_owned(), Placement::Loaded { since_ms: 11, size_bytes: 500, runtime: String::new() }),
            (
                "pod-a".to_owned(),
                Placement::Failed { since_ms: 12, reason: "bad file".into(), retry_after_ms: 99 },
            ),
        ],
    );
    copies.insert(id("v2"), vec![("pod-b".to_owned(), Placement::Loading { since_ms: 13 })]);
    Snapshot {
        now_ms: 1_000,
        this: "pod-a".into(),
        leader: Some("pod-b".into()),
        instances: vec![("pod-a".into(), record("a:1", 1000, 0)), ("pod-b".into(), record("b:1", 2000, 500))],
        models: vec![(id("a1"), "onnx".into()), (id("b1"), "onnx".into()), (id("v2"), "onnx".into())],
        copies,
        vmodels: vec![(
            id("v"),
            VModelSpec {
                active: "a1".into(),
                target: "v2".into(),
                owner: "ns/isvc".into(),
                transition_error: None,
                split: Vec::new(),
            },
        )],
        local: PlacementState {
            capacity_bytes: 1000,
            used_bytes: 300,
            models_loaded: 1,
            lru_age: Duration::from_secs(7),
            coldest_model: Some(id("a1")),
            ..Default::default()
        },
        gpus: vec![densemesh_placement::gpu::DeviceRecord {
            name: "gpu0".into(),
            kind: "H100".into(),
            total_bytes: 80,
            capacity_bytes: 72,
            used_bytes: 30,
            models: 2,
        }],
        resident: vec![ResidentModel {
            id: id("a1"),
            size_bytes: 300,
            in_flight: 2,
            idle_for: Duration::from_secs(7),
            requests: 9,
        }],
        disk: Some(Tier { capacity_bytes: 4096, used_bytes: 1024 }),
        activity: vec![Bucket { start_ms: 0, end_ms: 10_000, loads: 1, requests: 3, ..Default::default() }],
        decisions: Vec::new(),
    }
}

#[test]
fn every_pod_appears_with_its_models() {
    let json = build(&two_pods());
    let ids: Vec<&str> = json.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["pod-a", "pod-b"]);
    let (a, b) = (&json.instances[0], &json.instances[1]);
    assert!(a.this && !a.leader && !b.this && b.leader);
    let models = |i: &InstanceJson| -> Vec<(String, &'static str)> {
        i.models.iter().map(|m| (m.model_id.clone(), m.state)).collect()
    };
    assert_eq!(models(a), [("a1".into(), "loaded"), ("b1".into(), "failed")]);
    assert_eq!(models(b), [("b1".into(), "loaded"), ("v2".into(), "loading")]);
    assert_eq!(a.models[1].reason.as_deref(), Some("bad file"));
}

#[test]
fn this_pod_is_live_and_others_are_as_their_records_say() {
    let json = build(&two_pods());
    let (a, b) = (&json.instances[0], &json.instances[1]);
    // The cache says 300 used while the record still says 0: the cache wins for this pod.
    assert_eq!(a.memory, Tier { capacity_bytes: 1000, used_bytes: 300 });
    assert_eq!(a.disk_cache, Some(Tier { capacity_bytes: 4096, used_bytes: 1024 }));
    assert_eq!((a.lru_age_seconds, a.coldest_model.as_deref()), (7, Some("a1")));
    let a1 = &a.models[0];
    assert_eq!((a1.size_bytes, a1.idle_seconds, a1.requests, a1.in_flight), (300, Some(7), Some(9), Some(2)));
    assert_eq!(b.memory, Tier { capacity_bytes: 2000, used_bytes: 500 });
    assert_eq!(b.disk_cache, None);
    assert_eq!(
        a.gpus
            .iter()
            .map(|g| (g.name.as_str(), g.capacity_bytes, g.used_bytes, g.models))
            .collect::<Vec<_>>(),
        [("gpu0", 72, 30, 2)],
        "this pod's GPUs as its tier says now"
    );
    assert!(b.gpus.is_empty(), "a record without devices: no GPUs");
    assert_eq!((b.requests_per_minute, b.lru_age_seconds, b.coldest_model.as_deref()), (42, 90, Some("b1")));
    assert_eq!((b.models[0].idle_seconds, b.models[0].since_ms), (None, Some(11)));
}

#[test]
fn a_pod_without_a_record_still_shows_its_cache() {
    let mut snapshot = two_pods();
    snapshot.instances.retain(|(i, _)| i != "pod-a");
    let json = build(&snapshot);
    let a = json.instances.iter().find(|i| i.id == "pod-a").expect("this pod listed");
    assert_eq!((a.endpoint.as_str(), a.models.len()), ("", 2));
    assert_eq!(a.memory.used_bytes, 300);
}

#[test]
fn vmodels_show_their_transition() {
    let json = build(&two_pods());
    let v = &json.vmodels[0];
    assert_eq!(
        (v.vmodel_id.as_str(), v.state, v.active.as_str(), v.target.as_str()),
        ("v", "transitioning", "a1", "v2")
    );
    let members: Vec<(&str, &str, u32)> =
        v.models.iter().map(|m| (m.model_id.as_str(), m.state, m.copies)).collect();
    assert_eq!(members, [("a1", "loaded", 1), ("v2", "loading", 1)]);

    let mut snapshot = two_pods();
    snapshot.vmodels[0].1.transition_error = Some("no room".into());
    assert_eq!(build(&snapshot).vmodels[0].state, "failing");
    snapshot.vmodels[0].1 =
        VModelSpec { target: "a1".into(), transition_error: None, ..snapshot.vmodels[0].1.clone() };
    assert_eq!(build(&snapshot).vmodels[0].state, "steady");
}

#[test]
fn the_json_names_the_documented_fields() {
    let value = serde_json::to_value(build(&two_pods())).expect("serializable");
    for key in [
        "schema_version",
        "generated_ms",
        "this_instance",
        "leader",
        "models_registered",
        "instances",
        "vmodels",
        "activity",
        "decisions",
    ] {
        assert!(value.get(key).is_some(), "missing {key}");
    }
    let pod = &value["instances"][0];
    for key in [
        "id",
        "endpoint",
        "this",
        "leader",
        "draining",
        "memory",
        "disk_cache",
        "gpus",
        "models",
        "requests_per_minute",
        "lru_age_seconds",
    ] {
        assert!(pod.get(key).is_some(), "missing instances[].{key}");
    }
    assert_eq!(pod["memory"]["capacity_bytes"], 1000);
    assert_eq!(pod["models"][0]["idle_seconds"], 7);
    assert_eq!(value["activity"]["bucket_seconds"], 10);
    assert_eq!(value["activity"]["buckets"][0]["requests"], 3);
}

#[test]
fn the_ring_keeps_differences_per_bucket() {
    let mut ring = ActivityRing::new(2);
    let totals = |loads, requests| Totals { loads, requests, ..Default::default() };
    assert!(ring.buckets(0, totals(0, 0)).is_empty(), "nothing before the first sample");
    ring.sample(0, totals(1, 10));
    ring.sample(10_000, totals(3, 15));
    let now = ring.buckets(12_000, totals(4, 15));
    assert_eq!(now.len(), 2);
    assert_eq!(
        (now[0].start_ms, now[0].end_ms, now[0].loads, now[0].requests, now[0].partial),
        (0, 10_000, 2, 5, false)
    );
    assert_eq!((now[1].start_ms, now[1].end_ms, now[1].loads, now[1].partial), (10_000, 12_000, 1, true));
    ring.sample(20_000, totals(4, 15));
    ring.sample(30_000, totals(4, 16));
    let kept: Vec<u64> = ring.buckets(30_000, totals(4, 16)).iter().map(|b| b.start_ms).collect();
    assert_eq!(kept, [10_000, 20_000, 30_000], "two finished buckets, then the running one");
}

#[test]
fn a_counter_that_went_back_counts_as_nothing() {
    let mut ring = ActivityRing::new(4);
    ring.sample(0, Totals { evictions: 5, ..Default::default() });
    ring.sample(10_000, Totals { evictions: 2, ..Default::default() });
    assert_eq!(ring.buckets(10_000, Totals::default())[0].evictions, 0);
}

#[test]
fn the_page_is_self_contained() {
    for external in ["http://", "https://", "<link", "@import", "src=\""] {
        assert!(!PAGE.contains(external), "the page must not load {external}");
    }
    assert!(PAGE.contains("/api/v1/cluster"));
}
