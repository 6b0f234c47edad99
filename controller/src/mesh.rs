//! The controller's only way into the mesh: its management API over gRPC, never etcd.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use densemesh_proto::admin::admin_client::AdminClient;
use densemesh_proto::admin::{
    DeleteGraphRequest, SetGraphRequest, SetVModelSplitRequest, VModelEvent, WatchVModelsRequest,
    WeightedModel,
};
use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;
use densemesh_proto::mmesh::model_status_info::ModelStatus;
use densemesh_proto::mmesh::{
    DeleteVModelRequest, GetStatusRequest, ModelInfo, RegisterModelRequest, SetVModelRequest,
    UnregisterModelRequest,
};
use futures::Stream;
use parking_lot::Mutex;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::reconcile::{MeshCall, ModelRegistration};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh endpoint {endpoint:?} is not a valid URL: {source}")]
    Endpoint { endpoint: String, source: tonic::transport::Error },
    #[error("{call} failed: {status}")]
    Call { call: &'static str, status: Box<tonic::Status> },
    #[error("cannot read {path} (--mesh-tls-dir): {source}")]
    TlsFile { path: PathBuf, source: std::io::Error },
    #[error(
        "--mesh-tls-dir {dir} has tls.crt without tls.key or the other way round; give both for mutual TLS, or neither"
    )]
    TlsPair { dir: PathBuf },
    #[error("--mesh-tls-dir needs an https:// --mesh-endpoint, not {endpoint:?}")]
    TlsEndpoint { endpoint: String },
}

/// TLS to meshd (its `--tls-*`): a directory laid out as a Kubernetes TLS secret, `ca.crt` (the CA
/// meshd's certificate chains to) and, where meshd asks for client certificates, `tls.crt` and
/// `tls.key`. Read once at start; a rotated client certificate takes a restart.
#[derive(Debug, Clone)]
pub struct MeshTls {
    pub dir: PathBuf,
}

impl MeshTls {
    /// The client config, every file checked readable here rather than at the first call.
    pub fn config(&self) -> Result<ClientTlsConfig, MeshError> {
        let read = |name: &str| {
            let path = self.dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && name != "ca.crt" => Ok(None),
                Err(source) => Err(MeshError::TlsFile { path, source }),
            }
        };
        let ca = read("ca.crt")?.unwrap_or_default();
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        match (read("tls.crt")?, read("tls.key")?) {
            (Some(cert), Some(key)) => Ok(config.identity(Identity::from_pem(cert, key))),
            (None, None) => Ok(config),
            _ => Err(MeshError::TlsPair { dir: self.dir.clone() }),
        }
    }
}

impl MeshError {
    /// Whether trying again later may succeed (the mesh was unreachable or busy), as opposed to
    /// the mesh refusing the request as written.
    pub fn is_transient(&self) -> bool {
        match self {
            MeshError::Endpoint { .. }
            | MeshError::TlsFile { .. }
            | MeshError::TlsPair { .. }
            | MeshError::TlsEndpoint { .. } => false,
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

/// Adds the mesh's management API token (meshd's `--admin-token-file`) to every call, read from a
/// file and read again when the file changes, so a rotated secret is picked up without a restart.
/// Without a file, calls go out as they are.
#[derive(Clone, Default)]
pub struct Bearer {
    file: Option<Arc<TokenFile>>,
}

struct TokenFile {
    path: PathBuf,
    /// The file's modification time when read, and the header value it gave.
    current: Mutex<Option<(SystemTime, MetadataValue<Ascii>)>>,
}

impl Bearer {
    /// Sends the token in `path` (surrounding whitespace is not part of it).
    pub fn from_file(path: &Path) -> Self {
        Self { file: Some(Arc::new(TokenFile { path: path.to_owned(), current: Mutex::new(None) })) }
    }

    fn value(file: &TokenFile) -> Result<MetadataValue<Ascii>, tonic::Status> {
        let unusable = |why: String| {
            tonic::Status::unauthenticated(format!("the mesh token file {}: {why}", file.path.display()))
        };
        let modified =
            std::fs::metadata(&file.path).and_then(|m| m.modified()).map_err(|e| unusable(e.to_string()))?;
        let mut current = file.current.lock();
        if let Some((at, value)) = current.as_ref()
            && *at == modified
        {
            return Ok(value.clone());
        }
        let bytes = std::fs::read(&file.path).map_err(|e| unusable(e.to_string()))?;
        let token = std::str::from_utf8(bytes.trim_ascii()).map_err(|_| unusable("not text".into()))?;
        if token.is_empty() {
            return Err(unusable("empty".into()));
        }
        let value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| unusable("not a token a header can carry".into()))?;
        *current = Some((modified, value.clone()));
        Ok(value)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(file) = &self.file {
            request.metadata_mut().insert("authorization", Self::value(file)?);
        }
        Ok(request)
    }
}

/// A channel whose calls carry the token, if any.
pub type Authorized = InterceptedService<Channel, Bearer>;

/// The mesh over gRPC: ModelMesh's management API plus densemesh's Admin API.
#[derive(Clone)]
pub struct GrpcMesh {
    mmesh: ModelMeshClient<Authorized>,
    admin: AdminClient<Authorized>,
}

impl GrpcMesh {
    /// Connects lazily: the controller starts (and reports the mesh unreachable in its logs and
    /// metrics) even while the mesh is not up yet. Over TLS with `tls`, which needs an https URL
    /// (tonic would silently speak plaintext to an http one).
    pub fn new(endpoint: &str, bearer: Bearer, tls: Option<&MeshTls>) -> Result<Self, MeshError> {
        let invalid = |source| MeshError::Endpoint { endpoint: endpoint.to_owned(), source };
        let mut channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(invalid)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some(tls) = tls {
            if !endpoint.starts_with("https://") {
                return Err(MeshError::TlsEndpoint { endpoint: endpoint.to_owned() });
            }
            channel = channel.tls_config(tls.config()?).map_err(invalid)?;
        }
        Ok(Self::from_channel(channel.connect_lazy(), bearer))
    }

    /// Over a channel the caller already has.
    pub fn from_channel(channel: Channel, bearer: Bearer) -> Self {
        GrpcMesh {
            mmesh: ModelMeshClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminClient::with_interceptor(channel, bearer),
        }
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

    /// A model's load state across the mesh (ModelMesh's getModelStatus), for a graph step naming a
    /// model that is no vmodel, whose state the vmodel watch does not carry.
    pub async fn model_status(&self, model_id: &str) -> Result<ModelStatus, MeshError> {
        let mut mmesh = self.mmesh.clone();
        let info = mmesh
            .get_model_status(GetStatusRequest { model_id: model_id.to_owned() })
            .await
            .map_err(|status| MeshError::Call { call: "getModelStatus", status: Box::new(status) })?;
        Ok(info.into_inner().status())
    }
}

fn info(model: &ModelRegistration) -> ModelInfo {
    ModelInfo {
        r#type: model.model_type.clone(),
        path: model.path.clone(),
        key: model.key.clone(),
        size_bytes: model.size_bytes.unwrap_or(0),
        min_copies: model.min_copies.unwrap_or(0),
        gpu: model.gpu.clone().unwrap_or_default(),
        // A predictor's `runtime` names a ServingRuntime, which decides the pods, not a runtime
        // within meshd: the pod chooses.
        runtime: String::new(),
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
            MeshCall::SetGraph { name, spec_json } => {
                let mut admin = self.admin.clone();
                admin
                    .set_graph(SetGraphRequest { name: name.clone(), spec_json: spec_json.clone() })
                    .await
                    .map_err(fail("SetGraph"))?;
            }
            MeshCall::DeleteGraph { name } => {
                let mut admin = self.admin.clone();
                match admin.delete_graph(DeleteGraphRequest { name: name.clone() }).await {
                    Ok(_) => {}
                    Err(status) if status.code() == tonic::Code::NotFound => {}
                    Err(status) => return Err(fail("DeleteGraph")(status)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_mesh_tls_dir_is_checked_at_start_and_needs_an_https_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let tls = MeshTls { dir: dir.path().to_owned() };
        let new = |endpoint: &str| {
            GrpcMesh::new(endpoint, Bearer::default(), Some(&tls)).err().map(|e| e.to_string())
        };
        let missing = new("https://meshd:8033").unwrap();
        assert!(missing.contains("ca.crt") && missing.contains("--mesh-tls-dir"), "{missing}");
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-keyout", "tls.key", "-subj", "/CN=ca", "-days", "1", "-out", "ca.crt"])
            .current_dir(dir.path())
            .output()
            .expect("openssl runs (scripts/setup.sh installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let half = new("https://meshd:8033").unwrap();
        assert!(half.contains("tls.crt without tls.key"), "{half}");
        std::fs::copy(dir.path().join("ca.crt"), dir.path().join("tls.crt")).unwrap();
        assert_eq!(new("https://meshd:8033"), None, "CA and client pair");
        let plain = new("http://meshd:8033").unwrap();
        assert!(plain.contains("https://"), "{plain}");
    }

    fn sent(bearer: &mut Bearer) -> Result<Option<String>, tonic::Code> {
        let request = bearer.call(tonic::Request::new(())).map_err(|s| s.code())?;
        Ok(request.metadata().get("authorization").map(|v| v.to_str().unwrap().to_owned()))
    }

    #[test]
    fn the_token_file_is_sent_and_read_again_when_it_changes() {
        assert_eq!(sent(&mut Bearer::default()), Ok(None), "no file, no header");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let mut bearer = Bearer::from_file(&path);
        assert_eq!(sent(&mut bearer), Ok(Some("Bearer first".into())));
        std::fs::write(&path, "second").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(sent(&mut bearer), Ok(Some("Bearer second".into())), "a rotated secret is picked up");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(sent(&mut bearer), Err(tonic::Code::Unauthenticated), "no call without the token");
    }

    #[test]
    fn registrations_carry_the_placement_hints() {
        let info = info(&ModelRegistration {
            model_id: "m".into(),
            model_type: "onnx".into(),
            path: "s3://b/m".into(),
            key: String::new(),
            size_bytes: Some(4096),
            min_copies: Some(2),
            gpu: Some("required".into()),
        });
        assert_eq!((info.size_bytes, info.min_copies, info.gpu.as_str()), (4096, 2, "required"));
        let none =
            super::info(&ModelRegistration { size_bytes: None, min_copies: None, ..Default::default() });
        assert_eq!((none.size_bytes, none.min_copies), (0, 0), "0 is 'not given' on the wire");
    }
}
