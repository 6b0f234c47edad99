//! Compiles the wire definitions with the system `protoc` (Debian's `protobuf-compiler`) into `OUT_DIR`,
//! plus a descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/kserve/grpc_predict_v2.proto",
        "proto/modelmesh/model-mesh.proto",
        "proto/modelmesh/model-runtime.proto",
        "proto/densemesh/admin.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("densemesh_descriptor.bin"))
        // Tensors travel as `Bytes`, so forwarding and runtimes can share buffers instead of copying them.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .bytes(".inference.InferTensorContents.bytes_contents")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
