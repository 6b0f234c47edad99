//! The model formats a runtime declares, as a KServe ServingRuntime writes them: shared by every runtime
//! configured from a file, so they read `supportedModelFormats` and match model types alike.

use serde::Deserialize;

/// A model format a runtime serves: a name, optionally a version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "FormatEntry")]
pub struct ModelFormat {
    /// The format's name (`onnx`, `sklearn`, ...).
    pub name: String,
    /// The format's version, when the runtime serves only that one.
    pub version: Option<String>,
}

impl ModelFormat {
    /// A format of any version.
    pub fn named(name: impl Into<String>) -> Self {
        Self { name: name.into(), version: None }
    }

    /// Whether any of `formats` serves models registered as `model_type`: case-insensitive, and a
    /// `name:version` type matches a format of that name whose version is unset or equal (ModelMesh's
    /// type constraints read types the same way).
    pub fn any_serves(formats: &[ModelFormat], model_type: &str) -> bool {
        let (name, version) = match model_type.split_once(':') {
            Some((name, version)) => (name, Some(version)),
            None => (model_type, None),
        };
        formats.iter().any(|f| {
            f.name.trim().eq_ignore_ascii_case(name)
                && match (&f.version, version) {
                    (Some(have), Some(want)) => have == want,
                    _ => true,
                }
        })
    }
}

/// A format as written: a bare name, or a ServingRuntime `supportedModelFormats` entry.
#[derive(Deserialize)]
#[serde(untagged)]
enum FormatEntry {
    Name(String),
    #[serde(rename_all = "camelCase")]
    Spec {
        name: String,
        #[serde(default)]
        version: Option<String>,
        // Read so ServingRuntime entries paste in unchanged; the mesh picks runtimes by format alone.
        #[serde(default)]
        #[allow(dead_code)]
        auto_select: Option<bool>,
    },
}

impl From<FormatEntry> for ModelFormat {
    fn from(entry: FormatEntry) -> Self {
        match entry {
            FormatEntry::Name(name) => Self { name, version: None },
            FormatEntry::Spec { name, version, .. } => Self { name, version },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_matches_by_name_and_by_version_where_both_give_one() {
        let formats =
            [ModelFormat::named("sklearn"), ModelFormat { name: "Onnx".into(), version: Some("1".into()) }];
        assert!(ModelFormat::any_serves(&formats, "sklearn"));
        assert!(ModelFormat::any_serves(&formats, "SKLEARN:0.24"));
        assert!(ModelFormat::any_serves(&formats, "onnx"));
        assert!(ModelFormat::any_serves(&formats, "onnx:1"));
        assert!(!ModelFormat::any_serves(&formats, "onnx:2"));
        assert!(!ModelFormat::any_serves(&formats, "xgboost"));
    }
}
