//! The running controller: kube-rs Controllers for InferenceServices and Predictors that apply
//! `reconcile`'s decisions (InferenceGraphs: [`crate::graph_operator`]), fed by the API server's
//! watches and by the mesh's own vmodel watch.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use densemesh_proto::admin::{VModelState, v_model_event};
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
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

use crate::crd::{ClusterServingRuntime, InferenceService, Predictor, ServingRuntime, ServingRuntimeSpec};
use crate::mapping::{
    self, Desired, ISVC_OWNER, PREDICTOR_OWNER, RuntimeInfo, SpecError, desired_for_isvc,
    desired_for_predictor,
};
use crate::mesh::{GrpcMesh, MeshApi, MeshError};
use crate::reconcile::{self, MeshCall, Rollout, Urls};
use crate::runtime::{self, UNNEEDED_SINCE_ANNOTATION};
use crate::runtime_config;

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
pub(crate) struct Reported {
    pub(crate) vmodels: HashMap<String, VModelState>,
    pub(crate) synced: bool,
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
    type Status: Serialize + PartialEq;
    fn status(&self) -> Option<&Self::Status>;
    /// The status for what the mesh reported.
    fn status_for(
        &self,
        desired: &Result<Desired, SpecError>,
        mesh: Option<&VModelState>,
        urls: &Urls,
        now: &Time,
    ) -> Self::Status;
    /// The status to write, or `None` when it would not change.
    fn new_status(
        &self,
        desired: &Result<Desired, SpecError>,
        mesh: Option<&VModelState>,
        urls: &Urls,
        now: &Time,
    ) -> Option<serde_json::Value> {
        let status = self.status_for(desired, mesh, urls, now);
        (self.status() != Some(&status)).then(|| serde_json::to_value(status).expect("status serializes"))
    }
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
    type Status = crate::crd::InferenceServiceStatus;
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn status_for(
        &self,
        desired: &Result<Desired, SpecError>,
        mesh: Option<&VModelState>,
        urls: &Urls,
        now: &Time,
    ) -> Self::Status {
        reconcile::isvc_status(desired, mesh, self.status.as_ref(), self.metadata.generation, urls, now)
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
    type Status = crate::crd::PredictorStatus;
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn status_for(
        &self,
        desired: &Result<Desired, SpecError>,
        mesh: Option<&VModelState>,
        urls: &Urls,
        _now: &Time,
    ) -> Self::Status {
        reconcile::predictor_status(desired, mesh, urls)
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
    /// Reconciles of one kind at once.
    pub concurrency: u16,
    /// The meshd pod every ServingRuntime becomes a Deployment of; without it runtimes only
    /// select formats and the meshd pods are run by other means (tests, a single box).
    pub pod_template: Option<k8s_openapi::api::core::v1::PodTemplateSpec>,
    /// Where ClusterServingRuntimes' Deployments go (the controller's own namespace).
    pub runtime_namespace: String,
    pub scale_to_zero_grace: Duration,
}

/// A runtime by identity: a ServingRuntime in a namespace, or a ClusterServingRuntime.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RuntimeKey {
    cluster: bool,
    namespace: String,
    name: String,
}

/// An object that maps to a vmodel id.
struct Claim<K: kube::Resource<DynamicType = ()>> {
    obj: ObjectRef<K>,
    created: Option<Timestamp>,
}

/// Of the objects that map to one vmodel id (one name in several namespaces), the one that owns it:
/// the oldest, then the first namespace by name. The mesh has one vmodel per name, and two objects
/// driving it would undo each other forever.
pub(crate) fn claimant<'a>(
    claims: impl IntoIterator<Item = (Option<Timestamp>, &'a str)>,
) -> Option<(Option<Timestamp>, &'a str)> {
    claims.into_iter().min_by(|a, b| {
        // An object without a creation time (never from an API server) sorts last.
        (a.0.is_none(), a.0, a.1).cmp(&(b.0.is_none(), b.0, b.1))
    })
}

/// Which runtime each served object uses ("kind/namespace/name" → runtime), so a runtime knows
/// whether any model needs it.
type Usage = Arc<RwLock<HashMap<String, RuntimeKey>>>;

fn usage_key<K: MeshObject>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Shared by every reconcile of one kind.
pub struct Context<K: MeshObject> {
    client: kube::Client,
    mesh: Arc<dyn MeshApi>,
    reported: Arc<RwLock<Reported>>,
    /// Objects by vmodel id (with when each was created), so a mesh event reaches the objects it
    /// concerns and a name used in two namespaces has one claimant.
    by_vmodel: Arc<RwLock<HashMap<String, Vec<Claim<K>>>>>,
    runtimes: Store<ServingRuntime>,
    cluster_runtimes: Store<ClusterServingRuntime>,
    usage: Usage,
    /// Consecutive failed reconciles per object, for the error policy's back-off.
    failures: parking_lot::Mutex<HashMap<String, u32>>,
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
    let usage = Usage::default();
    let isvcs = serve::<InferenceService>(&client, &mesh, &runtimes, &cluster_runtimes, &usage, &settings);
    let predictors = serve::<Predictor>(&client, &mesh, &runtimes, &cluster_runtimes, &usage, &settings);
    let graphs = crate::graph_operator::serve(client.clone(), mesh.clone(), settings.clone());
    match settings.pod_template.clone() {
        Some(template) => {
            let deployments = run_runtimes(client.clone(), usage.clone(), template, settings.clone());
            tokio::join!(isvcs, predictors, graphs, deployments);
        }
        None => {
            tokio::join!(isvcs, predictors, graphs);
        }
    }
    Ok(())
}

async fn serve<K: MeshObject>(
    client: &kube::Client,
    mesh: &Arc<GrpcMesh>,
    runtimes: &Store<ServingRuntime>,
    cluster_runtimes: &Store<ClusterServingRuntime>,
    usage: &Usage,
    settings: &Settings,
) {
    let ctx = Arc::new(Context::<K> {
        client: client.clone(),
        mesh: mesh.clone(),
        reported: Arc::default(),
        by_vmodel: Arc::default(),
        runtimes: runtimes.clone(),
        cluster_runtimes: cluster_runtimes.clone(),
        usage: usage.clone(),
        failures: parking_lot::Mutex::default(),
        settings: settings.clone(),
    });
    let (triggers, trigger_rx) = mpsc::unbounded_channel();
    let by_vmodel = ctx.by_vmodel.clone();
    let trigger = move |id: &str| {
        for claim in by_vmodel.read().get(id).into_iter().flatten() {
            let _ = triggers.send(claim.obj.clone());
        }
    };
    tokio::spawn(follow_mesh(mesh.clone(), K::OWNER, ctx.reported.clone(), trigger));
    let api: Api<K> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Controller::new(api, watcher::Config::default())
        .with_config(
            ControllerConfig::default().debounce(settings.debounce).concurrency(settings.concurrency),
        )
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
/// `trigger` is called with the id of every vmodel that changed.
pub(crate) async fn follow_mesh(
    mesh: Arc<GrpcMesh>,
    owner: &'static str,
    reported: Arc<RwLock<Reported>>,
    trigger: impl Fn(&str),
) {
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
    let key = usage_key(&*obj);
    let result = reconcile_once(obj, ctx.clone()).await;
    if result.is_ok() {
        ctx.failures.lock().remove(&key);
    }
    result
}

async fn reconcile_once<K: MeshObject>(obj: Arc<K>, ctx: Arc<Context<K>>) -> Result<Action, Error> {
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    if !obj.ours() && !has_finalizer {
        return Ok(Action::await_change());
    }
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let this = ObjectRef::from_obj(&*obj);
    let claimed_by = {
        let mut index = ctx.by_vmodel.write();
        let claims = index.entry(name.clone()).or_default();
        if !claims.iter().any(|c| c.obj == this) {
            let created = obj.meta().creation_timestamp.as_ref().map(|t| t.0);
            claims.push(Claim { obj: this.clone(), created });
        }
        claimant(claims.iter().map(|c| (c.created, c.obj.namespace.as_deref().unwrap_or_default())))
            .map(|(_, ns)| ns.to_owned())
            .filter(|ns| *ns != namespace)
    };
    // Chosen before the mesh is heard from, so a runtime in use is never scaled to zero for
    // want of a reconcile.
    let sole_owner = claimed_by.is_none();
    let desired = match claimed_by {
        Some(owner_ns) => Err(SpecError {
            reason: crate::crd::FailureReason::InvalidPredictorSpec,
            message: format!(
                "vmodel {name} is already served for {} {owner_ns}/{name}, created earlier: one mesh serves one \
                 object per name across namespaces (rename this one, or run a controller per namespace with --namespace)",
                K::kind(&())
            ),
        }),
        None => desired_of(&*obj, &ctx),
    };
    if !ctx.reported.read().synced {
        // Until the mesh's first round is in, "no vmodel" could just mean "not heard of yet".
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) if obj.ours() => apply(&*obj, desired, &ctx, &api).await,
            // No longer ours (its annotation changed): the vmodel goes, unless it is another
            // object's, and so does the finalizer, which only deletion would otherwise remove.
            Finalizer::Apply(obj) => {
                let action = cleanup(&*obj, sole_owner, &ctx).await?;
                release(&api, &*obj).await?;
                Ok(action)
            }
            // Being deleted: the vmodel goes, unless it is another object's.
            Finalizer::Cleanup(obj) => cleanup(&*obj, sole_owner, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// What the object asks of the mesh, with its runtime chosen; records the runtime as in use. A
/// spec that turned invalid keeps its runtime's record: its previous revision still serves there.
fn desired_of<K: MeshObject>(obj: &K, ctx: &Context<K>) -> Result<Desired, SpecError> {
    let namespace = obj.namespace().unwrap_or_default();
    obj.desired().and_then(|d| {
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
        let chosen = mapping::choose_runtime(&d, &infos)?;
        let key = RuntimeKey {
            cluster: chosen.cluster,
            namespace: if chosen.cluster { String::new() } else { namespace.clone() },
            name: chosen.name.to_owned(),
        };
        ctx.usage.write().insert(usage_key(obj), key);
        Ok(d)
    })
}

async fn apply<K: MeshObject>(
    obj: &K,
    mut desired: Result<Desired, SpecError>,
    ctx: &Context<K>,
    api: &Api<K>,
) -> Result<Action, Error> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let mesh = ctx.reported.read().vmodels.get(&name).cloned();
    let mut moved_mesh = false;
    if let Ok(d) = &desired {
        let now_ms = u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0);
        // An object restored without its status (a backup, a move from modelmesh-serving) reads
        // its rollout off the mesh, so a canary spec does not roll out fully.
        let rollout = match obj.rollout() {
            r if r.rolled_out.is_some() => r,
            _ => Rollout::of_mesh(mesh.as_ref()),
        };
        for call in reconcile::plan(d, mesh.as_ref(), &rollout, now_ms) {
            moved_mesh = true;
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
    if moved_mesh && desired.is_ok() {
        // The mesh now differs from what it last reported, and its watch will say how within
        // milliseconds: the status is written then, once, instead of now and again then (and
        // at the latest at this requeue, should the change be one the watch does not show).
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let now = Time(Timestamp::now());
    if let Some(status) = obj.new_status(&desired, mesh.as_ref(), &ctx.settings.urls, &now) {
        // The whole status replaced: a merge patch would keep fields the new status leaves out
        // (a cleared failure, a finished transition's target).
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            { "op": "add", "path": "/status", "value": status }
        ]))
        .expect("a JSON patch of one add");
        api.patch_status(&name, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
        metrics::counter!("densemesh_controller_status_writes_total", "kind" => K::kind(&()).into_owned())
            .increment(1);
    }
    // The mesh's watch brings every change; the long requeue only repairs what a lost event missed.
    // A revision that failed is looked at again when a new load may be asked of it.
    // So is a spec that was invalid: the runtime it lacked may have been added since.
    let failed = desired.is_err()
        || mesh.as_ref().is_some_and(|m| {
            m.models.iter().any(|x| x.state() == densemesh_proto::admin::model_state::State::FailedToLoad)
        });
    Ok(Action::requeue(if failed {
        Duration::from_millis(reconcile::RETRY_FAILED_AFTER_MS)
    } else {
        Duration::from_secs(600)
    }))
}

async fn cleanup<K: MeshObject>(obj: &K, sole_owner: bool, ctx: &Context<K>) -> Result<Action, Error> {
    let name = obj.name_any();
    if sole_owner {
        ctx.mesh
            .call(&MeshCall::DeleteVModel { vmodel_id: name.clone(), owner: K::OWNER.to_owned() })
            .await?;
    }
    ctx.usage.write().remove(&usage_key(obj));
    let this = ObjectRef::from_obj(obj);
    let mut index = ctx.by_vmodel.write();
    if let Some(refs) = index.get_mut(&name) {
        refs.retain(|r| r.obj != this);
        if refs.is_empty() {
            index.remove(&name);
        }
    }
    info!(kind = K::kind(&()).as_ref(), name, "vmodel deleted from the mesh");
    Ok(Action::await_change())
}

pub(crate) fn call_name(call: &MeshCall) -> &'static str {
    match call {
        MeshCall::SetVModel { .. } | MeshCall::Retarget { .. } => "setVModel",
        MeshCall::RegisterModel { .. } => "registerModel",
        MeshCall::UnregisterModel { .. } => "unregisterModel",
        MeshCall::SetSplit { .. } => "SetVModelSplit",
        MeshCall::DeleteVModel { .. } => "deleteVModel",
        MeshCall::SetGraph { .. } => "SetGraph",
        MeshCall::DeleteGraph { .. } => "DeleteGraph",
    }
}

/// Removes this controller's finalizer from an object it no longer serves.
pub(crate) async fn release<K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned>(
    api: &Api<K>,
    obj: &K,
) -> Result<(), Error> {
    let Some(index) = obj.finalizers().iter().position(|f| f == FINALIZER) else { return Ok(()) };
    let path = format!("/metadata/finalizers/{index}");
    // The test makes a concurrent change of the list fail instead of removing someone else's entry.
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": path, "value": FINALIZER },
        { "op": "remove", "path": path },
    ]))
    .expect("a JSON patch of a test and a remove");
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    Ok(())
}

fn error_policy<K: MeshObject>(obj: Arc<K>, err: &Error, ctx: Arc<Context<K>>) -> Action {
    warn!(kind = K::kind(&()).as_ref(), name = obj.name_any(), error = %err, "reconcile failed; retrying");
    metrics::counter!("densemesh_controller_reconcile_errors_total", "kind" => K::kind(&()).into_owned())
        .increment(1);
    // Doubling per consecutive failure of this object, from 1 s to 2 min; a success resets it.
    let key = usage_key(&*obj);
    let mut failures = ctx.failures.lock();
    let n = failures.entry(key).or_insert(0);
    *n = (*n + 1).min(8);
    Action::requeue(Duration::from_secs(1 << (*n - 1)).min(Duration::from_secs(120)))
}

/// Keeps one Deployment per ServingRuntime and ClusterServingRuntime, scaled by whether any model
/// uses the runtime.
async fn run_runtimes(
    client: kube::Client,
    usage: Usage,
    template: k8s_openapi::api::core::v1::PodTemplateSpec,
    settings: Settings,
) {
    let recorder = Recorder::new(client.clone(), Reporter::from(EVENT_REPORTER));
    let ctx = Arc::new(RuntimeContext {
        client: client.clone(),
        recorder,
        usage,
        template,
        settings: settings.clone(),
    });
    let runtimes: Api<ServingRuntime> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let deployments: Api<Deployment> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let namespaced = Controller::new(runtimes, watcher::Config::default())
        .owns(deployments, watcher::Config::default().labels(runtime::RUNTIME_LABEL))
        .shutdown_on_signal()
        .run(
            |rt: Arc<ServingRuntime>, ctx: Arc<RuntimeContext>| async move {
                let key = RuntimeKey {
                    cluster: false,
                    namespace: rt.namespace().unwrap_or_default(),
                    name: rt.name_any(),
                };
                let owner = rt.controller_owner_ref(&()).unwrap_or_default();
                ensure_deployment(&key, &rt.spec, owner, &rt.object_ref(&()), &ctx).await
            },
            |_, err: &Error, _| {
                warn!(error = %err, "runtime reconcile failed; retrying");
                Action::requeue(Duration::from_secs(5))
            },
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let cluster = Controller::new(Api::<ClusterServingRuntime>::all(client), watcher::Config::default())
        .shutdown_on_signal()
        .run(
            |rt: Arc<ClusterServingRuntime>, ctx: Arc<RuntimeContext>| async move {
                let key = RuntimeKey { cluster: true, namespace: String::new(), name: rt.name_any() };
                let owner = rt.controller_owner_ref(&()).unwrap_or_default();
                ensure_deployment(&key, &rt.spec.0, owner, &rt.object_ref(&()), &ctx).await
            },
            |_, err: &Error, _| {
                warn!(error = %err, "cluster runtime reconcile failed; retrying");
                Action::requeue(Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|_| futures::future::ready(()));
    tokio::join!(namespaced, cluster);
}

struct RuntimeContext {
    client: kube::Client,
    /// Tells a runtime's owner, on the runtime itself, why it has no Deployment.
    recorder: Recorder,
    usage: Usage,
    template: k8s_openapi::api::core::v1::PodTemplateSpec,
    settings: Settings,
}

async fn ensure_deployment(
    key: &RuntimeKey,
    spec: &ServingRuntimeSpec,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    runtime_ref: &ObjectReference,
    ctx: &RuntimeContext,
) -> Result<Action, Error> {
    if spec.multi_model == Some(false) {
        // A KServe single-model runtime: not the mesh's.
        return Ok(Action::await_change());
    }
    let namespace = if key.cluster { ctx.settings.runtime_namespace.clone() } else { key.namespace.clone() };
    let name = runtime::deployment_name(&key.name, key.cluster);
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = api.get_opt(&name).await?;
    let since = existing
        .as_ref()
        .and_then(|d| d.metadata.annotations.as_ref())
        .and_then(|a| a.get(UNNEEDED_SINCE_ANNOTATION))
        .and_then(|t| t.parse::<Timestamp>().ok());
    let needed = ctx.usage.read().values().any(|k| k == key);
    let (replicas, since) =
        runtime::replicas(spec.replicas, needed, since, Timestamp::now(), ctx.settings.scale_to_zero_grace);
    // The runtime file first: the Deployment's pods mount it and cannot start without it.
    match runtime_config::render(&key.name, spec) {
        Ok(file) => ensure_runtime_config(&name, &namespace, file.as_deref(), owner.clone(), ctx).await?,
        Err(why) => {
            let note = format!("cannot render meshd's --runtime-config for this runtime: {why}");
            warn!(runtime = key.name, "{note}");
            refuse_runtime(runtime_ref, RENDER_ACTION, note, ctx).await;
            return Ok(Action::await_change());
        }
    }
    let deployment = match runtime::deployment(
        &key.name,
        key.cluster,
        &namespace,
        spec,
        &ctx.template,
        replicas,
        since,
        owner,
    ) {
        Ok(d) => d,
        Err(why) => {
            let note = format!("cannot make this runtime's Deployment: {why}");
            warn!(runtime = key.name, "{note}");
            refuse_runtime(runtime_ref, DEPLOYMENT_ACTION, note, ctx).await;
            return Ok(Action::await_change());
        }
    };
    match existing {
        None => {
            api.create(&PostParams::default(), &deployment).await?;
            info!(runtime = key.name, namespace, replicas, "created the runtime's Deployment");
        }
        Some(_) => {
            // The pod template is the controller's whole: replaced, not merged, so a nodeSelector or
            // toleration dropped from the runtime leaves the pods too. A patch that changes nothing
            // is no write on the API server.
            let spec = deployment.spec.as_ref().expect("built with a spec");
            let mut annotations = serde_json::json!({ UNNEEDED_SINCE_ANNOTATION: null });
            if let Some(value) =
                deployment.metadata.annotations.as_ref().and_then(|a| a.get(UNNEEDED_SINCE_ANNOTATION))
            {
                annotations[UNNEEDED_SINCE_ANNOTATION] = serde_json::Value::from(value.clone());
            }
            let merge = serde_json::json!({
                "metadata": { "labels": deployment.metadata.labels, "annotations": annotations },
                "spec": { "replicas": spec.replicas, "selector": spec.selector },
            });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(merge)).await?;
            let replace: json_patch::Patch = serde_json::from_value(serde_json::json!([
                { "op": "add", "path": "/spec/template", "value": spec.template }
            ]))
            .expect("a JSON patch of one add");
            api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(replace)).await?;
        }
    }
    // While unneeded, look again when the grace period may have ended.
    Ok(Action::requeue(
        ctx.settings.scale_to_zero_grace.min(Duration::from_secs(30)).max(Duration::from_secs(1)),
    ))
}

/// The reporting controller of the Events the controller writes.
const EVENT_REPORTER: &str = "densemesh-controller";
/// The reason of the Event on a runtime the controller cannot run, as InferenceServices whose spec
/// is refused get `InvalidSpec` in their status.
const INVALID_RUNTIME_REASON: &str = "InvalidSpec";
/// The Event's action when the runtime file cannot be rendered.
const RENDER_ACTION: &str = "RenderRuntimeConfig";
/// The Event's action when the runtime's Deployment cannot be made.
const DEPLOYMENT_ACTION: &str = "MakeDeployment";
/// Kubernetes refuses an Event note over 1 kB.
const MAX_EVENT_NOTE: usize = 1024;

/// Says on the runtime (a Warning Event: ServingRuntime has no status of its own to carry it) why the
/// controller cannot run it; the reconcile goes on whether or not the Event is written. The reference
/// carries the runtime's resourceVersion, so each edit that is still wrong gets an Event of its own
/// (the recorder folds repeats of one key into a series that keeps the first note).
async fn refuse_runtime(runtime_ref: &ObjectReference, action: &str, note: String, ctx: &RuntimeContext) {
    let event = Event {
        type_: EventType::Warning,
        reason: INVALID_RUNTIME_REASON.into(),
        note: Some(truncate_note(note)),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, runtime_ref).await {
        warn!(runtime = runtime_ref.name, %error, "cannot write the runtime's Event");
    }
}

/// `note` cut to fit an Event, on a character boundary.
fn truncate_note(mut note: String) -> String {
    if note.len() > MAX_EVENT_NOTE {
        let mut end = MAX_EVENT_NOTE - "...".len();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

/// Keeps the ConfigMap holding the runtime file of the Deployment `deployment` equal to `file`, and
/// removes it once the runtime needs none.
async fn ensure_runtime_config(
    deployment: &str,
    namespace: &str,
    file: Option<&str>,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    ctx: &RuntimeContext,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let name = runtime_config::config_map_name(deployment);
    let existing = api.get_opt(&name).await?;
    match (file, existing) {
        (Some(file), None) => {
            api.create(
                &PostParams::default(),
                &runtime_config::config_map(deployment, namespace, file, owner),
            )
            .await?;
            info!(namespace, config_map = name, "created the runtime's --runtime-config");
        }
        (Some(file), Some(existing)) => {
            let current = existing.data.as_ref().and_then(|d| d.get(runtime_config::RUNTIME_FILE_KEY));
            if current.map(String::as_str) != Some(file) {
                let patch = serde_json::json!({ "data": { runtime_config::RUNTIME_FILE_KEY: file } });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await?;
                info!(namespace, config_map = name, "updated the runtime's --runtime-config");
            }
        }
        (None, Some(_)) => {
            api.delete(&name, &Default::default()).await?;
            info!(namespace, config_map = name, "removed the runtime's --runtime-config: it needs none now");
        }
        (None, None) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_note_is_cut_to_what_kubernetes_takes_on_a_character_boundary() {
        assert_eq!(truncate_note("short".into()), "short");
        let long = "é".repeat(600);
        let cut = truncate_note(long);
        assert!(cut.len() <= MAX_EVENT_NOTE && cut.ends_with("..."), "{}", cut.len());
        assert!(cut.starts_with("éé"));
    }

    #[test]
    fn one_claimant_per_name_the_oldest_then_by_namespace() {
        let t = |s| Some(Timestamp::from_second(s).unwrap());
        assert_eq!(claimant([(t(20), "a"), (t(10), "b")]), Some((t(10), "b")));
        assert_eq!(claimant([(t(10), "b"), (t(10), "a")]), Some((t(10), "a")));
        assert_eq!(claimant([(None, "a"), (t(30), "z")]), Some((t(30), "z")));
        assert_eq!(claimant(std::iter::empty::<(Option<Timestamp>, &str)>()), None);
    }
}
