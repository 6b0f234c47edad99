//! Compiles the V2 model-repository extension (not part of `densemesh-proto`'s inference service yet)
//! with the system `protoc` into `OUT_DIR`; only the client is generated, this crate never serves it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/model_repository.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure().build_server(false).compile_protos(&[proto], &["proto"])?;
    Ok(())
}
