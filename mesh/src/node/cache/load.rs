//! One model's load: find its file, make room, run the runtime, charge the measured size.

use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::ModelId;
use densemesh_runtime_core::{LoadRequest, LoadedModel, ModelBytes};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::{Entry, Failure, Inner, LoadOutcome};
use crate::error::CacheError;
use crate::metrics as m;

/// Bytes set aside for a load in progress; given back on drop unless the load settles them.
///
/// It owns its handle on the cache so it can outlive [`Inner::load_once`]: a load given up on at its
/// deadline hands it to the task that waits for the runtime to return.
struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut state = self.inner.state.lock();
            state.used_bytes -= self.bytes;
            state.reserved_bytes -= self.bytes;
            self.inner.publish(&state);
            drop(state);
            self.inner.room_freed.notify_waiters();
        }
    }
}

/// What the runtime's blocking load call returns, once it does.
/// A loaded model with its probed inference time ([`crate::node::worker::probe_infer_time`]).
type Probed = (Box<dyn LoadedModel>, Option<Duration>);
type RuntimeLoad = JoinHandle<densemesh_runtime_core::Result<Probed>>;

impl Inner {
    /// The body of a load task: runs the load and shares its outcome with every waiting request.
    pub(super) async fn run_load(self: Arc<Self>, id: ModelId, outcome: watch::Sender<Option<LoadOutcome>>) {
        let started = Instant::now();
        let result = self.load_once(&id).await;
        let took = started.elapsed();
        let mut state = self.state.lock();
        state.loading.remove(&id);
        metrics::gauge!(m::LOADING_MODELS).set(state.loading.len() as f64);
        let result = match result {
            Ok(entry) => {
                state.failures.remove(&id);
                metrics::counter!(m::MODEL_LOADS, "result" => "success").increment(1);
                metrics::histogram!(m::LOAD_DURATION).record(took.as_secs_f64());
                metrics::histogram!(m::LOADED_MODEL_SIZE).record(entry.size_bytes() as f64);
                tracing::info!(
                    size_bytes = entry.size_bytes(),
                    took_ms = took.as_millis() as u64,
                    "model loaded"
                );
                Ok(entry)
            }
            // Failures that would repeat if retried at once are remembered and answered from memory
            // until the back-off passes; a missing file is not, so a model dropped in is found at once.
            Err(e @ (CacheError::LoadFailed { .. } | CacheError::TooLarge { .. })) => {
                let consecutive = state.failures.get(&id).map_or(1, |f| f.consecutive + 1);
                let retry_in = self.backoff(consecutive);
                let retry_at = Instant::now() + retry_in;
                let error = e.with_retry_in(retry_in);
                state.failures.insert(id.clone(), Failure { error: error.clone(), consecutive, retry_at });
                metrics::counter!(m::MODEL_LOADS, "result" => "failure").increment(1);
                tracing::warn!(%error, consecutive, "model load failed");
                Err(error)
            }
            Err(e @ CacheError::NotFound(_)) => Err(e),
            Err(e) => {
                metrics::counter!(m::MODEL_LOADS, "result" => "failure").increment(1);
                tracing::warn!(error = %e, "model not loaded");
                Err(e)
            }
        };
        self.publish(&state);
        drop(state);
        self.emit(match &result {
            Ok(entry) => super::CopyEvent::Loaded {
                id: id.clone(),
                size_bytes: entry.size_bytes(),
                runtime: entry.runtime().to_owned(),
            },
            Err(e @ (CacheError::LoadFailed { .. } | CacheError::TooLarge { .. })) => {
                // The back-off just recorded (gone only if the model was unloaded since: no wait).
                let retry_in = self
                    .state
                    .lock()
                    .failures
                    .get(&id)
                    .map_or(Duration::ZERO, |f| f.retry_at.saturating_duration_since(Instant::now()));
                let retry_at = std::time::SystemTime::now() + retry_in;
                super::CopyEvent::Failed { id: id.clone(), reason: e.to_string(), retry_at }
            }
            Err(_) => super::CopyEvent::Gone(id.clone()),
        });
        outcome.send_replace(Some(result));
    }

    fn backoff(&self, consecutive: u32) -> Duration {
        let doubled = self.config.retry_backoff.saturating_mul(1 << consecutive.saturating_sub(1).min(16));
        doubled.min(self.config.max_retry_backoff.max(self.config.retry_backoff))
    }

    async fn load_once(self: &Arc<Self>, id: &ModelId) -> Result<Arc<Entry>, CacheError> {
        let failed = |reason: String| CacheError::LoadFailed {
            model_id: id.clone(),
            reason: reason.into(),
            retry_in: Duration::ZERO,
        };
        let timeout_error =
            || failed(format!("did not finish within {:?} (--load-timeout)", self.config.load_timeout));
        let queued = Instant::now();
        let permit = tokio::select! {
            permit = self.load_permits.clone().acquire_owned() => permit.map_err(|_| CacheError::ShuttingDown)?,
            _ = self.shutdown.cancelled() => return Err(CacheError::ShuttingDown),
        };
        metrics::histogram!(m::LOAD_QUEUE_WAIT).record(queued.elapsed().as_secs_f64());
        // --load-timeout bounds the load from the moment it has a slot: when thousands of models are
        // registered with loadNow at once, waiting for a slot is queueing, not a slow load. A caller
        // that cannot wait that long is bounded by its own deadline.
        let deadline = Instant::now() + self.config.load_timeout;

        // Pulling counts against the load's deadline; a pull given up on here still finishes and
        // lands in the disk cache for the next try.
        let fetched = tokio::select! {
            fetched = (self.locate)(id.clone()) => fetched?,
            _ = tokio::time::sleep_until(deadline) => return Err(timeout_error()),
        };
        let local = fetched.model.clone();
        tracing::debug!(source = fetched.source, path = %local.path.display(), "model files local");
        let capacity = self.config.capacity_bytes;
        if local.file_bytes > capacity {
            return Err(CacheError::TooLarge {
                model_id: id.clone(),
                needed_bytes: local.file_bytes,
                capacity_bytes: capacity,
                how: "its file size",
            });
        }
        let factor = self.state.lock().size_factor.unwrap_or(1.0);
        let predicted = ((local.file_bytes as f64 * factor) as u64).clamp(local.file_bytes, capacity);
        let mut reservation = self.reserve(id, predicted, deadline).await?;

        // The runtime's part alone is what an eviction would make a later load pay again: the files
        // stay in the disk cache, and queueing or waiting for room is not the model's cost.
        let runtime_started = Instant::now();
        let quick = (local.file_bytes <= self.config.inline_load_max_bytes)
            .then(|| self.load_quickly(&fetched, id))
            .flatten();
        let (model, probed) = match quick {
            Some(loaded) => loaded.map_err(failed)?,
            None => {
                let runtime = self.runtime.clone();
                let model_id = id.to_string();
                let mut loading: RuntimeLoad = tokio::task::spawn_blocking(move || {
                    // Mapped here, on the blocking pool: pre-faulting reads the whole file.
                    let request = load_request(&fetched, &model_id)?;
                    runtime_load_fail_point(&model_id)?;
                    let model = runtime.load(&request)?;
                    // `fetched` (and its pin on the disk-cache entry) lives until the runtime is done.
                    drop(fetched);
                    let probed = crate::node::worker::probe_infer_time(&*model);
                    Ok((model, probed))
                });
                tokio::select! {
                    loaded = &mut loading => loaded
                        .map_err(|e| failed(format!("runtime panicked while loading: {e}")))?
                        .map_err(|e| failed(e.to_string()))?,
                    _ = tokio::time::sleep_until(deadline) => {
                        // The caller hears of the timeout now, but the runtime call cannot be interrupted: the
                        // slot and the bytes stay taken until it returns, so the limits hold for what is
                        // really running.
                        self.settle_abandoned_load(loading, permit, reservation);
                        return Err(timeout_error());
                    }
                }
            }
        };
        let load_time = runtime_started.elapsed();
        let measured = model.size_bytes() + self.config.copy_bookkeeping_bytes;
        self.learn_size_factor(local.file_bytes, measured);
        if measured > capacity {
            self.discard(model).await;
            return Err(CacheError::TooLarge {
                model_id: id.clone(),
                needed_bytes: measured,
                capacity_bytes: capacity,
                how: "measured after loading",
            });
        }
        if measured > reservation.bytes {
            // The prediction goes back while the load waits for its whole measured size: a load
            // holding bytes while it waits for more could wait on another doing the same, and letting
            // it overrun the capacity instead would break the limit.
            drop(std::mem::replace(&mut reservation, Reservation { inner: self.clone(), bytes: 0 }));
            match self.reserve(id, measured, deadline).await {
                Ok(whole) => reservation = whole,
                Err(e) => {
                    // Freed before the slot goes back, and off the async threads.
                    self.discard(model).await;
                    return Err(e);
                }
            }
        }
        let entry = Arc::new(
            Entry::new(id.clone(), model, measured, local.version, load_time, self.room_freed.clone())
                .asking_gpu(local.gpu),
        );
        if let Some(took) = probed {
            entry.record_infer_time(took);
        }
        let evicted = {
            let mut state = self.state.lock();
            // The reservation becomes the model's charge; any excess goes back.
            let excess = reservation.bytes - measured;
            state.used_bytes -= excess;
            state.reserved_bytes -= reservation.bytes;
            reservation.bytes = 0;
            // Before the new model joins, so it is never its own victim.
            let evicted = self.trim(&mut state);
            state.resident.put(id.clone(), entry.clone());
            state.joined(id, &entry, Instant::now());
            self.publish(&state);
            evicted
        };
        self.retire(evicted).await;
        self.room_freed.notify_waiters();
        drop(permit);
        Ok(entry)
    }

    /// The runtime's load right here, if it can do it at once (see
    /// [`Runtime::try_load_quick`](densemesh_runtime_core::Runtime::try_load_quick)): `None` sends the
    /// load to the blocking pool. A panic is that load's failure, as on the blocking pool.
    fn load_quickly(
        &self,
        fetched: &densemesh_puller::Fetched,
        id: &ModelId,
    ) -> Option<Result<Probed, String>> {
        let model_id = id.to_string();
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // A stall at the fail point here would hold the async thread: the tests of slow loads turn
            // quick loads off.
            let request = match load_request(fetched, &model_id) {
                Ok(request) => request,
                Err(e) => return Some(Err(e)),
            };
            if let Err(e) = runtime_load_fail_point(&model_id) {
                return Some(Err(e));
            }
            self.runtime.try_load_quick(&request)
        }));
        match loaded {
            Ok(None) => None,
            Ok(Some(Err(e))) => Some(Err(e.to_string())),
            Ok(Some(Ok(model))) => {
                let probed = crate::node::worker::probe_infer_time(&*model);
                Some(Ok((model, probed)))
            }
            Err(panic) => Some(Err(format!(
                "runtime panicked while loading: {}",
                densemesh_runtime_core::panic_message(&*panic)
            ))),
        }
    }

    /// Takes over a load whose deadline passed while the runtime was still loading: a task owned by
    /// the cache's tracker waits for the runtime to return, frees whatever it loaded, and only then
    /// gives back the load slot and the reserved bytes.
    ///
    /// Shutdown waits for it like any load in progress; it does not watch the shutdown token, because
    /// nothing can interrupt the runtime call and the limits must hold until it ends.
    fn settle_abandoned_load(
        self: &Arc<Self>,
        loading: RuntimeLoad,
        permit: OwnedSemaphorePermit,
        reservation: Reservation,
    ) {
        let inner = self.clone();
        let span = tracing::info_span!("abandoned_load", reserved_bytes = reservation.bytes);
        let settle = async move {
            let given_up = Instant::now();
            match loading.await {
                Ok(Ok((model, _))) => inner.discard(model).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "abandoned load failed"),
                Err(e) => tracing::warn!(error = %e, "runtime panicked during an abandoned load"),
            }
            // The slot first: the reservation's release wakes the loads waiting for room.
            drop(permit);
            drop(reservation);
            tracing::info!(
                overran_ms = given_up.elapsed().as_millis() as u64,
                "load that passed --load-timeout finished; its slot and bytes are free again"
            );
        };
        self.tasks.spawn(settle.instrument(span));
    }

    /// Frees a model this cache will not keep, on the blocking pool: freeing a large session can take
    /// milliseconds.
    async fn discard(&self, model: Box<dyn LoadedModel>) {
        let runtime = self.runtime.clone();
        let _ = tokio::task::spawn_blocking(move || {
            drop(model);
            runtime.reclaim_memory();
        })
        .await;
    }

    /// Sets aside `bytes`, evicting idle models; waits while the only candidates are in use. The
    /// capacity is never overrun: a load whose measured size outgrew its prediction gives its
    /// reservation back and asks again for the whole size.
    async fn reserve(
        self: &Arc<Self>,
        id: &ModelId,
        bytes: u64,
        deadline: Instant,
    ) -> Result<Reservation, CacheError> {
        loop {
            let notified = self.room_freed.notified();
            tokio::pin!(notified);
            // Register before looking, so a lease dropped in between still wakes us.
            notified.as_mut().enable();
            let attempt = {
                let mut state = self.state.lock();
                match self.make_room(&mut state, bytes, 0) {
                    Ok(evicted) => {
                        state.used_bytes += bytes;
                        state.reserved_bytes += bytes;
                        self.publish(&state);
                        Ok(evicted)
                    }
                    Err(shortfall) => Err((shortfall, self.next_residence_expiry(&state))),
                }
            };
            let (shortfall, wake_at) = match attempt {
                Ok(evicted) => {
                    self.retire(evicted).await;
                    return Ok(Reservation { inner: self.clone(), bytes });
                }
                Err(waiting) => waiting,
            };
            tracing::debug!(%shortfall, "waiting for room");
            let wake_at = wake_at.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.shutdown.cancelled() => return Err(CacheError::ShuttingDown),
            }
            if Instant::now() >= deadline {
                return Err(CacheError::NoRoom {
                    model_id: id.clone(),
                    reason: format!("{shortfall}, and none freed up within --load-timeout").into(),
                });
            }
        }
    }

    fn learn_size_factor(&self, file_bytes: u64, measured: u64) {
        if file_bytes == 0 {
            return;
        }
        let ratio = (measured as f64 / file_bytes as f64).clamp(1.0, 8.0);
        let mut state = self.state.lock();
        state.size_factor = Some(state.size_factor.map_or(ratio, |f| 0.75 * f + 0.25 * ratio));
    }
}

/// docs/faults.md: the runtime's load panics (`panic`), stalls (`sleep(MS)`) or fails
/// (`return(REASON)`), wherever it runs (the blocking pool or, for a quick load, the caller's thread).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn runtime_load_fail_point(model_id: &str) -> densemesh_runtime_core::Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("runtime.load", |reason: Option<String>| {
        let reason = reason.unwrap_or_else(|| "fail point runtime.load".to_owned());
        Err(densemesh_runtime_core::Error::Load { model_id: model_id.to_owned(), source: reason.into() })
    });
    Ok(())
}

/// What the runtime is given to load a located model: its bytes mapped (and pre-faulted) when it is a
/// single file in the disk cache, its path otherwise.
fn load_request(
    fetched: &densemesh_puller::Fetched,
    model_id: &str,
) -> densemesh_runtime_core::Result<LoadRequest> {
    let contents = fetched.map().map_err(|e| densemesh_runtime_core::Error::Load {
        model_id: model_id.to_owned(),
        source: e.into(),
    })?;
    Ok(LoadRequest {
        model_id: model_id.to_owned(),
        model_type: fetched.model.format.clone(),
        path: fetched.model.path.clone(),
        contents: contents.map(|m| ModelBytes(Arc::new(m))),
        runtime: fetched.model.runtime.clone(),
    })
}
