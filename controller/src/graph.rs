//! InferenceGraphs (`serving.kserve.io/v1alpha1`) in the mesh, as pure decisions: what the mesh is
//! asked (`SetGraph` with the spec as written, under the object's name, the same name mapping as
//! InferenceServices), how its answer is read (a step naming a service not registered yet is waited
//! for; any other refusal is the object's fault), and what the status says.
//!
//! A graph is Ready once the mesh took it and every `serviceName` it names is loaded somewhere, which
//! is when `ModelReady` on the graph's name answers true.

use std::time::Duration;

use densemesh_proto::admin::{VModelState, model_state};
use densemesh_proto::mmesh::model_status_info::ModelStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{InferenceGraphSpec, InferenceGraphStatus};
use crate::reconcile::{Urls, condition};

/// What the mesh's refusal says when a step names a model or vmodel it does not have (yet): an
/// InferenceService applied with the graph may just not be registered yet.
pub const NOT_REGISTERED: &str = "is not a registered model or vmodel";

/// The spec as the mesh's `SetGraph` takes it: JSON, as written (fields the mesh does not use
/// included; it ignores them).
pub fn spec_json(spec: &InferenceGraphSpec) -> String {
    serde_json::to_string(spec).expect("a graph spec is JSON already")
}

/// Every `serviceName` of the graph, sorted, each once.
pub fn service_names(spec: &InferenceGraphSpec) -> Vec<String> {
    let mut names: Vec<String> = spec
        .nodes
        .values()
        .flat_map(|node| &node.steps)
        .filter_map(|step| step.service_name.clone())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// How the mesh took the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// `SetGraph` succeeded with this spec.
    Set,
    /// Refused because a step names a model or vmodel that is not registered yet; asked again with
    /// back-off, and at once when a vmodel appears.
    Waiting(String),
    /// Refused as written, with the mesh's message; asked again when the object changes.
    Refused(String),
}

impl Registration {
    /// The mesh refused `SetGraph` with `message` (a refusal, not an unreachable mesh).
    pub fn refused(message: String) -> Self {
        if message.contains(NOT_REGISTERED) {
            Registration::Waiting(message)
        } else {
            Registration::Refused(message)
        }
    }
}

/// Whether one service a graph names answers without a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceLoad {
    Loaded,
    /// Why not, for the status message.
    NotLoaded(String),
}

/// A vmodel's load state (from the mesh's vmodel watch): that of its active model, the one calls
/// reach.
pub fn vmodel_load(vmodel: &VModelState) -> ServiceLoad {
    let active = &vmodel.active_model_id;
    let model = vmodel.models.iter().find(|m| &m.model_id == active);
    let why = match model.map(|m| m.state()) {
        Some(model_state::State::Loaded) => return ServiceLoad::Loaded,
        Some(model_state::State::Loading) => format!("{} (model {active}) is loading", vmodel.vmodel_id),
        Some(model_state::State::FailedToLoad) => format!(
            "{} (model {active}) failed to load: {}",
            vmodel.vmodel_id,
            model
                .map(|m| m.last_failure_message.as_str())
                .filter(|m| !m.is_empty())
                .unwrap_or("no reason given")
        ),
        Some(model_state::State::Standby) => {
            format!("{} (model {active}) is not loaded (it loads on the first call)", vmodel.vmodel_id)
        }
        Some(model_state::State::Pending) | None => {
            format!("{} (model {active}) is not registered yet", vmodel.vmodel_id)
        }
    };
    ServiceLoad::NotLoaded(why)
}

/// A model's load state (ModelMesh's getModelStatus), for a step naming a model that is no vmodel.
pub fn model_load(model_id: &str, status: ModelStatus) -> ServiceLoad {
    let why = match status {
        ModelStatus::Loaded => return ServiceLoad::Loaded,
        ModelStatus::Loading => "is loading",
        ModelStatus::LoadingFailed => "failed to load",
        ModelStatus::NotLoaded => "is not loaded (it loads on the first call)",
        ModelStatus::NotFound => "is not registered",
        ModelStatus::Unknown => "is in an unknown state",
    };
    ServiceLoad::NotLoaded(format!("model {model_id} {why}"))
}

/// Where clients call the graph over KServe V2 REST: POST a V2 inference request here.
pub fn graph_url(urls: &Urls, name: &str) -> String {
    format!("{}/v2/models/{name}/infer", urls.rest.trim_end_matches('/'))
}

/// The status of graph `name`: Ready once the mesh took it and every service it names is loaded
/// (`services`, each with its load state); otherwise Ready=False with the reason and the mesh's
/// message. The transition time of an unchanged condition is kept, so an unchanged status is no write.
pub fn graph_status(
    name: &str,
    registration: &Registration,
    services: &[(String, ServiceLoad)],
    previous: Option<&InferenceGraphStatus>,
    generation: Option<i64>,
    urls: &Urls,
    now: &Time,
) -> InferenceGraphStatus {
    let not_loaded: Vec<&str> = services
        .iter()
        .filter_map(|(_, load)| match load {
            ServiceLoad::Loaded => None,
            ServiceLoad::NotLoaded(why) => Some(why.as_str()),
        })
        .collect();
    let (ready, reason, message) = match registration {
        Registration::Refused(message) => (false, "InvalidSpec", message.clone()),
        Registration::Waiting(message) => (false, "ServiceNotRegistered", message.clone()),
        Registration::Set if not_loaded.is_empty() => (true, "", String::new()),
        Registration::Set => (false, "ModelNotLoaded", format!("waiting for {}", not_loaded.join("; "))),
    };
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    InferenceGraphStatus {
        url: (*registration == Registration::Set).then(|| graph_url(urls, name)),
        conditions: vec![condition(previous_conditions, "Ready", ready, reason, &message, now)],
        observed_generation: generation,
    }
}

/// How long a graph waiting for the services it names waits before asking again, after `attempts`
/// refusals in a row: 1 s doubling to 60 s. A vmodel appearing asks again at once.
pub fn waiting_backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use densemesh_proto::admin::ModelState as Mesh;
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn spec(yaml: &str) -> InferenceGraphSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn urls() -> Urls {
        Urls { grpc: "grpc://mesh:8033".into(), rest: "http://mesh:8008/".into() }
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn vmodel(state: model_state::State, failure: &str) -> VModelState {
        VModelState {
            vmodel_id: "clf".into(),
            owner: "isvc".into(),
            active_model_id: "clf__isvc-1".into(),
            target_model_id: "clf__isvc-1".into(),
            models: vec![Mesh {
                model_id: "clf__isvc-1".into(),
                state: state as i32,
                last_failure_message: failure.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn service_names_are_every_step_model_once_and_not_nodes() {
        let spec = spec(
            "nodes:\n  root: {routerType: Sequence, steps: [{serviceName: b}, {nodeName: n}, {serviceName: a}]}\n  \
             n: {routerType: Ensemble, steps: [{serviceName: a}, {serviceName: c}]}\n",
        );
        assert_eq!(service_names(&spec), ["a", "b", "c"]);
        assert!(spec_json(&spec).contains(r#""nodeName":"n""#), "{}", spec_json(&spec));
    }

    #[test]
    fn a_refusal_naming_an_unregistered_service_is_waited_for_and_others_are_final() {
        let waiting = "graph g: node root step s: serviceName clf is not a registered model or vmodel";
        assert_eq!(Registration::refused(waiting.into()), Registration::Waiting(waiting.into()));
        let bad = "graph g: nodes form a cycle: root -> n -> root";
        assert_eq!(Registration::refused(bad.into()), Registration::Refused(bad.into()));
    }

    #[test]
    fn vmodel_and_model_load_states_say_why_they_are_not_ready() {
        assert_eq!(vmodel_load(&vmodel(model_state::State::Loaded, "")), ServiceLoad::Loaded);
        let cases = [
            (model_state::State::Loading, "clf (model clf__isvc-1) is loading"),
            (model_state::State::FailedToLoad, "clf (model clf__isvc-1) failed to load: no such object"),
            (
                model_state::State::Standby,
                "clf (model clf__isvc-1) is not loaded (it loads on the first call)",
            ),
            (model_state::State::Pending, "clf (model clf__isvc-1) is not registered yet"),
        ];
        for (state, why) in cases {
            assert_eq!(vmodel_load(&vmodel(state, "no such object")), ServiceLoad::NotLoaded(why.into()));
        }
        let mut unknown_active = vmodel(model_state::State::Loaded, "");
        unknown_active.active_model_id = "other".into();
        assert!(matches!(vmodel_load(&unknown_active), ServiceLoad::NotLoaded(_)));
        assert_eq!(model_load("m", ModelStatus::Loaded), ServiceLoad::Loaded);
        assert_eq!(
            model_load("m", ModelStatus::NotFound),
            ServiceLoad::NotLoaded("model m is not registered".into())
        );
    }

    #[test]
    fn ready_once_set_and_every_service_loaded_with_the_url_of_the_graph() {
        let loading = ServiceLoad::NotLoaded("clf (model clf__isvc-1) is loading".into());
        let waiting = graph_status(
            "chain",
            &Registration::Set,
            &[("a".into(), ServiceLoad::Loaded), ("clf".into(), loading)],
            None,
            Some(3),
            &urls(),
            &at(10),
        );
        assert_eq!(waiting.url.as_deref(), Some("http://mesh:8008/v2/models/chain/infer"));
        assert_eq!(waiting.observed_generation, Some(3));
        let [ready] = waiting.conditions.as_slice() else { panic!("one condition: {waiting:?}") };
        assert_eq!((ready.type_.as_str(), ready.status.as_str()), ("Ready", "False"));
        assert_eq!(ready.reason, "ModelNotLoaded");
        assert_eq!(ready.message, "waiting for clf (model clf__isvc-1) is loading");

        let loaded = [("a".into(), ServiceLoad::Loaded), ("clf".into(), ServiceLoad::Loaded)];
        let done =
            graph_status("chain", &Registration::Set, &loaded, Some(&waiting), Some(3), &urls(), &at(20));
        assert_eq!(done.conditions[0].status, "True");
        assert_eq!(done.conditions[0].reason, "Ready");
        assert_eq!(done.conditions[0].last_transition_time, at(20));
        let again =
            graph_status("chain", &Registration::Set, &loaded, Some(&done), Some(3), &urls(), &at(30));
        assert_eq!(again, done, "nothing changed: the same status, no write");
    }

    #[test]
    fn a_refused_graph_is_not_ready_with_the_mesh_message_and_no_url() {
        let message = "graph g: node root step s: condition `a.*` is not supported: wildcards";
        let refused = graph_status(
            "g",
            &Registration::Refused(message.into()),
            &[("a".into(), ServiceLoad::Loaded)],
            None,
            Some(1),
            &urls(),
            &at(10),
        );
        assert_eq!(refused.url, None);
        let c = &refused.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
            ("False", "InvalidSpec", message)
        );
        let waiting =
            graph_status("g", &Registration::Waiting("x".into()), &[], None, None, &urls(), &at(10));
        assert_eq!(waiting.conditions[0].reason, "ServiceNotRegistered");
    }

    #[test]
    fn waiting_backs_off_from_one_second_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| waiting_backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(waiting_backoff(0), Duration::from_secs(1));
    }
}
