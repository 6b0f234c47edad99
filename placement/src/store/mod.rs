//! The cluster's state store: a few required operations (`range`, `txn`, leases, `watch`) that etcd
//! and the embedded [`MemoryStore`] both implement, and helpers built on them (`get`, `put`,
//! `compare_and_put`, `create`, `delete`).
//!
//! Every write that depends on what was read goes through compare-and-swap on the key's modification
//! revision, never read-modify-write. Keys written under a lease vanish with it, which is how a dead
//! pod's placement records disappear.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
#[cfg(feature = "etcd")]
pub(crate) mod etcd;
#[cfg(any(test, feature = "conformance"))]
pub mod held;
mod memory;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

#[cfg(feature = "etcd")]
pub use etcd::{EtcdStore, EtcdTls};
pub use memory::MemoryStore;

/// A store revision: every change increments it; 0 means "never written".
pub type Revision = i64;

/// A lease; keys put with it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's modification revision equals this (0: the key does not exist).
    ModRevision(String, Revision),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete { key: String },
    DeletePrefix { prefix: String },
}

/// Writes applied atomically: `success` if every compare holds, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

/// Outcome of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

/// Keys under a prefix, read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: Revision },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Store errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The revision a watch asked to start from was compacted away: re-read with `range`, then
    /// watch from the revision that read returned. `oldest` is the oldest revision kept where the
    /// store says (a watch does); an etcd error for compacted history does not, and then it is
    /// `requested`.
    #[error("revision {requested} was compacted (oldest kept: {oldest}); list again and watch from there")]
    Compacted { requested: Revision, oldest: Revision },
    #[error("lease {0:?} does not exist or has expired")]
    LeaseNotFound(LeaseId),
    /// The store cannot be reached; the operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the request (malformed, not permitted, beyond a limit): retrying it unchanged
    /// will not help.
    #[error("store refused the request: {0}")]
    Rejected(String),
    #[error("transaction has {0} operations; the limit is {MAX_TXN_OPS}")]
    TooManyOps(usize),
}

/// The most operations one transaction may hold (etcd's default limit).
pub const MAX_TXN_OPS: usize = 128;

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A key-value store with revisions, transactions, leases and watches.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every key starting with `prefix`, sorted, with the store's current revision.
    async fn range(&self, prefix: &str) -> Result<RangeResult>;

    /// Applies a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;

    /// A lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Changes under `prefix` with revisions above `after`, in order, each exactly once; then live
    /// changes. Ends with `StoreError::Compacted` when `after` is older than the store keeps.
    fn watch(&self, prefix: &str, after: Revision) -> BoxStream<'static, Result<WatchEvent>>;

    /// One key, if present.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.range(key).await?.kvs.into_iter().find(|kv| kv.key == key))
    }

    /// Writes a key unconditionally; the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let op = Op::Put { key: key.to_owned(), value, lease };
        Ok(self.txn(Txn { success: vec![op], ..Txn::default() }).await?.revision)
    }

    /// Writes a key only if its modification revision is still `expected` (0: only if absent).
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<TxnResult> {
        self.txn(Txn {
            compare: vec![Compare::ModRevision(key.to_owned(), expected)],
            success: vec![Op::Put { key: key.to_owned(), value, lease }],
            failure: vec![],
        })
        .await
    }

    /// Writes a key only if it does not exist.
    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<TxnResult> {
        self.compare_and_put(key, 0, value, lease).await
    }

    /// Deletes a key only if its modification revision is still `expected`.
    async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<TxnResult> {
        self.txn(Txn {
            compare: vec![Compare::ModRevision(key.to_owned(), expected)],
            success: vec![Op::Delete { key: key.to_owned() }],
            failure: vec![],
        })
        .await
    }

    /// Deletes a key unconditionally; the new revision.
    async fn delete(&self, key: &str) -> Result<Revision> {
        let op = Op::Delete { key: key.to_owned() };
        Ok(self.txn(Txn { success: vec![op], ..Txn::default() }).await?.revision)
    }
}
