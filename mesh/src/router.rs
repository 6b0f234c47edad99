//! Which model a request is for: the `mm-model-id` header (or its binary `-bin` form, which ModelMesh
//! clients send for ids that are not plain ASCII), else the request's `model_name`.

use densemesh_placement::ModelId;
use tonic::metadata::MetadataMap;

use crate::error::MeshError;

pub const MODEL_ID_HEADER: &str = "mm-model-id";
pub const MODEL_ID_BIN_HEADER: &str = "mm-model-id-bin";

/// The model id a request names, validated so it can never address a path outside the repository.
pub fn model_id(metadata: &MetadataMap, model_name: &str) -> Result<ModelId, MeshError> {
    let (name, source) = if let Some(value) = metadata.get(MODEL_ID_HEADER) {
        let name = value.to_str().map_err(|_| {
            MeshError::InvalidArgument(format!(
                "header {MODEL_ID_HEADER} is not ASCII; send {MODEL_ID_BIN_HEADER}"
            ))
        })?;
        (name.to_owned(), MODEL_ID_HEADER)
    } else if let Some(value) = metadata.get_bin(MODEL_ID_BIN_HEADER) {
        let bytes = value.to_bytes().map_err(|e| {
            MeshError::InvalidArgument(format!("header {MODEL_ID_BIN_HEADER} is not valid base64: {e}"))
        })?;
        let name = String::from_utf8(bytes.to_vec())
            .map_err(|_| MeshError::InvalidArgument(format!("header {MODEL_ID_BIN_HEADER} is not UTF-8")))?;
        (name, MODEL_ID_BIN_HEADER)
    } else if model_name.is_empty() {
        return Err(MeshError::InvalidArgument(format!(
            "no model named: set model_name or the {MODEL_ID_HEADER} header"
        )));
    } else {
        (model_name.to_owned(), "model_name")
    };
    ModelId::new(&name).map_err(|e| MeshError::InvalidArgument(format!("{source}: {e}")))
}

#[cfg(test)]
mod tests {
    use tonic::metadata::{BinaryMetadataValue, MetadataValue};

    use super::*;

    #[test]
    fn header_wins_over_model_name() {
        let mut md = MetadataMap::new();
        assert_eq!(model_id(&md, "plain").unwrap().as_str(), "plain");
        md.insert_bin(MODEL_ID_BIN_HEADER, BinaryMetadataValue::from_bytes(b"from-bin"));
        assert_eq!(model_id(&md, "plain").unwrap().as_str(), "from-bin");
        md.insert(MODEL_ID_HEADER, MetadataValue::from_static("from-header"));
        assert_eq!(model_id(&md, "plain").unwrap().as_str(), "from-header");
    }

    #[test]
    fn rejects_missing_and_unsafe_ids() {
        let md = MetadataMap::new();
        assert!(matches!(model_id(&md, ""), Err(MeshError::InvalidArgument(_))));
        let err = model_id(&md, "../etc/passwd").unwrap_err().to_string();
        assert!(err.contains("model_name") && err.contains('/'), "{err}");
    }
}
