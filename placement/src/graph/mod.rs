//! Inference graphs as KServe's `InferenceGraph` (`serving.kserve.io/v1alpha1`) defines them: named
//! nodes, a required `root`, each node a `Sequence`, `Switch`, `Ensemble` or `Splitter` of steps, each
//! step a model (`serviceName`: a model or vmodel id) or another node (`nodeName`).
//!
//! [`GraphSpec`] reads the `spec` of an InferenceGraph as KServe writes it (camelCase) and is what the
//! registry stores under `graphs/<name>`; fields it does not know (`resources`, `affinity`, a newer
//! binary's additions) are accepted and ignored, so pods of two versions share one store.
//! [`validate`] is the pure check registration runs before anything is written.

pub mod condition;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub use condition::{Condition, UnsupportedCondition};

use crate::ModelId;

/// The node every graph starts at.
pub const ROOT: &str = "root";

/// KServe's InferenceGraph `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphSpec {
    pub nodes: BTreeMap<String, GraphNode>,
}

/// One node: how its steps are run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphNode {
    pub router_type: RouterType,
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// KServe's router types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouterType {
    /// Steps one after another; a `$response` step takes the previous step's outputs.
    Sequence,
    /// The first step whose `condition` holds for the request (a step without one always does).
    Switch,
    /// Every step at once; the answer holds every step's outputs, named `<step>.<output>`.
    Ensemble,
    /// One step, chosen by weight.
    Splitter,
}

/// What a step does when it fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dependency {
    /// The step is skipped: the graph goes on as if it were not there (KServe's default).
    #[default]
    Soft,
    /// The graph fails with the step's error.
    Hard,
}

/// One step of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// The step's name; defaults to its `serviceName` or `nodeName` (see [`Step::label`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// A model or vmodel id (KServe: the InferenceService).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Another node of the graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// KServe's call-any-URL target: refused here, a step runs on a model of the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_url: Option<String>,
    /// `$request` (KServe's default) or `$response`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Switch only: see [`condition`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Splitter only: this step's share, out of 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default)]
    pub dependency: Dependency,
    /// densemesh's extension (KServe has no such field): the step's inputs named from the tensors it
    /// receives, `{input: tensor}`, for a model whose input names differ from the previous step's
    /// output names. Tensors it does not name pass on under their own names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input_map: BTreeMap<String, String>,
    /// `condition`, parsed the first time it is evaluated ([`Step::parsed_condition`]).
    #[serde(skip)]
    parsed_condition: ParsedCondition,
}

/// A step's condition parsed once, so a Switch does not parse its conditions on every request: state
/// derived from `condition`, never stored and no part of a step's equality.
#[derive(Debug, Clone, Default)]
struct ParsedCondition(OnceLock<Result<Condition, UnsupportedCondition>>);

impl PartialEq for ParsedCondition {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Which tensors a step receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// The graph's request.
    Request,
    /// The previous step's outputs (the request for the first step).
    Response,
}

impl Step {
    /// Its condition, parsed the first time it is asked for; `None` when it has none.
    pub fn parsed_condition(&self) -> Option<&Result<Condition, UnsupportedCondition>> {
        let text = self.condition.as_deref()?;
        Some(self.parsed_condition.0.get_or_init(|| Condition::parse(text)))
    }

    /// The name metrics, errors and ensemble outputs use.
    pub fn label(&self) -> &str {
        if !self.name.is_empty() {
            return &self.name;
        }
        self.service_name.as_deref().or(self.node_name.as_deref()).unwrap_or_default()
    }

    /// The tensors it receives; `$request` unless it says `$response` ([`validate`] refuses others).
    pub fn data(&self) -> Data {
        match self.data.as_deref() {
            Some("$response") => Data::Response,
            _ => Data::Request,
        }
    }
}

/// What a name already is in the mesh, for the checks of [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Model,
    VModel,
}

/// Why a graph is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("graph {graph}: the name is taken by a {kind}; a graph needs a name of its own")]
    NameTaken { graph: String, kind: &'static str },
    #[error("graph {0}: no root node; the graph starts at the node named \"root\"")]
    NoRoot(String),
    #[error("graph {graph}: node {node} has no steps")]
    NoSteps { graph: String, node: String },
    #[error("graph {graph}: node {node} step {step}: {why}")]
    Step { graph: String, node: String, step: String, why: String },
    #[error("graph {graph}: node {node}: {why}")]
    Node { graph: String, node: String, why: String },
    #[error("graph {graph}: nodes form a cycle: {}", cycle.join(" -> "))]
    Cycle { graph: String, cycle: Vec<String> },
}

/// Checks a graph before it is registered: a `root` node; every node with steps; every step naming
/// exactly one model (or vmodel) that `known` knows, or a node of the graph; step names unique within
/// their node; `data` `$request` or `$response`; conditions on Switch steps only, each in the supported
/// subset; weights on Splitter steps only, each step weighted, summing to 100 (as KServe requires); no
/// cycle through `nodeName`; and a graph name that is no model's or vmodel's.
pub fn validate(name: &ModelId, spec: &GraphSpec, known: &HashMap<String, Known>) -> Result<(), GraphError> {
    let graph = name.to_string();
    if let Some(kind) = known.get(name.as_str()) {
        let kind = match kind {
            Known::Model => "model",
            Known::VModel => "vmodel",
        };
        return Err(GraphError::NameTaken { graph, kind });
    }
    if !spec.nodes.contains_key(ROOT) {
        return Err(GraphError::NoRoot(graph));
    }
    for (node_name, node) in &spec.nodes {
        let node_error =
            |why: String| GraphError::Node { graph: graph.clone(), node: node_name.clone(), why };
        if node.steps.is_empty() {
            return Err(GraphError::NoSteps { graph: graph.clone(), node: node_name.clone() });
        }
        let mut labels = HashSet::new();
        for step in &node.steps {
            let label = step.label().to_owned();
            let step_error = |why: String| GraphError::Step {
                graph: graph.clone(),
                node: node_name.clone(),
                step: label.clone(),
                why,
            };
            check_step(spec, node.router_type, step, known).map_err(step_error)?;
            if !labels.insert(label.clone()) {
                return Err(node_error(format!(
                    "two steps are named {label}; give each a distinct name (it names their outputs and metrics)"
                )));
            }
        }
        if node.router_type == RouterType::Splitter {
            let total: u64 = node.steps.iter().map(|s| u64::from(s.weight.unwrap_or_default())).sum();
            if total != 100 {
                return Err(node_error(format!("Splitter weights sum to {total}; they must sum to 100")));
            }
        }
    }
    if let Some(cycle) = find_cycle(spec) {
        return Err(GraphError::Cycle { graph, cycle });
    }
    Ok(())
}

fn check_step(
    spec: &GraphSpec,
    router: RouterType,
    step: &Step,
    known: &HashMap<String, Known>,
) -> Result<(), String> {
    if step.label().is_empty() {
        return Err("a step needs a name, a serviceName or a nodeName".to_owned());
    }
    if step.service_url.is_some() {
        return Err(
            "serviceUrl is not supported: a step runs on a model of the mesh (serviceName) or a node \
                    (nodeName)"
                .to_owned(),
        );
    }
    match (&step.service_name, &step.node_name) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("set exactly one of serviceName and nodeName".to_owned());
        }
        (Some(service), None) => {
            if !known.contains_key(service.as_str()) {
                return Err(format!("serviceName {service} is not a registered model or vmodel"));
            }
        }
        (None, Some(node)) => {
            if !spec.nodes.contains_key(node) {
                return Err(format!("nodeName {node} is not a node of this graph"));
            }
        }
    }
    match step.data.as_deref() {
        None | Some("$request" | "$response") => {}
        Some(other) => return Err(format!("data {other:?} is neither \"$request\" nor \"$response\"")),
    }
    match (&step.condition, router) {
        (Some(condition), RouterType::Switch) => {
            Condition::parse(condition).map_err(|e| e.to_string())?;
        }
        (Some(_), _) => return Err(format!("a condition is only read on Switch steps, not {router:?}")),
        (None, _) => {}
    }
    match (step.weight, router) {
        (None, RouterType::Splitter) => return Err("a Splitter step needs a weight".to_owned()),
        (Some(_), RouterType::Splitter) | (None, _) => {}
        (Some(_), _) => return Err(format!("a weight is only read on Splitter steps, not {router:?}")),
    }
    for (input, tensor) in &step.input_map {
        if input.is_empty() || tensor.is_empty() {
            return Err("inputMap names an empty input or tensor".to_owned());
        }
    }
    Ok(())
}

/// A cycle through `nodeName` steps, as the node names along it (first repeated at the end).
fn find_cycle(spec: &GraphSpec) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<'a>(
        spec: &'a GraphSpec,
        node: &'a str,
        marks: &mut HashMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|n| *n == node).unwrap_or_default();
                let mut cycle: Vec<String> = stack[from..].iter().map(|n| (*n).to_owned()).collect();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node, Mark::Open);
        stack.push(node);
        let children =
            spec.nodes.get(node).into_iter().flat_map(|n| &n.steps).filter_map(|s| s.node_name.as_deref());
        for child in children {
            if let Some(cycle) = visit(spec, child, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for node in spec.nodes.keys() {
        if let Some(cycle) = visit(spec, node, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// Every `serviceName` a graph refers to, for registration to look up.
pub fn service_names(spec: &GraphSpec) -> Vec<&str> {
    let mut names: Vec<&str> =
        spec.nodes.values().flat_map(|n| &n.steps).filter_map(|s| s.service_name.as_deref()).collect();
    names.sort_unstable();
    names.dedup();
    names
}
