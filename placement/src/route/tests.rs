//! The routing rule as tables of cases, then properties over arbitrary clusters.

use proptest::prelude::*;

use super::*;

const NOW: u64 = 1_700_000_000_000;
const TEN_MINUTES: Duration = Duration::from_secs(600);

use crate::choose::test_pod as pod;

fn loaded(name: &str, in_flight: usize) -> CopyOn {
    CopyOn { instance: name.into(), copy: Copy::Loaded { in_flight, failed_recently: false } }
}

fn loading(name: &str) -> CopyOn {
    CopyOn { instance: name.into(), copy: Copy::Loading }
}

fn ask(goal: Goal, pods: &[LoadCandidate], copies: &[CopyOn], size: u64) -> Route {
    route(&RouteInput {
        this: "me",
        goal,
        pods,
        copies,
        exclude: &[],
        model_type: Some("onnx"),
        predicted_bytes: size,
        now_ms: NOW,
        anti_churn_age: TEN_MINUTES,
        gpu: None,
    })
}

fn three_pods() -> Vec<LoadCandidate> {
    vec![pod("me", 100, 50, 900), pod("a", 100, 10, 900), pod("b", 100, 90, 900)]
}

#[test]
fn a_request_goes_to_a_copy_here_then_a_loaded_peer_then_a_loading_one_then_placement() {
    let pods = three_pods();
    assert_eq!(ask(Goal::Serve, &pods, &[loaded("me", 0), loaded("a", 0)], 5), Route::Here);
    assert_eq!(
        ask(Goal::Serve, &pods, &[loading("me"), loaded("a", 0)], 5),
        Route::Here,
        "await our own load"
    );
    assert_eq!(ask(Goal::Serve, &pods, &[loaded("a", 3), loaded("b", 1)], 5), Route::Copy("b".into()));
    assert_eq!(ask(Goal::Serve, &pods, &[loading("b")], 5), Route::WaitFor("b".into()));
    assert_eq!(
        ask(Goal::Serve, &pods, &[loading("b"), loaded("a", 9)], 5),
        Route::Copy("a".into()),
        "a loaded copy beats waiting for a load"
    );
    assert_eq!(ask(Goal::Serve, &pods, &[], 5), Route::LoadOn("a".into()), "least used with room");
    let even = [pod("me", 100, 10, 0), pod("a", 100, 10, 0)];
    assert_eq!(ask(Goal::Serve, &even, &[], 5), Route::LoadHere, "this pod on ties");
}

fn ask_gpu(gpu: Gpu, pods: &[LoadCandidate], size: u64) -> Route {
    route(&RouteInput {
        this: "me",
        goal: Goal::Serve,
        pods,
        copies: &[],
        exclude: &[],
        model_type: Some("onnx"),
        predicted_bytes: size,
        now_ms: NOW,
        anti_churn_age: Duration::ZERO,
        gpu: Some(gpu),
    })
}

fn gpu_pod(name: &str, used: u64, device_capacity: u64, device_used: u64) -> LoadCandidate {
    let mut p = pod(name, 100, used, 900);
    p.gpu = crate::gpu::GpuRoom {
        largest_capacity_bytes: device_capacity,
        most_free_bytes: device_capacity - device_used,
    };
    p
}

#[test]
fn a_model_asking_for_a_gpu_goes_where_a_device_has_room_and_one_requiring_it_never_to_cpu() {
    // "me" has the most host room but no GPU; "full" has a GPU with no room; "room" one with room.
    let pods = [pod("me", 100, 0, 900), gpu_pod("full", 50, 40, 40), gpu_pod("room", 90, 40, 10)];
    assert_eq!(ask(Goal::Serve, &pods, &[], 20), Route::LoadHere, "no ask: host room decides");
    assert_eq!(ask_gpu(Gpu::Preferred, &pods, 20), Route::LoadOn("room".into()));
    assert_eq!(ask_gpu(Gpu::Required, &pods, 20), Route::LoadOn("room".into()));
    // Larger than any device's room now: preferred falls back to the host's choice, required goes to
    // a pod whose device can make room by demoting.
    assert_eq!(ask_gpu(Gpu::Preferred, &pods, 35), Route::LoadHere);
    assert_eq!(ask_gpu(Gpu::Required, &pods, 35), Route::LoadOn("full".into()));
    assert_eq!(
        ask_gpu(Gpu::Required, &pods, 45),
        Route::Refuse(Refusal::NoGpu { predicted_bytes: 45, largest_device_bytes: 40 })
    );
    assert_eq!(
        ask_gpu(Gpu::Required, &[pod("me", 100, 0, 900)], 1),
        Route::Refuse(Refusal::NoGpu { predicted_bytes: 1, largest_device_bytes: 0 })
    );
}

#[test]
fn copies_on_draining_gone_or_failed_pods_do_not_count() {
    let mut pods = three_pods();
    pods[1].draining = true;
    // "a" drains and "gone" has no instance record: neither serves; b is loading.
    let copies = [loaded("a", 0), loaded("gone", 0), loading("b")];
    assert_eq!(ask(Goal::Serve, &pods, &copies, 5), Route::WaitFor("b".into()));
    let input = RouteInput {
        this: "me",
        goal: Goal::Serve,
        pods: &pods,
        copies: &[loaded("b", 0)],
        exclude: &["b"],
        model_type: Some("onnx"),
        predicted_bytes: 5,
        now_ms: NOW,
        anti_churn_age: TEN_MINUTES,
        gpu: None,
    };
    assert_eq!(route(&input), Route::LoadHere, "b failed this request; a drains; this pod loads it");
}

#[test]
fn a_model_too_large_here_goes_to_a_peer_that_can_hold_it() {
    let pods = [pod("me", 100, 0, 0), pod("big", 1_000, 900, 9_999)];
    assert_eq!(ask(Goal::Serve, &pods, &[], 500), Route::LoadOn("big".into()));
    assert_eq!(
        ask(Goal::Serve, &pods, &[], 5_000),
        Route::Refuse(Refusal::TooLarge { predicted_bytes: 5_000, largest_capacity_bytes: 1_000 })
    );
}

#[test]
fn anti_churn_sends_the_load_elsewhere_or_refuses_naming_the_model() {
    let pods = [pod("me", 100, 100, 30), pod("a", 100, 100, 700)];
    assert_eq!(ask(Goal::Serve, &pods, &[], 20), Route::LoadOn("a".into()), "a's coldest is old enough");
    let pods = [pod("me", 100, 100, 30), pod("a", 100, 100, 60)];
    assert_eq!(
        ask(Goal::Ensure, &pods, &[], 20),
        Route::Refuse(Refusal::WouldEvictRecent {
            instance: "a".into(),
            model: Some("a-coldest".into()),
            used_secs_ago: 60,
            anti_churn_age: TEN_MINUTES,
        })
    );
}

#[test]
fn ensure_is_satisfied_by_any_copy_and_loads_once_where_placement_says() {
    let pods = three_pods();
    assert_eq!(ask(Goal::Ensure, &pods, &[loaded("b", 0)], 5), Route::Copy("b".into()));
    assert_eq!(ask(Goal::Ensure, &pods, &[loading("a")], 5), Route::WaitFor("a".into()));
    assert_eq!(ask(Goal::Ensure, &pods, &[], 5), Route::LoadOn("a".into()));
}

#[test]
fn a_new_copy_goes_only_to_a_pod_without_one() {
    let pods = three_pods();
    // a has the most room but holds a copy already; me is the holder asking.
    assert_eq!(ask(Goal::AddCopy, &pods, &[loaded("me", 0), loaded("a", 0)], 5), Route::LoadOn("b".into()));
    assert_eq!(
        ask(Goal::AddCopy, &pods, &[loaded("me", 0), loaded("a", 0), loading("b")], 5),
        Route::Refuse(Refusal::NoPod)
    );
}

#[test]
fn a_hand_off_never_stays_here_and_is_done_when_a_peer_holds_it() {
    let mut pods = three_pods();
    pods[0] = LoadCandidate { draining: true, used_bytes: 0, ..pods[0].clone() };
    assert_eq!(ask(Goal::HandOff, &pods, &[loaded("me", 0)], 5), Route::LoadOn("a".into()));
    assert_eq!(ask(Goal::HandOff, &pods, &[loaded("me", 0), loaded("b", 0)], 5), Route::Copy("b".into()));
}

#[test]
fn only_pods_offering_the_type_hold_serve_or_load_it() {
    let other_type = |p: LoadCandidate| LoadCandidate { offers_type: false, ..p };
    // This pod does not offer the type: its own copy does not serve; a peer's loaded copy does, and
    // with none anywhere the model loads on a pod that offers it, never here.
    let pods = [other_type(pod("me", 100, 0, 0)), pod("a", 100, 50, 0), pod("b", 100, 90, 0)];
    assert_eq!(ask(Goal::Serve, &pods, &[loaded("me", 0), loaded("b", 0)], 5), Route::Copy("b".into()));
    assert_eq!(ask(Goal::Serve, &pods, &[], 5), Route::LoadOn("a".into()), "me is emptiest, yet not it");
    assert_eq!(ask(Goal::Ensure, &pods, &[], 5), Route::LoadOn("a".into()));
    // Copies and loads on a peer that does not offer it do not count.
    let pods = [pod("me", 100, 50, 0), other_type(pod("a", 100, 0, 0))];
    assert_eq!(ask(Goal::Serve, &pods, &[loaded("a", 0)], 5), Route::LoadHere);
    assert_eq!(ask(Goal::Serve, &pods, &[loading("a")], 5), Route::LoadHere);
    assert_eq!(ask(Goal::AddCopy, &pods, &[loaded("me", 0)], 5), Route::Refuse(Refusal::NoPod));
    // Nobody offers it: the refusal names the type.
    let pods = [other_type(pod("me", 100, 0, 0)), other_type(pod("a", 100, 0, 0))];
    assert_eq!(
        ask(Goal::Serve, &pods, &[loaded("me", 0)], 5),
        Route::Refuse(Refusal::NoPodOffers { model_type: "onnx".into() })
    );
    // A model that is not registered has no type to refuse.
    let input = RouteInput {
        this: "me",
        goal: Goal::Serve,
        pods: &[pod("me", 100, 0, 0)],
        copies: &[],
        exclude: &[],
        model_type: None,
        predicted_bytes: 5,
        now_ms: NOW,
        anti_churn_age: TEN_MINUTES,
        gpu: None,
    };
    assert_eq!(route(&input), Route::LoadHere);
}

fn arb_pods() -> impl Strategy<Value = Vec<LoadCandidate>> {
    proptest::collection::vec(
        (
            1u64..1000,
            0u64..1200,
            0u64..3,
            0u64..1200,
            any::<bool>(),
            proptest::option::of(0u64..20_000),
            proptest::bool::weighted(0.75),
        ),
        1..6,
    )
    .prop_map(|pods| {
        pods.into_iter()
            .enumerate()
            .map(|(i, (capacity, used, loading, lru, draining, retry_after_ms, offers_type))| LoadCandidate {
                instance: if i == 0 { "me".into() } else { format!("p{i}") },
                capacity_bytes: capacity,
                used_bytes: used.min(capacity),
                loading,
                lru_age_seconds: lru,
                coldest_model: None,
                cheapest_victims: None,
                draining,
                offers_type,
                retry_after_ms,
                gpu: Default::default(),
            })
            .collect()
    })
}

fn arb_copies() -> impl Strategy<Value = Vec<CopyOn>> {
    proptest::collection::vec((0usize..7, any::<bool>(), 0usize..4, any::<bool>()), 0..4).prop_map(|copies| {
        let mut seen = std::collections::HashSet::new();
        copies
            .into_iter()
            .filter(|(i, ..)| seen.insert(*i))
            .map(|(i, is_loaded, in_flight, failed_recently)| CopyOn {
                instance: if i == 0 { "me".into() } else { format!("p{i}") },
                copy: if is_loaded { Copy::Loaded { in_flight, failed_recently } } else { Copy::Loading },
            })
            .collect()
    })
}

fn arb_goal() -> impl Strategy<Value = Goal> {
    prop_oneof![Just(Goal::Serve), Just(Goal::Ensure), Just(Goal::AddCopy), Just(Goal::HandOff)]
}

proptest! {
    /// Whatever the cluster: a pod named (here included) offers the model's type; a peer named is a
    /// live, non-draining pod not excluded; a copy or a wait names a pod holding one; a load never
    /// lands on a pod that is draining, backing off, too small, or (for a new copy) already holding
    /// one, nor evicts a model used within the anti-churn age; when no pod offers the type, the
    /// refusal names it.
    #[test]
    fn every_answer_is_allowed(
        pods in arb_pods(),
        copies in arb_copies(),
        goal in arb_goal(),
        size in 0u64..1200,
        now in 0u64..20_000,
        churn_secs in prop_oneof![Just(0u64), 0u64..1200],
        exclude_p1 in any::<bool>(),
    ) {
        let exclude: Vec<&str> = if exclude_p1 { vec!["p1"] } else { vec![] };
        let anti_churn_age = Duration::from_secs(churn_secs);
        let input = RouteInput {
            this: "me", goal, pods: &pods, copies: &copies, exclude: &exclude, model_type: Some("onnx"),
            predicted_bytes: size, now_ms: now, anti_churn_age, gpu: None,
        };
        let pod_named = |name: &str| pods.iter().find(|p| p.instance == name);
        let offers = |name: &str| pod_named(name).is_some_and(|p| p.offers_type);
        let live = |name: &str| {
            pod_named(name).is_some_and(|p| !p.draining) && offers(name) && !exclude.contains(&name)
        };
        let copy_of = |name: &str| copies.iter().find(|c| c.instance == name).map(|c| &c.copy);
        let loadable = |name: &str| {
            let Some(p) = pod_named(name) else { return false };
            let room = p.capacity_bytes - p.used_bytes >= size;
            live(name) && !p.backing_off(now) && p.capacity_bytes >= size
                && (room || p.lru_age_seconds >= churn_secs)
                && !(goal == Goal::AddCopy && copy_of(name).is_some())
                && !(goal == Goal::HandOff && name == "me")
        };
        let answer = route(&input);
        if !pods.iter().any(|p| p.offers_type) {
            prop_assert_eq!(answer, Route::Refuse(Refusal::NoPodOffers { model_type: "onnx".into() }));
            return Ok(());
        }
        match answer {
            Route::Here => {
                prop_assert!(matches!(goal, Goal::Serve | Goal::Ensure));
                prop_assert!(copy_of("me").is_some() && offers("me"));
            }
            Route::Copy(peer) => {
                prop_assert!(goal != Goal::AddCopy && peer != "me" && live(&peer));
                let is_loaded = matches!(copy_of(&peer), Some(Copy::Loaded { .. }));
                prop_assert!(is_loaded);
            }
            Route::WaitFor(peer) => {
                prop_assert!(goal != Goal::AddCopy && peer != "me" && live(&peer));
                prop_assert_eq!(copy_of(&peer), Some(&Copy::Loading));
                // Only when no live peer has it loaded.
                let loaded_peer = copies.iter().any(|c| c.instance != "me" && live(&c.instance)
                    && matches!(c.copy, Copy::Loaded { .. }));
                prop_assert!(!loaded_peer);
            }
            Route::LoadHere => prop_assert!(loadable("me")),
            Route::LoadOn(peer) => {
                prop_assert!(peer != "me");
                prop_assert!(loadable(&peer));
            }
            Route::Refuse(refusal) => {
                prop_assert!(!matches!(refusal, Refusal::NoPodOffers { .. }), "some pod offers it");
                prop_assert!(!pods.iter().any(|p| loadable(&p.instance)));
            }
        }
    }
}

proptest! {
    /// ModelMesh's type constraints on their own: whatever the cluster and the goal, every pod an
    /// answer names (this one for `Here` and `LoadHere`) offers the model's type, and the refusal
    /// names the type exactly when no pod offers it.
    #[test]
    fn never_place_on_a_pod_that_does_not_offer_the_type(
        pods in arb_pods(),
        copies in arb_copies(),
        goal in arb_goal(),
        size in 0u64..1200,
        now in 0u64..20_000,
    ) {
        let input = RouteInput {
            this: "me", goal, pods: &pods, copies: &copies, exclude: &[], model_type: Some("onnx"),
            predicted_bytes: size, now_ms: now, anti_churn_age: Duration::ZERO, gpu: None,
        };
        let offers = |name: &str| pods.iter().any(|p| p.instance == name && p.offers_type);
        match route(&input) {
            Route::Here | Route::LoadHere => prop_assert!(offers("me")),
            Route::Copy(peer) | Route::WaitFor(peer) | Route::LoadOn(peer) => prop_assert!(offers(&peer)),
            Route::Refuse(Refusal::NoPodOffers { model_type }) => {
                prop_assert_eq!(model_type, "onnx");
                prop_assert!(!pods.iter().any(|p| p.offers_type));
            }
            Route::Refuse(_) => prop_assert!(pods.iter().any(|p| p.offers_type)),
        }
    }
}
