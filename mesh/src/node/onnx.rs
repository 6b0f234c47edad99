//! The `onnx` format's runtime: the tiny evaluator for small graphs it implements, ONNX Runtime for
//! everything else.
//!
//! An ONNX Runtime session costs 50–130 KiB whatever the model; a 16→32→4 MLP's weights are 3 KB.
//! The tiny evaluator (`densemesh-runtime-tiny`) holds such a model in about its weights' size, and
//! checks every operator, domain and opset at load: a model it does not take (too large, an operator
//! it lacks) is loaded by ONNX Runtime instead, so which one serves a model changes its memory, never
//! its answers (both agree within 1e-5 on the project's models and 1,000 generated ones).

use std::sync::Arc;

use densemesh_runtime_core::{LoadRequest, LoadedModel, Result, Runtime};
use densemesh_runtime_tiny::TinyRuntime;

/// ONNX models: tiny ones on the evaluator when it is on, the rest on `ort`.
pub struct OnnxRuntimes {
    tiny: Option<TinyRuntime>,
    ort: Arc<dyn Runtime>,
}

impl OnnxRuntimes {
    /// `tiny` takes the models it can (`None`: ONNX Runtime takes all).
    pub fn new(tiny: Option<TinyRuntime>, ort: Arc<dyn Runtime>) -> Self {
        Self { tiny, ort }
    }
}

impl Runtime for OnnxRuntimes {
    fn name(&self) -> &'static str {
        if self.tiny.is_some() { "tiny+onnxruntime" } else { self.ort.name() }
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        if let Some(tiny) = &self.tiny {
            match tiny.try_load(request) {
                Ok(model) => {
                    tracing::debug!(model_id = %request.model_id, "loaded by the tiny evaluator");
                    return Ok(Box::new(model));
                }
                Err(e) if e.wants_fallback() => {
                    tracing::debug!(model_id = %request.model_id, reason = %e, "loading with onnxruntime");
                }
                Err(e) => {
                    return Err(densemesh_runtime_core::Error::Load {
                        model_id: request.model_id.clone(),
                        source: Box::new(e),
                    });
                }
            }
        }
        self.ort.load(request)
    }

    fn reclaim_memory(&self) {
        self.ort.reclaim_memory();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use densemesh_runtime_core::ModelMetadata;
    use densemesh_runtime_tiny::TinyConfig;

    use super::*;
    use crate::test_support::StubModel;

    /// Stands in for ONNX Runtime: says it loaded, with its name as the platform.
    struct Fallback;

    impl Runtime for Fallback {
        fn name(&self) -> &'static str {
            "onnxruntime"
        }
        fn load(&self, _: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
            let metadata = ModelMetadata { platform: "fallback".into(), inputs: vec![], outputs: vec![] };
            Ok(Box::new(StubModel(metadata)))
        }
    }

    fn example(name: &str) -> LoadRequest {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models").join(name).join("model.onnx");
        LoadRequest::from_path(name, path)
    }

    #[test]
    fn small_graphs_it_implements_go_to_the_tiny_evaluator_and_the_rest_to_onnxruntime() {
        let both = OnnxRuntimes::new(Some(TinyRuntime::new(TinyConfig::default())), Arc::new(Fallback));
        // The tiny evaluator's models report ONNX Runtime's platform, so it is told apart by its size:
        // the stand-in charges 1 byte.
        let tiny = both.load(&example("iris-logreg")).unwrap();
        assert!(tiny.size_bytes() > 1 && tiny.metadata().platform == "onnxruntime_onnx");
        // Where and ReduceSum are not the evaluator's: ONNX Runtime loads it.
        assert_eq!(both.load(&example("multi-input")).unwrap().metadata().platform, "fallback");
        // Over the size limit: ONNX Runtime.
        let small =
            OnnxRuntimes::new(Some(TinyRuntime::new(TinyConfig { max_file_bytes: 10 })), Arc::new(Fallback));
        assert_eq!(small.load(&example("iris-logreg")).unwrap().metadata().platform, "fallback");
        // Off: ONNX Runtime takes all.
        let off = OnnxRuntimes::new(None, Arc::new(Fallback));
        assert_eq!(off.load(&example("iris-logreg")).unwrap().metadata().platform, "fallback");
        assert_eq!((both.name(), off.name()), ("tiny+onnxruntime", "onnxruntime"));
    }
}
