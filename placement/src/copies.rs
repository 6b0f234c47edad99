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
