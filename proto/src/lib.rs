//! The wire: generated types and service stubs for every gRPC API densemesh speaks.
//!
//! Field names and numbers follow the public definitions exactly, so existing clients (tritonclient,
//! the kserve SDK, grpcurl) interoperate without densemesh-specific code.
#![forbid(unsafe_code)]

/// KServe V2 / Open Inference Protocol (`inference.GRPCInferenceService`).
pub mod inference {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

/// ModelMesh's management API (`mmesh.ModelMesh`): model and vmodel registration; and its model-runtime
/// SPI (`mmesh.ModelRuntime`), which the mesh calls on a runtime beside it.
pub mod mmesh {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("mmesh");
}

/// densemesh's own management extensions (`densemesh.v1.Admin`): listings and traffic splits.
pub mod admin {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("densemesh.v1");
}

/// Serialized `FileDescriptorSet` of every service above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("densemesh_descriptor");
