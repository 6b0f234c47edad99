//! Test doubles shared by the unit tests of several modules.

use densemesh_runtime_core::{LoadRequest, LoadedModel, Runtime};

/// A runtime that never loads: for tests where serving or loading on this pod is the outcome being
/// checked against, or where the model's files already fail to be found.
pub(crate) struct NoRuntime;

impl Runtime for NoRuntime {
    fn name(&self) -> &'static str {
        "none"
    }

    fn load(&self, _: &LoadRequest) -> densemesh_runtime_core::Result<Box<dyn LoadedModel>> {
        Err(densemesh_runtime_core::Error::RuntimeUnavailable("not in this test".into()))
    }
}
