//! How many copies of a model the cluster keeps: pure decisions the pods apply to their own copies
//! (drop an idle one, add one under load), and the leader's floor for models registered with a
//! minimum number of copies ([`copies_short`]).

use std::collections::HashMap;
use std::time::Duration;

use crate::{InstanceRecord, Placement};

/// Whether this pod should drop its copy of a model: more than `keep` live pods hold copies (`keep`:
/// the model's minimum copies, at least 1) and this one has been idle for `idle_period`. The last
/// copy is never dropped for idleness (only evicted for room), nor one of a model's minimum copies;
/// of several idle copies those on the `keep` lowest instance ids stay, so pods deciding at the same
/// moment never drop too many.
pub fn drop_idle_copy(
    this: &str,
    holders: &[&str],
    idle_for: Duration,
    idle_period: Duration,
    keep: usize,
) -> bool {
    let keep = keep.max(1);
    if idle_for < idle_period || !holders.contains(&this) || holders.len() <= keep {
        return false;
    }
    let lower = holders.iter().filter(|h| **h < this).count();
    lower >= keep
}

/// A model registered with a minimum number of copies, as the leader's view shows it.
#[derive(Debug, Clone, Copy)]
pub struct MinCopies<'a> {
    /// The spec's `min_copies`.
    pub min_copies: u32,
    /// Its type: only pods offering it can hold a copy.
    pub model_type: &'a str,
    /// Its copies by instance (placement records), if any.
    pub copies: Option<&'a HashMap<String, Placement>>,
}

/// How many more copies a model needs to have its minimum loaded, each on its own pod; 0 when it has
/// enough. Copies loaded or loading on live pods that are not draining and offer its type count (a
/// failed record is no copy; a draining pod's copy is about to go). The goal is capped by the number
/// of such pods, as no pod holds two copies: with fewer pods than the minimum, every pod holds one.
pub fn copies_short(model: &MinCopies<'_>, pods: &HashMap<String, InstanceRecord>) -> usize {
    let eligible = |name: &str| pods.get(name).is_some_and(|p| !p.draining && p.offers(model.model_type));
    let pods_offering = pods.keys().filter(|name| eligible(name)).count();
    let goal = usize::try_from(model.min_copies).unwrap_or(usize::MAX).min(pods_offering);
    let held = model
        .copies
        .into_iter()
        .flat_map(HashMap::iter)
        .filter(|(name, p)| {
            eligible(name) && matches!(p, Placement::Loaded { .. } | Placement::Loading { .. })
        })
        .count();
    goal.saturating_sub(held)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const PERIOD: Duration = Duration::from_secs(60);

    #[test]
    fn extra_idle_copies_go_and_the_last_stays() {
        let idle = Duration::from_secs(61);
        assert!(drop_idle_copy("b", &["a", "b"], idle, PERIOD, 1));
        assert!(!drop_idle_copy("a", &["a", "b"], idle, PERIOD, 1), "the lowest id keeps its copy");
        assert!(!drop_idle_copy("a", &["a"], idle, PERIOD, 1), "never the last copy");
        assert!(!drop_idle_copy("a", &["a"], idle, PERIOD, 0), "never the last copy, whatever keep says");
        assert!(!drop_idle_copy("b", &["a", "b"], Duration::from_secs(30), PERIOD, 1), "not while in use");
        assert!(!drop_idle_copy("c", &["a", "b"], idle, PERIOD, 1), "only a copy it holds");
    }

    #[test]
    fn a_models_minimum_copies_are_never_dropped_for_idleness() {
        let idle = Duration::from_secs(61);
        assert!(!drop_idle_copy("b", &["a", "b"], idle, PERIOD, 2), "two copies, a minimum of two");
        assert!(!drop_idle_copy("c", &["a", "b", "c"], idle, PERIOD, 3));
        assert!(!drop_idle_copy("b", &["a", "b", "c"], idle, PERIOD, 2), "among the two lowest ids");
        assert!(drop_idle_copy("c", &["a", "b", "c"], idle, PERIOD, 2), "the third goes");
    }

    proptest! {
        #[test]
        fn all_pods_deciding_at_once_keep_exactly_the_minimum(n in 1usize..8, keep in 0usize..6) {
            let names: Vec<String> = (0..n).map(|i| format!("pod-{i}")).collect();
            let holders: Vec<&str> = names.iter().map(String::as_str).collect();
            let kept =
                holders.iter().filter(|h| !drop_idle_copy(h, &holders, PERIOD * 2, PERIOD, keep)).count();
            prop_assert_eq!(kept, n.min(keep.max(1)));
        }
    }
}

#[cfg(test)]
mod min_copies_tests {
    use proptest::prelude::*;

    use super::*;

    fn pod(model_types: &[&str], draining: bool) -> InstanceRecord {
        InstanceRecord {
            endpoint: "e".into(),
            capacity_bytes: 1 << 30,
            used_bytes: 0,
            models_loaded: 0,
            loading: 0,
            lru_age_seconds: 0,
            coldest_model: String::new(),
            cheapest_victims: None,
            requests_per_minute: 0,
            draining,
            started_ms: 0,
            model_types: model_types.iter().map(|t| (*t).to_owned()).collect(),
            peer_wire: 0,
            devices: Vec::new(),
        }
    }

    fn pods(names: &[&str]) -> HashMap<String, InstanceRecord> {
        names.iter().map(|n| ((*n).to_owned(), pod(&["onnx"], false))).collect()
    }

    const LOADED: Placement = Placement::Loaded { since_ms: 1, size_bytes: 1, runtime: String::new() };
    const LOADING: Placement = Placement::Loading { since_ms: 1 };

    fn failed() -> Placement {
        Placement::Failed { since_ms: 1, reason: "bad".into(), retry_after_ms: 2 }
    }

    fn short(min_copies: u32, copies: &[(&str, Placement)], pods: &HashMap<String, InstanceRecord>) -> usize {
        let copies: HashMap<String, Placement> =
            copies.iter().map(|(n, p)| ((*n).to_owned(), p.clone())).collect();
        let model = MinCopies { min_copies, model_type: "onnx", copies: Some(&copies) };
        copies_short(&model, pods)
    }

    #[test]
    fn which_models_need_how_many_more_copies() {
        let three = pods(&["a", "b", "c"]);
        assert_eq!(short(2, &[], &three), 2, "none yet");
        assert_eq!(short(2, &[("a", LOADED)], &three), 1);
        assert_eq!(short(2, &[("a", LOADED), ("b", LOADING)], &three), 0, "a copy loading counts");
        assert_eq!(short(2, &[("a", LOADED), ("b", failed())], &three), 1, "a failed record is no copy");
        assert_eq!(short(2, &[("a", LOADED), ("gone", LOADED)], &three), 1, "a dead pod's copy is none");
        assert_eq!(short(1, &[("a", LOADED), ("b", LOADED)], &three), 0, "more than the minimum");
        assert_eq!(short(0, &[], &three), 0);
        assert_eq!(short(5, &[("a", LOADED)], &three), 2, "at most one copy per live pod");
        assert_eq!(short(2, &[], &HashMap::new()), 0, "no pod, nothing to do");
        let model = MinCopies { min_copies: 2, model_type: "onnx", copies: None };
        assert_eq!(copies_short(&model, &three), 2, "no placement record at all");
    }

    #[test]
    fn only_live_pods_offering_the_type_and_not_draining_hold_or_count() {
        let mut mixed = pods(&["a", "b"]);
        mixed.insert("routes-only".into(), pod(&[], false));
        mixed.insert("leaving".into(), pod(&["onnx"], true));
        assert_eq!(short(4, &[], &mixed), 2, "capped by the two pods that can hold a copy");
        assert_eq!(short(2, &[("a", LOADED), ("leaving", LOADED)], &mixed), 1, "a draining copy is going");
        assert_eq!(short(2, &[("a", LOADED), ("routes-only", LOADED)], &mixed), 1);
    }

    proptest! {
        #[test]
        fn the_shortfall_never_exceeds_the_minimum_or_the_free_pods(
            min in 0u32..6, live in 0usize..6, held in proptest::collection::vec(0usize..8, 0..8),
        ) {
            let names: Vec<String> = (0..live).map(|i| format!("p{i}")).collect();
            let pods = pods(&names.iter().map(String::as_str).collect::<Vec<_>>());
            let copies: Vec<(String, Placement)> =
                held.iter().map(|i| (format!("p{i}"), LOADED)).collect();
            let copies: Vec<(&str, Placement)> = copies.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
            let missing = short(min, &copies, &pods);
            let holding = held.iter().filter(|i| **i < live).collect::<std::collections::HashSet<_>>().len();
            prop_assert!(missing <= min as usize);
            prop_assert!(missing <= live - holding, "never more copies than pods without one");
            prop_assert_eq!(missing == 0, holding >= (min as usize).min(live));
        }
    }
}

/// Inferences that must have waited for a worker within one check interval before their mean wait
/// counts: one request caught behind a burst says little about the model.
pub const MIN_QUEUE_WAIT_SAMPLES: u64 = 5;

/// Time a model's inferences spent waiting for a worker thread, summed over one check interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueWait {
    pub total: Duration,
    /// Inferences that went through the worker queue (whether or not they had to wait).
    pub samples: u64,
}

impl QueueWait {
    /// Adds one inference's wait.
    pub fn record(&mut self, waited: Duration) {
        self.total = self.total.saturating_add(waited);
        self.samples += 1;
    }

    /// The mean wait; `None` before the first sample.
    pub fn mean(&self) -> Option<Duration> {
        let samples = u32::try_from(self.samples).unwrap_or(u32::MAX);
        (samples > 0).then(|| self.total / samples)
    }
}

/// What this pod's copy of a model went through over the last check interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CopyLoad {
    /// Requests it served, per minute.
    pub requests_per_minute: f64,
    /// How long its inferences waited for a worker.
    pub queue_wait: QueueWait,
}

/// When a copy is busy enough to get another; each rule is off at zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddCopyThresholds {
    /// Requests per minute on one copy (ModelMesh's starting point: 2,000).
    pub requests_per_minute: f64,
    /// Mean time its inferences wait for a worker: past it, the pod is the bottleneck whatever the rate.
    pub queue_wait: Duration,
}

impl AddCopyThresholds {
    /// Whether any rule is on.
    pub fn any(&self) -> bool {
        self.requests_per_minute > 0.0 || !self.queue_wait.is_zero()
    }
}

/// Where a model's copies stand in the cluster, as the pod holding one sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copies {
    /// Live pods holding a loaded copy, this one included.
    pub holders: usize,
    pub live_pods: usize,
    /// Another pod is loading a copy already (one the rules asked for, or a first load racing).
    pub loading_elsewhere: bool,
}

/// Why a copy is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddCopyReason {
    RequestRate,
    QueueWait,
}

/// Whether to add a copy of a model on another pod, and why: this pod's copy serves more than the
/// request-rate threshold, or its inferences waited longer than the queue-wait threshold on average
/// (over at least [`MIN_QUEUE_WAIT_SAMPLES`] of them); and no other copy is loading already, and
/// there is a pod without one.
pub fn add_copy(load: &CopyLoad, thresholds: &AddCopyThresholds, copies: &Copies) -> Option<AddCopyReason> {
    if copies.loading_elsewhere || copies.holders >= copies.live_pods {
        return None;
    }
    if thresholds.requests_per_minute > 0.0 && load.requests_per_minute > thresholds.requests_per_minute {
        return Some(AddCopyReason::RequestRate);
    }
    let waited = load.queue_wait.mean().filter(|_| load.queue_wait.samples >= MIN_QUEUE_WAIT_SAMPLES);
    if !thresholds.queue_wait.is_zero() && waited.is_some_and(|mean| mean > thresholds.queue_wait) {
        return Some(AddCopyReason::QueueWait);
    }
    None
}

#[cfg(test)]
mod add_tests {
    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn load(rate: f64, mean_wait: Duration, samples: u64) -> CopyLoad {
        let total = mean_wait * u32::try_from(samples).unwrap();
        CopyLoad { requests_per_minute: rate, queue_wait: QueueWait { total, samples } }
    }

    fn thresholds(rate: f64, wait: Duration) -> AddCopyThresholds {
        AddCopyThresholds { requests_per_minute: rate, queue_wait: wait }
    }

    const ROOM: Copies = Copies { holders: 1, live_pods: 3, loading_elsewhere: false };

    #[test]
    fn a_copy_is_added_above_the_rate_when_a_pod_is_free() {
        let t = thresholds(2000.0, Duration::ZERO);
        assert_eq!(add_copy(&load(2500.0, MS, 10), &t, &ROOM), Some(AddCopyReason::RequestRate));
        assert_eq!(add_copy(&load(1500.0, MS, 10), &t, &ROOM), None, "below the threshold");
        let loading = Copies { loading_elsewhere: true, ..ROOM };
        assert_eq!(add_copy(&load(2500.0, MS, 10), &t, &loading), None, "one already loading");
        let full = Copies { holders: 3, ..ROOM };
        assert_eq!(add_copy(&load(2500.0, MS, 10), &t, &full), None, "every pod holds one");
        assert_eq!(
            add_copy(&load(2500.0, MS, 10), &thresholds(0.0, Duration::ZERO), &ROOM),
            None,
            "0 turns it off"
        );
    }

    #[test]
    fn a_copy_is_added_when_inferences_queue_past_the_wait_threshold() {
        let t = thresholds(2000.0, 50 * MS);
        assert_eq!(
            add_copy(&load(60.0, 80 * MS, 20), &t, &ROOM),
            Some(AddCopyReason::QueueWait),
            "slow, not busy"
        );
        assert_eq!(add_copy(&load(60.0, 40 * MS, 20), &t, &ROOM), None, "below the wait threshold");
        assert_eq!(add_copy(&load(60.0, 50 * MS, 20), &t, &ROOM), None, "at it is not past it");
        let few = MIN_QUEUE_WAIT_SAMPLES - 1;
        assert_eq!(add_copy(&load(60.0, 900 * MS, few), &t, &ROOM), None, "too few waits to tell");
        assert_eq!(
            add_copy(&load(60.0, 900 * MS, 20), &thresholds(2000.0, Duration::ZERO), &ROOM),
            None,
            "0 turns it off"
        );
        let full = Copies { holders: 3, ..ROOM };
        assert_eq!(add_copy(&load(60.0, 900 * MS, 20), &t, &full), None, "every pod holds one");
        assert_eq!(
            add_copy(&load(3000.0, 900 * MS, 20), &t, &ROOM),
            Some(AddCopyReason::RequestRate),
            "the rate rule is named first when both hold"
        );
    }

    #[test]
    fn queue_wait_means() {
        let mut wait = QueueWait::default();
        assert_eq!(wait.mean(), None);
        wait.record(10 * MS);
        wait.record(30 * MS);
        wait.record(Duration::ZERO);
        wait.record(Duration::ZERO);
        assert_eq!(wait.mean(), Some(10 * MS), "inferences that did not wait count too");
        assert_eq!(wait.samples, 4);
    }

    proptest! {
        #[test]
        fn never_a_copy_without_a_free_pod_or_while_one_loads(
            rate in 0.0f64..10_000.0, wait_ms in 0u64..1000, samples in 0u64..100,
            rate_t in 0.0f64..5000.0, wait_t in 0u64..500,
            holders in 1usize..6, pods in 1usize..6, loading in any::<bool>(),
        ) {
            let copies = Copies { holders, live_pods: pods, loading_elsewhere: loading };
            let added = add_copy(&load(rate, ms(wait_ms), samples), &thresholds(rate_t, ms(wait_t)), &copies);
            if holders >= pods || loading {
                prop_assert_eq!(added, None);
            }
        }

        #[test]
        fn more_load_never_takes_a_copy_back(
            rate in 0.0f64..10_000.0, wait_ms in 0u64..1000, samples in 0u64..100,
            more_rate in 0.0f64..10_000.0, more_wait_ms in 0u64..1000, more_samples in 0u64..100,
            rate_t in 0.0f64..5000.0, wait_t in 0u64..500,
        ) {
            let t = thresholds(rate_t, ms(wait_t));
            let before = add_copy(&load(rate, ms(wait_ms), samples), &t, &ROOM);
            let busier = load(rate + more_rate, ms(wait_ms + more_wait_ms), samples + more_samples);
            if before.is_some() {
                prop_assert!(add_copy(&busier, &t, &ROOM).is_some());
            }
        }

        #[test]
        fn each_rule_fires_only_past_its_own_threshold(
            rate in 0.0f64..10_000.0, wait_ms in 0u64..1000, samples in 0u64..100,
            rate_t in 0.0f64..5000.0, wait_t in 0u64..500,
        ) {
            let t = thresholds(rate_t, ms(wait_t));
            match add_copy(&load(rate, ms(wait_ms), samples), &t, &ROOM) {
                Some(AddCopyReason::RequestRate) => prop_assert!(rate_t > 0.0 && rate > rate_t),
                Some(AddCopyReason::QueueWait) => {
                    prop_assert!(wait_t > 0 && wait_ms > wait_t && samples >= MIN_QUEUE_WAIT_SAMPLES);
                }
                None => {
                    prop_assert!(!(rate_t > 0.0 && rate > rate_t));
                    prop_assert!(!(wait_t > 0 && wait_ms > wait_t && samples >= MIN_QUEUE_WAIT_SAMPLES));
                }
            }
        }
    }
}
