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

/// Whether to add a copy of a model on another pod: this pod's copy serves more than
/// `threshold_per_minute` requests, no other copy is loading already, and there is a pod without one.
pub fn add_copy(
    rate_per_minute: f64,
    threshold_per_minute: f64,
    holders: usize,
    live_pods: usize,
    loading_elsewhere: bool,
) -> bool {
    threshold_per_minute > 0.0
        && rate_per_minute > threshold_per_minute
        && !loading_elsewhere
        && holders < live_pods
}

#[cfg(test)]
mod add_tests {
    use super::*;

    #[test]
    fn a_copy_is_added_above_the_rate_when_a_pod_is_free() {
        assert!(add_copy(2500.0, 2000.0, 1, 3, false));
        assert!(!add_copy(1500.0, 2000.0, 1, 3, false), "below the threshold");
        assert!(!add_copy(2500.0, 2000.0, 1, 3, true), "one already loading");
        assert!(!add_copy(2500.0, 2000.0, 3, 3, false), "every pod holds one");
        assert!(!add_copy(2500.0, 0.0, 1, 3, false), "0 turns it off");
    }
}
