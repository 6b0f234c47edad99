//! The `onnx` format's runtime: the tiny evaluator for small graphs it implements, ONNX Runtime for
//! everything else.
//!
//! An ONNX Runtime session costs 50–130 KiB whatever the model; a 16→32→4 MLP's weights are 3 KB.
//! The tiny evaluator (`densemesh-runtime-tiny`) holds such a model in about its weights' size, and
//! checks every operator, domain and opset at load: a model it does not take (too large, an operator
//! it lacks) is loaded by ONNX Runtime instead, so which one serves a model changes its memory, never
//! its answers (both agree within 1e-5 on the project's models and 1,000 generated ones).
//!
//! A registration may force either (`ModelInfo.runtime`: `tiny` or `onnxruntime`), whatever the
//! size limit, for a model whose memory or speed matters more than the default's trade; a model the
//! evaluator cannot run then fails its load with the evaluator's reason instead of falling back.

use std::sync::Arc;

use densemesh_runtime_core::{Error, LoadRequest, LoadedModel, Result, Runtime};
use densemesh_runtime_tiny::{TinyConfig, TinyRuntime};

/// The evaluator's name, as registrations force it.
const TINY: &str = "tiny";

/// ONNX models: tiny ones on the evaluator when it is on, the rest on `ort`.
pub struct OnnxRuntimes {
    tiny: Option<TinyRuntime>,
    /// The evaluator without a size limit, for models forced onto it.
    forced_tiny: TinyRuntime,
    ort: Arc<dyn Runtime>,
}

impl OnnxRuntimes {
    /// `tiny` takes the models it can (`None`: ONNX Runtime takes all that are not forced).
    pub fn new(tiny: Option<TinyRuntime>, ort: Arc<dyn Runtime>) -> Self {
        Self { tiny, forced_tiny: TinyRuntime::new(TinyConfig { max_file_bytes: u64::MAX }), ort }
    }
}

impl Runtime for OnnxRuntimes {
    fn name(&self) -> &'static str {
        if self.tiny.is_some() { "tiny+onnxruntime" } else { self.ort.name() }
    }

    fn choices(&self) -> Vec<&'static str> {
        vec![TINY, self.ort.name()]
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        match request.runtime.as_deref() {
            None => {}
            Some(TINY) => {
                return match self.forced_tiny.try_load(request) {
                    Ok(model) => Ok(Box::new(model)),
                    Err(e) => Err(Error::Load {
                        model_id: request.model_id.clone(),
                        source: format!(
                            "the registration asks for the tiny evaluator, which cannot load it: {e}"
                        )
                        .into(),
                    }),
                };
            }
            Some(name) if name == self.ort.name() => return self.ort.load(request),
            Some(name) => {
                return Err(Error::Load {
                    model_id: request.model_id.clone(),
                    source: format!(
                        "no ONNX runtime is called {name:?}; the choices are {:?}",
                        self.choices()
                    )
                    .into(),
                });
            }
        }
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

    /// The tiny evaluator's load alone: a model it turns down goes to ONNX Runtime on the blocking pool,
    /// since a session's load starts threads and may take milliseconds.
    fn try_load_quick(&self, request: &LoadRequest) -> Option<Result<Box<dyn LoadedModel>>> {
        let tiny = match request.runtime.as_deref() {
            None => self.tiny.as_ref()?,
            Some(TINY) => &self.forced_tiny,
            Some(_) => return None,
        };
        match tiny.try_load(request) {
            Ok(model) => Some(Ok(Box::new(model))),
            Err(e) if e.wants_fallback() || request.runtime.is_some() => None,
            Err(e) => Some(Err(Error::Load { model_id: request.model_id.clone(), source: Box::new(e) })),
        }
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

    #[test]
    fn a_registration_forcing_a_runtime_gets_it_whatever_the_size_limit_or_a_load_error_saying_why() {
        let forced = |name: &str, model: &str| example(model).with_runtime(name);
        // The evaluator off, or its limit below the model: forcing still puts the model on it.
        let off = OnnxRuntimes::new(None, Arc::new(Fallback));
        let small =
            OnnxRuntimes::new(Some(TinyRuntime::new(TinyConfig { max_file_bytes: 10 })), Arc::new(Fallback));
        for runtimes in [&off, &small] {
            let model = runtimes.load(&forced("tiny", "iris-logreg")).unwrap();
            assert_eq!((model.runtime(), model.metadata().platform.as_str()), ("tiny", "onnxruntime_onnx"));
            assert_eq!(runtimes.choices(), ["tiny", "onnxruntime"]);
        }
        // Forced onto ONNX Runtime although the evaluator would take it.
        let both = OnnxRuntimes::new(Some(TinyRuntime::new(TinyConfig::default())), Arc::new(Fallback));
        assert_eq!(both.load(&forced("onnxruntime", "iris-logreg")).unwrap().metadata().platform, "fallback");
        // A model the evaluator cannot run, forced onto it, fails with its reason: no silent fallback.
        let err = both.load(&forced("tiny", "multi-input")).err().unwrap().to_string();
        assert!(err.contains("asks for the tiny evaluator") && err.contains("Where"), "{err}");
        let err = both.load(&forced("tract", "iris-logreg")).err().unwrap().to_string();
        assert!(err.contains("\"tract\"") && err.contains("onnxruntime"), "{err}");
    }
}
