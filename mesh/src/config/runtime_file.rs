//! `--runtime-config FILE`: the runtimes a pod runs beside its built-in ones (ONNX Runtime, candle), in
//! one YAML (or JSON) file. Each entry is a runtime of one kind, shaped like a KServe ServingRuntime:
//!
//! ```yaml
//! runtimes:
//!   - kind: v2            # a KServe V2 server with the model-repository extension (MLServer, Triton)
//!     name: mlserver
//!     supportedModelFormats: [sklearn, xgboost, lightgbm]
//!     command: [mlserver, start, "{repository}"]
//!   - kind: spi           # a runtime speaking ModelMesh's model-runtime SPI
//!     name: my-runtime
//!     supportedModelFormats: [custom]
//!     endpoint: unix:///var/run/runtime.sock
//! ```
//!
//! A pod offers (publishes in its instance record) the formats of every runtime here, and placement
//! sends it models of those formats alone.

use std::path::Path;

use serde::Deserialize;

/// The file's contents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    /// The runtimes, in the order they start.
    pub runtimes: Vec<RuntimeEntry>,
}

/// One runtime, by kind.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RuntimeEntry {
    /// A KServe V2 server with the model-repository extension, started and supervised as a pool of
    /// processes (or one already running at an endpoint).
    V2(densemesh_runtime_remote::RemoteRuntimeConfig),
    /// ModelMesh's model-runtime SPI (`mmesh.ModelRuntime`).
    Spi(densemesh_runtime_spi::SpiRuntimeConfig),
}

impl RuntimeEntry {
    /// The runtime's name, for errors.
    pub fn name(&self) -> &str {
        match self {
            RuntimeEntry::V2(v2) => &v2.name,
            RuntimeEntry::Spi(spi) => &spi.name,
        }
    }

    /// The model formats it loads, lower-case, as the mesh's model types name them.
    pub fn formats(&self) -> Vec<String> {
        let names: Vec<&str> = match self {
            RuntimeEntry::V2(v2) => v2.supported_model_formats.iter().map(|f| f.name.as_str()).collect(),
            RuntimeEntry::Spi(spi) => spi.supported_model_formats.iter().map(|f| f.name.as_str()).collect(),
        };
        names.into_iter().map(str::to_ascii_lowercase).collect()
    }
}

/// Reads and checks the file: every entry's own checks, and format names the mesh accepts.
pub fn read(path: &Path) -> Result<RuntimeFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: RuntimeFile =
        serde_yaml::from_str(&text).map_err(|e| format!("{} (--runtime-config): {e}", path.display()))?;
    for entry in &file.runtimes {
        let invalid =
            |why: String| format!("{} (--runtime-config), runtime {:?}: {why}", path.display(), entry.name());
        match entry {
            RuntimeEntry::V2(v2) => v2.validate().map_err(|e| invalid(e.to_string()))?,
            RuntimeEntry::Spi(spi) => spi.validate().map_err(|e| invalid(e.to_string()))?,
        }
        if let Some(bad) = entry.formats().iter().find(|f| !densemesh_placement::spec::is_format_name(f)) {
            return Err(invalid(format!("{bad:?} is not a model format name (e.g. sklearn, onnx)")));
        }
        if entry.formats().is_empty() {
            return Err(invalid("it lists no supportedModelFormats".to_owned()));
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<RuntimeFile, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runtimes.yaml");
        std::fs::write(&path, yaml).unwrap();
        read(&path)
    }

    #[test]
    fn an_spi_runtime_is_read_with_its_formats() {
        let file = parse(
            "runtimes:\n  - kind: spi\n    name: custom\n    supportedModelFormats: [Custom, {name: other, version: '1'}]\n    endpoint: unix:///tmp/x.sock\n",
        )
        .unwrap();
        assert_eq!(file.runtimes.len(), 1);
        assert_eq!(file.runtimes[0].name(), "custom");
        assert_eq!(file.runtimes[0].formats(), ["custom", "other"]);
    }

    #[test]
    fn a_v2_runtime_pool_is_read_with_its_command_and_formats() {
        let file = parse(
            "runtimes:\n  - kind: v2\n    name: mlserver\n    supportedModelFormats: [sklearn, xgboost]\n    command: [mlserver, start, '{repository}']\n    processes: 2\n",
        )
        .unwrap();
        let RuntimeEntry::V2(v2) = &file.runtimes[0] else { panic!("{:?}", file.runtimes[0]) };
        assert_eq!((v2.processes, v2.command.as_deref().map(<[String]>::len)), (2, Some(3)));
        assert_eq!(file.runtimes[0].formats(), ["sklearn", "xgboost"]);
        let both = parse("runtimes:\n  - kind: v2\n    name: m\n    supportedModelFormats: [sklearn]\n    command: [m]\n    endpoint: 127.0.0.1:1\n").unwrap_err();
        assert!(both.contains("runtime \"m\""), "{both}");
    }

    #[test]
    fn mistakes_are_named_with_the_file_and_the_runtime() {
        let unknown_kind = parse("runtimes:\n  - kind: grpc\n    name: x\n").unwrap_err();
        assert!(
            unknown_kind.contains("runtimes.yaml (--runtime-config)") && unknown_kind.contains("grpc"),
            "{unknown_kind}"
        );
        let no_formats =
            parse("runtimes:\n  - kind: spi\n    name: x\n    supportedModelFormats: []\n    endpoint: 127.0.0.1:1\n")
                .unwrap_err();
        assert!(
            no_formats.contains("runtime \"x\"") && no_formats.contains("supportedModelFormats"),
            "{no_formats}"
        );
        let typo = parse("runtimes: []\nruntime: []\n").unwrap_err();
        assert!(typo.contains("unknown field"), "{typo}");
        let missing = read(Path::new("/nonexistent/runtimes.yaml")).unwrap_err();
        assert!(missing.contains("cannot read /nonexistent/runtimes.yaml"), "{missing}");
    }
}
