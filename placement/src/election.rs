//! Leader election on the registry's `leader` key. The key holds the leader's instance id and is
//! bound to the leader's lease, so it vanishes when the leader dies or stops renewing, and another
//! pod's next campaign wins within the lease TTL. Campaigning is a create-if-absent and resigning a
//! compare-and-delete on the key's revision: no read-modify-write, so two pods never both win.
//!
//! Only the leader does cluster-wide chores (vmodel transitions, auto-delete, pruning failed
//! records, repository sync). Pods learn who leads from [`ClusterView::leader`](crate::ClusterView::leader),
//! which follows the key like every other record.

use crate::registry::{Registry, RegistryError};
use crate::store::{KeyValue, LeaseId};

/// Campaigns for leadership as `instance_id`, with the key bound to `lease` (this pod's lease).
/// Returns whether this instance leads now: true when it created the key or already held it (a key
/// it holds under another lease, say from before a restart, is moved onto `lease`), false when
/// another instance leads. A campaign that keeps losing races to concurrent changes of the key
/// returns false too; campaigning again later is always safe.
pub async fn campaign(registry: &Registry, instance_id: &str, lease: LeaseId) -> Result<bool, RegistryError> {
    if instance_id.is_empty() {
        return Err(RegistryError::Invalid(
            "cannot campaign for leadership with an empty instance id".into(),
        ));
    }
    let (store, key) = (registry.store(), registry.leader_key());
    let value = instance_id.as_bytes();
    for _ in 0..4 {
        if store.create(&key, value.to_vec(), Some(lease)).await?.succeeded {
            return Ok(true);
        }
        match store.get(&key).await? {
            // The leader's lease ended between the two calls: the key is free again.
            None => continue,
            Some(kv) if kv.value != value => return Ok(false),
            Some(kv) if kv.lease == Some(lease) => return Ok(true),
            Some(kv) => {
                let moved = store.compare_and_put(&key, kv.mod_revision, value.to_vec(), Some(lease)).await?;
                if moved.succeeded {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Gives up leadership: deletes the key only if it still holds `instance_id`, so a pod that has
/// already lost the key cannot delete its successor's. Returns whether it deleted it.
pub async fn resign(registry: &Registry, instance_id: &str) -> Result<bool, RegistryError> {
    let (store, key) = (registry.store(), registry.leader_key());
    match store.get(&key).await? {
        Some(kv) if kv.value == instance_id.as_bytes() => {
            Ok(store.compare_and_delete(&key, kv.mod_revision).await?.succeeded)
        }
        _ => Ok(false),
    }
}

/// The leader's instance id as the store has it now (the request path reads
/// [`ClusterView::leader`](crate::ClusterView::leader) instead).
pub async fn leader(registry: &Registry) -> Result<Option<String>, RegistryError> {
    match registry.store().get(&registry.leader_key()).await? {
        Some(kv) => leader_of(&kv).map(Some),
        None => Ok(None),
    }
}

/// The instance id a stored leader key holds.
pub(crate) fn leader_of(kv: &KeyValue) -> Result<String, RegistryError> {
    String::from_utf8(kv.value.clone()).map_err(|_| RegistryError::Corrupt {
        key: kv.key.clone(),
        reason: "the leader's instance id is not UTF-8".into(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::{MemoryStore, Store};

    #[tokio::test]
    async fn a_restarted_leader_moves_its_key_onto_its_new_lease() {
        let store = MemoryStore::new();
        let registry = Registry::new(Arc::new(store.clone()), "dm");
        let old = store.grant_lease(Duration::from_secs(600)).await.unwrap();
        let new = store.grant_lease(Duration::from_secs(600)).await.unwrap();
        assert!(campaign(&registry, "pod-a", old).await.unwrap());
        assert!(campaign(&registry, "pod-a", new).await.unwrap(), "the key already holds this instance");
        assert_eq!(store.get(&registry.leader_key()).await.unwrap().unwrap().lease, Some(new));
        store.revoke_lease(old).await.unwrap();
        assert_eq!(leader(&registry).await.unwrap().as_deref(), Some("pod-a"), "the old lease took nothing");
    }

    #[tokio::test]
    async fn bad_campaigns_and_unreadable_keys_are_errors() {
        let store = MemoryStore::new();
        let registry = Registry::new(Arc::new(store.clone()), "dm");
        let lease = store.grant_lease(Duration::from_secs(600)).await.unwrap();
        assert!(matches!(campaign(&registry, "", lease).await, Err(RegistryError::Invalid(_))));
        let err = campaign(&registry, "pod-a", LeaseId(999)).await.unwrap_err();
        assert!(matches!(err, RegistryError::Store(crate::StoreError::LeaseNotFound(LeaseId(999)))), "{err}");
        store.put(&registry.leader_key(), vec![0xff, 0xfe], None).await.unwrap();
        assert!(matches!(leader(&registry).await, Err(RegistryError::Corrupt { .. })));
        assert!(!campaign(&registry, "pod-a", lease).await.unwrap(), "an unreadable key is not ours");
    }
}
