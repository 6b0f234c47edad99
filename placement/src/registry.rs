//! Registration on a [`Store`]: model specs, vmodels and inference graphs under `/<prefix>/models/`,
//! `/<prefix>/vmodels/` and `/<prefix>/graphs/`, every conditional write a compare-and-swap on the
//! key's revision.

use std::sync::Arc;

use crate::ModelId;
use crate::graph::GraphSpec;
use crate::spec::{ModelSpec, VModelSpec, is_format_name};
use crate::store::{Revision, Store, StoreError};

/// Registry errors; each maps to one gRPC code in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "model type {0:?} is not a format name (1-64 characters of a-z, 0-9, '-', '_', '.', e.g. onnx, sklearn)"
    )]
    UnsupportedType(String),
    #[error("{0}")]
    Invalid(String),
    #[error("model {0} is already registered with a different spec; unregister it first")]
    Conflict(ModelId),
    #[error("{0}")]
    NotFound(String),
    /// A compare-and-swap lost to a concurrent writer, or an expectation did not hold.
    #[error("{0}")]
    Precondition(String),
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result with [`RegistryError`].
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Reads and writes registrations.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    prefix: String,
}

/// How a registration went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// False when the same model was already registered (registration is idempotent).
    pub created: bool,
    /// The model was registered already and this registration changed its placement hints.
    pub updated: bool,
    pub revision: Revision,
}

impl Registry {
    /// `prefix` like `densemesh`: keys go under `/densemesh/`.
    pub fn new(store: Arc<dyn Store>, prefix: &str) -> Self {
        Self { store, prefix: format!("/{}/", prefix.trim_matches('/')) }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn models_prefix(&self) -> String {
        format!("{}models/", self.prefix)
    }

    pub fn vmodels_prefix(&self) -> String {
        format!("{}vmodels/", self.prefix)
    }

    pub fn graphs_prefix(&self) -> String {
        format!("{}graphs/", self.prefix)
    }

    pub fn instances_prefix(&self) -> String {
        format!("{}instances/", self.prefix)
    }

    pub fn placements_prefix(&self) -> String {
        format!("{}placements/", self.prefix)
    }

    /// Key of one pod's copy of a model.
    pub fn placement_key(&self, id: &ModelId, instance: &str) -> String {
        format!("{}{id}/{instance}", self.placements_prefix())
    }

    /// The model and instance a placement key names, the inverse of [`Self::placement_key`]; `None`
    /// for any other key or an invalid model id.
    pub fn placement_of_key<'k>(&self, key: &'k str) -> Option<(ModelId, &'k str)> {
        let (model, instance) = key.strip_prefix(&self.placements_prefix())?.split_once('/')?;
        Some((ModelId::new(model).ok()?, instance))
    }

    /// Key of a pod's instance record.
    pub fn instance_key(&self, instance: &str) -> String {
        format!("{}{instance}", self.instances_prefix())
    }

    /// The election key: holds the leader's instance id, bound to its lease (see [`crate::election`]).
    pub fn leader_key(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// The prefix everything lives under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn model_key(&self, id: &ModelId) -> String {
        format!("{}{id}", self.models_prefix())
    }

    fn vmodel_key(&self, id: &ModelId) -> String {
        format!("{}{id}", self.vmodels_prefix())
    }

    fn graph_key(&self, id: &ModelId) -> String {
        format!("{}{id}", self.graphs_prefix())
    }

    /// Registers a model. The same model again (type, path and key) is a no-op, except that its
    /// placement hints (size, minimum copies) become the new registration's; a different model under
    /// the same id is a conflict.
    pub async fn register(&self, id: &ModelId, spec: &ModelSpec) -> Result<Registered> {
        validate(spec)?;
        let key = self.model_key(id);
        for _ in 0..8 {
            let created = self.store.create(&key, encode(spec), None).await?;
            if created.succeeded {
                return Ok(Registered { created: true, updated: false, revision: created.revision });
            }
            // Unregistered between the two calls: create it again.
            let Some((existing, revision)) = self.model(id).await? else { continue };
            if !existing.same_model(spec) {
                return Err(RegistryError::Conflict(id.clone()));
            }
            // A registration may ask for auto-delete (a vmodel taking over a model registered on its
            // own, as a promoted canary is) but never clears it.
            let auto_delete = existing.auto_delete || spec.auto_delete;
            if existing.same_hints(spec) && auto_delete == existing.auto_delete {
                return Ok(Registered { created: false, updated: false, revision });
            }
            // Everything else stays as first registered (source, generation).
            let next = ModelSpec {
                size_bytes: spec.size_bytes,
                min_copies: spec.min_copies,
                gpu: spec.gpu,
                auto_delete,
                ..existing
            };
            let put = self.store.compare_and_put(&key, revision, encode(&next), None).await?;
            if put.succeeded {
                return Ok(Registered { created: false, updated: true, revision: put.revision });
            }
        }
        Err(RegistryError::Precondition(format!("model {id} kept changing while being registered; retry")))
    }

    /// Replaces a spec only if it is still at `expected` (0: absent); false when it lost a race.
    pub async fn replace(&self, id: &ModelId, spec: &ModelSpec, expected: Revision) -> Result<bool> {
        validate(spec)?;
        Ok(self.store.compare_and_put(&self.model_key(id), expected, encode(spec), None).await?.succeeded)
    }

    /// Deletes a registration; the revision of the deletion, `None` when there was none.
    pub async fn unregister(&self, id: &ModelId) -> Result<Option<Revision>> {
        for _ in 0..8 {
            let Some((_, revision)) = self.model(id).await? else { return Ok(None) };
            let deleted = self.store.compare_and_delete(&self.model_key(id), revision).await?;
            if deleted.succeeded {
                return Ok(Some(deleted.revision));
            }
        }
        Err(RegistryError::Precondition(format!("model {id} kept changing while being unregistered; retry")))
    }

    /// The store's present revision, read without listing anything: a range over a prefix no record
    /// has (model ids never start with `/`), where listing the registry would copy every record.
    pub async fn revision(&self) -> Result<Revision> {
        Ok(self.store.range(&format!("{}/", self.models_prefix())).await?.revision)
    }

    /// A model's spec and its revision.
    pub async fn model(&self, id: &ModelId) -> Result<Option<(ModelSpec, Revision)>> {
        let key = self.model_key(id);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// A vmodel and its revision.
    pub async fn vmodel(&self, id: &ModelId) -> Result<Option<(VModelSpec, Revision)>> {
        let key = self.vmodel_key(id);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Writes a vmodel only if it is still at `expected` (0: absent).
    pub async fn put_vmodel(
        &self,
        id: &ModelId,
        vmodel: &VModelSpec,
        expected: Revision,
    ) -> Result<Option<Revision>> {
        let result = self.store.compare_and_put(&self.vmodel_key(id), expected, encode(vmodel), None).await?;
        Ok(result.succeeded.then_some(result.revision))
    }

    /// Deletes a vmodel only if it is still at `expected`.
    pub async fn delete_vmodel(&self, id: &ModelId, expected: Revision) -> Result<bool> {
        Ok(self.store.compare_and_delete(&self.vmodel_key(id), expected).await?.succeeded)
    }

    /// An inference graph and its revision.
    pub async fn graph(&self, id: &ModelId) -> Result<Option<(GraphSpec, Revision)>> {
        let key = self.graph_key(id);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Writes a graph only if it is still at `expected` (0: absent); the caller validated it
    /// ([`crate::graph::validate`]) against what it read.
    pub async fn put_graph(
        &self,
        id: &ModelId,
        graph: &GraphSpec,
        expected: Revision,
    ) -> Result<Option<Revision>> {
        let result = self.store.compare_and_put(&self.graph_key(id), expected, encode(graph), None).await?;
        Ok(result.succeeded.then_some(result.revision))
    }

    /// Deletes a graph only if it is still at `expected`.
    pub async fn delete_graph(&self, id: &ModelId, expected: Revision) -> Result<bool> {
        Ok(self.store.compare_and_delete(&self.graph_key(id), expected).await?.succeeded)
    }
}

fn validate(spec: &ModelSpec) -> Result<()> {
    if !is_format_name(&spec.model_type) {
        return Err(RegistryError::UnsupportedType(spec.model_type.clone()));
    }
    if spec.path.is_empty() {
        return Err(RegistryError::Invalid("model path is empty; set ModelInfo.path".to_owned()));
    }
    Ok(())
}

/// JSON of a record, as every record is stored.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Decodes a stored record.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::api_spec as spec;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn the_revision_is_the_stores_whatever_is_registered() {
        let store = Arc::new(MemoryStore::new());
        let registry = Registry::new(store.clone(), "dm");
        assert_eq!(registry.revision().await.unwrap(), 0);
        let id = ModelId::new("m").unwrap();
        let registered = registry.register(&id, &spec("/a")).await.unwrap().revision;
        let other = store.put("/elsewhere/x", b"1".to_vec(), None).await.unwrap();
        assert!(other > registered);
        assert_eq!(registry.revision().await.unwrap(), other);
    }

    #[tokio::test]
    async fn registration_is_idempotent_and_conflicts_are_refused() {
        let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
        let id = ModelId::new("m").unwrap();
        assert!(registry.register(&id, &spec("/a")).await.unwrap().created);
        assert!(!registry.register(&id, &spec("/a")).await.unwrap().created);
        assert_eq!(registry.register(&id, &spec("/b")).await, Err(RegistryError::Conflict(id.clone())));
        let mut bad = spec("/a");
        bad.model_type = "Tensor Flow".into();
        let err = registry.register(&ModelId::new("t").unwrap(), &bad).await.unwrap_err();
        assert!(err.to_string().contains("\"Tensor Flow\" is not a format name"), "{err}");
        assert!(registry.unregister(&id).await.unwrap().is_some());
        assert_eq!(registry.unregister(&id).await.unwrap(), None);
        assert_eq!(registry.model(&id).await.unwrap(), None);
        let stored = registry.store().range("/dm/models/").await.unwrap();
        assert!(stored.kvs.is_empty());
    }

    #[tokio::test]
    async fn registering_the_same_model_again_replaces_its_placement_hints_only() {
        let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
        let id = ModelId::new("m").unwrap();
        let first = ModelSpec { auto_delete: true, ..spec("/a") };
        let created = registry.register(&id, &first).await.unwrap();
        assert!(created.created && !created.updated);

        let hinted = ModelSpec { size_bytes: Some(1 << 20), min_copies: Some(2), ..spec("/a") };
        let again = registry.register(&id, &hinted).await.unwrap();
        assert!(!again.created && again.updated && again.revision > created.revision);
        let (stored, revision) = registry.model(&id).await.unwrap().unwrap();
        assert_eq!(revision, again.revision);
        assert_eq!((stored.size_bytes, stored.min_copies), (Some(1 << 20), Some(2)));
        assert!(stored.auto_delete, "the rest stays as first registered");

        let same = registry.register(&id, &hinted).await.unwrap();
        assert!(!same.created && !same.updated && same.revision == again.revision, "idempotent");
        let cleared = registry.register(&id, &spec("/a")).await.unwrap();
        assert!(cleared.updated, "a registration without hints clears them");
        assert_eq!(registry.model(&id).await.unwrap().unwrap().0.min_copies, None);
        let on_gpu = ModelSpec { gpu: Some(crate::gpu::Gpu::Required), ..spec("/a") };
        assert!(registry.register(&id, &on_gpu).await.unwrap().updated, "a new GPU ask is written");
        assert_eq!(registry.model(&id).await.unwrap().unwrap().0.gpu, Some(crate::gpu::Gpu::Required));
        let moved = ModelSpec { min_copies: Some(3), ..spec("/b") };
        assert_eq!(registry.register(&id, &moved).await, Err(RegistryError::Conflict(id.clone())));
    }

    #[tokio::test]
    async fn a_registration_may_ask_for_auto_delete_but_never_clears_it() {
        let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
        let id = ModelId::new("canary").unwrap();
        registry.register(&id, &spec("/a")).await.unwrap();
        // Promoted: a vmodel now targets it with autoDeleteTargetModel.
        let promoted = registry.register(&id, &ModelSpec { auto_delete: true, ..spec("/a") }).await.unwrap();
        assert!(promoted.updated);
        assert!(registry.model(&id).await.unwrap().unwrap().0.auto_delete);
        let plain = registry.register(&id, &spec("/a")).await.unwrap();
        assert!(!plain.updated, "a plain registerModel leaves it as it is");
        assert!(registry.model(&id).await.unwrap().unwrap().0.auto_delete);
    }

    #[tokio::test]
    async fn records_written_by_a_newer_binary_still_read() {
        let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
        let (m, v) = (ModelId::new("m").unwrap(), ModelId::new("v").unwrap());
        let model = br#"{"model_type":"onnx","path":"/a","source":"api","added_later":{"x":1}}"#;
        registry.store().put("/dm/models/m", model.to_vec(), None).await.unwrap();
        let vmodel =
            br#"{"active":"m","target":"m","added_later":true,"split":[{"model":"m","weight":1,"x":2}]}"#;
        registry.store().put("/dm/vmodels/v", vmodel.to_vec(), None).await.unwrap();

        assert_eq!(registry.model(&m).await.unwrap().unwrap().0, spec("/a"));
        assert!(!registry.register(&m, &spec("/a")).await.unwrap().created, "the same model, not a conflict");
        let (read, _) = registry.vmodel(&v).await.unwrap().unwrap();
        assert_eq!((read.active.as_str(), read.split.len()), ("m", 1));
    }

    #[tokio::test]
    async fn graphs_are_stored_compare_and_swap_and_read_with_fields_a_newer_binary_added() {
        let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
        let g = ModelId::new("g").unwrap();
        let spec: GraphSpec = serde_json::from_str(
            r#"{"nodes":{"root":{"routerType":"Sequence","steps":[{"serviceName":"m"}]}}}"#,
        )
        .unwrap();
        let r1 = registry.put_graph(&g, &spec, 0).await.unwrap().unwrap();
        assert_eq!(registry.put_graph(&g, &spec, 0).await.unwrap(), None, "create only once");
        assert_eq!(registry.graph(&g).await.unwrap(), Some((spec.clone(), r1)));
        assert!(!registry.delete_graph(&g, r1 - 1).await.unwrap(), "a stale deleter loses");
        let newer = br#"{"nodes":{"root":{"routerType":"Ensemble","later":1,"steps":[{"serviceName":"m","x":2}]}},"y":3}"#;
        registry.store().put("/dm/graphs/g", newer.to_vec(), None).await.unwrap();
        let (read, r2) = registry.graph(&g).await.unwrap().unwrap();
        assert_eq!(read.nodes["root"].steps[0].service_name.as_deref(), Some("m"));
        assert!(registry.delete_graph(&g, r2).await.unwrap());
        assert_eq!(registry.graph(&g).await.unwrap(), None);
    }

    #[tokio::test]
    async fn vmodel_writes_are_compare_and_swap() {
        let registry = Registry::new(Arc::new(MemoryStore::new()), "dm");
        let v = ModelId::new("v").unwrap();
        let one = VModelSpec {
            active: "a".into(),
            target: "a".into(),
            owner: String::new(),
            transition_error: None,
            split: Vec::new(),
        };
        let r1 = registry.put_vmodel(&v, &one, 0).await.unwrap().unwrap();
        assert_eq!(registry.put_vmodel(&v, &one, 0).await.unwrap(), None, "create only once");
        let two = VModelSpec { target: "b".into(), ..one.clone() };
        assert!(registry.put_vmodel(&v, &two, r1).await.unwrap().is_some());
        assert_eq!(registry.put_vmodel(&v, &one, r1).await.unwrap(), None, "a stale writer loses");
        let (now, rev) = registry.vmodel(&v).await.unwrap().unwrap();
        assert!(now.transitioning());
        assert!(registry.delete_vmodel(&v, rev).await.unwrap());
    }
}
