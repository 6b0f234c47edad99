//! Which model a request is for. In order: the `mm-vmodel-id` header (a vmodel, resolved to its active
//! model), the `mm-model-id` header (a model), then `model_name`, which names a vmodel when one of that
//! name exists (modelmesh-serving clients send the InferenceService name), else a model. Each header
//! also comes as `-bin` (base64, for ids that are not plain ASCII), as ModelMesh clients send them.

use std::sync::LazyLock;

use densemesh_placement::ModelId;
use densemesh_placement::spec::split_point_of_key;
use tonic::metadata::{AsciiMetadataKey, BinaryMetadataKey, MetadataMap};

use crate::error::MeshError;

pub const VMODEL_ID_HEADER: &str = "mm-vmodel-id";
/// A request key (a user id, a session): requests with the same key land on the same model of a
/// vmodel's traffic split.
pub const ROUTE_KEY_HEADER: &str = "densemesh-route-key";
pub const MODEL_ID_HEADER: &str = "mm-model-id";
const VMODEL_ID_BIN_HEADER: &str = "mm-vmodel-id-bin";
const MODEL_ID_BIN_HEADER: &str = "mm-model-id-bin";

/// The same names parsed once: every call looks them up, and a lookup by `&str` parses the name first.
pub static MODEL_ID: http::HeaderName = http::HeaderName::from_static(MODEL_ID_HEADER);
pub static VMODEL_ID: http::HeaderName = http::HeaderName::from_static(VMODEL_ID_HEADER);
static KEYS: LazyLock<[(AsciiMetadataKey, BinaryMetadataKey); 2]> = LazyLock::new(|| {
    [
        (
            AsciiMetadataKey::from_static(VMODEL_ID_HEADER),
            BinaryMetadataKey::from_static(VMODEL_ID_BIN_HEADER),
        ),
        (AsciiMetadataKey::from_static(MODEL_ID_HEADER), BinaryMetadataKey::from_static(MODEL_ID_BIN_HEADER)),
    ]
});

/// The model to run, and the vmodel it was reached through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub model: ModelId,
    pub vmodel: Option<ModelId>,
}

/// Resolves a request's target; `active_model_of` answers a vmodel's active model id, if it exists.
pub fn resolve(
    metadata: &MetadataMap,
    model_name: &str,
    active_model_of: impl Fn(&ModelId) -> Option<String>,
) -> Result<Target, MeshError> {
    let via_vmodel = |vmodel: ModelId| -> Result<Target, MeshError> {
        let active = active_model_of(&vmodel)
            .ok_or_else(|| MeshError::NotFound(format!("vmodel {vmodel} not found")))?;
        let model = ModelId::new(&active)
            .map_err(|e| MeshError::Internal(format!("vmodel {vmodel} points at a bad id: {e}")))?;
        Ok(Target { model, vmodel: Some(vmodel) })
    };
    let [vmodel_keys, model_keys] = &*KEYS;
    if let Some(vmodel) = header_id(metadata, vmodel_keys)? {
        return via_vmodel(vmodel);
    }
    if let Some(model) = header_id(metadata, model_keys)? {
        return Ok(Target { model, vmodel: None });
    }
    if model_name.is_empty() {
        return Err(MeshError::InvalidArgument(format!(
            "no model named: set model_name or the {MODEL_ID_HEADER} header"
        )));
    }
    let id = ModelId::new(model_name).map_err(|e| MeshError::InvalidArgument(format!("model_name: {e}")))?;
    if active_model_of(&id).is_some() {
        return via_vmodel(id);
    }
    Ok(Target { model: id, vmodel: None })
}

/// Whether a call's headers (`has` answers whether one is present) name the model or vmodel it is for;
/// then `model_name` is not read.
pub fn names_target(has: impl Fn(&str) -> bool) -> bool {
    [VMODEL_ID_HEADER, VMODEL_ID_BIN_HEADER, MODEL_ID_HEADER, MODEL_ID_BIN_HEADER].into_iter().any(has)
}

/// `metadata` without the headers that name a call's target: a graph's steps are named by their own
/// ids, not the graph's call.
pub fn without_target_headers(metadata: &MetadataMap) -> MetadataMap {
    let mut headers = metadata.clone().into_headers();
    for name in [VMODEL_ID_HEADER, VMODEL_ID_BIN_HEADER, MODEL_ID_HEADER, MODEL_ID_BIN_HEADER] {
        headers.remove(name);
    }
    MetadataMap::from_headers(headers)
}

/// Where a request falls in a vmodel's traffic split: the fixed hash of its route key
/// ([`split_point_of_key`], FNV-1a 64), so a key lands on the same model on every pod, after restarts
/// and across toolchains; else a fresh pseudo-random number.
pub fn split_point(metadata: &MetadataMap) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    match metadata.get(ROUTE_KEY_HEADER) {
        Some(key) => split_point_of_key(key.as_bytes()),
        None => {
            // Only needs to spread: a counter, hashed so that consecutive requests scatter.
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            split_point_of_key(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes())
        }
    }
}

/// A validated id from a header or its `-bin` form; `None` when neither is present.
fn header_id(
    metadata: &MetadataMap,
    (key, bin_key): &(AsciiMetadataKey, BinaryMetadataKey),
) -> Result<Option<ModelId>, MeshError> {
    let invalid = |what: String| MeshError::InvalidArgument(what);
    let name = key.as_str();
    let value = if let Some(value) = metadata.get(key) {
        value
            .to_str()
            .map_err(|_| invalid(format!("header {name} is not ASCII; send {name}-bin")))?
            .to_owned()
    } else if let Some(value) = metadata.get_bin(bin_key) {
        let bytes =
            value.to_bytes().map_err(|e| invalid(format!("header {name}-bin is not valid base64: {e}")))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| invalid(format!("header {name}-bin is not UTF-8")))?
    } else {
        return Ok(None);
    };
    ModelId::new(&value).map(Some).map_err(|e| invalid(format!("header {name}: {e}")))
}

#[cfg(test)]
mod tests {
    use tonic::metadata::{BinaryMetadataValue, MetadataValue};

    use super::*;

    fn vmodels(id: &ModelId) -> Option<String> {
        (id.as_str() == "isvc").then(|| "isvc-rev2".to_owned())
    }

    fn target(md: &MetadataMap, name: &str) -> (String, Option<String>) {
        let t = resolve(md, name, vmodels).unwrap();
        (t.model.to_string(), t.vmodel.map(|v| v.to_string()))
    }

    #[test]
    fn headers_then_model_name_then_vmodel_of_that_name() {
        let mut md = MetadataMap::new();
        assert_eq!(target(&md, "plain"), ("plain".into(), None));
        assert_eq!(
            target(&md, "isvc"),
            ("isvc-rev2".into(), Some("isvc".into())),
            "model_name names a vmodel"
        );
        md.insert_bin("mm-model-id-bin", BinaryMetadataValue::from_bytes(b"from-bin"));
        assert_eq!(target(&md, "isvc"), ("from-bin".into(), None));
        md.insert("mm-model-id", MetadataValue::from_static("from-header"));
        assert_eq!(target(&md, "isvc"), ("from-header".into(), None));
        md.insert("mm-vmodel-id", MetadataValue::from_static("isvc"));
        assert_eq!(target(&md, "plain"), ("isvc-rev2".into(), Some("isvc".into())), "the vmodel header wins");
    }

    #[test]
    fn rejects_missing_unknown_and_unsafe_ids() {
        let mut md = MetadataMap::new();
        assert!(matches!(resolve(&md, "", vmodels), Err(MeshError::InvalidArgument(_))));
        let err = resolve(&md, "../etc/passwd", vmodels).unwrap_err().to_string();
        assert!(err.contains("model_name") && err.contains('/'), "{err}");
        md.insert("mm-vmodel-id", MetadataValue::from_static("nope"));
        assert!(
            matches!(resolve(&md, "x", vmodels), Err(MeshError::NotFound(m)) if m.contains("vmodel nope"))
        );
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn points_without_a_key_spread_and_keys_stick() {
        let md = MetadataMap::new();
        let below = (0..1000).filter(|_| split_point(&md) % 100 < 80).count();
        assert!((700..900).contains(&below), "{below} of 1000 below 80");
        let mut keyed = MetadataMap::new();
        keyed.insert(ROUTE_KEY_HEADER, tonic::metadata::MetadataValue::from_static("user-1"));
        assert_eq!(split_point(&keyed), split_point(&keyed));
        // Pinned: the same key must land on the same model on every pod, build and toolchain.
        assert_eq!(split_point(&keyed), 0xf84b_a2aa_754a_4bd4, "FNV-1a 64 of the route key");
    }
}
