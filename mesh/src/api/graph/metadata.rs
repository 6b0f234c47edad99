//! `ModelMetadata` on a graph's name: the graph's interface, read off the models it names, so a client
//! that asks a graph what to send and what it answers (tritonclient's `get_model_metadata`, KServe's
//! `GET /v2/models/<graph>`) gets the truth rather than NOT_FOUND.
//!
//! - inputs: the inputs of every step that receives the graph's request (a `$request` step anywhere, or
//!   a `$response` step that comes first in a node receiving the request), under the names the request
//!   must carry them by (a step's `inputMap` read backwards), each name once (the first step naming it
//!   gives its type and shape);
//! - outputs: what the root node answers, as the graph runs it: a Sequence its last step's outputs; an
//!   Ensemble every step's outputs named `<step>.<output>`; a Switch or Splitter the outputs any of its
//!   steps may answer, each name once.
//!
//! Each model's own metadata is what `ModelMetadata` on that model answers (loading it where it must, as
//! for a model); the platform is `densemesh_graph` and a graph has no versions.

use std::collections::HashMap;

use densemesh_placement::graph::{Data, GraphSpec, ROOT, RouterType, Step};
use densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use densemesh_proto::inference::model_metadata_response::TensorMetadata;
use densemesh_proto::inference::{ModelMetadataRequest, ModelMetadataResponse};
use futures::future::{BoxFuture, FutureExt};
use tonic::{Code, Request, Status};

use crate::api::service::InferenceService;

/// The platform a graph's metadata names.
pub const GRAPH_PLATFORM: &str = "densemesh_graph";

/// A node's interface: the tensors it reads from the graph's request and the tensors it answers.
#[derive(Debug, Default, Clone, PartialEq)]
struct Interface {
    inputs: Vec<TensorMetadata>,
    outputs: Vec<TensorMetadata>,
}

/// Adds the tensors of `more` whose names `into` does not hold yet.
fn merge(into: &mut Vec<TensorMetadata>, more: impl IntoIterator<Item = TensorMetadata>) {
    for tensor in more {
        if !into.iter().any(|t| t.name == tensor.name) {
            into.push(tensor);
        }
    }
}

/// What `ModelMetadata` answers for graph `name`.
pub(crate) async fn describe(
    service: &InferenceService,
    name: &str,
    spec: &GraphSpec,
) -> Result<ModelMetadataResponse, Status> {
    let mut reader = Reader { service, graph: name, spec, models: HashMap::new() };
    let interface = reader.node(ROOT, true, 0).await?;
    Ok(ModelMetadataResponse {
        name: name.to_owned(),
        versions: Vec::new(),
        platform: GRAPH_PLATFORM.to_owned(),
        inputs: interface.inputs,
        outputs: interface.outputs,
    })
}

/// Reads a graph's interface, asking each model's metadata once.
struct Reader<'a> {
    service: &'a InferenceService,
    graph: &'a str,
    spec: &'a GraphSpec,
    models: HashMap<String, ModelMetadataResponse>,
}

impl Reader<'_> {
    /// Node `name`'s interface; `gets_request`: whether what it receives is the graph's request.
    fn node<'s>(
        &'s mut self,
        name: &'s str,
        gets_request: bool,
        depth: usize,
    ) -> BoxFuture<'s, Result<Interface, Status>> {
        async move {
            let spec = self.spec;
            let Some(node) = spec.nodes.get(name) else {
                return Err(self.broken(format!("node {name} is gone")));
            };
            // Registration refuses cycles; a graph stored by another binary is not trusted to be free of them.
            if depth > spec.nodes.len() {
                return Err(self.broken(format!("nodes form a cycle through {name}")));
            }
            let mut interface = Interface::default();
            let mut flowing_is_request = gets_request;
            for step in &node.steps {
                // A `$response` step receives what flows to it: in a Sequence the previous step's
                // outputs (the node's input for the first), elsewhere the node's input.
                let flows_request = match node.router_type {
                    RouterType::Sequence => flowing_is_request,
                    _ => gets_request,
                };
                let step_gets_request = step.data() == Data::Request || flows_request;
                let step_interface = self.step(step, step_gets_request, depth).await?;
                if step_gets_request {
                    merge(&mut interface.inputs, step_interface.inputs);
                }
                match node.router_type {
                    RouterType::Sequence => {
                        flowing_is_request = false;
                        interface.outputs = step_interface.outputs;
                    }
                    RouterType::Ensemble => {
                        interface.outputs.extend(step_interface.outputs.into_iter().map(|mut t| {
                            t.name = format!("{}.{}", step.label(), t.name);
                            t
                        }))
                    }
                    RouterType::Switch | RouterType::Splitter => {
                        merge(&mut interface.outputs, step_interface.outputs)
                    }
                }
            }
            Ok(interface)
        }
        .boxed()
    }

    /// One step's interface, its inputs under the names it receives them by.
    async fn step(&mut self, step: &Step, gets_request: bool, depth: usize) -> Result<Interface, Status> {
        let mut interface = match (&step.service_name, &step.node_name) {
            (_, Some(node)) => self.node(node, gets_request, depth + 1).await?,
            (Some(model), None) => {
                let metadata = self.model(step, model).await?;
                Interface { inputs: metadata.inputs.clone(), outputs: metadata.outputs.clone() }
            }
            (None, None) => {
                return Err(self.broken(format!("step {} names no model and no node", step.label())));
            }
        };
        // `inputMap` is {input: tensor}: the step's input `input` is the tensor `tensor` it receives.
        for input in &mut interface.inputs {
            if let Some(tensor) = step.input_map.get(&input.name) {
                input.name = tensor.clone();
            }
        }
        Ok(interface)
    }

    async fn model(&mut self, step: &Step, model: &str) -> Result<&ModelMetadataResponse, Status> {
        if !self.models.contains_key(model) {
            let request =
                Request::new(ModelMetadataRequest { name: model.to_owned(), version: String::new() });
            let answer = self.service.model_metadata(request).await.map_err(|status| {
                Status::new(
                    status.code(),
                    format!("graph {}: step {}: {}", self.graph, step.label(), status.message()),
                )
            })?;
            self.models.insert(model.to_owned(), answer.into_inner());
        }
        Ok(&self.models[model])
    }

    fn broken(&self, message: String) -> Status {
        Status::new(Code::FailedPrecondition, format!("graph {}: {message}", self.graph))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str) -> TensorMetadata {
        TensorMetadata { name: name.into(), datatype: "FP32".into(), shape: vec![-1, 4] }
    }

    #[test]
    fn merge_keeps_the_first_of_each_name() {
        let mut into = vec![tensor("x")];
        let mut other = tensor("x");
        other.datatype = "INT64".into();
        merge(&mut into, [other, tensor("y")]);
        assert_eq!(
            into.iter().map(|t| (t.name.as_str(), t.datatype.as_str())).collect::<Vec<_>>(),
            [("x", "FP32"), ("y", "FP32")]
        );
    }
}
