//! One loaded ONNX model: its session, its interface and what it costs in memory.

use densemesh_runtime_core::{
    Cause, Error, InferRequest, LoadRequest, LoadedModel, ModelMetadata, Result, Tensor, TensorSpec,
};
use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Outlet, ValueType};
use parking_lot::Mutex;

use crate::convert;
use crate::memory::{self, GraphSummary, SessionCost};

/// Which models get [`Profile::Lean`] session options.
///
/// The rule: a model file smaller than `lean_below_bytes` whose operators are all simple (no
/// convolution, pooling, normalisation or attention patterns that ONNX Runtime's extended and layout
/// optimisations rewrite for speed; see `memory::SIMPLE_OPS`) is built lean; every other model gets
/// ONNX Runtime's defaults. Below ~1 MiB a session's fixed cost (~90–130 KiB with default options,
/// ~50 KiB lean) is a sizable share of the model and lean sessions run as fast; above it the weights
/// dominate, and the CPU arena saves allocations on the larger intermediates. Measured with
/// `cargo bench -p densemesh-runtime-ort --bench profiles` (figures in bench/README.md, "Tiny models").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Model files below this many bytes (and of simple operators) get lean sessions; 0 turns lean
    /// sessions off, `u64::MAX` makes every simple model lean.
    pub lean_below_bytes: u64,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self { lean_below_bytes: 1 << 20 }
    }
}

/// The session options a model is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// No CPU memory arena (nor the memory patterns that need one) and basic graph optimisation.
    ///
    /// Measured on a 16→32→4 MLP (pip onnxruntime 1.32): 57 KiB per session instead of 128 KiB once
    /// it has run. The arena holds a session's largest intermediate tensors between requests (38 KiB
    /// here); extended optimisation keeps ~30 KiB of optimiser state per session. Inference speed is
    /// the same for such models, whose intermediates are small and whose operators the extended and
    /// layout optimisations leave alone; a small convolutional net, by contrast, runs 1.6× slower with
    /// basic optimisation, which is why the operators are checked ([`GraphSummary::only_simple_ops`]).
    Lean,
    /// ONNX Runtime's defaults for serving: the CPU arena, memory patterns, every optimisation.
    Full,
}

impl Profile {
    pub(crate) fn for_model(policy: SessionPolicy, file_bytes: u64, graph: Option<&GraphSummary>) -> Self {
        match graph {
            Some(graph) if graph.only_simple_ops && file_bytes < policy.lean_below_bytes => Profile::Lean,
            _ => Profile::Full,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Profile::Lean => "lean",
            Profile::Full => "full",
        }
    }
}

/// How loads are measured and charged: one at a time, at the costs calibrated at start-up.
pub(crate) struct Sizing {
    /// Session builds run one at a time, so each measured growth is one build's.
    lock: Mutex<()>,
    lean: SessionCost,
    full: SessionCost,
}

impl Sizing {
    /// Calibrates both profiles' costs (see [`memory::calibrate`]); call before serving anything.
    pub(crate) fn calibrate(env: &Environment) -> ort::Result<Self> {
        // Both profiles' sessions live until both are measured (see `memory::calibrate`). The
        // fallbacks, for where the resident set cannot be read, were measured on onnxruntime 1.32.
        let mut kept = Vec::new();
        let lean = memory::calibrate(
            |model| build_session(env, model, Profile::Lean),
            SessionCost { per_session: 32 << 10, per_node: 4 << 10 },
            &mut kept,
        )?;
        let full = memory::calibrate(
            |model| build_session(env, model, Profile::Full),
            SessionCost { per_session: 64 << 10, per_node: 4 << 10 },
            &mut kept,
        )?;
        drop(kept);
        memory::release_free_heap();
        Ok(Self { lock: Mutex::new(()), lean, full })
    }

    fn cost(&self, profile: Profile) -> &SessionCost {
        match profile {
            Profile::Lean => &self.lean,
            Profile::Full => &self.full,
        }
    }

    /// The calibrated costs, (lean, full), for logs.
    pub(crate) fn costs(&self) -> (SessionCost, SessionCost) {
        (self.lean, self.full)
    }
}

pub(crate) struct OrtModel {
    /// `ort` requires `&mut` to run: ONNX Runtime's allocators are not all thread-safe. Requests for
    /// one model take turns; different models run in parallel on the shared pool.
    session: Mutex<Session>,
    metadata: ModelMetadata,
    size_bytes: u64,
}

impl OrtModel {
    pub(crate) fn load(
        env: &Environment,
        sizing: &Sizing,
        policy: SessionPolicy,
        request: &LoadRequest,
    ) -> Result<Self> {
        // Read under the measuring lock too: another load's file buffer would count against this one.
        let _measuring = sizing.lock.lock();
        match &request.contents {
            // Already resident (mapped and pre-faulted): file-backed, so outside the measured set.
            Some(contents) => {
                Self::build_measured(env, sizing, policy, &request.model_id, contents.as_slice())
            }
            None => {
                let bytes = std::fs::read(&request.path)
                    .map_err(|source| Error::Io { path: request.path.clone(), source })?;
                Self::build_measured(env, sizing, policy, &request.model_id, &bytes)
            }
        }
    }

    /// Builds the session from bytes already in memory (a read file, later a mapped disk-cache entry).
    pub(crate) fn from_bytes(
        env: &Environment,
        sizing: &Sizing,
        policy: SessionPolicy,
        model_id: &str,
        bytes: Vec<u8>,
    ) -> Result<Self> {
        let _measuring = sizing.lock.lock();
        Self::build_measured(env, sizing, policy, model_id, &bytes)
    }

    /// Builds a session and charges it (see [`memory`]); the caller holds the measuring lock, so no
    /// other load's allocations count, and frees `bytes` only after this returns, so they are in
    /// both readings and cancel out.
    fn build_measured(
        env: &Environment,
        sizing: &Sizing,
        policy: SessionPolicy,
        model_id: &str,
        bytes: &[u8],
    ) -> Result<Self> {
        let load_error = |source: Cause| Error::Load { model_id: model_id.to_owned(), source };
        let file_bytes = bytes.len() as u64;
        let graph = memory::summarize(bytes);
        let profile = Profile::for_model(policy, file_bytes, graph.as_ref());

        let before = memory::settled_anonymous_bytes();
        let session = build_session(env, bytes, profile).map_err(|e| load_error(e.into()))?;
        let grown = before.zip(memory::settled_anonymous_bytes()).map(|(b, a)| a.saturating_sub(b));
        let nodes = graph.map_or(0, |g| g.nodes);
        let estimate = sizing.cost(profile).estimate(file_bytes, nodes);
        // Called only when the growth looks like more than other threads could have added: one
        // more build of the same model tells the two apart.
        let size_bytes = memory::charge(estimate, grown, || {
            let before = memory::settled_anonymous_bytes()?;
            let again = build_session(env, bytes, profile).ok()?;
            let grown = memory::settled_anonymous_bytes()?.saturating_sub(before);
            drop(again);
            memory::release_free_heap();
            Some(grown)
        });

        let metadata = ModelMetadata {
            platform: "onnxruntime_onnx".to_owned(),
            inputs: specs(session.inputs()).map_err(|reason| load_error(reason.into()))?,
            outputs: specs(session.outputs()).map_err(|reason| load_error(reason.into()))?,
        };
        tracing::debug!(
            model_id,
            file_bytes,
            nodes,
            profile = profile.name(),
            estimate_bytes = estimate,
            grown_bytes = grown,
            size_bytes,
            "onnx session built"
        );
        Ok(Self { session: Mutex::new(session), metadata, size_bytes })
    }
}

impl OrtModel {
    pub(crate) fn warm_up(env: &Environment, model: &[u8]) -> ort::Result<()> {
        let mut session = build_session(env, model, Profile::Full)?;
        let x = ort::value::Tensor::from_array(([1usize], vec![1.0f32]))?;
        session.run(ort::inputs!["x" => x])?;
        Ok(())
    }
}

fn build_session(env: &Environment, model: &[u8], profile: Profile) -> ort::Result<Session> {
    let (arena, level) = match profile {
        Profile::Lean => (false, GraphOptimizationLevel::Level1),
        Profile::Full => (true, GraphOptimizationLevel::All),
    };
    let cpu = ep::CPU::default().with_arena_allocator(arena).build().error_on_failure();
    Session::builder(env)?
        .with_execution_providers([cpu])?
        // Memory patterns lay out a run's buffers inside the arena; without one they only cost memory.
        .with_memory_pattern(arena)?
        .with_optimization_level(level)?
        .commit_from_memory(model)
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

    fn runtime(&self) -> &str {
        "onnxruntime"
    }

    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>> {
        let inputs = request
            .inputs
            .into_iter()
            .map(|t| Ok((t.name.clone(), convert::to_value(t)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut session = self.session.lock();
        let mut outputs = session.run(inputs).map_err(|e| Error::Inference(e.into()))?;
        let wanted: Vec<&str> = if request.outputs.is_empty() {
            self.metadata.outputs.iter().map(|o| o.name.as_str()).collect()
        } else {
            request.outputs.iter().map(String::as_str).collect()
        };
        wanted
            .into_iter()
            .map(|name| {
                let value = outputs.remove(name).ok_or_else(|| {
                    Error::Inference(format!("the model produced no output named {name}").into())
                })?;
                convert::from_value(name, &value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_models_of_simple_operators_get_lean_sessions_below_the_threshold() {
        let simple = GraphSummary { nodes: 5, only_simple_ops: true };
        let conv = GraphSummary { nodes: 5, only_simple_ops: false };
        let default = SessionPolicy::default();
        let off = SessionPolicy { lean_below_bytes: 0 };
        let all = SessionPolicy { lean_below_bytes: u64::MAX };
        // (policy, file bytes, graph, profile)
        for (policy, bytes, graph, profile) in [
            (default, 3_000, Some(&simple), Profile::Lean),
            (default, (1 << 20) - 1, Some(&simple), Profile::Lean),
            (default, 1 << 20, Some(&simple), Profile::Full),
            (default, 3_000, Some(&conv), Profile::Full),
            (default, 3_000, None, Profile::Full),
            (off, 3_000, Some(&simple), Profile::Full),
            (all, 1 << 30, Some(&simple), Profile::Lean),
        ] {
            assert_eq!(
                Profile::for_model(policy, bytes, graph),
                profile,
                "{policy:?}, {bytes} bytes, {graph:?}"
            );
        }
    }
}
