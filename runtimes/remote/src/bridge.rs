//! The bridge from the synchronous runtime seam into this crate's own tokio runtime.
//!
//! The mesh calls `load` and `infer` on blocking threads (`spawn_blocking`) and drops models wherever
//! it evicts them, so nothing here may need an async context or block one: work is spawned onto the
//! crate's runtime and the caller waits on a plain channel, never on `Runtime::block_on`, which refuses
//! to run inside another runtime.

use std::future::Future;

use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

use crate::RemoteError;

/// A cloneable way into the crate's runtime.
#[derive(Clone)]
pub(crate) struct Bridge {
    pub(crate) handle: Handle,
    pub(crate) runtime: String,
    /// Owner of fire-and-forget work (unloads), so shutdown waits for it.
    pub(crate) tasks: TaskTracker,
}

impl Bridge {
    /// Runs `work` on the crate's runtime and waits for its result; `ShutDown` if the runtime stopped
    /// before the work finished. Blocks the calling thread: call it from a blocking thread.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, RemoteError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv().map_err(|_| RemoteError::ShutDown { runtime: self.runtime.clone() })
    }

    /// Starts `work` on the crate's runtime without waiting for it.
    pub(crate) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        drop(self.tasks.spawn_on(work, &self.handle));
    }
}
