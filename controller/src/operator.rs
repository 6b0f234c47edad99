//! The running controller: kube-rs Controllers for InferenceServices and Predictors that apply
//! `reconcile`'s decisions, fed by the API server's watches and by the mesh's own vmodel watch.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use densemesh_proto::admin::{VModelState, v_model_event};
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{info, warn};

use crate::crd::{ClusterServingRuntime, InferenceService, Predictor, ServingRuntime};
use crate::mapping::{
    self, Desired, ISVC_OWNER, PREDICTOR_OWNER, RuntimeInfo, SpecError, desired_for_isvc,
    desired_for_predictor,
};
use crate::mesh::{GrpcMesh, MeshApi, MeshError};
use crate::reconcile::{self, MeshCall, Rollout, Urls};

/// The finalizer that keeps an object until its vmodel is gone from the mesh.
pub const FINALIZER: &str = "serving.kserve.io/densemesh";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("writing to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(String),
}

/// What the mesh last reported of each vmodel of one owner, and whether its first round is in.
#[derive(Default)]
struct Reported {
    vmodels: HashMap<String, VModelState>,
    synced: bool,
}

/// One kind the controller serves: how it maps to the mesh and how its status reads.
pub trait MeshObject:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    const OWNER: &'static str;
    /// Whether this object is the mesh's to serve.
    fn ours(&self) -> bool;
    fn desired(&self) -> Result<Desired, SpecError>;
    fn rollout(&self) -> Rollout;
    /// The status to write, or `None` when it would not change.
    fn new_status(
        &self,
        desired: &Result<Desired, SpecError>,
        mesh: Option<&VModelState>,
        urls: &Urls,
        now: &Time,
    ) -> Option<serde_json::Value>;
}

impl MeshObject for InferenceService {
    const OWNER: &'static str = ISVC_OWNER;
    fn ours(&self) -> bool {
        mapping::is_model_mesh(self.metadata.annotations.as_ref())
    }
    fn desired(&self) -> Result<Desired, SpecError> {
        desired_for_isvc(self)
    }
    fn rollout(&self) -> Rollout {
        Rollout::of_isvc(self.status.as_ref())
    }
    fn new_status(
        &self,
        desired: &Result<Desired, SpecError>,
        mesh: Option<&VModelState>,
        urls: &Urls,
        now: &Time,
    ) -> Option<serde_json::Value> {
        let status =
            reconcile::isvc_status(desired, mesh, self.status.as_ref(), self.metadata.generation, urls, now);
        (self.status.as_ref() != Some(&status))
            .then(|| serde_json::to_value(status).expect("status serializes"))
    }
}

impl MeshObject for Predictor {
    const OWNER: &'static str = PREDICTOR_OWNER;
    fn ours(&self) -> bool {
        true
    }
    fn desired(&self) -> Result<Desired, SpecError> {
        desired_for_predictor(self)
    }
    fn rollout(&self) -> Rollout {
        Rollout::default()
    }
    fn new_status(
        &self,
        desired: &Result<Desired, SpecError>,
        mesh: Option<&VModelState>,
        urls: &Urls,
        _now: &Time,
    ) -> Option<serde_json::Value> {
        let status = reconcile::predictor_status(desired, mesh, urls);
        (self.status.as_ref() != Some(&status))
            .then(|| serde_json::to_value(status).expect("status serializes"))
    }
}

/// How the controller is set up (from its flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub urls: Urls,
    /// Watch one namespace; `None` watches all.
    pub namespace: Option<String>,
    /// How long reconciles of one object wait for more triggers, so a burst of mesh events is
    /// one status write.
    pub debounce: Duration,
}

/// Shared by every reconcile of one kind.
pub struct Context<K: MeshObject> {
    client: kube::Client,
    mesh: Arc<dyn MeshApi>,
    reported: Arc<RwLock<Reported>>,
    /// Objects by vmodel id, so a mesh event reaches the objects it concerns.
    by_vmodel: Arc<RwLock<HashMap<String, Vec<ObjectRef<K>>>>>,
    runtimes: Store<ServingRuntime>,
    cluster_runtimes: Store<ClusterServingRuntime>,
    settings: Settings,
}

/// Runs the controllers until the process is told to stop. The caller holds the leader lease.
pub async fn run(client: kube::Client, mesh: GrpcMesh, settings: Settings) -> anyhow::Result<()> {
    let (runtimes, runtimes_writer) = reflector::store::<ServingRuntime>();
    let (cluster_runtimes, cluster_writer) = reflector::store::<ClusterServingRuntime>();
    let runtime_api: Api<ServingRuntime> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let runtime_watch = reflector::reflector(
        runtimes_writer,
        watcher(runtime_api, watcher::Config::default()).default_backoff(),
    )
    .applied_objects()
    .for_each(|_| futures::future::ready(()));
    let cluster_watch = reflector::reflector(
        cluster_writer,
        watcher(Api::<ClusterServingRuntime>::all(client.clone()), watcher::Config::default())
            .default_backoff(),
    )
    .applied_objects()
    .for_each(|_| futures::future::ready(()));
    tokio::spawn(runtime_watch);
    tokio::spawn(cluster_watch);
    runtimes.wait_until_ready().await?;
    cluster_runtimes.wait_until_ready().await?;

    let mesh: Arc<GrpcMesh> = Arc::new(mesh);
    let isvcs = serve::<InferenceService>(&client, &mesh, &runtimes, &cluster_runtimes, &settings);
    let predictors = serve::<Predictor>(&client, &mesh, &runtimes, &cluster_runtimes, &settings);
    tokio::join!(isvcs, predictors);
    Ok(())
}

async fn serve<K: MeshObject>(
    client: &kube::Client,
    mesh: &Arc<GrpcMesh>,
    runtimes: &Store<ServingRuntime>,
    cluster_runtimes: &Store<ClusterServingRuntime>,
    settings: &Settings,
) {
    let ctx = Arc::new(Context::<K> {
        client: client.clone(),
        mesh: mesh.clone(),
        reported: Arc::default(),
        by_vmodel: Arc::default(),
        runtimes: runtimes.clone(),
        cluster_runtimes: cluster_runtimes.clone(),
        settings: settings.clone(),
    });
    let (triggers, trigger_rx) = mpsc::unbounded_channel();
    tokio::spawn(follow_mesh(mesh.clone(), K::OWNER, ctx.reported.clone(), ctx.by_vmodel.clone(), triggers));
    let api: Api<K> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Controller::new(api, watcher::Config::default())
        .with_config(ControllerConfig::default().debounce(settings.debounce))
        .reconcile_on(UnboundedReceiverStream::new(trigger_rx))
        .shutdown_on_signal()
        .run(reconcile_object::<K>, error_policy::<K>, ctx)
        .for_each(|result| {
            if let Err(err) = result {
                // Objects that vanished between trigger and reconcile land here too; not worth more.
                tracing::debug!(kind = K::kind(&()).as_ref(), error = %err, "reconcile did not run");
            }
            futures::future::ready(())
        })
        .await;
}

/// Follows the mesh's vmodel watch for one owner for as long as the controller runs, reconnecting
/// after a failure, and triggers a reconcile of every object whose vmodel changed.
async fn follow_mesh<K: MeshObject>(
    mesh: Arc<GrpcMesh>,
    owner: &'static str,
    reported: Arc<RwLock<Reported>>,
    by_vmodel: Arc<RwLock<HashMap<String, Vec<ObjectRef<K>>>>>,
    triggers: mpsc::UnboundedSender<ObjectRef<K>>,
) {
    let trigger = |id: &str| {
        for obj in by_vmodel.read().get(id).into_iter().flatten() {
            let _ = triggers.send(obj.clone());
        }
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        match mesh.watch(owner).await {
            Ok(mut stream) => {
                // Everything until the next SYNCED is a fresh first round.
                let mut fresh: HashMap<String, VModelState> = HashMap::new();
                let mut synced = false;
                while let Some(event) = stream.next().await {
                    let event = match event {
                        Ok(event) => event,
                        Err(status) => {
                            warn!(owner, %status, "mesh vmodel watch broke; reconnecting");
                            break;
                        }
                    };
                    backoff = Duration::from_millis(200);
                    let kind = event.kind();
                    let state = event.vmodel.unwrap_or_default();
                    match (kind, synced) {
                        (v_model_event::Kind::Upsert, false) => {
                            fresh.insert(state.vmodel_id.clone(), state);
                        }
                        (v_model_event::Kind::Synced, _) => {
                            synced = true;
                            let gone: Vec<String> = {
                                let mut r = reported.write();
                                let gone =
                                    r.vmodels.keys().filter(|id| !fresh.contains_key(*id)).cloned().collect();
                                r.vmodels = std::mem::take(&mut fresh);
                                r.synced = true;
                                gone
                            };
                            info!(owner, vmodels = reported.read().vmodels.len(), "mesh vmodel watch synced");
                            let ids: Vec<String> = reported.read().vmodels.keys().cloned().collect();
                            for id in ids.iter().chain(&gone) {
                                trigger(id);
                            }
                        }
                        (v_model_event::Kind::Upsert, true) => {
                            let id = state.vmodel_id.clone();
                            reported.write().vmodels.insert(id.clone(), state);
                            trigger(&id);
                        }
                        (v_model_event::Kind::Deleted, _) => {
                            fresh.remove(&state.vmodel_id);
                            if synced {
                                reported.write().vmodels.remove(&state.vmodel_id);
                                trigger(&state.vmodel_id);
                            }
                        }
                    }
                }
            }
            Err(err) => warn!(owner, error = %err, "cannot watch the mesh's vmodels; retrying"),
        }
        reported.write().synced = false;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn reconcile_object<K: MeshObject>(obj: Arc<K>, ctx: Arc<Context<K>>) -> Result<Action, Error> {
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    if !obj.ours() && !has_finalizer {
        return Ok(Action::await_change());
    }
    let name = obj.name_any();
    {
        let mut index = ctx.by_vmodel.write();
        let refs = index.entry(name.clone()).or_default();
        let this = ObjectRef::from_obj(&*obj);
        if !refs.contains(&this) {
            refs.push(this);
        }
    }
    if !ctx.reported.read().synced {
        // Until the mesh's first round is in, "no vmodel" could just mean "not heard of yet".
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) if obj.ours() => apply(&*obj, &ctx, &api).await,
            // No longer ours (its annotation changed) or being deleted: the vmodel goes.
            Finalizer::Apply(obj) | Finalizer::Cleanup(obj) => cleanup(&*obj, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply<K: MeshObject>(obj: &K, ctx: &Context<K>, api: &Api<K>) -> Result<Action, Error> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let mut desired = obj.desired().and_then(|d| {
        let runtimes = ctx.runtimes.state();
        let cluster = ctx.cluster_runtimes.state();
        let infos: Vec<RuntimeInfo> = runtimes
            .iter()
            .filter(|r| r.namespace().as_deref() == Some(namespace.as_str()))
            .map(|r| RuntimeInfo {
                name: r.metadata.name.as_deref().unwrap_or_default(),
                cluster: false,
                spec: &r.spec,
            })
            .chain(cluster.iter().map(|r| RuntimeInfo {
                name: r.metadata.name.as_deref().unwrap_or_default(),
                cluster: true,
                spec: &r.spec.0,
            }))
            .collect();
        mapping::choose_runtime(&d, &infos)?;
        Ok(d)
    });
    let mesh = ctx.reported.read().vmodels.get(&name).cloned();
    if let Ok(d) = &desired {
        for call in reconcile::plan(d, mesh.as_ref(), &obj.rollout()) {
            metrics::counter!("densemesh_controller_mesh_calls_total", "call" => call_name(&call))
                .increment(1);
            if let Err(err) = ctx.mesh.call(&call).await {
                if err.is_transient() {
                    return Err(err.into());
                }
                // The mesh refused the spec as written (a bad path, a vmodel owned by someone
                // else): the object says why; the vmodel that already serves keeps serving.
                warn!(kind = K::kind(&()).as_ref(), namespace, name, error = %err, "mesh refused the spec");
                desired = Err(SpecError {
                    reason: crate::crd::FailureReason::InvalidPredictorSpec,
                    message: err.to_string(),
                });
                break;
            }
        }
    }
    let now = Time(Timestamp::now());
    if let Some(status) = obj.new_status(&desired, mesh.as_ref(), &ctx.settings.urls, &now) {
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await?;
        metrics::counter!("densemesh_controller_status_writes_total", "kind" => K::kind(&()).into_owned())
            .increment(1);
    }
    // The mesh's watch brings every change; the long requeue only repairs what a lost event missed.
    Ok(Action::requeue(Duration::from_secs(600)))
}

async fn cleanup<K: MeshObject>(obj: &K, ctx: &Context<K>) -> Result<Action, Error> {
    let name = obj.name_any();
    ctx.mesh.call(&MeshCall::DeleteVModel { vmodel_id: name.clone(), owner: K::OWNER.to_owned() }).await?;
    let this = ObjectRef::from_obj(obj);
    let mut index = ctx.by_vmodel.write();
    if let Some(refs) = index.get_mut(&name) {
        refs.retain(|r| *r != this);
        if refs.is_empty() {
            index.remove(&name);
        }
    }
    info!(kind = K::kind(&()).as_ref(), name, "vmodel deleted from the mesh");
    Ok(Action::await_change())
}

fn call_name(call: &MeshCall) -> &'static str {
    match call {
        MeshCall::SetVModel { .. } => "setVModel",
        MeshCall::RegisterModel { .. } => "registerModel",
        MeshCall::UnregisterModel { .. } => "unregisterModel",
        MeshCall::SetSplit { .. } => "SetVModelSplit",
        MeshCall::DeleteVModel { .. } => "deleteVModel",
    }
}

fn error_policy<K: MeshObject>(obj: Arc<K>, err: &Error, _ctx: Arc<Context<K>>) -> Action {
    warn!(kind = K::kind(&()).as_ref(), name = obj.name_any(), error = %err, "reconcile failed; retrying");
    metrics::counter!("densemesh_controller_reconcile_errors_total", "kind" => K::kind(&()).into_owned())
        .increment(1);
    Action::requeue(Duration::from_secs(2))
}
