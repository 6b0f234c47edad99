//! A vmodel's status as the whole mesh sees it: its spec, and for each model it refers to, whether
//! the model is registered and where its copies stand on every pod. Pure functions over what the
//! cluster view holds; the mesh streams the result to the Kubernetes controller (`WatchVModels`), which
//! learns of load progress this way and never from etcd.
//!
//! One model's state, first rule that holds:
//! - not registered: [`LoadState::Pending`];
//! - a copy loaded on some pod: [`LoadState::Loaded`];
//! - a copy loading on some pod: [`LoadState::Loading`];
//! - some pod's last load of it failed: [`LoadState::FailedToLoad`];
//! - registered, but no live pod offers its type: [`LoadState::Pending`] (it waits for such a pod);
//! - else [`LoadState::Standby`]: it loads on first use.
//!
//! The most recent failure is reported while no copy is loaded, so a model that loads again after a
//! failure, or fails on one pod while another serves it, reads as it serves.

use std::collections::HashMap;

use crate::ModelId;
use crate::spec::{Placement, VModelSpec, Weighted};

/// One model's state across the mesh (see the module documentation for the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadState {
    /// Not registered (yet), or no live pod offers its type.
    Pending,
    /// Registered, loaded nowhere: it loads on first use.
    Standby,
    Loading,
    Loaded,
    /// Some pod failed it and none holds or is loading a copy.
    FailedToLoad,
}

/// How a model stands in the registry, as far as its state goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    Absent,
    /// Registered, and some live pod offers its type.
    Placeable,
    /// Registered, but no live pod offers its type (`--model-types`).
    NoPodOffersType,
}

/// The most recent failed load of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The failure's reason, as the pod recorded it.
    pub message: String,
    /// The pod it failed on.
    pub instance: String,
    /// When, in milliseconds since the epoch on that pod's clock.
    pub at_ms: u64,
}

/// One model across the whole mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelState {
    pub model_id: String,
    pub state: LoadState,
    /// Copies loaded or loading.
    pub total_copies: u32,
    /// Pods whose last load of it failed.
    pub failed_copies: u32,
    /// The most recent failure, while no copy is loaded.
    pub last_failure: Option<Failure>,
    /// What the largest loaded copy is charged; 0 when none is loaded.
    pub size_bytes: u64,
}

/// A vmodel and the state of every model it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VModelState {
    pub vmodel_id: ModelId,
    pub owner: String,
    pub active: String,
    pub target: String,
    pub split: Vec<Weighted>,
    pub transition_error: Option<String>,
    /// One per distinct model among active, target and split members, in that order.
    pub models: Vec<ModelState>,
}

/// A model's state from its registration and its copies (placement records by instance id).
pub fn model_state(
    model_id: &str,
    registration: Registration,
    copies: Option<&HashMap<String, Placement>>,
) -> ModelState {
    let (mut loaded, mut loading, mut failed, mut size_bytes) = (0u32, 0u32, 0u32, 0u64);
    let mut last_failure: Option<(&String, u64, &String)> = None;
    for (instance, placement) in copies.into_iter().flatten() {
        match placement {
            Placement::Loaded { size_bytes: size, .. } => {
                loaded += 1;
                size_bytes = size_bytes.max(*size);
            }
            Placement::Loading { .. } => loading += 1,
            Placement::Failed { since_ms, reason, .. } => {
                failed += 1;
                // Ties go to the larger instance id, so the answer never depends on map order.
                let later = last_failure.is_none_or(|(i, at, _)| (*since_ms, instance) > (at, i));
                if later {
                    last_failure = Some((instance, *since_ms, reason));
                }
            }
        }
    }
    let state = match registration {
        Registration::Absent => LoadState::Pending,
        _ if loaded > 0 => LoadState::Loaded,
        _ if loading > 0 => LoadState::Loading,
        _ if failed > 0 => LoadState::FailedToLoad,
        Registration::NoPodOffersType => LoadState::Pending,
        Registration::Placeable => LoadState::Standby,
    };
    let last_failure = last_failure.filter(|_| loaded == 0).map(|(instance, at_ms, reason)| Failure {
        message: reason.clone(),
        instance: instance.clone(),
        at_ms,
    });
    ModelState {
        model_id: model_id.to_owned(),
        state,
        total_copies: loaded + loading,
        failed_copies: failed,
        last_failure,
        size_bytes,
    }
}

/// The models a vmodel refers to: active, target, then the split's members, each once, in that order.
pub fn referenced_models(spec: &VModelSpec) -> Vec<&str> {
    let mut models: Vec<&str> = Vec::with_capacity(2 + spec.split.len());
    let all = [spec.active.as_str(), spec.target.as_str()]
        .into_iter()
        .chain(spec.split.iter().map(|w| w.model.as_str()));
    for model in all {
        if !model.is_empty() && !models.contains(&model) {
            models.push(model);
        }
    }
    models
}

/// A vmodel's state: its spec, and each model it refers to as `model_state_of` reports it.
pub fn vmodel_state(
    id: &ModelId,
    spec: &VModelSpec,
    mut model_state_of: impl FnMut(&str) -> ModelState,
) -> VModelState {
    VModelState {
        vmodel_id: id.clone(),
        owner: spec.owner.clone(),
        active: spec.active.clone(),
        target: spec.target.clone(),
        split: spec.split.clone(),
        transition_error: spec.transition_error.clone(),
        models: referenced_models(spec).into_iter().map(&mut model_state_of).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(size_bytes: u64) -> Placement {
        Placement::Loaded { since_ms: 1, size_bytes, runtime: String::new() }
    }

    fn loading() -> Placement {
        Placement::Loading { since_ms: 1 }
    }

    fn failed(at: u64, reason: &str) -> Placement {
        Placement::Failed { since_ms: at, reason: reason.into(), retry_after_ms: at + 2_000 }
    }

    fn copies(records: &[(&str, Placement)]) -> HashMap<String, Placement> {
        records.iter().map(|(i, p)| ((*i).to_owned(), p.clone())).collect()
    }

    fn failure(message: &str, instance: &str, at_ms: u64) -> Option<Failure> {
        Some(Failure { message: message.into(), instance: instance.into(), at_ms })
    }

    /// The state of model "m": `state` with `copies` loaded or loading and `failed` failed records,
    /// then the last failure and the size.
    fn want(
        state: LoadState,
        copies: u32,
        failed: u32,
        last_failure: Option<Failure>,
        size: u64,
    ) -> ModelState {
        ModelState {
            model_id: "m".into(),
            state,
            total_copies: copies,
            failed_copies: failed,
            last_failure,
            size_bytes: size,
        }
    }

    #[test]
    fn a_models_state_follows_the_rule_in_order() {
        use LoadState::*;
        use Registration::*;
        let cases = [
            ("not registered", Absent, vec![], want(Pending, 0, 0, None, 0)),
            ("unregistered, a copy left", Absent, vec![("a", loaded(5))], want(Pending, 1, 0, None, 5)),
            ("registered, no copy", Placeable, vec![], want(Standby, 0, 0, None, 0)),
            ("no pod offers its type", NoPodOffersType, vec![], want(Pending, 0, 0, None, 0)),
            ("loading", Placeable, vec![("a", loading())], want(Loading, 1, 0, None, 0)),
            (
                "loaded twice: the largest copy's size",
                Placeable,
                vec![("a", loaded(5)), ("b", loaded(7)), ("c", loading())],
                want(Loaded, 3, 0, None, 7),
            ),
            (
                "loaded on one pod, failed on another: no failure to report",
                Placeable,
                vec![("a", loaded(5)), ("b", failed(9, "bad"))],
                want(Loaded, 1, 1, None, 5),
            ),
            (
                "loading again after a failure elsewhere: the failure still shows",
                Placeable,
                vec![("a", loading()), ("b", failed(9, "bad"))],
                want(Loading, 1, 1, failure("bad", "b", 9), 0),
            ),
            (
                "failed everywhere: the most recent failure",
                Placeable,
                vec![("a", failed(9, "old")), ("b", failed(12, "new")), ("c", failed(3, "older"))],
                want(FailedToLoad, 0, 3, failure("new", "b", 12), 0),
            ),
            (
                "failures at the same instant: the larger instance id, whatever the map order",
                Placeable,
                vec![("a", failed(9, "from a")), ("b", failed(9, "from b"))],
                want(FailedToLoad, 0, 2, failure("from b", "b", 9), 0),
            ),
            (
                "failed while no pod offers its type any more: still failed",
                NoPodOffersType,
                vec![("a", failed(9, "bad"))],
                want(FailedToLoad, 0, 1, failure("bad", "a", 9), 0),
            ),
        ];
        for (case, registration, records, want) in cases {
            assert_eq!(model_state("m", registration, Some(&copies(&records))), want, "{case}");
        }
        assert_eq!(model_state("m", Registration::Placeable, None), want(Standby, 0, 0, None, 0));
    }

    #[test]
    fn a_vmodel_lists_each_model_it_refers_to_once() {
        let spec = VModelSpec {
            active: "v1".into(),
            target: "v2".into(),
            owner: "isvc".into(),
            transition_error: Some("v2 failed".into()),
            split: vec![
                Weighted { model: "v1".into(), weight: 90 },
                Weighted { model: "v3".into(), weight: 10 },
            ],
        };
        let id = ModelId::new("churn").unwrap();
        let state = vmodel_state(&id, &spec, |m| {
            model_state(m, if m == "v1" { Registration::Placeable } else { Registration::Absent }, None)
        });
        let models: Vec<(&str, LoadState)> =
            state.models.iter().map(|m| (m.model_id.as_str(), m.state)).collect();
        assert_eq!(
            models,
            [("v1", LoadState::Standby), ("v2", LoadState::Pending), ("v3", LoadState::Pending)]
        );
        assert_eq!((state.owner.as_str(), state.transition_error.as_deref()), ("isvc", Some("v2 failed")));
        assert_eq!((state.active.as_str(), state.target.as_str(), state.split.len()), ("v1", "v2", 2));
        let settled = VModelSpec { target: "v1".into(), split: vec![], transition_error: None, ..spec };
        assert_eq!(referenced_models(&settled), ["v1"]);
    }
}
