//! The crate's own small tokio runtime, and the bridge from the synchronous `Runtime` seam into it.
//!
//! The mesh calls `load` and `infer` on blocking threads (often tokio `spawn_blocking` threads) where
//! `Runtime::block_on` would panic or could deadlock against the caller's runtime. Instead each call is
//! spawned onto this runtime's own worker threads and the caller's thread merely waits for the task's
//! result, which works from any thread. Fire-and-forget work (the `unloadModel` a dropped model sends) is
//! tracked, and given a short grace to finish when the bridge goes away.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How long pending unloads may still run once the last handle on the runtime is dropped.
const UNLOAD_GRACE: Duration = Duration::from_secs(5);

/// The task was dropped before it finished: the bridge is shutting down (or the task panicked).
#[derive(Debug)]
pub(crate) struct Cancelled;

/// Owns the tokio runtime that every call to one SPI runtime runs on.
pub(crate) struct Bridge {
    /// `None` only while dropping.
    runtime: Option<Runtime>,
    handle: Handle,
    background: TaskTracker,
}

impl Bridge {
    /// Starts two worker threads named after the runtime: the calls are I/O-bound, and two keep a slow
    /// answer from stalling the timers of the others.
    pub(crate) fn new(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("spi-{name}"))
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self { runtime: Some(runtime), handle, background: TaskTracker::new() })
    }

    /// Makes the bridge's runtime the current one, for constructors that spawn onto it (tonic's lazy
    /// channels).
    pub(crate) fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.handle.enter()
    }

    /// Runs `future` on the bridge's runtime, in the caller's span, and waits for it on this thread.
    ///
    /// Safe from any thread outside the bridge's own workers (a plain thread, a `spawn_blocking`
    /// thread, even a tokio worker of another runtime, which it blocks), since the waiting side is not
    /// a tokio runtime at all.
    pub(crate) fn run<F>(&self, future: F) -> Result<F::Output, Cancelled>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = self.handle.spawn(future.in_current_span());
        futures::executor::block_on(task).map_err(|_| Cancelled)
    }

    /// Starts `future` without waiting for it; dropping the bridge gives it [`UNLOAD_GRACE`] to finish.
    pub(crate) fn spawn_background<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.background.spawn_on(future.in_current_span(), &self.handle);
    }
}

impl Drop for Bridge {
    /// Never blocks the dropping thread (which may be a tokio worker, where dropping a runtime panics):
    /// a short-lived thread waits for pending unloads, bounded by [`UNLOAD_GRACE`], then stops the
    /// runtime.
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else { return };
        self.background.close();
        let background = self.background.clone();
        let waiter = std::thread::Builder::new().name("spi-shutdown".into()).spawn(move || {
            runtime.block_on(async {
                let _ = tokio::time::timeout(UNLOAD_GRACE, background.wait()).await;
            });
            runtime.shutdown_background();
        });
        if let Err(e) = waiter {
            tracing::warn!(error = %e, "cannot start a thread to finish pending unloads; dropping them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_a_plain_thread_and_from_a_spawn_blocking_thread_of_another_runtime() {
        let bridge = std::sync::Arc::new(Bridge::new("test").expect("bridge"));
        assert_eq!(bridge.run(async { 1 + 1 }).ok(), Some(2));

        let outer = tokio::runtime::Builder::new_current_thread().build().expect("outer runtime");
        let inner = bridge.clone();
        let answer = outer.block_on(async move {
            tokio::task::spawn_blocking(move || {
                inner.run(async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    7
                })
            })
            .await
        });
        assert_eq!(answer.expect("joined").ok(), Some(7));
    }

    #[test]
    fn dropping_the_bridge_inside_an_async_task_does_not_panic() {
        let bridge = Bridge::new("test").expect("bridge");
        bridge.spawn_background(async {});
        let outer = tokio::runtime::Builder::new_current_thread().build().expect("outer runtime");
        outer.block_on(async move { drop(bridge) });
    }
}
