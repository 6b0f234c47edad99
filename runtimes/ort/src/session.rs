//! One loaded ONNX model: its session, its interface and what it costs in memory.

use densemesh_runtime_core::{
    Error, InferRequest, LoadRequest, LoadedModel, ModelMetadata, Result, Tensor, TensorSpec,
};
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Outlet, ValueType};
use parking_lot::Mutex;

use crate::convert;
use crate::memory::settled_resident_bytes;

pub(crate) struct OrtModel {
    /// `ort` requires `&mut` to run: ONNX Runtime's allocators are not all thread-safe. Requests for
    /// one model take turns; different models run in parallel on the shared pool.
    session: Mutex<Session>,
    metadata: ModelMetadata,
    size_bytes: u64,
}

impl OrtModel {
    pub(crate) fn load(env: &Environment, measure_lock: &Mutex<()>, request: &LoadRequest) -> Result<Self> {
        // Read under the measuring lock too: another load's file buffer would count against this one.
        let _measuring = measure_lock.lock();
        match &request.contents {
            // Already resident (mapped and pre-faulted): counted in both readings, so it cancels out.
            Some(contents) => Self::build_measured(env, &request.model_id, contents.as_slice()),
            None => {
                let bytes = std::fs::read(&request.path)
                    .map_err(|source| Error::Io { path: request.path.clone(), source })?;
                Self::build_measured(env, &request.model_id, &bytes)
            }
        }
    }

    /// Builds the session from bytes already in memory (a read file, later a mapped disk-cache entry).
    pub(crate) fn from_bytes(
        env: &Environment,
        measure_lock: &Mutex<()>,
        model_id: &str,
        bytes: Vec<u8>,
    ) -> Result<Self> {
        let _measuring = measure_lock.lock();
        Self::build_measured(env, model_id, &bytes)
    }

    /// Builds a session and measures the heap it kept; the caller holds the measuring lock, so no
    /// other load's allocations count, and frees `bytes` only after this returns, so they are in
    /// both readings and cancel out.
    fn build_measured(env: &Environment, model_id: &str, bytes: &[u8]) -> Result<Self> {
        let load_error = |reason: String| Error::Load { model_id: model_id.to_owned(), reason };
        let file_bytes = bytes.len() as u64;

        let before = settled_resident_bytes();
        let session = build_session(env, bytes).map_err(|e| load_error(e.to_string()))?;
        let grown = before.zip(settled_resident_bytes()).map(|(b, a)| a.saturating_sub(b));
        // The session holds at least the weights; growth below that means an inference elsewhere freed
        // memory while we measured, so the file size is the better floor.
        let size_bytes = grown.unwrap_or(0).max(file_bytes);

        let metadata = ModelMetadata {
            platform: "onnxruntime_onnx".to_owned(),
            inputs: specs(session.inputs()).map_err(&load_error)?,
            outputs: specs(session.outputs()).map_err(&load_error)?,
        };
        tracing::debug!(model_id, file_bytes, grown_bytes = grown, size_bytes, "onnx session built");
        Ok(Self { session: Mutex::new(session), metadata, size_bytes })
    }
}

impl OrtModel {
    pub(crate) fn warm_up(env: &Environment, model: &[u8]) -> ort::Result<()> {
        let mut session = build_session(env, model)?;
        let x = ort::value::Tensor::from_array(([1usize], vec![1.0f32]))?;
        session.run(ort::inputs!["x" => x])?;
        Ok(())
    }
}

fn build_session(env: &Environment, model: &[u8]) -> ort::Result<Session> {
    Session::builder(env)?.with_optimization_level(GraphOptimizationLevel::All)?.commit_from_memory(model)
}

fn specs(outlets: &[Outlet]) -> Result<Vec<TensorSpec>, String> {
    outlets
        .iter()
        .map(|outlet| match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => Ok(TensorSpec {
                name: outlet.name().to_owned(),
                datatype: convert::datatype_of(*ty).ok_or_else(|| {
                    format!("{} has element type {ty:?}, which the V2 protocol cannot carry", outlet.name())
                })?,
                shape: shape.iter().map(|d| if *d < 0 { -1 } else { *d }).collect(),
            }),
            other => Err(format!(
                "{} is a {other:?}; only tensor inputs and outputs can be served (for scikit-learn \
                 classifiers convert with zipmap disabled)",
                outlet.name()
            )),
        })
        .collect()
}

impl LoadedModel for OrtModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>> {
        let inputs = request
            .inputs
            .into_iter()
            .map(|t| Ok((t.name.clone(), convert::to_value(t)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut session = self.session.lock();
        let mut outputs = session.run(inputs).map_err(|e| Error::Inference(e.to_string()))?;
        let wanted: Vec<&str> = if request.outputs.is_empty() {
            self.metadata.outputs.iter().map(|o| o.name.as_str()).collect()
        } else {
            request.outputs.iter().map(String::as_str).collect()
        };
        wanted
            .into_iter()
            .map(|name| {
                let value = outputs
                    .remove(name)
                    .ok_or_else(|| Error::Inference(format!("the model produced no output named {name}")))?;
                convert::from_value(name, &value)
            })
            .collect()
    }
}
