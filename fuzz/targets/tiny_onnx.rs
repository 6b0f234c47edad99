//! AFL++ target: `densemesh_runtime_tiny::fuzzing::onnx_model` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_runtime_tiny::fuzzing::onnx_model(data));
}
