//! The controller's only way into the mesh: its management API over gRPC, never etcd.

use std::time::Duration;

use async_trait::async_trait;
use densemesh_proto::admin::admin_client::AdminClient;
use densemesh_proto::admin::{SetVModelSplitRequest, VModelEvent, WatchVModelsRequest, WeightedModel};
use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;
use densemesh_proto::mmesh::{
    DeleteVModelRequest, ModelInfo, RegisterModelRequest, SetVModelRequest, UnregisterModelRequest,
};
use futures::Stream;
use tonic::transport::{Channel, Endpoint};

use crate::reconcile::{MeshCall, ModelRegistration};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh endpoint {endpoint:?} is not a valid URL: {source}")]
    Endpoint { endpoint: String, source: tonic::transport::Error },
    #[error("{call} failed: {status}")]
    Call { call: &'static str, status: Box<tonic::Status> },
}

impl MeshError {
    /// Whether trying again later may succeed (the mesh was unreachable or busy), as opposed to
    /// the mesh refusing the request as written.
    pub fn is_transient(&self) -> bool {
        match self {
            MeshError::Endpoint { .. } => false,
            MeshError::Call { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Cancelled
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
            ),
        }
    }
}

/// The management calls reconciling needs; a trait so the decisions can be tested without a mesh
/// and run the same against a real one.
#[async_trait]
pub trait MeshApi: Send + Sync {
    async fn call(&self, call: &MeshCall) -> Result<(), MeshError>;
}

/// The mesh over gRPC: ModelMesh's management API plus densemesh's Admin API.
#[derive(Clone)]
pub struct GrpcMesh {
    mmesh: ModelMeshClient<Channel>,
    admin: AdminClient<Channel>,
}

impl GrpcMesh {
    /// Connects lazily: the controller starts (and reports the mesh unreachable in its logs and
    /// metrics) even while the mesh is not up yet.
    pub fn new(endpoint: &str) -> Result<Self, MeshError> {
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|source| MeshError::Endpoint { endpoint: endpoint.to_owned(), source })?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy();
        Ok(Self::from_channel(channel))
    }

    /// Over a channel the caller already has.
    pub fn from_channel(channel: Channel) -> Self {
        GrpcMesh { mmesh: ModelMeshClient::new(channel.clone()), admin: AdminClient::new(channel) }
    }

    /// Every vmodel of `owner` and then each change (densemesh's Admin.WatchVModels).
    pub async fn watch(
        &self,
        owner: &str,
    ) -> Result<impl Stream<Item = Result<VModelEvent, tonic::Status>> + use<>, MeshError> {
        let mut admin = self.admin.clone();
        let response = admin
            .watch_v_models(WatchVModelsRequest { owner: owner.to_owned() })
            .await
            .map_err(|status| MeshError::Call { call: "WatchVModels", status: Box::new(status) })?;
        Ok(response.into_inner())
    }
}

fn info(model: &ModelRegistration) -> ModelInfo {
    ModelInfo {
        r#type: model.model_type.clone(),
        path: model.path.clone(),
        key: model.key.clone(),
        size_bytes: model.size_bytes.unwrap_or(0),
        min_copies: model.min_copies.unwrap_or(0),
    }
}

#[async_trait]
impl MeshApi for GrpcMesh {
    async fn call(&self, call: &MeshCall) -> Result<(), MeshError> {
        let mut mmesh = self.mmesh.clone();
        let fail = |call: &'static str| move |status| MeshError::Call { call, status: Box::new(status) };
        match call {
            MeshCall::SetVModel { vmodel_id, owner, model } => {
                mmesh
                    .set_v_model(SetVModelRequest {
                        v_model_id: vmodel_id.clone(),
                        owner: owner.clone(),
                        target_model_id: model.model_id.clone(),
                        model_info: Some(info(model)),
                        auto_delete_target_model: true,
                        load_now: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(fail("setVModel"))?;
            }
            MeshCall::Retarget { vmodel_id, owner, model_id } => {
                mmesh
                    .set_v_model(SetVModelRequest {
                        v_model_id: vmodel_id.clone(),
                        owner: owner.clone(),
                        target_model_id: model_id.clone(),
                        load_now: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(fail("setVModel"))?;
            }
            MeshCall::RegisterModel { model } => {
                mmesh
                    .register_model(RegisterModelRequest {
                        model_id: model.model_id.clone(),
                        model_info: Some(info(model)),
                        load_now: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(fail("registerModel"))?;
            }
            MeshCall::UnregisterModel { model_id } => {
                match mmesh.unregister_model(UnregisterModelRequest { model_id: model_id.clone() }).await {
                    Ok(_) => {}
                    Err(status) if status.code() == tonic::Code::NotFound => {}
                    Err(status) => return Err(fail("unregisterModel")(status)),
                }
            }
            MeshCall::SetSplit { vmodel_id, split } => {
                let mut admin = self.admin.clone();
                admin
                    .set_v_model_split(SetVModelSplitRequest {
                        vmodel_id: vmodel_id.clone(),
                        split: split
                            .iter()
                            .map(|(model_id, weight)| WeightedModel {
                                model_id: model_id.clone(),
                                weight: *weight,
                            })
                            .collect(),
                    })
                    .await
                    .map_err(fail("SetVModelSplit"))?;
            }
            MeshCall::DeleteVModel { vmodel_id, owner } => {
                match mmesh
                    .delete_v_model(DeleteVModelRequest {
                        v_model_id: vmodel_id.clone(),
                        owner: owner.clone(),
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(status) if status.code() == tonic::Code::NotFound => {}
                    Err(status) => return Err(fail("deleteVModel")(status)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_carry_the_placement_hints() {
        let info = info(&ModelRegistration {
            model_id: "m".into(),
            model_type: "onnx".into(),
            path: "s3://b/m".into(),
            key: String::new(),
            size_bytes: Some(4096),
            min_copies: Some(2),
        });
        assert_eq!((info.size_bytes, info.min_copies), (4096, 2));
        let none =
            super::info(&ModelRegistration { size_bytes: None, min_copies: None, ..Default::default() });
        assert_eq!((none.size_bytes, none.min_copies), (0, 0), "0 is 'not given' on the wire");
    }
}
