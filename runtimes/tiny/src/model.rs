//! The runtime and its loaded models: size limit, checks at load, inputs validated per request and
//! a caught panic turned into that request's error.

use std::panic::{AssertUnwindSafe, catch_unwind};

use densemesh_runtime_core::{
    Error, InferRequest, LoadRequest, LoadedModel, ModelMetadata, Result, Runtime, Tensor,
};

use crate::TinyConfig;
use crate::error::TinyError;
use crate::graph::Graph;
use crate::heap::{HeapSize, chunk};
use crate::value::Value;

/// The tiny evaluator as a [`Runtime`]. Stateless beyond its configuration: it owns no threads.
#[derive(Debug, Clone, Default)]
pub struct TinyRuntime {
    config: TinyConfig,
}

impl TinyRuntime {
    /// A runtime taking models up to `config.max_file_bytes`.
    pub fn new(config: TinyConfig) -> Self {
        Self { config }
    }

    /// Loads a model, saying exactly why not when it cannot: [`TinyError::wants_fallback`] tells the
    /// caller to load it with ONNX Runtime instead.
    pub fn try_load(&self, request: &LoadRequest) -> Result<TinyModel, TinyError> {
        match &request.contents {
            Some(contents) => self.load_bytes(contents.as_slice()),
            None => {
                let io = |e: std::io::Error| {
                    TinyError::InvalidModel(format!("cannot read {}: {e}", request.path.display()))
                };
                let bytes = std::fs::metadata(&request.path).map_err(io)?.len();
                self.check_size(bytes)?;
                self.load_bytes(&std::fs::read(&request.path).map_err(io)?)
            }
        }
    }

    /// Loads a model from its `ModelProto` bytes.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<TinyModel, TinyError> {
        self.check_size(bytes.len() as u64)?;
        // A file crafted to trip an unforeseen panic in decoding fails its load, not the loader.
        let graph = guarded(|| Graph::decode(bytes))?;
        let metadata = ModelMetadata {
            platform: "onnxruntime_onnx".to_owned(),
            inputs: graph.inputs.iter().map(|p| p.spec.clone()).collect(),
            outputs: graph.outputs.iter().map(|p| p.spec.clone()).collect(),
        };
        let mut model = TinyModel { graph, metadata, size_bytes: 0 };
        model.size_bytes = model.held_bytes();
        Ok(model)
    }

    fn check_size(&self, bytes: u64) -> Result<(), TinyError> {
        if bytes > self.config.max_file_bytes {
            return Err(TinyError::TooLarge { bytes, limit: self.config.max_file_bytes });
        }
        Ok(())
    }
}

impl Runtime for TinyRuntime {
    fn name(&self) -> &'static str {
        "tiny"
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        match self.try_load(request) {
            Ok(model) => Ok(Box::new(model)),
            Err(e) => Err(Error::Load { model_id: request.model_id.clone(), source: Box::new(e) }),
        }
    }
}

/// A model held by the tiny evaluator.
pub struct TinyModel {
    graph: Graph,
    metadata: ModelMetadata,
    size_bytes: u64,
}

impl TinyModel {
    /// Everything this model holds: its graph (weights, nodes, names), its metadata, and itself as
    /// the cache boxes it.
    fn held_bytes(&self) -> u64 {
        let specs = |specs: &[densemesh_runtime_core::TensorSpec]| -> u64 {
            chunk(std::mem::size_of_val(specs))
                + specs.iter().map(|s| s.name.heap_bytes() + chunk(s.shape.capacity() * 8)).sum::<u64>()
        };
        chunk(std::mem::size_of::<Self>())
            + self.graph.heap_bytes()
            + self.metadata.platform.heap_bytes()
            + specs(&self.metadata.inputs)
            + specs(&self.metadata.outputs)
    }

    /// Runs one request; errors are typed (bad input vs failed evaluation).
    pub fn evaluate(&self, request: InferRequest) -> Result<Vec<Tensor>, TinyError> {
        let mut given: Vec<Option<Tensor>> = request.inputs.into_iter().map(Some).collect();
        let mut inputs = Vec::with_capacity(self.graph.inputs.len());
        for port in self.graph.inputs.iter() {
            let tensor = given
                .iter_mut()
                .find(|t| t.as_ref().is_some_and(|t| t.name == port.spec.name))
                .and_then(Option::take)
                .ok_or_else(|| TinyError::InvalidInput(format!("input {} is missing", port.spec.name)))?;
            if tensor.datatype != port.spec.datatype {
                return Err(TinyError::InvalidInput(format!(
                    "input {} is {}, the model takes {}",
                    port.spec.name, tensor.datatype, port.spec.datatype
                )));
            }
            let fits = tensor.shape.len() == port.spec.shape.len()
                && tensor.shape.iter().zip(&port.spec.shape).all(|(d, want)| *want < 0 || d == want);
            if !fits && !port.spec.shape.is_empty() {
                return Err(TinyError::InvalidInput(format!(
                    "input {} has shape {:?}, the model takes {:?}",
                    port.spec.name, tensor.shape, port.spec.shape
                )));
            }
            inputs.push(Value::from_tensor(tensor)?);
        }
        if let Some(extra) = given.into_iter().flatten().next() {
            return Err(TinyError::InvalidInput(format!("the model has no input named {}", extra.name)));
        }
        let wanted: Vec<usize> = if request.outputs.is_empty() {
            (0..self.graph.outputs.len()).collect()
        } else {
            request
                .outputs
                .iter()
                .map(|name| {
                    self.graph.outputs.iter().position(|p| &p.spec.name == name).ok_or_else(|| {
                        TinyError::InvalidInput(format!("the model has no output named {name}"))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let values = self.graph.run(inputs, &wanted)?;
        Ok(values
            .into_iter()
            .zip(&wanted)
            .map(|(v, i)| v.into_tensor(&self.graph.outputs[*i].spec.name))
            .collect())
    }
}

impl LoadedModel for TinyModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn runtime(&self) -> &str {
        "tiny"
    }

    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>> {
        let outcome = guarded(|| self.evaluate(request));
        outcome.map_err(|e| match e {
            TinyError::InvalidInput(_) => Error::InvalidInput(Box::new(e)),
            other => Error::Inference(Box::new(other)),
        })
    }
}

/// Runs `f`, turning a panic into [`TinyError::Panicked`] so one request fails, not its worker. The
/// graph is immutable while it runs, so a panic leaves nothing half-updated behind.
fn guarded<T>(f: impl FnOnce() -> Result<T, TinyError>) -> Result<T, TinyError> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(TinyError::Panicked(densemesh_runtime_core::panic_message(&*panic))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_for_that_call() {
        let caught = guarded::<()>(|| panic!("index 9 out of range"));
        assert!(
            matches!(caught, Err(TinyError::Panicked(ref m)) if m == "index 9 out of range"),
            "{caught:?}"
        );
        assert_eq!(guarded(|| Ok(7)).ok(), Some(7));
    }
}
