//! One pod's machinery: the byte-bounded model [`cache`] and its loader, the V2 tensor codec ([`v2`]),
//! naming the model a request is for ([`router`]), the [`runtimes`] by model format (the [`onnx`] format's
//! being the tiny evaluator with ONNX Runtime behind it), the inference [`worker`] and request [`limits`].
//! Nothing here knows other pods exist.

pub mod cache;
pub mod gpu;
pub mod limits;
pub mod onnx;
pub mod router;
pub mod runtimes;
pub mod v2;
pub mod worker;
