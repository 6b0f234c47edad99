//! The runtimes of one pod, by model format: the cache holds a single [`Runtime`], and this one hands
//! each load to the runtime of the model's registered format. What a pod offers to the cluster (its
//! instance record's `model_types`) is exactly the formats here, so placement never sends a pod a
//! model it has no runtime for.

use std::collections::BTreeMap;
use std::sync::Arc;

use densemesh_runtime_core::{Error, LoadRequest, LoadedModel, Result, Runtime};

/// Runtimes by the model formats they load.
#[derive(Clone, Default)]
pub struct Runtimes {
    by_format: BTreeMap<String, Arc<dyn Runtime>>,
}

impl Runtimes {
    /// No runtimes yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `runtime` loads `formats`; a format given twice is an error naming both runtimes, since which
    /// one would load it is a configuration mistake, not a choice to make silently.
    pub fn add(&mut self, formats: &[impl AsRef<str>], runtime: Arc<dyn Runtime>) -> Result<(), String> {
        let formats = formats.iter().map(AsRef::as_ref);
        if let Some((format, other)) = formats.clone().find_map(|f| self.by_format.get(f).map(|o| (f, o))) {
            return Err(format!(
                "model format {format:?} is offered by two runtimes, {} and {}",
                other.name(),
                runtime.name()
            ));
        }
        for format in formats {
            self.by_format.insert(format.to_owned(), runtime.clone());
        }
        Ok(())
    }

    /// Every format some runtime here loads, sorted.
    pub fn formats(&self) -> Vec<String> {
        self.by_format.keys().cloned().collect()
    }

    /// The runtime of `format`.
    pub fn get(&self, format: &str) -> Option<&Arc<dyn Runtime>> {
        self.by_format.get(format)
    }

    /// Whether a model of `format` may be forced onto `runtime` here: `Err` says what may be named
    /// instead, for the registration's refusal.
    pub fn check_choice(&self, format: &str, runtime: &str) -> Result<(), String> {
        let choices = self.by_format.get(format).map(|r| r.choices()).unwrap_or_default();
        if choices.contains(&runtime) {
            return Ok(());
        }
        Err(format!(
            "runtime {runtime:?} does not load model type {format:?} on this pod; it may be {}",
            if choices.is_empty() { "none".to_owned() } else { choices.join(", ") }
        ))
    }

    /// The runtime that loads `request`: its format's, unless the runtime it names is not among that
    /// one's choices.
    fn runtime_for(&self, request: &LoadRequest) -> Result<&Arc<dyn Runtime>> {
        // A load without a format (a caller that predates formats) is ONNX, as every model was then.
        let format = if request.model_type.is_empty() { "onnx" } else { request.model_type.as_str() };
        let refused = |why: String| Error::Load { model_id: request.model_id.clone(), source: why.into() };
        let runtime = self.by_format.get(format).ok_or_else(|| {
            refused(format!(
                "no runtime on this pod loads model format {format:?}; it loads {}",
                self.formats().join(", ")
            ))
        })?;
        if let Some(name) = &request.runtime {
            self.check_choice(format, name).map_err(refused)?;
        }
        Ok(runtime)
    }

    /// Each distinct runtime once.
    fn distinct(&self) -> Vec<&Arc<dyn Runtime>> {
        let mut seen: Vec<&Arc<dyn Runtime>> = Vec::new();
        for runtime in self.by_format.values() {
            if !seen.iter().any(|s| Arc::ptr_eq(s, runtime)) {
                seen.push(runtime);
            }
        }
        seen
    }
}

impl Runtime for Runtimes {
    fn name(&self) -> &'static str {
        "by-format"
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        self.runtime_for(request)?.load(request)
    }

    fn try_load_quick(&self, request: &LoadRequest) -> Option<Result<Box<dyn LoadedModel>>> {
        // A load `runtime_for` refuses goes to `load`, which gives the reason.
        self.runtime_for(request).ok()?.try_load_quick(request)
    }

    fn reclaim_memory(&self) {
        for runtime in self.distinct() {
            runtime.reclaim_memory();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use densemesh_runtime_core::ModelMetadata;

    use super::*;
    use crate::test_support::StubModel;

    struct Named {
        name: &'static str,
        reclaimed: AtomicUsize,
    }

    impl Runtime for Named {
        fn name(&self) -> &'static str {
            self.name
        }
        fn load(&self, _: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
            let metadata = ModelMetadata { platform: self.name.into(), inputs: vec![], outputs: vec![] };
            Ok(Box::new(StubModel(metadata)))
        }
        fn reclaim_memory(&self) {
            self.reclaimed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn named(name: &'static str) -> Arc<Named> {
        Arc::new(Named { name, reclaimed: AtomicUsize::new(0) })
    }

    #[test]
    fn each_load_goes_to_the_runtime_of_its_format_and_an_unknown_one_is_named() {
        let (ort, remote) = (named("ort"), named("remote"));
        let mut runtimes = Runtimes::new();
        runtimes.add(&["onnx"], ort.clone()).unwrap();
        runtimes.add(&["sklearn", "xgboost"], remote.clone()).unwrap();
        assert_eq!(runtimes.formats(), ["onnx", "sklearn", "xgboost"]);
        let platform = |format: &str| {
            let request = LoadRequest::from_path("m", "/m").with_model_type(format);
            runtimes.load(&request).map(|m| m.metadata().platform.clone())
        };
        assert_eq!(platform("xgboost").unwrap(), "remote");
        assert_eq!(platform("onnx").unwrap(), "ort");
        assert_eq!(platform("").unwrap(), "ort", "no format is ONNX");
        let err = platform("pytorch").err().unwrap().to_string();
        assert!(err.contains("\"pytorch\"") && err.contains("onnx, sklearn, xgboost"), "{err}");

        runtimes.reclaim_memory();
        assert_eq!((ort.reclaimed.load(Ordering::Relaxed), remote.reclaimed.load(Ordering::Relaxed)), (1, 1));
    }
    #[test]
    fn a_forced_runtime_must_be_one_the_format_offers() {
        let (ort, remote) = (named("onnxruntime"), named("mlserver"));
        let mut runtimes = Runtimes::new();
        runtimes.add(&["onnx"], ort).unwrap();
        runtimes.add(&["sklearn"], remote).unwrap();
        assert_eq!(runtimes.check_choice("sklearn", "mlserver"), Ok(()));
        let why = runtimes.check_choice("sklearn", "onnxruntime").unwrap_err();
        assert!(why.contains("\"onnxruntime\"") && why.contains("may be mlserver"), "{why}");
        assert!(runtimes.check_choice("pytorch", "x").unwrap_err().contains("may be none"));
        // A load naming another runtime is refused before any runtime sees it.
        let request =
            LoadRequest::from_path("m", "/m").with_model_type("sklearn").with_runtime("onnxruntime");
        let err = runtimes.load(&request).err().unwrap().to_string();
        assert!(err.contains("may be mlserver"), "{err}");
        let request = LoadRequest::from_path("m", "/m").with_model_type("sklearn").with_runtime("mlserver");
        assert_eq!(runtimes.load(&request).unwrap().metadata().platform, "mlserver");
    }

    #[test]
    fn a_format_offered_twice_is_refused_with_both_runtimes_named() {
        let mut runtimes = Runtimes::new();
        runtimes.add(&["sklearn"], named("mlserver")).unwrap();
        let err = runtimes.add(&["xgboost", "sklearn"], named("triton")).unwrap_err();
        assert!(err.contains("\"sklearn\"") && err.contains("mlserver and triton"), "{err}");
    }
}
