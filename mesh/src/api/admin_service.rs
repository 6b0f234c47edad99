//! `densemesh.v1.Admin`: what ModelMesh's API lacks — listings for operators and `meshctl`, traffic
//! splits across several models behind one vmodel, and a watch of every vmodel's status for the
//! Kubernetes controller; and inference graphs' registration ([`crate::api::graph::registration`]).

use std::pin::Pin;

use densemesh_placement::registry::Registry;
use densemesh_placement::route::Goal;
use densemesh_placement::status::{self, LoadState};
use densemesh_placement::{ClusterView, ModelId, Source, VModelSpec, Weighted};
use densemesh_proto::admin::admin_server::Admin;
use densemesh_proto::admin::*;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::api::graph;
use crate::cluster::placer::{LastUsed, Placer};
use crate::cluster::vmodel_watch::{StatusEvent, VModelWatch};
use crate::error::registry_status;
use crate::node::cache::{CopyStatus, ModelCache};

/// The service.
#[derive(Clone)]
pub struct AdminService {
    registry: Registry,
    view: ClusterView,
    cache: ModelCache,
    placer: Placer,
    /// Ends the watches when the server stops, so they never hold up its shutdown.
    shutdown: CancellationToken,
}

impl AdminService {
    pub fn new(registry: Registry, cache: ModelCache, placer: Placer, shutdown: CancellationToken) -> Self {
        Self { registry, view: placer.view().clone(), cache, placer, shutdown }
    }
}

fn weighted(split: Vec<Weighted>) -> Vec<WeightedModel> {
    split.into_iter().map(|w| WeightedModel { model_id: w.model, weight: w.weight }).collect()
}

/// A watch event on the wire.
fn vmodel_event(event: StatusEvent) -> VModelEvent {
    use v_model_event::Kind;
    let (kind, vmodel) = match event {
        StatusEvent::Upsert(state) => (Kind::Upsert, Some(vmodel_state(state))),
        StatusEvent::Deleted { vmodel_id, owner } => (
            Kind::Deleted,
            Some(VModelState { vmodel_id: vmodel_id.to_string(), owner, ..Default::default() }),
        ),
        StatusEvent::Synced => (Kind::Synced, None),
    };
    VModelEvent { kind: kind as i32, vmodel }
}

fn vmodel_state(s: status::VModelState) -> VModelState {
    VModelState {
        vmodel_id: s.vmodel_id.to_string(),
        owner: s.owner,
        active_model_id: s.active,
        target_model_id: s.target,
        split: weighted(s.split),
        transition_error: s.transition_error.unwrap_or_default(),
        models: s.models.into_iter().map(model_state).collect(),
    }
}

fn model_state(m: status::ModelState) -> ModelState {
    use model_state::State;
    let state = match m.state {
        LoadState::Pending => State::Pending,
        LoadState::Standby => State::Standby,
        LoadState::Loading => State::Loading,
        LoadState::Loaded => State::Loaded,
        LoadState::FailedToLoad => State::FailedToLoad,
    };
    let failure = m.last_failure.unwrap_or_else(|| status::Failure {
        message: String::new(),
        instance: String::new(),
        at_ms: 0,
    });
    ModelState {
        model_id: m.model_id,
        state: state as i32,
        total_copies: m.total_copies,
        failed_copies: m.failed_copies,
        last_failure_message: failure.message,
        last_failure_instance: failure.instance,
        last_failure_ms: failure.at_ms,
        size_bytes: m.size_bytes,
    }
}

fn summary(id: &ModelId, v: VModelSpec) -> VModelSummary {
    VModelSummary {
        vmodel_id: id.to_string(),
        active_model_id: v.active,
        target_model_id: v.target,
        owner: v.owner,
        transition_error: v.transition_error.unwrap_or_default(),
        split: weighted(v.split),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchVModelsStream = Pin<Box<dyn Stream<Item = Result<VModelEvent, Status>> + Send + 'static>>;

    async fn watch_v_models(
        &self,
        request: Request<WatchVModelsRequest>,
    ) -> Result<Response<Self::WatchVModelsStream>, Status> {
        let owner = request.into_inner().owner;
        tracing::debug!(%owner, "vmodel watch started");
        // The stream ends when the client goes (tonic drops it) or the server stops.
        let watch = VModelWatch::new(self.view.clone(), owner, self.shutdown.clone());
        Ok(Response::new(Box::pin(watch.into_stream().map(|event| Ok(vmodel_event(event))))))
    }

    async fn set_graph(&self, request: Request<SetGraphRequest>) -> Result<Response<GraphInfo>, Status> {
        let info = graph::registration::set(&self.registry, &self.view, request.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn get_graph(&self, request: Request<GetGraphRequest>) -> Result<Response<GraphInfo>, Status> {
        Ok(Response::new(graph::registration::get(&self.registry, &request.get_ref().name).await?))
    }

    async fn delete_graph(
        &self,
        request: Request<DeleteGraphRequest>,
    ) -> Result<Response<DeleteGraphResponse>, Status> {
        Ok(Response::new(graph::registration::delete(&self.registry, &request.get_ref().name).await?))
    }

    async fn list_graphs(
        &self,
        _: Request<ListGraphsRequest>,
    ) -> Result<Response<ListGraphsResponse>, Status> {
        Ok(Response::new(graph::registration::list(&self.view)))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let resident: std::collections::HashMap<_, _> =
            self.cache.resident().into_iter().map(|r| (r.id.clone(), r)).collect();
        let models = self
            .view
            .models()
            .into_iter()
            .map(|(id, spec)| {
                let here = resident.get(&id);
                let (status, size_bytes, error, runtime) = match self.cache.status(&id) {
                    CopyStatus::NotLoaded => ("NOT_LOADED", 0, String::new(), String::new()),
                    CopyStatus::Loading => ("LOADING", 0, String::new(), String::new()),
                    CopyStatus::Loaded { size_bytes } => {
                        ("LOADED", size_bytes, String::new(), self.cache.runtime_of(&id).unwrap_or_default())
                    }
                    CopyStatus::Failed { reason } => ("LOADING_FAILED", 0, reason, String::new()),
                };
                ModelSummary {
                    model_id: id.to_string(),
                    r#type: spec.model_type,
                    path: spec.path,
                    source: match spec.source {
                        Source::Api => "api",
                        Source::Repository => "repository",
                    }
                    .to_owned(),
                    status: status.to_owned(),
                    size_bytes,
                    error,
                    size_hint_bytes: spec.size_bytes.unwrap_or_default(),
                    min_copies: spec.min_copies.unwrap_or_default(),
                    requests: here.map_or(0, |r| r.requests),
                    idle_seconds: here.map_or(0, |r| r.idle_for.as_secs()),
                    runtime,
                    forced_runtime: spec.runtime.unwrap_or_default(),
                    gpu: spec.gpu.map(|g| g.as_str().to_owned()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn list_v_models(
        &self,
        _: Request<ListVModelsRequest>,
    ) -> Result<Response<ListVModelsResponse>, Status> {
        let vmodels = self.view.vmodels().into_iter().map(|(id, v)| summary(&id, v)).collect();
        Ok(Response::new(ListVModelsResponse { vmodels }))
    }

    async fn list_instances(
        &self,
        _: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        // This pod's own record is published now and then; what it answers with is its use now, so a
        // load just done shows at once.
        let me = self.placer.instance_id().to_owned();
        let live = self.cache.placement_state();
        let devices = self.cache.gpu_tier().records();
        let instances = self
            .view
            .instances()
            .into_iter()
            .map(|(id, mut r)| {
                if id == me {
                    r.capacity_bytes = live.capacity_bytes;
                    r.used_bytes = live.used_bytes;
                    r.models_loaded = live.models_loaded;
                    r.loading = live.loading;
                    r.lru_age_seconds = live.lru_age.as_secs();
                    r.devices = devices.clone();
                }
                (id, r)
            })
            .map(|(id, r)| InstanceSummary {
                instance_id: id,
                endpoint: r.endpoint,
                capacity_bytes: r.capacity_bytes,
                used_bytes: r.used_bytes,
                models_loaded: r.models_loaded,
                loading: r.loading,
                lru_age_seconds: r.lru_age_seconds,
                requests_per_minute: r.requests_per_minute,
                draining: r.draining,
                model_types: r.model_types,
                devices: r
                    .devices
                    .into_iter()
                    .map(|d| DeviceSummary {
                        name: d.name,
                        kind: d.kind,
                        total_bytes: d.total_bytes,
                        capacity_bytes: d.capacity_bytes,
                        used_bytes: d.used_bytes,
                        models: d.models,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListInstancesResponse { instances }))
    }

    async fn set_v_model_split(
        &self,
        request: Request<SetVModelSplitRequest>,
    ) -> Result<Response<VModelSplit>, Status> {
        let request = request.into_inner();
        let vid = ModelId::new(&request.vmodel_id)
            .map_err(|e| Status::invalid_argument(format!("vmodel_id: {e}")))?;
        let mut split = Vec::with_capacity(request.split.len());
        for w in &request.split {
            let id = ModelId::new(&w.model_id)
                .map_err(|e| Status::invalid_argument(format!("split model_id: {e}")))?;
            if self.view.model(&id).is_none() {
                return Err(Status::not_found(format!("model {id} in the split is not registered")));
            }
            split.push((id, w.weight));
        }
        if !split.is_empty() && split.iter().all(|(_, w)| *w == 0) {
            return Err(Status::invalid_argument(
                "every weight of the split is 0; give at least one model weight",
            ));
        }
        // Every model of the split gets a copy first, where placement says (once in the cluster, not
        // here), so switching to the split leaves no request without a loaded model.
        for (id, _) in &split {
            self.placer.ensure(id, Goal::Ensure, true, LastUsed::Now).await.map_err(|e| {
                Status::failed_precondition(format!(
                    "model {id} of the split cannot be loaded, so the split is not applied: {e}"
                ))
            })?;
        }
        let weighted: Vec<Weighted> =
            split.iter().map(|(id, w)| Weighted { model: id.to_string(), weight: *w }).collect();
        for _ in 0..8 {
            let (current, revision) =
                self.registry.vmodel(&vid).await.map_err(registry_status)?.ok_or_else(|| {
                    Status::not_found(format!("vmodel {vid} not found; create it with setVModel first"))
                })?;
            let next = VModelSpec { split: weighted.clone(), ..current };
            if let Some(r) = self.registry.put_vmodel(&vid, &next, revision).await.map_err(registry_status)? {
                self.view.caught_up(r).await;
                tracing::info!(vmodel_id = %vid, split = ?weighted, "vmodel traffic split set");
                let out = summary(&vid, next).split;
                return Ok(Response::new(VModelSplit { vmodel_id: vid.to_string(), split: out }));
            }
        }
        Err(Status::aborted(format!("vmodel {vid} kept changing; retry")))
    }
}
