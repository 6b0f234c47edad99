//! The controller's decisions, as pure functions of the object and what the mesh reported: which
//! management calls bring the mesh to the object's spec, and what the object's status says.

use densemesh_proto::admin::{VModelState, model_state};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{
    Addressable, ComponentStatus, FailureInfo, FailureReason, InferenceServiceStatus, ModelCopies,
    ModelRevisionStates, ModelState, ModelStatus, PredictorStatus, TrafficTarget, TransitionStatus,
};
use crate::mapping::{Desired, SpecError};

/// How a model is registered: modelmesh-serving's `ModelInfo` plus the size hint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRegistration {
    pub model_id: String,
    pub model_type: String,
    pub path: String,
    pub key: String,
    pub size_bytes: Option<u64>,
    pub min_copies: Option<u32>,
    /// `preferred` or `required`; `None`: nothing asked.
    pub gpu: Option<String>,
}

/// One management-API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshCall {
    /// Points the vmodel at `model` (registering it, deleted with the vmodel), loading it now.
    SetVModel {
        vmodel_id: String,
        owner: String,
        model: ModelRegistration,
    },
    /// Points the vmodel back at a model it already knows (registered as it is).
    Retarget {
        vmodel_id: String,
        owner: String,
        model_id: String,
    },
    /// Registers a canary revision and loads it now, without moving the vmodel.
    RegisterModel {
        model: ModelRegistration,
    },
    UnregisterModel {
        model_id: String,
    },
    /// Weights the vmodel's traffic; empty returns it to its single active model.
    SetSplit {
        vmodel_id: String,
        split: Vec<(String, u32)>,
    },
    DeleteVModel {
        vmodel_id: String,
        owner: String,
    },
    /// Registers or replaces an inference graph (Admin.SetGraph); `spec_json` is its spec.
    SetGraph {
        name: String,
        spec_json: String,
    },
    /// Removes an inference graph; one already gone is no error.
    DeleteGraph {
        name: String,
    },
}

impl Desired {
    fn registration(&self) -> ModelRegistration {
        ModelRegistration {
            model_id: self.model_id.clone(),
            model_type: self.model_type.clone(),
            path: self.path.clone(),
            key: self.key.clone(),
            size_bytes: self.size_bytes,
            min_copies: self.min_copies,
            gpu: self.gpu.clone(),
        }
    }
}

/// What the object's last status says of its rollout: the revision that last took all traffic
/// (a canary splits against it) and the newest revision it asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollout {
    pub rolled_out: Option<String>,
    pub created: Option<String>,
}

impl Rollout {
    pub fn of_isvc(status: Option<&InferenceServiceStatus>) -> Self {
        let predictor = status.and_then(|s| s.components.get("predictor"));
        Rollout {
            rolled_out: predictor.and_then(|p| p.latest_rolledout_revision.clone()),
            created: predictor.and_then(|p| p.latest_created_revision.clone()),
        }
    }

    /// Without an object status to remember it, the rollout is read off the mesh: a split's first
    /// model is the stable revision (as `plan` orders splits), else the active model.
    pub fn of_mesh(mesh: Option<&VModelState>) -> Self {
        let Some(mesh) = mesh else { return Rollout::default() };
        match mesh.split.as_slice() {
            [stable, canary, ..] => {
                Rollout { rolled_out: Some(stable.model_id.clone()), created: Some(canary.model_id.clone()) }
            }
            _ => Rollout { rolled_out: Some(mesh.active_model_id.clone()), created: None },
        }
    }
}

/// How long after a revision failed to load everywhere the controller asks the mesh to load it
/// again (modelmesh-serving's `loadNow` for failed specs): the storage may have been fixed since.
pub const RETRY_FAILED_AFTER_MS: u64 = 30_000;

/// The calls that move the mesh from `mesh` (the vmodel as last reported; `None` when it does not
/// exist) to `desired`. Empty when the mesh is already there, so a reconcile that changes nothing
/// writes nothing.
pub fn plan(desired: &Desired, mesh: Option<&VModelState>, rollout: &Rollout, now_ms: u64) -> Vec<MeshCall> {
    let set_vmodel = || MeshCall::SetVModel {
        vmodel_id: desired.vmodel_id.clone(),
        owner: desired.owner.to_owned(),
        model: desired.registration(),
    };
    let Some(mesh) = mesh else {
        return vec![set_vmodel()];
    };
    let split: Vec<(String, u32)> = mesh.split.iter().map(|w| (w.model_id.clone(), w.weight)).collect();
    let mut calls = Vec::new();
    let stable = rollout.rolled_out.as_deref().filter(|s| *s != desired.model_id);
    // A canary revision the spec no longer asks for is unregistered: unlike revisions the vmodel
    // moved to, nothing deletes it with the vmodel.
    let stale_canary = rollout.created.as_deref().filter(|c| {
        *c != desired.model_id
            && Some(*c) != rollout.rolled_out.as_deref()
            && *c != mesh.active_model_id
            && *c != mesh.target_model_id
            && registered(mesh, c)
    });
    match (desired.canary_percent, stable) {
        (Some(percent), Some(stable)) if stable == mesh.active_model_id => {
            if mesh.target_model_id != stable {
                // A rollout of the new revision began before the canary was asked for: stay on
                // the stable one.
                calls.push(MeshCall::Retarget {
                    vmodel_id: desired.vmodel_id.clone(),
                    owner: desired.owner.to_owned(),
                    model_id: stable.to_owned(),
                });
            }
            let want = if percent == 0 {
                Vec::new()
            } else {
                vec![(stable.to_owned(), 100 - percent), (desired.model_id.clone(), percent)]
            };
            if percent > 0 && !registered(mesh, &desired.model_id) {
                calls.push(MeshCall::RegisterModel { model: desired.registration() });
            }
            if split != want {
                calls.push(MeshCall::SetSplit { vmodel_id: desired.vmodel_id.clone(), split: want });
            }
            if percent == 0 && registered(mesh, &desired.model_id) {
                calls.push(MeshCall::UnregisterModel { model_id: desired.model_id.clone() });
            }
        }
        _ => {
            if !split.is_empty() {
                calls.push(MeshCall::SetSplit { vmodel_id: desired.vmodel_id.clone(), split: Vec::new() });
            }
            if mesh.target_model_id != desired.model_id {
                calls.push(set_vmodel());
            } else if let Some(failed) = model(mesh, &desired.model_id)
                .filter(|m| m.state() == model_state::State::FailedToLoad)
                .filter(|m| now_ms.saturating_sub(m.last_failure_ms) >= RETRY_FAILED_AFTER_MS)
            {
                // Failed everywhere a while ago: load it again, as for a new spec.
                debug_assert_eq!(failed.model_id, desired.model_id);
                calls.push(set_vmodel());
            }
        }
    }
    if let Some(stale) = stale_canary {
        calls.push(MeshCall::UnregisterModel { model_id: stale.to_owned() });
    }
    calls
}

fn model<'a>(mesh: &'a VModelState, id: &str) -> Option<&'a densemesh_proto::admin::ModelState> {
    mesh.models.iter().find(|m| m.model_id == id)
}

fn registered(mesh: &VModelState, id: &str) -> bool {
    model(mesh, id).is_some_and(|m| m.state() != model_state::State::Pending)
}

fn state_of(mesh: &VModelState, id: &str) -> ModelState {
    match model(mesh, id).map(|m| m.state()) {
        None | Some(model_state::State::Pending) => ModelState::Pending,
        Some(model_state::State::Standby) => ModelState::Standby,
        Some(model_state::State::Loading) => ModelState::Loading,
        Some(model_state::State::Loaded) => ModelState::Loaded,
        Some(model_state::State::FailedToLoad) => ModelState::FailedToLoad,
    }
}

/// Where clients reach the mesh, as the object's status shows it.
#[derive(Debug, Clone, Default)]
pub struct Urls {
    pub grpc: String,
    pub rest: String,
}

/// The model-level status both kinds share.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    active: ModelState,
    target: Option<ModelState>,
    transition: TransitionStatus,
    copies: ModelCopies,
    failure: Option<FailureInfo>,
    ready: bool,
    /// Why not ready, for the conditions.
    reason: &'static str,
    message: String,
}

/// `rolled_out`: the revision that has served all traffic before; paged out of memory (Standby), it
/// still serves, since the mesh loads it on first use. A revision that never loaded is not ready
/// just because it is registered.
fn summarize(
    desired: &Result<Desired, SpecError>,
    mesh: Option<&VModelState>,
    rolled_out: Option<&str>,
) -> Summary {
    let mut s = Summary {
        active: ModelState::Pending,
        target: None,
        transition: TransitionStatus::InProgress,
        copies: ModelCopies::default(),
        failure: None,
        ready: false,
        reason: "ModelPending",
        message: "waiting for the mesh".into(),
    };
    if let Some(mesh) = mesh {
        s.active = state_of(mesh, &mesh.active_model_id);
        if mesh.target_model_id != mesh.active_model_id {
            s.target = Some(state_of(mesh, &mesh.target_model_id));
        }
        if let Some(active) = model(mesh, &mesh.active_model_id) {
            s.copies = ModelCopies {
                failed_copies: i64::from(active.failed_copies),
                total_copies: i64::from(active.total_copies),
            };
        }
        let failing = [&mesh.target_model_id, &mesh.active_model_id]
            .into_iter()
            .filter_map(|id| model(mesh, id))
            .find(|m| m.state() == model_state::State::FailedToLoad);
        s.failure = failing.map(|m| FailureInfo {
            reason: FailureReason::ModelLoadFailed,
            message: m.last_failure_message.clone(),
            model_revision_name: Some(m.model_id.clone()),
            location: Some(m.last_failure_instance.clone()).filter(|l| !l.is_empty()),
            time: time_of_ms(m.last_failure_ms),
        });
        let wanted = desired.as_ref().map(|d| d.model_id.as_str()).ok();
        let blocked = !mesh.transition_error.is_empty() || s.target == Some(ModelState::FailedToLoad);
        s.transition = if wanted
            .is_some_and(|w| w != mesh.target_model_id && !mesh.split.iter().any(|x| x.model_id == w))
        {
            TransitionStatus::InProgress
        } else if mesh.target_model_id != mesh.active_model_id {
            if blocked { TransitionStatus::BlockedByFailedLoad } else { TransitionStatus::InProgress }
        } else {
            TransitionStatus::UpToDate
        };
        s.ready = s.active == ModelState::Loaded
            || (s.active == ModelState::Standby && rolled_out == Some(mesh.active_model_id.as_str()));
        (s.reason, s.message) = match s.active {
            _ if s.ready => ("", String::new()),
            ModelState::Loaded | ModelState::Standby => {
                ("ModelPending", format!("model {} is registered and not loaded yet", mesh.active_model_id))
            }
            ModelState::Loading => ("ModelLoading", format!("model {} is loading", mesh.active_model_id)),
            ModelState::Pending | ModelState::Unknown => {
                ("ModelPending", format!("model {} is not registered yet", mesh.active_model_id))
            }
            ModelState::FailedToLoad => (
                "ModelLoadFailed",
                format!(
                    "model {} failed to load: {}",
                    mesh.active_model_id,
                    s.failure.as_ref().map(|f| f.message.as_str()).unwrap_or("no reason given")
                ),
            ),
        };
    }
    if let Err(err) = desired {
        s.transition = TransitionStatus::InvalidSpec;
        s.failure =
            Some(FailureInfo { reason: err.reason, message: err.message.clone(), ..Default::default() });
        if !s.ready {
            s.reason = "InvalidSpec";
            s.message = err.message.clone();
        }
    }
    s
}

fn time_of_ms(ms: u64) -> Option<Time> {
    (ms > 0).then(|| Timestamp::from_millisecond(i64::try_from(ms).ok()?).ok()).flatten().map(Time)
}

/// A condition, keeping its transition time when its status has not changed (so an unchanged
/// status is an unchanged object and no write).
pub(crate) fn condition(
    previous: &[Condition],
    type_: &str,
    ready: bool,
    reason: &str,
    message: &str,
    now: &Time,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: if ready { "Ready".into() } else { reason.into() },
        message: message.into(),
        last_transition_time: since,
        observed_generation: None,
    }
}

/// The InferenceService status for what the mesh reported.
pub fn isvc_status(
    desired: &Result<Desired, SpecError>,
    mesh: Option<&VModelState>,
    previous: Option<&InferenceServiceStatus>,
    generation: Option<i64>,
    urls: &Urls,
    now: &Time,
) -> InferenceServiceStatus {
    let prev_rollout = Rollout::of_isvc(previous);
    let s = summarize(desired, mesh, prev_rollout.rolled_out.as_deref());
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let mut predictor = ComponentStatus {
        grpc_url: Some(urls.grpc.clone()),
        rest_url: Some(urls.rest.clone()),
        url: Some(urls.grpc.clone()),
        latest_created_revision: desired.as_ref().ok().map(|d| d.model_id.clone()).or(prev_rollout.created),
        latest_rolledout_revision: prev_rollout.rolled_out.clone(),
        previous_rolledout_revision: previous
            .and_then(|p| p.components.get("predictor"))
            .and_then(|p| p.previous_rolledout_revision.clone()),
        traffic: Vec::new(),
    };
    if let Some(mesh) = mesh {
        // A revision is rolled out once it is active, targeted, loaded and takes all traffic.
        if mesh.split.is_empty()
            && mesh.target_model_id == mesh.active_model_id
            && s.ready
            && prev_rollout.rolled_out.as_deref() != Some(mesh.active_model_id.as_str())
        {
            predictor.previous_rolledout_revision = prev_rollout.rolled_out.clone();
            predictor.latest_rolledout_revision = Some(mesh.active_model_id.clone());
        }
        let latest = predictor.latest_created_revision.clone();
        predictor.traffic = if mesh.split.is_empty() {
            vec![TrafficTarget {
                revision_name: mesh.active_model_id.clone(),
                percent: 100,
                latest_revision: Some(latest.as_deref() == Some(mesh.active_model_id.as_str())),
            }]
        } else {
            let total: u64 = mesh.split.iter().map(|w| u64::from(w.weight)).sum::<u64>().max(1);
            mesh.split
                .iter()
                .map(|w| TrafficTarget {
                    revision_name: w.model_id.clone(),
                    percent: i64::try_from(u64::from(w.weight) * 100 / total).unwrap_or(100),
                    latest_revision: Some(latest.as_deref() == Some(w.model_id.as_str())),
                })
                .collect()
        };
    }
    InferenceServiceStatus {
        url: Some(urls.grpc.clone()),
        address: Some(Addressable { url: Some(urls.grpc.clone()) }),
        conditions: vec![
            condition(prev_conditions, "PredictorReady", s.ready, s.reason, &s.message, now),
            condition(prev_conditions, "Ready", s.ready, s.reason, &s.message, now),
        ],
        observed_generation: generation,
        components: [("predictor".to_owned(), predictor)].into(),
        model_status: Some(ModelStatus {
            transition_status: s.transition,
            states: ModelRevisionStates { active_model_state: s.active, target_model_state: s.target },
            copies: Some(s.copies),
            last_failure_info: s.failure,
        }),
    }
}

/// The Predictor status for what the mesh reported.
pub fn predictor_status(
    desired: &Result<Desired, SpecError>,
    mesh: Option<&VModelState>,
    urls: &Urls,
) -> PredictorStatus {
    // A Predictor keeps no rollout record: its active model counts as rolled out.
    let s = summarize(desired, mesh, mesh.map(|m| m.active_model_id.as_str()));
    PredictorStatus {
        available: s.ready,
        active_model_state: s.active,
        target_model_state: s.target,
        transition_status: s.transition,
        last_failure_info: s.failure,
        total_copies: s.copies.total_copies,
        failed_copies: s.copies.failed_copies,
        grpc_endpoint: Some(urls.grpc.clone()),
        http_endpoint: Some(urls.rest.clone()),
    }
}

#[cfg(test)]
mod tests;
