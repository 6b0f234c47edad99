//! Fuzz targets for what this crate reads from outside: model ids (every API names a model by one)
//! and the records other pods and older or newer versions wrote to the store. Each target takes
//! arbitrary bytes, must never panic, and asserts the properties the rest of the mesh relies on; the
//! AFL++ binaries in `fuzz/` and the corpus replay in this crate's tests call the same functions
//! (docs/fuzzing.md).

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::{Arc, LazyLock};

use crate::graph::{GraphSpec, Known};
use crate::model_id::MAX_LEN;
use crate::registry::{decode, encode};
use crate::{InstanceRecord, ModelId, Placement, VModelSpec};
use crate::{ModelSpec, spec};

/// A registry for its key layout only: the memory store starts its lease reaper on a runtime that is
/// never driven, since nothing here is stored.
static REGISTRY: LazyLock<(tokio::runtime::Runtime, crate::Registry)> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let registry = {
        let _inside = runtime.enter();
        crate::Registry::new(Arc::new(crate::MemoryStore::new()), "fz")
    };
    (runtime, registry)
});

/// `ModelId::new` on any text: an id it accepts is the text itself, 1–253 characters of the allowed
/// set, and one plain path component, so no id can escape a directory or an etcd key segment.
pub fn model_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match ModelId::new(text) {
        Ok(id) => {
            assert_eq!(id.as_str(), text);
            assert!(!text.is_empty() && text.len() <= MAX_LEN, "{text:?}");
            assert!(text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')));
            let mut components = Path::new(text).components();
            assert!(
                matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none(),
                "{text:?} is not one plain path component"
            );
            // A placement key built from the id reads back as the same id and instance.
            let key = REGISTRY.1.placement_key(&id, "pod-0");
            assert_eq!(REGISTRY.1.placement_of_key(&key), Some((id, "pod-0")));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A stored record: the first byte picks the kind (model spec, vmodel, graph, instance record,
/// placement), the rest is the value as etcd holds it. A record that decodes must survive its own
/// encoding unchanged, and every method the mesh calls on it must answer without panicking.
pub fn stored_record(data: &[u8]) {
    let Some((&kind, value)) = data.split_first() else { return };
    let key = "/fz/record";
    match kind % 5 {
        0 => {
            let Ok(spec) = decode::<ModelSpec>(key, value) else { return };
            assert_eq!(decode::<ModelSpec>(key, &encode(&spec)).ok(), Some(spec.clone()));
            assert!(spec.same_model(&spec) && !spec.reloads(&spec) && spec.same_hints(&spec));
        }
        1 => {
            let Ok(vmodel) = decode::<VModelSpec>(key, value) else { return };
            assert_eq!(decode::<VModelSpec>(key, &encode(&vmodel)).ok(), Some(vmodel.clone()));
            for point in [0, 1, 99, u64::MAX, spec::split_point_of_key(value)] {
                let model = vmodel.route(point);
                assert!(
                    model == vmodel.active || vmodel.split.iter().any(|w| w.model == model && w.weight > 0),
                    "route({point}) gave {model:?}, which is neither active nor a weighted model"
                );
            }
            let _ = crate::status::referenced_models(&vmodel);
        }
        2 => graph(value),
        3 => {
            let Ok(record) = decode::<InstanceRecord>(key, value) else { return };
            let again = decode::<InstanceRecord>(key, &encode(&record)).expect("an encoded record decodes");
            // Victims' priorities are floats, which JSON carries to the nearest digit, not the bit.
            let sizes = |r: &InstanceRecord| {
                r.cheapest_victims.as_ref().map(|v| v.iter().map(|v| v.size_bytes).collect::<Vec<_>>())
            };
            assert_eq!(sizes(&again), sizes(&record));
            let plain = |r: InstanceRecord| InstanceRecord { cheapest_victims: None, ..r };
            assert_eq!(plain(again), plain(record.clone()));
            for model_type in &record.model_types {
                assert!(record.offers(model_type));
            }
        }
        _ => {
            let Ok(placement) = decode::<Placement>(key, value) else { return };
            assert_eq!(decode::<Placement>(key, &encode(&placement)).ok(), Some(placement.clone()));
            let _ = (placement.since_ms(), placement.retry_after_ms());
        }
    }
}

/// A stored inference graph: decoded, validated as registration does, and every Switch condition
/// that validation accepts evaluated against a view of a request.
fn graph(value: &[u8]) {
    let Ok(spec) = decode::<GraphSpec>("/fz/graphs/g", value) else { return };
    assert_eq!(decode::<GraphSpec>("/fz/graphs/g", &encode(&spec)).ok(), Some(spec.clone()));
    let mut known = HashMap::new();
    for step in spec.nodes.values().flat_map(|node| &node.steps) {
        if let Some(service) = &step.service_name {
            known.insert(service.clone(), Known::Model);
        }
    }
    let name = ModelId::new("g").expect("a valid id");
    let valid = crate::graph::validate(&name, &spec, &known).is_ok();
    let view = serde_json::json!({
        "id": "r", "parameters": {"tier": "gold"}, "headers": {"x-user": "u1"},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.7]}]
    });
    for step in spec.nodes.values().flat_map(|node| &node.steps) {
        let _ = step.label();
        let _ = step.data();
        match step.parsed_condition() {
            Some(Ok(condition)) => {
                let _ = condition.holds(&view);
                let _ = condition.holds(&serde_json::Value::Null);
            }
            Some(Err(e)) => assert!(!valid, "validation accepted a condition that does not parse: {e}"),
            None => {}
        }
    }
    let _ = crate::graph::service_names(&spec);
}

#[cfg(test)]
mod tests {
    include!("../../fuzz/replay.rs");

    #[test]
    fn corpus_model_id_replays() {
        replay("model_id", super::model_id);
    }

    #[test]
    fn corpus_stored_record_replays() {
        replay("stored_record", super::stored_record);
    }
}
