//! A store whose watches hold their events while told to: the store of a pod whose watch lags behind
//! writes made through another pod, for tests of what must not wait for the watch (strong reads).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;

use super::{LeaseId, RangeResult, Result, Revision, Store, Txn, TxnResult, WatchEvent};

/// `store`, its watches delivering nothing while [`held`](Self::held) is true.
#[derive(Clone)]
pub struct HeldWatches {
    store: Arc<dyn Store>,
    held: Arc<watch::Sender<bool>>,
}

impl HeldWatches {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, held: Arc::new(watch::channel(false).0) }
    }

    /// Set true to hold every watch's events, false to let them through (in order).
    pub fn held(&self) -> Arc<watch::Sender<bool>> {
        self.held.clone()
    }
}

#[async_trait]
impl Store for HeldWatches {
    async fn range(&self, prefix: &str) -> Result<RangeResult> {
        self.store.range(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.store.txn(txn).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.store.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.store.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.store.revoke_lease(lease).await
    }

    fn watch(&self, prefix: &str, after: Revision) -> BoxStream<'static, Result<WatchEvent>> {
        let held = self.held.subscribe();
        self.store
            .watch(prefix, after)
            .then(move |event| {
                let mut held = held.clone();
                async move {
                    let _ = held.wait_for(|held| !held).await;
                    event
                }
            })
            .boxed()
    }
}
