//! `MemoryStore`: the embedded store for a single node, with etcd's semantics (one revision per
//! transaction, modification revisions for compare-and-swap, leases, watches that resume from a
//! revision within a bounded history).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Compare, KeyValue, LeaseId, MAX_TXN_OPS, Op, RangeResult, Result, Revision, Store, StoreError, Txn,
    TxnResult, WatchEvent,
};

/// Changes kept for watches that resume from an older revision.
const DEFAULT_HISTORY: usize = 100_000;

/// The in-memory store. Cloning shares it; the lease reaper stops when the last clone drops.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
    _reaper: Arc<DropGuard>,
}

struct Inner {
    state: Mutex<State>,
    /// Every change with its sequence number (several changes can share one revision).
    events: broadcast::Sender<(u64, WatchEvent)>,
    leases_changed: Notify,
}

struct State {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    history: VecDeque<(u64, WatchEvent)>,
    next_seq: u64,
    history_limit: usize,
    /// Events at or below this revision are gone from `history`.
    compacted: Revision,
    leases: HashMap<LeaseId, Lease>,
    next_lease: i64,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl MemoryStore {
    /// A new empty store; needs a tokio runtime (its lease reaper is a task).
    pub fn new() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }

    /// A store that keeps only the last `history` changes for resuming watches.
    pub fn with_history(history: usize) -> Self {
        let (events, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                revision: 0,
                kvs: BTreeMap::new(),
                history: VecDeque::new(),
                next_seq: 0,
                history_limit: history.max(1),
                compacted: 0,
                leases: HashMap::new(),
                next_lease: 1,
            }),
            events,
            leases_changed: Notify::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(reap_leases(inner.clone(), stop.clone()));
        Self { inner, _reaper: Arc::new(stop.drop_guard()) }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Deletes the keys of expired leases, sleeping until the next deadline or a lease change; ends when
/// the last `MemoryStore` clone drops its guard.
async fn reap_leases(inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let changed = inner.leases_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let next = {
            let mut state = inner.state.lock();
            let now = Instant::now();
            let expired: Vec<LeaseId> =
                state.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
            for id in expired {
                state.end_lease(id, &inner.events);
            }
            state.leases.values().map(|l| l.deadline).min()
        };
        tokio::select! {
            _ = changed => {}
            _ = async { match next { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
            _ = stop.cancelled() => return,
        }
    }
}

impl State {
    fn mod_revision(&self, key: &str) -> Revision {
        self.kvs.get(key).map_or(0, |kv| kv.mod_revision)
    }

    fn record(&mut self, event: WatchEvent, events: &broadcast::Sender<(u64, WatchEvent)>) {
        self.next_seq += 1;
        self.history.push_back((self.next_seq, event.clone()));
        while self.history.len() > self.history_limit {
            if let Some((_, old)) = self.history.pop_front() {
                self.compacted = old.revision();
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = events.send((self.next_seq, event));
    }

    fn remove(&mut self, key: &str, revision: Revision, events: &broadcast::Sender<(u64, WatchEvent)>) {
        if let Some(old) = self.kvs.remove(key) {
            if let Some(lease) = old.lease.and_then(|l| self.leases.get_mut(&l)) {
                lease.keys.remove(key);
            }
            self.record(WatchEvent::Delete { key: key.to_owned(), mod_revision: revision }, events);
        }
    }

    fn apply(&mut self, op: Op, revision: Revision, events: &broadcast::Sender<(u64, WatchEvent)>) {
        match op {
            Op::Put { key, value, lease } => {
                let create_revision = self.kvs.get(&key).map_or(revision, |kv| kv.create_revision);
                let old_lease = self.kvs.get(&key).and_then(|kv| kv.lease);
                if let Some(l) = old_lease.and_then(|l| self.leases.get_mut(&l)) {
                    l.keys.remove(&key);
                }
                if let Some(l) = lease.and_then(|l| self.leases.get_mut(&l)) {
                    l.keys.insert(key.clone());
                }
                let kv = KeyValue { key: key.clone(), value, create_revision, mod_revision: revision, lease };
                self.kvs.insert(key, kv.clone());
                self.record(WatchEvent::Put(kv), events);
            }
            Op::Delete { key } => self.remove(&key, revision, events),
            Op::DeletePrefix { prefix } => {
                let keys: Vec<String> = self
                    .kvs
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in keys {
                    self.remove(&key, revision, events);
                }
            }
        }
    }

    fn end_lease(&mut self, id: LeaseId, events: &broadcast::Sender<(u64, WatchEvent)>) {
        if let Some(lease) = self.leases.remove(&id)
            && !lease.keys.is_empty()
        {
            self.revision += 1;
            let revision = self.revision;
            for key in lease.keys {
                self.remove(&key, revision, events);
            }
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn range(&self, prefix: &str) -> Result<RangeResult> {
        let state = self.inner.state.lock();
        let kvs = state
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(RangeResult { kvs, revision: state.revision })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let ops = txn.compare.len() + txn.success.len().max(txn.failure.len());
        if ops > MAX_TXN_OPS {
            return Err(StoreError::TooManyOps(ops));
        }
        let mut state = self.inner.state.lock();
        for op in txn.success.iter().chain(&txn.failure) {
            if let Op::Put { lease: Some(lease), .. } = op
                && !state.leases.contains_key(lease)
            {
                return Err(StoreError::LeaseNotFound(*lease));
            }
        }
        let succeeded = txn.compare.iter().all(|c| match c {
            Compare::ModRevision(key, rev) => state.mod_revision(key) == *rev,
        });
        let ops = if succeeded { txn.success } else { txn.failure };
        if !ops.is_empty() {
            state.revision += 1;
            let revision = state.revision;
            for op in ops {
                state.apply(op, revision, &self.inner.events);
            }
        }
        Ok(TxnResult { succeeded, revision: state.revision })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut state = self.inner.state.lock();
        let id = LeaseId(state.next_lease);
        state.next_lease += 1;
        state.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
        drop(state);
        self.inner.leases_changed.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.inner.state.lock();
        let now = Instant::now();
        match state.leases.get_mut(&lease) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.inner.state.lock();
        if !state.leases.contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        state.end_lease(lease, &self.inner.events);
        Ok(())
    }

    fn watch(&self, prefix: &str, after: Revision) -> BoxStream<'static, Result<WatchEvent>> {
        let state = self.inner.state.lock();
        if after < state.compacted {
            let err = StoreError::Compacted { requested: after, oldest: state.compacted };
            return stream::once(async move { Err(err) }).boxed();
        }
        let prefix = prefix.to_owned();
        // Subscribe under the lock, so no change falls between the replay and the live stream.
        let live = self.inner.events.subscribe();
        let replay: Vec<Result<WatchEvent>> = state
            .history
            .iter()
            .filter(|(_, e)| e.revision() > after && e.key().starts_with(&prefix))
            .map(|(_, e)| Ok(e.clone()))
            .collect();
        let replayed_up_to = state.next_seq;
        let oldest_kept = state.compacted;
        drop(state);
        let inner = Arc::downgrade(&self.inner);
        let live = stream::unfold((live, replayed_up_to, false), move |(mut rx, last, done)| {
            let (prefix, inner) = (prefix.clone(), inner.clone());
            async move {
                if done {
                    return None;
                }
                loop {
                    match rx.recv().await {
                        Ok((seq, event)) if seq > last && event.key().starts_with(&prefix) => {
                            return Some((Ok(event), (rx, seq, false)));
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // A consumer this slow must re-list, as after an etcd compaction.
                            let oldest = inner.upgrade().map_or(oldest_kept, |i| i.state.lock().compacted);
                            let err = StoreError::Compacted { requested: after, oldest };
                            return Some((Err(err), (rx, last, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        stream::iter(replay).chain(live).boxed()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    crate::store_conformance_tests!(async { MemoryStore::new() }, Duration::from_millis(200));

    #[tokio::test]
    async fn a_watch_older_than_the_history_says_so() {
        let store = MemoryStore::with_history(3);
        for i in 0..10 {
            store.put(&format!("k{i}"), vec![], None).await.unwrap();
        }
        let mut stale = store.watch("", 1);
        match stale.next().await {
            Some(Err(StoreError::Compacted { requested: 1, oldest })) => assert!(oldest >= 7),
            other => panic!("expected a compaction error, got {other:?}"),
        }
        let mut recent = store.watch("", 8);
        let event = recent.next().await.unwrap().unwrap();
        assert_eq!(event.key(), "k8");
    }
}
