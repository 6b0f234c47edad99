//! ModelMesh's protocol-agnostic inference: a call of any gRPC method meshd does not serve itself,
//! naming its model in the `mm-model-id` (or `mm-vmodel-id`) header, goes to the runtime that holds
//! that model, as the bytes it came in as. Placement routes it like `ModelInfer`: to the pod holding
//! the model, or here after loading it. Only a runtime in another process that takes its own methods
//! ([`Passthrough`]) can answer such a call; an in-process model answers KServe V2 alone.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use densemesh_placement::ModelId;
use densemesh_runtime_core::{CallSlots, NoSlot, Passthrough};
use http::{Request, Response};
use parking_lot::Mutex;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::metadata::MetadataMap;
use tower_layer::Layer;

use crate::api::inject::{holds, inject};
use crate::api::runtime_conn::RuntimeConn;
use crate::api::service::{Decision, InferenceService};
use crate::cluster::forward::{FRAME_HEADER, Forwarded, MODEL_INFER_PATH, RawAnswer};
use crate::metrics as m;
use crate::node::router::{MODEL_ID, MODEL_ID_HEADER, VMODEL_ID, VMODEL_ID_HEADER};

/// Wraps every service of the gRPC server: a call for a service listed in `served` goes on as it came,
/// `ModelInfer` straight to the inference front (`model_infer`), and any other call, naming its model
/// in a header, to the runtime holding that model.
///
/// `ModelInfer` is taken here, before the router: matching its path and converting its body to and from
/// the router's types twice was about a tenth of the instructions of a call passed to MLServer.
#[derive(Clone)]
pub struct PassthroughLayer<F> {
    shared: Arc<Shared>,
    model_infer: F,
}

struct Shared {
    service: InferenceService,
    /// The `package.Service` names meshd serves itself.
    served: &'static [&'static str],
    runtimes: Arc<RuntimeCalls>,
}

impl<F> PassthroughLayer<F> {
    pub fn new(
        service: InferenceService,
        served: &'static [&'static str],
        runtimes: Arc<RuntimeCalls>,
        model_infer: F,
    ) -> Self {
        Self { shared: Arc::new(Shared { service, served, runtimes }), model_infer }
    }
}

/// Calls passed to runtimes in other processes, over one connection per runtime endpoint (made on first
/// use); shared by the passthrough and the front, which passes `ModelInfer` for such models the same way.
pub struct RuntimeCalls {
    max_message_size: usize,
    conns: Mutex<HashMap<String, Arc<RuntimeConn>>>,
    /// Registered once: a lookup in the recorder per call was a visible part of the hop's CPU.
    answered: metrics::Counter,
    failed: metrics::Counter,
    duration: metrics::Histogram,
}

impl RuntimeCalls {
    pub fn new(max_message_size: usize) -> Arc<Self> {
        Arc::new(Self {
            max_message_size,
            conns: Mutex::new(HashMap::new()),
            answered: metrics::counter!(m::PASSTHROUGH_REQUESTS, "result" => "ok"),
            failed: metrics::counter!(m::PASSTHROUGH_REQUESTS, "result" => "error"),
            duration: metrics::histogram!(m::PASSTHROUGH_DURATION),
        })
    }

    /// Passes one call (`path`, the client's `headers` and framed `bytes`) for model `id` to its
    /// runtime, the id written where `injection` points and named in `mm-model-id`, once it has one of
    /// the runtime's `slots` if it has any (RESOURCE_EXHAUSTED when they and their queue are full). The
    /// caller holds the model's lease until this returns, so the model is not unloaded under the call.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        runtime: &Passthrough,
        slots: Option<&CallSlots>,
        id: &ModelId,
        path: &str,
        mut headers: http::HeaderMap,
        bytes: Bytes,
        injection: &[u32],
    ) -> Result<RawAnswer, Status> {
        let _slot = match slots {
            Some(slots) => Some(slots.enter().await.map_err(|no_slot| no_slot_status(id, no_slot))?),
            None => None,
        };
        let started = Instant::now();
        let bytes = if injection.is_empty() { bytes } else { with_id(&bytes, injection, id.as_str())? };
        headers.remove(&VMODEL_ID);
        headers.remove(&crate::cluster::peers::FORWARDED);
        if let Ok(value) = id.as_str().parse() {
            headers.insert(MODEL_ID.clone(), value);
        }
        let conn = self.conn(runtime)?;
        let answered = conn.call(path, headers, bytes, self.max_message_size, "the model's runtime").await;
        if answered.is_ok() { &self.answered } else { &self.failed }.increment(1);
        self.duration.record(started.elapsed().as_secs_f64());
        answered
    }

    fn conn(&self, runtime: &Passthrough) -> Result<Arc<RuntimeConn>, Status> {
        let mut conns = self.conns.lock();
        if let Some(conn) = conns.get(&runtime.endpoint) {
            return Ok(conn.clone());
        }
        let conn = RuntimeConn::new(&runtime.endpoint)
            .map_err(|e| Status::unavailable(format!("runtime endpoint {}: {e}", runtime.endpoint)))?;
        let conn = Arc::new(conn);
        conns.insert(runtime.endpoint.clone(), conn.clone());
        Ok(conn)
    }
}

impl<S, F: Clone> Layer<S> for PassthroughLayer<F> {
    type Service = PassthroughService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        PassthroughService { inner, model_infer: self.model_infer.clone(), shared: self.shared.clone() }
    }
}

#[derive(Clone)]
pub struct PassthroughService<S, F> {
    inner: S,
    model_infer: F,
    shared: Arc<Shared>,
}

impl<S, F> Service<Request<Body>> for PassthroughService<S, F>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    F: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future = BoxFuture<Response<Body>, Infallible>,
        >,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both, so whichever the call goes to was readied for it.
        match self.model_infer.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.inner.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if path == MODEL_INFER_PATH {
            return self.model_infer.call(request);
        }
        let service_name = path.trim_start_matches('/').split('/').next().unwrap_or_default();
        if self.shared.served.contains(&service_name) {
            return Box::pin(self.inner.call(request));
        }
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.pass(request).await.unwrap_or_else(Status::into_http)) })
    }
}

impl Shared {
    async fn pass(&self, request: Request<Body>) -> Result<Response<Body>, Status> {
        let path = request.uri().path().to_owned();
        let (mut parts, body) = request.into_parts();
        if !parts.headers.contains_key(MODEL_ID_HEADER) && !parts.headers.contains_key(VMODEL_ID_HEADER) {
            return Err(Status::unimplemented(format!(
                "meshd does not serve {path}; a runtime's own method reaches the runtime holding the model \
                 named in the {MODEL_ID_HEADER} (or {VMODEL_ID_HEADER}) header, and this call names none"
            )));
        }
        let bytes = crate::api::front::read_message(body, self.runtimes.max_message_size).await?;
        let metadata = MetadataMap::from_headers(std::mem::take(&mut parts.headers));
        let Decision { id, peer } = self.service.decide(&metadata, "").map_err(Status::from)?;
        parts.headers = metadata.into_headers();
        if let Some((forwarder, peer)) = peer {
            match forwarder.forward_call(peer, &id, &path, &parts.headers, bytes.clone()).await {
                Forwarded::Answered { answer, .. } => return Ok(answer.into_response()),
                Forwarded::Refused(status) => return Err(status),
                Forwarded::ServeHere => {}
            }
        }
        let metadata = MetadataMap::from_headers(std::mem::take(&mut parts.headers));
        let lease = self.service.lease(&metadata, &id).await.map_err(Status::from)?;
        let Some(runtime) = lease.model().passthrough() else {
            return Err(Status::unimplemented(format!(
                "model {id} runs in meshd's own runtime ({}), which answers KServe V2 inference only, not {path}",
                lease.model().metadata().platform
            )));
        };
        let Some(injection) = runtime.method(&path) else {
            let served: Vec<&str> = runtime.methods.iter().map(|(m, _)| m.as_str()).collect();
            return Err(Status::unimplemented(format!(
                "the runtime of model {id} does not serve {path}; it serves {}",
                served.join(", ")
            )));
        };
        let slots = lease.model().call_slots();
        let answered =
            self.runtimes.call(runtime, slots, &id, &path, metadata.into_headers(), bytes, injection).await;
        drop(lease);
        answered.map(RawAnswer::into_response)
    }
}

/// A call that got none of its runtime's slots, as the status it is answered with.
fn no_slot_status(id: &ModelId, no_slot: NoSlot) -> Status {
    let message = format!("model {id}: {no_slot}");
    match no_slot {
        NoSlot::Full { .. } => Status::resource_exhausted(message),
        NoSlot::TimedOut { .. } => Status::deadline_exceeded(message),
        NoSlot::Closed { .. } => Status::unavailable(message),
    }
}

/// The framed message with the model id written at `injection`.
fn with_id(framed: &Bytes, injection: &[u32], id: &str) -> Result<Bytes, Status> {
    let message = crate::node::v2::frame::message(framed).ok_or_else(|| {
        Status::invalid_argument(
            "a call passed to a runtime with an idInjectionPath takes one uncompressed message",
        )
    })?;
    if holds(message, injection, id) {
        return Ok(framed.clone());
    }
    let edited = inject(message, injection, id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut out = Vec::with_capacity(FRAME_HEADER + edited.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(edited.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&edited);
    Ok(Bytes::from(out))
}
