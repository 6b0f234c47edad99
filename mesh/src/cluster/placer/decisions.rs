//! The last few placement decisions this pod made, each with a reason a person can read, so "why did
//! model X go to pod Y?" is answered on the dashboard without reading logs. Only decisions that place
//! a model (a load here or on a peer) or refuse one are kept: the hot path's "a copy serves it" is not
//! a decision worth a line, and recording it would cost every request a lock.

use std::collections::VecDeque;
use std::sync::Arc;

use densemesh_placement::choose::LoadCandidate;
use densemesh_placement::route::{Goal, Refusal, Route};
use parking_lot::Mutex;
use serde::Serialize;

/// How many decisions the dashboard shows; older ones are dropped.
pub const DECISIONS_KEPT: usize = 32;

/// One placement decision, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
    pub model_id: String,
    /// Why it was asked: `serve`, `ensure`, `add_copy` or `hand_off`.
    pub goal: &'static str,
    /// `load_here`, `load_on` or `refuse`.
    pub outcome: &'static str,
    /// The pod chosen to load it; `None` for a refusal.
    pub instance: Option<String>,
    pub reason: String,
}

/// A bounded ring of recent decisions; cloning shares it.
#[derive(Clone)]
pub struct DecisionLog {
    ring: Arc<Mutex<VecDeque<Decision>>>,
    capacity: usize,
}

impl Default for DecisionLog {
    fn default() -> Self {
        Self::with_capacity(DECISIONS_KEPT)
    }
}

impl DecisionLog {
    /// A log keeping the last `capacity` decisions (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { ring: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))), capacity }
    }

    /// Keeps `decision`, dropping the oldest when full.
    pub fn record(&self, decision: Decision) {
        let mut ring = self.ring.lock();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(decision);
    }

    /// The decisions kept, newest first.
    pub fn recent(&self) -> Vec<Decision> {
        self.ring.lock().iter().rev().cloned().collect()
    }
}

/// What the explanation reads besides the answer: the same plain data `route` read.
pub struct Asked<'a> {
    pub model_id: &'a str,
    pub goal: Goal,
    pub pods: &'a [LoadCandidate],
    pub predicted_bytes: u64,
    pub at_ms: u64,
}

/// The decision to keep for `route`'s answer, `None` when the answer places nothing (a copy serves
/// it, or the request waits for a load already under way).
pub fn explain(asked: &Asked<'_>, answer: &Route, this: &str) -> Option<Decision> {
    let (outcome, instance) = match answer {
        Route::LoadHere => ("load_here", Some(this.to_owned())),
        Route::LoadOn(peer) => ("load_on", Some(peer.clone())),
        Route::Refuse(_) => ("refuse", None),
        Route::Here | Route::Copy(_) | Route::WaitFor(_) => return None,
    };
    let reason = match (answer, &instance) {
        (Route::Refuse(refusal), _) => refusal_reason(refusal),
        (_, Some(chosen)) => load_reason(asked, chosen),
        (_, None) => String::new(),
    };
    Some(Decision {
        at_ms: asked.at_ms,
        model_id: asked.model_id.to_owned(),
        goal: goal_name(asked.goal),
        outcome,
        instance,
        reason,
    })
}

fn goal_name(goal: Goal) -> &'static str {
    match goal {
        Goal::Serve => "serve",
        Goal::Ensure => "ensure",
        Goal::AddCopy => "add_copy",
        Goal::HandOff => "hand_off",
    }
}

/// Which of `choose_load_target`'s two rules picked `chosen`: room, or the coldest LRU.
fn load_reason(asked: &Asked<'_>, chosen: &str) -> String {
    let predicted = if asked.predicted_bytes == 0 {
        "size unknown".to_owned()
    } else {
        format!("predicted {}", human_bytes(asked.predicted_bytes))
    };
    let considered = asked.pods.iter().filter(|p| p.offers_type && !p.draining).count();
    let Some(pod) = asked.pods.iter().find(|p| p.instance == chosen) else {
        return format!("{predicted}; chosen among {considered} pods");
    };
    let free = pod.capacity_bytes.saturating_sub(pod.used_bytes);
    if free >= asked.predicted_bytes {
        let used_pct = pod.used_bytes.saturating_mul(100) / pod.capacity_bytes.max(1);
        format!(
            "{predicted}; room: {} free of {} ({used_pct}% used, least used of {considered} pods)",
            human_bytes(free),
            human_bytes(pod.capacity_bytes)
        )
    } else {
        let coldest = pod.coldest_model.as_deref().unwrap_or("nothing");
        format!(
            "{predicted}; no pod had room: coldest LRU in the cluster, evicts {coldest} idle {}s",
            pod.lru_age_seconds
        )
    }
}

fn refusal_reason(refusal: &Refusal) -> String {
    match refusal {
        Refusal::TooLarge { predicted_bytes, largest_capacity_bytes } => format!(
            "too large: predicted {} exceeds the largest capacity {}",
            human_bytes(*predicted_bytes),
            human_bytes(*largest_capacity_bytes)
        ),
        Refusal::WouldEvictRecent { instance, model, used_secs_ago, anti_churn_age } => format!(
            "anti-churn: loading it would evict {} on {instance}, used {used_secs_ago}s ago (< {}s)",
            model.as_deref().unwrap_or("a model"),
            anti_churn_age.as_secs()
        ),
        Refusal::NoPod => "no pod may load it now (draining or backing off)".to_owned(),
        Refusal::NoPodOffers { model_type } => format!("no live pod offers type {model_type}"),
        Refusal::NoGpu { predicted_bytes, largest_device_bytes } => format!(
            "requires a GPU: predicted {} and the largest device holds {}",
            human_bytes(*predicted_bytes),
            human_bytes(*largest_device_bytes)
        ),
    }
}

/// Bytes in binary units, one decimal, for reasons a person reads.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, capacity: u64, used: u64, lru: u64, coldest: Option<&str>) -> LoadCandidate {
        LoadCandidate {
            instance: name.into(),
            capacity_bytes: capacity,
            used_bytes: used,
            loading: 0,
            lru_age_seconds: lru,
            coldest_model: coldest.map(str::to_owned),
            cheapest_victims: None,
            draining: false,
            offers_type: true,
            retry_after_ms: None,
            gpu: Default::default(),
        }
    }

    fn asked<'a>(pods: &'a [LoadCandidate], predicted: u64) -> Asked<'a> {
        Asked { model_id: "m", goal: Goal::Serve, pods, predicted_bytes: predicted, at_ms: 7 }
    }

    #[test]
    fn serving_from_a_copy_is_not_a_decision() {
        let pods = [pod("a", 100, 0, 0, None)];
        for answer in [Route::Here, Route::Copy("b".into()), Route::WaitFor("b".into())] {
            assert_eq!(explain(&asked(&pods, 10), &answer, "a"), None);
        }
    }

    #[test]
    fn a_load_with_room_says_so() {
        let pods = [pod("a", 1 << 20, 1 << 19, 0, None), pod("b", 1 << 20, 0, 0, None)];
        let d = explain(&asked(&pods, 1024), &Route::LoadOn("b".into()), "a").expect("a decision");
        assert_eq!((d.outcome, d.instance.as_deref(), d.goal, d.at_ms), ("load_on", Some("b"), "serve", 7));
        assert_eq!(
            d.reason,
            "predicted 1.0 KiB; room: 1.0 MiB free of 1.0 MiB (0% used, least used of 2 pods)"
        );
    }

    #[test]
    fn a_load_without_room_names_the_coldest_model() {
        let pods = [pod("a", 100, 100, 30, Some("old"))];
        let d = explain(&asked(&pods, 50), &Route::LoadHere, "a").expect("a decision");
        assert_eq!(d.instance.as_deref(), Some("a"));
        assert_eq!(
            d.reason,
            "predicted 50 B; no pod had room: coldest LRU in the cluster, evicts old idle 30s"
        );
    }

    #[test]
    fn a_refusal_says_why() {
        let refusal = Refusal::NoPodOffers { model_type: "onnx".into() };
        let d = explain(&asked(&[], 0), &Route::Refuse(refusal), "a").expect("a decision");
        assert_eq!((d.outcome, d.instance), ("refuse", None));
        assert_eq!(d.reason, "no live pod offers type onnx");
    }

    #[test]
    fn the_log_keeps_the_newest_within_its_capacity() {
        let log = DecisionLog::with_capacity(2);
        for at_ms in 1..=3 {
            log.record(Decision {
                at_ms,
                model_id: "m".into(),
                goal: "serve",
                outcome: "load_here",
                instance: Some("a".into()),
                reason: String::new(),
            });
        }
        let kept: Vec<u64> = log.recent().iter().map(|d| d.at_ms).collect();
        assert_eq!(kept, [3, 2]);
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
