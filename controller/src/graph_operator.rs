//! The InferenceGraph controller: applies [`crate::graph`]'s decisions. Each graph is set in the mesh
//! with `SetGraph` when its spec changes (and again every so often, should it have been removed behind
//! the controller's back), deleted with `DeleteGraph` behind a finalizer, and its status follows the
//! mesh's vmodel watch, which triggers every graph naming a vmodel that changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{info, warn};

use crate::crd::InferenceGraph;
use crate::graph::{self, Registration, ServiceLoad};
use crate::mesh::{GrpcMesh, MeshApi};
use crate::operator::{Error, FINALIZER, Reported, Settings, call_name, claimant, follow_mesh};
use crate::reconcile::MeshCall;

/// The vmodel watch's owner filter for graphs: every owner, since a step may name any vmodel.
const EVERY_OWNER: &str = "";
/// How long a graph set in the mesh is trusted to still be there before it is set again.
const RESET_AFTER: Duration = Duration::from_secs(600);
/// How often a graph naming a model that is no vmodel, and not loaded, looks again: the vmodel
/// watch says nothing of such models.
const MODEL_POLL: Duration = Duration::from_secs(3);

type GraphRef = ObjectRef<InferenceGraph>;

/// What one graph object last asked of the mesh.
struct Applied {
    /// The spec last set, and when.
    set: Option<(String, Instant)>,
    services: Vec<String>,
    created: Option<Timestamp>,
    /// Refusals in a row for services not registered yet.
    waiting: u32,
}

/// Shared by every graph reconcile.
struct GraphContext {
    client: kube::Client,
    mesh: Arc<GrpcMesh>,
    reported: Arc<RwLock<Reported>>,
    graphs: Arc<RwLock<HashMap<GraphRef, Applied>>>,
    /// Consecutive failed reconciles per object, for the error policy's back-off.
    failures: Mutex<HashMap<GraphRef, u32>>,
    settings: Settings,
}

/// Reconciles InferenceGraphs until the process is told to stop.
pub async fn serve(client: kube::Client, mesh: Arc<GrpcMesh>, settings: Settings) {
    let ctx = Arc::new(GraphContext {
        client: client.clone(),
        mesh: mesh.clone(),
        reported: Arc::default(),
        graphs: Arc::default(),
        failures: Mutex::default(),
        settings: settings.clone(),
    });
    let (triggers, trigger_rx) = mpsc::unbounded_channel();
    let graphs = ctx.graphs.clone();
    let trigger = move |vmodel: &str| {
        for (obj, applied) in graphs.read().iter() {
            // A graph waiting for a service not registered yet may be waiting for this one.
            if applied.waiting > 0 || applied.services.iter().any(|s| s == vmodel) {
                let _ = triggers.send(obj.clone());
            }
        }
    };
    tokio::spawn(follow_mesh(mesh, EVERY_OWNER, ctx.reported.clone(), trigger));
    let api: Api<InferenceGraph> = match &settings.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    Controller::new(api, watcher::Config::default())
        .with_config(
            ControllerConfig::default().debounce(settings.debounce).concurrency(settings.concurrency),
        )
        .reconcile_on(UnboundedReceiverStream::new(trigger_rx))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(err) = result {
                tracing::debug!(error = %err, "inference graph reconcile did not run");
            }
            futures::future::ready(())
        })
        .await;
}

async fn reconcile(obj: Arc<InferenceGraph>, ctx: Arc<GraphContext>) -> Result<Action, Error> {
    let this = ObjectRef::from_obj(&*obj);
    let result = reconcile_once(obj, &ctx).await;
    if result.is_ok() {
        ctx.failures.lock().remove(&this);
    }
    result
}

async fn reconcile_once(obj: Arc<InferenceGraph>, ctx: &Arc<GraphContext>) -> Result<Action, Error> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let this = ObjectRef::from_obj(&*obj);
    // One mesh graph per name: of the objects of one name in several namespaces, the oldest owns it.
    let claimed_by = {
        let mut graphs = ctx.graphs.write();
        let entry = graphs.entry(this.clone()).or_insert_with(|| Applied {
            set: None,
            services: Vec::new(),
            created: obj.meta().creation_timestamp.as_ref().map(|t| t.0),
            waiting: 0,
        });
        entry.services = graph::service_names(&obj.spec);
        let same_name = graphs
            .iter()
            .filter(|(r, _)| r.name == name)
            .map(|(r, a)| (a.created, r.namespace.as_deref().unwrap_or_default()));
        claimant(same_name).map(|(_, ns)| ns.to_owned()).filter(|ns| *ns != namespace)
    };
    if !ctx.reported.read().synced {
        // Until the mesh's first round is in, "no vmodel" could just mean "not heard of yet".
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let api: Api<InferenceGraph> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) => apply(&obj, claimed_by, ctx, &api).await,
            Finalizer::Cleanup(obj) => cleanup(&obj, claimed_by.is_none(), ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply(
    obj: &InferenceGraph,
    claimed_by: Option<String>,
    ctx: &GraphContext,
    api: &Api<InferenceGraph>,
) -> Result<Action, Error> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let this = ObjectRef::from_obj(obj);
    let spec_json = graph::spec_json(&obj.spec);
    let registration = match claimed_by {
        Some(owner_ns) => Registration::Refused(format!(
            "graph {name} is already served for InferenceGraph {owner_ns}/{name}, created earlier: one mesh \
             serves one graph per name across namespaces (rename this one, or run a controller per namespace \
             with --namespace)"
        )),
        None => {
            let fresh = ctx
                .graphs
                .read()
                .get(&this)
                .and_then(|a| a.set.as_ref())
                .is_some_and(|(json, at)| *json == spec_json && at.elapsed() < RESET_AFTER);
            if fresh { Registration::Set } else { set_graph(&name, &spec_json, ctx).await? }
        }
    };
    let waiting = {
        let mut graphs = ctx.graphs.write();
        let applied = graphs.get_mut(&this);
        match (&registration, applied) {
            (Registration::Set, Some(a)) => {
                if a.set.as_ref().is_none_or(|(json, _)| *json != spec_json) {
                    info!(namespace, name, "inference graph set in the mesh");
                    a.set = Some((spec_json.clone(), Instant::now()));
                }
                a.waiting = 0;
                0
            }
            (Registration::Waiting(_), Some(a)) => {
                a.set = None;
                a.waiting += 1;
                a.waiting
            }
            (_, Some(a)) => {
                a.set = None;
                a.waiting = 0;
                0
            }
            (_, None) => 0,
        }
    };
    if let Registration::Refused(why) | Registration::Waiting(why) = &registration {
        warn!(namespace, name, reason = %why, "mesh refused the inference graph");
    }
    // Each service's load state: vmodels from the mesh's watch, other models asked for.
    let mut services = Vec::new();
    let mut polled_unloaded = false;
    if registration == Registration::Set {
        for service in graph::service_names(&obj.spec) {
            let reported = ctx.reported.read().vmodels.get(&service).map(graph::vmodel_load);
            let load = match reported {
                Some(load) => load,
                None => {
                    let load = graph::model_load(&service, ctx.mesh.model_status(&service).await?);
                    polled_unloaded |= load != ServiceLoad::Loaded;
                    load
                }
            };
            services.push((service, load));
        }
    }
    let now = Time(Timestamp::now());
    let status = graph::graph_status(
        &name,
        &registration,
        &services,
        obj.status.as_ref(),
        obj.metadata.generation,
        &ctx.settings.urls,
        &now,
    );
    if obj.status.as_ref() != Some(&status) {
        // The whole status replaced, so a cleared field does not linger as a merge would keep it.
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            { "op": "add", "path": "/status", "value": status }
        ]))
        .expect("a JSON patch of one add");
        api.patch_status(&name, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
        metrics::counter!("densemesh_controller_status_writes_total", "kind" => "InferenceGraph")
            .increment(1);
    }
    Ok(Action::requeue(match registration {
        Registration::Waiting(_) => graph::waiting_backoff(waiting),
        // Looked at again when the object changes; now and then in case what it clashed with is gone.
        Registration::Refused(_) => Duration::from_secs(60),
        Registration::Set if polled_unloaded => MODEL_POLL,
        // The vmodel watch brings every change of the vmodels it names; this only re-sets the graph.
        Registration::Set => RESET_AFTER,
    }))
}

/// `SetGraph`: `Set`, or the refusal as the object's status. A mesh that cannot be reached is an
/// error, retried with back-off.
async fn set_graph(name: &str, spec_json: &str, ctx: &GraphContext) -> Result<Registration, Error> {
    let call = MeshCall::SetGraph { name: name.to_owned(), spec_json: spec_json.to_owned() };
    metrics::counter!("densemesh_controller_mesh_calls_total", "call" => call_name(&call)).increment(1);
    match ctx.mesh.call(&call).await {
        Ok(()) => Ok(Registration::Set),
        Err(err) if err.is_transient() => Err(err.into()),
        Err(crate::mesh::MeshError::Call { status, .. }) => {
            Ok(Registration::refused(status.message().to_owned()))
        }
        Err(err) => Ok(Registration::Refused(err.to_string())),
    }
}

async fn cleanup(obj: &InferenceGraph, sole_owner: bool, ctx: &GraphContext) -> Result<Action, Error> {
    let name = obj.name_any();
    if sole_owner {
        let call = MeshCall::DeleteGraph { name: name.clone() };
        metrics::counter!("densemesh_controller_mesh_calls_total", "call" => call_name(&call)).increment(1);
        ctx.mesh.call(&call).await?;
        info!(namespace = obj.namespace().unwrap_or_default(), name, "inference graph deleted from the mesh");
    }
    ctx.graphs.write().remove(&ObjectRef::from_obj(obj));
    Ok(Action::await_change())
}

fn error_policy(obj: Arc<InferenceGraph>, err: &Error, ctx: Arc<GraphContext>) -> Action {
    warn!(name = obj.name_any(), error = %err, "inference graph reconcile failed; retrying");
    metrics::counter!("densemesh_controller_reconcile_errors_total", "kind" => "InferenceGraph").increment(1);
    // Doubling per consecutive failure of this object, from 1 s to 2 min; a success resets it.
    let mut failures = ctx.failures.lock();
    let n = failures.entry(ObjectRef::from_obj(&*obj)).or_insert(0);
    *n = (*n + 1).min(8);
    Action::requeue(Duration::from_secs(1 << (*n - 1)).min(Duration::from_secs(120)))
}
