//! Where to load a model no pod holds: a pure decision over what the cluster view says.
//!
//! Among live pods that are not draining and have not failed this model recently: one with free
//! capacity for the predicted size, least-used fraction first (this pod on ties, to save a hop); if
//! none has room, the pod whose least recently used model is the coldest in the cluster (cluster-wide
//! LRU). Pods already loading many models are penalised in both orders.
//!
//! Where to send a request for a model other pods hold: [`choose_copy`], the least busy copy that has
//! not already failed this request.

/// A pod as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadCandidate {
    pub instance: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Loads in progress on it.
    pub loading: u64,
    /// Seconds since its least recently used model was used.
    pub lru_age_seconds: u64,
    pub draining: bool,
    /// It failed to load this model and the back-off has not passed.
    pub failed_recently: bool,
}

impl LoadCandidate {
    /// A pod as its published instance record describes it (not known to have failed the model).
    pub fn from_record(instance: &str, record: &crate::InstanceRecord) -> Self {
        Self {
            instance: instance.to_owned(),
            capacity_bytes: record.capacity_bytes,
            used_bytes: record.used_bytes,
            loading: record.loading,
            lru_age_seconds: record.lru_age_seconds,
            draining: record.draining,
            failed_recently: false,
        }
    }
}

/// Loads in progress that count like this many extra bytes used per capacity (a tie-breaker).
const LOADING_PENALTY: f64 = 0.05;

/// The pod to load a model of `predicted_bytes` on, preferring `this` on ties; `None` when no pod can.
pub fn choose_load_target<'a>(
    candidates: &'a [LoadCandidate],
    this: &str,
    predicted_bytes: u64,
) -> Option<&'a str> {
    let eligible = candidates
        .iter()
        .filter(|c| !c.draining && !c.failed_recently && c.capacity_bytes >= predicted_bytes);
    let fraction = |c: &LoadCandidate| {
        c.used_bytes as f64 / c.capacity_bytes.max(1) as f64 + LOADING_PENALTY * c.loading as f64
    };
    let with_room = eligible
        .clone()
        .filter(|c| c.capacity_bytes.saturating_sub(c.used_bytes) >= predicted_bytes)
        .min_by(|a, b| {
            fraction(a)
                .total_cmp(&fraction(b))
                .then_with(|| (b.instance == this).cmp(&(a.instance == this)))
                .then_with(|| a.instance.cmp(&b.instance))
        });
    if let Some(c) = with_room {
        return Some(&c.instance);
    }
    eligible
        .max_by(|a, b| {
            a.lru_age_seconds
                .cmp(&b.lru_age_seconds)
                .then_with(|| b.loading.cmp(&a.loading))
                .then_with(|| (a.instance == this).cmp(&(b.instance == this)))
                .then_with(|| b.instance.cmp(&a.instance))
        })
        .map(|c| c.instance.as_str())
}

/// A pod holding a loaded copy of a model, as the pod forwarding a request to it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyHolder {
    pub instance: String,
    /// Requests in flight from the forwarding pod to it.
    pub in_flight: usize,
    /// It failed a request moments ago: likely dead, with records that outlive it until its lease runs
    /// out, so it counts as busier than any copy that did not.
    pub failed_recently: bool,
}

/// The copy to send a request to: the least busy (fewest requests in flight, recently failed pods
/// last), never one in `failed` (it could not serve this request already); on ties the first listed.
/// `None` when every copy failed.
pub fn choose_copy<'a>(holders: &'a [CopyHolder], failed: &[&str]) -> Option<&'a str> {
    holders
        .iter()
        .filter(|h| !failed.contains(&h.instance.as_str()))
        .min_by_key(|h| (h.failed_recently, h.in_flight))
        .map(|h| h.instance.as_str())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pod(name: &str, capacity: u64, used: u64, lru: u64) -> LoadCandidate {
        LoadCandidate {
            instance: name.into(),
            capacity_bytes: capacity,
            used_bytes: used,
            loading: 0,
            lru_age_seconds: lru,
            draining: false,
            failed_recently: false,
        }
    }

    #[test]
    fn prefers_room_then_least_used_then_this_pod() {
        let pods = [pod("a", 100, 80, 0), pod("b", 100, 30, 0), pod("me", 100, 30, 0)];
        assert_eq!(choose_load_target(&pods, "me", 10), Some("me"), "ties go to this pod");
        assert_eq!(choose_load_target(&pods, "x", 10), Some("b"));
        assert_eq!(choose_load_target(&pods, "x", 50), Some("b"), "only b and me have 50 free");
    }

    #[test]
    fn without_room_the_coldest_lru_in_the_cluster_goes() {
        let pods = [pod("a", 100, 100, 30), pod("b", 100, 95, 600), pod("c", 100, 90, 5)];
        assert_eq!(choose_load_target(&pods, "a", 20), Some("b"));
    }

    #[test]
    fn never_draining_failed_or_too_small() {
        let mut draining = pod("d", 1000, 0, 999);
        draining.draining = true;
        let mut failed = pod("f", 1000, 0, 999);
        failed.failed_recently = true;
        let small = pod("s", 10, 0, 999);
        assert_eq!(choose_load_target(&[draining, failed, small.clone()], "x", 50), None);
        assert_eq!(choose_load_target(&[small], "x", 5), Some("s"));
    }

    fn arb_pod() -> impl Strategy<Value = LoadCandidate> {
        ("[a-e]", 1u64..1000, 0u64..1200, 0u64..5, 0u64..10_000, any::<bool>(), any::<bool>()).prop_map(
            |(name, capacity, used, loading, lru, draining, failed)| LoadCandidate {
                instance: name,
                capacity_bytes: capacity,
                used_bytes: used.min(capacity),
                loading,
                lru_age_seconds: lru,
                draining,
                failed_recently: failed,
            },
        )
    }

    fn holder(name: &str, in_flight: usize) -> CopyHolder {
        CopyHolder { instance: name.into(), in_flight, failed_recently: false }
    }

    #[test]
    fn copies_least_busy_first_never_a_failed_one() {
        let copies = [holder("a", 2), holder("b", 0), holder("c", 0)];
        assert_eq!(choose_copy(&copies, &[]), Some("b"), "the first of the least busy");
        assert_eq!(choose_copy(&copies, &["b"]), Some("c"));
        assert_eq!(choose_copy(&copies, &["b", "c"]), Some("a"), "a busy copy beats none");
        assert_eq!(choose_copy(&copies, &["a", "b", "c"]), None);
        assert_eq!(choose_copy(&[], &[]), None);
        let shaky = [CopyHolder { failed_recently: true, ..holder("b", 0) }, holder("a", 5)];
        assert_eq!(choose_copy(&shaky, &[]), Some("a"), "a pod that just failed goes last");
        assert_eq!(choose_copy(&shaky, &["a"]), Some("b"), "yet before none at all");
    }

    proptest! {
        #[test]
        fn the_copy_chosen_has_not_failed_and_is_least_busy(
            loads in proptest::collection::vec((0usize..5, any::<bool>()), 0..8),
            failed in proptest::collection::vec(0usize..8, 0..8),
        ) {
            let copies: Vec<CopyHolder> = loads
                .iter()
                .enumerate()
                .map(|(i, (n, shaky))| CopyHolder { failed_recently: *shaky, ..holder(&format!("p{i}"), *n) })
                .collect();
            let names: Vec<String> = failed.iter().map(|i| format!("p{i}")).collect();
            let failed: Vec<&str> = names.iter().map(String::as_str).collect();
            let open: Vec<&CopyHolder> =
                copies.iter().filter(|c| !failed.contains(&c.instance.as_str())).collect();
            match choose_copy(&copies, &failed) {
                Some(name) => {
                    prop_assert!(!failed.contains(&name));
                    let chosen = copies.iter().find(|c| c.instance == name).unwrap();
                    let busyness = |c: &CopyHolder| (c.failed_recently, c.in_flight);
                    prop_assert!(open.iter().all(|c| busyness(c) >= busyness(chosen)));
                }
                None => prop_assert!(open.is_empty()),
            }
        }

        #[test]
        fn the_choice_is_always_eligible(pods in proptest::collection::vec(arb_pod(), 0..8), size in 1u64..1000) {
            match choose_load_target(&pods, "a", size) {
                Some(name) => {
                    let ok = pods.iter().any(|p| p.instance == name && !p.draining && !p.failed_recently && p.capacity_bytes >= size);
                    prop_assert!(ok, "chose an ineligible pod");
                    // With room somewhere, the choice has room.
                    let room = |p: &LoadCandidate| !p.draining && !p.failed_recently && p.capacity_bytes - p.used_bytes >= size;
                    if pods.iter().any(room) {
                        prop_assert!(pods.iter().any(|p| p.instance == name && room(p)));
                    }
                }
                None => prop_assert!(pods.iter().all(|p| p.draining || p.failed_recently || p.capacity_bytes < size)),
            }
        }
    }
}
