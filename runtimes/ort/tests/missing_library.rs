//! A missing library is an error that says what to install, never a panic. Its own test binary: once a
//! library is loaded into a process it stays.

use densemesh_runtime_core::Error;
use densemesh_runtime_ort::{OrtConfig, OrtRuntime};

#[test]
fn a_missing_library_says_what_to_install() {
    let config = OrtConfig { library_path: Some("/nonexistent/libonnxruntime.so".into()), intra_threads: 1 };
    let err = OrtRuntime::new(&config).err().expect("no library, no runtime");
    let message = err.to_string();
    assert!(matches!(err, Error::RuntimeUnavailable(_)), "{message}");
    assert!(message.contains("/nonexistent/libonnxruntime.so"), "{message}");
    assert!(message.contains("pip install onnxruntime"), "{message}");
    // The loader's own error stays reachable under the message that names the library.
    let chain = std::iter::successors(std::error::Error::source(&err), |e| e.source());
    assert!(chain.into_iter().any(|e| e.downcast_ref::<ort::LoadDynamicError>().is_some()), "{message}");
}
