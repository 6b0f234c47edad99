//! Admission to a runtime in another process: `concurrency` calls run at once, at most `max_queued`
//! wait for a slot beyond those, and any more are refused at once, so overload turns into
//! RESOURCE_EXHAUSTED instead of requests piling up until their deadline (the same rule as the mesh's
//! own inference worker).
//!
//! A remote model hands out its server's [`CallSlots`] through
//! [`LoadedModel::call_slots`](crate::LoadedModel::call_slots), so calls the mesh passes through as
//! bytes and calls it decodes share one limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};

/// Slots for the calls to one server, and its bounded wait queue. Waiters are served in arrival order.
#[derive(Debug)]
pub struct CallSlots {
    /// Who the slots belong to, for errors: e.g. `runtime mlserver process 0`.
    owner: String,
    concurrency: usize,
    max_queued: usize,
    /// The longest a call waits for a slot.
    max_wait: Duration,
    running: Semaphore,
    /// Calls waiting for a slot now.
    queued: AtomicUsize,
}

/// Why a call got no slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    /// Every slot is taken and the queue is full: the caller should back off.
    #[error(
        "{owner} has {concurrency} calls running and {max_queued} waiting, its concurrency and maxQueued in the runtime config; retry later"
    )]
    Full {
        /// Who the slots belong to.
        owner: String,
        /// Calls that run at once.
        concurrency: usize,
        /// Calls that may wait.
        max_queued: usize,
    },
    /// The call waited its longest and no slot came free.
    #[error("{owner} had no free slot within {waited:?}")]
    TimedOut {
        /// Who the slots belong to.
        owner: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The slots were closed (the runtime is shutting down).
    #[error("{owner} is shut down")]
    Closed {
        /// Who the slots belong to.
        owner: String,
    },
}

/// Decrements the queue however the wait ends, a cancelled wait (the client went away) included.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CallSlots {
    /// `concurrency` slots (at least 1) and room for `max_queued` waiters, each waiting at most
    /// `max_wait`.
    pub fn new(owner: impl Into<String>, concurrency: usize, max_queued: usize, max_wait: Duration) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            owner: owner.into(),
            concurrency,
            max_queued,
            max_wait,
            running: Semaphore::new(concurrency),
            queued: AtomicUsize::new(0),
        }
    }

    /// A slot, held until the permit drops: at once if one is free, after waiting in the queue
    /// otherwise; [`NoSlot::Full`] at once when the queue is full too.
    pub async fn enter(&self) -> Result<SemaphorePermit<'_>, NoSlot> {
        match self.running.try_acquire() {
            Ok(permit) => return Ok(permit),
            Err(TryAcquireError::Closed) => return Err(self.closed()),
            Err(TryAcquireError::NoPermits) => {}
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(NoSlot::Full {
                owner: self.owner.clone(),
                concurrency: self.concurrency,
                max_queued: self.max_queued,
            });
        }
        let _waiting = Waiting(&self.queued);
        match tokio::time::timeout(self.max_wait, self.running.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(self.closed()),
            Err(_) => Err(NoSlot::TimedOut { owner: self.owner.clone(), waited: self.max_wait }),
        }
    }

    /// Refuses every call from now on, waiting ones included.
    pub fn close(&self) {
        self.running.close();
    }

    /// Calls waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn closed(&self) -> NoSlot {
        NoSlot::Closed { owner: self.owner.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_slots_and_the_queue_are_refused_at_once() {
        let slots = CallSlots::new("runtime r process 0", 2, 1, Duration::from_secs(30));
        let first = slots.enter().await.unwrap();
        let _second = slots.enter().await.unwrap();
        let mut waiting = Box::pin(slots.enter());
        assert!(futures_poll(&mut waiting).is_none(), "the third waits for a slot");
        assert_eq!(slots.queued(), 1);
        let refused = slots.enter().await.unwrap_err();
        assert_eq!(
            refused.to_string(),
            "runtime r process 0 has 2 calls running and 1 waiting, its concurrency and maxQueued in the runtime config; retry later"
        );
        drop(first);
        let _third = waiting.await.expect("the freed slot goes to the waiter");
        assert_eq!(slots.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ends_early_leaves_the_queue_and_a_long_one_times_out() {
        let slots = CallSlots::new("runtime r process 1", 1, 1, Duration::from_secs(5));
        let _held = slots.enter().await.unwrap();
        let mut cancelled = Box::pin(slots.enter());
        assert!(futures_poll(&mut cancelled).is_none());
        drop(cancelled);
        assert_eq!(slots.queued(), 0, "a caller that went away frees its place in the queue");
        let timed_out = slots.enter().await.unwrap_err();
        assert_eq!(
            timed_out,
            NoSlot::TimedOut { owner: "runtime r process 1".into(), waited: Duration::from_secs(5) }
        );
        slots.close();
        assert!(matches!(slots.enter().await, Err(NoSlot::Closed { .. })));
    }

    /// Polls a future once, without a runtime's waker mattering (the tests drive wake-ups themselves).
    fn futures_poll<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(future).poll(&mut cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        }
    }
}
