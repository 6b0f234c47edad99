//! ModelMesh's management API (`mmesh.ModelMesh`) on the inference port: registration of models and
//! vmodels in the registry, and their status from this pod's cache.

use std::sync::Arc;

use densemesh_placement::registry::Registry;
use densemesh_placement::route::Goal;
use densemesh_placement::{ClusterView, ModelId, ModelSpec, Placement, VModelSpec};
use densemesh_proto::mmesh::model_mesh_server::ModelMesh;
use densemesh_proto::mmesh::model_status_info::{ModelCopyInfo, ModelStatus};
use densemesh_proto::mmesh::v_model_status_info::VModelStatus;
use densemesh_proto::mmesh::*;
use tonic::{Request, Response, Status};

use crate::cluster::forward::Forwarder;
use crate::cluster::instance::now_ms;
use crate::cluster::peers;
use crate::cluster::placer::{LastUsed, Placer};
use crate::error::{MeshError, registry_status as status_of};
use crate::node::cache::{CopyStatus, ModelCache};

/// How many times a vmodel write retries after losing a compare-and-swap race.
const CAS_ATTEMPTS: usize = 8;

/// The management service.
#[derive(Clone)]
pub struct Management {
    registry: Registry,
    view: ClusterView,
    cache: ModelCache,
    placer: Placer,
    instance_id: String,
    puller: Option<Arc<densemesh_puller::Puller>>,
    /// This pod's runtimes, to refuse a registration forcing a runtime none of them is.
    runtimes: Option<crate::node::runtimes::Runtimes>,
}

impl Management {
    /// A model or vmodel may not take an inference graph's name: `ModelInfer` by that name would run
    /// the graph. The graph side refuses the other way round when the graph is registered.
    async fn refuse_graph_name(&self, kind: &str, id: &ModelId) -> Result<(), Status> {
        if self.registry.graph(id).await.map_err(status_of)?.is_some() {
            return Err(Status::already_exists(format!(
                "{kind} {id}: the name is taken by an inference graph; a {kind} needs a name of its own"
            )));
        }
        Ok(())
    }

    pub fn new(registry: Registry, view: ClusterView, cache: ModelCache, placer: Placer) -> Self {
        let instance_id = placer.instance_id().to_owned();
        Self { registry, view, cache, placer, instance_id, puller: None, runtimes: None }
    }

    /// Refuses (INVALID_ARGUMENT) a registration naming a runtime this pod does not offer for the
    /// model's type: pods of one deployment share their runtimes, so it could load nowhere.
    pub fn with_runtimes(mut self, runtimes: crate::node::runtimes::Runtimes) -> Self {
        self.runtimes = Some(runtimes);
        self
    }

    /// Refuses, before writing it, a registration of a local path outside `--local-model-roots`
    /// (INVALID_ARGUMENT).
    pub fn with_puller(mut self, puller: Arc<densemesh_puller::Puller>) -> Self {
        self.puller = Some(puller);
        self
    }

    /// The spec of a registration, its location checked.
    fn checked_spec(&self, info: Option<ModelInfo>, auto_delete: bool) -> Result<ModelSpec, Status> {
        let spec = spec_from(info, auto_delete)?;
        let offered = self.placer.offered_types();
        if !offered.contains(&spec.model_type) {
            // Refused before it is written: a registration no pod can ever load would only fail later,
            // on every request, far from the mistake.
            let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
            return Err(Status::invalid_argument(format!(
                "model type {:?} is offered by no pod; offered: {} (a pod offers its runtimes' formats: \
                 --model-types, --runtime-config)",
                spec.model_type,
                if offered.is_empty() { "none".to_owned() } else { offered.join(", ") }
            )));
        }
        if let (Some(runtime), Some(runtimes)) = (&spec.runtime, &self.runtimes) {
            runtimes.check_choice(&spec.model_type, runtime).map_err(Status::invalid_argument)?;
        }
        if let Some(puller) = &self.puller {
            puller
                .check_local(&spec.path, spec.key.as_deref())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        Ok(spec)
    }

    /// A model's status across the cluster: this pod's copy from its cache (current to the instant),
    /// other pods' copies from their placement records. Each loaded copy's runtime is a line of
    /// `errors` (`<instance>: served by <runtime>`), the one free-text field ModelMesh's status has:
    /// which runtime holds a model decides its memory and speed, and operators ask.
    fn model_status(&self, id: &ModelId) -> ModelStatusInfo {
        if self.view.model(id).is_none() {
            return ModelStatusInfo { status: ModelStatus::NotFound as i32, ..Default::default() };
        }
        let mut copies = Vec::new();
        let mut errors = Vec::new();
        let local = match self.cache.status(id) {
            CopyStatus::Loaded { .. } => {
                if let Some(runtime) = self.cache.runtime_of(id) {
                    errors.push(served_by(&self.instance_id, &runtime));
                }
                Some(ModelStatus::Loaded)
            }
            CopyStatus::Loading => Some(ModelStatus::Loading),
            CopyStatus::Failed { reason } => {
                errors.push(reason);
                Some(ModelStatus::LoadingFailed)
            }
            CopyStatus::NotLoaded => None,
        };
        if let Some(status) = local {
            copies.push(ModelCopyInfo {
                location: self.instance_id.clone(),
                copy_status: status as i32,
                time: now_ms(),
            });
        }
        for (instance, placement) in self.view.placements(id) {
            if instance == self.instance_id {
                continue;
            }
            let (status, time) = match placement {
                Placement::Loading { since_ms } => (ModelStatus::Loading, since_ms),
                Placement::Loaded { since_ms, runtime, .. } => {
                    if !runtime.is_empty() {
                        errors.push(served_by(&instance, &runtime));
                    }
                    (ModelStatus::Loaded, since_ms)
                }
                Placement::Failed { since_ms, reason, .. } => {
                    errors.push(format!("{instance}: {reason}"));
                    (ModelStatus::LoadingFailed, since_ms)
                }
            };
            copies.push(ModelCopyInfo { location: instance, copy_status: status as i32, time });
        }
        let has = |s: ModelStatus| copies.iter().any(|c| c.copy_status == s as i32);
        let status = if has(ModelStatus::Loaded) {
            ModelStatus::Loaded
        } else if has(ModelStatus::Loading) {
            ModelStatus::Loading
        } else if has(ModelStatus::LoadingFailed) {
            ModelStatus::LoadingFailed
        } else {
            ModelStatus::NotLoaded
        };
        ModelStatusInfo { status: status as i32, errors, model_copy_infos: copies }
    }

    /// Makes sure a copy of the model exists where placement says (here, or a peer asked to load it),
    /// in the background or (with `sync`) before answering, counting it as last used at `last_used`
    /// for eviction: a model loaded ahead of any request must not push out models requests are using.
    /// A call forwarded by another pod loads here: that pod already asked placement.
    async fn load(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        id: &ModelId,
        sync: bool,
        last_used: LastUsed,
    ) -> Result<(), MeshError> {
        if Forwarder::was_forwarded(metadata) {
            return self.placer.load_here(id, sync, last_used).await;
        }
        self.placer.ensure(id, Goal::Ensure, sync, last_used).await.map(|_| ())
    }

    fn vmodel_status(&self, id: &ModelId, owner: &str) -> VModelStatusInfo {
        let Some(v) = self.view.vmodel(id).filter(|v| owner.is_empty() || v.owner == owner) else {
            return VModelStatusInfo {
                status: VModelStatus::NotFound as i32,
                active_model_status: Some(ModelStatusInfo {
                    status: ModelStatus::NotFound as i32,
                    ..Default::default()
                }),
                ..Default::default()
            };
        };
        let status = match (&v.transition_error, v.transitioning()) {
            (_, false) => VModelStatus::Defined,
            (Some(_), true) => VModelStatus::TransitionFailed,
            (None, true) => VModelStatus::Transitioning,
        };
        // Stored ids were validated when written; a bad one reads as not found.
        let status_of_id = |id: &str| ModelId::new(id).map(|id| self.model_status(&id)).unwrap_or_default();
        let target_status = v.transitioning().then(|| {
            let mut s = status_of_id(&v.target);
            if let Some(e) = v.transition_error.as_ref().filter(|e| !s.errors.contains(e)) {
                s.errors.push(e.clone());
            }
            s
        });
        VModelStatusInfo {
            status: status as i32,
            active_model_status: Some(status_of_id(&v.active)),
            target_model_status: target_status,
            active_model_id: v.active,
            target_model_id: v.target,
            owner: v.owner,
        }
    }

    /// Waits until a vmodel's transition to `target` ends (switched, failed or superseded).
    async fn transition_settled(&self, id: &ModelId, target: &str) {
        let mut changes = self.view.subscribe();
        loop {
            match self.view.vmodel(id) {
                Some(v) if v.target == target && v.transitioning() && v.transition_error.is_none() => {}
                _ => return,
            }
            if changes.recv().await.is_err() {
                return;
            }
        }
    }
}

/// The status line naming a copy's runtime.
fn served_by(instance: &str, runtime: &str) -> String {
    format!("{instance}: served by {runtime}")
}

fn parse_id(what: &str, id: &str) -> Result<ModelId, Status> {
    ModelId::new(id).map_err(|e| Status::invalid_argument(format!("{what}: {e}")))
}

/// The spec a registration writes. densemesh's `sizeBytes` and `minCopies` extensions become placement
/// hints; 0 (what a client that does not know them sends) is no hint.
fn spec_from(info: Option<ModelInfo>, auto_delete: bool) -> Result<ModelSpec, Status> {
    let info = info.ok_or_else(|| Status::invalid_argument("modelInfo is required (type and path)"))?;
    if info.r#type.is_empty() {
        return Err(Status::invalid_argument("modelInfo.type is required (e.g. onnx)"));
    }
    if !densemesh_placement::spec::is_format_name(&info.r#type) {
        return Err(Status::invalid_argument(format!(
            "modelInfo.type {:?} is not a format name (lower-case, e.g. onnx, huggingface, sklearn)",
            info.r#type
        )));
    }
    Ok(ModelSpec {
        key: (!info.key.is_empty()).then_some(info.key),
        auto_delete,
        size_bytes: (info.size_bytes > 0).then_some(info.size_bytes),
        min_copies: (info.min_copies > 0).then_some(info.min_copies),
        runtime: (!info.runtime.is_empty()).then_some(info.runtime),
        gpu: match info.gpu.trim() {
            "" => None,
            gpu => Some(gpu.parse().map_err(|e| Status::invalid_argument(format!("modelInfo.gpu: {e}")))?),
        },
        ..ModelSpec::api(info.r#type, info.path)
    })
}

#[tonic::async_trait]
impl ModelMesh for Management {
    async fn register_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<ModelStatusInfo>, Status> {
        let (metadata, _, request) = request.into_parts();
        let id = parse_id("modelId", &request.model_id)?;
        let spec = self.checked_spec(request.model_info, false)?;
        self.refuse_graph_name("model", &id).await?;
        let registered = self.registry.register(&id, &spec).await.map_err(status_of)?;
        self.view.caught_up(registered.revision).await;
        tracing::info!(model_id = %id, created = registered.created, updated = registered.updated, "model registered");
        let mut status = None;
        if request.load_now {
            let last_used = LastUsed::from_request(request.last_used_time, LastUsed::AnHourAgo);
            // The registration stands whatever the load does; its outcome is in the status.
            if let Err(e) = self.load(&metadata, &id, request.sync, last_used).await {
                let mut s = self.model_status(&id);
                s.errors.push(e.to_string());
                status = Some(s);
            }
        }
        Ok(Response::new(status.unwrap_or_else(|| self.model_status(&id))))
    }

    async fn unregister_model(
        &self,
        request: Request<UnregisterModelRequest>,
    ) -> Result<Response<UnregisterModelResponse>, Status> {
        let id = parse_id("modelId", &request.get_ref().model_id)?;
        if let Some(revision) = self.registry.unregister(&id).await.map_err(status_of)? {
            self.view.caught_up(revision).await;
            self.cache.unload(&id).await;
            tracing::info!(model_id = %id, "model unregistered");
        }
        Ok(Response::new(UnregisterModelResponse {}))
    }

    async fn get_model_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<ModelStatusInfo>, Status> {
        let id = parse_id("modelId", &request.get_ref().model_id)?;
        Ok(Response::new(self.model_status(&id)))
    }

    async fn ensure_loaded(
        &self,
        request: Request<EnsureLoadedRequest>,
    ) -> Result<Response<ModelStatusInfo>, Status> {
        let (metadata, _, request) = request.into_parts();
        let id = parse_id("modelId", &request.model_id)?;
        // A peer that asks this pod to load a model it just saw registered must not hear NOT_FOUND
        // because this pod's view is a moment behind its own.
        peers::catch_up_with_sender(&self.view, &metadata, &id, peers::FORWARDED_VIEW_WAIT).await;
        if self.view.model(&id).is_some() {
            let last_used = LastUsed::from_request(request.last_used_time, LastUsed::Now);
            self.load(&metadata, &id, request.sync, last_used).await.map_err(Status::from)?;
        }
        Ok(Response::new(self.model_status(&id)))
    }

    async fn set_v_model(
        &self,
        request: Request<SetVModelRequest>,
    ) -> Result<Response<VModelStatusInfo>, Status> {
        let request = request.into_inner();
        let vid = parse_id("vModelId", &request.v_model_id)?;
        let target = parse_id("targetModelId", &request.target_model_id)?;
        self.refuse_graph_name("vmodel", &vid).await?;
        self.refuse_graph_name("model", &target).await?;
        if request.model_info.is_some() {
            let spec = self.checked_spec(request.model_info.clone(), request.auto_delete_target_model)?;
            let registered = self.registry.register(&target, &spec).await.map_err(status_of)?;
            self.view.caught_up(registered.revision).await;
        }
        if self.registry.model(&target).await.map_err(status_of)?.is_none() {
            return Err(Status::not_found(format!(
                "target model {target} is not registered; register it first or pass modelInfo"
            )));
        }
        let mut written = None;
        for _ in 0..CAS_ATTEMPTS {
            let current = self.registry.vmodel(&vid).await.map_err(status_of)?;
            let expected = request.expected_target_model_id.as_str();
            let (next, revision) = match current {
                None => {
                    if request.update_only {
                        return Err(Status::not_found(format!(
                            "vmodel {vid} does not exist (updateOnly is set)"
                        )));
                    }
                    if !expected.is_empty() && expected != target.as_str() {
                        return Err(Status::failed_precondition(format!(
                            "vmodel {vid} does not exist, so its target is not {expected}"
                        )));
                    }
                    let v = VModelSpec {
                        active: target.to_string(),
                        target: target.to_string(),
                        owner: request.owner.clone(),
                        transition_error: None,
                        split: Vec::new(),
                    };
                    (v, 0)
                }
                Some((v, revision)) => {
                    if !request.owner.is_empty() && v.owner != request.owner {
                        return Err(Status::already_exists(format!(
                            "vmodel {vid} exists with owner {:?}, not {:?}",
                            v.owner, request.owner
                        )));
                    }
                    if !expected.is_empty() && expected != v.target {
                        return Err(Status::failed_precondition(format!(
                            "vmodel {vid} targets {}, not the expected {expected}",
                            v.target
                        )));
                    }
                    let active = if request.force || v.active == target.as_str() {
                        target.to_string()
                    } else {
                        v.active.clone()
                    };
                    let next = VModelSpec {
                        active,
                        target: target.to_string(),
                        owner: v.owner.clone(),
                        transition_error: None,
                        split: Vec::new(),
                    };
                    if next == v {
                        written = Some(revision);
                        break;
                    }
                    (next, revision)
                }
            };
            if let Some(r) = self.registry.put_vmodel(&vid, &next, revision).await.map_err(status_of)? {
                written = Some(r);
                break;
            }
        }
        let revision =
            written.ok_or_else(|| Status::aborted(format!("vmodel {vid} kept changing; retry")))?;
        self.view.caught_up(revision).await;
        tracing::info!(vmodel_id = %vid, target = %target, "vmodel set");
        // A transition's target is loaded by the leader, once, where placement says; a vmodel that is
        // not transitioning has its model loaded here and now when asked.
        let transitioning = self.view.vmodel(&vid).is_some_and(|v| v.transitioning());
        if request.load_now && !transitioning {
            self.placer
                .ensure(&target, Goal::Ensure, request.sync, LastUsed::Now)
                .await
                .map_err(Status::from)?;
        }
        if request.sync {
            self.transition_settled(&vid, target.as_str()).await;
        }
        Ok(Response::new(self.vmodel_status(&vid, "")))
    }

    async fn delete_v_model(
        &self,
        request: Request<DeleteVModelRequest>,
    ) -> Result<Response<DeleteVModelResponse>, Status> {
        let request = request.into_inner();
        let vid = parse_id("vModelId", &request.v_model_id)?;
        for _ in 0..CAS_ATTEMPTS {
            let Some((v, revision)) = self.registry.vmodel(&vid).await.map_err(status_of)? else {
                return Ok(Response::new(DeleteVModelResponse {}));
            };
            if !request.owner.is_empty() && v.owner != request.owner {
                return Err(Status::not_found(format!("vmodel {vid} has no owner {:?}", request.owner)));
            }
            // Its auto-delete models are unregistered by the leader, which sees the vmodel go.
            if self.registry.delete_vmodel(&vid, revision).await.map_err(status_of)? {
                tracing::info!(vmodel_id = %vid, "vmodel deleted");
                return Ok(Response::new(DeleteVModelResponse {}));
            }
        }
        Err(Status::aborted(format!("vmodel {vid} kept changing; retry")))
    }

    async fn get_v_model_status(
        &self,
        request: Request<GetVModelStatusRequest>,
    ) -> Result<Response<VModelStatusInfo>, Status> {
        let request = request.into_inner();
        let vid = parse_id("vModelId", &request.v_model_id)?;
        Ok(Response::new(self.vmodel_status(&vid, &request.owner)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_support::{NO_FILES, TestPod, forwarded_metadata};

    #[tokio::test]
    async fn a_forwarded_ensure_loaded_waits_for_the_registration_its_sender_acted_on() {
        let pod = TestPod::start("a").await;
        let management =
            Management::new(pod.registry.clone(), pod.view.clone(), pod.cache.clone(), pod.placer.clone());
        let next = pod.next_revision().await;
        let message = EnsureLoadedRequest { model_id: "m".into(), sync: true, ..Default::default() };
        let request =
            Request::from_parts(forwarded_metadata("b", Some(next)), tonic::Extensions::default(), message);
        let ensure = management.ensure_loaded(request);
        let (answer, written) = tokio::join!(ensure, pod.register_after("m", Duration::from_millis(300)));
        assert_eq!(written, next);
        // Loaded from the spec (and failing here for want of files), never NOT_FOUND.
        let status = answer.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains(NO_FILES), "{status:?}");
    }

    #[test]
    fn the_densemesh_extensions_of_model_info_become_placement_hints_and_zero_is_none() {
        let info = |size_bytes, min_copies| ModelInfo {
            r#type: "onnx".into(),
            path: "/m".into(),
            key: String::new(),
            size_bytes,
            min_copies,
            runtime: String::new(),
            gpu: String::new(),
        };
        let old_client = spec_from(Some(info(0, 0)), false).unwrap();
        assert_eq!(
            (old_client.size_bytes, old_client.min_copies, old_client.key, old_client.runtime),
            (None, None, None, None)
        );
        let hinted = spec_from(Some(info(5 << 20, 2)), true).unwrap();
        assert_eq!(
            (hinted.size_bytes, hinted.min_copies, hinted.auto_delete),
            (Some(5 << 20), Some(2), true)
        );
        let forced = spec_from(Some(ModelInfo { runtime: "tiny".into(), ..info(0, 0) }), false).unwrap();
        assert_eq!(forced.runtime.as_deref(), Some("tiny"));
        let gpu = spec_from(Some(ModelInfo { gpu: "required".into(), ..info(0, 0) }), false).unwrap();
        assert_eq!(gpu.gpu, Some(densemesh_placement::gpu::Gpu::Required));
        let bad = spec_from(Some(ModelInfo { gpu: "sometimes".into(), ..info(0, 0) }), false).unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(
            bad.message().contains("modelInfo.gpu") && bad.message().contains("preferred or required"),
            "{bad:?}"
        );
    }
}
