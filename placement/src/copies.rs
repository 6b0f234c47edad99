//! How many copies of a model the cluster keeps: pure decisions the pods apply to their own copies.

use std::time::Duration;

/// Whether this pod should drop its copy of a model: other live pods hold copies too and this one has
/// been idle for `idle_period`. The last copy is never dropped for idleness (only evicted for room),
/// and of several idle copies the one on the lowest instance id stays, so pods deciding at the same
/// moment never drop them all.
pub fn drop_idle_copy(this: &str, holders: &[&str], idle_for: Duration, idle_period: Duration) -> bool {
    if idle_for < idle_period || !holders.contains(&this) || holders.len() < 2 {
        return false;
    }
    holders.iter().min().is_some_and(|keeper| *keeper != this)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const PERIOD: Duration = Duration::from_secs(60);

    #[test]
    fn extra_idle_copies_go_and_the_last_stays() {
        let idle = Duration::from_secs(61);
        assert!(drop_idle_copy("b", &["a", "b"], idle, PERIOD));
        assert!(!drop_idle_copy("a", &["a", "b"], idle, PERIOD), "the lowest id keeps its copy");
        assert!(!drop_idle_copy("a", &["a"], idle, PERIOD), "never the last copy");
        assert!(!drop_idle_copy("b", &["a", "b"], Duration::from_secs(30), PERIOD), "not while in use");
        assert!(!drop_idle_copy("c", &["a", "b"], idle, PERIOD), "only a copy it holds");
    }

    proptest! {
        #[test]
        fn all_pods_deciding_at_once_keep_exactly_one(n in 1usize..8) {
            let names: Vec<String> = (0..n).map(|i| format!("pod-{i}")).collect();
            let holders: Vec<&str> = names.iter().map(String::as_str).collect();
            let kept = holders.iter().filter(|h| !drop_idle_copy(h, &holders, PERIOD * 2, PERIOD)).count();
            prop_assert_eq!(kept, 1);
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
