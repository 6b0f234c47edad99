//! Kubernetes for densemesh: the CRDs modelmesh-serving users already write (InferenceService in
//! ModelMesh mode, Predictor, ServingRuntime) and KServe's InferenceGraph, the pure mapping from them to the mesh's management
//! API, and the controller that applies it.
pub mod crd;
pub mod graph;
pub mod graph_operator;
pub mod lease;
pub mod manifests;
pub mod mapping;
pub mod mesh;
pub mod operator;
pub mod reconcile;
pub mod runtime;
pub mod runtime_config;
