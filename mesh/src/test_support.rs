//! Test doubles shared by the unit tests of several modules.

use densemesh_placement::InstanceRecord;
use densemesh_proto::inference::*;
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

/// A KServe V2 server that answers every ModelInfer with an empty response naming the model asked
/// for, and nothing else: for tests of what wraps the generated service.
#[derive(Clone, Default)]
pub(crate) struct AnswersInfer;

#[tonic::async_trait]
impl densemesh_proto::inference::grpc_inference_service_server::GrpcInferenceService for AnswersInfer {
    async fn server_live(
        &self,
        _: tonic::Request<ServerLiveRequest>,
    ) -> Result<tonic::Response<ServerLiveResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: tonic::Request<ServerReadyRequest>,
    ) -> Result<tonic::Response<ServerReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        _: tonic::Request<ModelReadyRequest>,
    ) -> Result<tonic::Response<ModelReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ModelReadyResponse { ready: true }))
    }

    async fn server_metadata(
        &self,
        _: tonic::Request<ServerMetadataRequest>,
    ) -> Result<tonic::Response<ServerMetadataResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn model_metadata(
        &self,
        _: tonic::Request<ModelMetadataRequest>,
    ) -> Result<tonic::Response<ModelMetadataResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn model_infer(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
        let model_name = request.into_inner().model_name;
        Ok(tonic::Response::new(ModelInferResponse { model_name, ..Default::default() }))
    }
}

/// A live pod's instance record at `endpoint`: 1 GiB of capacity, one model loaded, nothing else going on.
pub(crate) fn instance_record(endpoint: &str) -> InstanceRecord {
    InstanceRecord {
        endpoint: endpoint.to_owned(),
        capacity_bytes: 1 << 30,
        used_bytes: 0,
        models_loaded: 1,
        loading: 0,
        lru_age_seconds: 0,
        coldest_model: String::new(),
        requests_per_minute: 0,
        draining: false,
        started_ms: 0,
        model_types: densemesh_placement::spec::every_supported_type(),
    }
}
