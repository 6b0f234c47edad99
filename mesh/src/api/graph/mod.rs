//! Inference graphs run inside meshd: a `ModelInfer` whose `model_name` is a graph
//! ([`densemesh_placement::graph`]) runs the graph's `root` node here, each model step through the same
//! request path a `ModelInfer` for that model takes ([`InferenceService::infer_step`]), so a step on a
//! model loaded here is one in-process inference and a step on a model held elsewhere is one forwarded
//! hop. KServe runs every step as a separate HTTP hop through a router pod; here the graph runs where
//! its models are.
//!
//! Semantics, KServe's unless said otherwise:
//! - Sequence: steps in order; a `$response` step receives the previous step's outputs (the node's
//!   input for the first), a `$request` step (the default) the graph's request. The node answers with
//!   the last step's outputs.
//! - Switch: the first step whose condition holds for the request (one without a condition always
//!   does); none: the node's input passes through unchanged, as KServe's router returns its input.
//! - Ensemble: every step at once, each on the node's input; the answer holds every step's outputs,
//!   named `<step>.<output>`.
//! - Splitter: one step by weight, at the request's split point (the `densemesh-route-key` header's
//!   hash, as vmodel splits use, so a key always takes the same step).
//! - A failed `Hard` step fails the graph, naming the step and keeping its gRPC code; a failed `Soft`
//!   step (the default) is skipped: the node goes on as if it were not there.
//! - densemesh's extension `inputMap` (`{input: tensor}`) renames what a step receives, for a model
//!   whose inputs are named differently from the previous step's outputs.

pub(crate) mod flow;
pub(crate) mod metadata;
pub(crate) mod registration;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use densemesh_placement::ModelId;
use densemesh_placement::graph::{Data, Dependency, GraphSpec, ROOT, RouterType, Step};
use densemesh_placement::spec::{Weighted, choose};
use densemesh_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use densemesh_runtime_core::Tensor;
use futures::future::{BoxFuture, FutureExt, join_all};
use serde_json::Value;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::api::service::{InferenceService, code_label};
use crate::metrics as m;
use crate::node::{router, v2};

/// Why a graph run failed; [`GraphFailure::into_status`] is the one place it becomes a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum GraphFailure {
    /// The graph's own request is malformed.
    #[error("graph {graph}: {message}")]
    Request { graph: String, message: String, code: Code },
    /// A Hard step failed: its own code, its own message.
    #[error("graph {graph}: step {step} failed: {message}")]
    Step { graph: String, step: String, code: Code, message: String },
    /// A step's `inputMap` names a tensor the step does not receive.
    #[error(
        "graph {graph}: step {step}: input {input} is mapped from tensor {tensor}, which the step does not receive (it receives {received})"
    )]
    MissingInput { graph: String, step: String, input: String, tensor: String, received: String },
    /// The graph changed under the request in a way that no longer runs (a node gone).
    #[error("graph {graph}: {message}")]
    Broken { graph: String, message: String },
}

impl GraphFailure {
    /// The gRPC status a client gets.
    pub fn into_status(self) -> Status {
        Status::new(self.code(), self.to_string())
    }

    fn code(&self) -> Code {
        match self {
            GraphFailure::Request { code, .. } | GraphFailure::Step { code, .. } => *code,
            GraphFailure::MissingInput { .. } => Code::InvalidArgument,
            GraphFailure::Broken { .. } => Code::FailedPrecondition,
        }
    }
}

/// One run of a graph for one request.
struct Run<'a> {
    service: &'a InferenceService,
    graph: &'a str,
    spec: &'a GraphSpec,
    /// The request's headers less those that named what it is for: steps are named by their own ids.
    metadata: MetadataMap,
    id: String,
    parameters: HashMap<String, InferParameter>,
    /// The graph's request, for `$request` steps.
    request: Vec<Tensor>,
    /// The request as Switch conditions read it, built the first time one is evaluated.
    view: OnceLock<Value>,
    split_point: u64,
}

/// Runs graph `name` for `request`, answering as a model would: under the graph's name, raw when the
/// client sent raw contents.
pub(crate) async fn run(
    service: &InferenceService,
    name: &ModelId,
    spec: &GraphSpec,
    metadata: &MetadataMap,
    request: ModelInferRequest,
) -> Result<ModelInferResponse, GraphFailure> {
    let graph = name.as_str();
    let ModelInferRequest { id, parameters, .. } = &request;
    let (id, parameters) = (id.clone(), parameters.clone());
    let decoded = v2::decode(request).map_err(|e| GraphFailure::Request {
        graph: graph.to_owned(),
        code: e.code(),
        message: e.to_string(),
    })?;
    let run = Run {
        service,
        graph,
        spec,
        metadata: router::without_target_headers(metadata),
        id,
        parameters,
        request: decoded.request.inputs,
        view: OnceLock::new(),
        split_point: router::split_point(metadata),
    };
    let mut outputs = run.node(ROOT, run.request.clone()).await?;
    let wanted = decoded.request.outputs;
    if !wanted.is_empty() {
        let mut chosen = Vec::with_capacity(wanted.len());
        for name in &wanted {
            let Some(at) = outputs.iter().position(|t| &t.name == name) else {
                return Err(GraphFailure::Request {
                    graph: graph.to_owned(),
                    code: Code::InvalidArgument,
                    message: format!("output {name} was requested but the graph answers {}", names(&outputs)),
                });
            };
            chosen.push(outputs.swap_remove(at));
        }
        outputs = chosen;
    }
    Ok(v2::encode(graph.to_owned(), String::new(), run.id, outputs, decoded.raw))
}

fn names(tensors: &[Tensor]) -> String {
    if tensors.is_empty() {
        return "nothing".to_owned();
    }
    tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
}

impl Run<'_> {
    /// Runs a node on `input` (what its caller passes it), answering its outputs.
    fn node<'s>(
        &'s self,
        name: &'s str,
        input: Vec<Tensor>,
    ) -> BoxFuture<'s, Result<Vec<Tensor>, GraphFailure>> {
        async move {
            let Some(node) = self.spec.nodes.get(name) else {
                return Err(GraphFailure::Broken {
                    graph: self.graph.to_owned(),
                    message: format!("node {name} is gone"),
                });
            };
            match node.router_type {
                RouterType::Sequence => {
                    let mut current = input;
                    for step in &node.steps {
                        let received = self.received(step, &current);
                        if let Some(outputs) = self.step(step, received).await? {
                            current = outputs;
                        }
                    }
                    Ok(current)
                }
                RouterType::Switch => {
                    let chosen = node.steps.iter().find(|s| self.condition_holds(s));
                    match chosen {
                        Some(step) => {
                            Ok(self.step(step, self.received(step, &input)).await?.unwrap_or(input))
                        }
                        None => Ok(input),
                    }
                }
                RouterType::Splitter => {
                    let weighted: Vec<Weighted> = node
                        .steps
                        .iter()
                        .map(|s| Weighted {
                            model: s.label().to_owned(),
                            weight: s.weight.unwrap_or_default(),
                        })
                        .collect();
                    let chosen = choose(&weighted, self.split_point)
                        .and_then(|label| node.steps.iter().find(|s| s.label() == label));
                    match chosen {
                        Some(step) => {
                            Ok(self.step(step, self.received(step, &input)).await?.unwrap_or(input))
                        }
                        None => Ok(input),
                    }
                }
                RouterType::Ensemble => {
                    let runs = node.steps.iter().map(|s| {
                        let received = self.received(s, &input);
                        async move { (s, self.step(s, received).await) }
                    });
                    let mut outputs = Vec::new();
                    for (step, answered) in join_all(runs).await {
                        for mut tensor in answered?.unwrap_or_default() {
                            tensor.name = format!("{}.{}", step.label(), tensor.name);
                            outputs.push(tensor);
                        }
                    }
                    Ok(outputs)
                }
            }
        }
        .boxed()
    }

    /// What a step receives: the graph's request or the tensors flowing to it.
    fn received(&self, step: &Step, flowing: &[Tensor]) -> Vec<Tensor> {
        match step.data() {
            Data::Request => self.request.clone(),
            Data::Response => flowing.to_vec(),
        }
    }

    fn condition_holds(&self, step: &Step) -> bool {
        let Some(parsed) = step.parsed_condition() else { return true };
        match parsed {
            Ok(condition) => {
                condition.holds(self.view.get_or_init(|| {
                    flow::json_view(&self.id, &self.parameters, &self.metadata, &self.request)
                }))
            }
            // Registration refused it; a graph stored by a newer binary may use more than this one reads.
            Err(e) => {
                tracing::warn!(graph = self.graph, step = step.label(), error = %e, "condition not understood; it does not hold");
                false
            }
        }
    }

    /// Runs one step; `None` when it failed and is Soft (skipped).
    async fn step(&self, step: &Step, mut input: Vec<Tensor>) -> Result<Option<Vec<Tensor>>, GraphFailure> {
        let started = Instant::now();
        let label = step.label();
        let result = async move {
            for (to, from) in &step.input_map {
                let Some(tensor) = input.iter_mut().find(|t| &t.name == from) else {
                    return Err(GraphFailure::MissingInput {
                        graph: self.graph.to_owned(),
                        step: label.to_owned(),
                        input: to.clone(),
                        tensor: from.clone(),
                        received: names(&input),
                    });
                };
                tensor.name = to.clone();
            }
            match (&step.service_name, &step.node_name) {
                (_, Some(node)) => self.node(node, input).await,
                (Some(model), None) => {
                    let request = flow::step_request(model, &self.id, &self.parameters, input);
                    let answer =
                        self.service.infer_step(&self.metadata, request).await.map_err(|status| {
                            GraphFailure::Step {
                                graph: self.graph.to_owned(),
                                step: label.to_owned(),
                                code: status.code(),
                                message: status.message().to_owned(),
                            }
                        })?;
                    flow::answer_tensors(answer).map_err(|e| GraphFailure::Step {
                        graph: self.graph.to_owned(),
                        step: label.to_owned(),
                        code: Code::Internal,
                        message: format!("the model's answer cannot be read: {e}"),
                    })
                }
                (None, None) => Err(GraphFailure::Broken {
                    graph: self.graph.to_owned(),
                    message: format!("step {label} names no model and no node"),
                }),
            }
        }
        .await;
        let labels = [("graph", self.graph.to_owned()), ("step", label.to_owned())];
        metrics::histogram!(m::GRAPH_STEP_DURATION, &labels).record(started.elapsed().as_secs_f64());
        match result {
            Ok(outputs) => Ok(Some(outputs)),
            Err(failure) => {
                let code = code_label(failure.code());
                metrics::counter!(m::GRAPH_STEP_ERRORS, "graph" => self.graph.to_owned(), "step" => label.to_owned(), "code" => code)
                    .increment(1);
                match step.dependency {
                    Dependency::Hard => Err(failure),
                    Dependency::Soft => {
                        tracing::debug!(graph = self.graph, step = label, error = %failure, "soft step failed; skipped");
                        Ok(None)
                    }
                }
            }
        }
    }
}
