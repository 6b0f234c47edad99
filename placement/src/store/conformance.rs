//! The behaviour every [`Store`] must have, as async functions each implementation's tests run
//! through [`store_conformance_tests!`](crate::store_conformance_tests). Keys live under a prefix of
//! the caller's choosing, so a shared etcd can run them side by side. The last case runs leader
//! election and the [`ClusterView`]'s mirror of it on the store, since both rest on its semantics.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{Compare, Op, Store, StoreError, Txn, WatchEvent};
use crate::election::{campaign, resign};
use crate::view::ViewChange;
use crate::{ClusterView, Registry};

fn key(prefix: &str, k: &str) -> String {
    format!("{prefix}{k}")
}

pub async fn put_get_range(store: &dyn Store, prefix: &str) {
    let r1 = store.put(&key(prefix, "models/b"), b"2".to_vec(), None).await.unwrap();
    let r2 = store.put(&key(prefix, "models/a"), b"1".to_vec(), None).await.unwrap();
    store.put(&key(prefix, "other/x"), b"x".to_vec(), None).await.unwrap();
    assert!(r2 > r1, "every write moves the revision forward");
    let range = store.range(&key(prefix, "models/")).await.unwrap();
    let keys: Vec<&str> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, [key(prefix, "models/a"), key(prefix, "models/b")], "sorted, prefix only");
    assert!(range.revision >= r2);

    let r3 = store.put(&key(prefix, "models/b"), b"3".to_vec(), None).await.unwrap();
    let b = store.get(&key(prefix, "models/b")).await.unwrap().unwrap();
    assert_eq!((b.value.as_slice(), b.create_revision, b.mod_revision), (&b"3"[..], r1, r3));
    assert_eq!(store.get(&key(prefix, "models/zzz")).await.unwrap(), None);
    store.delete(&key(prefix, "models/b")).await.unwrap();
    assert_eq!(store.get(&key(prefix, "models/b")).await.unwrap(), None);
}

pub async fn compare_and_swap(store: &dyn Store, prefix: &str) {
    let k = key(prefix, "vmodels/v");
    let created = store.create(&k, b"one".to_vec(), None).await.unwrap();
    assert!(created.succeeded);
    assert!(!store.create(&k, b"again".to_vec(), None).await.unwrap().succeeded, "create only if absent");
    let current = store.get(&k).await.unwrap().unwrap().mod_revision;

    let stale = store.compare_and_put(&k, current - 1, b"stale".to_vec(), None).await.unwrap();
    assert!(!stale.succeeded);
    assert_eq!(store.get(&k).await.unwrap().unwrap().value, b"one", "a lost race writes nothing");
    let won = store.compare_and_put(&k, current, b"two".to_vec(), None).await.unwrap();
    assert!(won.succeeded);
    let after = store.get(&k).await.unwrap().unwrap();
    assert_eq!((after.value.as_slice(), after.mod_revision), (&b"two"[..], won.revision));
    // Two writers with the same expectation: exactly one wins.
    let (a, b) = futures::join!(
        store.compare_and_put(&k, after.mod_revision, b"a".to_vec(), None),
        store.compare_and_put(&k, after.mod_revision, b"b".to_vec(), None)
    );
    assert!(a.unwrap().succeeded ^ b.unwrap().succeeded);
    assert!(!store.compare_and_delete(&k, after.mod_revision).await.unwrap().succeeded);
    let now = store.get(&k).await.unwrap().unwrap().mod_revision;
    assert!(store.compare_and_delete(&k, now).await.unwrap().succeeded);
    assert_eq!(store.get(&k).await.unwrap(), None);
}

pub async fn transactions_are_atomic(store: &dyn Store, prefix: &str) {
    let (a, b) = (key(prefix, "t/a"), key(prefix, "t/b"));
    store.put(&a, b"a".to_vec(), None).await.unwrap();
    let txn = Txn {
        compare: vec![Compare::ModRevision(a.clone(), 0)],
        success: vec![Op::Put { key: b.clone(), value: b"no".to_vec(), lease: None }],
        failure: vec![
            Op::Put { key: b.clone(), value: b"yes".to_vec(), lease: None },
            Op::Delete { key: a.clone() },
        ],
    };
    let result = store.txn(txn).await.unwrap();
    assert!(!result.succeeded);
    assert_eq!(store.get(&b).await.unwrap().unwrap().value, b"yes");
    assert_eq!(store.get(&b).await.unwrap().unwrap().mod_revision, result.revision);
    assert_eq!(store.get(&a).await.unwrap(), None);

    store.put(&key(prefix, "t/c1"), b"1".to_vec(), None).await.unwrap();
    store.put(&key(prefix, "t/c2"), b"2".to_vec(), None).await.unwrap();
    let op = Op::DeletePrefix { prefix: key(prefix, "t/c") };
    store.txn(Txn { success: vec![op], ..Txn::default() }).await.unwrap();
    assert!(store.range(&key(prefix, "t/c")).await.unwrap().kvs.is_empty());

    let too_many = (0..200).map(|i| Op::Delete { key: key(prefix, &format!("t/{i}")) }).collect();
    let err = store.txn(Txn { success: too_many, ..Txn::default() }).await.unwrap_err();
    assert!(matches!(err, StoreError::TooManyOps(200)), "{err}");
}

/// `ttl` is the shortest lease the store honours (etcd rounds small TTLs up).
pub async fn leases_expire_renew_and_revoke(store: &dyn Store, prefix: &str, ttl: Duration) {
    let (gone, kept, revoked) = (key(prefix, "l/gone"), key(prefix, "l/kept"), key(prefix, "l/revoked"));
    let short = store.grant_lease(ttl).await.unwrap();
    let renewed = store.grant_lease(ttl).await.unwrap();
    let revocable = store.grant_lease(Duration::from_secs(600)).await.unwrap();
    store.put(&gone, b"x".to_vec(), Some(short)).await.unwrap();
    store.put(&kept, b"x".to_vec(), Some(renewed)).await.unwrap();
    store.put(&revoked, b"x".to_vec(), Some(revocable)).await.unwrap();
    assert_eq!(store.get(&gone).await.unwrap().unwrap().lease, Some(short));

    store.revoke_lease(revocable).await.unwrap();
    assert_eq!(store.get(&revoked).await.unwrap(), None, "revoking deletes the lease's keys at once");
    assert!(matches!(store.keep_alive(revocable).await, Err(StoreError::LeaseNotFound(_))));

    // Renew one lease well inside its TTL while the other runs out.
    let deadline = tokio::time::Instant::now() + ttl * 4 + Duration::from_secs(5);
    loop {
        store.keep_alive(renewed).await.unwrap();
        if store.get(&gone).await.unwrap().is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a lease that is not renewed must expire");
        tokio::time::sleep(ttl / 4).await;
    }
    assert!(store.get(&kept).await.unwrap().is_some(), "a renewed lease keeps its keys");
    let err = store.put(&gone, b"x".to_vec(), Some(short)).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound(_)), "{err}");
    store.revoke_lease(renewed).await.unwrap();
}

pub async fn watches_resume_without_missing_or_repeating(store: &dyn Store, prefix: &str) {
    let p = key(prefix, "w/");
    let start = store.put(&key(prefix, "w/seed"), b"0".to_vec(), None).await.unwrap();
    store.put(&key(prefix, "elsewhere"), b"-".to_vec(), None).await.unwrap();
    store.put(&key(prefix, "w/a"), b"1".to_vec(), None).await.unwrap();
    let middle = store
        .txn(Txn {
            success: vec![
                Op::Put { key: key(prefix, "w/b"), value: b"2".to_vec(), lease: None },
                Op::Put { key: key(prefix, "w/c"), value: b"3".to_vec(), lease: None },
            ],
            ..Txn::default()
        })
        .await
        .unwrap()
        .revision;
    store.delete(&key(prefix, "w/a")).await.unwrap();

    let describe = |e: &WatchEvent| match e {
        WatchEvent::Put(kv) => {
            format!("put {} {}", kv.key.trim_start_matches(&p), String::from_utf8_lossy(&kv.value))
        }
        WatchEvent::Delete { key, .. } => format!("delete {}", key.trim_start_matches(&p)),
    };
    let mut from_start = store.watch(&p, start);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(describe(&next(&mut from_start).await));
    }
    assert_eq!(seen, ["put a 1", "put b 2", "put c 3", "delete a"]);
    let mut from_middle = store.watch(&p, middle);
    assert_eq!(describe(&next(&mut from_middle).await), "delete a", "resumes after the given revision");

    store.put(&key(prefix, "w/live"), b"4".to_vec(), None).await.unwrap();
    assert_eq!(describe(&next(&mut from_start).await), "put live 4");
    assert_eq!(describe(&next(&mut from_middle).await), "put live 4");
    store.put(&key(prefix, "elsewhere"), b"+".to_vec(), None).await.unwrap();
    store.put(&key(prefix, "w/last"), b"5".to_vec(), None).await.unwrap();
    assert_eq!(describe(&next(&mut from_start).await), "put last 5", "other prefixes are not seen");
}

/// Two candidates, one leader; the key and the view follow the leader's lease.
pub async fn leader_election(store: Arc<dyn Store>, prefix: &str) {
    let registry = Registry::new(store.clone(), prefix);
    let view = ClusterView::start(registry.clone()).await.unwrap();
    let mut changes = view.subscribe();
    assert_eq!(view.leader(), None);
    let settled = async || {
        // The store's revision now, then the view caught up with it.
        let revision = store.range(&registry.leader_key()).await.unwrap().revision;
        view.caught_up(revision).await;
    };
    let holder = async || store.get(&registry.leader_key()).await.unwrap().map(|kv| kv.value);

    let (lease_a, lease_b) = (
        store.grant_lease(Duration::from_secs(600)).await.unwrap(),
        store.grant_lease(Duration::from_secs(600)).await.unwrap(),
    );
    let (a, b) = futures::join!(campaign(&registry, "pod-a", lease_a), campaign(&registry, "pod-b", lease_b));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a ^ b, "exactly one of two candidates wins (a: {a}, b: {b})");
    let ((winner, winner_lease), loser) =
        if a { (("pod-a", lease_a), ("pod-b", lease_b)) } else { (("pod-b", lease_b), ("pod-a", lease_a)) };
    assert!(!campaign(&registry, loser.0, loser.1).await.unwrap(), "the loser's next campaign loses too");
    assert!(campaign(&registry, winner, winner_lease).await.unwrap(), "the winner's next campaign holds");
    let key = store.get(&registry.leader_key()).await.unwrap().unwrap();
    assert_eq!((key.value.as_slice(), key.lease), (winner.as_bytes(), Some(winner_lease)));
    settled().await;
    assert_eq!(view.leader().as_deref(), Some(winner));
    assert_eq!(next_leader(&mut changes).await, Some(winner.to_owned()));
    assert!(view.models().is_empty() && view.instances().is_empty(), "the leader key is no other record");

    assert!(!resign(&registry, loser.0).await.unwrap(), "a non-leader cannot resign for the leader");
    assert_eq!(holder().await.as_deref(), Some(winner.as_bytes()));

    // The winner's lease ends (its pod died): the key goes with it, and the other candidate wins.
    store.revoke_lease(winner_lease).await.unwrap();
    assert_eq!(holder().await, None);
    settled().await;
    assert_eq!(view.leader(), None);
    assert_eq!(next_leader(&mut changes).await, None);
    assert!(campaign(&registry, loser.0, loser.1).await.unwrap(), "the key is free again");
    settled().await;
    assert_eq!(view.leader().as_deref(), Some(loser.0));
    assert_eq!(next_leader(&mut changes).await, Some(loser.0.to_owned()));

    assert!(resign(&registry, loser.0).await.unwrap());
    assert_eq!(holder().await, None);
    settled().await;
    assert_eq!(view.leader(), None);
    store.revoke_lease(loser.1).await.unwrap();
}

/// The next leader change the view announces.
async fn next_leader(changes: &mut tokio::sync::broadcast::Receiver<ViewChange>) -> Option<String> {
    loop {
        let change = tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("a view change within 10 s")
            .expect("the view's changes stay open");
        if let ViewChange::Leader(leader) = change {
            return leader;
        }
    }
}

async fn next(stream: &mut futures::stream::BoxStream<'static, super::Result<WatchEvent>>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch stream stays open")
        .expect("no watch error")
}

/// Instantiates the conformance suite for a store: `store_conformance_tests!(async { store })`, with
/// the shortest lease TTL the store honours.
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr, $lease_ttl:expr) => {
        #[tokio::test]
        async fn conformance_put_get_range() {
            let store = $make.await;
            $crate::store::conformance::put_get_range(&store, "/conformance/range/").await;
        }

        #[tokio::test]
        async fn conformance_compare_and_swap() {
            let store = $make.await;
            $crate::store::conformance::compare_and_swap(&store, "/conformance/cas/").await;
        }

        #[tokio::test]
        async fn conformance_transactions_are_atomic() {
            let store = $make.await;
            $crate::store::conformance::transactions_are_atomic(&store, "/conformance/txn/").await;
        }

        #[tokio::test]
        async fn conformance_leases_expire_renew_and_revoke() {
            let store = $make.await;
            $crate::store::conformance::leases_expire_renew_and_revoke(
                &store,
                "/conformance/lease/",
                $lease_ttl,
            )
            .await;
        }

        #[tokio::test]
        async fn conformance_leader_election() {
            let store = $make.await;
            $crate::store::conformance::leader_election(::std::sync::Arc::new(store), "/conformance/leader/")
                .await;
        }

        #[tokio::test]
        async fn conformance_watches_resume_without_missing_or_repeating() {
            let store = $make.await;
            $crate::store::conformance::watches_resume_without_missing_or_repeating(
                &store,
                "/conformance/watch/",
            )
            .await;
        }
    };
}
