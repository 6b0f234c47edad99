use densemesh_proto::admin::{ModelState as Mesh, VModelState, WeightedModel, model_state::State};

use super::*;
use crate::crd::{InferenceService, ModelFormat};
use crate::mapping::desired_for_isvc;

fn desired(path: &str, canary: Option<u32>) -> Desired {
    let isvc: InferenceService = serde_yaml::from_str(&format!(
        "metadata: {{name: m}}\nspec: {{predictor: {{model: {{modelFormat: {{name: onnx}}, storageUri: \"s3://b/{path}\"}}}}}}"
    ))
    .unwrap();
    Desired { canary_percent: canary, ..desired_for_isvc(&isvc).unwrap() }
}

fn model(id: &str, state: State) -> Mesh {
    Mesh {
        model_id: id.into(),
        state: state as i32,
        total_copies: u32::from(matches!(state, State::Loaded | State::Loading)),
        failed_copies: u32::from(state == State::FailedToLoad),
        last_failure_message: if state == State::FailedToLoad {
            "no such object".into()
        } else {
            String::new()
        },
        last_failure_instance: if state == State::FailedToLoad { "pod-a".into() } else { String::new() },
        last_failure_ms: if state == State::FailedToLoad { 1_700_000_000_000 } else { 0 },
        size_bytes: 0,
    }
}

fn vmodel(active: &str, target: &str, models: Vec<Mesh>) -> VModelState {
    VModelState {
        vmodel_id: "m".into(),
        owner: "isvc".into(),
        active_model_id: active.into(),
        target_model_id: target.into(),
        split: Vec::new(),
        transition_error: String::new(),
        models,
    }
}

/// Long after any failure in these tests (1_700_000_000_000 ms), unless a test says otherwise.
const NOW: u64 = 1_700_000_010_000;

fn set_vmodel(d: &Desired) -> MeshCall {
    MeshCall::SetVModel { vmodel_id: "m".into(), owner: "isvc".into(), model: d.registration() }
}

#[test]
fn a_new_object_sets_its_vmodel() {
    let d = desired("a", None);
    assert_eq!(plan(&d, None, &Rollout::default(), NOW), vec![set_vmodel(&d)]);
}

#[test]
fn an_unchanged_object_calls_nothing() {
    let d = desired("a", None);
    let mesh = vmodel(&d.model_id, &d.model_id, vec![model(&d.model_id, State::Loaded)]);
    assert_eq!(plan(&d, Some(&mesh), &Rollout::default(), NOW), vec![]);
    // Nor soon after it failed everywhere; some time later it is asked to load again.
    let mesh = vmodel(&d.model_id, &d.model_id, vec![model(&d.model_id, State::FailedToLoad)]);
    assert_eq!(plan(&d, Some(&mesh), &Rollout::default(), NOW), vec![]);
    let later = 1_700_000_000_000 + RETRY_FAILED_AFTER_MS;
    assert_eq!(plan(&d, Some(&mesh), &Rollout::default(), later), vec![set_vmodel(&d)]);
}

#[test]
fn a_spec_change_is_one_vmodel_transition() {
    let old = desired("a", None);
    let new = desired("b", None);
    let mesh = vmodel(&old.model_id, &old.model_id, vec![model(&old.model_id, State::Loaded)]);
    assert_eq!(plan(&new, Some(&mesh), &Rollout::default(), NOW), vec![set_vmodel(&new)]);
    // Once asked, the transition is under way and nothing more is called.
    let moving = vmodel(
        &old.model_id,
        &new.model_id,
        vec![model(&old.model_id, State::Loaded), model(&new.model_id, State::Loading)],
    );
    assert_eq!(plan(&new, Some(&moving), &Rollout::default(), NOW), vec![]);
}

#[test]
fn a_canary_splits_against_the_rolled_out_revision_and_promotion_or_rollback_is_one_edit() {
    let stable = desired("a", None);
    let canary = desired("b", Some(10));
    let rollout =
        Rollout { rolled_out: Some(stable.model_id.clone()), created: Some(stable.model_id.clone()) };
    let mesh = vmodel(&stable.model_id, &stable.model_id, vec![model(&stable.model_id, State::Loaded)]);
    let split = vec![(stable.model_id.clone(), 90), (canary.model_id.clone(), 10)];
    assert_eq!(
        plan(&canary, Some(&mesh), &rollout, NOW),
        vec![
            MeshCall::RegisterModel { model: canary.registration() },
            MeshCall::SetSplit { vmodel_id: "m".into(), split: split.clone() },
        ]
    );
    let mut splitting = mesh.clone();
    splitting.models.push(model(&canary.model_id, State::Loaded));
    splitting.split = split.iter().map(|(m, w)| WeightedModel { model_id: m.clone(), weight: *w }).collect();
    assert_eq!(plan(&canary, Some(&splitting), &rollout, NOW), vec![], "in place");

    // Promotion: the field goes; the split ends and the vmodel moves to the canary.
    let promoted = desired("b", None);
    assert_eq!(
        plan(&promoted, Some(&splitting), &rollout, NOW),
        vec![MeshCall::SetSplit { vmodel_id: "m".into(), split: vec![] }, set_vmodel(&promoted)]
    );
    // Rollback: 0% ends the split and unregisters the canary.
    let rolled_back = desired("b", Some(0));
    assert_eq!(
        plan(&rolled_back, Some(&splitting), &rollout, NOW),
        vec![
            MeshCall::SetSplit { vmodel_id: "m".into(), split: vec![] },
            MeshCall::UnregisterModel { model_id: canary.model_id.clone() },
        ]
    );
}

#[test]
fn a_canary_asked_during_a_transition_returns_to_the_stable_revision_as_registered() {
    let stable = desired("a", None);
    let moving_to = desired("b", None);
    let canary = desired("b", Some(20));
    let rollout =
        Rollout { rolled_out: Some(stable.model_id.clone()), created: Some(moving_to.model_id.clone()) };
    let mesh = vmodel(
        &stable.model_id,
        &moving_to.model_id,
        vec![model(&stable.model_id, State::Loaded), model(&moving_to.model_id, State::Loading)],
    );
    let calls = plan(&canary, Some(&mesh), &rollout, NOW);
    assert_eq!(
        calls[0],
        MeshCall::Retarget { vmodel_id: "m".into(), owner: "isvc".into(), model_id: stable.model_id.clone() },
        "the stable revision is not re-registered with the canary's storage"
    );
    assert_eq!(
        calls.last(),
        Some(&MeshCall::SetSplit {
            vmodel_id: "m".into(),
            split: vec![(stable.model_id.clone(), 80), (canary.model_id.clone(), 20)]
        })
    );
}

#[test]
fn a_canary_without_a_rolled_out_revision_rolls_out_fully() {
    let canary = desired("b", Some(10));
    assert_eq!(plan(&canary, None, &Rollout::default(), NOW), vec![set_vmodel(&canary)]);
}

#[test]
fn a_replaced_canary_is_unregistered() {
    let stable = desired("a", None);
    let first = desired("b", Some(10));
    let second = desired("c", Some(10));
    let rollout =
        Rollout { rolled_out: Some(stable.model_id.clone()), created: Some(first.model_id.clone()) };
    let mut mesh = vmodel(
        &stable.model_id,
        &stable.model_id,
        vec![model(&stable.model_id, State::Loaded), model(&first.model_id, State::Loaded)],
    );
    mesh.split = vec![
        WeightedModel { model_id: stable.model_id.clone(), weight: 90 },
        WeightedModel { model_id: first.model_id.clone(), weight: 10 },
    ];
    let calls = plan(&second, Some(&mesh), &rollout, NOW);
    assert_eq!(
        calls.last(),
        Some(&MeshCall::UnregisterModel { model_id: first.model_id.clone() }),
        "{calls:?}"
    );
    assert!(calls.contains(&MeshCall::RegisterModel { model: second.registration() }));
}

fn status(
    d: &Result<Desired, SpecError>,
    mesh: Option<&VModelState>,
    prev: Option<&InferenceServiceStatus>,
) -> InferenceServiceStatus {
    let urls = Urls { grpc: "grpc://mesh:8033".into(), rest: "http://mesh:8008".into() };
    let now = Time(Timestamp::from_second(1_800_000_000).unwrap());
    isvc_status(d, mesh, prev, Some(3), &urls, &now)
}

fn ready(s: &InferenceServiceStatus) -> (&str, &str) {
    let c = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn status_follows_the_load() {
    let d = Ok(desired("a", None));
    let id = d.as_ref().unwrap().model_id.clone();
    let s = status(&d, None, None);
    assert_eq!(ready(&s), ("False", "ModelPending"));
    assert_eq!(s.model_status.as_ref().unwrap().transition_status, TransitionStatus::InProgress);

    let loading = vmodel(&id, &id, vec![model(&id, State::Loading)]);
    let s = status(&d, Some(&loading), Some(&s));
    assert_eq!(ready(&s), ("False", "ModelLoading"));
    assert_eq!(s.model_status.as_ref().unwrap().states.active_model_state, ModelState::Loading);

    let loaded = vmodel(&id, &id, vec![model(&id, State::Loaded)]);
    let s = status(&d, Some(&loaded), Some(&s));
    assert_eq!(ready(&s), ("True", "Ready"));
    let ms = s.model_status.as_ref().unwrap();
    assert_eq!(ms.transition_status, TransitionStatus::UpToDate);
    assert_eq!(ms.copies, Some(ModelCopies { failed_copies: 0, total_copies: 1 }));
    assert_eq!(ms.states.target_model_state, None);
    assert_eq!(s.components["predictor"].latest_rolledout_revision.as_deref(), Some(id.as_str()));
    assert_eq!(s.components["predictor"].grpc_url.as_deref(), Some("grpc://mesh:8033"));
    assert_eq!(s.url.as_deref(), Some("grpc://mesh:8033"));

    // The same report again is the same status, transition times included: no write.
    let later = Time(Timestamp::from_second(1_800_000_100).unwrap());
    let again = isvc_status(
        &d,
        Some(&loaded),
        Some(&s),
        Some(3),
        &Urls { grpc: "grpc://mesh:8033".into(), rest: "http://mesh:8008".into() },
        &later,
    );
    assert_eq!(again, s);
}

#[test]
fn a_failed_new_revision_blocks_the_transition_and_the_old_one_keeps_serving() {
    let old = desired("a", None);
    let new = desired("b", None);
    let mesh = vmodel(
        &old.model_id,
        &new.model_id,
        vec![model(&old.model_id, State::Loaded), model(&new.model_id, State::FailedToLoad)],
    );
    let s = status(&Ok(new.clone()), Some(&mesh), None);
    assert_eq!(ready(&s).0, "True");
    let ms = s.model_status.unwrap();
    assert_eq!(ms.transition_status, TransitionStatus::BlockedByFailedLoad);
    assert_eq!(ms.states.target_model_state, Some(ModelState::FailedToLoad));
    let failure = ms.last_failure_info.unwrap();
    assert_eq!(failure.reason, FailureReason::ModelLoadFailed);
    assert_eq!(failure.message, "no such object");
    assert_eq!(failure.location.as_deref(), Some("pod-a"));
    assert_eq!(failure.model_revision_name.as_deref(), Some(new.model_id.as_str()));
}

#[test]
fn an_invalid_spec_says_so_and_the_serving_model_stays_ready() {
    let old = desired("a", None);
    let err: Result<Desired, SpecError> = Err(SpecError {
        reason: FailureReason::NoSupportingRuntime,
        message: "no ServingRuntime supports model format xgboost".into(),
    });
    let s = status(&err, None, None);
    assert_eq!(ready(&s), ("False", "InvalidSpec"));
    let ms = s.model_status.as_ref().unwrap();
    assert_eq!(ms.transition_status, TransitionStatus::InvalidSpec);
    assert_eq!(ms.last_failure_info.as_ref().unwrap().reason, FailureReason::NoSupportingRuntime);

    let serving = vmodel(&old.model_id, &old.model_id, vec![model(&old.model_id, State::Loaded)]);
    let s = status(&err, Some(&serving), None);
    assert_eq!(ready(&s).0, "True");
    assert_eq!(s.model_status.unwrap().transition_status, TransitionStatus::InvalidSpec);
}

#[test]
fn predictor_status_is_the_flat_form() {
    let d = Ok(Desired { format: ModelFormat { name: "onnx".into(), version: None }, ..desired("a", None) });
    let id = d.as_ref().unwrap().model_id.clone();
    let s = predictor_status(&d, Some(&vmodel(&id, &id, vec![model(&id, State::Loaded)])), &Urls::default());
    assert!(s.available);
    assert_eq!(s.active_model_state, ModelState::Loaded);
    assert_eq!(s.total_copies, 1);
}
