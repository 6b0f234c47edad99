//! Compiles the vendored ONNX protobuf (`proto/onnx-ml.proto`) with the system `protoc` into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/onnx-ml.proto";
    println!("cargo:rerun-if-changed={proto}");
    prost_build::Config::new().compile_protos(&[proto], &["proto"])?;
    Ok(())
}
